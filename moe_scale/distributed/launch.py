"""Run a function on N local processes joined in a gloo process group (tests, benchmarks).

`run_local(fn, world_size, *args)` starts `world_size` processes from a forkserver that has
imported torch once, so a process starts in well under a second. They rendezvous through a
`FileStore` in a fresh temporary directory (no port is ever chosen), call
`fn(rank, world_size, *args)` and send its return value back. A rank that raises, dies or
outlives `timeout` fails the whole run with every rank's traceback; the others are killed, so
a hang is reported as a failure instead of blocking the caller.

Multi-node jobs use a real launcher (torchrun, deepspeed); this is the one-box path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import subprocess
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; `errors[rank]` holds each failure's text."""

    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        details = "\n".join(f"--- rank {r} ---\n{text}" for r, text in sorted(errors.items()))
        super().__init__(f"{len(errors)} rank(s) failed:\n{details}")


# Imported once by the forkserver, not by every rank: torch._dynamo alone takes seconds and
# DistributedDataParallel imports it.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "moe_scale.moe"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _worker(fn, rank: int, world_size: int, store_path: str, collective_timeout_s: float,
            threads: int, args: tuple, results) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=collective_timeout_s),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors by value; the queue's pickler would share them through file
        # descriptors that die with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent as text
        results.put((rank, False, traceback.format_exc()))


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
    threads_per_rank: int = 1,
) -> list[Any]:
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each in its own process.

    fn and args must be picklable (a module-level function). `timeout` is how long the ranks
    may go without progress, measured as CPU time they use (on Linux; elsewhere it bounds the
    whole run): a loaded machine slows a run down without failing it, while ranks blocked in a
    collective that never completes use none and fail after `timeout`. No run lasts more than
    `HARD_TIMEOUT_FACTOR * timeout`. `collective_timeout` is the gloo timeout inside the ranks, so
    a collective that one rank never joins raises there too. Ranks run with `threads_per_rank`
    intra-op threads.
    """
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="moe_scale_store_") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, store_path, collective_timeout, threads_per_rank, args, results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes = _collect(procs, results, timeout)
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: text for r, (ok, text) in outcomes.items() if not ok}
    if errors:
        raise RankFailure(errors)
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


HARD_TIMEOUT_FACTOR = 6
# CPU seconds the ranks must use within `timeout` to count as progressing (a rank blocked in
# gloo waits in the kernel and uses next to none).
_PROGRESS_CPU_SECONDS = 0.5


def process_tree_cpu_seconds(pids: list[int]) -> float | None:
    """User + system CPU time of the processes `pids`, their live descendants and the children
    they have reaped (Linux /proc), or None where it cannot be read."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        parent, times = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            pid = int(entry)
            parent[pid] = int(fields[1])
            times[pid] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    except (OSError, ValueError, IndexError):
        return None
    roots, total = set(pids), 0
    for pid, t in times.items():
        p = pid
        while p > 1 and p not in roots:
            p = parent.get(p, 0)
        if p in roots:
            total += t
    return total / ticks


class ProgressClock:
    """Expires after `timeout` seconds in which the process trees of `pids` used less than
    `_PROGRESS_CPU_SECONDS` of CPU time, or after `HARD_TIMEOUT_FACTOR * timeout` in all (wall
    time alone where /proc cannot be read)."""

    def __init__(self, pids: list[int], timeout: float):
        self.pids, self.timeout = pids, timeout
        self.start = self.last_progress = time.monotonic()
        self.cpu_mark = process_tree_cpu_seconds(pids)

    def expired(self) -> bool:
        now = time.monotonic()
        cpu = process_tree_cpu_seconds(self.pids)
        if cpu is not None and self.cpu_mark is not None and cpu - self.cpu_mark >= _PROGRESS_CPU_SECONDS:
            self.last_progress, self.cpu_mark = now, cpu
        return now - self.last_progress > self.timeout or now - self.start > HARD_TIMEOUT_FACTOR * self.timeout


def join_with_progress(procs, timeout: float) -> None:
    """Join multiprocessing processes, killing those still alive once `ProgressClock` expires."""
    clock = ProgressClock([p.pid for p in procs], timeout)
    while any(p.is_alive() for p in procs) and not clock.expired():
        for p in procs:
            p.join(timeout=0.5)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def _collect(procs, results, timeout: float) -> dict[int, tuple[bool, Any]]:
    """Wait for one (ok, value-or-traceback) per rank; dead or stalled ranks become failures."""
    outcomes: dict[int, tuple[bool, Any]] = {}
    dead_since: dict[int, float] = {}
    clock = ProgressClock([p.pid for p in procs], timeout)
    while len(outcomes) < len(procs) and not clock.expired():
        try:
            rank, ok, payload = results.get(timeout=0.5)
            outcomes[rank] = (ok, payload)
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        for r, p in enumerate(procs):
            if r in outcomes or p.is_alive():
                continue
            # A rank's result can still be in flight just after it exits: allow a grace period.
            if now - dead_since.setdefault(r, now) > 3.0:
                outcomes[r] = (False, f"process exited with code {p.exitcode} without reporting")
    for r in range(len(procs)):
        outcomes.setdefault(r, (False, f"no result and no progress for {timeout:.0f}s (hang?)"))
    return outcomes


def run_with_progress(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, **kwargs)` where `timeout` is how long
    the command's process tree may go without using CPU time (see `run_local`), at most
    `HARD_TIMEOUT_FACTOR * timeout` in all; raises `subprocess.TimeoutExpired` past it."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
        clock = ProgressClock([proc.pid], timeout)
        while True:
            try:
                out, err = proc.communicate(timeout=1.0)
                return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                if clock.expired():
                    proc.kill()
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
