"""Training data and training steps of :class:`~stageopt.strategies.SoftPrompt`.

* :func:`training_pairs` turns bootstrap traces into per-stage (prompt, target) pairs, the prompt
  rendered exactly as the :class:`~stageopt.lm.SmallLMAdapter` renders it at inference, and finds
  the *chains*: consecutive stages where one stage's output is inserted verbatim in the next
  stage's prompt (e.g. a toy city -> country -> capital program). A stage whose output only
  reaches the next one through a non-differentiable step (HotpotQA's ``query2`` goes through
  BM25 retrieval before ``answer`` sees anything) is a hard boundary: no chain.
* :func:`pair_loss` is the stage-wise loss: cross-entropy on the target tokens only.
* :func:`chain_loss` is the end-to-end loss of a chain: the upstream stage's output is generated
  as straight-through Gumbel-softmax samples, fed to the downstream stage as mixtures of token
  embeddings, and the downstream target's cross-entropy backpropagates to the upstream state.
* :class:`Trainer` wraps a torch optimizer (AdamW or SGD with momentum), a linear-warmup then
  cosine learning-rate schedule (``torch.optim.lr_scheduler``) and gradient-norm clipping.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import dspy

from stageopt._errors import ConfigurationError
from stageopt.lm._adapter import SmallLMAdapter, label
from stageopt.lm._torch import StageState, TorchModel, input_embeddings
from stageopt.lm._torch_lm import render_messages

if TYPE_CHECKING:
    import torch

    from stageopt.evaluation import ExampleResult

logger = logging.getLogger(__name__)

#: Where training targets come from: successful traces, gold labels, or both.
TARGET_SOURCES = ("both", "bootstrapped", "labeled")

#: Charges one forward pass of (prompt tokens, target tokens) to the run's budget; raises when spent.
Charge = Callable[[int, int], None]


@dataclass(frozen=True)
class TrainingPair:
    """One stage-wise training example: the stage's prompt and the completion it should produce.

    Attributes:
        stage: The stage's name.
        prompt: The prompt text as the stage's adapter renders it.
        target: The completion after the prompt (``" value"``, then ``"\\n"``: the stop).
        example: Index of the bootstrap example the pair comes from.
        source: ``bootstrapped`` (a successful trace's own output) or ``labeled`` (the gold label).
    """

    stage: str
    prompt: str
    target: str
    example: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready pair."""
        return asdict(self)


@dataclass(frozen=True)
class ChainPair:
    """Two consecutive stages of one example where the upstream output is inserted in the downstream prompt.

    The downstream prompt is ``prefix + inserted + suffix``; ``inserted`` is the upstream output
    as the upstream stage generates it (with its leading space).
    """

    upstream: str
    downstream: str
    upstream_prompt: str
    inserted: str
    prefix: str
    suffix: str
    target: str
    example: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready chain."""
        return asdict(self)


@dataclass
class PairSet:
    """What :func:`training_pairs` found: pairs by stage, chains, and a JSON summary."""

    pairs: dict[str, list[TrainingPair]] = field(default_factory=dict)
    chains: list[ChainPair] = field(default_factory=list)
    boundaries: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts by stage and source, chains by stage pair, and hard boundaries."""
        links: dict[str, int] = {}
        for chain in self.chains:
            key = f"{chain.upstream}->{chain.downstream}"
            links[key] = links.get(key, 0) + 1
        return {
            "pairs": {
                stage: {src: sum(p.source == src for p in pairs) for src in ("bootstrapped", "labeled")}
                for stage, pairs in self.pairs.items()
            },
            "chains": links,
            "hard_boundaries": list(self.boundaries),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready set (stored with the study)."""
        return {
            "pairs": {s: [p.to_dict() for p in ps] for s, ps in self.pairs.items()},
            "chains": [c.to_dict() for c in self.chains],
            "boundaries": list(self.boundaries),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairSet:
        """Inverse of :meth:`to_dict`."""
        return cls(
            pairs={s: [TrainingPair(**p) for p in ps] for s, ps in (data.get("pairs") or {}).items()},
            chains=[ChainPair(**c) for c in data.get("chains") or []],
            boundaries=list(data.get("boundaries") or []),
        )


def render_prompt(adapter: SmallLMAdapter, predictor: dspy.Predict, inputs: Mapping[str, Any]) -> str:
    """The prompt text a stage sends for ``inputs``: its adapter's layout, as the torch engine renders it."""
    messages = adapter.format(predictor.signature, list(predictor.demos), dict(inputs))
    return render_messages(messages, None)


def render_target(signature: type[dspy.Signature], outputs: Mapping[str, Any]) -> str | None:
    """The completion that yields ``outputs`` after the prompt's first output label, ending at the stop.

    None when an output is missing or empty.
    """
    names = list(signature.output_fields)
    values = [str(outputs.get(name) or "").strip() for name in names]
    if not all(values):
        return None
    text = f" {values[0]}" + "".join(f"\n{label(n)}: {v}" for n, v in zip(names[1:], values[1:], strict=True))
    return text + "\n"


def training_pairs(
    program: dspy.Module,
    traces: Sequence[ExampleResult],
    trainset: Sequence[dspy.Example],
    adapter: SmallLMAdapter,
    *,
    stages: Sequence[str],
    threshold: float,
    targets: str = "both",
) -> PairSet:
    """Per-stage training pairs and chains from the traces of ``program`` on ``trainset``.

    A trace whose end-to-end score reaches ``threshold`` gives each stage its own output as a
    target (``bootstrapped``, as DSPy's BootstrapFinetune); a stage whose output fields are all
    labels of the example also gets the gold label (``labeled``) whatever the score. One pair per
    stage, example and distinct target (a trace that reproduced the gold label gives one pair); the
    first call of a stage in a trace counts.
    """
    if targets not in TARGET_SOURCES:
        raise ConfigurationError(f"`targets` must be one of {TARGET_SOURCES}, got {targets=}")
    predictors = dict(program.named_predictors())
    found = PairSet(pairs={stage: [] for stage in stages})
    linked: set[tuple[str, str]] = set()
    for result in traces:
        if result.error:
            continue
        example = trainset[result.index] if 0 <= result.index < len(trainset) else None
        steps: dict[str, dict[str, Any]] = {}
        for step in result.trace:
            steps.setdefault(str(step["stage"]), step)
        order = [s for s in dict.fromkeys(str(step["stage"]) for step in result.trace) if s in stages]
        chosen: dict[str, str] = {}
        for stage in order:
            step, predictor = steps[stage], predictors[stage]
            prompt = render_prompt(adapter, predictor, step["inputs"])
            candidates: list[tuple[str, str | None]] = []
            if targets in ("both", "labeled") and example is not None:
                gold = {k: example.get(k) for k in predictor.signature.output_fields}
                candidates.append(("labeled", render_target(predictor.signature, gold)))
            if targets in ("both", "bootstrapped") and result.score >= threshold:
                candidates.append(("bootstrapped", render_target(predictor.signature, step["outputs"])))
            kept: list[str] = []
            for source, target in candidates:
                if target is None or target in kept:
                    continue
                kept.append(target)
                found.pairs[stage].append(TrainingPair(stage, prompt, target, result.index, source))
            if kept:
                chosen[stage] = kept[0]
        for upstream, downstream in itertools.pairwise(order):
            if downstream not in chosen:
                continue
            chain = _chain(adapter, predictors, steps, upstream, downstream, chosen[downstream], result.index)
            if chain is not None:
                found.chains.append(chain)
                linked.add((upstream, downstream))
    trained_order = [s for s in stages if s in predictors]
    for upstream, downstream in itertools.pairwise(trained_order):
        if (upstream, downstream) not in linked:
            found.boundaries.append(
                f"{upstream}->{downstream}: the output of {upstream!r} never appears verbatim in the prompt of "
                f"{downstream!r} (e.g. it goes through retrieval), so no gradient can cross"
            )
    return found


def _chain(
    adapter: SmallLMAdapter,
    predictors: Mapping[str, dspy.Predict],
    steps: Mapping[str, Mapping[str, Any]],
    upstream: str,
    downstream: str,
    target: str,
    index: int,
) -> ChainPair | None:
    """The chain of two stages when an output of ``upstream`` is the value of an input of ``downstream``."""
    up, down = steps[upstream], steps[downstream]
    outputs = list(predictors[upstream].signature.output_fields)
    if len(outputs) != 1:
        return None
    value = str(up["outputs"].get(outputs[0]) or "").strip()
    if not value or not any(str(v).strip() == value for v in down["inputs"].values()):
        return None
    prompt = render_prompt(adapter, predictors[downstream], down["inputs"])
    at = prompt.rfind(value)
    prefix, suffix, inserted = prompt[:at], prompt[at + len(value) :], value
    if prefix.endswith(" "):  # the upstream generates the value with its leading space
        prefix, inserted = prefix[:-1], f" {value}"
    return ChainPair(
        upstream=upstream,
        downstream=downstream,
        upstream_prompt=render_prompt(adapter, predictors[upstream], up["inputs"]),
        inserted=inserted,
        prefix=prefix,
        suffix=suffix,
        target=target,
        example=index,
    )


# ---- losses ---------------------------------------------------------------------------------------


def pair_loss(base: TorchModel, state: StageState, pairs: Sequence[TrainingPair], charge: Charge) -> torch.Tensor:
    """Mean cross-entropy of the target tokens of a batch of one stage's pairs (one forward pass).

    Rows are left-padded, so every target ends at the last position and only the logits of the
    last ``longest target + 1`` positions are computed.
    """
    import torch
    import torch.nn.functional as F

    rows, labels = [], []
    for pair in pairs:
        ids = base.encode(pair.prompt, special=True)
        target = base.encode(pair.target, special=False)
        rows.append(input_embeddings(base, state, ids + target))
        labels.append([-100] * (rows[-1].shape[0] - len(target)) + target)
    width = max(row.shape[0] for row in rows)
    embeds = torch.zeros(len(rows), width, base.hidden_size)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    gold = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels, strict=True)):
        embeds[i, width - row.shape[0] :] = row
        mask[i, width - row.shape[0] :] = 1
        gold[i, width - len(lab) :] = torch.tensor(lab)
    n_target = int((gold != -100).sum())
    charge(int(mask.sum()) - n_target, n_target)
    keep = max(len(base.encode(p.target, special=False)) for p in pairs) + 1
    with base.using(state.adapter):
        logits = base.forward(embeds, mask=mask, keep=keep)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), gold[:, width - keep + 1 :].reshape(-1), ignore_index=-100
    )


def chain_loss(
    base: TorchModel,
    upstream: StageState,
    downstream: StageState,
    chain: ChainPair,
    charge: Charge,
    *,
    relaxed: bool = True,
    tau: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of the downstream target given the upstream output.

    ``relaxed``: the upstream output is generated token by token as straight-through
    Gumbel-softmax samples (``torch.nn.functional.gumbel_softmax(hard=True)``: one-hot forward,
    soft gradient), each fed back to the upstream and, as a mixture of token embeddings, into the
    downstream prompt, so the loss reaches the upstream state. Otherwise the recorded upstream
    output enters as ordinary tokens and no gradient reaches the upstream (the stage-wise mode).
    The upstream output has as many tokens as the recorded one. The relaxed generation decodes
    with a key/value cache that stays in the autograd graph: the prompt is processed once and
    each later pass one token, so memory and time grow linearly with the output, not
    quadratically (a GSM8K plan is ~60 tokens after a ~300-token prompt).
    """
    import torch
    import torch.nn.functional as F

    out_ids = base.encode(chain.inserted, special=False)
    if relaxed:
        up_ids = base.encode(chain.upstream_prompt, special=True)
        with base.using(upstream.adapter):
            step = input_embeddings(base, upstream, up_ids)
            cache = base.new_cache()  # keys/values keep their graph: each pass feeds only the newest sample
            generated: list[torch.Tensor] = []
            for _ in out_ids:
                charge(step.shape[0], 0)
                logits = base.forward(step[None], cache=cache, keep=1)[0, -1]
                sample = F.gumbel_softmax(logits, tau=tau, hard=True)
                step = base.mix(sample)[None]
                generated.append(step)
        inserted = torch.cat(generated)
    else:
        inserted = base.embed(out_ids)
    prefix = base.encode(chain.prefix, special=True)
    suffix = base.encode(chain.suffix, special=False)
    target = base.encode(chain.target, special=False)
    with base.using(downstream.adapter):
        embeds = torch.cat(
            [input_embeddings(base, downstream, prefix), inserted, base.embed(suffix), base.embed(target)]
        )
        charge(embeds.shape[0] - len(target), len(target))
        logits = base.forward(embeds[None], keep=len(target) + 1)[0]
    return F.cross_entropy(logits[:-1], torch.tensor(target))


# ---- optimizer, schedule, clipping --------------------------------------------------------------


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    ``SequentialLR(LinearLR, CosineAnnealingLR)``; call ``step()`` after every optimizer step.
    """
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ConfigurationError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps=}, {total_steps=}")
    base_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=base_lr * min_lr_ratio)
    if warmup_steps == 0:
        return cosine
    linear = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, schedulers=[linear, cosine], milestones=[warmup_steps])


class Trainer:
    """A torch optimizer with a warmup-cosine schedule and gradient-norm clipping.

    Args:
        parameters: What to train.
        optimizer: ``adamw`` (``torch.optim.AdamW``) or ``sgd`` (``torch.optim.SGD``, momentum 0.9).
        lr: Peak learning rate.
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay.
        total_steps: Optimizer steps of the whole run (the schedule's length).
        warmup_ratio: Share of ``total_steps`` spent warming up.
        grad_clip: Maximum global gradient norm (None: no clipping).
    """

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        *,
        optimizer: str,
        lr: float,
        weight_decay: float,
        total_steps: int,
        warmup_ratio: float,
        grad_clip: float | None,
    ) -> None:
        import torch

        self.parameters = list(parameters)
        if optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
        else:
            raise ConfigurationError(f"`optimizer` must be 'adamw' or 'sgd', got {optimizer=}")
        warmup = min(round(warmup_ratio * total_steps), total_steps - 1)
        self.scheduler = warmup_cosine(self.optimizer, total_steps=total_steps, warmup_steps=warmup)
        self.grad_clip = grad_clip

    @property
    def lr(self) -> float:
        """The learning rate the next step uses."""
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> float:
        """Zero the gradients, backpropagate ``loss`` and clip; returns the norm before clipping."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with_grad = [p for p in self.parameters if p.grad is not None]
        if not with_grad:
            return 0.0
        if self.grad_clip is None:
            return float(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in with_grad if p.grad is not None]))
            )
        return float(torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip))

    def step(self) -> None:
        """Apply the optimizer step and advance the schedule."""
        self.optimizer.step()
        self.scheduler.step()


@dataclass
class EpochStats:
    """What one epoch of training did: mean losses by stage (and of chains), steps, the largest gradient norm."""

    losses: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    forward_passes: int = 0
    max_grad_norm: float = 0.0

    @property
    def mean_loss(self) -> float:
        """Mean of the stage losses (0.0 without any)."""
        return sum(self.losses.values()) / len(self.losses) if self.losses else 0.0


def epoch_items(
    pairs: Mapping[str, Sequence[TrainingPair]], chains: Sequence[ChainPair], *, batch_size: int, rng: random.Random
) -> list[tuple[str, Any]]:
    """One epoch's steps in a shuffled order: ``(stage, [pairs])`` batches and ``("chain", ChainPair)``."""
    items: list[tuple[str, Any]] = []
    for stage, stage_pairs in pairs.items():
        shuffled = list(stage_pairs)
        rng.shuffle(shuffled)
        items += [(stage, shuffled[i : i + batch_size]) for i in range(0, len(shuffled), batch_size)]
    items += [("chain", chain) for chain in chains]
    rng.shuffle(items)
    return items


def train_epoch(
    base: TorchModel,
    states: Mapping[str, StageState],
    items: Sequence[tuple[str, Any]],
    trainer: Trainer,
    charge: Charge,
    *,
    tau: float = 1.0,
) -> EpochStats:
    """Run one epoch of :func:`epoch_items` steps; each step is one optimizer step."""
    stats = EpochStats()
    sums: dict[str, list[float]] = {}
    passes = [0]

    def counted(prompt_tokens: int, target_tokens: int) -> None:
        charge(prompt_tokens, target_tokens)
        passes[0] += 1

    for kind, item in items:
        if kind == "chain":
            loss = chain_loss(base, states[item.upstream], states[item.downstream], item, counted, tau=tau)
            key = f"{item.upstream}->{item.downstream}"
        else:
            loss = pair_loss(base, states[kind], item, counted)
            key = kind
        norm = trainer.backward(loss)
        trainer.step()
        stats.max_grad_norm = max(stats.max_grad_norm, norm)
        sums.setdefault(key, []).append(float(loss.detach()))
        stats.steps += 1
    stats.losses = {k: sum(v) / len(v) for k, v in sums.items()}
    stats.forward_passes = passes[0]
    return stats


def fits(base: TorchModel, pair: TrainingPair, n_virtual: int) -> bool:
    """Whether a pair's prompt, target and virtual tokens fit the model's context window."""
    n = len(base.encode(pair.prompt, special=True)) + len(base.encode(pair.target, special=False)) + n_virtual
    return n <= base.n_ctx
