"""SoftPrompt: training data from traces, torch training (schedule, clipping, early stopping), budget, Gumbel mode.

The torch model is a tiny random Gemma 3 built offline (tests/lm/tiny_torch.py); the run's LM is
scripted, so only the trained stages run on torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import dspy
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from stageopt import ConfigurationError  # noqa: E402
from stageopt.evaluation import evaluate  # noqa: E402
from stageopt.lm import LoraState, SmallLMAdapter, SoftPromptState, TorchLM, load_torch_model  # noqa: E402
from stageopt.lm._torch import input_embeddings  # noqa: E402
from stageopt.strategies import SoftPrompt, TrainingSchedule  # noqa: E402
from stageopt.strategies._softprompt import DEFAULT_LR  # noqa: E402
from stageopt.strategies._softprompt_train import (  # noqa: E402
    Trainer,
    chain_loss,
    training_pairs,
    warmup_cosine,
)
from tests.conftest import (  # noqa: E402
    CITIES,
    CapitalOfCity,
    ScriptedEngine,
    capital_metric,
    city_examples,
    demo_sensitive_answer,
)
from tests.lm.tiny_torch import make_tiny_model  # noqa: E402


def _lm(fn: Any = demo_sensitive_answer, *, max_tokens: int = 6) -> dspy.LM:
    return dspy.LM("scripted/test", engine=ScriptedEngine(fn), cache=False, max_tokens=max_tokens)


def _answered(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    """1 when the capital stage answered anything but the scripted LM's 'nowhere' (the torch stage does)."""
    return float(bool(prediction.capital) and prediction.capital != "nowhere")


def _never(example: dspy.Example, prediction: dspy.Prediction, trace: Any = None) -> float:
    return 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("sp") / "tiny"))


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("sp_lora") / "tiny"))


def _optimizer(
    model: str, metric: Any = _answered, *, schedule: dict[str, Any] | None = None, **settings: Any
) -> SoftPrompt:
    """A small SoftPrompt; ``schedule`` overrides some fields of the tests' schedule."""
    options: dict[str, Any] = {
        "budget": 400,
        "lm": _lm(),
        "adapter": SmallLMAdapter(),
        "model": model,
        "bootstrap_size": 4,
        "val_size": 2,
        "schedule": {"epochs": 2, "batch_size": 2, "lr": 0.05, **(schedule or {})},
        **settings,
    }
    return SoftPrompt(metric, **options)


# ---- training data ----------------------------------------------------------------------------------


def _traces(fn: Any, n: int = 3) -> tuple[list[dspy.Example], list[Any], list[str]]:
    seen: list[str] = []

    def recording(prompt: str) -> str:
        seen.append(prompt)
        return str(fn(prompt))

    examples = city_examples()[:n]
    report = evaluate(
        CapitalOfCity(), examples, capital_metric, lm=_lm(recording), adapter=SmallLMAdapter(), capture_traces=True
    )
    return examples, report.examples, seen


def test_pairs_are_the_prompts_the_lm_saw_with_gold_targets_when_traces_fail() -> None:
    examples, traces, seen = _traces(demo_sensitive_answer)  # no demos: every trace fails
    found = training_pairs(
        CapitalOfCity(), traces, examples, SmallLMAdapter(), stages=["locate", "capital"], threshold=0.5
    )
    locate = found.pairs["locate"]
    assert [p.source for p in locate] == ["labeled"] * 3
    assert [p.target for p in locate] == [f" {country}\n" for _, country, _ in CITIES[:3]]
    assert {p.prompt for p in found.pairs["locate"] + found.pairs["capital"]} == set(seen)
    assert found.summary()["pairs"]["capital"] == {"bootstrapped": 0, "labeled": 3}


def test_successful_traces_give_bootstrapped_targets() -> None:
    countries = {city: country for city, country, _ in CITIES}
    capitals = {country: capital for _, country, capital in CITIES}

    def right(prompt: str) -> str:
        query = prompt.split("\n\n---\n\n")[-1].split("\n")[0]
        key, value = query.split(":", 1)
        return f" {countries[value.strip()]}" if key == "City" else f" {capitals[value.strip()]}"

    examples, traces, _ = _traces(right)
    adapter = SmallLMAdapter()
    both = training_pairs(CapitalOfCity(), traces, examples, adapter, stages=["capital"], threshold=0.5)
    assert len(both.pairs["capital"]) == 3  # the gold and the trace agree: one pair each
    booted = training_pairs(
        CapitalOfCity(), traces, examples, adapter, stages=["capital"], threshold=0.5, targets="bootstrapped"
    )
    assert [p.source for p in booted.pairs["capital"]] == ["bootstrapped"] * 3
    none = training_pairs(
        CapitalOfCity(), traces, examples, adapter, stages=["capital"], threshold=1.5, targets="bootstrapped"
    )
    assert none.pairs["capital"] == []


class Lookup(dspy.Signature):
    """Write a search query."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField()


class Reply(dspy.Signature):
    """Answer from the passages."""

    passages: str = dspy.InputField()
    answer: str = dspy.OutputField()


class RetrieveThenAnswer(dspy.Module):
    """A query stage whose output reaches the answer stage only through a retrieval step."""

    def __init__(self) -> None:
        super().__init__()
        self.search = dspy.Predict(Lookup)
        self.reply = dspy.Predict(Reply)

    def forward(self, question: str) -> dspy.Prediction:
        query = self.search(question=question).query
        passages = f"[{query}] a passage found by retrieval"
        return dspy.Prediction(answer=self.reply(passages=passages).answer)


def test_chains_link_a_verbatim_output_and_retrieval_is_a_hard_boundary() -> None:
    examples, traces, _ = _traces(demo_sensitive_answer)
    found = training_pairs(
        CapitalOfCity(), traces, examples, SmallLMAdapter(), stages=["locate", "capital"], threshold=0.5
    )
    assert len(found.chains) == 3
    chain = found.chains[0]
    assert (chain.upstream, chain.downstream, chain.inserted) == ("locate", "capital", " somewhere")
    assert chain.prefix + chain.inserted + chain.suffix in {p.prompt for p in found.pairs["capital"]}
    assert found.boundaries == []

    rows = [dspy.Example(question="q?", answer="a").with_inputs("question")]
    report = evaluate(
        RetrieveThenAnswer(),
        rows,
        lambda e, p, trace=None: 1.0,
        lm=_lm(lambda prompt: " things"),
        adapter=SmallLMAdapter(),
        capture_traces=True,
    )
    hard = training_pairs(
        RetrieveThenAnswer(), report.examples, rows, SmallLMAdapter(), stages=["search", "reply"], threshold=0.5
    )
    assert hard.chains == []
    assert len(hard.boundaries) == 1
    assert hard.boundaries[0].startswith("search->reply")


# ---- optimizer, schedule, clipping, Gumbel --------------------------------------------------------


def test_the_learning_rate_warms_up_linearly_then_decays_by_cosine() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=3)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3]
    assert lrs[:4] == pytest.approx([0.1 / 4, 0.1 / 2, 0.1 * 3 / 4, 0.1])
    for k in range(3, 10):
        assert lrs[k] == pytest.approx(0.1 * (1 + math.cos(math.pi * (k - 3) / 7)) / 2)


def test_gradient_clipping_bounds_the_norm_and_sgd_has_momentum() -> None:
    param = torch.nn.Parameter(torch.ones(4))
    trainer = Trainer(
        [param], optimizer="sgd", lr=0.1, weight_decay=0.0, total_steps=4, warmup_ratio=0.0, grad_clip=0.5
    )
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    before = trainer.backward((param * 100).sum())
    assert before == pytest.approx(200.0)
    assert float(param.grad.norm()) == pytest.approx(0.5)
    trainer.step()
    assert torch.allclose(param.detach(), torch.full((4,), 1 - 0.1 * 0.25))
    with pytest.raises(ConfigurationError, match="adamw"):
        Trainer([param], optimizer="adam", lr=0.1, weight_decay=0.0, total_steps=4, warmup_ratio=0.0, grad_clip=None)


@pytest.mark.parametrize("method", ["prompt", "lora"])
def test_gumbel_mode_sends_the_final_loss_to_the_upstream_stage(method: str, tiny: str, tiny_lora: str) -> None:
    examples, traces, _ = _traces(demo_sensitive_answer, n=1)
    chain = training_pairs(
        CapitalOfCity(), traces, examples, SmallLMAdapter(), stages=["locate", "capital"], threshold=0.5
    ).chains[0]
    base = load_torch_model(tiny if method == "prompt" else tiny_lora)
    make: Any = (lambda: SoftPromptState.initial(base, 4)) if method == "prompt" else (lambda: LoraState(base, r=2))
    upstream, downstream = make(), make()
    passes: list[tuple[int, int]] = []
    for relaxed in (False, True):
        for p in [*upstream.parameters(), *downstream.parameters()]:
            p.grad = None
        torch.manual_seed(0)
        chain_loss(base, upstream, downstream, chain, lambda a, b: passes.append((a, b)), relaxed=relaxed).backward()
        up = sum(float(p.grad.abs().sum()) for p in upstream.parameters() if p.grad is not None)
        down = sum(float(p.grad.abs().sum()) for p in downstream.parameters() if p.grad is not None)
        assert down > 0
        assert (up > 0) is relaxed, f"relaxed={relaxed}: upstream gradient {up}"
    n_inserted = len(base.encode(chain.inserted, special=False))
    assert len(passes) == 1 + (n_inserted + 1)  # stage-wise: one pass; relaxed: one per generated token + one


# ---- the strategy -------------------------------------------------------------------------------------


def test_a_run_trains_per_epoch_records_curves_and_returns_torch_stages(tiny: str) -> None:
    optimizer = _optimizer(tiny, stages=["capital"])
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    result = optimizer.result
    assert result is not None
    assert [(h["phase"], h["round"]) for h in result.history] == [("baseline", None), ("train", 1), ("train", 2)]
    note = result.notes["softprompt"]
    assert note["trained"] == ["capital"]
    assert note["schedule"] == optimizer.schedule.to_dict()
    assert note["schedule"]["epochs"] == 2
    losses = [h["objectives"]["train_loss"] for h in result.history[1:]]
    assert losses == [e["mean_loss"] for e in note["epochs"]]
    assert all(loss > 0 for loss in losses)
    assert [h["objectives"]["lr"] for h in result.history[1:]] == [e["lr"] for e in note["epochs"]]
    assert result.best["trial"] == 1  # the first epoch beat the scripted baseline; the second only tied
    stages = dict(program.named_predictors())
    assert stages["locate"].lm is None
    assert isinstance(stages["capital"].lm, TorchLM)
    # the returned stage holds the best epoch's parameters, not the last ones
    learned = stages["capital"].lm.torch_engine.state
    assert isinstance(learned, SoftPromptState)
    assert learned.n_virtual_tokens == 8
    best = optimizer.best_parameters
    assert best is not None
    assert torch.equal(learned.tensor.detach(), best["capital"]["soft_prompt"])

    # budget: bootstrap, baseline and per-epoch validation calls (2 stages each) plus every training pass
    boot, val = 4, 2
    passes = sum(e["forward_passes"] for e in note["epochs"])
    assert passes == 2 * math.ceil(boot / 2)  # two epochs of two batches of the capital stage
    assert result.usage["lm_calls"] == 2 * boot + 2 * val * (1 + len(note["epochs"])) + passes
    assert result.usage["wall_s"] > 0


def test_the_same_seed_gives_the_same_run(tiny: str) -> None:
    runs = []
    for _ in range(2):
        optimizer = _optimizer(tiny, stages=["capital"], schedule={"epochs": 1})
        optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
        assert optimizer.result is not None
        runs.append(
            [
                (h["score"], h["objectives"]["train_loss"] if h["phase"] == "train" else None)
                for h in optimizer.result.history
            ]
        )
    assert runs[0] == runs[1]


def test_early_stopping_stops_and_keeps_the_original_when_no_epoch_helps(tiny: str) -> None:
    optimizer = _optimizer(tiny, _never, stages=["capital"], schedule={"epochs": 6, "patience": 1})
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    result = optimizer.result
    assert result is not None
    assert result.status == "early_stopped"
    assert [h["phase"] for h in result.history] == ["baseline", "train", "train"]
    assert result.notes["stopping"]["checks"][-1] == {"epoch": 2, "score": 0.0, "improved": False, "epochs_without": 1}
    # the stopping settings are the schedule's, recorded under the names they always had
    assert result.notes["stopping"]["settings"] == {
        "epochs": 6,
        "patience": 1,
        "min_delta": 0.0,
        "lr": 0.05,
        "warmup_ratio": 0.1,
        "batch_size": 2,
    }
    assert all(p.lm is None for _, p in program.named_predictors())
    assert "as it was" in result.notes["softprompt"]["returned"]


def test_without_a_learning_rate_training_uses_the_methods_default(tiny: str) -> None:
    plan = {"epochs": 1, "lr": None, "warmup_ratio": 0.0}
    optimizer = _optimizer(tiny, stages=["capital"], schedule=plan)
    assert optimizer.schedule == TrainingSchedule(epochs=1, batch_size=2, lr=DEFAULT_LR["prompt"], warmup_ratio=0.0)
    assert _optimizer(tiny, method="lora", schedule=plan).schedule.lr == DEFAULT_LR["lora"]
    optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    result = optimizer.result
    assert result is not None
    # no warmup: the first epoch runs at the peak rate, the resolved default
    assert result.history[1]["objectives"]["lr"] == pytest.approx(DEFAULT_LR["prompt"])
    assert result.notes["softprompt"]["epochs"][0]["lr"] == pytest.approx(DEFAULT_LR["prompt"])
    assert result.notes["stopping"]["settings"]["lr"] == DEFAULT_LR["prompt"]


def test_the_schedule_is_a_training_schedule_or_a_mapping_of_its_fields(tiny: str) -> None:
    given = TrainingSchedule(epochs=4, lr=0.01, grad_clip=None)
    assert _optimizer(tiny, schedule=None).schedule.epochs == 2  # the helper's mapping
    assert SoftPrompt(capital_metric, budget=10, schedule=given).schedule == given
    assert SoftPrompt(capital_metric, budget=10).schedule == TrainingSchedule(lr=DEFAULT_LR["prompt"])
    with pytest.raises(ConfigurationError, match="unknown training schedule setting"):
        _optimizer(tiny, schedule={"epoch": 3})
    with pytest.raises(ConfigurationError, match="`schedule` must be a TrainingSchedule"):
        SoftPrompt(capital_metric, budget=10, schedule=[("epochs", 3)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="epochs"):
        SoftPrompt(capital_metric, budget=10, epochs=3)  # the flat settings are gone


def test_a_finished_run_is_not_resumed(tiny: str, tmp_path: Path) -> None:
    _optimizer(tiny, stages=["capital"], schedule={"epochs": 1}, run_dir=tmp_path).compile(
        CapitalOfCity(), trainset=city_examples()
    )
    with pytest.raises(ConfigurationError, match="cannot be resumed"):
        _optimizer(tiny, stages=["capital"], schedule={"epochs": 1}, run_dir=tmp_path).compile(
            CapitalOfCity(), trainset=city_examples()
        )


def test_the_budget_stops_training_and_the_run_stays_within_it(tiny: str) -> None:
    # bootstrap 8 + baseline 4 + epoch 1 (2 passes + 4 validation calls) = 18; epoch 2 runs out
    optimizer = _optimizer(tiny, stages=["capital"], budget=19, schedule={"epochs": 5, "patience": None})
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    result = optimizer.result
    assert result is not None
    assert result.status == "budget_exhausted"
    assert result.usage["lm_calls"] <= 19
    assert [h["phase"] for h in result.history] == ["baseline", "train"]
    assert isinstance(dict(program.named_predictors())["capital"].lm, TorchLM)


def test_end_to_end_mode_trains_through_the_chain(tiny: str) -> None:
    optimizer = _optimizer(tiny, end_to_end=True, schedule={"epochs": 1})
    optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    result = optimizer.result
    assert result is not None
    note = result.notes["softprompt"]
    assert note["chains"] == {"locate->capital": 4}
    epoch = note["epochs"][0]
    assert set(epoch["train_loss"]) == {"locate", "capital", "locate->capital"}
    assert epoch["steps"] == 2 + 2 + 4  # two batches per stage and one step per chain


def test_a_stage_without_targets_is_trained_through_its_chain_only_end_to_end(tiny: str) -> None:
    # no `country` label and no successful trace: `locate` has no target of its own
    examples = [dspy.Example(city=e.city, capital=e.capital).with_inputs("city") for e in city_examples()[:8]]
    trained = {}
    for end_to_end in (False, True):
        optimizer = _optimizer(tiny, end_to_end=end_to_end, schedule={"epochs": 1})
        program = optimizer.compile(CapitalOfCity(), trainset=examples)
        assert optimizer.result is not None
        note = optimizer.result.notes["softprompt"]
        trained[end_to_end] = note["trained"]
        lms = {name: p.lm for name, p in program.named_predictors()}
        if end_to_end:
            assert note["chain_only"] == ["locate"]
            assert set(note["epochs"][0]["train_loss"]) == {"capital", "locate->capital"}
            assert isinstance(lms["locate"], TorchLM)
        else:
            assert "chain_only" not in note
            assert lms["locate"] is None
    assert trained == {False: ["capital"], True: ["locate", "capital"]}


def test_relaxed_decoding_with_a_cache_matches_full_forward_passes(tiny: str) -> None:
    examples, traces, _ = _traces(demo_sensitive_answer, n=1)
    chain = training_pairs(
        CapitalOfCity(), traces, examples, SmallLMAdapter(), stages=["locate", "capital"], threshold=0.5
    ).chains[0]
    base = load_torch_model(tiny)
    upstream = SoftPromptState.initial(base, 4)
    with torch.no_grad():
        upstream.tensor.normal_(0, 1)
    samples: list[Any] = []
    real = torch.nn.functional.gumbel_softmax

    def recording(logits: Any, **kwargs: Any) -> Any:
        samples.append(logits.detach().clone())
        return real(logits, **kwargs)

    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "gumbel_softmax", recording)
        chain_loss(base, upstream, SoftPromptState.initial(base, 4), chain, lambda a, b: None, tau=0.5)
    # the reference: every step a full forward pass over the prompt and the samples so far
    torch.manual_seed(0)
    context = torch.cat([input_embeddings(base, upstream, base.encode(chain.upstream_prompt, special=True))])
    generated: list[Any] = []
    for cached in samples:
        logits = base.forward(torch.cat([context, *generated])[None], keep=1)[0, -1]
        assert torch.allclose(logits, cached, atol=1e-4)
        generated.append(base.mix(real(logits, tau=0.5, hard=True))[None])
    assert len(samples) == len(base.encode(chain.inserted, special=False))


def test_lora_method_returns_adapted_stages(tiny_lora: str) -> None:
    optimizer = _optimizer(tiny_lora, stages=["capital"], method="lora", schedule={"epochs": 1, "lr": 1e-2})
    program = optimizer.compile(CapitalOfCity(), trainset=city_examples()[:8])
    lm = dict(program.named_predictors())["capital"].lm
    assert isinstance(lm, TorchLM)
    assert isinstance(lm.torch_engine.state, LoraState)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"method": "prefix"}, "'prompt' or 'lora'"),
        ({"schedule": {"optimizer": "adam"}}, "'adamw' or 'sgd'"),
        ({"schedule": {"epochs": 0}}, "`epochs` must be an int >= 1"),
        ({"schedule": {"warmup_ratio": 1.0}}, "warmup_ratio"),
        ({"stages": "capital"}, "non-empty list"),
        ({"targets": "gold"}, "`targets` must be one of"),
    ],
)
def test_bad_settings_are_refused(settings: dict[str, Any], message: str, tiny: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        _optimizer(tiny, **settings)


def test_unknown_stages_and_other_adapters_are_refused(tiny: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown stage"):
        _optimizer(tiny, stages=["nope"]).compile(CapitalOfCity(), trainset=city_examples())
    with pytest.raises(ConfigurationError, match="SmallLMAdapter"):
        _optimizer(tiny, adapter=dspy.ChatAdapter()).compile(CapitalOfCity(), trainset=city_examples())


def test_training_strategies_are_registered_apart_from_the_search_strategies() -> None:
    from stageopt.cli._main import TRAINING_STRATEGY_NAMES
    from stageopt.strategies import STRATEGIES, TRAINING_STRATEGIES, get_strategy

    assert sorted(TRAINING_STRATEGY_NAMES) == sorted(TRAINING_STRATEGIES)
    assert get_strategy("softprompt") is SoftPrompt
    assert "softprompt" not in STRATEGIES  # the discrete-search contract does not apply


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_optimize_softprompt_saves_and_eval_loads_the_learned_stage(
    tiny_lora: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from stageopt.cli import _commands
    from stageopt.cli._main import main
    from tests.tasks.test_hotpotqa import ROW, _script, _write

    def unsure(prompt: str) -> str:  # the scripted LM is right except at the answer stage
        return " I am not sure" if prompt.rstrip().endswith("Answer:") else _script(prompt)

    monkeypatch.setattr(_commands, "resolve_lm", lambda spec, **kwargs: _lm(unsure, max_tokens=4))
    data = _write(tmp_path / "data", [{**ROW, "id": f"x{i}"} for i in range(4)], "train")
    _write(data, [{**ROW, "id": "d0"}], "dev")
    out = tmp_path / "run"
    argv = ["optimize", "--data-dir", str(data), "--budget-calls", "400", "--out", str(out), "--val-size", "1"]
    options = [
        'stages=["answer"]',
        "method=lora",
        "schedule.epochs=3",
        "schedule.lr=0.05",
        "schedule.batch_size=1",
        "schedule.warmup_ratio=0",
        f"model={tiny_lora}",
    ]
    argv += ["--bootstrap-size", "2", "--strategy", "softprompt", *[x for o in options for x in ("--option", o)]]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["strategy"] == "softprompt"
    assert result["usage"]["lm_calls"] <= 400
    assert result["history"][0]["score"] == 0.0
    trained = [h for h in result["history"] if h["phase"] == "train"]
    assert trained
    assert all("train_loss" in h["objectives"] for h in trained)
    assert result["best"]["score"] > 0.0, "the answer stage never learned to say 'Paris'"
    assert result["best"]["trial"] in {h["trial"] for h in trained}
    saved = json.loads((out / "program.json").read_text())
    assert saved["@torch"]["stages"]["answer"]["method"] == "lora"
    assert (out / "softprompt.safetensors").is_file()
    capsys.readouterr()
    report = tmp_path / "eval.json"
    evaluated = ["eval", "--data-dir", str(data), "--split", "dev", "--n", "1", "--program", str(out / "program.json")]
    assert main([*evaluated, "--json", str(report)]) == 0
    scored = json.loads(report.read_text())
    # the loaded adapter answers as the best epoch did on the same example; the scripted LM alone scores 0
    assert scored["score"] == pytest.approx(result["best"]["score"])
    assert scored["examples"][0]["calls"][-1]["model"] == f"torch/{Path(tiny_lora).name}"
