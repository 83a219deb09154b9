"""The forkreload agent inside each worker.

Installed in the worker's IPython shell as `__forkreload__` (hidden from the
user). It tells the controller which of the user's modules were imported
(and from which files), exports the user's namespace for migration, and on
the receiving side imports the user's modules fresh and loads the namespace.
The controller calls it with `forkreload_request` shell messages of its own
(see `protocol`): they run between cells like an execute would, without
IPython's cell machinery, so no history entry and no count change; each
call answers plain data (the TypedDicts in `protocol`).
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import hmac
import importlib
import importlib.util
import json
import os
import re
import site
import sys
import sysconfig
import time
import traceback
import types
from typing import Any

from . import migrate, protocol, reload

__all__ = ["Agent", "install", "user_module_file", "user_variable_names", "watch_prefixes"]

_OUTPUT_NAME = re.compile(r"^_(i{1,3}|_{1,2}|\d+|i\d+|)$")
_FORKRELOAD_DIR = os.path.dirname(os.path.abspath(__file__))


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
    return any(path.startswith(p) for p in prefixes)


def watch_prefixes(watch: list[str]) -> tuple[str, ...]:
    return tuple(os.path.realpath(w).rstrip(os.sep) + os.sep for w in watch)


def user_module_file(mod: types.ModuleType, watch: tuple[str, ...], libs: tuple[str, ...] | None = None) -> str | None:
    """The module's source file when it is the user's code, else None.

    The user's code is everything outside the standard library and
    site-packages (editable installs and the project itself), plus whatever
    lies under the `watch` paths.
    """
    file = getattr(mod, "__file__", None)
    if not isinstance(file, str) or not os.path.isfile(file):
        return None
    path = os.path.realpath(file)
    if path.startswith(_FORKRELOAD_DIR + os.sep):
        return None
    if _under(path, watch):
        return path
    if _under(path, _library_prefixes() if libs is None else libs):
        return None
    return path


def user_variable_names(shell: Any) -> list[str]:
    """The names in `user_ns` that the user made, not IPython's own."""
    hidden = shell.user_ns_hidden
    missing = object()
    names = []
    for name, value in shell.user_ns.items():
        if name.startswith("__") and name.endswith("__"):
            continue
        if hidden.get(name, missing) is value or _OUTPUT_NAME.match(name):
            continue
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


def _sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


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
        self._nmods = len(sys.modules)
        # name -> {"file", "sha", "source"}: the source as it was executed
        self.user_modules: dict[str, dict[str, Any]] = {}
        self._new_third_party: list[str] = []

    # -- module tracking -------------------------------------------------

    def is_user_module(self, mod: types.ModuleType) -> str | None:
        """The module's file when it is one of the user's modules, else None."""
        return user_module_file(mod, self.watch, self.libs)

    def scan(self) -> list[dict[str, Any]]:
        """Record modules imported since the last scan; return new user modules."""
        if len(sys.modules) == self._nmods:
            return []
        found = []
        for name in [n for n in list(sys.modules) if n not in self.seen]:
            self.seen.add(name)
            mod = sys.modules.get(name)
            if mod is None:
                continue
            path = self.is_user_module(mod)
            if path is None:
                if self._is_third_party(name, mod):
                    self._new_third_party.append(name)
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            entry = {"name": name, "file": path, "sha": hashlib.sha256(data).hexdigest()}
            self.user_modules[name] = dict(entry, source=data)
            found.append(entry)
        self._nmods = len(sys.modules)
        return found

    @staticmethod
    def _is_third_party(name: str, mod: types.ModuleType) -> bool:
        """A top-level, non-stdlib library: worth preloading next time."""
        if "." in name or name.startswith("_") or not getattr(mod, "__file__", None):
            return False
        return name not in getattr(sys, "stdlib_module_names", ()) and name != "forkreload"

    def _post_run_cell(self, result: Any = None) -> None:
        found = self.scan()
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
        """Dump the user's namespace and session state next to `path`."""
        t0 = time.perf_counter()
        self.scan()
        ns = self.shell.user_ns
        names = user_variable_names(self.shell)
        dump = migrate.dump_namespace(ns, names, self.key, path, globals_ns=ns)
        hm = self.shell.history_manager
        meta = {
            "execution_count": self.shell.execution_count,
            "history_raw": list(hm.input_hist_raw),
            "history_parsed": list(hm.input_hist_parsed),
            "cwd": os.getcwd(),
            "sys_path": list(sys.path),
            "environ": dict(os.environ),
            "modules": list(self.user_modules),
        }
        data = json.dumps(meta).encode()
        with open(os.open(path + ".meta", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(_sign(self.key, data).encode() + b"\n" + data)
        return {
            "ok": True,
            "saved": dump.saved,
            "lost": dump.lost,
            "groups": [g for g in dump.groups if len(g) > 1],
            "inband_bytes": dump.inband_bytes,
            "buffer_bytes": dump.buffer_bytes,
            "seconds": round(time.perf_counter() - t0, 4),
        }

    # -- migration: the new worker's side ----------------------------------

    def _read_meta(self, path: str) -> dict[str, Any]:
        with open(path + ".meta", "rb") as f:
            mac, _, data = f.read().partition(b"\n")
        if not hmac.compare_digest(mac.decode(), _sign(self.key, data)):
            raise migrate.ForgedPayload("session state with a bad signature")
        return json.loads(data)

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
        meta = self._read_meta(path)
        os.environ.clear()
        os.environ.update(meta["environ"])
        try:
            os.chdir(meta["cwd"])
        except OSError:
            pass
        sys.path[:] = meta["sys_path"]
        for file in changed_files:
            # A .pyc written within the same second as the edit, at the same
            # size, would pass the mtime check and load the stale code.
            try:
                os.unlink(importlib.util.cache_from_source(file))
            except (OSError, ValueError, NotImplementedError):
                pass
        importlib.invalidate_caches()
        gone = []
        for name in meta["modules"]:
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
        res = migrate.load_namespace(path, self.key, ns)
        ns.update(res.values)
        self.shell.execution_count = meta["execution_count"]
        hm = self.shell.history_manager
        hm.input_hist_raw[:] = meta["history_raw"]
        hm.input_hist_parsed[:] = meta["history_parsed"]
        return {
            "ok": True,
            "loaded": res.loaded,
            "failed": {name: _rebuild_failure(why) for name, why in res.failed.items()},
            "gone": gone,
            "modules": self.modules()["modules"],
            "seconds": round(time.perf_counter() - t0, 4),
        }

    # -- in place ------------------------------------------------------------

    def reload(self, files: list[str], mode: str) -> protocol.ReloadAnswer:
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
          star imports that miss added names, caches) and `cleared`
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
                elsewhere = self._used_elsewhere(name, decision) + self._hashes_would_change(decision, classes)
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
            entry["sha"] = hashlib.sha256(data).hexdigest()
            applied_files[entry["file"]] = entry["sha"]
        patched = [
            f"{d.module}.{c.qualname}" for _m, d in edits for c in d.plan
            if c.action == "patch" and c.detail in ("body", "signature")
        ]
        added = [f"{d.module}.{c.qualname}" for _m, d in edits for c in d.plan if c.action == "add"]
        notes = [note for _m, d in edits for note in d.notes]
        cleared: dict[str, int] = {}
        if patched or added:
            # A function added under a new name changes what no existing code
            # runs, unless it shadows a builtin or an inherited method.
            changes_results = bool(patched) or any(self._shadows(c) for _m, d in edits for c in d.plan if c.action == "add")
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
            if type(value) is functools._lru_cache_wrapper and id(value) not in caches and value.cache_info().currsize:
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
    def _shadows(change: reload.Change) -> bool:
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

    # -- %forkreload -----------------------------------------------------------

    def command(self, line: str) -> None:
        """`%forkreload status|fresh|back|mode M|quiet [on|off]`: asks the controller."""
        words = line.split()
        cmd, args = (words[0], words[1:]) if words else ("status", [])
        if cmd not in ("status", "fresh", "back", "mode", "quiet"):
            print("usage: %forkreload status | fresh | back | mode auto|fresh|inplace|off | quiet [on|off]")
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


def install(kernel: Any, cwd: str, watch: list[str]) -> Agent:
    """Create the agent and hook it into the kernel's shell."""
    agent = Agent(kernel, cwd, watch)
    shell = kernel.shell
    shell.user_ns["__forkreload__"] = agent
    shell.user_ns_hidden["__forkreload__"] = agent
    shell.events.register("post_run_cell", agent._post_run_cell)
    shell.register_magic_function(agent.command, magic_kind="line", magic_name="forkreload")
    kernel.shell_handlers[protocol.AGENT_REQUEST] = agent.handle_request
    # A user coming from IPython types `%load_ext autoreload`: a second
    # reloader would fight this one, so the extension becomes a note.
    sys.modules["IPython.extensions.autoreload"] = _autoreload_note_module()
    return agent


_AUTORELOAD_NOTE = "forkreload: edits to your modules are already picked up before each cell; %autoreload is not needed (see %forkreload status)"


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
