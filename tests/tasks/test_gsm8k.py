"""GSM8K task: loading and validation, the numeric metric, the four-stage program and stage metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import dspy
import pytest

from stageopt import DataError
from stageopt.evaluation import BudgetLedger, evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.proposers import BootstrapDemoProposer, ProposalContext
from stageopt.tasks.gsm8k import (
    GSM8KTask,
    MathReasoner,
    clean_solution,
    intermediate_results,
    last_number,
    same_number,
    used_question_numbers,
    wants_revision,
)
from tests.conftest import scripted_lm

ROW = {
    "id": "gsm8k-train-00001",
    "question": "Tom has 3 boxes with 4 apples each. He eats 2 apples. How many apples are left?",
    "answer": "10",
    "solution": "Tom has 3*4=<<3*4=12>>12 apples.\nAfter eating he has 12-2=<<12-2=10>>10 apples.\n#### 10",
}


def _write(tmp_path: Path, rows: Sequence[object], name: str = "dev") -> Path:
    folder = tmp_path / "gsm8k"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


# ---- loading -------------------------------------------------------------------------------------


def test_loads_real_rows_with_labels(data_root: Path) -> None:
    task = GSM8KTask(data_dir=data_root)
    dev = task.load("dev", n=3)
    assert len(dev) == 3
    assert len(task.load("train", n=2)) == 2
    first = dev[0]
    assert first.id.startswith("gsm8k-train-")
    assert set(first.inputs().keys()) == {"question"}
    assert first.answer == "42"
    assert first.intermediates == ["22", "20", "42"]
    assert first.question_numbers == ["26", "6", "10"]
    for example in dev:
        assert "<<" not in example.solution
        assert "####" not in example.solution
        assert example.plan.startswith("1. ")
        assert example.facts.startswith("Numbers: ")
        assert same_number(example.answer, example.answer)


def test_gold_solution_helpers() -> None:
    solution = ROW["solution"]
    assert clean_solution(solution) == "Tom has 3*4=12 apples.\nAfter eating he has 12-2=10 apples."
    assert intermediate_results(solution) == ["12", "10"]
    assert used_question_numbers(ROW["question"], solution) == ["3", "4", "2"]
    assert used_question_numbers("Half of 80 kg, then 1/4 of it.", "80/2=<<80/2=40>>40, 40*1/4=<<40*1/4=10>>10") == [
        "80",
        "1",
        "4",
    ]


def test_a_split_may_be_a_jsonl_path(tmp_path: Path) -> None:
    path = _write(tmp_path, [ROW, {**ROW, "id": "b"}], name="mine") / "gsm8k" / "mine.jsonl"
    examples = GSM8KTask().load(str(path), n=1)
    assert [e.id for e in examples] == [ROW["id"]]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"dev\.jsonl:2: invalid JSON"),
        ({k: v for k, v in ROW.items() if k != "solution"}, r"dev\.jsonl:2: missing field 'solution'"),
        ({**ROW, "answer": 10}, r"dev\.jsonl:2: field 'answer' should be str"),
        ({**ROW, "answer": "ten"}, r"dev\.jsonl:2: field 'answer' must be a number"),
        ({**ROW, "solution": "  "}, r"dev\.jsonl:2: field 'solution' is empty"),
        ({**ROW, "answer": "11"}, r"dev\.jsonl:2: field 'solution' ends with #### '10'"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    task = GSM8KTask(data_dir=_write(tmp_path, [ROW, row]))
    with pytest.raises(DataError, match=message):
        task.load("dev")


def test_missing_split_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="known splits are train and dev"):
        GSM8KTask(data_dir=_write(tmp_path, [ROW])).load("test")


# ---- the metric ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "gold", "right"),
    [
        ("42", "42", True),
        ("The answer is 42 marbles.", "42", True),
        ("42.", "42", True),
        ("18.0", "18", True),
        ("$1,260", "1260", True),
        ("1,260.00 dollars", "1260", True),
        ("0.5", "1/2", True),
        ("1/2", "0.5", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("12 - 2 = 10, so 10", "10", True),
        ("10 apples, then 12", "10", False),  # the last number counts
        ("1,2,3", "3", True),  # not a thousands group
        ("ten", "10", False),
        ("", "10", False),
    ],
)
def test_exact_numeric_match(prediction: str, gold: str, right: bool) -> None:
    task = GSM8KTask()
    example = dspy.Example(question="q", answer=gold)
    assert task.metric(example, dspy.Prediction(answer=prediction)) == float(right)


def test_last_number_parsing() -> None:
    assert last_number("no number here") is None
    assert last_number(None) is None
    assert last_number("costs $5.50.") == last_number("5.5")
    assert last_number("x10 or 7") == 7  # digits glued to a word are not a number


@pytest.mark.parametrize(
    ("verdict", "revise"),
    [
        ("ok", False),
        ("OK, the answer is right", False),
        ("correct", False),
        ("", False),
        ("The answer is 42", False),
        ("revise: the answer should be 12", True),
        ("Revise", True),
        ("wrong, it is 12", True),
        ("No. 12", True),
        ("it must revise", True),
    ],
)
def test_verdict_reading(verdict: str, revise: bool) -> None:
    assert wants_revision(verdict) is revise


# ---- the program ---------------------------------------------------------------------------------


def _stage(prompt: str) -> str:
    last = prompt.split("\n\n---\n\n")[-1].rstrip()
    for name in ("Facts", "Plan", "Solution", "Verdict"):
        if last.endswith(f"{name}:"):
            return name.lower()
    raise AssertionError(f"unexpected prompt {last[-80:]!r}")


def _script(
    *, verdict: str = " ok", retry: str = " 12-2=10\nAnswer: 10", first: str | None = None
) -> Callable[[str], str]:
    def answer(prompt: str) -> str:
        stage = _stage(prompt)
        if stage == "facts":
            return " 3 boxes, 4 apples each, 2 eaten; asked: apples left"
        if stage == "plan":
            return " 1. Multiply 3 by 4 to get 12.\n2. Subtract 2."
        if stage == "solution":
            if "judged wrong" in prompt:
                return retry
            return first if first is not None else " 3*4=12\n12-2=10\nAnswer: 10"
        return verdict

    return answer


def test_stages_are_named_understand_plan_solve_verify() -> None:
    program = GSM8KTask().program()
    assert isinstance(program, MathReasoner)
    assert [name for name, _ in program.named_predictors()] == ["understand", "plan", "solve", "verify"]


def test_single_stage_baseline_is_one_solve_call() -> None:
    program = GSM8KTask().single_stage_program()
    assert [name for name, _ in program.named_predictors()] == ["solve"]
    lm = scripted_lm(_script())
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        prediction = program(question=ROW["question"])
    assert lm.engine.calls == 1
    assert prediction.answer == prediction.solve_answer == "10"


def _run(script: Callable[[str], str], *, revise: bool = True) -> tuple[dspy.Prediction, int]:
    lm = scripted_lm(script)
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        prediction = MathReasoner(revise=revise)(question=ROW["question"])
    return prediction, lm.engine.calls


def test_accepted_answer_costs_four_calls() -> None:
    prediction, calls = _run(_script())
    assert calls == 4
    assert prediction.answer == "10"
    assert prediction.solve_answer == "10"
    assert prediction.verdict == "ok"
    assert prediction.revised is False
    assert prediction.plan == "1. Multiply 3 by 4 to get 12.\n2. Subtract 2."


def test_a_revision_is_exactly_one_extra_solve_call() -> None:
    prediction, calls = _run(_script(first=" 3*4=12\nAnswer: 12", verdict=" revise: he ate 2, so 10"))
    assert calls == 5
    assert prediction.revised is True
    assert prediction.solve_answer == "12"
    assert prediction.answer == "10"
    assert prediction.final_solution == "12-2=10"


def test_revision_without_a_number_takes_the_verifiers_answer() -> None:
    script = _script(first=" 3*4=12\nAnswer: 12", verdict=" revise, it is 10", retry=" I am not sure\nAnswer: many")
    prediction, calls = _run(script)
    assert calls == 5
    assert prediction.answer == "10"


def test_revision_can_be_switched_off() -> None:
    prediction, calls = _run(_script(first=" 3*4=12\nAnswer: 12", verdict=" revise"), revise=False)
    assert calls == 4
    assert prediction.answer == "12"


def test_an_answer_without_a_number_falls_back_to_the_solution() -> None:
    prediction, _ = _run(_script(first=" 3*4=12\n12-2=10\nAnswer: ten apples"))
    assert prediction.solve_answer == "10"


# ---- stage metrics -------------------------------------------------------------------------------


def _example(tmp_path: Path) -> dspy.Example:
    return GSM8KTask(data_dir=_write(tmp_path, [ROW])).load("dev")[0]


def test_stage_metrics_on_a_crafted_prediction(tmp_path: Path) -> None:
    task = GSM8KTask()
    example = _example(tmp_path)
    prediction = dspy.Prediction(
        facts="3 boxes of 4 apples",  # 2 of the 3 used question numbers
        plan="first get 12 apples",  # 1 of the 2 intermediate results
        solution="3*4=12",
        solve_answer="12",  # wrong before verify
        verdict="revise: it is 10",  # right to ask for a revision
        revised=True,
        answer="10",
    )
    metrics = {name: fn(example, prediction) for name, fn in task.stage_metrics().items()}
    assert metrics == {"understand": pytest.approx(2 / 3), "plan": 0.5, "solve": 0.0, "verify": 1.0}
    assert task.metric(example, prediction) == 1.0
    extra = {name: fn(example, prediction) for name, fn in task.extra_metrics().items()}
    assert extra == {"solve_acc": 0.0, "revision_rate": 1.0, "has_number": 1.0}
    accepted_wrong = dspy.Prediction(**{**prediction.toDict(), "verdict": "ok", "answer": "12"})
    assert task.stage_metrics()["verify"](example, accepted_wrong) == 0.0
    assert task.metric(example, accepted_wrong) == 0.0


def test_evaluation_reports_every_stage(tmp_path: Path) -> None:
    task = GSM8KTask(data_dir=_write(tmp_path, [ROW, {**ROW, "id": "b"}]))
    report = evaluate(
        task.program(),
        task.load("dev"),
        task.metric,
        lm=scripted_lm(_script(first=" 3*4=12\nAnswer: 12", verdict=" revise")),
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
        capture_traces=True,
    )
    assert report.errors == 0
    assert report.score == 1.0
    assert list(report.stages) == ["understand", "plan", "solve", "verify"]
    assert {name: s.calls for name, s in report.stages.items()} == {"understand": 2, "plan": 2, "solve": 4, "verify": 2}
    assert report.stage_metrics == {"understand": 1.0, "plan": 0.5, "solve": 0.0, "verify": 1.0}
    assert report.extra == {"solve_acc": 0.0, "revision_rate": 1.0, "has_number": 1.0}
    assert report.parse_rate == 1.0

    # labeled demos: gold facts, plan, solution and answer; none for the verdict
    context = ProposalContext(
        lm=scripted_lm(_script()),
        prompt_lm=scripted_lm(_script()),
        adapter=SmallLMAdapter(),
        ledger=BudgetLedger(),
        traces=report.examples,
        trainset=task.load("dev"),
    )
    pools = BootstrapDemoProposer().pools(task.program(), context)
    labeled = {name: len(pool[1]) for name, pool in pools.items()}
    assert labeled == {"understand": 2, "plan": 2, "solve": 2, "verify": 0}
    solve_demo = pools["solve"][1][0]
    assert solve_demo["answer"] == "10"
    assert solve_demo["plan"] == "1. Multiply 3 by 4 to get 12.\n2. Subtract 2."  # the first call's inputs
