"""Stage attribution: exact and sampled Shapley values, efficiency, intervals and hybrid programs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import dspy
import pytest
from scipy import stats

from stageopt import ConfigurationError
from stageopt.diagnostics import (
    Attribution,
    DiagnosisConfig,
    attribute,
    diagnose,
    hybrid_program,
    mean_ci95_signed,
    shapley_exact,
    shapley_permutations,
)
from stageopt.evaluation import BudgetLedger
from stageopt.lm import SmallLMAdapter
from tests.conftest import ScriptedEngine
from tests.diagnostics.toy import Chain, Game, additive, demo_lm, examples, metric_of

# ---- Shapley values of hand-made games (no LM) --------------------------------------------------------


def test_exact_shapley_of_a_hand_computed_game() -> None:
    # v({})=0, v({a})=1, v({b})=2, v({a,b})=4: phi_a = (1 + 2) / 2, phi_b = (2 + 3) / 2
    values = {frozenset(): [0.0], frozenset("a"): [1.0], frozenset("b"): [2.0], frozenset("ab"): [4.0]}
    phi = shapley_exact(["a", "b"], values)
    assert phi["a"] == pytest.approx([1.5])
    assert phi["b"] == pytest.approx([2.5])


def test_all_orders_reproduce_the_exact_values() -> None:
    stages = ["a", "b", "c"]
    # a game with interactions: v(T) = |T|^2 + 3 [a and c in T]
    values = {
        frozenset(c): [len(c) ** 2 + 3.0 * ({"a", "c"} <= set(c)), float(len(c))]
        for r in range(4)
        for c in itertools.combinations(stages, r)
    }
    exact = shapley_exact(stages, values)
    every_order = shapley_permutations(stages, values, list(itertools.permutations(stages)))
    for stage in stages:
        assert every_order[stage] == pytest.approx(exact[stage])
    assert exact["b"] == pytest.approx([3.0, 1.0])  # symmetric part only: 9 / 3
    assert exact["a"] == pytest.approx([4.5, 1.0])  # 3 + half of the a-c bonus


def test_signed_interval_is_not_clipped() -> None:
    mean, (lo, hi) = mean_ci95_signed([-0.5, -0.3, -0.4])
    assert mean == pytest.approx(-0.4)
    assert lo < mean < hi < 0.0
    assert mean_ci95_signed([0.2]) == (0.2, (0.2, 0.2))
    assert mean_ci95_signed([]) == (0.0, (0.0, 0.0))


def test_attribute_calls_each_coalition_once_and_is_efficient() -> None:
    stages = ["a", "b", "c"]
    seen: list[frozenset[str]] = []

    def score(coalition: frozenset[str]) -> list[float]:
        seen.append(coalition)
        return [0.1 * len(coalition) + 0.05 * ("a" in coalition and "b" in coalition), 0.2 * ("c" in coalition)]

    result = attribute(stages, score)
    assert result.exact
    assert len(seen) == len(set(seen)) == 8
    assert seen[0] == frozenset()
    assert seen[-1] == frozenset(stages)
    total = sum(s.shapley for s in result.stages.values())
    assert total == pytest.approx(result.program_score - result.baseline_score)


# ---- on programs: a scripted LM, hybrids scored through evaluate() --------------------------------------


def _diagnose(k: int, weights: Sequence[Sequence[float]], game: Game, **config: object) -> tuple[Attribution, int]:
    lm = demo_lm()
    engine = lm.engine
    assert isinstance(engine, ScriptedEngine)
    diagnosis = diagnose(
        Chain(k, demos=True),
        examples(weights),
        metric=metric_of(game),
        baseline=Chain(k),
        lm=lm,
        adapter=SmallLMAdapter(),
        config=DiagnosisConfig(**config),  # type: ignore[arg-type]
    )
    assert diagnosis.attribution is not None
    assert diagnosis.usage["lm_calls"] == engine.calls
    return diagnosis.attribution, engine.calls


WEIGHTS = [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.2, 0.3, 0.4], [0.0, 0.1, 0.5]]


def test_exact_additive_program_gets_each_stage_its_weight() -> None:
    result, calls = _diagnose(3, WEIGHTS, additive)
    assert result.exact
    assert result.n_permutations is None
    for i, stage in enumerate(["s0", "s1", "s2"]):
        expected = sum(w[i] for w in WEIGHTS) / len(WEIGHTS)
        assert result.stages[stage].shapley == pytest.approx(expected)
    # program and baseline once each, plus the 6 hybrids in between: 8 evaluations of 4 examples x 3 stages
    assert calls == 8 * len(WEIGHTS) * 3
    assert [h.from_program for h in result.hybrids][:4] == [(), ("s0",), ("s1",), ("s2",)]
    assert result.hybrids[1].score == pytest.approx(sum(w[0] for w in WEIGHTS) / len(WEIGHTS))


def test_exact_values_with_an_interaction_and_a_harmful_stage() -> None:
    # score = 0.5 - 0.3 [s0 good] + 0.4 [s1 good and s2 good]: phi = -0.3, 0.2, 0.2
    def game(w: Sequence[float], good: Sequence[bool]) -> float:
        return w[0] - 0.3 * good[0] + 0.4 * (good[1] and good[2])

    result, _ = _diagnose(3, [[0.5, 0, 0], [0.6, 0, 0], [0.7, 0, 0]], game)
    phi = {name: s.shapley for name, s in result.stages.items()}
    assert phi == pytest.approx({"s0": -0.3, "s1": 0.2, "s2": 0.2})
    lo, hi = result.stages["s0"].ci95
    assert lo == pytest.approx(-0.3)
    assert hi == pytest.approx(-0.3)
    assert sum(phi.values()) == pytest.approx(result.program_score - result.baseline_score)


def test_intervals_reflect_the_spread_over_examples() -> None:
    result, _ = _diagnose(3, WEIGHTS, additive)
    for i, stage in enumerate(["s0", "s1", "s2"]):
        values = [w[i] for w in WEIGHTS]
        s = result.stages[stage]
        half = stats.t.ppf(0.975, len(values) - 1) * _stdev(values) / math.sqrt(len(values))  # Student t
        assert s.ci95 == pytest.approx((s.shapley - half, s.shapley + half))
        assert s.ci95[0] < s.shapley < s.ci95[1]


def _stdev(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_sampled_mode_for_five_stages_is_efficient_capped_and_seeded() -> None:
    weights = [[0.05, 0.1, 0.15, 0.2, 0.25], [0.25, 0.2, 0.15, 0.1, 0.05]]

    def all_or_nothing(w: Sequence[float], good: Sequence[bool]) -> float:
        return float(all(good))

    result, calls = _diagnose(5, weights, all_or_nothing, n_permutations=4, max_hybrids=12, seed=3)
    assert not result.exact
    assert result.n_permutations is not None
    assert 1 <= result.n_permutations <= 4
    assert len(result.hybrids) - 2 <= 12
    assert calls == len(result.hybrids) * len(weights) * 5
    # only the stage switched last in an order gains anything: each order credits one stage with 1
    phi = [s.shapley for s in result.stages.values()]
    assert sum(phi) == pytest.approx(result.program_score - result.baseline_score) == pytest.approx(1.0)
    assert all(p * result.n_permutations == pytest.approx(round(p * result.n_permutations)) for p in phi)
    again, _ = _diagnose(5, weights, all_or_nothing, n_permutations=4, max_hybrids=12, seed=3)
    assert again.hybrids == result.hybrids
    assert again.stages == result.stages


def test_sampled_mode_is_exact_for_an_additive_program() -> None:
    weights = [[0.05, 0.1, 0.15, 0.2, 0.25], [0.25, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.1, 0.1, 0.1]]
    result, _ = _diagnose(5, weights, additive, n_permutations=3)
    assert not result.exact
    for i in range(5):
        assert result.stages[f"s{i}"].shapley == pytest.approx(sum(w[i] for w in weights) / len(weights))


def test_too_few_hybrids_for_one_order_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="max_hybrids` must be at least K - 1 = 4"):
        _diagnose(5, [[0.2] * 5], additive, max_hybrids=3)


# ---- hybrid programs ------------------------------------------------------------------------------------


def test_hybrid_takes_chosen_stages_and_leaves_both_programs_alone() -> None:
    program, baseline = Chain(3, demos=True), Chain(3)
    hybrid = hybrid_program(baseline, program, from_program=["s1"])
    stages = dict(hybrid.named_predictors())
    assert [len(stages[s].demos) for s in ("s0", "s1", "s2")] == [0, 1, 0]
    assert stages["s1"] is not program.s1
    assert stages["s1"].demos[0] is not program.s1.demos[0]
    with dspy.context(lm=demo_lm(), adapter=SmallLMAdapter()):
        assert hybrid(x="q").good == [False, True, False]
    stages["s1"].demos.clear()
    assert len(program.s1.demos) == 1
    assert all(not p.demos for _, p in baseline.named_predictors())


def test_hybrid_refuses_programs_with_different_stages() -> None:
    with pytest.raises(ConfigurationError, match=r"only in the baseline: -; only in the program: s3"):
        hybrid_program(Chain(3), Chain(4, demos=True), from_program=["s0"])
    with pytest.raises(ConfigurationError, match="unknown stages nope"):
        hybrid_program(Chain(2), Chain(2, demos=True), from_program=["nope"])


def test_diagnose_refuses_mismatched_baseline_before_any_call() -> None:
    lm = demo_lm()
    ledger = BudgetLedger()
    with pytest.raises(ConfigurationError, match="same stages"):
        diagnose(
            Chain(3, demos=True),
            examples([[0.1, 0.1, 0.1]]),
            metric=metric_of(additive),
            baseline=Chain(2),
            lm=lm,
            adapter=SmallLMAdapter(),
            ledger=ledger,
        )
    assert ledger.usage().lm_calls == 0
