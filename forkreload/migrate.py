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
* Large buffers (numpy arrays, pandas blocks) go out of band and are copied
  once, straight into fresh private memory of the loader: it reads them in
  the dumping process's memory (``process_vm_readv``, same user; the dumping
  process keeps them alive and stays idle until ``release_exports``, at its
  next export or cell).  Nothing is shared afterwards (writing an array in
  the new worker never shows in the previous one, nor costs a second copy),
  nothing is named (nothing outlives a killed process), and /dev/shm's size
  does not matter.  Where one process may not read another's memory (Yama
  ptrace_scope >= 2, seccomp), the buffers go into an anonymous memfd that
  the dumping process writes once and never maps, and the loader opens
  through ``/proc/<pid>/fd/<fd>`` and maps shared (``MAP_SHARED``): one
  copy, and writing later costs no second one.  The pickle stream always
  travels in a memfd.
* A numpy view (a slice, a transpose, a strided or reshaped array) is
  pickled as a view of the array that owns its memory: that base goes out of
  band once and the view is rebuilt on it with the same offset and strides,
  so ``np.shares_memory`` and writes through the view survive, and variables
  whose arrays share a base (pandas objects sharing blocks) are pickled
  together.
* The index is authenticated with HMAC-SHA256 and verified before anything
  is unpickled; it carries the HMAC of the pickle stream, checked before
  unpickling too.  Buffers hold raw bytes only.
* The global state of ``random`` and ``numpy.random`` travels along, so a
  seeded computation continues the same sequence.

File layout of ``path`` (all integers little-endian), a small file::

    magic (8) | version (u32) | index length (u64) | index (JSON) | HMAC (32)

The index names the dumping process, its memfds (pickle stream; buffers,
when they are not read in place) with their sizes, and gives, for each
group, its names, the offset and length of its pickle in the stream, and the
address (read in place) or memfd offset of each of its out-of-band buffers,
with its length.
"""

from __future__ import annotations

import ctypes
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
    "release_exports",
    "remove_dump",
    "restore_rng_state",
]

#: Buffers at least this large go to the companion file; smaller ones stay in
#: the pickle stream, where the per-buffer bookkeeping would cost more than
#: the copy.
OUT_OF_BAND_MIN_BYTES = 64 * 1024

_MAGIC = b"FRKMIGR\n"
_VERSION = 2
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


def _identity(value: Any) -> Any:
    return value


def _rebuild_view(root: Any, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...], offset: int, writeable: bool) -> Any:
    """A view of ``root`` (C or F contiguous) as it was in the dumping process."""
    import numpy

    flat = root if root.flags.c_contiguous else root.ravel(order="K")
    view = numpy.ndarray(shape, dtype, buffer=flat, offset=offset, strides=strides)
    if not writeable and view.flags.writeable:
        view.flags.writeable = False
    return view


def _address_range(arr: Any) -> tuple[int, int]:
    """The first and one past the last address of the bytes ``arr`` reaches."""
    low = high = arr.__array_interface__["data"][0]
    for n, stride in zip(arr.shape, arr.strides, strict=True):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + arr.itemsize


def _reduce_ndarray(np: Any, obj: Any) -> Any:
    """Pickle a view as a view of the array that owns its memory.

    numpy pickles a view as a copy of its elements, in band when it is not
    contiguous.  Here the owning array (the end of the ``.base`` chain) is
    pickled instead, out of band and memoized like any object, so a view and
    its base, or two views of one base, come back sharing memory, and a
    strided view costs what its base costs.  Views of object arrays and of
    bases that are not contiguous keep numpy's own reduction (a
    non-contiguous one as a contiguous copy, out of band).
    """
    if obj.dtype.hasobject or obj.size == 0:
        return NotImplemented
    contiguous = obj.flags.c_contiguous or obj.flags.f_contiguous
    root = obj
    while isinstance(root.base, np.ndarray):
        root = root.base
    usable = (
        root is not obj
        and type(root) is np.ndarray
        and not root.dtype.hasobject
        and (root.flags.c_contiguous or root.flags.f_contiguous)
    )
    if usable:
        start = root.__array_interface__["data"][0]
        low, high = _address_range(obj)
        usable = start <= low and high <= start + root.nbytes
    if not usable:
        if contiguous:
            return NotImplemented
        return _identity, (np.ascontiguousarray(obj),)
    offset = obj.__array_interface__["data"][0] - start
    return _rebuild_view, (root, obj.dtype, obj.shape, obj.strides, offset, bool(obj.flags.writeable))


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
        np = sys.modules.get("numpy")
        if np is not None and type(obj) is np.ndarray:
            return _reduce_ndarray(np, obj)
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


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


@dataclass
class _Export:
    #: memfds written for the loader (pickle stream; buffers when not read
    #: in place).
    fds: list[int]
    #: Buffers the loader reads in place from this process's memory.
    holds: list[memoryview]


# What this process exported, by dump path: kept until the loader had its
# chance to read it (see release_exports).
_exported: dict[str, _Export] = {}


def _new_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_exports(path: str | None = None) -> None:
    """Let go of what this process exported (for ``path``, or all).

    The exporting worker calls this when the loader is done: at its next
    export, or when it runs a cell again (the swap failed, or
    ``%forkreload back``).  The loader has its own copy by then.
    """
    for key in [path] if path is not None else list(_exported):
        export = _exported.pop(key, None)
        if export is None:
            continue
        for fd in export.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for raw in export.holds:
            raw.release()
    if not _exported and _ptracer_set:
        _set_ptracer(0)


# --------------------------------------------------------------------------
# Reading buffers in place: process_vm_readv (/proc/PID/mem for shared pages)
#
# The fastest single copy is the loader reading the exporter's memory
# directly into fresh private memory of its own (transparent huge pages
# where the kernel gives them): no intermediate file, nothing shared
# afterwards.  It needs ptrace-level access between two processes of the
# same user; where that is refused (Yama ptrace_scope >= 2, a seccomp
# filter, a non-dumpable process) the buffers go through a memfd instead.

_PR_GET_DUMPABLE = 3
_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = 2**64 - 1
_READ_CHUNK = 1 << 30


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_libc_handle: Any = None
_vm_self_test: bool | None = None
_ptracer_set = False


def _libc() -> Any:
    global _libc_handle
    if _libc_handle is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.process_vm_readv.restype = ctypes.c_ssize_t
        lib.process_vm_readv.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
        ]
        lib.prctl.restype = ctypes.c_int
        lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        lib.pread64.restype = ctypes.c_ssize_t
        lib.pread64.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
        _libc_handle = lib
    return _libc_handle


def _set_ptracer(value: int) -> bool:
    global _ptracer_set
    ok = bool(_libc().prctl(_PR_SET_PTRACER, value, 0, 0, 0) == 0)
    _ptracer_set = ok and value != 0
    return ok


def _address(raw: memoryview) -> int:
    """The address of a contiguous buffer's first byte (read-only ones too)."""
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(raw), ctypes.byref(view), 0) != 0:
        raise BufferError("no address for this buffer")
    try:
        return int(view.buf or 0)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def _read_process(pid: int, address: int, dest: int, size: int, shared: bool = False) -> None:
    """Copy `size` bytes at `address` in process `pid` to `dest` here.

    Pages the exporter `shared` with its forks (its checkpoints) are read
    through /proc/PID/mem where it opens (the same ptrace-level check):
    process_vm_readv pins each page it reads, and pinning a shared page
    costs a second fault per page. 72 MiB shared with two forks took 72-82
    ms that way against 52-56 ms through /proc (one fault per page, the
    copy's own). Pages of its own are read by process_vm_readv, in one
    copy (41-51 ms; /proc/PID/mem copies twice, through a kernel page:
    52-55 ms).
    """
    fd = -1
    if shared:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # no /proc, or it hides other processes: the system call
    libc = _libc()
    try:
        done = 0
        while done < size:
            n = min(size - done, _READ_CHUNK)
            if fd >= 0:
                got = libc.pread64(fd, dest + done, n, address + done)
            else:
                local, remote = _IOVec(dest + done, n), _IOVec(address + done, n)
                got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
            if got <= 0:
                err = ctypes.get_errno()
                raise ForgedPayload(f"cannot read the dumping process's memory: {os.strerror(err) if got else 'short read'}")
            done += got
    finally:
        if fd >= 0:
            os.close(fd)


def _shares_pages(buffers: list[tuple[int, int]]) -> bool:
    """Whether any of these (address, size) buffers has a page that another
    process maps too (a checkpoint forked since it was written): bit 56 of
    its /proc/self/pagemap entry, "exclusively mapped", is clear. The first,
    middle and last page of each are looked at."""
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        for address, size in buffers:
            for at in {address, address + size // 2, address + max(size - 1, 0)}:
                entry = os.pread(fd, 8, at // mmap.PAGESIZE * 8)
                if len(entry) == 8:
                    bits = int.from_bytes(entry, "little")
                    if bits >> 63 & 1 and not bits >> 56 & 1:
                        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _readable_in_place() -> bool:
    """Whether a loader of the same user may read this process's memory.

    Under Yama's ptrace_scope 1 this process names any process as its
    ptracer until release_exports (ptrace_scope 0 needs nothing; 2 and 3
    refuse).  ``FORKRELOAD_MIGRATE_VIA=memfd`` forces the memfd path.
    """
    global _vm_self_test
    if os.environ.get("FORKRELOAD_MIGRATE_VIA") == "memfd" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = _libc()
        if _vm_self_test is None:
            probe = bytearray(b"forkreload")
            into = (ctypes.c_char * len(probe))()
            try:
                _read_process(os.getpid(), _address(memoryview(probe)), ctypes.addressof(into), len(probe))
                _vm_self_test = into.raw == bytes(probe)
            except ForgedPayload:
                _vm_self_test = False
        if not _vm_self_test or libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 1:
            return False
        try:
            with open("/proc/sys/kernel/yama/ptrace_scope") as f:
                scope = int(f.read())
        except (OSError, ValueError):
            scope = 0
        if scope >= 2:
            return False
        return scope == 0 or _set_ptracer(_PR_SET_PTRACER_ANY)
    except (OSError, AttributeError, BufferError):
        return False


def _read_buffer(pid: int, address: int, size: int, shared: bool = False) -> memoryview:
    """``size`` bytes at ``address`` in process ``pid``, copied once into
    fresh private memory of this process (its own mapping, so dropping the
    array frees it)."""
    # Plain pages: asking for transparent huge pages (MADV_HUGEPAGE, with or
    # without MADV_POPULATE_WRITE) made the copy up to 3x faster at best but
    # 1.5x slower in the median here, waiting on huge page allocation.
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    dest = ctypes.c_char.from_buffer(region)
    try:
        _read_process(pid, address, ctypes.addressof(dest), size, shared)
    finally:
        del dest
    return memoryview(region)


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

    release_exports()
    in_place = bool(buffer_offset) and _readable_in_place()
    shared = False
    holds: list[memoryview] = []
    fds: list[int] = []
    try:
        # Nothing named but the small index: the pickle stream goes to a
        # memfd; the buffers are read where they lie, or go to a memfd this
        # process writes once and never maps (its arrays stay its own).
        stream_mac = hmac.new(key, digestmod=hashlib.sha256)
        stream_fd = _new_memfd("forkreload-stream", payload_offset)
        fds.append(stream_fd)
        offset = 0
        for piece in (rng, *(data for _, data, _ in groups)):
            stream_mac.update(piece)
            _pwrite_all(stream_fd, piece, offset)
            offset += len(piece)
        buffer_fd = -1
        if in_place:
            # The loader reads each buffer where it lies; it stays alive (and
            # this process idle) until release_exports.
            for (_, _, buffers), entry in zip(groups, index_groups, strict=True):
                entry["buffers"] = [[_address(raw), raw.nbytes] for raw in buffers]
                holds += buffers
            shared = _shares_pages([(a, n) for entry in index_groups for a, n in entry["buffers"]])
        elif buffer_offset:
            buffer_fd = _new_memfd("forkreload-buffers", buffer_offset)
            fds.append(buffer_fd)
            for (_, _, buffers), entry in zip(groups, index_groups, strict=True):
                for raw, (offset, _) in zip(buffers, entry["buffers"], strict=True):
                    _pwrite_all(buffer_fd, raw, offset)
        index = json.dumps(
            {
                "pid": os.getpid(),
                "started": _process_start(os.getpid()),
                "stream": [stream_fd, payload_offset, stream_mac.hexdigest()],
                "via": "process" if in_place else "memfd",
                "shared": shared,
                "buffers": [buffer_fd, buffer_offset],
                "rng": [0, len(rng)],
                "groups": index_groups,
                "meta": meta or {},
            },
            separators=(",", ":"),
        ).encode()
        header = _HEADER.pack(_MAGIC, _VERSION, len(index))
        mac = hmac.new(key, header + index, hashlib.sha256).digest()
        fd = _create_private(path)
        try:
            _pwrite_all(fd, header + index + mac, 0)
        finally:
            os.close(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        holds.clear()
        remove_dump(path)
        raise
    finally:
        kept = {id(raw) for raw in holds}
        for _, _, buffers in groups:
            for raw in buffers:
                if id(raw) not in kept:
                    raw.release()
    _exported[path] = _Export(fds, holds)

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


def _process_start(pid: int) -> int:
    """When process ``pid`` started (clock ticks since boot): with its pid,
    names one process for good, even if the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


class _Exporter:
    """The dumping process, checked to be the one the index names, for as
    long as its memory is read (a pid reused meanwhile is refused)."""

    def __init__(self, pid: int, started: int) -> None:
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, AttributeError, OSError):
            raise ForgedPayload(f"the dumping process {pid} is missing") from None
        self.started = started
        self.check()

    def check(self) -> None:
        import select

        poll = select.poll()
        poll.register(self.pidfd, select.POLLIN)
        if poll.poll(0) or _process_start(self.pid) != self.started:
            raise ForgedPayload(f"the dumping process {self.pid} is missing (exited)")

    def close(self) -> None:
        os.close(self.pidfd)


def _open_exported(pid: int, fd: int, size: int, writable: bool) -> int:
    """Open the memfd ``fd`` of process ``pid``; ForgedPayload if it is gone."""
    where = f"/proc/{pid}/fd/{fd}"
    flags = (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
    try:
        opened = os.open(where, flags)
    except FileNotFoundError:
        raise ForgedPayload(f"the dumping process's memory {where} is missing") from None
    try:
        actual = os.fstat(opened).st_size
        if actual != size:
            raise ForgedPayload(f"{where} has {actual} bytes, index says {size}")
    except BaseException:
        os.close(opened)
        raise
    return opened


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    done = 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 30), done)
        if not chunk:
            raise ForgedPayload("the pickle stream is shorter than the index says")
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


class Dump:
    """A dump made by ``dump_namespace``, verified but not unpickled yet.

    Opening it checks the HMAC under ``key`` (ForgedPayload if it does not
    verify): the session state in ``meta`` can be read, and applied, before
    anything is unpickled.  The dumping process must still be alive (its
    memfds hold the data) until ``load`` has run.
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
        if _HEADER.size + index_size != len(body):
            raise ForgedPayload(f"{path}: index length does not match the file")
        self.path = path
        self.key = key
        self.index: dict[str, Any] = json.loads(bytes(body[_HEADER.size :]))
        self.meta: dict[str, Any] = self.index.get("meta", {})

    def _stream(self) -> bytes:
        pid, (fd, size, digest) = self.index["pid"], self.index["stream"]
        opened = _open_exported(pid, fd, size, writable=False)
        try:
            # Read into private memory, then verify: what is unpickled is
            # what was verified.
            stream = _read_all(opened, size)
        finally:
            os.close(opened)
        if not hmac.compare_digest(hmac.new(self.key, stream, hashlib.sha256).hexdigest(), digest):
            raise ForgedPayload(f"{self.path}: the pickle stream's HMAC does not verify")
        return stream

    def _buffers(self) -> memoryview:
        fd, size = self.index["buffers"]
        if not size:
            return memoryview(b"")
        opened = _open_exported(self.index["pid"], fd, size, writable=True)
        try:
            # Shared mapping of a memfd only this process maps: writing an
            # array later writes these pages, no copy-on-write second copy.
            # The mapping outlives the fd, and the exporter's.
            return memoryview(mmap.mmap(opened, size, access=mmap.ACCESS_WRITE))
        finally:
            os.close(opened)

    def load(self, globals_ns: dict[str, Any]) -> LoadResult:
        """Unpickle every group (one failure costs only its group), then
        restore the random state.

        Raises ForgedPayload if the dumping process's memory is gone or does
        not match the index.  Functions defined in cells are rebuilt with
        ``globals_ns`` as their globals; ``globals_ns`` is not otherwise
        touched (assign ``values``).
        """
        index = self.index
        exporter = _Exporter(index["pid"], index["started"])
        try:
            payload = memoryview(self._stream())
            in_place = index.get("via") == "process"
            buffer_file = memoryview(b"") if in_place else self._buffers()
            size = buffer_file.nbytes
            for group in index["groups"]:
                for o, n in group["buffers"]:
                    if o < 0 or n < 0 or (not in_place and o + n > size):
                        raise ForgedPayload(f"{self.path}: a buffer lies outside the buffer memory")
            # Read every buffer before unpickling anything: the exporter's
            # memory may only be read while it waits, and one that cannot be
            # read fails the whole load, not some groups.
            shared = index.get("shared") is True
            read = {
                (o, n): _read_buffer(index["pid"], o, n, shared)
                for group in index["groups"] for o, n in group["buffers"]
            } if in_place else {}
            # Still the same process: what was read was its memory.
            exporter.check()
        finally:
            exporter.close()

        global _target_globals
        values: dict[str, Any] = {}
        failed: dict[str, str] = {}
        _target_globals = globals_ns
        try:
            for group in index["groups"]:
                names = group["names"]
                start, length = group["pickle"]
                if in_place:
                    buffers = [read[o, n] for o, n in group["buffers"]]
                else:
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
    """Delete a dump's file (and, in the dumping process, close its memory);
    already-loaded arrays stay valid (mapped)."""
    release_exports(path)
    for name in (path, path + _BUFFER_SUFFIX):
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
