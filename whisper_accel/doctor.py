"""``whisper-accel doctor``: the stack, the backend, the probes, and each group's verdict."""

from __future__ import annotations

import json
import os
import platform
import sys

from . import _api, _environment
from . import config as _config
from ._errors import Unsupported
from .groups import NAMES


def host_gemm() -> str:
    """The BLAS behind numpy's matrix products (the host executors' GEMM), with its core type
    where OpenBLAS reports one, and ``OPENBLAS_CORETYPE`` when the environment forces it."""
    try:
        from threadpoolctl import threadpool_info

        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if blas:
            b = blas[0]
            text = f"{b.get('internal_api')} {b.get('version')} ({b.get('architecture') or 'unknown core'})"
        else:
            text = "unknown BLAS"
    except Exception:  # noqa: BLE001  threadpoolctl absent: numpy's build info only
        import numpy as np

        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            text = f"{blas.get('name')} {blas.get('version')} (numpy {np.__version__}; core type unknown)"
        except Exception:  # noqa: BLE001
            text = f"numpy {np.__version__} BLAS"
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return text + (f"; OPENBLAS_CORETYPE={forced} forces that core type" if forced else "")


#: The matrix products of the graph executors (fused, plain): MindSpore's own CPU MatMul, which
#: picks its kernels per CPU and never reads OPENBLAS_* settings. With ``encoder="auto"`` the
#: encoder times host (numpy's BLAS) against fused per case and keeps the faster, so a BLAS
#: that an environment slows down moves the choice to fused (benchmarks/PROFILE_NOTES.md section 33).
GRAPH_GEMM = "MindSpore's CPU MatMul (its own per-CPU kernels; OPENBLAS_* settings do not apply)"


def diagnose() -> dict:
    """Everything doctor prints, as a dict. Applies nothing."""
    env = _environment.detect()
    result = {"python": platform.python_version(), "environment": env.as_dict(),
              "capabilities": {}, "groups": {}}
    if not env.supported:
        result["groups"] = {g: {"would_apply": False, "reason": "; ".join(env.problems)}
                            for g in NAMES}
        return result
    result["capabilities"] = _environment.capabilities(env.versions)
    result["probe_cache"] = _environment.probe_cache_info(env.versions)
    result["config"] = _config.current().as_dict()
    try:
        from .kernels import isa
        from .runtime import native

        cpu = isa.cpu()
        result["cpu"] = {"model": cpu.model, "arch": cpu.arch,
                         "isa": [v.name for v in isa.runnable(cpu)]}
        result["fused_kernels"] = native.state()
    except Exception as exc:  # doctor explains; it does not crash
        result["fused_kernels"] = {"library": None, "reason": f"error: {exc!r}"}
    result["gemm"] = host_gemm()
    result["graph_gemm"] = GRAPH_GEMM
    try:
        result["compile_cache"] = _environment.compile_cache_on()
    except Exception as exc:  # noqa: BLE001  doctor explains; it does not crash
        result["compile_cache"] = repr(exc)
    try:
        from .runtime import choice, native

        lib = native.library()
        result["verdicts"] = choice.cached(_config.current(), lib.path if lib else None)
    except Exception as exc:  # doctor explains; it does not crash
        result["verdicts"] = {"error": repr(exc)}
    for name in NAMES:
        try:
            patches = _api.group_patches(name, env)
            result["groups"][name] = {"would_apply": True,
                                      "targets": [f"{p.target}: {p.description}" for p in patches]}
        except Unsupported as exc:
            result["groups"][name] = {"would_apply": False, "reason": str(exc)}
        except Exception as exc:  # doctor explains; it does not crash
            result["groups"][name] = {"would_apply": False, "reason": f"error: {exc!r}"}
    return result


def doctor(json_out: bool = False) -> int:
    """Print the diagnosis. Exit 1 when nothing can be patched on this stack."""
    d = diagnose()
    ok = d["environment"]["supported"] and any(g["would_apply"] for g in d["groups"].values())
    if json_out:
        print(json.dumps(d, indent=2))
        return 0 if ok else 1
    env = d["environment"]
    print(f"whisper_accel doctor (Python {d['python']})")
    for pkg, version in env["versions"].items():
        want = _environment.SUPPORTED[pkg]
        print(f"  {pkg:<13} {version or 'not installed':<12} tested: {want}")
    print(f"  backend       {env['backend'] or 'unknown'}")
    cache = d.get("probe_cache")
    for cap, present in d["capabilities"].items():
        source = (cache or {}).get("sources", {}).get(cap)
        print(f"  probe         {cap}: {'yes' if present else 'no'}"
              + (f" ({source})" if source else ""))
    if cache:
        where = cache["file"] or cache["directory"] or "unknown (no cache directory)"
        print(f"  probe cache   {where}" if cache["enabled"]
              else "  probe cache   off (WHISPER_ACCEL_PROBE_CACHE)")
    cpu = d.get("cpu")
    if cpu:
        print(f"  cpu           {cpu['model']} ({cpu['arch']}; kernel variants it runs: {', '.join(cpu['isa']) or 'none'})")
    fused = d.get("fused_kernels")
    if fused:
        print(f"  fused kernels {fused.get('isa')} build {fused['library']}" if fused["library"]
              else f"  fused kernels not used: {fused['reason']} (the encoder and decoder steps run MindSpore's own ops)")
        if fused["library"] and fused.get("chosen_by"):
            timed = fused.get("seconds") or {}
            print(f"  kernel ISA    {fused['isa']}: {fused['chosen_by']}"
                  + ("".join(f"; {n} {s * 1e3:.2f} ms" for n, s in timed.items()) if timed else ""))
        if fused["library"]:
            print("  bf16 GEMM     " + ("in the kernels: matmul_precision=bfloat16 runs the host encoder's products "
                                      "there (off unless named)" if fused.get("bf16_gemm") else
                                      "not built (needs a CPU with AVX512_BF16): products stay float32"))
    print(f"  host GEMM     {d.get('gemm')}")
    print(f"  graph GEMM    {d.get('graph_gemm')}")
    if d.get("compile_cache") is True:
        print(f"  PROBLEM       {_environment.COMPILE_CACHE}")
    print("  config        " + ", ".join(f"{k}={v}" for k, v in d.get("config", {}).items()))
    verdicts = d.get("verdicts") or {}
    if "error" in verdicts:
        print(f"  executors     verdicts unreadable: {verdicts['error']}")
    for case, v in verdicts.items() if "error" not in verdicts else ():
        times = ", ".join(f"{k} {t * 1000:.0f} ms" for k, t in sorted(v.get("seconds", {}).items()))
        first = v.get("first_seconds") or {}
        if first:
            times += "; first calls " + ", ".join(f"{k} {t * 1000:.0f} ms" for k, t in sorted(first.items()))
        print(f"  executor      {case}: {v.get('executor')} ({times}; measured here, cached)")
    if not verdicts:
        print("  executors     no measured verdicts cached for this machine yet (the first calls of each case measure)")
    for problem in env["problems"]:
        print(f"  PROBLEM       {problem}")
    print("patch groups:")
    for name, g in d["groups"].items():
        if g["would_apply"]:
            print(f"  + {name}: would apply")
            for t in g["targets"]:
                print(f"      {t}")
        else:
            print(f"  - {name}: would NOT apply -- {g['reason']}")
    print("verdict: " + ("whisper_accel can patch this stack" if ok
                         else "nothing can be patched here; see the problems above"))
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(doctor())
