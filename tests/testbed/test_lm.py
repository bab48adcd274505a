"""The testbed LM reads stage prompts of both adapters and answers proposer prompts (SIMULATION)."""

from __future__ import annotations

import dspy
import pytest

from stageopt.evaluation import BudgetLedger, MeteredLM, evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.proposers import LMInstructionProposer, MutationInstructionProposer, ProposalContext, validate_instruction
from stageopt.testbed import CallObserver, Testbed, parse_prompt


def _messages(adapter: dspy.Adapter, signature: type[dspy.Signature], demos: list[dict], inputs: dict):
    formatted = adapter.format(signature, demos, inputs)
    system = "\n".join(m["content"] for m in formatted if m["role"] == "system")
    return system, [(m["role"], m["content"]) for m in formatted if m["role"] != "system"]


@pytest.mark.parametrize("adapter", [SmallLMAdapter(), dspy.ChatAdapter(), dspy.JSONAdapter()], ids=str)
def test_stage_prompts_parse_under_each_adapter(adapter: dspy.Adapter) -> None:
    testbed = Testbed(seed=0)
    world = testbed.world
    predictor = dict(testbed.program().named_predictors())["find_lead"]
    instruction = world.pool(1)[2]
    signature = predictor.signature.with_instructions(instruction)
    demos = [world.gold_demo(1, 3), {"clue": "CLUE-007", "lead": "LEAD-007"}]
    system, messages = _messages(adapter, signature, demos, {"clue": "clue_011"})
    prompt = parse_prompt(system, messages, world.fields)
    assert prompt.stage == 1
    assert prompt.instruction == instruction
    assert prompt.values["clue"] == "clue_011"
    assert [(d["clue"], d["lead"]) for d in prompt.demos] == [("clue-003", "lead-003"), ("CLUE-007", "LEAD-007")]
    assert prompt.outputs == ("lead",)


def test_pool_instructions_pass_stageopt_validation() -> None:
    world = Testbed(seed=3).world
    for stage in range(world.n_stages):
        for text in world.universe(stage):
            assert validate_instruction(text, existing=[])[0] == text


def _context(testbed: Testbed, lm: dspy.BaseLM) -> ProposalContext:
    report = evaluate(
        testbed.program(), testbed.trainset[:4], testbed.metric, lm=lm, adapter=SmallLMAdapter(), capture_traces=True
    )
    return ProposalContext(
        lm=lm, prompt_lm=lm, adapter=SmallLMAdapter(), ledger=BudgetLedger(), traces=report.examples,
        trainset=testbed.trainset[:4], seed=0,
    )  # fmt: skip


def test_stageopt_proposers_get_pool_instructions_of_the_right_stage() -> None:
    testbed = Testbed(seed=0)
    world = testbed.world
    lm = testbed.lm()
    program = testbed.program()
    proposals = LMInstructionProposer(num_candidates=3).propose(program, _context(testbed, lm))
    for stage, name in enumerate(program.stage_names):
        assert proposals[name], f"no instruction for {name}"
        assert set(proposals[name]) <= set(world.pool(stage))
    for stage, (_, predictor) in enumerate(program.named_predictors()):
        variant = MutationInstructionProposer().mutate(
            world.pool(stage)[0], lm, signature=predictor.signature, existing=[], seed=5
        )
        assert variant in world.pool(stage)


def test_chat_proposer_prompts_get_well_formed_answers() -> None:
    testbed = Testbed(seed=0)
    world = testbed.world
    propose = dspy.Predict("program_code, basic_instruction, tip -> observations, proposed_instruction")
    with dspy.context(lm=testbed.lm(), adapter=dspy.ChatAdapter()):
        for stage in range(world.n_stages):
            out = propose(program_code="...", basic_instruction=world.original_instruction(stage), tip="Be brief.")
            assert out.proposed_instruction in world.pool(stage)
            assert out.observations
    with dspy.context(lm=testbed.lm(), adapter=dspy.JSONAdapter()):
        out = propose(program_code="...", basic_instruction=world.original_instruction(2), tip="Be brief.")
        assert out.proposed_instruction in world.pool(2)


def test_proposals_vary_across_repeated_requests() -> None:
    testbed = Testbed(seed=0)
    lm = testbed.lm()
    request = [{"role": "user", "content": f"Current: {testbed.world.original_instruction(0)}\nRewrite:"}]
    answers = {lm(messages=request, temperature=1.0)[0] for _ in range(12)}
    assert len(answers) > 1
    assert answers <= set(testbed.world.pool(0))


def test_observer_sees_each_program_execution_and_counts_every_call() -> None:
    testbed = Testbed(seed=0)
    observer = CallObserver()
    ledger = BudgetLedger()
    lm = MeteredLM(testbed.lm(observer), ledger)
    evaluate(testbed.program(), testbed.valset[:5], testbed.metric, lm=lm, adapter=dspy.ChatAdapter())
    executions = observer.executions(testbed.n_stages)
    assert len(executions) == 5
    assert observer.count == ledger.usage().lm_calls == 15
    assert executions[-1].last_call == 15
    baseline = testbed.true_score(testbed.program())
    assert observer.calls_to_reach(testbed.world, baseline) == 15  # one block: the whole evaluation
    assert observer.calls_to_reach(testbed.world, baseline + 1e-6) is None
