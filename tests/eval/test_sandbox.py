"""The code sandbox (genkit/eval/sandbox.py): per-test results, the random marker, and every bad program of
issue 17 contained, each followed by a normal program that must still pass."""

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from genkit.errors import ConfigError
from genkit.eval import sandbox as S
from support import REPO

GOOD = "def add(a, b):\n    return a + b\n"
GOOD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
FULL = S.isolation_level() == "netns+pidns+mntns+uid+rlimits"
LEVELS = ["auto", "rlimits"]


def _good_still_runs(**kw):
    r = S.run_tests(GOOD, GOOD_TESTS, **kw)
    assert r.status == "ok" and r.passed == [True, True], r


def test_tests_counted_separately_and_fresh_globals():
    prog = GOOD + "state = []\nstate.append(1)\n"
    tests = ["assert add(2, 2) == 4", "assert add(2, 2) == 5", "assert len(state) == 1; state.append(2)",
             "assert len(state) == 1", "assert undefined_name", "this is not python", "assert add(0, 0) == 0"]
    r = S.run_tests(prog, tests)
    assert r.status == "ok"
    assert r.passed == [True, False, True, True, False, False, True]
    assert r.pass_rate == pytest.approx(4 / 7)
    assert "test 1 failed: AssertionError" in r.stderr and "test 4 failed: NameError" in r.stderr
    assert r.isolation == S.isolation_level() and r.seconds > 0


def test_program_errors_fail_every_test():
    assert S.run_tests("def add(a, b) return a + b", GOOD_TESTS).passed == [False, False]
    r = S.run_tests(GOOD + "raise ValueError('top level')", GOOD_TESTS)
    assert r.passed == [False, False] and r.status == "ok" and "ValueError: top level" in r.stderr


def test_no_tests_runs_the_program_once():
    r = S.run_tests("print('hello')", [])
    assert (r.passed, r.status, r.stdout) == ([], "ok", "hello\n")


@pytest.mark.parametrize("iso", LEVELS)
@pytest.mark.parametrize("exit_call", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit",
                                       "import os\nos.execv('/bin/true', ['true'])"])
def test_early_exit_does_not_pass(iso, exit_call):
    r = S.run_tests(GOOD + exit_call, GOOD_TESTS, isolation=iso)
    assert r.passed == [False, False], r
    assert r.status in ("ok", "exited")
    _good_still_runs(isolation=iso)


@pytest.mark.parametrize("iso", LEVELS)
def test_marker_cannot_be_forged_from_user_code(iso):
    # prints of what a marker line looks like, writes to every descriptor: the marker is random per run
    prog = GOOD + ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'ready\\npass 0\\npass 1\\ndone\\n')\n"
                   "    except OSError:\n        pass\nprint('pass 0')\nos._exit(0)\n")
    r = S.run_tests(prog, GOOD_TESTS, isolation=iso)
    assert r.passed == [False, False] and r.status == "exited"
    # the launcher leaves nothing in __main__ that holds the marker
    r = S.run_tests("import __main__\nnames = [k for k in vars(__main__) if not k.startswith('__')]", ["assert names == []"])
    assert r.passed == [True], r


def test_environment_stdin_and_cwd():
    prog = ("import os, sys\nenv = dict(os.environ)\ntry:\n    input()\n    got = 'line'\nexcept EOFError:\n"
            "    got = 'eof'\nopen('scratch.txt', 'w').write('ok')\n")
    tests = ["assert set(env) <= {'LC_CTYPE'}, env", "assert got == 'eof'", "assert open('scratch.txt').read() == 'ok'",
             "assert sys.flags.isolated and sys.flags.no_site"]
    if os.geteuid() == 0:
        tests.append("assert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() == []")
    r = S.run_tests(prog, tests)
    assert r.passed == [True] * len(tests), r


# ------------------------------------------------------------------------------------------------------
# The bad programs of issue 17: each ends as a failed test within the limit, and the next program runs
# ------------------------------------------------------------------------------------------------------
BAD = {
    "infinite-loop": ("while True:\n    pass\n", "timeout"),
    "sleep-loop": ("import time\nwhile True:\n    time.sleep(0.05)\n", "timeout"),
    "fork-bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", "timeout"),
    "double-fork-daemon": ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                           "        import time\n        time.sleep(1000)\n    os._exit(0)\n", "ok"),
    "10GB-allocation": ("x = bytearray(10 * 2**30)\n", "ok"),
    "huge-output": ("while True:\n    print('x' * 1000)\n", "output-limit"),
    "100MB-file": ("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (100 << 20))\n", "ok"),
    "os.system": ("import os\nassert os.system('echo hi') == 0\n", "ok"),
    "subprocess": ("import subprocess\nassert subprocess.check_output(['echo', 'hi']) == b'hi\\n'\n", "ok"),
    "os._exit(0)": ("import os\nos._exit(0)\n", "exited"),
}


@pytest.mark.parametrize("iso", LEVELS)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_program_contained(name, iso):
    prog, status = BAD[name]
    r = S.run_tests(prog + GOOD, GOOD_TESTS, timeout=1.0, isolation=iso)
    assert r.passed == [False, False], r
    assert r.status == status, r
    if name == "huge-output":
        assert len(r.stdout) <= 64 << 10
    if name == "100MB-file":
        assert "File too large" in r.stderr
    _good_still_runs(isolation=iso)


def _alive_with(token: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if token.encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


@pytest.mark.skipif(not FULL, reason="needs the PID namespace (full isolation)")
def test_double_fork_daemon_dies_with_the_namespace_when_forks_are_allowed():
    # with processes allowed, a setsid'd grandchild that execs a long sleeper outlives its parents, but not the
    # interpreter: PID 1 of the namespace; the token in its command line lets us look for it from outside
    token = "genkit-daemon-" + secrets.token_hex(8)
    prog = ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 30', '{token}'])\n    os._exit(0)\n"
            "import time\ntime.sleep(0.3)\n" + GOOD)
    r = S.run_tests(prog, GOOD_TESTS, timeout=5.0, nproc=16)
    assert r.status == "ok" and r.passed == [True, True], r
    for _ in range(50):
        if not _alive_with(token):
            break
        time.sleep(0.05)
    assert _alive_with(token) == []
    # the same program with a hanging parent: killed at the deadline, the daemon with it
    r = S.run_tests(prog.replace("time.sleep(0.3)", "time.sleep(100)"), GOOD_TESTS, timeout=1.0, nproc=16)
    assert r.status == "timeout" and r.passed == [False, False]
    for _ in range(50):
        if not _alive_with(token):
            break
        time.sleep(0.05)
    assert _alive_with(token) == []


@pytest.mark.skipif(not FULL, reason="needs the network namespace (full isolation)")
def test_network_connect_fails():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n" + GOOD
    r = S.run_tests(prog, GOOD_TESTS, timeout=3.0)
    th.join()
    srv.close()
    assert r.passed == [False, False] and "Network is unreachable" in r.stderr, r
    assert accepted == []
    _good_still_runs()


@pytest.mark.skipif(not FULL, reason="needs the mount namespace and the uid drop (full isolation)")
def test_writing_outside_its_directory_fails(tmp_path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    name = f"escape-{secrets.token_hex(6)}.txt"
    targets = [REPO / name, open_dir / name, Path("/var/tmp") / name, Path("/dev/shm") / name]
    for t in targets:
        prog = f"open({str(t)!r}, 'w').write('x')\n" + GOOD
        r = S.run_tests(prog, GOOD_TESTS)
        assert r.passed == [False, False], (t, r)
        assert not t.exists(), t
    # /tmp inside is a private tmpfs: a write there succeeds but never reaches the host
    r = S.run_tests(f"open('/tmp/{name}', 'w').write('x')\n" + GOOD, GOOD_TESTS)
    assert r.passed == [True, True] and not (Path("/tmp") / name).exists()
    _good_still_runs()


def test_run_many_keeps_order_and_mixes_good_and_bad():
    jobs = [(GOOD, GOOD_TESTS), ("while True:\n    pass\n" + GOOD, GOOD_TESTS), (GOOD, ["assert add(1, 1) == 3"]),
            (GOOD + "import os\nos._exit(0)", GOOD_TESTS), (GOOD, ["assert add(5, 5) == 10"])]
    rs = S.run_many(jobs, workers=2, timeout=1.5)
    assert [r.passed for r in rs] == [[True, True], [False, False], [False], [False, False], [True]]
    assert [r.status for r in rs] == ["ok", "timeout", "ok", "exited", "ok"]


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown sandbox option"):
        S.run_tests(GOOD, GOOD_TESTS, memroy=1)
    with pytest.raises(ConfigError, match="timeout"):
        S.run_tests(GOOD, GOOD_TESTS, timeout=0)
    with pytest.raises(ConfigError, match="isolation"):
        S.run_tests(GOOD, GOOD_TESTS, isolation="none")


def test_isolation_level_here():
    # as root where unshare works (CI and this project's machines), the full level must be reached
    import shutil
    import subprocess

    un = shutil.which("unshare")
    if os.geteuid() == 0 and un and subprocess.run([un, "--net", "--pid", "--mount", "--fork", "true"]).returncode == 0:
        assert S.isolation_level() == "netns+pidns+mntns+uid+rlimits"
    assert S.isolation_level(isolation="rlimits") in ("uid+rlimits", "rlimits")
