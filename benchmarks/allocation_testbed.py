"""Budget by stage criticality on the testbed: ``allocate="blame"`` vs ``"equal"`` (a SIMULATION).

    python benchmarks/allocation_testbed.py [--budget-calls 1500] [--seeds 8] \
        [--strategies coordinate,hierarchical] [--out benchmarks/results/allocation_testbed.json]

For each world shape, strategy, allocation and seed, one testbed run (``stageopt.testbed.run_one``)
measures the LM calls spent when the *incumbent* (the program the run would return at that point)
first has a true score of at least ``baseline + f * (optimum - baseline)``, for f = 0.5 and 0.8
(``calls_to_gap``). World shapes: ``balanced`` (the plain testbed world) and ``bottleneck-i``
(stage i's logit offset -2.0, the other stages +1.5: one low, improvable stage, the others nearly
saturated). Seeds draw the world and seed the optimizer; equal and blame runs of one seed share
the world and the candidate pools, so they are compared seed by seed.

SIMULATION: the testbed LM is a script; this measures search efficiency, not LM quality.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from stageopt.testbed import SIMULATION_NOTE, run_one

#: World shapes: name -> logit offset of each of the three stages (None: the plain world).
WORLDS: dict[str, list[float] | None] = {
    "balanced": None,
    "bottleneck-0": [-2.0, 1.5, 1.5],
    "bottleneck-1": [1.5, -2.0, 1.5],
    "bottleneck-2": [1.5, 1.5, -2.0],
}
FRACTIONS = ("0.5", "0.8")
ALLOCATIONS = ("equal", "blame")


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def summarize(runs: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    """One row per (world, strategy, allocation), and the seed-by-seed comparison of blame vs equal.

    ``calls`` is the mean over the seeds that reached the target; ``calls_censored`` counts a
    seed that never reached it as the whole budget (a lower bound on its cost), so the two
    allocations are compared on the same seeds. ``blame_fewer`` / ``equal_fewer`` / ``ties``
    count seeds where one allocation reached the target with fewer calls (not reaching it counts
    as more calls than any reach). ``bottleneck_top_share`` (bottleneck worlds): blame runs whose
    probes gave the bottleneck stage a larger share than every other stage.
    """
    rows = []
    keys = dict.fromkeys((r["world"], r["strategy"]) for r in runs)
    for world, strategy in keys:
        mine = {
            a: [r for r in runs if (r["world"], r["strategy"], r["allocate"]) == (world, strategy, a)]
            for a in ALLOCATIONS
        }
        row: dict[str, Any] = {"world": world, "strategy": strategy}
        for allocate, group in mine.items():
            ok = [r for r in group if r["status"] != "error"]
            entry: dict[str, Any] = {
                "runs": len(group),
                "errors": sorted({r["error"] for r in group if r["error"]}),
                "true_score": round(statistics.fmean(r["true_score"] for r in ok), 4) if ok else None,
                "lm_calls": _mean([r["lm_calls"] for r in ok]),
            }
            for f in FRACTIONS:
                reached = [r["calls_to_gap"][f] for r in ok if r["calls_to_gap"].get(f) is not None]
                censored = [r["calls_to_gap"].get(f) or budget for r in ok]
                entry[f"gap_{f}"] = {
                    "reached": len(reached),
                    "calls": _mean(reached),
                    "calls_censored": _mean(censored),
                }
            row[allocate] = entry
        for f in FRACTIONS:
            by_seed = {
                a: {r["seed"]: r["calls_to_gap"].get(f) for r in mine[a] if r["status"] != "error"} for a in ALLOCATIONS
            }
            blame, equal, ties = 0, 0, 0
            for seed in sorted(set(by_seed["equal"]) & set(by_seed["blame"])):
                e, b = by_seed["equal"][seed], by_seed["blame"][seed]
                e_cost, b_cost = (budget + 1 if e is None else e), (budget + 1 if b is None else b)
                if b_cost < e_cost:
                    blame += 1
                elif e_cost < b_cost:
                    equal += 1
                else:
                    ties += 1
            row[f"seeds_gap_{f}"] = {"blame_fewer": blame, "equal_fewer": equal, "ties": ties}
        offsets = WORLDS.get(world)
        if offsets is not None:  # did the probes find the bottleneck (the stage with the lowest offset)?
            bottleneck = offsets.index(min(offsets))
            found = 0
            for r in mine["blame"]:
                shares = list((r.get("allocation") or {}).get("shares", {}).values())
                if shares and shares[bottleneck] > max(s for i, s in enumerate(shares) if i != bottleneck):
                    found += 1
            row["bottleneck_top_share"] = f"{found}/{len(mine['blame'])}"
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: calls to 50 % / 80 % of the gap, equal vs blame."""
    lines = [
        "| world | strategy | f | equal: reached, calls (censored) | blame: reached, calls (censored) "
        "| seeds blame/equal/tie fewer | true score equal → blame | bottleneck top share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for f in FRACTIONS:
            cells = []
            for allocate in ALLOCATIONS:
                g = row[allocate][f"gap_{f}"]
                cells.append(f"{g['reached']}/{row[allocate]['runs']}, {g['calls']} ({g['calls_censored']})")
            seeds = row[f"seeds_gap_{f}"]
            lines.append(
                f"| {row['world']} | {row['strategy']} | {float(f):.0%} | {cells[0]} | {cells[1]} | "
                f"{seeds['blame_fewer']}/{seeds['equal_fewer']}/{seeds['ties']} | "
                f"{row['equal']['true_score']} → {row['blame']['true_score']} | "
                f"{row.get('bottleneck_top_share', '-')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-calls", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--strategies", default="coordinate,hierarchical")
    parser.add_argument("--out", default="benchmarks/results/allocation_testbed.json")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    start = time.monotonic()
    runs: list[dict[str, Any]] = []
    for world, offsets in WORLDS.items():
        for strategy in strategies:
            for allocate in ALLOCATIONS:
                for seed in range(args.seeds):
                    run = run_one(
                        strategy,
                        budget_calls=args.budget_calls,
                        seed=seed,
                        options={"allocate": allocate},
                        stage_offsets=offsets,
                    )
                    runs.append({"world": world, "allocate": allocate, **run.to_dict()})
                print(f"  {world} {strategy} {allocate}: done ({time.monotonic() - start:.0f} s)", file=sys.stderr)
    rows = summarize(runs, args.budget_calls)
    command = (
        f"python benchmarks/allocation_testbed.py --budget-calls {args.budget_calls} --seeds {args.seeds} "
        f"--strategies {','.join(strategies)}"
    )
    data = {
        "kind": "simulation",
        "note": SIMULATION_NOTE,
        "command": command,
        "settings": {
            "budget_calls": args.budget_calls,
            "seeds": list(range(args.seeds)),
            "strategies": strategies,
            "worlds": WORLDS,
            "gap_fractions": [float(f) for f in FRACTIONS],
            "blame": "allocate='blame' with its defaults (probe_size=5, probe_trials_per_stage=2, min_share=0.1)",
        },
        "summary": rows,
        "runs": runs,
        "wall_s": round(time.monotonic() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(SIMULATION_NOTE)
    print(table(rows))
    print(f"\nwrote {out} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
