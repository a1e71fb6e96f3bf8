"""Converting a Hugging Face checkpoint to GGUF: the converter, its metadata keys, packed string arrays,
the completeness check."""
