"""Per embedded model and prompt layout: parse rate, score and time on three tasks' probes.

    python benchmarks/layout_probe.py \
        [--models gemma3-270m,qwen2.5-coder-0.5b@completion,qwen2.5-coder-0.5b@chat] \
        [--hotpotqa 30] [--gsm8k 15] [--mbpp 10] [--max-tokens 256] \
        [--out benchmarks/results/layout_probe.json] [--resume]

Cells (``--max-tokens`` 256 per call by default; each an unoptimized program as a plain user
writes it, small adapter, T=0, cache off):

- ``hotpotqa``: the answer stage given the two gold paragraphs (the task's oracle program), dev[:N];
- ``gsm8k``: the single-stage program (question -> solution, answer), dev[:N];
- ``mbpp``: generate -> visible test in the sandbox -> refine, dev[:N] (score: hidden tests pass).

Each cell is written to ``--out`` when it finishes; ``--resume`` keeps the cells already there.
The layouts compared are ``completion`` (the prompt as it is) and ``chat`` (the GGUF's chat
template around it, the first output label opening the assistant's turn).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from stageopt.evaluation import evaluate
from stageopt.lm import SmallLMAdapter, resolve_lm
from stageopt.tasks import get_task

DEFAULT_MODELS = "gemma3-270m,qwen2.5-coder-0.5b@completion,qwen2.5-coder-0.5b@chat"


def _cell(task_name: str, n: int, lm: Any, data_dir: str | None) -> dict[str, Any]:
    task = get_task(task_name, data_dir=data_dir)
    examples = task.load("dev", n=n)
    if task_name == "hotpotqa":
        oracle = task.oracle_programs(task.program())["answer"]
        program = oracle.program
        examples = [e.with_inputs(*e.inputs().keys(), *oracle.gold_inputs) for e in examples]
        stage_metrics = None
    elif task_name == "gsm8k":
        program, stage_metrics = task.single_stage_program(), None
    else:
        program, stage_metrics = task.program(), task.stage_metrics()
    assert program is not None
    start = time.monotonic()
    report = evaluate(
        program,
        examples,
        task.metric,
        lm=lm,
        adapter=SmallLMAdapter(),
        stage_metrics=stage_metrics,
        progress=True,
        desc=task_name,
    )
    seconds = time.monotonic() - start
    stages = {
        name: {
            "parse_rate": s.parse_rate,
            "mean_prompt_tokens": s.mean_prompt_tokens,
            "mean_completion_tokens": s.mean_completion_tokens,
        }
        for name, s in report.stages.items()
    }
    return {
        "n": report.n,
        "score": report.score,
        "ci95": list(report.ci95),
        "parse_rate": report.parse_rate,
        "seconds": round(seconds, 1),
        "s_per_example": round(seconds / max(report.n, 1), 2),
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--hotpotqa", type=int, default=30)
    parser.add_argument("--gsm8k", type=int, default=15)
    parser.add_argument("--mbpp", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=256, help="completion tokens per call")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="benchmarks/results/layout_probe.json")
    parser.add_argument("--resume", action="store_true", help="keep the cells already in --out")
    args = parser.parse_args(argv)

    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    result.update(
        {
            "command": " ".join(["python", *sys.argv]),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {platform.python_version()}",
        }
    )
    cells: dict[str, Any] = result.setdefault("cells", {})
    sizes = {"hotpotqa": args.hotpotqa, "gsm8k": args.gsm8k, "mbpp": args.mbpp}
    for model in args.models.split(","):
        lm = resolve_lm(model, cache=False, max_tokens=args.max_tokens)
        for task_name, n in sizes.items():
            key = f"{model} {task_name}"
            if n <= 0 or key in cells:
                continue
            cells[key] = {"model": model, "task": task_name, **_cell(task_name, n, lm, args.data_dir)}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(key, json.dumps({k: cells[key][k] for k in ("n", "score", "parse_rate", "s_per_example")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
