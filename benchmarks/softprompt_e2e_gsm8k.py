"""SoftPrompt's end-to-end (Gumbel) mode vs its stage-wise mode on GSM8K's plan -> solve chain.

    python benchmarks/softprompt_e2e_gsm8k.py [--epochs 3] [--bootstrap-size 16] [--val-size 8] \
        [--n-dev 40] [--seed 0] [--tau 1.0] [--out benchmarks/results/softprompt_e2e_gsm8k]

GSM8K's program is understand -> plan -> solve -> verify, and each stage's output is inserted
verbatim in the next one's prompt, so a gradient can cross from ``solve`` to ``plan`` (HotpotQA
cannot: retrieval sits between its stages). Both arms train 8-token soft prompts for ``plan``
and ``solve`` with the same seed, bootstrap traces, targets (the gold plan and the gold
solution + answer: with this model no trace answers right, so there is nothing to bootstrap),
epochs, schedule and validation examples (from train), on a torch copy of the embedded Gemma 3
270M, DSPy's cache off:

- stage-wise (``end_to_end=False``): each stage learns its own targets, its prompt rendered from
  the recorded trace;
- end to end (``end_to_end=True``): the same steps plus one per chain: the plan is generated as
  straight-through Gumbel-softmax samples, fed as embeddings to ``solve``, and the cross-entropy
  of the gold solution reaches the plan's soft prompt as well as the solve one.

The 270M base model answers no GSM8K question (accuracy 0 on dev for every method in
``compare_gsm8k``), so accuracy alone cannot select an epoch or tell the arms apart. Validation
and dev use ``progress`` = 0.5 x accuracy + 0.5 x the share of the gold intermediate results
(``<<a*b=c>>`` values, the answer included) that the first solution mentions; accuracy, the
stage metrics (``plan`` = share of those results the plan mentions) and solve's parse rate are
reported beside it. Each returned program is saved, reloaded (as ``stageopt eval --program``
does) and scored on the first ``n-dev`` dev examples, with the unoptimized program as a third
row. Writes ``OUT/summary.json`` and prints a Markdown table. Selection never sees dev.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import dspy

from benchmarks.blame_hotpotqa import run_summary
from stageopt.cli._routing import load_program, save_program
from stageopt.evaluation import Budget, evaluate
from stageopt.lm import default_adapter, resolve_lm
from stageopt.strategies import SoftPrompt
from stageopt.tasks import get_task
from stageopt.tasks.gsm8k import mentioned

TASK = get_task("gsm8k")
MODEL = "gemma3-270m"


def progress(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    """0.5 x right answer + 0.5 x share of the gold intermediate results the first solution mentions."""
    steps = mentioned(example.intermediates or [example.answer], prediction.get("solution"))
    return 0.5 * TASK.metric(example, prediction) + 0.5 * steps


def score_on_dev(program_path: Path | None, out: Path, n_dev: int, seed: int) -> dict[str, Any]:
    """The program at ``program_path`` (None: unoptimized) on dev[:n_dev], written once to ``out``."""
    if not out.exists():
        lm = resolve_lm(MODEL, seed=seed, cache=False)
        program = TASK.program()
        if program_path is not None:
            load_program(program, program_path, lm_name=MODEL, lm=lm, resolve=lambda n: resolve_lm(n, cache=False))
        report = evaluate(
            program,
            TASK.load("dev", n=n_dev),
            progress,
            lm=lm,
            adapter=default_adapter("small"),
            stage_metrics=TASK.stage_metrics(),
            extra_metrics={"accuracy": TASK.metric, **TASK.extra_metrics()},
            progress=True,
            desc=f"dev {out.parent.name}",
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_dict(with_examples=False), indent=2))
    return dict(json.loads(out.read_text()))


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the table shows."""
    stages = report["stages"]
    return {
        "dev_progress": report["score"],
        "dev_ci95": report["ci95"],
        "dev_accuracy": report["extra"]["accuracy"],
        "stage_metrics": report["stage_metrics"],
        "solve_parse_rate": stages["solve"]["parse_rate"],
        "plan_output_chars": stages["plan"]["mean_output_chars"],
        "prompt_tokens": {name: s["mean_prompt_tokens"] for name, s in stages.items()},
        "latency_s": {name: s["mean_latency_s"] for name, s in stages.items()},
    }


def arm(name: str, end_to_end: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train with or without the chain steps, then score on dev."""
    run_dir = out / "runs" / name
    if not (run_dir / "result.json").exists():
        optimizer = SoftPrompt(
            progress,
            budget=Budget(lm_calls=10**6),
            lm=resolve_lm(MODEL, seed=args.seed, cache=False),
            adapter=default_adapter("small"),
            stage_metrics=TASK.stage_metrics(),
            seed=args.seed,
            run_dir=run_dir,
            val_size=args.val_size,
            bootstrap_size=args.bootstrap_size,
            progress=True,
            stages=["plan", "solve"],
            targets="labeled",
            end_to_end=end_to_end,
            gumbel_tau=args.tau,
            schedule={"epochs": args.epochs, "patience": None},
        )
        program = optimizer.compile(TASK.program(), trainset=TASK.load("train"))
        assert optimizer.result is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        save_program(program, run_dir / "program.json", {})
        (run_dir / "result.json").write_text(json.dumps(optimizer.result.to_dict(), indent=2))
    result, row = run_summary(run_dir)
    note = result["notes"]["softprompt"]
    return {
        **row,
        "trained": note["trained"],
        "returned": note.get("returned"),
        "pairs": note.get("pairs"),
        "chains": note.get("chains"),
        "epochs": [
            {k: e[k] for k in ("epoch", "train_loss", "val_score", "forward_passes", "train_s", "wall_s")}
            for e in note["epochs"]
        ],
        **summarize(score_on_dev(run_dir / "program.json", run_dir / "dev.json", args.n_dev, args.seed)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bootstrap-size", type=int, default=16)
    parser.add_argument("--val-size", type=int, default=8)
    parser.add_argument("--n-dev", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/softprompt_e2e_gsm8k")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows = {
        "unoptimized": summarize(score_on_dev(None, out / "unoptimized" / "dev.json", args.n_dev, args.seed)),
        "stage-wise": arm("stagewise", False, args, out),
        "end-to-end": arm("end_to_end", True, args, out),
    }
    summary = {"settings": vars(args), "runs": rows, "wall_s": round(time.monotonic() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("| arm | optimize s | val before → best | dev progress (95% CI) | accuracy | plan metric | solve parse |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        metrics = row["stage_metrics"]
        lo, hi = row["dev_ci95"]
        val = f"{row['validation_baseline']:.3f} → {row['validation_best'] or 0:.3f}" if "epochs" in row else "-"
        print(
            f"| {name} | {row.get('optimize_wall_s', 0):.0f} | {val} | {row['dev_progress']:.3f} "
            f"({lo:.3f}-{hi:.3f}) | {row['dev_accuracy']:.3f} | {metrics.get('plan', 0):.3f} | "
            f"{row['solve_parse_rate']:.2f} |"
        )
    for name in ("stage-wise", "end-to-end"):
        for epoch in rows[name]["epochs"]:
            print(f"{name} epoch {epoch['epoch']}: loss {epoch['train_loss']} val {epoch['val_score']:.3f}")


if __name__ == "__main__":
    main()
