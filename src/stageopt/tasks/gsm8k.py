"""GSM8K as a four-stage reasoning program: understand -> plan -> solve -> verify.

The verify stage judges the solve stage's answer and may ask for one revision: ``solve`` runs
once more with the verifier's note added to the plan (one extra LM call at most). The score is
an exact numeric match of the final answer: the last number of the model's answer, commas and
currency signs removed, compared as an exact rational (``18.0 == 18``, ``1/2 == 0.5``).

The verification stage is a searchable structure knob (``verification``: on or off; off, the
program is understand -> plan -> solve and ``verify`` is never called), see
:class:`~stageopt.strategies.StructureKnobs`.

Gold labels for demos come from the worked ``solution`` of each row: ``facts`` (the question's
numbers and what it asks), ``plan`` (the gold steps, numbered), ``solution`` (the gold steps
without the ``<<a*b=c>>`` calculator annotations) and ``answer``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import dspy

from stageopt.strategies._structure import StructureKnobs
from stageopt.tasks._base import BaseTask, OracleProgram, StageMetric
from stageopt.tasks._data import read_jsonl, resolve_split

# ---- numbers -------------------------------------------------------------------------------------

# A number as people and models write it: optional sign, thousands groups or plain digits, an
# optional decimal part and an optional "/denominator". "42." and "$1,260" are numbers.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?<![\w.])-?\.\d+")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_FINAL_LINE = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)


def to_number(token: str) -> Fraction | None:
    """Parse one number token (``"1,260"``, ``"-3.50"``, ``"3/4"``) exactly; None if it is not one."""
    text = token.replace(",", "").strip()
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            return Fraction(numerator) / Fraction(denominator)
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def numbers(text: str | None, *, fractions: bool = True) -> list[Fraction]:
    """Every number in ``text``, in order (see :func:`to_number`).

    With ``fractions=False`` a ``a/b`` is read as the two numbers ``a`` and ``b`` (operands).
    """
    tokens = (m.group() for m in _NUMBER.finditer(text or ""))
    if not fractions:
        tokens = (part for token in tokens for part in token.split("/"))
    found = (to_number(token) for token in tokens)
    return [value for value in found if value is not None]


def last_number(text: str | None) -> Fraction | None:
    """The last number in ``text`` (the GSM8K scoring rule), or None when there is none."""
    found = numbers(text)
    return found[-1] if found else None


def same_number(prediction: str | None, gold: str) -> bool:
    """Whether the last number of ``prediction`` equals the gold answer numerically."""
    predicted, expected = last_number(prediction), to_number(gold)
    return predicted is not None and expected is not None and predicted == expected


def mentioned(targets: Iterable[str], text: str | None) -> float:
    """Share of the numbers ``targets`` that occur among the numbers of ``text`` (1.0 if none)."""
    wanted = {value for value in (to_number(t) for t in targets) if value is not None}
    if not wanted:
        return 1.0
    present = {*numbers(text), *numbers(text, fractions=False)}
    return len(wanted & present) / len(wanted)


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


# ---- the gold solution ---------------------------------------------------------------------------


def clean_solution(solution: str) -> str:
    """The worked solution without ``<<...>>`` annotations and without the ``#### N`` line."""
    text = _FINAL_LINE.sub("", _ANNOTATION.sub("", solution))
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def intermediate_results(solution: str) -> list[str]:
    """The results of the solution's ``<<expr=result>>`` annotations, in order, without repeats."""
    results = [note.rsplit("=", 1)[1].strip() for note in _ANNOTATION.findall(solution) if "=" in note]
    return list(dict.fromkeys(r for r in results if to_number(r) is not None))


def used_question_numbers(question: str, solution: str) -> list[str]:
    """The numbers written in the question that the gold calculations use (operands)."""
    used = set(numbers(clean_solution(solution), fractions=False))
    return list(dict.fromkeys(_format(n) for n in numbers(question, fractions=False) if n in used))


def gold_facts(question: str) -> str:
    """A one-line ``facts`` label: the question's numbers and its last sentence (what is asked)."""
    given = list(dict.fromkeys(_format(n) for n in numbers(question)))
    sentences = [s.strip() for s in re.split(r"(?<=[.?!])\s+", question.strip()) if s.strip()]
    asked = sentences[-1] if sentences else question.strip()
    return f"Numbers: {', '.join(given) or 'none'}. Asked: {asked}"


def gold_plan(solution: str) -> str:
    """A ``plan`` label: the gold worked steps, numbered, one per line."""
    steps = clean_solution(solution).splitlines()
    return "\n".join(f"{i}. {step}" for i, step in enumerate(steps, start=1))


# ---- the program ---------------------------------------------------------------------------------


class Understand(dspy.Signature):
    """List the numbers given in the math problem and what it asks for, on one line."""

    question: str = dspy.InputField()
    facts: str = dspy.OutputField()


class Plan(dspy.Signature):
    """Write the steps that solve the math problem, one short step per line."""

    question: str = dspy.InputField()
    facts: str = dspy.InputField()
    plan: str = dspy.OutputField()


class Solve(dspy.Signature):
    """Follow the plan to solve the math problem step by step, then give the final answer as a number."""

    question: str = dspy.InputField()
    facts: str = dspy.InputField()
    plan: str = dspy.InputField()
    solution: str = dspy.OutputField()
    answer: str = dspy.OutputField()


class SolveDirectly(dspy.Signature):
    """Solve the math problem step by step, then give the final answer as a number."""

    question: str = dspy.InputField()
    solution: str = dspy.OutputField()
    answer: str = dspy.OutputField()


class Verify(dspy.Signature):
    """Check the solution. Reply ok if the answer is right, or revise and the correct answer if it is wrong."""

    question: str = dspy.InputField()
    solution: str = dspy.InputField()
    answer: str = dspy.InputField()
    verdict: str = dspy.OutputField()


_REVISE_WORDS = frozenset({"revise", "wrong", "incorrect", "no", "not", "error", "mistake"})


def wants_revision(verdict: str | None) -> bool:
    """Whether a verdict asks for a revision: it starts with a rejecting word or says "revise".

    Anything else (``ok``, ``correct``, ``yes``, an unrelated sentence, nothing) accepts the
    answer, so an unclear verifier never costs the extra call.
    """
    words = re.findall(r"[a-z]+", (verdict or "").lower())
    return bool(words) and (words[0] in _REVISE_WORDS or "revise" in words)


def _answer_text(answer: str | None, solution: str | None) -> str:
    # The answer field should hold the number; when it holds none, the solution's last number is
    # the model's answer (a base model often ends its working with the result and no label).
    answer = (answer or "").strip()
    if last_number(answer) is None and (fallback := last_number(solution)) is not None:
        return _format(fallback)
    return answer


class MathReasoner(StructureKnobs, dspy.Module):
    """Stages ``understand``, ``plan``, ``solve`` and ``verify``; at most one revision.

    When the verdict asks for a revision (see :func:`wants_revision`), ``solve`` runs once more
    with the verifier's note appended to the plan; the final answer is the revised one when it
    holds a number, else a number the verifier gave, else the first answer. So an example costs
    four LM calls, or five when revised; three without verification.

    The prediction exposes every stage's output for the stage metrics: ``facts``, ``plan``,
    ``solution`` and ``solve_answer`` (first solve call), ``verdict``, ``revised`` and the final
    ``answer`` (and ``final_solution``). Without verification the verdict is empty, which the
    ``verify`` stage metric scores as a verifier that accepts every answer.

    Args:
        revise: Let the verify stage ask for one revision.
        verification: Run the verify stage at all (a structure knob).
    """

    STRUCTURE: ClassVar[Mapping[str, Sequence[Any]]] = {"verification": (True, False)}
    STAGE_CONDITIONS: ClassVar[Mapping[str, Mapping[str, Sequence[Any]]]] = {"verify": {"verification": (True,)}}

    def __init__(self, *, revise: bool = True, verification: bool = True) -> None:
        super().__init__()
        self.revise = revise
        self.verification = verification
        self.understand = dspy.Predict(Understand)
        self.plan = dspy.Predict(Plan)
        self.solve = dspy.Predict(Solve)
        self.verify = dspy.Predict(Verify)

    def forward(self, question: str) -> dspy.Prediction:
        facts = (self.understand(question=question).facts or "").strip()
        plan = (self.plan(question=question, facts=facts).plan or "").strip()
        first = self.solve(question=question, facts=facts, plan=plan)
        solution = (first.solution or "").strip()
        solve_answer = _answer_text(first.answer, solution)
        verdict = ""
        if self.verification:
            verdict = (self.verify(question=question, solution=solution, answer=solve_answer).verdict or "").strip()
        answer, final_solution, revised = solve_answer, solution, False
        if self.revise and wants_revision(verdict):
            revised = True
            note = f"{plan}\nCheck: the answer {solve_answer or '(none)'} was judged wrong: {verdict}"
            second = self.solve(question=question, facts=facts, plan=note)
            final_solution = (second.solution or "").strip()
            retry = _answer_text(second.answer, final_solution)
            if last_number(retry) is not None:
                answer = retry
            elif (corrected := last_number(verdict)) is not None:
                answer = _format(corrected)
        return dspy.Prediction(
            facts=facts,
            plan=plan,
            solution=solution,
            solve_answer=solve_answer,
            verdict=verdict,
            revised=revised,
            answer=answer,
            final_solution=final_solution,
        )


class SingleStageMath(dspy.Module):
    """The single-stage baseline: one ``solve`` call from the question to a solution and answer."""

    def __init__(self) -> None:
        super().__init__()
        self.solve = dspy.Predict(SolveDirectly)

    def forward(self, question: str) -> dspy.Prediction:
        result = self.solve(question=question)
        solution = (result.solution or "").strip()
        answer = _answer_text(result.answer, solution)
        return dspy.Prediction(
            solution=solution, solve_answer=answer, answer=answer, final_solution=solution, revised=False
        )


class GoldPlanMath(dspy.Module):
    """Oracle upstream: the ``solve`` stage of a program, given the gold facts and plan.

    ``understand`` and ``plan`` are replaced by the example's gold labels (inputs here) and
    there is no verify step, so the score is the solve stage's accuracy with a perfect upstream.

    Args:
        solve: The solve stage to copy (it is deep-copied, never shared).
    """

    def __init__(self, solve: dspy.Predict) -> None:
        super().__init__()
        self.solve = solve.deepcopy()

    def forward(self, question: str, facts: str, plan: str) -> dspy.Prediction:
        result = self.solve(question=question, facts=facts, plan=plan)
        solution = (result.solution or "").strip()
        answer = _answer_text(result.answer, solution)
        return dspy.Prediction(
            facts=facts, plan=plan, solution=solution, solve_answer=answer, answer=answer, final_solution=solution
        )


# ---- the task ------------------------------------------------------------------------------------


def _check_row(row: dict[str, Any]) -> str | None:
    if to_number(row["answer"]) is None:
        return f"field 'answer' must be a number, got {row['answer']!r:.40}"
    if not row["solution"].strip():
        return "field 'solution' is empty"
    final = _FINAL_LINE.search(row["solution"])
    if final and to_number(final.group(1)) != to_number(row["answer"]):
        return f"field 'solution' ends with #### {final.group(1)!r:.40}, but 'answer' is {row['answer']!r:.40}"
    return None


def _final(prediction: dspy.Prediction) -> str:
    return str(prediction.get("answer") or "")


def _verdict_right(example: dspy.Example, prediction: dspy.Prediction) -> float:
    first_right = same_number(str(prediction.get("solve_answer") or ""), example.answer)
    return float(wants_revision(prediction.get("verdict")) != first_right)


class GSM8KTask(BaseTask):
    """GSM8K word problems from ``../shared/data/gsm8k`` with the :class:`MathReasoner` program.

    Args:
        revise: Let the verify stage ask for one revision (one extra ``solve`` call).
        verification: Run the verify stage (off: understand -> plan -> solve).
        data_dir: Folder holding ``gsm8k/{train,dev}.jsonl`` (default: see ``data_dir()``).
    """

    name = "gsm8k"
    metric_name = "accuracy"

    def __init__(self, *, revise: bool = True, verification: bool = True, data_dir: str | Path | None = None) -> None:
        self.revise = revise
        self.verification = verification
        self.data_dir = data_dir

    def load(self, split: str, *, n: int | None = None) -> list[dspy.Example]:
        """Examples with input ``question``, gold ``answer`` and demo labels (see the module doc).

        Also set, for the stage metrics: ``question_numbers`` (the question's numbers the gold
        calculations use), ``intermediates`` (the results of the gold calculations) and
        ``raw_solution`` (the row's solution as given).
        """
        path = resolve_split(self.name, split, self.data_dir)
        rows = read_jsonl(path, {"id": str, "question": str, "answer": str, "solution": str}, n=n, check=_check_row)
        examples = []
        for row in rows:
            question, raw = row["question"], row["solution"]
            examples.append(
                dspy.Example(
                    id=row["id"],
                    question=question,
                    answer=row["answer"],
                    facts=gold_facts(question),
                    plan=gold_plan(raw),
                    solution=clean_solution(raw),
                    raw_solution=raw,
                    question_numbers=used_question_numbers(question, raw),
                    intermediates=intermediate_results(raw),
                ).with_inputs("question")
            )
        return examples

    def program(self) -> dspy.Module:
        """A fresh :class:`MathReasoner`."""
        return MathReasoner(revise=self.revise, verification=self.verification)

    def single_stage_program(self) -> dspy.Module:
        """The single-stage baseline :class:`SingleStageMath` (question -> solution, answer)."""
        return SingleStageMath()

    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """1.0 when the last number of the final answer equals the gold answer, else 0.0."""
        return float(same_number(_final(prediction), example.answer))

    def extra_metrics(self) -> Mapping[str, Callable[[dspy.Example, dspy.Prediction], float]]:
        """``solve_acc`` (the answer before verify), ``revision_rate`` and ``has_number``."""
        return {
            "solve_acc": lambda ex, pred: float(same_number(str(pred.get("solve_answer") or ""), ex.answer)),
            "revision_rate": lambda ex, pred: float(bool(pred.get("revised"))),
            "has_number": lambda ex, pred: float(last_number(_final(pred)) is not None),
        }

    def stage_metrics(self) -> Mapping[str, StageMetric]:
        """What each stage got right, measured against the gold solution.

        * ``understand``: share of the question's numbers used by the gold calculations that
          the facts mention (1.0 when the gold uses none, e.g. only number words).
        * ``plan``: share of the gold intermediate results (``<<a*b=c>>`` results, the answer
          included) that the plan mentions.
        * ``solve``: the first solve call's answer is right (before verify).
        * ``verify``: the verdict is right: it accepts a right answer or asks to revise a wrong
          one (the final answer is :meth:`metric` already; this scores the judgement).
        """
        return {
            "understand": lambda ex, pred: mentioned(ex.question_numbers, pred.get("facts")),
            "plan": lambda ex, pred: mentioned(ex.intermediates or [ex.answer], pred.get("plan")),
            "solve": lambda ex, pred: float(same_number(str(pred.get("solve_answer") or ""), ex.answer)),
            "verify": _verdict_right,
        }

    def oracle_programs(self, program: dspy.Module) -> Mapping[str, OracleProgram]:
        """``solve``: the program's solve stage given the gold facts and plan (:class:`GoldPlanMath`).

        None when ``program`` has no ``solve`` stage that is a ``dspy.Predict`` reading a plan
        (the single-stage program's ``solve`` does not).
        """
        solve = dict(program.named_predictors()).get("solve")
        if not isinstance(solve, dspy.Predict) or not {"facts", "plan"} <= set(solve.signature.input_fields):
            return {}
        return {
            "solve": OracleProgram(
                description="solve stage given the gold facts and plan (no verify)",
                program=GoldPlanMath(solve),
                gold_inputs=("facts", "plan"),
            )
        }
