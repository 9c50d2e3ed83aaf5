"""The layer-by-layer prune around the methods: where a model family keeps its layers (adapters), capturing what
the decoder layers receive (capture), the sequential loop (sequential), mixtures' experts as linears (experts), the
activations' memory (memory) and resumable progress (resume)."""
