"""forkreload demo: edit this file while the console runs.

`forkreload demo` printed the cells to type, the two edits to make, and an undo.
"""

import math

UNIT = "cm"  # a module constant: changing it takes a fresh worker


def area(r: float) -> float:
    """The area of a circle of radius r."""
    return math.pi * r * r


class Circle:
    def __init__(self, r: float) -> None:
        self.r = r

    def describe(self) -> str:
        return f"radius {self.r} {UNIT}, area {area(self.r)} {UNIT}²"


def slow_sum(n: int) -> float:
    """Slow on purpose: a result you would rather not compute again."""
    return sum(math.sqrt(i) for i in range(n))
