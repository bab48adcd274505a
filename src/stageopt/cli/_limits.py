"""``stageopt optimize`` flags for limits (constraints) and multi-objective search.

``--max-tokens-per-example``, ``--max-cost-per-example`` (with ``--price MODEL=IN/OUT``),
``--max-p95-latency`` and ``--max-prompt-tokens [STAGE=]N`` become a
:class:`~stageopt.strategies.Limits` for any strategy; ``--objectives score,tokens`` selects the
``pareto`` strategy, and ``--pick "tokens<=300"`` is its rule.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stageopt._errors import ConfigurationError

if TYPE_CHECKING:
    from stageopt.evaluation import ModelPrice
    from stageopt.strategies import OptimizationResult

#: What ``--strategy`` is when neither it nor ``--objectives`` is given.
DEFAULT_STRATEGY = "coordinate"

_BOUND = re.compile(r"^\s*(\w+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the limit and objective flags to the ``optimize`` parser."""
    parser.add_argument(
        "--max-tokens-per-example", type=float, default=None, help="limit: mean prompt+completion tokens per example"
    )
    parser.add_argument(
        "--max-cost-per-example",
        type=float,
        default=None,
        help="limit: mean dollars per example (needs --price for the models used)",
    )
    parser.add_argument(
        "--max-p95-latency",
        type=float,
        default=None,
        metavar="SECONDS",
        help="limit: 95th percentile of an example's seconds in LM calls (use --no-cache)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        action="append",
        default=[],
        metavar="[STAGE=]N",
        help="limit: the largest prompt of a stage (N: every stage; STAGE=N: one stage; repeatable)",
    )
    parser.add_argument(
        "--objectives",
        default=None,
        metavar="LIST",
        help="multi-objective search (the pareto strategy, NSGA-II): score plus tokens, cost, latency, "
        "e.g. score,tokens",
    )
    parser.add_argument(
        "--pick",
        default=None,
        metavar="BOUNDS",
        help='pareto: which program of the front to return, e.g. "tokens<=300" (the best score within the '
        "bounds; default: the best score)",
    )


def resolve_strategy(args: argparse.Namespace) -> str:
    """The strategy to run: ``--strategy``, ``pareto`` for ``--objectives``, else the default.

    Raises:
        ConfigurationError: for ``--objectives`` or ``--pick`` with a single-objective strategy.
    """
    strategy = getattr(args, "strategy", None)
    if getattr(args, "objectives", None) is not None or getattr(args, "pick", None) is not None:
        if strategy not in (None, "pareto"):
            flag = "--objectives" if args.objectives is not None else "--pick"
            raise ConfigurationError(
                f"{flag} is for the multi-objective `pareto` strategy (NSGA-II), but --strategy {strategy} "
                "searches the score alone: drop --strategy (or give --strategy pareto), or drop "
                f"{flag} and limit costs with --max-tokens-per-example and the like"
            )
        return "pareto"
    return strategy or DEFAULT_STRATEGY


def parse_prompt_limits(values: list[str]) -> int | dict[str, int] | None:
    """``--max-prompt-tokens`` values: ``N`` (every stage) and ``STAGE=N`` (one stage)."""
    if not values:
        return None
    table: dict[str, int] = {}
    for text in values:
        stage, sep, number = text.rpartition("=")
        key = stage.strip() if sep else "*"
        try:
            table[key] = int(number)
        except ValueError:
            raise ConfigurationError(
                f"--max-prompt-tokens {text!r}: write N (every stage) or STAGE=N, e.g. --max-prompt-tokens answer=1500"
            ) from None
        if sep and not key:
            raise ConfigurationError(f"--max-prompt-tokens {text!r}: the stage name is missing before '='")
    return table["*"] if list(table) == ["*"] else table


def parse_pick(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """``--pick "tokens<=300,score>=0.4"`` -> upper bounds and lower bounds by objective."""
    at_most: dict[str, float] = {}
    at_least: dict[str, float] = {}
    for part in text.split(","):
        match = _BOUND.match(part)
        if match is None:
            raise ConfigurationError(
                f'--pick {text!r}: write bounds such as "tokens<=300" or "cost<=0.002,latency<=2" (comma-separated)'
            )
        name, op, value = match.groups()
        (at_most if op == "<=" else at_least)[name] = float(value)
    return at_most, at_least


def limit_options(
    args: argparse.Namespace, strategy: str, prices: Mapping[str, ModelPrice] | None = None
) -> dict[str, Any]:
    """Constructor settings from the limit and objective flags (``limits``, ``objectives``, ``rule``)."""
    from stageopt.strategies import Limits, ParetoRule

    out: dict[str, Any] = {}
    limits = Limits(
        max_tokens_per_example=getattr(args, "max_tokens_per_example", None),
        max_cost_per_example=getattr(args, "max_cost_per_example", None),
        prices=dict(prices or {}),
        max_p95_latency_s=getattr(args, "max_p95_latency", None),
        max_prompt_tokens=parse_prompt_limits(list(getattr(args, "max_prompt_tokens", None) or [])),
    )
    if limits.active or limits.prices:
        out["limits"] = limits
    if strategy == "pareto":
        if getattr(args, "objectives", None) is not None:
            out["objectives"] = args.objectives
        if getattr(args, "pick", None) is not None:
            at_most, at_least = parse_pick(args.pick)
            out["rule"] = ParetoRule(at_most=at_most, at_least=at_least)
    return out


def outcome_lines(result: OptimizationResult) -> list[str]:
    """What ``optimize`` prints after the run: scores, and the front of a pareto run."""
    base, best = result.baseline.get("score"), result.best.get("score")
    lines = [
        f"{result.strategy}: {result.status} ({result.stop_reason}); validation score "
        f"{_num(base)} -> {_num(best)}; {result.usage['lm_calls']} LM calls, {result.usage['wall_s']:.0f} s"
    ]
    if result.status == "infeasible":
        lines.append("no configuration met the limits: the original program was saved (see result.json notes.limits)")
    lines.extend(racing_lines(result))
    lines.extend(confirmation_lines(result))
    front = (result.notes.get("pareto") or {}).get("front")
    if front:
        objectives = front["objectives"]
        lines.append(f"Pareto front ({len(front['points'])} programs; {', '.join(front['directions'])}):")
        lines.append("  trial  " + "  ".join(f"{o:>10}" for o in objectives) + "  feasible")
        for point in front["points"]:
            mark = " <- returned" if point["trial"] == result.notes["pareto"].get("picked") else ""
            values = "  ".join(f"{_num(point['values'][o]):>10}" for o in objectives)
            lines.append(f"  {point['trial']:>5}  {values}  {'yes' if point['feasible'] else 'no':>8}{mark}")
    return lines


def racing_lines(result: OptimizationResult) -> list[str]:
    """What racing saved (nothing when the run did not race or pruned nothing)."""
    note = result.notes.get("racing") or {}
    if not note.get("settings") or not note.get("pruned_trials"):
        return []
    return [
        f"racing: {note['pruned_trials']} of {note['trials']} candidates dropped early; "
        f"{note['example_evaluations_saved']} of {note['example_evaluations'] + note['example_evaluations_saved']} "
        f"example-evaluations saved ({note['saved_share']:.0%})"
    ]


def confirmation_lines(result: OptimizationResult) -> list[str]:
    """What the confirmation on held-out examples said (nothing when the run had none)."""
    conf = result.confirmation
    if not conf:
        return []
    gain = conf.get("gain")
    if gain:
        lo, hi = gain["ci95"]
        measured = (
            f"held-out gain {gain['gain']:+.3f} (paired 95 % CI [{lo:+.3f}, {hi:+.3f}], n={gain['n']}; "
            f"{gain['confidence']:.0%} lower bound {gain['lower']:+.3f})"
        )
    else:
        measured = conf["reason"]
    if conf.get("confirmed"):
        return [f"confirmed: {measured}; the optimized program was saved"]
    return [f"no significant gain: {conf['reason']} (saved: the original program)"]


def _num(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:.3f}" if abs(float(value)) >= 0.001 or value == 0 else f"{value:.3g}"
