"""Tests for forkreload.migrate: real files, real processes.

Like cloudpickle's own tests, values cross into a FRESH interpreter: a cell's
code runs in a dict namespace in one subprocess, which dumps it; another
subprocess loads it.  User modules are written to a temporary directory on
the subprocesses' sys.path, and may be rewritten between dump and load.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import uuid

import pytest
from forkreload.migrate import Dump, ForgedPayload, dump_namespace, load_namespace, remove_dump

pytestmark = pytest.mark.timeout(60)

KEY = bytes(range(32))

DUMP_SCRIPT = """
import builtins, dataclasses, json
from forkreload.migrate import dump_namespace
PATH, KEY, CELL = {path!r}, {key!r}, {cell!r}
ns = {{"__name__": "__main__", "__builtins__": builtins}}
exec(compile(CELL, "<cell>", "exec"), ns)
names = [k for k in ns if not k.startswith("_")]
res = dump_namespace(ns, names, KEY, PATH, globals_ns=ns)
out = {{"result": dataclasses.asdict(res)}}
{after}
print(json.dumps(out), flush=True)
# The dump's data lives in this process's memory (memfds) until it exits:
# stay until the test is done with it.
import sys
sys.stdin.read()
"""

LOAD_SCRIPT = """
import builtins, json
from forkreload.migrate import load_namespace, remove_dump
PATH, KEY = {path!r}, {key!r}
ns = {{"__name__": "__main__", "__builtins__": builtins}}
res = load_namespace(PATH, KEY, ns)
ns.update(res.values)
v = res.values
out = {{"loaded": res.loaded, "failed": res.failed, "rng_restored": res.rng_restored}}
{checks}
print(json.dumps(out))
"""


def run_python(code: str, cwd) -> dict:
    """Run ``code`` in a fresh interpreter with ``cwd`` on sys.path; parse its JSON."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=50
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


_dumpers: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_dumpers():
    yield
    while _dumpers:
        proc = _dumpers.pop()
        proc.stdin.close()
        proc.wait(timeout=20)
        proc.stdout.close()


def dump_cell(tmp_path, cell: str, after: str = "", path=None) -> dict:
    """Run ``cell`` in a fresh interpreter and dump its namespace; return the
    report.  The interpreter stays (it holds the dump's memory) until the
    test ends."""
    path = str(path or tmp_path / "dump")
    code = DUMP_SCRIPT.format(path=path, key=KEY, cell=textwrap.dedent(cell), after=textwrap.dedent(after))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    _dumpers.append(proc)
    line = proc.stdout.readline()
    assert line, f"the dumping interpreter failed (exit {proc.wait()})"
    return json.loads(line)


def load_in_fresh(tmp_path, checks: str = "", path=None) -> dict:
    path = str(path or tmp_path / "dump")
    return run_python(LOAD_SCRIPT.format(path=path, key=KEY, checks=textwrap.dedent(checks)), tmp_path)


def write_module(tmp_path, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))


def test_basic_values_round_trip(tmp_path):
    report = dump_cell(
        tmp_path,
        """
        import numpy as np, pandas as pd
        n = 42
        s = "text"
        nested = {"k": [1, 2.5, (3, None)], "set": {5, 6}, "b": b"raw"}
        small = np.arange(10)
        big = np.arange(1_000_000, dtype=np.float64)
        df = pd.DataFrame({"x": np.arange(50_000.0), "y": np.arange(50_000)})
        """,
    )["result"]
    assert report["lost"] == {}
    assert set(report["saved"]) == {"np", "pd", "n", "s", "nested", "small", "big", "df"}
    # big (8 MB) and both DataFrame columns (400 kB each) go out of band ...
    assert report["buffer_bytes"] >= 8_000_000 + 2 * 400_000
    # ... and only small things stay in the pickle stream.
    assert report["inband_bytes"] < 20_000
    # One small private file; the data is in the dumping process's memory.
    assert stat.S_IMODE(os.stat(tmp_path / "dump").st_mode) == 0o600
    assert os.path.getsize(tmp_path / "dump") < 5000
    assert sorted(os.listdir(tmp_path)) == ["dump"]

    out = load_in_fresh(
        tmp_path,
        """
        import numpy as np, pandas as pd
        out["ok"] = {
            "n": v["n"] == 42,
            "s": v["s"] == "text",
            "nested": v["nested"] == {"k": [1, 2.5, (3, None)], "set": {5, 6}, "b": b"raw"},
            "small": np.array_equal(v["small"], np.arange(10)),
            "big": np.array_equal(v["big"], np.arange(1_000_000, dtype=np.float64)),
            "df": v["df"].equals(pd.DataFrame({"x": np.arange(50_000.0), "y": np.arange(50_000)})),
            "modules": v["np"] is np and v["pd"] is pd,
        }
        """,
    )
    assert out["failed"] == {}
    assert out["ok"] == dict.fromkeys(out["ok"], True)


def test_shared_objects_are_grouped_and_identity_survives(tmp_path):
    write_module(
        tmp_path,
        "points",
        """
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
        """,
    )
    report = dump_cell(
        tmp_path,
        """
        import numpy as np, pandas as pd, points
        a = [1]
        b = a
        obj = points.Point(1, 2)
        d = {"x": obj}
        p1 = points.Point(3, 4)
        p2 = points.Point(5, 6)
        class Local:
            registry = []
            def method(self):
                return 1
        l1 = Local()
        l2 = Local()
        df = pd.DataFrame({"x": np.arange(100_000.0)})
        df_alias = df
        df_other = pd.DataFrame({"x": np.arange(100_000.0)})
        """,
    )["result"]
    groups = sorted(sorted(g) for g in report["groups"])
    assert ["a", "b"] in groups
    assert ["d", "obj"] in groups
    assert ["df", "df_alias"] in groups
    # Instances of one class share only their class (and its attributes):
    # that must not group them.
    for name in ("p1", "p2", "l1", "l2", "Local", "df_other"):
        assert [name] in groups
    # One pickle for the shared DataFrame: its data is written once.
    assert report["buffer_bytes"] == 2 * 800_000

    out = load_in_fresh(
        tmp_path,
        """
        out["ok"] = {
            "a is b": v["a"] is v["b"],
            "d[x] is obj": v["d"]["x"] is v["obj"],
            "df is df_alias": v["df"] is v["df_alias"],
            "one Local class": type(v["l1"]) is type(v["l2"]) is v["Local"],
            "registry": v["Local"].registry == [],
            "df_other": v["df_other"] is not v["df"] and v["df_other"].equals(v["df"]),
        }
        """,
    )
    assert out["failed"] == {}
    assert out["ok"] == dict.fromkeys(out["ok"], True)


def test_unpicklable_values_are_lost_with_a_reason(tmp_path):
    report = dump_cell(
        tmp_path,
        """
        import socket, sqlite3, threading
        with open("data.txt", "w") as f:
            f.write("x")
        reader = open("data.txt")
        writer = open("out.txt", "w")
        binary = open("data.txt", "rb")
        gen = (i for i in range(3))
        lock = threading.Lock()
        sock = socket.socket()
        conn = sqlite3.connect(":memory:")
        keep = [1, 2, 3]
        """,
    )["result"]
    lost = report["lost"]
    assert set(lost) == {"f", "reader", "writer", "binary", "gen", "lock", "sock", "conn"}
    assert lost["gen"] == "generator: cannot pickle 'generator' object"
    assert lost["reader"] == "_io.TextIOWrapper: cannot pickle file 'data.txt'"
    assert lost["binary"].startswith("_io.BufferedReader: ")
    assert lost["lock"].startswith("_thread.")
    assert lost["sock"].startswith("socket.socket: ")
    assert lost["conn"].startswith("sqlite3.Connection: ")
    for reason in lost.values():
        assert "\n" not in reason and len(reason) <= 200
    assert {"keep", "socket", "sqlite3", "threading"} <= set(report["saved"])

    out = load_in_fresh(tmp_path, 'out["keep"] = v["keep"]')
    assert out["keep"] == [1, 2, 3]
    assert out["failed"] == {}


def test_instances_of_user_module_classes_get_the_new_code(tmp_path):
    write_module(
        tmp_path,
        "shapes",
        """
        VERSION = 1
        class Shape:
            def __init__(self, n):
                self.n = n
            def greet(self):
                return f"v1: {self.n}"
        """,
    )
    report = dump_cell(tmp_path, "import shapes\ns = shapes.Shape(3)\nitems = [s, s]\n")["result"]
    assert report["lost"] == {}
    write_module(
        tmp_path,
        "shapes",
        """
        VERSION = 2
        class Shape:
            def __init__(self, n):
                self.n = n
            def greet(self):
                return f"v2 says {self.n}"
        """,
    )
    out = load_in_fresh(
        tmp_path,
        """
        import shapes
        out["version"] = v["shapes"].VERSION
        out["is new class"] = type(v["s"]) is shapes.Shape
        out["greet"] = v["s"].greet()
        out["shared"] = v["items"][0] is v["items"][1] is v["s"]
        """,
    )
    assert out == {
        "loaded": ["shapes", "s", "items"],
        "failed": {},
        "rng_restored": True,
        "version": 2,
        "is new class": True,
        "greet": "v2 says 3",
        "shared": True,
    }


def test_cell_functions_and_classes_use_the_target_namespace(tmp_path):
    report = dump_cell(
        tmp_path,
        """
        def f(x):
            return helper(x) + OFFSET
        g = lambda y: f(y) * 2
        OFFSET = 1
        class Greeter:
            def greet(self):
                return GREETING + "!"
            @classmethod
            def make(cls):
                return cls()
            @staticmethod
            def shout():
                return GREETING.upper()
        gr = Greeter()
        def outer():
            def rec(n):
                return 0 if n == 0 else 1 + rec(n - 1)
            return rec
        rec = outer()
        def counter():
            n = 0
            def inc():
                nonlocal n
                n += 1
            def get():
                return n
            return inc, get
        inc, get = counter()
        def with_defaults(a, b=[1], *, c=2) -> tuple:
            "Doc."
            return a, b, c
        with_defaults.tag = "t"
        class Base:
            def hello(self):
                return "base"
        class Child(Base):
            def hello(self):
                return super().hello() + "+child"
        child = Child()
        import dataclasses
        @dataclasses.dataclass
        class Pt:
            x: int
            y: int = 0
        pt = Pt(1)
        """,
    )["result"]
    assert report["lost"] == {}
    assert ["inc", "get"] in report["groups"]  # they share a closure cell

    out = load_in_fresh(
        tmp_path,
        """
        out["globals"] = [
            v[name].__globals__ is ns for name in ("f", "g", "rec", "inc", "with_defaults")
        ] + [
            v["Greeter"].greet.__globals__ is ns,
            type(v["gr"]).greet.__globals__ is ns,
        ]
        # Defined only now, after the load: the functions must see them.
        ns["helper"] = lambda x: x * 10
        ns["GREETING"] = "hi"
        v["inc"]()
        v["inc"]()
        wd = v["with_defaults"]
        out["ok"] = {
            "f": v["f"](2) == 21,
            "g": v["g"](2) == 42,
            "method": v["gr"].greet() == "hi!",
            "classmethod": isinstance(v["Greeter"].make(), v["Greeter"]),
            "staticmethod": v["Greeter"].shout() == "HI",
            "instance of loaded class": type(v["gr"]) is v["Greeter"],
            "recursive closure": v["rec"](5) == 5,
            "shared cell": v["get"]() == 2,
            "qualname": v["rec"].__qualname__ == "outer.<locals>.rec",
            "defaults": wd(0) == (0, [1], 2) and wd.__kwdefaults__ == {"c": 2},
            "attributes": wd.tag == "t" and wd.__doc__ == "Doc." and wd.__module__ == "__main__",
            "annotations": wd.__annotations__ == {"return": tuple},
            "super()": v["child"].hello() == "base+child" and type(v["child"]) is v["Child"],
            "dataclass": v["pt"] == v["Pt"](1, 0) and repr(v["pt"]) == "Pt(x=1, y=0)",
        }
        """,
    )
    assert out["failed"] == {}
    assert out["globals"] == [True] * 7
    assert out["ok"] == dict.fromkeys(out["ok"], True)


def test_forged_payload_is_refused_before_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    dump_cell(
        tmp_path,
        f"""
        import pathlib
        class Payload:
            def __reduce__(self):
                return pathlib.Path.touch, (pathlib.Path({str(marker)!r}),)
        payload = Payload()
        """,
    )
    path = tmp_path / "dump"
    blob = path.read_bytes()
    variants = {
        "flipped byte": blob[:100] + bytes([blob[100] ^ 1]) + blob[101:],
        "flipped mac": blob[:-1] + bytes([blob[-1] ^ 1]),
        "truncated": blob[:-10],
        "tiny": blob[:5],
        "bad magic": b"X" + blob[1:],
    }
    with pytest.raises(ForgedPayload):
        load_namespace(str(path), b"another key", {})
    for content in variants.values():
        path.write_bytes(content)
        with pytest.raises(ForgedPayload):
            load_namespace(str(path), KEY, {})
    assert not marker.exists()

    # The untampered file with the right key does run the payload: the
    # refusals above were not vacuous.
    path.write_bytes(blob)
    out = load_in_fresh(tmp_path)
    assert out["loaded"] == ["pathlib", "Payload", "payload"]
    assert marker.exists()


@pytest.mark.parametrize("via", ["process", "memfd"])
def test_buffer_memory_must_match_the_index(tmp_path, monkeypatch, via):
    monkeypatch.setenv("FORKRELOAD_MIGRATE_VIA", via)
    dump_cell(tmp_path, "import numpy as np\narr = np.zeros(100_000)\n")
    index = Dump(str(tmp_path / "dump"), KEY).index
    assert index["via"] == via
    if via == "memfd":
        fd, size = index["buffers"]
        os.truncate(f"/proc/{index['pid']}/fd/{fd}", size + 1)
        with pytest.raises(ForgedPayload, match="bytes"):
            load_namespace(str(tmp_path / "dump"), KEY, {})
    # The dumping process is gone, and its memory with it.
    proc = _dumpers.pop()
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    with pytest.raises(ForgedPayload, match="missing|cannot read"):
        load_namespace(str(tmp_path / "dump"), KEY, {})


def test_random_state_continues_after_load(tmp_path):
    report = dump_cell(
        tmp_path,
        """
        import random
        import numpy as np
        random.seed(1)
        random.random()
        np.random.seed(1)
        np.random.rand()
        """,
        after='out["next"] = [ns["random"].random(), float(ns["np"].random.rand())]',
    )
    out = load_in_fresh(
        tmp_path,
        """
        import random
        import numpy as np
        out["next"] = [random.random(), float(np.random.rand())]
        """,
    )
    assert out["rng_restored"] is True
    assert out["next"] == report["next"]


@pytest.mark.parametrize("via", ["process", "memfd"])
def test_out_of_band_arrays_are_writable_unshared_and_outlive_the_files(tmp_path, monkeypatch, via):
    monkeypatch.setenv("FORKRELOAD_MIGRATE_VIA", via)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(shm, f"forkreload-test-{uuid.uuid4().hex}")
    try:
        report = dump_cell(
            tmp_path, "import numpy as np\narr = np.arange(2_000_000, dtype=np.int64)\n", path=path
        )["result"]
        assert report["buffer_bytes"] == 16_000_000
        assert report["inband_bytes"] < 1000
        out = load_in_fresh(
            tmp_path,
            """
            import mmap, os
            import numpy as np
            arr = v["arr"]
            base = arr
            while isinstance(base, np.ndarray):
                base = base.base
            out["mapped"] = isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
            out["owndata"] = bool(arr.flags.owndata)
            out["writeable"] = bool(arr.flags.writeable)
            arr[0] = 7
            remove_dump(PATH)
            out["files left"] = [os.path.exists(PATH), os.path.exists(PATH + ".buf")]
            arr[1] = 8
            out["values"] = [int(arr[0]), int(arr[1]), int(arr[-1]), int(arr.sum())]
            # Private memory, or a shared mapping of a memfd only this
            # process maps: either way writes cost no second copy.
            maps = open("/proc/self/maps").read().splitlines()
            out["maps"] = [m.split()[1] for m in maps if "memfd:forkreload" in m]
            """,
            path=path,
        )
    finally:
        remove_dump(path)
    n = 2_000_000
    assert out["failed"] == {}
    assert out["mapped"] is True
    assert out["owndata"] is False
    assert out["writeable"] is True
    assert out["files left"] == [False, False]
    assert out["values"] == [7, 8, n - 1, n * (n - 1) // 2 + 7 + 7]
    assert out["maps"] == (["rw-s"] if via == "memfd" else [])


def test_a_group_that_fails_to_load_costs_only_itself(tmp_path):
    write_module(
        tmp_path,
        "fragile",
        """
        class Fragile:
            def __init__(self):
                self.x = 1
        """,
    )
    dump_cell(tmp_path, "import fragile\nfr = fragile.Fragile()\nholder = [fr]\nok = [1, 2]\n")
    write_module(
        tmp_path,
        "fragile",
        """
        class Fragile:
            def __setstate__(self, state):
                raise ValueError("v2 refuses v1 state")
        """,
    )
    out = load_in_fresh(tmp_path, 'out["ok"] = v["ok"]')
    assert out["failed"] == dict.fromkeys(["fr", "holder"], "ValueError: v2 refuses v1 state")
    assert out["loaded"] == ["fragile", "ok"]
    assert out["ok"] == [1, 2]


def test_missing_names_and_empty_dumps(tmp_path):
    path = str(tmp_path / "dump")
    report = dump_namespace({"x": 1}, ["x", "x", "nope"], KEY, path)
    assert report.saved == ["x"]
    assert report.lost == {"nope": "not in the namespace"}
    assert report.buffer_bytes == 0
    assert not os.path.exists(path + ".buf")
    assert load_namespace(path, KEY, {}).values == {"x": 1}

    report = dump_namespace({}, [], KEY, path)
    assert (report.saved, report.groups) == ([], [])
    result = load_namespace(path, KEY, {})
    assert (result.values, result.failed, result.rng_restored) == ({}, {}, True)
    remove_dump(path)
    remove_dump(path)  # already gone: no error
    assert not os.path.exists(path)


def test_views_come_back_as_views_of_their_base(tmp_path):
    report = dump_cell(
        tmp_path,
        """
        import numpy as np, pandas as pd
        a = np.arange(1_000_000.0)
        every_other = a[::2]
        window = a[1000:2000]
        backwards = a[::-1]
        as_int = a.view(np.int64)[5:50]
        m = np.arange(600_000.0).reshape(1000, 600)
        mt = m.T
        col = m[:, 3]
        df = pd.DataFrame({c: np.arange(100_000.0) for c in "abcd"})
        s = df["b"]
        lonely = np.ones(400_000)[::4]
        """,
    )["result"]
    groups = sorted(sorted(g) for g in report["groups"] if len(g) > 1)
    assert groups == [
        ["a", "as_int", "backwards", "every_other", "window"],
        ["col", "m", "mt"],
        ["df", "s"],
    ]
    # Every base once, out of band (a, m, the frame's block, lonely's base);
    # nothing strided was copied into the pickle stream.
    assert report["buffer_bytes"] == 8_000_000 + 4_800_000 + 3_200_000 + 3_200_000
    assert report["inband_bytes"] < 20_000
    out = load_in_fresh(
        tmp_path,
        """
        import numpy as np
        a, m = v["a"], v["m"]
        out["shares"] = [
            bool(np.shares_memory(a, v[n])) for n in ("every_other", "window", "backwards", "as_int")
        ] + [bool(np.shares_memory(m, v["mt"])), bool(np.shares_memory(m, v["col"]))]
        out["frame"] = bool(np.shares_memory(v["df"]["b"].values, v["s"].values))
        out["strides"] = [list(v[n].strides) for n in ("every_other", "backwards", "mt", "col", "lonely")]
        out["equal"] = bool(
            np.array_equal(v["every_other"], np.arange(0, 1_000_000.0, 2))
            and np.array_equal(v["backwards"], np.arange(999_999.0, -1, -1))
            and np.array_equal(v["as_int"], np.arange(1_000_000.0).view(np.int64)[5:50])
            and np.array_equal(v["mt"], np.arange(600_000.0).reshape(1000, 600).T)
            and np.array_equal(v["lonely"], np.ones(100_000))
        )
        v["every_other"][1] = -1
        v["backwards"][0] = -2
        v["col"][0] = -3
        out["through"] = [float(a[2]), float(a[-1]), float(m[0, 3])]
        """,
    )
    assert out["failed"] == {}
    assert out["shares"] == [True] * 6
    assert out["frame"] is True
    assert out["strides"] == [[16], [-8], [8, 4800], [4800], [32]]
    assert out["equal"] is True
    assert out["through"] == [-1.0, -2.0, -3.0]


@pytest.mark.parametrize("forked", [False, True])
def test_the_index_says_whether_the_buffers_are_shared_with_a_fork(tmp_path, monkeypatch, forked):
    # A worker with checkpoints shares its arrays' pages with them: the
    # loader then reads them through /proc/PID/mem (one fault a page).
    monkeypatch.setenv("FORKRELOAD_MIGRATE_VIA", "process")
    cell = "import numpy as np\narr = np.arange(1_000_000, dtype=np.int64)\n"
    if forked:  # a child that holds the pages, as a checkpoint does, until the dumper exits
        cell += "import os, time\nif os.fork() == 0:\n    time.sleep(30)\n    os._exit(0)\n"
    dump_cell(tmp_path, cell)
    index = Dump(str(tmp_path / "dump"), KEY).index
    assert index["via"] == "process" and index["shared"] is forked
    out = load_in_fresh(tmp_path, 'out["sum"] = int(v["arr"].sum())')
    assert out["failed"] == {} and out["sum"] == 1_000_000 * 999_999 // 2
    if forked:
        import psutil

        proc = _dumpers.pop()
        children = psutil.Process(proc.pid).children()
        proc.stdin.close()
        proc.wait(timeout=20)
        proc.stdout.close()
        for child in children:
            child.kill()
            with contextlib.suppress(psutil.Error):
                child.wait(timeout=10)


def _ptrace_scope() -> int:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


@pytest.mark.skipif(_ptrace_scope() >= 2, reason="Yama forbids reading a child's memory")
@pytest.mark.parametrize("proc_mem", [True, False])
def test_a_buffer_the_exporter_shares_with_its_forks_is_read_with_one_fault_a_page(monkeypatch, proc_mem):
    # An exporter's buffers are usually shared with its checkpoints (forks
    # of it), and it says so. Read through /proc/PID/mem, each page costs
    # one fault (the copy's own page); process_vm_readv, which pins each
    # page it reads, takes a second one per shared page. Where
    # /proc/PID/mem does not open, the system call reads the same bytes.
    import ctypes
    import mmap
    import resource

    from forkreload import migrate

    pages = 4096
    size = pages * mmap.PAGESIZE
    src = bytearray(os.urandom(size))
    address = ctypes.addressof((ctypes.c_char * size).from_buffer(src))
    assert not migrate._shares_pages([(address, size)])  # written here, not forked since
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the exporter: its memory shared with a fork of its own, as with a checkpoint
        os.close(w)
        fork = os.fork()
        if fork == 0:
            os.read(r, 1)
            os._exit(0)
        os.read(r, 1)
        os.waitpid(fork, 0)
        os._exit(0)
    os.close(r)
    assert migrate._shares_pages([(address, size)])  # the child maps the same pages now
    if not proc_mem:
        real_open = os.open

        def no_proc_mem(path, *args, **kwargs):
            if str(path).endswith("/mem"):
                raise PermissionError(13, "refused", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", no_proc_mem)
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        dest = ctypes.c_char.from_buffer(region)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        migrate._read_process(pid, address, ctypes.addressof(dest), size, shared=True)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del dest
        assert region[:] == bytes(src)
        if proc_mem:
            assert faults < pages * 1.5, faults
        region.close()
    finally:
        os.write(w, b"xx")
        os.close(w)
        os.waitpid(pid, 0)
