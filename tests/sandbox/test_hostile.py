"""Hostile snippets are contained with a clear failure result; ordinary code runs normally."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from stageopt.sandbox import SandboxResult, run_python, run_tests

REPO = Path(__file__).resolve().parents[2]
FAST = {"timeout_s": 5.0}


def _machine_has_namespaces() -> bool:
    """Whether this machine lets us create network, PID and mount namespaces (checked without stageopt)."""
    if os.geteuid() != 0:
        return False
    try:
        done = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


#: The operating-system layers (namespaces, dropping root) exist only where the machine allows
#: them; the ``audit=False`` cases, which test those layers alone, run only there. Everywhere
#: else the audit hook and the rlimits are what contain hostile code (the ``audit=True`` cases).
NAMESPACES = _machine_has_namespaces()


def _needs_os_layers(audit: bool) -> None:
    if not audit and not NAMESPACES:
        pytest.skip("this machine cannot create namespaces as root: the OS layers are not there to test alone")


def _contained(result: SandboxResult) -> None:
    assert not result.ok
    assert result.status != "passed"
    assert result.error


def _nobody_processes() -> list[str]:
    out = subprocess.run(["ps", "-u", "nobody", "-o", "pid="], capture_output=True, text=True, check=False)
    return out.stdout.split()


# ---- ordinary code -------------------------------------------------------------------------------


def test_normal_code_passes_and_captures_output() -> None:
    result = run_python("import math\nprint(math.sqrt(16))\n", **FAST)
    assert result.ok
    assert result.status == "passed"
    assert result.stdout == "4.0\n"
    assert result.error == ""
    assert 0 < result.duration_s < 5


def test_tests_report_each_outcome_and_the_assertion() -> None:
    code = "def add(a, b):\n    return a - b\n"
    result = run_tests(code, ["assert add(2, 0) == 2", "assert add(2, 2) == 4", "assert add(1, 1) == 2, 'sum'"])
    assert result.status == "failed"
    assert [t.passed for t in result.tests] == [True, False, False]
    assert result.tests[1].error == "assert add(2, 2) == 4 failed; got 0"
    assert result.tests[2].error == "assert add(1, 1) == 2, 'sum' failed: sum"
    assert result.error == result.tests[1].error
    assert result.pass_rate == pytest.approx(1 / 3)


def test_setup_runs_between_code_and_tests() -> None:
    result = run_tests("def f():\n    return X\n", ["assert f() == 3"], setup="X = 3")
    assert result.ok
    assert result.tests[0].passed


def test_exceptions_and_syntax_errors_are_failures() -> None:
    assert run_python("1 / 0").error == "code: ZeroDivisionError: division by zero"
    broken = run_tests("def f(:\n", ["assert f() == 1"])
    assert broken.status == "failed"
    assert "SyntaxError" in broken.error
    assert broken.tests[0].error.startswith("not run")
    early = run_tests("import sys\nsys.exit(0)\n", ["assert True"])
    assert early.status == "failed"
    assert "exited" in early.error


# ---- hostile code --------------------------------------------------------------------------------


@pytest.mark.parametrize("audit", [True, False])
def test_writes_outside_the_work_folder_leave_no_file(audit: bool, tmp_path: Path) -> None:
    _needs_os_layers(audit)
    targets = [REPO / "sandbox_escape.txt", Path("/tmp/stageopt_sandbox_escape.txt"), tmp_path / "escape.txt"]
    code = "\n".join(
        f"try:\n    open({str(t)!r}, 'w').write('pwned')\nexcept OSError as exc:\n    errors.append(str(exc))"
        for t in targets
    )
    result = run_python(
        "errors = []\n" + code + "\nassert len(errors) == 3, errors\nraise SystemExit(1)", audit=audit, **FAST
    )
    _contained(result)
    assert not any(t.exists() for t in targets)
    if audit:
        assert run_python(f"open({str(targets[1])!r}, 'w')", **FAST).status == "blocked"


def test_writes_inside_the_work_folder_are_allowed() -> None:
    result = run_python("open('x.txt', 'w').write('ok')\nprint(open('x.txt').read())", **FAST)
    assert result.ok
    assert result.stdout == "ok\n"


@pytest.fixture
def listening_port() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        try:
            while True:
                accepted.append(server.accept()[0])
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.close()
    assert accepted == []  # the sandbox never reached it


@pytest.mark.parametrize("audit", [True, False])
def test_no_network_to_localhost_or_dns(listening_port: int, audit: bool) -> None:
    _needs_os_layers(audit)
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {listening_port}), timeout=1)"
    result = run_python(connect, audit=audit, **FAST)
    _contained(result)
    assert result.status == ("blocked" if audit else "failed")
    dns = run_python("import socket\nsocket.getaddrinfo('example.com', 80)", audit=audit, **FAST)
    _contained(dns)


@pytest.mark.parametrize("audit", [True, False])
def test_fork_bomb_is_contained(audit: bool) -> None:
    _needs_os_layers(audit)
    before = set(_nobody_processes())
    result = run_python("import os\nwhile True:\n    os.fork()\n", audit=audit, timeout_s=3)
    _contained(result)
    assert result.status in {"blocked", "failed", "timeout"}
    assert result.duration_s < 4
    leftovers = set(_nobody_processes()) - before
    assert not leftovers
    assert run_python("print('still fine')", **FAST).stdout == "still fine\n"


def test_subprocess_is_blocked() -> None:
    result = run_python("import subprocess\nsubprocess.run(['true'])", **FAST)
    assert result.status == "blocked"
    assert "subprocess.Popen" in result.error


def test_memory_bomb_is_stopped() -> None:
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=256, **FAST)
    assert result.status == "memory"
    assert "MemoryError" in result.error


def test_infinite_loop_times_out() -> None:
    result = run_python("while True:\n    pass", timeout_s=1.5)
    assert result.status == "timeout"
    assert result.duration_s < 2.5
    sleeper = run_python("import time\ntime.sleep(60)", timeout_s=1)
    assert sleeper.status == "timeout"


def test_cpu_limit_ends_a_busy_loop() -> None:
    result = run_python("while True:\n    pass", timeout_s=10, cpu_s=1)
    assert result.status == "timeout"
    assert "CPU" in result.error
    assert result.duration_s < 5


def test_environment_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGEOPT_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('STAGEOPT_SECRET'))", **FAST)
    assert result.ok
    assert "hunter2" not in result.stdout
    assert "STAGEOPT_SECRET" not in result.stdout
    proc = run_python("print(open('/proc/1/environ', 'rb').read())", audit=False, **FAST)
    assert "hunter2" not in proc.stdout


@pytest.mark.parametrize("path", ["../README.md", "../../README.md", str(REPO / "README.md")])
def test_repository_files_cannot_be_read(path: str) -> None:
    assert (REPO / "README.md").is_file()
    blocked = run_python(f"print(open({path!r}).read())", **FAST)
    _contained(blocked)
    assert blocked.status == "blocked"
    # below the audit hook: the repository is covered by an empty mount where namespaces exist
    bare = run_python(f"print(open({path!r}).read())", audit=False, **FAST)
    if bare.isolation.mount_namespace:
        _contained(bare)
        assert "stageopt" not in bare.stdout


def test_isolation_layers_are_reported() -> None:
    isolation = run_python("pass", **FAST).isolation
    assert isolation.audit_hook
    if NAMESPACES:  # as root with namespaces allowed, every layer must be in force and root dropped
        assert isolation.network_namespace
        assert isolation.pid_namespace
        assert isolation.dropped_to == "nobody"


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_python("pass", memory_mb=1)
