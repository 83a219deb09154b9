"""What the user reads: every line forkreload writes into a cell, and `%forkreload status`.

The controller decides; this module words it. A reload is described by a
`protocol.Reload`; the other notices take the few facts they need. Each
notice is one line (a failed import adds the user's own error below it),
starts with ``forkreload:``, and names everything that was kept, lost or
reset, folding long lists to a count rather than dropping them.
"""

from __future__ import annotations

from typing import Any

from .protocol import Reload

__all__ = [
    "AUTORELOAD_NOTE",
    "back_text",
    "command_text",
    "comms_closed",
    "crash_reason",
    "crash_text",
    "debugger_ended",
    "failure_text",
    "fold",
    "fresh_text",
    "inplace_text",
    "kept_old_code",
    "not_applied_inplace",
    "previous_not_kept",
    "progress_text",
    "report_text",
    "shadow_text",
    "snapshot_failed",
    "stale_reminder",
    "status_text",
]

PREFIX = "forkreload: "
# Past this, a list in a notice is folded to its first items and a count.
_FOLD_AT = 160


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def fold(items: list[str], sep: str = "; ", limit: int = _FOLD_AT) -> str:
    """All of `items` when short, else the first ones and `(+N more)`."""
    text = sep.join(items)
    if len(text) <= limit or len(items) <= 1:
        return text
    shown: list[str] = []
    for item in items:
        if shown and len(sep.join([*shown, item])) > limit:
            break
        shown.append(item)
    return f"{sep.join(shown)} (+{len(items) - len(shown)} more, see %forkreload status)"


def _short(reason: str) -> str:
    # "_io.TextIOWrapper: cannot pickle ..." reads as its type; a reason in
    # words ("refers to m.f, which no longer exists") stays whole.
    head = reason.split(": ")[0]
    return head if " " not in head else reason


def _lost(lost: dict[str, str]) -> str:
    return fold([f"{k} ({_short(v)})" for k, v in sorted(lost.items())], sep=", ")


def _why(r: Reload) -> str:
    return fold(r.reasons) if r.reasons else r.reason


def fresh_text(r: Reload) -> str:
    """A successful swap: why, what was migrated, lost and reset, how long."""
    parts = [f"{PREFIX}fresh worker: {_why(r)}", f"migrated {len(r.migrated)}"]
    if r.lost:
        parts.append(f"lost: {_lost(r.lost)}")
    if r.notes:
        parts.append(fold(r.notes))
    parts.append(_seconds(r.seconds))
    text = " · ".join(parts)
    if r.lost and r.previous:
        text += " · %forkreload back returns to the previous worker with its values"
    return text


def failure_text(r: Reload) -> str:
    """A failed swap: one headline, then the user's own error."""
    if r.failed_module:
        head = f"{PREFIX}kept the old code: {r.failed_module} failed to import"
    else:
        head = f"{PREFIX}kept the old worker: the fresh worker failed"
    return f"{head}\n{r.error}"


def inplace_text(r: Reload) -> str:
    """An in-place patch: every function patched and added, what it kept, how long."""
    parts = []
    if r.patched:
        parts.append("patched " + fold(r.patched, sep=", "))
    if r.added:
        parts.append("added " + fold(r.added, sep=", "))
    text = f"{PREFIX}{'; '.join(parts) or 'no code change'} in place ({r.seconds * 1000:.1f} ms)"
    if r.notes:
        text += " · " + fold(r.notes)
    return text


def not_applied_inplace(reasons: list[str]) -> str:
    """Mode 'inplace' and an edit that needs a fresh worker."""
    return f"{PREFIX}not reloaded (mode inplace): {fold(reasons)} · run %forkreload fresh to apply"


def kept_old_code(reasons: list[str]) -> str:
    """The edit could not be applied at all (it does not parse, the check failed)."""
    return f"{PREFIX}kept the old code: {fold(reasons)}"


def stale_reminder(files: list[str], why: str) -> str:
    """Each later cell while the worker runs older code than the files hold."""
    return f"{PREFIX}still running the old code of {fold(files, sep=', ')} ({why}); save a fix or run %forkreload fresh"


# `%load_ext autoreload` / `%autoreload 2` in a forkreload worker.
AUTORELOAD_NOTE = f"{PREFIX}edits to your modules are already picked up before each cell; %autoreload is not needed (see %forkreload status)"


def shadow_text(file: str, module: str, stdlib: bool) -> str:
    """A project file named like a module the worker already imported: the
    cells get that module, where a plain `python` in the project would get
    the file."""
    whose = "the standard library's" if stdlib else "the preloaded"
    return f"{PREFIX}{file} in your project shadows {whose} {module} module; `import {module}` gives that module, not your file"


def previous_not_kept(data_bytes: int) -> str:
    """A swap of a session too large to keep twice."""
    size = f"{data_bytes / 2**30:.1f} GiB" if data_bytes >= 2**30 else f"{data_bytes / 2**20:.0f} MiB"
    return f"previous worker not kept ({size} of data, more than a quarter of the free memory): %forkreload back is not available"


def snapshot_failed(error: str) -> str:
    return f"{PREFIX}kept the old worker: the new snapshot failed: {error}"


def progress_text(reason: str) -> str:
    return f"{PREFIX}preparing a fresh worker: {reason}…"


def comms_closed(n: int) -> str:
    return f"{PREFIX}closed {n} comm{'s' if n > 1 else ''} (widgets) of the old worker; display them again"


def crash_reason(status: str) -> str:
    """The worker died (segfault, os._exit, killed): its values are gone."""
    return f"the worker {status}; its variables were lost"


def crash_text(reason: str) -> str:
    """The first cell after a crash."""
    return f"{PREFIX}fresh worker: {reason}"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def crash_restored(status: str, cell: int) -> str:
    """The reply of the cell the worker died in, when a checkpoint takes over."""
    return f"the worker {status}; the state after cell {cell} is restored for the next cell"


def restored_text(status: str, crashed_cell: int | None, cell: int, age: float, lost: list[str], threads: list[str] | None = None) -> str:
    """The first cell after a crash, when a checkpoint took over."""
    where = f" in cell {crashed_cell}" if crashed_cell is not None else ""
    text = f"{PREFIX}the worker {status}{where}; restored the state after cell {cell} ({_ago(age)} old)"
    if lost:
        text += f"; lost: {fold(lost, sep=', ')} (set by later cells)"
    return text + _threads_gone(threads)


def _threads_gone(threads: list[str] | None) -> str:
    if not threads:
        return ""
    return f"; not restored: thread{'s' if len(threads) > 1 else ''} {fold([repr(t) for t in threads], sep=', ')} (a copy keeps no thread)"


def undo_text(cell: int | None, age: float, lost: list[str], why: str = "", threads: list[str] | None = None) -> str:
    """`%forkreload undo`: the state after an earlier cell is back."""
    if cell is None:
        return f"{PREFIX}nothing to undo: {why}"
    text = f"{PREFIX}undone: the state after cell {cell} ({_ago(age)} old) is back"
    if lost:
        text += f"; {fold(lost, sep=', ')} as they were then"
    return text + _threads_gone(threads)


def checkpoints_text(items: list[dict[str, Any]], budget: int, enabled: bool, previous: dict[str, Any] | None = None, used: int = 0) -> str:
    """`%forkreload checkpoints`: the saved states, newest first (each with
    its share of the memory it maps, PSS), what they hold together beyond
    the live workers, and the worker kept from before the last swap."""
    lines = []
    if not enabled:
        lines.append(f"{PREFIX}checkpoints are off (setting checkpoints = 0)")
    elif not items:
        lines.append(f"{PREFIX}no checkpoint yet (one is taken after each cell that changes something)")
    else:
        lines.append(f"forkreload checkpoints: {used / 2**20:.0f} MiB held beyond the workers' own memory (budget {budget / 2**20:.0f} MiB)")
    for cp in reversed(items):
        use = "  (the current worker's origin)" if cp.get("in_use") else ""
        lines.append(f"  after cell {cp['cell']:<5} {_ago(cp['age']):>7} old  {cp['pss'] / 2**20:8.1f} MiB  pid {cp['pid']}{use}")
    if previous is not None:
        lines.append(f"  previous worker (before the last swap; %forkreload back)  {previous['uss'] / 2**20:8.1f} MiB  pid {previous['pid']}")
    return "\n".join(lines)


def back_text(pid: int | None, files: list[str]) -> str:
    """`%forkreload back`: the previous worker is current again."""
    if pid is None:
        return f"{PREFIX}no previous worker to go back to (one is kept after each fresh-worker swap)"
    text = f"{PREFIX}back to the previous worker (pid {pid}) with its values"
    if files:
        text += f"; it runs the old code of {fold(files, sep=', ')} until the next save"
    return text


def command_text(cmd: str, value: str, choices: tuple[str, ...] = ()) -> str:
    """The answer to `%forkreload fresh|mode|quiet`."""
    if cmd == "fresh":
        return f"{PREFIX}a fresh worker (variables migrated) takes over before the next cell"
    if cmd == "back":
        return f"{PREFIX}the previous worker takes over again before the next cell"
    if cmd == "undo":
        return f"{PREFIX}the state before {value} takes over before the next cell"
    if cmd == "mode" and choices:
        return f"{PREFIX}mode is {value}; choose one of {', '.join(choices)}"
    if cmd == "mode":
        return f"{PREFIX}mode is now {value}"
    return f"{PREFIX}quiet is {value}"


def report_text(r: Reload) -> str:
    """Any report, as one line without the prefix."""
    if r.mode == "inplace":
        text = inplace_text(r)
    elif r.ok:
        text = fresh_text(r)
    else:
        text = f"failed: {r.error}"
    return text.removeprefix(PREFIX)


def status_text(st: dict[str, Any]) -> str:
    """`%forkreload status`, from the controller's status() dict."""
    snap = st["snapshot"]
    settings = st["settings"]
    pre = ", ".join(f"{k} ({v:.2f} s)" for k, v in snap["preload"].items()) or "nothing"
    lines = [
        "forkreload status",
        f"  mode        {st['mode']}{' (quiet)' if settings['quiet'] else ''}",
        f"  project     {settings['project_root']}",
        f"  snapshot    pid {snap['pid']}, preloaded {pre}",
    ]
    if snap["preload_failed"]:
        lines.append("  failed      " + ", ".join(f"{k}: {v}" for k, v in snap["preload_failed"].items()))
    if snap["threads"].get("risky"):
        lines.append(f"  warning     preloads started threads (fork-safety risk): {snap['threads']['risky']}")
    if st.get("learning"):
        lines.append(f"  building    a snapshot with {', '.join(st['learning'])} (forks come from it once ready)")
    previous = f", previous {st['previous_pid']} (%forkreload back)" if st.get("previous_pid") else ""
    lines.append(f"  worker      pid {st['worker_pid']}, spare {st['spare_pid'] or 'starting'}{previous}")
    lines.append(f"  watching    {', '.join(st['watched']) or 'none yet'}")
    if "checkpoints" in st:
        cps = st["checkpoints"]
        budget = st.get("checkpoint_budget") or 0
        if not budget:
            lines.append("  checkpoints off")
        else:
            after = ", ".join(f"{c['cell']} (pid {c['pid']})" for c in cps) or "none yet"
            used = (st.get("checkpoint_memory") or 0) / 2**20
            lines.append(f"  checkpoints after cells {after}; {used:.0f} of {budget / 2**20:.0f} MiB")
    if st.get("stale"):
        lines.append(f"  old code    {st['stale']}")
    last = Reload.from_dict(st["last_reload"])
    if last is not None:
        lines.append(f"  last reload {report_text(last)}")
        for why in last.reasons[1:]:
            lines.append(f"              {why}")
        for note in last.notes:
            lines.append(f"              {note}")
        for name, why in sorted(last.lost.items()):
            lines.append(f"              lost {name}: {why}")
    return "\n".join(lines)


def debugger_ended(why: str) -> str:
    """The front end's debug session could not follow a new worker."""
    return f"{PREFIX}the debugger session ended ({why}); turn the debugger on again"
