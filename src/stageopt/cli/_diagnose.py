"""``stageopt diagnose``: stage metrics, error origins, stage attribution and oracle bounds of a program.

DSPy and the diagnostics are imported when the command runs, so that building the parser stays light.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stageopt._errors import ConfigurationError

if TYPE_CHECKING:
    import dspy

    from stageopt.diagnostics import Diagnosis
    from stageopt.tasks import BaseTask


def add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stageopt diagnose`` besides the common ones."""
    parser.add_argument("--program", default=None, help="program.json to diagnose (default: the unoptimized program)")
    parser.add_argument(
        "--baseline",
        default=None,
        help="program.json to attribute against (default with --program: the task's unoptimized program)",
    )
    parser.add_argument("--split", default="dev", help="train, dev, or a path to a .jsonl file")
    parser.add_argument("--n", type=int, default=100, help="number of examples (first n)")
    parser.add_argument("--out", default=None, help="folder to write diagnosis.json into (e.g. a run directory)")
    parser.add_argument("--json", default=None, help="also write the diagnosis as JSON to this path")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="STAGE=VALUE",
        help="pass threshold of a stage's metric (default 1.0; repeatable), e.g. --threshold query1=0.5",
    )
    parser.add_argument(
        "--fail-below", type=float, default=None, help="examples scoring below this are failed (default: < 1.0)"
    )
    parser.add_argument("--n-permutations", type=int, default=10, help="stage orders sampled when K > 4 stages")
    parser.add_argument("--max-hybrids", type=int, default=24, help="most hybrid programs scored when K > 4 stages")
    parser.add_argument("--budget-calls", type=int, default=None, help="max logical LM calls (default: unlimited)")


def parse_thresholds(options: list[str]) -> dict[str, float]:
    """``{stage: value}`` from ``--threshold STAGE=VALUE`` flags.

    Raises:
        ConfigurationError: for a malformed flag.
    """
    out: dict[str, float] = {}
    for option in options:
        stage, sep, raw = option.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or not stage.strip() or value is None:
            raise ConfigurationError(f"--threshold {option!r}: write STAGE=VALUE, e.g. --threshold query1=0.5")
        out[stage.strip()] = value
    return out


def _load_program(task: BaseTask, path_text: str, flag: str, args: argparse.Namespace, lm: dspy.BaseLM) -> dspy.Module:
    """The task's program with ``path_text`` loaded into it, its stages routed to their saved models."""
    from stageopt.cli._commands import _resolver
    from stageopt.cli._routing import load_program

    program = task.program()
    path = Path(path_text)
    if not path.is_file():
        raise ConfigurationError(f"{flag} {path} does not exist; give a program.json from `stageopt optimize`")
    load_program(program, path, lm_name=args.lm, lm=lm, resolve=_resolver(args))
    return program


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Diagnose, print the tables, write diagnosis.json."""
    from stageopt.cli._commands import _setup
    from stageopt.diagnostics import DEFAULT_FAIL_BELOW, DiagnosisConfig, diagnose
    from stageopt.evaluation import Budget

    if args.n < 1:
        raise ConfigurationError(f"--n must be >= 1, got {args.n}")
    thresholds = parse_thresholds(args.threshold)
    config = DiagnosisConfig(
        thresholds=thresholds,
        fail_below=DEFAULT_FAIL_BELOW if args.fail_below is None else args.fail_below,
        n_permutations=args.n_permutations,
        max_hybrids=args.max_hybrids,
        seed=args.seed,
        num_threads=args.num_threads,
        progress=True,
    )
    budget = Budget(lm_calls=args.budget_calls) if args.budget_calls is not None else None
    task, lm, adapter = _setup(args)
    examples = task.load(args.split, n=args.n)
    if args.program:
        program = _load_program(task, args.program, "--program", args, lm)
        subject = f"program {args.program}"
    else:
        program = task.program()
        subject = "the unoptimized program (no --program)"
    baseline = None
    if args.baseline:
        baseline = _load_program(task, args.baseline, "--baseline", args, lm)
        against = f"baseline {args.baseline}"
    elif args.program:
        baseline = task.program()
        against = "baseline: the task's unoptimized program (no --baseline given)"
    else:
        against = "no attribution: give --program (or --baseline) to compare two programs"
    print(f"stageopt diagnose: {task.name} {args.split}, {len(examples)} examples, model {args.lm}")
    print(f"diagnosing {subject}; {against}")
    diagnosis = diagnose(
        program,
        examples,
        task=task,
        baseline=baseline,
        lm=lm,
        adapter=adapter,
        budget=budget,
        config=config,
    )
    print()
    print(format_diagnosis(diagnosis))
    written = []
    if args.out:
        written.append(diagnosis.save(Path(args.out) / "diagnosis.json"))
    if args.json:
        written.append(diagnosis.save(args.json))
    if written:
        print(f"wrote {', '.join(str(p) for p in written)}")
    else:
        print("(no --out or --json: nothing written)", file=sys.stderr)
    return 0


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The diagnosis as plain-text tables: stages, error origins, attribution, oracle, usage."""
    from stageopt.cli._commands import format_table

    d = diagnosis
    lo, hi = d.ci95
    parts = [f"{d.metric} {d.score:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={d.n})", ""]
    rows: list[list[Any]] = [
        [
            name,
            s.metric,
            s.calls,
            f"{100 * s.parse_failure_rate:.1f}%",
            f"{s.mean_output_chars:.1f}",
            round(s.mean_prompt_tokens),
            round(s.mean_completion_tokens),
            s.mean_latency_s,
            s.p95_latency_s,
        ]
        for name, s in d.stages.items()
    ]
    headers = [
        "stage",
        "stage metric",
        "calls",
        "parse fail",
        "out chars",
        "prompt tok",
        "compl tok",
        "mean s",
        "p95 s",
    ]
    parts += ["Stages", format_table(headers, rows), ""]

    origins = d.error_origins
    parts.append(
        f"Error origins: {origins.failed} of {origins.n} examples failed (score < {origins.fail_below:.3g}); "
        "a failure counts at the first stage whose metric is below its threshold, else at the last stage"
    )
    rows = [
        [name, origins.thresholds.get(name), count, f"{100 * origins.share(name):.0f}%"]
        for name, count in origins.counts.items()
    ]
    parts += [format_table(["stage", "threshold", "errors", "share"], rows), ""]

    if d.attribution is not None:
        a = d.attribution
        how = (
            f"exact over {len(a.hybrids)} programs"
            if a.exact
            else f"sampled: {a.n_permutations} stage orders, {len(a.hybrids)} programs"
        )
        parts.append(
            f"Attribution (Shapley, {how}): baseline {a.baseline_score:.3f} -> program {a.program_score:.3f} "
            f"({a.program_score - a.baseline_score:+.3f})"
        )
        rows = [[name, s.shapley, f"[{s.ci95[0]:+.3f}, {s.ci95[1]:+.3f}]"] for name, s in a.stages.items()]
        parts += [format_table(["stage", "shapley", "95% CI"], rows), ""]

    if d.oracle:
        parts.append("Oracle (gold upstream): what each downstream stage reaches with a perfect upstream")
        rows = [
            [name, o.description, o.score, f"[{o.ci95[0]:.3f}, {o.ci95[1]:.3f}]", o.program_score, o.headroom]
            for name, o in d.oracle.items()
        ]
        parts += [format_table(["stage", "given", "oracle", "95% CI", "program", "headroom"], rows), ""]

    u = d.usage
    parts.append(
        f"usage: {u.get('lm_calls', 0)} LM calls ({u.get('backend_calls', 0)} not cached), "
        f"{u.get('tokens', 0)} tokens, {float(u.get('wall_s', 0.0)):.1f} s"
    )
    return "\n".join(parts)
