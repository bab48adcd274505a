"""Batched decoding on the real embedded model: same greedy outputs and counts as one call at a time."""

from __future__ import annotations

import json

import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import EMBEDDED_MODELS, LocalLM, SmallLMAdapter
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration


def _run(model: str, task_name: str, n: int, parallel: int, max_tokens: int) -> tuple[LocalLM, object, list[str]]:
    task = get_task(task_name)
    program = task.program() if task_name == "hotpotqa" else task.single_stage_program()
    assert program is not None
    lm = LocalLM(model, cache=False, max_tokens=max_tokens, parallel=parallel)
    report = evaluate(
        program, task.load("dev", n=n), task.metric, lm=lm, adapter=SmallLMAdapter(), num_threads=parallel
    )
    predictions = [json.dumps(e.prediction, sort_keys=True, default=str) for e in report.examples]
    return lm, report, predictions


def test_batched_greedy_outputs_and_counts_equal_the_serial_ones() -> None:
    # Q8_0 weights: their kernels give every sequence of a batch the logits it has alone.
    serial_lm, serial, serial_predictions = _run("gemma3-270m-q8", "gsm8k", 4, parallel=1, max_tokens=64)
    batched_lm, batched, batched_predictions = _run("gemma3-270m-q8", "gsm8k", 4, parallel=4, max_tokens=64)
    assert batched_predictions == serial_predictions
    assert batched.usage.lm_calls == serial.usage.lm_calls  # type: ignore[attr-defined]
    assert 4 <= serial.usage.lm_calls <= 8  # type: ignore[attr-defined]  # a follow-up call where Answer: was missing
    s, b = serial_lm.local_engine.stats, batched_lm.local_engine.stats
    assert (b.calls, b.prompt_tokens, b.completion_tokens) == (s.calls, s.prompt_tokens, s.completion_tokens)
    stats = batched_lm.local_engine.batch_stats
    assert stats is not None
    assert stats.max_active >= 2
    assert stats.steps < b.completion_tokens


def test_a_stage_reuses_its_shared_prompt_prefix_across_slots() -> None:
    lm, report, _ = _run("gemma3-270m", "hotpotqa", 4, parallel=2, max_tokens=32)
    assert report.usage.lm_calls == 12  # type: ignore[attr-defined]  # three stages per question
    stats = lm.local_engine.batch_stats
    assert stats is not None
    assert stats.requests == 12
    assert 0 < stats.reused_tokens < stats.prompt_tokens


def test_the_requantized_file_matches_its_record() -> None:
    spec = EMBEDDED_MODELS["gemma3-270m-q8"]
    path = spec.path()
    record = json.loads(path.with_name(path.name + ".json").read_text())
    assert record["ftype"] == "LLAMA_FTYPE_MOSTLY_Q8_0"
    assert path.stat().st_size == record["size"]
    assert path.read_bytes()[:4] == b"GGUF"
