"""The forkreload agent inside each worker.

Installed in the worker's IPython shell as `__forkreload__` (hidden from the
user). It tells the controller which of the user's modules were imported
(and from which files), exports the user's namespace for migration, and on
the receiving side imports the user's modules fresh and loads the namespace.
The controller calls it with `forkreload_request` shell messages of its own
(see `protocol`): they run between cells like an execute would, without
IPython's cell machinery, so no history entry and no count change; each
call answers plain data (the TypedDicts in `protocol`).
The user's modules are imported through the agent's own loader (a path hook
for the user's directories), so the agent knows what each import really did:
the exact source it executed (read once, compiled from source, never from a
`.pyc`), the functions of the user's files that ran while its top level ran,
the module's state right after it, and the order in which cells first asked
for the user's modules. An in-place reload then refuses an edit to a
function that ran at some import and notes the module state it keeps that
the old code computed; an export names the module state a fresh worker will
not have; a fresh worker imports the modules in the order the cells asked.
A project file named like a standard or preloaded module is warned about,
once, in the cell that imports that name.
"""

from __future__ import annotations

import _imp
import builtins
import collections
import functools
import importlib
import importlib.machinery
import importlib.util
import marshal
import os
import re
import site
import stat
import sys
import sysconfig
import threading
import time
import traceback
import types
from typing import Any

from . import carry, checkpoint, migrate, notices, protocol, reload
from .watch import source_sha

__all__ = ["Agent", "install", "user_module_file", "user_variable_names", "watch_prefixes"]

_OUTPUT_NAME = re.compile(r"^_(i{1,3}|_{1,2}|\d+|i\d+|)$")
_FORKRELOAD_DIR = os.path.dirname(os.path.abspath(__file__))
# What every module namespace has: the interpreter's, not the user's (a
# user's own `__version__ = "1"` in a cell is theirs and travels).
_MODULE_DUNDERS = frozenset(
    {"__name__", "__doc__", "__package__", "__loader__", "__spec__", "__builtins__", "__builtin__", "__file__", "__cached__"}
)
# Dump entries that are the session's, not variables: results in Out, and
# the process-wide settings (`carry`).
_SESSION_ENTRY = "forkreload:"
_OUT_PREFIX = _SESSION_ENTRY + "Out:"
_SETTINGS_ENTRY = _SESSION_ENTRY + "settings"


def _output_number(value: object, outputs: dict[int, Any]) -> int | None:
    """The execution count whose result `value` is (for _, __, ___)."""
    for number in sorted(outputs, reverse=True):
        if outputs[number] is value:
            return number
    return None


def _restore_displayhook(shell: Any, ns: dict[str, Any]) -> None:
    # IPython's display hook keeps _, __ and ___ itself, and rotates them
    # into the namespace after each result only while the namespace holds
    # what it put there (pushed as hidden names): both must agree.
    hook = shell.displayhook
    for name in ("_", "__", "___"):
        if name in ns:
            setattr(hook, name, ns[name])
            shell.user_ns_hidden[name] = ns[name]


def _library_prefixes() -> tuple[str, ...]:
    paths = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(name)
        if p:
            paths.add(os.path.realpath(p))
    try:
        paths.update(os.path.realpath(p) for p in site.getsitepackages())
    except AttributeError:
        pass
    user_site = getattr(site, "USER_SITE", None)
    if user_site:
        paths.add(os.path.realpath(user_site))
    return tuple(p.rstrip(os.sep) + os.sep for p in paths)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return path.startswith(prefixes)


def watch_prefixes(watch: list[str]) -> tuple[str, ...]:
    return tuple(os.path.realpath(w).rstrip(os.sep) + os.sep for w in watch)


def user_module_file(mod: types.ModuleType, watch: tuple[str, ...], libs: tuple[str, ...] | None = None) -> str | None:
    """The module's source file when it is the user's code, else None.

    The user's code is everything outside the standard library and
    site-packages (editable installs and the project itself), plus whatever
    lies under the `watch` paths.
    """
    file = getattr(mod, "__file__", None)
    if not isinstance(file, str):
        return None
    path = _real_file(file)
    if path is None or path.startswith(_FORKRELOAD_DIR + os.sep):
        return None
    if _under(path, watch):
        return path
    if _under(path, _library_prefixes() if libs is None else libs):
        return None
    return path


def is_third_party(name: str, mod: types.ModuleType) -> bool:
    """A top-level, non-stdlib library: worth preloading next time."""
    if "." in name or name.startswith("_") or not getattr(mod, "__file__", None):
        return False
    return name not in getattr(sys, "stdlib_module_names", ()) and name != "forkreload"


# An import statement's start, in source text (a regex, not a parse: the
# user's modules a cell imported are looked at after it, and ast.parse of a
# 20,000-line module took 97 ms, the regex 9 ms). Names in parentheses
# continued on further lines are not seen: only learning is lost.
_IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import[ \t]+\(?([\w.,\t ]*)|import[ \t]+([\w.,\t ]+))", re.M)


def _library_submodules(sources: list[str | bytes], new: set[str]) -> list[str]:
    """The libraries' submodules that these sources' import statements name
    and that were imported since the last look (`new`): `import scipy.stats`,
    `from sklearn.linear_model import X`. A snapshot holding `sklearn` does
    not hold `sklearn.linear_model`: learned by name, it is preloaded too."""
    named: dict[str, None] = {}
    for source in sources:
        text = source.decode("latin-1") if isinstance(source, bytes) else source
        for module, names, plain in _IMPORT_LINE.findall(text):
            if module:
                named[module] = None
                named.update(dict.fromkeys(f"{module}.{n.split()[0]}" for n in names.split(",") if n.split()))
            else:
                named.update(dict.fromkeys(n.split()[0] for n in plain.split(",") if n.split()))
    found = []
    for name in named:
        top = name.partition(".")[0]
        if "." not in name or name not in new or not _public(name):
            continue
        mod, top_mod = sys.modules.get(name), sys.modules.get(top)
        if isinstance(mod, types.ModuleType) and isinstance(top_mod, types.ModuleType) and is_third_party(top, top_mod):
            found.append(name)
    return found


def library_modules() -> list[str]:
    """The libraries imported here, and their public submodules (what a
    snapshot tells the controller it holds)."""
    tops = {n for n, m in list(sys.modules.items()) if "." not in n and isinstance(m, types.ModuleType) and is_third_party(n, m)}
    return sorted(
        n for n, m in list(sys.modules.items())
        if isinstance(m, types.ModuleType) and n.partition(".")[0] in tops and _public(n)
    )


def _public(name: str) -> bool:
    """No part of the dotted module name is private (`_`)."""
    return not any(part.startswith("_") for part in name.split("."))


_REAL_DIRS: dict[str, str] = {}


def _real_file(file: str) -> str | None:
    """`os.path.realpath(file)` of a regular file (None: not one), with the
    folders' resolution cached (until `Agent.scan` clears it): a cell
    importing pandas brings ~600 modules in ~100 folders, and a full
    resolution of each file's path (an lstat per component) cost ~15 ms
    after that cell."""
    try:
        st = os.lstat(file)
    except (OSError, ValueError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return os.path.realpath(file) if os.path.isfile(file) else None
    if not stat.S_ISREG(st.st_mode):
        return None
    folder, sep, base = file.rpartition(os.sep)
    if not folder:
        folder = sep or os.curdir  # the root, or no folder at all
    real = _REAL_DIRS.get(folder)  # as written in __file__: usually the resolution's own key
    if real is None:
        real = _REAL_DIRS[folder] = _real_dir(os.path.abspath(folder))
    return os.path.join(real, base)


def _real_dir(folder: str) -> str:
    """`os.path.realpath` of an absolute, normalized folder, built on its
    parent's cached resolution: one lstat per new folder, not one per
    component (the ~60 folders a cell importing pandas brings took ~900)."""
    real = _REAL_DIRS.get(folder)
    if real is None:
        parent, name = os.path.split(folder)
        if not name:
            real = folder  # the root
        else:
            real = os.path.join(_real_dir(parent), name)
            try:
                link = stat.S_ISLNK(os.lstat(real).st_mode)
            except (OSError, ValueError):
                link = False  # gone: realpath keeps such a name as it is
            if link:
                real = os.path.realpath(real)
        _REAL_DIRS[folder] = real
    return real


def user_variable_names(shell: Any) -> list[str]:
    """The names in `user_ns` that the user made, not IPython's own (the
    outputs `_N`, `_`, `__`, `___` travel with `Out`)."""
    hidden = shell.user_ns_hidden
    missing = object()
    names = []
    results = {id(v) for v in shell.history_manager.output_hist.values()}
    for name, value in shell.user_ns.items():
        if name in _MODULE_DUNDERS or hidden.get(name, missing) is value:
            continue
        if _OUTPUT_NAME.match(name) and (name.startswith("_i") or id(value) in results or (isinstance(value, str) and value == "")):
            continue  # IPython's own: input history, or a result kept in Out
        names.append(name)
    return names


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# How unpickling says that the new code lacks what a value refers to.
_MISSING_ATTRIBUTE = re.compile(r"Can't (?:get|find) attribute '([^']+)' on <module '([^']+)'")
_MISSING_MODULE = re.compile(r"No module named '([^']+)'")


def _rebuild_failure(why: str) -> str:
    """Why a variable cannot be rebuilt, in the user's terms."""
    m = _MISSING_ATTRIBUTE.search(why)
    if m:
        return f"refers to {m.group(2)}.{m.group(1)}, which no longer exists"
    m = _MISSING_MODULE.search(why)
    if m:
        return f"needs module {m.group(1)}, which no longer exists"
    return f"cannot be rebuilt with the new code ({why})"


def _user_traceback(exc: BaseException) -> str:
    """The traceback of the user's own code, without forkreload or importlib."""
    if isinstance(exc, SyntaxError):
        where = f"{os.path.basename(exc.filename or '?')}, line {exc.lineno}"
        return f"{where}: {exc.msg}"
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(_FORKRELOAD_DIR) and "importlib" not in f.filename
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()


# -- what an import did ---------------------------------------------------------

# Module state is fingerprinted right after a module's import and compared
# before a reload. Per module-level name: the value itself for small scalars,
# else its identity; for dicts, lists, sets and deques also their length and,
# up to _SMALL items, the identities of their items. The cost is bounded by
# (number of module-level names) + _SMALL per container: no deep hashing.
_SMALL = 256
_SCALARS = (int, float, complex, bool, type(None), str, bytes)
_CONTAINERS = (dict, list, set, collections.deque)
# Module names that projects use for their own files (a package's __main__.py,
# a test.py) and that nothing else imports: shadowing them is harmless.
_HARMLESS_SHADOWS = frozenset({"test", "this", "antigravity", "__main__"})
# Code objects name their class and enclosing functions from 3.11 on; before,
# only the bare name is known and is matched as such (more conservative).
_BARE_NAMES = sys.version_info < (3, 11)
# The flags of a .pyc checked against its source's hash (PEP 552).
_HASH_PYC = (0b11).to_bytes(4, "little")


def _value_state(value: object) -> tuple[Any, ...]:
    t = type(value)
    if t in _SCALARS and (t not in (str, bytes) or len(value) <= _SMALL):  # type: ignore[arg-type]
        return ("=", t, value)
    if isinstance(value, _CONTAINERS):
        try:
            n = len(value)
            items = None
            if n <= _SMALL:
                if isinstance(value, dict):
                    items = hash(tuple((id(k), id(v)) for k, v in value.items()))
                elif isinstance(value, set):
                    items = hash(frozenset(map(id, value)))
                else:
                    items = hash(tuple(map(id, value)))
        except Exception:  # resized by another thread, or a subclass whose len() or items() fails
            return ("id", id(value))
        return ("c", id(value), n, items)
    return ("id", id(value))


def module_state(mod: types.ModuleType) -> dict[str, tuple[Any, ...]]:
    """A cheap fingerprint of the module's top-level names and mutable state."""
    out = {}
    for k, v in list(vars(mod).items()):
        if not (k.startswith("__") and k.endswith("__")):
            out[k] = _value_state(v)
    return out


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def state_changes(mod: types.ModuleType, before: dict[str, tuple[Any, ...]]) -> list[tuple[str, str]]:
    """(name, what happened) for the module's state that differs from its import.

    Names a fresh import would not change are left out: submodules bound by
    later imports, functions and classes the module itself defines (added
    in place).
    """
    name = mod.__name__
    now = vars(mod)
    out = []
    for k, v in list(now.items()):
        if k.startswith("__") and k.endswith("__"):
            continue
        old = before.get(k)
        if old is None:
            if isinstance(v, types.ModuleType) and v.__name__.startswith(name + "."):
                continue
            if isinstance(v, (types.FunctionType, type)) and getattr(v, "__module__", None) == name:
                continue
            out.append((k, "attribute set from a cell"))
            continue
        new = _value_state(v)
        if new == old:
            continue
        if old[0] == "c" and new[0] == "c" and old[1] == new[1]:
            grown = new[2] - old[2]
            if grown > 0:
                out.append((k, f"{_entries(grown)} added from a cell"))
            elif grown < 0:
                out.append((k, f"{_entries(-grown)} removed from a cell"))
            else:
                out.append((k, "entries changed from a cell"))
        else:
            out.append((k, "attribute set from a cell"))
    for k in before:
        if k not in now:
            out.append((k, "deleted from a cell"))
    return out


def _shown_file(path: str) -> str:
    base = os.path.basename(path)
    if base == "__init__.py":
        return os.path.join(os.path.basename(os.path.dirname(path)), base)
    return base


class _ImportTrace:
    """Which functions of the user's files ran while each user module's top level ran.

    On Python 3.12+ through sys.monitoring (PY_START, disabled at once for
    every code object that is not the user's, so a library imported by a user
    module costs next to nothing after its first call); before that through
    sys.setprofile. Only the main thread is traced, and only while a user
    module's import is running.
    """

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files  # co_filename of code compiled by the agent -> real path
        self.stack: list[str] = []  # user modules whose top level is running, innermost last
        self.ran: dict[str, set[types.CodeType]] = {}
        self.tool: int | None = None
        self._profiling = False
        mon = getattr(sys, "monitoring", None)
        if mon is not None:
            for tool in (4, 3):  # the ids no standard tool claims
                if mon.get_tool(tool) is None:
                    mon.use_tool_id(tool, "forkreload")
                    mon.register_callback(tool, mon.events.PY_START, self._py_start)
                    self.tool = tool
                    break

    def _py_start(self, code: types.CodeType, offset: int) -> Any:
        if code.co_filename in self.files:
            if self.stack:
                self.ran[self.stack[-1]].add(code)
            return None
        return sys.monitoring.DISABLE  # type: ignore[attr-defined]

    def _profile(self, frame: types.FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename in self.files:
            self.ran[self.stack[-1]].add(frame.f_code)

    def enter(self, name: str) -> bool:
        """Trace `name`'s top level; False when it cannot be traced (another profiler)."""
        if not self.stack:
            if self.tool is not None:
                sys.monitoring.set_events(self.tool, sys.monitoring.events.PY_START)  # type: ignore[attr-defined]
            elif sys.getprofile() is None:
                sys.setprofile(self._profile)
                self._profiling = True
            else:
                return False
        elif self.tool is None and not self._profiling:
            return False
        self.stack.append(name)
        self.ran[name] = set()
        return True

    def leave(self) -> None:
        self.stack.pop()
        if not self.stack:
            if self.tool is not None:
                sys.monitoring.set_events(self.tool, 0)  # type: ignore[attr-defined]
            elif self._profiling:
                sys.setprofile(None)
                self._profiling = False

    def take(self, name: str) -> set[tuple[str, str]]:
        """(real file, qualified name) of what ran during `name`'s top level."""
        codes = self.ran.pop(name, set())
        # co_qualname is 3.11+; on 3.10 the bare name is matched, which can
        # only make the answer more conservative.
        return {(self.files[c.co_filename], getattr(c, "co_qualname", c.co_name)) for c in codes}


class _UserSourceLoader(importlib.machinery.SourceFileLoader):
    """The loader of the user's modules: always from the source, recorded by the agent."""

    agent: Agent

    def get_code(self, fullname: str) -> types.CodeType:
        # Read once and run that: the bytes recorded are the bytes that run.
        # A timestamp .pyc (stale at the same mtime and size) is never used;
        # a hash-checked one (PEP 552) of these very bytes is, as compiling
        # a large project again at every fresh worker would cost seconds.
        __tracebackhide__ = True
        path = self.get_filename(fullname)
        data = self.get_data(path)
        self.agent._source_read(fullname, path, data)
        source_hash = importlib.util.source_hash(data)
        try:
            cached = importlib.util.cache_from_source(path)
        except (NotImplementedError, ValueError):
            cached = None
        if cached is not None:
            try:
                pyc = self.get_data(cached)
            except OSError:
                pyc = b""
            # magic, flags (hash-based | check source), the source's hash, the code
            if pyc[:4] == importlib.util.MAGIC_NUMBER and pyc[4:8] == _HASH_PYC and pyc[8:16] == source_hash:
                try:
                    code = marshal.loads(pyc[16:])
                except (ValueError, EOFError, TypeError):
                    code = None
                if isinstance(code, types.CodeType):
                    _imp._fix_co_filename(code, path)  # type: ignore[attr-defined]  # as importlib does: the path it was found at
                    return code
        code = self.source_to_code(data, path)
        if cached is not None and not sys.dont_write_bytecode:
            try:
                self.set_data(cached, importlib.util.MAGIC_NUMBER + _HASH_PYC + source_hash + marshal.dumps(code))
            except (OSError, NotImplementedError):
                pass
        return code

    def exec_module(self, module: types.ModuleType) -> None:
        __tracebackhide__ = True  # IPython leaves this frame out of the user's tracebacks
        self.agent._run_import(module, super().exec_module)


class Agent:
    """State and entry points of forkreload inside one worker."""

    def __init__(self, kernel: Any, cwd: str, watch: list[str]) -> None:
        self.kernel = kernel
        self.shell = kernel.shell
        self.key: bytes = kernel.session.key
        self.cwd = os.path.realpath(cwd)
        self.watch = watch_prefixes(watch)
        self.libs = _library_prefixes()
        # Everything imported so far (snapshot, kernel start) is not the user's.
        self.seen: set[str] = set(sys.modules)
        # What the snapshot and the kernel imported: a project file named
        # like one of these is shadowed (the user's own modules come later).
        self.preloaded: frozenset[str] = frozenset(n.partition(".")[0] for n in sys.modules)
        self._nmods = len(sys.modules)
        # name -> {"file", "sha", "source"}: the source as it was executed
        self.user_modules: dict[str, dict[str, Any]] = {}
        self._new_third_party: list[str] = []
        # Filled by the agent's loader as the user's modules are imported.
        self._main_thread = threading.get_ident()
        self._read: dict[str, tuple[str, bytes]] = {}  # name -> (real path, bytes) compiled, not yet run
        self._imported: dict[str, dict[str, Any]] = {}  # imports finished since the last scan
        self._code_files: dict[str, str] = {}  # co_filename of the user's code -> real path
        self.trace = _ImportTrace(self._code_files)
        # real path -> qualified name -> the module whose top level ran it
        self.import_ran: dict[str, dict[str, str]] = {}
        self.untraced: set[str] = set()  # imports not traced (another profiler, another thread)
        self.states: dict[str, dict[str, tuple[Any, ...]]] = {}  # name -> module_state() right after its import
        self.requested: list[str] = []  # user modules the cells asked for, in order
        self._depth = 0  # user module imports in progress (main thread)
        self._shadows: dict[str, str] = {}  # module name -> the warning its project file deserves
        self._warned: set[str] = set()
        # Checkpoints: whether a cell changed the state since the last one
        # (a worker fresh from a swap holds what the old one's last checkpoint
        # or state held), whether the last cell succeeded, and the pids forked.
        self.dirty = False
        self.last_ok = True
        self.checkpoint_pids: list[int] = []

    # -- module tracking -------------------------------------------------

    def is_user_module(self, mod: types.ModuleType) -> str | None:
        """The module's file when it is one of the user's modules, else None."""
        return user_module_file(mod, self.watch, self.libs)

    def scan(self, code: str | None = None) -> list[dict[str, Any]]:
        """Record modules imported since the last scan; return new user modules.
        `code`: the cell that ran; its import statements, and those of the
        user modules it imported, are looked at for libraries' submodules
        (not in a scan between cells: a new worker's imports were learned
        by the cells of the workers before it)."""
        if not self._imported and len(sys.modules) == self._nmods:
            return []
        # Folders resolved afresh for each look: a link may point elsewhere
        # now (a project switched to another checkout between cells).
        _REAL_DIRS.clear()
        found = []
        new = [n for n in list(sys.modules) if n not in self.seen]
        sources: list[str | bytes] | None = None if code is None else [code]
        if self._imported:
            done, self._imported = self._imported, {}
            for name, entry in done.items():
                if name not in sys.modules:  # an importer failed and took it out
                    continue
                self.seen.add(name)
                self.user_modules[name] = entry
                found.append({k: entry[k] for k in ("name", "file", "sha")})
                if sources is not None:
                    sources.append(entry["source"])
        for name in new:
            if name in self.seen:
                continue
            self.seen.add(name)
            mod = sys.modules.get(name)
            if mod is None:
                continue
            path = self.is_user_module(mod)
            if path is None:
                if is_third_party(name, mod):
                    self._new_third_party.append(name)
                continue
            # Not imported through the agent's loader (spec_from_file_location,
            # an import from another thread before install): the file now is
            # the best record there is.
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            entry = {"name": name, "file": path, "sha": source_sha(data)}
            self.user_modules[name] = dict(entry, source=data)
            found.append(entry)
            if sources is not None:
                sources.append(data)
        if sources:
            # (A package of the user's is never a library, wherever it lies.)
            subs = _library_submodules(sources, set(new))
            self._new_third_party += [n for n in subs if self.is_user_module(sys.modules[n]) is None]
        self._nmods = len(sys.modules)
        _REAL_DIRS.clear()  # the next cell's path hooks resolve afresh too
        return found

    # -- the agent's loader ------------------------------------------------------

    def _user_dir(self, path: str) -> bool:
        real = _real_dir(os.path.abspath(path)) + os.sep
        if real.startswith(_FORKRELOAD_DIR + os.sep):
            return False
        return _under(real, self.watch) or not _under(real, self.libs)

    def _path_hook(self, path: str) -> importlib.machinery.FileFinder:
        """sys.path_hooks entry: the user's directories load through the agent."""
        where = path or os.getcwd()
        if not os.path.isdir(where) or not self._user_dir(where):
            raise ImportError("not one of the user's directories")
        m = importlib.machinery
        return m.FileFinder(
            path,
            (m.ExtensionFileLoader, m.EXTENSION_SUFFIXES),
            (_UserSourceLoader, m.SOURCE_SUFFIXES),
            (m.SourcelessFileLoader, m.BYTECODE_SUFFIXES),
        )

    def _source_read(self, name: str, path: str, data: bytes) -> None:
        real = self._code_files.get(path) or os.path.realpath(path)
        self._code_files[path] = real
        self._read[name] = (real, data)

    def _run_import(self, module: types.ModuleType, run: Any) -> None:
        """Run a user module's top level, recording what it ran and left."""
        __tracebackhide__ = True
        name = module.__name__
        main = threading.get_ident() == self._main_thread
        traced = False
        before: dict[str, dict[str, tuple[Any, ...]]] | None = None
        if main:
            if self._depth == 0:
                if name not in self.requested:
                    self.requested.append(name)
                before = self._current_states()
            self._depth += 1
            traced = self.trace.enter(name)
        try:
            run(module)
        finally:
            ran = None
            if traced:
                ran = self.trace.take(name)
                self.trace.leave()
            if main:
                self._depth -= 1
                if before is not None:
                    self._absorb_import_changes(before)
        read = self._read.pop(name, None)
        if read is not None:
            real, data = read
            self._imported[name] = {"name": name, "file": real, "sha": source_sha(data), "source": data}
        self.states[name] = module_state(module)
        if ran is None:
            self.untraced.add(name)
            return
        self.untraced.discard(name)
        for file, qualname in ran:
            self.import_ran.setdefault(file, {}).setdefault(qualname, name)

    def _current_states(self) -> dict[str, dict[str, tuple[Any, ...]]]:
        return {n: module_state(sys.modules[n]) for n in self.states if n in sys.modules}

    def _absorb_import_changes(self, before: dict[str, dict[str, tuple[Any, ...]]]) -> None:
        """What an import changed in other user modules (a plugin registering
        itself) a fresh import does too: it becomes their baseline, unless a
        cell had changed them already. Cost: two fingerprints of every user
        module per import a cell asks for (not per module imported)."""
        for name, now in self._current_states().items():
            pre = before.get(name)
            if pre is None or (now != pre and pre == self.states[name]):
                self.states[name] = now

    def _ran_at_import(self, name: str, decision: reload.Decision) -> str | None:
        """Why an in-place patch of `name` is not enough: a changed function ran at some import."""
        changed = [c.qualname for c in decision.plan if c.action == "patch" and c.detail in ("body", "signature")]
        if not changed:
            return None
        if self.untraced:
            # Rare (an import under the user's profiler, or in another thread):
            # what that import ran is unknown, so nothing can be ruled out.
            other = sorted(self.untraced)[0]
            file = self.user_modules.get(other, {}).get("file") or other
            return f"what {_shown_file(file)}'s import ran is unknown (another profiler or thread was active)"
        ran = self.import_ran.get(self.user_modules[name]["file"])
        if not ran:
            return None
        for qualname in changed:
            last = qualname.rpartition(".")[2]
            for ran_name, importer in ran.items():
                # A function nested in the changed one ran too ('f.<locals>.g').
                if ran_name == qualname or ran_name.startswith(qualname + ".") or (_BARE_NAMES and ran_name == last):
                    file = self.user_modules.get(importer, {}).get("file") or importer
                    return f"{_shown_file(file)}'s import ran {name}.{qualname}"
        return None

    def _state_notes(self, patched: list[str]) -> list[str]:
        """What an in-place patch keeps that a fresh import would not have:
        the user modules' state changed since their import (by the cells, or
        by the old code of a patched module)."""
        notes = []
        for name in self.user_modules:
            mod, before = sys.modules.get(name), self.states.get(name)
            if mod is None or before is None:
                continue
            for attr, what in state_changes(mod, before):
                value = vars(mod).get(attr)
                if name in patched and isinstance(value, _CONTAINERS) and len(value):
                    notes.append(f"kept {name}.{attr} ({_entries(len(value))} computed by the old code)")
                else:
                    notes.append(f"kept {name}.{attr} ({what})")
        return notes

    def _state_reset(self) -> list[str]:
        """Module state a fresh import will not have: set, filled or deleted since the import."""
        out: list[str] = []
        for name in self.user_modules:
            mod, before = sys.modules.get(name), self.states.get(name)
            if mod is None or before is None:
                continue
            out.extend(f"reset {name}.{attr} ({what})" for attr, what in state_changes(mod, before))
        return out

    # -- project files named like library modules --------------------------------

    def _find_shadows(self) -> None:
        """The user's files named like a standard or preloaded module."""
        stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
        preloaded = self.preloaded - stdlib
        dirs = []
        for p in sys.path:
            where = os.path.realpath(p or os.getcwd())
            if where not in dirs and os.path.isdir(where) and self._user_dir(where):
                dirs.append(where)
        for d in dirs:
            try:
                entries = os.listdir(d)
            except OSError:
                continue
            for entry in entries:
                name, ext = os.path.splitext(entry)
                if name in self._shadows or name in _HARMLESS_SHADOWS or (name not in stdlib and name not in preloaded):
                    continue
                if ext == ".py":
                    shown = entry
                elif not ext and os.path.isfile(os.path.join(d, entry, "__init__.py")):
                    shown = entry + "/"
                else:
                    continue
                self._shadows[name] = notices.shadow_text(shown, name, stdlib=name in stdlib)

    def _warn_shadows(self, found: list[dict[str, Any]], cell: str) -> None:
        """Once per name: the cell imported a name that one of the project's files shadows."""
        for name, text in self._shadows.items():
            if name in self._warned:
                continue
            hit = any(m["name"].partition(".")[0] == name for m in found)
            if not hit and name in cell:
                hit = re.search(
                    rf"(?m)^[ \t]*(?:from[ \t]+{re.escape(name)}\b|import[ \t]+(?:[\w.]+(?:[ \t]+as[ \t]+\w+)?[ \t]*,[ \t]*)*{re.escape(name)}\b)",
                    cell,
                ) is not None
            if hit:
                self._warned.add(name)
                # A notice of this cell's, like the controller's own.
                self.kernel.session.send(
                    self.kernel.iopub_socket, "stream", {"name": "stderr", "text": text + "\n"},
                    parent=self.kernel.get_parent("shell"), ident=b"stream",
                    metadata={protocol.REPLY_METADATA_KEY: protocol.TAG_NOTICE},
                )

    def _post_run_cell(self, result: Any = None) -> None:
        cell = getattr(getattr(result, "info", None), "raw_cell", None) or ""
        code = cell  # the import lines are found in the cell as typed
        if not self.dirty:
            try:
                code = self.shell.transform_cell(cell)
            except Exception:
                pass
        found = self.scan(code)
        self.last_ok = bool(getattr(result, "success", True))
        if not self.dirty:
            self.dirty = not checkpoint.trivial_cell(code)
        if "import" in cell:
            # A file may have been created since the last look (a listdir of
            # the project's directories, only for cells that import).
            self._find_shadows()
        if self._shadows and len(self._warned) < len(self._shadows):
            self._warn_shadows(found, cell)
        third, self._new_third_party = self._new_third_party, []
        if found or third:
            self._tell_controller(protocol.MODULES_EVENT, {"modules": found, "third_party": third})

    def _tell_controller(self, msg_type: str, content: dict[str, Any]) -> None:
        """An iopub message the controller takes for itself (never forwarded)."""
        self.kernel.session.send(
            self.kernel.iopub_socket, msg_type, content, parent=self.kernel.get_parent("shell"), ident=b"forkreload"
        )

    def modules(self) -> protocol.ModulesAnswer:
        """The user modules known so far (scans first)."""
        self.scan()
        return {"modules": [{"name": n, "file": e["file"], "sha": e["sha"]} for n, e in self.user_modules.items()]}

    # -- migration: the old worker's side ----------------------------------

    def export(self, path: str) -> protocol.ExportAnswer:
        """Dump the user's namespace and session state next to `path`.

        The answer's `reset` names the user modules' state that differs from
        what their import produced, which a fresh worker will not have.
        """
        t0 = time.perf_counter()
        self.scan()
        ns = self.shell.user_ns
        names = user_variable_names(self.shell)
        # The outputs (Out, _N, _, __, ___) travel as values of their own,
        # pickled with the variables so that one shared with a variable
        # stays one object.
        outputs = {f"{_OUT_PREFIX}{n}": v for n, v in self.shell.history_manager.output_hist.items()}
        values = {**{n: ns[n] for n in names}, **outputs, _SETTINGS_ENTRY: carry.capture()}
        hm = self.shell.history_manager
        meta = {
            "execution_count": self.shell.execution_count,
            "history_raw": list(hm.input_hist_raw),
            "history_parsed": list(hm.input_hist_parsed),
            "last_outputs": [_output_number(ns.get(k), hm.output_hist) for k in ("_", "__", "___")],
            "cwd": os.getcwd(),
            "sys_path": list(sys.path),
            "environ": dict(os.environ),
            "modules": list(self.user_modules),
            "requested": [n for n in self.requested if n in self.user_modules],
        }
        dump = migrate.dump_namespace(values, list(values), self.key, path, globals_ns=ns, meta=meta)
        lost = {k: v for k, v in dump.lost.items() if not k.startswith(_SESSION_ENTRY)}
        dropped = sum(k.startswith(_OUT_PREFIX) for k in dump.lost)
        if dropped:
            # Out keeps every result: name the loss, not each value.
            lost["Out"] = f"{dropped} of {len(outputs)} results cannot be pickled and were dropped"
        return {
            "ok": True,
            "saved": dump.saved,
            "lost": lost,
            "groups": [g for g in dump.groups if len(g) > 1],
            "inband_bytes": dump.inband_bytes,
            "buffer_bytes": dump.buffer_bytes,
            "reset": self._state_reset() + carry.uncarried(ns, list(self.user_modules)),
            "seconds": round(time.perf_counter() - t0, 4),
        }

    def _release_export(self, info: Any = None) -> None:
        """A cell runs here again (the swap failed, or `%forkreload back`):
        the fresh worker, if any, has its copy of what the last export left
        for it, so that (buffers kept for reading in place, memfds) is no
        longer this worker's to hold."""
        migrate.release_exports()

    # -- migration: the new worker's side ----------------------------------

    def load(self, path: str, changed_files: list[str]) -> protocol.LoadAnswer:
        """Become the session: restore cwd, sys.path and environment, import
        the user's modules fresh, then load what can be rebuilt of the
        namespace dumped at `path`.

        A module that fails to import fails the whole load (the old worker
        stays, as a fresh process would stop there too). A variable that
        cannot be rebuilt with the new code (it names a function that was
        renamed, a module that was deleted) is left out and named with the
        reason: code new wins over one value.
        """
        t0 = time.perf_counter()
        dump = migrate.Dump(path, self.key)
        meta = dump.meta
        os.environ.clear()
        os.environ.update(meta["environ"])
        try:
            os.chdir(meta["cwd"])
        except OSError:
            pass
        sys.path[:] = meta["sys_path"]
        for file in changed_files:
            # The agent's loader never reads a .pyc, but a plain `python` run
            # here would: one written within the same second as the edit, at
            # the same size, passes its mtime check and loads stale code.
            try:
                os.unlink(importlib.util.cache_from_source(file))
            except (OSError, ValueError, NotImplementedError):
                pass
        importlib.invalidate_caches()
        gone = []
        # In the order the cells first asked for them, as a fresh process
        # running the cells would (a circular import then fails as it would
        # there); their own imports follow from them.
        order = list(dict.fromkeys(meta.get("requested", []) + meta["modules"]))
        for name in order:
            if name in sys.modules:
                continue
            if not _findable(name):
                # Its file was deleted or moved: a fresh process could not
                # import it either. Values that need it are named below.
                gone.append(name)
                continue
            try:
                importlib.import_module(name)
            except BaseException as exc:
                return {"ok": False, "module": name, "error": _user_traceback(exc)}
        self.scan()
        ns = self.shell.user_ns
        res = dump.load(ns)
        outputs = {int(k[len(_OUT_PREFIX):]): v for k, v in res.values.items() if k.startswith(_OUT_PREFIX)}
        ns.update({k: v for k, v in res.values.items() if not k.startswith(_SESSION_ENTRY)})
        # After the modules and the values: carried settings win over what
        # an import set, and name classes that exist by now.
        notes = carry.apply(res.values.get(_SETTINGS_ENTRY, {}))
        self.shell.execution_count = meta["execution_count"]
        hm = self.shell.history_manager
        hm.input_hist_raw[:] = meta["history_raw"]
        hm.input_hist_parsed[:] = meta["history_parsed"]
        hm.output_hist.update(outputs)
        ns.update({f"_{n}": v for n, v in outputs.items()})
        for name, number in zip(("_", "__", "___"), meta.get("last_outputs", []), strict=False):
            if number in outputs:
                ns[name] = outputs[number]
        _restore_displayhook(self.shell, ns)
        failed = {name: _rebuild_failure(why) for name, why in res.failed.items() if not name.startswith(_SESSION_ENTRY)}
        dropped = sum(k.startswith(_OUT_PREFIX) for k in res.failed)
        if dropped:
            failed["Out"] = f"{dropped} results cannot be rebuilt with the new code and were dropped"
        return {
            "ok": True,
            "loaded": [n for n in res.loaded if not n.startswith(_SESSION_ENTRY)],
            "failed": failed,
            "notes": notes,
            "gone": gone,
            "modules": self.modules()["modules"],
            "seconds": round(time.perf_counter() - t0, 4),
        }

    # -- in place ------------------------------------------------------------

    def inplace(self, files: list[str], mode: str) -> protocol.ReloadAnswer:
        """Decide, for the edited files, in place or fresh; patch when in place.

        Answers (`protocol.ReloadAnswer`):
        - kind 'error': some file does not parse or decode; `reasons` has
          each such error (as Python shows it, naming the file); nothing
          was changed, the old code keeps running;
        - kind 'fresh': `reasons`, every reason of every module and file
          that rules out in place (the controller folds them for display);
        - kind 'inplace', or 'partial' in mode 'inplace' when some modules
          could not be patched (left as they are, `reasons` says why):
          `patched` and `added` (dotted names, every module), `files` (path
          -> new sha), `seconds`, `notes` (what a fresh process would not
          have kept: generators and closures still running old code, cell
          star imports that miss added names, caches, module state the old
          code computed) and `cleared`
          (dotted name -> entries dropped from functools caches).
        """
        t0 = time.perf_counter()
        by_file: dict[str, list[str]] = {}
        for name, entry in self.user_modules.items():
            by_file.setdefault(entry["file"], []).append(name)
        edits: list[tuple[types.ModuleType, reload.Decision]] = []
        refused: list[str] = []
        errors: list[str] = []
        new_sources: dict[str, bytes] = {}
        classes: list[type] = []  # the user's classes, found once when a patch needs them
        for path in files:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                refused.append(f"{os.path.basename(path)}: file removed")
                continue
            new_sources[path] = data
            text, undecodable = reload.decode_source(data, path)
            if text is None:
                errors.append(str(undecodable))
                continue
            for name in by_file.get(path, []):
                mod = sys.modules.get(name)
                if mod is None:
                    refused.append(f"{name}: no longer imported")
                    continue
                old, _why = reload.decode_source(self.user_modules[name]["source"], path)
                if old is None:
                    refused.append(f"{os.path.basename(path)}: the source {name} was imported from cannot be read")
                    continue
                decision = reload.classify(mod, old, text)
                if decision.kind == "error":
                    errors.extend(decision.reasons)
                    break  # the same file under another module name: the same error
                if decision.kind == "fresh":
                    refused.extend(decision.reasons)
                    continue
                ran = self._ran_at_import(name, decision)
                elsewhere = self._used_elsewhere(name, decision) + ([ran] if ran else []) + self._hashes_would_change(decision, classes)
                if elsewhere:
                    refused.extend(elsewhere)  # in mode 'inplace' this module is left as it is
                    continue
                edits.append((mod, decision))
        if errors:
            return {"kind": "error", "reasons": list(dict.fromkeys(errors))}
        refused = list(dict.fromkeys(refused))  # a file imported under two names says it once
        if refused and mode != "inplace":
            return {"kind": "fresh", "reasons": refused}
        replaced = reload.replaced_code(edits)  # before the patch swaps them out
        caches = self._user_caches()  # sizes before the plans clear some
        try:
            reload.apply_plans(edits)
        except reload.PatchError as exc:
            return {"kind": "fresh", "reasons": [f"{exc} (rolled back)"]}
        applied_files = {}
        for mod, _d in edits:
            entry = self.user_modules[mod.__name__]
            data = new_sources[entry["file"]]
            entry["source"] = data
            entry["sha"] = source_sha(data)
            applied_files[entry["file"]] = entry["sha"]
        patched = [
            f"{d.module}.{c.qualname}" for _m, d in edits for c in d.plan
            if c.action == "patch" and c.detail in ("body", "signature")
        ]
        added = [f"{d.module}.{c.qualname}" for _m, d in edits for c in d.plan if c.action == "add"]
        notes = [note for _m, d in edits for note in d.notes]
        notes += self._state_notes([m.__name__ for m, d in edits if d.kind == "inplace"])
        cleared: dict[str, int] = {}
        if patched or added:
            # A function added under a new name changes what no existing code
            # runs, unless it shadows a builtin or an inherited method.
            changes_results = bool(patched) or any(self._shadows_existing(c) for _m, d in edits for c in d.plan if c.action == "add")
            more, cleared = self._after_patch(edits, replaced, caches if changes_results else None)
            notes += more
        return {
            "kind": "partial" if refused else "inplace",
            "reasons": refused,
            "patched": patched,
            "added": added,
            "files": applied_files,
            "notes": notes,
            "cleared": cleared,
            "seconds": round(time.perf_counter() - t0, 5),
        }

    def _after_patch(
        self, edits: list[tuple[types.ModuleType, reload.Decision]], replaced: dict[int, tuple[types.CodeType, str]],
        caches: dict[int, tuple[Any, int]] | None,
    ) -> tuple[list[str], dict[str, int]]:
        """What differs from a fresh process once the patch is in: cleared caches, and notes on what was kept.

        Every functools cache of the user's modules in `caches` (None: the
        edit changes no existing code's results) is emptied, as a fresh
        import would leave it: any of them may hold results of the patched
        code (a cached function calling it, or handed it as an argument).
        Caches of functions defined in cells are values of the session: kept
        and named. Generators and closures in the user's variables that run
        replaced code, and cells that star-imported a module that gained
        names, are named.
        """
        cleared: dict[str, int] = {}
        for wrapper, size in (caches or {}).values():
            wrapper.cache_clear()
            if size:
                cleared[f"{wrapper.__module__}.{wrapper.__qualname__}"] = size
        notes = [f"cleared the cache of {k} ({v} {'entry' if v == 1 else 'entries'} computed before the edit)"
                 for k, v in cleared.items()]
        user_ns = self.shell.user_ns
        variables = {k: user_ns[k] for k in user_variable_names(self.shell) if k in user_ns}
        for key, value in variables.items() if caches is not None else ():
            if type(value) is functools._lru_cache_wrapper and caches is not None and id(value) not in caches and value.cache_info().currsize:
                notes.append(f"{key}: kept its cache ({value.cache_info().currsize} entries, "
                             "which may hold results of the old code)")
        notes.extend(reload.kept_old_code(variables, replaced))
        for name in self.user_modules:  # what a cell's call stored in a module (`m._stream = m.read()`)
            module = sys.modules.get(name)
            if module is not None and replaced:
                own = {f"{name}.{k}": v for k, v in list(vars(module).items()) if not k.startswith("__")}
                notes.extend(reload.kept_old_code(own, replaced))
        notes.extend(reload.threads_running_old_code(replaced))
        cells = "\n".join(str(c) for c in (user_ns.get("In") or [])[1:])
        for module, decision in edits:
            new_names = {c.qualname for c in decision.plan if c.action == "add" and "." not in c.qualname}
            exported = sorted(reload.star_exports(module, new_names))
            if exported and re.search(rf"^\s*from\s+{re.escape(module.__name__)}\s+import\s+\*", cells, re.M):
                names = ", ".join(f"{module.__name__}.{n}" for n in exported)
                notes.append(f"a cell ran `from {module.__name__} import *` before {names} existed: "
                             "run it again to bind the new names")
        return notes, cleared

    def _hashes_would_change(self, decision: reload.Decision, classes: list[type]) -> list[str]:
        """Reasons a `__hash__` or `__eq__` of the user's classes (modules and cells) calls a function the
        decision patches. `classes` is filled on first use and reused for the other modules of the edit."""
        targets = {
            id(c.target): f"{decision.module}.{c.qualname}" for c in decision.plan
            if c.action == "patch" and c.detail in ("body", "signature") and isinstance(c.target, types.FunctionType)
        }
        if not targets:
            return []
        if classes:
            return reload.data_hooks_reaching(classes, targets, {*self.user_modules, "__main__"})
        for name in self.user_modules:
            module = sys.modules.get(name)
            if module is not None:
                classes += [v for v in list(vars(module).values()) if isinstance(v, type) and v.__module__ == name]
        classes += [v for v in list(self.shell.user_ns.values()) if isinstance(v, type) and v.__module__ == "__main__"]
        return reload.data_hooks_reaching(classes, targets, {*self.user_modules, "__main__"})

    @staticmethod
    def _shadows_existing(change: reload.Change) -> bool:
        """Whether an added function or method takes the place of a builtin or an inherited attribute."""
        key = change.path[-1]
        if isinstance(change.target, type):
            return any(key in vars(base) for base in change.target.__mro__[1:])
        return key in vars(builtins)

    def _user_caches(self) -> dict[int, tuple[Any, int]]:
        """The functools caches of the user's modules (module level and in their classes), by id: (wrapper, size)."""
        caches: dict[int, tuple[Any, int]] = {}
        for name in self.user_modules:
            module = sys.modules.get(name)
            if module is None:
                continue
            for value in list(vars(module).values()):
                own_class = isinstance(value, type) and value.__module__ == name
                for member in list(vars(value).values()) if own_class else [value]:
                    if type(member) is functools._lru_cache_wrapper and id(member) not in caches:
                        caches[id(member)] = (member, member.cache_info().currsize)
        return caches

    def _used_elsewhere(self, name: str, decision: reload.Decision) -> list[str]:
        """Reasons another user module's import already used what the edit changes or adds (see used_at_import)."""
        names = reload.changed_names(decision)
        if not names:
            return []
        module = sys.modules[name]
        added = {c.qualname for c in decision.plan if c.action == "add" and "." not in c.qualname}
        exported = reload.star_exports(module, added)
        last = name.rpartition(".")[2].encode()
        package = hasattr(module, "__path__")
        reasons = []
        for other, entry in self.user_modules.items():
            # Only a module whose text names the edited one can use it; a
            # package's own __init__ can also be reached as `from . import x`.
            if other == name or (last not in entry["source"] and not (package and b"from ." in entry["source"])):
                continue
            importer = sys.modules.get(other)
            text, _why = reload.decode_source(entry["source"], entry["file"])
            if text is None:
                continue
            why = reload.used_at_import(
                text, entry["file"], name, names, package=getattr(importer, "__package__", None),
                added=added, exported=exported,
            )
            if why:
                reasons.append(why)
        return reasons

    # -- checkpoints ------------------------------------------------------------

    def checkpoint(self, sock_path: str) -> protocol.CheckpointAnswer:
        """Fork a checkpoint of this worker, if the last cell changed the
        state and succeeded; it connects to the controller at `sock_path`."""
        self._reap_checkpoints()
        if not self.dirty:
            return {"taken": False, "why": "nothing changed"}
        if not self.last_ok:
            return {"taken": False, "why": "the last cell failed"}
        api = sys.modules.get("debugpy.server.api")
        if api is not None and getattr(getattr(api, "listen", None), "called", False):
            # debugpy's server lives in this process's threads: a copy could
            # never be debugged again. Checkpoints resume with a fresh worker.
            return {"taken": False, "why": "the debugger is on"}
        cell = self.shell.execution_count - 1
        t0 = time.perf_counter()
        try:
            threads = carry.user_threads(self.user_modules)
        except Exception:
            threads = []
        pid = checkpoint.take(self.shell, sock_path, self.key, cell, threads)
        self.checkpoint_pids.append(pid)
        self.dirty = False
        return {"taken": True, "pid": pid, "cell": cell, "seconds": round(time.perf_counter() - t0, 6)}

    def checkpoint_info(self) -> protocol.CheckpointInfo:
        self._reap_checkpoints()
        return {"dirty": self.dirty, "cell": self.shell.execution_count - 1, "pids": list(self.checkpoint_pids),
                "names": user_variable_names(self.shell)}

    def _reap_checkpoints(self) -> None:
        # A discarded checkpoint is this worker's child until reaped here.
        for pid in list(self.checkpoint_pids):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.checkpoint_pids.remove(pid)

    def rehome(self, kernel: Any) -> None:
        """A checkpoint became a worker: answer through its new kernel."""
        self.kernel = kernel
        self.key = kernel.session.key
        kernel.shell_handlers[protocol.AGENT_REQUEST] = self.handle_request
        # Checkpoints forked by the worker this one copies are not its children.
        self.checkpoint_pids = []
        self.dirty = False

    # -- %forkreload -----------------------------------------------------------

    def command(self, line: str) -> None:
        """`%forkreload status|fresh|back|mode M|quiet [on|off]`: asks the controller."""
        words = line.split()
        cmd, args = (words[0], words[1:]) if words else ("status", [])
        if cmd not in ("status", "fresh", "back", "undo", "checkpoints", "mode", "quiet"):
            print("usage: %forkreload status | fresh | back | undo [N] | checkpoints | mode auto|fresh|inplace|off | quiet [on|off]")
            return
        self._tell_controller(protocol.COMMAND_EVENT, {"cmd": cmd, "args": args})

    def handle_request(self, stream: Any, idents: list[bytes], msg: dict[str, Any]) -> None:
        """ipykernel shell handler for the controller's agent calls; the
        reply's content is the call's answer."""
        content = msg["content"]
        answer = self.call(content.get("method", ""), *content.get("args", []))
        try:
            self.kernel.session.send(stream, protocol.AGENT_REPLY, answer, parent=msg, ident=idents)
        except Exception as exc:
            # The controller waits for this reply: it must get one.
            error = {"ok": False, "error": f"the answer could not be sent: {type(exc).__name__}: {exc}", "internal": True}
            self.kernel.session.send(stream, protocol.AGENT_REPLY, error, parent=msg, ident=idents)

    def call(self, method: str, *args: Any) -> Any:
        """Entry point for the controller: never raises; an answer of `protocol`."""
        if method not in protocol.AGENT_CALLS:
            return {"ok": False, "error": f"unknown agent call {method!r}", "internal": True}
        try:
            return getattr(self, method)(*args)
        except BaseException as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "internal": True}


_current: Agent | None = None


def current() -> Agent | None:
    """This worker's agent, once installed."""
    return _current


def install(kernel: Any, cwd: str, watch: list[str]) -> Agent:
    """Create the agent and hook it into the kernel's shell."""
    global _current
    agent = Agent(kernel, cwd, watch)
    _current = agent
    shell = kernel.shell
    # The user's modules load through the agent from now on (none is imported
    # yet: the snapshot never imports them). Finders cached for the user's
    # directories during kernel start would bypass it.
    _UserSourceLoader.agent = agent
    sys.path_hooks.insert(0, agent._path_hook)
    for path in list(sys.path_importer_cache):
        if agent._user_dir(path or os.getcwd()):
            del sys.path_importer_cache[path]
    agent._find_shadows()
    shell.user_ns["__forkreload__"] = agent
    shell.user_ns_hidden["__forkreload__"] = agent
    shell.events.register("post_run_cell", agent._post_run_cell)
    shell.events.register("pre_run_cell", agent._release_export)
    shell.register_magic_function(agent.command, magic_kind="line", magic_name="forkreload")
    kernel.shell_handlers[protocol.AGENT_REQUEST] = agent.handle_request
    # A user coming from IPython types `%load_ext autoreload`: a second
    # reloader would fight this one, so the extension becomes a note.
    sys.modules["IPython.extensions.autoreload"] = _autoreload_note_module()
    return agent


_AUTORELOAD_NOTE = notices.AUTORELOAD_NOTE


def _autoreload_note_module() -> types.ModuleType:
    mod = types.ModuleType("IPython.extensions.autoreload", "forkreload's stand-in for IPython's autoreload")

    def note(line: str = "") -> None:
        print(_AUTORELOAD_NOTE)

    def load_ipython_extension(ip: Any) -> None:
        ip.register_magic_function(note, magic_kind="line", magic_name="autoreload")
        ip.register_magic_function(note, magic_kind="line", magic_name="aimport")
        note()

    mod.load_ipython_extension = load_ipython_extension  # type: ignore[attr-defined]
    return mod
