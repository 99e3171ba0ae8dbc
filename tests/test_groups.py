"""The contract every patch group keeps, run for each group in the registry (like ddtrace's
``PatchTestCase``): declared gates, patch before and after model construction (same output as
stock), double patch, exact unpatch, rollback on an injected failure, report entries. Plus the
patcher's replace/add kinds and the Ascend paths, tested with fakes.
"""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

import whisper_accel
from whisper_accel import _api, _environment
from whisper_accel._environment import Gates
from whisper_accel._errors import Unsupported, WhisperAccelError, WhisperAccelWarning
from whisper_accel._patcher import ADD, MISSING, Patch, is_ours, wrapper_depth
from whisper_accel.groups import NAMES, load

from conftest import features, greedy, mini_model, register_group, rel_diff

GROUPS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "whisper_accel", "groups")


def only(name):
    return {g: g == name for g in NAMES}


def applicable(name):
    """The group's patches here, or skip the test with the group's own reason."""
    env = _environment.detect()
    try:
        return _api.group_patches(name, env)
    except Unsupported as exc:
        pytest.skip(f"group {name} does not apply here: {exc}")


# ------------------------------------------------------------------------------- meta tests

def test_every_group_module_is_registered_and_every_registered_group_has_a_module():
    modules = sorted(f[:-3] for f in os.listdir(GROUPS_DIR) if f.endswith(".py") and f != "__init__.py")
    assert modules == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_group_module_declares_its_contract(name):
    module = load(name)
    assert module.__name__ == f"whisper_accel.groups.{name}"  # named after the group
    assert isinstance(module.GATES, Gates)
    for probe in module.GATES.probes:
        assert probe in _environment.PROBES
    for package, spec in module.GATES.versions:
        assert package in _environment.SUPPORTED and spec
    assert isinstance(module.SUMMARY, str) and module.SUMMARY
    assert callable(module.patches)
    assert module.__doc__ and name in module.__doc__


@pytest.mark.parametrize("name", NAMES)
def test_group_patches_belong_to_it_and_fit_the_installed_code(name):
    for p in applicable(name):
        assert p.group == name
        assert p.problem() is None
        assert p.description


# ---------------------------------------------------------------------- lifecycle per group

@pytest.fixture(scope="module")
def mini():
    model = mini_model(init_std=0.3)
    feats = features(1, 128, mel=16)
    return model, feats, greedy(model, feats, 12)


@pytest.mark.parametrize("name", NAMES)
def test_patch_after_model_construction_gives_stock_tokens(name, mini):
    applicable(name)
    model, feats, stock = mini
    report = whisper_accel.patch(**only(name))
    assert report.groups_applied == [name]
    np.testing.assert_array_equal(greedy(model, feats, 12), stock)


@pytest.mark.parametrize("name", NAMES)
def test_patch_before_model_construction_gives_stock_tokens(name, mini):
    applicable(name)
    _, feats, stock = mini
    whisper_accel.patch(**only(name))
    model = mini_model(init_std=0.3)  # same seed: the same weights as the stock model
    np.testing.assert_array_equal(greedy(model, feats, 12), stock)


@pytest.mark.parametrize("name", NAMES)
def test_double_patch_unpatch_identity_and_report(name):
    patches = applicable(name)
    originals = {(id(p.owner), p.attribute): vars(p.owner).get(p.attribute, MISSING) for p in patches}
    report = whisper_accel.patch(**only(name))
    applied = [e for e in report.applied if e.group == name]
    assert [e.target for e in applied] == [p.target for p in patches]
    assert all(e.reason for e in applied)  # each entry says what it does
    assert any(e.group == g and e.reason == "disabled by caller" for g in NAMES if g != name
               for e in report.skipped)
    with pytest.warns(WhisperAccelWarning, match="already patched"):
        assert whisper_accel.patch(**only(name)) is report
    for p in patches:
        now = vars(p.owner)[p.attribute]
        assert is_ours(now) and wrapper_depth(now) == 1
        original = originals[(id(p.owner), p.attribute)]
        if original is not MISSING:  # a staticmethod carries it on its function
            assert getattr(now, "__func__", now).__wrapped__ is getattr(original, "__func__", original)
    whisper_accel.unpatch()
    for p in patches:
        assert vars(p.owner).get(p.attribute, MISSING) is originals[(id(p.owner), p.attribute)]


@pytest.mark.parametrize("name", NAMES)
def test_rollback_when_a_later_patch_fails(name, monkeypatch):
    patches = applicable(name)
    originals = {(id(p.owner), p.attribute): vars(p.owner).get(p.attribute, MISSING) for p in patches}

    def fail(original):
        raise RuntimeError("injected failure")

    register_group(monkeypatch, "zz_broken", lambda env: [Patch("zz_broken", types, "Fake", fail, kind=ADD)])
    with pytest.warns(WhisperAccelWarning, match="restored stock"):
        report = whisper_accel.patch(**only(name))
    assert report.applied == [] and not whisper_accel.is_patched()
    for p in patches:
        assert vars(p.owner).get(p.attribute, MISSING) is originals[(id(p.owner), p.attribute)]
    with pytest.raises(WhisperAccelError, match="injected failure"):
        whisper_accel.patch(strict=True, **only(name))


# ------------------------------------------------------------------------- gates and kinds

def test_gates_are_checked_centrally():
    env = _environment.Environment(versions={"mindspore": "2.7.0", "mindnlp": "0.5.1",
                                             "transformers": "4.57.6"}, backend="CPU")
    check = _environment.check_gates
    assert check(Gates(), env) is None
    assert check(Gates(backends=("CPU",)), env) is None
    assert "validated on Ascend only, not CPU" in check(Gates(backends=("Ascend",)), env)
    assert check(Gates(versions=(("mindnlp", ">=0.5"),)), env) is None
    assert "needs transformers >=4.57.7" in check(Gates(versions=(("transformers", ">=4.57.7"),)), env)
    calls = []
    _environment.PROBES["fake_probe"] = (lambda: calls.append(1) or False, "no fake kernel")
    try:
        assert check(Gates(backends=("Ascend",), probes=("fake_probe",)), env).startswith("validated")
        assert calls == []  # probes run only when the cheap gates pass
        assert "probe 'fake_probe' failed on CPU: no fake kernel" in check(Gates(probes=("fake_probe",)), env)
    finally:
        del _environment.PROBES["fake_probe"]


class Upstream:
    def present(self):
        return "stock"


def test_replace_target_missing_upstream_makes_the_group_unsupported(monkeypatch):
    """A replace target renamed upstream is not added and reported as applied: the group is
    skipped naming the attribute."""
    register_group(monkeypatch, "renamed", lambda env: [
        Patch("renamed", Upstream, "present", lambda o: (lambda self: "ours")),
        Patch("renamed", Upstream, "renamed_method", lambda o: (lambda self: "ours"))])
    report = whisper_accel.patch(renamed=True)
    skipped = [e for e in report.skipped if e.group == "renamed"]
    assert skipped and "Upstream.renamed_method does not exist" in skipped[0].reason
    assert not hasattr(Upstream, "renamed_method") and Upstream().present() == "stock"
    assert "attention" in report.groups_applied  # the other groups are not affected
    whisper_accel.unpatch()
    with pytest.raises(WhisperAccelError, match="renamed_method does not exist"):
        whisper_accel.patch(strict=True, renamed=True)


def test_add_target_that_exists_is_refused_and_kinds_are_checked():
    assert "already exists" in Patch("g", Upstream, "present", lambda o: None, kind=ADD).problem()
    assert Patch("g", Upstream, "absent", lambda o: None, kind=ADD).problem() is None
    assert Patch("g", Upstream, "present", lambda o: None).problem() is None
    assert "unknown patch kind" in Patch("g", Upstream, "present", lambda o: None, kind="swap").problem()

    class Child(Upstream):
        pass

    assert Patch("g", Child, "present", lambda o: None).problem() is None  # inherited counts
    # every class "has" __call__ through its metaclass: that must not count as defined
    assert "does not exist" in Patch("g", Child, "__call__", lambda o: None).problem()


def test_one_wrapper_convention_for_every_replacement():
    whisper_accel.patch()
    for owner, attribute, original in _api.originals():
        now = vars(owner)[attribute]
        assert is_ours(now)
        if original is MISSING:
            continue
        if isinstance(original, (staticmethod, classmethod)):
            assert type(now) is type(original)
        # descriptors (staticmethod) carry the convention on the function they hold
        now, original = getattr(now, "__func__", now), getattr(original, "__func__", original)
        assert now.__wrapped__ is original
        if callable(now) and hasattr(now, "__code__"):
            assert now.__name__ == original.__name__
            assert now.__qualname__ == original.__qualname__
            assert now.__doc__ == original.__doc__


# --------------------------------------------------------------- Ascend paths, with fakes

def _reference_attention(q, k, v, keep):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


class FakeFlashAttentionScore:
    """Stands in for Ascend's kernel: BNSD attention honouring ``attn_mask`` (1 = masked out)."""

    def __init__(self, head_num, scale_value, input_layout, sparse_mode):
        assert input_layout == "BNSD" and sparse_mode == 0
        self.scale = scale_value

    def __call__(self, q, k, v, real_shift, drop_mask, padding_mask, attn_mask):
        import mindspore

        q, k, v = q.asnumpy(), k.asnumpy(), v.asnumpy()
        keep = np.ones(q.shape[:3] + (k.shape[2],), bool)
        if attn_mask is not None:
            keep = keep & (attn_mask.asnumpy() == 0)
        return None, None, None, mindspore.Tensor(_reference_attention(q, k, v, keep).astype(np.float32))


@pytest.mark.parametrize("causal,padded", [(False, False), (True, False), (False, True), (True, True)])
def test_fused_ascend_path_keeps_padding_mask_with_causal(monkeypatch, causal, padded):
    """The Ascend branch, with a fake kernel: a padding mask and causality both apply (the
    padding mask used to be dropped when causal was set)."""
    import mindspore
    from mindspore.ops.operations import nn_ops

    from whisper_accel.kernels import attention

    monkeypatch.setattr(nn_ops, "FlashAttentionScore", FakeFlashAttentionScore)
    rng = np.random.default_rng(0)
    b, h, lq, lk, d = 2, 2, 3, 5, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, d)))
    keep = np.ones((b, h, lq, lk), bool)
    mask = None
    if padded:
        pad = np.ones((b, lk), bool)
        pad[1, :2] = False  # the second example's first two keys are padding
        keep &= pad[:, None, None, :]
        mask = mindspore.Tensor(np.where(pad, 0.0, attention.NEG).astype(np.float32).reshape(b, 1, 1, lk))
    if causal:
        keep &= np.tril(np.ones((lq, lk), bool), lk - lq)
    got = attention.fused(*(mindspore.Tensor(x) for x in (q, k, v)), mask, None, causal).asnumpy()
    np.testing.assert_allclose(got, _reference_attention(q, k, v, keep), rtol=1e-5, atol=1e-6)
    ours = attention.flash_attention(*(mindspore.Tensor(x) for x in (q, k, v)), mask, None, causal).asnumpy()
    np.testing.assert_allclose(got, ours, rtol=1e-5, atol=1e-5)  # both paths agree


def test_conv1d_group_forward_with_a_fake_native_kernel():
    """The conv1d group's forward, with a stand-in for the Ascend kernel: called once with the
    module's arguments, result tagged for mindtorch; unsupported inputs keep the stock path."""
    import torch

    from whisper_accel.groups.conv1d import make_conv1d_forward

    conv = torch.nn.Conv1d(4, 6, 3, padding=1)
    calls = []

    def fake(x, w, b, stride, padding, dilation, groups):
        calls.append((tuple(x.shape), stride, padding, dilation, groups))
        return stock(conv, x)

    stock = type(conv).forward
    forward = make_conv1d_forward(stock, conv=fake)
    x = torch.tensor(np.random.default_rng(0).standard_normal((2, 4, 10)).astype(np.float32))
    out = forward(conv, x)
    assert calls == [((2, 4, 10), conv.stride, conv.padding, conv.dilation, conv.groups)]
    assert rel_diff(out, stock(conv, x)) == 0.0 and out.device == x.device
    reflect = torch.nn.Conv1d(4, 6, 3, padding=1, padding_mode="reflect")
    forward(reflect, x)
    assert len(calls) == 1  # non-zeros padding: stock path


def test_bench_restores_the_callers_groups(mini):
    from whisper_accel import bench

    model, feats, _ = mini
    whisper_accel.patch(attention=False)
    assert _api.requested() == {"attention": False}  # what the caller said, nothing added
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", WhisperAccelWarning)  # restoring must not name other groups
        bench.compare(model, feats, stages=("encoder",), variants=("stock", "compiled"), repeats=1,
                      warmup=1)
    assert whisper_accel.is_patched() and _api.requested() == {"attention": False}
    entries = whisper_accel.status()["last_report"]["entries"]
    applied = {e["group"] for e in entries if e["status"] == "applied"}
    assert "attention" not in applied and {"encoder", "decoder"} <= applied  # "compiled": both
