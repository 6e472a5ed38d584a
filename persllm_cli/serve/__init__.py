"""`persllm serve`: the persona behind an OpenAI-compatible API and a web chat page."""
