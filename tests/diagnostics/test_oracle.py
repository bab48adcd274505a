"""Oracle substitution: the tasks' gold-upstream variants and how diagnose() scores them."""

from __future__ import annotations

from pathlib import Path

import dspy
import pytest

from stageopt import ConfigurationError
from stageopt.diagnostics import diagnose
from stageopt.diagnostics._oracle import with_gold_inputs
from stageopt.lm import SmallLMAdapter
from stageopt.tasks import GSM8KTask, HotpotQATask
from stageopt.tasks.gsm8k import SingleStageMath
from tests.conftest import scripted_lm
from tests.diagnostics.test_diagnosis import hop_script
from tests.tasks.test_gsm8k import ROW as MATH_ROW
from tests.tasks.test_gsm8k import _stage
from tests.tasks.test_gsm8k import _write as write_math
from tests.tasks.test_hotpotqa import ROW, _write


def test_hotpotqa_answer_oracle_reads_the_gold_paragraphs(tmp_path: Path) -> None:
    task = HotpotQATask(data_dir=_write(tmp_path, [ROW]))
    program = task.program()
    program.answer.demos = [dspy.Example(question="q", passages="[A] a", answer="a")]
    oracles = task.oracle_programs(program)
    assert set(oracles) == {"answer"}
    oracle = oracles["answer"]
    assert oracle.gold_inputs == ("gold_titles",)
    assert [name for name, _ in oracle.program.named_predictors()] == ["answer"]
    copied = dict(oracle.program.named_predictors())["answer"]
    assert copied is not program.answer
    assert len(copied.demos) == 1
    (example,) = with_gold_inputs(task.load("dev"), oracle.gold_inputs, stage="answer")
    with dspy.context(lm=scripted_lm(hop_script), adapter=SmallLMAdapter()):
        prediction = oracle.program(**example.inputs())
    assert prediction.answer == "Paris"
    assert prediction.passages.splitlines() == [
        "[Lyon] Lyon is a city in France. It lies on the Rhone.",
        "[France] France is a country. Its capital is Paris.",
    ]


def test_gsm8k_solve_oracle_beats_a_bad_plan(tmp_path: Path) -> None:
    task = GSM8KTask(data_dir=write_math(tmp_path, [MATH_ROW, {**MATH_ROW, "id": "gsm8k-train-00002"}]))

    def script(prompt: str) -> str:
        stage = _stage(prompt)
        if stage == "facts":
            return " some numbers"
        if stage == "plan":
            return " 1. Guess."
        if stage == "solution":  # right only when the plan is the gold one
            return " 3*4=12\n12-2=10\nAnswer: 10" if "Tom has 3*4=12 apples." in prompt else " hmm\nAnswer: 7"
        return " ok"

    d = diagnose(task.program(), task.load("dev"), task=task, lm=scripted_lm(script), adapter=SmallLMAdapter())
    assert d.score == 0.0
    # the facts name none of the question's numbers: the errors originate at the first stage
    assert d.error_origins.counts == {"understand": 2, "plan": 0, "solve": 0, "verify": 0}
    assert d.oracle is not None
    assert set(d.oracle) == {"solve"}
    assert d.oracle["solve"].score == 1.0
    assert d.oracle["solve"].description.startswith("solve stage given the gold facts and plan")
    assert task.oracle_programs(SingleStageMath()) == {}


def test_programs_without_the_stage_get_no_oracle() -> None:
    assert HotpotQATask().oracle_programs(SingleStageMath()) == {}


def test_missing_gold_field_is_a_clear_error() -> None:
    example = dspy.Example(id="q7", question="q", context=[]).with_inputs("question", "context")
    with pytest.raises(ConfigurationError, match="gold field\\(s\\) gold_titles, which example q7 lacks"):
        with_gold_inputs([example], ("gold_titles",), stage="answer")
