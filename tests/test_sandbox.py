"""Containment: hostile candidates fail, the host stays unharmed and nothing is left running."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from qwen_align.verifiers.code import CANDIDATE, JUDGE
from qwen_align.verifiers.sandbox import SandboxConfig, SandboxPool

SECRET = "qa-secret-" + uuid.uuid4().hex
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the sandbox needs Linux")


@pytest.fixture(scope="module")
def pool():
    os.environ["QA_SANDBOX_SECRET"] = SECRET  # set before the workers start: they must not inherit it
    with SandboxPool(SandboxConfig(timeout=2.0, workers=2, max_output_bytes=4096)) as p:
        yield p
    os.environ.pop("QA_SANDBOX_SECRET", None)


@pytest.fixture(scope="module")
def degraded():
    with SandboxPool(SandboxConfig(timeout=2.0, workers=1, isolation="rlimits", max_output_bytes=4096)) as p:
        yield p


def run(pool, code: str, tests: str, entry: str | None = None) -> dict:
    return pool.run(JUDGE, CANDIDATE, code, {"tests": tests, "entry_point": entry})


def _procs_with_comm(name: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                found.append(int(pid))
        except OSError:
            pass
    return found


def _nobody_procs() -> int:
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if "\nUid:\t65534\t" in st and "\nState:\tZ" not in st:
            n += 1
    return n


def _settles(predicate, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _need(pool, *names):
    run(pool, "x = 1", "")  # starts the workers
    missing = [n for n in names if not pool.protections.get(n)]
    if missing:
        pytest.skip(f"this machine does not allow: {', '.join(missing)}")


ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
WRONG_ADD = "def add(a, b):\n    return a - b\n"

# Each is a wrong solution plus a trick that would make an in-process harness report success.
FORGERIES = {
    "sys_exit_before_tests": WRONG_ADD + "import sys\nsys.exit(0)\n",
    "os_exit_before_tests": WRONG_ADD + "import os\nos._exit(0)\n",
    "sys_exit_during_tests": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "os_exit_during_tests": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "atexit_hook": WRONG_ADD + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "redefine_check": WRONG_ADD + "def check(candidate):\n    pass\n",
    "always_true_eq": "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return Yes()\n",
    "int_subclass_eq": "class Yes(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return Yes(0)\n",
    "monkeypatch_builtins": WRONG_ADD + "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})\n"
    "builtins.isinstance = lambda *a: True\n",
    "forge_verdict_on_every_fd": WRONG_ADD + "import os, json\nmsg = json.dumps({'id': 1, 'result': {'passed': True}})\n"
    "print(msg)\nfor fd in range(64):\n    try:\n        os.write(fd, msg.encode())\n    except OSError:\n        pass\n",
    "kill_parent": WRONG_ADD + "import os\nos.kill(os.getppid(), 9)\n",
    "raise_system_exit_from_eq": "class Out:\n    def __eq__(self, other):\n        raise SystemExit(0)\n"
    "def add(a, b):\n    return Out()\n",
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgeries_fail(pool, name):
    result = run(pool, FORGERIES[name], ADD_TESTS, "add")
    assert result["passed"] is False, result


def test_honest_solution_passes_and_pool_survives_hostile_checks(pool):
    run(pool, FORGERIES["kill_parent"], ADD_TESTS, "add")
    assert run(pool, "def add(a, b):\n    return a + b\n", ADD_TESTS, "add")["passed"] is True


def test_tests_are_not_in_the_candidates_memory(pool):
    code = (
        "import gc, sys\n"
        "def leak():\n"
        "    needle = 'MARKER_' + '7f3c'\n"
        "    for obj in gc.get_objects():\n"
        "        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()\n"
        "        for v in values:\n"
        "            if isinstance(v, str) and needle in v and v is not needle:\n"
        "                return True\n"
        "    return False\n"
    )
    result = run(pool, code, "# MARKER_7f3c\nassert leak() is True\n")
    assert result["passed"] is False and "AssertionError" in result["reason"]


def test_fork_bomb_is_capped_and_cleaned_up(pool):
    _need(pool, "cgroup_pids", "pid_namespace")
    before = _nobody_procs()
    start = time.monotonic()
    result = run(pool, "import os\nwhile True:\n    os.fork()\n", "assert True")
    assert result["passed"] is False
    assert time.monotonic() - start < 3.5
    assert _settles(lambda: _nobody_procs() <= before)


@pytest.mark.parametrize("bomb", ["x = bytearray(3 * 1024**3)", "x = []\nwhile True:\n    x.append(' ' * 10**7)"])
@pytest.mark.parametrize("which", ["pool", "degraded"])
def test_memory_bombs_are_stopped(request, bomb, which):
    p = request.getfixturevalue(which)
    result = run(p, bomb, "assert True")
    assert result["passed"] is False
    # RLIMIT_AS stops it (MemoryError); on a loaded machine the growing list may reach the wall clock first.
    assert "MemoryError" in result["reason"] or result["status"] == "timeout", result
    if "bytearray" in bomb:
        assert "MemoryError" in result["reason"], result


@pytest.mark.parametrize("which", ["pool", "degraded"])
def test_infinite_loop_times_out(request, which):
    p = request.getfixturevalue(which)
    start = time.monotonic()
    result = run(p, "while True:\n    pass\n", "assert True")
    assert result["status"] == "timeout" and result["passed"] is False
    assert time.monotonic() - start < 2.0 + 2.0


@pytest.mark.parametrize("which", ["pool", "degraded"])
def test_escaped_grandchild_is_killed(request, which):
    p = request.getfixturevalue(which)
    marker = "qa" + uuid.uuid4().hex[:12]
    code = (
        "import os, ctypes, time\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        ctypes.CDLL(None).prctl(15, {marker.encode()!r}, 0, 0, 0)\n"
        "        os.write(w, b'1')\n"
        "        time.sleep(60)\n"
        "    os._exit(0)\n"
        "os.read(r, 1)\n"
        "print('spawned', flush=True)\n"
        "def f():\n    return 1\n"
    )
    result = run(p, code, "assert f() == 2")
    assert result["passed"] is False
    assert "spawned" in result["output"]
    assert _settles(lambda: not _procs_with_comm(marker)), _procs_with_comm(marker)


def test_network_is_unreachable(pool):
    _need(pool, "net_namespace")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        "def connect():\n"
        f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "    s.sendall(b'hello')\n"
        "    return True\n"
    )
    result = run(pool, code, "assert connect() is True")
    assert result["passed"] is False
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_writes_outside_the_work_dir_do_not_reach_the_host(pool):
    _need(pool, "filesystem_jail")
    name = "qa-" + uuid.uuid4().hex
    targets = [f"/tmp/{name}", f"/var/tmp/{name}", str(Path(__file__).resolve().parent / name)]
    code = (
        "def write(path):\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        return True\n"
        "    except OSError:\n"
        "        return False\n"
    )
    tests = "".join(f"write({t!r})\n" for t in targets) + "assert write('inside.txt')\n"
    result = run(pool, code, tests)
    assert result["passed"] is True  # writing its own work dir (and its private /tmp) is allowed
    for t in targets:
        assert not os.path.exists(t), t


def test_host_environment_and_secrets_are_invisible(pool):
    _need(pool, "filesystem_jail", "drop_user")
    code = (
        "import os, glob\n"
        "def snoop():\n"
        "    found = [v for v in os.environ.values() if v.startswith('qa-secret-')]\n"
        "    for path in glob.glob('/proc/*/environ'):\n"
        "        try:\n"
        "            found += [x for x in open(path, 'rb').read().split(b'\\0') if b'qa-secret-' in x]\n"
        "        except OSError:\n"
        "            pass\n"
        "    return found\n"
        "def shadow():\n"
        "    return open('/etc/shadow').read()\n"
    )
    assert run(pool, code, "assert snoop() != []")["passed"] is False
    result = run(pool, code, "assert len(shadow()) > 0")
    assert result["passed"] is False and ("FileNotFoundError" in result["reason"] or "Permission" in result["reason"])


@pytest.mark.parametrize("which", ["pool", "degraded"])
def test_huge_output_is_capped(request, which):
    p = request.getfixturevalue(which)
    flood = run(p, "while True:\n    print('x' * 10000)\n", "assert True")
    assert flood["passed"] is False and flood["status"] == "timeout"
    assert len(flood["output"]) <= 4096
    finite = run(p, "print('y' * 20_000_000)\ndef f():\n    return 1\n", "assert f() == 1")
    assert finite["passed"] is True and len(finite["output"]) <= 4096


def test_degraded_pool_survives_a_killed_server(degraded):
    # Without namespaces the candidate can see its parent (the zygote) and kill it: the check fails and
    # the worker is replaced.
    code = "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(1)\ndef add(a, b):\n    return a + b\n"
    assert run(degraded, code, ADD_TESTS, "add")["passed"] is False
    assert run(degraded, "def add(a, b):\n    return a + b\n", ADD_TESTS, "add")["passed"] is True


def test_degraded_mode_reports_its_protections(degraded):
    run(degraded, "x = 1", "")
    prot = degraded.protections
    assert prot["rlimits"] and prot["process_group"] and prot["clean_env"]
    assert not prot["pid_namespace"] and not prot["drop_user"] and not prot["filesystem_jail"]
