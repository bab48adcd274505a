"""The LiteLLM path for real: dspy.LM("openai/<alias>") against llama_cpp.server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import dspy
import pytest

from stageopt.lm import SmallLMAdapter, resolve_lm
from stageopt.strategies import CoordinateDescent
from tests.conftest import CapitalOfCity, capital_metric, city_examples, country_metric

pytestmark = [pytest.mark.integration, pytest.mark.server]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _serving(model: str, alias: str) -> Iterator[str]:
    """``stageopt serve --lm model`` on a free port of 127.0.0.1; yields the API base."""
    port = _free_port()
    command = [sys.executable, "-m", "stageopt.cli._main", "serve", "--lm", model, "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--alias", alias, "--n-ctx", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with _serving("gemma3-270m", "gemma") as base:
        yield base


def test_qwen_is_served_with_its_own_chat_template() -> None:
    with _serving("qwen2.5-coder-0.5b", "qwen") as base:
        with urllib.request.urlopen(f"{base}/models", timeout=5) as response:
            listed = json.loads(response.read())
        assert [m["id"] for m in listed["data"]] == ["qwen"]
        lm = resolve_lm("openai/qwen", api_base=base, cache=False, max_tokens=16)
        with dspy.context(lm=lm, adapter=SmallLMAdapter()):
            prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
    assert "paris" in prediction.answer.lower()


def test_optimize_through_openai_compatible_server(server: str) -> None:
    lm = resolve_lm("openai/gemma", api_base=server, cache=False)
    optimizer = CoordinateDescent(
        capital_metric,
        budget=60,
        lm=lm,
        adapter=SmallLMAdapter(),
        stage_metrics={"locate": country_metric},
        bootstrap_size=4,
        val_size=4,
        confirm_size=0,
        max_rounds=1,
        trials_per_stage=2,
    )
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert 0 < result.usage["lm_calls"] <= 60
    assert result.usage["backend_calls"] == result.usage["lm_calls"]
    assert result.best["score"] >= result.baseline["score"]
    assert len(result.history) >= 2
    with dspy.context(lm=lm, adapter=SmallLMAdapter()):
        prediction = program(city="Lyon")
    assert isinstance(prediction.capital, str)
    sent = lm.history[-1]["kwargs"]
    assert "stop" in sent
