"""TrainingSchedule: SoftPrompt's training settings as one validated, JSON-ready value (no torch needed)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from stageopt import ConfigurationError, StageoptError
from stageopt.strategies import TrainingSchedule


def test_the_defaults_are_softprompts_historical_settings() -> None:
    assert TrainingSchedule().to_dict() == {
        "optimizer": "adamw",
        "lr": None,
        "weight_decay": 0.0,
        "warmup_ratio": 0.1,
        "epochs": 3,
        "batch_size": 4,
        "grad_clip": 1.0,
        "patience": 2,
        "min_delta": 0.0,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "adam"),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", "fast"),
        ("weight_decay", -0.1),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.1),
        ("epochs", 0),
        ("epochs", 2.5),
        ("epochs", True),
        ("batch_size", 0),
        ("batch_size", "4"),
        ("grad_clip", 0.0),
        ("grad_clip", float("nan")),
        ("patience", 0),
        ("patience", "2"),
        ("min_delta", -0.01),
        ("min_delta", None),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_the_value(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=f"`?{field}`? ") as caught:
        TrainingSchedule(**{field: value})
    assert f"{field}={value!r}" in str(caught.value)
    assert isinstance(caught.value, StageoptError)


def test_optional_fields_accept_none() -> None:
    plan = TrainingSchedule(lr=None, grad_clip=None, patience=None)
    assert (plan.lr, plan.grad_clip, plan.patience) == (None, None, None)


def test_numbers_are_stored_as_floats_and_the_schedule_is_frozen() -> None:
    plan = TrainingSchedule(lr=1, weight_decay=0, warmup_ratio=0, grad_clip=2, min_delta=0)
    assert [type(v) for v in (plan.lr, plan.weight_decay, plan.warmup_ratio, plan.grad_clip, plan.min_delta)] == [
        float
    ] * 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.epochs = 9  # type: ignore[misc]


def test_from_dict_round_trips_through_json() -> None:
    plan = TrainingSchedule(
        optimizer="sgd",
        lr=0.02,
        weight_decay=0.01,
        warmup_ratio=0.0,
        epochs=7,
        batch_size=1,
        grad_clip=None,
        patience=None,
        min_delta=0.005,
    )
    again = TrainingSchedule.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert TrainingSchedule.from_dict(TrainingSchedule().to_dict()) == TrainingSchedule()


def test_from_dict_fills_missing_fields_with_defaults() -> None:
    assert TrainingSchedule.from_dict({"epochs": 5, "lr": 0.01}) == TrainingSchedule(epochs=5, lr=0.01)
    assert TrainingSchedule.from_dict({}) == TrainingSchedule()


def test_from_dict_refuses_unknown_keys_and_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="unknown training schedule setting") as caught:
        TrainingSchedule.from_dict({"epochs": 2, "learning_rate": 0.1, "n_epochs": 3})
    message = str(caught.value)
    assert "learning_rate, n_epochs" in message
    assert all(f.name in message for f in dataclasses.fields(TrainingSchedule))
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        TrainingSchedule.from_dict([("epochs", 2)])  # type: ignore[arg-type]


def test_with_default_lr_fills_only_a_missing_rate() -> None:
    assert TrainingSchedule().with_default_lr(0.03).lr == 0.03
    assert TrainingSchedule(lr=0.5).with_default_lr(0.03).lr == 0.5
    assert TrainingSchedule(epochs=9).with_default_lr(0.03).epochs == 9
