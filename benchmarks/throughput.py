"""Where the embedded LM's time goes: raw llama.cpp rates, rates inside stageopt, overhead per trial.

    python benchmarks/throughput.py [--models gemma3-270m,qwen2.5-coder-0.5b] [--threads 1,2] \
        [--hotpotqa 8] [--gsm8k 4] [--sections raw,effective,batched,trials] [--parallel 4] \
        [--batched-models ...] [--trials 500] [--out benchmarks/results/throughput.json] [--resume]

Four measurements, written to ``--out`` (JSON) as each finishes (``--resume`` keeps those there):

1. ``raw``: llama.cpp alone (llama-cpp-python's ``Llama``, no stageopt), per model and thread
   count: prompt rate = tokens of a ~1000-token prompt / seconds of a 1-token completion; generation
   rate = 128 tokens / (seconds of a 129-token completion - seconds of the 1-token one), end of
   text forbidden so all 128 are generated; the state is reset before each call (no prefix reuse).
2. ``effective``: the same model inside ``stageopt.evaluate`` (LocalLM, cache off, one thread of
   examples): the HotpotQA program (query1 -> query2 -> answer) on dev[:N] and GSM8K's single
   stage on dev[:N]; the LM-busy share = engine seconds / wall seconds; the effective prompt rate =
   prompt tokens / (engine seconds - completion tokens / raw generation rate), so prefix-cache hits
   can push it above the raw rate.
3. ``trials``: random search on the testbed (scripted LM, SQLite study in a temporary folder) for
   ``--trials`` trials: seconds per trial against trial index (means of windows of 50) — with a
   near-free LM this is stageopt's own cost per trial (sampler, storage, evaluation framework);
   it must stay flat (no O(n^2) in history or storage).
4. ``batched``: per model (the Q8_0 variants included), GSM8K's single stage and the HotpotQA
   program on dev[:N] with ``--num-threads`` examples at a time, first one call at a time
   (``parallel=1``: the threads wait on the model's lock, today's path), then decoded together
   (``parallel=p``): wall time, completion tokens per second, the speed-up, the logical calls, the
   prefix cache's hit rate and how many predictions differ from the serial run's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, SmallLMAdapter, embedded_model
from stageopt.strategies import RandomSearch
from stageopt.tasks import get_task
from stageopt.testbed import Testbed

PROMPT_TOKENS = 1000
GEN_TOKENS = 128


def raw_rates(model: str, n_threads: int, data_dir: str | None) -> dict[str, Any]:
    """llama.cpp's own prompt and generation rates for ``model`` at ``n_threads``."""
    import llama_cpp

    llama = llama_cpp.Llama(
        model_path=str(embedded_model(model).path()), n_ctx=4096, n_threads=n_threads, n_batch=512, verbose=False
    )
    task = get_task("hotpotqa", data_dir=data_dir)
    text = " ".join(" ".join(str(s) for s in p[1]) for e in task.load("dev", n=3) for p in e.context)
    tokens = llama.tokenize(text.encode("utf-8"), add_bos=True)[:PROMPT_TOKENS]
    prompt = llama.detokenize(tokens).decode("utf-8", errors="ignore")
    eos = llama.token_eos()

    def no_eos(input_ids: Any, scores: Any) -> Any:
        scores[eos] = -float("inf")
        return scores

    def timed(max_tokens: int) -> tuple[float, int, int]:
        llama.reset()
        start = time.perf_counter()
        out: Any = llama.create_completion(
            prompt, max_tokens=max_tokens, temperature=0.0, logits_processor=llama_cpp.LogitsProcessorList([no_eos])
        )
        usage = out["usage"]
        return time.perf_counter() - start, int(usage["prompt_tokens"]), int(usage["completion_tokens"])

    timed(1)  # warm-up
    t1, n_prompt, _ = min((timed(1) for _ in range(3)), key=lambda r: r[0])
    tg, _, n_gen = min((timed(GEN_TOKENS + 1) for _ in range(2)), key=lambda r: r[0])
    return {
        "model": model,
        "n_threads": n_threads,
        "prompt_tokens": n_prompt,
        "prompt_tok_per_s": round(n_prompt / t1, 1),
        "gen_tokens": n_gen - 1,
        "gen_tok_per_s": round((n_gen - 1) / (tg - t1), 1),
    }


def effective_rates(
    model: str, n_threads: int, raw: dict[str, Any], sizes: dict[str, int], data_dir: str | None
) -> list[dict[str, Any]]:
    """Rates of ``model`` inside stageopt evaluations of HotpotQA and GSM8K."""
    rows = []
    for task_name, n in sizes.items():
        task = get_task(task_name, data_dir=data_dir)
        program = task.program() if task_name == "hotpotqa" else task.single_stage_program()
        assert program is not None
        lm = LocalLM(model, cache=False, n_threads=n_threads, max_tokens=256)
        engine = lm.local_engine
        before = (engine.stats.seconds, engine.stats.prompt_tokens, engine.stats.completion_tokens, engine.stats.calls)
        start = time.perf_counter()
        report = evaluate(program, task.load("dev", n=n), task.metric, lm=lm, adapter=SmallLMAdapter())
        wall = time.perf_counter() - start
        seconds = engine.stats.seconds - before[0]
        prompt = engine.stats.prompt_tokens - before[1]
        completion = engine.stats.completion_tokens - before[2]
        gen_s = completion / raw["gen_tok_per_s"]
        # the prompt's share of the engine's seconds, estimated; None where generation is nearly all of it
        prompt_s = seconds - gen_s if seconds - gen_s > 0.1 * seconds else None
        rows.append(
            {
                "model": model,
                "n_threads": n_threads,
                "task": task_name,
                "n": report.n,
                "calls": engine.stats.calls - before[3],
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "wall_s": round(wall, 2),
                "lm_s": round(seconds, 2),
                "lm_busy_share": round(seconds / wall, 3),
                "effective_prompt_tok_per_s": round(prompt / prompt_s, 1) if prompt_s else None,
                "effective_vs_raw_prompt": round(prompt / prompt_s / raw["prompt_tok_per_s"], 3) if prompt_s else None,
                "completion_tok_per_s_incl_prompt": round(completion / seconds, 1),
            }
        )
    return rows


def batched_rates(model: str, parallel: list[int], sizes: dict[str, int], data_dir: str | None) -> list[dict[str, Any]]:
    """Serial (``parallel=1``) against batched decoding of ``model`` at ``num_threads=p`` examples.

    The serial row runs with as many example threads as the largest ``p`` (today's ``--num-threads
    N`` path: the threads queue on the model's lock), so rows differ only in batching. Each batched
    row counts the examples whose prediction differs from the serial one, and the logical calls.
    """
    rows: list[dict[str, Any]] = []
    for task_name, n in sizes.items():
        if n <= 0:
            continue
        task = get_task(task_name, data_dir=data_dir)
        program = task.program() if task_name == "hotpotqa" else task.single_stage_program()
        assert program is not None
        examples = task.load("dev", n=n)
        serial: list[str] | None = None
        serial_wall = 0.0
        for p in [1, *parallel]:
            lm = LocalLM(model, cache=False, max_tokens=256, parallel=p)
            engine = lm.local_engine
            start = time.perf_counter()
            report = evaluate(
                program,
                examples,
                task.metric,
                lm=lm,
                adapter=SmallLMAdapter(),
                num_threads=p if p > 1 else max(parallel),
            )
            wall = time.perf_counter() - start
            predictions = [json.dumps(e.prediction, sort_keys=True, default=str) for e in report.examples]
            if p == 1:
                serial, serial_wall = predictions, wall
            assert serial is not None
            stats = engine.batch_stats
            row: dict[str, Any] = {
                "model": model,
                "task": task_name,
                "n": report.n,
                "parallel": p,
                "logical_calls": report.usage.lm_calls,
                "prompt_tokens": engine.stats.prompt_tokens,
                "completion_tokens": engine.stats.completion_tokens,
                "wall_s": round(wall, 2),
                "completion_tok_per_s": round(engine.stats.completion_tokens / wall, 1),
                "score": round(report.score, 4),
                "predictions_differing_from_serial": sum(a != b for a, b in zip(serial, predictions, strict=True)),
            }
            if stats is not None:
                row.update(
                    {
                        "forward_passes": stats.steps,
                        "max_active": stats.max_active,
                        "prefix_hit_rate": round(stats.prefix_hit_rate, 3),
                    }
                )
            if p > 1:
                row["speedup_vs_serial"] = round(serial_wall / wall, 2)
            rows.append(row)
    return rows


def trial_costs(n_trials: int, window: int = 50) -> dict[str, Any]:
    """Seconds per trial against trial index for random search on the testbed (SQLite study)."""
    testbed = Testbed(n_stages=3, seed=0)
    per_trial = len(testbed.valset) * 3
    with tempfile.TemporaryDirectory() as folder:
        optimizer = RandomSearch(
            testbed.metric,
            budget=n_trials * per_trial + per_trial,
            lm=testbed.lm(),
            adapter=SmallLMAdapter(),
            seed=0,
            run_dir=folder,
            n_trials=n_trials,
            patience=None,
        )
        start = time.perf_counter()
        optimizer.compile(testbed.program(), trainset=testbed.trainset, valset=testbed.valset)
        wall = time.perf_counter() - start
        result = optimizer.result
        assert result is not None
        walls = [float(r["wall_s"]) for r in sorted(result.history, key=lambda r: r["trial"])]
    deltas = [b - a for a, b in itertools.pairwise(walls)]
    windows = [statistics.mean(deltas[i : i + window]) for i in range(0, len(deltas) - window + 1, window)]
    return {
        "strategy": "random",
        "storage": "sqlite",
        "trials": len(walls),
        "val_examples": len(testbed.valset),
        "lm_calls_per_trial": per_trial,
        "wall_s": round(wall, 2),
        "s_per_trial_windows": [round(w, 4) for w in windows],
        "last_over_first_window": round(windows[-1] / windows[0], 3) if len(windows) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b")
    parser.add_argument("--sections", default="raw,effective,batched,trials", help="which measurements to run")
    parser.add_argument("--threads", default="1,2", help="llama.cpp thread counts to measure")
    parser.add_argument("--hotpotqa", type=int, default=8)
    parser.add_argument("--gsm8k", type=int, default=4)
    batched_models = "gemma3-270m,gemma3-270m-q8,qwen2.5-coder-0.5b,qwen2.5-coder-0.5b-q8"
    parser.add_argument("--batched-models", default=batched_models)
    parser.add_argument("--parallel", default="4", help="batch sizes (evaluation threads) of the batched section")
    parser.add_argument("--batched-gsm8k", type=int, default=8)
    parser.add_argument("--batched-hotpotqa", type=int, default=8)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    parser.add_argument("--resume", action="store_true", help="keep the measurements already in --out")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))

    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    commands = result.get("commands", [result["command"]] if "command" in result else [])
    result.update(
        {
            "commands": [*commands, " ".join(["python", *sys.argv])],
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {platform.python_version()}",
        }
    )
    result.pop("command", None)
    for key in ("raw", "effective", "batched"):
        result.setdefault(key, [])

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    def done(section: str, model: str, **keys: Any) -> bool:
        return any(r["model"] == model and all(r.get(k) == v for k, v in keys.items()) for r in result[section])

    threads = [int(t) for t in args.threads.split(",")]
    for model in args.models.split(","):
        for n_threads in threads:
            if "raw" not in sections or done("raw", model, n_threads=n_threads):
                continue
            raw = raw_rates(model, n_threads, args.data_dir)
            result["raw"].append(raw)
            print(json.dumps(raw))
            save()
        if "effective" not in sections or done("effective", model):
            continue
        best = max((r for r in result["raw"] if r["model"] == model), key=lambda r: r["gen_tok_per_s"])
        rows = effective_rates(
            model, best["n_threads"], best, {"hotpotqa": args.hotpotqa, "gsm8k": args.gsm8k}, args.data_dir
        )
        result["effective"] += rows
        for row in rows:
            print(json.dumps(row))
        save()
    if "batched" in sections:
        parallel = [int(p) for p in args.parallel.split(",")]
        for model in args.batched_models.split(","):
            for task_name, n in (("gsm8k", args.batched_gsm8k), ("hotpotqa", args.batched_hotpotqa)):
                if done("batched", model, task=task_name):
                    continue
                rows = batched_rates(model, parallel, {task_name: n}, args.data_dir)
                result["batched"] += rows
                for row in rows:
                    print(json.dumps(row))
                save()
    if "trials" in sections and args.trials > 0 and "trials" not in result:
        result["trials"] = trial_costs(args.trials)
        print(json.dumps(result["trials"]))
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
