"""persllm: personified training of language models (the PersLLM method) as one command-line tool."""

__version__ = "0.1.0"
