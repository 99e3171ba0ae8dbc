"""The lowest layer: the FlashAttention-2 kernel, native conv1d and the jit graphs of Whisper's
encoder and decoder step (MindSpore); the fused C++ kernels (``fused.cc`` on ``simd.h``), their
instruction-set variants (:mod:`.isa`) and build (:mod:`.build`); the weight schema
(:mod:`.weights`) and the kernels' numpy references (:mod:`.reference`), pure Python. Nothing
here imports MindNLP, mindtorch or transformers."""
