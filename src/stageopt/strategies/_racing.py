"""Racing: score a candidate slice by slice and drop it once a paired test says it is worse.

A trial scored on the whole validation set reports each example's score to Optuna as an
intermediate value (step = the example's index). A raced candidate is scored on the first
``min_examples`` examples, then ``step`` more at a time; after each slice Optuna's
:class:`~optuna.pruners.WilcoxonPruner` compares its per-example scores with those of the
study's best trial on the same examples (a one-sided Wilcoxon signed-rank test) and prunes it
when it is worse at ``p_threshold``. The pruned trial is told PRUNED; its record keeps the
examples it was scored on (``fidelity``) and their mean, and never counts as the best.

Racing only decides what is *not* worth scoring further: the returned program is still
confirmed on held-out examples (:mod:`stageopt.strategies._confirm`). The test is repeated
after every slice, so the chance of pruning a candidate that is in fact as good is higher than
``p_threshold``; that costs a missed candidate, never a worse returned program.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from stageopt._errors import ConfigurationError

if TYPE_CHECKING:
    from stageopt.strategies._result import TrialRecord
    from stageopt.strategies._space import Config
    from stageopt.strategies._state import RunState, Scored


@dataclass(frozen=True)
class Racing:
    """How candidates are raced on the validation set.

    Attributes:
        p_threshold: One-sided p-value below which a candidate is pruned (Optuna's
            ``WilcoxonPruner(p_threshold=...)``).
        min_examples: Examples every candidate is scored on before it can be pruned (the
            pruner's ``n_startup_steps``).
        step: Examples added between two tests.
    """

    p_threshold: float = 0.1
    min_examples: int = 10
    step: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.p_threshold, bool) or not 0.0 < self.p_threshold < 1.0:
            raise ConfigurationError(f"racing `p_threshold` must be in (0, 1), got p_threshold={self.p_threshold}")
        for name in ("min_examples", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"racing `{name}` must be an int >= 1, got {name}={value!r}")
        if self.min_examples < 5:
            raise ConfigurationError(
                f"racing `min_examples` must be >= 5 (a signed-rank test on fewer pairs cannot reach "
                f"p < 0.1 one-sided), got min_examples={self.min_examples}"
            )

    def pruner(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner that makes the decisions."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=self.p_threshold, n_startup_steps=self.min_examples)

    def slices(self, n: int) -> list[int]:
        """Where the slices of an ``n``-example validation set end (the last is ``n``)."""
        ends: list[int] = []
        end = self.min_examples
        while end < n:
            ends.append(end)
            end += self.step
        return [*ends, n]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {"p_threshold": self.p_threshold, "min_examples": self.min_examples, "step": self.step}


def resolve_racing(racing: Racing | bool | None) -> Racing | None:
    """``True``: the default :class:`Racing`; ``False``/None: no racing."""
    if racing is True:
        return Racing()
    if racing is False or racing is None:
        return None
    if not isinstance(racing, Racing):
        raise TypeError(f"`racing` must be a stageopt.strategies.Racing, True or False, got {racing!r}")
    return racing


def race(state: RunState, config: Config, trial: optuna.trial.Trial, racing: Racing, desc: str) -> tuple[Scored, bool]:
    """Score ``config`` on the validation set slice by slice, reporting to ``trial``; ``(scored, pruned)``.

    Raises:
        BudgetExhaustedError: when the budget runs out during a slice.
    """
    scorer = state.scorer()
    reports = []
    start = 0
    pruned = False
    for end in racing.slices(state.full_fidelity):
        report = scorer.run(config, start, end, desc=f"{desc} [{start}:{end}]")
        reports.append(report)
        for index, example in enumerate(report.examples, start=start):
            trial.report(float(example.score), index)
        start = end
        if end < state.full_fidelity and _should_prune(trial):
            pruned = True
            break
    return scorer.summarise(reports), pruned


def _should_prune(trial: optuna.trial.Trial) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a best trial restored from a study without per-example values
        return bool(trial.should_prune())


def racing_note(racing: Racing | None, records: list[TrialRecord], n_val: int) -> dict[str, Any]:
    """``notes["racing"]``: the settings, the raced trials and the example-evaluations pruning saved."""
    fresh = [r for r in records if not r.repeated and r.variant is None and (r.pruned or r.fidelity == n_val)]
    pruned = [r for r in fresh if r.pruned]
    scored = sum(r.fidelity for r in fresh)
    saved = sum(n_val - r.fidelity for r in pruned)
    return {
        "settings": racing.to_dict() if racing is not None else None,
        "validation_examples": n_val,
        "trials": len(fresh),
        "pruned_trials": len(pruned),
        "example_evaluations": scored,
        "example_evaluations_saved": saved,
        "saved_share": round(saved / (scored + saved), 4) if scored + saved else 0.0,
    }


__all__ = ["Racing", "race", "racing_note", "resolve_racing"]
