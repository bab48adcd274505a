"""The ``eval``, ``optimize`` and ``demo`` commands."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.cli._limits import confirmation_lines, limit_options, outcome_lines, racing_lines, resolve_strategy
from stageopt.cli._routing import build_models, load_program, save_program, search_settings
from stageopt.cli._worker import worker_context
from stageopt.distributed import is_shared_storage
from stageopt.evaluation import Budget, EvaluationReport, evaluate, paired_gain, parse_price
from stageopt.lm import default_adapter, resolve_lm
from stageopt.strategies import BaseStageOptimizer, OptimizationResult, get_strategy
from stageopt.tasks import BaseTask, get_task


def _setup(args: argparse.Namespace) -> tuple[BaseTask, dspy.BaseLM, dspy.Adapter]:
    if args.num_threads < 1:
        raise ConfigurationError(f"--num-threads must be >= 1, got {args.num_threads}")
    task = get_task(args.task, data_dir=args.data_dir)
    lm = resolve_lm(
        args.lm,
        api_base=args.api_base,
        api_key=args.api_key,
        model_type=args.model_type,
        seed=args.seed,
        cache=not args.no_cache,
        parallel=args.num_threads,
    )
    return task, lm, default_adapter(args.adapter)


def _resolver(args: argparse.Namespace) -> Callable[[str], dspy.BaseLM]:
    """Builds further LMs by name (``--models``, a routed program) with the run's LM options."""
    return lambda name: resolve_lm(
        name,
        api_base=args.api_base,
        api_key=args.api_key,
        model_type=args.model_type,
        seed=args.seed,
        cache=not args.no_cache,
        parallel=args.num_threads,
    )


def _evaluate(
    task: BaseTask,
    program: dspy.Module,
    examples: list[dspy.Example],
    lm: dspy.BaseLM,
    adapter: dspy.Adapter,
    args: argparse.Namespace,
    desc: str,
) -> EvaluationReport:
    return evaluate(
        program,
        examples,
        task.metric,
        lm=lm,
        adapter=adapter,
        stage_metrics=task.stage_metrics(),
        extra_metrics=task.extra_metrics(),
        num_threads=args.num_threads,
        progress=True,
        desc=desc,
        capture_traces=True,
    )


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def stage_table(report: EvaluationReport) -> str:
    """Per-stage metrics, parse rate, tokens and latency of one evaluation."""
    rows = [
        [
            s.name,
            s.metric,
            s.calls,
            f"{100 * s.parse_rate:.1f}%",
            round(s.mean_prompt_tokens),
            round(s.mean_completion_tokens),
            s.mean_latency_s,
            s.p95_latency_s,
        ]
        for s in report.stages.values()
    ]
    headers = ["stage", "stage metric", "calls", "parsed", "prompt tok", "compl tok", "mean s", "p95 s"]
    return format_table(headers, rows)


def summary_line(report: EvaluationReport) -> str:
    """Score with its interval, extra metrics and cost on one line."""
    extra = "  ".join(f"{k.upper()} {v:.3f}" for k, v in report.extra.items())
    lo, hi = report.ci95
    u = report.usage
    return (
        f"score {report.score:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={report.n}, errors={report.errors})  {extra}  "
        f"LM calls {u.lm_calls} ({u.backend_calls} not cached), tokens {u.tokens}, {u.wall_s:.1f} s"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """``stageopt eval``."""
    task, lm, adapter = _setup(args)
    if args.n < 1:
        raise ConfigurationError(f"--n must be >= 1, got {args.n}")
    examples = task.load(args.split, n=args.n)
    program = task.program()
    if args.program:
        path = Path(args.program)
        if not path.is_file():
            raise ConfigurationError(f"--program {path} does not exist; give a program.json from `stageopt optimize`")
        load_program(program, path, lm_name=args.lm, lm=lm, resolve=_resolver(args))
    report = _evaluate(task, program, examples, lm, adapter, args, desc=f"{args.task} {args.split}")
    print(summary_line(report))
    print(stage_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _run_optimizer(
    task: BaseTask,
    lm: dspy.BaseLM,
    adapter: dspy.Adapter,
    trainset: list[dspy.Example],
    out: Path,
    args: argparse.Namespace,
    budget: Budget,
    strategy: str,
    extra: dict[str, Any],
) -> tuple[dspy.Module, OptimizationResult]:
    cls = get_strategy(strategy)
    optimizer = cls(
        task.metric,
        budget=budget,
        lm=lm,
        adapter=adapter,
        stage_metrics=task.stage_metrics(),
        seed=args.seed,
        run_dir=out,
        storage=getattr(args, "storage", None),
        study_name=getattr(args, "study", None),
        val_size=args.val_size,
        confirm_size=getattr(args, "confirm_size", 20),
        confidence=getattr(args, "confidence", 0.9),
        racing=not getattr(args, "no_racing", False),
        bootstrap_size=args.bootstrap_size,
        num_threads=args.num_threads,
        progress=True,
        **extra,
    )
    program = optimizer.compile(task.program(), trainset=trainset)
    assert optimizer.result is not None
    result = dataclasses.replace(optimizer.result, task=task.name)
    out.mkdir(parents=True, exist_ok=True)
    save_program(program, out / "program.json", extra.get("models") or {})
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return program, result


def strategy_options(strategy: str, options: list[str]) -> dict[str, Any]:
    """Strategy settings from ``--option KEY=VALUE`` flags (VALUE parsed as JSON, else a string).

    ``--option KEY.FIELD=VALUE`` sets one field of a setting that takes a mapping (e.g.
    ``--option schedule.epochs=5 --option schedule.lr=0.01`` gives ``{"schedule": {"epochs": 5,
    "lr": 0.01}}``); the strategy checks the field names when it is built.

    Raises:
        ConfigurationError: for a malformed flag, a KEY the strategy's constructor does not take,
            a field of a setting that takes no mapping, or a setting given both whole and by field.
    """
    cls = get_strategy(strategy)
    # The settings a strategy adds to the base's (those have flags of their own).
    inits = [
        vars(klass)["__init__"]
        for klass in cls.__mro__
        if "__init__" in vars(klass) and issubclass(klass, BaseStageOptimizer) and klass is not BaseStageOptimizer
    ]
    own = {
        name: p
        for init in inits
        for name, p in inspect.signature(init).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "budget"
    }
    out: dict[str, Any] = {}
    by_field: set[str] = set()  # settings built field by field
    for option in options:
        key, sep, raw = option.partition("=")
        key = key.strip().replace("-", "_")
        name, dot, field = key.partition(".")
        if not sep or not name or (dot and not field):
            raise ConfigurationError(
                f"--option {option!r}: write KEY=VALUE or KEY.FIELD=VALUE, e.g. --option n_trials=20"
            )
        if name not in own:
            known = ", ".join(sorted(own)) or "none"
            raise ConfigurationError(
                f"--option {name!r} is not a setting of strategy {strategy!r}; its settings: {known}"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not dot:
            if name in by_field:
                raise ConfigurationError(
                    f"--option {name}=... and --option {name}.FIELD=... both set {name!r}: give the whole "
                    f"value or its fields one by one, not both"
                )
            out[name] = value
            continue
        if not _takes_mapping(own[name]):
            raise ConfigurationError(
                f"--option {key!r}: {name!r} of strategy {strategy!r} takes no fields; write --option {name}=VALUE"
            )
        if name in out and name not in by_field:
            raise ConfigurationError(
                f"--option {name}=... and --option {name}.FIELD=... both set {name!r}: give the whole "
                f"value or its fields one by one, not both"
            )
        by_field.add(name)
        out.setdefault(name, {})[field] = value
    return out


def _takes_mapping(parameter: inspect.Parameter) -> bool:
    """Whether a constructor setting accepts a mapping (by its annotation, or a dict default)."""
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return any(word in text for word in ("Mapping", "dict")) or isinstance(parameter.default, dict)


def cmd_optimize(args: argparse.Namespace) -> int:
    """``stageopt optimize``."""
    out = Path(args.out)
    has_run = (out / "optuna.db").exists() or (out / "result.json").exists()
    if has_run and not args.resume:
        raise ConfigurationError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not has_run and args.storage is None:
        raise ConfigurationError(f"--resume: no run found in {out} (no optuna.db); drop --resume to start one")
    budget = Budget(lm_calls=args.budget_calls, tokens=args.budget_tokens, wall_s=args.budget_seconds)
    args.strategy = resolve_strategy(args)  # --objectives selects pareto
    task, lm, adapter = _setup(args)
    trainset = task.load("train", n=args.n_train)
    options = list(getattr(args, "option", None) or [])
    if getattr(args, "allocate", None) is not None:
        if any(o.partition("=")[0].strip().partition(".")[0] == "allocate" for o in options):
            raise ConfigurationError("give --allocate or --option allocate=..., not both")
        options.append(f"allocate={args.allocate}")
    extra = strategy_options(args.strategy, options)
    if getattr(args, "warm_start", None):
        extra["warm_start"] = args.warm_start
    settings, names = search_settings(args, args.strategy)
    if settings:
        extra["settings"] = settings
    if names:
        extra["models"] = build_models(names, lm_name=args.lm, lm=lm, resolve=_resolver(args))
    prices = dict(parse_price(text) for text in getattr(args, "price", None) or [])
    extra.update(limit_options(args, args.strategy, prices))  # limits (with the prices), objectives
    if args.strategy == "coordinate":
        extra = {"max_rounds": args.max_rounds, "trials_per_stage": args.trials_per_stage, **extra}
    if args.storage is not None and is_shared_storage(args.storage):
        extra["worker_context"] = worker_context(args)  # how `stageopt worker` rebuilds the task and LMs
    if args.parallel_trials != 1:
        extra["parallel_trials"] = args.parallel_trials
    _, result = _run_optimizer(task, lm, adapter, trainset, out, args, budget, args.strategy, extra)
    print("\n".join(outcome_lines(result)))
    where = "optuna.db" if args.storage is None else f"study {args.study or args.strategy!r} in --storage"
    print(f"run directory: {out} (result.json, program.json, {where})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``stageopt demo``: before/after on a dev subset with a small optimization budget."""
    start = time.monotonic()
    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    task, lm, adapter = _setup(args)
    dev = task.load("dev", n=args.n)
    train = task.load("train")
    print(f"stageopt demo: {task.name}, model {args.lm}, {len(dev)} dev examples, budget {args.budget_calls} calls")
    print("[1/3] scoring the unoptimized program on dev ...", file=sys.stderr)
    before = _evaluate(task, task.program(), dev, lm, adapter, args, desc="before")
    print("[2/3] optimizing (coordinate descent; selection uses train only) ...", file=sys.stderr)
    program, result = _run_optimizer(
        task,
        lm,
        adapter,
        train,
        out,
        args,
        Budget(lm_calls=args.budget_calls),
        "coordinate",
        {"max_rounds": 2, "trials_per_stage": args.trials_per_stage},
    )
    if returned_original(result):
        print("[3/3] the original program was returned: nothing new to score on dev", file=sys.stderr)
        after = before
    else:
        print("[3/3] scoring the optimized program on the same dev examples ...", file=sys.stderr)
        after = _evaluate(task, program, dev, lm, adapter, args, desc="after")
    (out / "before.json").write_text(json.dumps(before.to_dict(), indent=2))
    (out / "after.json").write_text(json.dumps(after.to_dict(), indent=2))
    print()
    print(demo_table(before, after, result))
    print()
    print("\n".join(demo_verdict(before, after, result)))
    print()
    print("unoptimized, per stage:\n" + stage_table(before))
    print("optimized, per stage:\n" + stage_table(after))
    print(
        f"\noptimization: {result.status} ({result.stop_reason}), {len(result.history)} trials, "
        f"{result.usage['lm_calls']} LM calls, {result.usage['wall_s']:.0f} s; "
        f"total demo time {time.monotonic() - start:.0f} s"
    )
    print(f"run directory: {out}")
    return 0


def demo_table(before: EvaluationReport, after: EvaluationReport, result: OptimizationResult) -> str:
    """Before/after rows: stage metrics, F1, EM, parse rate, calls, time."""
    rows: list[list[Any]] = []
    for name in before.stage_metrics:
        rows.append([f"{name} stage metric", before.stage_metrics[name], after.stage_metrics.get(name)])
    for key in before.extra:
        rows.append([key.upper(), before.extra[key], after.extra.get(key)])
    rows.append(["parse rate", before.parse_rate, after.parse_rate])
    rows.append(["LM calls (eval)", before.usage.lm_calls, after.usage.lm_calls])
    rows.append(["mean prompt tokens/call", _mean_prompt(before), _mean_prompt(after)])
    rows.append(["wall time (eval, s)", round(before.usage.wall_s, 1), round(after.usage.wall_s, 1)])
    table = format_table(["dev metric", "before", "after"], rows)
    chosen = "; ".join(
        f"{stage}: instruction #{p['instruction']}, {p['n_demos']} demos" for stage, p in result.best["params"].items()
    )
    return f"{table}\n\nchosen configuration: {chosen}"


def returned_original(result: OptimizationResult) -> bool:
    """Whether the confirmation sent back the original program (it beat nothing on held-out examples)."""
    return result.confirmation is not None and not result.confirmation.get("confirmed")


def demo_verdict(before: EvaluationReport, after: EvaluationReport, result: OptimizationResult) -> list[str]:
    """The held-out confirmation, then the dev gain of the returned program, paired, with its interval."""
    lines = [*racing_lines(result), *confirmation_lines(result)]
    if returned_original(result):
        lines.append("dev: the original program was returned, so there is no gain to report (before = after)")
        return lines
    gain = paired_gain([e.score for e in after.examples], [e.score for e in before.examples])
    verdict = "the interval excludes 0" if gain.ci95[0] > 0 else "the interval includes 0: no gain shown on dev"
    if gain.ci95[1] < 0:
        verdict = "the optimized program is worse on dev"
    lines.append(f"dev score gain {gain.describe()}: {verdict}")
    return lines


def _mean_prompt(report: EvaluationReport) -> float:
    return report.usage.prompt_tokens / report.usage.lm_calls if report.usage.lm_calls else 0.0
