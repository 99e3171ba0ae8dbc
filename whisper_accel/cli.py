"""``whisper-accel`` (also ``python -m whisper_accel``).

* ``bench``  -- A/B table of stock vs patched variants on the built-in default or a local model.
* ``ab``     -- run a script alternately stock and patched; time, ratio, stdout equality, and
  the patched run's fast-path / stock calls with reasons.
* ``run``    -- run any command with activation on (like ``ddtrace-run``); ``--stats`` prints
  the fast-path / stock calls with reasons at exit.
* ``doctor`` -- versions, backend, probes, and what would be patched and why not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from . import auto
from .runtime import calls


def _command(args: List[str]) -> List[str]:
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SystemExit("whisper-accel: give a command after --, e.g. -- python script.py")
    return args


def hook_installed() -> bool:
    """Is ``whisper_accel.pth`` (what reads ``WHISPER_ACCEL`` at start-up) in a site-packages of
    this interpreter? An editable install (``pip install -e``) does not put it there."""
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    return any(os.path.isfile(os.path.join(d, "whisper_accel.pth")) for d in dirs)


def _check_hook() -> None:
    if not hook_installed():
        print("whisper-accel: the activation hook whisper_accel.pth is not installed in this "
              "interpreter's site-packages (an editable `pip install -e` leaves it out), so "
              "WHISPER_ACCEL has no effect and the command runs stock. Install with "
              "`pip install -c constraints.txt .` (not -e).", file=sys.stderr)


def cmd_run(ns) -> int:
    _check_hook()
    env = dict(os.environ)
    env[auto.ENV] = ns.groups
    if ns.stats:
        env[auto.ENV_STATS] = "1"
    try:
        return subprocess.call(_command(ns.command), env=env)
    except FileNotFoundError as exc:
        print(f"whisper-accel run: {exc}", file=sys.stderr)
        return 127


def cmd_ab(ns) -> int:
    command = _command(ns.command)
    _check_hook()
    arms = {"stock": "0", "patched": ns.groups}
    times = {a: [] for a in arms}
    outputs = {a: [] for a in arms}
    codes = {a: [] for a in arms}
    counts = None
    for r in range(ns.repeats):
        for arm, value in arms.items():
            env = dict(os.environ, **{auto.ENV: value})
            stats_file = None
            if arm == "patched" and r == ns.repeats - 1:  # the last patched run reports its calls
                fd, stats_file = tempfile.mkstemp(prefix="whisper_accel_calls_", suffix=".json")
                os.close(fd)
                env[auto.ENV_STATS] = stats_file
            t0 = time.perf_counter()
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            times[arm].append(time.perf_counter() - t0)
            if stats_file:
                counts = _read_counts(stats_file)
            outputs[arm].append(proc.stdout)
            codes[arm].append(proc.returncode)
            print(f"[{r + 1}/{ns.repeats}] {arm:<8} {times[arm][-1]:8.2f} s  exit {proc.returncode}",
                  file=sys.stderr, flush=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-2000:])
    med = {a: statistics.median(t) for a, t in times.items()}
    same = len(set(outputs["stock"] + outputs["patched"])) == 1
    result = {"command": command, "repeats": ns.repeats,
              "stock": {"median_s": med["stock"], "runs_s": times["stock"], "exit_codes": codes["stock"]},
              "patched": {"median_s": med["patched"], "runs_s": times["patched"],
                          "exit_codes": codes["patched"]},
              "speedup": med["stock"] / med["patched"] if med["patched"] else None,
              "stdout_equal": same, "patched_calls": counts}
    print(f"{'arm':<9}{'median s':>10}{'min s':>9}{'max s':>9}")
    for a in arms:
        print(f"{a:<9}{med[a]:>10.2f}{min(times[a]):>9.2f}{max(times[a]):>9.2f}")
    print(f"speed-up {result['speedup']:.2f}x; stdout "
          + ("identical in every run" if same else "DIFFERS between runs or arms!"))
    if counts is not None:
        print(calls.format_table(counts))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
    failed = any(c != 0 for cs in codes.values() for c in cs)
    return 1 if failed or not same else 0


def _read_counts(path: str):
    """The call counts a patched run wrote at exit (None when it wrote none: e.g. it crashed)."""
    try:
        with open(path) as f:
            text = f.read()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def cmd_bench(ns) -> int:
    from .bench_cli import run_bench

    return run_bench(ns)


def cmd_doctor(ns) -> int:
    from .doctor import doctor

    return doctor(json_out=ns.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="whisper-accel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="A/B benchmark table (stock vs patched)")
    b.add_argument("--config", default="tiny", help="built-in random-weight dimensions: "
                   "tiny|base|small|medium|large-v3|large-v3-turbo|distil-large-v3 (default tiny)")
    b.add_argument("--encoder-layers", type=int, metavar="N",
                   help="with --config: build N encoder layers instead of the config's")
    b.add_argument("--decoder-layers", type=int, metavar="N",
                   help="with --config: build N decoder layers instead of the config's")
    b.add_argument("--model", help="local Hugging Face Whisper folder (instead of --config)")
    b.add_argument("--audio", help="audio file (WAV, or any format ffmpeg reads)")
    b.add_argument("--stage", default="encoder,generate",
                   help="comma list of encoder|generate|transcribe (default encoder,generate)")
    b.add_argument("--max-new-tokens", type=int, default=16)
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype; where stock cannot run it (float16/bfloat16 on CPU) the stock "
                   "row says FAILED and the others are checked against stock float32")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--variants", default="stock,all",
                   help="comma list of stock, all, or group names (default stock,all)")
    b.add_argument("--json", help="write the results as JSON to this path")
    b.add_argument("--profile", help="write a MindSpore profiler trace of the patched run here")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=cmd_bench)

    for name, fn, helptext in (("run", cmd_run, "run a command with whisper_accel active"),
                               ("ab", cmd_ab, "run a command stock and patched, alternately")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--groups", default="1",
                       help="value for WHISPER_ACCEL in the patched run (default 1 = all)")
        if name == "run":
            s.add_argument("--stats", action="store_true",
                           help="print, at exit, fast-path and stock calls per entry point and why")
        if name == "ab":
            s.add_argument("--repeats", type=int, default=3)
            s.add_argument("--json", help="write the results as JSON to this path")
        s.add_argument("command", nargs=argparse.REMAINDER, help="-- command args...")
        s.set_defaults(fn=fn)

    d = sub.add_parser("doctor", help="explain the stack and what would be patched")
    d.add_argument("--json", action="store_true", help="print JSON instead of text")
    d.set_defaults(fn=cmd_doctor)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.fn(ns)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
