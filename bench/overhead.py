"""Benchmark: what forkreload adds to a cell, with and without a pending edit.

Side by side in one run, each kernel having imported the same heavy
libraries and the same user modules:

- a trivial cell with no edit pending: forkreload vs IPython's kernel with
  `%autoreload 2` vs the plain IPython kernel (all three timed through the
  same jupyter_client code). IPython's autoreload looks at every module in
  `sys.modules` before each cell; forkreload stats only the user's files.
- the controller's own check before forwarding a cell, as it measures it.
- the cell after a one-function edit (patched in place) and after a messy
  edit (fresh worker), against the trivial cell.

    python bench/overhead.py [--cells 200] [--edits 9]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import zmq
from jupyter_client.manager import start_new_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forkreload import Session  # noqa: E402

from _common import HEAVY, available, make_project, median_ms, row  # noqa: E402

N_USER_MODULES = 20


def user_files() -> dict[str, str]:
    files = {f"mod{i}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(N_USER_MODULES)}
    files["shapes.py"] = "K = 0\n\ndef area(r):\n    return 3 * r * r\n"
    return files


def run_cell(kc, code: str) -> None:
    """Execute and wait for the reply and the idle status (same for every kernel)."""
    msg_id = kc.execute(code)
    iopub, shell = kc.iopub_channel, kc.shell_channel
    poller = zmq.Poller()
    poller.register(iopub.socket, zmq.POLLIN)
    poller.register(shell.socket, zmq.POLLIN)
    replied = idle = False
    while not (replied and idle):
        events = dict(poller.poll(30000))
        if not events:
            raise TimeoutError(code)
        if iopub.socket in events:
            m = iopub.get_msg(timeout=0)
            if m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status":
                idle = m["content"]["execution_state"] == "idle"
        if shell.socket in events:
            m = shell.get_msg(timeout=0)
            if m["parent_header"].get("msg_id") == msg_id:
                replied = True
                if m["content"]["status"] != "ok":
                    raise RuntimeError(f"{code!r}: {m['content'].get('ename')}: {m['content'].get('evalue')}")


def time_cells(kc, n: int, code: str = "pass") -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run_cell(kc, code)
        out.append(time.perf_counter() - t0)
    return out


def bench(cells: int, edits: int) -> None:
    libs = available(HEAVY)
    root = make_project(user_files())
    setup = (
        f"import sys; sys.path.insert(0, {str(root)!r}); import os; os.chdir({str(root)!r})\n"
        + "".join(f"import {n}\n" for n in libs)
        + "".join(f"import mod{i}\n" for i in range(N_USER_MODULES))
        + "import shapes\n"
    )
    kernels = {}
    with Session(cwd=root, preload=libs, quiet=True) as s:
        kernels["forkreload"] = s.client
        km_plain, kc_plain = start_new_kernel(kernel_name="python3", cwd=str(root))
        km_auto, kc_auto = start_new_kernel(kernel_name="python3", cwd=str(root))
        kernels["IPython"] = kc_plain
        kernels["IPython %autoreload 2"] = kc_auto
        try:
            for kc in kernels.values():
                run_cell(kc, setup)
            run_cell(kc_auto, "%load_ext autoreload\n%autoreload 2")
            nmods = s.execute("import sys; print(len(sys.modules))").stdout.strip()
            time.sleep(1.0)  # let the spare worker settle
            # Interleaved rounds, so that the machine's noise hits all alike.
            samples: dict[str, list[float]] = {k: [] for k in kernels}
            for _ in range(10):
                for name, kc in kernels.items():
                    samples[name] += time_cells(kc, max(1, cells // 10))
            check_us = s.status().get("check_us")

            inplace, fresh = [], []
            for i in range(edits):
                (root / "shapes.py").write_text(f"K = 0\n\ndef area(r):\n    return {i + 4} * r * r\n")
                t0 = time.perf_counter()
                r = s.execute("shapes.area(1)")
                inplace.append(time.perf_counter() - t0)
                assert r.reload and r.reload.mode == "inplace" and r.result == str(i + 4), r
            for i in range(edits):
                time.sleep(1.0)  # the user edits; the spare worker is ready by then
                (root / "shapes.py").write_text(f"K = {i + 1}\n\ndef area(r):\n    return 3 * r * r\n")
                t0 = time.perf_counter()
                r = s.execute("shapes.K")
                fresh.append(time.perf_counter() - t0)
                assert r.reload and r.reload.mode == "fresh" and r.result == str(i + 1), r
        finally:
            for km, kc in ((km_plain, kc_plain), (km_auto, kc_auto)):
                kc.stop_channels()
                km.shutdown_kernel(now=True)

    base = median_ms(samples["IPython"])
    print(f"forkreload overhead benchmark (Python {sys.version.split()[0]}; {len(sys.argv) and ''}"
          f"preloaded: {', '.join(libs)}; {N_USER_MODULES + 1} user modules; {nmods} modules in sys.modules)")
    print("trivial cell, no edit pending:")
    for name, xs in samples.items():
        print(row(name, xs) + f"   {median_ms(xs) - base:+6.2f} ms vs IPython")
    auto = median_ms(samples["IPython %autoreload 2"])
    fr = median_ms(samples["forkreload"])
    print(f"  added: forkreload {fr - base:+.2f} ms, %autoreload 2 {auto - base:+.2f} ms")
    if check_us is not None:
        print(f"  the controller's own check before each cell: median {check_us:.0f} us "
              f"({N_USER_MODULES + 1} user files stat'ed; independent of the {nmods} modules loaded)")
    print("cell after an edit (forkreload):")
    print(row("one-function edit, patched in place", inplace) + f"   {median_ms(inplace) - fr:+6.2f} ms vs no edit")
    print(row("messy edit, fresh worker", fresh) + f"   {median_ms(fresh) - fr:+6.2f} ms vs no edit")
    print("  targets: < 1 ms added per cell; < 10 ms added after an in-place edit")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200)
    ap.add_argument("--edits", type=int, default=9)
    a = ap.parse_args()
    bench(a.cells, a.edits)
