"""The CLI: one clear line and exit code 2 for bad input; eval and optimize write what they promise."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt import ConfigurationError
from stageopt.cli import _commands
from stageopt.cli._main import main
from tests.conftest import scripted_lm
from tests.tasks.test_hotpotqa import ROW, _script, _write


def _rows(n: int) -> list[dict[str, Any]]:
    return [{**ROW, "id": f"x{i}"} for i in range(n)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = _write(tmp_path / "data", _rows(6), "dev")
    _write(root, _rows(8), "train")
    return root


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_resolve(spec: str, **kwargs: Any) -> dspy.LM:
        return scripted_lm(_script)

    monkeypatch.setattr(_commands, "resolve_lm", fake_resolve)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    assert err[-1].startswith("stageopt: error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--task", "nope"], "unknown task 'nope'; known: gsm8k, hotpotqa, humaneval, mbpp"),
        (["eval", "--n", "0"], "--n must be >= 1"),
        (["eval", "--num-threads", "0"], "--num-threads must be >= 1"),
        (["eval", "--split", "test"], "known splits are train and dev"),
        (["eval", "--program", "missing.json"], "--program missing.json does not exist"),
        (["optimize", "--budget-calls", "0", "--out", "runs/x"], "lm_calls"),
        (["optimize", "--budget-calls", "10", "--out", "nowhere", "--resume"], "no run found"),
        (["optimize", "--budget-calls", "10", "--out", "x", "--strategy", "nope"], "unknown strategy 'nope'; known:"),
        (["optimize", "--budget-calls", "10", "--out", "x", "--option", "n_trials"], "write KEY=VALUE"),
        (
            ["optimize", "--budget-calls", "10", "--out", "x", "--strategy", "joint", "--option", "rounds=2"],
            "not a setting of strategy 'joint'; its settings: min_delta, n_trials, patience",
        ),
        (
            ["optimize", "--budget-calls", "10", "--out", "x", "--strategy", "joint", "--option", "rounds.x=2"],
            "not a setting of strategy 'joint'",
        ),
        (
            ["optimize", "--budget-calls", "10", "--out", "x", "--strategy", "joint", "--option", "n_trials.x=2"],
            "'n_trials' of strategy 'joint' takes no fields; write --option n_trials=VALUE",
        ),
        (
            [
                *["optimize", "--budget-calls", "10", "--out", "x", "--strategy", "softprompt"],
                *["--option", "schedule.epochs=5", "--option", 'schedule={"lr": 0.1}'],
            ],
            "both set 'schedule': give the whole value or its fields one by one, not both",
        ),
        (
            ["optimize", "--budget-calls", "10", "--out", "x", "--option", "allocate.mode=2", "--allocate", "blame"],
            "give --allocate or --option allocate=..., not both",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, data: Path, scripted: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--data-dir", str(data)]) == 2
    assert message in _error_line(capsys)


def test_dotted_options_set_fields_of_a_mapping_setting() -> None:
    options = ["schedule.epochs=5", "schedule.lr=0.01", "method=lora", "schedule.optimizer=sgd", "schedule.epochs=6"]
    assert _commands.strategy_options("softprompt", options) == {
        "schedule": {"epochs": 6, "lr": 0.01, "optimizer": "sgd"},  # a repeated field: the last one wins
        "method": "lora",
    }
    assert _commands.strategy_options("softprompt", ['schedule={"epochs": 5}']) == {"schedule": {"epochs": 5}}
    # generic: any setting that takes a mapping, for any strategy
    assert _commands.strategy_options("coordinate", ["allocate.probe_size=3"]) == {"allocate": {"probe_size": 3}}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["schedule.epochs=5", 'schedule={"lr": 0.1}'], "both set 'schedule'"),
        (['schedule={"lr": 0.1}', "schedule.epochs=5"], "both set 'schedule'"),
        (["schedule.=5"], "write KEY=VALUE or KEY.FIELD=VALUE"),
        ([".epochs=5"], "write KEY=VALUE or KEY.FIELD=VALUE"),
        (["schedule.epochs"], "write KEY=VALUE or KEY.FIELD=VALUE"),
        (["epochs=5"], "'epochs' is not a setting of strategy 'softprompt'"),
        (["method.x=lora"], "'method' of strategy 'softprompt' takes no fields"),
    ],
)
def test_bad_dotted_options_are_refused(options: list[str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        _commands.strategy_options("softprompt", options)


def test_an_unknown_schedule_field_is_refused_listing_the_fields(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "10", "--out", str(tmp_path / "sp")]
    argv += ["--strategy", "softprompt", "--adapter", "small", "--option", "schedule.epoch=5"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "unknown training schedule setting(s) epoch" in line
    assert "epochs, batch_size" in line


def test_malformed_data_names_the_line(tmp_path: Path, scripted: None, capsys: pytest.CaptureFixture[str]) -> None:
    root = _write(tmp_path, [ROW, "{oops"], "dev")
    assert main(["eval", "--data-dir", str(root), "--n", "5"]) == 2
    assert "dev.jsonl:2: invalid JSON" in _error_line(capsys)


def test_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--data-dir", str(tmp_path / "absent")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_eval_prints_score_and_stage_table(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    assert main(["eval", "--data-dir", str(data), "--n", "3", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "score 1.000" in out
    for stage in ("query1", "query2", "answer"):
        assert stage in out
    saved = json.loads(report.read_text())
    assert saved["n"] == 3
    assert saved["usage"]["lm_calls"] == 9
    assert saved["stages"]["answer"]["parse_rate"] == 1.0
    trace = saved["examples"][0]["trace"]
    assert [t["stage"] for t in trace] == ["query1", "query2", "answer"]
    assert trace[2]["outputs"]["answer"] == "Paris"
    assert "[France]" in trace[2]["inputs"]["passages"]


def test_optimize_writes_result_program_and_study(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "60", "--out", str(out), "--val-size", "3"]
    assert main([*argv, "--bootstrap-size", "3", "--seed", "1"]) == 0
    assert {p.name for p in out.iterdir()} >= {"result.json", "program.json", "optuna.db"}
    result = json.loads((out / "result.json").read_text())
    for key in ("schema_version", "strategy", "task", "seed", "budget", "usage", "baseline", "best", "history"):
        assert key in result
    assert result["task"] == "hotpotqa"
    assert result["seed"] == 1
    assert result["usage"]["lm_calls"] <= 60
    assert set(result["usage"]) >= {"lm_calls", "backend_calls", "prompt_tokens", "completion_tokens", "wall_s"}
    assert {"trial", "lm_calls", "score", "stage"} <= set(result["history"][0])
    assert result["notes"]["racing"]["settings"] == {"p_threshold": 0.1, "min_examples": 10, "step": 5}
    assert "run directory" in capsys.readouterr().out

    # the saved program loads with DSPy's own `load` and `eval --program` scores it
    assert main(["eval", "--data-dir", str(data), "--n", "2", "--program", str(out / "program.json")]) == 0
    # a second run into the same directory is refused unless resumed
    assert main(argv) == 2
    assert "--resume" in _error_line(capsys)


def test_no_racing_scores_every_candidate_on_every_example(data: Path, scripted: None, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "60", "--out", str(out), "--val-size", "3"]
    assert main([*argv, "--bootstrap-size", "3", "--no-racing"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["notes"]["racing"]["settings"] is None
    assert not any(t["pruned"] for t in result["history"])


def test_parser_lists_every_registered_strategy() -> None:
    from stageopt.cli._main import STRATEGY_NAMES
    from stageopt.strategies import STRATEGIES

    assert sorted(STRATEGY_NAMES) == sorted(STRATEGIES)


@pytest.mark.parametrize(
    "strategy", ["independent", "joint", "hierarchical", "multifidelity", "evolutionary", "random", "grid"]
)
def test_optimize_runs_every_strategy(data: Path, scripted: None, tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "60", "--out", str(out), "--val-size", "3"]
    extra = ["--option", "patience=2"] if strategy in {"joint", "random"} else []
    assert main([*argv, "--bootstrap-size", "3", "--strategy", strategy, *extra]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["strategy"] == strategy
    assert result["usage"]["lm_calls"] <= 60
    assert len(result["history"]) >= 2


def test_demo_prints_before_after_and_writes_reports(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--data-dir", str(data), "--n", "2", "--budget-calls", "60", "--val-size", "2"]
    assert main([*argv, "--bootstrap-size", "2", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "dev metric" in out
    assert "before" in out
    assert "after" in out
    assert "chosen configuration" in out
    (run,) = list((tmp_path / "demo").iterdir())
    assert {p.name for p in run.iterdir()} >= {"result.json", "program.json", "before.json", "after.json"}
    assert json.loads((run / "result.json").read_text())["usage"]["lm_calls"] <= 60
