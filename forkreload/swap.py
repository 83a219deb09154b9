"""The controller's edit side: which code the next cell runs, and in which worker.

The proxy (`controller.Controller`) asks `Swapper.before_cell` right before
each cell reaches an idle worker. The swapper looks at the user's files,
decides with the worker's agent between patching in place and a fresh
worker, runs the swap (or the snapshot rebuild), and says what it did in
the cell. It also owns the workers' lives: crash replacement, a front
end's clean restart, `%forkreload back`.

Invariants:
- `switch` is the only place the current worker changes, and it resets
  everything tied to a worker (watched files, comms, what is known stale).
- A failed swap leaves the old worker current and untouched.
- The worker never runs older code than the files hold without the cell
  saying so (`Stale`, reminded on every cell until a new save).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import notices
from .checkpoint import assigned_names
from .config import MODES, LearnedModules, Settings
from .migrate import remove_dump
from .pool import ControllerError, Stopping, WorkerDied, WorkerHandle, WorkerPool
from .protocol import LoadAnswer, ModuleInfo, Reload
from .timeline import Checkpoint, Timeline, unique_memory
from .watch import SourceWatch

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["Stale", "Swapper"]

log = logging.getLogger("forkreload.swap")

Changed = dict[str, "str | None"]  # path -> new content hash (None: file gone)
# WorkerPool's constructor: (zmq context, key, private dir, settings, preloads, worker ids).
# A checkpoint is taken once the worker has been idle this long after a cell:
# cells sent back to back (a script, "Run all") are not slowed by forks, and
# the fork does not wait for IPython's history write of the cell just done.
CHECKPOINT_DELAY = 0.05

PoolFactory = Callable[[Any, bytes, str, Settings, list[str], "itertools.count[int]"], WorkerPool]


def _room_for_previous(data_bytes: int) -> bool:
    """Whether keeping the old worker (its own copy of `data_bytes`) beside
    the new one leaves memory to spare: at most a quarter of what is
    available now, or FORKRELOAD_PREVIOUS_BUDGET bytes when set."""
    budget = os.environ.get("FORKRELOAD_PREVIOUS_BUDGET")
    if budget is not None:
        return data_bytes <= int(budget)
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return data_bytes <= available // 4


def _preloaded_files(pool: WorkerPool) -> dict[str, str]:
    """The user's files a snapshot preloaded: path -> content hash."""
    return {m["file"]: m["sha"] for m in pool.info.get("preload_files", [])}


class _SwapFailed(Exception):
    """The fresh worker refused the user's code; the report says why."""


@dataclass
class Stale:
    """An edit the current worker does not run, and why; reminded every cell."""

    changed: frozenset[tuple[str, str | None]]  # the files' content when it was decided
    why: str

    def files(self) -> list[str]:
        return sorted(os.path.basename(p) for p, _ in self.changed)


class Swapper:
    """Policy and worker switching for one controller."""

    def __init__(self, proxy: Controller, settings: Settings, pool_factory: PoolFactory = WorkerPool) -> None:
        self.proxy = proxy
        self.settings = settings
        # Tests give a pool of tiny fake kernels here (tests/fake_worker.py).
        self.pool_factory = pool_factory
        self.watch = SourceWatch()
        self.pool: WorkerPool | None = None
        self.previous: WorkerHandle | None = None  # kept after a swap, for %forkreload back
        self._wids = itertools.count(1)
        self.stale: Stale | None = None
        self.force_fresh = False
        self.fresh_reason = "restart requested"  # what a forced fresh worker's notice says
        self.back_requested = False
        self.pending_report: Reload | None = None  # told with the next cell (a crash)
        self.last_report: Reload | None = None
        self.want_spare = False
        self.spare_held = False  # until the first cell's reply (`start`)
        self.start_build: WorkerPool | None = None  # the full snapshot of a start, when the first worker did not wait for it
        self.check_times: collections.deque[float] = collections.deque(maxlen=500)
        self.learned = LearnedModules(settings.project_root) if settings.learn else None
        # In-session learning: the libraries the session's workers imported,
        # a snapshot being built with them beside the current one, and the
        # snapshots replaced while a worker of theirs still lives.
        self.libs: set[str] = set()
        self.unlearnable: set[str] = set()  # failed to preload: not tried again
        self.building: WorkerPool | None = None
        self.old_pools: list[WorkerPool] = []
        self._told_imports = False
        # Checkpoints: the saved states, an undo asked for, and the cells
        # (execution count, code) run since, whose values a restore loses.
        self.timeline = Timeline(proxy.privdir, proxy.key, settings.checkpoints, self._live_worker_pids)
        self.undo_requested: int | None = None
        self.checkpoint_due: float | None = None  # when to ask for one, if the worker is still idle
        self.cells: list[tuple[int | None, str, str]] = []  # (count once known, code, msg_id)
        self.inputs: dict[int, str] = {}  # every cell's text by number, undone ones too (the input history)
        # Worker pid -> the preloaded files of the user's it runs (path -> sha):
        # a restored copy runs its snapshot's, which a rebuild may have replaced.
        self.preloaded_by: dict[int, dict[str, str]] = {}

    # -- start and stop --------------------------------------------------------

    def start(self, meanwhile: Callable[[], None] = lambda: None) -> None:
        """A snapshot, the first worker, and a spare behind it; `meanwhile`
        runs while the first worker starts (in its own process).

        When the snapshot server of the full preload set is not up yet, the
        first worker does not wait for those imports: it comes from a server
        holding the kernel machinery only (up at once, or as fast as a plain
        kernel's imports), while the full one builds in the background as a
        learning build does; forks come from it once it is ready.
        """
        preload = self.preload_list()
        full = self._make_pool(preload)
        if preload and not full.warm():
            self.pool = self.new_pool(self._make_pool([]))
            try:
                # A head start for the first cell, which often imports them too.
                full.launch_later(1.0)
                self.building = self.start_build = full
            except (OSError, ControllerError) as exc:
                log.warning("could not start a snapshot with %s: %s", preload, exc)
                full.close()
        else:
            self.pool = self.new_pool(full)
        self.pool.refill_spare()  # forked now, waited for below
        meanwhile()
        self.switch(self.pool.take_spare(), None)
        # The spare waits for the first cell's reply: started now, it would
        # compete for the CPUs with the first worker's start and first cell
        # (often the heavy imports).
        self.spare_held = True

    def new_pool(self, pool: WorkerPool | None = None) -> WorkerPool:
        """Start a snapshot (with this session's preloads) and report on it."""
        if pool is None:
            pool = self._make_pool(self.preload_list())
        try:
            hello = pool.start()
        except BaseException:
            pool.close()
            raise
        self._check_hello(hello)
        return pool

    def _make_pool(self, preload: list[str]) -> WorkerPool:
        proxy = self.proxy
        factory = self.pool_factory
        if factory is WorkerPool and self.settings.server:
            from .pool import ServerPool

            factory = ServerPool  # the user's shared snapshot server
        return factory(proxy.ctx, proxy.key, proxy.privdir, self.settings, preload, self._wids)

    def _check_hello(self, hello: dict[str, Any]) -> None:
        """What a new snapshot says about its preloads: failures are
        forgotten from what is learned, threads started by them warned about."""
        failed = hello.get("preload_failed", {})
        for name, why in failed.items():
            if name in self.settings.preload:
                log.warning("preload %s failed: %s", name, why)
        if self.learned is not None:
            self.learned.forget(list(failed))
        risky = hello.get("threads", {}).get("risky")
        if risky:
            log.warning("preload modules started threads %s: forking with them is a fork-safety risk", risky)
        log.debug("snapshot %s ready in %.3f s, preloaded %s", hello.get("pid"), hello.get("seconds", 0.0), list(hello.get("preload", {})))

    def preload_list(self) -> list[str]:
        """The explicit preloads, then what this project's sessions imported before."""
        names = list(self.settings.preload)
        if self.learned is not None:
            names += [m for m in self.learned.modules if m not in names]
        return names

    def workers(self) -> list[WorkerHandle]:
        """Every live worker of the session (current, spare, previous)."""
        found = [self.proxy.worker, self.pool.spare if self.pool else None, self.previous]
        return [w for w in found if w is not None and w.pidfd >= 0]

    def close(self) -> None:
        self.timeline.close()
        if self.previous is not None:
            self._retire(self.previous)
        for pool in [self.building, *self.old_pools, self.pool]:
            if pool is not None:
                pool.close()

    def tick(self) -> None:
        """Between messages: a spare is forked once the cell is on its way."""
        # (While the start's build runs, a spare of the kernel-only server
        # would be retired unused once it is ready, its start competing
        # with the first cells, often the heavy imports.)
        held = self.spare_held or (self.building is not None and self.building is self.start_build)
        if self.want_spare and self.pool is not None and not held and self.pool.prepared:
            self.pool.refill_spare()
            self.want_spare = False
            self.proxy.debugger.prepare_spare(self.pool.spare)
        w = self.proxy.worker
        idle = w is None or not w.inflight
        self.timeline.tick(idle=idle)
        due = self.checkpoint_due
        if due is not None and time.monotonic() >= due:
            self.checkpoint_due = None
            if w is not None and not w.dead and idle and not self.proxy.held:
                self.proxy.post_agent(w, "checkpoint", self.timeline.sock_path)
        if self.building is not None and self.building.starting_failed():
            log.warning("the snapshot built to learn %s exited before it was ready", self.building.preload)
            self.unlearnable.update(self._missing(self.pool))
            self.building.close()
            self.building = None

    # -- switching workers ---------------------------------------------------------

    def switch(self, new: WorkerHandle | None, parent: dict[str, Any] | None, *, keep_old: bool = False,
               modules: list[ModuleInfo] | None = None) -> None:
        """Make `new` the current worker; the one place this happens.

        The old worker's last output is forwarded first; it is then kept as
        the previous worker (`keep_old`) or ended. Everything tied to a
        worker is reset: its comms (closed visibly), the files watched (now
        those `new` imported), what was known stale, a forced swap.
        """
        proxy = self.proxy
        old = proxy.worker
        if old is not None and not old.dead:
            proxy.drain(old)
        proxy.worker = new
        if new is not None:
            self.timeline.workers.add(new.pid)
            if new.pool is not None:
                self.preloaded_by[new.pid] = _preloaded_files(new.pool)
            elif new.origin is not None:
                self.preloaded_by[new.pid] = self.preloaded_by.get(new.origin.worker_pid, {})
        proxy.close_comms(parent)
        self.watch.clear()
        for m in modules or []:
            self.watch.add(m["name"], m["file"], m["sha"])
        self.stale = None
        self.force_fresh = False
        if old is not None:
            if keep_old and not old.dead:
                if self.previous is not None:
                    self._retire(self.previous)
                self.previous = old
            else:
                self._retire(old)
        self._close_unused_pools()
        proxy.debugger.switched(old, new, parent, self.previous)
        self.want_spare = True
        log.debug("current worker: %s (previous %s)", new.pid if new else None, self.previous.pid if self.previous else None)

    def _retire(self, w: WorkerHandle) -> None:
        if w is self.previous:
            self.previous = None
        if self.pool is not None:
            self.pool.retire(w)
        else:
            w.kill()
            w.close()

    def worker_exited(self, w: WorkerHandle) -> None:
        """A worker's process ended: the current one means a crash."""
        w.dead = True
        assert self.pool is not None
        if w is not self.proxy.worker:
            self._retire(w)  # the spare, or the previous worker
            return
        status = self._exit_status(w)
        if self._restore_after_crash(w, status):
            return
        why = notices.crash_reason(status)
        self.proxy.fail_inflight(w, why)
        try:
            spare: WorkerHandle | None = self.pool.take_spare()
        except (WorkerDied, ControllerError) as exc:
            log.error("could not start a fresh worker: %s", exc)
            spare = None
        self.switch(spare, None)
        self.pending_report = Reload("fresh", ok=True, reason=why, lost={"*": why})
        log.debug("worker %s died: %s", w.pid, why)

    def _exit_status(self, w: WorkerHandle) -> str:
        """How a worker ended, as its parent (a snapshot or a checkpoint) saw it."""
        source = w.origin or w.pool or self.pool
        assert source is not None
        status: str = source.exit_status(w.pid)
        return status

    def _restore_after_crash(self, w: WorkerHandle, status: str) -> bool:
        """The current worker died: the newest checkpoint becomes the worker.
        The next cell says which state came back and what was lost."""
        self.timeline.accept()
        for cp in reversed(self.timeline.live()):
            try:
                crashed = self._crashed_cell()
                (new, modules), names = self._restore(cp, crashed + 1 if crashed is not None else 0)
            except (WorkerDied, ControllerError, KeyError) as exc:
                log.warning("checkpoint %d could not be restored: %s", cp.pid, exc)
                if not cp.in_use():
                    self.timeline.drop(cp)
                continue
            lost = self._lost_since(cp, names)
            self.proxy.fail_inflight(w, notices.crash_restored(status, cp.cell))
            if self.previous is not None:
                self._retire(self.previous)
            self.switch(new, None, modules=modules)
            self._fresh_if_preloads_changed(new)
            why = notices.restored_text(status, crashed if crashed is not None and crashed > cp.cell else None, cp.cell, cp.age(), lost, cp.threads)
            self.pending_report = Reload("restore", ok=True, reason=why, lost={n: "set by a cell after the checkpoint" for n in lost})
            log.debug("worker %s died: %s; restored checkpoint %d (cell %d)", w.pid, status, cp.pid, cp.cell)
            return True
        return False

    def _restore(self, cp: Checkpoint, count: int) -> tuple[tuple[WorkerHandle, list[ModuleInfo]], list[str]]:
        """A worker from checkpoint `cp` whose next cell is number `count`:
        (worker, its modules), its variable names."""
        proxy = self.proxy
        inputs = {n: code for n, code in self.inputs.items() if cp.cell < n < count}
        new = cp.restore(proxy.ctx, proxy.privdir, proxy.key, next(self._wids), count, inputs)
        try:
            info = proxy.call_agent(new, "checkpoint_info")
            modules = proxy.call_agent(new, "modules")["modules"]
        except BaseException:
            new.kill()
            new.close()
            raise
        return (new, modules), list(info.get("names", []))

    def _lost_since(self, cp: Checkpoint, names: list[str]) -> list[str]:
        """Names bound by the cells run after checkpoint `cp`: their values
        are those of the checkpoint now, or gone."""
        lost: list[str] = []
        for n, code, _ in self.cells:
            if n is None or n > cp.cell:
                lost += [name for name in assigned_names(code) if name not in lost and not name.startswith("_")]
        self.cells = [c for c in self.cells if c[0] is not None and c[0] <= cp.cell]
        return lost

    def _crashed_cell(self) -> int | None:
        """The number of the cell the worker died in (it may have died before
        saying it, as a segfault does: then the one after the last known)."""
        known = [n for n, _, _ in self.cells if n is not None]
        if not self.cells:
            return None
        last = self.cells[-1][0]
        return last if last is not None else (max(known) + 1 if known else None)

    def after_cell(self, w: WorkerHandle) -> None:
        """A cell ended in the current worker (its reply and idle are out): a
        checkpoint is asked for once the worker stays idle for CHECKPOINT_DELAY
        (and no cell waits); the worker decides whether the cell changed anything."""
        self.spare_held = False
        if self.timeline.enabled and w is self.proxy.worker and not w.dead:
            self.checkpoint_due = time.monotonic() + CHECKPOINT_DELAY

    def _fresh_if_preloads_changed(self, w: WorkerHandle) -> None:
        """A restored copy runs the preloaded modules of the user's as its
        snapshot held them: if the snapshot was rebuilt since (one of them
        was edited), the next cell takes a fresh worker of the current one."""
        if self.pool is None:
            return
        now = _preloaded_files(self.pool)
        then = self.preloaded_by.get(w.pid, {})
        if then != now:
            files = sorted(os.path.basename(p) for p in set(now) ^ set(then) | {p for p in now if then.get(p) != now[p]})
            self.force_fresh = True
            self.fresh_reason = f"the restored state holds {', '.join(files)} from before its last edit"

    def fresh_for_debugger(self) -> None:
        """The front end debugs, and the current worker was restored from a
        checkpoint: debugpy cannot serve it (its state in the copy belongs to
        threads that are gone), so the next cell runs in a fresh worker,
        values migrated, where the debug session is replayed."""
        w = self.proxy.worker
        if w is not None and w.origin is not None:
            self.force_fresh = True
            self.fresh_reason = "the debugger needs a fresh worker (this one was restored from a checkpoint)"

    def _live_worker_pids(self) -> list[int]:
        return [w.pid for w in (self.proxy.worker, self.previous) if w is not None and not w.dead and w.pidfd >= 0]

    def poll_timeout(self) -> int:
        """Milliseconds the controller may wait for a message before `tick`."""
        wait = 50 if self.timeline.waiting else 1000  # a checkpoint's hello on its way
        if self.checkpoint_due is None:
            return wait
        return min(max(int((self.checkpoint_due - time.monotonic()) * 1000) + 1, 0), wait)

    def cell_routed(self, msg_id: str, code: str) -> None:
        """A cell goes to the current worker: what a restore would lose."""
        self.cells.append((None, code, msg_id))
        if len(self.cells) > 200:
            del self.cells[:100]

    def cell_started(self, msg_id: str, count: int) -> None:
        """The worker's execute_input: the cell's number."""
        for i in range(len(self.cells) - 1, -1, -1):
            if self.cells[i][2] == msg_id:
                self.cells[i] = (count, self.cells[i][1], msg_id)
                self.inputs[count] = self.cells[i][1]
                if len(self.inputs) > 10000:
                    del self.inputs[min(self.inputs)]
                return

    def undo(self, parent: dict[str, Any] | None, n: int) -> str:
        """The state before the last `n` cells that changed it comes back in a
        worker restored from a checkpoint; the current worker ends."""
        w = self.proxy.worker
        if not self.timeline.enabled:
            return notices.undo_text(None, 0, [], "checkpoints are off (setting checkpoints = 0)")
        if w is None or w.dead:
            return notices.undo_text(None, 0, [], "no worker")
        info = self.proxy.call_agent(w, "checkpoint_info")
        self.timeline.wait_for(list(info.get("pids", [])))
        self.timeline.accept()
        items = self.timeline.live()
        index = len(items) - n - (0 if info.get("dirty") else 1)
        if n < 1 or index < 0:
            have = len(items) - (0 if info.get("dirty") else 1)
            return notices.undo_text(None, 0, [], f"{max(have, 0)} earlier state{'s' if have != 1 else ''} kept")
        target = items[index]
        try:
            (new, modules), names = self._restore(target, int(info.get("cell", 0)) + 1)
        except (WorkerDied, ControllerError, KeyError) as exc:
            if not target.in_use():  # the current worker may have come from it
                self.timeline.drop(target)
            return notices.undo_text(None, 0, [], f"the checkpoint could not be restored ({exc})")
        changed = self._lost_since(target, names)
        self.timeline.drop_newer(target)
        if self.previous is not None:
            self._retire(self.previous)
        self.switch(new, parent, modules=modules)
        self._fresh_if_preloads_changed(new)
        return notices.undo_text(target.cell, target.age(), changed, threads=target.threads)

    def ensure_worker(self) -> WorkerHandle:
        """The current worker, starting one if the last could not be."""
        if self.proxy.worker is None:
            assert self.pool is not None
            self.switch(self.pool.take_spare(), None)
        assert self.proxy.worker is not None
        return self.proxy.worker

    def clean_restart(self) -> None:
        """A front end's "Restart kernel": a clean worker, nothing migrated."""
        assert self.pool is not None
        self.pending_report = None
        if self.previous is not None:
            self._retire(self.previous)
        self.cells.clear()
        self.inputs.clear()
        try:
            new: WorkerHandle | None = self.pool.take_spare()
        except (WorkerDied, ControllerError) as exc:
            log.error("could not start a fresh worker: %s", exc)
            new = None
        old = self.proxy.worker
        if old is not None:
            old.dead = True  # nothing it still says matters
        self.switch(new, None)
        for cp in self.timeline.live():  # a restart is a clean slate: nothing to undo to
            self.timeline.drop(cp)

    def back(self, parent: dict[str, Any] | None) -> None:
        """`%forkreload back`: the previous worker is current again, with its values."""
        prev = self.previous
        if prev is None or prev.dead:
            self.proxy.notice(parent, notices.back_text(None, []))
            return
        self.previous = None
        try:
            modules = self.proxy.call_agent(prev, "modules")["modules"]
        except (WorkerDied, KeyError):
            self._retire(prev)
            self.proxy.notice(parent, notices.back_text(None, []))
            return
        self.switch(prev, parent, keep_old=True, modules=modules)
        changed = self._changed()
        if changed:
            # It runs the code from before the edit: say so until the next save.
            self.stale = Stale(frozenset(changed.items()), "went back with %forkreload back")
        self.proxy.notice(parent, notices.back_text(prev.pid, sorted(os.path.basename(p) for p in changed)))

    # -- before each cell --------------------------------------------------------------

    def before_cell(self, parent: dict[str, Any]) -> Reload | None:
        """Bring the idle current worker up to date with the files; the report, if any."""
        went_back = self.back_requested
        if went_back:
            self.back_requested = False
            self.back(parent)
        if self.undo_requested is not None:
            n, self.undo_requested = self.undo_requested, None
            self.proxy.notice(parent, self.undo(parent, n), error=False)
        crash: Reload | None = None
        if self.pending_report is not None:
            # Said first: an edit applied next must not hide that the worker died.
            crash, self.pending_report = self.pending_report, None
            text = crash.reason if crash.mode == "restore" else notices.crash_text(crash.reason)
            self.proxy.notice(parent, text, error=True)
        t0 = time.perf_counter()
        pending = self._pending_change()
        self.check_times.append(time.perf_counter() - t0)
        if pending is not None:
            self.proxy.status_message(parent, "busy")
            forced, self.force_fresh = self.force_fresh, False
            self.fresh_reason = "restart requested"
            return self.apply_edit(parent, *pending, forced=forced)
        if crash is not None:
            return crash
        if self.stale is not None and not went_back:  # the back notice said it already
            self.proxy.notice(parent, notices.stale_reminder(self.stale.files(), self.stale.why), error=True)
        return None

    def edit_pending(self) -> bool:
        """Whether the next cell would first reload something."""
        return self.force_fresh or self.back_requested or self.undo_requested is not None or self._pending_change() is not None

    def _changed(self) -> Changed:
        changed = self.watch.changed()
        if self.pool is not None:
            changed.update(self.pool.watch.changed())
        return changed

    def _pending_change(self) -> tuple[Changed, str] | None:
        """The edit that must be handled before the next cell, if any."""
        if self.force_fresh:
            return self.watch.changed(), self.fresh_reason
        if self.settings.mode == "off":
            return None
        changed = self._changed()
        if not changed:
            self.stale = None
            return None
        if self.stale is not None and self.stale.changed == frozenset(changed.items()):
            return None  # the same content as decided: wait for the next save
        names = ", ".join(os.path.basename(p) for p in sorted(changed))
        return changed, f"{names} changed"

    def _report(self, mode: str, changed: Changed, reason: str, **fields: Any) -> Reload:
        files = sorted(changed)
        return Reload(mode, reason=reason, files=files, modules=self.watch.modules_of([f for f in files if f in self.watch.files]), **fields)

    def _keep_stale(self, changed: Changed, why: str) -> None:
        self.stale = Stale(frozenset(changed.items()), why)

    def apply_edit(self, parent: dict[str, Any] | None, changed: Changed, reason: str, forced: bool = False) -> Reload:
        """Handle an edit before the next cell: in place when safe, else a fresh worker."""
        assert self.pool is not None and self.proxy.worker is not None
        mode = self.settings.mode
        preloaded = sorted(p for p in changed if p in self.pool.watch.files)
        if preloaded:
            names = ", ".join(self.pool.watch.modules_of(preloaded))
            return self._with_progress(parent, self.rebuild_snapshot, changed, f"preloaded {names} changed: new snapshot")
        if forced or mode == "fresh":
            return self._with_progress(parent, self.swap, changed, reason)
        t0 = time.perf_counter()
        try:
            res = self.proxy.call_agent(self.proxy.worker, "inplace", sorted(changed), mode)
        except WorkerDied as exc:
            return self._report("none", changed, str(exc), error=str(exc))
        kind = res.get("kind")
        reasons = list(res.get("reasons") or [])
        log.debug("in-place check of %s: %s %s (%.1f ms, %.1f ms in the agent)", sorted(changed), kind, reasons,
                  (time.perf_counter() - t0) * 1000, res.get("seconds", 0.0) * 1000)
        if kind in ("inplace", "partial"):
            for path, sha in res.get("files", {}).items():
                self.watch.accept(path, sha)
            report = self._report(
                "inplace", changed, reason, ok=True, reasons=reasons, notes=list(res.get("notes", [])),
                patched=res.get("patched", []), added=res.get("added", []),
                seconds=round(time.perf_counter() - t0, 5),
            )
            if report.patched or report.added or report.notes:
                self.proxy.notice(parent, notices.inplace_text(report))
            if kind == "partial":
                self._keep_stale(self._changed(), "mode inplace: it needs a fresh worker")
                self.proxy.notice(parent, notices.not_applied_inplace(reasons), error=True)
            self.last_report = report
            return report
        if kind == "fresh" and mode != "inplace":
            report = self._with_progress(parent, self.swap, changed, reasons[0] if reasons else reason)
            report.reasons = reasons
            return report
        # A parse error, a fresh-only edit in mode 'inplace', or the agent failed.
        if not reasons:
            reasons = [str(res.get("error", "the in-place check failed"))]
        self._keep_stale(changed, "mode inplace: it needs a fresh worker" if kind == "fresh" else reasons[0])
        report = self._report("none", changed, reasons[0], reasons=reasons, error=reasons[0], seconds=round(time.perf_counter() - t0, 5))
        if kind == "fresh":
            self.proxy.notice(parent, notices.not_applied_inplace(reasons), error=True)
        else:
            self.proxy.notice(parent, notices.kept_old_code(reasons), error=True)
        self.last_report = report
        return report

    def swap(self, parent: dict[str, Any] | None, changed: Changed, reason: str, keep_old: bool = True) -> Reload:
        """Replace the current worker by a fresh one holding the same values.

        Variables that cannot be rebuilt with the new code are named as
        lost; the old worker is kept as the previous one (`back`). When the
        new code itself fails to import, the old worker stays current,
        untouched.
        """
        assert self.pool is not None
        t0 = time.perf_counter()
        old = self.proxy.worker
        assert old is not None
        report = self._report("fresh", changed, reason)
        phases = report.phases
        path = os.path.join(self.proxy.privdir, f"ns-{old.wid}-{uuid.uuid4().hex[:6]}")
        new: WorkerHandle | None = None

        def phase(name: str) -> None:
            phases[name] = round(time.perf_counter() - t0, 4)
            log.debug("swap %s: %s at %.1f ms", path, name, phases[name] * 1000)

        try:
            new = self.pool.take_spare()
            phase("spare")
            try:
                exported = self.proxy.call_agent(old, "export", path)
            except Stopping:
                raise
            except WorkerDied:
                return self._died_exporting(parent, old, new, report, path)
            phase("export")
            if exported.get("ok") is False:
                raise WorkerDied(f"could not export the namespace: {exported.get('error')}")
            log.debug("export: %d variables, %d bytes pickled, %d bytes of buffers out of band, groups %s",
                      len(exported.get("saved", [])), exported.get("inband_bytes", 0), exported.get("buffer_bytes", 0), exported.get("groups", []))
            size = exported.get("inband_bytes", 0) + exported.get("buffer_bytes", 0)
            if keep_old and not _room_for_previous(size):
                # Two full copies of a large session would not fit: the old
                # worker ends with the swap, and the cell says so.
                keep_old = False
                report.notes.append(notices.previous_not_kept(size))
            report.lost = dict(exported.get("lost", {}))
            report.notes += list(exported.get("reset", []))
            loaded: LoadAnswer = self.proxy.call_agent(new, "load", path, [f for f in changed if changed[f] is not None])
            phase("load")
            if not loaded.get("ok"):
                report.error = loaded.get("error")
                report.failed_module = loaded.get("module")
                raise _SwapFailed()
        except (_SwapFailed, WorkerDied, ControllerError) as exc:
            if not isinstance(exc, _SwapFailed) and report.error is None:
                report.error = str(exc)
            if new is not None:
                self.pool.retire(new)
            remove_dump(path)
            self.pool.refill_spare()
            report.seconds = round(time.perf_counter() - t0, 4)
            if report.failed_module:
                self._keep_stale(changed, f"{report.failed_module} failed to import")
            else:
                self._keep_stale(changed, "the fresh worker failed")
            self.proxy.notice(parent, notices.failure_text(report), error=True)
            self.last_report = report
            log.debug("swap failed after %.1f ms: %s", report.seconds * 1000, report.error)
            return report
        remove_dump(path)
        report.migrated = list(loaded.get("loaded", []))
        imported = sorted(self._missing(self.pool))
        if imported and not self._told_imports:
            self._told_imports = True
            building = " (a snapshot holding them is being built)" if self.building is not None else ""
            report.notes.append(f"the new worker imported {', '.join(imported)} itself{building}")
        report.lost.update(loaded.get("failed", {}))
        report.notes += loaded.get("notes", [])
        log.debug("load: %d variables in %.1f ms (agent side); modules gone: %s", len(report.migrated), loaded.get("seconds", 0.0) * 1000, loaded.get("gone", []))
        report.previous = keep_old
        if not keep_old and self.previous is not None:
            self._retire(self.previous)  # the one before: older than what `back` promises
        self.switch(new, parent, keep_old=keep_old, modules=loaded.get("modules", []))
        phase("switch")
        if not keep_old:
            # The old worker's checkpoints now hold its pages alone: the
            # budget decides at once whether they stay.
            self.timeline.enforce()
        report.ok = True
        report.seconds = round(time.perf_counter() - t0, 4)
        self.proxy.notice(parent, notices.fresh_text(report))
        self.last_report = report
        return report

    def _died_exporting(self, parent: dict[str, Any] | None, old: WorkerHandle, new: WorkerHandle, report: Reload, path: str) -> Reload:
        """The old worker died while its values were exported: a crash, not
        a failed swap. The fresh worker, which is fine, takes over empty."""
        assert self.pool is not None
        remove_dump(path)
        why = notices.crash_reason((old.pool or self.pool).exit_status(old.pid))
        self.proxy.fail_inflight(old, why)
        self.switch(new, parent)
        report.ok, report.lost, report.reason = True, {"*": why}, why
        self.proxy.notice(parent, notices.crash_text(why), error=True)
        self.last_report = report
        log.debug("worker %s died during export: %s", old.pid, why)
        return report

    def rebuild_snapshot(self, parent: dict[str, Any] | None, changed: Changed, reason: str) -> Reload:
        """A preloaded module of the user's changed: a new snapshot, then a swap from it.

        The old snapshot is the parent of the current worker (which dies
        with it), so it is ended only once the swap succeeded; no previous
        worker can be kept across it.
        """
        old = self.pool
        assert old is not None
        if self.building is not None:
            # It would hold the module as it was before this edit.
            self.building.close()
            self.building = None
        try:
            self.pool = self.new_pool()
        except ControllerError as exc:
            self.pool = old
            self._keep_stale(changed, "the new snapshot failed")
            self.proxy.notice(parent, notices.snapshot_failed(str(exc)), error=True)
            return self._report("fresh", changed, reason, error=str(exc))
        if self.previous is not None:
            old.retire(self.previous)
            self.previous = None
        report = self.swap(parent, changed, reason, keep_old=False)
        if report.ok:
            old.close()
        else:
            self.pool.close()
            self.pool = old
        return report

    def _with_progress(self, parent: dict[str, Any] | None, step: Callable[[Any, Changed, str], Reload],
                       changed: Changed, reason: str) -> Reload:
        """Run a swap with a status line in the cell while it waits (cleared
        before the final notice, so a notebook keeps only the notice)."""
        self.proxy.progress(parent, notices.progress_text(reason))
        report = step(parent, changed, reason)
        self.proxy.clear_progress(parent)
        return report

    # -- requests from the user --------------------------------------------------------

    def command(self, parent: dict[str, Any], cmd: str, args: list[str]) -> None:
        """`%forkreload ...` typed in a cell: answered into that cell's output."""
        if cmd == "fresh":
            self.force_fresh = True
            text = notices.command_text("fresh", "")
        elif cmd == "back":
            # This cell runs in the current worker: switch before the next one.
            self.back_requested = True
            text = notices.command_text("back", "")
        elif cmd == "undo":
            n = int(args[0]) if args and args[0].isdigit() else 1
            self.undo_requested = n
            text = notices.command_text("undo", f"the last {n} cells that changed it" if n > 1 else "the last cell that changed it")
        elif cmd == "checkpoints":
            self.timeline.accept()
            self.timeline.enforce()
            prev = self.previous
            previous = {"pid": prev.pid, "uss": unique_memory(prev.pid)} if prev is not None and not prev.dead else None
            text = notices.checkpoints_text([c.describe() for c in self.timeline.live()], self.timeline.budget, self.timeline.enabled, previous, self.timeline.used)
        elif cmd == "mode":
            if len(args) != 1 or args[0] not in MODES:
                text = notices.command_text("mode", self.settings.mode, MODES)
            else:
                self.settings.mode = args[0]
                self.stale = None
                text = notices.command_text("mode", args[0])
        elif cmd == "quiet":
            self.settings.quiet = not args or args[0] in ("on", "yes", "true", "1")
            text = notices.command_text("quiet", "on" if self.settings.quiet else "off")
        else:
            text = notices.status_text(self.status())
        self.proxy.command_output(parent, text)

    def restart(self) -> Reload:
        """`Session.restart()`: a fresh worker with the values, edits or not."""
        return self.swap(None, self.watch.changed(), "restart requested")

    def on_modules(self, modules: list[ModuleInfo], third_party: list[str]) -> None:
        """The current worker imported user modules (and libraries) in a cell."""
        for m in modules:
            self.watch.add(m["name"], m["file"], m["sha"])
        if self.learned is not None and third_party:
            self.learned.add(third_party)
            self.libs.update(third_party)
            if self.pool is not None:
                self._prune_learned(self.pool)
            self._learn()

    # -- in-session learning ---------------------------------------------------------------

    def _missing(self, pool: WorkerPool | None) -> set[str]:
        """Libraries the session imported that `pool`'s snapshot does not hold."""
        if pool is None:
            return self.libs - self.unlearnable
        return self.libs - self.unlearnable - set(pool.preload) - set(pool.info.get("libs", ()))

    def _prune_learned(self, pool: WorkerPool) -> None:
        """Forget what `pool`'s snapshot holds without preloading it by name:
        the libraries its preloads import themselves. The first worker of a
        start comes from a snapshot of the kernel only, so importing torch
        there reports torch and the ~20 libraries torch imports; learning
        those would give the next kernel another preload set than the one
        its snapshot was built with, and another server holding torch."""
        if self.learned is None:
            return
        brought = set(pool.info.get("libs", ())) - set(pool.preload) - set(self.settings.preload)
        self.learned.forget(sorted(brought))

    def _learn(self) -> None:
        """Build a snapshot that also holds the libraries the session imported,
        beside the current one; a swap never waits for it."""
        if self.building is not None or self.pool is None or not self._missing(self.pool):
            return
        pool = self._make_pool([*self.pool.preload, *sorted(self._missing(self.pool))])
        try:
            pool.launch()
        except (OSError, ControllerError) as exc:
            log.warning("could not start a snapshot to learn %s: %s", sorted(self._missing(self.pool)), exc)
            pool.close()
            return
        self.building = pool
        log.debug("building a snapshot with %s in the background", pool.preload)

    def pending_fileno(self) -> int | None:
        """A descriptor readable when the snapshot being built is ready to connect."""
        return self.building.pending_fileno() if self.building is not None else None

    def building_ready(self) -> None:
        """The snapshot built in the background connected: forks come from it now."""
        pool, self.building = self.building, None
        assert pool is not None and self.pool is not None
        try:
            hello = pool.connect()
        except ControllerError as exc:
            log.warning("the snapshot built to learn %s failed: %s", pool.preload, exc)
            self.unlearnable.update(self._missing(self.pool))
            pool.close()
            return
        self._check_hello(hello)
        self.unlearnable.update(hello.get("preload_failed", {}))
        old, self.pool = self.pool, pool
        self._prune_learned(pool)
        if old.spare is not None:
            old.retire(old.spare)
        self.old_pools.append(old)
        self._close_unused_pools()
        self.want_spare = True
        log.debug("snapshot %s now serves forks (preloaded %s)", hello.get("pid"), list(hello.get("preload", {})))
        self._learn()  # what the session imported meanwhile

    def _close_unused_pools(self) -> None:
        """End the replaced snapshots that no live worker was forked from
        (a worker dies with its snapshot)."""
        live = {id(w.pool) for w in (self.proxy.worker, self.previous) if w is not None and not w.dead}
        for pool in [p for p in self.old_pools if id(p) not in live]:
            self.old_pools.remove(pool)
            pool.close()

    def status(self) -> dict[str, Any]:
        """What a user asks `%forkreload status` or `Session.status()` for."""
        snap = self.pool.info if self.pool is not None else {}
        worker = self.proxy.worker
        self.timeline.accept()
        self.timeline.enforce()  # the figures shown are measured now
        return {
            "mode": self.settings.mode,
            "cwd": self.settings.cwd,
            "settings": self.settings.as_dict(),
            "learned": list(self.learned.modules) if self.learned is not None else None,
            "snapshot": {
                "pid": snap.get("pid"),
                "preload": snap.get("preload", {}),
                "preload_failed": snap.get("preload_failed", {}),
                "seconds": snap.get("seconds"),
                "threads": snap.get("threads", {}),
            },
            "worker_pid": worker.pid if worker else None,
            "spare_pid": self.pool.spare.pid if self.pool is not None and self.pool.spare else None,
            "previous_pid": self.previous.pid if self.previous else None,
            "learning": list(self.building.preload) if self.building is not None else None,
            "checkpoints": [c.describe() for c in self.timeline.live()],
            "checkpoint_budget": self.timeline.budget,
            "checkpoint_memory": self.timeline.used,
            "last_checkpoint": self.proxy.posted.get("checkpoint"),
            "watched": dict(self.watch.modules),
            "stale": f"{', '.join(self.stale.files())}: {self.stale.why}" if self.stale else None,
            "last_reload": self.last_report.as_dict() if self.last_report else None,
            "check_us": statistics.median(self.check_times) * 1e6 if self.check_times else None,
        }


