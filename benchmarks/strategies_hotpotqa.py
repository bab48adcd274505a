"""Every strategy on HotpotQA with the embedded model, same budget, seed, data and evaluation.

    python benchmarks/strategies_hotpotqa.py --budget-calls 150 --val-size 8 --n-dev 20 \
        [--strategies all|name,name] [--lm gemma3-270m] [--out benchmarks/results/strategies_hotpotqa.json]

Each strategy optimizes the three-stage program (query1 -> query2 -> answer) within the same
budget of logical LM calls, selecting on ``--val-size`` *train* examples, and the program it
returns is then scored on the first ``--n-dev`` dev examples (F1, EM, gold-title recall per
hop). The DSPy cache is on and shared, so configurations every strategy scores (the bootstrap,
the baseline) run once on the model; budgets still count every logical call.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import dspy

from stageopt.evaluation import EvaluationReport, evaluate
from stageopt.lm import SmallLMAdapter, resolve_lm
from stageopt.strategies import STRATEGIES
from stageopt.tasks import get_task


def _dev(report: EvaluationReport) -> dict[str, Any]:
    return {
        "f1": round(report.score, 4),
        "ci95": [round(x, 4) for x in report.ci95],
        **{k: round(v, 4) for k, v in report.extra.items()},
        "stage_metrics": {k: round(v, 4) for k, v in report.stage_metrics.items()},
        "parse_rate": round(report.parse_rate, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--budget-calls", type=int, default=150)
    parser.add_argument("--val-size", type=int, default=8)
    parser.add_argument("--bootstrap-size", type=int, default=8)
    parser.add_argument("--n-dev", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm", default="gemma3-270m")
    parser.add_argument("--data-dir", help="data directory (default: $STAGEOPT_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", default="benchmarks/results/strategies_hotpotqa.json")
    args = parser.parse_args(argv)
    names = sorted(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")

    task = get_task("hotpotqa", data_dir=args.data_dir)
    lm = resolve_lm(args.lm, cache=True)
    adapter = SmallLMAdapter()
    train, dev = task.load("train"), task.load("dev", n=args.n_dev)

    def score(program: dspy.Module) -> EvaluationReport:
        return evaluate(
            program, dev, task.metric, lm=lm, adapter=adapter,
            stage_metrics=task.stage_metrics(), extra_metrics=task.extra_metrics(),
        )  # fmt: skip

    rows: dict[str, Any] = {"unoptimized": {"dev": _dev(score(task.program()))}}
    print(f"unoptimized: dev F1 {rows['unoptimized']['dev']['f1']:.3f}", flush=True)
    for name in names:
        start = time.monotonic()
        optimizer = STRATEGIES[name](
            task.metric,
            budget=args.budget_calls,
            lm=lm,
            adapter=adapter,
            stage_metrics=task.stage_metrics(),
            bootstrap_size=args.bootstrap_size,
            val_size=args.val_size,
            seed=args.seed,
        )
        program = optimizer.compile(task.program(), trainset=train)
        result = optimizer.result
        assert result is not None
        optimize_s = time.monotonic() - start
        rows[name] = {
            "status": result.status,
            "stop_reason": result.stop_reason,
            "lm_calls": result.usage["lm_calls"],
            "trials": len(result.history),
            "validation": {"baseline": result.baseline["score"], "best": result.best["score"]},
            "best_params": result.best["params"],
            "optimize_s": round(optimize_s, 1),
            "dev": _dev(score(program)),
        }
        row = rows[name]
        print(
            f"{name}: {row['status']}, {row['lm_calls']} calls, {row['trials']} trials, validation "
            f"{row['validation']['baseline']:.3f} -> {row['validation']['best']:.3f}, dev F1 {row['dev']['f1']:.3f} "
            f"({optimize_s:.0f} s)",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python " + " ".join(sys.argv),
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                "lm": args.lm,
                "settings": vars(args),
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
