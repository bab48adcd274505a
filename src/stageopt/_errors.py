"""The one exception root of stageopt and its few specialisations."""

from __future__ import annotations


class StageoptError(Exception):
    """Root of every error stageopt raises on purpose.

    Messages say what is wrong and what to do; the CLI prints them as one line.
    """


class ConfigurationError(StageoptError, ValueError):
    """A setting, argument or file given by the user is invalid."""


class DataError(StageoptError, ValueError):
    """A dataset file or row is malformed (the message names file, line and field)."""


class ModelNotAvailableError(StageoptError):
    """A model package or file is missing; the message names the pip package to install."""


class ContextWindowError(StageoptError, ValueError):
    """A prompt does not fit the model's context window."""


class EvaluationError(StageoptError):
    """An evaluation failed systemically (too many failing examples)."""


class BudgetExhaustedError(StageoptError):
    """Raised inside a run when the budget cannot admit another LM call."""


class StorageUnavailableError(StageoptError):
    """A study storage (database server) cannot be reached or its driver is missing.

    The message names the URL with its password masked, the driver's reason and what to do.
    """


class RunInProgressError(StageoptError):
    """Another run of the same study on a shared storage is live (it holds the study's run lease).

    The message names the study, the other run's host, pid and start time, and what to do.

    Attributes:
        holder: The other run's lease attributes (``host``, ``pid``, ``started``, ``strategy``).
        retry_after_s: Seconds until the other run's lease goes stale if that run is dead (None
            when unknown): a run killed a moment ago blocks its study for at most this long.
    """

    def __init__(
        self, message: str, *, holder: dict[str, object] | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})
        self.retry_after_s = retry_after_s


def find_cause(exc: BaseException, *types: type[BaseException]) -> BaseException | None:
    """The first exception of one of ``types`` in ``exc``'s chain (``exc``, its cause or context, ...).

    DSPy and other libraries wrap the errors our LMs raise, so callers look through the chain.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, types):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
