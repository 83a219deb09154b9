"""What one forkreload process sends another: the one place that says so.

Three conversations, each authenticated with the session's key:

- **front end <-> controller**: the Jupyter protocol, passed through
  unchanged, plus forkreload's additions listed here: the reload report in
  an execute reply's metadata (`REPLY_METADATA_KEY`), the tag of each
  stream message forkreload writes itself (`TAG_*` under the same metadata
  key), and the control request a `Session` sends for status and restarts
  (`CONTROL_REQUEST` / `CONTROL_REPLY`);
- **controller <-> worker agent**: agent calls as shell messages of their
  own (`AGENT_REQUEST` carrying an `AgentRequest`, answered by an
  `AGENT_REPLY` whose content is the call's answer, one TypedDict per call
  below), and the events the agent publishes on iopub for the controller
  alone (`MODULES_EVENT`, `COMMAND_EVENT`);
- **controller <-> snapshot**: dicts over the private `Channel` (the
  `Snapshot*` types).

Everything crossing a process boundary is JSON; the `Reload` report is the
one structure read on several sides (controller, notices, Session, console),
so it is a dataclass with an exact round trip through `as_dict`/`from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, TypedDict

__all__ = [
    "AGENT_CALLS",
    "AGENT_REPLY",
    "AGENT_REQUEST",
    "COMMAND_EVENT",
    "CONTROL_REPLY",
    "CONTROL_REQUEST",
    "INTERNAL_IDENT",
    "MODULES_EVENT",
    "REPLY_METADATA_KEY",
    "TAG_COMMAND",
    "TAG_NOTICE",
    "TAG_PROGRESS",
    "AgentRequest",
    "CommandEvent",
    "ExportAnswer",
    "LoadAnswer",
    "ModuleInfo",
    "ModulesAnswer",
    "ModulesEvent",
    "Reload",
    "ReloadAnswer",
    "SnapshotExited",
    "SnapshotFork",
    "SnapshotForked",
    "SnapshotHello",
]

# -- controller <-> worker agent ------------------------------------------------

AGENT_REQUEST = "forkreload_request"
AGENT_REPLY = "forkreload_reply"
# The zmq identity the controller's agent calls carry: replies to it are the
# controller's own and never reach a front end.
INTERNAL_IDENT = b"forkreload-internal"
# iopub events of the agent, read by the controller and never forwarded.
MODULES_EVENT = "forkreload_modules"
COMMAND_EVENT = "forkreload_command"

AgentCall = Literal["modules", "export", "load", "inplace", "checkpoint", "checkpoint_info"]
AGENT_CALLS: frozenset[str] = frozenset({"modules", "export", "load", "inplace", "checkpoint", "checkpoint_info"})


class CheckpointAnswer(TypedDict, total=False):
    """What `checkpoint` did: forked one (its pid, after which cell), or not and why."""

    taken: bool
    pid: int
    cell: int
    why: str
    seconds: float  # the fork, as the worker's main thread paid it


class CheckpointInfo(TypedDict):
    """Whether the state changed since the worker's last checkpoint, and the
    checkpoints it forked (so the controller can wait for them to connect)."""

    dirty: bool
    cell: int
    pids: list[int]
    names: list[str]  # the user's variables


class AgentRequest(TypedDict):
    method: str  # one of AGENT_CALLS
    args: list[Any]


class ModuleInfo(TypedDict):
    """One user module as the worker executed it."""

    name: str
    file: str  # real path of its source
    sha: str  # sha256 of the source bytes executed


class ModulesAnswer(TypedDict):
    """`modules()`: every user module the worker imported so far."""

    modules: list[ModuleInfo]


class ModulesEvent(TypedDict):
    modules: list[ModuleInfo]  # user modules imported since the last event
    third_party: list[str]  # top-level libraries worth preloading next time


class CommandEvent(TypedDict):
    cmd: str  # status | fresh | back | mode | quiet
    args: list[str]


class AgentError(TypedDict):
    """Any call's answer when the agent itself failed (never raised)."""

    ok: Literal[False]
    error: str
    internal: bool


class ExportAnswer(TypedDict, total=False):
    """`export(path)`: the old worker dumped its namespace at `path`."""

    ok: bool
    error: str
    saved: list[str]
    lost: dict[str, str]  # variable -> why it could not be pickled
    reset: list[str]  # module state a fresh import will not reproduce
    groups: list[list[str]]  # variables pickled together (shared objects)
    inband_bytes: int
    buffer_bytes: int
    seconds: float


class LoadAnswer(TypedDict, total=False):
    """`load(path, changed_files)`: the new worker imported the user's modules
    (in the order the cells asked for them) and loaded what it could of the
    namespace. One round trip: the modules it now runs come back with it."""

    ok: bool  # False: a module failed to import (module, error); nothing loaded
    module: str
    error: str
    loaded: list[str]
    failed: dict[str, str]  # variable -> why it cannot be rebuilt with the new code
    notes: list[str]  # process-wide settings that could not be carried
    gone: list[str]  # user modules whose files no longer exist
    modules: list[ModuleInfo]
    seconds: float


class ReloadAnswer(TypedDict, total=False):
    """`inplace(files, mode)`: the in-place decision, patched when in place."""

    kind: Literal["inplace", "partial", "fresh", "error"]
    reasons: list[str]  # every reason, every file
    patched: list[str]
    added: list[str]
    notes: list[str]  # what the patch kept that a fresh process would not have
    cleared: dict[str, int]  # functools caches emptied (dotted name -> entries dropped)
    files: dict[str, str]  # path -> sha now running
    seconds: float
    ok: bool  # False with error: the agent failed
    error: str


# -- front end <-> controller ---------------------------------------------------------

# Key of forkreload's entries in Jupyter message metadata: the report in an
# execute reply, the tag of forkreload's own stream messages.
REPLY_METADATA_KEY = "forkreload"
TAG_NOTICE = "notice"  # what forkreload did before the cell ran
TAG_PROGRESS = "progress"  # a status line, cleared before the notice
TAG_COMMAND = "command"  # the answer to a %forkreload magic

# Sent by `Session` on the control channel: {"cmd": "status" | "restart"}.
CONTROL_REQUEST = "forkreload_control_request"
CONTROL_REPLY = "forkreload_control_reply"


@dataclass
class Reload:
    """What forkreload did before a cell ran, because of an edit or a request.

    The controller builds it, `notices` turns it into the cell's line, and it
    travels to clients in the execute reply's metadata (`Session` reads it
    back with `from_dict`).
    """

    mode: str  # 'inplace' (patched), 'fresh' (a new worker), 'none' (nothing applied)
    ok: bool = False  # False: the old code ran the cell (see error)
    reason: str = ""  # the headline: why this happened
    reasons: list[str] = field(default_factory=list)  # every reason in place was ruled out
    modules: list[str] = field(default_factory=list)  # user modules whose files changed
    files: list[str] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)  # fresh: variables carried over
    lost: dict[str, str] = field(default_factory=dict)  # name -> why ('*' = everything)
    patched: list[str] = field(default_factory=list)  # inplace: functions whose code changed
    added: list[str] = field(default_factory=list)  # inplace: functions and methods added
    notes: list[str] = field(default_factory=list)  # kept or reset state a fresh process differs on
    previous: bool = False  # fresh: the previous worker is kept (%forkreload back)
    error: str | None = None
    failed_module: str | None = None
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Reload | None:
        if not d:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- controller <-> snapshot ------------------------------------------------------------


class SnapshotHello(TypedDict, total=False):
    """The snapshot's first message: what it preloaded and how that went."""

    op: Literal["hello"]
    pid: int
    python: str
    preload: dict[str, float]  # module -> import seconds
    preload_failed: dict[str, str]
    kernel_failed: dict[str, str]
    seconds: float
    threads: dict[str, Any]
    modules: int
    preload_files: list[ModuleInfo]  # preloaded modules that are the user's own code


class SnapshotFork(TypedDict):
    """Controller -> snapshot: fork worker `wid` in `cwd`."""

    op: Literal["fork"]
    wid: int
    cwd: str


class SnapshotForked(TypedDict, total=False):
    """Snapshot -> controller: the worker's pid (its pidfd rides along), or why not."""

    op: Literal["fork"]
    pid: int
    wid: int
    error: str


class SnapshotExited(TypedDict):
    """Snapshot -> controller: a worker ended (only its parent can learn how)."""

    op: Literal["exited"]
    pid: int
    status: str  # 'was killed by SIGSEGV', 'exited with status 1'
