"""Runs untrusted programs (teacher-written solutions) so they cannot escape, stall or flood.

`run_job(files, steps, cfg)` writes `files` into a scratch directory and runs `steps` (argv, stdin,
limits) there one after another inside `lt_jax/data/_sandbox_init.py`, which is started as a
separate process in its own session and process group. What is enforced (Linux):

- no network: a new network namespace with no interface up (loopback included), so nothing on
  this machine or beyond can be reached, abstract Unix sockets included;
- no lasting processes: a new PID namespace (with its own /proc, so no view of the host's processes)
  whose PID 1 kills every other process after each step, and dies (taking the namespace with it)
  when its parent does; a wall clock per step kills the step, and one for the whole job kills the
  outer process group;
- as root: each step runs under an unprivileged uid drawn from a pool of `slots` uids (one per
  concurrent sandbox, claimed with a file lock), so RLIMIT_NPROC caps its processes (a fork bomb
  hits the cap instead of the machine) and the filesystem is read-only to it except the scratch;
  without root a user namespace is used instead (same isolation, but the processes cap then counts
  all of the calling user's processes, and files the user owns stay writable);
- rlimits: CPU seconds, address space, processes, file size (this also caps the captured output:
  stdout goes to a file, a program writing past the cap is killed by SIGXFSZ), open files, no cores;
- scratch: /tmp, /var/tmp, /dev/shm and /run/lock are fresh tmpfs mounts of `tmpfs_mb` each, private
  to the sandbox, and the program's working directory is /tmp/work inside one of them.

Not enforced: reading world-readable files (the program can see what any local user can); CPU share
(use `nice` or fewer slots); programs that need a network or a GPU simply fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_init.py")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): no namespaces, or its init died."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-step limits; output_bytes caps both captured stdout and any file the step writes."""

    cpu_s: float = 4.0
    wall_s: float = 10.0
    memory_mb: int = 1024
    processes: int = 16
    output_bytes: int = 1 << 20
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("cpu_s", "wall_s", "memory_mb", "processes", "output_bytes", "open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox limit {name} must be > 0, got {getattr(self, name)}")

    def to_job(self) -> dict[str, Any]:
        return {"cpu_s": max(1, round(self.cpu_s)), "memory_mb": self.memory_mb, "processes": self.processes,
                "file_size_bytes": self.output_bytes + 1, "open_files": self.open_files}


COMPILE_LIMITS = Limits(cpu_s=30.0, wall_s=60.0, memory_mb=4096, processes=32, output_bytes=64 << 20, open_files=256)


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    run: Limits = Limits()
    compile: Limits = COMPILE_LIMITS
    tmpfs_mb: int = 64  # each of the four scratch mounts; memory-backed, freed when the job ends
    base_uid: int = 61000  # uids base_uid .. base_uid + slots - 1 must belong to no one
    slots: int = 64  # concurrent sandboxes on this machine (more callers wait for a free slot)
    slot_dir: str = os.path.join(tempfile.gettempdir(), f"lt_jax_sandbox_slots.{os.getuid()}")
    overhead_s: float = 20.0  # outer wall-clock slack on top of the steps' own limits

    def __post_init__(self) -> None:
        if self.slots < 1 or self.tmpfs_mb < 1 or self.base_uid < 1000:
            raise ValueError("sandbox needs slots >= 1, tmpfs_mb >= 1 and base_uid >= 1000")


@dataclasses.dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    stdin: str = ""
    limits: Limits = Limits()
    required: bool = False  # a failing required step (a compile) ends the job


@dataclasses.dataclass(frozen=True)
class StepResult:
    returncode: int | None  # None: killed by a signal
    signal: int | None
    timed_out: bool
    seconds: float
    stdout: str
    output_capped: bool
    stderr: str

    @property
    def over_time(self) -> bool:
        """Killed by the wall clock or by the CPU-time limit (SIGXCPU at the soft limit, SIGKILL at the hard one)."""
        return self.timed_out or self.signal in (signal.SIGXCPU, signal.SIGKILL)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_capped


_local_slots = threading.Lock()


@contextlib.contextmanager
def claim_slot(cfg: SandboxConfig) -> Iterator[int]:
    """A uid no other sandbox on this machine uses right now (file locks work across processes)."""
    os.makedirs(cfg.slot_dir, exist_ok=True)
    start = os.getpid() % cfg.slots  # spread processes over the pool
    while True:
        for k in range(cfg.slots):
            slot = (start + k) % cfg.slots
            fd = os.open(os.path.join(cfg.slot_dir, f"{cfg.base_uid + slot}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield cfg.base_uid + slot
            finally:
                os.close(fd)  # closing drops the lock
            return
        time.sleep(0.01)


def run_job(files: dict[str, str], steps: list[Step], cfg: SandboxConfig = SandboxConfig()) -> list[StepResult]:
    """Runs `steps` in order over a scratch directory holding `files`; stops after a failed required step."""
    job = {
        "files": files, "tmpfs_mb": cfg.tmpfs_mb,
        "steps": [{"argv": list(s.argv), "stdin": s.stdin, "wall_s": s.limits.wall_s, "limits": s.limits.to_job(),
                   "required": s.required} for s in steps],
    }
    deadline = sum(s.limits.wall_s for s in steps) + cfg.overhead_s
    with claim_slot(cfg) as uid:
        job["uid"] = uid
        proc = subprocess.Popen([sys.executable, "-I", "-S", INIT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=deadline)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise SandboxError(f"sandbox did not finish within {deadline:.0f}s") from None
    try:
        data = json.loads(out.decode("utf-8", "replace"))
    except json.JSONDecodeError:
        raise SandboxError(f"sandbox init failed (exit {proc.returncode}): {err.decode(errors='replace')[-500:]}") from None
    if "error" in data:
        raise SandboxError(f"sandbox unavailable: {data['error']} (needs Linux namespaces: root, or unprivileged user namespaces)")
    return [StepResult(**r) for r in data["results"]]


def available(cfg: SandboxConfig = SandboxConfig()) -> bool:
    """Whether this machine can run the sandbox (Linux namespaces: root, or unprivileged user namespaces)."""
    try:
        return run_job({}, [Step(("/bin/true",))], cfg)[0].ok
    except (SandboxError, OSError):
        return False


def _world_executable(path: str) -> bool:
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts)):
        if not os.stat(os.sep.join(parts[:i])).st_mode & 0o001:
            return False
    return bool(os.stat(path).st_mode & 0o001)


def default_python() -> str:
    """A Python the sandbox's unprivileged uid can execute (a venv under /root is not)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and os.path.exists(cand) and (os.geteuid() != 0 or _world_executable(cand)):
            return os.path.realpath(cand)
    raise SandboxError("no Python interpreter that an unprivileged user can run; set code.python")
