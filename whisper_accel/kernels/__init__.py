"""Pure MindSpore: the FlashAttention-2 kernel, native conv1d, and the jit graphs of Whisper's
encoder and decoder step. Nothing here imports MindNLP, mindtorch or transformers."""
