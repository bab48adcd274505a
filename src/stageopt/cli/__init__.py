"""The ``stageopt`` command line: ``eval``, ``optimize`` and ``demo``."""

from stageopt.cli._main import main

__all__ = ["main"]
