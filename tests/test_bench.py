"""``bench.compare()`` when an arm cannot run: stock on a half-precision model (MindSpore CPU),
or a variant that raises. The run goes on, the failed arm is reported with its error, the
others are timed and checked (against stock float32 when stock failed on a half model)."""

import types

import numpy as np
import pytest

import mindnlp  # noqa: F401  (redirects `import torch` to mindtorch)
import torch

import whisper_accel
from whisper_accel import bench, models
from conftest import features, mini_model, stack

N_MELS, FRAMES = 16, 128  # conftest.MINI


def _half(name):
    return mini_model(seed=5, init_std=0.3).to(getattr(torch, name))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_stock_half_fails_patched_checked_against_stock_float32(name):
    dtype = getattr(torch, name)
    model = _half(name)
    feats = features(frames=FRAMES, mel=N_MELS).to(dtype)
    reference = models.float32_copy(model)
    assert reference.dtype == torch.float32 and reference.generation_config.to_dict() == \
        model.generation_config.to_dict()
    rows = bench.compare(model, feats, stages=("encoder", "generate"), variants=("stock", "all"),
                         repeats=2, max_new_tokens=6, reference_model=reference)
    by = {(r.variant, r.stage): r for r in rows}
    if stack()["backend"] == "CPU":  # the stack defect; elsewhere stock may just run
        enc, gen = by["stock", "encoder"], by["stock", "generate"]
        assert "BiasAdd" in enc.error or "Unsupported data type" in enc.error, enc.error
        assert "C++ Call Stack" not in enc.error and "\n" not in enc.error
        assert enc.median_s is None and enc.repeats == 0 and enc.reference is None
        assert gen.error.startswith("not run after failing in the encoder stage: TypeError")
        for r in rows:
            if r.variant == "all":
                assert r.reference == bench.REF_STOCK_FP32 and r.speedup_vs_stock is None
    for stage in ("encoder", "generate"):
        r = by["all", stage]
        assert r.error is None and r.repeats == 2 and r.min_s <= r.median_s <= r.max_s
    assert by["all", "encoder"].max_rel_diff < {"float16": 1e-3, "bfloat16": 8e-3}[name]  # output cast
    assert by["all", "generate"].tokens_equal is True
    assert not bench.failed(rows)
    table = bench.format_table(rows)
    if stack()["backend"] == "CPU":
        assert "FAILED" in table and "stock FAILED (encoder): TypeError" in table
        assert "equal*" in table and "* against stock float32" in table
    assert not whisper_accel.is_patched()


def test_reference_model_is_built_when_not_given():
    if stack()["backend"] != "CPU":
        pytest.skip("needs stock float16 to fail (MindSpore CPU)")
    model = _half("float16")
    rows = bench.compare(model, features(frames=FRAMES, mel=N_MELS).to(torch.float16),
                         stages=("generate",), repeats=1, max_new_tokens=4)
    stock, patched = rows
    assert stock.error and patched.reference == bench.REF_STOCK_FP32 and patched.tokens_equal is True


class _Out:
    def __init__(self, value):
        self.value, self.dtype = value, torch.float32

    def asnumpy(self):
        return np.asarray(self.value, np.float32)


class _FakeWhisper:
    """Duck-typed model: stock works; patched, the encoder raises (generate does not)."""

    dtype = torch.float32

    def __init__(self):
        self.model = types.SimpleNamespace(encoder=self._encode)

    def _encode(self, feats):
        if whisper_accel.is_patched():
            raise RuntimeError("boom\n----\n- C++ Call Stack: (For framework developers)\nx.cc:1")
        return types.SimpleNamespace(last_hidden_state=_Out([1.0, 2.0]))

    def generate(self, feats, **kw):
        return _Out([[1, 2, 3]])


def test_a_variant_that_raises_is_reported_and_not_run_again():
    lines = []
    rows = bench.compare(_FakeWhisper(), None, stages=("encoder", "generate"),
                         variants=("stock", "all"), repeats=2, progress=lines.append)
    by = {(r.variant, r.stage): r for r in rows}
    assert by["all", "encoder"].error == "RuntimeError: boom"
    assert by["all", "generate"].error == "not run after failing in the encoder stage: RuntimeError: boom"
    assert by["all", "generate"].median_s is None and by["all", "generate"].tokens_equal is None
    for stage in ("encoder", "generate"):
        stock = by["stock", stage]
        assert stock.error is None and stock.repeats == 2 and stock.reference == bench.REF_STOCK
    assert any("skipped: failed in the encoder stage" in line for line in lines)
    assert bench.failed(rows)  # a patched variant failing is a bench failure
    table = bench.format_table(rows)
    assert "all FAILED (encoder): RuntimeError: boom" in table and "*" not in table
    assert not whisper_accel.is_patched()


class _WrongWhisper(_FakeWhisper):
    """Duck-typed model whose patched arm runs but returns other tokens and another encoder
    output than stock: the comparison must say so (it is what the bench checks everything by)."""

    def _encode(self, feats):
        return types.SimpleNamespace(last_hidden_state=_Out([1.0, 2.5] if whisper_accel.is_patched() else [1.0, 2.0]))

    def generate(self, feats, **kw):
        return _Out([[1, 2, 4]] if whisper_accel.is_patched() else [[1, 2, 3]])


def test_patched_tokens_and_outputs_are_checked_against_stock():
    """``tokens_equal`` / ``max_rel_diff`` of a patched row compare it with the STOCK run: a
    patched arm that differs is flagged, the bench fails; the same model that agrees passes."""
    rows = bench.compare(_WrongWhisper(), None, stages=("encoder", "generate"),
                         variants=("stock", "all"), repeats=1)
    by = {(r.variant, r.stage): r for r in rows}
    assert by["all", "generate"].tokens_equal is False and by["all", "generate"].reference == bench.REF_STOCK
    expected = np.linalg.norm([0.0, 0.5]) / np.linalg.norm([1.0, 2.0])
    assert by["all", "encoder"].max_rel_diff == pytest.approx(expected, rel=1e-6)
    assert bench.failed(rows)
    assert "DIFFER!" in bench.format_table(rows) and "TOKEN MISMATCH vs stock" in bench.format_table(rows)

    class _RightWhisper(_WrongWhisper):
        def _encode(self, feats):
            return types.SimpleNamespace(last_hidden_state=_Out([1.0, 2.0]))

        def generate(self, feats, **kw):
            return _Out([[1, 2, 3]])

    rows = bench.compare(_RightWhisper(), None, stages=("encoder", "generate"), variants=("stock", "all"),
                         repeats=1)
    by = {(r.variant, r.stage): r for r in rows}
    assert by["all", "generate"].tokens_equal is True and by["all", "encoder"].max_rel_diff == 0.0
    assert not bench.failed(rows)
    assert not whisper_accel.is_patched()


def test_error_text_is_one_line_without_mindspore_stack():
    msg = ("\n----------\n- Kernel select failed:\n----------\nSelect CPU operator[Conv2D] fail! "
           "Unsupported data type!\nnode: @graph:CNode_1{...}\n\n----------\n"
           "- C++ Call Stack: (For framework developers)\n----------\ncpu_device_context.cc:514\n")
    assert bench.error_text(TypeError(msg)) == ("TypeError: Kernel select failed: Select CPU "
                                                "operator[Conv2D] fail! Unsupported data type!")
    assert bench.error_text(KeyError()) == "KeyError"
    assert len(bench.error_text(ValueError("x" * 1000), limit=50)) == 50
