"""The torch backend on a tiny random Gemma 3 model built offline: decoding, soft prompts, LoRA, saving."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from dspy.lm15 import Config, Message, Request  # noqa: E402

from stageopt import ContextWindowError, ModelNotAvailableError  # noqa: E402
from stageopt.lm import (  # noqa: E402
    LoraState,
    SoftPromptState,
    TorchEngine,
    TorchLM,
    TorchModel,
    load_torch_model,
    load_torch_stages,
    save_torch_stages,
)
from stageopt.lm._torch import input_embeddings  # noqa: E402
from stageopt.lm._torch_lm import _forbid_blank_start, generate  # noqa: E402
from stageopt.strategies._softprompt_train import Trainer, TrainingPair, pair_loss  # noqa: E402
from tests.lm.tiny_torch import make_tiny_model  # noqa: E402

PROMPT = "City: Lyon\nCountry:"
PAIR = TrainingPair("locate", PROMPT, " France\n", 0, "labeled")


def _free(prompt_tokens: int, target_tokens: int) -> None:
    """A budget that never runs out."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TorchModel:
    return load_torch_model(str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> TorchModel:
    """A model of its own: LoRA adapters are injected into the shared base model."""
    return load_torch_model(str(make_tiny_model(tmp_path_factory.mktemp("tiny_lora") / "model")))


def _train(base: TorchModel, state: SoftPromptState | LoraState, *, steps: int, lr: float) -> list[float]:
    torch.manual_seed(0)
    trainer = Trainer(
        state.parameters(),
        optimizer="adamw",
        lr=lr,
        weight_decay=0.0,
        total_steps=steps,
        warmup_ratio=0.1,
        grad_clip=1.0,
    )
    losses = []
    for _ in range(steps):
        loss = pair_loss(base, state, [PAIR], _free)
        trainer.backward(loss)
        trainer.step()
        losses.append(float(loss.detach()))
    return losses


def _request(text: str, *, stop: tuple[str, ...] = (), max_tokens: int = 8) -> Request:
    return Request(
        model="tiny", messages=(Message.user(text),), config=Config(max_tokens=max_tokens, stop=stop, temperature=0.0)
    )


def test_the_model_loads_once_per_process_and_is_frozen(tiny: TorchModel) -> None:
    assert load_torch_model(tiny.name) is tiny
    assert not any(p.requires_grad for n, p in tiny.model.named_parameters() if ".lora_" not in n)


def test_a_name_that_is_neither_embedded_nor_a_folder_is_refused_without_download(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="nothing is downloaded"):
        load_torch_model(str(tmp_path / "absent"))


def test_stop_strings_cut_the_completion_and_max_tokens_bounds_it(tiny: TorchModel) -> None:
    free = generate(tiny, None, PROMPT, max_tokens=12)
    assert free.completion_tokens == 12
    assert free.finish == "length"
    stop = free.text[4:6]
    assert stop.strip(), f"need a visible stop string in {free.text!r}"
    cut = generate(tiny, None, PROMPT, max_tokens=12, stop=[stop])
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish == "stop"
    assert cut.completion_tokens < 12


def test_a_line_stop_forbids_a_blank_first_token(tiny: TorchModel) -> None:
    newline = tiny.encode("\n", special=False)[0]
    logits = torch.zeros(len(tiny.tokenizer))
    logits[newline] = 10.0  # the model "wants" a blank line
    logits[tiny.tokenizer.eos_token_id] = 9.0
    masked = _forbid_blank_start(tiny, logits)
    first = int(torch.argmax(masked))
    assert first not in (newline, tiny.tokenizer.eos_token_id)
    assert tiny.tokenizer.decode([first]).strip()


def test_the_engine_answers_requests_with_usage_and_counts_virtual_tokens(tiny: TorchModel) -> None:
    state = SoftPromptState.initial(tiny, 5, text="Name the country")
    response = TorchEngine(tiny, state=state).complete(_request(PROMPT, max_tokens=6))
    n_ids = len(tiny.encode(PROMPT, special=True))
    assert response.usage.input_tokens == n_ids + 5
    assert response.usage.output_tokens == 6
    assert response.finish_reason == "length"
    assert response.provider_data["backend"] == "torch"


def test_a_soft_prompt_changes_the_outputs(tiny: TorchModel) -> None:
    plain = TorchLM(tiny, max_tokens=8)
    prompted = TorchLM(tiny, state=SoftPromptState.initial(tiny, 8, seed=3), max_tokens=8)
    assert plain(PROMPT) != prompted(PROMPT)


def test_a_prompt_over_the_context_window_is_refused(tiny: TorchModel) -> None:
    with pytest.raises(ContextWindowError, match="context window"):
        generate(tiny, None, "word " * tiny.n_ctx, max_tokens=4)


def test_a_deep_copy_shares_the_engine_and_its_state(tiny: TorchModel) -> None:
    lm = TorchLM(tiny, state=SoftPromptState.initial(tiny, 2))
    copied = copy.deepcopy(lm)
    assert copied.torch_engine is lm.torch_engine
    assert copied.torch_engine.base is tiny


def test_prompt_tuning_memorises_a_target(tiny: TorchModel) -> None:
    state = SoftPromptState.initial(tiny, 8, text="Name the country")
    before = generate(tiny, state, PROMPT, max_tokens=4, stop=["\n"]).text
    losses = _train(tiny, state, steps=40, lr=0.1)
    assert losses[-1] < losses[0] - 0.2
    assert before.strip() != "France"
    assert generate(tiny, state, PROMPT, max_tokens=4, stop=["\n"]).text.strip() == "France"


def test_a_padded_batch_has_the_loss_of_its_pairs_alone(tiny: TorchModel) -> None:
    state = SoftPromptState.initial(tiny, 3, text="Name the country")
    pairs = [
        PAIR,
        TrainingPair("locate", "Question: Which city is the capital of Japan?\nAnswer:", " Tokyo city\n", 1, "x"),
    ]
    with torch.no_grad():
        batched = float(pair_loss(tiny, state, pairs, _free))
        total, count = 0.0, 0
        for pair in pairs:  # the reference: one unpadded row, every logit, by hand
            ids = tiny.encode(pair.prompt, special=True)
            target = tiny.encode(pair.target, special=False)
            embeds = input_embeddings(tiny, state, ids + target)
            logits = tiny.forward(embeds[None])[0]
            start = embeds.shape[0] - len(target)
            losses = torch.nn.functional.cross_entropy(logits[start - 1 : -1], torch.tensor(target), reduction="sum")
            total, count = total + float(losses), count + len(target)
    assert batched == pytest.approx(total / count, rel=1e-4)


def test_lora_trains_its_adapter_only(tiny_lora: TorchModel) -> None:
    state = LoraState(tiny_lora, r=4)
    base_weights = {k: v.clone() for k, v in tiny_lora.model.state_dict().items() if ".lora_" not in k}
    losses = _train(tiny_lora, state, steps=40, lr=1e-2)
    assert losses[-1] < losses[0] - 0.2
    assert generate(tiny_lora, state, PROMPT, max_tokens=4, stop=["\n"]).text.strip() == "France"
    # the base model is untouched, and runs without the adapter for other stages
    after = {k: v for k, v in tiny_lora.model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(base_weights[k], v) for k, v in after.items())
    assert generate(tiny_lora, None, PROMPT, max_tokens=4, stop=["\n"]).text.strip() != "France"


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_saved_states_load_into_identical_generations(
    method: str, tiny: TorchModel, tiny_lora: TorchModel, tmp_path: Path
) -> None:
    base = tiny if method == "prompt" else tiny_lora
    state: SoftPromptState | LoraState = (
        SoftPromptState.initial(base, 6, text="Name the country") if method == "prompt" else LoraState(base, r=2)
    )
    _train(base, state, steps=5, lr=0.05)
    lm = TorchLM(base, state=state, max_tokens=8)
    meta = save_torch_stages({"locate": lm}, tmp_path / "softprompt.safetensors")
    assert meta["stages"]["locate"]["method"] == method
    loaded = load_torch_stages(meta, tmp_path, max_tokens=8)["locate"]
    assert loaded.torch_engine.state is not state
    for prompt in (PROMPT, "City: Osaka\nCountry:"):
        assert loaded(prompt) == lm(prompt)
    saved, restored = state.state_dict(), loaded.torch_engine.state.state_dict()  # type: ignore[union-attr]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
