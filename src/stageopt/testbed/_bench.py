"""Running optimizers on the testbed and measuring regret and LM calls to near-optimum (SIMULATION).

For each strategy and seed the world is drawn from the seed (a new hidden landscape per seed) and
the optimizer is seeded with it. Measures:

* ``regret`` = optimum over the universe - true (exact expected) score of the returned program;
  >= 0 by construction.
* ``calls_to_95``: logical LM calls spent when a configuration whose *true* score is at least
  ``threshold`` x optimum was first evaluated in full. stageopt strategies: from the result
  history (cumulative calls after that trial). DSPy optimizers: observed from the testbed LM's
  stage calls (:meth:`CallObserver.calls_to_reach`: the end of the first block of program
  executions with such a configuration). The observed count is computed for stageopt runs too
  (``calls_to_95_observed``), as a check of the method.
* ``pool_regret``: optimum over the run's own candidates - true score, the part of the regret due
  to the search rather than to the proposals. stageopt: its search space's pools (every
  combination); MIPROv2: its instruction and demo-set candidates (every combination); BFSRS: its
  candidate programs (it picks one, it does not combine them).
* ``calls_to_95_pool``: as ``calls_to_95`` but against ``threshold`` x the run's own pool
  optimum: how fast a search gets near the best it *could* reach with its candidates (the
  universe optimum is often out of every run's reach, since proposals sample the universe).
* ``regret_decay`` (stageopt strategies): ``regret(c) = a * c ** (-b)`` fitted by
  :func:`~stageopt.diagnostics.fit_regret_decay` to the *incumbent's* true regret after each
  trial (the incumbent is the best full-fidelity trial by validation score so far, from
  :func:`~stageopt.diagnostics.best_so_far`), against the run's cumulative LM calls; ``b`` is
  the empirical convergence rate.
* ``calls_to_gap`` (stageopt strategies): for each fraction ``f`` of ``gap_fractions``, the LM
  calls spent when the incumbent's true score first reached ``baseline + f * (optimum -
  baseline)`` (None: never). Unlike ``calls_to_95`` it only credits what the run would return
  at that point, so subset evaluations (probes, multi-fidelity rungs) never count.

``stage_offsets`` shapes the world: each stage's logit gets its offset added (through every
instruction's quality, see :class:`ShapedWorld`), e.g. ``(-2, 1.5, 1.5)`` makes the first
stage the bottleneck (low baseline probability, most room) and the others nearly saturated.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError
from stageopt.compare._dspy import Quiet, bfsrs_num_candidates, budgeted_bfsrs, budgeted_mipro, caused_by_budget
from stageopt.compare._methods import resolve_names
from stageopt.diagnostics._convergence import best_so_far, fit_regret_decay
from stageopt.evaluation import Budget, BudgetLedger, MeteredLM
from stageopt.lm._adapter import SmallLMAdapter
from stageopt.strategies import STRATEGIES, SearchSpace
from stageopt.testbed._lm import CallObserver
from stageopt.testbed._testbed import Testbed
from stageopt.testbed._world import InstructionProfile, QualityWeights, StageChoice, World

logger = logging.getLogger(__name__)

#: DSPy's optimizers the bench can run for comparison, by bench name.
DSPY_OPTIMIZERS = ("miprov2", "bfsrs")

#: Said wherever testbed results are shown.
SIMULATION_NOTE = (
    "SIMULATION: the testbed LM is a script answering from a hidden quality function; these numbers "
    "measure search efficiency (regret against a known optimum, LM calls to get near it), not "
    "language-model quality."
)


def known_strategies() -> list[str]:
    """Every name the bench accepts: stageopt's strategies, then DSPy's optimizers."""
    return [*STRATEGIES, *DSPY_OPTIMIZERS]


def resolve_strategies(spec: str) -> list[str]:
    """``all`` or a comma-separated list of names, checked against :func:`known_strategies`."""
    return resolve_names(spec, known_strategies(), kind="strategy")


#: Fractions of the baseline-to-optimum gap that ``calls_to_gap`` waits for, by default.
GAP_FRACTIONS = (0.5, 0.8)


class ShapedWorld(World):
    """A testbed world whose stages differ in difficulty: stage ``i``'s logit gets ``offsets[i]``.

    The offset is added to the quality of every instruction of the stage (divided by the
    instruction weight), so it moves the stage's baseline and best probabilities together: a
    negative offset makes a low, improvable stage (a bottleneck), a positive one a nearly
    saturated stage with little room.

    Args:
        n_stages: Number of stages.
        offsets: One logit offset per stage.
        **kwargs: Arguments of :class:`World`.
    """

    def __init__(self, n_stages: int = 3, *, offsets: Sequence[float], **kwargs: Any) -> None:
        super().__init__(n_stages, **kwargs)
        if len(offsets) != n_stages:
            raise ConfigurationError(f"`stage_offsets` needs one offset per stage ({n_stages}), got {list(offsets)}")
        if self.weights.instruction <= 0:
            raise ConfigurationError("`stage_offsets` needs a positive instruction weight")
        self.offsets = tuple(float(o) for o in offsets)

    def profile(self, stage: int, text: str | None) -> InstructionProfile:
        """The hidden attributes of :class:`World`, the quality moved by the stage's offset."""
        base = super().profile(stage, text)
        return dataclasses.replace(base, quality=base.quality + self.offsets[stage] / self.weights.instruction)


def make_testbed(
    n_stages: int = 3,
    *,
    seed: int,
    weights: QualityWeights | None = None,
    pool_size: int = 6,
    stage_offsets: Sequence[float] | None = None,
    n_val: int = 20,
) -> Testbed:
    """A :class:`Testbed`, on a :class:`ShapedWorld` when ``stage_offsets`` is given."""
    testbed = Testbed(n_stages, seed=seed, weights=weights, pool_size=pool_size, n_val=n_val)
    if stage_offsets is not None:
        testbed.world = ShapedWorld(
            n_stages,
            offsets=stage_offsets,
            seed=seed,
            train_ids=testbed.world.train_ids,
            pool_size=pool_size,
            weights=weights,
        )
    return testbed


@dataclass
class BenchRun:
    """One strategy run on one seed's world."""

    strategy: str
    seed: int
    status: str
    optimum: float
    baseline: float
    true_score: float | None = None
    regret: float | None = None
    calls_to_95: int | None = None
    calls_to_95_source: str | None = None
    calls_to_95_observed: int | None = None
    pool_optimum: float | None = None
    pool_regret: float | None = None
    calls_to_95_pool: int | None = None
    val_score: float | None = None
    lm_calls: int = 0
    wall_s: float = 0.0
    error: str | None = None
    note: str | None = None
    regret_decay: dict[str, Any] | None = None
    calls_to_gap: dict[str, int | None] = field(default_factory=dict)
    stage_offsets: list[float] | None = None
    allocation: dict[str, Any] | None = None
    n_trials: int | None = None
    pruned_trials: int | None = None
    example_evaluations_saved: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready run."""
        return asdict(self)


def run_one(
    strategy: str,
    *,
    budget_calls: int,
    seed: int,
    n_stages: int = 3,
    threshold: float = 0.95,
    weights: QualityWeights | None = None,
    pool_size: int = 6,
    options: Mapping[str, Any] | None = None,
    stage_offsets: Sequence[float] | None = None,
    gap_fractions: Sequence[float] = GAP_FRACTIONS,
    n_val: int = 20,
) -> BenchRun:
    """Run ``strategy`` on the world of ``seed``; a failing strategy becomes an ``error`` run.

    Args:
        strategy: A name of :func:`known_strategies`.
        budget_calls: Logical LM calls the run may spend.
        seed: Seed of the world and of the optimizer.
        n_stages: Stages of the testbed program.
        threshold: Share of the optimum that ``calls_to_95`` waits for.
        weights: Weights of the hidden quality function (default: :class:`QualityWeights`).
        pool_size: Generated instructions per stage in the universe.
        options: Extra constructor settings of a stageopt strategy (e.g. ``{"max_rounds": 2}``).
        stage_offsets: Logit offset of each stage (a :class:`ShapedWorld`; None: the plain world).
        gap_fractions: Fractions of the baseline-to-optimum gap for ``calls_to_gap``.
        n_val: Labelled validation examples the strategy gets (its ``valset``; confirmation
            examples are held out of it).

    A strategy's own test can show that it improves on the baseline:
    ``run = run_one("coordinate", budget_calls=600, seed=0); assert run.true_score > run.baseline``.
    """
    if budget_calls < 1:
        raise ConfigurationError(f"`budget_calls` must be >= 1, got {budget_calls=}")
    if not 0 < threshold <= 1:
        raise ConfigurationError(f"`threshold` must be in (0, 1], got {threshold=}")
    if any(not 0 < f <= 1 for f in gap_fractions):
        raise ConfigurationError(f"`gap_fractions` must be in (0, 1], got {list(gap_fractions)}")
    testbed = make_testbed(
        n_stages, seed=seed, weights=weights, pool_size=pool_size, stage_offsets=stage_offsets, n_val=n_val
    )
    optimum = testbed.optimum().score
    run = BenchRun(strategy, seed, "error", optimum, testbed.true_score(testbed.program()))
    run.stage_offsets = list(stage_offsets) if stage_offsets is not None else None
    start = time.perf_counter()
    try:
        if strategy in DSPY_OPTIMIZERS:
            _run_dspy(run, testbed, budget_calls, threshold)
        else:
            _run_stageopt(run, testbed, budget_calls, threshold, dict(options or {}), gap_fractions)
    except Exception as exc:
        run.status = "error"
        run.error = f"{type(exc).__name__}: {exc}"
        logger.debug("%s seed %d failed", strategy, seed, exc_info=True)
    run.wall_s = round(time.perf_counter() - start, 3)
    return run


def _finish(run: BenchRun, testbed: Testbed, program: dspy.Module) -> None:
    run.true_score = testbed.true_score(program)
    run.regret = run.optimum - run.true_score


def _run_stageopt(
    run: BenchRun,
    testbed: Testbed,
    budget_calls: int,
    threshold: float,
    options: dict[str, Any],
    gap_fractions: Sequence[float] = GAP_FRACTIONS,
) -> None:
    cls = STRATEGIES[run.strategy]
    observer = CallObserver()
    storage = optuna.storages.InMemoryStorage()
    optimizer = cls(
        testbed.metric,
        budget=budget_calls,
        lm=testbed.lm(observer),
        adapter=SmallLMAdapter(),
        seed=run.seed,
        storage=storage,
        study_name=run.strategy,
        **options,
    )
    program = optimizer.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
    result = optimizer.result
    if result is None:  # pragma: no cover - compile always sets it
        raise ConfigurationError(f"{run.strategy} returned no result")
    run.status = result.status
    run.lm_calls = int(result.usage["lm_calls"])
    run.val_score = result.best.get("score")
    racing = result.notes.get("racing") or {}
    run.n_trials = racing.get("trials")
    run.pruned_trials = racing.get("pruned_trials")
    run.example_evaluations_saved = racing.get("example_evaluations_saved")
    _finish(run, testbed, program)
    study = optuna.load_study(study_name=run.strategy, storage=storage)
    space = SearchSpace.from_dict(study.user_attrs["space"])
    base = testbed.program()
    trues = [
        (int(record["lm_calls"]), testbed.true_score(space.apply(base, record["params"])))
        for record in sorted(result.history, key=lambda r: r["trial"])
        if record.get("variant") is None and not record.get("pruned")  # a dropped candidate was not found
    ]
    target = threshold * run.optimum
    run.calls_to_95 = next((calls for calls, true in trues if true >= target), None)
    run.calls_to_95_source = "history"
    run.calls_to_95_observed = observer.calls_to_reach(testbed.world, target)
    run.pool_optimum = testbed.space_optimum(space)
    run.pool_regret = run.pool_optimum - (run.true_score or 0.0)
    run.calls_to_95_pool = next((calls for calls, true in trues if true >= threshold * run.pool_optimum), None)
    # The incumbent (best full-fidelity trial by validation so far) and its true score per trial.
    params = {int(r["trial"]): r["params"] for r in result.history}
    true_of: dict[int, float] = {}
    incumbent: list[tuple[int, float]] = []
    for point in best_so_far(result.history):
        if point.best_trial not in true_of:
            true_of[point.best_trial] = testbed.true_score(space.apply(base, params[point.best_trial]))
        incumbent.append((point.lm_calls, true_of[point.best_trial]))
    run.regret_decay = fit_regret_decay(incumbent, run.optimum).to_dict()
    allocation = result.notes.get("allocation")
    if allocation and allocation.get("probe"):  # allocate="blame": what the probes measured
        run.allocation = {"shares": allocation["probe"]["shares"], "targets": allocation["targets"]}
    for fraction in gap_fractions:
        target = run.baseline + fraction * (run.optimum - run.baseline)
        run.calls_to_gap[f"{fraction:g}"] = next((calls for calls, true in incumbent if true >= target - 1e-12), None)


def _run_dspy(run: BenchRun, testbed: Testbed, budget_calls: int, threshold: float) -> None:
    observer = CallObserver()
    ledger = BudgetLedger(Budget(lm_calls=budget_calls))
    lm = MeteredLM(testbed.lm(observer), ledger)
    k, n_train, n_val = testbed.n_stages, len(testbed.trainset), len(testbed.valset)
    student = testbed.program()
    exhausted = False
    quiet = Quiet()
    with quiet, dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        try:
            if run.strategy == "miprov2":
                num_candidates = max(3, min(8, budget_calls // 150))
                mipro = budgeted_mipro(
                    testbed.metric, ledger=ledger, calls_per_example=k, num_candidates=num_candidates, seed=run.seed
                )
                program = mipro.compile(
                    student, trainset=testbed.trainset, valset=testbed.valset, num_trials=1, minibatch=False
                )
                run.note = f"num_candidates={num_candidates}, trials sized to the budget: {mipro.sized_trials}"
                if mipro.pools is not None:
                    run.pool_optimum = _mipro_pool_optimum(testbed, *mipro.pools)
            else:
                # Per candidate: bootstrapping (about half the trainset before it has its demos
                # on this testbed), then the valset; zero-shot and labeled-only sets only evaluate.
                candidates = bfsrs_num_candidates(
                    budget_calls, n_train=n_train, n_val=n_val, calls_per_example=k, bootstrap_share=0.5
                )
                bfsrs = budgeted_bfsrs(testbed.metric, num_candidate_programs=candidates)
                program = bfsrs.compile(student, trainset=testbed.trainset, valset=testbed.valset)
                run.note = f"num_candidate_programs={candidates}"
                scored = getattr(program, "candidate_programs", None) or []
                if scored:
                    run.pool_optimum = max(testbed.true_score(c["program"]) for c in scored)
        except Exception as exc:
            if not caused_by_budget(exc):
                raise
            exhausted = True
            program = student
            run.note = f"budget exhausted inside the optimizer ({exc}); scored the unoptimized program"
    run.lm_calls = ledger.usage().lm_calls
    run.status = "budget_exhausted" if exhausted or ledger.remaining_calls() == 0 else "completed"
    _finish(run, testbed, program)
    if run.pool_optimum is not None and run.true_score is not None:
        run.pool_regret = run.pool_optimum - run.true_score
    run.calls_to_95 = run.calls_to_95_observed = observer.calls_to_reach(testbed.world, threshold * run.optimum)
    run.calls_to_95_source = "observed"
    if run.pool_optimum is not None:
        run.calls_to_95_pool = observer.calls_to_reach(testbed.world, threshold * run.pool_optimum)


def _mipro_pool_optimum(testbed: Testbed, instructions: Any, demo_sets: Any) -> float:
    """Best true score over MIPROv2's candidates: any instruction with any demo set, per stage."""
    options = []
    for stage in range(testbed.n_stages):
        sets = demo_sets[stage] if demo_sets else [[]]
        options.append(
            [
                StageChoice(text, tuple(dict(d.items()) for d in demos))
                for text, demos in itertools.product(instructions[stage], sets)
            ]
        )
    return testbed.world.best_chain(options)[0]


def summarize(runs: list[BenchRun]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation over seeds of each strategy's measures (error runs left out)."""
    out: dict[str, dict[str, Any]] = {}
    for strategy in dict.fromkeys(r.strategy for r in runs):
        mine = [r for r in runs if r.strategy == strategy]
        ok = [r for r in mine if r.status != "error"]
        reached = [r.calls_to_95 for r in ok if r.calls_to_95 is not None]
        reached_pool = [r.calls_to_95_pool for r in ok if r.calls_to_95_pool is not None]
        summary: dict[str, Any] = {
            "runs": len(mine),
            "ok": len(ok),
            "errors": sorted({r.error for r in mine if r.error}),
            "regret": _mean_std([r.regret for r in ok]),
            "true_score": _mean_std([r.true_score for r in ok]),
            "pool_regret": _mean_std([r.pool_regret for r in ok]),
            "calls_to_95": _mean_std(reached),
            "reached_95": len(reached),
            "calls_to_95_pool": _mean_std(reached_pool),
            "reached_95_pool": len(reached_pool),
            "lm_calls": _mean_std([r.lm_calls for r in ok]),
            "baseline": _mean_std([r.baseline for r in mine]),
            "regret_decay_b": _mean_std([r.regret_decay["b"] for r in ok if r.regret_decay]),
            "regret_decay_r2": _mean_std([r.regret_decay["r2"] for r in ok if r.regret_decay]),
            "optimum": _mean_std([r.optimum for r in mine]),
            "calls_to_95_source": next((r.calls_to_95_source for r in ok), None),
        }
        out[strategy] = summary
    return out


def _mean_std(values: list[Any]) -> dict[str, float] | None:
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return None
    std = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
    return {"mean": statistics.fmean(numbers), "std": std, "n": len(numbers)}
