"""What several patch groups share, and what knows MindNLP: mindtorch interop
(:mod:`.interop`), the compiled model and its binding to a module (:mod:`.model`,
:mod:`.binding`), the static KV cache of a generation (:mod:`.decode_state`), and the decode
loops' rules in numpy (:mod:`.masks`, :mod:`.rules`, :mod:`.timestamps`).

Imports only :mod:`whisper_accel.kernels` and the package's private layer; groups import it.
"""
