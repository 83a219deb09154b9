"""Benchmark: what checkpoints cost a session, and what undo and a crash cost.

Measured through `forkreload.Session` (a real jupyter_client), side by side
in one run, at two sizes of session data (a float64 array):

- the added latency of a cell with checkpoints on against off (two
  sessions, their cells in turn): a cell that
  writes little (rebinds a small variable), sent right after the previous
  cell's reply, so the previous cell's checkpoint fork is on its way; and a
  cell that rewrites 10% of the data (copy-on-write faults: reported per
  100 MB written);
- taking a checkpoint: the fork as the worker paid it, and the checkpoint's
  unique memory after the next cell rewrote 10% of the data;
- `%forkreload undo` -> that cell's reply (the restore included), and a
  crash (`os._exit`) -> the next cell's reply with the restored values;
- against ipykernel: its answer to a crash is a restart and re-running the
  cells that built the data, timed to the same cell's reply.

- with `--kishu PYTHON` (a Python where `pip install kishu` worked, with
  ipykernel and numpy), Kishu's figures in the same run: its cost for the
  cell rewriting 10% of the data, and its checkout (undo) -> the next reply.

    python bench/checkpoint.py [--sizes 100M,2G] [--runs 15] [--kishu PYTHON]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median_ms, row  # noqa: E402

_SCRATCH = Path(tempfile.mkdtemp(prefix="forkreload-bench-checkpoint-"))
os.environ["FORKRELOAD_CACHE_DIR"] = str(_SCRATCH / "cache")
os.environ.setdefault("IPYTHONDIR", str(_SCRATCH / "ipython"))

from forkreload import Session  # noqa: E402
from jupyter_client import KernelManager  # noqa: E402

MiB = 1 << 20
PAUSE = 0.2  # a user's think time between two cells (seconds)


def _size(text: str) -> int:
    units = {"M": MiB, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _build(nbytes: int) -> str:
    # Random data, as a session's computed values are: no zero pages.
    return f"import numpy as np\na = np.random.default_rng(0).random({nbytes // 8})\nx = 0"


def _timed(s: Session, code: str) -> float:
    t0 = time.perf_counter()
    r = s.execute(code, timeout=600)
    dt = time.perf_counter() - t0
    if r.status != "ok":
        raise RuntimeError(f"{code!r} failed: {r.error}")
    return dt


def _wait_checkpoint(s: Session, cell: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cp in s.status()["checkpoints"]:
            if cp["cell"] == cell:
                return cp
        time.sleep(0.05)
    raise RuntimeError(f"no checkpoint after cell {cell}")


def cell_latency(project: Path, nbytes: int, runs: int) -> dict[str, dict[str, list[float]]]:
    """Round trips of small cells (after a user's pause, and back to back)
    and of cells that rewrite 10% of the data (after a pause), in a session
    with checkpoints on and one with them off, cell for cell in turn: the
    machine's drift (a shared, noisy one) then weighs on both alike."""
    modes = ("auto", "off")
    out: dict[str, dict[str, list[float]]] = {m: {"paused": [], "b2b": [], "rewrite": []} for m in modes}
    sessions = {m: Session(cwd=project, preload=["numpy"], checkpoints=m) for m in modes}
    try:
        for s in sessions.values():
            _timed(s, _build(nbytes))
        tenth = nbytes // 8 // 10
        for i in range(runs):
            for m, s in sessions.items():
                time.sleep(PAUSE)
                out[m]["paused"].append(_timed(s, f"x = {i}"))
        for i in range(runs):
            for m, s in sessions.items():
                out[m]["b2b"].append(_timed(s, f"x = {i}"))
        for i in range(runs):
            for m, s in sessions.items():
                time.sleep(PAUSE)
                out[m]["rewrite"].append(_timed(s, f"a[{i % 10} * {tenth}:{i % 10 + 1} * {tenth}] += 1"))
    finally:
        for s in sessions.values():
            s.close()
    return out


def checkpoint_cost(project: Path, nbytes: int, runs: int) -> dict[str, float]:
    with Session(cwd=project, preload=["numpy"], checkpoints="auto") as s:
        _timed(s, _build(nbytes))
        forks = []
        for i in range(runs):
            _timed(s, f"x = {i}")
            time.sleep(0.3)
            forks.append(s.status()["last_checkpoint"]["seconds"])
        n = s.execute("x = -1").execution_count
        _wait_checkpoint(s, n)
        tenth = nbytes // 8 // 10
        _timed(s, f"a[:{tenth}] *= 2")
        time.sleep(0.5)
        held = s.status()["checkpoint_memory"]  # measured now
        # undo -> the reply of the undo cell itself (the restore is done before it runs)
        undo = []
        for i in range(max(runs // 3, 3)):
            m = s.execute(f"x = {1000 + i}").execution_count
            _wait_checkpoint(s, m)
            undo.append(_timed(s, "%forkreload undo"))
        # a crash -> the next cell's reply, with the restored values
        crash = []
        for i in range(max(runs // 3, 3)):
            m = s.execute(f"x = {2000 + i}").execution_count
            _wait_checkpoint(s, m)
            t0 = time.perf_counter()
            r = s.execute("import os; os._exit(1)")
            assert r.status == "error", r
            r = s.execute("print(x, a.shape)")
            crash.append(time.perf_counter() - t0)  # the crashing cell's reply, the restore, the next reply
            assert r.stdout.startswith(f"{2000 + i} "), r
    return {
        "fork_ms": statistics.median(forks) * 1000,
        "held_after_10pct": held / MiB,
        "undo": undo,  # type: ignore[dict-item]
        "crash": crash,  # type: ignore[dict-item]
    }


def ipykernel_restart_rerun(nbytes: int, runs: int) -> list[float]:
    """A crash in ipykernel: restart, re-run the cell that built the data, then the cell."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    times = []
    try:
        for _ in range(runs):
            kc.execute_interactive(_build(nbytes), timeout=600)
            t0 = time.perf_counter()
            km.restart_kernel(now=True)
            kc.wait_for_ready(timeout=60)
            kc.execute_interactive(_build(nbytes), timeout=600)
            reply = kc.execute_interactive("print(x, a.shape)", timeout=60)
            times.append(time.perf_counter() - t0)
            assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return times


def kishu(python: str, nbytes: int, runs: int) -> dict[str, list[float]]:
    """Kishu (time travel for notebooks, by pickling) in a plain ipykernel of
    `python` (one where `pip install kishu` worked), through jupyter_client:
    the cell rewriting 10% of the data with Kishu off and on, and a checkout
    of the state before the last cell -> the next cell's reply. Kishu finds
    its notebook by the kernel's connection file name; its test mode skips
    the front end's save and reload, which a headless kernel has not."""
    import json

    from jupyter_client.kernelspec import KernelSpec

    root = _SCRATCH / "kishu"
    (root / ".kishu").mkdir(parents=True, exist_ok=True)
    (root / ".kishu" / "config.ini").write_text("[JUPYTERINT]\ntest_mode = True\n")
    nb = root / "nb.ipynb"
    nb.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    env = dict(os.environ, KISHU_PATH_ROOT=str(root))
    out: dict[str, list[float]] = {"off": [], "on": [], "undo": []}

    def run(kc: object, code: str) -> float:
        t0 = time.perf_counter()
        reply = kc.execute_interactive(code, timeout=900, output_hook=lambda msg: None)  # type: ignore[attr-defined]
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{code!r} failed in Kishu's kernel: {reply['content'].get('evalue')}")
        return time.perf_counter() - t0

    n, tenth = nbytes // 8, nbytes // 8 // 10
    for on in (False, True):
        km = KernelManager()
        km._kernel_spec = KernelSpec(argv=[python, "-m", "ipykernel_launcher", "-f", "{connection_file}"], display_name="kishu", language="python")
        km.connection_file = str(root / f"kernel-{time.time_ns()}.json")  # Kishu reads the kernel id from this name
        km.start_kernel(cwd=str(root), env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            if on:
                # (Kishu says its first post_run_cell came without a pre_run_cell: harmless, hidden)
                kc.execute_interactive(f"from kishu import init_kishu; init_kishu({str(nb)!r})", timeout=120, output_hook=lambda msg: None)
            run(kc, f"import numpy as np\na = np.random.default_rng(0).random({n})\nx = 0")
            for i in range(runs):
                out["on" if on else "off"].append(run(kc, f"a[{i % 10} * {tenth}:{i % 10 + 1} * {tenth}] += 1"))
            if on:
                for i in range(max(runs // 2, 1)):
                    run(kc, f"x = {i + 1}")
                    run(kc, "from kishu.commands import KishuCommand as _K; import pathlib as _p\n"
                            f"_ids = [c.commit_id for c in _K.log(_p.Path({str(nb)!r})).commit_graph]")
                    t0 = time.perf_counter()
                    run(kc, "_kishu.checkout(_ids[-3])")  # the state before `x = ...` (the log cell is the last commit)
                    run(kc, "print(x)")
                    out["undo"].append(time.perf_counter() - t0)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100M,2G")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--kishu", metavar="PYTHON", help="also Kishu, in a kernel of this Python (with kishu, ipykernel, numpy)")
    ap.add_argument("--kishu-size", default="1G", help="session data for the Kishu figures (default 1G, as its anchor)")
    args = ap.parse_args()
    project = _SCRATCH / "project"
    project.mkdir()
    print(f"forkreload checkpoints: {args.runs} runs per figure, medians (machine: {os.cpu_count()} CPUs)")
    for text in args.sizes.split(","):
        nbytes = _size(text)
        print(f"\nsession data {nbytes / MiB:.0f} MiB")
        both = cell_latency(project, nbytes, args.runs)
        on, off = both["auto"], both["off"]
        for key, label in (("paused", f"small cell after a {PAUSE * 1000:.0f} ms pause"), ("b2b", "small cell right after the last reply")):
            print(row(f"{label}, checkpoints off", off[key]))
            print(row(f"{label}, checkpoints on", on[key]))
            print(f"  added latency: {median_ms(on[key]) - median_ms(off[key]):+.2f} ms")
        print(row("cell rewriting 10%, checkpoints off", off["rewrite"]))
        print(row("cell rewriting 10%, checkpoints on", on["rewrite"]))
        per100 = (median_ms(on["rewrite"]) - median_ms(off["rewrite"])) / (nbytes / 10 / (100 * 1e6))
        print(f"  copy-on-write cost: {per100:+.1f} ms per 100 MB written")
        cost = checkpoint_cost(project, nbytes, args.runs)
        print(f"  fork of the worker (taking a checkpoint): median {cost['fork_ms']:.2f} ms")
        print(f"  memory the checkpoints hold after a cell rewrote 10% ({nbytes / 10 / MiB:.0f} MiB): {cost['held_after_10pct']:.0f} MiB")
        print(row("%forkreload undo -> its reply", cost["undo"]))  # type: ignore[arg-type]
        print(row("crashing cell sent -> next cell's reply (restored)", cost["crash"]))  # type: ignore[arg-type]
        ipk = ipykernel_restart_rerun(nbytes, max(args.runs // 5, 2))
        print(row("ipykernel: restart + re-run -> same reply", ipk))
        print(f"  crash recovery: forkreload {statistics.median(ipk) / statistics.median(cost['crash']):.0f}x faster than ipykernel's restart-and-rerun")  # type: ignore[arg-type]
    if args.kishu:
        nbytes = _size(args.kishu_size)
        print(f"\nKishu, session data {nbytes / MiB:.0f} MiB (its own kernel; forkreload's figures above)")
        k = kishu(args.kishu, nbytes, 3)
        print(row("cell rewriting 10%, Kishu off", k["off"]))
        print(row("cell rewriting 10%, Kishu on", k["on"]))
        print(row("checkout of the state before the last cell -> next reply", k["undo"]))


if __name__ == "__main__":
    main()
