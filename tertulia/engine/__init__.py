"""Engine: KV cache, attention over it, sampling, stop strings, streaming detokenization, quantization."""
