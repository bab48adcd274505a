"""The MBPP and HumanEval generate -> test -> refine programs on the real embedded model (structure, not quality)."""

from __future__ import annotations

import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.tasks._code import CodeTask
from stageopt.tasks.humaneval import HumanEvalTask
from stageopt.tasks.mbpp import MBPPTask

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("task", [MBPPTask(), HumanEvalTask()], ids=["mbpp", "humaneval"])
def test_code_program_runs_on_two_dev_examples(gemma: LocalLM, task: CodeTask) -> None:
    report = evaluate(
        task.program(),
        task.load("dev", n=2),
        task.metric,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
    )
    assert report.errors == 0
    assert set(report.stage_metrics) == {"generate", "refine"}
    assert all(0.0 <= v <= 1.0 for v in report.stage_metrics.values())
    assert 0.0 <= report.score <= 1.0
    for result in report.examples:
        prediction = result.prediction
        assert isinstance(prediction["code"], str)
        assert isinstance(prediction["visible_after_generate"], bool)
        # refine runs exactly when the visible test failed after generate
        assert prediction["refined"] is not prediction["visible_after_generate"]
        assert [c.stage for c in result.calls] == ["generate", "refine"][: 1 + prediction["refined"]]
