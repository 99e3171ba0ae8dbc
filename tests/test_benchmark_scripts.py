"""The benchmark scripts' own bookkeeping, where a wrong count would misstate a result."""

import json
import os
import subprocess
import sys

import pytest

from conftest import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(480)
def test_seed_scale_counts_the_windows_long_form_decodes():
    """``seed_scale.py`` divides generate's time by the windows long-form decoded. With random
    weights and 4 forced tokens a segment's last timestamp ends early, so the seek moves by less
    than 30 s and a 70 s clip takes more windows than ceil(70 / 30) = 3: the count must come from
    the encoder calls of the timed call (it used to be the ceiling, which put encoder time into
    "decode per window")."""
    env = child_env()
    env["GLOG_v"] = "3"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "seed_scale.py"), "--arm", "patched", "--config", "tiny",
           "--dtype", "float32", "--seconds", "70", "--tokens", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["windows"] == out["encoder_calls"] > 3
    gen = out["generate_s"]
    per_window = (gen - out["windows"] * out["encoder_window_s"]) / out["windows"]
    assert out["decode_per_window_s"] == pytest.approx(per_window)


def test_encoder_products_arm_runs_every_matrix_product(monkeypatch):
    """``encoder.py --products`` times the encoder's matrix products alone: the two convolutions,
    per layer the four attention projections, two products per head and the two feed-forward
    layers, at the config's shapes."""
    import importlib.util
    from types import SimpleNamespace

    import numpy as np

    spec = importlib.util.spec_from_file_location("encoder_bench", os.path.join(ROOT, "benchmarks", "encoder.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = SimpleNamespace(d_model=64, encoder_ffn_dim=128, encoder_attention_heads=4, num_mel_bins=16, encoder_layers=3)
    calls, matmul = [], np.matmul

    def counted(a, b, out):
        calls.append((a.shape, b.shape))
        return matmul(a, b, out=out)

    run = bench.matrix_products(cfg, batch=2)
    monkeypatch.setattr(bench.np, "matmul", counted)
    run(None)
    assert calls[:2] == [((6000, 48), (48, 64)), ((3000, 192), (192, 64))]
    per_layer = 4 + 2 * 2 * 4 + 2  # projections, (scores, weighted sum) per audio and head, fc1 and fc2
    assert len(calls) == 2 + 3 * per_layer
    layer = calls[2:2 + per_layer]
    assert layer[:4] == [((3000, 64), (64, 64))] * 4
    assert layer[4:6] == [((1500, 16), (16, 1500)), ((1500, 1500), (1500, 16))]
    assert layer[-2:] == [((3000, 64), (64, 128)), ((3000, 128), (128, 64))]


def _encoder_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("encoder_bench", os.path.join(ROOT, "benchmarks", "encoder.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_encoder_arms_are_configs_and_the_worker_gets_isa():
    """``encoder.py``'s arms are Config objects over the environment's (no module globals), one
    per executor plus ``auto`` (what ``patch()`` runs); ``--isa`` reaches every arm and the
    worker's command line."""
    from whisper_accel.config import Config

    bench = _encoder_bench()
    configs = bench.arm_configs(Config(isa="avx2", group_bytes=123))
    assert list(configs) == ["plain", "fused, 1 layer a launch", "fused", "host", "auto"]
    assert {n: c.encoder for n, c in configs.items()} == {
        "plain": "plain", "fused, 1 layer a launch": "fused", "fused": "fused", "host": "host", "auto": "auto"}
    assert all(c.isa == "avx2" for c in configs.values())
    assert configs["fused, 1 layer a launch"].group_bytes == 0 and configs["fused"].group_bytes == 123
    assert configs["auto"].measure and bench.AUTO == "auto"
    a = bench.parser().parse_args(["--config", "base", "--isa", "avx2", "--fresh-verdict", "--layers", "2"])
    forwarded = bench._forwarded(a)
    assert forwarded[forwarded.index("--isa") + 1] == "avx2" and "--fresh-verdict" in forwarded
    assert forwarded[forwarded.index("--layers") + 1] == "2"
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--isa", "sse2"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_encoder_worker_runs_every_arm_on_the_forced_isa(fused_library, tmp_path):
    """The MindNLP worker on a 1-layer tiny encoder with the narrowest kernel variant this CPU
    runs forced: each forced arm ran its executor, the auto arm measured (an empty verdict cache)
    and ran its verdict, the graphs were bound to the forced variant, outputs agree."""
    from whisper_accel.kernels import isa
    from whisper_accel.runtime import choice

    forced = isa.runnable(isa.cpu())[-1].name
    env = child_env()
    env["GLOG_v"] = "3"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "encoder.py"), "--worker", "mindnlp", "--folder",
           str(tmp_path), "--config", "tiny", "--layers", "1", "--repeats", "1", "--no-stock", "--isa", forced,
           "--fresh-verdict"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fused_kernels"]["isa"] == forced and out["graphs_bound"] == out["fused_kernels"]["library"]
    arms = out["arms"]
    assert {n: arms[n]["executor"] for n in ("plain", "fused, 1 layer a launch", "fused", "host")} == {
        "plain": "plain", "fused, 1 layer a launch": "fused", "fused": "fused", "host": "host"}
    assert arms["fused, 1 layer a launch"]["layers_per_launch"] == 1 and arms["host"]["layers_per_launch"] is None
    verdict = arms["auto"]["verdict"]
    assert verdict["source"].startswith("measured") and set(verdict["seconds"]) == {"host", "fused"}
    timed = choice.SHORT_RUNS if min(verdict["seconds"].values()) < choice.SHORT_S else 1
    # after the first call (the rule's fused): host's warm-up, then the timed calls round-robin
    assert arms["auto"]["executor"] == verdict["executor"] and len(out["auto_measuring_s"]) == 1 + 2 * timed
    assert all(not r["faults"] for r in arms.values())
    assert all(r["rel_diff_vs_stock"] < 1e-5 for r in arms.values())  # against the plain arm (no stock)


def test_assisted_benchmark_assistant_computes_the_main_models_logits():
    """benchmarks/assisted.py's premise: the main model's layers past the assistant's add
    nothing, so the decoder-only assistant (its first layers, embeddings, norm and projection)
    gives the main model's logits, and its candidates are the main model's tokens."""
    import importlib.util

    import mindnlp  # noqa: F401  (mindtorch as torch, before torch is imported)
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("assisted_bench", os.path.join(ROOT, "benchmarks", "assisted.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    main, helper = bench.build_pair(dict(d_model=64, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=128), 1)
    ids = torch.tensor([[50258, 50259, 50359, 50363, 440, 1029]])
    with torch.no_grad():
        hidden = torch.tensor(np.random.default_rng(0).normal(0, 1, (1, 1500, 64)).astype(np.float32))
        want = main(decoder_input_ids=ids, encoder_outputs=(hidden,), use_cache=False).logits.asnumpy()
        got = helper(input_ids=ids, encoder_outputs=(hidden,), use_cache=False).logits.asnumpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(got.argmax(-1), want.argmax(-1))


def test_anchor_rounds_alternate_and_ratios_are_per_round(monkeypatch, capsys):
    """``vs_pytorch.py`` cannot interleave faster-whisper call by call (another interpreter), so
    it runs rounds in ABBA order and takes each ratio as the median of the rounds' own ratios:
    a drift of the machine between rounds must not land on one arm only."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import vs_pytorch

    calls, speed = [], iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # the machine slows down call by call

    def ours(a):
        t = next(speed)
        calls.append("ours")
        rows = [{"mode": "greedy", "patched_median_s": 0.9 * t, "pytorch_median_s": 1.8 * t,
                 "patched_vs_pytorch": 0.5, "equal_to_pytorch": True, "patched_first_s": 2.0,
                 "pytorch_first_s": 3.0}]
        return {"clip7.wav": {"audio": "clip7.wav", "rows": rows}}

    def faster(a):
        t = next(speed)
        calls.append("faster")
        return {"faster_whisper": "x", "rows": {"speech/greedy/float32": {"median_s": t, "first_s": t, "text": ""}}}

    monkeypatch.setattr(vs_pytorch, "clip_rows", ours)
    monkeypatch.setattr(vs_pytorch, "faster_rows", faster)
    monkeypatch.setattr(sys, "argv", ["vs_pytorch.py", "--anchors-only", "--model", "m", "--speech", "clip7.wav",
                                      "--ct2", "c", "--faster-whisper", "py", "--rounds", "3", "--repeats", "1"])
    assert vs_pytorch.main() == 0
    assert calls == ["ours", "faster", "faster", "ours", "ours", "faster"]
    out = capsys.readouterr().out
    assert "over 3 round(s)" in out
    # Rounds: ours 0.9 / faster 2 = 0.45, faster 3 then ours 3.6 = 1.2, ours 4.5 / faster 6 = 0.75.
    # Their median is 0.75x; the ratio of the medians (3.6 / 3) would say 1.2x.
    assert "| 3.60 s (2.00 s) |" in out and "0.75x (0.45-1.20)" in out


def test_precision_benchmark_counts_word_errors_and_token_agreement(monkeypatch):
    """``precision.py``'s measures of what bfloat16 changes: word edits (substitution, insertion,
    deletion; case and punctuation ignored) and the share of equal token positions."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import precision

    assert precision.word_errors(" The quick brown fox.", "the quick brown fox") == (0, 4)
    assert precision.word_errors("the quick round fox jumps", "the quick brown fox") == (2, 4)  # 1 sub, 1 ins
    assert precision.word_errors("quick brown", "the quick brown fox") == (2, 4)  # 2 deletions
    assert precision.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert precision.token_agreement([1, 2, 3], [1, 2, 3, 5, 6]) == 0.6
    assert precision.token_agreement([], []) == 1.0


def test_first_call_benchmark_alternates_fresh_processes_and_takes_medians(monkeypatch, capsys, tmp_path):
    """``first_call.py``: one untimed child per arm first (warm caches), then rounds whose arm
    order reverses every round; each step's figure is the median over the rounds."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import first_call
    import vs_pytorch

    calls = []

    def child(arm, model, audio):
        calls.append(arm)
        n = calls.count(arm)  # 1: the untimed warm-up
        base = {"patched": 1.0, "pytorch": 2.0}[arm]
        return {"import_s": base, "load_s": base, "first_s": base * n, "second_s": base / 2,
                "text": " hello", "same_again": True}

    monkeypatch.setattr(first_call, "child", child)
    monkeypatch.setattr(vs_pytorch, "cpu_name", lambda: "test cpu")
    out_json = tmp_path / "first.json"
    monkeypatch.setattr(sys, "argv", ["first_call.py", "--model", "m", "--audio", "a.wav", "--arms", "patched,pytorch",
                                      "--rounds", "3", "--json", str(out_json)])
    assert first_call.main() == 0
    assert calls == ["patched", "pytorch", "patched", "pytorch", "pytorch", "patched", "patched", "pytorch"]
    data = json.loads(out_json.read_text())
    # timed first calls: patched 2, 3, 4 -> median 3; pytorch 4, 6, 8 -> 6
    assert data["arms"]["patched"]["first_s"] == 3.0 and data["arms"]["pytorch"]["first_s"] == 6.0
    assert data["arms"]["patched"]["first_s_range"] == [2.0, 4.0] and data["arms"]["patched"]["runs"] == 3
    assert "patched / pytorch: first call 0.50x" in capsys.readouterr().out
