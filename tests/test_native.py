"""The fused kernels (``kernels/fused.cc``; built by ``kernels/build.py``, checked by
``runtime/kernel_checks.py``, decided by ``runtime/native.py``): checked against their numpy
references, run by the encoder and decoder engines' ``fused`` and ``host`` executors with
stock's results, and every way they can be unavailable or fail leaves that model on the next
executor (``plain``: MindSpore's own graphs) with the same results.

Kernel tests request the ``fused_library`` fixture (tests/conftest.py): it skips only where the
kernels are switched off or their prerequisites are missing, and fails where they should work.
The ISA variants themselves are tests/test_kernel_isa.py's."""

import ctypes
import threading
from pathlib import Path

import numpy as np
import pytest

mindnlp = pytest.importorskip("mindnlp")
import mindspore as ms  # noqa: E402
import torch  # noqa: E402  (mindtorch, via mindnlp)

import whisper_accel  # noqa: E402
from conftest import build_model, features, rel_diff  # noqa: E402
from whisper_accel.config import Config  # noqa: E402
from whisper_accel.kernels import build as kbuild  # noqa: E402
from whisper_accel.kernels import fused, graphs, isa  # noqa: E402
from whisper_accel.runtime import calls, host_step, kernel_checks, native  # noqa: E402
from whisper_accel.runtime.binding import ATTR  # noqa: E402
from whisper_accel.runtime.executors.graph import encoder_layer_bytes, layers_per_launch, positions  # noqa: E402

def _config(**changes) -> Config:
    """This session's config from the environment (its cache directory: never the user's) with
    ``changes``. A bare ``Config(...)`` would build the kernels in ~/.cache/whisper_accel."""
    return Config.from_env().with_(**changes)


@pytest.fixture
def redecide():
    """The kernel decision made again for this test (after it, once more for the others)."""
    native.reset()
    yield
    native.reset()


@pytest.fixture
def fresh_decision(clean_env, tmp_path):
    """No ``WHISPER_ACCEL*`` variable from the shell, an empty cache directory and a new
    per-process decision; the session's again afterwards."""
    clean_env.setenv("WHISPER_ACCEL_CACHE_DIR", str(tmp_path))
    native.reset()
    yield tmp_path
    clean_env.undo()
    native.reset()


@pytest.fixture(scope="module")
def model():
    return build_model(seed=2)


def _encode(model, feats):
    """The encoder's output and engine, with an engine built now from the config in force."""
    model.model.encoder.__dict__.pop(ATTR, None)
    with torch.no_grad():
        out = model.model.encoder(feats).last_hidden_state.asnumpy()
    return out, model.model.encoder.__dict__[ATTR]


def test_every_kernel_passes_its_check(fused_library):
    assert Path(fused_library).is_file()
    state = native.state()
    assert state["reason"] is None and state["isa"] in isa.NAMES and state["cpu"]
    assert kernel_checks.check(fused_library) is None


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_encoder_equals_stock_and_the_plain_graphs(fused_library, model, batch):
    feats = features(batch, seed=4)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    with whisper_accel.patched(config=_config(encoder="fused")):
        ours, eng = _encode(model, feats)
        plain = eng.engine.executors["plain"].encode(ms.Tensor(feats.asnumpy())).asnumpy()
    assert eng.executor == "fused" and not eng.engine.faults
    assert rel_diff(ours, stock) < 1e-4
    assert rel_diff(ours, plain) < 1e-6


def test_layers_per_launch_change_the_launches_not_the_result(fused_library, model):
    feats = features(1, seed=5)
    per_layer = 4 * 1500 * (6 * 384 + 2 * 1536)  # the estimate for one tiny layer, batch 1
    got = {}
    with whisper_accel.patched(config=_config(encoder="fused")):
        for budget in (0, per_layer, 3 * per_layer):  # 1, 2 and all 4 layers a launch
            whisper_accel.config.activate(_config(encoder="fused", group_bytes=budget))
            out, eng = _encode(model, feats)
            assert eng.executor == "fused" and eng.config.group_bytes == budget
            got[eng.layers_per_launch] = out
        whisper_accel.config.activate(_config(encoder="fused", group_bytes=0, whole_encoder_graph=True))
        whole, eng = _encode(model, feats)
    assert sorted(got) == [1, 2, 4] and eng.layers_per_launch == 4
    for out in list(got.values()) + [whole]:
        assert rel_diff(out, got[1]) < 1e-6


def test_layers_per_launch_fit_the_budget():
    budget = _config().group_bytes
    dims = {"tiny": (4, 384, 1536), "base": (6, 512, 2048), "small": (12, 768, 3072),
            "medium": (24, 1024, 4096), "large-v3": (32, 1280, 5120)}
    got = {name: layers_per_launch(n, encoder_layer_bytes(1, 1500, d, f), budget) for name, (n, d, f) in dims.items()}
    assert got == {"tiny": 4, "base": 6, "small": 4, "medium": 4, "large-v3": 2}
    for name, (n, d, f) in dims.items():
        for batch in (1, 2, 5):
            each = encoder_layer_bytes(batch, 1500, d, f)
            g = layers_per_launch(n, each, budget)
            assert n % g == 0
            assert g == 1 or (g - 1) * each <= budget
        assert layers_per_launch(n, encoder_layer_bytes(1, 1500, d, f), 0) == 1
    assert layers_per_launch(4, 1, 1 << 40) == 4


@pytest.mark.parametrize("rows", [1, 5, 16, 20], ids=["greedy", "5-beams", "largest-for-the-kernel", "matmul"])
def test_the_step_projection_matches_x_w_transposed(fused_library, rows):
    fused.configure(fused_library)

    @ms.jit
    def project(x, w):
        return fused._logits(x, w)

    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((rows, 384)).astype(np.float32), rng.standard_normal((4001, 384)).astype(np.float32)
    got = project(ms.Tensor(x), ms.Tensor(w)).asnumpy()
    assert got.shape == (rows, 4001)
    assert rel_diff(got, x.astype(np.float64) @ w.T.astype(np.float64)) < 1e-6


@pytest.mark.slow  # ~2 min (stock generate on tiny dimensions): CI runs it, the quick tier does not
@pytest.mark.parametrize("decoder", ["host", "fused"], ids=["host-steps", "step-graphs"])
def test_the_decoder_steps_use_the_projection_kernel_with_stock_tokens(fused_library, model, decoder):
    """Greedy and beam steps with the fused kernels: on the host (the kernels through ctypes)
    or as the fused step graphs (``_config(decoder="fused")``), stock's tokens either way."""
    feats = features(2, seed=9)
    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=12, min_new_tokens=12, do_sample=False).asnumpy()
        beams = model.generate(feats, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False).asnumpy()
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched(config=_config(decoder=decoder)), torch.no_grad():
        got = model.generate(feats, max_new_tokens=12, min_new_tokens=12, do_sample=False).asnumpy()
        dec = model.__dict__[ATTR]
        assert dec.executor("decode_next") == decoder
        got_beams = model.generate(feats, max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False).asnumpy()
        assert dec.executor("decode_beams") == decoder and not dec.engine.faults
    model.__dict__.pop(ATTR, None)
    assert np.array_equal(got, stock) and np.array_equal(got_beams, beams)


@pytest.mark.parametrize("rows, audios, pos0", [(1, 1, 10), (5, 1, 20), (4, 2, 63)],
                         ids=["greedy", "5-beams-masked-slots", "2-audios-x-2-beams-last-slot"])
def test_the_decoder_layer_kernel_matches_the_layer(fused_library, rows, audios, pos0):
    """tiny's widths (D 384, 6 heads, FFN 1536, 1500 encoder frames, a 64-slot cache) against
    kernel_checks' float64 reference of the graphs' layer body."""
    rng = np.random.default_rng(11)
    args = list(kernel_checks.layer_inputs(rng, rows, audios, pos0, heads=6, dh=64, slots=64, frames=1500, ffn=1536))
    ok = kernel_checks.ARG["key_ok"]
    if rows > 1:
        args[ok][:, 3:7] = 0  # padding-masked slots, per row
        args[ok][1, :] = 0  # no attendable slot (Whisper never makes one): the graph's finite mask averages all
    got = fused.kernel(fused_library, "DecoderLayer")(
        *(ms.Tensor(a if a.dtype == np.int32 else a.astype(np.float32)) for a in args))
    want = kernel_checks.decoder_layer(args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_diff(g.asnumpy(), w) < 1e-5


def test_one_token_steps_run_the_layer_kernel_and_match_the_operator_layers(fused_library, model):
    """fused.DECODER routes a one-token step's layers to ``DecoderLayer`` (and a prompt of several
    tokens to the operator layers), with the operator graphs' logits and caches."""
    calls_so_far = ctypes.CDLL(fused_library).DecoderLayerCalls
    calls_so_far.restype = ctypes.c_longlong
    feats = features(1, seed=12)
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched(config=_config(decoder="fused")), torch.no_grad():
        model.generate(feats, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        dec = model.__dict__[ATTR]
        kernel, ops_only = fused.DECODER, graphs.decoder_graphs(fused._logits)
        w = dec.weights
        hidden = model.model.encoder(feats).last_hidden_state
        kx, vx = dec.cross_kv(ms.Tensor(hidden.asnumpy()))
        suppress = ms.Tensor(np.zeros(int(dec.proj.shape[0]), np.bool_))
        results, launched = [], []
        for g in (kernel, ops_only):
            k, v = dec.new_cache(1, 64)
            got, before = [], calls_so_far()
            for pos0, ids in ((0, [[50257, 50362, 440]]), (3, [[440]]), (4, [[11]])):
                pos, cols, pos_ids, key_ok = positions(pos0, len(ids[0]), 64)
                _, _, logits, k, v, _ = g.decode_next(
                    ms.Tensor(np.array(ids, np.int64)), pos, cols, ms.mutable(tuple(k)), ms.mutable(tuple(v)), kx, vx,
                    w.vocab.embed, w.vocab.proj, w.vocab.positions, w.layers_graph, w.final_graph, w.heads, w.scaling,
                    suppress, pos_ids, key_ok, False)
                got.append(logits.asnumpy())
            results.append((got, [c.asnumpy() for c in k]))
            launched.append(calls_so_far() - before)
    model.__dict__.pop(ATTR, None)
    assert launched == [2 * 4, 0]  # the two one-token steps, each of the 4 layers; the prompt and ops_only none
    (a, ka), (b, kb) = results
    for x, y in zip(a + ka, b + kb):
        assert rel_diff(x, y) < 1e-5


@pytest.mark.parametrize("audios, frames, heads, dh, layers", [(1, 1500, 6, 64, 4), (3, 13, 2, 132, 2)],
                         ids=["tiny", "3-audios-odd-frames-two-inner-blocks"])
def test_the_cross_kv_kernel_matches_its_reference(fused_library, audios, frames, heads, dh, layers):
    """Every layer's K^T and V in the step graphs' layouts, against kernel_checks' float64
    reference: tiny's widths, and row panels straddling audios, a partial column block, D over
    one inner block."""
    rng = np.random.default_rng(5)
    d = heads * dh
    args = (rng.standard_normal((audios, frames, d)),) + tuple(
        rng.standard_normal(shape) / np.sqrt(d) for _ in range(layers) for shape in ((d, d), (d, d), (d,)))
    got = fused.kernel(fused_library, "CrossKV", heads)(*(ms.Tensor(a.astype(np.float32)) for a in args))
    want = kernel_checks.cross_kv(*args, heads=heads)
    assert len(got) == 2 * layers
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_diff(g.asnumpy(), w) < 1e-5


def test_cross_kv_runs_the_kernel_with_the_per_layer_graphs_values(fused_library, model):
    feats = features(2, seed=13)
    model.__dict__.pop(ATTR, None)
    with whisper_accel.patched(), torch.no_grad():
        model.generate(feats, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        dec = model.__dict__[ATTR]
        assert dec.executor("cross_kv") == "host"  # the kernel through ctypes, first in the order
        hidden = ms.Tensor(model.model.encoder(feats).last_hidden_state.asnumpy())
        ran = {name: dec.engine.executors[name].cross_kv(hidden) for name in ("host", "fused")}
        ks, vs = dec.engine.executors["plain"].cross_kv(hidden)  # MindSpore's graphs, a layer a launch
    for name, (kx, vx) in ran.items():
        assert len(kx) == len(ks) == len(model.model.decoder.layers), name
        for got, want in zip(tuple(kx) + tuple(vx), tuple(ks) + tuple(vs)):
            assert got.shape == want.shape, name
            assert rel_diff(got.asnumpy(), want.asnumpy()) < 1e-5, name


@pytest.mark.parametrize("owner, name, op, decoder, faulted, ran", [
    (fused, "cross_kv", "cross_kv", "fused", "fused", "plain"),
    (host_step.HostStep, "cross_kv", "cross_kv", "host", "host", "fused"),
    (fused.DECODER, "decode_next", "decode_next", "fused", "fused", "plain"),
    (host_step.HostStep, "next", "decode_next", "host", "host", "fused")],
    ids=["cross-kv-kernel", "host-cross-kv", "fused-step-graph", "host-step"])
def test_a_failing_kernel_launch_in_generate_falls_back_to_the_next_executor(fused_library, model, monkeypatch, owner,
                                                                             name, op, decoder, faulted, ran):
    """The executor that fails is recorded as this engine's fault and the next one in the order
    (host -> fused -> plain) runs the call; the kernels stay on for the process."""
    feats = features(1, seed=10)
    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=8, min_new_tokens=8, do_sample=False).asnumpy()

    def broken(*a, **k):
        raise RuntimeError(f"injected {name} failure")

    monkeypatch.setattr(owner, name, broken)
    model.__dict__.pop(ATTR, None)
    try:
        with whisper_accel.patched(config=_config(decoder=decoder)), torch.no_grad():
            got = model.generate(feats, max_new_tokens=8, min_new_tokens=8, do_sample=False).asnumpy()
            dec = model.__dict__[ATTR]
        assert dec.executor(op) == ran
        assert set(dec.engine.faults) == {faulted}
        assert dec.engine.faults[faulted].startswith(f"fault in {op}") and f"injected {name} failure" in \
            dec.engine.faults[faulted]
        assert native.state()["library"] is not None  # no process-wide switch
        assert np.array_equal(got, stock)
    finally:
        model.__dict__.pop(ATTR, None)


@pytest.mark.parametrize("shape", [(1, 1500, 6, 64), (2, 50, 3, 40), (1, 5, 2, 16)],
                         ids=["tiny-encoder", "odd-head-dim", "fewer-than-a-tile"])
def test_the_attention_kernel_matches_softmax_attention(fused_library, shape):
    """1500 queries: 31 blocks of 48 and one of 12; 50: a block and 2 rows, 3 whole key tiles
    and 2 keys; 5: one partial row tile against 5 keys (no whole key tile)."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    q *= 0.6  # scores of a few units, as a scaled query gives
    got = fused.kernel(fused_library, "Attention")(*(ms.Tensor(a) for a in (q, k, v))).asnumpy()
    want = kernel_checks.attention(*(a.astype(np.float64) for a in (q, k, v)))
    assert got.shape == shape
    assert rel_diff(got, want) < 1e-5


@pytest.mark.parametrize("env, reason", [({"WHISPER_ACCEL_NATIVE": "0"}, "WHISPER_ACCEL_NATIVE=0"),
                                         ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
                                         ({"CXX": "false"}, "build or load of the")],
                         ids=["switched-off", "no-compiler", "compiler-fails"])
def test_unavailable_kernels_leave_the_plain_graphs(model, fresh_decision, monkeypatch, env, reason):
    """The config comes from the (cleaned, then faked) environment: no kernels, so the encoder's
    host and fused executors are unavailable (recorded, no warning) and plain runs it."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    feats = features(1, seed=6)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()
    try:
        with whisper_accel.patched():
            ours, eng = _encode(model, feats)
    finally:
        model.model.encoder.__dict__.pop(ATTR, None)
    state = native.state(eng.config)
    assert state["library"] is None and reason in state["reason"]
    assert eng.executor == "plain"
    assert set(eng.engine.faults) == {"host", "fused"}
    assert all(f.startswith("unavailable") and reason in f for f in eng.engine.faults.values())
    assert rel_diff(ours, stock) < 1e-4
    assert not list(fresh_decision.glob("native/*.so"))


def test_a_kernel_that_disagrees_with_its_reference_is_not_used(fused_library, redecide, monkeypatch):
    monkeypatch.setattr(kernel_checks, "gelu", lambda x: 1.01 * x)  # a wrong reference: GELU "differs"
    state = native.state()
    assert state["library"] is None and "BiasGelu" in state["reason"]
    assert native.fused_graphs() is None


def test_a_failing_fused_graph_falls_back_to_the_plain_graphs(fused_library, model, monkeypatch):
    feats = features(1, seed=7)
    with torch.no_grad():
        stock = model.model.encoder(feats).last_hidden_state.asnumpy()

    def broken(*a, **k):
        raise RuntimeError("injected fused launch failure")

    for name in ("enc_stem", "enc_layers", "encode_whole"):
        monkeypatch.setattr(fused.ENCODER, name, broken)
    calls.reset()
    try:
        with whisper_accel.patched(config=_config(encoder="fused")):
            ours, eng = _encode(model, feats)
            with torch.no_grad():
                again = model.model.encoder(feats).last_hidden_state.asnumpy()
            assert model.model.encoder.__dict__[ATTR] is eng
            assert whisper_accel.status()["calls"]["encoder"]["stock"] == 0  # still the engine
        assert eng.executor == "plain"
        assert "injected fused launch failure" in eng.engine.faults["fused"]
        assert native.state()["library"] is not None  # the kernels stay on for the process
        assert rel_diff(ours, stock) < 1e-4 and rel_diff(again, stock) < 1e-4
    finally:
        model.model.encoder.__dict__.pop(ATTR, None)


def test_concurrent_builds_into_one_directory_agree(fused_library, tmp_path):
    cxx, cpu = native.compiler(), isa.cpu()
    variant = isa.choose(cpu)
    got, errors = [], []

    def one():
        try:
            got.append(kbuild.build(tmp_path, cxx, variant, cpu))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1 and got[0].is_file()
    assert [p.name for p in tmp_path.iterdir()] == [got[0].name]  # no temporary files left
    assert kernel_checks.check(str(got[0])) is None


def test_the_sources_ship_beside_the_kernels_module():
    assert kbuild.SOURCES[0].name == "fused.cc"
    assert all(p.parent == Path(fused.__file__).resolve().parent and p.is_file() for p in kbuild.SOURCES)
