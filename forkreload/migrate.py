"""Move the user's variables from one worker process into the next.

When a swap replaces the worker, the old worker dumps its namespace to a file
(``dump_namespace``) and the new one, forked from a snapshot that has already
imported the edited code, loads it (``load_namespace``).  The rules:

* Values are pickled with a cloudpickle Pickler, protocol 5.  Objects whose
  class lives in an importable module travel by reference, so they come back
  as instances of the *new* code; functions and classes defined in cells
  travel by value.
* Functions defined in cells (``__globals__`` is the user namespace) are
  rebuilt with ``__globals__`` = the new worker's user namespace, not a
  private dict, so they keep seeing globals the user defines later.
* Each variable is pickled on its own, so one unpicklable value is reported
  lost without taking the others down.  Variables that share objects are
  pickled together so that identity (``a is b``) survives.
* Large contiguous buffers (numpy arrays, pandas blocks) go out of band into
  a companion file ``path + ".buf"``, which the loader maps copy-on-write:
  with ``path`` on tmpfs, the data is copied once (into tmpfs), never read
  through the pickle stream.
* The main file is authenticated with HMAC-SHA256 and verified before
  anything is unpickled.  The companion file holds raw bytes only.
* The global state of ``random`` and ``numpy.random`` travels along, so a
  seeded computation continues the same sequence.

File layout of ``path`` (all integers little-endian)::

    magic (8) | version (u32) | index length (u64) | index (JSON) | payload | HMAC (32)

The index gives, for each group, its names, the offset and length of its
pickle in the payload, and the offset and length of each of its out-of-band
buffers in the companion file.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import io
import json
import mmap
import os
import pickle
import random
import struct
import sys
import types
from collections import ChainMap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

__all__ = [
    "OUT_OF_BAND_MIN_BYTES",
    "Dump",
    "DumpResult",
    "ForgedPayload",
    "LoadResult",
    "capture_rng_state",
    "dump_namespace",
    "load_namespace",
    "remove_dump",
    "restore_rng_state",
]

#: Buffers at least this large go to the companion file; smaller ones stay in
#: the pickle stream, where the per-buffer bookkeeping would cost more than
#: the copy.
OUT_OF_BAND_MIN_BYTES = 64 * 1024

_MAGIC = b"FRKMIGR\n"
_VERSION = 1
_HEADER = struct.Struct("<8sIQ")
_MAC_SIZE = hashlib.sha256().digest_size
_BUFFER_ALIGN = 64
_PROTOCOL = 5
_REASON_MAX = 200
_BUFFER_SUFFIX = ".buf"


class ForgedPayload(Exception):
    """The dump is not authentic (bad HMAC, magic or length) or incomplete."""


@dataclass
class DumpResult:
    path: str
    saved: list[str]
    #: name -> why it could not be pickled, e.g. "generator: cannot pickle ..."
    lost: dict[str, str]
    #: How the saved names were pickled: one list per pickle.  Names that
    #: share objects are in the same list.
    groups: list[list[str]]
    #: Bytes of pickle stream in the main file.
    inband_bytes: int
    #: Bytes of out-of-band buffers in the companion file (padding excluded).
    buffer_bytes: int


@dataclass
class LoadResult:
    values: dict[str, Any]
    loaded: list[str]
    #: name -> why its group failed to unpickle, e.g. "AttributeError: ..."
    failed: dict[str, str]
    rng_restored: bool


# --------------------------------------------------------------------------
# Random state


def capture_rng_state() -> dict[str, Any]:
    """Global state of ``random`` and, if numpy is imported, ``numpy.random``."""
    state: dict[str, Any] = {"random": random.getstate()}
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo ``capture_rng_state``: set the global generators to ``state``."""
    if "random" in state:
        random.setstate(state["random"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])


# --------------------------------------------------------------------------
# Cell-defined functions
#
# While load_namespace runs, functions defined in cells are rebuilt against
# this namespace (the new worker's user namespace).

_target_globals: dict[str, Any] | None = None


class _EmptyCell:
    """Stands in for a closure cell in a cell function's reduction.

    The cell is created empty and filled by the function's state setter, after
    the function itself is memoized: a recursive inner function's cell holds
    the function, and saving the contents first would recurse forever.  One
    placeholder per real cell (per pickler) keeps cells shared between
    closures shared after loading.
    """

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return _make_empty_cell, ()


def _make_empty_cell() -> types.CellType:
    return types.CellType()


def _rebuild_cell_function(
    code: types.CodeType, name: str, closure: tuple[types.CellType, ...] | None
) -> types.FunctionType:
    if _target_globals is None:
        raise pickle.UnpicklingError(
            "a function defined in a cell can only be unpickled by load_namespace"
        )
    return types.FunctionType(code, _target_globals, name, None, closure)


def _set_cell_function_state(func: types.FunctionType, state: dict[str, Any]) -> None:
    closure = func.__closure__ or ()
    for index, value in state["cells"].items():
        closure[index].cell_contents = value
    func.__dict__.update(state["dict"])
    for attr, value in state["attrs"].items():
        setattr(func, attr, value)


# Function attributes that travel in the state; __type_params__ exists from
# Python 3.12 on.
_FUNCTION_ATTRS = (
    "__qualname__",
    "__defaults__",
    "__kwdefaults__",
    "__annotations__",
    "__doc__",
    "__module__",
    "__type_params__",
)


def _refuse_open_file(obj: io.TextIOWrapper) -> tuple[Any, ...]:
    # cloudpickle would snapshot a readable text file's whole content into a
    # StringIO.  A migrated variable should not silently change type (or read
    # a multi-gigabyte log), so open files are lost like other OS resources.
    raise TypeError(f"cannot pickle file {getattr(obj, 'name', '?')!r}")


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    dispatch_table = ChainMap(
        {io.TextIOWrapper: _refuse_open_file}, cloudpickle.Pickler.dispatch_table
    )

    def __init__(self, file: io.BytesIO, globals_ns: dict[str, Any] | None, buffer_callback: Any) -> None:
        super().__init__(file, protocol=_PROTOCOL, buffer_callback=buffer_callback)
        self._globals_ns = globals_ns
        #: id -> (real cell, placeholder), see _EmptyCell.
        self.cells: dict[int, tuple[types.CellType, _EmptyCell]] = {}
        #: Classes pickled by value (defined in cells), by id.
        self.dynamic_classes: dict[int, type] = {}

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is types.FunctionType
            and self._globals_ns is not None
            and obj.__globals__ is self._globals_ns
        ):
            return self._reduce_cell_function(obj)
        rv = super().reducer_override(obj)
        # A by-value class reduces to cloudpickle's 6-tuple with a state
        # setter; by-reference classes give NotImplemented, builtin oddities
        # (NoneType, ...) a 2-tuple.
        if rv is not NotImplemented and isinstance(obj, type) and len(rv) == 6:
            self.dynamic_classes[id(obj)] = obj
        return rv

    def _reduce_cell_function(self, func: types.FunctionType) -> tuple[Any, ...]:
        closure = None
        contents: dict[int, Any] = {}
        if func.__closure__ is not None:
            placeholders = []
            for index, cell in enumerate(func.__closure__):
                entry = self.cells.setdefault(id(cell), (cell, _EmptyCell()))
                placeholders.append(entry[1])
                try:
                    contents[index] = cell.cell_contents
                except ValueError:  # empty cell: the enclosing name was never bound
                    pass
            closure = tuple(placeholders)
        attrs = {a: getattr(func, a) for a in _FUNCTION_ATTRS if hasattr(func, a)}
        state = {"cells": contents, "dict": func.__dict__, "attrs": attrs}
        return (
            _rebuild_cell_function,
            (func.__code__, func.__name__, closure),
            state,
            None,
            None,
            _set_cell_function_state,
        )


# --------------------------------------------------------------------------
# Pickling one value and finding what it shares


@dataclass
class _Pickled:
    data: bytes
    buffers: list[memoryview]
    #: id -> object, for every memoized object that may be shared on purpose.
    shared: dict[int, Any]
    #: Every class memoized, by id.
    classes: dict[int, type]
    dynamic_classes: dict[int, type]


def _never_shared_types() -> tuple[type, ...]:
    """Types whose instances are immutable or global, so sharing them is moot.

    Without this every instance of a class would be grouped with every other
    (they all memoize their class), and every DataFrame with every other (they
    all memoize numpy dtypes).
    """
    kinds: list[type] = [
        *(str, bytes, int, float, complex, bool, type(None), tuple, frozenset, range, slice),
        *(type(Ellipsis), type(NotImplemented), enum.Enum, types.CodeType),
        *(type, types.ModuleType, types.BuiltinFunctionType, types.MethodDescriptorType),
        *(types.WrapperDescriptorType, types.MethodWrapperType),
    ]
    np = sys.modules.get("numpy")
    if np is not None:
        kinds += [np.dtype, np.ufunc, np.generic]
    pd = sys.modules.get("pandas")
    if pd is not None:
        kinds.append(pd.api.extensions.ExtensionDtype)
    return tuple(kinds)


def _pickled_by_name(obj: Any) -> bool:
    """Whether pickle saves ``obj`` as a global reference (``module.name``).

    Such objects (Cython functions, ``pandas.NA``...) are process-wide
    singletons, so sharing one is no reason to group.  Only asked for objects
    seen in two variables, and never for containers or arrays, whose
    ``__reduce_ex__`` could copy their data.
    """
    np = sys.modules.get("numpy")
    if type(obj) in (list, dict, set, bytearray) or (np is not None and isinstance(obj, np.ndarray)):
        return False
    try:
        return isinstance(obj.__reduce_ex__(_PROTOCOL), str)
    except Exception:
        return False


def _pickle_value(value: Any, globals_ns: dict[str, Any] | None, never_shared: tuple[type, ...]) -> _Pickled:
    buffers: list[memoryview] = []

    def keep_large_out_of_band(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_MIN_BYTES:
            return True  # true means "serialize in band"
        buffers.append(raw)
        return False

    stream = io.BytesIO()
    pickler = _Pickler(stream, globals_ns, keep_large_out_of_band)
    try:
        pickler.dump(value)
    except BaseException:
        for raw in buffers:
            raw.release()
        raise
    shared = {}
    classes = {}
    # The C pickler's memo proxy copies to {id(obj): (index, obj)}.
    for oid, (_, obj) in pickler.memo.copy().items():
        if isinstance(obj, never_shared):
            if isinstance(obj, type):
                classes[oid] = obj
            continue
        if isinstance(obj, types.FunctionType) and obj.__globals__ is not globals_ns:
            continue  # pickled by reference (or immutable enough): not identity
        if isinstance(obj, _EmptyCell):
            continue  # the real cells are added below
        shared[oid] = obj
    for cell, _ in pickler.cells.values():
        shared[id(cell)] = cell
    return _Pickled(stream.getvalue(), buffers, shared, classes, dict(pickler.dynamic_classes))


def _class_attributes(cls: type) -> dict[int, Any]:
    """Attributes of ``cls`` and its bases.

    Instances may carry their class's attributes in their state (every
    DataFrame pickles ``DataFrame._metadata``, a list): that is no reason to
    group them.  Those belong to the code, which the new worker has anew.
    """
    return {id(v): v for k in cls.__mro__ for v in vars(k).values()}


def _class_internals(cls: type, globals_ns: dict[str, Any] | None, never_shared: tuple[type, ...]) -> dict[int, Any]:
    """Objects reached by pickling the cell-defined class ``cls`` by value.

    Every instance of ``cls`` memoizes its class's methods and attributes;
    those must not group the instances.  Class identity survives anyway:
    cloudpickle tracks by-value classes, so every group rebuilds one class.
    """
    try:
        pickled = _pickle_value(cls, globals_ns, never_shared)
    except Exception:
        return {}
    for raw in pickled.buffers:
        raw.release()
    return pickled.shared


class _UnionFind:
    def __init__(self, names: Iterable[str]) -> None:
        self.parent = {name: name for name in names}

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _group_by_sharing(
    ns: Mapping[str, Any],
    pickled: dict[str, _Pickled],
    globals_ns: dict[str, Any] | None,
    never_shared: tuple[type, ...],
) -> list[list[str]]:
    # Candidates are kept alive in the _Pickled records for the whole dump, so
    # an id can't be reused by another object between two variables' pickles.
    internals: dict[int, Any] = {}
    classes: dict[int, type] = {}
    dynamic_classes: dict[int, type] = {}
    for record in pickled.values():
        classes.update(record.classes)
        dynamic_classes.update(record.dynamic_classes)
    for cls in classes.values():
        internals.update(_class_attributes(cls))
    for cls in dynamic_classes.values():
        internals.update(_class_internals(cls, globals_ns, never_shared))
    # A class attribute that is also bound to a name (r = C.registry) is
    # shared on purpose.
    top_level = {id(ns[name]) for name in pickled}

    uf = _UnionFind(pickled)
    owner: dict[int, str] = {}
    by_name: dict[int, bool] = {}
    for name, record in pickled.items():
        for oid, obj in record.shared.items():
            if oid in internals and oid not in top_level:
                continue
            first = owner.setdefault(oid, name)
            if first == name or uf.find(first) == uf.find(name):
                continue
            if oid not in by_name:
                by_name[oid] = _pickled_by_name(obj)
            if not by_name[oid]:
                uf.union(name, first)
    groups: dict[str, list[str]] = {}
    for name in pickled:
        groups.setdefault(uf.find(name), []).append(name)
    return list(groups.values())


# --------------------------------------------------------------------------
# Dump


def _reason(exc: BaseException, prefix: str) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{prefix}: {message}"
    if len(text) > _REASON_MAX:
        text = text[: _REASON_MAX - 3] + "..."
    return text


def _type_name(value: Any) -> str:
    cls = type(value)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _create_private(path: str) -> int:
    # O_EXCL after unlinking: never write through a planted symlink or into a
    # file someone else created (and can read) in a shared tmpfs.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o600)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


def dump_namespace(
    ns: Mapping[str, Any],
    names: Iterable[str],
    key: bytes,
    path: str,
    *,
    globals_ns: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> DumpResult:
    """Pickle ``ns[name]`` for each of ``names`` into ``path`` (+ ``.buf``).

    ``globals_ns`` is the user namespace that cell-defined functions use as
    their globals (usually ``ns`` itself); those functions are rebuilt
    against the loader's namespace.  Values that can't be pickled are
    reported in ``lost``; an OSError writing the files propagates (after the
    partial files are removed).
    """
    never_shared = _never_shared_types()
    lost: dict[str, str] = {}
    pickled: dict[str, _Pickled] = {}
    for name in dict.fromkeys(names):
        if name not in ns:
            lost[name] = "not in the namespace"
            continue
        value = ns[name]
        try:
            pickled[name] = _pickle_value(value, globals_ns, never_shared)
        except Exception as exc:
            lost[name] = _reason(exc, _type_name(value))

    # (names, pickle, buffers) per group; a group of one reuses the pickle
    # made while looking for sharing.
    groups: list[tuple[list[str], bytes, list[memoryview]]] = []
    for names_in_group in _group_by_sharing(ns, pickled, globals_ns, never_shared):
        if len(names_in_group) > 1:
            try:
                together = _pickle_value(
                    tuple(ns[n] for n in names_in_group), globals_ns, never_shared
                )
            except Exception:
                together = None  # each member pickled alone; keep them, sharing lost
            if together is not None:
                groups.append((names_in_group, together.data, together.buffers))
                for n in names_in_group:
                    for raw in pickled[n].buffers:
                        raw.release()
                continue
        groups.extend(([n], pickled[n].data, pickled[n].buffers) for n in names_in_group)
    del pickled

    rng = pickle.dumps(capture_rng_state(), protocol=_PROTOCOL)
    index_groups: list[dict[str, Any]] = []
    payload_offset = len(rng)
    buffer_offset = 0
    buffer_bytes = 0
    for names_in_group, data, buffers in groups:
        spans = []
        for raw in buffers:
            buffer_offset = -(-buffer_offset // _BUFFER_ALIGN) * _BUFFER_ALIGN
            spans.append([buffer_offset, raw.nbytes])
            buffer_offset += raw.nbytes
            buffer_bytes += raw.nbytes
        index_groups.append(
            {"names": names_in_group, "pickle": [payload_offset, len(data)], "buffers": spans}
        )
        payload_offset += len(data)
    index = json.dumps(
        {"rng": [0, len(rng)], "groups": index_groups, "buffer_file_size": buffer_offset, "meta": meta or {}},
        separators=(",", ":"),
    ).encode()

    try:
        if buffer_offset:
            fd = _create_private(path + _BUFFER_SUFFIX)
            try:
                for (_, _, buffers), entry in zip(groups, index_groups, strict=True):
                    for raw, (offset, _) in zip(buffers, entry["buffers"], strict=True):
                        _pwrite_all(fd, raw, offset)
            finally:
                os.close(fd)
        mac = hmac.new(key, digestmod=hashlib.sha256)
        header = _HEADER.pack(_MAGIC, _VERSION, len(index))
        with os.fdopen(_create_private(path), "wb") as f:
            for piece in (header, index, rng, *(data for _, data, _ in groups)):
                mac.update(piece)
                f.write(piece)
            f.write(mac.digest())
    except BaseException:
        remove_dump(path)
        raise
    finally:
        for _, _, buffers in groups:
            for raw in buffers:
                raw.release()

    return DumpResult(
        path=path,
        saved=[n for names_in_group, _, _ in groups for n in names_in_group],
        lost=lost,
        groups=[names_in_group for names_in_group, _, _ in groups],
        inband_bytes=payload_offset - len(rng),
        buffer_bytes=buffer_bytes,
    )


# --------------------------------------------------------------------------
# Load


def _map_buffers(path: str, size: int) -> memoryview:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ForgedPayload(f"buffer file {path} is missing") from None
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ForgedPayload(f"buffer file {path} has {actual} bytes, index says {size}")
        # Private copy-on-write mapping: arrays come back writable, and pages
        # stay shared with tmpfs until written.  The mapping outlives the
        # file's unlink (remove_dump) and this fd.
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_COPY))
    finally:
        os.close(fd)


class Dump:
    """A dump made by ``dump_namespace``, verified but not unpickled yet.

    Opening it checks the HMAC under ``key`` (ForgedPayload if it does not
    verify): the session state in ``meta`` can be read, and applied, before
    anything is unpickled.
    """

    def __init__(self, path: str, key: bytes) -> None:
        with open(path, "rb") as f:
            blob = f.read()
        if len(blob) < _HEADER.size + _MAC_SIZE or not blob.startswith(_MAGIC):
            raise ForgedPayload(f"{path} is not a forkreload dump")
        body = memoryview(blob)[:-_MAC_SIZE]
        expected = hmac.new(key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, blob[-_MAC_SIZE:]):
            raise ForgedPayload(f"{path}: HMAC does not verify")
        _, version, index_size = _HEADER.unpack_from(blob)
        if version != _VERSION:
            raise ValueError(f"{path}: dump format version {version}, expected {_VERSION}")
        index_end = _HEADER.size + index_size
        self.path = path
        self.index: dict[str, Any] = json.loads(bytes(body[_HEADER.size : index_end]))
        self.meta: dict[str, Any] = self.index.get("meta", {})
        self.payload = body[index_end:]

    def load(self, globals_ns: dict[str, Any]) -> LoadResult:
        """Unpickle every group (one failure costs only its group), then
        restore the random state.

        Raises ForgedPayload if the buffer file does not match the index.
        Functions defined in cells are rebuilt with ``globals_ns`` as their
        globals; ``globals_ns`` is not otherwise touched (assign ``values``).
        """
        index, payload = self.index, self.payload
        buffer_file = memoryview(b"")
        if index["buffer_file_size"]:
            buffer_file = _map_buffers(self.path + _BUFFER_SUFFIX, index["buffer_file_size"])

        global _target_globals
        values: dict[str, Any] = {}
        failed: dict[str, str] = {}
        _target_globals = globals_ns
        try:
            for group in index["groups"]:
                names = group["names"]
                start, length = group["pickle"]
                buffers = [buffer_file[o : o + n] for o, n in group["buffers"]]
                try:
                    loaded = pickle.loads(payload[start : start + length], buffers=buffers)
                except Exception as exc:
                    failed.update(dict.fromkeys(names, _reason(exc, type(exc).__name__)))
                    continue
                if len(names) == 1:
                    values[names[0]] = loaded
                else:
                    values.update(zip(names, loaded, strict=True))
        finally:
            _target_globals = None

        # After the values: unpickling them must not leave the generators moved.
        start, length = index["rng"]
        try:
            restore_rng_state(pickle.loads(payload[start : start + length]))
            rng_restored = True
        except Exception:
            rng_restored = False
        return LoadResult(values=values, loaded=list(values), failed=failed, rng_restored=rng_restored)


def load_namespace(path: str, key: bytes, globals_ns: dict[str, Any]) -> LoadResult:
    """Verify and load a dump made by ``dump_namespace`` (see `Dump`)."""
    return Dump(path, key).load(globals_ns)


def remove_dump(path: str) -> None:
    """Delete a dump's files; already-loaded arrays stay valid (mapped)."""
    for name in (path, path + _BUFFER_SUFFIX):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
