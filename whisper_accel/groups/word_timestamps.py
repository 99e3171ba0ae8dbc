"""The ``word_timestamps`` group: token and word timestamps on the fast path.

Why: ``return_token_timestamps=True`` (and the ASR pipeline's ``return_timestamps="word"``)
makes Whisper's ``generate`` turn on ``output_attentions`` (``_set_return_outputs``) only to read
the alignment heads' cross-attentions afterwards. With attentions on, the encoder and the
decode loops must run stock code (they return every layer's self- and cross-attentions), so a
transcription with word timestamps ran at stock speed (tiny.en, 4.7 s clip: 28.7 s vs 0.66 s).

What: ``WhisperGenerationMixin._set_return_outputs`` is replaced. When token timestamps are asked
and the caller did not ask for attentions, ``output_attentions`` stays off and the generation
config is marked (:data:`whisper_accel.runtime.loops.CROSS_ATTENTIONS`): the encoder runs its
graphs, and the greedy and beam loops launch a variant of their step graph that also returns each
layer's cross-attention probabilities, which they return as stock's ``cross_attentions`` (a tuple
over steps of tuples over layers, (rows, heads, tokens, frames)). transformers' own
``_extract_token_timestamps`` (median filter, DTW) then runs unchanged on them. A loop that runs
stock code for the call turns ``output_attentions`` back on first, so stock collects them.

Differences a caller can see: with the fast path the output has no ``decoder_attentions`` /
``encoder_attentions`` (the caller did not ask for attentions; stock returns them because it
forced ``output_attentions`` on). Asking for ``output_attentions=True`` yourself keeps stock
behaviour. Applies only while the ``greedy`` and ``beam`` groups' loops are in place (checked per
call): without them nothing would collect the attentions.
"""

from __future__ import annotations

from typing import List

from .._environment import Gates
from .._patcher import Patch, is_ours
from ..runtime.interop import import_whisper
from ..runtime.loops import CROSS_ATTENTIONS

GATES = Gates(backends=("CPU",))
SUMMARY = "token/word timestamps from cross-attentions returned by the decode loops' graphs"


def _loops_in_place() -> bool:
    mw = import_whisper()
    cls = mw.WhisperForConditionalGeneration
    return all(name in vars(cls) and is_ours(vars(cls)[name]) for name in ("_sample", "_beam_search"))


def make_set_return_outputs(original):
    """Replacement for the staticmethod ``_set_return_outputs(return_dict_in_generate,
    return_token_timestamps, logprob_threshold, generation_config)``."""
    inner = original.__func__

    def _set_return_outputs(return_dict_in_generate, return_token_timestamps, logprob_threshold,
                            generation_config):
        asked = bool(generation_config.output_attentions)
        out = inner(return_dict_in_generate, return_token_timestamps, logprob_threshold, generation_config)
        ours = bool(return_token_timestamps) and not asked and _loops_in_place()
        setattr(generation_config, CROSS_ATTENTIONS, ours)
        if ours:
            generation_config.output_attentions = False
        return out

    return staticmethod(_set_return_outputs)


def patches(env) -> List[Patch]:
    import_whisper()
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

    return [Patch("word_timestamps", WhisperGenerationMixin, "_set_return_outputs", make_set_return_outputs,
                  "token timestamps without output_attentions: the loops' graphs return the cross-attentions")]
