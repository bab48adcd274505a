"""stageopt diagnose on the real embedded model: HotpotQA, a one-demo program against the unoptimized one."""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from stageopt.diagnostics import Diagnosis, diagnose
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.tasks import HotpotQATask

pytestmark = pytest.mark.integration

N = 2


def test_diagnose_hotpotqa_program_against_baseline(gemma: LocalLM, tmp_path: Path) -> None:
    task = HotpotQATask()
    examples = task.load("dev", n=N)
    (labeled,) = task.load("train", n=1)
    program = task.program()
    program.answer.demos = [
        dspy.Example(question=labeled.question, passages=task.gold_passages(labeled), answer=labeled.answer)
    ]
    diagnosis = diagnose(program, examples, task=task, baseline=task.program(), lm=gemma, adapter=SmallLMAdapter())

    data = json.loads(json.dumps(diagnosis.to_dict()))
    assert Diagnosis.from_dict(data) == diagnosis
    assert {"schema_version", "task", "metric", "n", "score", "ci95", "stages", "error_origins"} <= set(data)
    assert (data["task"], data["metric"], data["n"]) == ("hotpotqa", "F1", N)
    assert list(data["stages"]) == ["query1", "query2", "answer"]
    for stage in data["stages"].values():
        assert stage["calls"] == N
        assert stage["mean_prompt_tokens"] > 0
        assert stage["mean_output_chars"] > 0
        assert 0 < stage["mean_latency_s"] <= stage["p95_latency_s"]
    assert data["stages"]["query1"]["metric"] is not None
    assert data["stages"]["answer"]["metric"] is None
    origins = data["error_origins"]
    assert sum(origins["counts"].values()) == origins["failed"] <= N

    attribution = data["attribution"]
    assert attribution["exact"] is True
    assert len(attribution["hybrids"]) == 8
    assert attribution["program_score"] == pytest.approx(data["score"])
    shapley = sum(s["shapley"] for s in attribution["stages"].values())
    assert shapley == pytest.approx(attribution["program_score"] - attribution["baseline_score"], abs=1e-9)
    for stage in attribution["stages"].values():
        lo, hi = stage["ci95"]
        assert lo <= stage["shapley"] <= hi

    oracle = data["oracle"]["answer"]
    assert 0.0 <= oracle["score"] <= 1.0
    assert oracle["program_score"] == pytest.approx(data["score"])
    # program, baseline and 6 hybrids of 3 calls per example, then the oracle's answer call per example
    assert data["usage"]["lm_calls"] == 8 * 3 * N + N

    path = diagnosis.save(tmp_path / "diagnosis.json")
    assert Diagnosis.load(path) == diagnosis
