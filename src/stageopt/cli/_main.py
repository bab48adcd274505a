"""Argument parsing and the one place where errors become one clear line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stageopt._errors import StageoptError, find_cause
from stageopt.cli._bench import add_testbed_arguments
from stageopt.cli._compare import add_compare_arguments
from stageopt.cli._diagnose import add_diagnose_arguments
from stageopt.cli._limits import add_limit_arguments
from stageopt.cli._report import add_report_arguments
from stageopt.cli._routing import add_routing_arguments
from stageopt.cli._worker import add_distributed_arguments, add_worker_arguments

#: The names in ``stageopt.strategies.STRATEGIES``, listed here so that building the parser does
#: not import DSPy (a test keeps the two in step).
STRATEGY_NAMES = (
    "independent",
    "coordinate",
    "joint",
    "hierarchical",
    "multifidelity",
    "evolutionary",
    "random",
    "grid",
    "pbt",
    "pareto",
)

#: The names in ``stageopt.strategies.TRAINING_STRATEGIES`` (torch training; the ``train`` extra).
TRAINING_STRATEGY_NAMES = ("softprompt",)

logger = logging.getLogger("stageopt")


def _confirm_options(parser: argparse.ArgumentParser, *, default_size: int) -> None:
    parser.add_argument(
        "--confirm-size",
        type=int,
        default=default_size,
        help="held-out examples (from train, never searched on) the chosen program must beat the original on; "
        "0: return the validation winner unconfirmed",
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="level of the one-sided lower bound of the held-out paired gain that must be above 0",
    )
    parser.add_argument(
        "--no-racing",
        action="store_true",
        help="score every candidate on every validation example (default: drop one once a paired "
        "Wilcoxon test says it is worse than the best)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="hotpotqa", help="benchmark task (default: hotpotqa)")
    parser.add_argument("--lm", default="gemma3-270m", help="embedded model name or LiteLLM model string")
    parser.add_argument("--api-base", default=None, help="base URL for an OpenAI-compatible server")
    parser.add_argument("--api-key", default=None, help="API key for --api-base (default: none needed)")
    parser.add_argument(
        "--model-type", default="chat", choices=("chat", "text"), help="LiteLLM API type for --lm strings"
    )
    parser.add_argument("--adapter", default="small", choices=("small", "chat", "json"), help="prompt format")
    parser.add_argument("--data-dir", default=None, help="folder with <task>/{train,dev}.jsonl")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="examples evaluated in parallel (an embedded model decodes that many together in one batch)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="do not use DSPy's response cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def build_parser() -> argparse.ArgumentParser:
    """The full ``stageopt`` parser."""
    parser = argparse.ArgumentParser(prog="stageopt", description="Optimize multi-stage DSPy programs.")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="score a program on a split, stage by stage")
    _common(ev)
    ev.add_argument("--split", default="dev", help="train, dev, or a path to a .jsonl file")
    ev.add_argument("--n", type=int, default=50, help="number of examples (first n)")
    ev.add_argument("--program", default=None, help="program.json saved by `stageopt optimize`")
    ev.add_argument("--json", default=None, help="also write the report as JSON to this path")

    opt = sub.add_parser("optimize", help="optimize a program and write a run directory")
    _common(opt)
    opt.add_argument(
        "--strategy",
        default=None,
        help=f"search strategy, one of: {', '.join(STRATEGY_NAMES)} (default: coordinate; pareto with --objectives); "
        f"or a training strategy (torch, the `train` extra): {', '.join(TRAINING_STRATEGY_NAMES)}",
    )
    opt.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the strategy, VALUE as JSON (repeatable), e.g. --option n_trials=20; "
        "KEY.FIELD=VALUE sets one field of a mapping setting, e.g. --option schedule.epochs=5",
    )
    opt.add_argument("--budget-calls", type=int, required=True, help="max logical LM calls (cache hits count)")
    opt.add_argument("--budget-tokens", type=int, default=None, help="max tokens")
    opt.add_argument("--budget-seconds", type=float, default=None, help="max wall-clock seconds")
    opt.add_argument("--out", required=True, help="run directory (result.json, program.json, optuna.db)")
    opt.add_argument("--n-train", type=int, default=None, help="training examples to use (default: all)")
    opt.add_argument("--val-size", type=int, default=20, help="validation examples per trial")
    _confirm_options(opt, default_size=20)
    opt.add_argument("--bootstrap-size", type=int, default=16, help="training examples traced for demos")
    opt.add_argument("--max-rounds", type=int, default=3, help="coordinate-descent rounds")
    opt.add_argument(
        "--trials-per-stage", type=int, default=None, help="coordinate: trials per stage per round (default: up to 6)"
    )
    opt.add_argument(
        "--allocate",
        default=None,
        choices=("equal", "blame"),
        help="coordinate, hierarchical: budget across stages; blame = probe each stage's room for "
        "improvement on a validation subset first, then share trials by it (default: equal)",
    )
    opt.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite in --out)")
    opt.add_argument("--resume", action="store_true", help="continue the run in --out")
    opt.add_argument(
        "--warm-start",
        default=None,
        metavar="RUN_DIR_OR_STORAGE_URL[::STUDY]",
        help="seed the search with the 3 best configurations of an earlier run (a run directory, an optuna.db "
        "or a storage URL; ::STUDY names its study), matched by stage name and signature",
    )
    opt.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="MODEL=IN/OUT",
        help="dollars per million prompt/completion tokens of a model (repeatable), e.g. gpt-4o-mini=0.15/0.60; "
        "embedded models cost 0",
    )
    add_routing_arguments(opt)
    add_limit_arguments(opt)
    add_distributed_arguments(opt)

    worker = sub.add_parser(
        "worker", help="score trials of a run on a shared storage (PostgreSQL) until it is over; any number of them"
    )
    add_worker_arguments(worker)

    demo = sub.add_parser("demo", help="before/after optimization on the embedded default model")
    _common(demo)
    demo.add_argument("--n", type=int, default=20, help="dev examples scored before and after")
    demo.add_argument("--budget-calls", type=int, default=500, help="optimization budget in LM calls")
    demo.add_argument("--trials-per-stage", type=int, default=4, help="coordinate-descent trials per stage per round")
    demo.add_argument("--val-size", type=int, default=10, help="validation examples (from train) per trial")
    _confirm_options(demo, default_size=30)
    demo.add_argument("--bootstrap-size", type=int, default=12, help="training examples traced for demos")
    demo.add_argument("--out", default="runs/demo", help="run directory")

    compare = sub.add_parser(
        "compare", help="every method (stageopt strategies, DSPy optimizers) on the same budget, seeds and data"
    )
    _common(compare)
    add_compare_arguments(compare)

    diagnose = sub.add_parser(
        "diagnose", help="where a program's errors come from: stage metrics, error origins, attribution, oracle"
    )
    _common(diagnose)
    add_diagnose_arguments(diagnose)

    report = sub.add_parser("report", help="self-contained HTML report and Markdown summary of run directories")
    add_report_arguments(report)

    bench = sub.add_parser("bench", help="benchmarks; testbed: a SIMULATION with a known optimum")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    testbed = bench_sub.add_parser(
        "testbed",
        help="SIMULATION: strategies (and DSPy's MIPROv2, BFSRS) on a scripted testbed with a known optimum",
    )
    add_testbed_arguments(testbed)

    serve = sub.add_parser("serve", help="serve an embedded model over the OpenAI API (llama_cpp.server)")
    serve.add_argument("--lm", default="gemma3-270m", help="embedded model name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--alias", default=None, help="model name clients ask for (default: --lm)")
    serve.add_argument("--n-ctx", type=int, default=None, help="context window")
    serve.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 user error, 1 unexpected, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            from stageopt.lm._serve import serve

            serve(args.lm, host=args.host, port=args.port, alias=args.alias, n_ctx=args.n_ctx)
            return 0
        if args.command == "bench":
            from stageopt.cli._bench import cmd_bench_testbed

            return cmd_bench_testbed(args)
        if args.command == "compare":
            from stageopt.cli._compare import cmd_compare

            return cmd_compare(args)
        if args.command == "diagnose":
            from stageopt.cli._diagnose import cmd_diagnose

            return cmd_diagnose(args)
        if args.command == "report":
            from stageopt.cli._report import cmd_report

            return cmd_report(args)
        if args.command == "worker":
            from stageopt.cli._worker import cmd_worker

            return cmd_worker(args)
        from stageopt.cli import _commands

        if args.command == "eval":
            return _commands.cmd_eval(args)
        if args.command == "optimize":
            return _commands.cmd_optimize(args)
        return _commands.cmd_demo(args)
    except KeyboardInterrupt:
        print("stageopt: interrupted; finished trials are kept, rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:
        error = find_cause(exc, StageoptError)  # None: a real bug
        if error is None:
            raise
        print(f"stageopt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
