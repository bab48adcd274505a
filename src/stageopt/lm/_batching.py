"""Continuous batching for the embedded engine: several completions decoded in one llama.cpp batch.

A :class:`Batcher` owns a second llama.cpp context over an already loaded model, opened with one
KV-cache sequence per *slot*. Request threads hand it a prompt and wait; a single scheduler thread
admits requests into free slots and then runs one ``llama_decode`` per step over every active slot:
the next prompt chunk of the slots still reading their prompt, and one token of each slot that is
generating. A forward pass over the weights then serves several sequences, which is where a small
model on a CPU loses its time (generation reads every weight once per token).

Each slot keeps the tokens its KV cache holds when its request ends; a new request goes to the free
slot sharing the longest prefix with it and only the rest of its prompt is computed, so the
instruction and demos that every example of a stage shares are read once per slot
(:attr:`BatchStats.reused_tokens` counts what was saved).

A request ends exactly where ``llama_cpp.Llama.create_completion`` ends it, with the same text: at
an end-of-generation token, at the first of its stop strings (in the order given) found in the
detokenized completion, or after ``max_tokens`` tokens, with the same hold-back of incomplete
UTF-8 bytes. Greedy decoding (temperature 0) picks the same argmax; at temperature > 0 the sampler
chain is llama-cpp-python's default (top-k 40, typical 1.0, top-p, min-p 0.05, temperature, seeded
distribution), seeded per request.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from stageopt._errors import ModelNotAvailableError

logger = logging.getLogger(__name__)

#: llama-cpp-python's sampling defaults for ``create_completion`` (top-k, min-p).
_TOP_K = 40
_MIN_P = 0.05


@dataclass
class BatchStats:
    """Work done by one batcher: forward passes, tokens and the prompt tokens the prefix cache saved."""

    steps: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    max_active: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens whose KV state was reused instead of computed."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class Completion:
    """One finished request: its text, token counts and why it ended (``stop`` or ``length``)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class _Job:
    tokens: list[int]
    max_tokens: int
    stop: list[bytes]
    temperature: float
    top_p: float
    seed: int
    first_mask: Any  # token ids forbidden as the first token (numpy array) or None
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV state this sequence holds
    job: _Job | None = None
    sampler: Any = None
    n_fed: int = 0  # prompt tokens already in the KV cache for the current job
    completion: list[int] = field(default_factory=list)
    pending: int | None = None  # sampled token not yet fed back
    multibyte_fix: int = 0


class Batcher:
    """Decodes the requests of many threads together over ``slots`` KV-cache sequences.

    Args:
        llama: A loaded ``llama_cpp.Llama``; its model weights are shared, not copied.
        slots: Sequences decoded together (and prompt prefixes kept).
        n_ctx: Context window of each slot, in tokens.
        lock: Held around every forward pass, so this context and the model's own never compute
            at the same time on the same cores.
        n_batch: Most tokens in one forward pass (prompt chunks included).
    """

    def __init__(self, llama: Any, *, slots: int, n_ctx: int, lock: threading.Lock, n_batch: int = 512) -> None:
        import llama_cpp
        import numpy as np

        self._llama_cpp = llama_cpp
        self._np = np
        self.llama = llama
        self.slots_n = slots
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.lock = lock
        self.stats = BatchStats()
        params = type(llama.context_params).from_buffer_copy(llama.context_params)
        params.n_ctx = n_ctx * slots
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, params.n_ubatch or n_batch)
        params.n_seq_max = slots
        params.kv_unified = False  # one KV stream per slot: attention reads only its own cells
        ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if not ctx:
            raise ModelNotAvailableError(
                f"llama.cpp could not open a batched context of {slots} x {n_ctx} tokens; "
                "use fewer --num-threads or a smaller n_ctx"
            )
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._vocab = llama._model.vocab
        self._n_vocab = llama.n_vocab()
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._slots = [_Slot(seq) for seq in range(slots)]
        self._queue: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="stageopt-batcher", daemon=True)
        self._thread.start()

    # ---- request side -------------------------------------------------------------------------

    def prompt_tokens(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` exactly as ``Llama.create_completion`` builds them."""
        model = self.llama._model
        bos = [model.token_cls() if model.token_cls() != -1 else self.llama.token_bos()]
        if not model.add_bos_token() or bos[:1] == [-1]:
            bos = []
        eos = [model.token_sep() if model.token_sep() != -1 else self.llama.token_eos()]
        if not model.add_eos_token() and model.token_sep() == -1:
            eos = []
        body = self.llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
        return [*bos, *body, *eos]

    def complete(
        self,
        tokens: list[int],
        *,
        max_tokens: int,
        stop: list[str],
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int = 0,
        first_mask: Any = None,
    ) -> Completion:
        """Decode one prompt (its token ids) and block until it ends; thread-safe."""
        job = _Job(
            tokens=list(tokens),
            max_tokens=max_tokens,
            stop=[s.encode("utf-8") for s in stop],
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            first_mask=first_mask,
        )
        with self._wake:
            self._queue.append(job)
            self._wake.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    # ---- scheduler thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not any(slot.job for slot in self._slots):
                    self._wake.wait()
                self._admit()
            try:
                self._step()
            except BaseException as exc:
                logger.error("batched decoding failed: %s", exc)
                for slot in self._slots:
                    if slot.job is not None:
                        self._finish(slot, error=exc)

    def _admit(self) -> None:
        while self._queue:
            free = [slot for slot in self._slots if slot.job is None]
            if not free:
                return
            job = self._queue.popleft()
            slot = max(free, key=lambda s: _common_prefix(s.cached, job.tokens))
            keep = min(_common_prefix(slot.cached, job.tokens), len(job.tokens) - 1)
            if not self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, keep, -1):
                self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                keep = 0
            slot.cached = job.tokens[:keep]
            slot.job, slot.n_fed, slot.completion, slot.pending, slot.multibyte_fix = job, keep, [], None, 0
            slot.sampler = self._sampler(job)
            self.stats.requests += 1
            self.stats.prompt_tokens += len(job.tokens)
            self.stats.reused_tokens += keep

    def _sampler(self, job: _Job) -> Any:
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if job.temperature == 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(_TOP_K))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_typical(1.0, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(job.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(_MIN_P, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(job.temperature))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(job.seed & 0xFFFFFFFF))
        return chain

    def _step(self) -> None:
        """One forward pass over every active slot, then one sampled token for each that is due."""
        batch = self._batch
        n = 0
        readers: list[tuple[_Slot, int]] = []  # slots whose logits come out of this pass, and where
        active = [slot for slot in self._slots if slot.job is not None]
        self.stats.max_active = max(self.stats.max_active, len(active))
        for slot in active:  # generating slots first: one token each
            if slot.pending is not None:
                self._put(n, slot.pending, len(slot.cached), slot.seq, True)
                slot.cached.append(slot.pending)
                readers.append((slot, n))
                n += 1
        for slot in active:  # then prompt chunks, as far as the batch allows
            job = slot.job
            assert job is not None
            if slot.pending is not None or slot.n_fed >= len(job.tokens) or n >= self.n_batch:
                continue
            take = min(len(job.tokens) - slot.n_fed, self.n_batch - n)
            for k in range(take):
                last = slot.n_fed + k == len(job.tokens) - 1
                self._put(n, job.tokens[slot.n_fed + k], slot.n_fed + k, slot.seq, last)
                if last:
                    readers.append((slot, n))
                n += 1
            slot.cached.extend(job.tokens[slot.n_fed : slot.n_fed + take])
            slot.n_fed += take
        batch.n_tokens = n
        with self.lock:
            status = self._llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} for a batch of {n} tokens")
            self.stats.steps += 1
            for slot, index in readers:
                self._sample(slot, index)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _sample(self, slot: _Slot, index: int) -> None:
        lc = self._llama_cpp
        job = slot.job
        assert job is not None
        if not slot.completion and job.first_mask is not None:
            logits = self._np.ctypeslib.as_array(lc.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
            logits[job.first_mask] = -float("inf")
        token = int(lc.llama_sampler_sample(slot.sampler, self._ctx, index))
        slot.pending = None
        if lc.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, reason="stop")
            return
        slot.completion.append(token)
        self.stats.generated_tokens += 1
        text = self.llama.detokenize(slot.completion)
        # Hold back a completion that ends inside a multi-byte character, as llama-cpp-python does.
        for k, char in enumerate(text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    slot.multibyte_fix = num - k
        if slot.multibyte_fix > 0:
            slot.multibyte_fix -= 1
            slot.pending = token
            return
        stops = [s for s in job.stop if s in text]
        if stops:
            self._finish(slot, reason="stop", text=text[: text.index(stops[0])])
        elif len(slot.completion) >= job.max_tokens:
            self._finish(slot, reason="length", text=text)
        else:
            slot.pending = token

    def _finish(
        self, slot: _Slot, *, reason: str = "stop", text: bytes | None = None, error: BaseException | None = None
    ) -> None:
        job = slot.job
        assert job is not None
        if error is not None:
            job.error = error
            self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            slot.cached = []
        else:
            if text is None:
                text = self.llama.detokenize(slot.completion)
            job.result = Completion(
                text=text.decode("utf-8", errors="ignore"),
                prompt_tokens=len(job.tokens),
                completion_tokens=len(slot.completion),
                finish_reason=reason,
            )
        if slot.sampler is not None:
            self._llama_cpp.llama_sampler_free(slot.sampler)
        slot.job, slot.sampler, slot.pending = None, None, None
        job.done.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
