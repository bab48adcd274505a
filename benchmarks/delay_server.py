"""An OpenAI-compatible test server that answers every call after a fixed delay.

    python -m benchmarks.delay_server --port 8765 --delay 0.5 [--jitter 0.1] [--seed 0] [--host 127.0.0.1]

Point stageopt at it with ``--lm openai/delay --api-base http://127.0.0.1:8765/v1 --no-cache``
(``--model-type text`` uses ``/v1/completions``). It measures how well clients overlap calls to a
slow endpoint (e.g. 1, 2 and 4 ``stageopt worker`` processes) without the endpoint being the
bottleneck: standard library only, one daemon thread per connection, and a request costs one
``time.sleep`` of ``--delay`` seconds plus, with ``--jitter``, a seeded uniform extra in
``[0, jitter]``. Hundreds of concurrent requests just sleep in parallel.

Endpoints:
    ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI response bodies (``id``,
    ``object``, ``created``, ``model``, ``choices`` with ``message`` or ``text`` and
    ``finish_reason``, ``usage`` with whitespace word counts as tokens). ``stop`` cuts the answer
    at its first stop sequence; ``max_tokens`` cuts it to that many words (``finish_reason``
    ``"length"``); ``n`` repeats the choice. ``stream`` is refused (400).
    ``GET /v1/models``, ``GET /health``.
    ``GET /stats``: completion requests served, requests in flight and the most seen at once,
    tokens, the delay settings and uptime. ``POST /stats/reset`` zeroes the counters.

What it answers: short, deterministic in the prompt (and the request's ``seed``), shaped for
the adapter that wrote the prompt.
    * stageopt's ``SmallLMAdapter`` (plain layout whose last block ends with the label of the
      first output field, ``Answer:``): the value of that field. Further output fields are
      learnt from the demos' labels and written as ``Label: value`` lines; with no demos, a
      ``Reasoning``/``Rationale`` field is followed by an ``Answer:`` line.
    * DSPy's ``ChatAdapter`` (prompt lists ``Your output fields are:``): every output field as
      ``[[ ## name ## ]]`` blocks, then ``[[ ## completed ## ]]``. ``JSONAdapter`` (the
      prompt asks for a JSON object, or ``response_format`` is set): one JSON object.
Values by field name: a query/search field gets the first 12 words of the first input field;
reasoning gets one sentence naming the entity; code gets ``pass``; an instruction field (the
instruction proposer's prompt) gets one of four templated sentences about the step's fields,
chosen by the seed; every other field gets the entity: the first run of capitalised words
after the first word of the first input field (``"Which magazine came first, Arthur's Magazine
or ..."`` -> ``Arthur's Magazine``), else ``unknown``. Typed fields of the chat and JSON
layouts get a value of their type (``int``/``float``: the first number in the input or 0,
``bool``: true, ``Literal``: its first option, ``list``: the entity in a list, ``dict``: {}).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import random
import re
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger(__name__)

#: Output fields whose values may span lines in stageopt's ``SmallLMAdapter`` (a copy, to stay stdlib only).
_REASONING_FIELDS = frozenset({"reasoning", "rationale", "plan", "steps"})
_CODE_FIELDS = frozenset({"code", "solution", "program"})
_SEPARATOR = "\n\n---\n\n"
_TEXT_MODE_SUFFIX = "BEGIN RESPONSE:"  # dspy's text-completion path appends it to the prompt
_FIELD_LINE = re.compile(r"^([A-Z][A-Za-z0-9 ]{0,40}):(?:[ \t]+(.*))?$")
_CHAT_FIELD = re.compile(r"^\d+\.\s+`(\w+)`\s+\((.*?)\):?", re.MULTILINE)
_INSTRUCTIONS = (
    "Read the {inputs} carefully and give the {outputs} in a few precise words.",
    "Using only the {inputs}, produce the {outputs} as briefly and exactly as possible.",
    "Look at the {inputs}, find the key fact, and state the {outputs} plainly.",
    "Study the {inputs} one part at a time, then reply with the {outputs} alone.",
)


# ---- answers ------------------------------------------------------------------------------------


def entity(text: str) -> str:
    """The first run of capitalised words after the first word of ``text``, else ``unknown``."""
    words = [w.strip(".,;:!?()[]\"'") for w in text.split()[1:]]
    run: list[str] = []
    for word in words:
        if word[:1].isupper():
            run.append(word)
            if len(run) == 4:
                break
        elif run:
            break
    return " ".join(run) or "unknown"


def field_value(name: str, source: str, *, step: str = "", seed: int = 0) -> str:
    """The plausible value of the output field ``name`` given the first input's text ``source``.

    Args:
        name: Field name or label (``answer``, ``Gold titles``).
        source: The first input field's value (the question).
        step: The text that describes the step, for an instruction field (``reads X and writes Y``).
        seed: Picks the instruction template.
    """
    key = name.strip().lower().replace(" ", "_")
    if "instruction" in key:
        found = re.search(r"reads (.+?) and writes (.+?)\.", step)
        inputs, outputs = (found.group(1), found.group(2)) if found else ("inputs", "outputs")
        return _INSTRUCTIONS[seed % len(_INSTRUCTIONS)].format(inputs=inputs.lower(), outputs=outputs.lower())
    if key in _REASONING_FIELDS:
        return f"The question is about {entity(source)}, so that is the answer."
    if key in _CODE_FIELDS:
        return "pass"
    if any(part in key for part in ("query", "search", "keyword")):
        return " ".join(source.split()[:12]) or "unknown"
    return entity(source)


def _typed(kind: str, name: str, source: str, seed: int) -> Any:
    """A JSON-ready value of the Python type ``kind`` as DSPy prints it (``int``, ``Literal['a', 'b']``)."""
    kind = kind.strip()
    if kind.startswith("Literal[") and kind.endswith("]"):
        try:
            options = ast.literal_eval(f"({kind[8:-1]},)")
            return options[0]
        except (ValueError, SyntaxError):
            return field_value(name, source, seed=seed)
    number = re.search(r"-?\d+(?:\.\d+)?", source)
    if kind == "int":
        return int(float(number.group())) if number else 0
    if kind == "float":
        return float(number.group()) if number else 0.0
    if kind == "bool":
        return True
    if kind.startswith(("list", "List")):
        return [entity(source)]
    if kind.startswith(("dict", "Dict")):
        return {}
    return field_value(name, source, seed=seed)


def _block_fields(block: str) -> list[tuple[str, str]]:
    """``(label, value)`` pairs of a plain-layout block; a value may span lines."""
    fields: list[tuple[str, str]] = []
    for line in block.split("\n"):
        found = _FIELD_LINE.match(line)
        if found:
            fields.append((found.group(1), found.group(2) or ""))
        elif fields:
            label, value = fields[-1]
            fields[-1] = (label, f"{value}\n{line}" if value else line)
    return fields


def _plain_answer(prompt: str, seed: int) -> str:
    """Continue a ``SmallLMAdapter`` prompt: the first output's value, then later outputs' ``Label: value``."""
    text = prompt.rstrip()
    if text.endswith(_TEXT_MODE_SUFFIX):
        text = text[: -len(_TEXT_MODE_SUFFIX)].rstrip()
    blocks = text.split(_SEPARATOR)
    current = _block_fields(blocks[-1])
    if not current or current[-1][1]:  # not the plain layout: answer about the last line
        last = text.split("\n")[-1]
        return entity(last)
    asked = current[-1][0]
    inputs = [label for label, _ in current[:-1]]
    source = current[0][1].strip() if len(current) > 1 else ""
    later: list[str] = []
    for block in reversed(blocks[:-1]):  # a demo: the input labels, then every output label
        labels = [label for label, _ in _block_fields(block)]
        if labels[: len(inputs) + 1] == [*inputs, asked]:
            later = labels[len(inputs) + 1 :]
            break
    else:
        if asked.lower() in ("reasoning", "rationale"):
            later = ["Answer"]
    lines = [field_value(asked, source, step=blocks[-1], seed=seed)]
    lines += [f"{label}: {field_value(label, source, seed=seed)}" for label in later]
    return "\n".join(lines)


def _structured_answer(prompt: str, seed: int, *, as_json: bool) -> str | None:
    """Answer a DSPy ``ChatAdapter``/``JSONAdapter`` prompt, or None when ``prompt`` is not one."""
    head, sep, tail = prompt.partition("Your output fields are:")
    if not sep:
        return None
    outputs = _CHAT_FIELD.findall(tail.split("All interactions")[0])
    if not outputs:
        return None
    inputs = _CHAT_FIELD.findall(head.partition("Your input fields are:")[2])
    source = ""
    if inputs:  # the last occurrence of the first input's block is the current example's
        marker = f"[[ ## {inputs[0][0]} ## ]]\n"
        start = prompt.rfind(marker)
        if start >= 0:
            rest = prompt[start + len(marker) :]
            source = re.split(r"\n\n(?:\[\[ ## |Respond )", rest, maxsplit=1)[0].strip()
    values = {name: _typed(kind, name, source, seed) for name, kind in outputs}
    if as_json:
        return json.dumps(values)
    blocks = [
        f"[[ ## {name} ## ]]\n{value if isinstance(value, str) else json.dumps(value)}"
        for name, value in values.items()
    ]
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


def answer(prompt: str, *, seed: int | None = None, json_mode: bool = False) -> str:
    """The server's answer to ``prompt`` before ``stop`` and ``max_tokens`` apply (see the module docstring).

    Args:
        prompt: The prompt text (chat messages joined by blank lines).
        seed: The request's seed; None uses a checksum of the prompt.
        json_mode: The request asked for a JSON object (``response_format``).
    """
    seed = zlib.crc32(prompt.encode()) if seed is None else seed
    as_json = json_mode or "Outputs will be a JSON object" in prompt or "Respond with a JSON object" in prompt
    structured = _structured_answer(prompt, seed, as_json=as_json)
    return structured if structured is not None else _plain_answer(prompt, seed)


def apply_stop(text: str, stop: str | list[str] | None) -> str:
    """``text`` cut at the earliest of the ``stop`` sequences (OpenAI semantics: the stop is not included)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cut = min((i for s in stops if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def count_tokens(text: str) -> int:
    """Tokens as whitespace-separated words."""
    return len(text.split())


# ---- the server ---------------------------------------------------------------------------------


@dataclass
class _Counters:
    """What the server has seen; guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    chat: int = 0
    text: int = 0
    other: int = 0
    errors: int = 0
    in_flight: int = 0
    max_concurrency: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def reset(self) -> None:
        with self.lock:
            for name in ("requests", "chat", "text", "other", "errors", "prompt_tokens", "completion_tokens"):
                setattr(self, name, 0)
            self.max_concurrency = self.in_flight
            self.started = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "by_endpoint": {"chat/completions": self.chat, "completions": self.text},
                "other_requests": self.other,
                "errors": self.errors,
                "in_flight": self.in_flight,
                "max_concurrency": self.max_concurrency,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "uptime_s": round(time.monotonic() - self.started, 3),
            }


class DelayServer(ThreadingHTTPServer):
    """A threading HTTP server that answers OpenAI calls after ``delay`` (+ jitter) seconds.

    Args:
        address: ``(host, port)``; port 0 picks a free one.
        delay: Seconds every completion request sleeps before it is answered.
        jitter: Extra seconds drawn uniformly from ``[0, jitter]`` per request (seeded).
        seed: Seed of the jitter draws.
        model: The model name ``/v1/models`` lists (responses echo the requested one).

    Raises:
        ValueError: for a negative ``delay`` or ``jitter``.
    """

    daemon_threads = True
    request_queue_size = 1024  # a burst of connections waits in the backlog, not in SYN retries

    def __init__(
        self, address: tuple[str, int], *, delay: float, jitter: float = 0.0, seed: int = 0, model: str = "delay"
    ) -> None:
        if delay < 0:
            raise ValueError(f"`delay` must be >= 0 seconds, got {delay=}")
        if jitter < 0:
            raise ValueError(f"`jitter` must be >= 0 seconds, got {jitter=}")
        self.delay = delay
        self.jitter = jitter
        self.model = model
        self.counters = _Counters()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._ids = 0
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        """``http://host:port`` (``/stats`` and ``/health`` live here; the API under ``/v1``)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def next_delay(self) -> float:
        """The sleep of the next request."""
        if not self.jitter:
            return self.delay
        with self._rng_lock:
            return self.delay + self._rng.uniform(0.0, self.jitter)

    def next_id(self) -> int:
        with self.counters.lock:
            self._ids += 1
            return self._ids

    def stats(self) -> dict[str, Any]:
        """The counters, with the delay settings."""
        return {**self.counters.snapshot(), "delay_s": self.delay, "jitter_s": self.jitter}

    def reset_stats(self) -> None:
        """Zero the counters (requests in flight stay counted as in flight)."""
        self.counters.reset()

    def stop(self) -> None:
        """Stop ``serve_forever`` (from another thread) and close the socket."""
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 keep-alive so a client's pool reuses it."""

    protocol_version = "HTTP/1.1"
    server: DelayServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        with self.server.counters.lock:
            self.server.counters.errors += 1
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _count_other(self) -> None:
        with self.server.counters.lock:
            self.server.counters.other += 1

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            self._count_other()
            self._send(200, {"status": "ok"})
        elif path in ("/stats", "/v1/stats"):
            self._count_other()
            self._send(200, self.server.stats())
        elif path == "/v1/models":
            self._count_other()
            model = {"id": self.server.model, "object": "model", "created": 0, "owned_by": "delay-server"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"no GET route {path!r}; try /v1/models, /health or /stats")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path in ("/stats/reset", "/v1/stats/reset"):
            self.server.reset_stats()
            self._send(200, self.server.stats())
            return
        if path not in ("/v1/chat/completions", "/v1/completions"):
            self._error(404, f"no POST route {path!r}; use /v1/chat/completions or /v1/completions")
            return
        try:
            request = json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            self._error(400, f"request body is not JSON ({exc.msg}); send an OpenAI request object")
            return
        if not isinstance(request, dict):
            self._error(400, "request body must be a JSON object")
            return
        if request.get("stream"):
            self._error(400, "streaming is not supported by the delay server; send stream=false")
            return
        chat = path.endswith("chat/completions")
        prompts = _prompts(request, chat=chat)
        if prompts is None:
            field_name = "messages" if chat else "prompt"
            self._error(400, f"`{field_name}` is missing or malformed; send it as in the OpenAI API")
            return
        for name in ("n", "max_tokens", "max_completion_tokens"):
            value = request.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                self._error(400, f"`{name}` must be a positive integer, got {value!r}")
                return
        self._complete(request, prompts, chat=chat)

    def _complete(self, request: dict[str, Any], prompts: list[str], *, chat: bool) -> None:
        counters = self.server.counters
        with counters.lock:
            counters.requests += 1
            counters.in_flight += 1
            counters.max_concurrency = max(counters.max_concurrency, counters.in_flight)
            if chat:
                counters.chat += 1
            else:
                counters.text += 1
        try:
            time.sleep(self.server.next_delay())
        finally:
            with counters.lock:
                counters.in_flight -= 1
        seed = request.get("seed") if isinstance(request.get("seed"), int) else None
        response_format = request.get("response_format")
        json_mode = isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema")
        n = int(request.get("n") or 1)
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens")
        choices: list[dict[str, Any]] = []
        prompt_tokens = completion_tokens = 0
        for prompt in prompts:
            text = apply_stop(answer(prompt, seed=seed, json_mode=json_mode), request.get("stop"))
            finish = "stop"
            if max_tokens is not None and count_tokens(text) > int(max_tokens):
                text, finish = " ".join(text.split()[: int(max_tokens)]), "length"
            prompt_tokens += count_tokens(prompt)
            for _ in range(n):
                completion_tokens += count_tokens(text)
                index = len(choices)
                if chat:
                    message = {"role": "assistant", "content": text}
                    choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
                else:
                    choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": finish})
        with counters.lock:
            counters.prompt_tokens += prompt_tokens
            counters.completion_tokens += completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._send(
            200,
            {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-delay{self.server.next_id():08d}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": str(request.get("model") or self.server.model),
                "choices": choices,
                "usage": usage,
                "system_fingerprint": None,
            },
        )


def _prompts(request: dict[str, Any], *, chat: bool) -> list[str] | None:
    """The prompt texts of a request (one per choice group), or None when malformed."""
    if chat:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        parts: list[str] = []
        for message in messages:
            if not isinstance(message, dict):
                return None
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return ["\n\n".join(parts)]
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return None


def start_in_thread(
    *, port: int = 0, delay: float = 0.5, jitter: float = 0.0, seed: int = 0, host: str = "127.0.0.1"
) -> tuple[DelayServer, str]:
    """Start a :class:`DelayServer` on a daemon thread; stop it with ``server.stop()``.

    Returns:
        The server and its API base URL, ``http://host:port/v1`` (what ``--api-base`` takes).
    """
    server = DelayServer((host, port), delay=delay, jitter=jitter, seed=seed)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="delay-server", daemon=True)
    thread.start()
    return server, f"{server.url}/v1"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); prints the URL first and the stats last."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds every completion request sleeps")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra seconds, uniform in [0, jitter]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the jitter draws")
    parser.add_argument("--model", default="delay", help="model name listed by /v1/models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        server = DelayServer(
            (args.host, args.port), delay=args.delay, jitter=args.jitter, seed=args.seed, model=args.model
        )
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    print(
        f"delay server: {server.url}/v1 (delay {args.delay} s, jitter {args.jitter} s); stats at {server.url}/stats",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and Popen.terminate() stop it like Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print(f"delay server: stopped; {json.dumps(server.stats())}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
