"""Decide whether an edit to a module can be patched into the live module, and patch it.

After the user edits a module file, the worker asks `classify` to compare the
source the live module was built from with the new source on disk. The answer
is a `Decision`:

- 'noop': nothing that runs changed (comments, formatting, docstrings); the
  plan only refreshes docstrings and line numbers so that `help()` and
  tracebacks match the file;
- 'inplace': the edit only changes bodies, signatures or defaults of existing
  functions and methods (also of functions decorated with nothing but
  functools.cache/lru_cache: patched through the cache wrapper, whose cache
  is then cleared), or adds functions and methods; `apply_plan` patches the
  live function objects, so every existing reference (`from m import f`
  elsewhere, bound methods of old instances, registered callbacks) runs the
  new code, and no top-level statement of the module runs again;
- 'fresh': anything else; the reasons say why, and the caller moves to a fresh
  worker that imports the new code. This includes an edited `__hash__` or
  `__eq__` (dicts and sets keep what the old ones computed) and ABC hooks;
- 'error': the new source does not parse (the reason reads as Python shows
  it); the old code keeps running.

The rule is that 'noop' and 'inplace' are only given when the patched module
behaves as a fresh import of the new source would (see README's in-place and fresh lists
and ARCHITECTURE.md); when in doubt the answer is 'fresh'. The source alone cannot
see everything the old code already did, so the caller (the worker's agent)
also asks, across modules and the session's values: `used_at_import` (another
module's import used a changed function, star-imported or imported by name an
added one), `data_hooks_reaching` (a `__hash__`/`__eq__` calls a patched
function), and after the patch `kept_old_code` and `threads_running_old_code`
(generators, closures and threads still running replaced code, named in
notes); `Decision.notes` names defaults filled since import.
"""

from __future__ import annotations
import __future__

import ast
import copy
import dis
import enum
import functools
import importlib.util
import inspect
import itertools
import linecache
import os
import re
import reprlib
import sys
import threading
import types
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeGuard, TypeVar, cast

__all__ = [
    "Change", "Decision", "PatchError", "apply_plan", "apply_plans", "changed_names", "classify", "decode_source",
    "data_hooks_reaching", "kept_old_code", "replaced_code", "star_exports", "threads_running_old_code",
    "used_at_import",
]

_FunctionNode: TypeAlias = "ast.FunctionDef | ast.AsyncFunctionDef"
_DefNode: TypeAlias = "ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef"
# Annotated so that isinstance() against them narrows to the unions above.
_FUNCTION_DEFS: tuple[type[_FunctionNode], ...] = (ast.FunctionDef, ast.AsyncFunctionDef)
_DEFS: tuple[type[_DefNode], ...] = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_D = TypeVar("_D", bound=_DefNode)  # the kind of defs a `_Body` sorts out
# The line breaks the tokenizer accepts (str.splitlines() also splits on \f and others).
_NEWLINE = re.compile(r"\r\n|\r|\n")

# Decorators a patched or added method may carry: the live class attribute is
# then this wrapper around the plain function.
_Wrapper: TypeAlias = "type[staticmethod[Any, Any]] | type[classmethod[Any, Any, Any]]"
_WRAPPERS: dict[str, _Wrapper] = {"staticmethod": staticmethod, "classmethod": classmethod}
# What functools.cache and functools.lru_cache return: a function decorated
# with one of them (and nothing else) is patched through `__wrapped__`, and
# its cache cleared, which is all a fresh import would differ in. (Not
# annotated: as an alias of the class, `type(x) is _LRU_WRAPPER` narrows x.)
_LRU_WRAPPER = functools._lru_cache_wrapper
_CACHE_DECORATORS = frozenset({"cache", "lru_cache"})
# Methods that type() wraps on its own when it creates the class.
_IMPLICIT_WRAPPERS: dict[str, _Wrapper] = {
    "__new__": staticmethod,
    "__init_subclass__": classmethod,
    "__class_getitem__": classmethod,
}
# Methods that Python calls while classes are being created (this class, its
# subclasses, or classes holding instances of it): their old versions have
# already shaped the live classes, so a change needs a fresh import.
_CLASS_CREATION_HOOKS = frozenset(
    {"__init_subclass__", "__set_name__", "__class_getitem__", "__prepare__", "__mro_entries__"}
)
# Special methods whose old results the interpreter keeps in existing data:
# a dict or set placed its keys by the old __hash__ and told them apart with
# the old __eq__ (a fresh process rebuilds them when the values are
# unpickled), and ABCMeta caches the answers of __subclasshook__ (and of
# __instancecheck__/__subclasscheck__ of metaclasses built on it). Ordering
# methods (__lt__ & co) are not here: no built-in container keeps an order
# computed by them (a sorted list is a value, migrated as it is).
_CACHED_BY_DATA = {
    "__hash__": "dicts and sets already hold hashes from the old code",
    "__eq__": "dicts and sets already told their keys apart with the old code",
    "__subclasshook__": "isinstance() and issubclass() already cached answers from the old code",
    "__instancecheck__": "isinstance() and issubclass() already cached answers from the old code",
    "__subclasscheck__": "isinstance() and issubclass() already cached answers from the old code",
}
# Flags that make a call return a generator/coroutine instead of running the
# body: old call sites and callers would be wrong if these changed.
_KIND_FLAGS = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE
)
# Node types allowed in an annotation that must be evaluated (no
# `from __future__ import annotations`): plain type expressions such as
# `int`, `np.ndarray`, `list[str]`, `int | None`, `"Greeter"`.
_TYPE_EXPRESSION_NODES = (
    ast.Constant, ast.Name, ast.Attribute, ast.Subscript, ast.Tuple, ast.List, ast.BinOp, ast.BitOr, ast.Load,
)
# Details of changes that alter what code runs (the others only refresh
# docstrings and line numbers, which makes the decision a 'noop').
_BEHAVIOUR_DETAILS = frozenset({"body", "signature", "new"})


class PatchError(Exception):
    """apply_plan could not apply a change; everything it had changed was restored."""


@dataclass
class Change:
    """One step of a plan: set attributes of a live object, or bind a new function.

    action 'patch' sets `attrs` on `target`, the live function, class or
    module found at `path` (through the cache wrapper of a function decorated
    with functools.cache/lru_cache); action 'add' binds `value` under
    `path[-1]` in `target`, the live module or class found at `path[:-1]`;
    action 'clear' empties `target`, such a cache wrapper, after every other
    change of the plans was applied.
    """

    action: str  # 'patch' | 'add' | 'clear'
    qualname: str  # 'area', 'Greeter.greet', 'Greeter' (class attributes), '' (module docstring)
    detail: str  # 'body' | 'signature' | 'new' | 'docstring' | 'lines' | 'attributes' | 'cache'
    path: tuple[str, ...]  # dict keys from the module namespace down to the object (names mangled)
    target: object = field(repr=False)
    attrs: dict[str, object] = field(default_factory=dict, repr=False)
    value: object = field(default=None, repr=False)


@dataclass
class Decision:
    """What to do about one edited module (see the module docstring)."""

    kind: str  # 'noop' | 'inplace' | 'fresh' | 'error'
    module: str
    reasons: list[str] = field(default_factory=list)  # fresh/error: readable reasons, headline first
    plan: list[Change] = field(default_factory=list)  # noop/inplace: what apply_plan will do
    notes: list[str] = field(default_factory=list)  # inplace: what the patch keeps that a fresh import would not

    def describe(self) -> str:
        """One short line for the user."""
        if self.kind in ("fresh", "error"):
            more = f" (+{len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
            verb = "needs a fresh process" if self.kind == "fresh" else "not reloaded"
            return f"{self.module}: {verb}: {self.reasons[0]}{more}"
        patched = [c.qualname for c in self.plan if c.action == "patch" and c.detail in _BEHAVIOUR_DETAILS]
        added = [c.qualname for c in self.plan if c.action == "add"]
        if self.kind == "noop":
            return f"{self.module}: no code change"
        parts = []
        if patched:
            parts.append("patched " + ", ".join(patched))
        if added:
            parts.append("added " + ", ".join(added))
        return f"{self.module}: in place: " + "; ".join(parts)


# The tree of the last new source classified, per file: the old source of the
# next edit is usually that one, and parsing is a third of the time.
_last_parsed: dict[str, tuple[str, ast.Module]] = {}


def classify(module: types.ModuleType, old_source: str, new_source: str) -> Decision:
    """Compare the source `module` was built from with its new source and decide how to reload it.

    Nothing is changed; the live objects are only inspected (and new
    annotations of patched signatures evaluated, see `_Classifier.annotations`).
    """
    name = module.__name__
    filename = getattr(module, "__file__", None)
    if not filename or not filename.endswith(".py"):
        return Decision("fresh", name, [f"{name}: not loaded from a Python source file"])
    if old_source == new_source:
        return Decision("noop", name)
    shown = _shown_name(filename)
    try:
        new_tree = ast.parse(new_source, filename)
        # Compiled the way importlib compiles a module, so code objects match
        # what a fresh import would create.
        new_code = compile(new_tree, filename, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError) as exc:
        return Decision("error", name, [_parse_error(exc, shown)])
    cached = _last_parsed.get(filename)
    _last_parsed[filename] = (new_source, new_tree)
    if cached is not None and cached[0] == old_source:
        old_tree = cached[1]
    else:
        try:
            old_tree = ast.parse(old_source, filename)
        except (SyntaxError, ValueError, RecursionError):
            return Decision("fresh", name, [f"{shown}: the source it was loaded from is unknown"])
    classifier = _Classifier(module, filename, shown, (old_source, old_tree), (new_source, new_tree), new_code)
    classifier.run()
    if classifier.reasons:
        return Decision("fresh", name, classifier.reasons)
    plan = classifier.plan
    kind = "inplace" if any(c.detail in _BEHAVIOUR_DETAILS for c in plan) else "noop"
    return Decision(kind, name, [], plan, classifier.notes if kind == "inplace" else [])


def apply_plan(module: types.ModuleType, decision: Decision) -> list[str]:
    """Apply the plan of a 'noop' or 'inplace' decision to the live module, all or nothing.

    Returns the dotted names of the objects changed or added, in plan order
    (line-number refreshes included). On any failure, every attribute already
    set and every function already added is restored, and PatchError raised.
    """
    return apply_plans([(module, decision)])


def apply_plans(edits: list[tuple[types.ModuleType, Decision]]) -> list[str]:
    """Apply the plans of several modules' decisions, all or nothing across all of them."""
    undo: list[Callable[[], None]] = []
    done: list[str] = []
    for module, decision in edits:
        if decision.kind not in ("noop", "inplace") or decision.module != module.__name__:
            raise ValueError(f"cannot apply a {decision.kind!r} decision for {decision.module} to {module.__name__}")
    clears: list[Change] = []
    for module, decision in edits:
        for change in decision.plan:
            dotted = ".".join(filter(None, (module.__name__, change.qualname)))
            if change.action == "clear":
                clears.append(change)
                continue
            try:
                _apply_change(module, change, undo)
            except Exception as exc:
                for restore in reversed(undo):
                    restore()
                raise PatchError(f"could not {change.action} {dotted}: {exc}") from exc
            done.append(dotted)
    # Only once every patch is in: a cleared cache cannot be restored.
    for change in clears:
        cache = change.target
        assert type(cache) is _LRU_WRAPPER  # what compare_function plans to clear
        cache.cache_clear()
    for module, _decision in edits:
        # Tracebacks read lines through linecache; drop the stale copy so they
        # show the file as it is now (checkcache alone misses an edit that
        # kept the size and the mtime).
        linecache.checkcache(module.__file__)
        if module.__file__ is not None:
            linecache.cache.pop(module.__file__, None)
    return done


def changed_names(decision: Decision) -> set[str]:
    """Top-level names of the module whose behaviour an in-place plan changes."""
    return {c.qualname.split(".")[0] for c in decision.plan if c.detail in _BEHAVIOUR_DETAILS and c.qualname}


def data_hooks_reaching(classes: list[type], targets: dict[int, str], modules: set[str]) -> list[str]:
    """Reasons some `__hash__`/`__eq__` (or ABC hook) of `classes` may call a function the plans patch.

    `targets`: id of each live function about to be patched -> its dotted
    name. A hash helper edited in place (`__hash__` returning `hash(key(self))`
    with `key` patched) changes the hashes exactly as an edited `__hash__`
    would, and dicts and sets already placed their keys by the old ones. The
    walk follows, from the hook's code, the names it uses (and the code nested
    in it), resolved in the function's globals, in the modules those hold, and
    in the class and its bases; a name bound to a function of `modules` (the
    user's, and `__main__` for cells) there is followed in turn, library code
    is not. Calls through other objects (`self.items.norm()`) are not seen.
    """
    reasons: list[str] = []
    for cls in classes:
        for hook, why in _CACHED_BY_DATA.items():
            start = _plain_function(cls.__dict__.get(hook))
            if start is None:
                continue
            hit = _reaches(start, cls, targets, modules)
            if hit is not None:
                where = f"{cls.__module__}.{cls.__qualname__}.{hook}"
                reasons.append(f"{where} calls {hit}, which the edit changes: {why}")
    return reasons


def _plain_function(obj: object) -> types.FunctionType | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    elif type(obj) is _LRU_WRAPPER:
        obj = obj.__wrapped__
    return obj if type(obj) is types.FunctionType else None


def _reaches(start: types.FunctionType, cls: type, targets: dict[int, str], modules: set[str]) -> str | None:
    seen: set[int] = set()
    todo = [start]
    while todo:
        function = todo.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        if id(function) in targets:
            return targets[id(function)]
        names = _names_used(function.__code__)
        scopes: list[Mapping[str, object]] = [function.__globals__]
        scopes += [vars(v) for n in names if isinstance(v := function.__globals__.get(n), types.ModuleType)]
        scopes += [vars(c) for c in cls.__mro__ if c is not object]
        for name in names:
            for scope in scopes:
                found = _plain_function(scope.get(name))
                if found is not None and found.__module__ in modules:
                    todo.append(found)
    return None


def _names_used(code: types.CodeType) -> set[str]:
    """Global and attribute names a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_used(const)
    return names


def replaced_code(edits: list[tuple[types.ModuleType, Decision]]) -> dict[int, tuple[types.CodeType, str]]:
    """The code objects the plans are about to replace, by id: (code, dotted name of the function).

    Call it before `apply_plans`. Code nested in a replaced function (inner
    functions, lambdas, generator expressions) is included when it differs
    from its new version: closures and generators made by the old code keep
    running it after the patch.
    """
    found: dict[int, tuple[types.CodeType, str]] = {}
    for module, decision in edits:
        for change in decision.plan:
            if change.action == "patch" and change.detail in _BEHAVIOUR_DETAILS and "__code__" in change.attrs:
                dotted = f"{module.__name__}.{change.qualname}"
                live, code = change.target, change.attrs["__code__"]
                # A change of code always targets a plain function (see _Classifier.is_own_function).
                assert isinstance(live, types.FunctionType) and isinstance(code, types.CodeType)
                _pair_codes(live.__code__, code, dotted, found)
    return found


def _pair_codes(old: types.CodeType, new: types.CodeType | None, dotted: str,
                found: dict[int, tuple[types.CodeType, str]]) -> None:
    if new is None or _code_key(old) != _code_key(new):
        found[id(old)] = (old, dotted)
    new_children: dict[str, list[types.CodeType]] = defaultdict(list)
    for const in (new.co_consts if new is not None else ()):
        if isinstance(const, types.CodeType):
            new_children[const.co_name].append(const)
    for const in old.co_consts:
        if isinstance(const, types.CodeType):
            twins = new_children.get(const.co_name)
            _pair_codes(const, twins.pop(0) if twins else None, dotted, found)


def _code_key(code: types.CodeType) -> tuple[object, ...]:
    """What a code object does, where it sits in the file aside."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else (type(c), c) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, code.co_flags,
            code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, consts)


# How many items of a container or attributes of an object `kept_old_code`
# looks at: the scan must stay cheap next to a patch (milliseconds).
_SCAN_LIMIT = 1000


def kept_old_code(namespace: dict[str, object], replaced: dict[int, tuple[types.CodeType, str]]) -> list[str]:
    """Notes on the values in `namespace` that still run code a patch replaced.

    A generator, coroutine or async generator created by a patched function
    keeps its frame and the old code (also when another generator delegates
    to it with `yield from`/`await`); a closure or lambda the old code made
    keeps the old inner code. Each value is looked at one level deep: itself,
    the items of a list, tuple, set or dict, the attributes of an object.
    """
    notes: list[str] = []
    if not replaced:
        return notes
    task = getattr(sys.modules.get("asyncio"), "Task", None)  # only asyncio's own tasks are looked into
    for name, value in namespace.items():
        for candidate in _one_level(value, task):
            why = _runs_old_code(candidate, replaced)
            if why:
                notes.append(f"{name}: {why}")
                break
    return notes


def threads_running_old_code(replaced: dict[int, tuple[types.CodeType, str]]) -> list[str]:
    """Notes on the other threads whose stack is inside code a patch replaced (they finish the old body)."""
    notes: list[str] = []
    if not replaced:
        return notes
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, top in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        frame: types.FrameType | None = top
        depth = 0
        while frame is not None and depth < 200:
            hit = replaced.get(id(frame.f_code))
            if hit is not None and hit[0] is frame.f_code:
                notes.append(f"thread {names.get(ident, ident)}: still inside {hit[1]}, it runs the old body "
                             "until that call returns")
                break
            frame, depth = frame.f_back, depth + 1
    return notes


# What may run old code: one type test per value keeps the scan cheap (most
# values are numbers, strings and arrays).
_MAY_RUN_CODE = frozenset({types.FunctionType, types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType})
_CONTAINERS = frozenset({list, tuple, set, frozenset})
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def _one_level(value: object, task: type | None) -> list[object]:
    """`value` and what it holds directly (at most _SCAN_LIMIT), those of them that may run code."""
    kind = type(value)
    items: Iterable[object]
    # Exact types, looked up once in `kind` (cheaper than isinstance; subclasses
    # go through vars()); mypy cannot narrow through `kind`, hence the casts.
    if kind in _CONTAINERS:
        items = cast("Iterable[object]", value)
    elif kind is dict:
        items = cast("dict[object, object]", value).values()
    elif isinstance(value, _OPAQUE):
        items = ()
    else:
        try:
            items = vars(value).values()
        except TypeError:
            items = ()
    try:
        found = [v for v in itertools.islice(items, _SCAN_LIMIT)
                 if type(v) in _MAY_RUN_CODE or (task is not None and isinstance(v, task))]
    except RuntimeError:  # changed size during iteration (another thread)
        found = []
    if kind in _MAY_RUN_CODE or (task is not None and isinstance(value, task)):
        found.insert(0, value)
    return found


def _runs_old_code(obj: object, replaced: dict[int, tuple[types.CodeType, str]]) -> str | None:
    if type(obj) is types.FunctionType:
        hit = replaced.get(id(obj.__code__))
        if hit is not None and hit[0] is obj.__code__:
            return f"a function made by the old {hit[1]} keeps its old code"
        return None
    if hasattr(obj, "get_coro") and hasattr(obj, "done"):  # an asyncio Task runs a coroutine
        obj = None if obj.done() else obj.get_coro()
    depth = 0
    while obj is not None and depth < 100:
        for code_attr, frame_attr, inner_attr, word in _SUSPENDABLE:
            if isinstance(obj, word[0]):
                frame, code = getattr(obj, frame_attr), getattr(obj, code_attr)
                if frame is None:
                    return None  # finished: runs nothing any more
                hit = replaced.get(id(code))
                if hit is not None and hit[0] is code:
                    return f"{word[1]} suspended in {hit[1]} keeps running the old body"
                obj = getattr(obj, inner_attr)
                break
        else:
            return None
        depth += 1
    return None


# (code attribute, frame attribute, what it is delegating to, (type, words)) per kind of suspendable object.
_SUSPENDABLE = (
    ("gi_code", "gi_frame", "gi_yieldfrom", (types.GeneratorType, "a generator")),
    ("cr_code", "cr_frame", "cr_await", (types.CoroutineType, "a coroutine")),
    ("ag_code", "ag_frame", "ag_await", (types.AsyncGeneratorType, "an async generator")),
)


def used_at_import(
    source: str, filename: str, module_name: str, names: set[str], *, package: str | None = None,
    added: frozenset[str] | set[str] = frozenset(), exported: frozenset[str] | set[str] = frozenset(),
) -> str | None:
    """Whether another module's import-time code may use `names` of `module_name`.

    A fresh process would import that other module again and so run the new
    code at its import (`X = a.helper()`); patching `a` in place would leave
    the value computed by the old code. Functions the edit adds (`added`)
    count too when the other module imports them by name at import time (a
    `try: from a import new` that found nothing then), and `exported`, the
    added names a star import binds, when it does `from a import *`: a fresh
    import binds them there, a patch does not. `package` resolves the other
    module's relative imports (its `__package__`). Returns a reason, or None.
    """
    parsed = _parsed_for_import(source, filename)
    if parsed is None:
        return None
    tree, mentioned, imports, strings = parsed
    shown = _shown_name(filename)
    aliases: set[str] = set()  # names bound to the module itself (or its package root)
    imported: dict[str, str] = {}  # local name -> name in the module
    for node, _at_import in imports:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == module_name or a.name.startswith(module_name + "."):
                    aliases.add(a.asname or a.name.split(".")[0])
                elif module_name.startswith(a.name + ".") and a.asname is None:
                    aliases.add(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            source_module = _absolute_module(node, package)
            for a in node.names:
                if source_module == module_name:
                    imported[a.asname or a.name] = a.name
                elif f"{source_module}.{a.name}" == module_name:
                    aliases.add(a.asname or a.name)
    if "*" in imported.values() and exported:
        # A star import can only sit at module level: it ran at import.
        return f"{shown}: from {module_name} import * would also bind the new {module_name}.{min(exported)}"
    if added:
        for node, at_import in imports:
            if at_import and isinstance(node, ast.ImportFrom) and _absolute_module(node, package) == module_name:
                for a in node.names:
                    if a.name in added:
                        return f"{shown} imports the new {module_name}.{a.name} by name when it is imported"
    if not aliases and not imported:
        return None
    if added & strings:
        # `getattr(m, "new", None)`, `hasattr(m, "new")` at import found nothing then.
        return f"{shown} names the new {module_name}.{min(added & strings)} in code that runs when it is imported"
    for local, original in imported.items():
        if original in names and local in mentioned:
            return f"{shown} uses {module_name}.{original} when it is imported"
    for alias in aliases & mentioned:
        for child in ast.walk(tree):
            if isinstance(child, ast.Attribute) and child.attr in names and _root_name(child.value) == alias:
                return f"{shown} uses {module_name}.{child.attr} when it is imported"
    return None


@functools.lru_cache(maxsize=128)
def _parsed_for_import(
    source: str, filename: str,
) -> tuple[ast.Module, frozenset[str], tuple[tuple[ast.Import | ast.ImportFrom, bool], ...], frozenset[str]] | None:
    """What `used_at_import` needs of another module, the same for every edit: its tree, the names its
    import-time code mentions, its import statements (each with whether it runs at import), and the
    identifier-like strings its import-time code holds."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError, RecursionError):
        return None
    future = any(
        isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    at_import: set[int] = set()
    strings: set[str] = set()
    for node in _import_time_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            at_import.add(id(node))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            strings.add(node.value)
    imports = tuple((n, id(n) in at_import) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return tree, frozenset(_ImportTime(tree, future).mentioned), imports, frozenset(strings)


def star_exports(module: types.ModuleType, names: set[str]) -> set[str]:
    """Which of `names` (of `module`) `from module import *` binds: those in `__all__`, else the public ones."""
    public = vars(module).get("__all__")
    if public is not None:
        try:
            return names & set(public)
        except TypeError:
            return set(names)  # an odd __all__: assume the worst
    return {n for n in names if not n.startswith("_")}


def _absolute_module(node: ast.ImportFrom, package: str | None) -> str | None:
    """The module a `from ... import` statement imports from, relative ones resolved against `package`."""
    if node.level == 0:
        return node.module
    if not package:
        return None
    try:
        return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    except (ImportError, ValueError):
        return None


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node of the module that runs when it is imported: all but the insides of functions and lambdas."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _apply_change(module: types.ModuleType, change: Change, undo: list[Callable[[], None]]) -> None:
    if change.action == "add":
        holder = _resolve(module, change.path[:-1])
        key = change.path[-1]
        if holder is not change.target:
            raise PatchError(f"{'.'.join(change.path[:-1])} was replaced after the edit was classified")
        if key in vars(holder):
            raise PatchError(f"{key} appeared after the edit was classified")
        setattr(holder, key, change.value)
        undo.append(functools.partial(delattr, holder, key))
        return
    live = _resolve(module, change.path)
    if isinstance(live, (staticmethod, classmethod)):
        live = live.__func__
    elif type(live) is _LRU_WRAPPER and live is not change.target:
        live = live.__wrapped__
    if live is not change.target:
        raise PatchError(f"it was replaced by {type(live).__name__} {live!r:.60} after the edit was classified")
    for attr, value in change.attrs.items():
        old = getattr(live, attr)
        setattr(live, attr, value)
        undo.append(functools.partial(setattr, live, attr, old))


def _resolve(module: types.ModuleType, path: tuple[str, ...]) -> object:
    """The object at `path` (namespace keys) under `module`, or None."""
    obj: object = module
    for key in path:
        obj = vars(obj).get(key) if isinstance(obj, (type, types.ModuleType)) else None
    return obj


class _Classifier:
    """Compares two versions of a module; collects fresh reasons and the patch plan."""

    def __init__(
        self, module: types.ModuleType, filename: str, shown: str, old: tuple[str, ast.Module],
        new: tuple[str, ast.Module], new_code: types.CodeType,
    ) -> None:
        self.module = module
        self.filename = filename  # module.__file__, known to be set
        self.shown = shown
        self.old_lines, self.old_tree = _NEWLINE.split(old[0]), old[1]
        self.new_lines, self.new_tree = _NEWLINE.split(new[0]), new[1]
        self.new_code = new_code
        self.new_codes = _child_codes(new_code)
        self.future_annotations = any(
            isinstance(s, ast.ImportFrom) and s.module == "__future__" and any(a.name == "annotations" for a in s.names)
            for s in self.new_tree.body
        )
        self.reasons: list[str] = []
        self.plan: list[Change] = []
        self.notes: list[str] = []

    def fresh(self, text: str) -> None:
        self.reasons.append(f"{self.shown}: {text}")

    def same(self, old: Sequence[ast.stmt], new: Sequence[ast.stmt]) -> bool:
        """Whether two statement lists are equal, comments and formatting aside.

        A statement whose source text did not change is equal without
        walking its tree, which is most of them.
        """
        return len(old) == len(new) and all(
            _span(self.old_lines, o) == _span(self.new_lines, n) or _same(o, n) for o, n in zip(old, new, strict=True)
        )

    def run(self) -> None:
        old, new = _Body(self.old_tree.body, _DEFS), _Body(self.new_tree.body, _DEFS)
        self.compare_statements(old, new, None)
        if not _same(old.doc, new.doc):
            doc = _stored_constant(self.new_code, "__doc__") if new.doc else None
            self.plan.append(Change("patch", "", "docstring", (), self.module, {"__doc__": doc}))
        added: list[_DefNode] = []
        for name, nodes in new.defs.items():
            before = old.defs.get(name)
            if before is None:
                added.extend(nodes)
                continue
            if not self.compare_duplicates(before, nodes, None):
                continue
            o, n = before[0], nodes[0]
            if isinstance(o, ast.ClassDef) and isinstance(n, ast.ClassDef):
                self.compare_class(o, n)
            elif isinstance(o, ast.ClassDef) or isinstance(n, ast.ClassDef):
                self.fresh(f"{name} changed between a class and a function")
            else:
                self.compare_function(o, n, None)
        for name, nodes in old.defs.items():
            if name not in new.defs:
                self.fresh(f"{_kind_word(nodes[0], None)} {name} removed")
        for node in added:
            if len(new.defs[node.name]) > 1:
                self.fresh(f"new {_kind_word(node, None)} {node.name} is defined more than once")
            elif isinstance(node, ast.ClassDef):
                self.fresh(f"class {node.name} added")
            elif any(isinstance(s, ast.ImportFrom) and s.names[0].name == "*" for s in self.new_tree.body):
                # A star import may bind the same name, before or after the def.
                self.fresh(f"function {node.name} added to a module with a star import")
            else:
                self.add_function(node, None, None)
        if not self.reasons:
            self.check_import_time()

    # --- statements other than defs -------------------------------------

    def compare_statements(self, old: _Body[_D], new: _Body[_D], cls: str | None) -> None:
        """Reasons for changed non-def statements and for defs moved around them."""
        where = f"class {cls}: " if cls else ""
        if not self.same(old.others, new.others):
            before = len(self.reasons)
            if cls is None and _imports(old.others) != _imports(new.others):
                self.fresh("import statements changed")
            old_bound, new_bound = _assignments(old.others), _assignments(new.others)
            member = self.member_word(cls)
            for name in new_bound:
                if name not in old_bound:
                    self.fresh(f"{where}{member(name, new_bound[name][0])} added")
                elif old_bound[name][1] != new_bound[name][1]:
                    self.fresh(f"{where}{member(name, new_bound[name][0])} changed")
            for name in old_bound:
                if name not in new_bound:
                    self.fresh(f"{where}{member(name, old_bound[name][0])} removed")
            if len(self.reasons) == before:
                self.fresh(f"{where}{_first_difference(old.others, new.others, cls)}")
            return
        # Same statements: a def that moved across one of them changes what
        # the statement sees when the module is imported (defs swapped
        # between two statements do not).
        for name in new.gaps.keys() & old.gaps.keys():
            if old.gaps[name] != new.gaps[name]:
                scope = "class-level" if cls else "top-level"
                self.fresh(f"{where}{_kind_word(new.defs[name][0], cls)} {name} moved across other {scope} statements")

    def member_word(self, cls: str | None) -> Callable[[str, ast.stmt], str]:
        """How to name an assigned name in a reason: module constant RATE, class attribute 'x', field 'y'."""
        live = vars(self.module).get(cls) if cls else None
        if cls is None:
            return lambda name, stmt: f"module {'constant' if name.isupper() else 'variable'} {name}"
        if isinstance(live, enum.EnumMeta):
            return lambda name, stmt: f"enum member '{name}'"
        return lambda name, stmt: f"{'field' if isinstance(stmt, ast.AnnAssign) else 'class attribute'} '{name}'"

    def compare_duplicates(self, old: Sequence[_DefNode], new: Sequence[_DefNode], cls: str | None) -> bool:
        """True when the name is defined once in both versions and can be compared by member."""
        if len(old) == 1 and len(new) == 1:
            return True
        if not self.same(old, new):
            qualname = f"{cls}.{new[0].name}" if cls else new[0].name
            self.fresh(f"{_kind_word(new[0], cls)} {qualname} is defined more than once and changed")
        return False

    # --- classes --------------------------------------------------------

    def compare_class(self, old: ast.ClassDef, new: ast.ClassDef) -> None:
        name = new.name
        before = len(self.reasons)
        if self.same([old], [new]):
            self.refresh_class_lines(old, new)
            return
        if not _same(old.bases, new.bases):
            self.fresh(f"class {name}: base classes changed")
        if not _same(old.keywords, new.keywords):
            self.fresh(f"class {name}: metaclass or class keywords changed")
        if not _same(old.decorator_list, new.decorator_list):
            self.fresh(f"class {name}: class decorators changed")
        if not _same(getattr(old, "type_params", None), getattr(new, "type_params", None)):
            self.fresh(f"class {name}: type parameters changed")
        if len(self.reasons) > before:
            return
        if getattr(new, "type_params", None):
            self.fresh(f"class {name} has type parameters; its change needs a fresh import")
            return
        live = self.live_class(name)
        if live is None:
            self.fresh(f"class {name} in the live module is not the class defined in {self.shown}")
            return
        old_body, new_body = _Body(old.body, _FUNCTION_DEFS), _Body(new.body, _FUNCTION_DEFS)
        self.compare_statements(old_body, new_body, name)
        class_code = self.new_codes.get(name)
        stored = _stored_constants(class_code) if class_code is not None else {}
        attrs: dict[str, object] = {}
        if not _same(old_body.doc, new_body.doc):
            attrs["__doc__"] = stored.get("__doc__")
        for attr in ("__static_attributes__", "__firstlineno__"):  # set by the compiler since 3.13
            if attr in stored and vars(live).get(attr, stored[attr]) != stored[attr]:
                attrs[attr] = stored[attr]
        for method, nodes in new_body.defs.items():
            previous = old_body.defs.get(method)
            if previous is None and len(nodes) > 1:
                self.fresh(f"new {_kind_word(nodes[0], name)} {name}.{method} is defined more than once")
            elif previous is None:
                self.add_function(nodes[0], new, live)
            elif self.compare_duplicates(previous, nodes, name):
                self.compare_function(previous[0], nodes[0], name)
        for method in old_body.defs:
            if method not in new_body.defs:
                self.fresh(f"method {name}.{method} removed")
        if attrs:
            detail = "docstring" if "__doc__" in attrs else "attributes"
            self.plan.append(Change("patch", name, detail, (name,), live, attrs))

    def refresh_class_lines(self, old: ast.ClassDef, node: ast.ClassDef) -> None:
        """Unchanged class: refresh line numbers of its methods (and __firstlineno__ on 3.13+)."""
        live = self.live_class(node.name)
        if live is None:
            return
        for old_member, member in zip(old.body, node.body, strict=True):
            if isinstance(member, _FUNCTION_DEFS):
                self.refresh_lines(old_member, member, node.name)
        class_code = self.new_codes.get(node.name)
        if "__firstlineno__" in vars(live) and class_code is not None:
            first = _stored_constant(class_code, "__firstlineno__")
            if first is not None and first != vars(live)["__firstlineno__"]:
                self.plan.append(Change("patch", node.name, "lines", (node.name,), live, {"__firstlineno__": first}))

    def live_class(self, name: str) -> type | None:
        """The live class `name` if it is the one the class statement created."""
        live = vars(self.module).get(name)
        if isinstance(live, type) and live.__module__ == self.module.__name__ and live.__qualname__ == name:
            return live
        return None

    # --- functions and methods -------------------------------------------

    def compare_function(self, old: _FunctionNode, new: _FunctionNode, cls: str | None) -> None:
        qualname = f"{cls}.{new.name}" if cls else new.name
        what = "method" if cls else "function"
        if self.same([old], [new]):
            self.refresh_lines(old, new, cls)
            return
        if type(old) is not type(new):
            self.fresh(f"{what} {qualname} changed between def and async def")
            return
        if not _same(old.decorator_list, new.decorator_list):
            self.fresh(f"decorators of {what} {qualname} changed")
            return
        wrapper = _expected_wrapper(new, cls)
        cached = wrapper is False and _is_cache_decorator(new, self.module)
        if wrapper is False and not cached:
            decorator = ast.unparse(new.decorator_list[0])
            if _is_property(new):
                self.fresh(f"property {qualname} changed (properties are only reloaded by a fresh import)")
            else:
                self.fresh(f"{what} {qualname} is decorated with @{decorator}; its change needs a fresh import")
            return
        if getattr(new, "type_params", None):
            self.fresh(f"{what} {qualname} has type parameters; its change needs a fresh import")
            return
        if cls and new.name in _CLASS_CREATION_HOOKS:
            self.fresh(f"method {qualname} runs while classes are created; its change needs a fresh import")
            return
        if cls and new.name in _CACHED_BY_DATA and not (
            _same(old.args, new.args) and self.same(_without_docstring(old.body), _without_docstring(new.body))
        ):
            self.fresh(f"{self.module.__name__}.{qualname} changed: {_CACHED_BY_DATA[new.name]}")
            return
        cache = None
        if wrapper is False:  # that is, cached: any other decorator returned above
            cache = self.live_attribute(new.name, cls)
            live = cache.__wrapped__ if type(cache) is _LRU_WRAPPER else None
            live = live if self.is_own_function(live, new, cls) else None
        else:
            live = self.live_function(new, cls, wrapper)
        if live is None:
            self.fresh(f"{what} {qualname} in the live module is not the function defined in {self.shown} "
                       "(replaced or wrapped at run time)")
            return
        code = self.new_function_code(new, cls)
        if code is None:
            self.fresh(f"could not find the compiled code of {what} {qualname}")
            return
        if code.co_freevars != live.__code__.co_freevars:
            self.fresh(f"{what} {qualname}: its closure variables changed "
                       f"({', '.join(live.__code__.co_freevars) or 'none'} -> {', '.join(code.co_freevars) or 'none'})")
            return
        if (code.co_flags ^ live.__code__.co_flags) & _KIND_FLAGS:
            self.fresh(f"{what} {qualname} changed between a plain function and a generator or coroutine")
            return
        attrs: dict[str, object] = {"__code__": code}
        self.note_mutated_defaults(old, new, live, qualname, cls)
        signature = not (_same(old.args, new.args) and _same(old.returns, new.returns))
        if signature:
            defaults = self.defaults(old, new, live, qualname, cls)
            annotations = self.annotations(new, old, live, qualname, cls)
            if defaults is None or annotations is None:
                return
            attrs["__defaults__"], attrs["__kwdefaults__"] = defaults
            attrs["__annotations__"] = annotations
        if ast.get_docstring(old, clean=False) != ast.get_docstring(new, clean=False):
            # The docstring as the compiler stores it (3.13 dedents it).
            attrs["__doc__"] = types.FunctionType(code, {}).__doc__
        if signature:
            detail = "signature"
        elif not self.same(_without_docstring(old.body), _without_docstring(new.body)):
            detail = "body"
        else:
            detail = "docstring"
        path = self.path(new.name, cls)
        self.plan.append(Change("patch", qualname, detail, path, live, attrs))
        if cache is not None:
            # update_wrapper copied these onto the cache wrapper when the def ran.
            copied = {k: v for k, v in attrs.items() if k in ("__doc__", "__annotations__")}
            if copied:
                self.plan.append(Change("patch", qualname, "attributes", path, cache, copied))
            if detail != "docstring":
                # A fresh import starts with an empty cache; the old results are the old code's.
                self.plan.append(Change("clear", qualname, "cache", path, cache))

    def refresh_lines(self, old: ast.stmt | None, node: _FunctionNode, cls: str | None) -> None:
        """Unchanged function: give the live one the new code if only its line numbers moved.

        Skipped silently when the live object is not the plain function (a
        decorated function): the code is the same, only tracebacks are off.
        """
        if old is not None and old.lineno == node.lineno and _span(self.old_lines, old) == _span(self.new_lines, node):
            return  # same text on the same lines: same positions
        raw = self.live_attribute(node.name, cls)
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        elif type(raw) is _LRU_WRAPPER:
            raw = raw.__wrapped__
        if not self.is_own_function(raw, node, cls):
            return
        live = raw
        code = self.new_function_code(node, cls)
        if code is None or code.co_freevars != live.__code__.co_freevars:
            return
        if _positions(code) != _positions(live.__code__):
            qualname = f"{cls}.{node.name}" if cls else node.name
            self.plan.append(Change("patch", qualname, "lines", self.path(node.name, cls), live, {"__code__": code}))

    def add_function(self, node: _DefNode, class_node: ast.ClassDef | None, live_cls: type | None) -> None:
        """Plan to bind a new function, or a new method on the live class of `class_node`."""
        cls = class_node.name if class_node else None
        if not isinstance(node, _FUNCTION_DEFS):
            self.fresh(f"class {cls}: nested class {node.name} added")
            return
        qualname = f"{cls}.{node.name}" if cls else node.name
        what = "method" if cls else "function"
        holder: object = live_cls if cls else self.module
        key = _mangle(node.name, cls)
        wrapper = _expected_wrapper(node, cls)
        if wrapper is False:
            self.fresh(f"new {what} {qualname} is decorated with @{ast.unparse(node.decorator_list[0])}")
            return
        if cls and (node.name.startswith("__") and node.name.endswith("__")):
            # type() treats special methods at class creation (slots, __hash__
            # = None next to __eq__, implicit wrappers) in ways setattr does not.
            self.fresh(f"special method {qualname} added")
            return
        if class_node and (type(live_cls) is not type or class_node.decorator_list):
            self.fresh(f"method {qualname} added to a class with a metaclass or class decorators")
            return
        if getattr(node, "type_params", None):
            self.fresh(f"new {what} {qualname} has type parameters")
            return
        if key in vars(holder):
            where = "class" if cls else "module"
            self.fresh(f"new {what} {qualname}: the name {key} is already bound in the live {where}")
            return
        code = self.new_function_code(node, cls)
        if code is None:
            self.fresh(f"could not find the compiled code of new {what} {qualname}")
            return
        if code.co_freevars == ():
            closure = None
        elif code.co_freevars == ("__class__",) and live_cls is not None:
            # What the class body would give it: a cell holding the class (for super()).
            closure = (types.CellType(live_cls),)
        else:
            self.fresh(f"new {what} {qualname} has closure variables {', '.join(code.co_freevars)}")
            return
        defaults = self.defaults(None, node, None, qualname, cls)
        annotations = self.annotations(node, None, None, qualname, cls)
        if defaults is None or annotations is None:
            return
        function = types.FunctionType(code, vars(self.module), node.name, defaults[0], closure)
        function.__kwdefaults__ = defaults[1]
        function.__qualname__ = qualname  # 3.10 takes it from the name, not co_qualname
        if annotations:
            function.__annotations__ = annotations
        value = wrapper(function) if wrapper else function
        self.plan.append(Change("add", qualname, "new", self.path(node.name, cls), holder, value=value))

    def live_attribute(self, name: str, cls: str | None) -> object:
        if cls is None:
            return vars(self.module).get(name)
        live_cls = self.live_class(cls)
        return vars(live_cls).get(_mangle(name, cls)) if live_cls is not None else None

    def live_function(self, node: _FunctionNode, cls: str | None, wrapper: _Wrapper | None) -> types.FunctionType | None:
        """The live function for `node`, if it is exactly what the def statement created."""
        raw = self.live_attribute(node.name, cls)
        if wrapper is not None:
            if type(raw) is not wrapper:
                return None
            raw = raw.__func__
        return raw if self.is_own_function(raw, node, cls) else None

    def is_own_function(self, obj: object, node: _FunctionNode, cls: str | None) -> TypeGuard[types.FunctionType]:
        """Whether `obj` is a plain function made by this module's def `node` (not replaced at run time)."""
        if type(obj) is not types.FunctionType:
            return False
        qualname = f"{cls}.{node.name}" if cls else node.name
        code = obj.__code__
        return (
            obj.__globals__ is vars(self.module)
            and obj.__module__ == self.module.__name__
            and obj.__qualname__ == qualname
            and code.co_name == node.name
            and code.co_filename == self.filename
            and getattr(code, "co_qualname", qualname) == qualname
        )

    def new_function_code(self, node: _FunctionNode, cls: str | None) -> types.CodeType | None:
        """The code object of def `node` in the compiled new source."""
        if cls is None:
            code = self.new_codes.get(node.name)
        else:
            class_code = self.new_codes.get(cls)
            code = _child_codes(class_code).get(node.name) if class_code is not None else None
        qualname = f"{cls}.{node.name}" if cls else node.name
        if code is None or getattr(code, "co_qualname", qualname) != qualname:
            return None
        return code

    def path(self, name: str, cls: str | None) -> tuple[str, ...]:
        return (cls, _mangle(name, cls)) if cls else (name,)

    def note_mutated_defaults(
        self, old: _FunctionNode, new: _FunctionNode, live: types.FunctionType, qualname: str, cls: str | None,
    ) -> None:
        """Note a default the patch keeps that no longer equals what its def made (`acc=[]` appended to).

        A fresh import evaluates the def again; the patch keeps the live
        value when the expression did not change, as it does for every
        function the edit did not touch.
        """
        positional = [*old.args.posonlyargs, *old.args.args]
        # zip stops at the shorter: the live defaults may have been replaced by fewer (or none).
        pairs = list(zip(positional[len(positional) - len(old.args.defaults):], old.args.defaults,
                         live.__defaults__ or (), strict=False))
        kwdefaults = live.__kwdefaults__ or {}
        pairs += [(a, d, kwdefaults.get(_mangle(a.arg, cls), d)) for a, d in zip(old.args.kwonlyargs, old.args.kw_defaults, strict=True)
                  if d is not None]
        new_exprs = {a.arg: d for a, d in zip([*new.args.posonlyargs, *new.args.args][::-1], new.args.defaults[::-1], strict=False)}
        new_exprs.update({a.arg: d for a, d in zip(new.args.kwonlyargs, new.args.kw_defaults, strict=True) if d is not None})
        for arg, expr, value in pairs:
            if arg.arg not in new_exprs or not _same(expr, new_exprs[arg.arg]) or not isinstance(
                    expr, (ast.List, ast.Dict, ast.Set, ast.Call)):
                continue  # changed (then re-evaluated), or not a container that calls can fill
            try:
                differs = value != ast.literal_eval(expr)  # literal_eval accepts set()
            except Exception:  # not a literal, or a comparison that raises: nothing to say for sure
                continue
            if differs:
                shown = reprlib.repr(value)
                self.notes.append(f"{self.module.__name__}.{qualname} keeps its default {arg.arg}={shown}, filled "
                                  f"since import (a fresh import gives {ast.unparse(expr)})")

    # --- signatures -------------------------------------------------------

    def defaults(
        self, old: _FunctionNode | None, new: _FunctionNode, live: types.FunctionType | None, qualname: str,
        cls: str | None,
    ) -> tuple[tuple[object, ...] | None, dict[str, object] | None] | None:
        """(__defaults__, __kwdefaults__) a fresh def would give, or None after a fresh reason.

        A default whose expression did not change keeps its live value (as it
        does in functions the edit did not touch); a new or changed one must be
        a literal, since evaluating anything else would run module code.
        """
        previous: dict[str, tuple[ast.expr, object]] = {}
        if old is not None:
            assert live is not None  # the live function comes with its old def
            live_defaults = live.__defaults__ or ()
            live_kwdefaults = live.__kwdefaults__ or {}
            old_positional = [*old.args.posonlyargs, *old.args.args]
            old_with_default = old_positional[len(old_positional) - len(old.args.defaults):]
            old_kw = [(a, d) for a, d in zip(old.args.kwonlyargs, old.args.kw_defaults, strict=True) if d is not None]
            if len(live_defaults) != len(old.args.defaults) or set(live_kwdefaults) != {
                _mangle(a.arg, cls) for a, _ in old_kw
            }:
                self.fresh(f"the defaults of live function {qualname} do not match its previous source")
                return None
            for arg, expr, value in zip(old_with_default, old.args.defaults, live_defaults, strict=True):
                previous[arg.arg] = (expr, value)
            for arg, expr in old_kw:
                previous[arg.arg] = (expr, live_kwdefaults[_mangle(arg.arg, cls)])

        def value_of(arg: ast.arg, expr: ast.expr) -> tuple[bool, object]:
            known = previous.get(arg.arg)
            if known is not None and _same(known[0], expr):
                return True, known[1]
            if not any(isinstance(n, ast.Call) for n in ast.walk(expr)):  # literal_eval accepts set()
                try:
                    return True, ast.literal_eval(expr)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    pass
            self.fresh(f"default of {arg.arg} in {qualname} is not a literal ({ast.unparse(expr)})")
            return False, None

        positional = [*new.args.posonlyargs, *new.args.args]
        values = []
        for arg, expr in zip(positional[len(positional) - len(new.args.defaults):], new.args.defaults, strict=True):
            ok, value = value_of(arg, expr)
            if not ok:
                return None
            values.append(value)
        kwvalues = {}
        for arg, default in zip(new.args.kwonlyargs, new.args.kw_defaults, strict=True):
            if default is not None:
                ok, value = value_of(arg, default)
                if not ok:
                    return None
                kwvalues[_mangle(arg.arg, cls)] = value
        return (tuple(values) or None, kwvalues or None)

    def annotations(
        self, new: _FunctionNode, old: _FunctionNode | None, live: types.FunctionType | None, qualname: str,
        cls: str | None,
    ) -> dict[str, object] | None:
        """The __annotations__ a fresh def would give, or None after a fresh reason.

        The compiler builds the dict (key order, name mangling, the strings of
        `from __future__ import annotations`): a stub def with the same
        signature and an empty body is compiled and executed, with defaults
        and decorators removed, and the annotations that did not change
        replaced by None and then by their live values. Without the future
        import the changed annotations are evaluated in the module namespace,
        so they must be plain type expressions (names, attributes,
        subscripts, `|`, literals).
        """
        previous = _annotation_nodes(old) if old is not None else {}
        live_annotations = live.__annotations__ if live is not None else {}
        reused: dict[str, object] = {}

        def stub_annotation(key: str, expr: ast.expr | None) -> ast.expr | None:
            if expr is None:
                return None
            mangled = key if key == "return" else _mangle(key, cls)
            if key in previous and _same(previous[key], expr) and mangled in live_annotations:
                reused[mangled] = live_annotations[mangled]
                return ast.copy_location(ast.Constant(None), expr)
            if not self.future_annotations and not all(
                isinstance(n, _TYPE_EXPRESSION_NODES) and (not isinstance(n, ast.BinOp) or isinstance(n.op, ast.BitOr))
                for n in ast.walk(expr)
            ):
                raise _NotSafe(f"annotation {ast.unparse(expr)} in {qualname} is not a plain type expression")
            return expr

        stub = copy.copy(new)
        stub.decorator_list = []
        stub.body = [ast.Pass()]
        stub.args = copy.copy(new.args)
        stub.args.defaults = []
        stub.args.kw_defaults = [None] * len(new.args.kwonlyargs)
        try:
            for group in ("posonlyargs", "args", "kwonlyargs"):
                setattr(stub.args, group, [_with_annotation(a, stub_annotation(a.arg, a.annotation))
                                           for a in getattr(new.args, group)])
            for single in ("vararg", "kwarg"):
                arg = getattr(new.args, single)
                if arg is not None:
                    setattr(stub.args, single, _with_annotation(arg, stub_annotation(arg.arg, arg.annotation)))
            stub.returns = stub_annotation("return", new.returns)
        except _NotSafe as exc:
            self.fresh(str(exc))
            return None
        if stub.returns is None and not any(a.annotation for a in _all_args(stub.args)):
            return {}
        body: ast.stmt = stub
        if cls:
            if sys.version_info >= (3, 12):  # the field ClassDef has since 3.12
                body = ast.ClassDef(name=cls, bases=[], keywords=[], body=[stub], decorator_list=[], type_params=[])
            else:
                body = ast.ClassDef(name=cls, bases=[], keywords=[], body=[stub], decorator_list=[])
        tree = ast.fix_missing_locations(ast.Module(body=[body], type_ignores=[]))
        flags = __future__.annotations.compiler_flag if self.future_annotations else 0
        namespace: dict[str, object] = {}
        try:
            code = compile(tree, self.filename, "exec", flags=flags, dont_inherit=True)
            exec(code, vars(self.module), namespace)
        except Exception as exc:
            self.fresh(f"the new annotations of {qualname} could not be evaluated ({type(exc).__name__}: {exc})")
            return None
        function = vars(namespace[cls])[_mangle(new.name, cls)] if cls else namespace[new.name]
        if isinstance(function, (staticmethod, classmethod)):
            function = function.__func__
        return {**function.__annotations__, **reused}

    # --- what runs at import --------------------------------------------

    def check_import_time(self) -> None:
        """Fresh when a planned change touches something the module's import already ran or read.

        A function called by a top-level statement (`RATE = compute()`), a
        method of a class instantiated at import, or a function a metaclass
        calls, produced state that a patch cannot redo.
        """
        changes = [c for c in self.plan if c.detail not in ("lines", "attributes", "cache")]
        if not changes:
            return
        uses = _ImportTime(self.new_tree, self.future_annotations)
        for change in changes:
            cls, _, name = change.qualname.rpartition(".")
            if change.action == "add":
                if name in uses.mentioned:
                    self.fresh(f"new {'method' if cls else 'function'} {change.qualname}: "
                               f"the name {name} is used by code that runs at import time")
            elif change.qualname == "":
                if "__doc__" in uses.mentioned:
                    self.fresh("the module docstring is used by code that runs at import time")
            elif change.qualname in uses.reached:
                line = uses.reached[change.qualname]
                if isinstance(change.target, type):
                    self.fresh(f"class {change.qualname} is used while the module is imported (line {line}); "
                               "its docstring change needs a fresh import")
                else:
                    self.fresh(f"{'method' if cls else 'function'} {change.qualname} may run while the module is "
                               f"imported (used at line {line}); its change needs a fresh import")
            elif cls:
                self.check_metaclass(change, cls, name)

    def check_metaclass(self, change: Change, cls: str, name: str) -> None:
        """Fresh when the class's metaclass may have called the changed method while creating the class."""
        meta = type(vars(self.module)[cls])
        if meta is type or meta.__module__ in ("abc", "typing"):
            return
        if issubclass(meta, enum.EnumMeta):
            # Enum creation calls __new__/__init__/_generate_next_value_ and
            # similar hooks, all named with a leading underscore.
            if name.startswith("_"):
                self.fresh(f"enum {cls}: method {name} runs while the members are created")
            return
        self.fresh(f"class {cls} has metaclass {meta.__name__}, which may have called {change.qualname} "
                   "when the class was created")


class _NotSafe(Exception):
    """A new annotation that cannot be evaluated without running arbitrary code."""


class _Body(Generic[_D]):
    """The statements of a module or class body, split into docstring, defs by name, and the rest.

    `_D` is what `def_types` picks out: all defs (_DEFS) or functions only (_FUNCTION_DEFS).
    """

    def __init__(self, body: list[ast.stmt], def_types: tuple[type[_D], ...]) -> None:
        self.doc: ast.Expr | None = None
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            self.doc, body = body[0], body[1:]
        self.defs: dict[str, list[_D]] = {}
        self.others: list[ast.stmt] = []
        self.gaps: dict[str, list[int]] = {}  # def name -> how many other statements precede each of its defs
        for stmt in body:
            if isinstance(stmt, def_types):
                self.defs.setdefault(stmt.name, []).append(stmt)
                self.gaps.setdefault(stmt.name, []).append(len(self.others))
            else:
                self.others.append(stmt)


class _ImportTime:
    """Which of the module's own functions and classes may run while the module is imported.

    An over-approximation from the AST: code that runs at import is every
    top-level statement except defs (and except the body of `if __name__ ==
    '__main__':`), class bodies, decorators, default values and, without the
    future import, annotations. A name used there may be called, unless it is
    only stored (`HANDLERS = {'a': handle_a}`, `REGISTRY['b'] = handle_b`,
    `def f(cb=handler)`): then it counts as called once the name it was stored
    into is used. A function that may be called adds every name its body uses;
    a class adds all its methods. Names a bare base class or an annotation
    uses are only recorded as mentioned. Dynamic look-ups (`globals()[...]`,
    `getattr(module, ...)`) are not followed.
    """

    def __init__(self, tree: ast.Module, future_annotations: bool) -> None:
        self.future_annotations = future_annotations
        self.functions: dict[str, _FunctionNode] = {}
        self.classes: dict[str, dict[str, _FunctionNode]] = {}
        for stmt in tree.body:
            if isinstance(stmt, _FUNCTION_DEFS):
                self.functions[stmt.name] = stmt
            elif isinstance(stmt, ast.ClassDef):
                self.classes[stmt.name] = {m.name: m for m in stmt.body if isinstance(m, _FUNCTION_DEFS)}
        self.stored: defaultdict[str, set[tuple[str, str | None]]] = defaultdict(set)
        self.reached: dict[str, int] = {}  # qualname -> line of the import-time code that may run it
        self.mentioned: set[str] = set()
        self._todo: list[tuple[str, int, str | None]] = []
        for stmt in tree.body:
            self._statement(stmt, None)
        while self._todo:
            self._reach(*self._todo.pop())

    def _statement(self, stmt: ast.stmt, cls: str | None) -> None:
        if isinstance(stmt, _FUNCTION_DEFS):
            self._run(stmt.decorator_list, cls)
            owner = f"{cls}.{stmt.name}" if cls else stmt.name
            self._store([*stmt.args.defaults, *filter(None, stmt.args.kw_defaults)], [owner], cls)
            self._annotations([a.annotation for a in _all_args(stmt.args)] + [stmt.returns], cls)
        elif isinstance(stmt, ast.ClassDef):
            self._run(stmt.decorator_list, cls)
            if any(_root_name(d, True) in {**self.functions, **self.classes} for d in stmt.decorator_list):
                # A decorator of this module gets the class and may call its methods.
                self._todo.append((stmt.name, stmt.lineno, None))
            for base in stmt.bases:
                if isinstance(base, ast.Name):
                    self.mentioned.add(base.id)  # only __init_subclass__ runs: always fresh
                else:
                    self._run([base], cls)
            self._run([k.value for k in stmt.keywords], cls)
            for member in stmt.body:
                self._statement(member, stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if isinstance(stmt, ast.AnnAssign):
                self._annotations([stmt.annotation], cls)
            owners = []
            for target in targets:
                for element in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                    root = _root_name(element)
                    if root is None:
                        self._run([element], cls)
                        continue
                    owners.append(cls or root)
                    # REGISTRY[key] = f: the key runs, REGISTRY only stores.
                    self._run([n for n in ast.iter_child_nodes(element) if n is not getattr(element, "value", None)
                               and not isinstance(n, ast.expr_context)], cls)
            if stmt.value is not None:
                self._store([stmt.value], owners, cls)
        elif isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
            self._run([stmt.test], cls)
            for inner in stmt.orelse:
                self._statement(inner, cls)
        else:
            self._run([stmt], cls)

    def _run(self, nodes: Iterable[ast.AST], cls: str | None) -> None:
        """Code that runs at import: every name it loads may be called."""
        for node in nodes:
            for name in ast.walk(node):
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load):
                    self.mentioned.add(name.id)
                    self._todo.append((name.id, getattr(node, "lineno", 0), cls))

    def _store(self, values: list[ast.expr], owners: list[str], cls: str | None) -> None:
        """Values stored into `owners`: bare names (also in displays) only run when an owner is used."""
        for value in values:
            stack = [value]
            while stack:
                expr = stack.pop()
                if isinstance(expr, ast.Name):
                    self.mentioned.add(expr.id)
                    for owner in owners:
                        self.stored[owner].add((expr.id, cls))
                elif isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
                    stack.extend(expr.elts)
                elif isinstance(expr, ast.Dict):
                    stack.extend(filter(None, [*expr.keys, *expr.values]))
                else:
                    self._run([expr], cls)

    def _annotations(self, nodes: list[ast.expr | None], cls: str | None) -> None:
        for node in filter(None, nodes):
            if self.future_annotations:
                continue  # kept as strings, never evaluated at import
            if any(isinstance(n, ast.Call) for n in ast.walk(node)):
                self._run([node], cls)
            else:
                self.mentioned.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))

    def _reach(self, name: str, line: int, cls: str | None) -> None:
        if cls is not None and name in self.classes.get(cls, {}):
            self._reach_function(f"{cls}.{name}", self.classes[cls][name], line)
        if name in self.functions:
            self._reach_function(name, self.functions[name], line)
        elif name in self.classes and name not in self.reached:
            self.reached[name] = line
            for method, node in self.classes[name].items():
                self._reach_function(f"{name}.{method}", node, line)
        for key in (name, f"{cls}.{name}") if cls else (name,):
            for stored, scope in self.stored.pop(key, ()):
                self._todo.append((stored, line, scope))

    def _reach_function(self, qualname: str, node: _FunctionNode, line: int) -> None:
        if qualname in self.reached:
            return
        self.reached[qualname] = line
        for name in ast.walk(node):
            if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Load):
                self.mentioned.add(name.id)
                self._todo.append((name.id, line, None))
        for stored, scope in self.stored.pop(qualname, ()):
            self._todo.append((stored, line, scope))


def _same(a: object, b: object) -> bool:
    """Whether two ASTs (or lists of them) are equal, positions, comments and formatting aside."""
    if type(a) is not type(b):  # also keeps Constant(1) apart from Constant(True) and Constant(1.0)
        return False
    if isinstance(a, ast.AST):
        return all(_same(getattr(a, f, None), getattr(b, f, None)) for f in a._fields)
    if isinstance(a, list) and isinstance(b, list):  # b is a list when a is; the test tells mypy (cheaper than cast)
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _span(lines: list[str], node: ast.stmt) -> tuple[int, int | None, list[str]]:
    """The exact source text of a statement (decorators included), as lines and columns."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
    return node.col_offset, node.end_col_offset, lines[first - 1:node.end_lineno]


def _without_docstring(body: list[ast.stmt]) -> list[ast.stmt]:
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[1:]
    return body


def _child_codes(code: types.CodeType) -> dict[str, types.CodeType]:
    """Code objects of the defs (functions, class bodies) directly inside `code`, by name."""
    return {c.co_name: c for c in code.co_consts if isinstance(c, types.CodeType)}


def _stored_constants(code: types.CodeType) -> dict[str, object]:
    """Names the code binds to constants (`__doc__`, `__firstlineno__`...), as the compiler made them."""
    found: dict[str, object] = {}
    previous = None
    for instruction in dis.get_instructions(code):
        if instruction.opname == "STORE_NAME" and previous is not None and previous.opname == "LOAD_CONST":
            found[instruction.argval] = previous.argval
        previous = instruction
    return found


def _stored_constant(code: types.CodeType, name: str) -> object:
    return _stored_constants(code).get(name)


def _positions(code: types.CodeType) -> tuple[object, ...]:
    """Everything about `code` and its nested code that depends on where it sits in the file."""
    table = code.co_positions() if hasattr(code, "co_positions") else code.co_lines()
    nested = tuple(_positions(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return code.co_firstlineno, tuple(table), nested


def _mangle(name: str, cls: str | None) -> str:
    """The key `name` gets in the namespace of class `cls` (private name mangling)."""
    if cls is None or not name.startswith("__") or name.endswith("__"):
        return name
    stripped = cls.lstrip("_")
    return f"_{stripped}{name}" if stripped else name


def _expected_wrapper(node: _FunctionNode, cls: str | None) -> _Wrapper | Literal[False] | None:
    """The wrapper the live class attribute should be (staticmethod/classmethod), None for a plain
    function, or False when the def has other decorators."""
    decorators = node.decorator_list
    if not decorators:
        return _IMPLICIT_WRAPPERS.get(node.name) if cls else None
    if cls and len(decorators) == 1 and isinstance(decorators[0], ast.Name) and decorators[0].id in _WRAPPERS:
        return _WRAPPERS[decorators[0].id]
    return False


def _is_cache_decorator(node: _FunctionNode, module: types.ModuleType) -> bool:
    """Whether the def's only decorator is functools.cache or functools.lru_cache (called with literals or not).

    The name must be bound to functools' own in the live module, so that a
    decorator of the user's that happens to be called `cache` never counts.
    """
    if len(node.decorator_list) != 1:
        return False
    decorator = node.decorator_list[0]
    if isinstance(decorator, ast.Call):
        arguments = [*decorator.args, *(k.value for k in decorator.keywords)]
        if any(k.arg is None for k in decorator.keywords) or not all(_is_literal(a) for a in arguments):
            return False
        decorator = decorator.func
    namespace = vars(module)
    if isinstance(decorator, ast.Name):
        return decorator.id in _CACHE_DECORATORS and namespace.get(decorator.id) is getattr(functools, decorator.id)
    if isinstance(decorator, ast.Attribute) and isinstance(decorator.value, ast.Name):
        return decorator.attr in _CACHE_DECORATORS and namespace.get(decorator.value.id) is functools
    return False


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _is_property(node: _FunctionNode) -> bool:
    return any(
        (isinstance(d, ast.Name) and d.id in ("property", "cached_property"))
        or (isinstance(d, ast.Attribute) and d.attr in ("setter", "getter", "deleter", "cached_property"))
        for d in node.decorator_list
    )


def _kind_word(node: ast.stmt, cls: str | None) -> str:
    if isinstance(node, ast.ClassDef):
        return "class"
    return "method" if cls else "function"


def _all_args(args: ast.arguments) -> list[ast.arg]:
    return [*args.posonlyargs, *args.args, *filter(None, [args.vararg]), *args.kwonlyargs, *filter(None, [args.kwarg])]


def _annotation_nodes(node: _FunctionNode) -> dict[str, ast.expr]:
    nodes = {a.arg: a.annotation for a in _all_args(node.args) if a.annotation is not None}
    if node.returns is not None:
        nodes["return"] = node.returns
    return nodes


def _with_annotation(arg: ast.arg, annotation: ast.expr | None) -> ast.arg:
    stub = copy.copy(arg)
    stub.annotation = annotation
    return stub


def _imports(statements: list[ast.stmt]) -> list[str]:
    return [ast.dump(s) for s in statements if isinstance(s, (ast.Import, ast.ImportFrom))]


def _assignments(statements: list[ast.stmt]) -> dict[str, tuple[ast.stmt, list[str]]]:
    """Simple names bound by assignments -> (first such statement, dumps of all of them)."""
    bound: dict[str, tuple[ast.stmt, list[str]]] = {}
    for stmt in statements:
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            targets = [stmt.target]
        else:
            continue
        for target in targets:
            for element in (target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]):
                if isinstance(element, ast.Name):
                    bound.setdefault(element.id, (stmt, []))[1].append(ast.dump(stmt))
    return bound


_STATEMENT_WORDS = {
    ast.If: "if", ast.Try: "try", ast.Expr: "expression", ast.For: "for", ast.While: "while", ast.With: "with",
    ast.Assert: "assert", ast.Delete: "del", ast.Import: "import", ast.ImportFrom: "import", ast.ClassDef: "class",
}


def _first_difference(old: list[ast.stmt], new: list[ast.stmt], cls: str | None) -> str:
    """A readable description of the first statement that differs between two lists."""
    scope = "class-level" if cls else "top-level"
    for index, stmt in enumerate(new):
        if index >= len(old) or not _same(old[index], stmt):
            word = _STATEMENT_WORDS.get(type(stmt), type(stmt).__name__.lower())
            change = "added" if len(new) > len(old) else "changed"
            return f"{scope} {word} statement {change} (line {stmt.lineno})"
    return f"{scope} statement removed (line {old[len(new)].lineno} before the edit)"


def _root_name(node: ast.expr, through_calls: bool = False) -> str | None:
    """`a` for `a`, `a.b`, `a[1]` (and `a.b(...)` when `through_calls`); None when no name is at the root."""
    while isinstance(node, (ast.Attribute, ast.Subscript)) or (through_calls and isinstance(node, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _is_main_guard(test: ast.expr) -> bool:
    """`__name__ == '__main__'` (either way round): never true when the module is imported."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(a, ast.Name) and a.id == "__name__" and isinstance(b, ast.Constant) and b.value == "__main__"
               for a, b in (sides, sides[::-1]))


def _shown_name(filename: str) -> str:
    """The file as reasons name it: 'shapes.py', or 'pkg/__init__.py' for a package."""
    base = os.path.basename(filename)
    if base == "__init__.py":
        return f"{os.path.basename(os.path.dirname(filename))}/{base}"
    return base


def _parse_error(exc: BaseException, shown: str) -> str:
    """A source that does not compile, as Python shows it: `SyntaxError: expected ':' (model.py, line 23)`."""
    if isinstance(exc, SyntaxError):
        where = f"{shown}, line {exc.lineno}" if exc.lineno else shown
        return f"{type(exc).__name__}: {exc.msg} ({where})"
    if isinstance(exc, RecursionError):
        return f"RecursionError: the source is nested too deeply to compile ({shown})"
    return f"{type(exc).__name__}: {exc} ({shown})"


def decode_source(data: bytes, filename: str) -> tuple[str | None, str | None]:
    """(text, None) for the bytes of a source file, or (None, reason) when Python could not read it either.

    Decoded as an import decodes it (PEP 263 coding cookie, UTF-8 by
    default, universal newlines); the reason names the file and the first
    byte that does not decode, by line and column as an editor shows them.
    """
    shown = _shown_name(filename)
    try:
        return importlib.util.decode_source(data), None
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        encoding = "UTF-8" if exc.encoding.replace("-", "").lower() == "utf8" else exc.encoding
        return None, (f"{shown}: cannot be decoded as {encoding}: byte 0x{data[exc.start]:02x} at line {line}, "
                      f"column {column} ({exc.reason})")
    except (SyntaxError, LookupError) as exc:  # a coding cookie naming an unknown encoding
        return None, f"{shown}: cannot be decoded: {getattr(exc, 'msg', None) or exc}"
