from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from stageopt import BudgetExhaustedError, ConfigurationError
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM
from stageopt.proposers import MutationInstructionProposer
from stageopt.strategies import SearchSpace
from tests.conftest import CapitalOfCity, CityToCountry, scripted_lm

REWRITE = "Name the country in which the given city lies, as its common English name"


def _answers(*texts: str) -> Callable[[str], str]:
    """A scripted LM answering ``texts`` in turn (the last one forever)."""
    queue = list(texts)

    def answer(_: str) -> str:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return answer


def test_request_is_a_completion_prompt_naming_the_stage() -> None:
    prompt = MutationInstructionProposer().request("Name the country.", CityToCountry)
    blocks = prompt.split("\n\n---\n\n")
    assert len(blocks) == 4
    assert blocks[-1] == "Step: reads City and writes Country.\nCurrent: Name the country.\nRewrite:"
    assert blocks[1].endswith("Rewrite: Answer the question with a short name or phrase, and nothing else.")


def test_mutate_returns_a_validated_rewrite_through_the_metered_lm() -> None:
    lm = scripted_lm(lambda prompt: f" {REWRITE}" if "Current: Name the country this city is in." in prompt else "")
    ledger = BudgetLedger(Budget(lm_calls=5))
    proposer = MutationInstructionProposer()
    variant = proposer.mutate(CityToCountry.instructions, MeteredLM(lm, ledger), signature=CityToCountry, seed=3)
    assert variant == f"{REWRITE}."
    assert lm.engine.calls == 1
    assert ledger.usage().lm_calls == 1
    space = SearchSpace.initial(CapitalOfCity())
    assert space.add_instruction("locate", variant) == 1
    assert space.add_instruction("locate", variant) == 1


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("P1", "too short"),
        ("Name the country this city is in.", "duplicate"),
        (f"Current: {REWRITE}", "echoes the request or its markers"),
        ("Step: reads City and writes Country.", "echoes the request or its markers"),
        ("Answer the question with a short name or phrase.", "copies the request or a worked exemplar"),
        ("Rewrite the instruction of a step of a language-model program.", "copies the request or a worked exemplar"),
        ("city city city city city city", "repetitive"),
    ],
)
def test_junk_rewrites_are_rejected_and_counted(answer: str, reason: str) -> None:
    lm = scripted_lm(lambda _: answer)
    proposer = MutationInstructionProposer()
    assert proposer.mutate(CityToCountry.instructions, lm, signature=CityToCountry) is None
    assert proposer.rejections == {reason: 1}
    assert lm.engine.calls == 1


def test_existing_pool_entries_are_not_proposed_again() -> None:
    lm = scripted_lm(lambda _: REWRITE)
    proposer = MutationInstructionProposer()
    assert proposer.mutate("Name the country.", lm, existing=[f"{REWRITE}."]) is None
    assert proposer.rejections == {"duplicate": 1}


def test_attempts_retry_with_new_seeds_until_one_is_valid() -> None:
    seeds: list[int] = []
    lm = scripted_lm(_answers("P1", "---", REWRITE))
    inner_call = lm.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seeds.append(int(kwargs["seed"]))
        return inner_call(*args, **kwargs)

    lm.forward = spy
    proposer = MutationInstructionProposer(max_attempts=3)
    assert proposer.mutate("Name the country.", lm, seed=2) == f"{REWRITE}."
    assert lm.engine.calls == 3
    assert seeds == [2000, 2001, 2002]
    assert sum(proposer.rejections.values()) == 2


def test_budget_exhaustion_propagates_and_other_lm_errors_do_not() -> None:
    lm = scripted_lm(lambda _: REWRITE)
    ledger = BudgetLedger(Budget(lm_calls=1))
    metered = MeteredLM(lm, ledger)
    proposer = MutationInstructionProposer()
    assert proposer.mutate("Name the country.", metered) is not None
    with pytest.raises(BudgetExhaustedError):
        proposer.mutate("Name the country.", metered, seed=1)
    assert lm.engine.calls == 1

    def broken(_: str) -> str:
        raise RuntimeError("backend hiccup")

    assert proposer.mutate("Name the country.", scripted_lm(broken)) is None
    assert proposer.rejections == {"lm error": 1}


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        MutationInstructionProposer(max_attempts=0)
    with pytest.raises(ConfigurationError, match="temperature"):
        MutationInstructionProposer(temperature=-1.0)
    with pytest.raises(ConfigurationError, match="max_tokens"):
        MutationInstructionProposer(max_tokens=0)
