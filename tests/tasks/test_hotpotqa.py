"""HotpotQA task: official metrics, loading and validation, BM25 retrieval, the program's data flow."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import dspy
import pytest

from stageopt import DataError
from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.tasks import DATA_DIR_ENV, HotpotQATask, data_dir, get_task
from stageopt.tasks.hotpotqa import MultiHopQA, answer_em, answer_f1, normalize_answer, retrieve
from tests.conftest import scripted_lm

ROW = {
    "id": "x1",
    "question": "Which city is the capital of the country where Lyon is?",
    "answer": "Paris",
    "type": "bridge",
    "level": "easy",
    "supporting_facts": [["Lyon", 0], ["France", 1]],
    "context": [
        ["Lyon", ["Lyon is a city in France.", " It lies on the Rhone."]],
        ["France", ["France is a country.", " Its capital is Paris."]],
        ["Bananas", ["Bananas are yellow fruit."]],
        ["Mount Fuji", ["Mount Fuji is a volcano in Japan."]],
    ],
}


def _write(tmp_path: Path, rows: Sequence[object], name: str = "dev") -> Path:
    folder = tmp_path / "hotpotqa"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


# ---- metrics -------------------------------------------------------------------------------------


def test_normalisation_drops_case_punctuation_and_articles() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("An apple, a pear") == "apple pear"


@pytest.mark.parametrize(
    ("prediction", "gold", "em", "f1"),
    [
        ("Paris", "paris", 1.0, 1.0),
        ("the city of Paris", "Paris", 0.0, 0.5),
        ("yes", "no", 0.0, 0.0),
        ("yes it is", "yes", 0.0, 0.0),  # the official yes/no rule: no partial credit
        (None, "Paris", 0.0, 0.0),
        ("", "", 1.0, 0.0),
    ],
)
def test_em_and_f1(prediction: str | None, gold: str, em: float, f1: float) -> None:
    assert answer_em(prediction, gold) == em
    assert answer_f1(prediction, gold) == pytest.approx(f1)


# ---- loading -------------------------------------------------------------------------------------


def test_loads_rows_with_gold_titles(tmp_path: Path) -> None:
    task = HotpotQATask(data_dir=_write(tmp_path, [ROW, {**ROW, "id": "x2"}]))
    examples = task.load("dev")
    assert [e.id for e in examples] == ["x1", "x2"]
    first = examples[0]
    assert first.gold_titles == ["France", "Lyon"]
    assert first.context[0] == ["Lyon", "Lyon is a city in France. It lies on the Rhone."]
    assert set(first.inputs().keys()) == {"question", "context"}
    assert len(task.load("dev", n=1)) == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"dev\.jsonl:2: invalid JSON"),
        ({k: v for k, v in ROW.items() if k != "answer"}, r"dev\.jsonl:2: missing field 'answer'"),
        ({**ROW, "question": 3}, r"dev\.jsonl:2: field 'question' should be str"),
        ({**ROW, "context": [["Lyon", "not a list"]]}, r"dev\.jsonl:2: field 'context' must hold"),
        ({**ROW, "supporting_facts": [[]]}, r"dev\.jsonl:2: field 'supporting_facts' must hold"),
    ],
)
def test_malformed_row_names_file_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    task = HotpotQATask(data_dir=_write(tmp_path, [ROW, row]))
    with pytest.raises(DataError, match=message):
        task.load("dev")


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    task = HotpotQATask(data_dir=_write(tmp_path, [ROW, "", {**ROW, "context": [["x"]]}]))
    with pytest.raises(DataError, match=r"dev\.jsonl:3:"):
        task.load("dev")


def test_missing_split_and_data_dir_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="known splits are train and dev"):
        HotpotQATask(data_dir=_write(tmp_path, [ROW])).load("test")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="STAGEOPT_DATA_DIR"):
        data_dir()
    monkeypatch.setenv(DATA_DIR_ENV, str(_write(tmp_path, [ROW])))
    assert get_task("hotpotqa").load("dev")[0].id == "x1"


def test_shared_data_is_found_from_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (Path(__file__).resolve().parents[3] / "shared" / "data").is_dir():
        pytest.skip("this checkout is not beside shared/data (the data come from $STAGEOPT_DATA_DIR)")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    examples = get_task("hotpotqa").load("dev", n=3)
    assert len(examples) == 3
    assert all(len(e.context) == 10 and e.gold_titles for e in examples)


# ---- retrieval and program ------------------------------------------------------------------------

PASSAGES = [
    ("Lyon", "Lyon is a city in France. It lies on the Rhone."),
    ("France", "France is a country. Its capital is Paris."),
    ("Bananas", "Bananas are yellow fruit."),
    ("Mount Fuji", "Mount Fuji is a volcano in Japan."),
]


def test_bm25_retrieval_ranks_and_excludes() -> None:
    assert [t for t, _ in retrieve(PASSAGES, "volcano Japan", 1)] == ["Mount Fuji"]
    top = retrieve(PASSAGES, "capital of France", 2, exclude=["France"])
    assert "France" not in [t for t, _ in top]
    assert len(top) == 2
    assert retrieve(PASSAGES, "the of and", 2) == PASSAGES[:2]  # stopwords only: original order
    assert retrieve(PASSAGES, "anything", 0) == []


def _script(prompt: str) -> str:
    last = prompt.split("\n\n---\n\n")[-1]
    if last.rstrip().endswith("Answer:"):
        return " Paris" if "[France]" in last else " unknown"
    if "Passages:" in last:
        return " capital of France"
    return " Lyon city"


def test_program_threads_queries_through_two_hops(tmp_path: Path) -> None:
    task = HotpotQATask(k=1, data_dir=_write(tmp_path, [ROW]))
    report = evaluate(
        task.program(),
        task.load("dev"),
        task.metric,
        lm=scripted_lm(_script),
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
    )
    prediction = report.examples[0].prediction
    assert prediction["hop1_titles"] == ["Lyon"]
    assert prediction["hop2_titles"] == ["France"]
    assert report.score == 1.0
    assert report.stage_metrics == {"query1": 0.5, "query2": 1.0}
    assert report.parse_rate == 1.0
    assert [s for s in report.stages] == ["query1", "query2", "answer"]


def test_empty_query_falls_back_to_the_question() -> None:
    program = MultiHopQA(k=1)
    with dspy.context(
        lm=scripted_lm(lambda p: " " if "Answer:" not in p[-10:] else " Paris"), adapter=SmallLMAdapter()
    ):
        prediction = program(question=ROW["question"], context=[[t, x] for t, x in PASSAGES])
    assert prediction.query1 == ROW["question"]


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="k"):
        HotpotQATask(k=0)
    with pytest.raises(ValueError, match="max_passage_words"):
        MultiHopQA(max_passage_words=0)
