"""Process-wide settings a fresh worker would reset: read in the old worker,
applied in the new one.

A fresh worker is forked from the snapshot: it has the libraries imported
but none of what the user's cells did to them since.  What a cell set
process-wide (``np.set_printoptions``, ``pd.set_option``, a warnings filter,
a logger's level, ``sys.setrecursionlimit``, the ``decimal`` context,
``torch.set_default_dtype``, ``plt.rcParams[...]``) would silently be back
to its default.  ``SETTINGS`` is the one table of what is carried: each
entry names the module it needs, how to read it, how to apply it and how to
describe it.

Where the agent calls it (the lead wires it; nothing here is called yet):

* ``capture()`` in the OLD worker's ``Agent.export``, in the same call as
  the namespace dump (the main thread, between cells).  It returns a dict
  ``{setting name: value}`` holding only the settings that differ from what
  a fresh import gives, and only of modules already in ``sys.modules`` (it
  never imports a library to read it).  It is picklable by cloudpickle,
  protocol 5, and by plain pickle: every part that refers to user code (a
  warnings category defined in a cell or in a user module, a callable in a
  pandas option or numpy formatter) is already pickled on its own
  (``Packed``), so the agent can ship the dict in the session metadata
  dump (pickled) and one part that no longer unpickles costs only itself.
  It never raises.
* ``apply(captured)`` in the NEW worker's ``Agent.load``, after the user's
  modules were imported fresh (so that carried values win over what their
  import set, and categories of user modules resolve to the new classes),
  best after ``migrate.load_namespace`` (the libraries the values need are
  imported by then).  A class defined in a cell that is both a variable and
  a warnings category comes back as one class whatever the order
  (cloudpickle rebuilds a class pickled by value once per process).  It
  imports a library the old worker had and the new one still lacks (a
  setting of torch or matplotlib costs their import then).  It must run in
  the main thread, in the handler of the agent's request: numpy's print
  options and error handling, and the decimal context, are context
  variables, and ipykernel runs the agent's requests in the cells' context.
  It never raises; it returns notice lines, one per setting or
  part of one that could not be carried, each starting with ``reset:``
  (e.g. ``reset: warnings filter ignore::shapes.OldWarning (shapes.OldWarning
  no longer exists)``), for the cell's notice.
* ``uncarried(namespace, user_modules)`` in the OLD worker's export (the
  state to judge is there): lines starting with ``not carried:`` for what no
  setting can carry and the user must redo in a cell: library modules and
  classes patched with functions or classes of a cell or of a user module,
  pandas accessors registered from a cell, logging handlers the user added,
  and threads the user started.  ``namespace`` is the user's namespace
  (default: ``__main__``'s, which IPython makes the user namespace);
  ``user_modules`` the names of the user's modules (the agent's
  ``user_modules``; default: modules outside the standard library and
  site-packages).

``describe(captured)`` gives one line per captured setting, for the log.

Costs, measured on a shared 2-core machine (load 3 to 4), Python 3.11,
numpy 2.4, pandas 3.1 and scipy 1.17 imported (1308 modules):
``capture()`` 0.05 ms with nothing changed, 0.07 ms with seven settings
changed (0.1 ms more to cloudpickle the result); ``uncarried()`` with
``np``, ``pd``, ``scipy``, ``scipy.stats`` and a DataFrame in the namespace
1.1 to 1.7 ms at best, 2 to 5 ms median on the loaded machine, 0.25 ms for
an empty namespace.  It looks only at what a cell can name (see
``_patch_owners``: about 60 modules and 150 classes there, 9,000 dict
entries, one type test each) and skips immutable types, which cannot be
patched.  Without ``user_modules``, the first call judges every imported
module by its file once (2 ms for 1308 modules), later calls only new ones.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import re
import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import cloudpickle

__all__ = ["SETTINGS", "Packed", "Setting", "apply", "capture", "describe", "uncarried"]

_PROTOCOL = 5

# Packages of the kernel's own machinery: their threads, loggers and
# handlers are the kernel's, which every worker starts with.
_KERNEL_PACKAGES = frozenset(
    {"ipykernel", "IPython", "jupyter_client", "jupyter_core", "zmq", "tornado", "traitlets", "comm", "debugpy", "forkreload", "matplotlib_inline"}
)
# Loggers the kernel configures (IPKernelApp is traitlets' application logger).
_KERNEL_LOGGERS = _KERNEL_PACKAGES | {"IPKernelApp"}
# The threads of a forkreload worker (ipykernel 7.4, read from a live one):
# MainThread, IOPub (target ipykernel.iostream), Heartbeat
# (ipykernel.heartbeat.Heartbeat), Control (ipykernel.control), Shell channel
# (ipykernel.shellchannel), IPythonHistorySavingThread (IPython.core.history),
# the parent poller (ipykernel.parentpoller) and two "Thread-N
# (_watch_pipe_fd)" (target ipykernel.iostream). They are told apart by the
# module of their class or target (`_kernel_thread`), not by their names,
# which a user's thread may share.


class Packed(NamedTuple):
    """One part of a setting pickled on its own in the old worker, so that
    its failure to unpickle in the new one costs only that part."""

    what: str  # how a notice names the part ("ignore::shapes.OldWarning")
    data: bytes  # cloudpickle, protocol 5; empty when it could not be pickled
    error: str = ""  # why it could not be pickled


_SCALARS = (type(None), bool, int, float, str, bytes, complex)


def _safe(value: object) -> bool:
    """Whether plain pickle rebuilds `value` in any worker (builtins only)."""
    t = type(value)
    if t in _SCALARS or t is re.Pattern:
        return True
    if t is tuple or t is list:
        return all(_safe(v) for v in value)  # type: ignore[attr-defined]
    if t is dict:
        return all(type(k) is str and _safe(v) for k, v in value.items())  # type: ignore[attr-defined]
    return isinstance(value, type) and value.__module__ == "builtins"


def _pack(value: object, what: str) -> object:
    """`value` itself when it is builtins-only, else a `Packed`."""
    if _safe(value):
        return value
    try:
        return Packed(what, cloudpickle.dumps(value, protocol=_PROTOCOL))
    except Exception as exc:
        return Packed(what, b"", f"cannot be pickled: {_short(exc)}")


def _unpack(value: object) -> Any:
    if type(value) is not Packed:
        return value
    if value.error:
        raise _NotCarried(value.error)
    return pickle.loads(value.data)


class _NotCarried(Exception):
    pass


_MISSING_ATTRIBUTE = re.compile(r"Can't (?:get|find) attribute '([^']+)' on <module '([^']+)'")
_MISSING_MODULE = re.compile(r"No module named '([^']+)'")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _why(exc: BaseException) -> str:
    """Why a part could not be applied, in the user's terms."""
    if isinstance(exc, _NotCarried):
        return str(exc)
    m = _MISSING_ATTRIBUTE.search(str(exc))
    if m:
        return f"{m.group(2)}.{m.group(1)} no longer exists"
    m = _MISSING_MODULE.search(str(exc))
    if m and isinstance(exc, ImportError):
        return f"module {m.group(1)} no longer exists"
    return _short(exc)


def _differs(a: object, b: object) -> bool:
    """`a != b`, True when the comparison itself fails or is not a bool."""
    try:
        return bool(a != b)
    except Exception:
        return True


def _name(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


# -- the table ---------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One process-wide setting: where it lives and how to move it."""

    name: str  # key in capture()'s dict
    module: str  # read only when sys.modules has it
    label: str  # how a notice names it
    read: Callable[[types.ModuleType], Any]  # its value when it differs from a fresh import, else None
    apply: Callable[[types.ModuleType, Any], list[str]]  # set it here; notice lines for parts not carried
    describe: Callable[[Any], str]  # a short text of a captured value


def _show(value: object) -> str:
    if type(value) is Packed:
        return f"({value.error})" if value.error else "(pickled)"
    return repr(value)


def _items(value: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in value.items())


# warnings: the whole list, as the old worker has it, whenever it differs
# from the list when this module was imported (in the snapshot, after the
# preloads). In a worker it nearly always does (the kernel adds filters at
# start, and so does numpy's import when it is not preloaded): replacing the
# list keeps exactly one copy of each of those. Filters the new worker added
# itself that the old one lacks (an edited module's import) are kept too.

_BASE_FILTERS = list(warnings.filters)


def _filter_what(f: tuple[Any, ...]) -> str:
    cat = f[2]
    name = cat.__name__ if getattr(cat, "__module__", None) == "builtins" else _name(cat)
    return f"{f[0]}::{name}"


def _read_warnings(m: types.ModuleType) -> Any:
    filters = list(m.filters)
    if not _differs(filters, _BASE_FILTERS):
        return None
    return [_pack(f, _filter_what(f)) for f in filters]


def _apply_warnings(m: types.ModuleType, value: list[object]) -> list[str]:
    lines = []
    filters = []
    for part in value:
        try:
            f = _unpack(part)
        except Exception as exc:
            what = part.what if type(part) is Packed else repr(part)
            lines.append(f"reset: warnings filter {what} ({_why(exc)})")
            continue
        filters.append(f)
    # Filters this worker added since the snapshot that the old worker lacks
    # (an edited user module's import adds one) stay, in front: they are
    # the newest.
    added = [f for f in m.filters if f not in _BASE_FILTERS and f not in filters]
    m.filters[:] = added + filters  # the same list object: _warnings holds it too
    mutated = getattr(m, "_filters_mutated", None) or getattr(m, "_filters_mutated_lock_held", None)
    if mutated is not None:
        mutated()
    return lines


# logging: levels of the root logger and of every logger set away from the
# default (NOTSET, propagating, enabled), and logging.disable().


def _read_logging(m: types.ModuleType) -> Any:
    root = m.root
    loggers = {}
    for name, lg in list(root.manager.loggerDict.items()):
        if type(lg) is m.PlaceHolder or name.partition(".")[0] in _KERNEL_LOGGERS:
            continue
        level, disabled, propagate = getattr(lg, "level", 0), getattr(lg, "disabled", False), getattr(lg, "propagate", True)
        if level != m.NOTSET or disabled or not propagate:
            loggers[name] = (level, bool(disabled), bool(propagate))
    value: dict[str, Any] = {}
    if root.level != m.WARNING:
        value["root"] = root.level
    if root.manager.disable:
        value["disable"] = root.manager.disable
    if loggers:
        value["loggers"] = loggers
    return value or None


def _apply_logging(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    lines = []
    if "root" in value:
        m.root.setLevel(value["root"])
    if "disable" in value:
        m.disable(value["disable"])
    for name, (level, disabled, propagate) in value.get("loggers", {}).items():
        try:
            lg = m.getLogger(name)
            lg.setLevel(level)
            lg.disabled = disabled
            lg.propagate = propagate
        except Exception as exc:
            lines.append(f"reset: logger {name!r} ({_why(exc)})")
    return lines


def _describe_logging(value: dict[str, Any]) -> str:
    parts = []
    if "root" in value:
        parts.append(f"root={value['root']}")
    if "disable" in value:
        parts.append(f"disable={value['disable']}")
    parts += [f"{n}={lv}{' disabled' if d else ''}{'' if p else ' no-propagate'}" for n, (lv, d, p) in value.get("loggers", {}).items()]
    return ", ".join(parts)


# decimal: the current context (a fresh one copies DefaultContext, no flags).

_DECIMAL_FIELDS = ("prec", "rounding", "Emin", "Emax", "capitals", "clamp")


def _decimal_state(m: types.ModuleType, ctx: Any, flags: bool) -> dict[str, Any]:
    state = {f: getattr(ctx, f) for f in _DECIMAL_FIELDS}
    state["traps"] = sorted(s.__name__ for s, on in ctx.traps.items() if on)
    state["flags"] = sorted(s.__name__ for s, on in ctx.flags.items() if on) if flags else []
    return state


def _read_decimal(m: types.ModuleType) -> Any:
    state = _decimal_state(m, m.getcontext(), True)
    return state if state != _decimal_state(m, m.DefaultContext, False) else None


def _apply_decimal(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    ctx = m.getcontext()
    for f in _DECIMAL_FIELDS:
        setattr(ctx, f, value[f])
    for s in list(ctx.traps):
        ctx.traps[s] = s.__name__ in value["traps"]
    for s in list(ctx.flags):
        ctx.flags[s] = s.__name__ in value["flags"]
    return []


# sys: limits the interpreter keeps process-wide.

_BASE_RECURSION = sys.getrecursionlimit()
_BASE_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: None)()
_BASE_SWITCH = sys.getswitchinterval()


def _read_sys(m: types.ModuleType) -> Any:
    value = {}
    if m.getrecursionlimit() != _BASE_RECURSION:
        value["recursionlimit"] = m.getrecursionlimit()
    if _BASE_INT_DIGITS is not None and m.get_int_max_str_digits() != _BASE_INT_DIGITS:
        value["int_max_str_digits"] = m.get_int_max_str_digits()
    if m.getswitchinterval() != _BASE_SWITCH:
        value["switchinterval"] = m.getswitchinterval()
    return value or None


def _apply_sys(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    lines = []
    for key, v in value.items():
        try:
            getattr(m, "set" + key if key != "int_max_str_digits" else "set_int_max_str_digits")(v)
        except Exception as exc:
            lines.append(f"reset: sys.{key} ({_why(exc)})")
    return lines


# numpy: print options and floating-point error handling (both per context
# in numpy 2: the agent's calls run in the cells' context, so the cells see
# what apply() set).


def _numpy_print_defaults(m: types.ModuleType) -> dict[str, Any] | None:
    for where in ("numpy._core.printoptions", "numpy.core.arrayprint", "numpy._core.arrayprint"):
        mod = sys.modules.get(where)
        d = getattr(mod, "default_format_options_dict", None) or getattr(mod, "_default_print_options", None)
        if isinstance(d, dict):
            d = dict(d)
            if d.get("legacy") == sys.maxsize:  # get_printoptions() shows it as False
                d["legacy"] = False
            return d
    return None


def _read_numpy_print(m: types.ModuleType) -> Any:
    current = m.get_printoptions()
    default = _numpy_print_defaults(m) or {}
    value = {k: _pack(v, k) for k, v in current.items() if k not in default or _differs(v, default[k])}
    return value or None


def _apply_numpy_print(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    lines = []
    options = {}
    for k, v in value.items():
        try:
            options[k] = _unpack(v)
        except Exception as exc:
            lines.append(f"reset: numpy print option {k} ({_why(exc)})")
    current = m.get_printoptions()
    options = {k: v for k, v in options.items() if k not in current or _differs(v, current[k])}
    if options:
        try:
            m.set_printoptions(**options)
        except Exception:
            for k, v in options.items():  # one by one, to lose only what fails
                try:
                    m.set_printoptions(**{k: v})
                except Exception as exc:
                    lines.append(f"reset: numpy print option {k} ({_why(exc)})")
    return lines


_NUMPY_ERR_DEFAULT = {"divide": "warn", "over": "warn", "under": "ignore", "invalid": "warn"}


def _read_numpy_err(m: types.ModuleType) -> Any:
    value: dict[str, Any] = {k: v for k, v in m.geterr().items() if _NUMPY_ERR_DEFAULT.get(k) != v}
    call = m.geterrcall()
    if call is not None:
        value["call"] = _pack(call, "numpy error callback")
    return value or None


def _apply_numpy_err(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    value = dict(value)
    lines = []
    if "call" in value:
        try:
            m.seterrcall(_unpack(value.pop("call")))
        except Exception as exc:
            lines.append(f"reset: numpy.seterrcall ({_why(exc)})")
    m.seterr(**value)
    return lines


# pandas: every registered option whose value differs from its default.
# Read through the registry (pd.get_option would warn about deprecated
# options, and match each key against every other).


def _pandas_config() -> types.ModuleType | None:
    cfg = sys.modules.get("pandas._config.config")
    if cfg is None or not hasattr(cfg, "_registered_options") or not hasattr(cfg, "_global_config"):
        return None
    return cfg


def _read_pandas(m: types.ModuleType) -> Any:
    cfg = _pandas_config()
    if cfg is None:
        return None
    root = cfg._global_config
    value = {}
    for key, opt in list(cfg._registered_options.items()):
        cursor = root
        *path, last = key.split(".")
        try:
            for p in path:
                cursor = cursor[p]
            current = cursor[last]
        except (KeyError, TypeError):
            continue
        if _differs(current, opt.defval):
            value[key] = _pack(current, key)
    return value or None


def _apply_keys(value: dict[str, Any], set_one: Callable[[str, Any], None], shown: Callable[[str], str]) -> list[str]:
    """Set each key of a library's option table on its own; one failure costs only that key."""
    lines = []
    for key, v in value.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated options warn; the cell that set them did already
                set_one(key, _unpack(v))
        except Exception as exc:
            lines.append(f"reset: {shown(key)} ({_why(exc)})")
    return lines


def _apply_pandas(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    return _apply_keys(value, m.set_option, lambda key: f"pandas option {key}")


# torch: default dtype, grad mode (the main thread's: the agent runs there),
# thread count (always read: its default depends on the machine), and two
# global switches.


def _read_torch(m: types.ModuleType) -> Any:
    value: dict[str, Any] = {"num_threads": m.get_num_threads()}
    dtype = m.get_default_dtype()
    if dtype != m.float32:
        value["default_dtype"] = str(dtype).rpartition(".")[2]
    if not m.is_grad_enabled():
        value["grad_enabled"] = False
    if getattr(m, "are_deterministic_algorithms_enabled", lambda: False)():
        value["deterministic_algorithms"] = True
    precision = getattr(m, "get_float32_matmul_precision", lambda: "highest")()
    if precision != "highest":
        value["float32_matmul_precision"] = precision
    return value


def _apply_torch(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    lines = []
    setters: dict[str, Callable[[Any], object]] = {
        "num_threads": lambda v: m.get_num_threads() == v or m.set_num_threads(v),
        "default_dtype": lambda v: m.set_default_dtype(getattr(m, v)),
        "grad_enabled": lambda v: m.set_grad_enabled(v),
        "deterministic_algorithms": lambda v: m.use_deterministic_algorithms(v),
        "float32_matmul_precision": lambda v: m.set_float32_matmul_precision(v),
    }
    for key, v in value.items():
        try:
            setters[key](v)
        except Exception as exc:
            lines.append(f"reset: torch {key} ({_why(exc)})")
    return lines


# matplotlib: rcParams that differ from rcParamsOrig (the defaults as the
# matplotlibrc files made them at import). The backend is the kernel's
# business (ipykernel sets MPLBACKEND, %matplotlib registers hooks) and is
# left out.

_MPL_SKIP = frozenset({"backend", "backend_fallback"})


def _read_matplotlib(m: types.ModuleType) -> Any:
    current, orig = getattr(m, "rcParams", None), getattr(m, "rcParamsOrig", None)
    if current is None or orig is None:
        return None
    if not isinstance(current, dict) or not isinstance(orig, dict):
        return None  # dict's own accessors below: RcParams.__getitem__ would resolve the backend
    base = dict(dict.items(orig))
    value = {k: _pack(v, k) for k, v in dict.items(current) if k not in _MPL_SKIP and (k not in base or _differs(v, base[k]))}
    return value or None


def _apply_matplotlib(m: types.ModuleType, value: dict[str, Any]) -> list[str]:
    return _apply_keys(value, m.rcParams.__setitem__, lambda key: f"matplotlib rcParams[{key!r}]")


SETTINGS: tuple[Setting, ...] = (
    Setting("warnings.filters", "warnings", "warnings filters", _read_warnings, _apply_warnings, lambda v: f"{len(v)} filters"),
    Setting("logging.levels", "logging", "logging levels", _read_logging, _apply_logging, _describe_logging),
    Setting("decimal.context", "decimal", "decimal context", _read_decimal, _apply_decimal, _items),
    Setting("sys.limits", "sys", "sys limits", _read_sys, _apply_sys, _items),
    Setting("numpy.printoptions", "numpy", "numpy print options", _read_numpy_print, _apply_numpy_print, _items),
    Setting("numpy.seterr", "numpy", "numpy error handling", _read_numpy_err, _apply_numpy_err, _items),
    Setting("pandas.options", "pandas", "pandas options", _read_pandas, _apply_pandas, _items),
    Setting("torch.globals", "torch", "torch settings", _read_torch, _apply_torch, _items),
    Setting("matplotlib.rcParams", "matplotlib", "matplotlib rcParams", _read_matplotlib, _apply_matplotlib, _items),
)
_BY_NAME = {s.name: s for s in SETTINGS}


def capture() -> dict[str, Any]:
    """The settings of imported modules that differ from a fresh import (see
    the module docstring); never imports, never raises."""
    captured: dict[str, Any] = {}
    for s in SETTINGS:
        mod = sys.modules.get(s.module)
        if mod is None:
            continue
        try:
            value = s.read(mod)
        except Exception as exc:
            value = Packed(s.label, b"", f"could not be read: {_short(exc)}")
        if value is not None:
            captured[s.name] = value
    return captured


def apply(captured: Mapping[str, Any]) -> list[str]:
    """Apply what `capture()` read in the old worker; the notice lines for
    what could not be carried. Never raises: a setting that fails costs only
    itself."""
    lines: list[str] = []
    for name, value in captured.items():
        s = _BY_NAME.get(name)
        if s is None:
            continue  # written by another version of forkreload
        try:
            if type(value) is Packed:
                raise _NotCarried(value.error or "not readable")
            mod = sys.modules.get(s.module) or importlib.import_module(s.module)
            lines += s.apply(mod, value)
        except BaseException as exc:  # a setter may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            lines.append(f"reset: {s.label} ({_why(exc)})")
    return lines


def describe(captured: Mapping[str, Any]) -> list[str]:
    """One line per captured setting (for the log)."""
    lines = []
    for name, value in captured.items():
        s = _BY_NAME.get(name)
        if s is None:
            continue
        try:
            text = value.error if type(value) is Packed else s.describe(value)
        except Exception as exc:
            text = _short(exc)
        lines.append(f"{s.label}: {text}")
    return lines


# -- what cannot be carried -------------------------------------------------


def _library_prefixes() -> tuple[str, ...]:
    """The standard library, site-packages and forkreload, each as spelled
    and as resolved (judging most files then needs no realpath)."""
    import site

    paths = [p for k in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(k))]
    try:
        paths += site.getsitepackages()
    except AttributeError:
        pass
    user_site = getattr(site, "USER_SITE", None)
    if isinstance(user_site, str):
        paths.append(user_site)
    paths.append(os.path.dirname(os.path.abspath(__file__)))  # forkreload itself
    both = {os.path.abspath(p) for p in paths} | {os.path.realpath(p) for p in paths}
    return tuple(p.rstrip(os.sep) + os.sep for p in both)


_LIBS: tuple[str, ...] | None = None
_USER_BY_FILE: dict[str, bool] = {}  # module name -> is the user's, when judged by its file


def _module_is_user(name: str) -> bool:
    """The default judgement: a module whose file lies outside the standard
    library, site-packages and forkreload is the user's."""
    global _LIBS
    known = _USER_BY_FILE.get(name)
    if known is not None:
        return known
    mod = sys.modules.get(name)
    if mod is None:
        return False
    file = getattr(mod, "__file__", None)
    if not isinstance(file, str):
        user = False  # builtin or namespace package
    else:
        if _LIBS is None:
            _LIBS = _library_prefixes()
        user = not file.startswith(_LIBS) and not os.path.realpath(file).startswith(_LIBS)
    _USER_BY_FILE[name] = user
    return user


def _top(name: object) -> str:
    return name.partition(".")[0] if isinstance(name, str) else ""


# Values in a library's dict that carry a function or class of the user's.
_WRAPPERS: dict[type, Callable[[Any], object]] = {
    staticmethod: lambda v: v.__func__,
    classmethod: lambda v: v.__func__,
    property: lambda v: v.fget,
    types.MethodType: lambda v: v.__func__,
    functools.partial: lambda v: v.func,
    functools.cached_property: lambda v: v.func,
}


def _wrappers() -> dict[type, Callable[[Any], object]]:
    wrappers = _WRAPPERS
    accessor = getattr(sys.modules.get("pandas.core.accessor"), "Accessor", None) or getattr(sys.modules.get("pandas.core.accessor"), "CachedAccessor", None)
    if isinstance(accessor, type):  # pandas' register_*_accessor
        wrappers = dict(_WRAPPERS)
        wrappers[accessor] = lambda v: getattr(v, "_accessor", None)
    return wrappers


_IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE (Python 3.10+)
_USER_NAMES: tuple[int, frozenset[str]] = (-1, frozenset())


def _user_names() -> frozenset[str]:
    """The names of the user's modules among those imported, and __main__
    (judged again when the number of modules changed)."""
    global _USER_NAMES
    n = len(sys.modules)
    if _USER_NAMES[0] != n:
        _USER_NAMES = (n, frozenset([m for m in list(sys.modules) if _module_is_user(m)] + ["__main__"]))
    return _USER_NAMES[1]


def _patch_owners(namespace: Mapping[str, object], user: frozenset[str]) -> tuple[list[types.ModuleType], list[type]]:
    """The library modules and classes a cell could reasonably have patched:
    builtins, sys, warnings, threading and logging; the library modules the
    namespace holds (``pd``) and their public submodules one level down
    (``np.linalg``, their dicts only), the modules of library functions
    and classes it holds (``from scipy.optimize import minimize``); the
    public classes of the modules it holds and the library classes of
    its values (``df``), with their bases (``NDFrame``)."""
    held: dict[int, types.ModuleType] = {}
    classes: dict[int, type] = {}
    for name in ("builtins", "sys", "warnings", "threading", "logging"):
        mod = sys.modules.get(name)
        if mod is not None:
            held[id(mod)] = mod

    def add_class(cls: type) -> None:
        for c in cls.__mro__:
            # An immutable type (builtins, C and Cython extension types:
            # np.ndarray, np.float64) cannot be patched at all.
            if id(c) not in classes and not c.__flags__ & _IMMUTABLE_TYPE and c.__module__ not in user:
                classes[id(c)] = c

    for v in list(namespace.values()):
        t = type(v)
        if t is types.ModuleType:
            if v.__name__ not in user:  # type: ignore[attr-defined]
                held[id(v)] = v  # type: ignore[assignment]
            continue
        if t is types.FunctionType or isinstance(v, type):
            owner = sys.modules.get(getattr(v, "__module__", None) or "")
            if owner is not None and owner.__name__ not in user:
                held[id(owner)] = owner
            if isinstance(v, type):
                add_class(v)
            continue
        if t.__module__ != "builtins":
            add_class(t)
    modules = dict(held)
    for mod in held.values():
        # Public names only: a cell patches what it can name (pd.DataFrame,
        # np.linalg), and the private ones are most of a library's dicts.
        public = [v for k, v in vars(mod).items() if k[:1] != "_" and (type(v) is types.ModuleType or isinstance(v, type))]
        for v in public:
            if isinstance(v, type):
                if v.__module__ not in user:
                    add_class(v)
            elif _top(v.__name__) == _top(mod.__name__) and v.__name__ not in user:
                modules[id(v)] = v
    return list(modules.values()), list(classes.values())


# What the interpreter and IPython store in library modules on their own: the
# last error (its type may be a cell's class) and the last result.
_NOT_PATCHES = frozenset(
    [("sys", n) for n in ("last_type", "last_value", "last_traceback", "last_exc")] + [("builtins", n) for n in ("_", "__", "___")]
)


def _patches(namespace: Mapping[str, object], user: frozenset[str]) -> list[str]:
    lines = []
    modules, classes = _patch_owners(namespace, user)
    owners: list[tuple[str, Mapping[str, object]]] = [(m.__name__, vars(m)) for m in modules]
    owners += [(_name(c), c.__dict__) for c in classes]
    wrappers = _wrappers()
    wrapped = frozenset(wrappers)
    func, typ = types.FunctionType, type
    for owner, d in owners:
        # One type test per value, at comprehension speed: most are the
        # library's own functions.
        hits = [
            (k, v)
            for k, v in d.items()
            if (type(v) is func and v.__module__ in user) or type(v) in wrapped or (type(v) is not func and isinstance(v, typ))
        ]
        for attr, raw in hits:
            value = raw if isinstance(raw, (func, typ)) else wrappers[type(raw)](raw)
            where = getattr(value, "__module__", None)
            if where not in user:
                continue
            if attr.startswith("__") and attr.endswith("__") and not isinstance(raw, func):
                continue  # __class__ and the like
            if (owner, attr) in _NOT_PATCHES:
                continue
            if where == "__main__":
                lines.append(f"not carried: {owner}.{attr} patched from a cell")
            else:
                lines.append(f"not carried: {owner}.{attr} patched with {_name(value)} (kept only if importing {where} does it)")
    return lines


def _made_by(value: object, what: str, user: frozenset[str]) -> str | None:
    """The line for `what` when `value` is the user's, else None."""
    where = getattr(value, "__module__", None)
    if where not in user:
        return None
    if where == "__main__":
        return f"not carried: {what} from a cell"
    return f"not carried: {what} (kept only if importing {where} does it)"


def _registries(user: frozenset[str]) -> list[str]:
    """Entries the user added to library registries: copyreg's reducers and
    pandas' extension dtypes (pandas' accessors are class attributes, found
    with the patches)."""
    lines = []
    copyreg = sys.modules.get("copyreg")
    for cls, reducer in list(getattr(copyreg, "dispatch_table", {}).items()):
        line = _made_by(reducer, f"copyreg reducer for {_name(cls)}", user) or _made_by(cls, f"copyreg reducer for {_name(cls)}", user)
        if line:
            lines.append(line)
    registry = getattr(sys.modules.get("pandas.core.dtypes.base"), "_registry", None)
    for dtype in list(getattr(registry, "dtypes", [])):
        line = _made_by(dtype, f"pandas extension dtype {_name(dtype)} registered", user)
        if line:
            lines.append(line)
    return lines


def _handlers(user: frozenset[str]) -> list[str]:
    import logging

    lines = []
    loggers: list[tuple[str, logging.Logger]] = [("the root logger", logging.root)]
    loggers += [
        (f"logger {name!r}", lg)
        for name, lg in list(logging.root.manager.loggerDict.items())
        if isinstance(lg, logging.Logger) and lg.handlers and _top(name) not in _KERNEL_LOGGERS
    ]
    for where, lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.NullHandler:
                continue
            stream_mod = type(getattr(h, "stream", None)).__module__
            # A library adds handlers to its own loggers at import (which a
            # fresh worker repeats); one on the root logger, of the user's
            # class, or writing to the kernel's streams (made after the
            # kernel started) was added by the user.
            if lg is logging.root or type(h).__module__ in user or _top(stream_mod) == "ipykernel":
                lines.append(f"not carried: logging handler {type(h).__name__} on {where}")
    return lines


def _kernel_thread(t: threading.Thread) -> bool:
    if t is threading.main_thread() or isinstance(t, threading._DummyThread):  # a foreign thread: no Python code of the user started it
        return True
    cls_mod = type(t).__module__
    if _top(cls_mod) in _KERNEL_PACKAGES:
        return True
    target = getattr(t, "_target", None)
    return _top(getattr(target, "__module__", None)) in _KERNEL_PACKAGES


def user_threads(user_modules: Iterable[str]) -> list[str]:
    """The names of the threads the user's code started (not the kernel's,
    not a library's own thread class): what no new process or fork keeps."""
    user = frozenset([*user_modules, "__main__"])
    names = []
    for t in threading.enumerate():
        if _kernel_thread(t):
            continue
        cls_mod = type(t).__module__
        if cls_mod != "threading" and cls_mod not in user:
            continue  # a library's own thread class (tqdm's monitor): the library starts it as needed
        names.append(t.name)
    return names


def _threads(user: frozenset[str]) -> list[str]:
    return [f"not carried: thread {name!r} (threads do not survive a fresh worker)" for name in user_threads(user)]


def uncarried(namespace: Mapping[str, object] | None = None, user_modules: Iterable[str] | None = None) -> list[str]:
    """What a fresh worker loses that no setting carries: one ``not
    carried:`` line each (see the module docstring). Never raises."""
    if namespace is None:
        main = sys.modules.get("__main__")
        namespace = vars(main) if main is not None else {}
    lines: list[str] = []
    try:
        user = frozenset([*user_modules, "__main__"]) if user_modules is not None else _user_names()
    except Exception as exc:
        return [f"not carried: (forkreload could not check: {_short(exc)})"]
    parts: list[Callable[[], list[str]]] = [
        lambda: _patches(namespace, user),
        lambda: _registries(user),
        lambda: _handlers(user),
        lambda: _threads(user),
    ]
    for part in parts:
        try:
            lines += part()
        except Exception as exc:
            lines.append(f"not carried: (forkreload could not check: {_short(exc)})")
    return lines
