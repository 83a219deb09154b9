"""Differential testing of forkreload against a fresh Python process.

The promise under test: after an edit, the session behaves as a fresh Python
process running the new code with the values the user computed, or the
cell's notice names what was kept, lost or reset.

An `Example` is a chain of steps: files written, then a cell run. Step 0 is
the state before any edit; each later step is an edit (its files written,
`None` deletes a file) followed by the cell that sees it.

It runs two ways:

(A) in a forkreload `Session`: every step's files are written into the
    session's project directory and its cell executed;
(B) the reference, in plain `python` processes, one per step (many
    independent examples share one process when their module names are
    distinct): the step-k process has cwd = the reference's project
    directory (same basenames as the session's) on `sys.path[0]`, imports
    the user modules of step k-1 in the order they were first asked for,
    unpickles each variable of step k-1 on its own (cloudpickle: modules and
    module-defined objects by reference, so they rebuild against the new
    code; cell-defined functions and classes by value), runs cell k, then
    pickles each user variable on its own for step k+1. It also records

    - what it could not carry (a variable that failed to pickle or unpickle,
      with the exception),
    - which user modules fail to import with the new code,
    - which module globals the cells changed (their state differs from a
      fresh import of the same files, in a forked child taken before any
      user code ran): a fresh process resets them,
    - and the next step's cell run against the *old* code (the same process,
      after dumping), so that "silently stale" can be told apart.

This file is both the helper the tests import and (run as a script) the
reference runner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()

# The reference processes and the session get the same hash seed, so that a
# set's order printed by a cell is the same on both sides.
DETERMINISTIC_ENV = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


# ---------------------------------------------------------------------------
# the reference runner (executed in a fresh interpreter: `python differential.py job.json`)
# ---------------------------------------------------------------------------


def _runner_main(job_path: str) -> None:  # pragma: no cover - runs in a subprocess
    import ast
    import builtins
    import contextlib
    import hashlib
    import importlib
    import importlib.machinery
    import importlib.util
    import io

    import cloudpickle

    job = json.loads(Path(job_path).read_text())
    root = os.path.realpath(job["cwd"])
    os.chdir(root)
    sys.path[0] = root  # in place of this script's directory, as a session's project
    sys.dont_write_bytecode = True

    # Which user modules were asked for, in order, and the source each executed.
    order: list[str] = []
    sources: dict[str, str] = {}

    class Recorder:
        @staticmethod
        def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.origin and os.path.realpath(spec.origin).startswith(root + os.sep) and name not in sources:
                order.append(name)
                try:
                    sources[name] = Path(spec.origin).read_text()
                except OSError:
                    sources[name] = ""
            return spec

    # After the builtin and frozen importers, like the path finder it mirrors.
    idx = next((i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder), len(sys.meta_path))
    sys.meta_path.insert(idx, Recorder)

    def fingerprint(mod: Any) -> dict[str, str]:
        fp = {}
        for k, v in list(vars(mod).items()):
            if k.startswith("__") and k.endswith("__"):
                continue
            try:
                # No memo: bytes that do not depend on which equal strings
                # happen to be the same object in this process.
                buf = io.BytesIO()
                p = cloudpickle.CloudPickler(buf, protocol=5)
                p.fast = True
                p.dump(v)
                fp[k] = hashlib.sha1(buf.getvalue()).hexdigest()
            except Exception:
                fp[k] = "?"  # cannot tell: never reported as changed
        return fp

    # A child forked before any user code ran: it imports the same files
    # fresh, later, and tells each module's globals (a fresh import's state).
    r_job, w_job = os.pipe()
    r_res, w_res = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(w_job)
            os.close(r_res)
            with os.fdopen(r_job) as f:
                wanted = json.loads(f.read())
            out: dict[str, Any] = {}
            for ex_id, names in wanted.items():
                fps = {}
                for name, src in names:
                    try:
                        if Path(name.replace(".", "/") + ".py").read_text() != src:
                            continue  # the file changed since: cannot compare
                    except OSError:
                        continue
                    try:
                        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                            mod = importlib.import_module(name)
                        fps[name] = fingerprint(mod)
                    except BaseException:
                        pass
                out[ex_id] = fps
            with os.fdopen(w_res, "w") as f:
                f.write(json.dumps(out))
        finally:
            os._exit(0)  # never return into the parent's code
    os.close(r_job)
    os.close(w_res)

    class Pickler(cloudpickle.CloudPickler):
        """cloudpickle, except that an open file is not carried.

        (cloudpickle would turn it into a StringIO snapshot of its contents: not
        the open file a fresh process could have, and README names open files
        among what cannot be kept.)
        """

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, io.IOBase):
                raise TypeError(f"cannot pickle an open file ({type(obj).__name__})")
            return super().reducer_override(obj)

    def dumps(value: Any) -> bytes:
        buf = io.BytesIO()
        Pickler(buf, protocol=5).dump(value)
        return buf.getvalue()

    def culprit(exc: BaseException, name: str) -> str:
        """The user module whose own code failed (b, when importing a imports b)."""
        files = []
        tb = exc.__traceback__
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            files.append(exc.filename)  # innermost: the file that does not parse
        for f in reversed([f for f in files if f]):
            f = os.path.realpath(f)
            if f.startswith(root + os.sep) and f.endswith(".py"):
                rel = os.path.relpath(f, root)[:-3].replace(os.sep, ".")
                return rel.removesuffix(".__init__")
        return name

    def run_cell(code: str, ns: dict) -> dict[str, Any]:
        buf = io.StringIO()
        res: dict[str, Any] = {"stdout": "", "result": None, "error": None}
        try:
            tree = ast.parse(code)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            with contextlib.redirect_stdout(buf):
                exec(compile(tree, "<cell>", "exec"), ns)
                if last is not None:
                    value = eval(compile(last, "<cell>", "eval"), ns)
                    if value is not None:
                        res["result"] = repr(value)
        except BaseException as exc:  # noqa: BLE001 - a cell's error is an output
            res["error"] = [type(exc).__name__, str(exc)]
        res["stdout"] = buf.getvalue()
        return res

    def user_names(ns: dict) -> list[str]:
        return [k for k in ns if not (k.startswith("__") and k.endswith("__"))]

    results: dict[str, Any] = {}
    kept_ns: dict[str, dict] = {}
    for ex in job["examples"]:
        ex_id = ex["id"]
        ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        rep: dict[str, Any] = {"import_errors": {}, "gone": [], "load_lost": {}, "dump_lost": {}}

        if ex.get("load"):
            data = json.loads(Path(ex["load"]).read_text())
            for name in data["modules"]:
                if name in sys.modules:
                    continue
                if importlib.util.find_spec(name) is None:
                    rep["gone"].append(name)
                    continue
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        importlib.import_module(name)
                except BaseException as exc:  # noqa: BLE001
                    rep["import_errors"][culprit(exc, name)] = f"{type(exc).__name__}: {exc}"
            for name, blob in data["values"].items():
                try:
                    ns[name] = cloudpickle.loads(bytes.fromhex(blob))
                except BaseException as exc:  # noqa: BLE001
                    rep["load_lost"][name] = f"{type(exc).__name__}: {exc}"
        rep["out"] = run_cell(ex["cell"], ns)
        values = {}
        for name in user_names(ns):
            try:
                values[name] = dumps(ns[name]).hex()
            except BaseException as exc:  # noqa: BLE001
                rep["dump_lost"][name] = f"{type(exc).__name__}: {exc}"
        mods = [m for m in order if m.startswith(tuple(ex.get("prefixes") or [""]))]
        if ex.get("load"):
            prev = json.loads(Path(ex["load"]).read_text())["modules"]
            mods = prev + [m for m in mods if m not in prev]
        mods = [m for m in mods if m in sys.modules]
        if rep["import_errors"]:
            # The new code cannot be imported: what carries on to the next
            # edit is the state before this one (the session keeps the old
            # worker), plus the variables this cell made.
            prev_data = json.loads(Path(ex["load"]).read_text())
            values = {**values, **prev_data["values"]}
            mods = prev_data["modules"]
            rep["dump_lost"] = {k: v for k, v in rep["dump_lost"].items() if k not in values}
            rep["broken"] = True
        Path(ex["dump"]).write_text(json.dumps({"modules": mods, "values": values}))
        rep["modules"] = mods
        rep["after_fp"] = {m: fingerprint(sys.modules[m]) for m in mods if m in sys.modules}
        rep["_sources"] = [] if rep.get("broken") else [[m, sources.get(m, "")] for m in mods]
        kept_ns[ex_id] = ns
        results[ex_id] = rep
    # The next cell against the old code, after everything was dumped.
    for ex in job["examples"]:
        if ex.get("next_cell") is not None and not results[ex["id"]].get("broken"):
            results[ex["id"]]["old_next"] = run_cell(ex["next_cell"], kept_ns[ex["id"]])
    # Module state the cells changed, against a fresh import of the same files.
    with os.fdopen(w_job, "w") as f:
        f.write(json.dumps({k: v.pop("_sources") for k, v in results.items()}))
    with os.fdopen(r_res) as f:
        fresh = json.loads(f.read() or "{}")
    os.waitpid(child, 0)
    for ex_id, rep in results.items():
        reset = []
        after = rep.pop("after_fp")
        for mod, fresh_fp in fresh.get(ex_id, {}).items():
            now = after.get(mod, {})
            for k in sorted(set(now) | set(fresh_fp)):
                a, b = now.get(k), fresh_fp.get(k)
                if a != b and "?" not in (a, b):
                    reset.append(f"{mod}.{k}")
        rep["reset"] = reset
    sys.stdout.flush()
    os.write(1, ("\n@@RESULT@@" + json.dumps(results)).encode())


# ---------------------------------------------------------------------------
# the test side
# ---------------------------------------------------------------------------


@dataclass
class Example:
    """One differential case: files and a cell per step (step 0 = before any edit)."""

    id: str
    steps: list[tuple[dict[str, str | None], str]]
    prefixes: list[str] = field(default_factory=list)  # module-name prefixes (batching)
    expect: str | None = None  # optional: what the last cell must print (ground truth)
    kinds: list[str] = field(default_factory=list)  # generated: the kinds of edits applied

    def __repr__(self) -> str:
        return f"Example({self.id!r}, {len(self.steps) - 1} edits{': ' + ', '.join(self.kinds) if self.kinds else ''})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # hypothesis' and IPython's printers
        p.text(repr(self))


def write_files(root: Path, files: dict[str, str | None]) -> None:
    for name, src in files.items():
        path = root / name
        if src is None:
            path.unlink(missing_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src) if src.startswith("\n") else src)


def run_reference(root: Path, examples: list[Example], python: str = sys.executable, timeout: float = 120) -> dict[str, list[dict]]:
    """Each example's reference reports, one per step (see the module doc)."""
    root.mkdir(parents=True, exist_ok=True)
    work = root.parent / (root.name + "-refjobs")
    work.mkdir(exist_ok=True)
    reports: dict[str, list[dict]] = {ex.id: [] for ex in examples}
    nsteps = max(len(ex.steps) for ex in examples)
    env = {**os.environ, **DETERMINISTIC_ENV}
    for k in range(nsteps):
        jobs = []
        for ex in examples:
            if k >= len(ex.steps):
                continue
            write_files(root, ex.steps[k][0])
            jobs.append(
                {
                    "id": ex.id,
                    "cell": ex.steps[k][1],
                    "load": str(work / f"{ex.id}-{k - 1}.json") if k else None,
                    "dump": str(work / f"{ex.id}-{k}.json"),
                    "next_cell": ex.steps[k + 1][1] if k + 1 < len(ex.steps) else None,
                    "prefixes": ex.prefixes,
                }
            )
        job_file = work / f"job-{k}.json"
        job_file.write_text(json.dumps({"cwd": str(root), "examples": jobs}))
        p = subprocess.run([python, str(HERE), str(job_file)], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        if "@@RESULT@@" not in p.stdout:
            raise RuntimeError(f"reference runner failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        res = json.loads(p.stdout.rsplit("@@RESULT@@", 1)[1])
        for ex_id, rep in res.items():
            reports[ex_id].append(rep)
    return reports


def session_out(r: Any) -> dict[str, Any]:
    return {"stdout": r.stdout, "result": r.result, "error": list(r.error) if r.error else None}


def run_in_session(session: Any, root: Path, ex: Example, timeout: float = 120) -> list[Any]:
    results = []
    for files, cell in ex.steps:
        write_files(root, files)
        results.append(session.execute(cell, timeout=timeout))
    return results


def _named(name: str, notice: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", notice) is not None


def _show(out: dict[str, Any]) -> str:
    parts = [repr(out["stdout"])]
    if out.get("result") is not None:
        parts.append(f"result {out['result']}")
    if out.get("error"):
        parts.append(f"error {out['error'][0]}: {out['error'][1]}")
    return ", ".join(parts)


def _lines_about(ses: dict[str, Any], want: dict[str, Any], names: list[str]) -> bool:
    """Whether the two outputs differ only in stdout lines that mention one of `names`."""
    if {k: v for k, v in ses.items() if k != "stdout"} != {k: v for k, v in want.items() if k != "stdout"}:
        return False
    a, b = (ses["stdout"] or "").splitlines(), (want["stdout"] or "").splitlines()
    if len(a) != len(b):
        return False
    return all(x == y or any(n in x for n in names) for x, y in zip(a, b, strict=True))


def shadow_warned(r: Any) -> bool:
    """Whether a cell's notice said that a project file shadows a module."""
    return re.search(r"\S+ in your project shadows .* module", r.notice or "") is not None


def judge(ex: Example, results: list[Any], refs: list[dict]) -> list[str]:
    """Every unexplained disagreement between the session and the reference.

    A step k >= 1 (an edit) agrees when the session printed what the fresh
    process printed. Otherwise the disagreement is explained only by the
    notice: a variable the fresh process could not carry, or a module global
    whose cell-made state a fresh process resets, named in `r.notice` (as
    lost, kept or reset); a variable kept by an in-place patch (which keeps
    every variable, as README says) that the fresh process could not carry
    is explained by the patch itself. Independently of the output:

    - if the new code cannot be imported by a fresh process, the old code
      must keep running (the session prints what the old code prints) and
      the notice must name the module that failed;
    - the session must not lose a variable that the fresh process carries;
    - a fresh worker must name the cell-made module state it resets.
    """
    problems: list[str] = []
    for k, (r, ref) in enumerate(zip(results, refs, strict=True)):
        ses = session_out(r)
        want = ref["out"]
        where = f"step {k}"
        notice = r.notice or ""
        # A project file named like a module the worker already holds
        # (csv.py): the cells get that module, a fresh process the file. The
        # session cannot agree; it must say so, and that explains the step.
        shadowing = re.search(r"\S+ in your project shadows .* module", notice) is not None
        if k == 0:
            if ses != want and not shadowing:
                problems.append(f"{where} (before any edit): session {_show(ses)} != fresh process {_show(want)}")
            continue
        prev = refs[k - 1]
        rl = r.reload
        mode = rl.mode if rl is not None else None
        old = prev.get("old_next")
        if ref["import_errors"]:
            # One failure named is enough (the first one stops the import).
            failing = ", ".join(f"{m} ({e})" for m, e in ref["import_errors"].items())
            if not (any(_named(m, notice) for m in ref["import_errors"]) and re.search(r"fail|does not parse|[Ee]rror", notice)):
                problems.append(f"{where}: a fresh process fails to import {failing}, the notice does not say so: {notice!r}")
            if rl is not None and rl.ok:
                problems.append(f"{where}: {', '.join(ref['import_errors'])} cannot be imported, yet the reload says ok ({mode})")
            # The old worker keeps module state the cells set, which the
            # reference's old-code run (a fresh process) lacks: explained if
            # an earlier notice named it as kept.
            earlier = [i for j in range(k) for i in refs[j]["reset"]]
            kept_named = any(_named(i, r2.notice or "") and "kept" in (r2.notice or "") for i in earlier for r2 in results[1:k])
            if old is not None and ses != old and not kept_named:
                problems.append(f"{where}: the old code should keep running: session {_show(ses)} != old code {_show(old)}")
            continue
        lost_ref = {**prev["dump_lost"], **ref["load_lost"]}
        reset_ref = list(prev["reset"])
        lost_ses = dict(rl.lost) if rl is not None else {}
        if rl is not None and not rl.ok:
            problems.append(f"{where}: forkreload did not apply the edit (a fresh process runs it fine): {notice.strip()!r}")
        for name in lost_ses:
            if name not in lost_ref:
                problems.append(f"{where}: lost {name} ({lost_ses[name]}) that a fresh process carries")
            elif not _named(name, notice):
                problems.append(f"{where}: lost {name} without naming it in the notice")
        if mode == "fresh":
            for item in reset_ref:
                if not (_named(item, notice) or _named(item.rsplit(".", 1)[1], notice)):
                    problems.append(f"{where}: the fresh worker reset {item} (changed by the cells) without naming it: {notice.strip()!r}")
        if ses != want:
            explained = [n for n in lost_ref if _named(n, notice)]
            explained += [i for i in reset_ref if _named(i, notice) or _named(i.rsplit(".", 1)[1], notice)]
            # Module state a cell set in any earlier step, which every fresh
            # reference process lacks, and the session kept and names as kept.
            # Only where each line that differs is about one of them.
            earlier_state = [i for i in {i for j in range(k) for i in refs[j]["reset"]} if _named(i, notice) and "kept" in notice]
            if earlier_state and _lines_about(ses, want, [i.rsplit(".", 1)[1] for i in earlier_state]):
                explained += earlier_state
            if mode == "inplace":
                explained += [n for n in lost_ref if n not in lost_ses]
            if shadowing or any(shadow_warned(r2) for r2 in results[:k]):
                explained.append("a shadowed module, named in an earlier notice")
            if not explained:
                stale = " (silently stale: that is the old code's output)" if old is not None and ses == old and old != want else ""
                problems.append(
                    f"{where}: session {_show(ses)} != fresh process {_show(want)}{stale}; "
                    f"reload {mode}, notice {notice.strip()!r}"
                    + (f"; fresh process could not carry {sorted(lost_ref)}" if lost_ref else "")
                    + (f"; cells changed {reset_ref}" if reset_ref else "")
                )
    if ex.expect is not None and results and results[-1].stdout != ex.expect:
        problems.append(f"last cell printed {results[-1].stdout!r}, expected {ex.expect!r}")
    return problems


if __name__ == "__main__":  # pragma: no cover
    _runner_main(sys.argv[1])
