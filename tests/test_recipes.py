"""Hugging Face's Whisper speed recipes on the fast path (issue 24), each against stock:

* ``streamer=``: the greedy fast loop puts what stock ``_sample`` puts (the prompt, each step's
  (B,) tokens, then ``end()`` once), same values, dtypes, count and order; beam + streamer keeps
  stock's error; a streamer's own exception is the user's (not a fault of ours); a fault of ours
  after some puts lets stock finish without putting a step twice.
* ``cache_implementation="static"`` and a user's ``EncoderDecoderCache(StaticCache, StaticCache)``:
  the fast greedy and beam loops run, with stock's tokens and scores, and the StaticCache holds
  what stock's steps leave in it (short-form, batched, long-form).
* ``compat``: ``return_tensors="ms"``; ``attn_implementation="flash_attention_2"`` with only the
  ``compat`` group.

The fast path must be taken: ``whisper_accel.status()["calls"]`` is read for each patched call.
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

from transformers import WhisperConfig, WhisperForConditionalGeneration  # noqa: E402
from transformers.cache_utils import EncoderDecoderCache, StaticCache  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import whisper_accel  # noqa: E402
from whisper_accel.runtime import calls  # noqa: E402
from conftest import MINI, mini_model, rel_diff  # noqa: E402

N_MELS = 16
ONLY_COMPAT = dict(attention=False, conv1d=False, compiled=False, generation=False, greedy=False, beam=False,
                   word_timestamps=False)


@pytest.fixture(scope="module")
def model():
    m = mini_model(max_target_positions=96, init_std=0.3)
    m.generation_config.no_timestamps_token_id = 200  # timestamps: ids 201..299
    return m


def _feats(batch=1, frames=128, seed=0):
    rng = np.random.default_rng(seed)
    return torch.tensor((3 * rng.standard_normal((batch, N_MELS, frames))).astype(np.float32))


def _gen(model, feats, **kw):
    with torch.no_grad():
        return model.generate(feats, do_sample=False, **kw)


def _fast(entry):
    return whisper_accel.status()["calls"].get(entry, {"fast": 0, "stock": 0, "reasons": {}})


def _patched(model, feats, entry="greedy loop", **kw):
    """``generate`` under every group; asserts ``entry`` took its fast path (and no stock)."""
    model.__dict__.pop("_cache", None)
    with whisper_accel.patched():
        calls.reset()
        out = _gen(model, feats, **kw)
        got = _fast(entry)
    assert got["fast"] >= 1 and got["stock"] == 0, got
    return out


def _stock(model, feats, **kw):
    model.__dict__.pop("_cache", None)
    return _gen(model, feats, **kw)


def _np(t):
    return t.asnumpy()


def _close_scores(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        a, b = _np(a), _np(b)
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))
        fin = np.isfinite(b)
        np.testing.assert_allclose(a[fin], b[fin], rtol=1e-4, atol=1e-4)


def _same_cache(got, ref, layers=2):
    """Same cache classes and shapes, K/V within float32 noise (the fused kernels sum in another
    order than MindSpore's operators)."""
    assert type(got) is type(ref)
    for name in ("self_attention_cache", "cross_attention_cache"):
        g, r = getattr(got, name), getattr(ref, name)
        assert type(g) is type(r), name
        for layer in range(layers):
            for kv in ("keys", "values"):
                a, b = _np(getattr(g.layers[layer], kv)), _np(getattr(r.layers[layer], kv))
                assert a.shape == b.shape, (name, layer, kv, a.shape, b.shape)
                np.testing.assert_array_equal(a == 0, b == 0)  # the same slots written
                assert rel_diff(a, b) < 1e-5, (name, layer, kv)


# ------------------------------------------------------------------------------------ streamers


class Recorder(BaseStreamer):
    def __init__(self):
        self.seen = []

    def put(self, value):
        self.seen.append(value)

    def end(self):
        self.seen.append("end")


def _same_stream(got, ref):
    ends = (lambda seen: [i for i, x in enumerate(seen) if isinstance(x, str)])
    # end() where stock calls it (once per inner generate() call: Whisper may run more than one)
    assert len(got) == len(ref) and ends(got) == ends(ref) and ends(ref)[-1] == len(ref) - 1
    for g, r in zip(got, ref):
        if isinstance(r, str):
            continue
        assert isinstance(g, torch.Tensor) and g.dtype == r.dtype and tuple(g.shape) == tuple(r.shape)
        np.testing.assert_array_equal(_np(g), _np(r))


@pytest.mark.parametrize("batch,kw", [
    (3, dict(max_new_tokens=16)),  # a batch: each step puts (3,) tokens (pad ids for rows that ended)
    (1, dict(max_new_tokens=10, return_timestamps=True)),
], ids=["batch3-eos", "timestamps"])
def test_streamer_on_the_fast_greedy_loop(model, batch, kw):
    ref, got = Recorder(), Recorder()
    feats = _feats(batch, seed=3)
    stock = _stock(model, feats, streamer=ref, **kw)
    fast = _patched(model, feats, streamer=got, **kw)
    np.testing.assert_array_equal(_np(fast), _np(stock))
    _same_stream(got.seen, ref.seen)
    assert ref.seen[0].shape[0] == batch and ref.seen[0].ndim == 2  # the prompt first (generate puts it)
    assert len(ref.seen) >= 4


def test_streamer_with_beam_search_keeps_stock_error(model):
    def err():
        with pytest.raises(ValueError) as info:
            _gen(model, _feats(), num_beams=2, max_new_tokens=4, streamer=Recorder())
        return str(info.value)

    stock = err()
    with whisper_accel.patched():
        assert err() == stock


def test_streamer_exception_is_the_users(model):
    class Boom(Recorder):
        def put(self, value):
            super().put(value)
            if len(self.seen) == 3:
                raise KeyError("from the streamer")

    with whisper_accel.patched():
        calls.reset()
        with pytest.raises(KeyError, match="from the streamer"):
            _gen(model, _feats(), max_new_tokens=8, streamer=Boom())
        assert not any("fault" in r for r in _fast("greedy loop")["reasons"])
        _gen(model, _feats(), max_new_tokens=3)  # still fast: no fault was recorded
        assert _fast("greedy loop")["fast"] == 2


def test_fault_after_puts_streams_each_step_once(monkeypatch):
    from whisper_accel.runtime import rules

    m = mini_model(max_target_positions=96, init_std=0.3)  # a fault turns this model stock for good
    ref, got = Recorder(), Recorder()
    stock = _gen(m, _feats(seed=5), max_new_tokens=10, streamer=ref)
    real = rules.Processors.mask

    def failing(self, cur_len):
        if cur_len == 5:
            raise RuntimeError("injected graph failure")
        return real(self, cur_len)

    monkeypatch.setattr(rules.Processors, "mask", failing)
    with whisper_accel.patched():
        calls.reset()
        with pytest.warns(UserWarning):
            fast = _gen(m, _feats(seed=5), max_new_tokens=10, streamer=got)
        assert any("injected graph failure" in r for r in _fast("greedy loop")["reasons"])
    np.testing.assert_array_equal(_np(fast), _np(stock))
    _same_stream(got.seen, ref.seen)


# ------------------------------------------------------------------------------------ static cache

DICT = dict(return_dict_in_generate=True, output_scores=True)


@pytest.mark.parametrize("batch,beams", [(2, 1), (2, 3)], ids=["greedy-batch2", "beam3-batch2"])
def test_static_cache_short_form(model, batch, beams):
    feats = _feats(batch, seed=7)
    kw = dict(max_new_tokens=12, num_beams=beams, cache_implementation="static", **DICT)
    entry = "greedy loop" if beams == 1 else "beam search loop"
    stock = _stock(model, feats, **kw)
    stock_internal = model._cache
    fast = _patched(model, feats, entry, **kw)
    np.testing.assert_array_equal(_np(fast.sequences), _np(stock.sequences))
    _close_scores(fast.scores, stock.scores)
    if beams > 1:
        np.testing.assert_allclose(_np(fast.sequences_scores), _np(stock.sequences_scores), atol=1e-4)
    _same_cache(fast.past_key_values, stock.past_key_values)  # what generate returns
    assert type(model._cache.self_attention_cache) is StaticCache
    _same_cache(model._cache, stock_internal)  # the StaticCache generate keeps on the model


def test_static_cache_without_dict_output_is_filled_as_stock(model):
    """generate keeps its StaticCache on the model for the next call: it is left as stock leaves
    it (filled, so the next call's reuse checks read its batch size), and the next call works."""
    feats = _feats(2, seed=8)
    stock = _stock(model, feats, max_new_tokens=9, cache_implementation="static")
    stock_internal = model._cache
    fast = _patched(model, feats, max_new_tokens=9, cache_implementation="static")
    np.testing.assert_array_equal(_np(fast), _np(stock))
    _same_cache(model._cache, stock_internal)
    with whisper_accel.patched():  # the kept cache is reset and reused by the next call
        calls.reset()
        again = _gen(model, feats, max_new_tokens=9, cache_implementation="static")
        assert _fast("greedy loop") == {"fast": 1, "stock": 0, "reasons": {}}
    np.testing.assert_array_equal(_np(again), _np(stock))


def _user_cache(batch, length):
    cfg = WhisperConfig(**{**MINI, "max_target_positions": 96})
    return EncoderDecoderCache(StaticCache(config=cfg, max_cache_len=length), StaticCache(config=cfg, max_cache_len=64))


@pytest.mark.parametrize("beams", [1, 2])
def test_user_static_cache_filled_in_place(model, beams):
    feats = _feats(1, seed=9)
    ref_cache, our_cache = _user_cache(beams, 40), _user_cache(beams, 40)
    kw = dict(max_new_tokens=10, min_new_tokens=10, num_beams=beams)
    stock = _stock(model, feats, past_key_values=ref_cache, **kw)
    fast = _patched(model, feats, "greedy loop" if beams == 1 else "beam search loop", past_key_values=our_cache,
                    **kw)
    np.testing.assert_array_equal(_np(fast), _np(stock))
    _same_cache(our_cache, ref_cache)


def test_static_cache_that_does_not_fit_is_left_to_stock():
    """A StaticCache shorter than the generation, or built for another batch, is left to stock
    code with the reason counted (stock then fails as it fails: MindSpore aborts the process on
    the out-of-range ``index_copy_``, so this checks the decision, not a run)."""
    from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteriaList

    from whisper_accel.runtime.decode_state import static_misfit, unusable
    from whisper_accel.runtime.loops import why_stock

    m = mini_model()
    ids = torch.tensor([[1, 40]], dtype=torch.int64)
    crit = StoppingCriteriaList([MaxLengthCriteria(max_length=14)])
    gc = m.generation_config
    cache = _user_cache(1, 5)
    assert unusable(cache) is None
    why = why_stock(m, ids, crit, gc, False, {"past_key_values": cache})
    assert why == "the self-attention StaticCache is shorter than the generation (13 positions)"
    assert why_stock(m, ids, crit, gc, False, {"past_key_values": _user_cache(1, 13)}) is None
    cache = _user_cache(1, 20)
    cache.self_attention_cache.update(torch.zeros((2, 4, 1, 16)), torch.zeros((2, 4, 1, 16)), 0)
    cache.self_attention_cache.update(torch.zeros((2, 4, 1, 16)), torch.zeros((2, 4, 1, 16)), 1)
    cache.reset()
    assert static_misfit(cache, 1, 13) == "the self-attention StaticCache was built for another batch size"
    assert unusable(EncoderDecoderCache(StaticCache(config=m.config, max_cache_len=8, offloading=True),
                                        StaticCache(config=m.config, max_cache_len=64))) is not None


def test_static_cache_long_form_batched(model):
    """> 128 frames, return_timestamps: Whisper's sequential long-form loop resets the kept
    StaticCache for each window (and pads a shrinking batch back to its size)."""
    feats = _feats(2, frames=300, seed=2)
    mask = torch.ones((2, 300), dtype=torch.int64)
    mask[1, 220:] = 0  # the second audio is shorter: the batch shrinks after its last window
    kw = dict(attention_mask=mask, max_new_tokens=14, return_timestamps=True, return_segments=True,
              cache_implementation="static")
    stock = _stock(model, feats, **kw)
    fast = _patched(model, feats, **kw)
    np.testing.assert_array_equal(_np(fast["sequences"]), _np(stock["sequences"]))
    assert len(stock["segments"][0]) > 1
    for rs, fs in zip(stock["segments"], fast["segments"]):
        assert [(float(s["start"]), float(s["end"])) for s in rs] == [(float(s["start"]), float(s["end"])) for s in fs]
        for a, b in zip(rs, fs):
            np.testing.assert_array_equal(_np(a["tokens"]), _np(b["tokens"]))


def test_decoder_step_takes_a_static_cache(model):
    """The compiled decoder step (what stock loops call) holds its state on a StaticCache too,
    and spills into it when stock code needs the contents (here: ``reorder_cache``)."""
    from transformers.modeling_outputs import BaseModelOutput

    feats = _feats(2, seed=4)
    ids = torch.tensor([[1, 40], [1, 41]], dtype=torch.int64)

    def steps():
        with torch.no_grad():
            enc = BaseModelOutput(last_hidden_state=model.model.encoder(feats)[0])
            cache = _user_cache(2, 16)
            out1 = model(encoder_outputs=enc, decoder_input_ids=ids, past_key_values=cache, use_cache=True,
                         cache_position=torch.arange(2))
            out2 = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([[7], [9]]), past_key_values=cache,
                         use_cache=True, cache_position=torch.tensor([2]))
            cache.reorder_cache(torch.tensor([1, 0]))
            return out1.logits, out2.logits, cache

    s1, s2, scache = steps()
    with whisper_accel.patched():
        calls.reset()
        f1, f2, fcache = steps()
        step = _fast("decoder step")
    assert step["fast"] == 2 and step["stock"] == 0, step
    assert rel_diff(f1, s1) < 1e-4 and rel_diff(f2, s2) < 1e-4
    _same_cache(fcache, scache)


# ------------------------------------------------------------------------------------ compat


def test_return_tensors_ms():
    from transformers import BatchEncoding, BatchFeature
    from transformers.utils import TensorType

    with pytest.raises(ValueError, match="ms is not a valid TensorType"):
        TensorType("ms")
    with whisper_accel.patched(**ONLY_COMPAT):
        assert TensorType("ms") is TensorType.PYTORCH and TensorType("mindspore") is TensorType.PYTORCH
        enc = BatchEncoding({"input_ids": [[1, 2, 3]]}).convert_to_tensors("ms")
        feat = BatchFeature({"input_features": np.zeros((1, 2, 3), np.float32)}, tensor_type="ms")
        assert isinstance(enc["input_ids"], torch.Tensor) and isinstance(feat["input_features"], torch.Tensor)
        with pytest.raises(ValueError, match="not a valid TensorType"):
            TensorType("xyz")
    with whisper_accel.patched(compat=False):  # switchable
        with pytest.raises(ValueError, match="ms is not a valid TensorType"):
            TensorType("ms")
    with pytest.raises(ValueError, match="ms is not a valid TensorType"):  # undone by unpatch
        TensorType("ms")


def test_flash_attention_2_with_compat_alone():
    """``WHISPER_ACCEL=compat``: a flash_attention_2 Whisper loads and generates what the same
    weights give with ``sdpa`` on stock."""
    feats = _feats(2, seed=6)
    torch.manual_seed(0)
    ref_model = WhisperForConditionalGeneration(WhisperConfig(**MINI, init_std=0.3, attn_implementation="sdpa")).eval()
    stock = _gen(ref_model, feats, max_new_tokens=8, **DICT)
    with pytest.raises(Exception):  # stock: "the package flash_attn seems to be not installed"
        WhisperForConditionalGeneration(WhisperConfig(**MINI, attn_implementation="flash_attention_2"))
    with whisper_accel.patched(**ONLY_COMPAT):
        torch.manual_seed(0)
        fa2 = WhisperForConditionalGeneration(
            WhisperConfig(**MINI, init_std=0.3, attn_implementation="flash_attention_2")).eval()
        assert fa2.config._attn_implementation == "flash_attention_2"
        got = _gen(fa2, feats, max_new_tokens=8, **DICT)
    np.testing.assert_array_equal(_np(got.sequences), _np(stock.sequences))
    _close_scores(got.scores, stock.scores)
