"""Tests for forkreload.carry: process-wide settings across fresh interpreters.

As in cloudpickle's own tests, what is captured crosses into a FRESH
interpreter: a "cell" changes settings in one subprocess, which captures them
and pickles the capture with cloudpickle; another subprocess, where the user's
module may have been edited, unpickles it, applies it and checks each
setting.  Both run with ``-W error``, so a warning that escapes fails them.
Several settings share one pair of subprocesses to keep the file fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

USERMOD = """
class ModWarning(UserWarning):
    pass

class GoneWarning(UserWarning):
    pass

def fmt(x):
    return f"<{x}>"

def on_err(kind, flag):
    raise FloatingPointError("user handler: " + kind)
"""

# The edit between the two workers: GoneWarning and fmt are deleted, and
# importing the module now adds a warnings filter.
USERMOD_EDITED = """
import warnings
warnings.filterwarnings("ignore", message="added by the edit")

class ModWarning(UserWarning):
    pass

def on_err(kind, flag):
    raise FloatingPointError("user handler: " + kind)
"""


def run_python(code: str, cwd, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter (``-W error``) in ``cwd``; parse the JSON it prints last."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_trip(tmp_path, cell: str, checks: str, before_apply: str = "", edited: str | None = None) -> dict:
    """Capture after ``cell`` in one fresh interpreter, apply in another
    (after ``before_apply``, with the user's module replaced by ``edited``),
    then run ``checks``, which fill ``out``."""
    (tmp_path / "usermod.py").write_text(USERMOD)
    dump = tmp_path / "carry.pkl"
    old = run_python(
        """
        import json, sys, cloudpickle
        from forkreload import carry   # imported before any cell, as in the snapshot
        import usermod
        CELL
        captured = carry.capture()
        cell_values = {k: v for k, v in globals().items() if k.startswith("Cell")}
        with open(sys.argv[1], "wb") as f:
            cloudpickle.dump((captured, cell_values), f, protocol=5)
        print(json.dumps({"captured": sorted(captured), "described": carry.describe(captured)}))
        """.replace("CELL", textwrap.dedent(cell).replace("\n", "\n        ")),
        tmp_path,
        str(dump),
    )
    if edited is not None:
        (tmp_path / "usermod.py").write_text(edited)
    new = run_python(
        """
        import json, pickle, sys
        from forkreload import carry
        import usermod
        BEFORE
        with open(sys.argv[1], "rb") as f:
            captured, cell_values = pickle.load(f)   # the migrated variables come first
        globals().update(cell_values)
        out = {"lines": carry.apply(captured)}
        CHECKS
        print(json.dumps(out))
        """.replace("BEFORE", textwrap.dedent(before_apply).replace("\n", "\n        ")).replace(
            "CHECKS", textwrap.dedent(checks).replace("\n", "\n        ")
        ),
        tmp_path,
        str(dump),
    )
    new["old"] = old
    return new


def test_stdlib_numpy_pandas_settings_cross_to_a_fresh_interpreter(tmp_path):
    cell = """
    import decimal, logging, warnings
    import numpy as np, pandas as pd

    class CellWarning(UserWarning):
        pass

    warnings.simplefilter("ignore", CellWarning)
    warnings.filterwarnings("error", category=usermod.ModWarning)
    warnings.filterwarnings("always", message="gone.*", category=usermod.GoneWarning)

    logging.root.setLevel(logging.DEBUG)
    logging.getLogger("pandas").setLevel(logging.ERROR)
    logging.getLogger("mylib.sub").disabled = True
    logging.getLogger("other").propagate = False
    logging.disable(logging.INFO)

    ctx = decimal.getcontext()
    ctx.prec, ctx.rounding, ctx.Emax, ctx.Emin, ctx.capitals, ctx.clamp = 5, decimal.ROUND_DOWN, 99999, -99999, 0, 1
    decimal.Decimal(1) / decimal.Decimal(7)    # raises the Inexact and Rounded flags
    ctx.traps[decimal.FloatOperation] = True

    sys.setrecursionlimit(4321)
    sys.set_int_max_str_digits(5000)

    np.set_printoptions(precision=3, linewidth=100, formatter={"int": lambda i: f"i{i}"})
    np.seterr(divide="raise", under="warn", over="call")
    np.seterrcall(usermod.on_err)

    pd.set_option("display.max_rows", 7)
    pd.set_option("display.precision", 2)
    pd.set_option("display.float_format", usermod.fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pd.set_option("mode.chained_assignment", "raise")   # deprecated: warns when set
    """
    checks = """
    import decimal, logging, warnings
    import numpy as np, pandas as pd
    out["filters"] = [(a, c.__module__ + "." + c.__name__, bool(m)) for a, m, c, mod, ln in warnings.filters[:3]]
    out["filter_classes"] = [warnings.filters[1][2] is usermod.ModWarning, warnings.filters[2][2] is CellWarning]
    with warnings.catch_warnings(record=True) as w:
        warnings.warn("quiet", CellWarning)
    out["cell_warning_shown"] = len(w)
    try:
        warnings.warn("loud", usermod.ModWarning)
        out["mod_warning"] = "shown"
    except usermod.ModWarning:
        out["mod_warning"] = "raised"

    out["logging"] = [logging.root.level, logging.getLogger("pandas").level, logging.getLogger("mylib.sub").disabled,
                      logging.getLogger("other").propagate, logging.root.manager.disable]

    ctx = decimal.getcontext()
    out["decimal"] = [ctx.prec, ctx.rounding, ctx.Emax, ctx.Emin, ctx.capitals, ctx.clamp,
                      sorted(s.__name__ for s, on in ctx.traps.items() if on), sorted(s.__name__ for s, on in ctx.flags.items() if on)]

    out["sys"] = [sys.getrecursionlimit(), sys.get_int_max_str_digits()]

    opts = np.get_printoptions()
    out["numpy_print"] = [opts["precision"], opts["linewidth"], repr(np.array([1, 2]))]
    out["numpy_err"] = [np.geterr(), np.geterrcall() is usermod.on_err]

    out["pandas"] = [pd.get_option("display.max_rows"), pd.get_option("display.precision"), pd.get_option("display.float_format")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["pandas"].append(pd.get_option("mode.chained_assignment"))
    """
    res = round_trip(tmp_path, cell, checks, edited=USERMOD_EDITED)
    assert res["old"]["captured"] == [
        "decimal.context",
        "logging.levels",
        "numpy.printoptions",
        "numpy.seterr",
        "pandas.options",
        "sys.limits",
        "warnings.filters",
    ]
    assert "numpy print options: precision=3, linewidth=100, formatter=(pickled)" in res["old"]["described"]
    # The deleted category and function are named; each costs only itself.
    assert sorted(res["lines"]) == [
        "reset: pandas option display.float_format (usermod.fmt no longer exists)",
        "reset: warnings filter always::usermod.GoneWarning (usermod.GoneWarning no longer exists)",
    ]
    # The edited module's filter (new worker only) first, then the old list.
    assert res["filters"] == [["ignore", "builtins.Warning", True], ["error", "usermod.ModWarning", False], ["ignore", "__main__.CellWarning", False]]
    assert res["filter_classes"] == [True, True]  # the NEW module's class and the migrated cell class
    assert res["cell_warning_shown"] == 0
    assert res["mod_warning"] == "raised"
    assert res["logging"] == [10, 40, True, False, 20]
    assert res["decimal"] == [5, "ROUND_DOWN", 99999, -99999, 0, 1,
                              ["DivisionByZero", "FloatOperation", "InvalidOperation", "Overflow"], ["Inexact", "Rounded"]]
    assert res["sys"] == [4321, 5000]
    assert res["numpy_print"] == [3, 100, "array([i1, i2])"]
    assert res["numpy_err"] == [{"divide": "raise", "over": "call", "under": "warn", "invalid": "warn"}, True]
    assert res["pandas"] == [7, 2, None, "raise"]


def test_nothing_changed_nothing_captured_and_nothing_imported(tmp_path):
    res = run_python(
        """
        import json, sys
        from forkreload import carry
        before = carry.capture()
        imported = [m for m in ("numpy", "pandas", "torch", "matplotlib") if m in sys.modules]
        import decimal, logging
        import numpy as np, pandas as pd
        decimal.getcontext()
        print(json.dumps({"before": before, "imported": imported, "after": sorted(carry.capture()), "uncarried": carry.uncarried()}))
        """,
        tmp_path,
    )
    # numpy's import adds warnings filters after carry's import (in the
    # snapshot, preloads come first); nothing else differs.
    assert res == {"before": {}, "imported": [], "after": ["warnings.filters"], "uncarried": []}


def test_apply_never_raises_and_names_each_failure():
    from forkreload import carry

    captured = {
        "numpy.printoptions": {"precision": "three"},
        "sys.limits": {"recursionlimit": -5},
        "decimal.context": carry.Packed("decimal context", b"", "could not be read: RuntimeError: boom"),
        "warnings.filters": [carry.Packed("ignore::gone.Cat", b"not a pickle")],
        "from.a.newer.version": 1,
    }
    import warnings

    saved = list(warnings.filters)
    try:
        lines = carry.apply(captured)
    finally:
        warnings.filters[:] = saved
        warnings._filters_mutated()  # type: ignore[attr-defined]
    assert len(lines) == 4
    assert lines[0].startswith("reset: numpy print option precision (")
    assert lines[1].startswith("reset: sys.recursionlimit (ValueError")
    assert lines[2] == "reset: decimal context (could not be read: RuntimeError: boom)"
    assert lines[3].startswith("reset: warnings filter ignore::gone.Cat (UnpicklingError")
    assert sys.getrecursionlimit() > 0


def test_matplotlib_rcparams(tmp_path):
    pytest.importorskip("matplotlib")
    cell = """
    import matplotlib as mpl
    from cycler import cycler
    mpl.rcParams["lines.linewidth"] = 3.5
    mpl.rcParams["figure.figsize"] = (3, 2)
    mpl.rcParams["axes.prop_cycle"] = cycler(color=["r", "g"])
    """
    checks = """
    import matplotlib as mpl
    out["rc"] = [mpl.rcParams["lines.linewidth"], list(mpl.rcParams["figure.figsize"]), mpl.rcParams["axes.prop_cycle"].by_key()["color"]]
    """
    # The new interpreter has not imported matplotlib: apply() does.
    res = round_trip(tmp_path, cell, checks, before_apply="assert 'matplotlib' not in sys.modules")
    assert res["old"]["captured"] == ["matplotlib.rcParams", "warnings.filters"]  # numpy's import adds filters
    assert res["lines"] == []
    assert res["rc"] == [3.5, [3.0, 2.0], ["r", "g"]]


def test_torch_globals(tmp_path):
    pytest.importorskip("torch")
    cell = """
    import torch
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    """
    checks = """
    import torch
    out["torch"] = [str(torch.get_default_dtype()), torch.is_grad_enabled(), torch.get_num_threads()]
    """
    res = round_trip(tmp_path, cell, checks, before_apply="import torch; torch.set_num_threads(2)")
    assert res["lines"] == []
    assert res["torch"] == ["torch.float64", False, 1]


def test_torch_table_entry_against_a_stand_in():
    """The torch entry's calls, where torch itself is not installed."""
    import types

    from forkreload import carry

    state = {"dtype": "float32", "grad": True, "threads": 8, "det": False, "prec": "highest"}
    torch = types.SimpleNamespace(
        float32="float32",
        float64="float64",
        get_default_dtype=lambda: state["dtype"],
        set_default_dtype=lambda d: state.update(dtype=d),
        is_grad_enabled=lambda: state["grad"],
        set_grad_enabled=lambda on: state.update(grad=on),
        get_num_threads=lambda: state["threads"],
        set_num_threads=lambda n: state.update(threads=n),
        are_deterministic_algorithms_enabled=lambda: state["det"],
        use_deterministic_algorithms=lambda on: state.update(det=on),
        get_float32_matmul_precision=lambda: state["prec"],
        set_float32_matmul_precision=lambda p: state.update(prec=p),
    )
    entry = carry._BY_NAME["torch.globals"]
    assert entry.read(torch) == {"num_threads": 8}
    state.update(dtype="float64", grad=False, threads=2, det=True, prec="high")
    value = entry.read(torch)
    assert value == {"num_threads": 2, "default_dtype": "float64", "grad_enabled": False, "deterministic_algorithms": True, "float32_matmul_precision": "high"}
    state.update(dtype="float32", grad=True, threads=8, det=False, prec="highest")
    assert entry.apply(torch, value) == []
    assert state == {"dtype": "float64", "grad": False, "threads": 2, "det": True, "prec": "high"}
    assert entry.apply(torch, {"default_dtype": "bfloat77"}) == ["reset: torch default_dtype (AttributeError: 'types.SimpleNamespace' object has no attribute 'bfloat77')"]


UNCARRIED_CELL = """
import json, logging, sys, threading, builtins
import numpy as np, pandas as pd
from forkreload import carry
import usermod

def to_markdown(self):
    return "patched"

pd.DataFrame.to_markdown = to_markdown
pd.Series.shout = staticmethod(lambda s: s)
np.linalg.norm2 = usermod.fmt
builtins.helper = to_markdown
builtins._ = to_markdown        # the last result, as the interactive interpreter keeps it: not a patch
class CellError(Exception):
    pass
sys.last_type = CellError       # the last error, as IPython records it: not a patch
json.load = to_markdown

@pd.api.extensions.register_dataframe_accessor("geo")
class GeoAccessor:
    def __init__(self, df):
        self.df = df

import copyreg
class Point:
    pass
copyreg.pickle(Point, lambda p: (Point, ()))

@pd.api.extensions.register_extension_dtype
class CellDtype(pd.api.extensions.ExtensionDtype):
    name = "celldtype"
    type = object

class CellHandler(logging.Handler):
    def emit(self, record):
        pass

logging.getLogger("pandas").addHandler(CellHandler())
logging.getLogger("pandas").addHandler(logging.NullHandler())   # what libraries add
logging.getLogger("numpy").addHandler(logging.FileHandler(__import__("os").devnull))   # library class on a library logger: not judged
logging.basicConfig()

stop = threading.Event()
threading.Thread(target=stop.wait, name="poller", daemon=True).start()
threading.Thread(target=stop.wait, name="writer").start()
"""


def test_uncarried_names_patches_handlers_and_threads(tmp_path):
    (tmp_path / "usermod.py").write_text(USERMOD)
    res = run_python(
        UNCARRIED_CELL
        + """
try:
    out = {"default": carry.uncarried(), "given": carry.uncarried(globals(), ["usermod"])}
finally:
    stop.set()
print(json.dumps(out))
""",
        tmp_path,
    )
    expected = [
        "not carried: builtins.helper patched from a cell",
        "not carried: copyreg reducer for __main__.Point from a cell",
        "not carried: json.load patched from a cell",
        "not carried: logging handler CellHandler on logger 'pandas'",
        "not carried: logging handler StreamHandler on the root logger",
        "not carried: numpy.linalg.norm2 patched with usermod.fmt (kept only if importing usermod does it)",
        "not carried: pandas.DataFrame.geo patched from a cell",
        "not carried: pandas.DataFrame.to_markdown patched from a cell",
        "not carried: pandas extension dtype __main__.CellDtype registered from a cell",
        "not carried: pandas.Series.shout patched from a cell",
        "not carried: thread 'poller' (threads do not survive a fresh worker)",
        "not carried: thread 'writer' (threads do not survive a fresh worker)",
    ]
    assert sorted(res["default"]) == sorted(expected)
    assert sorted(res["given"]) == sorted(expected)


def test_a_real_kernel_has_nothing_uncarried(tmp_path):
    """The kernel's own threads, loggers and handlers are not the user's."""
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        out: list[str] = []
        code = "from forkreload import carry; import json; print(json.dumps([carry.uncarried(), sorted(carry.capture())]))"
        reply = kc.execute_interactive(
            code, output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None, timeout=30
        )
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert json.loads("".join(out)) == [[], []]
