"""Confirmation and racing against the winner's curse, on the testbed (a SIMULATION).

    python benchmarks/confirmation_testbed.py [--seeds 20] [--budget-calls 600] \
        [--strategies coordinate,joint,random] [--out benchmarks/results/confirmation_testbed.json] [--resume]

Each strategy gets the same 40 labelled validation examples per seed, used these ways:

- ``all40``: no confirmation, all 40 to select on (``confirm_size=0, val_size=None``);
- ``val20``: no confirmation, 20 to select on (the search noise of the next row);
- ``confirm20``: 20 to select on, 20 held out to confirm on (``confirm_size=20``, confidence 0.9);
- ``race40``, ``race_confirm20``: the same as ``all40`` and ``confirm20`` with racing (Optuna's
  WilcoxonPruner, stageopt's default ``Racing()``); the rows above score every candidate on
  every validation example (``racing=False``);
- ``race_confirm20@60%``: ``race_confirm20`` with 60 % of the budget (same regret, fewer calls?).

For each run the testbed knows the *true* (expected) score of the returned program and of the
unoptimized one, so it can tell what a user cannot:

- how often the returned program is truly worse than the original ("returned worse");
- how often a changed program came back at all;
- the mean true gain and the regret against the optimum;
- the logical LM calls spent.

Every cell is written as it finishes; ``--resume`` skips finished cells.

SIMULATION: the testbed LM is a script; this measures selection, not language-model quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from stageopt.testbed import run_one

SETTINGS: dict[str, dict[str, Any]] = {
    "all40": {"confirm_size": 0, "val_size": None, "racing": False},
    "val20": {"confirm_size": 0, "val_size": 20, "racing": False},
    "confirm20": {"confirm_size": 20, "val_size": None, "racing": False},
    "race40": {"confirm_size": 0, "val_size": None, "racing": True},
    "race_confirm20": {"confirm_size": 20, "val_size": None, "racing": True},
    "race_confirm20@60%": {"confirm_size": 20, "val_size": None, "racing": True},
}
#: Share of ``--budget-calls`` a setting gets (1 unless named here).
BUDGET_SHARE = {"race_confirm20@60%": 0.6}
N_VAL = 40
#: A returned program counts as worse when its true score is below the original's by more than this.
WORSE_BY = 1e-9


def _cell(strategy: str, setting: str, seed: int, budget: int) -> dict[str, Any]:
    budget = round(budget * BUDGET_SHARE.get(setting, 1.0))
    run = run_one(strategy, budget_calls=budget, seed=seed, options=SETTINGS[setting], n_val=N_VAL)
    true = run.true_score if run.true_score is not None else run.baseline
    return {
        "strategy": strategy,
        "setting": setting,
        "seed": seed,
        "status": run.status,
        "error": run.error,
        "baseline_true": run.baseline,
        "returned_true": true,
        "true_gain": true - run.baseline,
        "changed": abs(true - run.baseline) > WORSE_BY,
        "worse": true < run.baseline - WORSE_BY,
        "regret": run.optimum - true,
        "val_score": run.val_score,
        "lm_calls": run.lm_calls,
        "budget_calls": budget,
        "trials": run.n_trials,
        "pruned_trials": run.pruned_trials,
        "example_evaluations_saved": run.example_evaluations_saved,
        "wall_s": run.wall_s,
    }


def _summary(cells: list[dict[str, Any]], strategies: list[str], seeds: int) -> list[dict[str, Any]]:
    rows = []
    for strategy in strategies:
        for setting in SETTINGS:
            mine = [c for c in cells if c["strategy"] == strategy and c["setting"] == setting]
            if not mine:
                continue
            rows.append(
                {
                    "strategy": strategy,
                    "setting": setting,
                    "runs": len(mine),
                    "errors": sum(c["status"] == "error" for c in mine),
                    "returned_worse": sum(c["worse"] for c in mine),
                    "returned_changed": sum(c["changed"] for c in mine),
                    "no_significant_gain": sum(c["status"] == "no_significant_gain" for c in mine),
                    "mean_true_gain": statistics.fmean(c["true_gain"] for c in mine),
                    "mean_regret": statistics.fmean(c["regret"] for c in mine),
                    "mean_lm_calls": statistics.fmean(c["lm_calls"] or 0 for c in mine),
                    "mean_trials": statistics.fmean(c["trials"] or 0 for c in mine),
                    "mean_pruned_trials": statistics.fmean(c["pruned_trials"] or 0 for c in mine),
                    "mean_example_evaluations_saved": statistics.fmean(
                        c["example_evaluations_saved"] or 0 for c in mine
                    ),
                }
            )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    heads = ["strategy", "setting", "runs", "returned worse", "returned changed", "no_significant_gain"]
    heads += ["mean true gain", "mean regret", "mean LM calls", "trials", "pruned", "example-evals saved"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["strategy"], r["setting"], r["runs"], r["returned_worse"], r["returned_changed"]]
        cells += [r["no_significant_gain"], f"{r['mean_true_gain']:+.3f}", f"{r['mean_regret']:.3f}"]
        cells += [f"{r['mean_lm_calls']:.0f}", f"{r['mean_trials']:.1f}", f"{r['mean_pruned_trials']:.1f}"]
        cells += [f"{r['mean_example_evaluations_saved']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget-calls", type=int, default=600)
    parser.add_argument("--strategies", default="coordinate,joint,random")
    parser.add_argument("--out", default="benchmarks/results/confirmation_testbed.json")
    parser.add_argument("--resume", action="store_true", help="keep the finished cells of --out")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.budget_calls < 1:
        print("error: --seeds and --budget-calls must be >= 1", file=sys.stderr)
        return 2
    strategies = [s for s in args.strategies.split(",") if s]
    out = Path(args.out)
    data: dict[str, Any] = {"cells": {}}
    if args.resume and out.exists():
        data = json.loads(out.read_text())
        if data.get("budget_calls") != args.budget_calls:
            print(f"error: {out} was made with --budget-calls {data.get('budget_calls')}", file=sys.stderr)
            return 2
    data.update(
        command="python benchmarks/confirmation_testbed.py "
        f"--seeds {args.seeds} --budget-calls {args.budget_calls} --strategies {args.strategies}",
        budget_calls=args.budget_calls,
        n_val=N_VAL,
        settings=SETTINGS,
        note="SIMULATION: the testbed LM is a script; true scores are the testbed's exact expectations.",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for strategy in strategies:
        for setting in SETTINGS:
            for seed in range(args.seeds):
                key = f"{strategy}/{setting}/seed{seed}"
                if key in data["cells"]:
                    continue
                data["cells"][key] = _cell(strategy, setting, seed, args.budget_calls)
                out.write_text(json.dumps(data, indent=1))
    rows = _summary(list(data["cells"].values()), strategies, args.seeds)
    data["summary"] = rows
    data["wall_s"] = round(time.monotonic() - start, 1)
    out.write_text(json.dumps(data, indent=1))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
