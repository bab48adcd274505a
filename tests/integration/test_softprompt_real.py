"""SoftPrompt on the real embedded model: Gemma 3 270M dequantised into torch, HotpotQA's answer stage.

Two bootstrap examples on llama.cpp, one epoch of prompt tuning of the answer stage on the torch
copy (the GGUF loads into transformers once: about 50 s and 3 GB), validation on two examples
with the answer stage on TorchLM, then save -> load -> identical answers; then the same for a
LoRA adapter (about 25 s more). Expect 2-4 minutes on 2 cores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

import dspy
import torch

from stageopt.cli._routing import load_program, save_program
from stageopt.evaluation import evaluate
from stageopt.lm import LocalLM, LoraState, SmallLMAdapter, SoftPromptState, TorchLM, torch_stages
from stageopt.lm._torch_io import attach
from stageopt.strategies import SoftPrompt, TrainingSchedule
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

BUDGET = 60


def _answer_stage_optimizer(gemma: LocalLM, tmp_path: Path, **settings: Any) -> SoftPrompt:
    """SoftPrompt on HotpotQA's answer stage for one epoch, batches of two."""
    task = get_task("hotpotqa")
    return SoftPrompt(
        task.metric,
        budget=BUDGET,
        lm=gemma,
        adapter=SmallLMAdapter(),
        stage_metrics=task.stage_metrics(),
        stages=["answer"],
        schedule=TrainingSchedule(epochs=1, batch_size=2),
        bootstrap_size=2,
        run_dir=tmp_path / "run",
        **settings,
    )


def _saved_and_loaded(trained: dspy.Module, gemma: LocalLM, tmp_path: Path) -> dspy.Module:
    """``trained`` saved and loaded again; its answer stage's tensors and answers must be the same."""
    path = tmp_path / "program.json"
    save_program(trained, path, {})
    assert (tmp_path / "softprompt.safetensors").is_file()
    loaded = get_task("hotpotqa").program()
    load_program(loaded, path, lm_name="gemma3-270m", lm=gemma, resolve=lambda name: gemma)
    assert set(torch_stages(loaded)) == {"answer"}
    # The same prompt gives the same answer from the saved and the loaded stage (comparing whole
    # programs would also compare the llama.cpp query stages, whose prefix cache may shift logits).
    saved_lm, loaded_lm = trained.answer.lm, loaded.answer.lm
    assert isinstance(saved_lm, TorchLM)
    assert isinstance(loaded_lm, TorchLM)
    saved_state, loaded_state = saved_lm.torch_engine.state, loaded_lm.torch_engine.state
    assert loaded_state is not None
    assert type(loaded_state) is type(saved_state)
    saved = saved_state.state_dict()
    for key, tensor in loaded_state.state_dict().items():
        assert torch.equal(tensor, saved[key])
    messages = [{"role": "user", "content": "Question: Which city is the capital of France?\nAnswer:"}]
    assert loaded_lm(messages=messages) == saved_lm(messages=messages)
    return loaded


def test_softprompt_trains_the_answer_stage_of_hotpotqa(gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    optimizer = _answer_stage_optimizer(gemma, tmp_path, val_size=2)
    program = optimizer.compile(task.program(), trainset=task.load("train", n=4))
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET
    # the schedule's settings, the method's default learning rate filled in, decided the stop
    stopping = result.notes["stopping"]["settings"]
    assert (stopping["epochs"], stopping["batch_size"], stopping["lr"]) == (1, 2, optimizer.schedule.lr)
    assert optimizer.schedule.lr is not None
    note = result.notes["softprompt"]
    assert note["model"] == "gemma3-270m"
    assert note["trained"] == ["answer"]
    n_pairs = sum(note["pairs"]["answer"].values())
    assert n_pairs >= 2  # the gold answers of both bootstrap examples at least
    (epoch,) = [h for h in result.history if h["phase"] == "train"]
    assert epoch["round"] == 1
    assert math.isfinite(epoch["objectives"]["train_loss"])
    assert epoch["objectives"]["train_loss"] > 0
    assert note["epochs"][0]["forward_passes"] == math.ceil(n_pairs / 2)
    # the answer stage's prompt grows by the 8 virtual tokens only
    assert epoch["objectives"]["prompt_tokens"]["answer"] > 8

    # the best epoch's soft prompt runs inside the normal program, and survives save -> load
    tensors = optimizer.best_parameters
    assert tensors is not None
    trained = task.program()
    attach(trained, optimizer.restore_lms(tensors))
    answer_lm = trained.answer.lm
    assert isinstance(answer_lm, TorchLM)
    assert isinstance(answer_lm.torch_engine.state, SoftPromptState)
    dev = task.load("dev", n=1)
    before = evaluate(trained, dev, task.metric, lm=gemma, adapter=SmallLMAdapter())
    assert [c.model for c in before.examples[0].calls][-1] == "torch/gemma3-270m"
    loaded = _saved_and_loaded(trained, gemma, tmp_path)
    after = evaluate(loaded, dev, task.metric, lm=gemma, adapter=SmallLMAdapter())
    assert [c.model for c in after.examples[0].calls][-1] == "torch/gemma3-270m"
    # the returned program is either the original one or the trained stage, as validation decided
    returned = torch_stages(program)
    assert (set(returned) == {"answer"}) == (result.best["trial"] == epoch["trial"])


def test_lora_trains_the_answer_stage_of_hotpotqa(gemma: LocalLM, tmp_path: Path) -> None:
    """The LoRA method on the real model: one epoch moves the adapter, which survives save -> load."""
    task = get_task("hotpotqa")
    optimizer = _answer_stage_optimizer(gemma, tmp_path, method="lora", val_size=1)
    optimizer.compile(task.program(), trainset=task.load("train", n=3))
    result = optimizer.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET
    note = result.notes["softprompt"]
    assert (note["method"], note["trained"]) == ("lora", ["answer"])
    (epoch,) = note["epochs"]
    assert math.isfinite(epoch["train_loss"]["answer"])
    assert epoch["train_loss"]["answer"] > 0

    tensors = optimizer.best_parameters
    assert tensors is not None
    trained = task.program()
    attach(trained, optimizer.restore_lms(tensors))
    answer_lm = trained.answer.lm
    assert isinstance(answer_lm, TorchLM)
    state = answer_lm.torch_engine.state
    assert isinstance(state, LoraState)
    lora_b = [t for k, t in state.state_dict().items() if "lora_B" in k]
    assert lora_b
    assert any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: training moved it
    _saved_and_loaded(trained, gemma, tmp_path)
