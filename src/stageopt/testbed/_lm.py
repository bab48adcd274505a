"""The testbed LM: a scripted DSPy LM that answers from the hidden world (a SIMULATION).

Stage prompts are answered correctly or wrongly by :meth:`World.draw` (deterministic per example
and stage configuration); a correct intermediate value carries the style of the stage's
instruction, a wrong one is a decoy that later stages cannot repair. Every other prompt is a
proposer prompt: it gets a well-formed answer whose instruction fields hold a string of the
target stage's pool, chosen by hashing the prompt, so proposals have hidden qualities drawn from
the pool's distribution.

The LM is a ``dspy.LM`` (so a ``dspy.BaseLM``) driven by a custom lm15 engine, the interface
DSPy 3.4 asks custom LMs to implement (subclassing ``forward`` is deprecated there).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

from stageopt.lm._adapter import label
from stageopt.testbed._prompt import REASONING, Prompt, parse_prompt, render_answer
from stageopt.testbed._world import DECOY_BASE, StageChoice, World, format_value, normalize, parse_value, unit_hash

#: What proposer prompts get in fields that are not instructions.
FILLER = "Simulated testbed text: this answer carries no information about the task."


@dataclass(frozen=True)
class StageCall:
    """One stage call the testbed LM answered.

    Attributes:
        calls: Requests answered so far (this one included).
        stage: The stage index.
        instruction: The instruction the prompt held.
        demos: The demos the prompt held.
    """

    calls: int
    stage: int
    instruction: str
    demos: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Execution:
    """One run of the whole program on one example, as seen from its stage calls.

    Attributes:
        choices: Each stage's instruction and demos.
        first_call: Logical calls so far at its first stage call.
        last_call: Logical calls so far at its last stage call.
    """

    choices: tuple[StageChoice, ...]
    first_call: int
    last_call: int


class CallObserver:
    """Records the calls a testbed LM answers, to see which configurations an optimizer ran.

    Every request the engine answers is counted (the testbed LM has no cache, so with a metered
    LM around it the count equals the logical LM calls spent so far); stage prompts are recorded
    with what they held. Used for optimizers whose trials are not visible otherwise (DSPy's):
    consecutive calls of stages 0..K-1 are one execution of the program, so run them with one
    thread. Use one observer per run.
    """

    def __init__(self) -> None:
        self.count = 0
        self.calls: list[StageCall] = []
        self._lock = threading.Lock()

    def tick(self) -> int:
        """Count one answered request (called by the engine); returns the count so far."""
        with self._lock:
            self.count += 1
            return self.count

    def record(self, calls: int, stage: int, instruction: str, demos: Sequence[dict[str, str]]) -> None:
        """Called by the engine for every stage prompt it answers."""
        with self._lock:
            self.calls.append(StageCall(calls, stage, instruction, tuple(demos)))

    def executions(self, n_stages: int) -> list[Execution]:
        """Complete program executions: runs of consecutive calls of stages 0..K-1."""
        out: list[Execution] = []
        current: list[StageCall] = []
        for call in self.calls:
            if call.stage == len(current):
                current.append(call)
            else:
                current = [call] if call.stage == 0 else []
            if len(current) == n_stages:
                choices = tuple(StageChoice(c.instruction, c.demos) for c in current)
                out.append(Execution(choices, current[0].calls, current[-1].calls))
                current = []
        return out

    def calls_to_reach(self, world: World, threshold: float) -> int | None:
        """Logical calls at the end of the first evaluation of a configuration scoring >= ``threshold``.

        The first execution whose configuration's exact expected score reaches ``threshold``
        starts a block; the block runs while the following executions have the same
        configuration (the rest of that evaluation), and its last call is the answer. None when
        no execution reached it.
        """
        executions = self.executions(world.n_stages)
        scores: dict[tuple[Any, ...], float] = {}
        found: tuple[Any, ...] | None = None
        last: int | None = None
        for execution in executions:
            key = _config_key(world, execution.choices)
            if found is not None:
                if key != found:
                    break
                last = execution.last_call
                continue
            if key not in scores:
                scores[key] = world.score(execution.choices)
            if scores[key] >= threshold:
                found, last = key, execution.last_call
        return last


def _config_key(world: World, choices: Sequence[StageChoice]) -> tuple[Any, ...]:
    return tuple(
        (normalize(c.instruction), tuple(sorted(k for _, k in world.demo_keys(stage, c.demos))))
        for stage, c in enumerate(choices)
    )


class TestbedEngine:
    """An lm15 engine answering every request from the world (see the module docstring)."""

    __test__ = False

    def __init__(self, world: World, observer: CallObserver | None = None) -> None:
        self.world = world
        self.observer = observer
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def complete(self, request: Any) -> Response:
        """Answer one request."""
        system = _system_text(request.system)
        messages = [(m.role, m.text or "") for m in request.messages]
        prompt = parse_prompt(system, messages, self.world.fields)
        config = request.config
        count = self.observer.tick() if self.observer is not None else 0
        if prompt.stage is not None:
            if self.observer is not None:
                self.observer.record(count, prompt.stage, prompt.instruction, prompt.demos)
            text = self.answer_stage(prompt)
        else:
            text = self.answer_proposer(prompt, seed=config.seed, temperature=config.temperature)
        return Response(
            id=None,
            model="testbed",
            message=Message.assistant([TextPart(text)]),
            finish_reason="stop",
            usage=Usage(input_tokens=len(prompt.text.split()), output_tokens=max(1, len(text.split()))),
        )

    def stream(self, request: Any) -> Any:  # pragma: no cover - DSPy streams only when asked to
        raise NotImplementedError("the testbed LM does not stream")

    def close(self) -> None:
        """Nothing to release."""

    def answer_stage(self, prompt: Prompt) -> str:
        """A stage's answer: right or wrong by the world's deterministic draw."""
        world = self.world
        stage = prompt.stage
        assert stage is not None
        source, target = world.fields[stage], world.fields[stage + 1]
        raw = prompt.values.get(source, "")
        parsed = parse_value(raw)
        final = stage == world.n_stages - 1
        style = 0 if final else world.profile(stage, prompt.instruction).style
        if parsed is None or parsed[0] != source or parsed[1] >= DECOY_BASE:
            example = world.decoy(stage, raw)  # a wrong input: no way back to the right answer
        else:
            _, real, upstream = parsed
            right = world.draw(stage, real, prompt.instruction, prompt.demos, upstream)
            example = real if right else world.decoy(stage, real, normalize(prompt.instruction))
        values = {target: format_value(target, example, style)}
        if REASONING in prompt.outputs:
            values[REASONING] = f"Simulated reasoning: the {source} leads to the {target}."
        return render_answer(prompt, values)

    def answer_proposer(self, prompt: Prompt, *, seed: int | None, temperature: float | None) -> str:
        """A proposer's answer: a pool instruction of the target stage, chosen by hashing the prompt.

        The n-th identical request (same prompt, seed and temperature) gets the n-th draw, so
        repeated proposals differ as a sampling LM's would.
        """
        world = self.world
        stage = target_stage(world, prompt)
        pool = world.pool(stage)
        key = f"{seed}|{temperature}|{prompt.text}"
        with self._lock:
            occurrence = self._seen.get(key, 0)
            self._seen[key] = occurrence + 1
        instruction = pool[int(unit_hash(world.seed, "propose", key, occurrence) * len(pool))]
        if not prompt.outputs:
            return instruction
        values = {}
        for name in prompt.outputs:
            if "instruction" in name:
                values[name] = instruction
            elif name == "observations" and "prior_observations" in prompt.inputs:
                values[name] = "COMPLETE"
            else:
                values[name] = FILLER
        return render_answer(prompt, values)


def target_stage(world: World, prompt: Prompt) -> int:
    """The stage a proposer prompt is about.

    The stage whose known instruction (or stageopt's ``reads X and writes Y`` line) occurs last
    in the prompt wins; a ``basic_instruction`` field (MIPROv2's) is searched first. Otherwise
    the stage whose output field name occurs last, else stage 0.
    """
    regions = [prompt.values["basic_instruction"]] if "basic_instruction" in prompt.values else []
    regions.append(prompt.text)
    for region in regions:
        flat = " ".join(region.split()).lower()
        best, position = None, -1
        for stage in range(world.n_stages):
            source, target = world.fields[stage], world.fields[stage + 1]
            needles = [normalize(t) for t in world.universe(stage)]
            needles.append(f"reads {label(source)} and writes {label(target)}".lower())
            for needle in needles:
                found = flat.rfind(needle)
                if found > position:
                    best, position = stage, found
        if best is not None:
            return best
    flat = prompt.text.lower()
    positions = [flat.rfind(world.fields[stage + 1]) for stage in range(world.n_stages)]
    return max(range(world.n_stages), key=lambda s: positions[s]) if max(positions) >= 0 else 0


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    return "\n".join(str(getattr(part, "text", "") or "") for part in system)


class TestbedLM(dspy.LM):
    """The testbed's LM (SIMULATION): a ``dspy.LM`` whose engine answers from ``world``.

    Args:
        world: The hidden world.
        observer: Records the stage calls (see :class:`CallObserver`).
        **kwargs: Settings of ``dspy.LM`` (e.g. ``temperature``); DSPy's cache is always off,
            the simulation is cheaper than a cache lookup.
    """

    __test__ = False

    def __init__(self, world: World, *, observer: CallObserver | None = None, **kwargs: Any) -> None:
        kwargs.pop("cache", None)
        super().__init__("testbed/simulation", engine=TestbedEngine(world, observer), cache=False, **kwargs)
        self.world = world
        self.observer = observer
