"""Tests of forkreload.reload: which edits are patched in place, and that old references run the new code.

Each case writes version 1 of a module, imports it, keeps references to old
objects (an instance, a bound method, `f = m.func`, a dict holding a function
as a callback), writes version 2, classifies and applies, then checks the
behaviour through those old references.
"""

from __future__ import annotations

import importlib.util
import itertools
import linecache
import sys
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from forkreload.reload import Change, Decision, PatchError, apply_plan, classify

_counter = itertools.count()


@pytest.fixture
def load(tmp_path: Path):
    """load(source) -> module imported from a fresh file under a unique name; removed afterwards."""
    names: list[str] = []

    def _load(source: str) -> ModuleType:
        name = f"frtest_mod_{next(_counter)}"
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        names.append(name)
        spec.loader.exec_module(module)
        return module

    yield _load
    for name in names:
        sys.modules.pop(name, None)


def edit(module: ModuleType, v1: str, v2: str) -> Decision:
    Path(module.__file__).write_text(v2)
    return classify(module, v1, v2)


def src(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# --- in place ----------------------------------------------------------------

BASE = src('''
    """Shapes."""
    import math

    RATE = 2

    def area(r):
        return math.pi * r * r

    def scale(x, k=2, *, offset=0):
        return x * k + offset

    class Greeter:
        def __init__(self, name):
            self.name = name

        def greet(self):
            return "hello " + self.name

        @staticmethod
        def shout(s):
            return s.upper()

        @classmethod
        def make(cls):
            return cls("made")

    def outer(x):
        def inner(y):
            return y + 1
        return inner(x)
    ''')


@dataclass
class Inplace:
    id: str
    v2: str
    kind: str  # 'inplace' or 'noop'
    patched: list[str]  # names apply_plan must return (prefix 'm.' is the module)
    check: Callable[[dict], None]  # gets the old references


def old_refs(m: ModuleType) -> dict:
    g = m.Greeter("ann")
    return {
        "m": m,
        "area": m.area,  # like `from m import area` elsewhere
        "scale": m.scale,
        "callbacks": {"area": m.area},  # registered as a callback
        "g": g,
        "greet": g.greet,  # bound method of an old instance
        "shout": m.Greeter.shout,
        "make": m.Greeter.make,
        "outer": m.outer,
    }


def _body(r):
    assert r["area"](2) == 4
    assert r["callbacks"]["area"](3) == 9
    assert r["m"].area(1) == 1


def _signature(r):
    assert r["scale"](1, 3, 4) == 7  # new positional parameter
    assert r["scale"](1) == 1 * 10 + 0 + 1  # new defaults k=10, j=1; kw-only default kept
    assert r["scale"].__defaults__ == (10, 1)
    assert r["scale"].__kwdefaults__ == {"offset": 0}


def _default(r):
    assert r["scale"](1) == 5
    assert r["scale"].__defaults__ == (5,)
    assert r["scale"](1, offset=1) == 6


def _kwdefault(r):
    assert r["scale"](1) == 2 + 100
    assert r["scale"].__kwdefaults__ == {"offset": 100}


def _method(r):
    assert r["greet"]() == "hi ann!"
    assert r["g"].greet() == "hi ann!"


def _static_class(r):
    assert r["shout"]("a") == "A!"
    made = r["make"]()
    assert made.name == "made twice"


def _added_function(r):
    assert r["m"].cube(2) == 8
    assert r["m"].cube.__qualname__ == "cube" and r["m"].cube.__module__ == r["m"].__name__
    assert r["m"].cube.__defaults__ == (3,)


def _added_method(r):
    assert r["g"].wave() == "ann waves"
    assert r["m"].Greeter.twice("x") == "xx"
    assert r["m"].Greeter.wave.__qualname__ == "Greeter.wave"


def _docstring(r):
    assert r["m"].__doc__ == "Shapes, all of them."
    assert r["area"].__doc__ == "Area of a disc."
    assert r["area"](1) == pytest.approx(3.14159, rel=1e-3)


def _nested(r):
    assert r["outer"](1) == 101


def _lines_moved(r):
    # The traceback of the old reference points at the moved line, with its text.
    try:
        r["outer"](None)
    except TypeError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        assert frame.line == "return y + 1"
        assert linecache.getline(r["m"].__file__, frame.lineno).strip() == "return y + 1"
    else:
        raise AssertionError("expected a TypeError")


def _super_added(r):
    assert r["g"].greet() == "hello ann"  # untouched
    assert r["m"].Greeter.upper.__qualname__ == "Greeter.upper"
    assert r["g"].upper() == "HELLO ANN"


def _annotations(r):
    assert r["scale"].__annotations__ == {"x": float, "k": int, "return": "float"}


def _async_body(r):
    import asyncio

    assert asyncio.run(r["m"].fetch()) == 2


INPLACE = [
    Inplace("function body", BASE.replace("math.pi * r * r", "r * r"), "inplace", ["m.area"], _body),
    Inplace(
        "signature: new parameter and default",
        BASE.replace("def scale(x, k=2, *, offset=0):\n    return x * k + offset",
                     "def scale(x, k=10, j=1, *, offset=0):\n    return x * k + offset + j"),
        "inplace", ["m.scale"], _signature,
    ),
    Inplace("default changed", BASE.replace("k=2", "k=5"), "inplace", ["m.scale"], _default),
    Inplace("keyword-only default changed", BASE.replace("offset=0", "offset=100"), "inplace", ["m.scale"],
            _kwdefault),
    Inplace("method body via bound method of old instance",
            BASE.replace('return "hello " + self.name', 'return "hi " + self.name + "!"'),
            "inplace", ["m.Greeter.greet"], _method),
    Inplace("staticmethod and classmethod bodies",
            BASE.replace("return s.upper()", 'return s.upper() + "!"').replace(
                'return cls("made")', 'return cls("made twice")'),
            "inplace", ["m.Greeter.shout", "m.Greeter.make"], _static_class),
    Inplace("added function", BASE + "\ndef cube(x, n=3):\n    return x ** n\n", "inplace", ["m.cube"],
            _added_function),
    Inplace("added methods visible on old instance",
            BASE.replace("    @staticmethod\n",
                         "    def wave(self):\n        return self.name + ' waves'\n\n"
                         "    @staticmethod\n    def twice(s):\n        return s * 2\n\n    @staticmethod\n", 1),
            "inplace", ["m.Greeter.wave", "m.Greeter.twice"], _added_method),
    Inplace("added method using super()",
            BASE.replace("    @staticmethod\n",
                         "    def upper(self):\n        return super().__str__() and self.greet().upper()\n\n"
                         "    @staticmethod\n", 1),
            "inplace", ["m.Greeter.upper"], _super_added),
    Inplace("docstrings, comments and formatting only",
            BASE.replace('"""Shapes."""', '"""Shapes, all of them."""').replace(
                "def area(r):\n", 'def area(r):\n    """Area of a disc."""\n').replace(
                "RATE = 2", "RATE = (2)  # comment"),
            "noop", ["m", "m.area"], _docstring),
    Inplace("nested function changed", BASE.replace("return y + 1", "return y + 100"), "inplace", ["m.outer"],
            _nested),
    Inplace("lines moved: code refreshed for tracebacks",
            BASE.replace("def outer(x):\n", "def outer(x):\n    # a comment\n\n"), "noop", ["m.outer"],
            _lines_moved),
    Inplace("annotations of a changed signature",
            BASE.replace("def scale(x, k=2, *, offset=0):", "def scale(x: float, k: int = 2, *, offset=0) -> 'float':"),
            "inplace", ["m.scale"], _annotations),
]


@pytest.mark.parametrize("case", INPLACE, ids=lambda c: c.id)
def test_inplace(load, case: Inplace) -> None:
    m = load(BASE)
    refs = old_refs(m)
    decision = edit(m, BASE, case.v2)
    assert decision.kind == case.kind, decision.reasons
    patched = apply_plan(m, decision)
    expected = [m.__name__ + name[1:] for name in case.patched]
    if case.kind == "noop":
        assert set(expected) <= set(patched)  # plus line-number refreshes of what moved below
    else:
        assert [p for p in patched if p in expected] == expected
        described = decision.describe()
        assert all(name.split(".", 1)[1] in described for name in expected), described
    case.check(refs)


def test_future_annotations_are_the_compilers_strings(load) -> None:
    v1 = src('''
        from __future__ import annotations
        from typing import Sequence

        def area(r: float) -> float:
            return r
        ''')
    m = load(v1)
    area = m.area
    v2 = v1.replace("r: float", "r: Sequence[float]|None")
    decision = edit(m, v1, v2)
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert area.__annotations__ == {"r": "Sequence[float] | None", "return": "float"}


def test_async_function_body(load) -> None:
    v1 = "async def fetch():\n    return 1\n"
    m = load(v1)
    decision = edit(m, v1, v1.replace("1", "2"))
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    _async_body({"m": m})


def test_private_method_is_mangled(load) -> None:
    v1 = "class _Box:\n    def __secret(self, *, __k=1):\n        return __k\n    def get(self):\n        return self.__secret()\n"
    m = load(v1)
    box = m._Box()
    decision = edit(m, v1, v1.replace("__k=1", "__k=7"))
    assert decision.kind == "inplace", decision.reasons
    assert apply_plan(m, decision) == [f"{m.__name__}._Box.__secret"]
    assert box.get() == 7


def test_identical_source_is_noop(load) -> None:
    m = load(BASE)
    decision = classify(m, BASE, BASE)
    assert (decision.kind, decision.plan) == ("noop", [])
    assert apply_plan(m, decision) == []
    assert decision.describe() == f"{m.__name__}: no code change"


# --- fresh -------------------------------------------------------------------

FRESH = [
    # (id, v1, v2, reason substring)
    ("module constant", BASE, BASE.replace("RATE = 2", "RATE = 3"), "module constant RATE changed"),
    ("module variable added", BASE, BASE.replace("RATE = 2", "RATE = 2\nrate = 1"), "module variable rate added"),
    ("imports", BASE, BASE.replace("import math", "import math, os"), "import statements changed"),
    ("if statement", BASE + "if RATE:\n    pass\n", BASE + "if RATE > 1:\n    pass\n", "top-level if statement changed"),
    ("expression statement", BASE, BASE + "print('loaded')\n", "top-level expression statement added (line 31)"),
    ("class base", BASE, BASE.replace("class Greeter:", "class Greeter(object):"), "class Greeter: base classes changed"),
    ("metaclass", BASE, BASE.replace("class Greeter:", "class Greeter(metaclass=type):"), "metaclass"),
    ("class attribute", BASE.replace("class Greeter:\n", "class Greeter:\n    x = 1\n"),
     BASE.replace("class Greeter:\n", "class Greeter:\n    x = 2\n"), "class Greeter: class attribute 'x' changed"),
    ("dataclass field", "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int = 0\n",
     "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int = 0\n    y: int = 0\n", "class P: field 'y' added"),
    ("class decorator", "import functools\nclass P:\n    pass\n",
     "import functools\n@functools.total_ordering\nclass P:\n    pass\n", "class decorators changed"),
    ("slots", "class P:\n    __slots__ = ('a',)\n", "class P:\n    __slots__ = ('a', 'b')\n", "'__slots__' changed"),
    ("enum member", "import enum\nclass Color(enum.Enum):\n    RED = 1\n",
     "import enum\nclass Color(enum.Enum):\n    RED = 1\n    GREEN = 2\n", "enum member 'GREEN' added"),
    ("enum __init__", "import enum\nclass C(enum.Enum):\n    A = 1\n    def __init__(self, v):\n        self.w = v\n",
     "import enum\nclass C(enum.Enum):\n    A = 1\n    def __init__(self, v):\n        self.w = v * 2\n",
     "runs while the members are created"),
    ("decorator added", BASE, BASE.replace("def area(r):", "@staticmethod\ndef area(r):"), "decorators of function area changed"),
    ("decorated function body", "import functools\n@functools.wraps(len)\ndef f(x):\n    return x\n",
     "import functools\n@functools.wraps(len)\ndef f(x):\n    return x + 1\n", "decorated with @functools.wraps(len)"),
    ("cache decorator that is not functools'", "def cache(f):\n    return f\n@cache\ndef f(x):\n    return x\n",
     "def cache(f):\n    return f\n@cache\ndef f(x):\n    return x + 1\n", "decorated with @cache"),
    ("lru_cache with a non-literal argument", "import functools\nN = 8\n@functools.lru_cache(N)\ndef f(x):\n    return x\n",
     "import functools\nN = 8\n@functools.lru_cache(N)\ndef f(x):\n    return x + 1\n", "decorated with @functools.lru_cache(N)"),
    ("__hash__ body", "class P:\n    def __hash__(self):\n        return 1\n",
     "class P:\n    def __hash__(self):\n        return 2\n", "P.__hash__ changed: dicts and sets already hold hashes from the old code"),
    ("__eq__ body", "class P:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n",
     "class P:\n    def __eq__(self, o):\n        return False\n    __hash__ = object.__hash__\n",
     "P.__eq__ changed: dicts and sets already told their keys apart with the old code"),
    ("__subclasshook__ body", "import abc\nclass A(abc.ABC):\n    @classmethod\n    def __subclasshook__(cls, C):\n        return NotImplemented\n",
     "import abc\nclass A(abc.ABC):\n    @classmethod\n    def __subclasshook__(cls, C):\n        return True\n",
     "A.__subclasshook__ changed: isinstance() and issubclass() already cached answers"),
    ("property", "class P:\n    @property\n    def a(self):\n        return 1\n",
     "class P:\n    @property\n    def a(self):\n        return 2\n", "property P.a changed"),
    ("property with setter", "class P:\n    @property\n    def a(self):\n        return 1\n    @a.setter\n    def a(self, v):\n        pass\n",
     "class P:\n    @property\n    def a(self):\n        return 2\n    @a.setter\n    def a(self, v):\n        pass\n",
     "method P.a is defined more than once and changed"),
    ("deleted function", BASE, BASE.replace("def area(r):\n    return math.pi * r * r\n", ""), "function area removed"),
    ("renamed function", BASE, BASE.replace("def area(", "def disc_area("), "function area removed"),
    ("deleted method", BASE, BASE.replace("    @classmethod\n    def make(cls):\n        return cls(\"made\")\n", ""),
     "method Greeter.make removed"),
    ("class added", BASE, BASE + "class Extra:\n    pass\n", "class Extra added"),
    ("closure variables change", BASE, BASE.replace('return "hello " + self.name', 'return super().__repr__()'),
     "closure variables changed (none -> __class__)"),
    ("def became generator", BASE, BASE.replace("return math.pi * r * r", "yield math.pi * r * r"),
     "between a plain function and a generator"),
    ("def became async", BASE, BASE.replace("def area(", "async def area("), "between def and async def"),
    ("non-literal default", BASE, BASE.replace("k=2", "k=RATE"), "default of k in scale is not a literal (RATE)"),
    ("called at import", "def rate():\n    return 2\nRATE = rate()\n", "def rate():\n    return 3\nRATE = rate()\n",
     "function rate may run while the module is imported (used at line 3)"),
    ("called at import through a helper", "def a():\n    return b()\ndef b():\n    return 1\nX = a()\n",
     "def a():\n    return b()\ndef b():\n    return 2\nX = a()\n", "function b may run while the module is imported"),
    ("class instantiated at import", BASE + "DEFAULT = Greeter('x')\n",
     BASE.replace("self.name = name", "self.name = name * 2") + "DEFAULT = Greeter('x')\n",
     "method Greeter.__init__ may run while the module is imported"),
    ("registry called at import", "def h():\n    return 1\nREG = {'h': h}\nOUT = [f() for f in REG.values()]\n",
     "def h():\n    return 2\nREG = {'h': h}\nOUT = [f() for f in REG.values()]\n", "function h may run"),
    ("new def shadows a name used at import", "X = len([1])\n", "X = len([1])\ndef len(x):\n    return 0\n",
     "the name len is used by code that runs at import time"),
    ("non-type annotation", BASE, BASE.replace("def scale(x,", "def scale(x: make(),"),
     "annotation make() in scale is not a plain type expression"),
    ("special method added", BASE, BASE.replace("    @staticmethod\n", "    def __eq__(self, o):\n        return True\n\n    @staticmethod\n", 1),
     "special method Greeter.__eq__ added"),
    ("method added to dataclass", "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int = 0\n",
     "from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int = 0\n    def f(self):\n        return 1\n",
     "method P.f added to a class with a metaclass or class decorators"),
    ("__init_subclass__", "class B:\n    def __init_subclass__(cls):\n        cls.x = 1\n",
     "class B:\n    def __init_subclass__(cls):\n        cls.x = 2\n", "runs while classes are created"),
    ("definitions reordered around a statement", "def f():\n    return 1\nX = 1\n", "X = 1\ndef f():\n    return 1\n",
     "function f moved across other top-level statements"),
    ("new function defined twice", BASE, BASE + "def extra():\n    return 1\ndef extra():\n    return 2\n",
     "new function extra is defined more than once"),
    ("new method defined twice", BASE, BASE.replace("    @staticmethod\n", "    def w(self):\n        return 1\n\n"
                                                    "    def w(self):\n        return 2\n\n    @staticmethod\n", 1),
     "new method Greeter.w is defined more than once"),
    ("import added", BASE, BASE + "import functools\n", "import statements changed"),
    ("new decorated function", BASE, BASE + "@staticmethod\ndef extra():\n    return 1\n",
     "new function extra is decorated with @staticmethod"),
    ("new function with a non-literal default", BASE, BASE + "def extra(x=RATE):\n    return x\n",
     "default of x in extra is not a literal (RATE)"),
    ("module docstring read at import", '"""A."""\nDESC = __doc__\n', '"""B."""\nDESC = __doc__\n',
     "the module docstring is used by code that runs at import time"),
    ("metaclass of this module", "class M(type):\n    def __new__(mcs, n, b, ns):\n        return super().__new__(mcs, n, b, ns)\n"
     "class A(metaclass=M):\n    pass\n",
     "class M(type):\n    def __new__(mcs, n, b, ns):\n        ns['x'] = 1\n        return super().__new__(mcs, n, b, ns)\n"
     "class A(metaclass=M):\n    pass\n", "method M.__new__ may run while the module is imported"),
    ("class decorated by a function of the module", "def deco(c):\n    return c\n@deco\nclass A:\n    def f(self):\n        return 1\n",
     "def deco(c):\n    return c\n@deco\nclass A:\n    def f(self):\n        return 2\n", "method A.f may run while the module is imported"),
]


@pytest.mark.parametrize("case_id, v1, v2, reason", FRESH, ids=[c[0] for c in FRESH])
def test_fresh(load, case_id: str, v1: str, v2: str, reason: str) -> None:
    m = load(v1)
    decision = edit(m, v1, v2)
    assert decision.kind == "fresh", decision
    assert decision.plan == []
    assert decision.reasons[0].startswith(Path(m.__file__).name + ": ")
    assert any(reason in r for r in decision.reasons), decision.reasons
    assert reason in decision.describe() or len(decision.reasons) > 1
    with pytest.raises(ValueError):
        apply_plan(m, decision)


@pytest.mark.parametrize("replace", [
    lambda m: setattr(m, "area", lambda r: 0),  # another function
    lambda m: setattr(m, "area", __import__("functools").lru_cache(m.area)),  # wrapped: not a plain function
    lambda m: setattr(m, "area", m.scale),  # a function of the module, under another name
])
def test_live_function_replaced_at_run_time(load, replace) -> None:
    m = load(BASE)
    replace(m)
    decision = edit(m, BASE, BASE.replace("return math.pi * r * r", "return r"))
    assert decision.kind == "fresh"
    assert "function area in the live module is not the function defined in" in decision.reasons[0]


def test_main_guard_does_not_count_as_import_time(load) -> None:
    v1 = "def main():\n    return 1\nif __name__ == '__main__':\n    main()\n"
    m = load(v1)
    decision = edit(m, v1, v1.replace("return 1", "return 2"))
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert m.main() == 2


def test_function_stored_in_registry_is_patched(load) -> None:
    v1 = "def h():\n    return 1\nREG = {'h': h}\nALL = [h]\n"
    m = load(v1)
    decision = edit(m, v1, v1.replace("return 1", "return 2"))
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert m.REG["h"]() == 2 and m.ALL[0]() == 2


def test_syntax_error_is_an_error_with_line(load) -> None:
    m = load(BASE)
    v2 = BASE.replace("def scale(x, k=2, *, offset=0):", "def scale(x, k=2, *, offset=0)")
    decision = edit(m, BASE, v2)
    assert decision.kind == "error"
    line = v2.splitlines().index("def scale(x, k=2, *, offset=0)") + 1
    # As Python itself shows it.
    assert decision.reasons == [f"SyntaxError: expected ':' ({Path(m.__file__).name}, line {line})"]
    assert "not reloaded" in decision.describe()
    assert m.area(1) == pytest.approx(3.14159, rel=1e-3)  # old code keeps running


@pytest.mark.parametrize("v2, reason", [
    ("if True:\nx = 1\n", "IndentationError: expected an indented block after 'if' statement on line 1 ({}, line 2)"),
    ("x = (1,\n", "SyntaxError: '(' was never closed ({}, line 1)"),
    ("x = 1\0\n", "SyntaxError: source code string cannot contain null bytes ({})"),
])
def test_parse_errors_read_as_python_shows_them(load, v2: str, reason: str) -> None:
    m = load("x = 1\n")
    decision = edit(m, "x = 1\n", v2)
    assert decision.kind == "error"
    assert decision.reasons == [reason.format(Path(m.__file__).name)]


def test_undecodable_source_names_the_file_and_the_byte() -> None:
    from forkreload.reload import decode_source

    assert decode_source("x = 'é'\r\n".encode(), "/p/model.py") == ("x = 'é'\n", None)
    assert decode_source(b"x = 1\n# caf\xe9\n", "/p/model.py") == (
        None, "model.py: cannot be decoded as UTF-8: byte 0xe9 at line 2, column 6 (invalid continuation byte)")
    assert decode_source(b"# coding: nope\n", "/p/pkg/__init__.py")[1] == "pkg/__init__.py: cannot be decoded: unknown encoding: nope"


def test_rollback_restores_everything(load) -> None:
    m = load(BASE)
    area, greet = m.area, m.Greeter.greet
    old_code = area.__code__
    v2 = (BASE.replace("math.pi * r * r", "r * r")
              .replace('return "hello " + self.name', 'return "hi"')
              + "\ndef cube(x):\n    return x ** 3\n")
    decision = edit(m, BASE, v2)
    assert decision.kind == "inplace"
    assert [c.qualname for c in decision.plan] == ["area", "Greeter.greet", "cube"]
    m.Greeter.greet = "not a function any more"  # the second change's target is gone
    with pytest.raises(PatchError, match=rf"could not patch {m.__name__}\.Greeter\.greet: .*replaced"):
        apply_plan(m, decision)
    assert area.__code__ is old_code and area(1) == pytest.approx(3.14159, rel=1e-3)
    assert m.area is area and not hasattr(m, "cube")
    assert greet(m.Greeter("x")) == "hello x"


def test_rollback_removes_added_functions(load) -> None:
    m = load(BASE)
    v2 = BASE + "\ndef cube(x):\n    return x ** 3\n\ndef square(x):\n    return x * x\n"
    decision = edit(m, BASE, v2)
    assert [c.action for c in decision.plan] == ["add", "add"]
    m.square = "set meanwhile"
    with pytest.raises(PatchError, match="could not add"):
        apply_plan(m, decision)
    assert not hasattr(m, "cube") and m.square == "set meanwhile"


def test_change_records_what_apply_does(load) -> None:
    m = load(BASE)
    decision = edit(m, BASE, BASE.replace("math.pi * r * r", "r * r"))
    (change,) = decision.plan
    assert isinstance(change, Change)
    assert (change.action, change.qualname, change.detail, change.path) == ("patch", "area", "body", ("area",))
    assert change.target is m.area and set(change.attrs) == {"__code__"}
    assert decision.describe() == f"{m.__name__}: in place: patched area"


def test_class_attributes_set_by_the_compiler_follow(load) -> None:
    """3.13+: __static_attributes__ (from self.x = ... in methods) and __firstlineno__ match a fresh import."""
    v1 = "class P:\n    def set(self):\n        self.a = 1\n"
    m = load(v1)
    if not hasattr(m.P, "__static_attributes__"):
        pytest.skip("the compiler sets these class attributes since Python 3.13")
    v2 = v1.replace("self.a = 1", "self.a = 1\n        self.b = 2")
    decision = edit(m, v1, v2)
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert m.P.__static_attributes__ == ("a", "b")
    v3 = "\n\n" + v2
    decision = edit(m, v2, v3)
    assert decision.kind == "noop", decision.reasons
    apply_plan(m, decision)
    assert m.P.__firstlineno__ == 3


def test_defs_swapped_between_statements_are_patched(load) -> None:
    v1 = "X = 1\ndef a():\n    return 1\ndef b():\n    return 2\n"
    m = load(v1)
    v2 = "X = 1\ndef b():\n    return 2\ndef a():\n    return 10\n"
    decision = edit(m, v1, v2)
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert (m.a(), m.b()) == (10, 2)


def test_successive_edits(load) -> None:
    m = load(BASE)
    area = m.area
    v2 = BASE.replace("math.pi * r * r", "r * r")
    apply_plan(m, edit(m, BASE, v2))
    v3 = "# header\n" + v2.replace("r * r", "r * r * r")
    decision = edit(m, v2, v3)
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    assert area(2) == 8
    assert area.__code__.co_firstlineno == v3.splitlines().index("def area(r):") + 1


# --- in place only where a fresh import would agree (issue 9) ---------------


def test_hash_docstring_only_stays_in_place(load) -> None:
    v1 = "class P:\n    def __hash__(self):\n        return 1\n"
    m = load(v1)
    decision = edit(m, v1, v1.replace("def __hash__(self):\n", 'def __hash__(self):\n        """Doc."""\n'))
    assert decision.kind == "noop", decision.reasons


def test_hash_edit_goes_fresh_and_names_the_method(load) -> None:
    v1 = "class Point:\n    def __init__(self, x):\n        self.x = x\n    def __hash__(self):\n        return hash(self.x)\n"
    m = load(v1)
    decision = edit(m, v1, v1.replace("hash(self.x)", "hash(self.x) + 1"))
    assert decision.kind == "fresh"
    assert decision.reasons == [
        f"{m.__name__}.py: {m.__name__}.Point.__hash__ changed: dicts and sets already hold hashes from the old code"
    ]


CACHED = src('''
    import functools
    from functools import lru_cache

    calls = []

    @functools.lru_cache(maxsize=None)
    def square(x):
        """Square."""
        calls.append(x)
        return x * x

    @lru_cache
    def cube(x):
        return x ** 3

    class Grid:
        @functools.cache
        def cell(self, i):
            return i
    ''')


def test_lru_cache_body_is_patched_and_its_cache_cleared(load) -> None:
    m = load(CACHED)
    square, cube, cell = m.square, m.cube, m.Grid.cell
    grid = m.Grid()
    assert (square(3), cube(2), grid.cell(4)) == (9, 8, 4)
    v2 = CACHED.replace("return x * x", "return x * x + 1").replace("return x ** 3", "return x ** 3 + 1").replace(
        "return i", "return -i")
    decision = edit(m, CACHED, v2)
    assert decision.kind == "inplace", decision.reasons
    assert [(c.action, c.qualname) for c in decision.plan if c.detail != "lines"] == [
        ("patch", "square"), ("clear", "square"), ("patch", "cube"), ("clear", "cube"),
        ("patch", "Grid.cell"), ("clear", "Grid.cell"),
    ]
    apply_plan(m, decision)
    # A fresh import would compute again with the new code: no stale cached answers.
    assert (square(3), cube(2), grid.cell(4)) == (10, 9, -4)
    assert m.square is square and m.cube is cube and m.Grid.cell is cell
    assert square.cache_info().currsize == 1 and m.calls == [3, 3]
    assert decision.describe() == f"{m.__name__}: in place: patched square, cube, Grid.cell"


def test_lru_cache_signature_and_docstring_reach_the_wrapper(load) -> None:
    m = load(CACHED)
    v2 = CACHED.replace('def square(x):\n    """Square."""', 'def square(x: int, k=2) -> int:\n    """Square, k times."""')
    decision = edit(m, CACHED, v2)
    assert decision.kind == "inplace", decision.reasons
    apply_plan(m, decision)
    # What functools.update_wrapper would have copied at a fresh import.
    assert m.square.__doc__ == "Square, k times."
    assert m.square.__annotations__ == {"x": int, "return": int} == m.square.__wrapped__.__annotations__
    assert m.square.__wrapped__.__defaults__ == (2,)


def test_lru_cache_docstring_only_keeps_the_cache(load) -> None:
    m = load(CACHED)
    m.square(5)
    decision = edit(m, CACHED, CACHED.replace('"""Square."""', '"""Squared."""'))
    assert decision.kind == "noop", decision.reasons
    apply_plan(m, decision)
    assert m.square.__doc__ == "Squared." and m.square.cache_info().currsize == 1


def test_lru_cache_replaced_at_run_time_goes_fresh(load) -> None:
    m = load(CACHED)
    m.square = __import__("functools").lru_cache(lambda x: x)
    decision = edit(m, CACHED, CACHED.replace("return x * x", "return x * x + 1"))
    assert decision.kind == "fresh"
    assert "function square in the live module is not the function defined in" in decision.reasons[0]


def test_cache_cleared_only_after_every_patch_applied(load) -> None:
    m = load(CACHED)
    m.square(2)
    v2 = CACHED.replace("return x * x", "return x * x + 1").replace("return x ** 3", "return 0")
    decision = edit(m, CACHED, v2)
    m.cube = "replaced meanwhile"
    with pytest.raises(PatchError):
        apply_plan(m, decision)
    assert m.square(2) == 4 and m.square.cache_info().currsize == 1  # rolled back, cache untouched


def test_a_default_filled_since_import_is_noted(load) -> None:
    v1 = "def log(x, seen=[], *, tags={}):\n    seen.append(x)\n    return seen\n\ndef other(k=[]):\n    return k\n"
    m = load(v1)
    m.log(1), m.log(2), m.other()
    decision = edit(m, v1, v1.replace("return seen", "return list(seen)"))
    assert decision.kind == "inplace"
    assert decision.notes == [f"{m.__name__}.log keeps its default seen=[1, 2], filled since import "
                              "(a fresh import gives [])"]
    # A changed default is evaluated again: nothing kept, nothing to say.
    decision = edit(m, v1, v1.replace("seen=[]", "seen=()").replace("seen.append(x)", "seen += (x,)"))
    assert decision.kind == "inplace" and decision.notes == []
