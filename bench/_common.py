"""Helpers shared by the benchmarks: medians, a throw-away project, libraries."""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import textwrap
from pathlib import Path

HEAVY = ["numpy", "pandas", "scipy", "sklearn", "torch"]


def available(names: list[str]) -> list[str]:
    """The heavy libraries installed here (scipy/scikit-learn are optional)."""
    return [n for n in names if importlib.util.find_spec(n) is not None]


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def make_project(files: dict[str, str]) -> Path:
    root = Path(tempfile.mkdtemp(prefix="forkreload-bench-"))
    for name, src in files.items():
        (root / name).write_text(textwrap.dedent(src))
    return root


def row(label: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"  {label:<44} median {median_ms(samples):8.1f} ms   (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})"
