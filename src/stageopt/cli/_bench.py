"""``stageopt bench testbed``: every strategy on the simulated testbed, regret and calls to 95 %.

SIMULATION: the testbed LM is a script, so the numbers measure search efficiency, not
language-model quality (see :mod:`stageopt.testbed`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from stageopt._errors import ConfigurationError

# The testbed (DSPy, Optuna) is imported when the command runs, so that building the CLI parser
# stays light.

logger = logging.getLogger(__name__)

#: Version of the JSON this command writes.
BENCH_SCHEMA_VERSION = 1


def add_testbed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stageopt bench testbed``."""
    parser.add_argument(
        "--strategies", default="all", help="'all' or comma-separated names (stageopt strategies, miprov2, bfsrs)"
    )
    parser.add_argument("--budget-calls", type=int, required=True, help="logical LM calls per run")
    parser.add_argument("--seeds", type=int, default=5, help="runs per strategy, seeds 0..N-1 (default: 5)")
    parser.add_argument("--stages", type=int, default=3, help="stages of the testbed program (default: 3)")
    parser.add_argument("--threshold", type=float, default=0.95, help="share of the optimum for 'calls to reach'")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/testbed_<budget>.json)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run."""
    line = (
        f"stageopt bench testbed --strategies {args.strategies} --budget-calls {args.budget_calls} "
        f"--seeds {args.seeds} --stages {args.stages}"
    )
    if args.threshold != 0.95:
        line += f" --threshold {args.threshold}"
    return line


def cmd_bench_testbed(args: argparse.Namespace) -> int:
    """Run the bench, print the table and write the JSON."""
    from stageopt.testbed import MAX_STAGES
    from stageopt.testbed._bench import SIMULATION_NOTE, resolve_strategies, run_one, summarize

    if args.budget_calls < 1:
        raise ConfigurationError(f"--budget-calls must be >= 1, got {args.budget_calls}")
    if args.seeds < 1:
        raise ConfigurationError(f"--seeds must be >= 1, got {args.seeds}")
    if not 1 <= args.stages <= MAX_STAGES:
        raise ConfigurationError(f"--stages must be in 1..{MAX_STAGES}, got {args.stages}")
    if not 0 < args.threshold <= 1:
        raise ConfigurationError(f"--threshold must be in (0, 1], got {args.threshold}")
    names = resolve_strategies(args.strategies)
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / f"testbed_{args.budget_calls}.json"
    print(SIMULATION_NOTE)
    print(
        f"testbed: {args.stages} stages, budget {args.budget_calls} LM calls per run, seeds 0..{args.seeds - 1} "
        f"(each seed draws its own hidden world), {len(names)} strategies"
    )
    start = time.monotonic()
    runs = []
    for name in names:
        for seed in range(args.seeds):
            run = run_one(
                name, budget_calls=args.budget_calls, seed=seed, n_stages=args.stages, threshold=args.threshold
            )
            runs.append(run)
            logger.info("%s seed %d: %s regret %s (%.1f s)", name, seed, run.status, run.regret, run.wall_s)
            print(f"  {name} seed {seed}: {run.status}", file=sys.stderr)
    summary = summarize(runs)
    print()
    print(bench_table(summary, args.threshold))
    data = {
        "schema_version": BENCH_SCHEMA_VERSION,
        "kind": "simulation",
        "note": SIMULATION_NOTE,
        "command": command_line(args),
        "settings": {
            "strategies": names,
            "budget_calls": args.budget_calls,
            "seeds": list(range(args.seeds)),
            "stages": args.stages,
            "threshold": args.threshold,
        },
        "summary": summary,
        "runs": [r.to_dict() for r in runs],
        "wall_s": round(time.monotonic() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {out} ({time.monotonic() - start:.0f} s)")
    return 0


def bench_table(summary: dict[str, dict[str, Any]], threshold: float = 0.95) -> str:
    """One row per strategy: mean ± std over seeds; a strategy that failed shows its error."""
    from stageopt.cli._commands import format_table
    from stageopt.testbed._bench import DSPY_OPTIMIZERS

    pct = f"{100 * threshold:g}%"
    headers = [
        "strategy (SIMULATION)",
        "ok",
        "regret",
        "true score",
        "pool regret",
        f"calls to {pct}",
        f"reached {pct}",
        f"calls to {pct} of pool opt.",
        "reached",
        "LM calls",
        "regret decay b",
        "note",
    ]
    rows: list[list[Any]] = []
    for name, s in summary.items():
        note = "; ".join(s["errors"])[:80] if s["errors"] else ""
        if name in DSPY_OPTIMIZERS and s["ok"]:
            note = note or "calls observed from the LM's stage calls"
        rows.append(
            [
                name,
                f"{s['ok']}/{s['runs']}",
                _pm(s["regret"]),
                _pm(s["true_score"]),
                _pm(s["pool_regret"]),
                _pm(s["calls_to_95"], digits=0),
                f"{s['reached_95']}/{s['ok']}" if s["ok"] else "-",
                _pm(s["calls_to_95_pool"], digits=0),
                f"{s['reached_95_pool']}/{s['ok']}" if s["ok"] else "-",
                _pm(s["lm_calls"], digits=0),
                _pm(s.get("regret_decay_b"), digits=2),
                note or "-",
            ]
        )
    first = next(iter(summary.values()), None)
    footer = ""
    if first is not None:
        footer = (
            f"\noptimum (universe) {_pm(first['optimum'])}, unoptimized program {_pm(first['baseline'])} "
            "(exact expected scores). regret = optimum - true score of the returned program; "
            "pool regret = best of the run's own candidates - true score; "
            f"calls to {pct} (of the universe optimum, or of the run's own pool optimum): "
            "mean over the seeds that reached it. regret decay b: the incumbent's true regret fitted "
            "as a * calls^-b per run (stageopt strategies), mean over seeds."
        )
    return format_table(headers, rows) + footer


def _pm(stat: dict[str, float] | None, *, digits: int = 3) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
