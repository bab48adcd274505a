"""Integration fixtures: the real embedded model, loaded once per session."""

from __future__ import annotations

import pytest

from stageopt.lm import LocalLM


@pytest.fixture(scope="session")
def gemma() -> LocalLM:
    return LocalLM("gemma3-270m", cache=False)
