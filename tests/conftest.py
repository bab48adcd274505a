"""Shared fixtures: isolated DSPy settings and cache, a scripted LM and a toy two-stage task."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True)
def _isolated_dspy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fresh DSPy settings per test and a private on-disk cache for the session."""
    cache_dir = tmp_path_factory.getbasetemp() / "dspy_cache"
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(cache_dir))
    with dspy.context(lm=None, adapter=None, trace=[]):
        yield


class ScriptedEngine:
    """An lm15 engine answering with ``fn(prompt_text)``; counts the calls that reach it."""

    def __init__(self, fn: Callable[[str], str]) -> None:
        self.fn = fn
        self.calls = 0

    def complete(self, request: Any) -> Response:
        text = "\n\n".join(m.text or "" for m in request.messages)
        self.calls += 1
        out = self.fn(text)
        return Response(
            id=None,
            model="scripted",
            message=Message.assistant([TextPart(out)]),
            finish_reason="stop",
            usage=Usage(input_tokens=len(text.split()), output_tokens=max(1, len(out.split()))),
        )

    def stream(self, request: Any) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def close(self) -> None:
        pass


def scripted_lm(fn: Callable[[str], str], *, cache: bool = False) -> dspy.LM:
    """A real ``dspy.LM`` whose engine is :class:`ScriptedEngine`."""
    return dspy.LM("scripted/test", engine=ScriptedEngine(fn), cache=cache)


# ---- a toy two-stage program: city -> country -> capital --------------------------------------

CITIES = [
    ("Lyon", "France", "Paris"),
    ("Munich", "Germany", "Berlin"),
    ("Osaka", "Japan", "Tokyo"),
    ("Milan", "Italy", "Rome"),
    ("Seville", "Spain", "Madrid"),
    ("Porto", "Portugal", "Lisbon"),
    ("Krakow", "Poland", "Warsaw"),
    ("Toronto", "Canada", "Ottawa"),
    ("Sydney", "Australia", "Canberra"),
    ("Zurich", "Switzerland", "Bern"),
    ("Glasgow", "United Kingdom", "London"),
    ("Chicago", "United States", "Washington"),
]


class CityToCountry(dspy.Signature):
    """Name the country this city is in."""

    city: str = dspy.InputField()
    country: str = dspy.OutputField()


class CountryToCapital(dspy.Signature):
    """Give the capital city of the country."""

    country: str = dspy.InputField()
    capital: str = dspy.OutputField()


class CapitalOfCity(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.locate = dspy.Predict(CityToCountry)
        self.capital = dspy.Predict(CountryToCapital)

    def forward(self, city: str) -> dspy.Prediction:
        country = self.locate(city=city).country
        return dspy.Prediction(country=country, capital=self.capital(country=country).capital)


def city_examples() -> list[dspy.Example]:
    return [dspy.Example(city=a, country=b, capital=c).with_inputs("city") for a, b, c in CITIES]


def capital_metric(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    return float(example.capital.lower() == (prediction.capital or "").strip().lower())


def country_metric(example: dspy.Example, prediction: dspy.Prediction) -> float:
    return float(example.country.lower() == (prediction.country or "").strip().lower())


def demo_sensitive_answer(prompt: str) -> str:
    """A tiny-model stand-in: stage 1 is right only with a demo; stage 2 is right given a real country."""
    blocks = prompt.split("\n\n---\n\n")
    query = blocks[-1]
    has_demo = len(blocks) >= 3
    countries = {a: b for a, b, _ in CITIES}
    capitals = {b: c for _, b, c in CITIES}
    if query.startswith("City:"):
        city = query.split("\n")[0].removeprefix("City:").strip()
        return f" {countries.get(city, 'Atlantis')}" if has_demo else " somewhere"
    country = query.split("\n")[0].removeprefix("Country:").strip()
    return f" {capitals.get(country, 'nowhere')}"


@pytest.fixture
def toy_lm() -> dspy.LM:
    return scripted_lm(demo_sensitive_answer)


@pytest.fixture
def data_root() -> Path:
    """The shared datasets, found as the package finds them ($STAGEOPT_DATA_DIR, else ../shared/data)."""
    from stageopt.tasks import data_dir

    return data_dir()
