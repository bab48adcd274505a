"""SmallLMAdapter with typed output fields, on programs written the way DSPy users write them."""

from __future__ import annotations

from typing import Any, Literal

import dspy
import pydantic
import pytest
from dspy.utils.dummies import DummyLM

from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from tests.conftest import scripted_lm

# ---- third-party-style programs -----------------------------------------------------------------


class TakeNotes(dspy.Signature):
    """Read the passages, add to the notes and propose what to search for next."""

    question: str = dspy.InputField()
    notes: list[str] = dspy.InputField()
    new_notes: list[str] = dspy.OutputField()
    next_queries: list[str] = dspy.OutputField()


class MultiHopNotes(dspy.Module):
    """Two hops of a ChainOfThought that grows a list of notes, as a multi-hop module would."""

    def __init__(self) -> None:
        super().__init__()
        self.hop = dspy.ChainOfThought(TakeNotes)

    def forward(self, question: str) -> dspy.Prediction:
        notes: list[str] = []
        queries: list[str] = []
        for _ in range(2):
            pred = self.hop(question=question, notes=notes)
            notes.extend(pred.new_notes)
            queries.extend(pred.next_queries)
        return dspy.Prediction(notes=notes, queries=queries)


class Sentiment(dspy.Signature):
    """Classify the sentiment of the review."""

    review: str = dspy.InputField()
    sentiment: Literal["positive", "negative", "neutral"] = dspy.OutputField()


class CountItems(dspy.Signature):
    """How many items does the text mention?"""

    text: str = dspy.InputField()
    count: int = dspy.OutputField()


class Person(pydantic.BaseModel):
    name: str
    age: int


class ExtractPerson(dspy.Signature):
    """Extract the person the text is about."""

    text: str = dspy.InputField()
    person: Person = dspy.OutputField()
    is_adult: bool = dspy.OutputField()


class Keywords(dspy.Signature):
    """List the keywords."""

    text: str = dspy.InputField()
    keywords: list[str] = dspy.OutputField()


class Numbers(dspy.Signature):
    """List the numbers."""

    text: str = dspy.InputField()
    numbers: list[int] = dspy.OutputField()


class QA(dspy.Signature):
    """Answer with a few words."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField()


def _prompt(lm: dspy.LM, index: int = -1) -> str:
    return str(lm.history[index]["messages"][0]["content"])


# ---- lists --------------------------------------------------------------------------------------


def test_chain_of_thought_with_two_list_outputs_feeds_lists_back() -> None:
    replies = iter(
        [
            " The first passage names Paris.\nNew notes:\n- Paris is in France\n- France is in Europe\n"
            "Next queries:\n1. capital of France\n2. population of Paris",
            " One more fact.\nNew notes: - Paris has 2 million people\nNext queries: []",
        ]
    )
    lm = scripted_lm(lambda _prompt: next(replies))
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        pred = MultiHopNotes()(question="Where is Paris?")
    assert pred.notes == ["Paris is in France", "France is in Europe", "Paris has 2 million people"]
    assert pred.queries == ["capital of France", "population of Paris"]
    assert (adapter.parses, adapter.parse_failures) == (2, 0)
    first, second = _prompt(lm, 0), _prompt(lm, 1)
    assert "Write New notes as one item per line, each starting with '- '." in first
    assert "Write Next queries as one item per line, each starting with '- '." in first
    assert first.endswith("Question: Where is Paris?\nNotes: []\nReasoning:")
    # the second hop sees the first hop's notes, one item per line
    assert second.endswith("Notes:\n- Paris is in France\n- France is in Europe\nReasoning:")


@pytest.mark.parametrize(
    "completion",
    [
        "\n- a\n- b",
        " - a\n- b",
        "1. a\n2. b",
        "1) a\n2) b",
        "* a\n* b",
        "a\nb",
        '["a", "b"]',
        "['a', 'b']",
        '[\n  "a",\n  "b"\n]',
        "Keywords:\n- a\n- b",
        "Here they are:\n- a\n- b\n\nI hope this helps.",
        "a\nb\n\nI hope this helps.",
        '["a", "b"]\n\n[[ ## completed ## ]]',
    ],
)
def test_list_field_accepts_every_one_item_per_line_layout(completion: str) -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Keywords, completion) == {"keywords": ["a", "b"]}
    assert adapter.parse_failures == 0


def test_a_single_list_output_may_span_lines() -> None:
    adapter = SmallLMAdapter()
    assert "\n" not in adapter.stop_sequences(Keywords)
    assert adapter.stop_sequences(CountItems)[0] == "\n"


def test_list_items_are_converted_to_the_item_type() -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Numbers, "- 1\n- 2\n- 30") == {"numbers": [1, 2, 30]}
    assert adapter.parse(Numbers, "[4, 5]") == {"numbers": [4, 5]}
    assert adapter.parse_failures == 0


def test_bad_list_item_is_a_failure_and_the_items_stay_strings() -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Numbers, "- 1\n- two") == {"numbers": ["1", "two"]}
    assert adapter.parse(Numbers, "") == {"numbers": []}
    assert (adapter.parses, adapter.parse_failures) == (2, 2)


def test_missing_list_field_is_an_empty_list_and_a_failure() -> None:
    adapter = SmallLMAdapter()
    values = adapter.parse(dspy.ChainOfThought(TakeNotes).predict.signature, "I am still thinking.")
    assert values["new_notes"] == []
    assert values["next_queries"] == []  # not salvaged from a stray line of reasoning
    assert adapter.parse_failures == 1


# ---- scalars, options and models ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (" positive", "positive"),
        (" Negative.", "negative"),
        (" 'neutral'", "neutral"),
        ("Sentiment: **positive**", "positive"),
    ],
)
def test_literal_classifier_returns_one_of_the_options(completion: str, expected: str) -> None:
    lm = scripted_lm(lambda _prompt: completion)
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        assert dspy.Predict(Sentiment)(review="Loved it").sentiment == expected
    assert adapter.parse_failures == 0
    assert "Write Sentiment as one of: positive, negative, neutral." in _prompt(lm)
    assert lm.history[-1]["kwargs"]["stop"][0] == "\n"


def test_literal_outside_the_options_is_a_failure_with_the_text_kept() -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Sentiment, " great") == {"sentiment": "great"}
    assert adapter.parse_failures == 1


def test_int_extractor_returns_an_int() -> None:
    lm = scripted_lm(lambda _prompt: " 42")
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        count = dspy.Predict(CountItems)(text="forty-two apples").count
    assert count == 42
    assert isinstance(count, int)
    assert adapter.parse_failures == 0
    assert _prompt(lm).startswith("How many items does the text mention?\n\nWrite Count as an integer.\n\n---\n\n")


def test_bad_int_is_a_counted_parse_failure() -> None:
    lm = scripted_lm(lambda _prompt: " about five")
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        count = dspy.Predict(CountItems)(text="some apples").count
    assert count == "about five"  # the model's text is kept; DSPy's adapters would raise here
    assert (adapter.parses, adapter.parse_failures) == (1, 1)


def test_evaluation_records_a_bad_int_as_a_parse_failure() -> None:
    answers = iter([" 3", " several"])
    lm = scripted_lm(lambda _prompt: next(answers))
    examples = [dspy.Example(text=t, count=3).with_inputs("text") for t in ("a b c", "d e f")]

    def metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        return float(prediction.count == example.count)

    report = evaluate(dspy.Predict(CountItems), examples, metric, lm=lm, adapter=SmallLMAdapter())
    assert report.score == 0.5
    assert report.parse_rate == 0.5
    assert report.errors == 0


def test_pydantic_model_and_bool_outputs() -> None:
    completion = ' {\n  "name": "Ada",\n  "age": 36\n}\nIs adult: yes'
    lm = scripted_lm(lambda _prompt: completion)
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        pred = dspy.Predict(ExtractPerson)(text="Ada, 36, wrote the first program.")
    assert pred.person == Person(name="Ada", age=36)
    assert pred.is_adult is True
    assert adapter.parse_failures == 0
    prompt = _prompt(lm)
    assert 'Write Person as a JSON object with the keys "name", "age".' in prompt
    assert "Write Is adult as yes or no." in prompt


def test_invalid_model_is_a_failure_with_the_text_kept() -> None:
    adapter = SmallLMAdapter()
    values = adapter.parse(ExtractPerson, ' {"name": "Ada"}\nIs adult: no')
    assert values == {"person": '{"name": "Ada"}', "is_adult": False}
    assert adapter.parse_failures == 1


def test_typed_demos_render_in_the_layout_they_are_parsed_in() -> None:
    adapter = SmallLMAdapter()
    demo = {"text": "Bo is 4.", "person": Person(name="Bo", age=4), "is_adult": False}
    [message] = adapter.format(ExtractPerson, [demo], {"text": "Ada"})
    shown = 'Person: {"name": "Bo", "age": 4}\nIs adult: no'
    assert f"Text: Bo is 4.\n{shown}\n\n---" in message["content"]
    assert adapter.parse(ExtractPerson, shown) == {"person": demo["person"], "is_adult": False}
    [message] = adapter.format(Keywords, [{"text": "x", "keywords": ["k1"]}], {"text": "y"})
    assert "Text: x\nKeywords:\n- k1\n\n---" in message["content"]
    assert adapter.parse(Keywords, "Keywords:\n- k1") == {"keywords": ["k1"]}
    assert adapter.parse_failures == 0


def test_dummy_lm_answers_parse_into_typed_values() -> None:
    # DummyLM writes DSPy's chat layout ("[[ ## field ## ]]", JSON for lists): it parses as well.
    lm = DummyLM(
        [
            {"reasoning": "r", "new_notes": ["a", "b"], "next_queries": ["c"]},
            {"reasoning": "r", "new_notes": ["d"], "next_queries": []},
        ]
    )
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        pred = MultiHopNotes()(question="q")
    assert pred.notes == ["a", "b", "d"]
    assert pred.queries == ["c"]
    assert adapter.parse_failures == 0


# ---- text signatures are unchanged --------------------------------------------------------------


def test_str_only_signature_renders_exactly_as_before() -> None:
    adapter = SmallLMAdapter()
    demos = [{"question": "q1", "passages": ["[A] a", "[B] b"], "answer": "a1"}]
    [message] = adapter.format(QA, demos, {"question": "q?", "passages": ["[C] c"]})
    assert message["content"] == (
        "Answer with a few words.\n\n---\n\n"
        "Question: q1\nPassages:\n[A] a\n[B] b\nAnswer: a1\n\n---\n\n"
        "Question: q?\nPassages: [C] c\nAnswer:"
    )
    assert adapter.stop_sequences(QA) == ["\n", "\n---", "\n\n\n", "\nQuestion:"]
    assert adapter.parse(QA, " 42") == {"answer": "42"}


def test_optional_str_and_untyped_fields_stay_text() -> None:
    signature = dspy.Signature("question -> answer, note: str | None")
    adapter = SmallLMAdapter()
    [message] = adapter.format(signature, [], {"question": "q"})
    assert "Write" not in message["content"]
    assert adapter.parse(signature, " 5\nNote: 6") == {"answer": "5", "note": "6"}


# ---- lenient numbers and options ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [(" 16", 16), (" \\(26 + 6 - 10 = 16\\)", 16), (" \\boxed{40}", 40), (" The answer is 1,000 kg.", 1000)],
)
def test_int_field_takes_the_last_number_of_its_line(completion: str, expected: int) -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(CountItems, completion) == {"count": expected}
    assert adapter.parse_failures == 0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [(" The review is Positive.", "positive"), (" NEGATIVE", "negative"), (" mostly neutral, I think", "neutral")],
)
def test_literal_named_once_among_other_words_is_that_option(completion: str, expected: str) -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Sentiment, completion) == {"sentiment": expected}


def test_literal_echoing_several_options_is_a_failure() -> None:
    adapter = SmallLMAdapter()
    assert adapter.parse(Sentiment, " positive, negative or neutral") == {"sentiment": "positive, negative or neutral"}
    assert adapter.parse_failures == 1


def test_an_option_inside_a_longer_one_does_not_count() -> None:
    signature = dspy.Signature("claim -> label: Literal['SUPPORTED', 'NOT_SUPPORTED']")
    adapter = SmallLMAdapter()
    assert adapter.parse(signature, " It is not supported.") == {"label": "NOT_SUPPORTED"}
    assert adapter.parse(signature, " SUPPORTED") == {"label": "SUPPORTED"}
    assert adapter.parse_failures == 0


# ---- several outputs: the labels are named, and a missing one is asked for ----------------------


def test_several_outputs_name_the_labels_that_follow_the_first() -> None:
    [message] = SmallLMAdapter().format(TakeNotes, [], {"question": "q", "notes": []})
    assert "After New notes, write Next queries: on a new line." in message["content"]
    [message] = SmallLMAdapter().format(dspy.Signature("question -> answer"), [], {"question": "q"})
    assert "After" not in message["content"]


def test_a_completion_that_stops_after_its_reasoning_is_continued_once() -> None:
    replies = iter([" 2 and 2 make 4.", " 4"])
    lm = scripted_lm(lambda _prompt: next(replies))
    adapter = SmallLMAdapter()
    with dspy.context(lm=lm, adapter=adapter):
        pred = dspy.ChainOfThought("question -> answer")(question="What is 2 + 2?")
    assert (pred.reasoning, pred.answer) == ("2 and 2 make 4.", "4")
    assert len(lm.history) == 2
    assert (adapter.parses, adapter.parse_failures) == (1, 0)
    assert _prompt(lm, 1).endswith("Question: What is 2 + 2?\nReasoning: 2 and 2 make 4.\nAnswer:")
    assert lm.history[1]["kwargs"]["stop"][0] == "\n"  # a one-line field ends at its line


def test_no_continuation_when_every_label_was_written_or_it_is_switched_off() -> None:
    lm = scripted_lm(lambda _prompt: " 2 and 2 make 4.\nAnswer: 4")
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        dspy.ChainOfThought("question -> answer")(question="What is 2 + 2?")
    assert len(lm.history) == 1
    lm = scripted_lm(lambda _prompt: " 2 and 2 make 4.")
    adapter = SmallLMAdapter(continue_missing=False)
    with dspy.context(lm=lm, adapter=adapter):
        pred = dspy.ChainOfThought("question -> answer")(question="What is 2 + 2?")
    assert len(lm.history) == 1
    assert adapter.parse_failures == 1
    assert pred.answer == "2 and 2 make 4."  # salvaged from the last line
