"""Pareto: NSGA-II over the space, the front of score against cost, picking by rule, hypervolume, CLI, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from stageopt import ConfigurationError
from stageopt.cli._limits import parse_pick, resolve_strategy
from stageopt.cli._main import build_parser
from stageopt.evaluation import ModelPrice, evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import (
    Limits,
    OptimizationResult,
    Pareto,
    ParetoFront,
    ParetoPoint,
    ParetoRule,
    hypervolume,
    pick,
)
from stageopt.strategies._pareto import dominates, minimized, non_dominated
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm


def _point(trial: int, score: float, tokens: float, **extra: float) -> ParetoPoint:
    values = {"score": score, "tokens": tokens, **extra}
    return ParetoPoint(trial, {}, {}, values, measures=dict(values))


def _pareto(budget: int = 300, **kwargs: Any) -> Pareto:
    settings: dict[str, Any] = {
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "confirm_size": 0,
        "seed": 0,
    }
    settings.update(kwargs)
    return Pareto(capital_metric, budget=budget, **settings)


def _compile(optimizer: Pareto) -> tuple[OptimizationResult, ParetoFront, Any]:
    examples = city_examples()
    program = optimizer.compile(CapitalOfCity(), trainset=examples[:6], valset=examples[6:])
    assert optimizer.result is not None
    assert optimizer.front is not None
    return optimizer.result, optimizer.front, program


# ---- hypervolume, dominance, picking -----------------------------------------------------------


def test_hypervolume_is_exact() -> None:
    # three staircase points below reference (4, 4): 3*1 + 2*1 + 1*1 ... computed by hand
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3]], [4, 4]) == pytest.approx(6.0), "dominated points add nothing"
    assert hypervolume([[5, 0], [4, 1]], [4, 4]) == 0.0, "points not better than the reference add nothing"
    assert hypervolume([[0, 0, 0]], [1, 2, 3]) == pytest.approx(6.0)
    assert hypervolume([[0, 1, 1], [1, 0, 0]], [2, 2, 2]) == pytest.approx(2 + 4 - 1)
    assert hypervolume([], [1, 1]) == 0.0


def test_dominance_and_the_front() -> None:
    assert dominates([1, 1], [1, 2])
    assert not dominates([1, 1], [1, 1])
    assert not dominates([0, 2], [1, 1])
    assert non_dominated([[1, 3], [2, 2], [2, 3], [3, 1], [1, 3]]) == [0, 1, 3, 4]
    assert minimized({"score": 0.8, "tokens": 40.0}, ["score", "tokens"]) == [-0.8, 40.0]
    front = ParetoFront(("score", "tokens"), (_point(1, 0.9, 80), _point(2, 0.5, 30)))
    # (0.9, 80) and (0.5, 30) below reference (score 0, tokens 100): 0.5 * 70 + 0.4 * 20
    assert front.hypervolume({"score": 0.0, "tokens": 100.0}) == pytest.approx(0.5 * 70 + 0.4 * 20)
    with pytest.raises(ConfigurationError, match="tokens"):
        front.hypervolume({"score": 0.0})


def test_pick_by_rule() -> None:
    points = [_point(4, 0.9, 84), _point(1, 0.85, 67), _point(6, 0.7, 63), _point(0, 0.3, 33), _point(9, 0.9, 90)]
    assert pick(points).trial == 4, "best score, ties to the cheaper"  # type: ignore[union-attr]
    assert pick(points, ParetoRule(at_most={"tokens": 70})).trial == 1  # type: ignore[union-attr]
    assert pick(points, ParetoRule(best="tokens", at_least={"score": 0.6})).trial == 6  # type: ignore[union-attr]
    assert pick(points, ParetoRule(at_most={"tokens": 10})) is None
    assert pick(points, lambda ps: min(ps, key=lambda p: p.trial)).trial == 0  # type: ignore[union-attr]
    assert ParetoRule(at_most={"tokens": 70}).describe() == "best score with tokens <= 70"
    with pytest.raises(ConfigurationError, match="unknown objective"):
        ParetoRule(at_most={"dollars": 1})


# ---- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"objectives": ["score"]}, "at least two"),
        ({"objectives": "tokens,latency"}, "must include `score`"),
        ({"objectives": "score,speed"}, "unknown objective"),
        ({"objectives": "score,score"}, "distinct"),
        ({"objectives": "score,cost"}, "needs prices"),
        ({"rule": ParetoRule(at_most={"cost": 1.0})}, "not objectives of this run"),
        ({"population_size": 1}, "population_size"),
        ({"n_trials": 0}, "n_trials"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        _pareto(**kwargs)


# ---- the search -----------------------------------------------------------------------------


def test_front_is_the_non_dominated_set_of_a_multi_objective_study() -> None:
    storage = optuna.storages.InMemoryStorage()
    optimizer = _pareto(400, storage=storage)
    assert isinstance(optimizer.default_sampler(), optuna.samplers.NSGAIISampler)
    result, front, program = _compile(optimizer)
    study = optuna.load_study(study_name="pareto", storage=storage)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["score", "tokens"]
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trials[0].user_attrs["phase"] == "baseline"
    assert set(trials[0].params.values()) == {0}
    generation = "NSGAIISampler:generation"
    assert max(t.system_attrs.get(generation, 0) for t in trials) >= 1, "NSGA-II bred later generations"
    # the front: mutually non-dominated, and every full trial is dominated by or equal to a point
    vectors = [minimized(p.values, front.objectives) for p in front.points]
    assert len(non_dominated(vectors)) == len(vectors) >= 2
    for h in result.history:
        v = minimized({"score": h["score"], "tokens": h["objectives"]["tokens"]}, front.objectives)
        assert any(dominates(w, v) or w == v for w in vectors)
    assert {p.trial for p in front.points} <= {t.number for t in study.best_trials}
    # the default rule returns the best score, the cheapest among ties
    top = max(p.values["score"] for p in front.points)
    (chosen,) = [p for p in front.points if p.trial == result.best["trial"]]
    assert chosen.values["score"] == top == result.best["score"]
    assert result.notes["pareto"]["picked"] == chosen.trial
    assert result.notes["pareto"]["rule_met"]
    assert program.locate.demos


def test_every_point_rebuilds_to_its_program() -> None:
    optimizer = _pareto(300)
    result, front, _ = _compile(optimizer)
    valset = city_examples()[6:]
    for point in front.points:
        program = optimizer.program_for(point)
        report = evaluate(
            program, valset, capital_metric, lm=scripted_lm(demo_sensitive_answer), adapter=SmallLMAdapter()
        )
        assert report.score == pytest.approx(point.values["score"])
        assert sum(s.calls * (s.mean_prompt_tokens + s.mean_completion_tokens) for s in report.stages.values()) / len(
            valset
        ) == pytest.approx(point.values["tokens"])
    # the front travels in the result and comes back equal
    data = json.loads(json.dumps(result.to_dict()))
    assert ParetoFront.from_result(OptimizationResult.from_dict(data)) == front
    with pytest.raises(ConfigurationError, match="no Pareto front"):
        ParetoFront.from_result(OptimizationResult.from_dict({**data, "notes": {}}))


def test_the_rule_picks_the_returned_program() -> None:
    _, front, _ = _compile(_pareto(400))
    cheapest_perfect = min(p.values["tokens"] for p in front.points if p.values["score"] == 1.0)
    dearest = max(p.values["tokens"] for p in front.points)
    bound = (min(p.values["tokens"] for p in front.points) + cheapest_perfect) / 2
    result, _, _ = _compile(_pareto(400, rule=ParetoRule(at_most={"tokens": bound})))
    assert result.best["objectives"]["tokens"] <= bound < cheapest_perfect <= dearest
    assert result.best["score"] < 1.0, "the rule traded score for tokens"
    assert result.notes["pareto"]["rule"] == f"best score with tokens <= {bound:g}"
    # a rule nobody meets: the nearest point is returned, and the notes say so
    unmet, front2, _ = _compile(_pareto(400, rule=ParetoRule(at_most={"tokens": 1.0})))
    assert unmet.notes["pareto"]["rule_met"] is False
    assert unmet.best["objectives"]["tokens"] == min(p.values["tokens"] for p in front2.points)


def test_limits_make_the_front_feasible() -> None:
    limit = 30.0
    result, front, _ = _compile(_pareto(400, limits=Limits(max_tokens_per_example=limit)))
    assert front.feasible
    assert front.points
    assert all(p.feasible and p.values["tokens"] <= limit for p in front.points)
    assert any(not h["feasible"] for h in result.history), "the search met infeasible programs too"
    assert result.best["objectives"]["tokens"] <= limit


def test_nothing_feasible_leaves_an_infeasible_front() -> None:
    result, front, program = _compile(_pareto(150, limits=Limits(max_tokens_per_example=2)))
    assert result.status == "infeasible"
    assert not front.feasible
    assert front.points
    assert not any(p.feasible for p in front.points)
    assert result.notes["pareto"]["picked"] is None
    assert not program.locate.demos


def test_cost_and_latency_objectives() -> None:
    prices = {"scripted/test": ModelPrice(2.0, 4.0)}
    optimizer = _pareto(200, objectives="score,cost,latency", prices=prices)
    result, front, _ = _compile(optimizer)
    assert optimizer.directions() == ["maximize", "minimize", "minimize"]
    for h in result.history:
        measured = h["objectives"]
        assert measured["latency"] >= 0
        # every token costs 2 (prompt) or 4 (completion) dollars per million, some of each
        assert 2.0 * measured["tokens"] / 1e6 < measured["cost"] < 4.0 * measured["tokens"] / 1e6
    assert all(set(p.values) == {"score", "cost", "latency"} for p in front.points)


# ---- CLI and report ----------------------------------------------------------------------------


def _args(*flags: str) -> Any:
    return build_parser().parse_args(["optimize", "--budget-calls", "10", "--out", "x", *flags])


def test_cli_objectives_select_pareto() -> None:
    assert resolve_strategy(_args("--objectives", "score,tokens")) == "pareto"
    assert resolve_strategy(_args("--objectives", "score,tokens", "--strategy", "pareto")) == "pareto"
    assert resolve_strategy(_args("--pick", "tokens<=300")) == "pareto"
    assert resolve_strategy(_args()) == "coordinate"
    with pytest.raises(ConfigurationError, match="--objectives is for the multi-objective `pareto` strategy"):
        resolve_strategy(_args("--objectives", "score,tokens", "--strategy", "joint"))
    assert parse_pick("tokens<=300, score>=0.5") == ({"tokens": 300.0}, {"score": 0.5})
    with pytest.raises(ConfigurationError, match="--pick"):
        parse_pick("tokens<300")


def test_cli_run_and_report_show_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stageopt.cli import _commands
    from stageopt.cli._main import main
    from tests.report.test_report import _parse
    from tests.tasks.test_hotpotqa import ROW, _script, _write

    root = _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(2)], "dev")
    root = _write(root, [{**ROW, "id": f"t{i}"} for i in range(8)], "train")
    monkeypatch.setattr(_commands, "resolve_lm", lambda spec, **kwargs: scripted_lm(_script))
    out = tmp_path / "run"
    common = ["--data-dir", str(root), "--budget-calls", "80", "--val-size", "3", "--bootstrap-size", "3"]
    assert main(["optimize", *common, "--out", str(out), "--objectives", "score,tokens", "--pick", "tokens<=1e6"]) == 0
    printed = capsys.readouterr().out
    assert "Pareto front (" in printed
    assert "<- returned" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["strategy"] == "pareto"
    front = result["notes"]["pareto"]["front"]
    assert front["objectives"] == ["score", "tokens"]
    assert front["points"]

    report = tmp_path / "report.html"
    assert main(["report", str(out), "--out", str(report)]) == 0
    page = _parse(report.read_text())
    table = page.tables["pareto-1-1"]
    assert table[0] == ["trial", "program", "score (maximize)", "tokens (minimize)", "feasible"]
    assert len(table) - 1 == len(front["points"])
    assert any(row[0].endswith("(returned)") for row in table[1:])
    assert 'id="pareto-plot-1-1"' in report.read_text()


def test_a_trade_off_pick_is_not_held_to_a_score_gain_but_a_best_score_pick_is() -> None:
    examples = city_examples()
    traded = _pareto(confirm_size=3, rule=ParetoRule(best="tokens"))
    traded.compile(CapitalOfCity(), trainset=examples[:6], valset=examples[6:])
    assert traded.result is not None
    assert traded.result.confirmation is not None
    assert traded.result.confirmation["confirmed"]
    assert "trade-off" in traded.result.confirmation["reason"]
    assert traded.result.status != "no_significant_gain"
    scored = _pareto(confirm_size=3, rule=ParetoRule(best="score"))
    scored.compile(CapitalOfCity(), trainset=examples[:6], valset=examples[6:])
    assert scored.result is not None
    assert scored.result.confirmation is not None
    assert "trade-off" not in scored.result.confirmation["reason"]
