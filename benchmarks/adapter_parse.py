"""Parse rate of each adapter on typed and untyped signatures, per embedded model.

    python benchmarks/adapter_parse.py [--models gemma3-270m,qwen2.5-coder-0.5b] \
        [--adapters small,chat,json] [--n 10] [--max-tokens 192] \
        [--out benchmarks/results/adapter_parse.json] [--resume]

Five signatures as a DSPy user writes them, each on dev[:N] (``--split``) (T=0, cache off, one call per example):

- ``answer`` (untyped): HotpotQA question + its two gold paragraphs -> ``answer: str``;
- ``cot_answer`` (untyped, two outputs): ``ChainOfThought`` GSM8K question -> ``answer: str``;
- ``notes`` (typed): ``ChainOfThought`` HotpotQA question + gold paragraphs ->
  ``new_notes: list[str], next_queries: list[str]``;
- ``label`` (typed): HoVer claim -> ``label: Literal["SUPPORTED", "NOT_SUPPORTED"]``;
- ``count`` (typed): GSM8K question -> ``answer: int`` (no reasoning).

A call parses when the adapter returns every output field with a value of its type: for stageopt's
``small`` adapter, when it counted no parse failure; for DSPy's ``ChatAdapter`` (its JSON fallback
off, so each adapter gets one call) and ``JSONAdapter``, when they raised nothing. ``correct`` is
exact match for ``label`` and ``count`` (None elsewhere). Each cell is written as it finishes;
``--resume`` keeps the cells already in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal

import dspy

from stageopt.lm import SmallLMAdapter, resolve_lm
from stageopt.tasks import get_task


class Answer(dspy.Signature):
    """Answer the question with a few words from the passages."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Solve(dspy.Signature):
    """Solve the math word problem."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class TakeNotes(dspy.Signature):
    """Write down the facts from the passages that help answer the question, and what to search next."""

    question: str = dspy.InputField()
    passages: str = dspy.InputField()
    new_notes: list[str] = dspy.OutputField()
    next_queries: list[str] = dspy.OutputField()


class Verify(dspy.Signature):
    """Is the claim supported by what is known?"""

    claim: str = dspy.InputField()
    label: Literal["SUPPORTED", "NOT_SUPPORTED"] = dspy.OutputField()


class Count(dspy.Signature):
    """Give the final number that answers the math word problem."""

    question: str = dspy.InputField()
    answer: int = dspy.OutputField()


def _hotpot_passages(example: dspy.Example) -> str:
    gold = set(example.gold_titles)
    return "\n".join(f"[{title}] {''.join(sentences)}" for title, sentences in example.context if title in gold)


def _cases(
    name: str, n: int, data_dir: str | None, split: str = "dev"
) -> tuple[dspy.Module, list[tuple[dict[str, Any], Any]]]:
    """The module of signature ``name`` and its (inputs, expected value) pairs."""
    if name in ("answer", "notes"):
        examples = get_task("hotpotqa", data_dir=data_dir).load(split, n=n)
        module = dspy.Predict(Answer) if name == "answer" else dspy.ChainOfThought(TakeNotes)
        return module, [({"question": e.question, "passages": _hotpot_passages(e)}, None) for e in examples]
    if name in ("cot_answer", "count"):
        examples = get_task("gsm8k", data_dir=data_dir).load(split, n=n)
        module = dspy.ChainOfThought(Solve) if name == "cot_answer" else dspy.Predict(Count)
        expected = (lambda e: None) if name == "cot_answer" else (lambda e: int(str(e.answer).replace(",", "")))
        return module, [({"question": e.question}, expected(e)) for e in examples]
    if name == "label":
        root = Path(data_dir or os.environ.get("STAGEOPT_DATA_DIR") or "../shared/data")
        rows = [json.loads(line) for line in (root / "hover" / f"{split}.jsonl").read_text().splitlines()[:n]]
        return dspy.Predict(Verify), [({"claim": r["claim"]}, r["label"]) for r in rows]
    raise ValueError(f"unknown signature {name!r}")


def _adapter(name: str) -> dspy.Adapter:
    if name == "small":
        return SmallLMAdapter()
    if name == "chat":
        return dspy.ChatAdapter(use_json_adapter_fallback=False)
    if name == "json":
        return dspy.JSONAdapter()
    raise ValueError(f"unknown adapter {name!r}")


def _cell(
    model: str, adapter_name: str, signature: str, n: int, max_tokens: int, data_dir: str | None, split: str
) -> dict:
    lm = resolve_lm(model, cache=False, max_tokens=max_tokens)
    module, cases = _cases(signature, n, data_dir, split)
    parsed = correct = 0
    errors: list[str] = []
    start = time.perf_counter()
    for inputs, expected in cases:
        adapter = _adapter(adapter_name)
        try:
            with dspy.context(lm=lm, adapter=adapter):
                prediction = module(**inputs)
        except Exception as exc:  # a parse failure of DSPy's adapters, counted
            errors.append(type(exc).__name__)
            continue
        ok = not (isinstance(adapter, SmallLMAdapter) and adapter.parse_failures)
        parsed += ok
        value = prediction.get("label", prediction.get("answer"))
        correct += ok and expected is not None and value == expected
    return {
        "model": model,
        "adapter": adapter_name,
        "signature": signature,
        "typed": signature in ("notes", "label", "count"),
        "split": split,
        "n": len(cases),
        "parse_rate": round(parsed / len(cases), 3),
        "correct": correct if signature in ("label", "count") else None,
        "errors": {name: errors.count(name) for name in sorted(set(errors))},
        "s_per_example": round((time.perf_counter() - start) / len(cases), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b")
    parser.add_argument("--adapters", default="small,chat,json")
    parser.add_argument("--signatures", default="answer,cot_answer,notes,label,count")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--split", default="dev", help="which split the examples come from")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="benchmarks/results/adapter_parse.json")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    args = parser.parse_args(argv)

    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    result["commands"] = [*result.get("commands", []), " ".join(["python", *sys.argv])]
    result.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.python_version()}"})
    cells: dict[str, Any] = result.setdefault("cells", {})
    for model in args.models.split(","):
        for signature in args.signatures.split(","):
            for adapter in args.adapters.split(","):
                key = f"{model} {adapter} {signature}" + ("" if args.split == "dev" else f" {args.split}")
                if key in cells:
                    continue
                cells[key] = _cell(model, adapter, signature, args.n, args.max_tokens, args.data_dir, args.split)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=2) + "\n")
                print(json.dumps(cells[key]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
