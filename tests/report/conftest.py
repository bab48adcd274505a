"""A synthetic run directory, built with the real result dataclasses, DSPy's save and an Optuna SQLite study."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest

from stageopt.strategies import OptimizationResult
from stageopt.strategies._result import TrialRecord
from stageopt.tasks import get_task

#: (trial, phase, stage, fidelity, score, variant): trials 2 and 3 must never count as selectable.
TRIALS = [
    (0, "baseline", None, 4, 0.2, None),
    (1, "coordinate", "query1", 4, 0.35, None),
    (2, "multifidelity", None, 4, 0.9, "cap-demos"),
    (3, "multifidelity", None, 2, 0.95, None),
    (4, "coordinate", "query2", 4, 0.3, None),
    (5, "coordinate", "answer", 4, 0.5, None),
]
NEW_QUERY1 = "Write a <b>precise</b> search query naming the entity the question asks about."
ANSWER_DEMO = {"question": "Where is Lyon?", "passages": "[Lyon] Lyon is in France.", "answer": "France"}

#: Two objectives (score to maximize, calls to minimize): trial 2 is dominated by trial 1.
PARETO_VALUES = [(0.2, 10.0), (0.5, 20.0), (0.4, 30.0), (0.9, 50.0)]
PARETO_FRONT = [0, 1, 3]


def synthetic_result(strategy: str = "coordinate", shift: float = 0.0) -> OptimizationResult:
    """A result whose trials are :data:`TRIALS` (scores lowered by ``shift``)."""
    base = {"query1": {"instruction": 0, "demos": 0}, "query2": {"instruction": 0, "demos": 0},
            "answer": {"instruction": 0, "demos": 0}}  # fmt: skip
    history = []
    for i, (trial, phase, stage, fidelity, score, variant) in enumerate(TRIALS):
        record = TrialRecord(
            trial=trial, phase=phase, stage=stage, round=1 if phase == "coordinate" else None, params=base,
            fidelity=fidelity, score=score - shift, stage_metrics={"query1": 0.5 + 0.05 * i, "query2": 0.6},
            lm_calls=20 * (i + 1), tokens=4000 * (i + 1), wall_s=1.5 * (i + 1), variant=variant,
        )  # fmt: skip
        history.append(record.to_dict())
    best_params = {
        "query1": {"instruction": 1, "demos": 0, "instruction_text": NEW_QUERY1, "n_demos": 0},
        "query2": {"instruction": 0, "demos": 0, "instruction_text": "q2", "n_demos": 0},
        "answer": {"instruction": 0, "demos": 1, "instruction_text": "a", "n_demos": 1, "temperature": 0.7},
    }
    return OptimizationResult(
        strategy=strategy,
        seed=3,
        budget={"lm_calls": 150, "tokens": None, "wall_s": None},
        usage={"lm_calls": 120, "backend_calls": 80, "prompt_tokens": 20000, "completion_tokens": 4000, "wall_s": 9.0},
        baseline={"score": 0.2, "stage_metrics": {"query1": 0.5, "query2": 0.6}, "n": 4},
        best={"score": 0.5, "stage_metrics": {"query1": 0.75, "query2": 0.6}, "params": best_params, "trial": 5},
        history=history,
        status="budget_exhausted",
        stop_reason="lm_calls limit 150 reached",
        task="hotpotqa",
        candidates={"query1": {"instructions": 3, "demo_sets": 2}},
        notes={"proposals": {"demo_pools": {"answer": {"labeled": 2}}}},
    )


def synthetic_diagnosis() -> dict[str, Any]:
    stage = {"calls": 4, "parse_failure_rate": 0.25, "mean_output_chars": 41.2, "mean_prompt_tokens": 80.4,
             "mean_completion_tokens": 12.3, "mean_latency_s": 0.61, "p95_latency_s": 1.2}  # fmt: skip
    return {
        "schema_version": 1,
        "task": "hotpotqa",
        "metric": "F1",
        "n": 4,
        "score": 0.5,
        "ci95": [0.2, 0.8],
        "stages": {
            "query1": {**stage, "metric": 0.75},
            "query2": {**stage, "metric": 0.6},
            "answer": {**stage, "metric": None},
        },
        "error_origins": {
            "fail_below": 1.0,
            "failed": 3,
            "n": 4,
            "counts": {"query1": 2, "query2": 0, "answer": 1},
            "thresholds": {"query1": 1.0, "query2": 1.0},
        },
        "attribution": {
            "baseline_score": 0.2,
            "program_score": 0.5,
            "exact": True,
            "hybrids": [{"from_program": [], "score": 0.2}],
            "stages": {
                "query1": {"shapley": 0.25, "ci95": [0.1, 0.4]},
                "query2": {"shapley": -0.05, "ci95": [-0.2, 0.1]},
                "answer": {"shapley": 0.1, "ci95": [0.0, 0.2]},
            },
        },
        "oracle": {
            "answer": {
                "description": "answer given the gold paragraphs",
                "score": 0.7,
                "ci95": [0.4, 1.0],
                "program_score": 0.5,
            }
        },
        "usage": {"lm_calls": 96, "tokens": 5000, "wall_s": 12.0},
    }


def eval_report(score: float, answer_parse: float) -> dict[str, Any]:
    """An EvaluationReport dict as `stageopt demo` writes (no examples needed)."""

    def stage(name: str, metric: float | None, parse_rate: float) -> dict[str, Any]:
        return {"name": name, "calls": 4, "parse_failures": round(4 * (1 - parse_rate)), "mean_prompt_tokens": 100.0,
                "mean_completion_tokens": 10.0, "mean_latency_s": 0.5, "p95_latency_s": 0.9, "metric": metric,
                "parse_rate": parse_rate}  # fmt: skip

    return {
        "score": score, "ci95": [0.0, 1.0], "n": 4, "errors": 0, "parse_rate": 0.9,
        "stage_metrics": {"query1": score, "query2": 0.6},
        "stages": {"query1": stage("query1", score, 1.0), "query2": stage("query2", 0.6, 1.0),
                   "answer": stage("answer", None, answer_parse)},
        "extra": {"em": score / 2, "f1": score},
        "usage": {"lm_calls": 12, "backend_calls": 12, "prompt_tokens": 1200, "completion_tokens": 120, "wall_s": 6.0},
    }  # fmt: skip


def write_study(path: Path, result: OptimizationResult, *, pareto: bool) -> None:
    """A real Optuna SQLite study holding the run's trials, and optionally a 2-objective one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name=result.strategy, direction="maximize")
    for record in result.history:
        trial = study.ask()
        trial.set_user_attr("phase", record["phase"])
        study.tell(trial, record["score"])
    if pareto:
        multi = optuna.create_study(storage=storage, study_name="score-vs-calls", directions=["maximize", "minimize"])
        for values in PARETO_VALUES:
            multi.tell(multi.ask(), list(values))


RunFactory = Callable[..., Path]


@pytest.fixture
def make_run(tmp_path: Path) -> RunFactory:
    """``make_run(name, *, diagnosis, before_after, pareto, study, program, strategy, shift)``: a run directory."""

    def make(
        name: str = "run",
        *,
        diagnosis: bool = True,
        before_after: bool = False,
        pareto: bool = False,
        study: bool = True,
        program: bool = True,
        strategy: str = "coordinate",
        shift: float = 0.0,
    ) -> Path:
        path = tmp_path / name
        path.mkdir(parents=True)
        result = synthetic_result(strategy, shift)
        (path / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
        if program:
            optimized = get_task("hotpotqa").program()
            stages = dict(optimized.named_predictors())
            stages["query1"].signature = stages["query1"].signature.with_instructions(NEW_QUERY1)
            stages["answer"].demos = [dspy.Example(**ANSWER_DEMO, augmented=True)]
            optimized.save(str(path / "program.json"))
        if diagnosis:
            (path / "diagnosis.json").write_text(json.dumps(synthetic_diagnosis()))
        if before_after:
            (path / "before.json").write_text(json.dumps(eval_report(0.25, 0.5)))
            (path / "after.json").write_text(json.dumps(eval_report(0.5, 1.0)))
        if study:
            write_study(path, result, pareto=pareto)
        return path

    return make
