"""Warm start on HotpotQA with the embedded model: calls to reach baseline + X with and without it.

    python benchmarks/warmstart_hotpotqa.py --source RUN_DIR [--cold RUN_DIR] [--seed 1] \
        [--budget-calls 500] [--val-size 10] [--n-dev 30] [--out benchmarks/results/warmstart_hotpotqa]

``stageopt optimize --strategy coordinate`` with ``--warm-start SOURCE`` (the best configurations
of an earlier run, scored right after the baseline) and without it (``--cold``: an existing run
with the same seed, budget and validation size, else run here), same seed and so the same
validation examples. From each ``result.json``: the logical LM calls at which the incumbent's
validation F1 first reached the run's baseline + ``target``, the final validation F1, and the
optimized program's F1 on the first ``n-dev`` dev examples. Writes ``OUT/summary.json`` and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.blame_hotpotqa import TARGETS, calls_to_reach, run, score_on_dev


def measure(run_dir: Path, n_dev: int) -> dict[str, Any]:
    """Calls to each target, validation scores and dev F1 of one run directory."""
    result = json.loads((run_dir / "result.json").read_text())
    dev = score_on_dev(run_dir, n_dev)
    return {
        "run_dir": str(run_dir),
        "lm_calls": result["usage"]["lm_calls"],
        "validation_baseline": result["baseline"]["score"],
        "validation_best": result["best"]["score"],
        "calls_to_gain": {str(t): calls_to_reach(result, t) for t in TARGETS},
        "warm_trials": sum(1 for r in result["history"] if r["phase"] == "warm_start"),
        "dev_f1": dev["score"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="run directory to warm-start from")
    parser.add_argument("--cold", default=None, help="existing run with the same settings and no warm start")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget-calls", type=int, default=500)
    parser.add_argument("--val-size", type=int, default=10)
    parser.add_argument("--n-dev", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/warmstart_hotpotqa")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.monotonic()
    common = [
        "optimize",
        "--task",
        "hotpotqa",
        "--strategy",
        "coordinate",
        "--budget-calls",
        str(args.budget_calls),
        "--val-size",
        str(args.val_size),
        "--seed",
        str(args.seed),
    ]
    cold = Path(args.cold) if args.cold else out / "runs" / f"cold-seed{args.seed}"
    if not (cold / "result.json").exists():
        run([*common, "--out", str(cold)])
    warm = out / "runs" / f"warm-seed{args.seed}"
    if not (warm / "result.json").exists():
        run([*common, "--warm-start", args.source, "--out", str(warm)])
    rows = {"cold": measure(cold, args.n_dev), "warm": measure(warm, args.n_dev)}
    summary = {"settings": vars(args), "targets": list(TARGETS), "runs": rows, "wall_s": time.monotonic() - start}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| start | val baseline → best | " + " | ".join(f"calls to +{t}" for t in TARGETS) + " | dev F1 | calls |")
    print("|---|---|" + "---|" * len(TARGETS) + "---|---|")
    for name, row in rows.items():
        reach = " | ".join(str(row["calls_to_gain"][str(t)] or "-") for t in TARGETS)
        print(
            f"| {name} | {row['validation_baseline']:.3f} → {row['validation_best']:.3f} | {reach} | "
            f"{row['dev_f1']:.3f} | {row['lm_calls']} |"
        )


if __name__ == "__main__":
    main()
