"""Throughput of 1, 2 and 4 worker processes on one PostgreSQL-backed study.

    python benchmarks/scaling_workers.py [--workers 1,2,4] [--delay 0.5] [--budget-calls 420] \
        [--val-size 5] [--out benchmarks/results/scaling_workers]

LM calls to hosted endpoints are I/O-bound. Here the endpoint is ``benchmarks/delay_server.py``
on 127.0.0.1 (OpenAI-compatible; every call sleeps ``--delay`` seconds, in its own thread, so it
is never the bottleneck: its ``max_concurrency`` is reported). For each worker count W, a
throwaway PostgreSQL cluster (``scripts/postgres.sh``) holds a fresh study;
``stageopt optimize --strategy random --parallel-trials W`` runs the search and scores jobs itself,
and W - 1 ``stageopt worker`` processes join it, so W processes score trials. The DSPy cache is
off (``--no-cache``): every logical call reaches the server.

Throughput is measured over the search, from the start of the first job after the baseline to
the last job's end (the job queue's timestamps): the candidate proposals and the baseline trial
before it are the leader's alone and the same for every W. Reported: trials per hour, logical LM
calls per second, the speedup over W = 1, and which process scored how many jobs. Writes
``OUT/scaling.json`` and ``OUT/scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna

from benchmarks.delay_server import start_in_thread

ROOT = Path(__file__).resolve().parents[1]
STAGEOPT = [str(Path(sys.executable).parent / "stageopt")]


def start_postgres(folder: Path, port: int) -> str:
    """A throwaway cluster; returns its URL."""
    out = subprocess.run(
        ["sh", str(ROOT / "scripts" / "postgres.sh"), "start", str(folder), str(port)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def stop_postgres(folder: Path) -> None:
    subprocess.run(["sh", str(ROOT / "scripts" / "postgres.sh"), "stop", str(folder)], check=False)


def run_once(workers: int, url: str, api_base: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One study scored by ``workers`` processes; returns its measurements."""
    study = f"scale-w{workers}"
    run_dir = out / "runs" / f"w{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh study each time: never a resumed one
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lead_cmd = [
        *STAGEOPT,
        "optimize",
        "--task",
        "hotpotqa",
        "--strategy",
        "random",
        "--option",
        "patience=null",
        "--lm",
        "openai/delay",
        "--api-base",
        api_base,
        "--no-cache",
        "--budget-calls",
        str(args.budget_calls),
        "--val-size",
        str(args.val_size),
        "--bootstrap-size",
        str(args.bootstrap_size),
        "--seed",
        "0",
        "--storage",
        url,
        "--study",
        study,
        "--parallel-trials",
        str(workers),
        "--out",
        str(run_dir),
    ]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(logs / f"w{workers}-leader.log", "w") as log:
        leader = subprocess.Popen(lead_cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        helpers = []
        for i in range(workers - 1):
            wlog = open(logs / f"w{workers}-worker{i + 1}.log", "w")  # noqa: SIM115 - closed below
            cmd = [*STAGEOPT, "worker", "--storage", url, "--study", study, "--wait", "300"]
            # A worker started before the leader created the study would be refused: wait for it.
            _wait_for_study(url, study, leader)
            helpers.append((subprocess.Popen(cmd, stdout=wlog, stderr=subprocess.STDOUT, env=env, cwd=ROOT), wlog))
        code = leader.wait()
        for proc, wlog in helpers:
            proc.wait(timeout=120)
            wlog.close()
    total_s = time.monotonic() - start
    if code != 0:
        raise SystemExit(f"the leader failed (exit {code}); see {logs}")
    result = json.loads((run_dir / "result.json").read_text())
    storage = optuna.storages.RDBStorage(_driver(url))
    jobs = optuna.load_study(study_name=f"{study}.jobs", storage=storage).get_trials(deepcopy=False)
    done = sorted(
        (t for t in jobs if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start is not None),
        key=lambda t: t.datetime_start or datetime.min,
    )
    done = done[1:]  # the baseline, scored alone before the search starts
    first = min(t.datetime_start for t in done if t.datetime_start is not None)
    last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
    phase_s = (last - first).total_seconds()
    calls = sum(int(t.user_attrs["outcome"]["lm_calls"]) for t in done)
    by_worker: dict[str, int] = {}
    for t in done:
        name = t.user_attrs["outcome"]["worker"]
        by_worker[name] = by_worker.get(name, 0) + 1
    return {
        "workers": workers,
        "jobs": len(done),
        "trials": len(result["history"]),
        "trial_phase_s": round(phase_s, 2),
        "trials_per_hour": round(len(done) / phase_s * 3600, 1),
        "lm_calls_per_s": round(calls / phase_s, 3),
        "job_lm_calls": calls,
        "run_lm_calls": result["usage"]["lm_calls"],
        "budget_calls": args.budget_calls,
        "total_s": round(total_s, 2),
        "jobs_by_process": sorted(by_worker.values(), reverse=True),
        "status": result["status"],
    }


def _driver(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg2://", 1) if url.startswith("postgresql://") else url


def _wait_for_study(url: str, study: str, leader: subprocess.Popen[bytes]) -> None:
    storage = optuna.storages.RDBStorage(_driver(url))
    while f"{study}.jobs" not in optuna.get_all_study_names(storage):
        if leader.poll() is not None:
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per LM call at the endpoint")
    parser.add_argument("--budget-calls", type=int, default=420)
    parser.add_argument("--val-size", type=int, default=5)
    parser.add_argument("--bootstrap-size", type=int, default=2)
    parser.add_argument("--port", type=int, default=55433, help="PostgreSQL port")
    parser.add_argument("--out", default="benchmarks/results/scaling_workers")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    server, api_base = start_in_thread(delay=args.delay)
    rows = []
    try:
        for workers in counts:
            with tempfile.TemporaryDirectory(prefix="stageopt-pg-") as tmp:
                folder = Path(tmp) / "pg"
                url = start_postgres(folder, args.port)
                try:
                    server.reset_stats()
                    row = run_once(workers, url, api_base, args, out)
                    row["endpoint"] = server.stats()
                finally:
                    stop_postgres(folder)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    base = rows[0]["lm_calls_per_s"]
    for row in rows:
        row["speedup_calls_per_s"] = round(row["lm_calls_per_s"] / base, 2)
        row["speedup_trials_per_hour"] = round(row["trials_per_hour"] / rows[0]["trials_per_hour"], 2)
    command = "python benchmarks/scaling_workers.py " + " ".join(sys.argv[1:])
    summary = {"command": command.strip(), "delay_s": args.delay, "val_size": args.val_size, "rows": rows}
    (out / "scaling.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"# Scaling: worker processes on one PostgreSQL study (endpoint delay {args.delay} s per call)",
        "",
        f"Command: `{summary['command']}`",
        "",
        "| processes scoring | jobs | trial phase s | trials/hour | logical LM calls/s | speedup | "
        "jobs per process | endpoint max concurrency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workers']} | {row['jobs']} | {row['trial_phase_s']} | {row['trials_per_hour']} | "
            f"{row['lm_calls_per_s']} | {row['speedup_calls_per_s']}x | {row['jobs_by_process']} | "
            f"{row['endpoint'].get('max_concurrency')} |"
        )
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
