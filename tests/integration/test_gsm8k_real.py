"""The GSM8K program on the real embedded model: four stages run, parse and are scored."""

from __future__ import annotations

import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.tasks.gsm8k import GSM8KTask

pytestmark = pytest.mark.integration

STAGES = ["understand", "plan", "solve", "verify"]


def test_four_stages_run_and_are_scored_on_dev(gemma: LocalLM) -> None:
    task = GSM8KTask()
    examples = task.load("dev", n=2)
    report = evaluate(
        task.program(),
        examples,
        task.metric,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
    )
    assert report.errors == 0
    assert report.n == 2
    assert list(report.stages) == STAGES
    for name in ["understand", "plan", "verify"]:
        assert report.stages[name].calls == 2
    # one revision per example at most, each solve call followed by one for a missing Answer: at most
    assert 2 <= report.stages["solve"].calls <= 8
    assert 0.0 <= report.parse_rate <= 1.0
    assert set(report.stage_metrics) == set(STAGES)
    assert all(0.0 <= value <= 1.0 for value in report.stage_metrics.values())
    assert set(report.extra) == {"solve_acc", "revision_rate", "has_number"}
    for result in report.examples:
        stages = [c.stage for c in result.calls]
        # the adapter's follow-up call for a missing Answer: is a second call of the same stage
        runs = [stage for i, stage in enumerate(stages) if i == 0 or stage != stages[i - 1]]
        assert runs[:4] == STAGES
        assert runs[4:] in ([], ["solve"])
        assert (len(runs) == 5) is bool(result.prediction["revised"])
        assert stages.count("solve") <= 2 * (1 + bool(result.prediction["revised"]))
        assert all(c.prompt_tokens > 0 and c.latency_s > 0 for c in result.calls)
        assert result.score in (0.0, 1.0)
