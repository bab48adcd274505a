"""The delay server: OpenAI-shaped answers every adapter parses, parallel sleeping, and stageopt through LiteLLM."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
from benchmarks.delay_server import DelayServer, answer, apply_stop, entity, start_in_thread

from stageopt.cli._main import main
from stageopt.lm import SmallLMAdapter
from stageopt.lm._adapter import parse_completion
from stageopt.proposers._instruction import LMInstructionProposer, validate_instruction
from stageopt.tasks.hotpotqa import AnswerQuestion, GenerateFollowupQuery, GenerateQuery, MultiHopQA

QUESTION = "Which magazine was started first, Arthur's Magazine or First for Women?"
INPUTS = {"question": QUESTION, "passages": "[Arthur's Magazine] A monthly.\n[First for Women] A weekly."}


class Typed(dspy.Signature):
    """Answer with every kind of field."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    reasoning: str = dspy.OutputField()
    answer: Literal["yes", "no"] = dspy.OutputField()
    count: int = dspy.OutputField()
    items: list[str] = dspy.OutputField()


def _reply(signature: type[dspy.Signature], demos: list[dict[str, Any]] | None = None) -> str:
    """What the server sends back to a SmallLMAdapter prompt, after the adapter's stop sequences."""
    adapter = SmallLMAdapter()
    prompt = adapter.format(signature, demos or [], INPUTS)[0]["content"]
    return apply_stop(answer(prompt), adapter.stop_sequences(signature))


@pytest.fixture
def server() -> Iterator[DelayServer]:
    srv, _ = start_in_thread(delay=0.0)
    yield srv
    srv.stop()


def _post(url: str, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ---- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (QUESTION, "Arthur's Magazine"),
        ("Who directed the film Blade Runner in 1982?", "Blade Runner"),
        ("what is two plus two?", "unknown"),
        ("", "unknown"),
    ],
)
def test_entity_is_the_first_capitalised_run_after_the_first_word(text: str, expected: str) -> None:
    assert entity(text) == expected


def test_hotpotqa_stages_parse_with_plausible_values() -> None:
    for signature in (GenerateQuery, GenerateFollowupQuery):
        values, ok = parse_completion(signature, _reply(signature))
        assert ok
        assert values["query"] == QUESTION  # under 12 words: the whole question is the query
    values, ok = parse_completion(AnswerQuestion, _reply(AnswerQuestion))
    assert ok
    assert values == {"answer": "Arthur's Magazine"}


def test_later_output_fields_are_learnt_from_demos() -> None:
    demo = {**INPUTS, "reasoning": "r", "answer": "yes", "count": 1, "items": "a"}
    values, ok = parse_completion(Typed, _reply(Typed, [demo]))
    assert ok
    assert list(values) == ["reasoning", "answer", "count", "items"]
    assert values["answer"] == "Arthur's Magazine"
    # without demos the plain layout does not name the later fields: only reasoning -> answer is guessed
    cot = dspy.ChainOfThought(AnswerQuestion).predict.signature
    values, ok = parse_completion(cot, _reply(cot))
    assert ok
    assert values["answer"] == "Arthur's Magazine"
    assert "Arthur's Magazine" in values["reasoning"]


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_dspy_adapters_parse_typed_fields(adapter: dspy.Adapter) -> None:
    demo = {"question": "Who is Ann?", "passages": "p", "reasoning": "r", "answer": "no", "count": 3, "items": ["b"]}
    messages = adapter.format(Typed, [demo], INPUTS)
    values = adapter.parse(Typed, answer("\n\n".join(m["content"] for m in messages)))
    assert values["answer"] == "yes"  # a Literal's first option
    assert values["count"] == 0  # no number in the current question (the demo's 3 is not read)
    assert values["items"] == ["Arthur's Magazine"]
    assert "Arthur's Magazine" in values["reasoning"]


def test_instruction_proposals_pass_validation_and_vary_with_the_seed() -> None:
    program = MultiHopQA()
    proposer = LMInstructionProposer()
    context = type("Context", (), {"traces": [], "trainset": []})()
    for name, predictor in program.named_predictors():
        prompt = proposer.request(name, predictor, context, None)
        kept: list[str] = []
        for seed in range(4):
            text = apply_stop(answer(prompt, seed=seed), ["\n", "---"])
            instruction, reason = validate_instruction(text, existing=[predictor.signature.instructions, *kept])
            assert instruction is not None, reason
            kept.append(instruction)
        assert "question" in kept[0]


def test_answers_are_deterministic_in_the_prompt() -> None:
    prompt = SmallLMAdapter().format(AnswerQuestion, [], INPUTS)[0]["content"]
    assert answer(prompt) == answer(prompt)
    other = prompt.replace("Arthur's Magazine or First", "Harper's Bazaar or First")
    assert answer(other) == "Harper's Bazaar"
    # dspy's text-completion path appends a marker after the prompt
    assert answer(prompt + "\n\nBEGIN RESPONSE:") == answer(prompt)


def test_stop_cuts_at_the_earliest_sequence() -> None:
    assert apply_stop("a\nb---c", ["---", "\n"]) == "a"
    assert apply_stop("abc", "c") == "ab"
    assert apply_stop("abc", None) == "abc"
    assert apply_stop("abc", ["", "x"]) == "abc"


# ---- the HTTP API -------------------------------------------------------------------------------


def test_chat_completion_is_openai_shaped_and_honours_stop(server: DelayServer) -> None:
    prompt = SmallLMAdapter().format(Typed, [], INPUTS)[0]["content"]
    body = {"model": "delay", "messages": [{"role": "user", "content": prompt}]}
    status, full = _post(f"{server.url}/v1/chat/completions", body)
    assert status == 200
    assert set(full) >= {"id", "object", "created", "model", "choices", "usage"}
    assert full["object"] == "chat.completion"
    assert full["model"] == "delay"
    (choice,) = full["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    text = choice["message"]["content"]
    assert "\n" in text  # reasoning, then an Answer: line
    usage = full["usage"]
    assert usage["prompt_tokens"] == len(prompt.split())
    assert usage["completion_tokens"] == len(text.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    _, cut = _post(f"{server.url}/v1/chat/completions", {**body, "stop": ["\n"]})
    assert cut["choices"][0]["message"]["content"] == text.split("\n")[0]
    _, short = _post(f"{server.url}/v1/chat/completions", {**body, "max_tokens": 2})
    assert short["choices"][0]["finish_reason"] == "length"
    assert len(short["choices"][0]["message"]["content"].split()) == 2


def test_text_completion_answers_each_prompt(server: DelayServer) -> None:
    prompts = ["Question: Who wrote Hamlet?\nAnswer:", "Question: Where is Mount Fuji?\nAnswer:"]
    status, body = _post(f"{server.url}/v1/completions", {"model": "m", "prompt": prompts, "n": 2})
    assert status == 200
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["Hamlet", "Hamlet", "Mount Fuji", "Mount Fuji"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["model"] == "m"


def test_other_routes_and_errors(server: DelayServer) -> None:
    assert _get(f"{server.url}/health") == (200, {"status": "ok"})
    status, models = _get(f"{server.url}/v1/models")
    assert status == 200
    assert models["data"][0]["id"] == "delay"
    chat = f"{server.url}/v1/chat/completions"
    assert _post(chat, b"{oops")[0] == 400
    assert _post(chat, {"messages": []})[0] == 400
    status, error = _post(chat, {"messages": [{"role": "user", "content": "x"}], "stream": True})
    assert status == 400
    assert "stream" in error["error"]["message"]
    assert _post(chat, {"messages": [{"role": "user", "content": "x"}], "n": 0})[0] == 400
    assert _post(f"{server.url}/v1/embeddings", {})[0] == 404
    assert _get(f"{server.url}/nope")[0] == 404
    stats = server.stats()
    assert stats["requests"] == 0  # no completion was served
    assert stats["errors"] == 6
    assert stats["other_requests"] == 2
    _, reset = _post(f"{server.url}/stats/reset", {})
    assert reset["errors"] == 0


def test_delay_and_seeded_jitter() -> None:
    with pytest.raises(ValueError, match="delay"):
        DelayServer(("127.0.0.1", 0), delay=-1.0)
    a = DelayServer(("127.0.0.1", 0), delay=0.5, jitter=0.2, seed=3)
    b = DelayServer(("127.0.0.1", 0), delay=0.5, jitter=0.2, seed=3)
    try:
        draws = [a.next_delay() for _ in range(20)]
        assert draws == [b.next_delay() for _ in range(20)]
        assert all(0.5 <= d <= 0.7 for d in draws)
        assert len(set(draws)) > 1
    finally:
        a.server_close()
        b.server_close()


def test_concurrent_requests_sleep_in_parallel() -> None:
    server, base = start_in_thread(delay=0.5)
    try:
        barrier = threading.Barrier(8)
        statuses: list[int] = []

        def call(i: int) -> None:
            barrier.wait()
            status, _ = _post(f"{base}/chat/completions", {"messages": [{"role": "user", "content": f"Q {i}"}]})
            statuses.append(status)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        assert statuses == [200] * 8
        assert 0.5 <= elapsed < 1.5
        _, stats = _get(f"{server.url}/stats")
        assert stats["requests"] == 8
        assert stats["max_concurrency"] == 8
        assert stats["in_flight"] == 0
    finally:
        server.stop()


# ---- stageopt through LiteLLM -------------------------------------------------------------------


def test_stageopt_optimize_and_eval_through_litellm(tmp_path: Path) -> None:
    server, base = start_in_thread(delay=0.2)
    try:
        out = tmp_path / "run"
        argv = ["--task", "hotpotqa", "--lm", "openai/delay", "--api-base", base, "--no-cache"]
        search = ["--strategy", "random", "--budget-calls", "20", "--val-size", "2", "--bootstrap-size", "2"]
        code = main(["optimize", *argv, *search, "--out", str(out)])
        assert code == 0
        usage = json.loads((out / "result.json").read_text())["usage"]
        assert 0 < usage["lm_calls"] <= 20
        seen = server.stats()
        assert seen["requests"] == usage["backend_calls"] == usage["lm_calls"]  # no cache: every call is sent
        assert seen["prompt_tokens"] == usage["prompt_tokens"]
        assert seen["errors"] == 0

        for model_type in ("chat", "text"):  # /v1/chat/completions and /v1/completions
            server.reset_stats()
            report_path = tmp_path / f"eval_{model_type}.json"
            code = main(["eval", *argv, "--model-type", model_type, "--n", "2", "--json", str(report_path)])
            assert code == 0
            report = json.loads(report_path.read_text())
            assert report["errors"] == 0
            assert report["parse_rate"] == 1.0
            assert server.stats()["requests"] == report["usage"]["lm_calls"] == 6  # 3 stages x 2 examples
            endpoint = "chat/completions" if model_type == "chat" else "completions"
            assert server.stats()["by_endpoint"][endpoint] == 6
    finally:
        server.stop()
