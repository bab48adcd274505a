"""Convergence analysis: best-so-far curve, plateau, regret fit, and the stopping decision of a run."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from stageopt import ConfigurationError
from stageopt.diagnostics import (
    CurvePoint,
    analyze_convergence,
    best_so_far,
    find_plateau,
    fit_regret_decay,
    stopping_decision,
)
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import CoordinateDescent, OptimizationResult, TrialRecord
from stageopt.testbed import run_one
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm


def _record(trial: int, score: float, *, fidelity: int = 10, calls: int | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "trial": trial,
        "phase": kw.pop("phase", "search"),
        "stage": None,
        "round": None,
        "params": {},
        "fidelity": fidelity,
        "score": score,
        "stage_metrics": {},
        "lm_calls": calls if calls is not None else 10 * (trial + 1),
        "tokens": 0,
        "wall_s": 0.5 * (trial + 1),
        "repeated": False,
        "variant": kw.pop("variant", None),
    }


def _points(scores: list[float], step: int = 10) -> list[CurvePoint]:
    best, out = -math.inf, []
    for i, s in enumerate(scores):
        best = max(best, s)
        out.append(CurvePoint(trial=i, lm_calls=step * (i + 1), wall_s=float(i), score=best, best_trial=i))
    return out


# ---- best_so_far ------------------------------------------------------------------------------


def test_best_so_far_counts_only_full_fidelity_non_variant_trials() -> None:
    history = [
        _record(0, 0.2, phase="baseline"),
        _record(1, 0.9, fidelity=3, phase="probe"),  # subset: spends calls, never the best
        _record(2, 0.4),
        _record(3, 0.95, variant="rung0"),  # a cheaper variant: never the best
        _record(4, 0.4),  # a tie keeps the earlier trial
        _record(5, 0.7),
    ]
    curve = best_so_far(list(reversed(history)))  # order of the input does not matter
    assert [p.trial for p in curve] == [0, 1, 2, 3, 4, 5]
    assert [p.score for p in curve] == [0.2, 0.2, 0.4, 0.4, 0.4, 0.7]
    assert [p.best_trial for p in curve] == [0, 0, 2, 2, 2, 5]
    assert [p.counted for p in curve] == [True, False, True, False, True, True]
    assert [p.lm_calls for p in curve] == [10, 20, 30, 40, 50, 60]


def test_best_so_far_accepts_records_and_skips_points_before_the_first_counted_trial() -> None:
    records = [
        TrialRecord(**_record(0, 0.9, fidelity=2, phase="probe")),
        TrialRecord(**_record(1, 0.3)),
    ]
    curve = best_so_far(records)
    assert [(p.trial, p.score) for p in curve] == [(1, 0.3)]
    assert best_so_far(records, fidelity=2)[0].score == 0.9
    assert best_so_far([]) == []


# ---- find_plateau -----------------------------------------------------------------------------


def test_plateau_is_the_first_point_with_no_gain_over_the_window() -> None:
    curve = _points([0.1, 0.3, 0.5, 0.5, 0.502, 0.5, 0.5, 0.8, 0.8])  # x = 10, 20, ..., 90
    plateau = find_plateau(curve, min_delta=0.01, window=30)
    assert plateau is not None
    assert (plateau.index, plateau.lm_calls, plateau.score) == (2, 30, 0.5)
    assert plateau.later_gain == pytest.approx(0.3)  # it escaped later: visible
    # a gain of min_delta inside the window is progress: 0.5 -> 0.502 counts for min_delta=0.001
    assert find_plateau(curve, min_delta=0.001, window=20).index == 4  # type: ignore[union-attr]
    # a longer window reaches the jump to 0.8: no plateau until the jump, none after it (unjudged)
    assert find_plateau(curve, min_delta=0.01, window=60) is None


def test_plateau_in_trials_and_unjudged_tail() -> None:
    curve = _points([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    plateau = find_plateau(curve, min_delta=0.05, window=2, axis="trials")
    assert plateau is not None
    assert plateau.index == 3
    assert plateau.axis == "trials"
    assert find_plateau(curve, min_delta=0.05, window=3, axis="trials") is None  # window runs past the end


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_delta": -1.0, "window": 1}, "min_delta"),
        ({"window": 0}, "window"),
        ({"window": 1, "axis": "seconds"}, "axis"),
    ],
)
def test_plateau_settings_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        find_plateau(_points([0.1, 0.2]), **kwargs)


# ---- fit_regret_decay -------------------------------------------------------------------------


def test_regret_fit_recovers_an_exact_power_law() -> None:
    optimum, a, b = 1.0, 3.0, 0.7
    points = [(c, optimum - a * c ** (-b)) for c in (10, 20, 50, 100, 400, 1000)]
    fit = fit_regret_decay(points, optimum)
    assert fit.a == pytest.approx(a, rel=1e-9)
    assert fit.b == pytest.approx(b, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert (fit.n, fit.n_zero) == (6, 0)
    assert fit.predict(200) == pytest.approx(a * 200 ** (-b))


def test_regret_fit_leaves_out_zero_regret_and_needs_two_points() -> None:
    points = [(10, 0.5), (100, 0.9), (1000, 1.0), (2000, 1.0)]  # the last two reached the optimum
    fit = fit_regret_decay(points, 1.0)
    assert (fit.n, fit.n_zero) == (2, 2)
    assert fit.b == pytest.approx(math.log(0.5 / 0.1) / math.log(10))
    none = fit_regret_decay([(10, 1.0), (20, 1.0), (30, 0.5)], 1.0)
    assert (none.a, none.b, none.r2, none.n, none.n_zero) == (None, None, None, 1, 2)
    assert none.predict(10) is None
    flat = fit_regret_decay([(10, 0.5), (100, 0.5)], 1.0)
    assert flat.b == pytest.approx(0.0, abs=1e-12)
    assert flat.r2 is None  # nothing to explain


# ---- runs -------------------------------------------------------------------------------------


def _coordinate(**kwargs: Any) -> CoordinateDescent:
    settings: dict[str, Any] = {
        "budget": 400,
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 6,
        "max_rounds": 3,
        "trials_per_stage": 2,
        "patience": 1,
        "seed": 0,
    }
    settings.update(kwargs)
    return CoordinateDescent(capital_metric, **settings)


def test_early_stopping_decision_is_in_the_result() -> None:
    optimizer = _coordinate()
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.status == "early_stopped"
    stopping = result.notes["stopping"]
    last = max(h["trial"] for h in result.history)
    assert stopping["after_trial"] == last
    assert stopping["lm_calls"] == next(h["lm_calls"] for h in result.history if h["trial"] == last)
    assert stopping["settings"] == {"patience": 1, "min_delta": 0.005, "max_rounds": 3}
    checks = stopping["checks"]
    assert [c["round"] for c in checks] == list(range(1, len(checks) + 1))
    assert checks[-1]["decision"] == "stop"
    assert checks[-1]["gain"] < checks[-1]["min_delta"]
    assert all(c["decision"] == "continue" for c in checks[:-1])
    assert checks[-1]["after_trial"] == last
    # each check's trial is a round's last trial in the history
    for check in checks:
        in_round = [h["trial"] for h in result.history if h["round"] == check["round"]]
        assert check["after_trial"] == max(in_round)
    json.dumps(result.to_dict())  # JSON-ready

    report = analyze_convergence(result)
    assert report.stopping == stopping
    assert report.final_score == result.best["score"]
    assert report.trials_to_best == result.best["trial"]
    scores = [p.score for p in report.curve]
    assert scores == sorted(scores)
    assert report.curve[0].score == result.baseline["score"]
    assert report.regret_fit is None
    data = report.to_dict()
    assert next(iter(data)) == "schema_version"
    json.dumps(data)


def test_an_older_result_without_the_stopping_note_still_loads() -> None:
    optimizer = _coordinate(budget=120)
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    data = optimizer.result.to_dict()
    data["notes"] = {"proposals": {}}  # as written before the stopping note existed
    old = OptimizationResult.from_dict(json.loads(json.dumps(data)))
    decision = stopping_decision(old)
    assert decision["inferred"] is True
    assert decision["status"] == old.status
    assert decision["after_trial"] == max(h["trial"] for h in old.history)
    assert analyze_convergence(old).stopping == decision


def test_testbed_bench_reports_the_fitted_regret_decay() -> None:
    run = run_one("coordinate", budget_calls=600, seed=0)
    assert run.status != "error", run.error
    fit = run.regret_decay
    assert fit is not None
    assert set(fit) == {"a", "b", "r2", "n", "n_zero"}
    assert fit["n"] + fit["n_zero"] >= 2
    assert fit["b"] is not None
    # the search improved on the baseline, so the incumbent's regret shrank: positive decay
    assert run.true_score is not None
    assert run.true_score > run.baseline
    assert fit["b"] > 0
    assert set(run.calls_to_gap) == {"0.5", "0.8"}
    reached = run.calls_to_gap["0.5"]
    assert reached is None or reached <= run.lm_calls
