"""An in-place patch must agree with a fresh process running the new code (issue 9, cases 3 and 6).

Most tests drive the worker's agent in this process (`Agent.inplace`, with a
stand-in for the kernel): they write a small project, import it, edit it and
read the agent's JSON answer. A few go end to end through `forkreload.Session`.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from forkreload.agent import Agent


class Project:
    """A throw-away package of user modules on sys.path, imported through an Agent as a worker would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pkg = f"frsound_{uuid.uuid4().hex[:8]}"  # unique: tests share one interpreter
        (root / self.pkg).mkdir()
        (root / self.pkg / "__init__.py").write_text("")
        self.user_ns: dict[str, Any] = {"In": [""], "__name__": "__main__"}
        # The parts of IPython's shell the agent reads (a stand-in for the
        # kernel around it, not for the agent under test).
        shell = SimpleNamespace(user_ns=self.user_ns, user_ns_hidden={"In": self.user_ns["In"]},
                                history_manager=SimpleNamespace(output_hist={}))
        kernel = SimpleNamespace(shell=shell, session=SimpleNamespace(key=b"test"))
        self.agent = Agent(kernel, str(root), [])

    def write(self, name: str, source: str | bytes) -> Path:
        path = self.root / self.pkg / f"{name}.py"
        if isinstance(source, str):
            source = textwrap.dedent(source).lstrip("\n").encode()
        path.write_bytes(source)
        return path

    def name(self, module: str) -> str:
        return f"{self.pkg}.{module}"

    def run_cell(self, code: str) -> None:
        """What a cell does: its source goes to `In`, it runs in user_ns."""
        code = code.replace("PKG", self.pkg)
        self.user_ns["In"].append(code)
        exec(code, self.user_ns)
        self.agent.scan()

    def edit(self, **sources: str | bytes) -> dict[str, Any]:
        paths = [str(self.write(name, source)) for name, source in sources.items()]
        return self.agent.call("inplace", sorted(paths), "auto")


@pytest.fixture
def proj(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield p
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n == p.pkg or n.startswith(p.pkg + ".")]:
        del sys.modules[name]


def _inplace(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer.get("kind") == "inplace", answer
    return answer


# --- case 6: every reason, errors as Python shows them ------------------------


def test_every_reason_of_every_file_is_returned(proj: Project) -> None:
    proj.write("model", """
        import functools

        def f(x):
            return x
        """)
    proj.write("config", "RATE = 1\n")
    proj.run_cell("from PKG import model, config")
    answer = proj.edit(
        model="""
            import functools, os

            @functools.wraps(len)
            def f(x):
                return x
            """,
        config="RATE = 2\n",
    )
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [
        "config.py: module constant RATE changed",
        "model.py: import statements changed",
        "model.py: decorators of function f changed",
    ]


def test_every_file_that_does_not_parse_is_named_as_python_names_it(proj: Project) -> None:
    proj.write("a", "def f():\n    return 1\n")
    proj.write("b", "def g():\n    return 1\n")
    proj.write("c", "def h():\n    return 1\n")
    proj.run_cell("from PKG import a, b, c")
    answer = proj.edit(a="def f()\n    return 2\n", b="def g():\nreturn 2\n", c="K = 1\n")
    assert answer == {"kind": "error", "reasons": [
        "SyntaxError: expected ':' (a.py, line 1)",
        "IndentationError: expected an indented block after function definition on line 1 (b.py, line 2)",
    ]}
    assert sys.modules[proj.name("a")].f() == 1  # the old code keeps running


def test_an_undecodable_file_is_named(proj: Project) -> None:
    proj.write("model", "def f():\n    return 'a'\n")
    proj.run_cell("from PKG import model")
    answer = proj.edit(model=b"def f():\n    return '\xe9'\n")
    assert answer == {"kind": "error", "reasons": [
        "model.py: cannot be decoded as UTF-8: byte 0xe9 at line 2, column 13 (invalid continuation byte)"]}


def test_patched_lists_every_function_of_every_module(proj: Project) -> None:
    proj.write("a", "def f():\n    return 1\n\ndef g():\n    return 1\n")
    proj.write("b", "def h():\n    return 1\n")
    proj.run_cell("from PKG import a, b")
    answer = _inplace(proj.edit(a="def f():\n    return 2\n\ndef g():\n    return 2\n", b="def h():\n    return 2\n"))
    assert sorted(answer["patched"]) == sorted(proj.name(n) for n in ("a.f", "a.g", "b.h"))


# --- case 3: what the old code already did ------------------------------------


def test_a_patched_function_does_not_leave_stale_results_in_another_modules_cache(proj: Project) -> None:
    proj.write("a", "def base(x):\n    return x\n")
    proj.write("b", """
        import functools
        from . import a

        @functools.lru_cache
        def twice(x):
            return 2 * a.base(x)
        """)
    proj.run_cell("from PKG import b; before = b.twice(3)")
    answer = _inplace(proj.edit(a="def base(x):\n    return x + 100\n"))
    # A fresh process would compute twice(3) with the new base.
    assert sys.modules[proj.name("b")].twice(3) == 206
    assert answer["cleared"] == {proj.name("b.twice"): 1}
    assert f"cleared the cache of {proj.name('b.twice')} (1 entry computed before the edit)" in answer["notes"]


def test_an_lru_cached_function_is_patched_and_its_cache_named(proj: Project) -> None:
    proj.write("m", """
        from functools import lru_cache

        @lru_cache(maxsize=None)
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        """)
    proj.run_cell("from PKG import m; f = m.fib; f(10)")
    answer = _inplace(proj.edit(m="""
        from functools import lru_cache

        @lru_cache(maxsize=None)
        def fib(n):
            return 1 if n < 2 else fib(n - 1) + fib(n - 2)
        """))
    assert answer["patched"] == [proj.name("m.fib")]
    assert answer["cleared"] == {proj.name("m.fib"): 11}
    assert proj.user_ns["f"](10) == 89


def test_a_cell_cache_is_kept_and_named(proj: Project) -> None:
    proj.write("m", "def f(x):\n    return x\n")
    proj.run_cell("import functools\nfrom PKG import m\n@functools.cache\ndef g(x):\n    return m.f(x)\ng(1); g(2)")
    answer = _inplace(proj.edit(m="def f(x):\n    return -x\n"))
    assert "g: kept its cache (2 entries, which may hold results of the old code)" in answer["notes"]


def test_a_generator_suspended_in_a_patched_function_is_named(proj: Project) -> None:
    proj.write("m", """
        def count():
            yield from range(10)

        def outer():
            yield from count()

        async def work():
            return 1
        """)
    proj.run_cell(
        "from PKG import m\n"
        "gen = m.count(); next(gen)\n"
        "nested = m.outer(); next(nested)\n"
        "pending = [m.work()]\n"
        "done = m.count(); list(done)\n"
    )
    answer = _inplace(proj.edit(m="""
        def count():
            yield from range(5)

        def outer():
            yield from count()

        async def work():
            return 2
        """))
    pending = proj.user_ns["pending"][0]
    pending.close()
    assert answer["notes"] == [
        f"gen: a generator suspended in {proj.name('m.count')} keeps running the old body",
        f"nested: a generator suspended in {proj.name('m.count')} keeps running the old body",
        f"pending: a coroutine suspended in {proj.name('m.work')} keeps running the old body",
    ]


def test_a_closure_made_by_the_old_code_is_named(proj: Project) -> None:
    proj.write("m", "def make(k):\n    def mul(x):\n        return x * k\n    return mul\n\ndef other():\n    return 1\n")
    proj.run_cell("from PKG import m; triple = m.make(3); handlers = {'t': m.make(2)}")
    answer = _inplace(proj.edit(m="def make(k):\n    def mul(x):\n        return x * k + 1\n    return mul\n\n"
                                  "def other():\n    return 1\n"))
    assert answer["notes"] == [
        f"triple: a function made by the old {proj.name('m.make')} keeps its old code",
        f"handlers: a function made by the old {proj.name('m.make')} keeps its old code",
    ]
    # The inner function did not change: closures made before behave as new ones; nothing to say.
    proj.run_cell("same = m.make(3)")
    answer = _inplace(proj.edit(m="def make(k):\n    def mul(x):\n        return x * k + 1\n    return mul\n\n"
                                  "def other():\n    return 2\n"))
    assert answer["notes"] == []


def test_a_module_star_importing_the_edited_one_goes_fresh_when_names_are_added(proj: Project) -> None:
    proj.write("m", "def f():\n    return 1\n")
    proj.write("user", "from .m import *\n\ndef g():\n    return f()\n")
    proj.run_cell("from PKG import user")
    answer = proj.edit(m="def f():\n    return 1\n\ndef extra():\n    return 2\n")
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [f"user.py: from {proj.name('m')} import * would also bind the new {proj.name('m.extra')}"]


@pytest.mark.parametrize("v2", [
    "__all__ = ['f']\n\ndef f():\n    return 1\n\ndef extra():\n    return 2\n",  # not in __all__
    "__all__ = ['f']\n\ndef f():\n    return 2\n",  # nothing added
])
def test_a_star_import_that_would_not_bind_anything_new_stays_in_place(proj: Project, v2: str) -> None:
    proj.write("m", "__all__ = ['f']\n\ndef f():\n    return 1\n")
    proj.write("user", "from .m import *\n")
    proj.run_cell("from PKG import user")
    _inplace(proj.edit(m=v2))


def test_a_cell_star_import_is_told_about_added_names(proj: Project) -> None:
    proj.write("m", "def f():\n    return 1\n")
    proj.run_cell("from PKG.m import *")
    answer = _inplace(proj.edit(m="def f():\n    return 1\n\ndef extra():\n    return 2\n\ndef _private():\n    return 3\n"))
    assert answer["notes"] == [
        f"a cell ran `from {proj.name('m')} import *` before {proj.name('m.extra')} existed: "
        "run it again to bind the new names"
    ]


def test_an_added_function_imported_by_name_at_import_goes_fresh(proj: Project) -> None:
    proj.write("m", "def f():\n    return 1\n")
    proj.write("user", "try:\n    from .m import extra\nexcept ImportError:\n    extra = None\n")
    proj.run_cell("from PKG import user")
    answer = proj.edit(m="def f():\n    return 1\n\ndef extra():\n    return 2\n")
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [f"user.py imports the new {proj.name('m.extra')} by name when it is imported"]


def test_a_relative_import_used_at_import_goes_fresh(proj: Project) -> None:
    proj.write("a", "def helper():\n    return 1\n")
    proj.write("b", "from .a import helper\n\nX = helper()\n")
    proj.run_cell("from PKG import b")
    answer = proj.edit(a="def helper():\n    return 2\n")
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [f"b.py uses {proj.name('a')}.helper when it is imported"]


def test_an_import_of_the_package_used_at_import_goes_fresh(proj: Project) -> None:
    proj.write("a", "def helper():\n    return 1\n")
    proj.write("b", "from . import a\n\nX = a.helper()\n")
    proj.run_cell("from PKG import b")
    answer = proj.edit(a="def helper():\n    return 2\n")
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [f"b.py uses {proj.name('a')}.helper when it is imported"]


def test_a_hash_helper_patched_in_place_goes_fresh(proj: Project) -> None:
    proj.write("keys", "def norm(s):\n    return s.lower()\n")
    proj.write("model", """
        from . import keys

        def _hash(self):
            return hash(keys.norm(self.name))

        class Tag:
            def __init__(self, name):
                self.name = name

            def key(self):
                return keys.norm(self.name)

            def __eq__(self, other):
                return self.key() == other.key()

            __hash__ = _hash
        """)
    proj.run_cell("from PKG import model; tags = {model.Tag('A'): 1}")
    answer = proj.edit(keys="def norm(s):\n    return s.upper()\n")
    assert answer["kind"] == "fresh"
    tag = f"{proj.name('model')}.Tag"
    norm = proj.name("keys.norm")
    assert answer["reasons"] == [
        f"{tag}.__hash__ calls {norm}, which the edit changes: dicts and sets already hold hashes from the old code",
        f"{tag}.__eq__ calls {norm}, which the edit changes: dicts and sets already told their keys apart with the old code",
    ]


def test_a_cell_class_hashing_with_a_patched_function_goes_fresh(proj: Project) -> None:
    proj.write("keys", "def norm(s):\n    return s.lower()\n\ndef unrelated():\n    return 1\n")
    proj.run_cell("from PKG import keys\nclass Key:\n    def __init__(self, s):\n        self.s = s\n"
                  "    def __hash__(self):\n        return hash(keys.norm(self.s))\nseen = {Key('A')}")
    answer = proj.edit(keys="def norm(s):\n    return s.upper()\n\ndef unrelated():\n    return 1\n")
    assert answer["kind"] == "fresh" and "Key.__hash__ calls" in answer["reasons"][0], answer
    # A function the hooks never call stays in place.
    answer = _inplace(proj.edit(keys="def norm(s):\n    return s.lower()\n\ndef unrelated():\n    return 2\n"))


def test_a_thread_inside_a_patched_function_is_named(proj: Project) -> None:
    proj.write("m", "def wait(ev):\n    ev.wait(30)\n    return 1\n")
    proj.run_cell("import threading\nfrom PKG import m\nev = threading.Event()\n"
                  "t = threading.Thread(target=m.wait, args=(ev,), name='waiter'); t.start()")
    try:
        answer = _inplace(proj.edit(m="def wait(ev):\n    ev.wait(30)\n    return 2\n"))
    finally:
        proj.user_ns["ev"].set()
        proj.user_ns["t"].join()
    assert answer["notes"] == [f"thread waiter: still inside {proj.name('m.wait')}, it runs the old body until that call returns"]


def test_a_default_filled_since_import_is_in_the_notes(proj: Project) -> None:
    proj.write("m", "def log(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n")
    proj.run_cell("from PKG import m; m.log(1)")
    answer = _inplace(proj.edit(m="def log(x, seen=[]):\n    seen.append(x)\n    return -len(seen)\n"))
    assert answer["notes"] == [f"{proj.name('m.log')} keeps its default seen=[1], filled since import (a fresh import gives [])"]


# --- end to end, through a session -------------------------------------------


def test_session_hash_edit_goes_fresh_and_the_dict_works(project, make_session) -> None:
    project.write("geo.py", """
        class Point:
            def __init__(self, x):
                self.x = x
            def __eq__(self, other):
                return self.x == other.x
            def __hash__(self):
                return hash(self.x)
        """)
    s = make_session()
    assert s.execute("import geo; seen = {geo.Point(1): 'one'}").status == "ok"
    project.write("geo.py", """
        class Point:
            def __init__(self, x):
                self.x = x
            def __eq__(self, other):
                return self.x == other.x
            def __hash__(self):
                return hash((self.x, 'v2'))
        """)
    r = s.execute("print(seen[geo.Point(1)])")
    # Patched in place, the dict would hold the old hash and the lookup would raise KeyError.
    assert r.status == "ok" and r.stdout == "one\n", r
    assert r.reload.mode == "fresh"
    assert r.reload.reason == "geo.py: geo.Point.__hash__ changed: dicts and sets already hold hashes from the old code"


def test_session_cached_results_of_the_old_code_are_not_served(project, make_session) -> None:
    project.write("prices.py", "def rate():\n    return 2\n")
    project.write("report.py", "import functools\nimport prices\n\n@functools.cache\ndef total(n):\n    return n * prices.rate()\n")
    s = make_session()
    assert s.execute("import report; report.total(10)").status == "ok"
    project.write("prices.py", "def rate():\n    return 3\n")
    r = s.execute("print(report.total(10))")
    assert r.stdout == "30\n", r
    assert r.reload.mode == "inplace" and r.reload.patched == ["prices.rate"]


def test_session_every_reason_and_python_s_syntax_error(project, make_session) -> None:
    project.write("a.py", "K = 1\n")
    project.write("b.py", "import os\n\ndef f():\n    return 1\n")
    s = make_session()
    s.execute("import a, b")
    project.write("a.py", "K = 2\n")
    project.write("b.py", "import os, sys\n\ndef f():\n    return 2\n")
    r = s.execute("print(a.K, b.f())")
    assert r.stdout == "2 2\n" and r.reload.mode == "fresh"
    assert r.reload.reasons == ["a.py: module constant K changed", "b.py: import statements changed"]
    project.write("b.py", "import os, sys\n\ndef f()\n    return 3\n")
    r = s.execute("print(b.f())")
    assert r.stdout == "2\n" and r.reload.ok is False
    assert "SyntaxError: expected ':' (b.py, line 3)" in r.notice


def test_a_star_import_of_the_package_itself_goes_fresh_when_names_are_added(proj: Project) -> None:
    proj.write("__init__", "def f():\n    return 1\n")
    proj.write("user", "from . import *\n")
    proj.run_cell("from PKG import user")
    answer = proj.edit(__init__="def f():\n    return 1\n\ndef extra():\n    return 2\n")
    assert answer["kind"] == "fresh"
    assert answer["reasons"] == [f"user.py: from {proj.pkg} import * would also bind the new {proj.pkg}.extra"]


def test_an_added_function_looked_up_by_name_at_import_goes_fresh(proj: Project) -> None:
    proj.write("m", "def f():\n    return 1\n")
    proj.write("user", "from . import m\n\nFAST = getattr(m, 'extra', None)\n")
    proj.run_cell("from PKG import user")
    answer = proj.edit(m="def f():\n    return 1\n\ndef extra():\n    return 2\n")
    assert answer["reasons"] == [f"user.py names the new {proj.name('m.extra')} in code that runs when it is imported"]


def test_a_generator_kept_in_a_module_is_named(proj: Project) -> None:
    proj.write("m", "def count():\n    yield from range(10)\n\ndef start():\n    global STREAM\n    STREAM = count()\n    next(STREAM)\n")
    proj.run_cell("from PKG import m; m.start()")
    answer = _inplace(proj.edit(m="def count():\n    yield from range(3)\n\ndef start():\n    global STREAM\n"
                                  "    STREAM = count()\n    next(STREAM)\n"))
    assert answer["notes"] == [
        f"{proj.name('m.STREAM')}: a generator suspended in {proj.name('m.count')} keeps running the old body"]


def test_mode_inplace_leaves_a_hash_helper_unpatched(proj: Project) -> None:
    proj.write("keys", "def norm(s):\n    return s.lower()\n")
    proj.write("other", "def g():\n    return 1\n")
    proj.run_cell("from PKG import keys, other\nclass Key:\n    def __init__(self, s):\n        self.s = s\n"
                  "    def __hash__(self):\n        return hash(keys.norm(self.s))\nseen = {Key('A')}")
    paths = [str(proj.write("keys", "def norm(s):\n    return s.upper()\n")), str(proj.write("other", "def g():\n    return 2\n"))]
    answer = proj.agent.call("inplace", paths, "inplace")
    assert answer["kind"] == "partial" and answer["patched"] == [proj.name("other.g")]
    assert "Key.__hash__ calls" in answer["reasons"][0]
    assert sys.modules[proj.name("keys")].norm("A") == "a"  # left as it was


@pytest.mark.parametrize("added, cleared", [
    ("def extra():\n    return 2\n", False),  # nothing ran it before: the cached results stand
    ("def len(x):\n    return 0\n", True),  # shadows a builtin that base() calls
])
def test_caches_are_cleared_when_an_added_function_can_change_results(proj: Project, added: str, cleared: bool) -> None:
    v1 = "import functools\n\n@functools.cache\ndef base(x):\n    return len(x)\n\n"
    proj.write("m", v1)
    proj.run_cell("from PKG import m; m.base('abc')")
    answer = _inplace(proj.edit(m=v1 + added))
    assert answer["cleared"] == ({proj.name("m.base"): 1} if cleared else {})
    assert sys.modules[proj.name("m")].base("abc") == (0 if cleared else 3)
