"""The hidden world: exact optimum, determinism, interaction and error propagation (SIMULATION)."""

from __future__ import annotations

import itertools
import math
import random

import dspy
import pytest

from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.testbed import DECOY_BASE, QualityWeights, StageChoice, Testbed, World, format_value, parse_value


def _all_demo_sets(world: World, stage: int) -> list[tuple[dict[str, str], ...]]:
    ids = world.train_ids
    return [
        tuple(world.gold_demo(stage, e) for e in subset)
        for n in range(len(ids) + 1)
        for subset in itertools.combinations(ids, n)
    ]


def test_optimum_equals_brute_force_on_a_tiny_world() -> None:
    world = World(2, seed=3, train_ids=range(4), pool_size=3)
    options = [
        [StageChoice(text, demos) for text in world.universe(s) for demos in _all_demo_sets(world, s)] for s in range(2)
    ]
    scores = [world.score(list(chain)) for chain in itertools.product(*options)]
    optimum = world.optimum()
    assert optimum.score == pytest.approx(max(scores), abs=1e-12)
    chain = [
        StageChoice(text, tuple(world.gold_demo(s, e) for e in ids))
        for s, (text, ids) in enumerate(zip(optimum.instructions, optimum.demo_examples, strict=True))
    ]
    assert world.score(chain) == pytest.approx(optimum.score, abs=1e-12)


def test_nothing_outside_the_universe_beats_the_optimum() -> None:
    world = World(3, seed=5, train_ids=range(6))
    best = world.optimum().score
    rng = random.Random(0)
    for _ in range(500):
        chain = []
        for stage in range(3):
            text = rng.choice([*world.universe(stage), f"Some unseen instruction number {rng.random()}."])
            demos = [world.gold_demo(stage, rng.randrange(6)) for _ in range(rng.randrange(5))]
            if rng.random() < 0.3:  # inconsistent, decoy and validation-example demos
                source, target = world.fields[stage], world.fields[stage + 1]
                demos.append({source: format_value(source, 1), target: format_value(target, 2)})
                demos.append({source: format_value(source, 600), target: format_value(target, 600)})
                demos.append({source: format_value(source, 40), target: format_value(target, 40)})
            chain.append(StageChoice(text, tuple(demos)))
        assert world.score(chain) <= best + 1e-12


def test_unseen_text_is_a_worse_alias_of_a_pool_instruction() -> None:
    world = World(seed=1)
    profile = world.profile(0, "An instruction nobody declared.")
    assert not profile.known
    pool = [world.profile(0, t) for t in world.pool(0)]
    weights = QualityWeights()
    assert any(
        p.style == profile.style and math.isclose(p.quality - weights.unseen_penalty, profile.quality) for p in pool
    )
    assert world.profile(0, world.pool(0)[0] + "  ").known  # whitespace and case do not matter


def test_draws_are_deterministic_per_example_and_configuration() -> None:
    a, b = World(seed=7), World(seed=7)
    text = a.pool(1)[0]
    demos = [a.gold_demo(1, 2), a.gold_demo(1, 5)]
    draws = [a.draw(1, e, text, demos, 1) for e in range(200)]
    assert draws == [b.draw(1, e, text, demos, 1) for e in range(200)]
    assert draws == [a.draw(1, e, text, list(reversed(demos)), 1) for e in range(200)]  # order-free
    assert 0 < sum(draws) < 200
    other = [a.draw(1, e, a.pool(1)[1], demos, 1) for e in range(200)]
    assert other != draws


def test_program_runs_are_deterministic() -> None:
    testbed = Testbed(seed=2)
    lm = testbed.lm()
    first = evaluate(testbed.program(), testbed.valset, testbed.metric, lm=lm, adapter=SmallLMAdapter())
    second = evaluate(testbed.program(), testbed.valset, testbed.metric, lm=lm, adapter=SmallLMAdapter())
    assert [e.prediction for e in first.examples] == [e.prediction for e in second.examples]


def _best_second_instructions(world: World) -> set[str]:
    best = set()
    last = StageChoice(world.original_instruction(2))
    for first in world.universe(0):
        scores = {second: world.score([StageChoice(first), StageChoice(second), last]) for second in world.universe(1)}
        best.add(max(scores, key=lambda t: scores[t]))
    return best


def test_stage_two_best_instruction_depends_on_stage_one_choice() -> None:
    assert len(_best_second_instructions(Testbed(seed=1).world)) > 1
    # not a rare accident of one world: most worlds have it
    assert sum(len(_best_second_instructions(World(seed=s))) > 1 for s in range(20)) >= 10


def test_a_wrong_stage_one_answer_makes_the_final_answer_wrong() -> None:
    testbed = Testbed(seed=4, n_val=60)
    with dspy.context(lm=testbed.lm(), adapter=SmallLMAdapter()):
        program = testbed.program()
        outcomes = [(program(query=ex.query), ex) for ex in testbed.valset]
    wrong_first = [(p, ex) for p, ex in outcomes if p.clue != ex.clue]
    assert wrong_first, "the unoptimized stage 1 should fail sometimes"
    assert all(testbed.metric(ex, p) == 0.0 for p, ex in wrong_first)
    assert all(parse_value(p.clue)[1] >= DECOY_BASE for p, _ in wrong_first)  # type: ignore[index]
    # and a worse stage 1 lowers the exact score of the whole program
    world = testbed.world
    rest = [StageChoice(world.original_instruction(s)) for s in (1, 2)]
    by_quality = sorted(world.universe(0), key=lambda t: world.probability(0, t, []))
    assert world.score([StageChoice(by_quality[0]), *rest]) < world.score([StageChoice(by_quality[-1]), *rest])


@pytest.mark.parametrize("adapter", [SmallLMAdapter(), dspy.ChatAdapter()], ids=["small", "chat"])
def test_true_score_matches_the_simulated_lm(adapter: dspy.Adapter) -> None:
    testbed = Testbed(seed=1, n_val=400)
    world = testbed.world
    optimum = testbed.optimum()
    program = testbed.program()
    for stage, (_, predictor) in enumerate(program.named_predictors()):
        predictor.signature = predictor.signature.with_instructions(world.pool(stage)[stage])
        predictor.demos = [dspy.Example(**world.gold_demo(stage, e)) for e in optimum.demo_examples[stage][:2]]
    expected = testbed.true_score(program)
    report = evaluate(program, testbed.valset, testbed.metric, lm=testbed.lm(), adapter=adapter)
    sd = math.sqrt(expected * (1 - expected) / report.n)
    assert abs(report.score - expected) < 4 * sd + 1e-9
    assert report.parse_rate == 1.0
