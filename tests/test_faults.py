"""Faults never break the user: failures injected into the MindSpore / MindNLP / transformers
APIs the plugin uses, at import time and at run time, under ``WHISPER_ACCEL=1`` and with
``patch()``. Each runs an unchanged user script in a fresh interpreter: the script must work,
print stock's tokens, and the plugin must say what happened in one warning per fault. Strict
mode raises instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Injections, run after ``import mindspore, mindnlp`` and before the user's Whisper import.
INJECT = {
    # importing the plugin's graph module fails (graph decoration raises)
    "jit_decorate": """
        def jit(*a, **k):
            raise RuntimeError("injected: jit unavailable")
        mindspore.jit = jit
    """,
    # graphs build, but every compiled graph fails at its first launch
    "jit_launch": """
        real_jit = mindspore.jit
        def jit(fn=None, *a, **k):
            def failing(*args, **kwargs):
                raise RuntimeError("injected: graph launch failed")
            return failing if fn is not None else (lambda f: failing)
        mindspore.jit = jit
    """,
    # arranging the weights for the graphs fails (mindspore.mutable raises)
    "mutable": """
        def mutable(*a, **k):
            raise RuntimeError("injected: mutable unavailable")
        mindspore.mutable = mutable
    """,
    # a transformers function the compat group replaces was renamed upstream
    "renamed": """
        import transformers.modeling_utils as mu
        del mu.lazy_import_flash_attention
    """,
}

SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    caught = []
    warnings.showwarning = lambda m, c, *a, **k: caught.append(f"{c.__name__}: {m}")
    warnings.simplefilter("always")
    import mindspore, mindnlp
    import numpy as np
    exec(sys.argv[1])
    result = {"import_error": None, "generate_error": None, "tokens": None}
    try:
        from transformers import WhisperConfig, WhisperForConditionalGeneration  # the user's import
    except Exception as exc:
        chain = []
        while exc is not None:  # transformers' lazy importer re-raises what the hook raised
            chain.append(f"{type(exc).__name__}: {exc}")
            exc = exc.__cause__ or exc.__context__
        result["import_error"] = " <- ".join(chain)
        print(json.dumps(result)); sys.exit(0)
    import torch
    if sys.argv[2] == "patch":
        import whisper_accel
        whisper_accel.patch(strict=sys.argv[3] == "strict")
    MINI = dict(vocab_size=300, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, max_source_positions=64, max_target_positions=64,
                decoder_start_token_id=1, pad_token_id=0, bos_token_id=2, eos_token_id=3, init_std=0.3)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(**MINI)).eval()
    feats = torch.tensor(np.random.default_rng(1).standard_normal((1, 16, 128)).astype(np.float32))
    def run():
        with torch.no_grad():
            return model.generate(feats, max_new_tokens=8, min_new_tokens=8).asnumpy().tolist()
    try:
        result["tokens"] = run()
        result["again"] = run()  # the second call after a fault: stock, no second warning
    except Exception as exc:
        result["generate_error"] = f"{type(exc).__name__}: {exc}"
    import whisper_accel
    result["groups"] = sorted({a.split("]")[0][1:] for a in whisper_accel.status()["applied"]})
    result["report"] = (whisper_accel.status()["last_report"] or {}).get("entries", [])
    whisper_accel.unpatch()
    result["stock"] = run()
    result["warnings"] = [w for w in caught if "whisper_accel" in w]
    print(json.dumps(result))
""")


#: Settings an injection needs: a graph launch fails only where graphs run, and the host
#: executors (first when the kernels build) launch none, so the graph executors are forced.
INJECT_ENV = {"jit_launch": {"WHISPER_ACCEL_ENCODER": "fused", "WHISPER_ACCEL_DECODER": "fused"}}


def run_user_script(inject: str, mode: str = "env", strict: bool = False) -> dict:
    env = child_env()
    env["GLOG_v"] = "3"
    env.update(INJECT_ENV.get(inject, {}))
    if mode == "env":
        env["WHISPER_ACCEL"] = "1"
        if strict:
            env["WHISPER_ACCEL_STRICT"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, textwrap.dedent(INJECT[inject]), mode,
                           "strict" if strict else "lenient"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_stock_and_warned(out: dict, *needles: str) -> None:
    assert out["import_error"] is None and out["generate_error"] is None, out
    assert out["tokens"] == out["stock"] == out["again"]
    for needle in needles:
        hits = [w for w in out["warnings"] if needle in w]
        assert len(hits) == 1, (needle, out["warnings"])  # one warning, not one per call


def test_import_time_fault_under_env_activation_leaves_the_script_working():
    out = run_user_script("jit_decorate", "env")
    assert_stock_and_warned(out, "left group 'encoder' stock", "left group 'decoder' stock",
                            "left group 'greedy' stock")
    assert all("injected: jit unavailable" in w for w in out["warnings"])
    assert "attention" in out["groups"] and not {"encoder", "decoder"} & set(out["groups"])


def test_run_time_fault_under_env_activation_falls_back_to_stock():
    out = run_user_script("jit_launch", "env")
    assert {"encoder", "decoder", "greedy"} <= set(out["groups"])
    assert_stock_and_warned(out, "injected: graph launch failed")
    assert "runs stock Whisper code from now on" in out["warnings"][0]


@pytest.mark.slow
def test_run_time_fault_with_patch_falls_back_to_stock():
    out = run_user_script("jit_launch", "patch")
    assert_stock_and_warned(out, "injected: graph launch failed")


@pytest.mark.slow
def test_weight_arrangement_fault_falls_back_to_stock():
    out = run_user_script("mutable", "patch")
    assert_stock_and_warned(out, "injected: mutable unavailable")


@pytest.mark.slow
def test_renamed_upstream_target_skips_its_group_naming_it():
    out = run_user_script("renamed", "env")
    assert out["import_error"] is None and out["generate_error"] is None
    assert out["tokens"] == out["stock"]
    assert "compat" not in out["groups"] and {"encoder", "decoder"} <= set(out["groups"])
    compat = [e for e in out["report"] if e["group"] == "compat"]
    assert compat and "lazy_import_flash_attention does not exist" in compat[0]["reason"]


@pytest.mark.slow
def test_strict_env_activation_raises_at_the_users_import():
    out = run_user_script("jit_decorate", "env", strict=True)
    assert out["import_error"] and "WhisperAccelError" in out["import_error"]
    assert "injected: jit unavailable" in out["import_error"]


@pytest.mark.slow
def test_strict_patch_raises_at_run_time():
    out = run_user_script("jit_launch", "patch", strict=True)
    assert out["generate_error"] and "WhisperAccelError" in out["generate_error"]
    assert "injected: graph launch failed" in out["generate_error"]
