"""Paired comparison of two programs scored on the same examples (scipy.stats, no hand-made formulas)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

from stageopt._errors import ConfigurationError


@dataclass(frozen=True)
class PairedGain:
    """How much a candidate beats a baseline on the same ``n`` examples.

    Attributes:
        n: Examples both were scored on.
        baseline: Mean score of the baseline.
        candidate: Mean score of the candidate.
        gain: Mean paired difference (candidate minus baseline).
        ci95: Two-sided 95 % interval of the mean difference (paired t).
        confidence: Level of the one-sided bound :attr:`lower`.
        lower: One-sided lower confidence bound of the gain at :attr:`confidence`.
        p_value: One-sided p-value of "the candidate is no better".
        detectable_gain: The gain a one-sided test at :attr:`confidence` detects with 80 %
            power on ``n`` examples of this spread of differences (None when it cannot be told:
            fewer than 2 examples, or no spread in either program's scores).
    """

    n: int
    baseline: float
    candidate: float
    gain: float
    ci95: tuple[float, float]
    confidence: float
    lower: float
    p_value: float
    detectable_gain: float | None

    @property
    def significant(self) -> bool:
        """Whether the lower confidence bound is above 0."""
        return self.lower > 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, ``significant`` included."""
        data = asdict(self)
        data["ci95"] = list(self.ci95)
        data["significant"] = self.significant
        return data

    def describe(self, digits: int = 3) -> str:
        """``+0.120 (95 % CI [+0.010, +0.230], n=20)``."""
        lo, hi = self.ci95
        return f"{self.gain:+.{digits}f} (95 % CI [{lo:+.{digits}f}, {hi:+.{digits}f}], n={self.n})"


def paired_gain(
    candidate: Sequence[float], baseline: Sequence[float], *, confidence: float = 0.9, power: float = 0.8
) -> PairedGain:
    """Paired t comparison of ``candidate`` with ``baseline``, example by example.

    With no spread in the differences (all equal, up to rounding) the interval is the difference itself, and
    the p-value is 0 when it is positive, 1 otherwise.

    Raises:
        ConfigurationError: the two lists differ in length or are empty, or ``confidence`` or
            ``power`` is not in (0, 1).
    """
    if len(candidate) != len(baseline) or not candidate:
        raise ConfigurationError(
            "a paired comparison needs two equally long, non-empty score lists, "
            f"got {len(candidate)} and {len(baseline)}"
        )
    for name, value in (("confidence", confidence), ("power", power)):
        if not 0.0 < value < 1.0:
            raise ConfigurationError(f"`{name}` must be in (0, 1), got {name}={value!r}")
    n = len(candidate)
    diffs = [float(c) - float(b) for c, b in zip(candidate, baseline, strict=True)]
    mean = math.fsum(diffs) / n
    base_mean = math.fsum(float(b) for b in baseline) / n
    cand_mean = math.fsum(float(c) for c in candidate) / n
    spread = n >= 2 and max(diffs) - min(diffs) > 1e-12 * max(1.0, max(abs(d) for d in diffs))
    if not spread:
        return PairedGain(
            n, base_mean, cand_mean, mean, (mean, mean), confidence, mean, 0.0 if mean > 0 else 1.0, _detectable(n)
        )
    test = stats.ttest_rel(candidate, baseline, alternative="greater")
    lower = float(test.confidence_interval(confidence_level=confidence).low)
    two_sided = stats.ttest_rel(candidate, baseline).confidence_interval(confidence_level=0.95)
    sd = float(stats.tstd(diffs))
    return PairedGain(
        n,
        base_mean,
        cand_mean,
        mean,
        (float(two_sided.low), float(two_sided.high)),
        confidence,
        lower,
        float(test.pvalue),
        _detectable(n, sd, confidence=confidence, power=power),
    )


def _detectable(n: int, sd: float | None = None, *, confidence: float = 0.9, power: float = 0.8) -> float | None:
    """Smallest true gain a one-sided paired t test detects with ``power`` (t approximation)."""
    if n < 2 or not sd:
        return None
    df = n - 1
    return float((stats.t.ppf(confidence, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))
