"""Confirmation: the chosen program must beat the unoptimized one on examples the search never saw.

A search that keeps the maximum of many noisy validation scores always reports a gain (the
winner's curse). Before a strategy returns its choice, :func:`confirm` scores it and the
unoptimized program on held-out *confirmation* examples, pairs the scores example by example
(:func:`~stageopt.evaluation.paired_gain`) and accepts the choice only when the one-sided lower
confidence bound of the gain is above 0. Otherwise the run returns the original program with
status ``no_significant_gain``.

The calls this costs come out of the run's budget: once the baseline trial has measured the
calls per example, :func:`hold_for_confirmation` keeps them back from the search. The scores
are stored in the study, so a resumed run does not pay twice.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy

from stageopt._errors import BudgetExhaustedError, ConfigurationError, EvaluationError
from stageopt.evaluation import PairedGain, paired_gain
from stageopt.strategies._space import Config, config_key

if TYPE_CHECKING:
    from stageopt.strategies._result import TrialRecord
    from stageopt.strategies._state import RunState

logger = logging.getLogger(__name__)

#: Calls per example kept for the candidate, relative to the baseline's: a chosen configuration
#: may make more calls (a chain-of-thought stage's follow-up call for a missing label).
CANDIDATE_CALLS_FACTOR = 1.5

_ATTR = "confirmation_scores"


@dataclass(frozen=True)
class Confirmation:
    """The outcome of :func:`confirm`.

    Attributes:
        confirmed: Whether the candidate is returned.
        reason: One line saying why (the gain and its bounds, or what stopped the check).
        gain: The paired comparison on the confirmation examples (None: it could not be made).
        candidate: The trial that was checked.
    """

    confirmed: bool
    reason: str
    gain: PairedGain | None
    candidate: TrialRecord

    def to_dict(self, state: RunState) -> dict[str, Any]:
        """JSON-ready, for the result's ``confirmation``."""
        return {
            "confirmed": self.confirmed,
            "reason": self.reason,
            "n": len(state.confirmset),
            "gain": self.gain.to_dict() if self.gain is not None else None,
            "candidate": {
                "trial": self.candidate.trial,
                "score": self.candidate.score,
                "params": state.space.describe(self.candidate.params),
            },
        }


def split_examples(
    trainset: list[dspy.Example],
    valset: list[dspy.Example] | None,
    *,
    seed: int,
    bootstrap_size: int,
    val_size: int | None,
    confirm_size: int,
) -> tuple[list[dspy.Example], list[dspy.Example], list[dspy.Example]]:
    """Bootstrap, validation and confirmation examples, disjoint, chosen by ``seed``.

    The validation pool is ``valset``, or the training examples left after the bootstrap ones.
    ``confirm_size`` of it (at most half) are set aside for confirmation; validation is then
    sampled from the rest (``val_size``; None: all of it).
    """
    rng = random.Random(seed)
    if valset is None:
        shuffled = list(trainset)
        rng.shuffle(shuffled)
        if len(shuffled) < 2:
            raise ConfigurationError("with no valset, `trainset` needs at least 2 examples to split")
        cut = max(1, min(bootstrap_size, len(shuffled) // 2))
        boot, val = shuffled[:cut], shuffled[cut:]
    else:
        if not valset:
            raise ConfigurationError("`valset` is empty: give examples or leave it None")
        boot = rng.sample(list(trainset), min(bootstrap_size, len(trainset)))
        val = list(valset)
    confirm: list[dspy.Example] = []
    n_confirm = min(confirm_size, len(val) // 2)
    if n_confirm:
        held = set(random.Random(seed + 2).sample(range(len(val)), n_confirm))
        confirm = [x for i, x in enumerate(val) if i in held]
        val = [x for i, x in enumerate(val) if i not in held]
    if val_size is not None and len(val) > val_size:
        val = random.Random(seed + 1).sample(val, val_size)
    return boot, val, confirm


def confirmation_calls(state: RunState) -> int:
    """Logical calls confirming a choice is expected to take: baseline plus candidate."""
    n = len(state.confirmset)
    if not n or not state.calls_per_example:
        return 0
    return math.ceil(n * state.calls_per_example * (1.0 + CANDIDATE_CALLS_FACTOR))


def hold_for_confirmation(state: RunState) -> None:
    """Keep the confirmation's calls back from the search (called after the baseline trial)."""
    state.ledger.hold(confirmation_calls(state))


def confirm(state: RunState, candidate: TrialRecord, baseline: TrialRecord) -> Confirmation:
    """Score ``candidate`` and ``baseline`` on :attr:`RunState.confirmset` and compare them, paired.

    Called once by :meth:`~stageopt.strategies.BaseStageOptimizer.finish` when the search chose
    a configuration other than the original. Releases the held calls first; a budget that runs
    out during the check, or an evaluation with too many failing examples, means not confirmed.
    """
    opt = state.optimizer
    state.ledger.hold(0)
    stored: dict[str, list[float]] = dict(state.study.user_attrs.get(_ATTR, {}))
    scores: dict[str, list[float]] = {}
    try:
        for name, config in (("baseline", baseline.params), ("candidate", candidate.params)):
            key = config_key(config)
            if key not in stored:
                stored[key] = _score(state, config, desc=f"confirm {name}")
                state.study.set_user_attr(_ATTR, stored)
            scores[name] = stored[key]
    except BudgetExhaustedError as exc:
        return Confirmation(False, f"the budget ran out while confirming: {exc}", None, candidate)
    except EvaluationError as exc:
        return Confirmation(False, f"the confirmation evaluation failed: {exc}", None, candidate)
    finally:
        state.checkpoint_usage()
    gain = paired_gain(scores["candidate"], scores["baseline"], confidence=opt.confidence)
    level = f"{opt.confidence:.0%}"
    if gain.significant:
        why = f"gain {gain.describe()} on held-out examples; its {level} lower bound {gain.lower:+.3f} is above 0"
        return Confirmation(True, why, gain, candidate)
    if gain.detectable_gain is not None:
        detect = f"; with n={gain.n} a gain of {gain.detectable_gain:.3f} could have been detected"
    elif gain.ci95[0] == gain.ci95[1] == 0.0:
        detect = "; both programs scored the same on every held-out example"
    else:
        detect = ""
    why = (
        f"trial {candidate.trial} scored {candidate.score:.3f} on validation, but on {gain.n} held-out "
        f"examples its gain is {gain.describe()}, {level} lower bound {gain.lower:+.3f} <= 0{detect}. "
        "The original program is returned"
    )
    return Confirmation(False, why, gain, candidate)


def check_choice(state: RunState, best: TrialRecord | None, baseline: TrialRecord | None) -> dict[str, Any] | None:
    """The result's ``confirmation`` for returning ``best`` instead of ``baseline``.

    None when there is nothing to confirm: no confirmation examples, no feasible choice, or no
    baseline trial. When the original configuration won on validation, nothing is spent and
    ``confirmed`` is False; when the original breaks the run's limits, the feasible choice is
    returned unconfirmed. Otherwise :func:`confirm` decides.
    """
    if not state.confirmset or best is None or baseline is None:
        return None
    n = len(state.confirmset)
    if config_key(best.params) == config_key(baseline.params):
        why = "no configuration scored above the unoptimized program on validation: the original program is returned"
        return {"confirmed": False, "reason": why, "n": n, "gain": None, "candidate": None}
    if not baseline.feasible:
        why = "the unoptimized program breaks the limits, so the best feasible choice is returned unconfirmed"
        return {"confirmed": True, "reason": why, "n": n, "gain": None, "candidate": None}
    return confirm(state, best, baseline).to_dict(state)


def _score(state: RunState, config: Config, *, desc: str) -> list[float]:
    """Per-example scores of ``config`` on the confirmation examples (the run's own scorer)."""
    scorer = dataclasses.replace(state.scorer(), valset=state.confirmset)
    return list(scorer.score(config, len(state.confirmset), desc=desc).example_scores)
