"""Decoding with a torch model and a stage state, the lm15 engine around it, and :class:`TorchLM` for DSPy.

Decoding mirrors :class:`~stageopt.lm.LlamaCppEngine`: greedy unless a temperature is given, the
request's stop strings cut the completion, and a request with a ``"\\n"`` stop may not start
with a blank token. The base model and the stage states are in :mod:`stageopt.lm._torch`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy
from dspy.lm15 import Message, Request, Response, TextPart, Usage, response_to_events

from stageopt._errors import ConfigurationError, ContextWindowError
from stageopt.lm._registry import DEFAULT_MODEL
from stageopt.lm._torch import StageState, TorchModel, input_embeddings, load_torch_model

if TYPE_CHECKING:
    import torch

# ---- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One completion: its text, token counts (virtual tokens count as prompt tokens) and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str


def render_messages(messages: Sequence[dict[str, str]], tokenizer: Any, *, system: str | None = None) -> str:
    """The prompt text of chat messages, as :class:`~stageopt.lm.LlamaCppEngine` renders them.

    A single user message without system text (the :class:`~stageopt.lm.SmallLMAdapter` layout) is
    the raw completion prompt; anything else uses the tokenizer's chat template when it has one,
    else a plain ``Role: text`` transcript. Training renders its prompts with this function too.
    """
    if system is None and len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    chat = ([{"role": "system", "content": system}] if system else []) + list(messages)
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    blocks = [f"{m['role'].capitalize()}: {m['content']}" for m in chat]
    return "\n\n".join(blocks) + "\n\nAssistant:"


def _blank(piece: str) -> bool:
    stripped = piece.lstrip(" \t")
    return not stripped or stripped[0] in "\r\n"


def generate(
    base: TorchModel,
    state: StageState | None,
    prompt: str,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    seed: int = 0,
) -> Generation:
    """Decode a completion of ``prompt`` (greedy at temperature 0) until EOS, a stop string or ``max_tokens``.

    Raises:
        ContextWindowError: when the prompt plus ``max_tokens`` does not fit the context window.
    """
    import torch

    ids = base.encode(prompt, special=True)
    n_prompt = len(ids) + (state.n_virtual_tokens if state is not None else 0)
    if n_prompt + max_tokens > base.n_ctx:
        raise ContextWindowError(
            f"prompt of {n_prompt} tokens plus max_tokens={max_tokens} exceeds the context window of "
            f"{base.label} ({base.n_ctx} tokens); use fewer or shorter demos/passages"
        )
    generator = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    line_stop = "\n" in stop
    eos = base.eos_ids
    out: list[int] = []
    text, finish = "", "length"
    with torch.no_grad(), base.using(state.adapter if state is not None else None):
        cache = base.new_cache()
        logits = base.forward(input_embeddings(base, state, ids)[None], cache=cache, keep=1)[0, -1]
        for step in range(max_tokens):
            if step == 0 and line_stop:
                logits = _forbid_blank_start(base, logits)
            if generator is None:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in eos:
                finish = "stop"
                break
            out.append(token)
            text = base.decode(out)
            cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
                break
            logits = base.forward(base.embed([token])[None], cache=cache, keep=1)[0, -1]
    return Generation(text=text, prompt_tokens=n_prompt, completion_tokens=len(out), finish=finish)


def _forbid_blank_start(base: TorchModel, logits: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """``logits`` with the blank, newline and special tokens among the top candidates masked out."""
    import torch

    masked = logits.clone()
    special = set(base.tokenizer.all_special_ids or [])
    for token in torch.topk(logits, min(candidates, logits.shape[-1])).indices.tolist():
        if token in special or _blank(base.tokenizer.decode([token])):
            masked[token] = -float("inf")
        else:
            break
    return masked


# ---- the lm15 engine and the DSPy LM -------------------------------------------------------------


class TorchEngine:
    """An lm15 engine (``complete(Request) -> Response``) running a shared torch model with a stage state.

    Invariants: ``max_tokens`` and stop strings are applied as by the llama.cpp engine; a prompt
    that does not fit raises :class:`~stageopt.ContextWindowError`; calls on one base model are
    serialised. A deep copy is the same engine (the base model is never copied, the state is shared).

    Args:
        model: Embedded model name or local Hugging Face folder.
        state: What the stage learned (None: the base model as it is).
        seed: Sampling seed when a temperature is given.
        default_max_tokens: ``max_tokens`` of requests that give none.
    """

    def __init__(
        self,
        model: str | TorchModel = DEFAULT_MODEL,
        *,
        state: StageState | None = None,
        seed: int = 0,
        default_max_tokens: int = 256,
    ) -> None:
        if default_max_tokens <= 0:
            raise ConfigurationError(f"`default_max_tokens` must be positive, got {default_max_tokens=}")
        self.base = model if isinstance(model, TorchModel) else load_torch_model(model)
        if state is not None and state.base is not self.base:
            raise ConfigurationError(f"the stage state belongs to {state.base.name}, not to {self.base.name}")
        self.state = state
        self.seed = seed
        self.default_max_tokens = default_max_tokens
        self.calls = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> TorchEngine:
        return self

    def render(self, request: Request) -> str:
        """The prompt text of ``request`` (see :func:`render_messages`)."""
        system = request.system if isinstance(request.system, str) or request.system is None else None
        if request.system is not None and system is None:
            system = "".join(getattr(part, "text", "") for part in request.system)
        messages = [{"role": m.role, "content": m.text or ""} for m in request.messages]
        return render_messages(messages, self.base.tokenizer, system=system)

    def complete(self, request: Request) -> Response:
        """Run one request; see the class docstring for the invariants."""
        config = request.config
        extensions = config.extensions or {}
        seed = config.seed if config.seed is not None else extensions.get("seed", self.seed)
        start = time.perf_counter()
        result = generate(
            self.base,
            self.state,
            self.render(request),
            max_tokens=config.max_tokens or self.default_max_tokens,
            stop=list(config.stop),
            temperature=float(config.temperature or 0.0),
            seed=int(seed),
        )
        elapsed = time.perf_counter() - start
        self.calls += 1
        return Response(
            id=None,
            model=f"torch/{self.base.label}",
            message=Message.assistant([TextPart(result.text)]),
            finish_reason="length" if result.finish == "length" else "stop",
            usage=Usage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens),
            provider_data={"latency_s": round(elapsed, 6), "backend": "torch"},
        )

    def stream(self, request: Request) -> Any:
        """Stream one request (the whole response as one event sequence)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Nothing to release: base models are shared for the process's life."""


class TorchLM(dspy.LM):
    """A DSPy LM running a torch model in-process, with a stage's soft prompt or LoRA adapter.

    DSPy's response cache is off by default: a state that is being trained changes the answers
    of the same prompt. Programs whose stages run on TorchLMs are saved with
    :func:`save_torch_stages` (``stageopt optimize`` does it); DSPy's own ``save`` refuses them.

    Args:
        model: Embedded model name, local Hugging Face folder, or a loaded :class:`TorchModel`.
        state: The stage's learned state (None: the base model).
        temperature, max_tokens, cache, seed: As for :class:`~stageopt.lm.LocalLM`.
    """

    def __init__(
        self,
        model: str | TorchModel = DEFAULT_MODEL,
        *,
        state: StageState | None = None,
        temperature: float = 0.0,
        max_tokens: int = 128,
        cache: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        engine = kwargs.pop("engine", None) or TorchEngine(model, state=state, seed=seed, default_max_tokens=max_tokens)
        super().__init__(
            f"torch/{engine.base.label}",
            model_type="chat",
            temperature=temperature,
            max_tokens=max_tokens,
            cache=cache,
            engine=engine,
            num_retries=0,
            **kwargs,
        )

    @property
    def torch_engine(self) -> TorchEngine:
        """The engine, with its base model and stage state."""
        engine = self.engine
        assert isinstance(engine, TorchEngine)
        return engine
