"""The inside of the code sandbox; started by lt_jax.data.sandbox as `python -I -S THIS_FILE`.

Standard library only (it runs isolated from the project), job as JSON on stdin, results as JSON on
stdout. Steps: new network, mount, IPC and PID namespaces (plus a user namespace when not root);
fresh size-capped tmpfs over /tmp, /var/tmp, /dev/shm and /run/lock; the job's files written into
/tmp/work; then a first child becomes PID 1 of the new PID namespace and runs every step there,
each as a grandchild with rlimits under an unprivileged uid. After each step PID 1 kills every
other process of the namespace (kill(-1)), so nothing a program forked outlives its step; when PID
1 itself dies (the grader's wall clock or this process dying) the kernel kills the whole namespace.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
LIBC = ctypes.CDLL(None, use_errno=True)
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
WORK, IO = "/tmp/work", "/tmp/.io"


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def isolate(tmpfs_mb: int, root: bool) -> None:
    """Namespaces and private tmpfs mounts for this process and everything it starts."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if root else CLONE_NEWUSER)
    _check(LIBC.unshare(flags), "unshare")
    if not root:  # become root of the new user namespace, mapped to our own uid outside
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _check(LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    opts = f"size={tmpfs_mb}m,mode=1777".encode()
    for d in SCRATCH_DIRS:
        if os.path.isdir(d):
            _check(LIBC.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts), f"tmpfs on {d}")


def set_limits(lim: dict) -> None:
    cpu = int(lim["cpu_s"])
    pairs = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (lim["memory_mb"] << 20,) * 2,
        resource.RLIMIT_FSIZE: (lim["file_size_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (lim["open_files"],) * 2,
        resource.RLIMIT_NPROC: (lim["processes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for res, value in pairs.items():
        resource.setrlimit(res, value)


def _child(step: dict, uid: int | None, stdin_path: str, out_path: str, err_path: str) -> None:
    """In the forked grandchild: plumbing, limits, unprivileged uid, exec. Never returns."""
    try:
        fds = [os.open(stdin_path, os.O_RDONLY), os.open(out_path, os.O_WRONLY), os.open(err_path, os.O_WRONLY)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)
        os.setpgid(0, 0)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        set_limits(step["limits"])
        if uid is not None:  # root outside: a fresh uid makes RLIMIT_NPROC bite and the disk read-only
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.chdir(WORK)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORK, "LANG": "C.UTF-8", "TMPDIR": "/tmp",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        os.execve(step["argv"][0], step["argv"], env)
    except BaseException as e:  # noqa: BLE001 - report and leave; never return into PID 1's loop
        os.write(2, f"sandbox: cannot start {step['argv'][0]}: {e}\n".encode())
    os._exit(127)


def _wait(pid: int, wall_s: float) -> tuple[int, bool, float]:
    """Waits for `pid` up to wall_s; (wait status, timed out, seconds)."""
    start = time.monotonic()
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], wall_s)
    finally:
        os.close(fd)
    timed_out = not ready
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status, timed_out, time.monotonic() - start


def reap_all() -> None:
    """PID 1's cleanup: kill every other process in the namespace and reap them."""
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _read(path: str, cap: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    return data[:cap].decode("utf-8", "replace"), len(data) > cap


def run_step(step: dict, uid: int | None, index: int) -> dict:
    stdin_path, out_path, err_path = (f"{IO}/{index}.{s}" for s in ("in", "out", "err"))
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(step.get("stdin") or "")
    for p in (out_path, err_path):  # root-owned: the grandchild opens them before it drops its uid
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    pid = os.fork()
    if pid == 0:
        _child(step, uid, stdin_path, out_path, err_path)
    status, timed_out, seconds = _wait(pid, step["wall_s"])
    reap_all()
    cap = step["limits"]["file_size_bytes"] - 1  # one byte over the cap is allowed, so a flood shows
    stdout, flooded = _read(out_path, cap)
    stderr, _ = _read(err_path, 4096)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return {"returncode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "signal": sig,
            "timed_out": timed_out, "seconds": round(seconds, 4), "stdout": stdout,
            "output_capped": flooded or sig == signal.SIGXFSZ, "stderr": stderr[-2000:]}


def init(job: dict, root: bool) -> list[dict]:
    """PID 1 of the sandbox: writes the files, runs the steps in order, cleans up after each.
    `root`: started by real root (then steps drop to the job's uid; else a user namespace's root,
    which has only its own uid mapped, runs them)."""
    uid = job["uid"] if root and job.get("uid") is not None else None
    # A /proc of this PID namespace only: the steps cannot list the host's processes.
    _check(LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")
    os.makedirs(WORK, mode=0o755)
    os.makedirs(IO, mode=0o700)
    for name, text in job["files"].items():
        with open(os.path.join(WORK, name), "w", encoding="utf-8") as f:
            f.write(text)
    if uid is not None:
        for entry in [WORK] + [os.path.join(WORK, n) for n in job["files"]]:
            os.chown(entry, uid, uid)
    results = []
    for i, step in enumerate(job["steps"]):
        res = run_step(step, uid, i)
        results.append(res)
        if step.get("required") and (res["returncode"] != 0 or res["timed_out"]):
            break  # a failed compile: nothing to run
    return results


def main() -> None:
    job = json.loads(sys.stdin.read())
    root = os.geteuid() == 0  # decided before a user namespace makes everyone root
    isolate(job["tmpfs_mb"], root)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # PID 1 of the new namespace
        os.close(r)
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            out = {"results": init(job, root)}
        except BaseException as e:  # noqa: BLE001
            out = {"error": f"{type(e).__name__}: {e}"}
        with os.fdopen(w, "w") as f:
            json.dump(out, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    sys.stdout.write(data or json.dumps({"error": "sandbox init died"}))


if __name__ == "__main__":
    main()
