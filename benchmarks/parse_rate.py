"""Adapter parse rate, scores and latency of the HotpotQA program on the embedded model.

    python benchmarks/parse_rate.py --n 50 [--lm gemma3-270m] [--program runs/x/program.json] \
        [--out benchmarks/results/parse_rate_gemma3-270m.json]

Runs the multi-hop program (query1 -> query2 -> answer) on the first ``--n`` dev examples with
the small-model adapter and the response cache off, and writes every per-stage figure (parse
rate, stage metric, tokens, latency) plus F1/EM and wall time as JSON, with the command line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter, resolve_lm
from stageopt.tasks import get_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--lm", default="gemma3-270m")
    parser.add_argument("--program", help="program.json to load (default: the unoptimized program)")
    parser.add_argument("--data-dir", help="data directory (default: $STAGEOPT_DATA_DIR or ../shared/data)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)

    task = get_task("hotpotqa", data_dir=args.data_dir)
    examples = task.load("dev", n=args.n)
    program = task.program()
    if args.program:
        program.load(args.program)
    lm = resolve_lm(args.lm, cache=False)
    start = time.monotonic()
    report = evaluate(
        program,
        examples,
        task.metric,
        lm=lm,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
        progress=True,
        desc="parse rate",
    )
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "lm": args.lm,
        "program": args.program or "unoptimized",
        "n": report.n,
        "parse_rate": report.parse_rate,
        "f1": report.score,
        "f1_ci95": list(report.ci95),
        "em": report.extra.get("em"),
        "stages": {name: s.to_dict() for name, s in report.stages.items()},
        "lm_calls": report.usage.lm_calls,
        "wall_s": round(time.monotonic() - start, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))
    for name, stage in report.stages.items():
        print(
            f"{name:8s} parsed {100 * stage.parse_rate:5.1f}%  metric {stage.metric}  mean {stage.mean_latency_s:.2f} s"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
