"""Demo sets from traces: bootstrapped (successful stage outputs) and labeled (gold outputs)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import dspy

from stageopt._errors import ConfigurationError
from stageopt.proposers._base import BaseDemoProposer, Demo, ProposalContext


class BootstrapDemoProposer(BaseDemoProposer):
    """Builds demo sets from the shared traces of the unoptimized program on the trainset.

    * A *bootstrapped* demo is a stage's own inputs and outputs from a trace that succeeded: the
      stage's task-defined metric reached the threshold when it has one (e.g. retrieval recall
      for a query stage), else the end-to-end score did (as DSPy's BootstrapFewShot).
    * A *labeled* demo is a stage's inputs from a trace with its output replaced by the gold
      label, for stages whose output fields are labels of the example (e.g. ``answer``).

    Args:
        max_bootstrapped_demos: Bootstrapped demos per set (DSPy's name).
        max_labeled_demos: Labeled demos per set, used to fill a set up to
            ``max_bootstrapped_demos + max_labeled_demos``.
        num_candidate_sets: Demo sets proposed per stage.
    """

    def __init__(
        self, *, max_bootstrapped_demos: int = 2, max_labeled_demos: int = 2, num_candidate_sets: int = 4
    ) -> None:
        for name, value in (
            ("max_bootstrapped_demos", max_bootstrapped_demos),
            ("max_labeled_demos", max_labeled_demos),
            ("num_candidate_sets", num_candidate_sets),
        ):
            if value < 0:
                raise ConfigurationError(f"`{name}` must be >= 0, got {name}={value}")
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.num_candidate_sets = num_candidate_sets

    def pools(self, program: dspy.Module, context: ProposalContext) -> dict[str, tuple[list[Demo], list[Demo]]]:
        """(bootstrapped, labeled) demo pools per stage."""
        pools: dict[str, tuple[list[Demo], list[Demo]]] = {}
        examples = {i: ex for i, ex in enumerate(context.trainset)}
        for name, predictor in program.named_predictors():
            outputs = list(predictor.signature.output_fields)
            boot: list[Demo] = []
            labeled: list[Demo] = []
            for result in context.traces:
                if result.error:
                    continue
                example = examples.get(result.index)
                good = result.stage_metrics.get(name, result.score) >= context.threshold
                for step in result.trace:
                    if step["stage"] != name:
                        continue
                    demo = {**step["inputs"], **{k: step["outputs"].get(k) for k in outputs}}
                    if good and all(demo.get(k) for k in outputs):
                        boot.append(demo)
                    if example is not None and all(example.get(k) for k in outputs):
                        labeled.append({**step["inputs"], **{k: example.get(k) for k in outputs}})
                    break  # one demo per stage per example
            pools[name] = (boot, labeled)
        return pools

    def propose(self, program: dspy.Module, context: ProposalContext) -> Mapping[str, list[list[Demo]]]:
        """Sample ``num_candidate_sets`` distinct demo sets per stage (see the class docstring).

        Set sizes spread from one demo up to ``max_bootstrapped_demos + max_labeled_demos``, so the
        search also chooses how many demos a stage gets (prompt size matters to small models).
        Bootstrapped demos come first; labeled demos fill the rest, never repeating an input.
        """
        rng = random.Random(context.seed)
        pools = self.pools(program, context)
        total = self.max_bootstrapped_demos + self.max_labeled_demos
        proposals: dict[str, list[list[Demo]]] = {}
        for name, (boot, labeled) in pools.items():
            sets: list[list[Demo]] = []
            seen: set[str] = set()
            for attempt in range(self.num_candidate_sets * 3):
                if len(sets) >= self.num_candidate_sets or total == 0:
                    break
                size = max(1, round(total * (attempt % self.num_candidate_sets + 1) / self.num_candidate_sets))
                chosen = rng.sample(boot, min(self.max_bootstrapped_demos, size, len(boot)))
                taken = {_input_key(d, program, name) for d in chosen}
                rest = [d for d in labeled if _input_key(d, program, name) not in taken]
                chosen += rng.sample(rest, min(size - len(chosen), self.max_labeled_demos, len(rest)))
                if not chosen:
                    break
                key = repr(sorted(repr(sorted(d.items())) for d in chosen))
                if key not in seen:
                    seen.add(key)
                    sets.append(chosen)
            proposals[name] = sets
        context.notes["demo_pools"] = {
            name: {"bootstrapped": len(b), "labeled": len(lab)} for name, (b, lab) in pools.items()
        }
        return proposals


def _input_key(demo: Demo, program: dspy.Module, stage: str) -> str:
    predictor = dict(program.named_predictors())[stage]
    return repr([demo.get(k) for k in predictor.signature.input_fields])
