"""What a module's import really did: the source it executed, the functions it
ran, the state it left, the order cells asked for modules, and project files
that shadow library modules (issue 9).

The agent's new answer fields (`notes`, `reset`) are checked by calling the
agent from a cell in a session whose mode is 'off', so the controller itself
stays out of the way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def test_edit_saved_while_the_importing_cell_runs_is_picked_up(project, make_session):
    project.write("train.py", "def f():\n    return 'old'\n")
    s = make_session()
    marker = project.root / "imported"

    def edit_after_import() -> None:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        project.write("train.py", "def f():\n    return 'new'\n")

    t = threading.Thread(target=edit_after_import)
    t.start()
    try:
        r = s.execute("import train, time, pathlib; print(train.f()); pathlib.Path('imported').touch(); time.sleep(1.5)")
    finally:
        t.join()
    assert r.stdout == "old\n", r
    r = s.execute("print(train.f())")
    assert r.stdout == "new\n", r
    assert r.reload is not None and r.reload.mode == "inplace" and r.reload.patched == ["train.f"]


def test_a_stale_pyc_is_never_used(project, make_session):
    import os
    import py_compile

    path = project.write("m.py", "def f():\n    return 'new'\n")
    # A .pyc of another source, claiming the current file's mtime and size.
    other = project.write("other_src.py", "def f():\n    return 'old'\n")
    st = os.stat(path)
    os.utime(other, ns=(st.st_mtime_ns, st.st_mtime_ns))
    import importlib.util

    py_compile.compile(str(other), cfile=importlib.util.cache_from_source(str(path)), dfile=str(path))
    s = make_session()
    assert s.execute("import m; print(m.f())").stdout == "new\n"


CHAIN = {
    "a.py": "import b\n\nLIMIT = b.helper()\n",
    "b.py": "import c\n\ndef helper():\n    return c.g() + 1\n",
    "c.py": "def g():\n    return 1\n",
}


def test_value_computed_at_import_through_another_module_needs_a_fresh_worker(project, make_session):
    for name, src in CHAIN.items():
        project.write(name, src)
    s = make_session()
    assert s.execute("import a; print(a.LIMIT)").stdout == "2\n"
    project.write("c.py", "def g():\n    return 10\n")
    r = s.execute("print(a.LIMIT)")
    assert r.stdout == "11\n", r
    assert r.reload.mode == "fresh" and "a.py's import ran c.g" in r.reload.reason, r.reload


def test_a_function_that_did_not_run_at_import_is_still_patched_in_place(project, make_session):
    for name, src in CHAIN.items():
        project.write(name, src)
    project.write("c.py", "def g():\n    return 1\n\ndef unused():\n    return 'u1'\n")
    s = make_session()
    s.execute("import a")
    project.write("c.py", "def g():\n    return 1\n\ndef unused():\n    return 'u2'\n")
    r = s.execute("import c; print(c.unused())")
    assert r.stdout == "u2\n" and r.reload.mode == "inplace", r.reload


def test_nested_import_names_the_module_whose_top_level_ran_it(project, make_session):
    # d's import runs e.h (through a class body and a method), inside a's import.
    project.write("a.py", "import d\n")
    project.write("d.py", "import e\n\nclass K:\n    v = e.Box().get()\n")
    project.write("e.py", "def h():\n    return 1\n\nclass Box:\n    def get(self):\n        return h()\n")
    s = make_session()
    assert s.execute("import a; print(a.d.K.v)").stdout == "1\n"
    project.write("e.py", "def h():\n    return 5\n\nclass Box:\n    def get(self):\n        return h()\n")
    r = s.execute("print(a.d.K.v)")
    assert r.stdout == "5\n"
    assert r.reload.mode == "fresh" and "d.py's import ran e." in r.reload.reason, r.reload


def _agent(s, call: str) -> dict:
    r = s.execute(f"import json as _j; print(_j.dumps(__forkreload__.{call}))")
    assert r.status == "ok", r
    return json.loads(r.stdout)


def test_inplace_patch_names_containers_filled_by_the_old_code(project, make_session):
    src = "_CACHE = {}\nSEEN = []\n\ndef feat(x):\n    if x not in _CACHE:\n        _CACHE[x] = x * 2\n    return _CACHE[x]\n"
    project.write("features.py", src)
    s = make_session()
    s.execute("import features; [features.feat(i) for i in range(12)]")
    project.write("features.py", src.replace("x * 2", "x * 3"))
    r = s.execute("print(features.feat(1), features.feat(20))")
    assert r.stdout == "2 60\n"  # 1 was computed by the old code and kept: the notice says so
    assert r.reload.mode == "inplace" and r.reload.notes == ["kept features._CACHE (12 entries computed by the old code)"], r.reload
    assert r.notice.rstrip().endswith(" · kept features._CACHE (12 entries computed by the old code)"), r.notice


def test_fresh_worker_names_module_state_it_resets(project, make_session):
    project.write("metrics.py", "METRICS = {'a': 1}\nflag = False\nSMALL = [1, 2]\n\ndef record(k):\n    METRICS[k] = 1\n")
    project.write("m.py", "import metrics\n")
    s = make_session()
    s.execute("import m, metrics; metrics.record('b'); m.flag = True; metrics.flag = True")
    project.write("metrics.py", "METRICS = {'a': 1}\nflag = False\nSMALL = [1, 2, 3]\n\ndef record(k):\n    METRICS[k] = 1\n")
    r = s.execute("print(sorted(metrics.METRICS), metrics.flag, hasattr(m, 'flag'))")
    assert r.stdout == "['a'] False False\n"  # as a fresh process: the notice names each
    assert r.reload.mode == "fresh"
    assert sorted(r.reload.notes) == [
        "reset m.flag (attribute set from a cell)",
        "reset metrics.METRICS (1 entry added from a cell)",
        "reset metrics.flag (attribute set from a cell)",
    ], r.reload
    assert "reset metrics.METRICS (1 entry added from a cell)" in r.notice


def test_circular_import_introduced_by_an_edit_fails_like_a_fresh_process(project, make_session):
    # A cell asked for a; a imports b. After the edit, b imports a and reads
    # a.X at its top level: `python -c "import a"` fails there.
    project.write("a.py", "import b\n\nX = 1\n")
    project.write("b.py", "Y = 2\n")
    s = make_session()
    assert s.execute("import a; print(a.b.Y)").stdout == "2\n"
    project.write("b.py", "import a\n\nY = a.X\n")
    r = s.execute("print(a.b.Y)")
    assert r.reload is not None and not r.reload.ok, r.reload
    fresh = subprocess.run([sys.executable, "-c", "import a"], cwd=project.root, capture_output=True, text=True)
    assert fresh.returncode == 1 and "AttributeError" in fresh.stderr
    assert fresh.stderr.strip().splitlines()[-1] in (r.reload.error or ""), r.reload


def test_project_file_named_like_a_stdlib_module(project, make_session):
    # Importing pandas needs the standard library's csv; this one has nothing.
    project.write("csv.py", "MINE = True\n")
    s = make_session(preload=["pandas"])
    r = s.execute("import os; print(1)")
    assert r.stdout == "1\n" and "shadows" not in r.notice
    r = s.execute("import pandas, csv\nprint(hasattr(csv, 'reader'), hasattr(pandas, 'read_csv'))")
    assert r.stdout == "True True\n", r
    assert r.notice == (
        "forkreload: csv.py in your project shadows the standard library's csv module; "
        "`import csv` gives that module, not your file\n"
    ), r
    r = s.execute("import csv")
    assert r.notice == "" and r.stderr == ""
    # The project's own modules, once imported, are not taken for preloads.
    project.write("mine.py", "X = 1\n")
    assert s.execute("import mine").notice == ""
    assert s.execute("import mine").notice == ""
    r = s.execute("%forkreload status")
    assert "failed" not in r.stdout, r.stdout


def test_registry_filled_by_later_imports_is_not_reset_but_a_cell_registration_is(project, make_session, tmp_path):
    project.write("registry.py", "PLUGINS = {}\n\ndef register(name):\n    PLUGINS[name] = True\n")
    project.write("plug_a.py", "import registry\n\nregistry.register('a')\n")
    project.write("plug_b.py", "import registry\nregistry.PLUGINS['b'] = True\n")
    s = make_session(mode="off")
    s.execute("import plug_a")
    s.execute("import plug_b")
    assert _agent(s, f"export({str(tmp_path / 'd1')!r})")["reset"] == []
    s.execute("import registry; registry.register('mine')")
    res = _agent(s, f"export({str(tmp_path / 'd2')!r})")
    assert res["reset"] == ["reset registry.PLUGINS (1 entry added from a cell)"], res


def test_a_failing_import_shows_the_users_line_and_leaves_no_tracer(project, make_session):
    project.write("m.py", "X = 1\nraise ValueError('bad module')\n")
    s = make_session()
    r = s.execute("import m")
    assert r.error == ("ValueError", "bad module")
    plain = "\n".join(r.traceback)
    assert "m.py" in plain and "forkreload" not in plain, plain
    project.write("m.py", "X = 2\n")
    r = s.execute("import sys, m; print(m.X, sys.getprofile())")
    assert r.stdout == "2 None\n", r


def test_package_import_runs_a_submodule_function(project, make_session):
    project.write("pkg/__init__.py", "from . import tools\n\nDEFAULT = tools.make()\n")
    project.write("pkg/tools.py", "def make():\n    return 'v1'\n")
    s = make_session()
    assert s.execute("import pkg; print(pkg.DEFAULT)").stdout == "v1\n"
    project.write("pkg/tools.py", "def make():\n    return 'v2'\n")
    r = s.execute("print(pkg.DEFAULT)")
    assert r.stdout == "v2\n"
    assert r.reload.mode == "fresh", r.reload


def test_an_import_under_another_profiler_rules_out_in_place(project, make_session):
    # Only where the agent traces through sys.setprofile (before 3.12) can a
    # profiler the user runs hide what an import ran.
    if sys.version_info >= (3, 12):
        import pytest

        pytest.skip("sys.monitoring traces alongside other profilers")
    for name, src in CHAIN.items():
        project.write(name, src)
    s = make_session()
    s.execute("import sys; sys.setprofile(lambda *a: None); import a; sys.setprofile(None)")
    project.write("c.py", "def g():\n    return 10\n")
    r = s.execute("print(a.LIMIT)")
    assert r.stdout == "11\n" and r.reload.mode == "fresh", r.reload
    assert "what a.py's import ran is unknown" in r.reload.reason, r.reload


def test_a_hash_checked_pyc_of_the_same_source_is_reused(project, make_session):
    import importlib.util
    import marshal

    path = project.write("m.py", "def f():\n    return 'src'\n")
    # A hash-checked .pyc (PEP 552) carrying the hash of m.py's bytes: the
    # loader trusts it (its code says 'pyc', to show that it ran).
    code = compile("def f():\n    return 'pyc'\n", str(path), "exec")
    pyc = importlib.util.cache_from_source(str(path))
    os.makedirs(os.path.dirname(pyc), exist_ok=True)
    with open(pyc, "wb") as f:
        f.write(importlib.util.MAGIC_NUMBER + (3).to_bytes(4, "little") + importlib.util.source_hash(path.read_bytes()) + marshal.dumps(code))
    s = make_session()
    assert s.execute("import m; print(m.f(), m.f.__code__.co_filename == m.__file__)").stdout == "pyc True\n"
    # The hash no longer matches once the file changes: compiled from source.
    project.write("m.py", "def f():\n    return 'new'\n")
    r = s.execute("%forkreload fresh")
    assert r.reload.ok, r.reload
    assert s.execute("print(m.f())").stdout == "new\n"


def test_a_library_folder_linked_to_the_users_code_is_the_users(tmp_path):
    # `flit install --symlink` and similar put a link to the project's
    # package into site-packages: its modules are the user's (resolved per
    # folder, cached, but a link is never taken for a library folder).
    import types

    from forkreload.agent import user_module_file

    lib = tmp_path / "site-packages"
    real = tmp_path / "project" / "mypkg"
    (lib / "numpyish").mkdir(parents=True)
    real.mkdir(parents=True)
    for f in (lib / "numpyish" / "__init__.py", lib / "numpyish" / "core.py", real / "__init__.py", real / "ops.py"):
        f.write_text("x = 1\n")
    (lib / "mypkg").symlink_to(real, target_is_directory=True)
    (lib / "linked.py").symlink_to(real / "ops.py")
    libs = (str(lib) + os.sep,)

    def mod(path: object) -> types.ModuleType:
        m = types.ModuleType("m")
        m.__file__ = str(path)
        return m

    assert user_module_file(mod(lib / "numpyish" / "__init__.py"), (), libs) is None
    assert user_module_file(mod(lib / "numpyish" / "core.py"), (), libs) is None
    assert user_module_file(mod(lib / "mypkg" / "ops.py"), (), libs) == str(real / "ops.py")
    assert user_module_file(mod(lib / "mypkg" / "__init__.py"), (), libs) == str(real / "__init__.py")
    assert user_module_file(mod(lib / "linked.py"), (), libs) == str(real / "ops.py")
    assert user_module_file(mod(lib / "numpyish"), (), libs) is None  # a folder is no module file
    assert user_module_file(mod(lib / "gone.py"), (), libs) is None


def test_folder_resolution_agrees_with_realpath(tmp_path):
    # The agent resolves folders one component at a time on cached parents;
    # every kind of link must land where os.path.realpath lands.
    from forkreload import agent

    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "rel").symlink_to("../a/b", target_is_directory=True)  # relative
    (tmp_path / "abs").symlink_to(tmp_path / "a", target_is_directory=True)  # absolute
    (tmp_path / "chain").symlink_to("x/rel", target_is_directory=True)  # a link to a link
    (tmp_path / "up").symlink_to("a/b/c/..", target_is_directory=True)  # '..' in the target
    (tmp_path / "loop").symlink_to("loop")
    folders = [
        tmp_path / "a" / "b" / "c", tmp_path / "x" / "rel" / "c", tmp_path / "abs" / "b",
        tmp_path / "chain" / "c", tmp_path / "up" / "c", tmp_path / "gone" / "deeper",
        tmp_path / "loop", tmp_path / "loop" / "inside",
    ]
    agent._REAL_DIRS.clear()
    try:
        for folder in folders:
            assert agent._real_dir(str(folder)) == os.path.realpath(folder), folder
    finally:
        agent._REAL_DIRS.clear()


def test_module_file_resolution_agrees_with_realpath(tmp_path, monkeypatch):
    # __file__ as Python writes it: absolute, relative, with '..', a link.
    from forkreload import agent

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "sub" / "m.py").write_text("")
    (tmp_path / "pkg" / "top.py").write_text("")
    (tmp_path / "ln").symlink_to(tmp_path / "pkg", target_is_directory=True)
    (tmp_path / "pkg" / "alias.py").symlink_to("sub/m.py")
    monkeypatch.chdir(tmp_path / "pkg")
    files = [
        str(tmp_path / "pkg" / "sub" / "m.py"), "top.py", "sub/m.py", "sub/../top.py",
        str(tmp_path / "ln" / "sub" / "m.py"), str(tmp_path / "ln" / "alias.py"), "./alias.py",
    ]
    agent._REAL_DIRS.clear()
    try:
        for file in files:
            assert agent._real_file(file) == os.path.realpath(file), file
        assert agent._real_file(str(tmp_path / "pkg" / "sub")) is None  # a folder
        assert agent._real_file("missing.py") is None
    finally:
        agent._REAL_DIRS.clear()
