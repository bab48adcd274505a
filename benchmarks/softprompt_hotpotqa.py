"""A learned soft prompt for HotpotQA's answer stage vs the best discrete configuration, at equal wall time.

    python benchmarks/softprompt_hotpotqa.py [--seconds 900] [--val-size 10] [--n-dev 30] [--seed 0] \
        [--method prompt] [--epochs 5] [--out benchmarks/results/softprompt_hotpotqa]

Both arms get the same wall-clock budget (``--budget-seconds``; logical calls unbounded), seed and
validation examples (from train), on the embedded Gemma 3 270M, with DSPy's response cache off
(answers cached by earlier runs would give the llama.cpp arm free evaluations):

- discrete: ``stageopt optimize --strategy coordinate`` (instructions and demos of every stage,
  the llama.cpp backend);
- soft prompt: ``stageopt optimize --strategy softprompt --option stages='["answer"]'`` (8 virtual
  tokens, or LoRA with ``--method lora``, trained with AdamW + warmup/cosine on a torch copy of
  the same model; the query stages stay unoptimized on llama.cpp).

Each returned program is then scored with ``stageopt eval`` on the first ``n-dev`` dev examples:
F1, and the answer stage's mean prompt tokens per call (the length a soft prompt saves when it
replaces demos). Arms are named ``discrete``/``softprompt-METHOD`` (``-seedN`` for seeds other
than 0); an arm whose run directory exists is not run again, and ``OUT/summary.json`` keeps the
arms of earlier commands with other methods or seeds. Prints a Markdown table. Selection never
sees dev.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.blame_hotpotqa import run, run_summary, score_on_dev


def arm(name: str, extra: list[str], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Optimize with ``extra`` flags under the wall budget, then score on dev."""
    run_dir = out / "runs" / name
    if not (run_dir / "result.json").exists():
        run(
            [
                "optimize",
                "--task",
                "hotpotqa",
                "--budget-calls",
                "1000000",
                "--budget-seconds",
                str(args.seconds),
                "--val-size",
                str(args.val_size),
                "--seed",
                str(args.seed),
                "--no-cache",  # equal compute: responses cached by earlier runs would favour the llama.cpp arm
                "--out",
                str(run_dir),
                *extra,
            ]
        )
    report = score_on_dev(run_dir, args.n_dev)
    result, row = run_summary(run_dir)
    answer = report["stages"]["answer"]
    return {
        **row,
        "dev_f1": report["score"],
        "dev_ci95": report["ci95"],
        "answer_prompt_tokens": answer["mean_prompt_tokens"],
        "answer_latency_s": answer["mean_latency_s"],
        "notes": result["notes"].get("softprompt"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=900.0, help="wall-clock budget of each arm's optimization")
    parser.add_argument("--val-size", type=int, default=10)
    parser.add_argument("--n-dev", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="prompt", choices=("prompt", "lora"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/softprompt_hotpotqa")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.monotonic()
    summary_path = out / "summary.json"
    earlier = json.loads(summary_path.read_text()).get("runs", {}) if summary_path.exists() else {}
    suffix = f"-seed{args.seed}" if args.seed else ""  # seed 0's runs were named before seeds were
    rows = {
        f"discrete{suffix}": arm(f"discrete{suffix}", ["--strategy", "coordinate"], args, out),
        f"softprompt-{args.method}{suffix}": arm(
            f"softprompt-{args.method}{suffix}",
            [
                "--strategy",
                "softprompt",
                "--option",
                'stages=["answer"]',
                "--option",
                f"method={args.method}",
                "--option",
                f"schedule.epochs={args.epochs}",
            ],
            args,
            out,
        ),
    }
    rows = {**{k: v for k, v in earlier.items() if k not in rows}, **rows}  # other methods' and seeds' arms stay
    summary = {"settings": vars(args), "runs": rows, "wall_s": round(time.monotonic() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    print("| arm | optimize s | val baseline → best | dev F1 (95% CI) | answer prompt tokens/call | answer s/call |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        lo, hi = row["dev_ci95"]
        print(
            f"| {name} | {row['optimize_wall_s']:.0f} | {row['validation_baseline']:.3f} → "
            f"{row['validation_best'] or 0:.3f} | {row['dev_f1']:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{row['answer_prompt_tokens']:.0f} | {row['answer_latency_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
