"""The value every strategy returns beside the optimized program."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stageopt._errors import ConfigurationError

SCHEMA_VERSION = 1

#: Why a run stopped; ``infeasible``: no configuration met the run's limits;
#: ``no_significant_gain``: the choice did not beat the original on the confirmation examples.
STATUSES = ("completed", "budget_exhausted", "early_stopped", "infeasible", "no_significant_gain")


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated configuration.

    Attributes:
        trial: Optuna trial number.
        phase: Strategy phase (e.g. ``baseline``, ``coordinate``).
        stage: The stage whose choices this trial changed (None: all or none).
        round: Coordinate-descent round, when the strategy has rounds.
        params: The configuration, ``{stage: {"instruction": i, "demos": j}}``.
        fidelity: Number of validation examples it was scored on.
        score: Mean validation score.
        stage_metrics: Task-defined stage metric means.
        lm_calls: Logical LM calls of the run so far, after this trial.
        tokens: Tokens of the run so far, after this trial.
        wall_s: Seconds of the run so far, after this trial.
        repeated: True when the configuration had been scored before (no calls were spent).
        variant: The cheaper way it was run (e.g. a multi-fidelity rung's caps), None: as is.
        objectives: What the evaluation cost per example (``tokens``, ``cost``, ``latency``,
            ``prompt_tokens`` by stage, ``n``: see :class:`~stageopt.strategies.TrialMeasures`);
            None in results written before it was measured.
        feasible: Whether the configuration met the run's limits (True when there are none).
        violations: The limits it broke, one readable line each.
        pruned: True when racing dropped it part-way: ``fidelity`` is the examples it was
            scored on and ``score`` their mean; it never counts as the best.
    """

    trial: int
    phase: str
    stage: str | None
    round: int | None
    params: dict[str, dict[str, int]]
    fidelity: int
    score: float
    stage_metrics: dict[str, float]
    lm_calls: int
    tokens: int
    wall_s: float
    repeated: bool = False
    variant: str | None = None
    objectives: dict[str, Any] | None = None
    feasible: bool = True
    violations: list[str] = field(default_factory=list)
    pruned: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


@dataclass(frozen=True)
class OptimizationResult:
    """What a stageopt optimizer found, how and at what cost. Serialise with :meth:`to_dict`.

    ``best`` is the returned program's trial, chosen on the validation set only; ``baseline``
    is the unoptimized program on the same validation examples. ``confirmation`` says how the
    choice did against the unoptimized program on held-out examples (its paired gain with the
    95 % interval and n, ``confirmed``; ``candidate`` the trial checked): when it was not
    confirmed, ``best`` is the baseline and ``status`` is ``no_significant_gain``. None: no
    confirmation examples (``confirm_size=0``).
    """

    strategy: str
    seed: int
    budget: dict[str, Any]
    usage: dict[str, Any]
    baseline: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    status: str
    stop_reason: str | None = None
    task: str | None = None
    candidates: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    confirmation: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigurationError(f"unknown status {self.status!r}; expected one of {STATUSES}")

    @property
    def improvement(self) -> float:
        """Best minus baseline validation score."""
        return float(self.best.get("score") or 0.0) - float(self.baseline.get("score") or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready result (``schema_version`` first)."""
        data = asdict(self)
        return {"schema_version": data.pop("schema_version"), **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizationResult:
        """Inverse of :meth:`to_dict`; refuses a newer schema."""
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigurationError(
                f"result schema_version {version!r} is not supported (this stageopt reads {SCHEMA_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
