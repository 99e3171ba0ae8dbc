"""The whisper-accel command and the examples, run as a user would (subprocesses)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env, stack

# every test here runs the CLI or an example as a user would; several CLI runs a test
pytestmark = [pytest.mark.subprocess, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
ENV = child_env(GLOG_v="3")


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "whisper_accel", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, **kw)


def test_bench_prints_table_and_writes_schema_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench", "--repeats", "1", "--max-new-tokens", "2", "--stage", "encoder,generate",
               "--variants", "stock,attention,all", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup" in proc.stdout and "encoder" in proc.stdout
    assert "[1/1]" in proc.stderr  # progress display
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("mindspore", "mindnlp", "transformers", "backend", "threads", "model"):
        assert key in env
    assert env["mindnlp"] == stack()["mindnlp"] and env["backend"] == stack()["backend"]
    rows = data["rows"]
    assert {(r["variant"], r["stage"]) for r in rows} == {
        (v, s) for v in ("stock", "attention", "all") for s in ("encoder", "generate")}
    for r in rows:
        for key in ("variant", "stage", "median_s", "min_s", "max_s", "repeats",
                    "speedup_vs_stock", "tokens_equal", "max_rel_diff"):
            assert key in r
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
        if r["stage"] == "generate":
            assert r["tokens_equal"] is True
        else:
            assert r["max_rel_diff"] < 1e-4
    assert [r["applied"] for r in rows if r["variant"] == "attention"][0] == "attention"


def test_bench_rejects_bad_arguments():
    proc = cli("bench", "--variants", "stock,turbo", "--repeats", "1")
    assert proc.returncode != 0 and "unknown variant 'turbo'" in proc.stderr
    proc = cli("bench", "--model", "/nonexistent/model")
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    proc = cli("bench", "--config", "huge")
    assert proc.returncode != 0 and "unknown --config 'huge'" in proc.stderr
    assert "large-v3-turbo" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("bench", "--model", "/nonexistent/model", "--encoder-layers", "1")
    assert proc.returncode != 0 and "--encoder-layers needs --config" in proc.stderr


def test_bench_help_lists_every_built_in_config():
    from whisper_accel.models import CONFIGS

    proc = cli("bench", "--help")
    assert proc.returncode == 0
    text = "".join(proc.stdout.split())  # argparse wraps lines at hyphens
    for name in CONFIGS:
        assert name in text, name


def test_bench_half_precision_reports_stock_failed_and_checks_patched(tmp_path):
    """Stock MindNLP cannot run a float16 Whisper on CPU: the bench says so and goes on."""
    out = tmp_path / "bench.json"
    proc = cli("bench", "--config", "tiny", "--encoder-layers", "1", "--decoder-layers", "2",
               "--dtype", "float16", "--repeats", "1", "--max-new-tokens", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "encoder layers 1, decoder layers 2" in data["environment"]["model"]
    assert data["environment"]["dtype"] == "float16"
    rows = {(r["variant"], r["stage"]): r for r in data["rows"]}
    for stage in ("encoder", "generate"):
        patched = rows["all", stage]
        assert patched["error"] is None and patched["median_s"] > 0
        if stack()["backend"] == "CPU":
            assert rows["stock", stage]["error"] and rows["stock", stage]["median_s"] is None
            assert patched["reference"] == "stock float32" and patched["speedup_vs_stock"] is None
    assert rows["all", "generate"]["tokens_equal"] is True
    assert rows["all", "encoder"]["max_rel_diff"] < 1e-3
    if stack()["backend"] == "CPU":
        assert "FAILED" in proc.stdout and "* against stock float32" in proc.stdout
        assert "stock FAILED (encoder): TypeError" in proc.stdout


def test_doctor_explains_the_stack():
    proc = cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert f"mindnlp       {stack()['mindnlp']}" in proc.stdout
    assert "+ attention: would apply" in proc.stdout
    if stack()["native_conv1d"]:
        assert "+ conv1d: would apply" in proc.stdout
    else:
        assert "- conv1d: would NOT apply" in proc.stdout and "Conv1DExt" in proc.stdout
    assert "probe cache   " + os.environ["WHISPER_ACCEL_CACHE_DIR"] in proc.stdout  # not the user's
    # both GEMMs named: numpy's BLAS with its core type (host executors), MindSpore's (graphs)
    assert "host GEMM     " in proc.stdout and "graph GEMM    MindSpore's CPU MatMul" in proc.stdout
    data = json.loads(cli("doctor", "--json").stdout)
    assert data["groups"]["attention"]["would_apply"] is True
    assert data["gemm"] and "MindSpore" in data["graph_gemm"]
    forced = subprocess.run([sys.executable, "-m", "whisper_accel", "doctor", "--json"], capture_output=True,
                            text=True, timeout=300, env={**ENV, "OPENBLAS_CORETYPE": "Prescott"})
    assert "OPENBLAS_CORETYPE=Prescott forces that core type" in json.loads(forced.stdout)["gemm"]
    assert data["probe_cache"]["enabled"] and data["probe_cache"]["sources"] == {
        name: "from the cache" for name in data["capabilities"]}  # the first doctor stored them


def test_run_passes_exit_code_and_sets_the_variable():
    proc = cli("run", "--", sys.executable, "-c",
               "import os, sys; print(os.environ['WHISPER_ACCEL']); sys.exit(3)")
    assert proc.returncode == 3 and proc.stdout.strip() == "1"
    proc = cli("run", "--groups", "attention", "--", sys.executable, "-c",
               "import os; print(os.environ['WHISPER_ACCEL'])")
    assert proc.stdout.strip() == "attention"


@pytest.mark.slow
def test_ab_on_the_plain_example(tmp_path):
    out = tmp_path / "ab.json"
    proc = cli("ab", "--repeats", "1", "--json", str(out), "--", sys.executable,
               str(ROOT / "examples" / "plain_whisper.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["stdout_equal"] is True
    assert data["stock"]["exit_codes"] == [0] and data["patched"]["exit_codes"] == [0]
    assert "whisper_accel active: True" not in proc.stdout  # stderr only, stdout compares tokens
    counts = data["patched_calls"]  # the last patched run's fast-path / stock calls
    assert counts["encoder"]["fast"] >= 1 and "whisper_accel entry point" in proc.stdout


def _last_line(text):
    return text.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_line_patch_example_prints_stocks_tokens():
    """examples/one_line_patch.py patches and generates 16 tokens on the built-in model: it
    prints a report that applied groups, and the same token ids as the same script without
    its one line (stock)."""
    path = ROOT / "examples" / "one_line_patch.py"
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=280, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout.split("generate:")[0]
    assert "patch(es) applied" in report and "+ [attention]" in report and "+ [greedy]" in report
    source = path.read_text()
    assert "print(whisper_accel.patch())" in source
    stock_src = source.replace("print(whisper_accel.patch())", "assert not whisper_accel.is_patched()")
    stock = subprocess.run([sys.executable, "-c", stock_src], capture_output=True, text=True, timeout=280,
                           env=ENV, cwd=str(ROOT / "examples"))
    assert stock.returncode == 0, stock.stderr[-3000:]
    tokens, stock_tokens = json.loads(_last_line(proc.stdout)), json.loads(_last_line(stock.stdout))
    assert len(tokens[0]) >= 16 and tokens == stock_tokens


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ab_compare_example_reports_equal_tokens():
    """examples/ab_compare.py runs stock and patched interleaved and exits 0 only when tokens are
    equal: its table must show the patched generate row equal to stock, the encoder within 1e-4."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ab_compare.py")],
                          capture_output=True, text=True, timeout=540, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = {tuple(line.split()[:2]): line.split() for line in proc.stdout.splitlines()
            if line.split()[:1] in (["encoder"], ["generate"])}
    assert {("encoder", "stock"), ("encoder", "all"), ("generate", "stock"), ("generate", "all")} <= set(rows)
    assert "equal" in rows["generate", "all"] and "DIFFER!" not in proc.stdout
    diff = [float(x) for x in rows["encoder", "all"] if "e-" in x or x == "0.0e+00"]
    assert diff and diff[0] < 1e-4, rows["encoder", "all"]


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_env_activation_example():
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "env_activation.sh")], capture_output=True,
                          text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [block.strip().splitlines()[-1] for block in proc.stdout.split("==")[1:]]
    assert len(runs) == 3 and len(set(runs)) == 1, proc.stdout  # same tokens stock and patched
    assert proc.stderr.count("whisper_accel active: True") == 2


@pytest.mark.slow
def test_bench_profile_writes_a_mindspore_trace(tmp_path):
    out = tmp_path / "trace"
    proc = cli("bench", "--repeats", "1", "--max-new-tokens", "2", "--stage", "encoder",
               "--profile", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profiler trace of the patched run" in proc.stderr
    assert any(out.iterdir()), "the profiler wrote nothing"


def test_run_warns_when_the_activation_hook_is_not_installed(monkeypatch, capsys):
    """An editable install has no whisper_accel.pth: `run` must say so, not silently run stock."""
    from whisper_accel import cli as cli_module

    assert cli_module.hook_installed()  # the suite runs on a regular install
    monkeypatch.setattr(cli_module, "hook_installed", lambda: False)
    assert cli_module.main(["run", "--", sys.executable, "-c", "pass"]) == 0
    assert "whisper_accel.pth is not installed" in capsys.readouterr().err
