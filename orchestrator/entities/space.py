"""Search-space files: YAML -> validated :class:`SpaceSpec` (its Optuna distributions are
:func:`orchestrator.stores.study.optuna_distributions`).

A space file has three sections::

    base:   a job config (trainer/config.py): what every trial starts from
    search: metric, mode, num_samples, sampler, pruner, resources per trial, time budget
    space:  dotted job-config key -> {type: float|int|categorical, low, high, log, step, choices,
                                      when}

`when: {loss.kind: mate}` (or a list of values, `{loss.kind: [mate, byot]}`) makes a
parameter conditional, as Optuna's define-by-run spaces allow: a trial samples it only
where every condition holds, and otherwise keeps the base config's value.

Everything is checked here, before any cluster starts: every bound and every choice must be
a valid value for its key, every condition must name a searched categorical key and values
it can take, and the metric must be one that every trial reports. Problems raise
:class:`ConfigError` with one line naming the file and the dotted key.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trainer.config import ConfigError, JobConfig, apply_overrides, read_yaml
from trainer.metrics import TRAIN_LOSS, epoch_metric_names

__all__ = [
    "ParamSpec",
    "PrunerSettings",
    "ResourceSettings",
    "SamplerSettings",
    "SearchSettings",
    "SpaceSpec",
    "decode_params",
    "encode_choice",
    "is_space_file",
    "load_space",
    "parse_space",
    "pruner_note",
    "sweep_params",
]

_SECTIONS = ("base", "search", "space")
_RULE = "space_rule"  # pydantic error type of a broken cross-field rule, see _rule()


def _rule(field: str, value: Any, rule: str) -> PydanticCustomError:
    """A broken rule about `field` of the model being validated (pydantic only knows the model)."""
    return PydanticCustomError(_RULE, "{rule}", {"field": field, "value": value, "rule": rule})


def _number(value: Any) -> int | float:
    """A bound or step: ints stay ints (for int parameters), numeric strings become floats."""
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


# A plain validator keeps the error's key clean (a union would add `.int` to it).
_Number = Annotated[int | float, PlainValidator(_number)]


def _is_scalar(choice: Any) -> bool:
    return choice is None or isinstance(choice, bool | int | float | str)


def _accepted(value: Any) -> list[Any]:
    """The values a `when` condition accepts: a list of them, or one."""
    return value if isinstance(value, list) else [value]


def encode_choice(choice: Any) -> Any:
    """A categorical choice as Optuna stores it: scalars as they are, lists/dicts as JSON."""
    return choice if _is_scalar(choice) else json.dumps(choice, sort_keys=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Mode = Literal["max", "min"]
_MODES = ("max", "min")


def _metric_or_list(value: Any) -> str | list[str]:
    """`search.metric`: one name, or a list of names (a multi-objective search)."""
    if isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        return value
    raise ValueError("must be a metric name or a list of metric names")


def _mode_or_list(value: Any) -> str | list[str]:
    """`search.mode`: 'max' or 'min', or a list of them (one per metric)."""
    modes = value if isinstance(value, list) else [value]
    if not all(isinstance(m, str) and m in _MODES for m in modes):
        raise ValueError("input should be 'max' or 'min' (or a list of them, one per metric)")
    return value


class SamplerSettings(_Strict):
    # nsga2: Optuna's NSGAIISampler; grid: every combination of categorical choices once
    kind: Literal["tpe", "random", "nsga2", "grid"] = "tpe"
    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)  # random trials before TPE models the space
    multivariate: bool = True
    constant_liar: bool = True  # running trials count as bad, so parallel proposals spread


class PrunerSettings(_Strict):
    kind: Literal["asha", "hyperband", "none"] = "asha"
    min_resource: int = Field(1, ge=1)  # epochs before the first pruning decision
    reduction_factor: int = Field(3, ge=2)  # 1/reduction_factor of trials survive each rung
    max_epochs: int | None = Field(None, ge=1)  # epochs per trial; None: base.train.epochs


class ResourceSettings(_Strict):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, gpu: float) -> float:
        # Ray packs fractional trials onto one GPU; 0.3 would strand a tenth of every GPU.
        if 0 < gpu < 1 and abs(1 / gpu - round(1 / gpu)) > 0.05:
            raise ValueError("must divide 1 evenly (0.5, 0.25, 0.2, ...) so trials pack a GPU")
        if gpu > 1 and not float(gpu).is_integer():
            raise ValueError("must be a whole number of GPUs when above 1")
        return gpu


class SearchSettings(_Strict):
    # A list of metrics with a list of modes makes a multi-objective (Pareto) search.
    metric: Annotated[str | list[str], PlainValidator(_metric_or_list)] = "val/mean_exit_acc"
    mode: Annotated[Mode | list[Mode], PlainValidator(_mode_or_list)] = "max"
    num_samples: int = Field(16, ge=1)
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    pruner: PrunerSettings = Field(default_factory=PrunerSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings)  # per trial
    time_budget_s: float | None = Field(None, gt=0.0)  # wall clock for the whole sweep
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the resources allow

    @property
    def metrics(self) -> list[str]:
        """The objectives, primary (first) first."""
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        """One mode per objective."""
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def objectives_text(self) -> str:
        """``val/mean_exit_acc (max), val/anytime_gflops (min)`` for messages."""
        return ", ".join(f"{m} ({d})" for m, d in zip(self.metrics, self.modes, strict=True))


class ParamSpec(_Strict):
    """One searched key: a float or int range, or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: _Number | None = None
    high: _Number | None = None
    log: bool = False
    step: _Number | None = None
    # Scalars, or lists/dicts such as exit placements [2, 4, 6, 8] or a `loss.dtd` section.
    choices: list[Any] | None = None
    # Searched categorical key -> the value (or list of values) it must have for this
    # parameter to be sampled; None: always sampled.
    when: dict[str, Any] | None = None

    def applies(self, params: Mapping[str, Any]) -> bool:
        """Whether a trial with the (decoded) `params` sampled so far samples this one."""
        return all(params.get(key) in _accepted(value) for key, value in (self.when or {}).items())

    @model_validator(mode="after")
    def _check_rules(self) -> ParamSpec:
        if self.type == "categorical":
            self._check_categorical()
        else:
            self._check_range()
        return self

    def _check_categorical(self) -> None:
        for field in ("low", "high", "step"):
            if getattr(self, field) is not None:
                raise _rule(field, getattr(self, field), "categorical parameters take only choices")
        if self.log:
            raise _rule("log", self.log, "categorical parameters take only choices")
        if not self.choices:
            raise _rule("choices", self.choices, "must list at least one value")
        seen: list[Any] = []
        for choice in self.choices:
            # Compared as Optuna stores them: the string "[2, 4]" and the list [2, 4] collide.
            if encode_choice(choice) in seen:
                raise _rule("choices", self.choices, f"lists {choice!r} twice")
            seen.append(encode_choice(choice))

    def _check_range(self) -> None:
        if self.choices is not None:
            raise _rule("choices", self.choices, f"{self.type} parameters take low and high")
        for field in ("low", "high"):
            if getattr(self, field) is None:
                raise _rule(field, None, f"{self.type} parameters need low and high")
        if self.type == "int":
            for field in ("low", "high", "step"):
                value = getattr(self, field)
                if value is not None and not isinstance(value, int):
                    raise _rule(field, value, "must be an integer for an int parameter")
        if self.type == "float" and self.low >= self.high:
            raise _rule("low", self.low, f"must be < high ({self.high})")
        if self.type == "int" and self.low > self.high:
            raise _rule("low", self.low, f"must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise _rule("low", self.low, "must be > 0 when log is true")
        if self.step is not None and self.log:
            raise _rule("step", self.step, "cannot be combined with log: true")
        if self.step is not None and self.step <= 0:
            raise _rule("step", self.step, "must be > 0")


class SpaceSpec(_Strict):
    """A validated space file."""

    base: JobConfig
    search: SearchSettings = Field(default_factory=SearchSettings)
    space: dict[str, ParamSpec]
    source: str  # the file path, for messages and the sweep's artifact

    @field_validator("space")
    @classmethod
    def _not_empty(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not space:
            raise ValueError("must map at least one dotted key to a distribution")
        return space

    @property
    def conditional(self) -> bool:
        """Whether any parameter is sampled only under a condition."""
        return any(p.when for p in self.space.values())

    def sampling_order(self) -> list[str]:
        """The searched keys, those without a condition first (a condition names only
        unconditional keys, so theirs are sampled before it is read)."""
        return sorted(self.space, key=lambda key: bool(self.space[key].when))

    @property
    def max_epochs(self) -> int:
        """Epochs per trial: the pruner's budget, or the base config's schedule."""
        budget = self.search.pruner.max_epochs
        return self.base.train.epochs if budget is None else budget

    def job_for(self, params: Mapping[str, Any]) -> JobConfig:
        """The job config of a trial: `base` with decoded `params` and the per-trial epochs."""
        overrides = {**params, "train.epochs": self.max_epochs}
        return apply_overrides(self.base, overrides, source=f"{self.source}: trial")


def _describe(err: ValidationError) -> str:
    """One line for the first problem pydantic found, naming its dotted key."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    value, rule = first["input"], first["msg"].removeprefix("Value error, ")
    if first["type"] == _RULE:  # the rule is about one field of the model at `loc`
        loc.append(first["ctx"]["field"])
        value = first["ctx"]["value"]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        line = f"unknown key `{key}`"
    elif first["type"] == "missing":
        line = f"`{key}` is required"
    else:
        line = f"`{key}` is {value!r}, but {rule[0].lower()}{rule[1:]}"
    more = len(err.errors()) - 1
    return line + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _broken(source: str, key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{source}: `{key}` is {value!r}, but {rule}")


def load_space(path: str | Path) -> SpaceSpec:
    """Read and validate a space file."""
    return parse_space(read_yaml(path), source=str(path))


def parse_space(data: Mapping[str, Any], source: str) -> SpaceSpec:
    """Validate the parsed YAML of a space file; every problem is a one-line ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping with base, search and space sections")
    if data and not is_space_file(data) and set(data) <= set(JobConfig.model_fields):
        raise ConfigError(
            f"{source}: a job config, not a space file (sections base, search, space); "
            f"`orchestrate train --config {source}` runs it"
        )
    for key in data:
        if key not in _SECTIONS:
            raise ConfigError(f"{source}: unknown key `{key}` (sections: base, search, space)")
    if data.get("base") == {}:
        raise ConfigError(f"{source}: `base` is empty; it sets at least the trials' `dataset`")
    try:
        spec = SpaceSpec.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None
    for key, param in spec.space.items():
        _check_condition(spec, key, param)
        _check_param(spec, key, param)
    _check_search(spec)
    return spec


def _check_param(spec: SpaceSpec, key: str, param: ParamSpec) -> None:
    where = f"{spec.source}: `space.{key}`"
    if key == "train.epochs":
        # The pruner's rungs and the LR schedule both assume one fixed budget per trial.
        raise ConfigError(f"{where}: cannot be searched; set search.pruner.max_epochs instead")
    # Each bound and each choice must be a valid value for the key on its own, or, for a
    # conditional key, together with each value its condition accepts.
    values = param.choices if param.type == "categorical" else [param.low, param.high]
    contexts = [
        {other: accepted}
        for other, value in (param.when or {}).items()
        for accepted in _accepted(value)
    ] or [{}]
    for value, context in itertools.product(values, contexts):
        apply_overrides(spec.base, {**context, key: value}, source=where)
    if param.type == "float":
        # Bounds like 16 and 256 pass an integer key, but a sampled 23.7 would not.
        try:
            apply_overrides(spec.base, {**contexts[0], key: math.nextafter(param.low, param.high)})
        except ConfigError:
            rule = f"`{key}` takes whole numbers (use type: int)"
            raise _broken(spec.source, f"space.{key}.type", "float", rule) from None


def _check_condition(spec: SpaceSpec, key: str, param: ParamSpec) -> None:
    """A condition names a searched, unconditional, categorical key with scalar choices, and
    values among them."""
    for other, value in (param.when or {}).items():
        where = f"space.{key}.when.{other}"
        condition = spec.space.get(other)
        if condition is None:
            raise _broken(spec.source, where, value, f"`{other}` is not a searched key")
        if other == key or condition.when:
            rule = f"`{other}` is conditional itself; a condition names an unconditional key"
            raise _broken(spec.source, where, value, rule)
        if condition.type != "categorical" or not all(map(_is_scalar, condition.choices)):
            rule = f"`{other}` must be a categorical key with scalar choices"
            raise _broken(spec.source, where, value, rule)
        for accepted in _accepted(value):
            if not _is_scalar(accepted) or accepted not in condition.choices:
                rule = f"must be among the choices of `{other}`: {condition.choices}"
                raise _broken(spec.source, where, value, rule)


def _fewest_exits(spec: SpaceSpec) -> int:
    """The fewest exits any trial can have: per-exit metrics above it are not always reported."""
    param = spec.space.get("model.exits")
    if param is None:
        return spec.base.num_exits
    return min(apply_overrides(spec.base, {"model.exits": c}).num_exits for c in param.choices)


def _selectable(names: list[str]) -> list[str]:
    """Metrics a sweep may select on: the validation split's, or the training loss
    (docs/design.md §4)."""
    return [name for name in names if name.startswith("val/") or name == TRAIN_LOSS]


def _check_objectives(spec: SpaceSpec) -> None:
    """One mode per metric, no metric twice, each one every trial reports."""
    search = spec.search
    metrics, modes = search.metrics, search.modes
    if not metrics:
        raise _broken(spec.source, "search.metric", search.metric, "must list at least one metric")
    if isinstance(search.metric, list) != isinstance(search.mode, list) or len(modes) != len(
        metrics
    ):
        rule = (
            f"must be a list of one mode per metric ({len(metrics)} metrics)"
            if isinstance(search.metric, list)
            else "must be 'max' or 'min' for a single metric"
        )
        raise _broken(spec.source, "search.mode", search.mode, rule)
    fewest = _fewest_exits(spec)
    for metric, mode in zip(metrics, modes, strict=True):
        if metrics.count(metric) > 1:
            raise _broken(spec.source, "search.metric", search.metric, f"lists {metric} twice")
        if metric not in _selectable(epoch_metric_names(fewest)):
            general = ", ".join(_selectable(epoch_metric_names(0)))
            raise _broken(
                spec.source,
                "search.metric",
                search.metric,
                f"must be one of {general}, or val/exit{{k}}/acc|loss with k <= {fewest} "
                "(the fewest exits a trial can have)",
            )
        if metric.endswith("loss") and mode != "min":
            raise _broken(spec.source, "search.mode", search.mode, f"{metric} needs 'min'")


def pruner_note(spec: SpaceSpec) -> str | None:
    """Why the configured pruner does not run, or None when it does."""
    kind = spec.search.pruner.kind
    if kind == "none" or not spec.search.multi_objective:
        return None
    return (
        f"search.pruner {kind} does not apply to a multi-objective search (Optuna prunes on "
        "one objective only): every trial runs its full budget"
    )


def grid_size(spec: SpaceSpec) -> int:
    """How many configurations a grid search over the space's choices has."""
    return math.prod(len(p.choices or ()) for p in spec.space.values())


def _check_grid(spec: SpaceSpec) -> None:
    """A grid search takes categorical parameters only, and at most one trial per point."""
    ranged = [key for key, p in spec.space.items() if p.type != "categorical"]
    if ranged:
        kind = spec.space[ranged[0]].type
        rule = f"takes categorical parameters only; `space.{ranged[0]}` is a {kind}"
        raise _broken(spec.source, "search.sampler.kind", "grid", rule)
    conditional = [key for key, p in spec.space.items() if p.when]
    if conditional:
        rule = f"takes unconditional parameters only; `space.{conditional[0]}` has a condition"
        raise _broken(spec.source, "search.sampler.kind", "grid", rule)
    if spec.search.num_samples > (size := grid_size(spec)):
        rule = f"must be <= the grid's {size} combinations"
        raise _broken(spec.source, "search.num_samples", spec.search.num_samples, rule)


def _check_search(spec: SpaceSpec) -> None:
    pruner = spec.search.pruner
    _check_objectives(spec)
    if spec.search.sampler.kind == "grid":
        _check_grid(spec)
    if pruner.kind != "none" and pruner.min_resource > spec.max_epochs:
        raise _broken(
            spec.source,
            "search.pruner.min_resource",
            pruner.min_resource,
            f"must be <= the epochs per trial ({spec.max_epochs})",
        )


def is_space_file(data: Any) -> bool:
    """Whether parsed YAML is a space file rather than a job config."""
    return isinstance(data, Mapping) and ("space" in data or "search" in data)


def decode_params(spec: SpaceSpec, params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna params -> override values for :meth:`SpaceSpec.job_for` (JSON choices decoded)."""
    decoded: dict[str, Any] = {}
    for key, value in params.items():
        if key not in spec.space:
            raise ConfigError(f"{spec.source}: `{key}` is not a parameter of this space")
        choices = spec.space[key].choices or []
        encoded = [encode_choice(c) for c in choices if not _is_scalar(c)]
        decoded[key] = json.loads(value) if value in encoded else value
    return decoded


def sweep_params(spec: SpaceSpec) -> dict[str, str]:
    """Flat sweep settings (``search.pruner.kind`` -> ``"asha"``) for the parent MLflow run."""
    settings = spec.search.model_dump(mode="json")
    settings["pruner"]["max_epochs"] = spec.max_epochs  # resolved: the budget trials ran with
    flat: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{name}.")
            else:
                flat[f"{prefix}{name}"] = str(value)

    walk(settings, "search.")
    return flat
