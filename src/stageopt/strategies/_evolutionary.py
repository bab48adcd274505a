"""A population of whole-program configurations: tournament, stage-wise crossover, mutation, elitism."""

from __future__ import annotations

import math
import random
from typing import Any

import dspy

from stageopt._errors import BudgetExhaustedError, ConfigurationError
from stageopt.evaluation import MeteredLM
from stageopt.proposers import MutationInstructionProposer
from stageopt.strategies._base import BaseStageOptimizer, RunState, StopSearch
from stageopt.strategies._space import Config, config_key
from stageopt.strategies._state import TrialRequest
from stageopt.strategies._warmstart import warm_configs

#: Phase of every trial this strategy runs (``round`` is the generation, ``stage`` the mutated stage).
PHASE = "evolutionary"

#: Tries at breeding a child not scored before and not already in the generation.
MAX_ATTEMPTS_PER_CHILD = 5

#: Generations in a row that bring no new configuration (a small space is exhausted) before the run ends.
MAX_IDLE_GENERATIONS = 2

#: Study user attribute holding a generation's elites and new members (so a resumed run repeats it).
_PLAN_ATTR = "evolutionary.generation.{}"


class Evolutionary(BaseStageOptimizer):
    """A genetic search over whole-program configurations (one gene per stage).

    Generation 0 is the original program, the warm-start configurations (``warm_start=``, best
    first), then configurations drawn uniformly (each knob of each stage uniform over its
    choices) up to ``population_size``. Each later generation keeps
    the ``elite`` best members unchanged and breeds ``population_size - elite`` children: two
    parents are chosen by tournament (``tournament_size`` members drawn with replacement, the
    best wins; ties go to the earlier member), the child takes each stage's whole choice from
    one parent or the other with equal chance (stage-wise crossover), then with probability
    ``mutation_rate`` one stage, drawn uniformly, mutates: with probability ``lm_mutation_rate``
    an LM rewrites that stage's current instruction
    (:class:`~stageopt.proposers.MutationInstructionProposer`, through the prompt LM if one is
    given, else the task LM, metered against the budget) and the child takes the new
    instruction, which joins the stage's pool for everyone; otherwise, or when the rewrite is
    rejected, the stage's choice is redrawn uniformly over its configurations, different from
    the current one. A child equal to a configuration scored before or to another member of the
    generation is bred again (up to ``MAX_ATTEMPTS_PER_CHILD`` times); scored configurations
    are never scored again, and a member's score is its full-validation score.

    With ``limits``, a member that broke a limit ranks after every feasible one in tournaments
    and elitism, and progress (``patience``) is the best feasible score.

    Reproducibility and resume: every draw comes from a ``random.Random`` seeded by the seed and
    the generation. A generation's members (and the stage each child mutated) are stored in the
    study before any of them is scored, and the grown instruction pools after each LM mutation;
    a resumed run reads the plan and scores only the members that have no score yet. A run
    killed while breeding breeds the generation again, paying for its LM mutations again.

    History: every trial has phase ``evolutionary``, ``round`` = its generation and ``stage`` =
    the stage its child mutated (None: crossover only). Members scored before (the original
    program is the baseline trial; an elite keeps its score) get no new trial. Each
    generation's plan is the study user attribute ``evolutionary.generation.<g>``:
    ``{"elites": [config, ...], "members": [{"params": config, "stage": name}, ...]}``.

    The Optuna sampler is not consulted: the population is the model. Children are scored with
    trials that carry no Optuna parameters, since instruction pools grow during the run and
    Optuna's categorical distributions cannot.

    The run ends after ``n_generations`` generations after the first, when ``patience``
    generations in a row raise the population's best score by less than ``min_delta``, when
    generations stop bringing new configurations, or when the budget cannot pay for a trial
    or a mutation.

    Args:
        metric: DSPy metric.
        budget: :class:`~stageopt.Budget` or an int of logical LM calls.
        population_size: Members of each generation.
        n_generations: Upper bound on generations after the first (None: until the budget or
            patience ends the run).
        tournament_size: Members compared to pick each parent.
        mutation_rate: Chance that a child mutates one stage.
        lm_mutation_rate: Chance that a mutation is an LM rewrite of the instruction rather than
            a uniform redraw of the stage's choice.
        elite: Best members carried unchanged into the next generation.
        patience: Generations in a row without an improvement of ``min_delta`` before stopping
            early (None: never).
        min_delta: Smallest improvement of the best validation score that counts as progress.
        mutation_proposer: What rewrites instructions (default: ``MutationInstructionProposer()``).
        **kwargs: Settings of :class:`BaseStageOptimizer` (lm, prompt_lm, adapter, seed, storage, ...).
    """

    strategy_name = "evolutionary"

    def __init__(
        self,
        metric: Any,
        *,
        budget: Any,
        population_size: int = 8,
        n_generations: int | None = None,
        tournament_size: int = 2,
        mutation_rate: float = 0.5,
        lm_mutation_rate: float = 0.3,
        elite: int = 1,
        patience: int | None = 3,
        min_delta: float = 0.005,
        mutation_proposer: MutationInstructionProposer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(metric, budget=budget, **kwargs)
        if _not_int(population_size) or population_size < 2:
            raise ConfigurationError(f"`population_size` must be an int >= 2, got {population_size=}")
        if n_generations is not None and (_not_int(n_generations) or n_generations < 1):
            raise ConfigurationError(
                f"`n_generations` must be >= 1 or None (until the budget ends), got {n_generations=}"
            )
        if _not_int(tournament_size) or not 1 <= tournament_size <= population_size:
            raise ConfigurationError(
                f"`tournament_size` must be an int in [1, population_size={population_size}], got {tournament_size=}"
            )
        for name, rate in (("mutation_rate", mutation_rate), ("lm_mutation_rate", lm_mutation_rate)):
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ConfigurationError(f"`{name}` must be a probability in [0, 1], got {name}={rate!r}")
        if _not_int(elite) or not 0 <= elite < population_size:
            raise ConfigurationError(f"`elite` must be an int in [0, population_size={population_size}), got {elite=}")
        if patience is not None and (_not_int(patience) or patience < 1):
            raise ConfigurationError(f"`patience` must be >= 1 or None (no early stopping), got {patience=}")
        if min_delta < 0:
            raise ConfigurationError(f"`min_delta` must be >= 0, got {min_delta=}")
        if mutation_proposer is not None and not callable(getattr(mutation_proposer, "mutate", None)):
            raise TypeError(f"`mutation_proposer` must have a mutate() method, got {mutation_proposer!r}")
        self.population_size = population_size
        self.n_generations = n_generations
        self.tournament_size = tournament_size
        self.mutation_rate = float(mutation_rate)
        self.lm_mutation_rate = float(lm_mutation_rate)
        self.elite = elite
        self.patience = patience
        self.min_delta = min_delta
        self.mutation_proposer = mutation_proposer or MutationInstructionProposer()

    def _search(self, state: RunState) -> tuple[str, str | None]:
        population: list[Config] = []
        best = 0.0
        stale = idle = 0
        generation = 0
        while True:
            elites, members = self._generation(state, generation, population)
            # A generation's new members are scored together (by the workers, on a shared storage).
            state.run_trials(
                [
                    TrialRequest(m["params"], phase=PHASE, stage=m["stage"], round=generation)
                    for m in _unscored(state, members)
                ]
            )
            # Only members without a score get a trial, so the generation's trials are its new configurations.
            new = state.trials_in(phase=PHASE, round=generation)
            population = [*elites, *(m["params"] for m in members)]
            # Progress is the best feasible score (with limits, infeasible members never count).
            # A member racing dropped ranks by the mean of the examples it was scored on, but is never the top.
            top = max(
                (_score(state, c) for c in population if state.is_feasible(c) and not state.is_pruned(c)), default=0.0
            )
            if generation:
                stale = stale + 1 if top - best < self.min_delta else 0
                idle = 0 if new else idle + 1
            best = top
            if self.n_generations is not None and generation >= self.n_generations:
                return "completed", f"{self.n_generations} generations after the first done"
            if self.patience is not None and stale >= self.patience:
                return "early_stopped", (
                    f"{stale} generations in a row improved the best score by less than min_delta={self.min_delta}"
                )
            if idle >= MAX_IDLE_GENERATIONS:
                return "completed", f"{idle} generations in a row bred only configurations scored before"
            generation += 1

    # ---- breeding ------------------------------------------------------------------------------

    def _generation(
        self, state: RunState, generation: int, population: list[Config]
    ) -> tuple[list[Config], list[dict[str, Any]]]:
        """The elites kept from ``population`` and the new members of ``generation``.

        Read from the study when the generation was bred before (resume); otherwise bred now
        and stored as ``{"elites": [config, ...], "members": [{"params", "stage"}, ...]}``.
        """
        attr = _PLAN_ATTR.format(generation)
        stored = state.study.user_attrs.get(attr)
        if stored is not None:
            return list(stored["elites"]), [{"params": m["params"], "stage": m["stage"]} for m in stored["members"]]
        rng = random.Random(f"{PHASE}:{self.seed}:{generation}")
        elites = _ranked(state, population)[: self.elite] if generation else []
        members: list[dict[str, Any]] = []
        taken = {config_key(c) for c in population}
        if generation == 0:  # the original program and the warm-start configurations first
            for config in [state.space.default_config(), *warm_configs(state)]:
                if config_key(config) not in taken and len(members) < self.population_size:
                    members.append({"params": config, "stage": None})
                    taken.add(config_key(config))
        wanted = self.population_size - (self.elite if generation else 0)
        while len(members) < wanted:
            for _ in range(MAX_ATTEMPTS_PER_CHILD):
                if generation == 0:
                    child, stage = {s: _draw(rng, state, s) for s in state.space.names()}, None
                else:
                    child, stage = self._breed(state, rng, population)
                if config_key(child) not in taken and not state.recorded(child):
                    break
            members.append({"params": child, "stage": stage})
            taken.add(config_key(child))
        state.study.set_user_attr(attr, {"elites": elites, "members": members})
        return elites, members

    def _breed(self, state: RunState, rng: random.Random, population: list[Config]) -> tuple[Config, str | None]:
        """One child: tournament parents, stage-wise crossover, maybe one stage mutated."""
        fitness = [_fitness(state, c) for c in population]
        mother = population[self._tournament(rng, fitness)]
        father = population[self._tournament(rng, fitness)]
        child = {s: dict((mother if rng.random() < 0.5 else father)[s]) for s in state.space.names()}
        if rng.random() >= self.mutation_rate:
            return child, None
        stage = rng.choice(state.space.names())
        if rng.random() < self.lm_mutation_rate:
            seed = rng.randrange(1 << 30)
            instruction = self._lm_mutation(state, child, stage, seed)
            if instruction is not None and instruction != child[stage]["instruction"]:
                child[stage]["instruction"] = instruction
                return child, stage
        child[stage] = _draw(rng, state, stage, other_than=child[stage])
        return child, stage

    def _tournament(self, rng: random.Random, fitness: list[tuple[bool, float]]) -> int:
        contenders = [rng.randrange(len(fitness)) for _ in range(self.tournament_size)]
        return min(contenders, key=lambda i: (not fitness[i][0], -fitness[i][1], i))

    def _lm_mutation(self, state: RunState, config: Config, stage: str, seed: int) -> int | None:
        """Rewrite ``stage``'s instruction in ``config`` with the LM; its index in the grown pool, or None."""
        pool = state.space.stages[stage].instructions
        signature = dict(state.program.named_predictors())[stage].signature
        lm: dspy.BaseLM = MeteredLM(self.prompt_lm, state.ledger) if self.prompt_lm is not None else state.lm
        try:
            text = self.mutation_proposer.mutate(
                pool[config[stage]["instruction"]], lm, signature=signature, existing=list(pool), seed=seed
            )
        except BudgetExhaustedError as exc:
            raise StopSearch("budget_exhausted", str(exc)) from exc
        finally:
            state.checkpoint_usage()
        if text is None:
            return None
        index = state.space.add_instruction(stage, text)
        state.study.set_user_attr("space", state.space.to_dict())
        return index


def _draw(rng: random.Random, state: RunState, stage: str, other_than: dict[str, int] | None = None) -> dict[str, int]:
    """A choice of ``stage``, uniform over its configurations (other than ``other_than`` when there are others)."""
    candidates = state.space.stages[stage]
    knobs = candidates.knobs()
    sizes = [candidates.size(knob) for knob in knobs]
    total = math.prod(sizes)
    if other_than is None or total == 1:
        pick = rng.randrange(total)
    else:
        skip = 0
        for knob, size in zip(knobs, sizes, strict=True):
            skip = skip * size + other_than.get(knob, 0)
        pick = rng.randrange(total - 1)
        pick += pick >= skip
    choice: dict[str, int] = {}
    for knob, size in reversed(list(zip(knobs, sizes, strict=True))):
        pick, choice[knob] = divmod(pick, size)
    return {knob: choice[knob] for knob in knobs}


def _score(state: RunState, config: Config) -> float:
    """The full-validation score of a configuration already scored (racing dropped it: the mean it had then)."""
    return state.scores[f"{config_key(config)}@{state.full_fidelity}"][0]


def _fitness(state: RunState, config: Config) -> tuple[bool, float]:
    """``(feasible, score)`` of a configuration already scored: members that met the limits rank first."""
    return state.is_feasible(config), _score(state, config)


def _ranked(state: RunState, population: list[Config]) -> list[Config]:
    """The population best first: feasible before infeasible, then by score (ties: earlier member first)."""
    fitness = [_fitness(state, c) for c in population]
    order = sorted(range(len(population)), key=lambda i: (not fitness[i][0], -fitness[i][1], i))
    return [population[i] for i in order]


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def _unscored(state: RunState, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Members whose configuration has no score yet, the first of each configuration only."""
    seen: set[str] = set()
    out = []
    for member in members:
        key = config_key(member["params"])
        if not state.recorded(member["params"]) and key not in seen:
            seen.add(key)
            out.append(member)
    return out
