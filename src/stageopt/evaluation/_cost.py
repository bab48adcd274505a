"""Money per LM call: a price table per model, shared by constraints, objectives and routing.

Embedded models cost nothing in money; their cost is measured in tokens. A user with hosted
endpoints gives prices per million tokens, e.g. ``--price gpt-4o-mini=0.15/0.60``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stageopt._errors import ConfigurationError


@dataclass(frozen=True)
class ModelPrice:
    """Price of one model in dollars per million prompt and completion tokens."""

    prompt_per_million: float
    completion_per_million: float

    def __post_init__(self) -> None:
        if self.prompt_per_million < 0 or self.completion_per_million < 0:
            raise ConfigurationError(
                f"prices must be >= 0 dollars per million tokens, got {self.prompt_per_million=}, "
                f"{self.completion_per_million=}"
            )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for one call of this many tokens."""
        return (prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million) / 1e6


#: Prices a run uses, by model name (as the LM's ``model`` attribute or a registered name).
PriceTable = Mapping[str, ModelPrice]


def parse_price(text: str) -> tuple[str, ModelPrice]:
    """``"MODEL=IN/OUT"`` (dollars per million prompt / completion tokens) -> (model, price).

    Raises:
        ConfigurationError: saying how to write it when ``text`` is malformed.
    """
    model, sep, numbers = text.partition("=")
    prompt, slash, completion = numbers.partition("/")
    try:
        if not (model.strip() and sep and slash):
            raise ValueError
        return model.strip(), ModelPrice(float(prompt), float(completion))
    except ValueError:
        raise ConfigurationError(
            f"cannot read price {text!r}: write MODEL=IN/OUT in dollars per million prompt/completion tokens, "
            "e.g. gpt-4o-mini=0.15/0.60"
        ) from None


def call_cost(model: str | None, prompt_tokens: int, completion_tokens: int, prices: PriceTable) -> float:
    """Dollars of one call; a model without a price (an embedded model) costs 0."""
    price = prices.get(model or "")
    return price.cost(prompt_tokens, completion_tokens) if price is not None else 0.0
