"""``stageopt worker`` and the ``optimize`` flags that hand a run's evaluations to workers."""

from __future__ import annotations

import argparse
from typing import Any

from stageopt._errors import ConfigurationError


def add_distributed_arguments(opt: argparse.ArgumentParser) -> None:
    """``optimize`` flags: the study name and how many trials are scored at once."""
    opt.add_argument(
        "--study",
        default=None,
        help="Optuna study name in --storage (default: the strategy name); `stageopt worker --study` joins it",
    )
    opt.add_argument(
        "--parallel-trials",
        type=int,
        default=1,
        metavar="K",
        help="trials scored at once by `stageopt worker` processes sharing --storage (a PostgreSQL URL); "
        "set it to the number of workers + 1 (this process works too)",
    )


def add_worker_arguments(worker: argparse.ArgumentParser) -> None:
    """``stageopt worker`` flags."""
    worker.add_argument("--storage", required=True, help="the run's storage URL, e.g. postgresql://user@host/db")
    worker.add_argument("--study", required=True, help="the run's study name (`stageopt optimize --study`)")
    worker.add_argument("--api-key", default=None, help="API key for the run's LM (never stored in the study)")
    worker.add_argument("--api-base", default=None, help="reach the run's LM at this base URL instead")
    worker.add_argument("--data-dir", default=None, help="data folder, when the task needs one here")
    worker.add_argument("--num-threads", type=int, default=None, help="examples per job in parallel (default: run's)")
    worker.add_argument("--max-jobs", type=int, default=None, help="stop after this many jobs")
    worker.add_argument("--max-idle", type=float, default=None, help="stop after this many seconds without a job")
    worker.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the run to start (600)")
    worker.add_argument("-v", "--verbose", action="store_true", help="log each job")


def worker_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a worker needs to rebuild the run's task and LMs (no secrets: never the API key)."""
    return {
        "task": args.task,
        "data_dir": args.data_dir,
        "lm": args.lm,
        "api_base": args.api_base,
        "model_type": args.model_type,
        "adapter": args.adapter,
        "seed": args.seed,
        "no_cache": args.no_cache,
        "models": getattr(args, "models", None),
        "search_structure": bool(getattr(args, "search_structure", False)),
        "strategy": args.strategy,
    }


def cmd_worker(args: argparse.Namespace) -> int:
    """``stageopt worker``: score jobs of a run until it is over."""
    from stageopt.cli._commands import _resolver, _setup
    from stageopt.cli._routing import build_models, search_settings
    from stageopt.distributed import check_shared, open_storage
    from stageopt.distributed._worker import (
        HEARTBEAT_S,
        open_queue,
        run_worker,
        wait_for_spec,
        worker_name,
    )

    for name in ("max_jobs", "num_threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigurationError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    check_shared(args.storage, what="stageopt worker")
    storage = open_storage(args.storage, heartbeat_interval=HEARTBEAT_S)
    _, queue = open_queue(storage, args.study)
    spec = wait_for_spec(queue, timeout_s=args.wait)
    context = spec.get("context") or {}
    if not context.get("task"):
        raise ConfigurationError(
            f"study {args.study!r} was started from the Python API: start its workers with "
            "stageopt.distributed.run_worker(...) and the run's program, metric and LM"
        )
    run_args = argparse.Namespace(
        **{
            **context,
            "data_dir": args.data_dir or context.get("data_dir"),
            "api_base": args.api_base or context.get("api_base"),
            "api_key": args.api_key,
            "num_threads": args.num_threads or int(spec["num_threads"]),
        }
    )
    task, lm, adapter = _setup(run_args)
    _, names = search_settings(run_args, context["strategy"])
    models = build_models(names, lm_name=run_args.lm, lm=lm, resolve=_resolver(run_args)) if names else {}
    print(f"worker {worker_name()}: study {args.study!r}, task {task.name}, model {run_args.lm}", flush=True)
    report = run_worker(
        storage,
        args.study,
        program=task.program(),
        metric=task.metric,
        lm=lm,
        adapter=adapter,
        stage_metrics=task.stage_metrics(),
        models=models,
        num_threads=run_args.num_threads,
        max_jobs=args.max_jobs,
        max_idle_s=args.max_idle,
        wait_s=args.wait,
    )
    print(
        f"worker {worker_name()}: {report.jobs} jobs ({report.failed} failed) in {report.seconds:.1f} s; "
        f"stopped: {report.reason}"
    )
    return 0
