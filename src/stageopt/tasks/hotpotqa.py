"""HotpotQA (distractor setting) as a three-stage program: query -> retrieve -> query -> retrieve -> answer.

Retrieval is BM25 (``bm25s``) over each example's own ten paragraphs, so no index or network
is needed. Stage metrics are the recall of the gold supporting titles after each hop.

The program's shape is searchable (:class:`~stageopt.strategies.StructureKnobs`): ``hops`` (2,
or 1: ``query2`` is not called and the answer reads hop 1's passages) and ``k``, the passages
retrieved per hop (2, 3 or 5).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import bm25s
import dspy

from stageopt._errors import ConfigurationError
from stageopt.strategies._structure import StructureKnobs
from stageopt.tasks._base import BaseTask, OracleProgram, StageMetric
from stageopt.tasks._data import read_jsonl, resolve_split

# bm25s sets its own logger to DEBUG and logs every index build; keep it to warnings.
logging.getLogger("bm25s").setLevel(logging.WARNING)

Passage = tuple[str, str]

# ---- the official answer metrics --------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD/HotpotQA normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_em(prediction: str | None, gold: str) -> float:
    """Exact match after normalisation."""
    return float(normalize_answer(prediction or "") == normalize_answer(gold))


def answer_f1(prediction: str | None, gold: str) -> float:
    """Token F1 after normalisation; a yes/no/noanswer mismatch scores 0 (official rule)."""
    pred, ref = normalize_answer(prediction or ""), normalize_answer(gold)
    special = {"yes", "no", "noanswer"}
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    pred_tokens, ref_tokens = pred.split(), ref.split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# ---- retrieval ----------------------------------------------------------------------------------


def format_passages(passages: Sequence[Passage]) -> str:
    """One passage per line: ``[Title] text``."""
    return "\n".join(f"[{title}] {text}" for title, text in passages)


def retrieve(passages: Sequence[Passage], query: str, k: int, *, exclude: Sequence[str] = ()) -> list[Passage]:
    """The ``k`` best BM25 matches of ``query`` among ``passages`` whose title is not excluded."""
    pool = [p for p in passages if p[0] not in set(exclude)]
    if not pool or k <= 0:
        return []
    corpus = [f"{title}. {text}" for title, text in pool]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
    if not tokens.vocab:  # the query is only stopwords: keep the original order
        return list(pool[:k])
    ids, _ = retriever.retrieve(tokens, k=min(k, len(pool)), show_progress=False)
    return [pool[int(i)] for i in ids[0]]


def _truncate(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


# ---- the program --------------------------------------------------------------------------------


class GenerateQuery(dspy.Signature):
    """Write a short search query that finds the facts needed to answer the question."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField()


class GenerateFollowupQuery(dspy.Signature):
    """Write a short search query for the missing fact, using the passages found so far."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    query: str = dspy.OutputField()


class AnswerQuestion(dspy.Signature):
    """Answer the question from the passages with a short answer: a few words, or yes or no."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField()


def _paragraphs(context: Any, max_words: int | None) -> list[Passage]:
    return [(str(title), _truncate(str(text), max_words)) for title, text in context]


def _check_settings(k: int, max_passage_words: int | None, hops: int = 2) -> None:
    if k < 1:
        raise ConfigurationError(f"`k` (passages per hop) must be >= 1, got {k=}")
    if hops not in (1, 2):
        raise ConfigurationError(f"`hops` (retrieval hops) must be 1 or 2, got {hops=}")
    if max_passage_words is not None and max_passage_words < 1:
        raise ConfigurationError(f"`max_passage_words` must be >= 1 or None, got {max_passage_words=}")


class MultiHopQA(StructureKnobs, dspy.Module):
    """Retrieval hops and an answer: stages ``query1``, ``query2`` and ``answer``.

    Structure knobs: ``hops`` (with 1, ``query2`` is not called and hop 2 retrieves nothing)
    and ``k`` (passages per hop). The stages are the same in every shape.

    Args:
        k: Passages retrieved per hop.
        hops: Retrieval hops, 1 or 2.
        max_passage_words: Paragraphs are cut to this many words (prompt size).
    """

    STRUCTURE: ClassVar[Mapping[str, Sequence[Any]]] = {"hops": (2, 1), "k": (2, 3, 5)}
    STAGE_CONDITIONS: ClassVar[Mapping[str, Mapping[str, Sequence[Any]]]] = {"query2": {"hops": (2,)}}

    def __init__(self, *, k: int = 2, hops: int = 2, max_passage_words: int | None = 120) -> None:
        super().__init__()
        _check_settings(k, max_passage_words, hops)
        self.k = k
        self.hops = hops
        self.max_passage_words = max_passage_words
        self.query1 = dspy.Predict(GenerateQuery)
        self.query2 = dspy.Predict(GenerateFollowupQuery)
        self.answer = dspy.Predict(AnswerQuestion)

    def forward(self, question: str, context: list[Any]) -> dspy.Prediction:
        paragraphs = _paragraphs(context, self.max_passage_words)
        query1 = (self.query1(question=question).query or "").strip() or question
        hop1 = retrieve(paragraphs, query1, self.k)
        query2: str | None = None
        hop2: list[Passage] = []
        if self.hops >= 2:
            query2 = (self.query2(question=question, passages=format_passages(hop1)).query or "").strip() or question
            hop2 = retrieve(paragraphs, query2, self.k, exclude=[t for t, _ in hop1])
        passages = format_passages(hop1 + hop2)
        answer = self.answer(question=question, passages=passages).answer
        return dspy.Prediction(
            answer=answer,
            query1=query1,
            query2=query2,
            hop1_titles=[t for t, _ in hop1],
            hop2_titles=[t for t, _ in hop2],
            passages=passages,
        )


class SingleStageQA(dspy.Module):
    """The single-stage baseline: one ``answer`` stage over all paragraphs."""

    def __init__(self, *, max_passage_words: int | None = 120) -> None:
        super().__init__()
        _check_settings(1, max_passage_words)
        self.max_passage_words = max_passage_words
        self.answer = dspy.Predict(AnswerQuestion)

    def forward(self, question: str, context: list[Any]) -> dspy.Prediction:
        paragraphs = _paragraphs(context, self.max_passage_words)
        passages = format_passages(paragraphs)
        answer = self.answer(question=question, passages=passages).answer
        titles = [t for t, _ in paragraphs]
        return dspy.Prediction(answer=answer, hop1_titles=titles, hop2_titles=[], passages=passages)


def format_gold_passages(context: Any, gold_titles: Sequence[str], max_words: int | None) -> str:
    """The gold paragraphs of ``context``, in context order, formatted as the answer stage sees passages."""
    gold = set(gold_titles)
    return format_passages([p for p in _paragraphs(context, max_words) if p[0] in gold])


class GoldPassagesQA(dspy.Module):
    """Oracle upstream: the ``answer`` stage of a program, given the gold supporting paragraphs.

    It replaces both query stages and their retrieval by the example's gold titles (an input
    here), so its score bounds what the answer stage reaches with perfect retrieval.

    Args:
        answer: The answer stage to copy (it is deep-copied, never shared).
        max_passage_words: Paragraphs are cut to this many words, as in the program.
    """

    def __init__(self, answer: dspy.Predict, *, max_passage_words: int | None = 120) -> None:
        super().__init__()
        _check_settings(1, max_passage_words)
        self.max_passage_words = max_passage_words
        self.answer = answer.deepcopy()

    def forward(self, question: str, context: list[Any], gold_titles: Sequence[str]) -> dspy.Prediction:
        passages = format_gold_passages(context, gold_titles, self.max_passage_words)
        answer = self.answer(question=question, passages=passages).answer
        titles = list(gold_titles)
        return dspy.Prediction(answer=answer, hop1_titles=titles, hop2_titles=[], passages=passages)


# ---- the task -----------------------------------------------------------------------------------


def title_recall(example: dspy.Example, titles: Sequence[str]) -> float:
    """Share of the gold supporting titles among ``titles``."""
    gold = set(example.gold_titles)
    return len(gold & set(titles)) / len(gold) if gold else 0.0


def _check_row(row: dict[str, Any]) -> str | None:
    for entry in row["context"]:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
            and all(isinstance(s, str) for s in entry[1])
        ):
            return f"field 'context' must hold [title, [sentence, ...]] pairs, got {entry!r:.80}"
    for fact in row["supporting_facts"]:
        if not (isinstance(fact, list) and fact and isinstance(fact[0], str)):
            return f"field 'supporting_facts' must hold [title, sentence_index] pairs, got {fact!r:.80}"
    return None


def _answer(prediction: dspy.Prediction) -> str:
    return str(prediction.get("answer") or "")


class HotpotQATask(BaseTask):
    """HotpotQA distractor setting from ``../shared/data/hotpotqa``.

    Args:
        k: Passages retrieved per hop.
        hops: Retrieval hops of the program, 1 or 2.
        max_passage_words: Paragraphs are cut to this many words (prompt size).
        data_dir: Folder holding ``hotpotqa/{train,dev}.jsonl`` (default: see ``data_dir()``).
    """

    name = "hotpotqa"
    metric_name = "F1"

    def __init__(
        self,
        *,
        k: int = 2,
        hops: int = 2,
        max_passage_words: int | None = 120,
        data_dir: str | Path | None = None,
    ):
        _check_settings(k, max_passage_words, hops)
        self.k = k
        self.hops = hops
        self.max_passage_words = max_passage_words
        self.data_dir = data_dir

    def load(self, split: str, *, n: int | None = None) -> list[dspy.Example]:
        """Examples with inputs ``question`` and ``context`` (list of ``[title, text]``)."""
        path = resolve_split(self.name, split, self.data_dir)
        fields = {"id": str, "question": str, "answer": str, "supporting_facts": list, "context": list}
        rows = read_jsonl(path, fields, n=n, check=_check_row)
        examples = []
        for row in rows:
            context = [[title, "".join(sentences).strip()] for title, sentences in row["context"]]
            gold = sorted({fact[0] for fact in row["supporting_facts"]})
            examples.append(
                dspy.Example(
                    id=row["id"],
                    question=row["question"],
                    context=context,
                    answer=row["answer"],
                    gold_titles=gold,
                    type=row.get("type"),
                    level=row.get("level"),
                ).with_inputs("question", "context")
            )
        return examples

    def program(self) -> dspy.Module:
        """A fresh :class:`MultiHopQA`."""
        return MultiHopQA(k=self.k, hops=self.hops, max_passage_words=self.max_passage_words)

    def single_stage_program(self) -> dspy.Module:
        """The single-stage baseline :class:`SingleStageQA`: one ``answer`` stage over all paragraphs."""
        return SingleStageQA(max_passage_words=self.max_passage_words)

    def metric(self, example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
        """Answer F1."""
        return answer_f1(_answer(prediction), example.answer)

    def extra_metrics(self) -> Mapping[str, Callable[[dspy.Example, dspy.Prediction], float]]:
        """EM and F1 of the answer."""
        return {
            "em": lambda ex, pred: answer_em(_answer(pred), ex.answer),
            "f1": lambda ex, pred: answer_f1(_answer(pred), ex.answer),
        }

    def stage_metrics(self) -> Mapping[str, StageMetric]:
        """Gold-title recall after hop 1 (``query1``) and after both hops (``query2``)."""
        return {
            "query1": lambda ex, pred: title_recall(ex, pred.get("hop1_titles") or []),
            "query2": lambda ex, pred: title_recall(
                ex, [*(pred.get("hop1_titles") or []), *(pred.get("hop2_titles") or [])]
            ),
        }

    def gold_passages(self, example: dspy.Example) -> str:
        """The gold paragraphs formatted as the answer stage sees passages (oracle upstream)."""
        return format_gold_passages(example.context, example.gold_titles, self.max_passage_words)

    def oracle_programs(self, program: dspy.Module) -> Mapping[str, OracleProgram]:
        """``answer``: the program's answer stage given the gold supporting paragraphs (:class:`GoldPassagesQA`).

        None when ``program`` has no ``answer`` stage that is a ``dspy.Predict`` reading passages.
        """
        answer = dict(program.named_predictors()).get("answer")
        if not isinstance(answer, dspy.Predict) or "passages" not in answer.signature.input_fields:
            return {}
        max_words = getattr(program, "max_passage_words", self.max_passage_words)
        oracle = GoldPassagesQA(answer, max_passage_words=max_words)
        return {
            "answer": OracleProgram(
                description="answer stage given the gold supporting paragraphs",
                program=oracle,
                gold_inputs=("gold_titles",),
            )
        }
