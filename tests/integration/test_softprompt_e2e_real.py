"""SoftPrompt's end-to-end (Gumbel) mode on the real embedded model: GSM8K's plan -> solve chain.

Two bootstrap examples on llama.cpp; one epoch on the torch copy of Gemma 3 270M in which the
plan is generated as straight-through Gumbel-softmax samples and the gold solution's loss reaches
the plan's soft prompt; validation on one example; then the run's report shows the training
curves. Expect 3-4 minutes on 2 cores (the GGUF loads into torch once per session).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

import torch

from stageopt.cli._routing import save_program
from stageopt.lm import LocalLM, SmallLMAdapter, SoftPromptState, load_torch_model
from stageopt.report import write_report
from stageopt.strategies import SoftPrompt, TrainingSchedule
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration


def test_the_chain_loss_trains_the_plan_stage_of_gsm8k(gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("gsm8k")
    run_dir = tmp_path / "run"
    optimizer = SoftPrompt(
        task.metric,
        budget=2000,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        stages=["plan", "solve"],
        targets="labeled",
        end_to_end=True,
        schedule=TrainingSchedule(epochs=1, batch_size=2, patience=None),
        bootstrap_size=2,
        val_size=1,
        run_dir=run_dir,
    )
    program = optimizer.compile(task.program(), trainset=task.load("train", n=4))
    result = optimizer.result
    assert result is not None
    note = result.notes["softprompt"]
    assert note["trained"] == ["plan", "solve"]
    assert set(note["chains"]) == {"plan->solve"}  # the plan is inserted verbatim in solve's prompt
    assert note["chains"]["plan->solve"] >= 1
    (epoch,) = note["epochs"]
    assert set(epoch["train_loss"]) == {"plan", "solve", "plan->solve"}
    assert all(math.isfinite(v) and v > 0 for v in epoch["train_loss"].values())
    # one pass per generated plan token plus the downstream pass, for each chain; budget counts them
    assert epoch["forward_passes"] > 2 * 2
    assert result.usage["lm_calls"] >= epoch["forward_passes"]

    # the plan's soft prompt moved away from its start (its instruction's embeddings)
    trained = optimizer.best_parameters  # the best epoch's tensors, whether or not validation kept them
    assert trained is not None
    base = load_torch_model("gemma3-270m")
    plan = dict(task.program().named_predictors())["plan"]
    start = SoftPromptState.initial(base, 8, text=plan.signature.instructions, seed=optimizer.seed)
    assert not torch.allclose(trained["plan"]["soft_prompt"], start.tensor.detach())

    save_program(program, run_dir / "program.json", {})
    (run_dir / "result.json").write_text(json.dumps(result.to_dict()))
    paths = write_report([run_dir])
    html = paths.html.read_text()
    assert 'id="training-1"' in html
    assert 'id="training-plot-1"' in html
    assert "loss plan-&gt;solve" in html
