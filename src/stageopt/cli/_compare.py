"""``stageopt compare``: every method on the same program, LM, data, seeds and budget.

The comparison itself (DSPy, Optuna, matplotlib) is imported when the command runs, so that
building the CLI parser stays light.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from stageopt._errors import ConfigurationError


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stageopt compare`` besides the common ones."""
    parser.add_argument(
        "--methods",
        default="all",
        help="'all' or comma-separated names: stageopt strategies, mipro, bootstrap_rs, copro, gepa",
    )
    parser.add_argument("--budget-calls", type=int, required=True, help="logical LM calls per method and seed")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0..N-1 (default: 3)")
    parser.add_argument("--out", required=True, help="folder for results.json, table.md, convergence.png")
    parser.add_argument("--test", default=None, help="JSONL file in the task's format, also scored (never selected on)")
    parser.add_argument("--eval-split", default="dev", help="split the final programs are scored on (default: dev)")
    parser.add_argument("--n-eval", type=int, default=20, help="examples of --eval-split scored (0: only --test)")
    parser.add_argument("--val-size", type=int, default=10, help="validation examples (from train) for selection")
    parser.add_argument(
        "--confirm-size",
        type=int,
        default=20,
        help="held-out training examples stageopt's strategies confirm their choice on (same budget; 0: none)",
    )
    parser.add_argument(
        "--no-racing",
        action="store_true",
        help="stageopt's strategies score every candidate on every validation example (no racing)",
    )
    parser.add_argument("--bootstrap-size", type=int, default=8, help="training examples traced for demos")
    parser.add_argument("--resume", action="store_true", help="continue the comparison in --out, skipping done cells")


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the comparison, print progress and the table, write the files."""
    from stageopt.cli import _commands
    from stageopt.compare import CompareConfig, Comparison, resolve_methods
    from stageopt.compare._report import format_table

    if args.seeds < 1:
        raise ConfigurationError(f"--seeds must be >= 1, got {args.seeds}")
    if args.budget_calls < 1:
        raise ConfigurationError(f"--budget-calls must be >= 1, got {args.budget_calls}")
    if args.n_eval < 0:
        raise ConfigurationError(f"--n-eval must be >= 0, got {args.n_eval}")
    if args.test is not None and not Path(args.test).is_file():
        raise ConfigurationError(f"--test {args.test} does not exist; give a JSONL file in the task's format")
    names = resolve_methods(args.methods)
    config = CompareConfig(
        task=args.task,
        methods=tuple(names),
        seeds=tuple(range(args.seeds)),
        budget_calls=args.budget_calls,
        val_size=args.val_size,
        bootstrap_size=args.bootstrap_size,
        confirm_size=args.confirm_size,
        racing=not args.no_racing,
        eval_split=args.eval_split,
        n_eval=args.n_eval,
        test=str(Path(args.test).resolve()) if args.test else None,
        num_threads=args.num_threads,
        lm=args.lm,
        adapter=args.adapter,
    )
    task, lm, adapter = _commands._setup(args)
    out = Path(args.out)
    start = time.monotonic()
    print(
        f"stageopt compare: {task.name}, model {args.lm}, {len(names)} methods x {args.seeds} seeds, "
        f"budget {args.budget_calls} LM calls each; results in {out}",
        file=sys.stderr,
    )
    comparison = Comparison(
        config, task, lm, adapter, out, resume=args.resume, progress=lambda line: print(line, file=sys.stderr)
    )
    results = comparison.run()
    print(format_table(results))
    written = ", ".join(str(out / name) for name in ("results.json", "table.md", "convergence.png"))
    print(f"wrote {written} ({time.monotonic() - start:.0f} s)")
    return 0
