"""A local sandbox for untrusted Python: a bounded pool of pre-warmed fork-servers.

One worker is three kinds of process (see docs/sandbox.md for the picture and the limits):

- the server S, a fresh interpreter per worker that pre-imports what checks need, applies the worker-wide
  isolation once (network namespace, mount namespace with a read-only jail, cgroups) and answers jobs;
- the zygote Z, forked from S at start-up, before any job: it never holds test data, so the candidate
  processes it forks (C, one per check) cannot find tests or verdicts in their own memory;
- the judge P, forked from S at start-up and replaced when it dies or is stuck: it runs the trusted side
  (the tests) and talks to each check's C over a socket pair, only in plain data. P alone writes the
  verdict, on a socket C never holds.

`SandboxPool.run(judge, candidate, code, payload)` runs `candidate(sock, code)` in C and
`judge(payload, sock) -> dict` in P (both "module:function", imported by the server at start-up) and
returns P's dict with `passed` forced to False unless P delivered it before the wall-clock deadline.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib
import io
import json
import math
import os
import pwd
import queue
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SandboxConfig:
    timeout: float = 10.0  # wall clock per check, seconds
    cpu_time: float | None = None  # CPU seconds per process (RLIMIT_CPU); default: the timeout
    memory_bytes: int = 1 << 30  # address space per process (RLIMIT_AS)
    max_processes: int = 16  # processes a check may have at once (cgroup pids; RLIMIT_NPROC as a backstop)
    max_file_bytes: int = 16 << 20  # largest file a check may write (RLIMIT_FSIZE)
    max_output_bytes: int = 64 << 10  # stdout+stderr kept per check; the rest is read and dropped
    disk_bytes: int = 64 << 20  # size of the check's tmpfs work dir and /tmp (jail mode)
    workers: int | None = None  # parallel checks; default: os.cpu_count()
    isolation: str = "auto"  # "auto": the strongest the machine allows; "rlimits": no namespaces/user/cgroups
    user: str = "nobody"  # who checks run as when the pool runs as root
    use_cgroups: bool = True
    env: dict[str, str] = field(default_factory=lambda: {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
    server_grace: float = 5.0  # extra seconds before the pool gives up on a silent worker and restarts it
    preload: tuple[str, ...] = ("qwen_align.verifiers.code",)  # modules the server imports before forking


PROTECTIONS = (
    "process_group", "rlimits", "wall_clock", "cpu_time", "clean_env", "temp_workdir", "output_cap",
    "non_dumpable", "tests_out_of_candidate_memory", "net_namespace", "pid_namespace", "mount_namespace",
    "filesystem_jail", "drop_user", "cgroup_pids", "cgroup_memory",
)

# Modules candidates commonly import, loaded once in the server so checks do not pay for them.
_WARM = (
    "abc array bisect builtins cmath collections copy dataclasses datetime decimal enum fractions functools "
    "hashlib heapq itertools json math numbers operator random re statistics string struct textwrap typing "
    "unicodedata"
).split()

# ---- Linux primitives (os.unshare/os.setns only arrive in Python 3.12) ----

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38


def _ok(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s: str | None) -> bytes | None:
    return None if s is None else s.encode()


def _unshare(flags: int) -> None:
    _ok(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _setns(fd: int, flags: int) -> None:
    _ok(_libc.setns(ctypes.c_int(fd), ctypes.c_int(flags)), "setns")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _ok(_libc.mount(_b(src), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), f"mount {target}")


def _prctl(option: int, arg: int) -> None:
    _ok(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                    ctypes.c_ulong(0)), "prctl")


# ---- the pool (runs in the caller's process) ----

class SandboxPool:
    """Bounded pool of fork-server workers; thread-safe. Use as a context manager or call `close()`."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.size = self.config.workers or os.cpu_count() or 1
        self._lock = threading.Lock()
        self._idle: queue.SimpleQueue[_Worker] | None = None
        self._workers: list[_Worker] = []
        self.stats = {"checks": 0, "passed": 0, "timeouts": 0, "worker_restarts": 0}
        self.protections: dict[str, bool] = {}

    def _start(self) -> None:
        with self._lock:
            if self._idle is not None:
                return
            nproc = _count_processes(_target_uid(self.config)) + self.size * (self.config.max_processes + 4) + 16
            self._workers = [_Worker(self.config, nproc) for _ in range(self.size)]
            for w in self._workers:
                w.spawn()
            for w in self._workers:
                w.wait_ready()
            held = [w.protections for w in self._workers]
            self.protections = {k: all(h.get(k, False) for h in held) for k in PROTECTIONS}
            self._idle = queue.SimpleQueue()
            for w in self._workers:
                self._idle.put(w)

    def run(self, judge: str, candidate: str, code: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._start()
        assert self._idle is not None
        worker = self._idle.get()
        try:
            result = worker.run({"judge": judge, "candidate": candidate, "code": code, "payload": payload})
        finally:
            self._idle.put(worker)
        with self._lock:
            self.stats["checks"] += 1
            self.stats["passed"] += bool(result.get("passed"))
            self.stats["timeouts"] += result.get("status") == "timeout"
            self.stats["worker_restarts"] = sum(w.restarts for w in self._workers)
        return result

    def map(self, judge: str, candidate: str, jobs: list[tuple[str, dict]], workers: int | None = None) -> list[dict]:
        """Run (code, payload) jobs in parallel on at most `workers` (default: all) workers; results in order."""
        self._start()
        n = max(1, min(workers or self.size, self.size, len(jobs) or 1))
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(lambda job: self.run(judge, candidate, job[0], job[1]), jobs))

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.stop()
            self._workers, self._idle = [], None

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _target_uid(config: SandboxConfig) -> int:
    if os.geteuid() == 0 and config.isolation == "auto":
        user = _lookup_user(config.user)
        if user:
            return user[0]
    return os.getuid()


def _count_processes(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                n += os.stat(f"/proc/{name}").st_uid == uid
            except OSError:
                pass
    return n


def _lookup_user(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return (65534, 65534) if name == "nobody" else None


class _Worker:
    """The pool's handle on one server process: JSON lines over its stdin/stdout."""

    def __init__(self, config: SandboxConfig, nproc: int):
        self.config, self.nproc = config, nproc
        self.proc: subprocess.Popen | None = None
        self.protections: dict[str, bool] = {}
        self.cleanup: list[str] = []
        self.restarts = 0
        self._buf = b""

    def spawn(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        boot = f"import sys; sys.path.insert(0, {root!r}); from qwen_align.verifiers.sandbox import serve; serve()"
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=None if os.environ.get("QWEN_ALIGN_SANDBOX_DEBUG") else subprocess.DEVNULL,
            env=dict(self.config.env), cwd="/", close_fds=True,
        )
        self._buf = b""
        self._send({"config": asdict(self.config), "nproc": self.nproc})

    def wait_ready(self) -> None:
        ready = self._read(30.0)
        if not ready or "protections" not in ready:
            raise RuntimeError(f"sandbox worker failed to start: {ready}")
        self.protections, self.cleanup = ready["protections"], ready.get("cleanup", [])

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self._restart()
        try:
            self._send(job)
            reply = self._read(self.config.timeout + self.config.server_grace)
        except OSError:
            reply = None
        if reply is None:
            self._kill()
            return {"passed": False, "status": "worker_died", "reason": "the sandbox worker died; restarted"}
        if reply.get("status") == "worker_died":
            self._kill()  # it exits by itself; the next check starts a fresh one
        return reply

    def _send(self, obj: Any) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def _read(self, timeout: float) -> dict | None:
        assert self.proc and self.proc.stdout
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self.spawn()
        self.wait_ready()

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None
        _remove_leftovers(self.cleanup)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # the server exits at end of input
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill()


def _remove_leftovers(paths: list[str]) -> None:
    """The server's jail folder and cgroups, once it has gone (cgroups empty out asynchronously)."""
    for p in paths:
        for _ in range(50):
            try:
                os.rmdir(p)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


# ---- the server (one per worker; a fresh interpreter running `serve()`) ----

@dataclass
class _State:
    protections: dict[str, bool]
    jail: str | None = None
    uid: int = -1
    gid: int = -1
    nproc: int = 0
    cleanup: list[str] = field(default_factory=list)
    zygote: socket.socket | None = None
    zygote_pid: int = 0
    judge: socket.socket | None = None
    judge_pid: int = 0
    check_id: int = 0


def serve() -> None:
    sys.dont_write_bytecode = True
    rfile, wfd = sys.stdin.buffer, os.dup(1)
    first = json.loads(rfile.readline())
    cfg = SandboxConfig(**{**first["config"], "preload": tuple(first["config"]["preload"])})
    for name in _WARM + list(cfg.preload):
        importlib.import_module(name)
    st = _setup_worker(cfg, first["nproc"])
    _start_zygote(cfg, st)  # first: its memory must never hold tests
    _start_judge(cfg, st)
    _write_line(wfd, {"protections": st.protections, "cleanup": st.cleanup})
    for line in rfile:
        job = json.loads(line)
        try:
            result = _run_check(cfg, st, job)
        except _ZygoteLost as e:
            _write_line(wfd, {"passed": False, "status": "worker_died", "reason": str(e)})
            os._exit(1)  # the pool restarts a fresh worker: never re-fork a zygote from memory that held tests
        _write_line(wfd, result)
    _leave_cgroups(st)


def _resolve(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _write_line(fd: int, obj: Any) -> None:
    _write_all(fd, json.dumps(obj).encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _try(step) -> bool:
    try:
        step()
        return True
    except OSError:
        return False


def _setup_worker(cfg: SandboxConfig, nproc: int) -> _State:
    p = dict.fromkeys(PROTECTIONS, False)
    p.update(process_group=True, rlimits=True, wall_clock=True, cpu_time=True, clean_env=True,
             temp_workdir=True, output_cap=True, tests_out_of_candidate_memory=True)
    st = _State(protections=p, nproc=nproc)
    # Non-dumpable: a same-uid process can neither ptrace us nor open our /proc/<pid>/fd or mem.
    p["non_dumpable"] = _try(lambda: _prctl(PR_SET_DUMPABLE, 0))
    if cfg.isolation == "auto" and os.geteuid() == 0:
        user = _lookup_user(cfg.user)
        if user:
            st.uid, st.gid = user
            p["drop_user"] = True
        p["net_namespace"] = _try(lambda: _unshare(CLONE_NEWNET))
        p["mount_namespace"] = _try(lambda: (_unshare(CLONE_NEWNS), _mount(None, "/", None, MS_REC | MS_PRIVATE)))
        if p["mount_namespace"] and p["drop_user"]:  # a jail is only a jail for a process that is not root
            p["filesystem_jail"] = _try(lambda: _build_jail(cfg, st))
        if cfg.use_cgroups:
            _join_cgroups(cfg, st)
    return st


def _build_jail(cfg: SandboxConfig, st: _State) -> None:
    """A read-only root holding only /usr, the interpreter's prefixes, a few device nodes and two empty
    mount points (/work, /tmp) that each check covers with its own tmpfs. Visible only in our mount
    namespace; on the host the folder stays empty."""
    root = tempfile.mkdtemp(prefix="qwen-align-jail-")
    st.cleanup.append(root)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID, "size=1m,mode=0755")
    for d in ("work", "tmp", "dev"):
        os.mkdir(f"{root}/{d}", 0o755)
    binds = ["/usr"]
    for name in ("bin", "lib", "lib64", "sbin"):
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), f"{root}/{name}")
        elif os.path.isdir(host):
            binds.append(host)
    import site

    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    for path in sorted(os.path.realpath(x) for x in prefixes if os.path.isdir(x)):
        if not any(path == b or path.startswith(b + "/") for b in binds):
            binds.append(path)
    for src in binds:
        dst = root + src
        os.makedirs(dst, mode=0o755, exist_ok=True)
        _mount(src, dst, None, MS_BIND | MS_REC)
        _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        os.mknod(f"{root}/dev/{name}", 0o666 | 0o020000, os.makedev(1, minor))
        os.chmod(f"{root}/dev/{name}", 0o666)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID, "size=1m,mode=0755")
    st.jail = root


def _own_cgroups() -> dict[str, str]:
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(","):
                own[c] = path
    return own


def _join_cgroups(cfg: SandboxConfig, st: _State) -> None:
    """A cgroup per worker (the server, its zygote and all their checks): a hard process cap and memory cap."""
    own, name = _own_cgroups(), f"qwen-align-sandbox-{os.getpid()}"
    pids = str(cfg.max_processes + 4)  # + server, zygote, judge, slack
    mem = str(2 * cfg.memory_bytes + (256 << 20))
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # pure cgroup v2
        plans = {"pids": ("", "pids.max", pids), "memory": ("", "memory.max", mem)}
    else:
        plans = {"pids": ("pids", "pids.max", pids), "memory": ("memory", "memory.limit_in_bytes", mem)}
    for ctrl, (mount, limit_file, value) in plans.items():
        base = os.path.join("/sys/fs/cgroup", mount, own.get(ctrl if mount else "", "/").lstrip("/"))
        d = os.path.join(base, name)
        try:
            os.makedirs(d, exist_ok=True)
            if d not in st.cleanup:
                st.cleanup.append(d)
            Path(d, limit_file).write_text(value)
            Path(d, "cgroup.procs").write_text(str(os.getpid()))
            st.protections[f"cgroup_{ctrl}"] = True
        except OSError:
            pass


def _leave_cgroups(st: _State) -> None:
    for d in st.cleanup:
        if "/sys/fs/cgroup/" in d:
            try:
                Path(os.path.dirname(d), "cgroup.procs").write_text(str(os.getpid()))
            except OSError:
                pass


def _apply_limits(cfg: SandboxConfig, nproc: int, cpu: bool = True) -> None:
    limits = [
        (resource.RLIMIT_AS, cfg.memory_bytes), (resource.RLIMIT_FSIZE, cfg.max_file_bytes),
        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_NPROC, nproc),
    ]
    if cpu:
        limits.append((resource.RLIMIT_CPU, math.ceil(cfg.cpu_time or cfg.timeout)))
    for res, value in limits:
        hard = value + 1 if res == resource.RLIMIT_CPU else value  # soft CPU limit sends SIGXCPU first
        resource.setrlimit(res, (value, hard))


def _enter_user(st: _State) -> None:
    if st.protections["drop_user"]:
        os.setgroups([])
        os.setresgid(st.gid, st.gid, st.gid)
        os.setresuid(st.uid, st.uid, st.uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _stdio(out_w: int) -> None:
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.close(null)
    # Unbuffered: the process may be killed at any moment and what it printed should still be seen.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, errors="replace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, errors="replace")


def _place_fds(fds: list[int]) -> None:
    """Move `fds` to 3, 4, ... in order and close every other descriptor above 2."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 512 + i) for i, fd in enumerate(fds)]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
    os.closerange(3 + len(fds), 1 << 16)


def _clean_env(cfg: SandboxConfig, home: str, tmp: str) -> None:
    os.environ.clear()
    os.environ.update(cfg.env, HOME=home, TMPDIR=tmp)


class _ZygoteLost(Exception):
    pass


def _run_check(cfg: SandboxConfig, st: _State, job: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    st.check_id += 1
    workdir = None if st.jail else tempfile.mkdtemp(prefix="qwen-align-check-")
    judge_sock, cand_sock = socket.socketpair()
    out_r, out_w = os.pipe()
    verdict, output, timed_out = None, b"", False
    try:
        _zygote_call(st, {"code": job["code"], "candidate": job["candidate"], "workdir": workdir},
                     [cand_sock.fileno(), out_w], reply=False)
        try:
            if not _judge_send(cfg, st, {"id": st.check_id, "judge": job["judge"], "payload": job["payload"]},
                               [judge_sock.fileno(), out_w]):
                raise OSError("the judge process is gone")
            for sock in (judge_sock, cand_sock):
                sock.close()
            os.close(out_w)
            verdict, output, timed_out = _collect(st, out_r, start + cfg.timeout, cfg.max_output_bytes)
        finally:
            _zygote_call(st, {"end": True}, [], reply=True)  # kills the candidate and all it started
        if verdict is None:  # timed out or lost: the judge must report this check, or be replaced
            _judge_settle(cfg, st)
        output += _drain(out_r, cfg.max_output_bytes - len(output))
    finally:
        for fd in (out_r, out_w):
            try:
                os.close(fd)
            except OSError:
                pass
        judge_sock.close()
        cand_sock.close()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    base = {"output": output.decode("utf-8", "replace"), "seconds": round(time.monotonic() - start, 4)}
    if timed_out:
        return {**base, "passed": False, "status": "timeout", "reason": f"timed out after {cfg.timeout:g} s"}
    if not isinstance(verdict, dict):
        return {**base, "passed": False, "status": "error", "reason": "the test process ended without a verdict"}
    return {**verdict, **base, "passed": verdict.get("passed") is True, "status": "ok"}


def _collect(st: _State, out_r: int, deadline: float, cap: int) -> tuple[dict | None, bytes, bool]:
    """Wait for the judge's verdict on this check, keeping up to `cap` bytes of output meanwhile."""
    output = bytearray()
    ctl = st.judge.fileno()
    open_fds = [ctl, out_r]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None, bytes(output), True
        for fd in select.select(open_fds, [], [], left)[0]:
            if fd == ctl:
                msg, _ = _recv_msg(st.judge)
                if msg is None:
                    return None, bytes(output), False
                if msg.get("id") == st.check_id:
                    return msg.get("result"), bytes(output), False
            else:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    open_fds.remove(fd)
                output += chunk[: max(0, cap - len(output))]


def _judge_settle(cfg: SandboxConfig, st: _State) -> None:
    """After a timeout the candidate is dead, so a judge waiting on it answers at once; one stuck in the
    tests' own loop is replaced."""
    deadline = time.monotonic() + 1.0
    while (left := deadline - time.monotonic()) > 0 and select.select([st.judge], [], [], left)[0]:
        msg, _ = _recv_msg(st.judge)
        if msg is None:
            break
        if msg.get("id") == st.check_id:
            return
    _start_judge(cfg, st)


def _drain(fd: int, room: int) -> bytes:
    os.set_blocking(fd, False)
    kept = bytearray()
    try:
        while chunk := os.read(fd, 1 << 16):
            kept += chunk[: max(0, room - len(kept))]
    except BlockingIOError:
        pass
    return bytes(kept)


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---- the judge: one long-lived process per worker that runs the trusted side (the tests) ----

def _start_judge(cfg: SandboxConfig, st: _State) -> None:
    if st.judge is not None:
        _kill_group(st.judge_pid)
        os.waitpid(st.judge_pid, 0)
        st.judge.close()
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            _stdio(os.open("/dev/null", os.O_WRONLY))
            _place_fds([child.fileno()])
            if st.jail:
                os.chroot(st.jail)  # read-only: the judge needs no writable folder at all
            os.chdir("/")
            _clean_env(cfg, "/", "/tmp")
            _apply_limits(cfg, st.nproc, cpu=False)  # long-lived: the wall clock bounds each check instead
            _enter_user(st)
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _prctl(PR_SET_DUMPABLE, 0)
            _judge_main(socket.socket(fileno=3))
        finally:
            os._exit(0)
    child.close()
    st.judge, st.judge_pid = parent, pid


def _judge_send(cfg: SandboxConfig, st: _State, msg: dict, fds: list[int]) -> bool:
    for _ in range(2):
        try:
            _send_msg(st.judge, msg, fds)
            return True
        except OSError:
            _start_judge(cfg, st)
    return False


def _judge_main(ctl: socket.socket) -> None:
    entries: dict[str, Any] = {}
    null = os.open("/dev/null", os.O_WRONLY)
    while True:
        msg, fds = _recv_msg(ctl)
        if msg is None:
            return
        sock_fd, out_w = fds
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        sock = socket.socket(fileno=sock_fd)
        try:
            judge = entries.get(msg["judge"]) or entries.setdefault(msg["judge"], _resolve(msg["judge"]))
            result = judge(msg["payload"], sock)
        except BaseException as e:  # noqa: BLE001 - whatever happened, the verdict is "failed"
            result = {"passed": False, "reason": f"the test harness failed: {type(e).__name__}: {e}"[:500]}
        sock.close()
        os.dup2(null, 1)
        os.dup2(null, 2)
        _send_msg(ctl, {"id": msg["id"], "result": result})


# ---- the zygote: forks the candidate processes, from memory that never held tests ----

def _start_zygote(cfg: SandboxConfig, st: _State) -> None:
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            _stdio(os.open("/dev/null", os.O_WRONLY))  # let go of the pool's pipes
            _place_fds([child.fileno()])
            _zygote_main(cfg, st, socket.socket(fileno=3))
        finally:
            os._exit(0)
    child.close()
    st.zygote, st.zygote_pid = parent, pid
    ready = _recv_msg(parent)[0]
    st.protections["pid_namespace"] = bool(ready and ready.get("pid_namespace"))


def _send_msg(sock: socket.socket, obj: Any, fds: list[int] = ()) -> None:
    data = json.dumps(obj).encode()
    socket.send_fds(sock, [struct.pack(">I", len(data))], list(fds))
    sock.sendall(data)


def _recv_msg(sock: socket.socket) -> tuple[Any, list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, 4, 4)
    if not head:
        return None, fds
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            return None, fds
        head += more
    (n,) = struct.unpack(">I", head)
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(1 << 20, n - len(data)))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


def _zygote_call(st: _State, msg: dict, fds: list[int], reply: bool) -> dict:
    try:
        _send_msg(st.zygote, msg, fds)
        if not reply:
            return {}
        answer, _ = _recv_msg(st.zygote)
    except OSError as e:
        raise _ZygoteLost(f"the sandbox's candidate server died ({e}); worker restarted") from None
    if answer is None:
        raise _ZygoteLost("the sandbox's candidate server died; worker restarted")
    return answer


def _zygote_main(cfg: SandboxConfig, st: _State, ctl: socket.socket) -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    pidns = _probe_pid_namespace(st)
    if not pidns:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # double-forked descendants come back to us to be killed
    own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if pidns else -1
    _send_msg(ctl, {"pid_namespace": pidns})
    entries: dict[str, Any] = {}
    while True:
        msg, fds = _recv_msg(ctl)
        if msg is None:
            return
        sock_fd, out_w = fds
        entry = entries.get(msg["candidate"]) or entries.setdefault(msg["candidate"], _resolve(msg["candidate"]))
        if pidns:  # a fresh PID namespace per check: the candidate is its init, so its death takes all along
            _setns(own_ns, CLONE_NEWPID)
            _unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            _candidate_process(cfg, st, entry, msg["code"], msg["workdir"], sock_fd, out_w)
        os.close(sock_fd)
        os.close(out_w)
        end, _ = _recv_msg(ctl)
        _kill_group(pid)
        if pidns:  # SIGKILL to a namespace's init takes the whole namespace: answer first, reap after
            if end is not None:
                _send_msg(ctl, {})
            os.waitpid(pid, 0)
        else:
            os.waitpid(pid, 0)
            _sweep_children()
            if end is not None:
                _send_msg(ctl, {})
        if end is None:
            return


def _probe_pid_namespace(st: _State) -> bool:
    if not st.protections["drop_user"]:  # i.e. not root with isolation "auto"
        return False
    try:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY)
        _unshare(CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(pid, 0)
        _setns(own, CLONE_NEWPID)
        os.close(own)
        return os.waitstatus_to_exitcode(status) == 0
    except OSError:
        return False


def _candidate_process(cfg, st: _State, entry, code: str, workdir: str | None, sock_fd: int, out_w: int) -> None:
    """The untrusted side of a check: never returns."""
    try:
        os.setsid()
        _stdio(out_w)
        _place_fds([sock_fd])
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")  # the first to go if memory runs out
        except OSError:
            pass
        if st.jail:
            _unshare(CLONE_NEWNS)
            opts = f"size={cfg.disk_bytes},mode=0700,uid={st.uid},gid={st.gid}"
            _mount("tmpfs", f"{st.jail}/work", "tmpfs", MS_NOSUID | MS_NODEV, opts)
            _mount("tmpfs", f"{st.jail}/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg.disk_bytes},mode=1777")
            os.chroot(st.jail)
            workdir = "/work"
        os.chdir(workdir)
        _clean_env(cfg, workdir, "/tmp" if st.jail else workdir)
        _apply_limits(cfg, st.nproc)
        _enter_user(st)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        entry(socket.socket(fileno=3), code)
    except BaseException:  # noqa: BLE001 - the judge sees the closed socket
        pass
    finally:
        os._exit(0)


def _sweep_children() -> None:
    """Kill every process whose parent is us (subreaper: escaped descendants end up here), until none is left."""
    me = os.getpid()
    for _ in range(200):
        kids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    stat = Path(f"/proc/{name}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    kids.append(int(name))
        if not kids:
            return
        for pid in kids:
            _kill_group(pid)
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
