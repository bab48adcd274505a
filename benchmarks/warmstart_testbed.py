"""Warm start on the testbed, and PBT vs evolutionary (a SIMULATION).

    python benchmarks/warmstart_testbed.py [--budget-calls 800] [--seeds 10] \
        [--strategies coordinate,joint,evolutionary,pbt] [--out benchmarks/results/warmstart_testbed.json]

**Warm start.** For each seed, a *source* run (joint, ``--source-budget`` calls) optimizes a world
related to the target: ``perturbed-<noise>`` = the target's world with every instruction
quality, style affinity and demo utility moved by independent N(0, noise) noise, noise = 0.5 and
1.0 (``--noise``; same texts and styles, so its best configuration is good but not the best for
the target); ``unrelated`` = the world of another seed (other instruction texts and qualities;
only the demo *examples* are shared). Each
strategy then optimizes the target world (the plain testbed world of the seed) without and with
``warm_start`` from the source (its top 3 configurations). Measured: the logical LM calls spent
when the *incumbent* (the best full-validation trial so far, what the run would return) first has
a true score of at least the unoptimized program's true score + X (X = 0.2, 0.3, 0.4), and
baseline + f x (optimum - baseline) (f = 80 %, 90 %; comparable across seeds, whose baselines
and optima differ), proposals, baseline and warm trials included.

**PBT vs evolutionary.** Both strategies with their defaults on the plain world of each seed
(``stageopt.testbed.run_one``): true score, regret, and calls to 50 % / 80 % of the gap between
the unoptimized program and the optimum.

SIMULATION: the testbed LM is a script; this measures search efficiency, not LM quality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from stageopt.diagnostics import best_so_far
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import STRATEGIES, SearchSpace, WarmStart
from stageopt.testbed import SIMULATION_NOTE, InstructionProfile, Testbed, World, run_one
from stageopt.testbed._world import unit_hash

#: Score gains over the unoptimized program's true score that the warm-start measure waits for.
GAINS = (0.2, 0.3, 0.4)

#: Fractions of the gap between the unoptimized program and the optimum, waited for as well.
GAP_FRACTIONS = (0.8, 0.9)


#: How the source world relates to the target world.
def source_kinds(noises: list[float]) -> list[str]:
    """Names of the source worlds: ``perturbed-<noise>`` for each noise, then ``unrelated``."""
    return [*(f"perturbed-{noise:g}" for noise in noises), "unrelated"]


def _gauss(*parts: Any) -> float:
    """A deterministic standard normal draw from ``parts`` (Box-Muller on two hashes)."""
    u1 = max(unit_hash(*parts, "u1"), 1e-12)
    u2 = unit_hash(*parts, "u2")
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


class PerturbedWorld(World):
    """A testbed world with the same instruction texts and styles as ``World(seed=seed)``, and
    every quality, affinity and demo utility moved by independent N(0, ``noise``) noise."""

    def __init__(self, *, seed: int, noise: float, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self.noise = noise

    def profile(self, stage: int, text: str | None) -> InstructionProfile:
        base = super().profile(stage, text)
        key = base.text if base.known else f"alias:{text}"
        return dataclasses.replace(
            base,
            quality=base.quality + self.noise * _gauss(self.seed, "perturb", stage, key, "quality"),
            affinity=tuple(
                a + self.noise * _gauss(self.seed, "perturb", stage, key, "affinity", i)
                for i, a in enumerate(base.affinity)
            ),
        )

    def utility(self, stage: int, example: int) -> float:
        return super().utility(stage, example) + self.noise * _gauss(self.seed, "perturb", stage, example, "utility")


def _source_testbed(kind: str, seed: int) -> Testbed:
    if kind == "unrelated":
        return Testbed(seed=seed + 1000)
    testbed = Testbed(seed=seed)
    noise = float(kind.removeprefix("perturbed-"))
    testbed.world = PerturbedWorld(seed=seed, noise=noise, train_ids=testbed.world.train_ids)
    return testbed


def _optimize(
    testbed: Testbed, strategy: str, budget: int, seed: int, storage: Any, study: str, warm: WarmStart | None
) -> dict[str, Any]:
    """One run on ``testbed``; the incumbent's true score after each trial."""
    optimizer = STRATEGIES[strategy](
        testbed.metric,
        budget=budget,
        lm=testbed.lm(),
        adapter=SmallLMAdapter(),
        seed=seed,
        storage=storage,
        study_name=study,
        warm_start=warm,
    )
    program = optimizer.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
    result = optimizer.result
    assert result is not None
    space = SearchSpace.from_dict(optuna.load_study(study_name=study, storage=storage).user_attrs["space"])
    params = {int(r["trial"]): r["params"] for r in result.history}
    base = testbed.program()
    true_of: dict[int, float] = {}
    curve = []
    for point in best_so_far(result.history):
        if point.best_trial not in true_of:
            true_of[point.best_trial] = testbed.true_score(space.apply(base, params[point.best_trial]))
        curve.append((point.lm_calls, true_of[point.best_trial]))
    warm_note = result.notes.get("warm_start") or {}
    return {
        "status": result.status,
        "lm_calls": int(result.usage["lm_calls"]),
        "true_score": testbed.true_score(program),
        "curve": curve,
        "warm_trials": sum(h["phase"] == "warm_start" for h in result.history),
        "warm_stages": warm_note.get("stages"),
    }


def targets(baseline: float, optimum: float) -> dict[str, float]:
    """The true scores the warm-start measure waits for, by name (``+0.2``, ``80% gap``, ...)."""
    out = {f"+{gain:g}": baseline + gain for gain in GAINS}
    out.update({f"{100 * f:g}% gap": baseline + f * (optimum - baseline) for f in GAP_FRACTIONS})
    return out


def warm_start_runs(
    seeds: int, strategies: list[str], budget: int, source_budget: int, kinds: list[str]
) -> list[dict[str, Any]]:
    runs = []
    shm = Path("/dev/shm")  # SQLite commits on a RAM disk where there is one
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        for seed in range(seeds):
            target = Testbed(seed=seed)
            baseline = target.true_score(target.program())
            optimum = target.optimum().score
            sources = {}
            for kind in kinds:
                url = f"sqlite:///{Path(tmp) / f'{kind}-{seed}.db'}"
                source = _optimize(_source_testbed(kind, seed), "joint", source_budget, seed, url, "source", None)
                sources[kind] = WarmStart(url, "source", top_k=3)
                runs.append(
                    {"kind": "source", "source": kind, "seed": seed, "true_score_on_source": source["true_score"]}
                )
            for strategy in strategies:
                for warm_kind in (None, *kinds):
                    storage = optuna.storages.InMemoryStorage()
                    warm = sources[warm_kind] if warm_kind else None
                    run = _optimize(target, strategy, budget, seed, storage, strategy, warm)
                    curve = run.pop("curve")
                    reach = {
                        name: next((c for c, true in curve if true >= target - 1e-12), None)
                        for name, target in targets(baseline, optimum).items()
                    }
                    runs.append(
                        {
                            "kind": "target",
                            "strategy": strategy,
                            "warm_start": warm_kind or "none",
                            "seed": seed,
                            "baseline": baseline,
                            "optimum": optimum,
                            "calls_to_gain": reach,
                            **run,
                        }
                    )
    return runs


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def summarize_warm(runs: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """Per strategy and warm start, for each target: seeds that reached it, mean calls over those,
    mean calls with a miss counted as the whole budget, and seeds that needed fewer / more calls
    than the same seed without warm start (a miss counts as more than any reach)."""
    rows = []
    mine = [r for r in runs if r["kind"] == "target"]
    for strategy in dict.fromkeys(r["strategy"] for r in mine):
        cold = {r["seed"]: r for r in mine if r["strategy"] == strategy and r["warm_start"] == "none"}
        for kind in dict.fromkeys(r["warm_start"] for r in mine):
            group = [r for r in mine if r["strategy"] == strategy and r["warm_start"] == kind]
            row: dict[str, Any] = {
                "strategy": strategy,
                "warm_start": kind,
                "runs": len(group),
                "true_score": round(statistics.fmean(r["true_score"] for r in group), 4),
                "warm_trials": _mean([r["warm_trials"] for r in group]),
            }
            for key in targets(0.0, 1.0):
                reached = [r["calls_to_gain"][key] for r in group if r["calls_to_gain"][key] is not None]
                censored = [r["calls_to_gain"][key] or budget for r in group]
                fewer = sum(
                    (r["calls_to_gain"][key] or budget + 1) < (cold[r["seed"]]["calls_to_gain"][key] or budget + 1)
                    for r in group
                )
                more = sum(
                    (r["calls_to_gain"][key] or budget + 1) > (cold[r["seed"]]["calls_to_gain"][key] or budget + 1)
                    for r in group
                )
                row[key] = {
                    "reached": len(reached),
                    "calls": _mean(reached),
                    "calls_censored": _mean(censored),
                    "seeds_fewer_than_cold": fewer if kind != "none" else None,
                    "seeds_more_than_cold": more if kind != "none" else None,
                }
            rows.append(row)
    return rows


def pbt_runs(seeds: int, budgets: list[int]) -> list[dict[str, Any]]:
    out = []
    for budget in budgets:
        for strategy in ("pbt", "evolutionary"):
            for seed in range(seeds):
                run = run_one(strategy, budget_calls=budget, seed=seed)
                out.append({"budget": budget, **run.to_dict()})
    return out


def summarize_pbt(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for budget, strategy in dict.fromkeys((r["budget"], r["strategy"]) for r in runs):
        group = [r for r in runs if (r["budget"], r["strategy"]) == (budget, strategy) and r["status"] != "error"]
        row: dict[str, Any] = {
            "budget": budget,
            "strategy": strategy,
            "runs": len(group),
            "errors": sorted({r["error"] for r in runs if r["strategy"] == strategy and r["error"]}),
            "true_score": round(statistics.fmean(r["true_score"] for r in group), 4),
            "regret": round(statistics.fmean(r["regret"] for r in group), 4),
            "regret_std": round(statistics.stdev(r["regret"] for r in group), 4) if len(group) > 1 else 0.0,
        }
        for f in ("0.5", "0.8"):
            reached = [r["calls_to_gap"][f] for r in group if r["calls_to_gap"].get(f) is not None]
            row[f"gap_{f}"] = {"reached": len(reached), "calls": _mean(reached)}
        rows.append(row)
    return rows


def _cell(entry: dict[str, Any], n: int) -> str:
    extra = ""
    if entry.get("seeds_fewer_than_cold") is not None:
        extra = f"; {entry['seeds_fewer_than_cold']}/{entry['seeds_more_than_cold']}"
    return f"{entry['reached']}/{n}, {entry['calls']} ({entry['calls_censored']}){extra}"


def tables(warm_rows: list[dict[str, Any]], pbt_rows: list[dict[str, Any]]) -> str:
    names = list(targets(0.0, 1.0))
    head = ["strategy", "warm start", *names, "true score", "warm trials"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in warm_rows:
        cells = [_cell(row[name], row["runs"]) for name in names]
        lines.append(
            f"| {row['strategy']} | {row['warm_start']} | " + " | ".join(cells) + f" | {row['true_score']} | "
            f"{row['warm_trials']} |"
        )
    lines += [
        "",
        "| budget | strategy | true score | regret (std) | 50 % of gap: reached, calls | 80 %: reached, calls |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for row in pbt_rows:
        lines.append(
            f"| {row['budget']} | {row['strategy']} | {row['true_score']} | {row['regret']} ({row['regret_std']}) | "
            f"{row['gap_0.5']['reached']}/{row['runs']}, {row['gap_0.5']['calls']} | "
            f"{row['gap_0.8']['reached']}/{row['runs']}, {row['gap_0.8']['calls']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-calls", type=int, default=800, help="budget of each target run")
    parser.add_argument("--source-budget", type=int, default=1000, help="budget of each source run (joint)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--strategies", default="coordinate,joint,evolutionary,pbt")
    parser.add_argument("--noise", default="0.5,1.0", help="stds of the perturbation of the related worlds")
    parser.add_argument("--pbt-budgets", default="800,1500", help="budgets of the PBT vs evolutionary runs")
    parser.add_argument("--out", default="benchmarks/results/warmstart_testbed.json")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; known: {sorted(STRATEGIES)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    kinds = source_kinds([float(n) for n in args.noise.split(",")])
    warm = warm_start_runs(args.seeds, strategies, args.budget_calls, args.source_budget, kinds)
    pbt = pbt_runs(args.seeds, [int(b) for b in args.pbt_budgets.split(",")])
    warm_rows, pbt_rows = summarize_warm(warm, args.budget_calls), summarize_pbt(pbt)
    command = "python benchmarks/warmstart_testbed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "note": SIMULATION_NOTE,
        "command": command.strip(),
        "settings": {**vars(args), "gains": list(GAINS), "gap_fractions": list(GAP_FRACTIONS)},
        "wall_s": round(time.perf_counter() - start, 1),
        "warm_start": {"summary": warm_rows, "runs": warm},
        "pbt_vs_evolutionary": {"summary": pbt_rows, "runs": pbt},
    }
    out.write_text(json.dumps(data, indent=2))
    print(tables(warm_rows, pbt_rows))
    print(f"\nwrote {out} ({data['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
