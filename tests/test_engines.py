"""Engines and executors (runtime/engine.py, runtime/encoder_engine.py, runtime/decoder_engine.py),
the measured choice of an executor and its verdict cache (runtime/choice.py on _probe_cache.py),
the configuration (whisper_accel/config.py) and the weight schema (kernels/weights.py).

* fallback: an executor that fails is that engine's fault (recorded, logged, never tried again
  by that engine); the next one runs the call with stock's results; other models keep theirs;
* ``Decline`` is not a fault, ``Unavailable`` is recorded without a warning;
* a forced executor runs what it says, or falls back when it cannot run here;
* ``auto`` with ``measure``: warm-ups, timed calls round-robin, then the verdict; kept on
  disk per machine (never another CPU's; a corrupt or concurrently written file is harmless);
* ``Config``: environment parsing, validation, precedence;
* the weight schema: the kernel's argument order against ``DECODER_LAYER_ARGS``, and the
  structures' tuple form, slots, paths and maps.

The engines run on a 2-layer, 64-wide Whisper (conftest.MINI): seconds per test.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env, in_threads
from whisper_accel import _probe_cache, config
from whisper_accel.config import Config
from whisper_accel.kernels import weights as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes) -> Config:
    """This session's config from the environment (its cache directory: never the user's) with
    ``changes``. A bare ``Config(...)`` would build the kernels in ~/.cache/whisper_accel."""
    return Config.from_env().with_(**changes)


@pytest.fixture
def use():
    """``use(cfg)`` makes ``cfg`` the config in force (as ``patch(config=cfg)`` does) for this
    test; None again afterwards."""
    yield config.activate
    config.activate(None)


# ====================================================================== the fallback mechanism
# (fake executors: no MindSpore)

def _engine(*specs, order=None):
    """An Engine of fake executors: ``(name, behaviour)`` where behaviour is a value to return,
    an exception to raise, or ``("unavailable", why)`` for one that cannot run at all."""
    from whisper_accel.runtime.engine import Engine, Executor

    class Fake(Executor):
        def __init__(self, name, behaviour):
            self.name, self.behaviour, self.calls = name, behaviour, 0

        def unavailable(self):
            b = self.behaviour
            return b[1] if isinstance(b, tuple) and b[0] == "unavailable" else None

        def op(self, x):
            self.calls += 1
            if isinstance(self.behaviour, BaseException):
                raise self.behaviour
            return (self.name, self.behaviour, x)

    fakes = [Fake(n, b) for n, b in specs]
    return Engine(fakes, order or [n for n, _ in specs]), {f.name: f for f in fakes}


def test_the_order_of_a_setting():
    from whisper_accel.runtime.engine import order_for

    assert config.EXECUTORS == ("host", "fused", "plain")
    assert order_for("auto") == ["host", "fused", "plain"]
    assert order_for("host") == ["host", "fused", "plain"]
    assert order_for("fused") == ["fused", "plain"]
    assert order_for("plain") == ["plain"]


def test_a_failing_executor_is_this_engines_fault_and_the_next_runs_the_call(caplog):
    caplog.set_level(logging.WARNING, logger="whisper_accel")
    engine, fakes = _engine(("host", RuntimeError("injected")), ("fused", 1), ("plain", 2))
    other, _ = _engine(("host", 0), ("fused", 1), ("plain", 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fault the next executor absorbs is logged, not warned
        assert engine.run("op", "x") == ("fused", 1, "x")
        assert engine.run("op", "y") == ("fused", 1, "y")
    assert fakes["host"].calls == 1  # never tried again by this engine
    assert engine.faults == {"host": "fault in op: RuntimeError('injected')"}
    assert engine.ran == {"op": "fused"} and engine.usable() == ["fused", "plain"]
    assert [r.getMessage() for r in caplog.records if "host executor failed" in r.getMessage()]
    assert other.run("op", "z") == ("host", 0, "z") and not other.faults  # per engine, not per process
    assert engine.report() == {"order": ["host", "fused", "plain"], "faults": dict(engine.faults),
                               "ran": {"op": "fused"}}


def test_the_last_executors_failure_propagates():
    engine, _ = _engine(("fused", RuntimeError("first")), ("plain", ValueError("last")))
    with pytest.raises(ValueError, match="last"):
        engine.run("op", 0)
    assert set(engine.faults) == {"fused"} and engine.ran == {}


def test_decline_is_not_a_fault(caplog):
    from whisper_accel.runtime.engine import Decline

    caplog.set_level(logging.INFO, logger="whisper_accel")
    engine, fakes = _engine(("host", Decline()), ("fused", 1))
    assert engine.run("op", 1) == ("fused", 1, 1)
    assert engine.run("op", 2) == ("fused", 1, 2)
    assert fakes["host"].calls == 2  # asked again on every call
    assert engine.faults == {} and engine.usable() == ["host", "fused"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_unavailable_is_recorded_without_a_warning(caplog):
    from whisper_accel.runtime.engine import Unavailable

    caplog.set_level(logging.INFO, logger="whisper_accel")
    engine, fakes = _engine(("host", Unavailable("weights it cannot read")), ("fused", ("unavailable", "no kernels")),
                            ("plain", 2))
    assert engine.faults == {"fused": "unavailable: no kernels"}  # checked when the engine is made
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.run("op", 1) == ("plain", 2, 1)
        assert engine.run("op", 2) == ("plain", 2, 2)
    assert engine.faults == {"fused": "unavailable: no kernels", "host": "unavailable: weights it cannot read"}
    assert fakes["host"].calls == 1 and fakes["fused"].calls == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_first_and_prefer_change_who_runs_first():
    engine, _ = _engine(("host", 0), ("fused", 1), ("plain", 2))
    assert engine.run("op", 0, first="plain")[0] == "plain"
    assert engine.run("op", 0)[0] == "host"
    engine.prefer("fused")
    assert engine.order == ["fused", "host", "plain"] and engine.run("op", 0)[0] == "fused"
    engine.faults["fused"] = "fault in op: test"
    assert engine.run("op", 0, first="fused")[0] == "host"  # a faulted one is not run, even asked first
    with pytest.raises(RuntimeError, match="no executor"):
        engine.run("missing_op")


# ====================================================================== the configuration

def test_from_env_reads_every_variable():
    env = {"WHISPER_ACCEL_ENCODER": " HOST ", "WHISPER_ACCEL_DECODER": "fused", "WHISPER_ACCEL_NATIVE": "off",
           "WHISPER_ACCEL_ISA": "AVX2", "WHISPER_ACCEL_MEASURE": "0", "WHISPER_ACCEL_GROUP_BYTES": "1024",
           "WHISPER_ACCEL_WHOLE_ENCODER_GRAPH": "yes", "WHISPER_ACCEL_PROBE_CACHE": "false",
           "WHISPER_ACCEL_CACHE_DIR": "~/verdicts", "WHISPER_ACCEL_MATMUL_PRECISION": "BFloat16"}
    assert set(env) == set(config.ENV.values())
    got = Config.from_env(env)
    assert got == Config(encoder="host", decoder="fused", native=False, isa="avx2", measure=False, group_bytes=1024,
                         whole_encoder_graph=True, probe_cache=False, cache_dir=os.path.expanduser("~/verdicts"),
                         matmul_precision="bfloat16")
    assert Config.from_env({}) == Config.defaults()
    assert Config.from_env({"WHISPER_ACCEL_ENCODER": "", "WHISPER_ACCEL_NATIVE": "  "}) == Config.defaults()
    for raw, value in (("1", True), ("true", True), ("On", True), ("yes", True), ("0", False), ("no", False)):
        assert Config.from_env({"WHISPER_ACCEL_MEASURE": raw}).measure is value


@pytest.mark.parametrize("variable, value", [
    ("WHISPER_ACCEL_ENCODER", "gpu"), ("WHISPER_ACCEL_DECODER", "mindspore"), ("WHISPER_ACCEL_ISA", "sse2"),
    ("WHISPER_ACCEL_NATIVE", "maybe"), ("WHISPER_ACCEL_MEASURE", "2"), ("WHISPER_ACCEL_GROUP_BYTES", "lots"),
    ("WHISPER_ACCEL_GROUP_BYTES", "-1"), ("WHISPER_ACCEL_WHOLE_ENCODER_GRAPH", "whole"),
    ("WHISPER_ACCEL_PROBE_CACHE", "disabled"), ("WHISPER_ACCEL_MATMUL_PRECISION", "int8")])
def test_a_bad_value_raises_naming_the_variable(variable, value):
    with pytest.raises(ValueError) as info:
        Config.from_env({variable: value})
    assert variable in str(info.value), str(info.value)


@pytest.mark.parametrize("changes", [dict(encoder="gpu"), dict(decoder="mindspore"), dict(isa="sse"),
                                     dict(group_bytes=-1), dict(group_bytes=True), dict(group_bytes=1.5),
                                     dict(native="yes"), dict(measure=1), dict(probe_cache=None),
                                     dict(whole_encoder_graph="on")])
def test_a_config_validates_its_fields(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        Config(**changes)
    with pytest.raises(ValueError):
        Config().with_(**changes)
    assert Config().with_(encoder="plain") == Config(encoder="plain")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().encoder = "plain"


def test_a_field_not_given_takes_its_variable(clean_env):
    """``Config(encoder=...)`` keeps the rest of the environment (the cache directory above
    all); :meth:`Config.defaults` ignores it."""
    clean_env.setenv("WHISPER_ACCEL_ISA", "avx2")
    assert Config(encoder="host").isa == "avx2" and Config(encoder="host").cache_dir == os.environ["WHISPER_ACCEL_CACHE_DIR"]
    assert Config.defaults().isa == "auto" and Config.defaults().cache_dir is None
    assert Config(isa="auto").isa == "auto"  # a value given wins


def test_the_config_in_force_activated_then_environment_then_defaults(clean_env, use):
    assert config.current() == Config.from_env() and config.current().encoder == "auto"
    clean_env.setenv("WHISPER_ACCEL_ENCODER", "plain")
    clean_env.setenv("WHISPER_ACCEL_GROUP_BYTES", "0")
    assert (config.current().encoder, config.current().group_bytes) == ("plain", 0)
    use(Config(encoder="fused"))
    assert config.current() == Config(encoder="fused")  # the activated one, whole: no variable mixed in
    use(None)
    assert config.current().encoder == "plain"
    clean_env.setenv("WHISPER_ACCEL_DECODER", "nonsense")  # invalid: the defaults (patch() reports it)
    assert config.current() == Config.defaults()


def test_patch_activates_its_config_and_unpatch_the_environments(clean_env):
    import whisper_accel

    clean_env.setenv("WHISPER_ACCEL_MEASURE", "0")
    report = whisper_accel.patch(config=Config(decoder="plain"))
    try:
        assert config.current() == Config(decoder="plain")
        assert report.config == Config(decoder="plain").as_dict()
    finally:
        whisper_accel.unpatch()
    assert config.current() == Config.from_env() and config.current().measure is False
    assert config.current().decoder == "auto"
    with pytest.raises(TypeError, match="Config"):
        whisper_accel.patch(config={"decoder": "plain"})


def test_the_cache_directory(clean_env, tmp_path):
    assert config.cache_directory(Config(cache_dir="~/wa")) == os.path.expanduser("~/wa")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert config.cache_directory(Config.defaults()) == str(tmp_path / "whisper_accel")


# ====================================================================== the weight schema

def _filled(cls, prefix=""):
    """A ``cls`` structure whose every leaf is its own dotted path."""
    values = {}
    for f in dataclasses.fields(cls):
        sub = W._type_of(cls, f.name)
        values[f.name] = _filled(sub, prefix + f.name + ".") if sub is not None else prefix + f.name
    return cls(**values)


@pytest.mark.parametrize("cls", [W.EncoderLayer, W.DecoderLayer, W.Stem, W.CrossKV, W.Vocabulary])
def test_tuple_form_slots_paths_and_maps_round_trip(cls):
    obj = _filled(cls)
    tup = W.as_tuple(obj)
    paths = W.leaf_paths(cls)
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert W.get(obj, cls, p) == p and W.get(tup, cls, p) == p
        idx = W.index_path(cls, p)
        leaf = tup
        for i in idx:
            leaf = leaf[i]
        assert leaf == p
    slots = W.slots(cls)
    for i, f in enumerate(dataclasses.fields(cls)):
        assert getattr(slots, f.name) == i
        sub = getattr(obj, f.name)
        assert tup[i] == (W.as_tuple(sub) if dataclasses.is_dataclass(sub) else sub)
    upper = W.mapped(obj, lambda path, v: (path, v.upper()))
    assert type(upper) is cls and all(W.get(upper, cls, p) == (p, p.upper()) for p in paths)
    assert W.mapped(obj, lambda path, v: v) == obj
    assert set(W.matrix_paths(cls)) <= set(paths)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(cls)[0].name, None)


def test_the_decoder_layer_arguments_cover_the_schema_once():
    names = W.DECODER_LAYER_ARGS
    assert len(set(names)) == len(names)
    assert set(names) - W.DECODER_LAYER_STATE == set(W.leaf_paths(W.DecoderLayer))
    assert W.DECODER_LAYER_STATE <= set(names)
    layer = _filled(W.DecoderLayer)
    state = {n: f"state:{n}" for n in W.DECODER_LAYER_STATE}
    args = W.kernel_args(layer, state)
    assert args == W.kernel_args(W.as_tuple(layer), state)
    assert args == [f"state:{n}" if n in W.DECODER_LAYER_STATE else n for n in names]


def test_matrix_args_are_the_matrices_positions():
    from whisper_accel.runtime import kernel_checks

    names = W.DECODER_LAYER_ARGS
    positions = W.matrix_args()
    assert {names[i] for i in positions} == set(W.matrix_paths(W.DecoderLayer))
    assert set(W.matrix_paths(W.DecoderLayer)) == {"attn.q_w", "attn.k_w", "attn.v_w", "attn.o_w", "cross.q_w",
                                                   "cross.o_w", "fc1_w", "fc2_w"}
    assert kernel_checks.MATRICES == positions
    assert kernel_checks.ARG == {n: i for i, n in enumerate(names)}
    args = kernel_checks.layer_inputs(np.random.default_rng(0), 2, 1, 3)
    assert all(args[i].ndim == 2 for i in positions)
    assert all(args[i].ndim == 1 for i, n in enumerate(names) if n.endswith(("_b", ".bias", ".weight")))


def test_the_kernel_signature_matches_the_schema_and_a_change_is_reported(fused_library, monkeypatch):
    from whisper_accel.runtime import kernel_checks

    assert kernel_checks.check_signature(fused_library) is None
    names = list(W.DECODER_LAYER_ARGS)
    i, j = names.index("attn.q_w"), names.index("attn.q_b")
    names[i], names[j] = names[j], names[i]
    monkeypatch.setattr(W, "DECODER_LAYER_ARGS", tuple(names))
    why = kernel_checks.check_signature(fused_library)
    assert why and "argument order differs" in why and f"position {i}" in why and "'attn.q_w'" in why, why
    monkeypatch.setattr(W, "DECODER_LAYER_ARGS", tuple(names[:-1]))
    why = kernel_checks.check_signature(fused_library)
    assert why and "argument order differs" in why, why


def test_arranging_a_real_layer_reads_each_module_weight():
    pytest.importorskip("mindnlp")
    from conftest import mini_model

    model = mini_model(seed=1)
    enc, dec = model.model.encoder.layers[0], model.model.decoder.layers[0]
    same = lambda t: t  # noqa: E731
    el, dl = W.encoder_layer(enc, same), W.decoder_layer(dec, same, same)
    assert W.get(W.as_tuple(el), W.EncoderLayer, "attn.q_w") is enc.self_attn.q_proj.weight
    assert W.get(el, W.EncoderLayer, "fc2_b") is enc.fc2.bias
    assert W.get(W.as_tuple(dl), W.DecoderLayer, "cross.o_w") is dec.encoder_attn.out_proj.weight
    assert W.get(dl, W.DecoderLayer, "ln3.bias") is dec.final_layer_norm.bias
    assert W.cross_kv(dec, same).k_w is dec.encoder_attn.k_proj.weight
    marked = W.decoder_layer(dec, lambda t: ("matrix", t), lambda t: ("vector", t))
    for p in W.leaf_paths(W.DecoderLayer):
        assert W.get(marked, W.DecoderLayer, p)[0] == ("matrix" if p in W.matrix_paths(W.DecoderLayer) else "vector")


# ====================================================================== engines on a model

@pytest.fixture(scope="module")
def models():
    """Two MINI models (different weights) and their features, with stock's encoder outputs
    and greedy tokens."""
    pytest.importorskip("mindnlp")
    import torch

    from conftest import features, mini_model

    out = []
    for seed in (21, 22):
        m = mini_model(seed=seed)
        f = features(1, frames=128, mel=16, seed=seed)
        with torch.no_grad():
            enc = m.model.encoder(f).last_hidden_state.asnumpy()
            tokens = m.generate(f, max_new_tokens=6, min_new_tokens=6, do_sample=False).asnumpy()
        out.append((m, f, enc, tokens))
    return out


def _fresh(*modules):
    from whisper_accel.runtime.binding import ATTR

    for m in modules:
        m.__dict__.pop(ATTR, None)


def _engine_of(module):
    from whisper_accel.runtime.binding import ATTR

    return module.__dict__[ATTR]


def _encode(model, feats):
    import torch

    with torch.no_grad():
        return model.model.encoder(feats).last_hidden_state.asnumpy()


def _greedy(model, feats):
    import torch

    with torch.no_grad():
        return model.generate(feats, max_new_tokens=6, min_new_tokens=6, do_sample=False).asnumpy()


def _rel(a, b):
    from conftest import rel_diff

    return rel_diff(a, b)


def test_a_broken_host_encoder_falls_back_for_its_model_only(fused_library, models, monkeypatch, caplog):
    import whisper_accel
    from whisper_accel.runtime.executors.host import HostEncoderExecutor

    (a, fa, enc_a, _), (b, fb, enc_b, _) = models
    _fresh(a.model.encoder, b.model.encoder)
    real = HostEncoderExecutor.encode
    broken_for = []

    def broken(self, feats):
        if self in broken_for:
            raise RuntimeError("injected host encoder failure")
        return real(self, feats)

    monkeypatch.setattr(HostEncoderExecutor, "encode", broken)
    caplog.set_level(logging.WARNING, logger="whisper_accel")
    with whisper_accel.patched(config=_config(encoder="host")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", whisper_accel.WhisperAccelWarning)
            _encode(a, fa)  # builds a's engine (host runs)
            eng_a = _engine_of(a.model.encoder)
            broken_for.append(eng_a.engine.executors["host"])
            out_a = _encode(a, fa)
            again_a = _encode(a, fa)
            out_b = _encode(b, fb)
        eng_b = _engine_of(b.model.encoder)
    assert eng_a.executor == "fused" and set(eng_a.engine.faults) == {"host"}
    assert eng_a.engine.faults["host"].startswith("fault in encode") and "injected" in eng_a.engine.faults["host"]
    assert eng_b.executor == "host" and not eng_b.engine.faults  # the other model still runs host
    assert [r for r in caplog.records if "the host executor failed" in r.getMessage()]
    assert _rel(out_a, enc_a) < 1e-5 and _rel(again_a, enc_a) < 1e-5 and _rel(out_b, enc_b) < 1e-5
    _fresh(a.model.encoder, b.model.encoder)


def test_a_broken_host_decoder_falls_back_for_its_model_only(fused_library, models, monkeypatch):
    import whisper_accel
    from whisper_accel.runtime.executors.host import HostDecoder

    (a, fa, _, tokens_a), (b, fb, _, tokens_b) = models
    _fresh(a, b)
    real = HostDecoder.decode_next

    def broken(self, *args, **kwargs):
        if self.w is _engine_of(a).weights:
            raise RuntimeError("injected host step failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HostDecoder, "decode_next", broken)
    with whisper_accel.patched(), warnings.catch_warnings():
        warnings.simplefilter("error", whisper_accel.WhisperAccelWarning)
        got_a = _greedy(a, fa)
        got_b = _greedy(b, fb)
        again_a = _greedy(a, fa)
    dec_a, dec_b = _engine_of(a), _engine_of(b)
    assert dec_a.executor("decode_next") == "fused" and set(dec_a.engine.faults) == {"host"}
    assert "fault in decode_next" in dec_a.engine.faults["host"] and "injected" in dec_a.engine.faults["host"]
    assert dec_b.executor("decode_next") == "host" and not dec_b.engine.faults
    assert np.array_equal(got_a, tokens_a) and np.array_equal(again_a, tokens_a) and np.array_equal(got_b, tokens_b)
    _fresh(a, b)


@pytest.mark.parametrize("executor", ["host", "fused", "plain"])
def test_a_forced_encoder_executor_runs_what_it_says(executor, models, request):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    if executor != "plain":
        request.getfixturevalue("fused_library")
    (a, fa, enc_a, _), _ = models
    eng = EncoderEngine(a.model.encoder, _config(encoder=executor))
    x = ms.Tensor(fa.asnumpy())
    outs = [eng.encode(x).asnumpy() for _ in range(3)]
    assert eng.executor == executor and not eng.engine.faults and eng.choice is None
    assert eng.engine.order == list(config.EXECUTORS[config.EXECUTORS.index(executor):])
    assert all(_rel(o, enc_a) < 1e-5 for o in outs)
    assert eng.report()["config"] == executor and eng.report()["ran"] == {"encode": executor}


@pytest.mark.parametrize("executor", ["host", "fused", "plain"])
def test_a_forced_decoder_executor_runs_what_it_says(executor, models, request):
    import whisper_accel

    if executor != "plain":
        request.getfixturevalue("fused_library")
    (a, fa, _, tokens_a), _ = models
    _fresh(a)
    with whisper_accel.patched(config=_config(decoder=executor)):
        got = _greedy(a, fa)
        dec = _engine_of(a)
    _fresh(a)
    assert dec.executor("decode_next") == executor and not dec.engine.faults
    assert dec.executor("cross_kv") == executor
    assert np.array_equal(got, tokens_a)


def test_a_forced_executor_that_cannot_run_here_falls_back(models, caplog):
    import mindspore as ms

    from whisper_accel.runtime.decoder_engine import DecoderEngine
    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, enc_a, _), _ = models
    caplog.set_level(logging.WARNING, logger="whisper_accel")
    off = _config(encoder="host", decoder="fused", native=False)
    eng = EncoderEngine(a.model.encoder, off)
    out = eng.encode(ms.Tensor(fa.asnumpy())).asnumpy()
    assert eng.executor == "plain" and eng.choice is None
    assert set(eng.engine.faults) == {"host", "fused"}
    assert all(f.startswith("unavailable") and "Config.native off" in f for f in eng.engine.faults.values())
    assert _rel(out, enc_a) < 1e-5
    dec = DecoderEngine(a, off)
    assert set(dec.engine.faults) == {"fused"} and dec.engine.usable() == ["plain"]
    assert not [r for r in caplog.records if "executor failed" in r.getMessage()]  # unavailable: no warning


# ====================================================================== the measured choice

def _measuring(tmp, fused_library, **kw):
    """A measuring config with its cache in ``tmp``; the session's kernel library copied into its
    kernel directory (the same build key: found there, not compiled again)."""
    from whisper_accel.runtime import native

    cfg = Config(encoder="auto", measure=True, cache_dir=str(tmp), **kw)
    directory = native._directory(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy2(fused_library, directory / Path(fused_library).name)
    return cfg


def _verdicts(cfg):
    from whisper_accel.runtime import choice, native

    return choice.machine_key(cfg, os.path.basename(native.library(cfg).path))


def _runs(eng, x, n):
    """``n`` encodes: (executor that ran, output) each."""
    out = []
    for _ in range(n):
        y = eng.encode(x).asnumpy()
        out.append((eng.executor, y))
    return out


#: The most calls a case is measured over: each candidate's warm-up, then up to SHORT_RUNS
#: timed calls each (runtime/choice.py).
def _most():
    from whisper_accel.runtime import choice

    return 2 + 2 * choice.SHORT_RUNS


def _until_decided(eng, x):
    """Encodes until ``eng``'s choice has a verdict for ``x``'s shape (at most :func:`_most`
    calls): (executor that ran, output) each."""
    case = eng.choice.case(tuple(x.shape))
    out = []
    while eng.choice.report().get(case, {}).get("executor") is None:
        assert len(out) < _most(), eng.choice.report()
        out += _runs(eng, x, 1)
    return out


def _measured_order(verdict, default="host", other="fused"):
    """The executors a measured case ran, in order: the warm-ups (host first: it compiles nothing),
    then round-robin timed calls: SHORT_RUNS each where the fastest call took under SHORT_S,
    else one each."""
    from whisper_accel.runtime import choice

    timed = choice.SHORT_RUNS if min(verdict["seconds"].values()) < choice.SHORT_S else 1
    return [default, other] + [default, other] * timed


def test_the_first_calls_measure_each_candidate_then_the_verdict_runs(fused_library, models, tmp_path, use):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, enc_a, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(cfg)
    eng = EncoderEngine(a.model.encoder)
    assert eng.config == cfg and eng.choice is not None
    assert eng.choice.default == "fused" and eng.choice.candidates == ["host", "fused"]  # host's first call compiles nothing
    x = ms.Tensor(fa.asnumpy())
    case = eng.choice.case(tuple(x.shape))
    first = _runs(eng, x, 1)
    assert eng.choice.report()[case] == {"executor": None, "seconds": {}, "source": "measuring"}
    rest = _until_decided(eng, x)
    verdict = eng.choice.report()[case]
    rest += _runs(eng, x, 2)
    ran = [r for r, _ in first + rest]
    # first calls (host first: it compiles nothing), the timed calls round-robin, then the verdict
    measured = _measured_order(verdict)
    assert ran == measured + [verdict["executor"]] * 2, (ran, verdict)
    assert verdict["source"] == "measured; cached" and set(verdict["seconds"]) == {"fused", "host"}
    assert verdict["executor"] == min(verdict["seconds"], key=verdict["seconds"].get)
    assert all(s > 0 for s in verdict["seconds"].values())
    assert all(_rel(y, enc_a) < 1e-5 for _, y in first + rest)
    assert eng.report()["choice"] == eng.choice.report() and not eng.engine.faults
    # on disk, under this machine's key
    key = _verdicts(cfg)
    path = _probe_cache.path_for(key, "verdicts")
    assert path.parent == tmp_path and path.is_file()
    stored = _probe_cache.load_entries(key, "verdicts")[case]
    assert stored == {"executor": verdict["executor"], "seconds": verdict["seconds"],
                      "first_seconds": verdict["first_seconds"]}
    # each candidate's first call is kept too, timed to completion (the graph's compilation in it)
    assert set(verdict["first_seconds"]) == {"fused", "host"} and all(t > 0 for t in verdict["first_seconds"].values())
    # a new engine in this process reads it: nothing timed; the verdict's executor, or a stand-in
    # while the ski-rental rule allows one (replayed here on the verdict's own numbers)
    again = EncoderEngine(a.model.encoder)
    got = _runs(again, x, 3)
    assert again.choice.report()[case]["source"] == "from the cache"
    assert [r for r, _ in got] == _replayed(verdict, ["host", "fused"], 3)
    assert all(_rel(y, enc_a) < 1e-5 for _, y in got)


def _replayed(verdict, usable, n):
    """The executors :func:`choice.stand_in` runs over ``n`` calls of a fresh process."""
    from whisper_accel.runtime import choice

    warm, spent, out = set(), 0.0, []
    for _ in range(n):
        instead = choice.stand_in(verdict, usable, warm, spent)
        name = verdict["executor"] if instead is None else instead[0]
        spent += 0.0 if instead is None else instead[1]
        warm.add(name)
        out.append(name)
    return out


@pytest.mark.parametrize("first, expected", [
    # fused compiles (first call 1.5 s against 1.0 warm): host stands in while its excess over
    # fused's warm 1.0 s, summed, stays within that 0.5 s: 0.25 (its first call), then 0.125 a call
    ({"fused": 1.5, "host": 1.25}, ["host"] * 3 + ["fused"] * 3),
    ({"fused": 1.5, "host": 2.0}, ["fused"] * 6),  # host's first call alone costs more: no stand-in
    ({"fused": 1.0, "host": 1.25}, ["fused"] * 6),  # nothing to save: fused's first call is a warm one
    (None, ["fused"] * 6),  # a verdict kept without first calls (an older entry): as before
])
def test_a_stand_in_runs_while_the_verdicts_graph_would_cost_more_to_compile(first, expected):
    verdict = {"executor": "fused", "seconds": {"fused": 1.0, "host": 1.125}}  # binary fractions: exact sums
    if first is not None:
        verdict["first_seconds"] = first
    assert _replayed(verdict, ["fused", "host"], 6) == expected
    host = {"executor": "host", "seconds": {"fused": 1.25, "host": 1.0}, "first_seconds": {"fused": 1.5, "host": 1.0}}
    assert _replayed(host, ["fused", "host"], 3) == ["host"] * 3  # a host verdict: nothing to compile
    if first is not None:  # a stand-in the engine cannot use is not chosen
        assert _replayed(verdict, ["fused"], 2) == ["fused"] * 2


def test_a_cached_verdict_with_first_calls_lets_host_stand_in_for_a_cold_graph(fused_library, models, tmp_path,
                                                                               use):
    """A verdict on disk names ``fused`` with its first call 100 s (a compilation): host runs
    every call of this process, and the report counts them."""
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, enc_a, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(cfg)
    eng = EncoderEngine(a.model.encoder)
    case = eng.choice.case((1, 16, 128))
    entry = {"executor": "fused", "seconds": {"fused": 1.0, "host": 1.001},
             "first_seconds": {"fused": 100.0, "host": 1.5}}
    assert _probe_cache.store_entries(_verdicts(cfg), {case: entry}, "verdicts")
    got = _runs(eng, ms.Tensor(fa.asnumpy()), 3)
    assert [r for r, _ in got] == ["host"] * 3
    report = eng.choice.report()[case]
    assert report == dict(entry, source="from the cache", stand_in_calls=3)
    assert all(_rel(y, enc_a) < 1e-5 for _, y in got)


def test_another_input_shape_is_another_case(fused_library, models, tmp_path, use):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, _, _), _ = models
    use(_measuring(tmp_path, fused_library))
    eng = EncoderEngine(a.model.encoder)
    one = ms.Tensor(fa.asnumpy())
    two = ms.Tensor(np.concatenate([fa.asnumpy()] * 2))
    _until_decided(eng, one)
    assert eng.choice.report()[eng.choice.case((1, 16, 128))]["source"].startswith("measured")
    _runs(eng, two, 1)
    assert eng.choice.report()[eng.choice.case((2, 16, 128))]["source"] == "measuring"
    assert eng.compiled_shapes == [(1, 16, 128), (2, 16, 128)]


def test_a_cached_verdict_is_used_from_the_first_call(fused_library, models, tmp_path, use):
    """A verdict on disk for this machine's key names ``host``, against the rule's ``fused``:
    the first call runs host, untimed."""
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, enc_a, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(cfg)
    eng = EncoderEngine(a.model.encoder)
    case = eng.choice.case((1, 16, 128))
    assert _probe_cache.store_entries(_verdicts(cfg), {case: {"executor": "host", "seconds": {"host": 1.0}}},
                                      "verdicts")
    got = _runs(eng, ms.Tensor(fa.asnumpy()), 2)
    assert [r for r, _ in got] == ["host", "host"]
    assert eng.choice.report()[case] == {"executor": "host", "seconds": {"host": 1.0}, "source": "from the cache"}
    assert all(_rel(y, enc_a) < 1e-5 for _, y in got)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"format": 1}', '{"format": 1, "key": {}}',
                                     "\x00\x01binary"])
def test_a_corrupt_verdicts_file_reads_as_none(fused_library, models, tmp_path, use, content):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, enc_a, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(cfg)
    path = _probe_cache.path_for(_verdicts(cfg), "verdicts")
    path.write_text(content)
    eng = EncoderEngine(a.model.encoder)
    case = eng.choice.case((1, 16, 128))
    got = _until_decided(eng, ms.Tensor(fa.asnumpy()))
    assert [r for r, _ in got] == _measured_order(eng.choice.report()[case])  # measured again
    assert eng.choice.report()[case]["source"] == "measured; cached"
    assert case in json.loads(path.read_text())["results"]  # and rewritten whole
    assert all(_rel(y, enc_a) < 1e-5 for _, y in got)


@pytest.mark.parametrize("change", ["model", "flags", "arch"])
def test_a_verdict_from_another_cpu_is_not_used(fused_library, models, tmp_path, use, monkeypatch, change):
    import mindspore as ms

    from whisper_accel.kernels import isa
    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, _, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(cfg)
    x = ms.Tensor(fa.asnumpy())
    here = EncoderEngine(a.model.encoder)  # built (and the kernels decided) on this CPU
    case = here.choice.case((1, 16, 128))
    assert _probe_cache.store_entries(_verdicts(cfg), {case: {"executor": "fused", "seconds": {"fused": 1.0}}},
                                      "verdicts")
    real = isa.cpu()
    other = {"model": dataclasses.replace(real, model=real.model + " (another one)"),
             "flags": dataclasses.replace(real, flags=real.flags - {sorted(real.flags)[0]}),
             "arch": dataclasses.replace(real, arch="riscv64")}[change]
    there = EncoderEngine(a.model.encoder)
    monkeypatch.setattr(isa, "cpu", lambda *args, **kwargs: other)
    assert [r for r, _ in _runs(there, x, 1)] == ["host"]  # measuring, host first: the file was not read
    assert there.choice.report()[case]["source"] == "measuring"
    monkeypatch.undo()
    assert [r for r, _ in _runs(here, x, 1)] == ["fused"]  # on this CPU the same file is read


def test_with_the_probe_cache_off_nothing_is_written(fused_library, models, tmp_path, use):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, _, _), _ = models
    cfg = _measuring(tmp_path, fused_library, probe_cache=False)
    use(cfg)
    eng = EncoderEngine(a.model.encoder)
    case = eng.choice.case((1, 16, 128))
    _until_decided(eng, ms.Tensor(fa.asnumpy()))
    assert eng.choice.report()[case]["source"] == "measured"
    assert list(tmp_path.iterdir()) == []  # no verdicts, and the kernels built elsewhere
    assert not _probe_cache.load_entries(_verdicts(cfg), "verdicts")


def test_measure_off_runs_the_rule_and_times_nothing(fused_library, models, tmp_path, use):
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, _, _), _ = models
    use(_measuring(tmp_path, fused_library).with_(measure=False))
    eng = EncoderEngine(a.model.encoder)
    assert eng.choice is None
    assert [r for r, _ in _runs(eng, ms.Tensor(fa.asnumpy()), 3)] == ["fused"] * 3
    assert "choice" not in eng.report() and not list(tmp_path.glob("verdicts-*"))


def test_a_verdict_goes_to_the_engines_own_cache_directory(fused_library, models, tmp_path, use):
    """An engine built with a config (not the one in force) keeps its verdicts in that config's
    cache directory, as its kernels are."""
    import mindspore as ms

    from whisper_accel.runtime.encoder_engine import EncoderEngine

    (a, fa, _, _), _ = models
    cfg = _measuring(tmp_path, fused_library)
    use(Config(cache_dir=str(tmp_path / "in-force")))  # another config in force (and nothing left in the session's)
    eng = EncoderEngine(a.model.encoder, cfg)
    _until_decided(eng, ms.Tensor(fa.asnumpy()))
    assert eng.choice.report()[eng.choice.case((1, 16, 128))]["source"] == "measured; cached"
    assert list(tmp_path.glob("verdicts-*.json")), sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


# ---------------------------------------------------------------- concurrent writers of one file

KEY = {"format": 1, "cpu": "Test CPU", "flags": ["avx2"], "kernels": "fused-test.so"}


def _check_file(path: Path, written: dict) -> dict:
    """The verdicts file is whole: JSON of this key, its entries a non-empty subset of
    ``written`` with their values intact."""
    data = json.loads(path.read_text())
    assert data["format"] == _probe_cache.FORMAT and data["key"] == KEY
    results = data["results"]
    assert results and set(results) <= set(written)
    assert all(results[k] == written[k] for k in results)
    return results


def test_concurrent_threads_writing_verdicts_leave_a_valid_file(tmp_path, use):
    use(Config(cache_dir=str(tmp_path)))
    path = _probe_cache.path_for(KEY, "verdicts")
    written = {f"case-{i}-{j}": {"executor": ("host", "fused")[j % 2], "seconds": {"host": i + j / 10}}
               for i in range(6) for j in range(15)}
    stop, seen, bad = threading.Event(), [], []

    def read():
        while not stop.is_set():
            if path.exists():
                try:
                    seen.append(len(_check_file(path, written)))
                except Exception as exc:  # noqa: BLE001
                    bad.append(repr(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        results = in_threads(lambda i: [_probe_cache.store_entries(KEY, {k: v}, "verdicts")
                                        for k, v in written.items() if k.startswith(f"case-{i}-")], 6)
    finally:
        stop.set()
        reader.join(30)
    assert all(all(r) for r in results)  # every write reported written
    assert not bad, bad[:3]
    final = _check_file(path, written)
    assert set(_probe_cache.load_entries(KEY, "verdicts")) == set(final)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.subprocess
def test_concurrent_processes_writing_verdicts_leave_a_valid_file(tmp_path, use):
    script = ("import json, sys\n"
              "from whisper_accel import _probe_cache\n"
              "key, i = json.loads(sys.argv[1]), int(sys.argv[2])\n"
              "ok = [_probe_cache.store_entries(key, {f'case-{i}-{j}': {'executor': 'host', 'seconds': {'host': j}}},"
              " 'verdicts') for j in range(25)]\n"
              "print(all(ok))\n")
    env = child_env(WHISPER_ACCEL_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(KEY), str(i)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    use(Config(cache_dir=str(tmp_path)))
    path = _probe_cache.path_for(KEY, "verdicts")
    written = {f"case-{i}-{j}": {"executor": "host", "seconds": {"host": j}} for i in range(4) for j in range(25)}
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            _check_file(path, written)
            reads += 1
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "True" for p, (out, _) in zip(procs, outs)), outs
    final = _check_file(path, written)
    assert any(k.startswith("case-") for k in final)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("how", ["variable", "context"])
def test_mindspore_compile_cache_turns_the_graph_executors_off(how, models, monkeypatch, request):
    """MindSpore's compile cache loads a later process's graphs by compile order (measured: a
    greedy run after a beam run loaded the wrong graphs and faulted with garbage gather indices):
    with it on, the graph executors are unavailable, patch() says so once, the host runs."""
    import mindspore

    import whisper_accel
    from whisper_accel import _environment, _errors

    if how == "variable":
        monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "1")
    else:
        monkeypatch.setattr(mindspore, "get_context",
                            lambda key, _g=mindspore.get_context: True if key == "enable_compile_cache" else _g(key))
    assert _environment.compile_cache_on()
    request.getfixturevalue("fused_library")  # the host executor needs the kernels
    (a, fa, _, tokens_a), _ = models
    _fresh(a)
    _errors.forget_warnings()
    with pytest.warns(_errors.WhisperAccelWarning, match="compile cache is on"):
        whisper_accel.patch()
    try:
        got = _greedy(a, fa)
        dec = _engine_of(a)
    finally:
        whisper_accel.unpatch()
        _fresh(a)
    for name in ("fused", "plain"):
        assert dec.engine.faults[name] == f"unavailable: {_environment.COMPILE_CACHE}"
    assert dec.executor("decode_next") == "host" and dec.executor("cross_kv") == "host"
    assert np.array_equal(got, tokens_a)
    monkeypatch.delenv("MS_COMPILER_CACHE_ENABLE", raising=False)
    monkeypatch.undo()
    assert not _environment.compile_cache_on()
