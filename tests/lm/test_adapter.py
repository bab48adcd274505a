from __future__ import annotations

import dspy
import pytest

from stageopt.lm import SmallLMAdapter, parse_completion
from tests.conftest import CityToCountry, scripted_lm


class QA(dspy.Signature):
    """Answer with a few words."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField()


COT = dspy.ChainOfThought(QA).predict.signature


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" Paris", "Paris"),
        ("Answer: Paris", "Paris"),
        ("**Answer**: Paris", "Paris"),
        ("[[ ## answer ## ]]\nParis\n\n[[ ## completed ## ]]", "Paris"),
        ("  Paris  \nQuestion: who else?", "Paris"),
        ("Paris\n\nThe city of light.", "Paris"),
    ],
)
def test_single_field_parses_leniently(completion: str, expected: str) -> None:
    values, ok = parse_completion(QA, completion)
    assert ok
    assert values == {"answer": expected}


def test_empty_completion_is_a_counted_failure() -> None:
    values, ok = parse_completion(QA, "   ")
    assert not ok
    assert values == {"answer": ""}


@pytest.mark.parametrize(
    "completion",
    [" Paris is in France.\nAnswer: France", "Paris is in France.\n[[ ## answer ## ]]\nFrance", "x\nANSWER - France"],
)
def test_chain_of_thought_splits_fields(completion: str) -> None:
    values, ok = parse_completion(COT, completion)
    assert ok
    assert values["answer"] == "France"
    assert values["reasoning"]


def test_chain_of_thought_without_answer_salvages_last_line() -> None:
    values, ok = parse_completion(COT, "Let me think.\nIt is France.")
    assert not ok
    assert values["answer"] == "It is France."


def test_format_is_plain_completion_with_complete_demos_only() -> None:
    adapter = SmallLMAdapter()
    demos = [
        {"question": "q1", "passages": "[A] a", "answer": "a1"},
        {"question": "q2", "answer": "partial demo is skipped"},
    ]
    [message] = adapter.format(QA, demos, {"question": "q?", "passages": "[C] c"})
    prompt = message["content"]
    assert message["role"] == "user"
    assert prompt.startswith("Answer with a few words.")
    assert "Question: q1\nPassages: [A] a\nAnswer: a1" in prompt
    assert "partial demo" not in prompt
    assert prompt.endswith("Question: q?\nPassages: [C] c\nAnswer:")


def test_demo_values_are_truncated_when_asked() -> None:
    adapter = SmallLMAdapter(max_demo_chars=5)
    [message] = adapter.format(QA, [{"question": "q", "passages": "0123456789", "answer": "a"}], {"question": "x"})
    assert "Passages: 01234 ..." in message["content"]


def test_stop_sequences_end_single_line_fields_at_newline() -> None:
    adapter = SmallLMAdapter()
    assert adapter.stop_sequences(QA)[0] == "\n"
    assert "\n" not in adapter.stop_sequences(COT)
    assert len(adapter.stop_sequences(COT)) <= 4


def test_adapter_counts_parse_failures_through_a_real_lm() -> None:
    answers = iter([" France", ""])
    lm = scripted_lm(lambda _prompt: next(answers))
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        assert dspy.Predict(CityToCountry)(city="Lyon").country == "France"
        assert dspy.Predict(CityToCountry)(city="Lyon?").country == ""
    assert (adapter.parses, adapter.parse_failures) == (2, 1)


def test_sent_request_carries_stop_and_max_tokens() -> None:
    lm = scripted_lm(lambda _prompt: " France")
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        dspy.Predict(CityToCountry)(city="Lyon")
    kwargs = lm.history[-1]["kwargs"]
    assert kwargs["stop"][0] == "\n"


def test_bad_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_demo_chars"):
        SmallLMAdapter(max_demo_chars=0)
