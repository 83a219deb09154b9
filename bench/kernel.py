"""Benchmark: the cost a notebook user pays after a messy edit, on one notebook.

The same notebook (built here with nbformat: heavy imports, a user module,
about a second of real compute) is run in two kernels, driven by
jupyter_client as a notebook front end drives them:

- forkreload: one running `forkreload` kernel (its kernelspec installed by
  `forkreload kernel install --prefix` into a temporary prefix); after each
  messy edit of the user module (a module-level constant changed) the next
  cell, which uses the new constant and the values computed before, is
  timed: it runs in a fresh worker with the variables migrated;
- ipykernel: the stock `python3` kernel, where the user has to
  "Restart kernel and run all": restart_kernel(), then every cell again,
  timed until the last reply (kernel start, heavy imports, recomputing).

Also shown: the same "Restart kernel and run all" on forkreload's kernel
installed with `--provisioner` (the provisioner makes the restart a clean
worker from the running snapshot, so the imports are already done; the
cells still recompute).

Then, side by side with ipykernel (`--starts` runs only this part): how
long a kernel takes from jupyter_client's `start_kernel()` to its first
execute_reply (a trivial cell, then an import cell of the heavy libraries),
for forkreload's first kernel (no snapshot server running: the first worker
comes from a kernel-only server while the full one builds) and for a second
kernel (the server warm: a fork); "Restart kernel" with and without the
provisioner; and the memory (PSS, all processes of the kernels, the
server included) of 1 and of 4 kernels that imported numpy and pandas
(and torch, when installed).

First (`--first-session` runs only this), the issue's first session: a new
project with no settings (no preloads), the notebook's first cell imports
the heavy libraries, and once the snapshot has learned them (the bench
waits for it, at most the minute a user would take) a messy edit; the cell
after it against ipykernel's "Restart kernel and run all".

    python bench/kernel.py [--runs 5] [--starts | --first-session]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import HEAVY, available, make_project, median_ms, row  # noqa: E402

# Keep forkreload's learned preloads and snapshot servers of this benchmark
# out of the user's cache and away from the user's own server.
_SCRATCH = Path(tempfile.mkdtemp(prefix="forkreload-bench-kernel-"))
os.environ["FORKRELOAD_CACHE_DIR"] = str(_SCRATCH / "cache")
os.environ["FORKRELOAD_SERVER_DIR"] = str(_SCRATCH / "server")
os.environ.setdefault("IPYTHONDIR", str(_SCRATCH / "ipython"))
PREFIX = _SCRATCH / "prefix"
os.environ["JUPYTER_PATH"] = str(PREFIX / "share" / "jupyter") + os.pathsep + os.environ.get("JUPYTER_PATH", "")


def _compiled() -> None:
    """forkreload's bytecode written, as an install writes it (ipykernel's
    is): in a checkout under PYTHONDONTWRITEBYTECODE, each start would
    otherwise compile the modules edited since (~30-100 ms more a start)."""
    import compileall

    import forkreload

    compileall.compile_dir(os.path.dirname(forkreload.__file__), quiet=1)


_compiled()

import nbformat  # noqa: E402
from jupyter_client import KernelManager  # noqa: E402
from nbformat.v4 import new_code_cell, new_notebook  # noqa: E402

FEATURES = """
SCALE = {v}

def weighted(stats):
    return float((stats["mx"] * stats["n"]).sum() * SCALE)
"""

THINK = 1.0  # seconds between a cell's output and the user's next save
ROWS = 3_000_000


def build_notebook(libs: list[str]) -> Any:
    extra = []
    if "scipy" in libs:
        extra.append("import scipy.stats")
    if "sklearn" in libs:
        extra.append("from sklearn.linear_model import LinearRegression")
    if "torch" in libs:
        extra.append("import torch")
    cells = [
        "\n".join(["import numpy as np", "import pandas as pd", *extra]),
        "import features",
        f"""rng = np.random.default_rng(0)
n = {ROWS}
df = pd.DataFrame({{"key": rng.integers(0, 5000, n), "x": rng.normal(size=n), "y": rng.normal(size=n)}})
stats = df.groupby("key").agg(mx=("x", "mean"), sx=("x", "std"), my=("y", "mean"), n=("x", "size"))""",
    ]
    if "scipy" in libs:
        cells.append('skew = float(scipy.stats.skew(df["x"].to_numpy()))')
    if "sklearn" in libs:
        cells.append('fit = LinearRegression().fit(stats[["mx", "sx"]], stats["my"])\ncoef = fit.coef_.round(3).tolist()')
    # The cell the user runs after the edit: the new constant, the old values.
    cells.append("print(features.SCALE, len(stats), round(features.weighted(stats) / features.SCALE, 3))")
    return new_notebook(cells=[new_code_cell(c) for c in cells])


@contextmanager
def kernel(name: str, cwd: Path, quiet: bool = False) -> Iterator[tuple[KernelManager, Any]]:
    km = KernelManager(kernel_name=name)
    # quiet: ipykernel's "running over TCP without encryption" on every start
    km.start_kernel(cwd=str(cwd), **({"stderr": subprocess.DEVNULL} if quiet else {}))
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


LAST_REPLY: dict[str, Any] = {}


def execute(kc: Any, code: str, notices: bool = False) -> str:
    """Run one cell; return its stdout (forkreload's notices left out unless `notices`)."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream" and (notices or not msg["metadata"].get("forkreload")):
            out.append(msg["content"]["text"])

    reply = kc.execute_interactive(code, timeout=300, output_hook=hook)
    LAST_REPLY.clear()
    LAST_REPLY.update(reply)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}\n{code}")
    return "".join(out)


def run_all(kc: Any, nb: Any) -> str:
    out = ""
    for cell in nb.cells:
        out = execute(kc, cell.source)
    return out  # the last cell's


def edit(root: Path, v: int) -> None:
    (root / "features.py").write_text(FEATURES.format(v=v))


def expect(out: str, v: int) -> None:
    if not out.startswith(f"{v} 5000 "):
        raise RuntimeError(f"the cell after the edit shows {out!r}, not SCALE={v}")


def cell_after_edit(kc: Any, root: Path, last: str, v: int) -> tuple[float, float, list[str]]:
    """A messy edit (a module constant, no in-place patch), then the cell
    using it: (seconds to its reply, seconds of the swap, its notes)."""
    edit(root, v)
    t0 = time.perf_counter()
    out = execute(kc, last)
    took = time.perf_counter() - t0
    expect(out, v)
    report = LAST_REPLY["metadata"].get("forkreload") or {}
    if not (report.get("ok") and report.get("mode") == "fresh"):
        raise RuntimeError(f"expected a fresh-worker swap, got {report}")
    return took, report["seconds"], list(report.get("notes", []))


def restart_and_run_all(km: KernelManager, kc: Any, nb: Any, root: Path, v: int) -> tuple[float, float]:
    """An edit, then "Restart kernel and run all": (seconds to ready, to the last reply)."""
    edit(root, v)
    t0 = time.perf_counter()
    km.restart_kernel()
    kc.wait_for_ready(timeout=120)
    ready = time.perf_counter() - t0
    out = run_all(kc, nb)
    took = time.perf_counter() - t0
    expect(out, v)
    return ready, took


def bench(runs: int) -> None:
    libs = available(HEAVY)
    nb = build_notebook(libs)
    nbformat.validate(nb)
    subprocess.run(
        # --provisioner: the front end here runs in forkreload's environment.
        [sys.executable, "-m", "forkreload", "kernel", "install", "--provisioner", "--prefix", str(PREFIX), "--preload", ",".join(libs)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    spec = json.loads((PREFIX / "share" / "jupyter" / "kernels" / "forkreload" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    last = nb.cells[-1].source

    # (a) forkreload: one kernel, run all once, then edit -> next cell.
    root = make_project({"features.py": FEATURES.format(v=1)})
    swaps, internal, plain, fr_restart_all = [], [], [], []
    first_run_all = learned = 0.0
    try:
        with kernel("forkreload", root) as (km, kc):
            t0 = time.perf_counter()
            expect(run_all(kc, nb), 1)
            first_run_all = time.perf_counter() - t0
            # The kernel's first worker came from the kernel-only server;
            # the cells named submodules the preloads lack (scipy.stats):
            # measured once the snapshot holding them serves the forks.
            learned = wait_learned(kc, libs)
            for i in range(1, runs + 1):
                t0 = time.perf_counter()
                execute(kc, last)
                plain.append(time.perf_counter() - t0)
                time.sleep(THINK)
                took, swap, _notes = cell_after_edit(kc, root, last, i + 1)
                swaps.append(took)
                internal.append(swap)
            # The front end's "Restart kernel and run all" on forkreload.
            for i in range(max(3, runs // 2)):
                time.sleep(THINK)
                fr_restart_all.append(restart_and_run_all(km, kc, nb, root, 100 + i)[1])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    # (b) ipykernel: "Restart kernel and run all" after each edit.
    root = make_project({"features.py": FEATURES.format(v=1)})
    restart_all, restart_only = [], []
    try:
        with kernel("python3", root, quiet=True) as (km, kc):
            expect(run_all(kc, nb), 1)
            for i in range(1, runs + 1):
                time.sleep(THINK)
                ready, took = restart_and_run_all(km, kc, nb, root, i + 1)
                restart_only.append(ready)
                restart_all.append(took)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"forkreload kernel benchmark (Python {sys.version.split()[0]}, notebook: {len(nb.cells)} cells, "
          f"{', '.join(libs)}, groupby on {ROWS:,} rows)")
    print(f"  run all, first time, forkreload kernel            {first_run_all * 1000:8.1f} ms")
    print(f"  then the snapshot holding what the cells imported {learned * 1000:8.1f} ms later")
    print(row("forkreload: the cell, no edit", plain))
    print(row("forkreload: the cell after a messy edit", swaps))
    print(row("  of which the swap (df, stats migrated)", internal))
    print(row("ipykernel: restart kernel and run all", restart_all))
    print(row("  of which the restart (till kernel ready)", restart_only))
    print(row("forkreload: restart kernel and run all", fr_restart_all))
    ratio = median_ms(restart_all) / median_ms(swaps)
    print(f"  ratio ipykernel restart-and-run-all / forkreload next cell: {ratio:.1f}x")


def wait_learned(kc: Any, libs: list[str], timeout: float = 60.0) -> float:
    """Wait (at most `timeout`, the minute of the issue's user) until the
    kernel's snapshot holds `libs` and no snapshot is being built (the
    submodules the cells named, `scipy.stats`, are learned too); the
    seconds waited."""
    t0 = time.perf_counter()
    while True:
        status = execute(kc, "%forkreload status", notices=True).splitlines()
        line = next((ln for ln in status if ln.strip().startswith("snapshot")), "")
        building = any(ln.strip().startswith("building") for ln in status)
        if (all(f"{lib} (" in line for lib in libs) and not building) or time.perf_counter() - t0 > timeout:
            return time.perf_counter() - t0
        time.sleep(0.5)


def bench_first_session(runs: int) -> None:
    """A user's first session in a new project, no settings: the notebook
    imports the heavy libraries, computes, and the user makes a messy edit
    a while later (the snapshot learned the libraries meanwhile, in the
    background). Side by side with ipykernel's "Restart kernel and run all"."""
    libs = available(HEAVY)
    nb = build_notebook(libs)
    last = nb.cells[-1].source
    subprocess.run(
        [sys.executable, "-m", "forkreload", "kernel", "install", "--name", "forkreload-new", "--prefix", str(PREFIX)],
        check=True, stdout=subprocess.DEVNULL,
    )
    swaps, internal, waited, restart_all = [], [], [], []
    notes: list[str] = []
    for _ in range(runs):
        stop_servers()  # a first session: no server holds these libraries
        root = make_project({"features.py": FEATURES.format(v=1)})
        try:
            with kernel("forkreload-new", root) as (_km, kc):
                expect(run_all(kc, nb), 1)
                waited.append(wait_learned(kc, libs))
                took, swap, said = cell_after_edit(kc, root, last, 2)
                swaps.append(took)
                internal.append(swap)
                notes += [n for n in said if "imported" in n]
            with kernel("python3", root, quiet=True) as (km, kc):
                expect(run_all(kc, nb), 2)
                restart_all.append(restart_and_run_all(km, kc, nb, root, 3)[1])
        finally:
            # A new project each run: its learned set lives in the cache.
            shutil.rmtree(root, ignore_errors=True)
    print(f"first session in a new project, no settings (Python {sys.version.split()[0]}, {', '.join(libs)} "
          f"imported by the first cell, groupby on {ROWS:,} rows; the edit once the snapshot learned them)")
    print(row("  snapshot learned the imports after run all", waited))
    print(row("forkreload: the cell after a messy edit", swaps))
    print(row("  of which the swap (df, stats migrated)", internal))
    print(row("ipykernel: restart kernel and run all", restart_all))
    print(f"  ratio ipykernel / forkreload: {median_ms(restart_all) / median_ms(swaps):.1f}x"
          f"{'; swaps that imported libraries themselves: ' + '; '.join(notes) if notes else '; no swap imported a library itself'}")


def stop_servers() -> None:
    """End this benchmark's snapshot servers (the next forkreload start is cold)."""
    from forkreload import server

    d = os.environ["FORKRELOAD_SERVER_DIR"]
    if not os.path.isdir(d):
        return
    for info in server.list_servers(d):
        server.ask(d, info["kid"], {"op": "stop"})
        server.wait_gone(d, info["kid"])


def first_reply(kc: Any, code: str, timeout: float = 120) -> None:
    """Send a cell at once and wait for its execute_reply (as a front end
    that queues cells while the kernel starts; jupyter_client's
    wait_for_ready would add its own 0.2 s of iopub flushing to both kernels)."""
    msg_id = kc.execute(code)
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            if msg["content"]["status"] != "ok":
                raise RuntimeError(f"cell failed: {msg['content']}")
            return


def timed_start(name: str, cwd: Path, code: str) -> tuple[float, float, KernelManager, Any]:
    """(start -> first reply of '1', start -> reply of `code`), and the live kernel."""
    km = KernelManager(kernel_name=name)
    t0 = time.perf_counter()
    km.start_kernel(cwd=str(cwd), stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    first_reply(kc, "1")
    ready = time.perf_counter() - t0
    first_reply(kc, code)
    return ready, time.perf_counter() - t0, km, kc


def stop(km: KernelManager, kc: Any) -> None:
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def timed_restart(km: KernelManager, kc: Any) -> float:
    """"Restart kernel" -> the first execute_reply of the new kernel."""
    t0 = time.perf_counter()
    km.restart_kernel()
    first_reply(kc, "1")
    return time.perf_counter() - t0


def kernel_pss(kms: list[KernelManager], include_servers: bool) -> dict[str, float]:
    """PSS in MiB of the kernels' processes, by role: the kernel processes
    (ipykernel, or forkreload's controllers), the snapshot servers, and the
    workers and spares they forked (with the checkpoints those forked)."""
    import psutil

    roles: dict[int, str] = {}
    for km in kms:
        pid = km.provisioner.pid if km.provisioner is not None else None  # type: ignore[attr-defined]
        if pid is not None:
            roles[pid] = "kernel"
    if include_servers:
        from forkreload import server

        for info in server.list_servers(os.environ["FORKRELOAD_SERVER_DIR"]):
            roles[info["pid"]] = "server"
            for child in psutil.Process(info["pid"]).children(recursive=True):
                roles[child.pid] = "workers"  # and spares, and their checkpoints
    total: dict[str, float] = {"kernel": 0.0, "server": 0.0, "workers": 0.0}
    for pid, role in roles.items():
        try:
            total[role] += psutil.Process(pid).memory_full_info().pss / 2**20
        except psutil.Error:
            pass
    return total


def bench_starts(runs: int) -> None:
    libs = [lib for lib in available(HEAVY) if lib in ("numpy", "pandas")]
    imports = "import " + ", ".join(libs)
    for name, extra in (("forkreload", ["--provisioner"]), ("forkreload-plain", [])):
        subprocess.run(
            [sys.executable, "-m", "forkreload", "kernel", "install", *extra, "--name", name, "--prefix", str(PREFIX), "--preload", ",".join(libs)],
            check=True, stdout=subprocess.DEVNULL,
        )
    root = make_project({"features.py": FEATURES.format(v=1)})
    torch_pss: dict[str, list[dict[str, float]]] = {}
    res: dict[str, list[float]] = {k: [] for k in (
        "ipy ready", "ipy import", "fr1 ready", "fr1 import", "fr2 ready", "fr2 import",
        "ipy restart", "fr restart prov", "fr restart plain")}
    try:
        for _ in range(runs):
            ready, imp, km, kc = timed_start("python3", root, imports)
            res["ipy ready"].append(ready)
            res["ipy import"].append(imp)
            res["ipy restart"].append(timed_restart(km, kc))
            stop(km, kc)

            stop_servers()  # a cold start: no snapshot server of any key
            ready, imp, km1, kc1 = timed_start("forkreload", root, imports)
            res["fr1 ready"].append(ready)
            res["fr1 import"].append(imp)
            time.sleep(3)  # the full server builds in the background meanwhile
            ready, imp, km2, kc2 = timed_start("forkreload-plain", root, imports)
            res["fr2 ready"].append(ready)
            res["fr2 import"].append(imp)
            res["fr restart prov"].append(timed_restart(km1, kc1))
            res["fr restart plain"].append(timed_restart(km2, kc2))
            stop(km1, kc1)
            stop(km2, kc2)

        pss = {name: four_kernels_pss(name, root, imports) for name in ("python3", "forkreload")}
        if "torch" in available(HEAVY):
            subprocess.run(
                [sys.executable, "-m", "forkreload", "kernel", "install", "--name", "forkreload-torch", "--prefix", str(PREFIX), "--preload", "torch"],
                check=True, stdout=subprocess.DEVNULL,
            )
            torch_pss = {name: four_kernels_pss(name, root, "import torch", settle=15) for name in ("python3", "forkreload-torch")}
    finally:
        stop_servers()
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float:
        return median_ms(res[key])

    print(f"kernel start benchmark (Python {sys.version.split()[0]}, preloads {', '.join(libs)}, "
          f"medians of {runs}; start = jupyter_client start_kernel() to the first execute_reply)")
    print(row("ipykernel: start -> ready", res["ipy ready"]))
    print(row("forkreload, first kernel: start -> ready", res["fr1 ready"]))
    print(row("forkreload, warm server: start -> ready", res["fr2 ready"]))
    print(row(f"ipykernel: start -> `{imports}` reply", res["ipy import"]))
    print(row("forkreload, first kernel: same", res["fr1 import"]))
    print(row("forkreload, warm server: same", res["fr2 import"]))
    print(row("ipykernel: restart kernel -> ready", res["ipy restart"]))
    print(row("forkreload: restart, provisioner", res["fr restart prov"]))
    print(row("forkreload: restart, no provisioner", res["fr restart plain"]))
    print(f"  ratios to ipykernel: first start {med('fr1 ready') / med('ipy ready'):.2f}x, "
          f"warm start {med('fr2 ready') / med('ipy ready'):.2f}x, import cell first {med('fr1 import') / med('ipy import'):.2f}x, "
          f"warm {med('fr2 import') / med('ipy import'):.2f}x, restart plain {med('fr restart plain') / med('ipy restart'):.2f}x")
    print_pss(pss, ", ".join(libs), "forkreload")
    if torch_pss:
        print_pss(torch_pss, "torch", "forkreload-torch")


def four_kernels_pss(name: str, root: Path, code: str, settle: float = 5.0) -> list[dict[str, float]]:
    """PSS by role of 1, then 4 kernels of kernelspec `name` that ran `code`
    (a user's first kernel: no server running before it)."""
    stop_servers()
    kernels: list[tuple[KernelManager, Any]] = []
    found = []
    try:
        for i in range(4):
            _r, _i, km, kc = timed_start(name, root, code)
            kernels.append((km, kc))
            if i in (0, 3):
                time.sleep(settle)  # spares forked, background builds done
                found.append(kernel_pss([k for k, _ in kernels], name != "python3"))
    finally:
        for km, kc in kernels:
            stop(km, kc)
    return found


def print_pss(pss: dict[str, list[dict[str, float]]], libs: str, forkreload: str) -> None:
    for name, label in (("python3", "ipykernel"), (forkreload, "forkreload")):
        one, four = (sum(p.values()) for p in pss[name])
        print(f"  PSS with {libs} imported, {label:<10}  1 kernel {one:7.0f} MiB   4 kernels {four:7.0f} MiB   ({four / one:.2f}x)")
        if name == forkreload:
            for n, p in zip((1, 4), pss[name], strict=True):
                print(f"    {n} kernel(s): controllers {p['kernel']:.0f} MiB, snapshot servers {p['server']:.0f} MiB, "
                      f"workers, spares and checkpoints {p['workers']:.0f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--starts", action="store_true", help="only the start, restart and memory figures")
    ap.add_argument("--first-session", action="store_true", help="only the first session's messy edit in a new project")
    args = ap.parse_args()
    try:
        if not args.starts:
            bench_first_session(max(3, args.runs // 2))
        if args.first_session:
            sys.exit(0)
        if not args.starts:
            bench(args.runs)
        bench_starts(args.runs)
    finally:
        stop_servers()
        shutil.rmtree(_SCRATCH, ignore_errors=True)
