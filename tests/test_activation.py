"""Zero-code activation through WHISPER_ACCEL, in fresh subprocesses, in every import order.

These run the installed package (its ``whisper_accel.pth`` is what reads the variable), as a
user's ``python script.py`` would.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from whisper_accel import auto

from conftest import child_env, stack


def applied_here():
    """Every registered group, less conv1d where its kernel probe fails (CPU)."""
    from whisper_accel.groups import NAMES

    return sorted(n for n in NAMES if n != "conv1d" or stack()["native_conv1d"])

PROBE = textwrap.dedent("""
    import json, sys
    def state():
        import whisper_accel
        from whisper_accel import _api
        from whisper_accel._patcher import wrapper_depth
        return {"patched": whisper_accel.is_patched(),
                "groups": sorted({p.group for p in _api._PATCHER.applied()}),
                "depth": max([wrapper_depth(vars(o)[a]) for o, a, _ in _api.originals()] or [0])}
""")


def run(code: str, value=None, strict=None, timeout=180):
    env = child_env()
    env["GLOG_v"] = "3"
    if value is not None:
        env["WHISPER_ACCEL"] = value
    if strict is not None:
        env["WHISPER_ACCEL_STRICT"] = strict
    proc = subprocess.run([sys.executable, "-c", PROBE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd="/")
    return proc


def last_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.subprocess
def test_unset_imports_nothing_heavy():
    proc = run("""
        print(json.dumps({"heavy": [m for m in ("mindspore", "mindnlp", "whisper_accel", "wrapt")
                                    if m in sys.modules]}))
    """, value=None)
    assert last_json(proc) == {"heavy": []}
    proc = run("""
        print(json.dumps({"heavy": [m for m in ("mindspore", "whisper_accel") if m in sys.modules]}))
    """, value="0")
    assert last_json(proc) == {"heavy": []}


@pytest.mark.subprocess
@pytest.mark.parametrize("imports", [
    "import mindnlp\nfrom transformers import WhisperForConditionalGeneration",
    "from mindnlp.transformers import WhisperForConditionalGeneration",
    "import mindnlp\nimport transformers.models.whisper.modeling_whisper",
])
def test_set_patches_on_whisper_import_whatever_the_order(imports):
    proc = run(imports + "\nprint(json.dumps(state()))", value="1")
    assert last_json(proc) == {"patched": True, "groups": applied_here(), "depth": 1}


@pytest.mark.subprocess
def test_env_then_explicit_patch_and_unpatch_wraps_nothing_twice():
    proc = run("""
        import warnings
        import mindnlp
        from transformers import WhisperForConditionalGeneration
        import whisper_accel
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            whisper_accel.patch()
        after_second = state()
        whisper_accel.unpatch()
        print(json.dumps({"second": after_second, "warned": any("already" in str(x.message) for x in w),
                          "after_unpatch": state()}))
    """, value="true")
    out = last_json(proc)
    assert out["second"] == {"patched": True, "groups": applied_here(), "depth": 1}
    assert out["warned"]
    assert out["after_unpatch"] == {"patched": False, "groups": [], "depth": 0}


@pytest.mark.subprocess
def test_group_list_selects_groups():
    proc = run("""
        import mindnlp
        import transformers.models.whisper.modeling_whisper
        print(json.dumps(state()))
    """, value="conv1d")
    # conv1d applies only where its kernel probe passes (not on CPU): else skipped, not patched
    assert last_json(proc)["groups"] == (["conv1d"] if stack()["native_conv1d"] else [])


@pytest.mark.subprocess
def test_bad_value_warns_with_valid_values_and_stays_off():
    proc = run("""
        import mindnlp
        import transformers.models.whisper.modeling_whisper
        print(json.dumps(state()))
    """, value="fast-please")
    assert last_json(proc)["patched"] is False
    assert "WHISPER_ACCEL='fast-please' is not understood" in proc.stderr
    assert "attention" in proc.stderr and "1/true/all" in proc.stderr


@pytest.mark.subprocess
def test_bad_value_raises_in_strict_mode():
    proc = run("print('started')", value="nope", strict="1")
    assert proc.returncode != 0 and "not understood" in proc.stderr


@pytest.mark.parametrize("value,expected", [
    ("", None), ("0", None), ("off", None), ("1", {}), ("TRUE", {}), ("all", {}),
    ("attention", {"attention": True, "conv1d": False}),
    (" attention , conv1d ", {"attention": True, "conv1d": True}),
])
def test_parse(value, expected):
    got = auto.parse(value)
    if expected is None or expected == {}:
        assert got == expected
    else:
        assert {k: got[k] for k in expected} == expected


@pytest.mark.parametrize("value", ["2", "attention,flash", ",", "yes please"])
def test_parse_rejects(value):
    with pytest.raises(ValueError, match="valid|use 1/true"):
        auto.parse(value)
