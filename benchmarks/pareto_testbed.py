"""NSGA-II Pareto search vs scalarised score - λ·cost on the testbed: hypervolume of the fronts (a SIMULATION).

    python benchmarks/pareto_testbed.py [--budget-calls 1200] [--seeds 6] [--lambdas 0,0.1,0.3,1] \
        [--out benchmarks/results/pareto_testbed.json]

Objectives: the score (maximised) and the mean tokens per example (minimised); the testbed LM
counts a prompt's words as its tokens, so demos and longer instructions cost more.

Methods, on the same world, seed and candidate pools (proposed once per seed and given to every
run through its study, so every budget pays for trials only; separate runs would each pay for
their own proposals, which would make the split below worse still):

* ``pareto``: :class:`stageopt.strategies.Pareto` (NSGA-II, population 8) with the whole budget.
* ``scalarised-split`` (the fair comparison): one :class:`~stageopt.strategies.JointBayesian`
  run per λ, each told ``score - λ · tokens / baseline tokens`` and given ``budget / len(λs)``
  calls, so the λs together spend what ``pareto`` spends. Each λ's sampler has its own seed
  (``seed + 1000 · i``), so the runs do not all start from the same random configurations.
* ``scalarised-full`` (a reference, not fair): the same runs, each with the whole budget, so
  ``len(λs)`` times as many calls in all.

Both scalarised methods run without early stopping, as ``pareto`` does. Per seed and method two
sets of points are compared by hypervolume (exact, 2-D) under one reference per seed (score 0,
1.1 x the most tokens any method measured): the *archive* (every configuration scored on the
whole validation set, by validation score) and the *returned* set (``pareto``'s front, or each
λ run's chosen program), by *true* score (the testbed's exact expected score). Hypervolumes are
divided by the reference box, so 1 is the unreachable corner (score 1 at zero tokens).

SIMULATION: the testbed LM is a script; this measures search behaviour, not LM quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter
from stageopt.strategies import (
    JointBayesian,
    Pareto,
    RunState,
    SearchSpace,
    TrialRecord,
    config_key,
    hypervolume,
    measure,
)
from stageopt.strategies._base import Direction
from stageopt.strategies._pareto import non_dominated
from stageopt.testbed import SIMULATION_NOTE, Testbed

METHODS = ("pareto", "scalarised-split", "scalarised-full")


class Scalarised(JointBayesian):
    """Joint TPE told ``score - lam * tokens / scale`` and returning the best by that value."""

    def __init__(self, *args: Any, lam: float, scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lam = lam
        self.scale = scale

    def value(self, record: TrialRecord) -> float:
        tokens = float((record.objectives or {}).get("tokens", 0.0))
        return record.score - self.lam * tokens / self.scale

    def trial_values(self, record: TrialRecord) -> float:
        return self.value(record)

    def select(self, state: RunState) -> TrialRecord | None:
        full = [r for r in state.records if r.fidelity == state.full_fidelity and r.variant is None]
        return max(full, key=lambda r: (self.value(r), -r.trial), default=None)


def _pools(testbed: Testbed, seed: int) -> dict[str, Any]:
    """The candidate pools of ``seed``'s world, proposed once (a run of one trial after the baseline)."""
    storage = optuna.storages.InMemoryStorage()
    proposer = JointBayesian(
        testbed.metric, budget=10**6, n_trials=1, lm=testbed.lm(), adapter=SmallLMAdapter(), seed=seed, storage=storage
    )
    proposer.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
    return dict(optuna.load_study(study_name="joint", storage=storage).user_attrs["space"])


def _settings(testbed: Testbed, seed: int, space: dict[str, Any], directions: list[Direction]) -> dict[str, Any]:
    """A run's settings, its study already holding ``space`` (so it proposes nothing and pays nothing for it)."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="run", directions=directions)
    study.set_user_attr("space", space)
    return {"lm": testbed.lm(), "adapter": SmallLMAdapter(), "seed": seed, "storage": storage, "study_name": "run"}


def _archive(records: list[dict[str, Any]], n_val: int) -> list[tuple[str, float, float]]:
    """(configuration key, validation score, tokens) of every configuration scored on the whole validation set."""
    seen: dict[str, tuple[str, float, float]] = {}
    for h in records:
        if h["fidelity"] == n_val and h["variant"] is None and h["objectives"]:
            key = config_key(h["params"])
            seen.setdefault(key, (key, h["score"], h["objectives"]["tokens"]))
    return list(seen.values())


def run_seed(seed: int, budget: int, lambdas: list[float]) -> dict[str, Any]:
    """Every method on the world of ``seed``: their points, spend and time."""
    testbed = Testbed(3, seed=seed)
    base = testbed.program()
    report = evaluate(base, testbed.valset, testbed.metric, lm=testbed.lm(), adapter=SmallLMAdapter())
    scale = measure(report.examples).tokens
    out: dict[str, Any] = {"seed": seed, "baseline_tokens": scale, "optimum": testbed.optimum().score, "methods": {}}
    space = _pools(testbed, seed)
    out["pool_optimum"] = testbed.space_optimum(SearchSpace.from_dict(space))

    start = time.perf_counter()
    settings = _settings(testbed, seed, space, ["maximize", "minimize"])
    pareto = Pareto(testbed.metric, budget=budget, objectives=("score", "tokens"), **settings)
    pareto.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
    assert pareto.result is not None
    assert pareto.front is not None
    returned = [(None, testbed.true_score(pareto.program_for(p)), p.values["tokens"]) for p in pareto.front.points]
    out["methods"]["pareto"] = {
        "lm_calls": pareto.result.usage["lm_calls"],
        "wall_s": round(time.perf_counter() - start, 2),
        "archive": _archive(pareto.result.history, len(testbed.valset)),
        "returned": returned,
    }
    for method, share in (("scalarised-split", budget // len(lambdas)), ("scalarised-full", budget)):
        start = time.perf_counter()
        archive: list[tuple[str, float, float]] = []
        chosen: list[tuple[None, float, float]] = []
        calls = 0
        for i, lam in enumerate(lambdas):
            # Each λ's sampler gets its own seed: with one seed every λ run would start from the same
            # random configurations and the split would score the same few programs four times.
            settings = _settings(testbed, seed + 1000 * i, space, ["maximize"])
            run = Scalarised(testbed.metric, budget=share, lam=lam, scale=scale, patience=None, **settings)
            program = run.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
            assert run.result is not None
            calls += run.result.usage["lm_calls"]
            archive += [p for p in _archive(run.result.history, len(testbed.valset)) if p not in archive]
            best = run.result.best
            if best["trial"] is not None:
                (record,) = [h for h in run.result.history if h["trial"] == best["trial"]]
                chosen.append((None, testbed.true_score(program), record["objectives"]["tokens"]))
        out["methods"][method] = {
            "lm_calls": calls,
            "wall_s": round(time.perf_counter() - start, 2),
            "archive": archive,
            "returned": chosen,
        }
    return out


def _hv(points: list[tuple[Any, float, float]], reference_tokens: float) -> float:
    """Normalised 2-D hypervolume of (score, tokens) points: score in [0, 1], tokens / reference."""
    vectors = [[-score, tokens / reference_tokens] for _, score, tokens in points]
    return hypervolume(vectors, [0.0, 1.0])


def _front_size(points: list[tuple[Any, float, float]]) -> int:
    return len(non_dominated([[-s, t] for _, s, t in points]))


def score_seed(seed_run: dict[str, Any]) -> dict[str, Any]:
    """Hypervolumes of one seed's methods under a shared reference."""
    tokens = [t for m in seed_run["methods"].values() for key in ("archive", "returned") for _, _, t in m[key]]
    reference = 1.1 * max(tokens)
    row: dict[str, Any] = {"seed": seed_run["seed"], "reference_tokens": round(reference, 2)}
    for method, data in seed_run["methods"].items():
        row[method] = {
            "hv_archive_val": round(_hv(data["archive"], reference), 4),
            "hv_returned_true": round(_hv(data["returned"], reference), 4),
            "archive_front": _front_size(data["archive"]),
            "returned": len(data["returned"]),
            "configs": len(data["archive"]),
            "lm_calls": data["lm_calls"],
        }
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means and sds over seeds, and seed-by-seed wins of pareto over scalarised-split."""
    summary: dict[str, Any] = {}
    for method in METHODS:
        entry: dict[str, Any] = {}
        for key in ("hv_archive_val", "hv_returned_true", "archive_front", "returned", "configs", "lm_calls"):
            values = [float(r[method][key]) for r in rows]
            entry[key] = {
                "mean": round(statistics.fmean(values), 4),
                "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            }
        summary[method] = entry
    for key in ("hv_archive_val", "hv_returned_true"):
        diffs = [r["pareto"][key] - r["scalarised-split"][key] for r in rows]
        summary[f"pareto_minus_split_{key}"] = {
            "mean": round(statistics.fmean(diffs), 4),
            "pareto_better": sum(d > 1e-9 for d in diffs),
            "split_better": sum(d < -1e-9 for d in diffs),
            "ties": sum(abs(d) <= 1e-9 for d in diffs),
        }
    return summary


def markdown(settings: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any], command: str) -> str:
    lines = [
        "# NSGA-II Pareto vs scalarised score - λ·tokens on the testbed — a SIMULATION",
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
        f"Result: `{Path(settings['out']).name}` (settings, per-seed hypervolumes, summary, every point).",
        SIMULATION_NOTE,
        "",
        f"Budget {settings['budget_calls']} logical LM calls per method; λs {settings['lambdas']} "
        f"(`scalarised-split`: {settings['budget_calls'] // len(settings['lambdas'])} calls per λ, the fair "
        "comparison; `scalarised-full`: the whole budget per λ, "
        f"{len(settings['lambdas'])}x the calls, a reference); seeds {settings['seeds']}; 3-stage testbed, "
        "20 validation examples. Hypervolume: exact 2-D, normalised to the reference box (score 0, 1.1 x "
        "the most tokens measured in that seed); archive = every configuration scored on the whole validation "
        "set, by validation score; returned = the Pareto front / each λ's chosen program, by true score.",
        "",
        "| method | HV archive (val) | HV returned (true) | archive front size | returned programs | "
        "configurations scored | LM calls |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        s = summary[method]

        def cell(key: str, s: dict[str, Any] = s) -> str:
            return f"{s[key]['mean']:.3f} ± {s[key]['sd']:.3f}"

        lines.append(
            f"| {method} | {cell('hv_archive_val')} | {cell('hv_returned_true')} | {cell('archive_front')} | "
            f"{cell('returned')} | {cell('configs')} | {s['lm_calls']['mean']:.0f} |"
        )
    lines += ["", "Seed by seed, pareto vs scalarised-split (same total budget):", ""]
    for key, label in (("hv_archive_val", "archive (validation)"), ("hv_returned_true", "returned set (true)")):
        d = summary[f"pareto_minus_split_{key}"]
        lines.append(
            f"- {label}: mean difference {d['mean']:+.4f}; pareto better on {d['pareto_better']} seeds, "
            f"split on {d['split_better']}, ties {d['ties']}."
        )
    lines += [
        "",
        "| seed | " + " | ".join(f"{m} HV archive / returned" for m in METHODS) + " |",
        "| --- | " + " | ".join("---" for _ in METHODS) + " |",
    ]
    for r in rows:
        cells = [f"{r[m]['hv_archive_val']:.3f} / {r[m]['hv_returned_true']:.3f}" for m in METHODS]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    archive = summary["pareto_minus_split_hv_archive_val"]
    returned = summary["pareto_minus_split_hv_returned_true"]
    lines += [
        "",
        "**Reading.** On the same total budget, which covers the front better: "
        f"of everything scored (archive, validation scores) the difference is {archive['mean']:+.3f} "
        f"({archive['pareto_better']} seeds to {archive['split_better']}); of what each method hands back "
        f"(returned set, true scores) it is {returned['mean']:+.3f} ({returned['pareto_better']} seeds to "
        f"{returned['split_better']}). Caveats: the returned sets differ in size (the whole front against one "
        "program per λ, so a front can only gain from more points); split λ runs are short (few trials "
        "each, most of them TPE's random start-up); `scalarised-full` shows what the λ runs reach with "
        f"{len(settings['lambdas'])}x the budget. Fair by budget is the split: every method spends the same "
        "logical LM calls on the same candidate pools.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--budget-calls", type=int, default=1200)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--lambdas", default="0,0.1,0.3,1")
    parser.add_argument("--out", default="benchmarks/results/pareto_testbed.json")
    args = parser.parse_args(argv)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    runs = [run_seed(seed, args.budget_calls, lambdas) for seed in range(args.seeds)]
    rows = [score_seed(r) for r in runs]
    summary = summarize(rows)
    settings = {
        "budget_calls": args.budget_calls,
        "seeds": list(range(args.seeds)),
        "lambdas": lambdas,
        "out": args.out,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "summary": summary, "seeds": rows, "runs": runs}, indent=1))
    command = "python benchmarks/pareto_testbed.py " + " ".join(
        [f"--budget-calls {args.budget_calls}", f"--seeds {args.seeds}", f"--lambdas {args.lambdas}"]
    )
    out.with_suffix(".md").write_text(markdown(settings, rows, summary, command))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {out.with_suffix('.md')} in {settings['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
