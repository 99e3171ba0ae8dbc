"""The encoder and decoder-step replacements (the engines of runtime/encoder_engine.py and
runtime/decoder_engine.py behind ``WhisperEncoder.forward`` and
``WhisperForConditionalGeneration.forward``): equivalence with stock and fallbacks.

A seeded random 2-layer Whisper with small dims keeps compile + run time low.
"""

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import torch  # noqa: E402  (mindtorch, via mindnlp)

from transformers.models.whisper import modeling_whisper as mw  # noqa: E402

from whisper_accel import config  # noqa: E402
from whisper_accel._patcher import Patch, Patcher  # noqa: E402
from whisper_accel.config import Config  # noqa: E402
from whisper_accel.groups import decoder as D  # noqa: E402
from whisper_accel.groups import encoder as E  # noqa: E402
from whisper_accel.runtime import decoder_engine  # noqa: E402
from whisper_accel.runtime.arranged import DecoderWeights, EncoderWeights  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402
from whisper_accel.runtime.decoder_engine import DecoderEngine  # noqa: E402
from whisper_accel.runtime.encoder_engine import EncoderEngine  # noqa: E402
from conftest import mini_model  # noqa: E402

N_MELS, SRC_POS = 16, 64  # input frames = 2 * SRC_POS


def _config(**changes) -> Config:
    """This session's config from the environment (its cache directory: never the user's) with
    ``changes``. A bare ``Config(...)`` would build the kernels in ~/.cache/whisper_accel."""
    return Config.from_env().with_(**changes)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def model():
    return mini_model(begin_suppress_tokens=None, suppress_tokens=None)


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    return torch.tensor(rng.standard_normal((1, N_MELS, 2 * SRC_POS)).astype(np.float32))


PATCHES = [Patch("encoder", mw.WhisperEncoder, "forward", E.make_encoder_forward),
           Patch("decoder", mw.WhisperForConditionalGeneration, "forward", D.make_generation_forward)]


@pytest.fixture
def patched():
    p = Patcher()
    p.apply(PATCHES)
    try:
        yield p
    finally:
        p.undo()


def _gen(model, feats, n=20, **kw):
    with torch.no_grad():
        return model.generate(feats, max_new_tokens=n, min_new_tokens=n, **kw).asnumpy()


@pytest.fixture(scope="module")
def stock(model, feats):
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state.asnumpy()
    return {"enc": enc, "gen": _gen(model, feats)}


def test_wrappers_keep_original(patched):
    assert mw.WhisperEncoder.forward.__wrapped__ is not None
    assert not hasattr(mw.WhisperEncoder.forward.__wrapped__, "__wrapped__")


def test_encoder_matches_stock(model, feats, stock, patched):
    with torch.no_grad():
        out = model.model.encoder(feats)
        tup = model.model.encoder(feats, return_dict=False)
    assert isinstance(model.model.encoder.__dict__.get(ATTR), EncoderEngine)  # fast path ran
    assert _rel(out.last_hidden_state.asnumpy(), stock["enc"]) < 1e-4
    assert isinstance(tup, tuple) and len(tup) == 1
    assert _rel(tup[0].asnumpy(), stock["enc"]) < 1e-4


def test_whole_encoder_graph_option_matches_stock(model, feats, stock, patched):
    """``_config(whole_encoder_graph=True)``: the plain graphs run every layer in one launch."""
    model.model.encoder.__dict__.pop(ATTR, None)
    config.activate(_config(encoder="plain", whole_encoder_graph=True))
    try:
        with torch.no_grad():
            out = model.model.encoder(feats)
        eng = model.model.encoder.__dict__[ATTR]
    finally:
        config.activate(None)
        model.model.encoder.__dict__.pop(ATTR, None)
    assert eng.executor == "plain" and eng.layers_per_launch == len(model.model.encoder.layers)
    assert _rel(out.last_hidden_state.asnumpy(), stock["enc"]) < 1e-4


def test_generate_tokens_identical(model, feats, stock, patched):
    out = _gen(model, feats)
    assert isinstance(model.__dict__.get(ATTR), DecoderEngine)
    assert np.array_equal(out, stock["gen"])


def test_generate_with_cache_growth(model, feats, stock, patched, monkeypatch):
    monkeypatch.setattr(decoder_engine, "BUCKETS", (4, 8, 16, 64))  # forces three grow_cache steps in 21 tokens
    assert np.array_equal(_gen(model, feats), stock["gen"])


def test_beam_search_spills_to_stock(model, feats, patched):
    got = _gen(model, feats, n=6, num_beams=2)
    patched.undo()
    want = _gen(model, feats, n=6, num_beams=2)
    assert np.array_equal(got, want)


def test_plain_forward_logits(model, feats, patched):
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        got = model(input_features=feats, decoder_input_ids=ids).logits.asnumpy()
        patched.undo()
        want = model(input_features=feats, decoder_input_ids=ids).logits.asnumpy()
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-4


def test_fallbacks_give_stock_results(model, feats, stock, patched):
    ids = torch.tensor([[1, 5]])
    with torch.no_grad():
        enc = model.model.encoder(feats, output_hidden_states=True)
        assert enc.hidden_states is not None and len(enc.hidden_states) == 3
        assert _rel(enc.last_hidden_state.asnumpy(), stock["enc"]) < 1e-6
        out = model(input_features=feats, decoder_input_ids=ids, output_attentions=True)
        assert out.decoder_attentions is not None and out.cross_attentions is not None
        masked = model(input_features=feats, decoder_input_ids=ids,
                       decoder_attention_mask=torch.tensor([[1, 1]]))
        patched.undo()
        ref = model(input_features=feats, decoder_input_ids=ids).logits.asnumpy()
    for o in (out, masked):
        assert _rel(o.logits.asnumpy(), ref) < 1e-6


def test_use_cache_false_runs_the_graph_and_returns_no_cache(model, feats, patched):
    """Whisper's language detection calls the model once with ``use_cache=False``."""
    from whisper_accel.runtime import calls

    ids = torch.tensor([[1, 5]])
    calls.reset()
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=ids, use_cache=False)
        as_tuple = model(input_features=feats, decoder_input_ids=ids, use_cache=False, return_dict=False)
        patched.undo()
        ref = model(input_features=feats, decoder_input_ids=ids, use_cache=False)
        ref_tuple = model(input_features=feats, decoder_input_ids=ids, use_cache=False, return_dict=False)
    assert calls.snapshot()["decoder step"] == {"fast": 2, "stock": 0, "reasons": {}}
    assert out.past_key_values is None and ref.past_key_values is None
    assert _rel(out.logits.asnumpy(), ref.logits.asnumpy()) < 1e-4
    assert len(as_tuple) == len(ref_tuple)
    assert _rel(as_tuple[0].asnumpy(), ref_tuple[0].asnumpy()) < 1e-4


def test_weight_replacement_invalidates(model, feats, patched):
    with torch.no_grad():
        _gen(model, feats, n=4)
        first = model.__dict__[ATTR]
        old = model.model.decoder.layer_norm.bias
        try:
            model.model.decoder.layer_norm.bias = torch.nn.Parameter(old + 0.5)
            got = _gen(model, feats, n=8)
            assert model.__dict__[ATTR] is not first
            patched.undo()
            want = _gen(model, feats, n=8)
        finally:
            model.model.decoder.layer_norm.bias = old
    assert np.array_equal(got, want)


def test_batch_of_two(model, feats, patched):
    rng = np.random.default_rng(1)
    other = rng.standard_normal((1, N_MELS, 2 * SRC_POS)).astype(np.float32)
    both = torch.tensor(np.concatenate([feats.asnumpy(), other], 0))
    got = _gen(model, both, n=10)
    patched.undo()
    want = _gen(model, both, n=10)
    assert got.shape == want.shape and got.shape[0] == 2
    assert np.array_equal(got, want)


def test_inplace_weight_update_is_seen(model, feats, patched):
    with torch.no_grad():
        before = _gen(model, feats, n=8)
        w = model.model.decoder.layer_norm.weight
        try:
            w.mul_(-1.0)  # same Parameter object, new buffer; flips the logits' sign
            got = _gen(model, feats, n=8)
            patched.undo()
            want = _gen(model, feats, n=8)
        finally:
            w.mul_(-1.0)
    assert not np.array_equal(want, before)  # the update matters...
    assert np.array_equal(got, want)  # ...and the compiled path saw it


def test_compiled_model_is_kept_across_calls(model, feats, patched):
    """Weights are arranged once per module, not per call (no per-call copies or views)."""
    _gen(model, feats, n=4)
    enc_cw, dec_cw = model.model.encoder.__dict__[ATTR], model.__dict__[ATTR]
    _gen(model, feats, n=4)
    assert model.model.encoder.__dict__[ATTR] is enc_cw and model.__dict__[ATTR] is dec_cw
    # the encoder is arranged once, by itself: an encoder engine has no decoder weights, and vice versa
    assert isinstance(enc_cw, EncoderEngine) and isinstance(enc_cw.weights, EncoderWeights)
    assert isinstance(dec_cw, DecoderEngine) and isinstance(dec_cw.weights, DecoderWeights)
    assert not hasattr(enc_cw, "cross_kv") and not hasattr(dec_cw, "encode")


def test_inplace_encoder_update_is_seen(model, feats, stock, patched):
    with torch.no_grad():
        model.model.encoder(feats)
        w = model.model.encoder.layer_norm.bias
        try:
            w.add_(0.25)
            got = model.model.encoder(feats).last_hidden_state.asnumpy()
            patched.undo()
            want = model.model.encoder(feats).last_hidden_state.asnumpy()
        finally:
            w.sub_(0.25)
    assert _rel(want, stock["enc"]) > 1e-3  # the update matters...
    assert _rel(got, want) < 1e-4  # ...and the compiled encoder saw it


def test_load_state_dict_is_seen(feats, patched):
    model = mini_model(seed=5, begin_suppress_tokens=None, suppress_tokens=None)
    other = mini_model(seed=6, begin_suppress_tokens=None, suppress_tokens=None)
    _gen(model, feats, n=6)
    model.load_state_dict(other.state_dict())
    got = _gen(model, feats, n=6)
    patched.undo()
    assert np.array_equal(got, _gen(other, feats, n=6))


def test_dtype_moves_are_seen(feats, patched):
    model = mini_model(seed=7, begin_suppress_tokens=None, suppress_tokens=None)
    want = _gen(model, feats, n=6)
    model.to(torch.float16)
    with torch.no_grad():
        half = model.model.encoder(feats.to(torch.float16)).last_hidden_state
    assert half.dtype == torch.float16
    assert model.model.encoder.__dict__[ATTR].model_dtype == torch.float16
    half_cw = model.model.encoder.__dict__[ATTR]
    with torch.no_grad():
        model.model.encoder(feats.to(torch.float16))
    assert model.model.encoder.__dict__[ATTR] is half_cw  # one compute copy, kept
    model.to(torch.float32)
    got = _gen(model, feats, n=6)
    assert model.model.encoder.__dict__[ATTR].model_dtype == torch.float32
    # fp16 round trip rounds the weights: compare with stock on the same (rounded) weights
    patched.undo()
    assert np.array_equal(got, _gen(model, feats, n=6))
    assert want.shape == got.shape
