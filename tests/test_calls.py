"""Fast-path / stock call counts with reasons (runtime/calls.py): what a user reads in
``status()["calls"]``, ``whisper-accel run --stats`` and ``whisper-accel ab`` to learn why a
script is not faster."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import whisper_accel
from conftest import child_env, features, mini_model
from whisper_accel.runtime import calls


@pytest.fixture(autouse=True)
def _fresh_counts():
    calls.reset()
    yield
    calls.reset()


def test_counts_reasons_and_one_log_line_per_reason(caplog):
    caplog.set_level(logging.INFO, logger="whisper_accel")
    calls.fast("greedy loop")
    calls.fast("greedy loop")
    calls.stock("greedy loop", "do_sample=True")
    calls.stock("greedy loop", "do_sample=True")
    calls.stock("greedy loop", "a streamer is attached")
    calls.stock("encoder", "head_mask is set")
    assert calls.snapshot() == {
        "encoder": {"fast": 0, "stock": 1, "reasons": {"head_mask is set": 1}},
        "greedy loop": {"fast": 2, "stock": 3,
                        "reasons": {"do_sample=True": 2, "a streamer is attached": 1}},
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "whisper_accel"]
    assert len(lines) == 3  # the first stock call of each (entry, reason) only
    assert "greedy loop ran stock code: do_sample=True" in lines[0]
    table = calls.format_table(calls.snapshot())
    assert "stock x2: do_sample=True" in table and "greedy loop" in table
    calls.reset()
    assert calls.snapshot() == {}
    assert "no patched Whisper entry point" in calls.format_table({})


def test_report_at_exit_writes_json_or_prints(tmp_path, capsys):
    calls.stock("beam search loop", "synced_gpus=True")
    path = tmp_path / "calls.json"
    calls.report_at_exit(str(path))
    assert json.loads(path.read_text())["beam search loop"]["reasons"] == {"synced_gpus=True": 1}
    calls.report_at_exit("1")
    assert "beam search loop" in capsys.readouterr().err
    calls.report_at_exit(str(tmp_path / "missing" / "dir" / "x.json"))  # never raises
    assert "could not write call counts" in capsys.readouterr().err


def test_status_counts_what_a_patched_model_ran():
    """A real patched model: greedy, sampled, beam and streamed calls, all on the fast path and
    counted (the reasons of stock calls: the test below)."""
    model, feats = mini_model(), features(1, frames=128, mel=16)  # imports mindnlp: torch is mindtorch
    import torch

    class Streamer:
        def put(self, value):
            pass

        def end(self):
            pass

    whisper_accel.patch()
    with torch.no_grad():
        model.generate(feats, max_new_tokens=3)
        model.generate(feats, max_new_tokens=3, temperature=0.7)
        model.generate(feats, max_new_tokens=3, num_beams=2)
        model.generate(feats, max_new_tokens=3, streamer=Streamer())
    got = whisper_accel.status()["calls"]
    assert got["greedy loop"] == {"fast": 3, "stock": 0, "reasons": {}}
    assert got["beam search loop"] == {"fast": 1, "stock": 0, "reasons": {}}
    assert got["encoder"]["fast"] == 4 and got["encoder"]["stock"] == 0
    # the loops' first steps (the prompt) go through the patched forward
    assert got.get("decoder step", {"stock": 0})["stock"] == 0


def test_unsupported_model_options_are_counted_with_their_reason():
    model, feats = mini_model(), features(1, frames=128, mel=16)  # imports mindnlp: torch is mindtorch
    import torch

    whisper_accel.patch()
    with torch.no_grad():
        model.model.encoder(feats, head_mask=torch.ones(2, 4))
        model.model.encoder(feats, output_attentions=True)
    reasons = whisper_accel.status()["calls"]["encoder"]["reasons"]
    assert reasons == {"head_mask is set": 1, "output_attentions / output_hidden_states": 1}


def test_a_fault_is_counted_and_then_the_model_stays_stock(monkeypatch, caplog):
    """Every executor of the decoder engine fails its greedy step: host and fused are this
    engine's faults (logged, not warned) and the next one runs the call; only the last one's
    (plain) failure turns the model to stock code, with one WhisperAccelWarning, counted."""
    model, feats = mini_model(seed=3), features(1, frames=128, mel=16)
    import torch

    from whisper_accel.runtime import native
    from whisper_accel.runtime.binding import ATTR
    from whisper_accel.runtime.executors.graph import GraphDecoder
    from whisper_accel.runtime.executors.host import HostDecoder

    with torch.no_grad():
        stock = model.generate(feats, max_new_tokens=3).asnumpy()  # unpatched
    whisper_accel.patch()

    def broken(self, *a, **k):
        raise RuntimeError(f"injected {self.name} launch failure")

    for executor in (HostDecoder, GraphDecoder):  # GraphDecoder: the fused and the plain step graphs
        monkeypatch.setattr(executor, "decode_next", broken)
    caplog.set_level(logging.WARNING, logger="whisper_accel")
    with pytest.warns(whisper_accel.WhisperAccelWarning, match="injected plain launch failure"):
        with torch.no_grad():
            first = model.generate(feats, max_new_tokens=3).asnumpy()
    assert model.__dict__[ATTR] is False  # stock from now on for this model
    logged = [r.getMessage() for r in caplog.records if "falls back to the next executor" in r.getMessage()]
    faulted = ("host", "fused") if native.state()["library"] else ()  # without kernels: unavailable, not faults
    assert len(logged) == len(faulted) and all(f"the {n} executor failed" in m for n, m in zip(faulted, logged)), logged
    with torch.no_grad():
        second = model.generate(feats, max_new_tokens=3).asnumpy()
    # the run that hit the fault (finished by stock code) and the one after it (stock loop): stock's ids
    np.testing.assert_array_equal(first, stock)
    np.testing.assert_array_equal(second, stock)
    reasons = whisper_accel.status()["calls"]["greedy loop"]["reasons"]
    assert len(reasons) == 2
    assert any("injected plain launch failure" in r for r in reasons)
    assert any("after an earlier fault" in r for r in reasons)


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_stats_prints_the_counts_at_exit():
    """``whisper-accel run --stats``: the child process prints its counts to stderr at exit."""
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from conftest import mini_model, features\n"
              "m = mini_model()\n"
              "import torch\n"
              "with torch.no_grad(): m.generate(features(1, frames=128, mel=16), max_new_tokens=2)\n"
              % os.path.dirname(__file__))
    env = child_env(GLOG_v="3")
    proc = subprocess.run([sys.executable, "-m", "whisper_accel", "run", "--stats", "--", sys.executable, "-c",
                           script], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "whisper_accel entry point" in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("greedy loop")][0]
    assert line.split()[-2:] == ["1", "0"]  # fast 1, stock 0
