"""The hidden quality function of the simulated testbed (a SIMULATION, not a language model).

Every stage ``i`` of a K-stage chain maps field ``fields[i]`` to ``fields[i + 1]``. Its chance of
answering correctly is a logistic function of what the stage's prompt holds::

    logit_i = bias
            + w_instruction * quality(instruction_i)
            + w_interaction * affinity(instruction_i, style of the upstream output)
            + demo_value_i(demos_i)

* Instructions come from a finite, declared universe per stage: the original instruction (poor
  on purpose) and ``pool_size`` generated strings, each with a hidden quality ~ N(0, 1), an
  output *style* (how the stage formats a correct output: ``clue-017``, ``CLUE-017`` or
  ``clue_017``) and an affinity ~ N(0, 1) for each upstream style. A text outside the universe
  is an *alias* of a pool entry chosen by hashing the text, with ``unseen_penalty`` less
  quality, so nothing outside the universe can beat the universe's best.
* The interaction: a stage reads the style of the upstream stage's output, so stage 2's best
  instruction depends on stage 1's choice.
* Demos: a demo is valid when its input and output are one training example's consistent
  values; each training example has a hidden utility ~ U(-1, 1) per stage. ``demo_value`` is
  ``w_count * min(valid, demo_cap) / demo_cap + w_utility * mean(value)`` over the distinct
  demos, where an invalid demo is worth ``-wrong_demo`` (below any utility).
* Error propagation: a wrong output is a *decoy* value (an id >= :data:`DECOY_BASE`) that no
  later stage can turn back into the right answer, so a configuration's expected end-to-end
  exact-match score is exactly the product of its stages' probabilities.

The correct/wrong draw of a stage is deterministic per (world seed, example, stage, stage
configuration): a hash of those mapped to [0, 1) and compared with the probability.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stageopt._errors import ConfigurationError

#: Number of output styles (formats of a correct intermediate value).
N_STYLES = 3

#: Ids at or above this are decoys: the value a wrong stage writes.
DECOY_BASE = 500

#: Intermediate field names, in chain order (the first field is ``query``, the last ``verdict``).
_MIDDLE_FIELDS = ("clue", "lead", "trail", "motive", "witness")
MAX_STAGES = len(_MIDDLE_FIELDS) + 1

_VALUE = re.compile(r"^\s*([A-Za-z]+)([-_])(\d{3})\s*$")

_OPENERS = ("Derive", "Extract", "Work out", "Identify", "Determine", "Infer", "Pin down", "Recover")
_LINKS = ("that follows from", "implied by", "hidden in", "matching", "that belongs to", "encoded in")
_TAILS = (
    "",
    ", citing nothing else",
    " and keep its exact format",
    ", checking each detail twice",
    " in the canonical spelling",
    ", quickly and plainly",
    " without any commentary",
    " as one token",
)


def stage_fields(n_stages: int) -> list[str]:
    """The chain's field names: ``query``, the intermediate fields, then ``verdict``."""
    if not 1 <= n_stages <= MAX_STAGES:
        raise ConfigurationError(f"the testbed supports 1 to {MAX_STAGES} stages, got {n_stages=}")
    return ["query", *_MIDDLE_FIELDS[: n_stages - 1], "verdict"]


def format_value(field: str, example: int, style: int = 0) -> str:
    """A field's value for ``example`` in ``style`` (0 is the gold, canonical format)."""
    if style == 1:
        return f"{field.upper()}-{example:03d}"
    if style == 2:
        return f"{field}_{example:03d}"
    return f"{field}-{example:03d}"


def parse_value(text: Any) -> tuple[str, int, int] | None:
    """``(field, example id, style)`` of a value written by :func:`format_value`, else None."""
    match = _VALUE.match(str(text or ""))
    if match is None:
        return None
    word, separator, digits = match.groups()
    if separator == "_":
        if not word.islower():
            return None
        return word, int(digits), 2
    if word.isupper():
        return word.lower(), int(digits), 1
    if word.islower():
        return word, int(digits), 0
    return None


def normalize(text: str | None) -> str:
    """The key of an instruction: whitespace collapsed, case folded, final period dropped."""
    return " ".join((text or "").split()).rstrip(".").strip().lower()


def unit_hash(*parts: Any) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def sigmoid(x: float) -> float:
    """The logistic function."""
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class QualityWeights:
    """Weights of the hidden quality function (see the module docstring)."""

    bias: float = 2.0
    instruction: float = 1.0
    interaction: float = 1.0
    demo_count: float = 1.0
    demo_utility: float = 0.3
    wrong_demo: float = 1.5
    demo_cap: int = 4
    original_quality: float = -1.0
    unseen_penalty: float = 0.5

    def __post_init__(self) -> None:
        if self.demo_cap < 1:
            raise ConfigurationError(f"`demo_cap` must be >= 1, got demo_cap={self.demo_cap}")
        if self.wrong_demo <= 1.0:
            raise ConfigurationError(f"`wrong_demo` must exceed 1 (the largest utility), got {self.wrong_demo}")
        if self.unseen_penalty < 0:
            raise ConfigurationError(f"`unseen_penalty` must be >= 0, got {self.unseen_penalty}")


@dataclass(frozen=True)
class InstructionProfile:
    """The hidden attributes of one instruction text at one stage.

    Attributes:
        text: The text as given.
        quality: Hidden quality (logit units before weighting).
        style: Style of the stage's correct outputs under this instruction.
        affinity: Affinity for each upstream output style.
        known: Whether the text is in the stage's declared universe (else an alias).
    """

    text: str
    quality: float
    style: int
    affinity: tuple[float, ...]
    known: bool


@dataclass(frozen=True)
class StageChoice:
    """What one stage holds: its instruction and its demos (dicts of field values)."""

    instruction: str
    demos: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Optimum:
    """The best expected score over the universe, with one configuration that reaches it.

    Attributes:
        score: The optimal expected exact-match score.
        instructions: The optimal instruction of each stage.
        demo_examples: The training example ids of each stage's optimal demo set.
    """

    score: float
    instructions: tuple[str, ...]
    demo_examples: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready optimum."""
        return {
            "score": self.score,
            "instructions": list(self.instructions),
            "demo_examples": [list(ids) for ids in self.demo_examples],
        }


class World:
    """Hidden qualities of a seeded testbed world and the exact expected score of a configuration.

    Args:
        n_stages: Number of stages (1 to :data:`MAX_STAGES`).
        seed: Seed of every hidden draw.
        train_ids: Example ids whose demos are valid (the training examples).
        pool_size: Generated instructions per stage besides the original.
        weights: Weights of the quality function.
    """

    def __init__(
        self,
        n_stages: int = 3,
        *,
        seed: int = 0,
        train_ids: Iterable[int] = range(16),
        pool_size: int = 6,
        weights: QualityWeights | None = None,
    ) -> None:
        self.fields = stage_fields(n_stages)
        self.n_stages = n_stages
        self.seed = seed
        self.weights = weights or QualityWeights()
        self.train_ids = tuple(sorted(set(train_ids)))
        if not self.train_ids or min(self.train_ids) < 0 or max(self.train_ids) >= DECOY_BASE:
            raise ConfigurationError(f"`train_ids` must be non-empty ids in [0, {DECOY_BASE}), got {self.train_ids}")
        combos = len(_OPENERS) * len(_LINKS) * len(_TAILS)
        if not 1 <= pool_size <= combos:
            raise ConfigurationError(f"`pool_size` must be in [1, {combos}], got {pool_size=}")
        self.pool_size = pool_size
        self._profiles: list[dict[str, InstructionProfile]] = []
        self._pools: list[list[str]] = []
        self._utility: list[dict[int, float]] = []
        for stage in range(n_stages):
            rng = random.Random(f"stageopt-testbed/{seed}/{stage}")
            source, target = self.fields[stage], self.fields[stage + 1]
            texts = [
                f"{opener} the {target} {link} the {source}{tail}."
                for opener, link, tail in itertools.product(_OPENERS, _LINKS, _TAILS)
            ]
            rng.shuffle(texts)
            pool = texts[:pool_size]
            profiles = {}
            original = self.original_instruction(stage)
            profiles[normalize(original)] = InstructionProfile(
                original,
                self.weights.original_quality,
                0,
                tuple(rng.gauss(0.0, 1.0) for _ in range(N_STYLES)),
                True,
            )
            for text in pool:
                quality = rng.gauss(0.0, 1.0)
                style = rng.randrange(N_STYLES)
                affinity = tuple(rng.gauss(0.0, 1.0) for _ in range(N_STYLES))
                profiles[normalize(text)] = InstructionProfile(text, quality, style, affinity, True)
            self._pools.append(pool)
            self._profiles.append(profiles)
            self._utility.append({i: rng.uniform(-1.0, 1.0) for i in self.train_ids})

    # ---- the declared universe -------------------------------------------------------------

    def original_instruction(self, stage: int) -> str:
        """The instruction the unoptimized program starts with (a poor one)."""
        return f"Given the {self.fields[stage]}, produce the {self.fields[stage + 1]}."

    def pool(self, stage: int) -> list[str]:
        """The generated instructions of ``stage`` (what proposer answers are drawn from)."""
        return list(self._pools[stage])

    def universe(self, stage: int) -> list[str]:
        """Every declared instruction of ``stage``: the original first, then the pool."""
        return [self.original_instruction(stage), *self._pools[stage]]

    def profile(self, stage: int, text: str | None) -> InstructionProfile:
        """Hidden attributes of ``text`` at ``stage`` (an alias of a pool entry when unknown)."""
        key = normalize(text)
        known = self._profiles[stage].get(key)
        if known is not None:
            return known
        pool = self._pools[stage]
        base = self._profiles[stage][normalize(pool[int(unit_hash(self.seed, stage, "alias", key) * len(pool))])]
        return InstructionProfile(
            text or "", base.quality - self.weights.unseen_penalty, base.style, base.affinity, False
        )

    def utility(self, stage: int, example: int) -> float:
        """Hidden utility of training example ``example`` as a demo of ``stage``."""
        return self._utility[stage][example]

    # ---- demos -----------------------------------------------------------------------------

    def demo_keys(self, stage: int, demos: Sequence[Mapping[str, Any]]) -> list[tuple[int | None, str]]:
        """Distinct demos as ``(training example id or None when invalid, key)``, in order.

        A demo missing its input or output value is not shown to the model and is skipped.
        """
        source, target = self.fields[stage], self.fields[stage + 1]
        seen: set[str] = set()
        out: list[tuple[int | None, str]] = []
        for demo in demos:
            raw_in, raw_out = demo.get(source), demo.get(target)
            if raw_in in (None, "") or raw_out in (None, ""):
                continue
            parsed_in, parsed_out = parse_value(raw_in), parse_value(raw_out)
            example: int | None = None
            if (
                parsed_in is not None
                and parsed_out is not None
                and parsed_in[0] == source
                and parsed_out[0] == target
                and parsed_in[1] == parsed_out[1]
                and parsed_out[1] in self._utility[stage]
            ):
                example = parsed_out[1]
            key = f"e{example}" if example is not None else f"x:{str(raw_in).strip()}|{str(raw_out).strip()}"
            if key not in seen:
                seen.add(key)
                out.append((example, key))
        return out

    def demo_value(self, stage: int, demos: Sequence[Mapping[str, Any]]) -> float:
        """The logit contribution of ``demos`` at ``stage`` (see the module docstring)."""
        keys = self.demo_keys(stage, demos)
        values = [self.utility(stage, e) if e is not None else -self.weights.wrong_demo for e, _ in keys]
        return self._demo_formula(sum(1 for e, _ in keys if e is not None), values)

    def _demo_formula(self, n_valid: int, values: Sequence[float]) -> float:
        if not values:
            return 0.0
        w = self.weights
        return w.demo_count * min(n_valid, w.demo_cap) / w.demo_cap + w.demo_utility * sum(values) / len(values)

    def best_demos(self, stage: int) -> tuple[float, tuple[int, ...]]:
        """The largest demo value at ``stage`` and the training ids that reach it.

        For a fixed number of demos the best set is the top utilities (the mean is largest), and
        invalid demos never help, so trying every size of the sorted utilities is exact.
        """
        ranked = sorted(self.train_ids, key=lambda e: (-self.utility(stage, e), e))
        best_value: float = 0.0
        best_ids: tuple[int, ...] = ()
        for n in range(1, len(ranked) + 1):
            top = ranked[:n]
            value = self._demo_formula(n, [self.utility(stage, e) for e in top])
            if value > best_value + 1e-12:
                best_value, best_ids = value, tuple(top)
        return best_value, best_ids

    # ---- probabilities and draws -------------------------------------------------------------

    def logit(self, stage: int, instruction: str | None, demos: Sequence[Mapping[str, Any]], upstream: int) -> float:
        """Logit of a correct answer at ``stage`` given the upstream output's style."""
        return self._logit(self.profile(stage, instruction), self.demo_value(stage, demos), upstream)

    def _logit(self, profile: InstructionProfile, demo_value: float, upstream: int) -> float:
        w = self.weights
        return w.bias + w.instruction * profile.quality + w.interaction * profile.affinity[upstream] + demo_value

    def probability(
        self, stage: int, instruction: str | None, demos: Sequence[Mapping[str, Any]], upstream: int = 0
    ) -> float:
        """Probability that ``stage`` answers correctly given a correct upstream value of style ``upstream``."""
        return sigmoid(self.logit(stage, instruction, demos, upstream))

    def draw(
        self,
        stage: int,
        example: int,
        instruction: str | None,
        demos: Sequence[Mapping[str, Any]],
        upstream: int,
    ) -> bool:
        """Whether ``stage`` answers ``example`` correctly: deterministic per (example, configuration)."""
        demo_key = ",".join(sorted(key for _, key in self.demo_keys(stage, demos)))
        u = unit_hash(self.seed, "draw", example, stage, normalize(instruction), demo_key, upstream)
        return u < self.probability(stage, instruction, demos, upstream)

    def decoy(self, *parts: Any) -> int:
        """A wrong id (never a real example's), chosen by hashing ``parts``."""
        return DECOY_BASE + int(unit_hash(self.seed, "decoy", *parts) * DECOY_BASE)

    # ---- exact expected scores ---------------------------------------------------------------

    def score(self, choices: Sequence[StageChoice]) -> float:
        """The exact expected end-to-end score of a configuration: the product of its stages'
        probabilities, each given the style of the upstream stage's instruction."""
        if len(choices) != self.n_stages:
            raise ConfigurationError(f"expected {self.n_stages} stage choices, got {len(choices)}")
        total, upstream = 1.0, 0
        for stage, choice in enumerate(choices):
            total *= self.probability(stage, choice.instruction, choice.demos, upstream)
            upstream = self.profile(stage, choice.instruction).style
        return total

    def best_chain(self, options: Sequence[Sequence[StageChoice]]) -> tuple[float, list[StageChoice]]:
        """The best configuration among per-stage options, exactly, by dynamic programming.

        A stage's probability depends on the previous stage only through its output style, so
        keeping the best prefix per style is exact.
        """
        if len(options) != self.n_stages or any(not o for o in options):
            raise ConfigurationError("best_chain needs at least one option for every stage")
        best: dict[int, tuple[float, list[StageChoice]]] = {0: (1.0, [])}
        for stage, stage_options in enumerate(options):
            scored = [(self.profile(stage, o.instruction), self.demo_value(stage, o.demos), o) for o in stage_options]
            nxt: dict[int, tuple[float, list[StageChoice]]] = {}
            for upstream, (prefix_score, prefix) in best.items():
                for profile, demo_value, option in scored:
                    value = prefix_score * sigmoid(self._logit(profile, demo_value, upstream))
                    if profile.style not in nxt or value > nxt[profile.style][0]:
                        nxt[profile.style] = (value, [*prefix, option])
            best = nxt
        return max(best.values(), key=lambda item: item[0])

    def optimum(self) -> Optimum:
        """The best expected score over the whole universe: every declared instruction of every
        stage, with any demo set of training examples."""
        options = []
        demo_ids = []
        for stage in range(self.n_stages):
            _, ids = self.best_demos(stage)
            demo_ids.append(ids)
            demos = tuple(self.gold_demo(stage, e) for e in ids)
            options.append([StageChoice(text, demos) for text in self.universe(stage)])
        score, chain = self.best_chain(options)
        return Optimum(score, tuple(c.instruction for c in chain), tuple(demo_ids))

    def gold_demo(self, stage: int, example: int) -> dict[str, str]:
        """A valid demo of ``stage`` made of ``example``'s gold values."""
        source, target = self.fields[stage], self.fields[stage + 1]
        return {source: format_value(source, example), target: format_value(target, example)}
