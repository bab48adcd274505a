"""PBT warm-started from an earlier run, on the real embedded model: HotpotQA, tiny budgets.

A joint run writes a run directory; a PBT run with another seed (other candidate pools) then
warm-starts from it. Checks the real path end to end: the source's best configurations are read
from its optuna.db, re-expressed by content in the new pools, scored first, put in PBT's first
population, and everything stays within the budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from stageopt.lm import LocalLM, SmallLMAdapter
from stageopt.proposers import LMInstructionProposer
from stageopt.strategies import JointBayesian, PopulationBasedTraining, SearchSpace
from stageopt.strategies._warmstart import WARM_PHASE
from stageopt.tasks import get_task

pytestmark = pytest.mark.integration

SOURCE_BUDGET = 26
BUDGET = 40


def _content(run_dir: Path, study_name: str, params: dict[str, dict[str, int]]) -> dict[str, tuple[str, int]]:
    """Each stage's instruction text and number of demos of a configuration of a stored run."""
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{(run_dir / 'optuna.db').resolve()}")
    space = SearchSpace.from_dict(study.user_attrs["space"])
    return {
        stage: (space.stages[stage].instructions[c["instruction"]], len(space.stages[stage].demo_sets[c["demos"]]))
        for stage, c in params.items()
    }


def test_pbt_warm_started_from_a_joint_run_on_hotpotqa(gemma: LocalLM, tmp_path: Path) -> None:
    task = get_task("hotpotqa")
    trainset = task.load("train", n=8)
    common: dict[str, Any] = {
        "lm": gemma,
        "adapter": SmallLMAdapter(),
        "stage_metrics": task.stage_metrics(),
        "bootstrap_size": 1,
        "val_size": 2,
        "confirm_size": 0,
        # one proposed instruction per stage: proposals are the slowest calls on 2 cores
        "instruction_proposer": LMInstructionProposer(num_candidates=1, max_attempts=1),
    }
    source_dir = tmp_path / "source"
    source = JointBayesian(task.metric, budget=SOURCE_BUDGET, n_trials=2, seed=0, run_dir=source_dir, **common)
    source.compile(task.program(), trainset=trainset)
    assert source.result is not None
    assert source.result.usage["lm_calls"] <= SOURCE_BUDGET
    (source_dir / "result.json").write_text(json.dumps(source.result.to_dict()))
    assert len(source.result.history) >= 2, (
        f"the source scored nothing besides the baseline: {source.result.stop_reason}"
    )

    target_dir = tmp_path / "target"
    pbt = PopulationBasedTraining(
        task.metric,
        budget=BUDGET,
        population_size=2,
        fidelities=(0.5, 1.0),
        seed=1,
        run_dir=target_dir,
        warm_start=str(source_dir),
        **common,
    )
    program = pbt.compile(task.program(), trainset=trainset)
    result = pbt.result
    assert result is not None
    assert result.usage["lm_calls"] <= BUDGET

    notes = result.notes["warm_start"]
    assert notes["stages"] == {"query1": "matched", "query2": "matched", "answer": "matched"}
    warm = [h for h in result.history if h["phase"] == WARM_PHASE]
    phases = [h["phase"] for h in result.history]
    assert phases[: 1 + len(warm)] == ["baseline", *[WARM_PHASE] * len(warm)]
    assert warm, f"no warm trial was scored: {result.stop_reason}"
    # The warm trials are the source's configurations by content (the pools' indices differ).
    by_trial = {h["trial"]: h["params"] for h in source.result.history}
    for trial, planned in zip(warm, notes["configs"], strict=False):
        source_params = by_trial[planned["source_trial"]]
        assert _content(target_dir, "pbt", trial["params"]) == _content(source_dir, "joint", source_params)
    study = optuna.load_study(study_name="pbt", storage=f"sqlite:///{(target_dir / 'optuna.db').resolve()}")
    round0 = study.user_attrs.get("pbt.round.0")
    if round0 is not None:  # the budget reached the search: the warm configurations are in its population
        members = [m["params"] for m in round0["members"]]
        assert members[1 : 1 + len(warm)] == [h["params"] for h in warm][: len(members) - 1]
    assert result.best["score"] >= max(h["score"] for h in warm)
    assert [n for n, _ in program.named_predictors()] == ["query1", "query2", "answer"]
