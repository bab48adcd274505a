"""The second embedded model, Qwen2.5-Coder-0.5B-Instruct, for real: checked weights, both layouts, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from stageopt import ModelNotAvailableError
from stageopt.evaluation import evaluate
from stageopt.lm import EMBEDDED_MODELS, LocalLM, SmallLMAdapter, assemble_chunks, resolve_lm
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="module")
def qwen() -> LocalLM:
    return LocalLM(QWEN, cache=False)


def test_the_assembled_file_has_the_pinned_size_and_hash() -> None:
    weights = EMBEDDED_MODELS[QWEN].weights
    assert weights is not None
    path = weights.path()
    assert path.stat().st_size == 491_400_064
    assert path.read_bytes()[:4] == b"GGUF"


def test_a_corrupted_copy_of_the_real_parts_is_refused(tmp_path: Path) -> None:
    weights = EMBEDDED_MODELS[QWEN].weights
    assert weights is not None
    parts = []
    for i, source in enumerate(weights.part_paths()):
        copy = tmp_path / f"p{i}" / "data" / source.name
        copy.parent.mkdir(parents=True)
        shutil.copyfile(source, copy)
        parts.append(copy)
    with parts[3].open("r+b") as handle:  # flip one byte in the middle of part 4
        handle.seek(1_000_000)
        byte = handle.read(1)
        handle.seek(1_000_000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    target = tmp_path / "cache" / "qwen.gguf"
    with pytest.raises(ModelNotAvailableError, match="corrupted"):
        assemble_chunks(parts, target, size=weights.size, sha256=weights.sha256)
    assert not target.exists()


def test_chat_layout_wraps_the_prompt_in_the_ggufs_template(qwen: LocalLM) -> None:
    prompt = qwen.local_engine._chat_prompt("Answer briefly.\n\n---\n\nQuestion: What is 2 + 2?\nAnswer:")
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nAnswer briefly.\n\n---\n\nQuestion: What is 2 + 2?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\nAnswer:")


@pytest.mark.parametrize("layout", ["chat", "completion"])
def test_both_layouts_answer_hotpotqa_with_gold_paragraphs(layout: str) -> None:
    task = get_task("hotpotqa")
    oracle = task.oracle_programs(task.program())["answer"]
    examples = [e.with_inputs(*e.inputs().keys(), *oracle.gold_inputs) for e in task.load("dev", n=3)]
    lm = resolve_lm(f"{QWEN}@{layout}", cache=False)
    assert lm.model == (f"local/{QWEN}" if layout == "chat" else f"local/{QWEN}@completion")
    report = evaluate(oracle.program, examples, task.metric, lm=lm, adapter=SmallLMAdapter())
    assert report.n == 3
    assert report.parse_rate == 1.0
    assert report.errors == 0
    answers = [str(r.prediction["answer"]).strip() for r in report.examples]
    assert all(0 < len(a) < 200 for a in answers)


def test_the_same_request_gives_the_same_answer(qwen: LocalLM) -> None:
    class Capital(dspy.Signature):
        """Name the capital city of the country."""

        country: str = dspy.InputField()
        capital: str = dspy.OutputField()

    with dspy.context(lm=qwen, adapter=SmallLMAdapter()):
        first = dspy.Predict(Capital)(country="France").capital
        second = dspy.Predict(Capital)(country="France").capital
    assert first == second == "Paris"


def test_cli_eval_runs_on_qwen(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stageopt.cli._main",
            "eval",
            "--task",
            "hotpotqa",
            "--lm",
            QWEN,
            "--n",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["n"] == 2
