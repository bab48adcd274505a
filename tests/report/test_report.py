"""`stageopt report`: what the page and the summary say, read from real run-directory files."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from stageopt import ConfigurationError
from stageopt.cli._main import main
from stageopt.report import build_content, load_run, load_runs, write_report
from stageopt.report._content import MISSING
from stageopt.report._stages import diff_html, stage_changes
from stageopt.strategies import OptimizationResult
from tests.report.conftest import ANSWER_DEMO, NEW_QUERY1, PARETO_FRONT, TRIALS, RunFactory


class _Page(HTMLParser):
    """Tables (id -> rows of cell texts), images and every tag of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "table":
            self._table = a.get("id") or ""
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in {"td", "th"}:
            self._cell = []
        elif tag == "img":
            self.images[a.get("id") or ""] = a.get("src") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag in {"td", "th"} and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _row(table: list[list[str]], first: str) -> list[str]:
    return next(r for r in table if r and r[0] == first)


# ---- reading run directories -----------------------------------------------------------------------


def test_missing_result_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigurationError, match=r"run/result\.json does not exist"):
        load_run(tmp_path / "run")
    with pytest.raises(ConfigurationError, match="is not a directory"):
        load_run(tmp_path / "absent")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{oops", "is not readable JSON"),
        (json.dumps({"schema_version": 1, "stages": {}, "error_origins": {}}), "is not a `stageopt optimize` result"),
        ('["a list"]', "is not a `stageopt optimize` result"),
    ],
)
def test_result_json_of_another_kind_is_refused(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "result.json").write_text(content)
    with pytest.raises(ConfigurationError, match=message) as info:
        load_run(tmp_path)
    assert str(tmp_path / "result.json") in str(info.value)


def test_newer_result_schema_is_refused_with_the_file_name(make_run: RunFactory) -> None:
    path = make_run(diagnosis=False, study=False, program=False)
    data = json.loads((path / "result.json").read_text())
    (path / "result.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ConfigurationError, match=r"result\.json: result schema_version 99 is not supported"):
        load_run(path)


def test_broken_optional_files_become_notes(make_run: RunFactory) -> None:
    path = make_run(study=False)
    (path / "diagnosis.json").write_text("{not json")
    (path / "before.json").write_text(json.dumps({"no": "score"}))
    (path / "optuna.db").write_text("not a database")
    run = load_run(path)
    assert run.diagnosis is None
    assert run.before is None
    assert run.studies == ()
    notes = "\n".join(run.notes)
    assert "diagnosis.json could not be read" in notes
    assert "before.json is not in the expected format" in notes
    assert "optuna.db could not be read as an Optuna study" in notes
    html = write_report([path]).html.read_text()
    assert html.count('class="warning"') == 3
    assert "stageopt diagnose" in html  # the section says how to make the missing diagnosis


def test_same_directory_names_get_distinct_labels(make_run: RunFactory) -> None:
    runs = load_runs([make_run("a/run", study=False), make_run("b/run", study=False)])
    assert [r.label for r in runs] == ["a/run", "b/run"]
    same = make_run("c/run", study=False)
    assert [r.label for r in load_runs([same, same])] == ["c/run (1)", "c/run (2)"]
    with pytest.raises(ConfigurationError, match="no run directory given"):
        load_runs([])


# ---- what the report says --------------------------------------------------------------------------


def test_single_run_report_has_every_section(make_run: RunFactory) -> None:
    path = make_run(pareto=True)
    paths = write_report([path])
    assert paths.html == path / "report.html"
    assert paths.markdown == path / "report.md"
    page = _parse(paths.html.read_text())
    assert set(page.tables) >= {
        "summary", "stages-1", "diagnosis-stages-1", "error-origins-1", "attribution-1", "oracle-1", "settings-1",
        "pareto-1-2",
    }  # fmt: skip

    summary = page.tables["summary"]
    assert summary[0] == ["", "run"]
    assert _row(summary, "best validation score")[1] == "0.500"
    assert _row(summary, "improvement (validation)")[1] == "+0.300"
    assert _row(summary, "full-fidelity trials")[1] == "4"
    assert _row(summary, "Optuna trials (complete)")[1] == str(len(TRIALS) + 4)
    assert _row(summary, "logical LM calls (spent / budget)")[1] == "120 / 150"

    # without before/after.json: baseline vs best from result.json, in program order
    stages = page.tables["stages-1"]
    assert [r[0] for r in stages[1:]] == ["query1", "query2", "answer", "end to end (F1)"]
    assert _row(stages, "query1")[1:4] == ["0.500", "0.750", "+0.250"]
    assert _row(stages, "answer")[1] == MISSING  # no stage metric
    assert "temperature=0.7" in _row(stages, "answer")[4]
    assert "1 demo (set #1)" in _row(stages, "answer")[4]

    origins = page.tables["error-origins-1"]
    assert [r[:3] for r in origins[1:]] == [
        ["query1", "2", "66.7 %"],
        ["query2", "0", "0.0 %"],
        ["answer", "1", "33.3 %"],
    ]
    assert _row(page.tables["attribution-1"], "query2")[1:] == ["-0.050", "-0.200", "0.100"]
    assert [r[0] for r in page.tables["pareto-1-2"][1:]] == [str(t) for t in PARETO_FRONT]

    # plots: every image is an embedded PNG
    assert set(page.images) == {"convergence-plot", "origins-plot-1", "attribution-plot-1", "pareto-plot-1-2"}
    for src in page.images.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_is_self_contained(make_run: RunFactory) -> None:
    text = write_report([make_run(pareto=True)]).html.read_text()
    page = _parse(text)
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    for _, attrs in page.tags:
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith(("data:", "#")), value
    assert "http://" not in text
    assert "https://" not in text
    assert "url(" not in text  # no CSS resources either


def test_instruction_and_demo_diff_against_the_task_program(make_run: RunFactory) -> None:
    run = load_run(make_run(study=False))
    changes, source = stage_changes(run)
    assert "unoptimized program of task hotpotqa against program.json" in source
    by_name = {c.name: c for c in changes}
    assert list(by_name) == ["query1", "query2", "answer"]
    assert by_name["query1"].instruction_changed
    assert by_name["query1"].final_instruction == NEW_QUERY1
    assert not by_name["query2"].instruction_changed
    assert by_name["answer"].original_demos == ()
    assert by_name["answer"].final_demos is not None
    assert by_name["answer"].final_demos[0]["answer"] == ANSWER_DEMO["answer"]

    html = write_report([run.path]).html.read_text()
    assert "<ins>" in html
    assert "<del>" in html
    assert "&lt;b&gt;precise&lt;/b&gt;" in html  # instruction text is escaped, never markup
    assert "<b>precise" not in html
    assert "demo 1 (bootstrapped)" in html
    assert "Instruction (changed)" in html
    assert "Instruction (unchanged)" in html


def test_diff_html_marks_words_and_escapes() -> None:
    assert diff_html("find the city", "find the <capital> city") == "find the <ins>&lt;capital&gt; </ins>city"
    assert diff_html("a b", "a c") == "a <del>b</del><ins>c</ins>"
    assert diff_html("same", "same") == "same"


def test_program_json_without_a_task_is_read_as_json(make_run: RunFactory) -> None:
    path = make_run(study=False, diagnosis=False)
    data = json.loads((path / "result.json").read_text())
    (path / "result.json").write_text(json.dumps({**data, "task": None}))
    changes, source = stage_changes(load_run(path))
    assert "names no task" in source
    by_name = {c.name: c for c in changes}
    assert by_name["query1"].final_instruction == NEW_QUERY1
    assert by_name["query1"].original_instruction is None
    assert by_name["answer"].final_demos is not None
    assert len(by_name["answer"].final_demos) == 1


def test_without_program_json_instructions_come_from_the_result(make_run: RunFactory) -> None:
    changes, source = stage_changes(load_run(make_run(study=False, program=False)))
    assert "program.json is missing" in source
    query1 = next(c for c in changes if c.name == "query1")
    assert query1.final_instruction == NEW_QUERY1
    assert query1.final_demos is None


def test_before_after_reports_fill_the_stage_table(make_run: RunFactory) -> None:
    page = _parse(write_report([make_run(before_after=True, study=False)]).html.read_text())
    stages = page.tables["stages-1"]
    assert "parsed before" in stages[0]
    answer = _row(stages, "answer")
    assert answer[4:6] == ["50.0 %", "100.0 %"]
    assert _row(stages, "query1")[1:4] == ["0.250", "0.500", "+0.250"]
    assert _row(stages, "end to end (F1)")[1:4] == ["0.250", "0.500", "+0.250"]
    assert _row(stages, "end to end (EM)")[1:4] == ["0.125", "0.250", "+0.125"]
    assert _row(page.tables["summary"], "dev score after")[1] == "0.500"


def test_missing_diagnosis_and_study_say_what_to_run(make_run: RunFactory) -> None:
    path = make_run(diagnosis=False, study=False)
    content = build_content(load_runs([path]))
    (section,) = content.runs
    assert section.diagnosis_tables == []
    assert section.origins_png is None
    assert section.attribution_png is None
    assert section.diagnosis_hints == [
        f"No diagnosis.json in this run directory: run `stageopt diagnose --task hotpotqa --program "
        f"{path / 'program.json'} --out {path}` for error origins and stage attribution."
    ]
    assert section.dashboard_command is None
    html = write_report([path]).html.read_text()
    assert "No optuna.db in this run directory" in html


def test_single_objective_study_has_no_pareto_plot(make_run: RunFactory) -> None:
    path = make_run(pareto=False)
    (section,) = build_content(load_runs([path])).runs
    (study,) = section.studies
    assert study.info.directions == ("maximize",)
    assert study.info.n_complete == len(TRIALS)
    assert study.pareto_png is None
    assert section.dashboard_command == f"optuna-dashboard sqlite:///{(path / 'optuna.db').resolve()}"


def test_several_runs_make_one_comparison(make_run: RunFactory, tmp_path: Path) -> None:
    a = make_run("a", strategy="coordinate")
    b = make_run("b", strategy="joint", diagnosis=False)
    out = tmp_path / "cmp" / "both.html"
    paths = write_report([a, b], out=out)
    assert paths.markdown == tmp_path / "cmp" / "both.md"
    page = _parse(out.read_text())
    assert page.tables["summary"][0] == ["", "a", "b"]
    assert _row(page.tables["summary"], "strategy")[1:] == ["coordinate", "joint"]
    assert _row(page.tables["summary"], "diagnosis.json")[1:] == ["yes", "no"]
    assert {"stages-1", "stages-2", "settings-1", "settings-2", "error-origins-1"} <= set(page.tables)
    assert "error-origins-2" not in page.tables
    assert "convergence-plot" in page.images

    md = paths.markdown.read_text()
    assert "|   | a | b |" in md
    assert "## Run 2: b — joint on hotpotqa" in md
    assert "[both.html](both.html)" in md
    assert f"+{NEW_QUERY1}" in md  # the instruction diff, line-wise
    assert "**Error origins: 3 of 4 examples failed (F1 < 1.0)**" in md


# ---- the command -------------------------------------------------------------------------------------


def test_cli_writes_beside_the_run_and_prints_paths(make_run: RunFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_run(study=False)
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"wrote {path / 'report.html'}", f"wrote {path / 'report.md'}"]
    assert (path / "report.html").stat().st_size > 10_000


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"stageopt: error: {tmp_path / 'result.json'} does not exist; give a run directory written by "
        "`stageopt optimize` (it holds result.json)"
    ]


def test_cli_refuses_a_directory_as_out(make_run: RunFactory, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_run(study=False, diagnosis=False)
    assert main(["report", str(path), "--out", str(path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_run_without_trials_still_reports(tmp_path: Path) -> None:
    result = OptimizationResult(
        strategy="joint", seed=0, budget={"lm_calls": 5}, usage={"lm_calls": 5}, baseline={"score": None, "n": 2},
        best={"score": None, "params": {}, "trial": None}, history=[], status="budget_exhausted",
    )  # fmt: skip
    (tmp_path / "result.json").write_text(json.dumps(result.to_dict()))
    page = _parse(write_report([tmp_path]).html.read_text())
    assert _row(page.tables["summary"], "best validation score")[1] == MISSING
    assert page.images == {}
    assert "No full-fidelity trial in the history" in (tmp_path / "report.html").read_text()
    assert "program.json is missing" in (tmp_path / "report.html").read_text()


def test_a_trained_run_reports_its_loss_and_validation_curves(make_run: RunFactory) -> None:
    path = make_run(diagnosis=False, study=False)
    result = json.loads((path / "result.json").read_text())
    result["strategy"] = "softprompt"
    result["notes"]["softprompt"] = {
        "trained": ["plan", "solve"],
        "returned": "epoch 2 (trial 2)",
        "epochs": [
            {"epoch": 1, "train_loss": {"plan": 1.5, "solve": 1.2}, "mean_loss": 1.35, "val_score": 0.1, "lr": 0.03,
             "forward_passes": 10, "train_s": 12.0},
            {"epoch": 2, "train_loss": {"plan": 1.1, "solve": 0.9, "plan->solve": 1.4}, "mean_loss": 1.1333,
             "val_score": 0.2, "lr": 1.5e-4, "forward_passes": 30, "train_s": 20.5},
        ],
    }  # fmt: skip
    (path / "result.json").write_text(json.dumps(result))
    paths = write_report([path])
    page = _parse(paths.html.read_text())
    table = page.tables["training-1"]
    assert table[0] == [
        "epoch", "loss plan", "loss solve", "loss plan->solve", "mean loss", "validation F1", "lr", "forward passes",
        "train s",
    ]  # fmt: skip
    assert table[1] == ["1", "1.5000", "1.2000", MISSING, "1.3500", "0.100", "0.03", "10", "12.0"]
    assert table[2][3] == "1.4000"
    assert table[2][6] == "0.00015"
    assert page.images["training-plot-1"].startswith("data:image/png;base64,")
    markdown = paths.markdown.read_text()
    assert "### Training curves" in markdown
    assert "Returned: epoch 2 (trial 2)." in markdown
    # a run of another strategy has no training section
    other = _parse(write_report([make_run("other", diagnosis=False, study=False)]).html.read_text())
    assert "training-1" not in other.tables
    assert "training-plot-1" not in other.images
