"""What the user reads: the one-line notices and `%forkreload status`.

A reload report is a plain dict (it also travels to clients in the execute
reply's metadata); these functions turn one into the line printed in the
cell that triggered it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fresh_text", "failure_text", "inplace_text", "report_text", "status_text"]


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 10 else f"{s:.1f} s"


def fresh_text(r: dict[str, Any]) -> str:
    """A successful swap: why, what was migrated, what was lost, how long."""
    parts = [f"forkreload: fresh worker: {r['reason']}", f"migrated {len(r['migrated'])}"]
    if r["lost"]:
        lost = ", ".join(f"{k} ({v.split(':')[0]})" for k, v in sorted(r["lost"].items()))
        parts.append(f"lost: {lost}")
    parts.append(_seconds(r["seconds"]))
    return " · ".join(parts)


def failure_text(r: dict[str, Any]) -> str:
    """A failed swap: one headline, then the user's own error."""
    if r.get("failed_module"):
        head = f"forkreload: kept the old code: {r['failed_module']} failed to import"
    elif r.get("failed_variables"):
        head = "forkreload: kept the old worker: variables could not be rebuilt with the new code (fix them, or `del` them and run %forkreload fresh)"
    else:
        head = "forkreload: kept the old worker: the fresh worker failed"
    return f"{head}\n{r['error']}"


def inplace_text(r: dict[str, Any]) -> str:
    """An in-place patch: the functions patched and added, how long."""
    parts = []
    if r["patched"]:
        parts.append("patched " + ", ".join(r["patched"]))
    if r["added"]:
        parts.append("added " + ", ".join(r["added"]))
    return f"forkreload: {'; '.join(parts) or 'no code change'} in place ({r['seconds'] * 1000:.1f} ms)"


def report_text(r: dict[str, Any]) -> str:
    """Any report, as one line without the `forkreload:` prefix."""
    if r["mode"] == "inplace":
        text = inplace_text(r)
    elif r["ok"]:
        text = fresh_text(r)
    else:
        text = f"failed: {r.get('error')}"
    return text.removeprefix("forkreload: ")


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
    lines.append(f"  worker      pid {st['worker_pid']}, spare {st['spare_pid'] or 'starting'}")
    lines.append(f"  watching    {', '.join(st['watched']) or 'none yet'}")
    if st["last_reload"]:
        lines.append(f"  last reload {report_text(st['last_reload'])}")
    return "\n".join(lines)
