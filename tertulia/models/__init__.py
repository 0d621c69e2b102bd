"""Models layer: architecture, loaders (GGUF, HF directories), tokenizer, chat template, registry."""
