"""diagnose() on the HotpotQA program with a scripted LM: every section, cost, budget and the JSON contract."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from stageopt import BudgetExhaustedError, ConfigurationError
from stageopt.diagnostics import Diagnosis, DiagnosisConfig, diagnose
from stageopt.evaluation import Budget
from stageopt.lm import SmallLMAdapter
from stageopt.tasks import HotpotQATask
from tests.conftest import ScriptedEngine, scripted_lm
from tests.tasks.test_hotpotqa import ROW, _write

LYON_QUERY = " Lyon city"


def hop_script(prompt: str) -> str:
    """query1 finds Lyon only with a demo; query2 finds France; the answer needs both paragraphs."""
    blocks = prompt.split("\n\n---\n\n")
    last = blocks[-1]
    if last.rstrip().endswith("Answer:"):
        return " Paris" if "[France]" in last and "[Lyon]" in last else " unknown"
    if "Passages:" in last:
        return " capital of France"
    return LYON_QUERY if len(blocks) >= 3 else " volcano Japan"


@pytest.fixture
def task(tmp_path: Path) -> HotpotQATask:
    return HotpotQATask(k=1, data_dir=_write(tmp_path, [{**ROW, "id": f"x{i}"} for i in range(3)]))


def _tuned(task: HotpotQATask) -> dspy.Module:
    program = task.program()
    program.query1.demos = [dspy.Example(question="Where is Lyon?", query="Lyon city")]
    return program


def _diagnose(task: HotpotQATask, program: dspy.Module, **kwargs: object) -> tuple[Diagnosis, int]:
    lm = scripted_lm(hop_script)
    assert isinstance(lm.engine, ScriptedEngine)
    diagnosis = diagnose(program, task.load("dev"), task=task, lm=lm, adapter=SmallLMAdapter(), **kwargs)  # type: ignore[arg-type]
    return diagnosis, lm.engine.calls


def test_every_section_of_a_tuned_program_against_its_baseline(task: HotpotQATask) -> None:
    d, calls = _diagnose(task, _tuned(task), baseline=task.program())
    assert (d.task, d.metric, d.n, d.score) == ("hotpotqa", "F1", 3, 1.0)
    assert list(d.stages) == ["query1", "query2", "answer"]
    assert d.stages["query1"].metric == 0.5  # hop 1 finds Lyon, one of the two gold titles
    assert d.stages["query2"].metric == 1.0
    assert d.stages["answer"].metric is None
    assert d.stages["query1"].mean_output_chars == len(LYON_QUERY)
    assert d.stages["answer"].mean_output_chars == len(" Paris")
    assert all(s.calls == 3 and s.parse_failure_rate == 0.0 for s in d.stages.values())
    assert d.error_origins.failed == 0

    a = d.attribution
    assert a is not None
    assert a.exact
    assert (a.baseline_score, a.program_score) == (0.0, 1.0)
    assert {name: s.shapley for name, s in a.stages.items()} == pytest.approx(
        {"query1": 1.0, "query2": 0.0, "answer": 0.0}
    )
    assert len(a.hybrids) == 8
    # a hybrid scores 1 exactly when it takes query1 from the tuned program
    assert all(h.score == float("query1" in h.from_program) for h in a.hybrids)

    assert d.oracle is not None
    assert set(d.oracle) == {"answer"}
    assert d.oracle["answer"].score == 1.0
    assert d.oracle["answer"].program_score == d.score
    # 8 programs x 3 examples x 3 stages, then the oracle's answer stage on 3 examples
    assert calls == d.usage["lm_calls"] == 8 * 9 + 3


def test_unoptimized_program_errors_originate_at_query1(task: HotpotQATask) -> None:
    d, calls = _diagnose(task, task.program())
    assert d.score == 0.0
    assert d.error_origins.failed == 3
    assert d.error_origins.counts == {"query1": 3, "query2": 0, "answer": 0}
    assert d.attribution is None
    assert d.oracle is not None
    assert d.oracle["answer"].headroom == 1.0
    assert calls == 9 + 3
    lenient, _ = _diagnose(task, task.program(), config=DiagnosisConfig(thresholds={"query1": 0.0}))
    # query1 passes now; query2's recall after both hops (France only) is still below 1.0
    assert lenient.error_origins.counts == {"query1": 0, "query2": 3, "answer": 0}


def test_budget_is_enforced_through_evaluate(task: HotpotQATask) -> None:
    with pytest.raises(BudgetExhaustedError, match="lm_calls limit 20"):
        _diagnose(task, _tuned(task), baseline=task.program(), budget=Budget(lm_calls=20))


def test_needs_a_metric_and_examples(task: HotpotQATask) -> None:
    with pytest.raises(ConfigurationError, match="pass task= or metric="):
        diagnose(task.program(), task.load("dev"))
    with pytest.raises(ConfigurationError, match="at least one example"):
        diagnose(task.program(), [], task=task)
    with pytest.raises(ConfigurationError, match="n_permutations"):
        DiagnosisConfig(n_permutations=0)


CONTRACT_KEYS = {"schema_version", "task", "metric", "n", "score", "ci95", "stages", "error_origins"}
CONTRACT_KEYS |= {"attribution", "oracle", "usage"}
STAGE_KEYS = {"metric", "calls", "parse_failure_rate", "mean_output_chars", "mean_prompt_tokens"}
STAGE_KEYS |= {"mean_completion_tokens", "mean_latency_s", "p95_latency_s"}


def test_json_follows_the_contract_and_round_trips(task: HotpotQATask, tmp_path: Path) -> None:
    d, _ = _diagnose(task, _tuned(task), baseline=task.program())
    path = d.save(tmp_path / "run" / "diagnosis.json")
    assert [p.name for p in path.parent.iterdir()] == ["diagnosis.json"]  # no temporary file left
    data = json.loads(path.read_text())
    assert set(data) == CONTRACT_KEYS
    assert data["schema_version"] == 1
    assert all(set(s) == STAGE_KEYS for s in data["stages"].values())
    assert set(data["error_origins"]) == {"fail_below", "failed", "n", "counts", "thresholds"}
    assert set(data["attribution"]) >= {"baseline_score", "program_score", "exact", "hybrids", "stages"}
    assert data["attribution"]["hybrids"][1] == {"from_program": ["query1"], "score": 1.0}
    assert set(data["oracle"]["answer"]) == {"description", "score", "ci95", "program_score"}
    assert set(data["usage"]) >= {"lm_calls", "tokens", "wall_s"}
    assert Diagnosis.load(path) == d
    with pytest.raises(ConfigurationError, match="schema_version 99"):
        Diagnosis.from_dict({**data, "schema_version": 99})
