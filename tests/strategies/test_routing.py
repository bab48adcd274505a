"""Per-stage model routing: a stage routed to a model really calls it, in the library and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import optuna
import pytest

from stageopt.cli import _commands
from stageopt.cli._main import main
from stageopt.cli._routing import ROUTING, load_program, save_program
from stageopt.evaluation import MeteredLM, evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import STRUCTURE, JointBayesian, OptimizationResult, SearchSpace
from stageopt.tasks.hotpotqa import MultiHopQA
from tests.conftest import (
    CapitalOfCity,
    ScriptedEngine,
    capital_metric,
    city_examples,
    demo_sensitive_answer,
)
from tests.tasks import test_hotpotqa as hotpot_tests


def named_lm(name: str, fn: Callable[[str], str] = demo_sensitive_answer) -> dspy.LM:
    """A scripted LM whose calls report the model ``scripted/<name>``."""
    return dspy.LM(f"scripted/{name}", engine=ScriptedEngine(fn), cache=False)


def no_capitals(prompt: str) -> str:
    """Like :func:`demo_sensitive_answer`, but this model does not know any capital."""
    answer = demo_sensitive_answer(prompt)
    return answer if prompt.split("\n\n---\n\n")[-1].startswith("City:") else " nowhere"


def test_a_stage_routed_to_b_calls_b_and_reports_it() -> None:
    a, b = named_lm("a"), named_lm("b")
    space = SearchSpace.initial(CapitalOfCity(), settings={"model": ["b"]}, models={"b": b})
    config = space.default_config()
    config["capital"]["model"] = 1
    examples = city_examples()[:4]
    report = evaluate(space.apply(CapitalOfCity(), config), examples, capital_metric, lm=a, adapter=SmallLMAdapter())
    assert (a.engine.calls, b.engine.calls) == (4, 4)
    models = {(c.stage, c.model) for e in report.examples for c in e.calls}
    assert models == {("locate", "scripted/a"), ("capital", "scripted/b")}
    assert report.usage.lm_calls == 8, "calls of the routed model are metered too"
    assert space.describe(config)["capital"]["model"] == "b"
    assert space.describe(config)["locate"]["model"] is None, "choice 0: the run's LM"


def _joint(a: dspy.LM, b: dspy.LM, **kwargs: Any) -> JointBayesian:
    settings: dict[str, Any] = {
        "budget": 400,
        "lm": a,
        "adapter": SmallLMAdapter(),
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
        "n_trials": 16,
        "patience": None,
        "settings": {"model": ["b"]},
        "models": {"b": b},
    }
    settings.update(kwargs)
    return JointBayesian(capital_metric, **settings)


def test_joint_routes_the_stage_that_needs_the_other_model() -> None:
    a, b = named_lm("a", no_capitals), named_lm("b")
    optimizer = _joint(a, b)
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.baseline["score"] == 0.0
    assert result.best["score"] == 1.0
    assert result.best["params"]["capital"]["model"] == "b", "only model b knows capitals"
    assert program.capital.lm is b, "the returned program runs on the caller's LM, not a metered copy"
    assert not isinstance(program.locate.lm, MeteredLM)
    assert result.usage["lm_calls"] == a.engine.calls + b.engine.calls
    assert OptimizationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_routing_with_structure_resumes_and_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        storage = optuna.storages.RDBStorage("sqlite:///:memory:")
        a, b = named_lm("a", no_capitals), named_lm("b")
        first = _joint(a, b, storage=storage, n_trials=5)
        first.compile(CapitalOfCity(), trainset=city_examples())
        # A resumed run rebuilds its models from the caller: fresh LM objects, same names.
        second = _joint(named_lm("a", no_capitals), named_lm("b"), storage=storage, n_trials=10)
        second.compile(CapitalOfCity(), trainset=city_examples())
        assert first.result is not None
        assert second.result is not None
        done = len(first.result.history)
        assert second.result.history[:done] == first.result.history
        assert len(second.result.history) > done
        runs.append([(h["params"], h["score"]) for h in second.result.history])
    assert runs[0] == runs[1], "same seed, same routed search"


# ---- saving and loading routed programs -------------------------------------------------------------


def test_a_routed_program_saves_model_names_and_loads_them_once(tmp_path: Path) -> None:
    a, b = named_lm("a"), named_lm("b")
    program = MultiHopQA().with_structure(hops=1)
    program.query1.lm = b
    program.answer.lm = b
    path = tmp_path / "program.json"
    save_program(program, path, {"a": a, "b": b})
    state = json.loads(path.read_text())
    assert state[ROUTING] == {"query1": "b", "answer": "b"}
    assert state["query1"]["lm"] is None, "no LM class or settings go into the file"
    assert state[STRUCTURE] == {"hops": 1, "k": 2}
    assert program.query1.lm is b, "saving leaves the program as it was"

    built: Counter[str] = Counter()

    def resolve(name: str) -> dspy.BaseLM:
        built[name] += 1
        return named_lm(name)

    loaded = MultiHopQA()
    load_program(loaded, path, lm_name="a", lm=a, resolve=resolve)
    assert built == Counter({"b": 1}), "one LM per model name, shared by its stages"
    assert loaded.query1.lm is loaded.answer.lm
    assert loaded.query1.lm.model == "scripted/b"
    assert loaded.query2.lm is None
    assert loaded.hops == 1


# ---- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = [{**hotpot_tests.ROW, "id": f"x{i}"} for i in range(8)]
    root = hotpot_tests._write(tmp_path / "data", rows[:6], "dev")
    hotpot_tests._write(root, rows, "train")
    return root


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Scripted LMs by name: ``weak`` never answers; counts how often each name is built."""
    counts: Counter[str] = Counter()

    def weak(prompt: str) -> str:
        answer = hotpot_tests._script(prompt)
        return " unknown" if answer == " Paris" else answer

    def fake_resolve(spec: str, **kwargs: Any) -> dspy.LM:
        counts[spec] += 1
        return named_lm(spec, weak if spec == "weak" else hotpot_tests._script)

    monkeypatch.setattr(_commands, "resolve_lm", fake_resolve)
    return counts


def _optimize(data: Path, out: Path, *extra: str, strategy: str = "joint") -> list[str]:
    return [
        "optimize", "--data-dir", str(data), "--budget-calls", "150", "--out", str(out), "--val-size", "3",
        "--bootstrap-size", "3", "--strategy", strategy, *extra,
    ]  # fmt: skip


def test_cli_routes_stages_and_eval_rebuilds_the_models(
    data: Path, built: Counter[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(_optimize(data, out, "--lm", "weak", "--models", "weak,strong,strong")) == 0
    assert built == Counter({"weak": 1, "strong": 1}), "each model is built once; --lm is reused"
    result = json.loads((out / "result.json").read_text())
    assert result["best"]["params"]["answer"]["model"] == "strong", "only 'strong' answers"
    assert result["best"]["score"] > result["baseline"]["score"]
    routing = json.loads((out / "program.json").read_text())[ROUTING]
    assert routing == {s: p["model"] for s, p in result["best"]["params"].items() if p.get("model")}
    built.clear()
    capsys.readouterr()
    assert (
        main(["eval", "--data-dir", str(data), "--n", "2", "--lm", "weak", "--program", str(out / "program.json")]) == 0
    )
    assert "score 1.000" in capsys.readouterr().out, "the answer stage runs on 'strong' again"
    assert built == Counter({"weak": 1, "strong": 1})


def test_cli_searches_structure_and_saves_the_shape(data: Path, built: Counter[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_optimize(data, out, "--lm", "strong", "--search-structure")) == 0
    result = json.loads((out / "result.json").read_text())
    shape = result["best"]["params"][STRUCTURE]
    assert set(shape) == {"hops", "k"}
    assert json.loads((out / "program.json").read_text())[STRUCTURE] == shape
    tried = {json.dumps(h["params"].get(STRUCTURE, {}), sort_keys=True) for h in result["history"]}
    assert len(tried) > 1, "the search varied the shape"
    modules = {p.get("module", 0) for h in result["history"] for s, p in h["params"].items() if s != STRUCTURE}
    assert modules == {0, 1}, "--search-structure also searches plain vs chain of thought"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lm", "weak", "--models", "weak"], "--models lists only --lm (weak)"),
        (["--models", "a,,b"], "give comma-separated model names"),
        (["--search-structure", "--strategy=coordinate"], "'coordinate' searches stage by stage"),
        (["--price", "strong=cheap"], "cannot read price 'strong=cheap'"),
    ],
)
def test_cli_refuses_bad_routing_flags(
    data: Path, built: Counter[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main([*_optimize(data, tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err
