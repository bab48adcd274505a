"""Warm start: seed a new run with the best configurations of an earlier run or Optuna study.

A configuration of a run is a set of indices into *that run's* candidate pools, so it cannot be
reused as it stands. A warm start therefore reads the earlier run's top configurations as
content (each stage's instruction text, demo set and setting values), matches the new program's
stages to the earlier ones by name and signature (input and output field names; DSPy's
``reasoning`` output is ignored), and re-expresses each configuration in the new run's pools:
an instruction or demo set the new pool lacks is added to it as a candidate. A stage that the
earlier run did not have, or whose signature changed, keeps its original setting and is
reported in the result's ``notes["warm_start"]["stages"]``.

The pools grow before the baseline trial (:func:`plan_warm_start`), so every trial of the study
sees the same Optuna distributions. The re-expressed configurations are scored right after the
baseline (:func:`run_warm_start`), as the run's first trials (phase ``warm_start``), each told to
Optuna with its parameters (an enqueued trial), so every strategy starts from them: the best one
is the incumbent (coordinate descent freezes the other stages at it; the returned program is the
best full-validation trial, warm ones included), samplers learn from them (joint, random,
hierarchical, multifidelity, grid, pareto), and population strategies put them in their first
population (evolutionary, pbt; see :func:`warm_configs`). Independent (stage-wise) search still
optimizes each stage against the original program. The plan is stored in the study (user
attribute ``warm_start``) before any of them is scored, so a resumed run scores only those
without a score and never reads the source or enqueues them again.

Every run records its stages' signatures in the study (user attribute ``stage_signatures``), so
that a later run can be warm-started from it with signature matching.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import optuna

from stageopt._errors import ConfigurationError
from stageopt.distributed._storage import resolve_storage_url
from stageopt.strategies._space import (
    REASONING,
    STRUCTURE,
    Config,
    SearchSpace,
    config_from_params,
    config_key,
    param_name,
)
from stageopt.strategies._state import RunState

logger = logging.getLogger(__name__)

#: Phase of the trials that score the warm-start configurations.
WARM_PHASE = "warm_start"

#: Study user attribute holding the warm-start plan (the re-expressed configurations and the report).
PLAN_ATTR = "warm_start"

#: Study user attribute holding each stage's signature ``{"inputs": [...], "outputs": [...]}``.
SIGNATURES_ATTR = "stage_signatures"

#: Separates a source from a study name in a warm-start spec (``runs/x::joint``).
STUDY_SEPARATOR = "::"

Signature = dict[str, list[str]]


@dataclass(frozen=True)
class WarmStart:
    """Where a warm start comes from and how many configurations it takes.

    Attributes:
        source: A run directory (its ``optuna.db``; without one, its ``program.json``), an
            ``optuna.db`` file, or an Optuna storage URL (``sqlite:///runs/x/optuna.db``,
            ``postgresql://...``).
        study_name: The study in the source's storage (default: the only one, else the run's
            strategy name from ``result.json``).
        top_k: Best configurations taken (full-validation trials, best score first).
    """

    source: str
    study_name: str | None = None
    top_k: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigurationError(f"warm start `source` must be a run directory or storage URL, got {self.source!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigurationError(f"warm start `top_k` must be an int >= 1, got top_k={self.top_k!r}")
        if self.study_name is not None and not self.study_name:
            raise ConfigurationError("warm start `study_name` must be a non-empty string or None")

    @classmethod
    def parse(cls, spec: str | Path, *, top_k: int = 3) -> WarmStart:
        """A warm start from ``RUN_DIR_OR_STORAGE_URL[::STUDY]`` (the CLI's ``--warm-start``)."""
        text = str(spec).strip()
        source, sep, study = text.rpartition(STUDY_SEPARATOR)
        if not sep:
            source, study = text, ""
        return cls(source, study or None, top_k)

    def check(self) -> None:
        """Refuse a local source that does not exist (a storage URL is checked when read)."""
        if "://" in self.source:
            return
        path = Path(self.source)
        if not path.exists():
            raise ConfigurationError(
                f"warm start source {self.source!r} does not exist: give a run directory, an optuna.db "
                "file or a storage URL (e.g. sqlite:///runs/x/optuna.db::joint)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {"source": self.source, "study_name": self.study_name, "top_k": self.top_k}


def resolve_warm_start(value: WarmStart | str | Path | None) -> WarmStart | None:
    """The optimizer's ``warm_start=`` setting as a checked :class:`WarmStart` (None: no warm start)."""
    if value is None:
        return None
    if isinstance(value, str | Path):
        value = WarmStart.parse(value)
    if not isinstance(value, WarmStart):
        raise TypeError(f"`warm_start` must be a WarmStart, a run directory or a storage URL, got {value!r}")
    value.check()
    return value


@dataclass(frozen=True)
class PortableConfig:
    """An earlier run's configuration by content, independent of its candidate pools.

    Attributes:
        stages: Per stage: ``instruction`` (text), ``demos`` (list of dicts), ``settings``
            (enabled setting knobs by value).
        trial: Its trial number in the source study (None: read from a ``program.json``).
        score: Its validation score in the source run (None: unknown).
    """

    stages: dict[str, dict[str, Any]]
    trial: int | None = None
    score: float | None = None


@dataclass(frozen=True)
class WarmSource:
    """What a warm start read: its best configurations and the source stages' signatures.

    Attributes:
        label: Where it came from (path or URL, and the study).
        configs: The top configurations, best first.
        signatures: Each source stage's signature; a stage absent here has an unknown one.
    """

    label: str
    configs: list[PortableConfig]
    signatures: dict[str, Signature] = field(default_factory=dict)


def stage_signatures(program: dspy.Module) -> dict[str, Signature]:
    """Input and output field names of each stage (without DSPy's ``reasoning`` output)."""
    return {
        name: {
            "inputs": list(predictor.signature.input_fields),
            "outputs": [f for f in predictor.signature.output_fields if f != REASONING],
        }
        for name, predictor in program.named_predictors()
    }


# ---- reading a source ------------------------------------------------------------------------


def read_source(warm: WarmStart) -> WarmSource:
    """The ``top_k`` best full-validation configurations of the source, as content.

    Raises:
        ConfigurationError: when the source is missing, holds several studies and none was
            named, or is not a stageopt run.
    """
    warm.check()
    preferred: str | None = None
    run_dir: Path | None = None
    if "://" in warm.source:
        storage = resolve_storage_url(warm.source)  # postgresql:// with the installed driver
    else:
        path = Path(warm.source)
        if path.is_dir():
            run_dir = path
            preferred = _strategy_of(path)
            if not (path / "optuna.db").is_file():
                if (path / "program.json").is_file():
                    return _read_program_json(path, preferred)
                raise ConfigurationError(
                    f"warm start: {path} holds neither optuna.db nor program.json; give the run's "
                    "storage URL and study (e.g. postgresql://...::joint)"
                )
            path = path / "optuna.db"
        storage = f"sqlite:///{path.resolve()}"
    study = _load_study(storage, warm.study_name, preferred, label=warm.source)
    space_data = study.user_attrs.get("space")
    if space_data is None:
        raise ConfigurationError(
            f"warm start: study {study.study_name!r} in {warm.source} holds no stageopt search space "
            "(user attribute 'space'); give a run written by stageopt"
        )
    space = SearchSpace.from_dict(space_data)
    configs = [
        PortableConfig(_content(space, params), trial, score) for trial, score, params in _top_trials(study, warm.top_k)
    ]
    signatures = dict(study.user_attrs.get(SIGNATURES_ATTR) or {})
    if not signatures and run_dir is not None and (run_dir / "program.json").is_file():
        signatures = _program_json_signatures(json.loads((run_dir / "program.json").read_text()))
    return WarmSource(f"{warm.source} (study {study.study_name!r})", configs, signatures)


def _strategy_of(run_dir: Path) -> str | None:
    result = run_dir / "result.json"
    if not result.is_file():
        return None
    try:
        strategy = json.loads(result.read_text()).get("strategy")
    except (json.JSONDecodeError, AttributeError):
        return None
    return strategy if isinstance(strategy, str) else None


def _load_study(storage: str, name: str | None, preferred: str | None, *, label: str) -> optuna.Study:
    try:
        names = optuna.get_all_study_names(storage)
    except Exception as exc:
        raise ConfigurationError(f"warm start: cannot read the Optuna storage {label!r}: {exc}") from exc
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif preferred in names:
            name = preferred
        else:
            raise ConfigurationError(
                f"warm start: {label!r} holds studies {names}; name one as SOURCE::STUDY (e.g. {label}::{names[0]})"
                if names
                else f"warm start: {label!r} holds no Optuna study"
            )
    elif name not in names:
        raise ConfigurationError(f"warm start: no study {name!r} in {label!r}; its studies are {names}")
    return optuna.load_study(study_name=name, storage=storage)


def _top_trials(study: optuna.Study, top_k: int) -> list[tuple[int, float, Config]]:
    """The best distinct configurations scored on the source's whole validation set (that met its limits)."""
    records = [
        t.user_attrs
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "phase" in t.user_attrs and "params" in t.user_attrs and t.user_attrs.get("variant") is None
    ]
    if not records:
        return []
    full = max(int(r["fidelity"]) for r in records)
    kept = (r for r in records if int(r["fidelity"]) == full and r.get("feasible", True))
    ranked = sorted(kept, key=lambda r: (-r["score"], r["trial"]))
    out: list[tuple[int, float, Config]] = []
    seen: set[str] = set()
    for record in ranked:
        key = config_key(record["params"])
        if key not in seen:
            seen.add(key)
            out.append((int(record["trial"]), float(record["score"]), record["params"]))
        if len(out) == top_k:
            break
    return out


def _content(space: SearchSpace, config: Config) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if space.structure is not None:
        out[STRUCTURE] = space.structure.values(config.get(STRUCTURE, {}))
    for stage, choice in config.items():
        if stage not in space.stages:
            continue
        c = space.stages[stage]
        out[stage] = {
            "instruction": c.instructions[choice["instruction"]],
            "demos": [dict(d) for d in c.demo_sets[choice["demos"]]],
            "settings": {knob: c.value(knob, choice.get(knob, 0)) for knob in c.settings},
        }
    return out


def _read_program_json(run_dir: Path, strategy: str | None) -> WarmSource:
    """The run's returned program as one configuration (a run directory without ``optuna.db``)."""
    state = json.loads((run_dir / "program.json").read_text())
    stages = {
        name: {"instruction": s["signature"]["instructions"], "demos": [dict(d) for d in s.get("demos", [])]}
        for name, s in state.items()
        if isinstance(s, dict) and "signature" in s
    }
    score = None
    result = run_dir / "result.json"
    if result.is_file():
        score = json.loads(result.read_text()).get("best", {}).get("score")
    label = f"{run_dir} (program.json{f' of {strategy}' if strategy else ''})"
    return WarmSource(label, [PortableConfig(stages, None, score)], _program_json_signatures(state))


def _program_json_signatures(state: Mapping[str, Any]) -> dict[str, Signature]:
    """Field names of each stage of a saved program, when every field has DSPy's default description.

    A saved program does not say which fields are inputs, so all names go to ``inputs`` and
    ``outputs`` is ``["?"]``; :func:`_same_signature` compares such a signature by its names only.
    """
    out: dict[str, Signature] = {}
    for name, stage in state.items():
        if not isinstance(stage, dict) or "signature" not in stage:
            continue
        names = []
        for f in stage["signature"].get("fields", []):
            desc = str(f.get("description", ""))
            if not (desc.startswith("${") and desc.endswith("}")):
                break
            names.append(desc[2:-1])
        else:
            out[name] = {"inputs": [n for n in names if n != REASONING], "outputs": ["?"]}
    return out


# ---- re-expressing in the new run's pools ------------------------------------------------------


def _same_signature(old: Signature, new: Signature) -> bool:
    if old.get("outputs") == ["?"]:  # from a program.json: field names only, order kept
        return old["inputs"] == [*new["inputs"], *new["outputs"]] or sorted(old["inputs"]) == sorted(
            [*new["inputs"], *new["outputs"]]
        )
    return old == new


def _describe(signature: Signature) -> str:
    if signature.get("outputs") == ["?"]:
        return ", ".join(signature["inputs"])
    return f"{', '.join(signature['inputs'])} -> {', '.join(signature['outputs'])}"


def match_stages(source: WarmSource, signatures: Mapping[str, Signature]) -> tuple[list[str], dict[str, str]]:
    """The new run's stages that take the source's choices, and a note for every stage."""
    present = {stage for config in source.configs for stage in config.stages if stage != STRUCTURE}
    matched: list[str] = []
    notes: dict[str, str] = {}
    for stage, signature in signatures.items():
        if stage not in present:
            notes[stage] = "not in the source run: keeps its original setting"
        elif stage not in source.signatures:
            matched.append(stage)
            notes[stage] = "matched by name (the source's signature is unknown)"
        elif _same_signature(source.signatures[stage], signature):
            matched.append(stage)
            notes[stage] = "matched"
        else:
            notes[stage] = (
                f"signature changed ({_describe(source.signatures[stage])} before, {_describe(signature)} now): "
                "keeps its original setting"
            )
    return matched, notes


def reexpress(
    source: WarmSource, space: SearchSpace, signatures: Mapping[str, Signature]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The source's configurations as configurations of ``space``, growing its pools where needed.

    Returns the configurations (``{"params", "source_trial", "source_score"}``, best first,
    without repeats and without the original program) and the report: each stage's match, the
    candidates added to each pool, setting values the new run cannot express.
    """
    matched, notes = match_stages(source, signatures)
    sizes = {s: (len(c.instructions), len(c.demo_sets)) for s, c in space.stages.items()}
    dropped: list[str] = []
    configs: list[dict[str, Any]] = []
    seen = {config_key(space.default_config())}
    for portable in source.configs:
        config = space.default_config()
        for stage in matched:
            content = portable.stages.get(stage)
            if content is None:
                continue
            config[stage].update(_stage_choice(space, stage, content, dropped))
        if space.structure is not None:
            values = portable.stages.get(STRUCTURE, {})
            config[STRUCTURE] = {
                knob: choices.index(values[knob]) if values.get(knob) in choices else 0
                for knob, choices in space.structure.choices.items()
            }
            config = space.normalize(config)
        key = config_key(config)
        if key in seen:
            continue
        seen.add(key)
        configs.append({"params": config, "source_trial": portable.trial, "source_score": portable.score})
    added = {
        s: {"instructions": len(c.instructions) - sizes[s][0], "demo_sets": len(c.demo_sets) - sizes[s][1]}
        for s, c in space.stages.items()
        if (len(c.instructions), len(c.demo_sets)) != sizes[s]
    }
    report = {"stages": notes, "added": added, "settings_not_available": sorted(set(dropped))}
    return configs, report


def _stage_choice(space: SearchSpace, stage: str, content: Mapping[str, Any], dropped: list[str]) -> dict[str, int]:
    choice: dict[str, int] = {}
    text = str(content.get("instruction") or "")
    if text.strip():
        choice["instruction"] = space.add_instruction(stage, text)
    choice["demos"] = _demo_index(space, stage, list(content.get("demos") or []))
    candidates = space.stages[stage]
    for knob, value in dict(content.get("settings") or {}).items():
        if knob in candidates.settings and value in candidates.settings[knob]:
            choice[knob] = candidates.settings[knob].index(value)
        elif knob in candidates.settings or value is not None:
            dropped.append(f"{stage}.{knob}={value!r}")
    return choice


def _demo_index(space: SearchSpace, stage: str, demos: list[dict[str, Any]]) -> int:
    """Index of ``demos`` in the stage's demo pool (added at the end when absent)."""
    pool = space.stages[stage].demo_sets
    wanted = _demos_key(demos)
    for index, existing in enumerate(pool):
        if _demos_key(existing) == wanted:
            return index
    pool.append([dict(d) for d in demos])
    return len(pool) - 1


def _demos_key(demos: list[dict[str, Any]]) -> str:
    return json.dumps(demos, sort_keys=True, default=str)


# ---- the hook every run calls ------------------------------------------------------------------


def plan_warm_start(state: RunState, warm: WarmStart | None) -> None:
    """Read the source and grow the pools once per study; called before the baseline trial.

    Records the program's stage signatures in the study first (for later warm starts). A plan
    stored by an earlier run of the study is kept as it is (the source is not read again).
    With ``warm`` None, nothing else happens; a study that already holds trials but no plan
    (a run resumed with ``warm_start`` newly set) is not warm-started, since its pools can no
    longer grow.

    Raises:
        ConfigurationError: when the source cannot be read (see :func:`read_source`).
    """
    study = state.study
    if SIGNATURES_ATTR not in study.user_attrs:
        study.set_user_attr(SIGNATURES_ATTR, stage_signatures(state.program))
    plan = study.user_attrs.get(PLAN_ATTR)
    if plan is None and warm is not None:
        if study.get_trials(deepcopy=False):
            logger.warning("warm start ignored: the study already holds trials (a resumed run started without it)")
            return
        plan = _make_plan(state, warm)
    if plan is not None:
        state.notes["warm_start"] = plan


def run_warm_start(state: RunState) -> None:
    """Score the planned warm-start configurations that have no score yet; called after the baseline.

    Each is told to Optuna with its parameters (an enqueued trial). Raises
    :class:`~stageopt.strategies.StopSearch` when the budget runs out.
    """
    study = state.study
    plan = study.user_attrs.get(PLAN_ATTR)
    if plan is None:
        return
    distributions = state.space.all_distributions()
    base = state.space.default_config()
    for item in plan["configs"]:
        config = item["params"]
        if state.recorded(config):
            continue
        params = {param_name(s, k): i for s, choice in config.items() for k, i in choice.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if not any(t.system_attrs.get("fixed_params") == params for t in waiting):
                study.enqueue_trial(params)
            trial = study.ask(distributions)
        state.run_trial(config_from_params(trial.params, base), phase=WARM_PHASE, trial=trial)


def _make_plan(state: RunState, warm: WarmStart) -> dict[str, Any]:
    source = read_source(warm)
    configs, report = reexpress(source, state.space, stage_signatures(state.program))
    for stage, note in report["stages"].items():
        if note != "matched":
            logger.warning("warm start: stage %r %s", stage, note)
    if not configs:
        logger.warning("warm start from %s brings no configuration besides the original program", source.label)
    plan = {"source": source.label, **warm.to_dict(), "configs": configs, **report}
    # The grown pools first: a resumed run rebuilds the space from the study.
    state.study.set_user_attr("space", state.space.to_dict())
    state.study.set_user_attr(PLAN_ATTR, plan)
    logger.info("warm start: %d configurations from %s", len(configs), source.label)
    return plan


def warm_configs(state: RunState) -> list[Config]:
    """The warm-start configurations of this run, best source first (for initial populations)."""
    plan = state.study.user_attrs.get(PLAN_ATTR) or {}
    return [{s: dict(c) for s, c in item["params"].items()} for item in plan.get("configs", [])]
