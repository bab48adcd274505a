"""The paired comparison every confirmation and reported gain uses."""

from __future__ import annotations

import pytest

from stageopt import ConfigurationError
from stageopt.evaluation import paired_gain


def test_a_consistent_gain_is_significant_and_its_interval_holds_the_mean() -> None:
    base = [0.0, 0.2, 0.4, 0.1, 0.3, 0.0, 0.5, 0.2, 0.1, 0.3]
    cand = [b + 0.2 + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)]
    gain = paired_gain(cand, base)
    assert gain.n == 10
    assert gain.gain == pytest.approx(0.2)
    assert gain.ci95[0] < gain.gain < gain.ci95[1]
    assert 0 < gain.lower < gain.gain
    assert gain.significant
    assert gain.p_value < 0.001
    assert gain.detectable_gain is not None
    assert gain.detectable_gain < gain.gain


def test_pairing_sees_a_gain_that_two_unpaired_means_would_hide() -> None:
    base = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6]
    cand = [b + 0.05 + (0.01 if i % 2 else -0.01) for i, b in enumerate(base)]
    assert paired_gain(cand, base).significant  # about +0.05 on widely spread scores


def test_symmetric_differences_are_no_gain_and_say_what_could_be_detected() -> None:
    base = [0.0, 1.0] * 10
    cand = [1.0, 0.0] * 10
    gain = paired_gain(cand, base, confidence=0.9)
    assert gain.gain == 0
    assert not gain.significant
    assert gain.lower < 0 < gain.ci95[1]
    assert gain.detectable_gain is not None
    assert gain.detectable_gain > 0
    more = paired_gain(cand * 4, base * 4)
    assert more.detectable_gain is not None
    assert more.detectable_gain < gain.detectable_gain


def test_higher_confidence_gives_a_lower_bound_further_down() -> None:
    base = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    cand = [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert paired_gain(cand, base, confidence=0.99).lower < paired_gain(cand, base, confidence=0.8).lower


def test_no_spread_in_the_differences() -> None:
    same = paired_gain([0.5] * 5, [0.5] * 5)
    assert (same.gain, same.ci95, same.significant, same.detectable_gain) == (0.0, (0.0, 0.0), False, None)
    shifted = paired_gain([0.15, 0.95, 0.35], [0.1, 0.9, 0.3])  # +0.05 each, up to float rounding
    assert shifted.ci95 == (shifted.gain, shifted.gain)
    assert shifted.significant
    up = paired_gain([1.0] * 5, [0.0] * 5)
    assert up.significant
    assert up.p_value == 0.0


@pytest.mark.parametrize(
    ("cand", "base", "kwargs"),
    [([1.0], [1.0, 0.0], {}), ([], [], {}), ([1.0], [0.0], {"confidence": 1.0}), ([1.0], [0.0], {"power": 0})],
)
def test_bad_input_is_refused(cand: list[float], base: list[float], kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        paired_gain(cand, base, **kwargs)


def test_describe_names_the_interval_and_n() -> None:
    text = paired_gain([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]).describe()
    assert text.startswith("+0.500 (95 % CI [")
    assert text.endswith("n=4)")
