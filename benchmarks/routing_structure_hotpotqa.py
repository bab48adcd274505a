"""Model routing per stage and program-structure search on HotpotQA with the two embedded models.

    python benchmarks/routing_structure_hotpotqa.py [--budget-calls 300] [--val-size 10] [--n-train 100] \
        [--n-dev 30] [--seeds 1] [--front-size 4] [--routing-strategy joint] \
        [--out benchmarks/results/routing_structure_hotpotqa]

(a) Routing. ``stageopt optimize --strategy joint --lm gemma3-270m --models gemma3-270m,smollm2-135m``
    searches each stage's model (and its instruction and demos). Then the F1-vs-latency front on
    dev: the unoptimized program on each model alone, the optimized program on each model alone,
    and the ``front-size`` best distinct configurations of the search (for ``--routing-strategy
    pareto``, the run's own front, searched on score and latency) are each scored on the first
    ``n-dev`` dev examples with the DSPy cache off; latency is an example's seconds in LM calls
    (mean and 95th percentile). The front is the set no other point beats on both F1 and mean
    latency. Models are loaded once and warmed up before anything is timed.
(b) Structure. ``stageopt optimize --strategy joint`` with and without ``--search-structure``
    (hops 1|2, passages per hop 2|3|5, plain vs chain of thought per stage), same budget, seed
    and validation set, for each seed; each optimized program (its shape is saved in
    ``program.json``) is scored with ``stageopt eval`` on the same dev examples.

Selection never sees dev. Writes ``OUT/summary.json`` and prints Markdown tables. The real
models are slow on 2 cores: the defaults take roughly 1 to 1.5 hours with an empty DSPy cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import dspy
import optuna

from stageopt.cli._main import main as cli
from stageopt.evaluation import EvaluationReport, evaluate
from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.strategies import STRUCTURE, SearchSpace, config_key
from stageopt.strategies._space import Config
from stageopt.tasks import get_task

LM = "gemma3-270m"
OTHER = "smollm2-135m"


def run(cmd: list[str]) -> None:
    print("$ stageopt " + " ".join(cmd), file=sys.stderr, flush=True)
    code = cli(cmd)
    if code != 0:
        raise SystemExit(f"stageopt {cmd[0]} failed with exit code {code}")


def optimize(out: Path, args: argparse.Namespace, seed: int, *extra: str) -> dict[str, Any]:
    """``stageopt optimize`` on HotpotQA into ``out`` (skipped when its result exists)."""
    if not (out / "result.json").exists():
        run(
            ["optimize", "--task", "hotpotqa", "--lm", LM, "--budget-calls", str(args.budget_calls),
             "--val-size", str(args.val_size), "--n-train", str(args.n_train), "--seed", str(seed),
             "--out", str(out), *extra]
        )  # fmt: skip
    return dict(json.loads((out / "result.json").read_text()))


# ---- (a) routing: the F1-vs-latency front ----------------------------------------------------------------


def latencies(report: EvaluationReport) -> list[float]:
    """Each example's seconds in LM calls."""
    return [sum(c.latency_s for c in example.calls) for example in report.examples]


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)] if ordered else 0.0


def on_one_model(space: SearchSpace, config: Config, model: str) -> Config:
    """``config`` with every stage on ``model`` (choice 0 of the ``model`` knob is --lm)."""
    out = {stage: dict(choice) for stage, choice in config.items()}
    for stage, candidates in space.stages.items():
        out[stage]["model"] = 0 if model == LM else candidates.settings["model"].index(model)
    return out


def label(space: SearchSpace, config: Config) -> str:
    """Which model each stage runs on, e.g. ``query1=gemma query2=smollm answer=gemma``."""
    described = space.describe(config)
    parts = []
    for stage in space.names():
        model = described[stage].get("model") or LM
        parts.append(f"{stage}={model.split('-')[0]}")
    return " ".join(parts)


def candidates(space: SearchSpace, result: dict[str, Any], size: int) -> list[tuple[str, Config]]:
    """The configurations the front is drawn from, each program once."""
    history = result["history"]
    best = next(r["params"] for r in history if r["trial"] == result["best"]["trial"])
    default = space.default_config()
    fixed: list[tuple[str, Config]] = [
        ("unoptimized, all gemma", on_one_model(space, default, LM)),
        ("unoptimized, all smollm", on_one_model(space, default, OTHER)),
        ("optimized, as routed", best),
        ("optimized, all gemma", on_one_model(space, best, LM)),
        ("optimized, all smollm", on_one_model(space, best, OTHER)),
    ]
    front = (result.get("notes", {}).get("pareto") or {}).get("front", {}).get("points") or []
    fixed += [(f"pareto trial {p['trial']}", p["params"]) for p in front]
    full = max(r["fidelity"] for r in history)
    ranked = sorted((r for r in history if r["fidelity"] == full and not r.get("variant")), key=lambda r: -r["score"])
    seen: set[str] = set()
    out: list[tuple[str, Config]] = []
    searched = 0
    for name, config in [*fixed, *((f"search trial {r['trial']}", r["params"]) for r in ranked)]:
        key = config_key(space.normalize(config))
        if key in seen:
            continue
        if name.startswith("search trial"):
            if searched == size:
                break
            searched += 1
        seen.add(key)
        out.append((name, config))
    return out


def front_points(run_dir: Path, result: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Score the candidate configurations on dev (cache off) and mark the non-dominated ones."""
    task = get_task("hotpotqa")
    dev = task.load("dev", n=args.n_dev)
    models = {LM: LocalLM(LM, cache=False), OTHER: LocalLM(OTHER, cache=False)}
    study = optuna.load_study(study_name=result["strategy"], storage=f"sqlite:///{(run_dir / 'optuna.db').resolve()}")
    space = SearchSpace.from_dict(study.user_attrs["space"], models={OTHER: models[OTHER]})
    points: list[dict[str, Any]] = []
    for name, config in candidates(space, result, args.front_size):
        program = space.apply(task.program(), config)
        report = evaluate(program, dev, task.metric, lm=models[LM], adapter=SmallLMAdapter(), desc=name)
        seconds = latencies(report)
        points.append(
            {
                "name": name,
                "routing": label(space, config),
                "params": config,
                "dev_f1": report.score,
                "mean_latency_s": statistics.fmean(seconds) if seconds else 0.0,
                "p95_latency_s": p95(seconds),
                "tokens_per_example": report.usage.tokens / max(1, report.n),
                "errors": report.errors,
            }
        )
    for point in points:
        point["on_front"] = not any(
            other["dev_f1"] >= point["dev_f1"]
            and other["mean_latency_s"] <= point["mean_latency_s"]
            and (other["dev_f1"] > point["dev_f1"] or other["mean_latency_s"] < point["mean_latency_s"])
            for other in points
        )
    return points


def warm_up(args: argparse.Namespace) -> None:
    """Load both models and run one example on each, so no timed call pays for loading."""
    task = get_task("hotpotqa")
    example = task.load("dev", n=1)
    for name in (LM, OTHER):
        with dspy.context(lm=LocalLM(name, cache=False), adapter=SmallLMAdapter()):
            task.program()(**example[0].inputs())


# ---- main ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-calls", type=int, default=300)
    parser.add_argument("--val-size", type=int, default=10)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-dev", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--front-size", type=int, default=4, help="best search configurations added to the front")
    parser.add_argument("--routing-strategy", default="joint", choices=("joint", "pareto"))
    parser.add_argument("--out", default="benchmarks/results/routing_structure_hotpotqa")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.monotonic()

    # (a) routing
    routing_dir = out / "runs" / f"routing-{args.routing_strategy}-seed0"
    extra = ["--models", f"{LM},{OTHER}"]
    if args.routing_strategy == "pareto":
        extra += ["--objectives", "score,latency", "--no-cache"]
    else:
        extra += ["--strategy", "joint"]
    routing = optimize(routing_dir, args, 0, *extra)
    warm_up(args)
    points = front_points(routing_dir, routing, args)

    # (b) structure vs fixed structure at equal budget
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        for mode, flags in (("fixed", []), ("structure", ["--search-structure"])):
            run_dir = out / "runs" / f"joint-{mode}-seed{seed}"
            result = optimize(run_dir, args, seed, "--strategy", "joint", *flags)
            if not (run_dir / "dev.json").exists():
                run(
                    ["eval", "--task", "hotpotqa", "--lm", LM, "--split", "dev", "--n", str(args.n_dev),
                     "--program", str(run_dir / "program.json"), "--json", str(run_dir / "dev.json")]
                )  # fmt: skip
            dev = json.loads((run_dir / "dev.json").read_text())
            best = result["best"]["params"]
            rows.append(
                {
                    "seed": seed,
                    "mode": mode,
                    "run_dir": str(run_dir),
                    "status": result["status"],
                    "trials": len(result["history"]),
                    "lm_calls": result["usage"]["lm_calls"],
                    "validation_baseline": result["baseline"]["score"],
                    "validation_best": result["best"]["score"],
                    "dev_f1": dev["score"],
                    "dev_calls_per_example": dev["usage"]["lm_calls"] / max(1, dev["n"]),
                    "structure": best.get(STRUCTURE),
                    "modules": {s: p.get("module") for s, p in best.items() if s != STRUCTURE and "module" in p},
                }
            )

    summary = {
        "settings": vars(args),
        "routing": {"run_dir": str(routing_dir), "validation_best": routing["best"]["score"], "points": points},
        "structure": rows,
        "wall_s": round(time.monotonic() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"## (a) F1 vs latency on {args.n_dev} dev examples ({args.routing_strategy} search over {LM}, {OTHER})\n")
    print("| configuration | stage models | dev F1 | mean s/example | p95 s | tokens/example | front |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(points, key=lambda p: p["mean_latency_s"]):
        print(
            f"| {p['name']} | {p['routing']} | {p['dev_f1']:.3f} | {p['mean_latency_s']:.2f} | "
            f"{p['p95_latency_s']:.2f} | {p['tokens_per_example']:.0f} | {'yes' if p['on_front'] else ''} |"
        )
    print(f"\n## (b) joint with and without --search-structure, {args.budget_calls} LM calls each\n")
    print("| seed | structure | val baseline → best | dev F1 | dev calls/example | chosen shape | trials |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        shape = ", ".join(f"{k}={v}" for k, v in (r["structure"] or {}).items()) or "as given"
        cot = [s for s, m in r["modules"].items() if m == "cot"]
        shape += f"; cot: {', '.join(cot)}" if cot else ""
        print(
            f"| {r['seed']} | {r['mode']} | {r['validation_baseline']:.3f} → {r['validation_best']:.3f} | "
            f"{r['dev_f1']:.3f} | {r['dev_calls_per_example']:.2f} | {shape} | {r['trials']} |"
        )
    by_mode = {m: [r["dev_f1"] for r in rows if r["mode"] == m] for m in ("fixed", "structure")}
    print(
        f"\nmean dev F1: fixed {statistics.fmean(by_mode['fixed']):.3f}, "
        f"structure {statistics.fmean(by_mode['structure']):.3f}; {summary['wall_s']} s"
    )


if __name__ == "__main__":
    main()
