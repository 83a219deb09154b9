"""Real notebooks run end to end by nbclient on the installed `forkreload`
kernelspec: a cell rewrites a user module, later cells show the new code
with the old values, and a broken edit keeps the old code running."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook


def execute(project_root: Path, cells: list[str]) -> Any:
    nb = new_notebook(cells=[new_code_cell(textwrap.dedent(c).strip()) for c in cells])
    nb.metadata["kernelspec"] = {"name": "forkreload", "display_name": "Python 3 (forkreload)", "language": "python"}
    client = NotebookClient(nb, kernel_name="forkreload", timeout=60, resources={"metadata": {"path": str(project_root)}})
    client.execute()
    nbformat.validate(nb)
    return nb


def text(cell: Any, name: str = "stdout") -> str:
    return "".join(o["text"] for o in cell.outputs if o["output_type"] == "stream" and o["name"] == name)


def rewrite_cell(filename: str, source: str) -> str:
    """A notebook cell that rewrites one of the user's files with plain Python."""
    return f"with open({filename!r}, 'w') as f:\n    f.write({textwrap.dedent(source)!r})"


SHAPES_V1 = """
class Greeter:
    def __init__(self, name):
        self.name = name

    def greet(self):
        return f"hello {self.name}"
"""

SHAPES_V2 = """
from dataclasses import dataclass

PUNCT = "!"

@dataclass
class Greeter:
    name: str

    def greet(self):
        return f"HELLO {self.name.upper()}{PUNCT}"
"""


def test_notebook_edit_in_a_cell_new_code_old_values(project, kernelspec_prefix) -> None:
    project.write("shapes.py", SHAPES_V1)
    nb = execute(
        project.root,
        [
            "import os, shapes\ng = shapes.Greeter('ann')\ntotal = sum(i * i for i in range(100))\npid = os.getpid()\nprint(g.greet(), total)",
            rewrite_cell("shapes.py", SHAPES_V2),
            "print(g.greet(), total, type(g) is shapes.Greeter, os.getpid() != pid)",
            "import pandas as pd\npd.DataFrame({'who': [g.name], 'total': [total]})",
        ],
    )
    c1, c2, c3, c4 = nb.cells
    assert [c.execution_count for c in nb.cells] == [1, 2, 3, 4]
    assert text(c1) == "hello ann 328350\n"
    assert c2.outputs == []  # the edit itself shows nothing: the swap happens before the next cell
    out = text(c3)
    notice, _, rest = out.partition("\n")
    assert notice.startswith("forkreload: fresh worker") and "shapes.py" in notice and "migrated" in notice, out
    assert rest == "HELLO ANN! 328350 True True\n"
    assert text(c3, "stderr") == ""
    [result] = c4.outputs
    assert result["output_type"] == "execute_result" and result["execution_count"] == 4
    assert "<table" in result["data"]["text/html"] and "<td>ann</td>" in result["data"]["text/html"]
    assert "forkreload" not in text(c4)
    # the executed notebook's file on disk, as a user would find it
    assert (project.root / "shapes.py").read_text() == textwrap.dedent(SHAPES_V2)


STATS_V1 = """
FACTOR = 2

def scaled(values):
    return [v * FACTOR for v in values]
"""

STATS_BROKEN = """
FACTOR = 3

def scaled(values)
    return [v * FACTOR for v in values]
"""

STATS_V3 = """
FACTOR = 3

def scaled(values):
    return [v * FACTOR for v in values]
"""


def test_notebook_syntax_error_keeps_old_code_until_fixed(project, kernelspec_prefix) -> None:
    project.write("stats.py", STATS_V1)
    nb = execute(
        project.root,
        [
            "import stats\ndata = [1, 2, 3]\nkept = {'runs': 1}\nprint(stats.scaled(data))",
            rewrite_cell("stats.py", STATS_BROKEN),
            "kept['runs'] += 1\nprint(stats.scaled(data), kept)",
            "print(stats.FACTOR, kept)",
            rewrite_cell("stats.py", STATS_V3),
            "kept['runs'] += 1\nprint(stats.scaled(data), kept)",
        ],
    )
    c1, _, c3, c4, _, c6 = nb.cells
    assert text(c1) == "[2, 4, 6]\n"
    # the broken edit: the error in a short notice on stderr, the old code runs
    err = text(c3, "stderr")
    assert err.startswith("forkreload: kept the old code"), err
    assert "stats" in err and ("SyntaxError" in err or "does not parse" in err) and "line 4" in err, err
    assert len(err.splitlines()) <= 6, err
    assert text(c3) == "[2, 4, 6] {'runs': 2}\n"
    # the same broken file is not retried, but each cell says it runs the old code
    assert text(c4, "stderr").startswith("forkreload: still running the old code of stats.py (SyntaxError: expected ':' (stats.py, line 4))")
    assert len(text(c4, "stderr").splitlines()) == 1 and text(c4) == "2 {'runs': 2}\n"
    # fixed: the new code with the values kept
    out = text(c6)
    assert out.startswith("forkreload: fresh worker"), out
    assert out.endswith("[3, 6, 9] {'runs': 3}\n"), out
    assert text(c6, "stderr") == ""
    assert all(o["output_type"] != "error" for c in nb.cells for o in c.outputs)
