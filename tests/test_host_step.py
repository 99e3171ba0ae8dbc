"""The greedy decode step on the host (runtime.host_step): the fused kernels through ctypes,
against the step graphs and stock."""

from __future__ import annotations

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import mindspore as ms  # noqa: E402
import torch  # noqa: E402  (mindtorch, via mindnlp)

import whisper_accel  # noqa: E402
from conftest import build_model, features, rel_diff  # noqa: E402
from whisper_accel import config  # noqa: E402
from whisper_accel.config import Config  # noqa: E402
from whisper_accel.runtime import host_calls, host_step, kernel_checks  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402
from whisper_accel.runtime.decoder_engine import DecoderEngine  # noqa: E402
from whisper_accel.runtime.padding import DecoderPadding  # noqa: E402

def _config(**changes) -> Config:
    """This session's config from the environment (its cache directory: never the user's) with
    ``changes``. A bare ``Config(...)`` would build the kernels in ~/.cache/whisper_accel."""
    return Config.from_env().with_(**changes)


@pytest.fixture(autouse=True)
def _kernels(fused_library):
    """Every test here runs the fused kernels (skips only where they are switched off or their
    prerequisites are missing; fails where they should work)."""
    return fused_library


@pytest.fixture(scope="module")
def model():
    return build_model(seed=3)


def _generate(model, feats, n, **kw):
    with torch.no_grad():
        return model.generate(feats, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw).asnumpy()


def _bound(model, feats, cfg=None):
    """A decoder engine for ``model`` (``cfg``, default the defaults) and the audios' cross K/V."""
    dec = DecoderEngine(model, cfg or _config())
    with torch.no_grad():
        hidden = ms.Tensor(model.model.encoder(feats).last_hidden_state.asnumpy())
    return dec, dec.cross_kv(hidden)


def _host(dec):
    """The engine's HostStep (None before its first host step)."""
    return dec.engine.executors["host"].impl


def _steps(dec):
    return _host(dec).steps if _host(dec) is not None else 0


@pytest.mark.parametrize("padded", [False, True], ids=["one-row", "two-rows-padded"])
def test_host_steps_match_the_step_graphs(model, padded):
    """A three-token prompt, then six one-token steps, on the host and on the step graphs: the
    same next ids, logits and caches (within float32 summation order). On the host the prompt's
    tokens run one after another; a padded prompt runs the prompt graph (its padding slots)."""
    rows = 2 if padded else 1
    feats = features(rows, seed=21)
    padding = DecoderPadding(np.array([[1, 1, 1], [0, 1, 1]])) if padded else None
    prompt = np.array([[50258, 50359, 50363]] * rows, np.int64)
    with torch.no_grad():
        host_dec, (kx, vx) = _bound(model, feats, _config(decoder="host"))
        graph_dec = DecoderEngine(model, _config(decoder="fused"))
        suppress = ms.Tensor(np.isin(np.arange(int(host_dec.proj.shape[0])), [50257, 50362]))
        runs = []
        for host, dec in ((True, host_dec), (False, graph_dec)):
            k, v = dec.new_cache(rows, 64)
            first = _steps(dec)
            nxt, _, logits, k, v = dec.decode_next(torch.tensor(prompt), 0, k, v, kx, vx, suppress, padding=padding)
            assert dec.executor("decode_next") == ("host" if host and not padded else "fused")
            got, before = [(nxt.asnumpy(), None, logits.asnumpy())], _steps(dec)
            assert before - first == (1 if host and not padded else 0)
            for pos0 in range(3, 9):
                nxt, scores, logits, k, v = dec.decode_next(torch.tensor(nxt.asnumpy().reshape(rows, 1)), pos0, k, v,
                                                            kx, vx, suppress, padding=padding)
                got.append((nxt.asnumpy(), scores.asnumpy(), logits.asnumpy()))
                assert dec.executor("decode_next") == ("host" if host else "fused")
            assert isinstance(k, host_step.HostCache) == host
            steps = _steps(dec) - before
            runs.append((got, [np.asarray(c.asnumpy() if hasattr(c, "asnumpy") else c) for c in k + v], steps))
        assert not host_dec.engine.faults and not graph_dec.engine.faults
    (a, ca, host_steps), (b, cb, graph_steps) = runs
    assert (host_steps, graph_steps) == (6, 0)
    for (n1, s1, l1), (n2, s2, l2) in zip(a, b):
        assert np.array_equal(n1, n2)
        assert rel_diff(l1, l2) < 1e-5
        if s1 is not None:
            assert np.array_equal(np.isinf(s1), np.isinf(s2)) and np.isinf(s1[:, 50257]).all()
    for x, y in zip(ca, cb):
        assert rel_diff(x, y) < 1e-5


def test_host_beam_steps_match_the_beam_graphs(model):
    """2 audios x 3 beams: a three-token prompt, then one-token steps with reordered rows, on the
    host and on the graphs: the same logits, log-probabilities and caches; the caller's cache is
    left as it was (the reorder writes the spare buffers)."""
    feats = features(2, seed=25)
    n, beams = 6, 3
    orders = [np.arange(n), np.array([0, 0, 1, 3, 5, 5]), np.array([2, 1, 0, 4, 4, 3]), np.array([1, 1, 1, 3, 4, 5])]
    with torch.no_grad():
        host_dec, (kx, vx) = _bound(model, feats, _config(decoder="host"))
        graph_dec = DecoderEngine(model, _config(decoder="fused"))
        runs = []
        for host, dec in ((True, host_dec), (False, graph_dec)):
            k, v = dec.new_cache(n, 64)
            ids = ms.Tensor(np.array([[50258, 50359, 50363]] * n, np.int64))
            logits, logp, k, v = dec.decode_beams(ids, 0, k, v, ms.Tensor(np.arange(n, dtype=np.int32)), kx, vx, beams)
            assert dec.executor("decode_beams") == ("host" if host else "fused")
            got = [(logits.asnumpy(), logp.asnumpy())]
            for pos0, order in zip(range(3, 7), orders):
                tok = ms.Tensor(logp.asnumpy().argmax(-1).reshape(n, 1).astype(np.int64))
                before = [np.array(c) for c in k] if host and pos0 > 3 else None
                logits, logp, k2, v2 = dec.decode_beams(tok, pos0, k, v, ms.Tensor(order.astype(np.int32)), kx, vx,
                                                        beams)
                if before is not None:
                    assert all(np.array_equal(a, b) for a, b in zip(before, k))
                k, v = k2, v2
                got.append((logits.asnumpy(), logp.asnumpy()))
                assert dec.executor("decode_beams") == ("host" if host else "fused")
            runs.append((got, [np.asarray(c.asnumpy() if hasattr(c, "asnumpy") else c) for c in k + v]))
    (a, ca), (b, cb) = runs
    for (l1, p1), (l2, p2) in zip(a, b):
        assert rel_diff(l1, l2) < 1e-5 and rel_diff(p1, p2) < 1e-5
        assert np.array_equal(p1.argmax(-1), p2.argmax(-1))
    for x, y in zip(ca, cb):
        assert rel_diff(x, y) < 1e-5


def test_a_multi_token_host_step_gives_every_position_as_one_token_steps_do(model):
    """decode_step on the host (an assistant's candidates verified at once, each layer's weights
    read once): every position's logits and the cache as one-token host steps give them, within
    float32 summation order (the fused one-token layer sums in another order), the same argmax;
    the plain graph agrees, also past the projection kernel's graph limit; more positions than
    the host takes run the graph (declined, not a fault)."""
    feats = features(1, seed=28)
    prompt = np.array([[50258, 50359, 50363]], np.int64)
    cand = np.array([[440, 1029, 318, 257, 922]], np.int64)
    with torch.no_grad():
        dec, (kx, vx) = _bound(model, feats, _config(decoder="host"))
        suppress = ms.Tensor(np.zeros(int(dec.proj.shape[0]), bool))
        k, v = dec.new_cache(1, 64)
        _, _, _, k, v = dec.decode_next(torch.tensor(prompt), 0, k, v, kx, vx, suppress)
        # one-token steps
        at_prompt = [np.array(c) for c in k + v]
        one = []
        for j in range(cand.shape[1]):
            _, _, logits, k, v = dec.decode_next(torch.tensor(cand[:, j:j + 1]), 3 + j, k, v, kx, vx, suppress)
            one.append(logits.asnumpy()[0])
        one, one_cache = np.stack(one)[None], [np.array(c) for c in k + v]
        # the same tokens in one multi-token step, from the prompt's cache
        k = host_step.HostCache(a.copy() for a in at_prompt[:len(k)])
        v = host_step.HostCache(a.copy() for a in at_prompt[len(k):])
        before = _steps(dec)
        logits, k, v = dec.decode_step(torch.tensor(cand), 3, k, v, kx, vx)
        assert dec.executor("decode_step") == "host" and _steps(dec) == before + 1
        assert isinstance(k, host_step.HostCache)
        got = logits.asnumpy()
        assert got.shape == one.shape
        assert rel_diff(got, one) < 1e-5 and np.array_equal(got.argmax(-1), one.argmax(-1))
        assert all(rel_diff(a[:, :, :8], b[:, :, :8]) < 1e-5 for a, b in zip(one_cache, k + v))
        assert all(np.array_equal(a[:, :, :3], b[:, :, :3]) for a, b in zip(one_cache, k + v))  # the prompt's
        # the plain graph on the same prompt cache
        graph_dec = DecoderEngine(model, _config(decoder="plain"))
        gk, gv = graph_dec.new_cache(1, 64)
        _, _, _, gk, gv = graph_dec.decode_next(torch.tensor(prompt), 0, gk, gv, kx, vx, suppress)
        ref, _, _ = graph_dec.decode_step(torch.tensor(cand), 3, gk, gv, kx, vx)
        assert graph_dec.executor("decode_step") == "plain"
        assert rel_diff(got, ref.asnumpy()) < 1e-5
        # more positions than a projection graph takes: the same logits as the plain graph
        many = np.tile(cand, (1, 4))[:, :host_step.MAX_ROWS + 3]
        got, _, _ = dec.decode_step(torch.tensor(many), 0, *dec.new_cache(1, 64), kx, vx)
        assert dec.executor("decode_step") == "host"
        ref, _, _ = graph_dec.decode_step(torch.tensor(many), 0, *graph_dec.new_cache(1, 64), kx, vx)
        assert rel_diff(got.asnumpy(), ref.asnumpy()) < 1e-5
        # beyond the host's limit: the graph runs it (declined, not a fault)
        dec.decode_step(torch.tensor(np.resize(cand, (2, host_step.MAX_POSITIONS // 2 + 1))), 0,
                        *dec.new_cache(2, 64), *_bound(model, features(2, seed=29))[1])
        assert dec.executor("decode_step") == "plain" and not dec.engine.faults


def test_host_beam_log_probabilities_are_mindspore_log_softmax_bit_for_bit(monkeypatch):
    """The host beam step's log-probabilities: MindSpore's LogSoftmax kernel (what stock beam
    search applies), launched as a graph, or as a PyNative operator when MindSpore's compile
    cache is on (no graph runs then); equal bit for bit either way."""
    from mindspore import ops

    from whisper_accel.runtime.executors import host as host_executor

    logits = ms.Tensor(np.random.default_rng(5).normal(0, 4, (5, 51865)).astype(np.float32))
    want = ops.log_softmax(logits, -1).asnumpy()
    assert np.array_equal(host_executor.log_softmax(logits).asnumpy(), want)

    def no_graph(_):
        raise AssertionError("a graph launched with the compile cache on")

    monkeypatch.setattr(host_executor.graphs, "log_softmax", no_graph)
    monkeypatch.setattr(ms, "get_context",
                        lambda key, _g=ms.get_context: True if key == "enable_compile_cache" else _g(key))
    assert np.array_equal(host_executor.log_softmax(logits).asnumpy(), want)


def test_beam_search_takes_host_steps_with_stock_tokens(model):
    feats = features(2, seed=26)
    stock = _generate(model, feats, 8, num_beams=3)
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched():
        got = _generate(model, feats, 8, num_beams=3)
        dec = model.__dict__[ATTR]
    assert np.array_equal(got, stock)
    assert dec.executor("decode_beams") == "host" and _steps(dec) > 0


def test_greedy_generate_takes_host_steps_with_stock_tokens(model):
    feats = features(2, seed=22)
    stock = _generate(model, feats, 10)
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched():
        got = _generate(model, feats, 10)
        dec = model.__dict__[ATTR]
    assert np.array_equal(got, stock)
    assert dec.executor("decode_next") == "host" and _steps(dec) > 0


def test_host_steps_cross_a_cache_bucket_like_the_graphs(model):
    """70 tokens: the 64-slot cache grows to 128 slots (numpy padding on the host)."""
    feats = features(1, seed=23)
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched():
        host = _generate(model, feats, 70)
        assert model.__dict__[ATTR].executor("decode_next") == "host"
        model.__dict__.pop(ATTR)
        config.activate(_config(decoder="fused"))
        graphs = _generate(model, feats, 70)
        assert model.__dict__[ATTR].executor("decode_next") == "fused"
    model.__dict__.pop(ATTR, None)
    assert host.shape[1] > 64 + 3
    assert np.array_equal(host, graphs)


def test_a_model_whose_weights_it_cannot_read_keeps_the_graphs(model, monkeypatch):
    feats = features(1, seed=24)
    monkeypatch.setattr(host_calls, "same", lambda view, t: False)  # no view reads its tensor
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched():
        got = _generate(model, feats, 6)
        dec = model.__dict__[ATTR]
    model.__dict__.pop(ATTR, None)
    assert _host(dec) is None and dec.engine.faults["host"].startswith("unavailable")
    assert set(dec.engine.faults) == {"host"} and dec.executor("decode_next") == "fused"
    assert np.array_equal(got, _generate(model, feats, 6))


def test_a_host_cache_round_trips_and_grows():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(2)]
    cache = host_step.on_host(tuple(ms.Tensor(a) for a in arrays))
    assert isinstance(cache, host_step.HostCache) and host_step.on_host(cache) is cache
    back = host_step.on_device(cache)
    assert all(np.array_equal(b.asnumpy(), a) for a, b in zip(arrays, back))
    grown = host_step.grow(cache, 9)
    assert grown[0].shape == (2, 3, 9, 5)
    assert np.array_equal(grown[0][:, :, :4], arrays[0]) and not grown[0][:, :, 4:].any()


def test_a_prompt_longer_than_the_host_limit_runs_the_prompt_graph(model):
    """The host executor declines a prompt of more than MAX_TOKENS tokens (not a fault): the
    fused graph runs it; a prompt of MAX_TOKENS runs on the host."""
    feats = features(1, seed=27)
    prompt = np.array([[50258] + [50359] * host_step.MAX_TOKENS], np.int64)
    with torch.no_grad():
        dec, (kx, vx) = _bound(model, feats)
        suppress = ms.Tensor(np.zeros(int(dec.proj.shape[0]), bool))
        before = _steps(dec)
        k, v = dec.new_cache(1, 64)
        _, _, _, k, v = dec.decode_next(torch.tensor(prompt), 0, k, v, kx, vx, suppress)
        assert dec.executor("decode_next") == "fused" and _steps(dec) == before
        assert not isinstance(k, host_step.HostCache)
        _, _, _, k, v = dec.decode_next(torch.tensor(prompt[:, :host_step.MAX_TOKENS]), 0, *dec.new_cache(1, 64),
                                        kx, vx, suppress)
        assert dec.executor("decode_next") == "host" and _steps(dec) == before + 1
        assert not dec.engine.faults


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_a_half_precision_model_steps_on_its_weights_as_stored(name, fused_library):
    """A float16/bfloat16 model's host steps read its weight matrices as stored (half the bytes
    of the float32 compute copy) and compute what the steps on that copy compute, bit for bit:
    the same logits and caches for a three-token prompt and two further steps; a multi-token
    step with every position's logits reads them as stored too (within float32 summation
    order of the copy's, whose products are numpy's)."""
    dtype = getattr(torch, name)
    half = build_model(seed=7, decoder_layers=2).to(dtype)
    feats = features(1, seed=25).to(dtype)
    prompt = np.array([[50258, 50359, 50363]], np.int64)
    with whisper_accel.patched(), torch.no_grad():
        _generate(half, feats, 2)
        dec = half.__dict__[ATTR]
        stored, w = _host(dec), dec.weights
        assert dec.executor("decode_next") == "host" and stored.weights == name
        hidden = ms.Tensor(half.model.encoder(feats).last_hidden_state.float().asnumpy())
        kx, vx = dec.cross_kv(hidden)
        assert not w.copy_built and w.proj_stored is not None
        proj_stored = w.proj_stored
        w.proj_stored = None  # the same model's steps on its float32 compute copy (built now)
        try:
            copy = host_step.for_weights(w, fused_library)
        finally:
            w.proj_stored = proj_stored
        assert copy.weights == "float32" and copy.proj.dtype == np.float32 and w.copy_built
        runs = []
        for step in (stored, copy):
            k, v = (host_step.on_host(c) for c in dec.new_cache(1, 64))
            out = [step.logits(prompt, 0, k, v, kx, vx, None, None)]
            for pos, token in ((3, 220), (4, 50257)):
                out.append(step.logits(np.array([[token]]), pos, k, v, kx, vx, None, None))
            runs.append((out, k, v))
        multi = []  # a multi-token step (an assistant's candidates) reads them as stored too
        for step in (stored, copy):
            k, v = (host_step.on_host(c) for c in dec.new_cache(1, 64))
            step.logits(prompt, 0, k, v, kx, vx, None, None)
            multi.append((step.all_logits(np.array([[220, 440, 50257]]), 3, k, v, kx, vx), k, v))
    (a, ka, va), (b, kb, vb) = runs
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(ka + va, kb + vb))
    assert np.abs(a[-1]).max() > 0
    (ma, mka, mva), (mb, mkb, mvb) = multi  # RowsMatMul on the stored weights, numpy on the copy
    assert ma.shape == (1, 3, a[0].shape[-1]) and rel_diff(ma, mb) < 1e-5
    assert np.array_equal(ma.argmax(-1), mb.argmax(-1))
    assert all(rel_diff(x, y) < 1e-5 for x, y in zip(mka + mva, mkb + mvb))


def test_a_half_precision_model_gets_its_float32_decoder_copy_only_for_a_step_graph():
    """While the host steps run a float16 model, the step graphs' float32 copy of its decoder
    weights is never made; a generation on the step graphs (the same engine, told to prefer
    them) makes it then, with the same tokens."""
    half = build_model(seed=7, decoder_layers=2).to(torch.float16)
    feats = features(1, seed=25).to(torch.float16)
    with whisper_accel.patched():
        host_tokens = _generate(half, feats, 6)
        dec = half.__dict__[ATTR]
        assert dec.executor("decode_next") == "host" and not dec.weights.copy_built
        dec.engine.prefer("fused")
        graph_tokens = _generate(half, feats, 6)
        assert half.__dict__[ATTR] is dec and dec.executor("decode_next") == "fused" and dec.weights.copy_built
    assert np.array_equal(host_tokens, graph_tokens)


def test_the_half_precision_kernels_pass_their_check(fused_library, monkeypatch):
    """``kernel_checks.check_half`` (part of the check a library passes before use): the F16/BF16
    kernels equal the float32 ones on the same weights; and it reports a kernel that differs
    (here the float32 kernels read weights one part in 1024 larger)."""
    assert kernel_checks.check_half(fused_library) is None
    exact = host_calls.upcast
    monkeypatch.setattr(host_calls, "upcast", lambda a: exact(a) * np.float32(1 + 2 ** -10))
    assert kernel_checks.check_half(fused_library) == \
        "kernel DecoderLayerF16 differs from DecoderLayer on the same weights"


def _logits_of(step, dec, kx, vx):
    """A three-token prompt's and two further steps' logits of ``step``, and its caches."""
    prompt = np.array([[50258, 50359, 50363]], np.int64)
    k, v = (host_step.on_host(c) for c in dec.new_cache(1, 64))
    out = [step.logits(prompt, 0, k, v, kx, vx, None, None)]
    for pos, token in ((3, 220), (4, 50257)):
        out.append(step.logits(np.array([[token]]), pos, k, v, kx, vx, None, None))
    return out, k, v


def test_bfloat16_steps_read_rounded_weights_and_compute_what_float32_does_on_them(fused_library):
    """``matmul_precision="bfloat16"`` gives a float32 model's host steps its weight matrices
    rounded to bfloat16 (the ``*BF16`` kernels, half the bytes). On a model whose matrices hold
    bfloat16 values already, that is the float32 steps' arithmetic bit for bit; on any other
    model the logits move by bfloat16's rounding, not more."""
    model = build_model(seed=7, decoder_layers=2)
    feats = features(1, seed=26)
    dec, (kx, vx) = _bound(model, feats)
    f32, b16 = (host_step.for_weights(dec.weights, fused_library, p) for p in ("float32", "bfloat16"))
    assert (f32.weights, b16.weights) == ("float32", "bfloat16") and b16.proj.dtype == np.uint16
    (a, *_), (b, *_) = _logits_of(f32, dec, kx, vx), _logits_of(b16, dec, kx, vx)
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))
    assert max(rel_diff(x, y) for x, y in zip(a, b)) < 2e-2
    with torch.no_grad():  # now every decoder matrix (and the tied projection) is bfloat16-exact
        for p in model.model.decoder.parameters():
            if p.ndim == 2:
                p.copy_(torch.tensor(host_calls.upcast(host_calls.bf16_bits(p.asnumpy()))))
    dec, (kx, vx) = _bound(model, feats)
    f32, b16 = (host_step.for_weights(dec.weights, fused_library, p) for p in ("float32", "bfloat16"))
    (a, ka, va), (b, kb, vb) = _logits_of(f32, dec, kx, vx), _logits_of(b16, dec, kx, vx)
    assert b16.weights == "bfloat16"
    assert all(np.array_equal(x, y) for x, y in zip(a + list(ka + va), b + list(kb + vb)))


def test_bfloat16_reaches_the_steps_through_the_config(model):
    """``patch(config=Config(matmul_precision="bfloat16"))``: ``generate``'s host steps read
    bfloat16 weights; the default config keeps float32."""
    feats = features(1, seed=27)
    for precision in ("float32", "bfloat16"):
        model.__dict__.pop(ATTR, None)
        with whisper_accel.patched(config=_config(matmul_precision=precision)):
            _generate(model, feats, 3)
            dec = model.__dict__[ATTR]
            assert dec.executor("decode_next") == "host" and _host(dec).weights == precision
    model.__dict__.pop(ATTR, None)
