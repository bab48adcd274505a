"""Budget by stage criticality (``allocate="blame"``): arithmetic, probe phase, strategies, CLI, testbed."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageopt import ConfigurationError
from stageopt.cli import _commands
from stageopt.cli._main import main
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import BlameAllocation, CoordinateDescent, HierarchicalBayesian
from stageopt.strategies._allocation import PROBE_PHASE, resolve_allocation, room_shares, split_by_share
from stageopt.testbed import QualityWeights
from stageopt.testbed._bench import ShapedWorld, make_testbed
from tests.conftest import (
    CapitalOfCity,
    capital_metric,
    city_examples,
    country_metric,
    demo_sensitive_answer,
    scripted_lm,
)
from tests.tasks.test_hotpotqa import ROW, _script, _write

# ---- arithmetic -------------------------------------------------------------------------------


def test_shares_have_a_floor_and_sum_to_one() -> None:
    shares = room_shares({"a": 0.6, "b": 0.2, "c": 0.0}, min_share=0.1)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["c"] == pytest.approx(0.1)  # no room, still the floor
    assert shares["a"] == pytest.approx(0.1 + 0.7 * 0.75)
    assert shares["a"] > shares["b"] > shares["c"]


@pytest.mark.parametrize(
    ("rooms", "min_share"),
    [({"a": 0.0, "b": 0.0, "c": 0.0}, 0.1), ({"a": -0.2, "b": 0.0}, 0.1), ({"a": 0.5, "b": 0.1}, 0.5)],
)
def test_no_measured_room_or_a_full_floor_gives_equal_shares(rooms: dict[str, float], min_share: float) -> None:
    assert room_shares(rooms, min_share=min_share) == dict.fromkeys(rooms, 1 / len(rooms))


def test_split_sums_to_the_total_and_follows_the_shares() -> None:
    assert split_by_share(12, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 6, "b": 3, "c": 3}
    # largest remainders: 10 * (0.45, 0.45, 0.1) = 4.5, 4.5, 1 -> ties go in program order
    assert split_by_share(10, {"a": 0.45, "b": 0.45, "c": 0.1}) == {"a": 5, "b": 4, "c": 1}
    # a minimum for every stage first, when the total pays for it
    assert split_by_share(6, {"a": 1.0, "b": 0.0, "c": 0.0}, minimum=1) == {"a": 4, "b": 1, "c": 1}
    assert split_by_share(2, {"a": 1.0, "b": 0.0, "c": 0.0}, minimum=1) == {"a": 2, "b": 0, "c": 0}
    # all shares zero: equal
    assert split_by_share(6, {"a": 0.0, "b": 0.0, "c": 0.0}) == {"a": 2, "b": 2, "c": 2}
    assert split_by_share(0, {"a": 1.0}) == {"a": 0}
    with pytest.raises(ConfigurationError, match="total"):
        split_by_share(-1, {"a": 1.0})


def test_split_respects_caps_and_passes_the_surplus_on() -> None:
    out = split_by_share(12, {"a": 0.8, "b": 0.1, "c": 0.1}, caps={"a": 4, "b": 10, "c": 2})
    assert out == {"a": 4, "b": 6, "c": 2}
    # the caps cannot take the total: every stage at its cap
    assert split_by_share(20, {"a": 1, "b": 1}, caps={"a": 3, "b": 0}) == {"a": 3, "b": 0}


def test_split_invariants_on_random_cases() -> None:
    rng = random.Random(7)
    for _ in range(300):
        names = [f"s{i}" for i in range(rng.randint(1, 5))]
        shares = {s: rng.choice([0.0, rng.random()]) for s in names}
        caps = {s: rng.randint(0, 8) for s in names}
        total, minimum = rng.randint(0, 30), rng.randint(0, 2)
        out = split_by_share(total, shares, caps=caps, minimum=minimum)
        assert sum(out.values()) == min(total, sum(caps.values()))
        assert all(0 <= out[s] <= caps[s] for s in names)
        if total >= sum(min(minimum, caps[s]) for s in names):
            assert all(out[s] >= min(minimum, caps[s]) for s in names)


def test_allocate_names_settings_and_errors() -> None:
    assert resolve_allocation("equal") is None
    assert resolve_allocation("blame") == BlameAllocation()
    assert resolve_allocation({"probe_size": 3}) == BlameAllocation(probe_size=3)
    policy = BlameAllocation(min_share=0.2)
    assert resolve_allocation(policy) is policy
    with pytest.raises(ConfigurationError, match="equal, blame"):
        resolve_allocation("criticality")
    with pytest.raises(ConfigurationError, match="known: min_share, probe_size"):
        resolve_allocation({"probes": 3})
    with pytest.raises(ConfigurationError, match="probe_size"):
        BlameAllocation(probe_size=0)
    with pytest.raises(ConfigurationError, match="min_share"):
        BlameAllocation(min_share=1.5)
    with pytest.raises(ConfigurationError, match="equal, blame"):
        CoordinateDescent(capital_metric, budget=10, allocate="nope")


# ---- the probe phase in the strategies ----------------------------------------------------------


def _settings(**kwargs: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "budget": 300,
        "lm": scripted_lm(demo_sensitive_answer),
        "adapter": SmallLMAdapter(),
        "stage_metrics": {"locate": country_metric},
        "bootstrap_size": 6,
        "val_size": 6,
        "seed": 0,
    }
    settings.update(kwargs)
    return settings


def _coordinate(**kwargs: Any) -> CoordinateDescent:
    return CoordinateDescent(capital_metric, **_settings(max_rounds=2, trials_per_stage=3, **kwargs))


def test_probe_trials_are_in_the_history_and_paid_from_the_budget() -> None:
    lm = scripted_lm(demo_sensitive_answer)
    optimizer = _coordinate(lm=lm, allocate={"probe_size": 2, "probe_trials_per_stage": 2})
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    probes = [h for h in result.history if h["phase"] == PROBE_PHASE]
    assert len(probes) == 1 + 2 * 2  # the original, then two per stage
    assert [p["stage"] for p in probes] == [None, "locate", "locate", "capital", "capital"]
    assert all(p["fidelity"] == 2 for p in probes)
    assert [h["phase"] for h in result.history[: len(probes) + 1]] == ["baseline", *[PROBE_PHASE] * len(probes)]
    # each probe changes only its stage
    default = probes[0]["params"]
    for probe in probes[1:]:
        changed = [s for s in default if probe["params"][s] != default[s]]
        assert changed == [probe["stage"]]
    # probes spend calls (two examples, two stages each), counted in the budget
    calls = [h["lm_calls"] for h in result.history]
    assert calls == sorted(calls)
    assert probes[-1]["lm_calls"] > result.history[0]["lm_calls"]
    assert result.usage["lm_calls"] <= 300
    assert lm.engine.calls <= 300
    # a subset score never becomes the best
    assert result.best["trial"] not in {p["trial"] for p in probes}
    allocation = result.notes["allocation"]
    assert allocation["rule"] == "blame"
    assert allocation["probe"]["trials"] == len(probes)
    assert sum(allocation["probe"]["shares"].values()) == pytest.approx(1.0)
    # the toy LM needs demos at `locate` only: the probe finds room there and nowhere else
    assert allocation["probe"]["rooms"]["capital"] == 0.0
    assert allocation["probe"]["rooms"]["locate"] > 0.0
    targets = allocation["targets"]
    assert targets["locate"] > targets["capital"] >= 1
    assert sum(targets.values()) == 6  # the two stages' 3 + 3 trials per round, re-split
    round_one = [h for h in result.history if h["phase"] == "coordinate" and h["round"] == 1 and not h["repeated"]]
    assert round_one[0]["stage"] == "locate"  # the most critical stage goes first
    assert sum(1 for h in round_one if h["stage"] == "locate") == targets["locate"]


def test_equal_allocation_is_the_default_and_blame_is_deterministic() -> None:
    def history(**kwargs: Any) -> list[tuple[Any, ...]]:
        optimizer = _coordinate(budget=150, **kwargs)
        optimizer.compile(CapitalOfCity(), trainset=city_examples())
        assert optimizer.result is not None
        return [(h["phase"], h["stage"], h["params"], h["score"], h["lm_calls"]) for h in optimizer.result.history]

    default = history()
    assert default == history(allocate="equal")
    assert PROBE_PHASE not in {h[0] for h in default}
    blame = history(allocate="blame")
    assert blame == history(allocate="blame")
    assert PROBE_PHASE in {h[0] for h in blame}


def test_resume_does_not_probe_again(tmp_path: Path) -> None:
    first = _coordinate(budget=120, run_dir=tmp_path, allocate="blame")
    first.compile(CapitalOfCity(), trainset=city_examples())
    assert first.result is not None
    probes = [h["trial"] for h in first.result.history if h["phase"] == PROBE_PHASE]
    assert probes
    second = _coordinate(budget=300, run_dir=tmp_path, allocate="blame")
    second.compile(CapitalOfCity(), trainset=city_examples())
    assert second.result is not None
    assert [h["trial"] for h in second.result.history if h["phase"] == PROBE_PHASE] == probes
    assert second.result.notes["allocation"]["probe"] == first.result.notes["allocation"]["probe"]


def test_hierarchical_splits_phase_one_by_share() -> None:
    optimizer = HierarchicalBayesian(
        capital_metric, **_settings(budget=300, trials_per_stage=3, allocate={"probe_size": 3})
    )
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert [h["phase"] for h in result.history[:2]] == ["baseline", PROBE_PHASE]
    targets = result.notes["allocation"]["targets"]
    assert targets["locate"] > targets["capital"] >= 1
    for stage, target in targets.items():
        counted = [
            h for h in result.history if h["phase"] == "independent" and h["stage"] == stage and not h["repeated"]
        ]
        assert len(counted) <= target
    assert result.usage["lm_calls"] <= 300


# ---- the testbed: a bottleneck stage gets more trials --------------------------------------------


def test_shaped_world_makes_a_bottleneck_stage() -> None:
    plain = make_testbed(3, seed=0)
    shaped = make_testbed(3, seed=0, stage_offsets=[1.5, 1.5, -2.0])
    assert isinstance(shaped.world, ShapedWorld)
    assert not isinstance(plain.world, ShapedWorld)
    probs = [shaped.world.probability(i, shaped.world.original_instruction(i), ()) for i in range(3)]
    assert probs[2] < 0.5 < probs[0]
    assert shaped.optimum().score <= 1.0
    with pytest.raises(ConfigurationError, match="one offset per stage"):
        make_testbed(3, seed=0, stage_offsets=[1.0])
    with pytest.raises(ConfigurationError, match="instruction weight"):
        make_testbed(3, seed=0, weights=QualityWeights(instruction=0.0), stage_offsets=[0.0, 0.0, 0.0])


def _stage_trials(allocate: str, seed: int) -> dict[str, int]:
    testbed = make_testbed(3, seed=seed, stage_offsets=[1.5, 1.5, -2.0])
    optimizer = CoordinateDescent(
        testbed.metric,
        budget=1200,
        lm=testbed.lm(),
        adapter=SmallLMAdapter(),
        seed=seed,
        allocate=allocate,
    )
    optimizer.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
    assert optimizer.result is not None
    counts = dict.fromkeys(testbed.program().stage_names, 0)
    for h in optimizer.result.history:
        if h["phase"] == "coordinate" and not h["repeated"]:
            counts[h["stage"]] += 1
    return counts


def test_blame_gives_the_bottleneck_stage_more_trials_on_the_testbed() -> None:
    equal = [_stage_trials("equal", seed) for seed in range(3)]
    blame = [_stage_trials("blame", seed) for seed in range(3)]
    bottleneck = "find_verdict"  # the last stage: equal allocation visits it last in each round
    assert sum(b[bottleneck] for b in blame) > sum(e[bottleneck] for e in equal)
    share = [b[bottleneck] / sum(b.values()) for b in blame]
    assert sum(s > 1 / 3 for s in share) >= 2, share


# ---- the CLI ------------------------------------------------------------------------------------


def _rows(n: int) -> list[dict[str, Any]]:
    return [{**ROW, "id": f"x{i}"} for i in range(n)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = _write(tmp_path / "data", _rows(6), "dev")
    _write(root, _rows(8), "train")
    return root


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_resolve(spec: str, **kwargs: Any) -> dspy.LM:
        return scripted_lm(_script)

    monkeypatch.setattr(_commands, "resolve_lm", fake_resolve)


@pytest.mark.parametrize(
    ("strategy", "flags"),
    [
        ("coordinate", ["--allocate", "blame"]),
        ("hierarchical", ["--option", "allocate=blame"]),
        ("coordinate", ["--option", 'allocate={"probe_size": 2, "probe_trials_per_stage": 1}']),
    ],
)
def test_cli_blame_allocation(data: Path, scripted: None, tmp_path: Path, strategy: str, flags: list[str]) -> None:
    out = tmp_path / "run"
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "150", "--out", str(out), "--val-size", "4"]
    assert main([*argv, "--bootstrap-size", "3", "--strategy", strategy, *flags]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["usage"]["lm_calls"] <= 150
    assert PROBE_PHASE in {h["phase"] for h in result["history"]}
    allocation = result["notes"]["allocation"]
    assert allocation["rule"] == "blame"
    assert set(allocation["targets"]) == {"query1", "query2", "answer"}
    assert "stopping" in result["notes"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "joint", "--allocate", "blame"], "'allocate' is not a setting of strategy 'joint'"),
        (["--allocate", "blame", "--option", "allocate=equal"], "not both"),
        (["--option", "allocate=nope"], "`allocate` must be one of equal, blame"),
    ],
)
def test_cli_allocate_errors(
    data: Path, scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "60", "--out", str(tmp_path / "r"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_budget_that_ends_in_the_probe_phase_says_so() -> None:
    optimizer = _coordinate(budget=60, allocate={"probe_size": 3, "probe_trials_per_stage": 3})
    optimizer.compile(CapitalOfCity(), trainset=city_examples())
    result = optimizer.result
    assert result is not None
    assert result.status == "budget_exhausted"
    assert result.history[-1]["phase"] == PROBE_PHASE
    assert result.notes["allocation"]["probe"] is None
    assert result.notes["allocation"]["targets"] is None
    assert result.usage["lm_calls"] <= 60
