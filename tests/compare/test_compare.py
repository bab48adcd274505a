"""`stageopt compare` end to end on a scripted LM: files, budgets, one counter, --test, --resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt.cli import _commands
from stageopt.cli._main import main
from stageopt.compare import (
    DSPY_METHODS,
    ValidationObserver,
    _harness,
    bfsrs_num_candidates,
    copro_breadth_depth,
    gepa_max_metric_calls,
    methods,
    mipro_num_candidates,
    resolve_methods,
)
from stageopt.compare._methods import MethodContext, MethodOutcome
from stageopt.compare._report import format_table, seed_mean_curve
from stageopt.evaluation import Budget, BudgetLedger
from tests.conftest import scripted_lm
from tests.tasks.test_hotpotqa import ROW, _script, _write

METHODS = "coordinate,random,mipro,bootstrap_rs,copro,gepa"
BUDGET = 60


def _rows(prefix: str, n: int, marker: str = "") -> list[dict[str, Any]]:
    # Distinct questions, so that examples are told apart (the DSPy curves key on inputs).
    return [{**ROW, "id": f"{prefix}{i}", "question": f"{marker}{ROW['question']} ({prefix}{i})"} for i in range(n)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = _write(tmp_path / "data", _rows("d", 4), "dev")
    _write(root, _rows("t", 8), "train")
    return root


class Counting:
    """The scripted HotpotQA LM, counting the calls that reach it (cache off: every logical call)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return _script(prompt)


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Counting:
    counting = Counting()
    monkeypatch.setattr(_commands, "resolve_lm", lambda spec, **kwargs: scripted_lm(counting))
    return counting


def _argv(data: Path, out: Path, *extra: str, methods: str = METHODS, seeds: int = 2) -> list[str]:
    return [
        "compare",
        "--data-dir", str(data),
        "--methods", methods,
        "--budget-calls", str(BUDGET),
        "--seeds", str(seeds),
        "--out", str(out),
        "--val-size", "3",
        "--bootstrap-size", "3",
        "--n-eval", "2",
        "--no-cache",
        *extra,
    ]  # fmt: skip


def _eval_calls(results: dict[str, Any]) -> int:
    return sum(s["usage"]["lm_calls"] for c in results["cells"].values() for s in c.get("eval", {}).values())


def test_compare_writes_results_table_and_plot(data: Path, engine: Counting, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(data, out)) == 0
    assert (out / "convergence.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    names = METHODS.split(",")
    assert set(cells) == {"unoptimized/all", "single_stage/all"} | {f"{m}/seed{s}" for m in names for s in (0, 1)}
    for key, cell in cells.items():
        assert cell["status"] in {"completed", "budget_exhausted", "early_stopped"}, (key, cell.get("error"))
        assert cell["usage"]["lm_calls"] <= BUDGET, key
        assert {"lm_calls", "tokens", "wall_s"} <= set(cell["usage"])
        dev = cell["eval"]["dev"]
        assert dev["n"] == 2
        assert {"em", "f1"} == set(dev["extra"])
        if cell["method"] in names:
            assert cell["usage"]["lm_calls"] > 0
            assert cell["curve"], key
            assert all(0 <= calls <= BUDGET for calls, _ in cell["curve"])
            assert (out / cell["program"]).is_file()
    # One counter: every call that reached the LM was counted by a method's ledger or an evaluation.
    spent = sum(c["usage"]["lm_calls"] for c in cells.values())
    assert spent + _eval_calls(results) == len(engine.prompts)
    # DSPy's settings are sized to the budget and reported.
    assert cells["mipro/seed0"]["settings"]["num_candidates"] >= 2
    assert cells["mipro/seed0"]["settings"]["num_trials"] >= 1
    assert cells["bootstrap_rs/seed0"]["settings"]["num_candidate_programs"] >= 1
    assert {"breadth", "depth"} <= set(cells["copro/seed0"]["settings"])
    assert cells["gepa/seed0"]["settings"]["max_metric_calls"] >= 1
    # The single-stage baseline has one stage and no retrieval-stage metrics.
    assert cells["single_stage/all"]["eval"]["dev"]["stage_metrics"] == {}
    assert set(cells["unoptimized/all"]["eval"]["dev"]["stage_metrics"]) == {"query1", "query2"}

    table = (out / "table.md").read_text()
    header = table.splitlines()[0]
    for column in ("query1 stage metric", "query2 stage metric", "F1", "EM", "Δ score", "logical LM calls", "tokens"):
        assert column in header
    assert header.index("F1") < header.index("EM")
    for row in ("unoptimized", "single_stage", *names):
        assert f"| {row} |" in table
    assert "± " in table
    assert "one evaluation stands for every seed" in table


def test_test_file_is_scored_and_never_selected_on(data: Path, engine: Counting, tmp_path: Path) -> None:
    test_root = _write(tmp_path / "heldout", _rows("h", 3, marker="HELDOUT "), "test")
    test_file = test_root / "hotpotqa" / "test.jsonl"
    out = tmp_path / "run"
    assert main(_argv(data, out, "--test", str(test_file), methods="joint,mipro,gepa", seeds=1)) == 0
    results = json.loads((out / "results.json").read_text())
    test_calls = sum(c["eval"]["test"]["usage"]["lm_calls"] for c in results["cells"].values())
    for cell in results["cells"].values():
        assert cell["eval"]["test"]["n"] == 3
    # The held-out questions reached the LM only when the final programs were scored on them.
    assert sum("HELDOUT" in p for p in engine.prompts) == test_calls > 0
    table = (out / "table.md").read_text()
    assert "test file" in table


def test_resume_skips_finished_cells(
    data: Path, engine: Counting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[tuple[str, int]] = []
    interrupt = {"at": ("random", 1)}
    real = methods()

    def wrap(name: str, runner: Callable[[MethodContext], MethodOutcome]) -> Callable[[MethodContext], MethodOutcome]:
        def run(ctx: MethodContext) -> MethodOutcome:
            if (name, ctx.seed) == interrupt["at"]:
                raise KeyboardInterrupt
            runs.append((name, ctx.seed))
            return runner(ctx)

        return run

    monkeypatch.setattr(_harness, "methods", lambda: {n: wrap(n, r) for n, r in real.items()})
    out = tmp_path / "run"
    argv = _argv(data, out, methods="random,bootstrap_rs")
    assert main(argv) == 130  # interrupted after the first method cell
    first = json.loads((out / "results.json").read_text())
    assert set(first["cells"]) == {"unoptimized/all", "single_stage/all", "random/seed0"}
    assert runs == [("random", 0)]

    assert main(argv) == 2  # the folder holds a comparison: --resume or another --out
    interrupt["at"] = ("none", -1)
    runs.clear()
    baseline_calls = len(engine.prompts)
    assert main([*argv, "--resume"]) == 0
    assert runs == [("random", 1), ("bootstrap_rs", 0), ("bootstrap_rs", 1)]
    final = json.loads((out / "results.json").read_text())
    assert final["cells"]["random/seed0"] == first["cells"]["random/seed0"]
    assert final["cells"]["unoptimized/all"] == first["cells"]["unoptimized/all"]
    assert (out / "table.md").is_file()
    assert len(engine.prompts) > baseline_calls

    # resuming with another budget would mix incomparable cells
    other = [a if a != str(BUDGET) else "70" for a in argv]
    assert main([*other, "--resume"]) == 2


def test_unknown_method_is_one_line_exit_2(data: Path, engine: Counting, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_argv(data, Path("unused"), methods="coordinate,nope")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stageopt: error: unknown method name(s) ['nope']; known: all, independent, coordinate")
    assert "mipro, bootstrap_rs, copro, gepa" in err
    assert not engine.prompts


def test_methods_registry() -> None:
    names = list(methods())
    assert names[-4:] == list(DSPY_METHODS)
    assert {"coordinate", "joint", "multifidelity", "evolutionary", "random"} <= set(names)
    assert resolve_methods("all") == names
    assert resolve_methods(" mipro, coordinate,mipro ") == ["mipro", "coordinate"]


def test_runs_are_deterministic(data: Path, engine: Counting, tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        assert main(_argv(data, tmp_path / name, methods="hierarchical,bootstrap_rs", seeds=1)) == 0
        cells = json.loads((tmp_path / name / "results.json").read_text())["cells"]
        results.append({k: (c["eval"], c.get("curve"), c["usage"]["lm_calls"]) for k, c in cells.items()})
    for first, second in zip(*(r.values() for r in results), strict=True):
        for part in (first, second):
            for scores in part[0].values():
                scores["usage"].pop("wall_s")
        assert first == second


# ---- pieces -------------------------------------------------------------------------------------


def test_validation_observer_scores_complete_passes_only() -> None:
    val = [dspy.Example(q=f"v{i}", a="x").with_inputs("q") for i in range(3)]
    other = dspy.Example(q="train", a="x").with_inputs("q")
    ledger = BudgetLedger(Budget(lm_calls=100))
    scores = iter([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    observer = ValidationObserver(lambda ex, pred, trace=None: next(scores), val, ledger)
    pred = dspy.Prediction(a="x")
    for example in (val[0], val[1], val[2]):  # a pass: 1/3
        ledger.reserve()
        observer(example, pred)
    observer(other, pred)  # not a validation example: ignored
    observer(val[0], pred)
    observer(val[0], pred)  # the pass restarted before completing: dropped
    feedback = observer(val[1], pred, None, "answer", [])  # GEPA feedback call: not a pass
    assert feedback.score == 1.0
    assert "Expected" in feedback.feedback
    assert len(observer.curve) == 1
    assert observer.curve[0][0] == 3
    assert observer.curve[0][1] == pytest.approx(1 / 3)


def test_sizing_fits_the_budget() -> None:
    k, n_val = 3, 10
    for budget in (100, 300, 1000, 3000):
        breadth, depth = copro_breadth_depth(budget, n_val=n_val, calls_per_example=k, n_stages=k)
        cost = k * breadth * depth * (depth + 1) // 2 * n_val * k + k * depth
        assert breadth >= 2
        assert cost <= budget or (breadth, depth) == (2, 1)
        assert gepa_max_metric_calls(budget, calls_per_example=k) * k <= budget
        assert 2 <= mipro_num_candidates(budget, n_train=8, calls_per_example=k) <= 8
        assert bfsrs_num_candidates(budget, n_train=8, n_val=n_val, calls_per_example=k) >= 1
    assert copro_breadth_depth(3000, n_val=n_val, calls_per_example=k, n_stages=k)[1] >= 2


def test_seed_mean_curve_is_a_step_mean() -> None:
    points = seed_mean_curve([[[10, 0.2], [30, 0.5]], [[20, 0.4]]])
    assert [x for x, _ in points] == [10, 20, 30]
    assert [y for _, y in points] == pytest.approx([0.2, 0.3, 0.45])


def test_table_without_results_shows_dashes() -> None:
    results = {
        "settings": {
            "task": "hotpotqa", "methods": ["coordinate"], "seeds": [0], "budget_calls": 10,
            "val_size": 3, "bootstrap_size": 3, "eval_split": "dev", "test": None,
        },
        "cells": {"coordinate/seed0": {"method": "coordinate", "seed": 0, "status": "error", "error": "boom"}},
    }  # fmt: skip
    table = format_table(results)
    assert "| coordinate | - | - | - | - | - | - | error |" in table
    assert "coordinate errors: boom" in table


def test_table_shows_the_task_metric_beside_other_extras() -> None:
    # GSM8K's score (accuracy) is none of its extra metrics: it must still get a column, first.
    dev = {"score": 0.5, "n": 2, "stage_metrics": {}, "extra": {"solve_acc": 0.25}}
    usage = {"lm_calls": 4, "tokens": 9, "wall_s": 1.0}
    results = {
        "metric": "accuracy",
        "settings": {
            "task": "gsm8k", "methods": [], "seeds": [0], "budget_calls": 10,
            "val_size": 3, "bootstrap_size": 3, "eval_split": "dev", "test": None,
        },
        "cells": {"unoptimized/all": {"method": "unoptimized", "status": "completed", "eval": {"dev": dev},
                                      "usage": usage}},
    }  # fmt: skip
    header, _, row = format_table(results).splitlines()[:3]
    assert header.startswith("| method | accuracy | SOLVE_ACC |")
    assert row.startswith("| unoptimized | 0.500 ± 0.000 | 0.250 ± 0.000 |")


def test_table_pairs_each_method_with_the_unoptimized_program_example_by_example() -> None:
    def dev(scores: list[float]) -> dict[str, Any]:
        return {"score": sum(scores) / len(scores), "n": len(scores), "stage_metrics": {}, "extra": {},
                "example_scores": scores}  # fmt: skip

    usage = {"lm_calls": 4, "tokens": 9, "wall_s": 1.0}
    base = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    better = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    results = {
        "settings": {
            "task": "hotpotqa", "methods": ["coordinate"], "seeds": [0, 1], "budget_calls": 10,
            "val_size": 3, "bootstrap_size": 3, "eval_split": "dev", "test": None,
        },
        "cells": {
            "unoptimized/all": {"method": "unoptimized", "status": "completed", "eval": {"dev": dev(base)},
                                "usage": usage},
            "coordinate/seed0": {"method": "coordinate", "seed": 0, "status": "completed",
                                 "eval": {"dev": dev(better)}, "usage": usage},
            "coordinate/seed1": {"method": "coordinate", "seed": 1, "status": "completed",
                                 "eval": {"dev": dev(base)}, "usage": usage},
        },
    }  # fmt: skip
    table = format_table(results)
    row = next(line for line in table.splitlines() if line.startswith("| coordinate |"))
    # mean over the two seeds per example: +0.5 on 4 of 8 examples -> +0.25
    assert "| +0.250 [+0." in row
    assert "paired t 95 % interval, n=8" in table
