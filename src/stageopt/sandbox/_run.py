"""Starting, watching and ending the sandbox process; turning its events into a result."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageopt._errors import ConfigurationError
from stageopt.sandbox._result import Isolation, SandboxResult, Status, TestOutcome

logger = logging.getLogger(__name__)

_CHILD_SOURCE = (Path(__file__).with_name("_child.py")).read_text(encoding="utf-8")
_TAIL_CHARS = 4000
_POLL_S = 0.005

#: The child's whole environment: nothing from the parent (no secrets, no PYTHONPATH).
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


def default_hidden_paths() -> tuple[str, ...]:
    """Folders hidden from the child where a mount namespace is available.

    The repository this package runs from (when it is a source checkout), the current directory
    and the home directory. The child keeps its work folder and the standard library reachable
    even when they lie inside one of them, and never covers ``/``.
    """
    package_root = Path(__file__).resolve().parents[3]
    candidates = [Path.cwd(), Path.home()]
    if (package_root / "pyproject.toml").is_file():
        candidates.insert(0, package_root)
    hidden: list[str] = []
    for path in candidates:
        path = path.resolve()
        if path != Path("/") and str(path) not in hidden:
            hidden.append(str(path))
    return tuple(hidden)


def _check(name: str, value: float, minimum: float) -> None:
    if not value >= minimum:
        raise ConfigurationError(f"`{name}` must be >= {minimum}, got {name}={value!r}")


def run_tests(
    code: str,
    tests: Sequence[str],
    setup: str = "",
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    max_processes: int = 64,
    max_file_mb: int = 16,
    audit: bool = True,
    hide_paths: Sequence[str] | None = None,
) -> SandboxResult:
    """Run ``code``, then ``setup``, then each test (e.g. an ``assert``) in one sandboxed process.

    The tests share the code's global namespace and run in order; each gets a
    :class:`TestOutcome`. The run passes when the code loads and every test passes.

    Args:
        code: The untrusted program (e.g. a model-written function).
        tests: Test snippets, run one after the other; an exception fails that test only.
        setup: Code run after ``code`` and before the tests (MBPP's ``test_setup_code``).
        timeout_s: Wall-clock limit for the whole run; the process group is then killed.
        memory_mb: Address-space limit (``RLIMIT_AS``) of the child.
        cpu_s: CPU-seconds limit (``RLIMIT_CPU``); default: ``timeout_s`` rounded up.
        max_processes: ``RLIMIT_NPROC`` (processes and threads of the child's user).
        max_file_mb: Largest file (and captured output) the child may write (``RLIMIT_FSIZE``).
        audit: Install the in-process audit hook (defence in depth; see the package docs).
        hide_paths: Folders to hide when a mount namespace is available
            (default :func:`default_hidden_paths`).

    Returns:
        A :class:`SandboxResult`; the sandbox never raises for anything the code does.

    Raises:
        ConfigurationError: for invalid limits.
    """
    _check("timeout_s", timeout_s, 0.1)
    _check("memory_mb", memory_mb, 32)
    _check("max_processes", max_processes, 1)
    _check("max_file_mb", max_file_mb, 1)
    cpu = int(cpu_s if cpu_s is not None else max(1, -(-timeout_s // 1)))
    _check("cpu_s", cpu, 1)
    tests = [str(t) for t in tests]
    nonce = secrets.token_hex(16)
    with (
        tempfile.TemporaryDirectory(prefix="stageopt-sandbox-", ignore_cleanup_errors=True) as workdir,
        tempfile.TemporaryDirectory(prefix="stageopt-sandbox-io-", ignore_cleanup_errors=True) as iodir,
    ):
        os.chmod(iodir, 0o700)
        events_path = os.path.join(iodir, "events.jsonl")
        events_fd = os.open(events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        config = {
            "nonce": nonce,
            "result_fd": events_fd,
            "workdir": os.path.realpath(workdir),
            "code": code,
            "setup": setup,
            "tests": tests,
            "audit": audit,
            "hide_paths": list(default_hidden_paths() if hide_paths is None else hide_paths),
            "read_roots": [],
            "limits": {"memory_mb": memory_mb, "cpu_s": cpu, "file_mb": max_file_mb, "processes": max_processes},
        }
        with open(os.path.join(iodir, "out"), "w+b") as out, open(os.path.join(iodir, "err"), "w+b") as err:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _CHILD_SOURCE],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=workdir,
                    env=CHILD_ENV,
                    pass_fds=(events_fd,),
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                os.close(events_fd)  # the child holds its own copy
            timed_out = _feed_and_wait(proc, json.dumps(config).encode(), timeout_s)
            duration = time.monotonic() - start
            stdout, stderr = _tail(out), _tail(err)
        events = _read_events(events_path, nonce)
    return _result(events, tests, proc.returncode, timed_out, duration, stdout, stderr, audit, cpu)


def run_python(code: str, **limits: Any) -> SandboxResult:
    """Run ``code`` alone in the sandbox; see :func:`run_tests` for the keyword arguments.

    ``sys.exit(0)`` counts as passing, any other exit code or an uncaught exception as failing.
    """
    return run_tests(code, [], **limits)


def _feed_and_wait(proc: subprocess.Popen[bytes], config: bytes, timeout_s: float) -> bool:
    """Send the config, wait up to ``timeout_s``, then kill the group; True when it timed out."""
    assert proc.stdin is not None
    try:
        proc.stdin.write(config)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass
    deadline = time.monotonic() + timeout_s
    timed_out = False
    while True:
        # WNOWAIT: the leader stays a zombie, so its process group id cannot be reused before killpg.
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_pid:
            break
        if time.monotonic() >= deadline:
            timed_out = True
            break
        time.sleep(_POLL_S)
    # the whole group: leftovers of a normal exit too (without a pid namespace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return timed_out


def _tail(handle: Any) -> str:
    handle.flush()
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - _TAIL_CHARS * 4))
    return handle.read().decode("utf-8", "replace")[-_TAIL_CHARS:]


def _read_events(path: str, nonce: str) -> list[dict[str, Any]]:
    events = []
    with open(path, "rb") as handle:
        for line in handle.read().decode("utf-8", "replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("nonce") == nonce:
                events.append(event)
    return events


def _isolation(events: list[dict[str, Any]], audit: bool) -> Isolation:
    info = next((e for e in events if e.get("event") == "isolation"), {})
    return Isolation(
        network_namespace=bool(info.get("net")),
        pid_namespace=bool(info.get("pid")),
        mount_namespace=bool(info.get("mount")),
        hidden_paths=tuple(info.get("hidden") or ()),
        dropped_to=info.get("user"),
        audit_hook=audit and bool(info),
    )


_SIGNAL_STATUS: dict[int, tuple[Status, str]] = {
    signal.SIGXCPU: ("timeout", "CPU time limit exceeded"),
    signal.SIGXFSZ: ("crashed", "file size limit exceeded (output or a written file is too large)"),
    signal.SIGSEGV: ("crashed", "segmentation fault (possibly out of memory)"),
}


def _result(
    events: list[dict[str, Any]],
    tests: list[str],
    returncode: int,
    timed_out: bool,
    duration: float,
    stdout: str,
    stderr: str,
    audit: bool,
    cpu_s: int,
) -> SandboxResult:
    kinds = {e.get("event") for e in events}
    violations = tuple(str(e.get("what")) for e in events if e.get("event") == "violation")
    outcomes = {int(e["index"]): e for e in events if e.get("event") == "test" and isinstance(e.get("index"), int)}
    exit_event = next((e for e in events if e.get("event") == "exit"), {})
    status: Status
    if timed_out:
        status, error = "timeout", "wall-clock time limit exceeded"
    elif "memory" in kinds:
        status, error = "memory", _first(events, "memory") or "memory limit exceeded"
    elif violations:
        status, error = "blocked", f"blocked by the sandbox: {violations[0]}"
    elif "setup_failed" in kinds:
        status, error = "crashed", f"sandbox setup failed: {_first(events, 'setup_failed')}"
    elif "signal" in exit_event and float(exit_event.get("cpu_s") or 0) >= cpu_s - 0.05:
        status, error = "timeout", "CPU time limit exceeded"
    elif "signal" in exit_event:
        status, error = _SIGNAL_STATUS.get(int(exit_event["signal"]), ("crashed", ""))
        error = error or f"killed by signal {exit_event['signal']}"
    elif "error" in kinds:
        status, error = "failed", _first(events, "error")
    elif any(not e.get("ok") for e in outcomes.values()):
        status = "failed"
        error = next(str(outcomes[i].get("error")) for i in sorted(outcomes) if not outcomes[i].get("ok"))
    elif "done" not in kinds or returncode != 0:
        status, error = "failed", f"the code exited (status {returncode}) before the run finished"
    else:
        status, error = "passed", ""
    results = tuple(
        TestOutcome(test, bool(outcomes[i].get("ok")), str(outcomes[i].get("error") or ""))
        if i in outcomes
        else TestOutcome(test, False, f"not run ({status}: {error})")
        for i, test in enumerate(tests)
    )
    if status not in ("passed", "failed"):
        logger.debug("sandbox run ended with %s: %s", status, error)
    return SandboxResult(
        ok=status == "passed",
        status=status,
        stdout=stdout,
        stderr=stderr,
        error=error,
        duration_s=duration,
        tests=results,
        violations=violations,
        isolation=_isolation(events, audit),
    )


def _first(events: list[dict[str, Any]], kind: str) -> str:
    return next((str(e.get("error") or "") for e in events if e.get("event") == kind), "")
