"""The ``whisper_accel.pth`` start-up hook as a user gets it: ``pip install`` of this project
into a FRESH virtual environment, then ``WHISPER_ACCEL=1 python -c ...`` runs patched with no
code change (and without the variable, the plugin is not even imported).

The fresh venv sees the test venv's packages (MindSpore, MindNLP, ...) through a ``.pth`` line, so
nothing is downloaded; only this project is built and installed into it (``--no-deps``)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(600)]

PROBE = """
import json, sys
at_start = "whisper_accel" in sys.modules
import mindnlp
from transformers.models.whisper import modeling_whisper  # noqa: F401  (the hook patches on this import)
import whisper_accel
print(json.dumps({"imported_at_start": at_start, "patched": whisper_accel.is_patched(),
                  "file": whisper_accel.__file__}))
"""


def _run(cmd, timeout, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("pth_hook")
    src = base / "src"  # build from a copy: no build/ or egg-info in the shared working tree
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "whisper_accel.pth"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "whisper_accel", src / "whisper_accel",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], 180)
    python = venv / "bin" / "python"
    target = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60).stdout.strip()
    # the test venv's packages, after the fresh venv's own site-packages (where this project goes)
    Path(target, "zz_test_stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = child_env(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
         420, env=env, cwd=str(base))
    assert Path(target, "whisper_accel.pth").is_file(), "pip install did not put the hook in site-packages"
    return python, target


def _probe(python, target, **extra):
    env = child_env(GLOG_v="3", **extra)
    env.pop("PYTHONPATH", None)  # a user's shell: the package comes from the venv, not a checkout
    proc = _run([str(python), "-c", PROBE], 240, env=env, cwd="/")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert os.path.realpath(out["file"]).startswith(os.path.realpath(target)), out["file"]  # the fresh install
    return out


def test_whisper_accel_1_patches_in_a_fresh_venv(fresh_venv):
    out = _probe(*fresh_venv, WHISPER_ACCEL="1")
    assert out["imported_at_start"] is True and out["patched"] is True


def test_without_the_variable_the_fresh_venv_stays_stock(fresh_venv):
    out = _probe(*fresh_venv)
    assert out["imported_at_start"] is False and out["patched"] is False
