"""``stageopt report``: an HTML page and a Markdown summary of one or more run directories.

The report package (matplotlib, DSPy for the programs) is imported when the command runs, so
that building the CLI parser stays light.
"""

from __future__ import annotations

import argparse


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stageopt report``."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories of `stageopt optimize` (several: one report comparing them)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="HTML file to write (default: RUN_DIR/report.html of the first RUN_DIR); report.md goes beside it",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report and print the paths of the two files."""
    from stageopt.report import write_report

    paths = write_report(args.run_dirs, out=args.out)
    print(f"wrote {paths.html}")
    print(f"wrote {paths.markdown}")
    return 0
