"""The LiteLLM path for real: dspy.LM("openai/<alias>") against llama_cpp.server on 127.0.0.1."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stageopt.cli._main",
            "serve",
            "--port",
            str(port),
            "--alias",
            "gemma",
            "--n-ctx",
            "4096",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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
