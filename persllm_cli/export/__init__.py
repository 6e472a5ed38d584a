"""`persllm export`: a run as a merged transformers model, a GGUF file, or an Ollama model."""
