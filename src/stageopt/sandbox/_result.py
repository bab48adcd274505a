"""What a sandbox run returns: a frozen value with the status and the captured output."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

#: How a run ended. ``passed``: the code (and every test) ran without error. ``failed``: an
#: exception or a failing test. ``timeout``: the wall-clock or CPU limit. ``memory``: the memory
#: limit. ``blocked``: the code tried something the sandbox forbids (network, a write outside its
#: folder, starting processes, ...). ``crashed``: killed by a signal or the sandbox itself failed.
Status = Literal["passed", "failed", "timeout", "memory", "blocked", "crashed"]


@dataclass(frozen=True)
class TestOutcome:
    """One assert-style test: its source, whether it passed and a one-line error otherwise."""

    __test__ = False  # not a pytest class

    test: str
    passed: bool
    error: str = ""


@dataclass(frozen=True)
class Isolation:
    """Which isolation layers took effect for a run (they depend on the machine's permissions)."""

    network_namespace: bool = False
    pid_namespace: bool = False
    mount_namespace: bool = False
    hidden_paths: tuple[str, ...] = ()
    dropped_to: str | None = None
    audit_hook: bool = False


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of :func:`~stageopt.sandbox.run_python` or :func:`~stageopt.sandbox.run_tests`.

    Attributes:
        ok: True exactly when ``status == "passed"``.
        status: See :data:`Status`.
        stdout: The last characters of the child's standard output.
        stderr: The last characters of its standard error (tracebacks).
        error: A one-line summary of why it did not pass (empty when it passed); the text a
            refinement step shows the model.
        duration_s: Wall-clock seconds from start to the end of the child.
        tests: Per-test outcomes, in order, for the tests that ran (empty for ``run_python``).
        violations: What the sandbox refused, e.g. ``"socket.__new__"`` or ``"writing /tmp/x"``.
        isolation: The layers that were in force.
    """

    ok: bool
    status: Status
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    duration_s: float = 0.0
    tests: tuple[TestOutcome, ...] = ()
    violations: tuple[str, ...] = ()
    isolation: Isolation = field(default_factory=Isolation)

    @property
    def pass_rate(self) -> float:
        """Share of tests that passed (0.0 without tests unless the run passed)."""
        if not self.tests:
            return float(self.ok)
        return sum(t.passed for t in self.tests) / len(self.tests)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {
            "ok": self.ok,
            "status": self.status,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": self.error,
            "duration_s": self.duration_s,
            "tests": [{"test": t.test, "passed": t.passed, "error": t.error} for t in self.tests],
            "violations": list(self.violations),
        }
