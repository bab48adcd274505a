"""LM-proposed instructions: grounded in the program and the data, written by the prompt LM."""

from __future__ import annotations

from stageopt.evaluation import BudgetLedger
from stageopt.lm import SmallLMAdapter
from stageopt.proposers import LMInstructionProposer, ProposalContext, validate_instruction
from stageopt.strategies import JointBayesian
from tests.conftest import CapitalOfCity, capital_metric, city_examples, demo_sensitive_answer, scripted_lm


def test_request_names_the_program_structure_and_summarises_the_data() -> None:
    program = CapitalOfCity()
    context = ProposalContext(
        lm=scripted_lm(demo_sensitive_answer),
        prompt_lm=scripted_lm(demo_sensitive_answer),
        adapter=None,
        ledger=BudgetLedger(),
        traces=[],
        trainset=city_examples()[:5],
    )
    name, predictor = program.named_predictors()[1]
    request = LMInstructionProposer().request(name, predictor, context, program)
    last = request.split("---")[-1]
    assert "Program: locate then capital (this is part 2 of 2)." in last
    assert "Data: 5 examples; City about 1 words." in last
    assert last.rstrip().endswith("Instruction:")


def test_the_prompt_lm_writes_instructions_and_the_task_lm_never_sees_the_request() -> None:
    seen_by_task: list[str] = []

    def task(prompt: str) -> str:
        seen_by_task.append(prompt)
        return demo_sensitive_answer(prompt)

    def writer(prompt: str) -> str:
        return " Name the country where the given city lies, in one or two words."

    prompt_lm = scripted_lm(writer)
    optimizer = JointBayesian(
        capital_metric,
        budget=200,
        n_trials=2,
        lm=scripted_lm(task),
        prompt_lm=prompt_lm,
        adapter=SmallLMAdapter(),
        bootstrap_size=4,
        val_size=4,
    )
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    assert optimizer.result is not None
    assert prompt_lm.engine.calls > 0
    assert not any("Write one clear instruction" in p for p in seen_by_task)
    assert optimizer.result.candidates["locate"]["instructions"] == 2, "the original plus the one valid proposal"
    assert optimizer.result.usage["lm_calls"] == prompt_lm.engine.calls + len(seen_by_task), "both LMs are metered"


def test_validation_rejects_a_passage_written_after_a_field_label() -> None:
    # seen on HotpotQA: Gemma continued the prompt layout with a made-up passage
    passage = (
        'Passages: "The demon Lilu was the goddess of the dead, and she had a body that was like the skin of an '
        "elephant. She was a very angry spirit."
    )
    assert validate_instruction(passage, existing=[]) == (None, "starts with a field label")
    assert validate_instruction(" Answer: Leonardo da Vinci painted it in Florence.", existing=[])[0] is None
    kept, reason = validate_instruction("Answer the question from the passages in a few words", existing=[])
    assert (kept, reason) == ("Answer the question from the passages in a few words.", "ok")
    assert validate_instruction("Use the passages: name the person the question asks about.", existing=[])[1] == "ok"
