"""The typed job config: one model shared by `orchestrate train`, the trainable and promote.

Defaults live here and nowhere else. Unknown keys, wrong types and out-of-range values
raise :class:`ConfigError` with a single line that names the dotted key.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

__all__ = [
    "BLOCKS_PER_ARCH",
    "ConfigError",
    "DTDConfig",
    "DatasetConfig",
    "JobConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "load_job_config",
    "parse_job_config",
]

# Number of residual/conv blocks of each backbone: `model.exits` indexes these, 1-based.
BLOCKS_PER_ARCH: dict[str, int] = {"convnet": 4, "resnet18": 8, "resnet34": 16, "resnet50": 16}

# Distillation weight per loss kind when `loss.kd_weight` is not given (DESIGN §3).
DEFAULT_KD_WEIGHT: dict[str, float] = {
    "mate": 0.5,
    "byot": 0.1,
    "eed": 1.0,
    "phuong_lampert": 0.5,
    "dsn": 0.0,
}


class ConfigError(ValueError):
    """A config or space file is invalid; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    name: Literal["digits", "synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder"] = (
        "digits"
    )
    root: str = "~/data"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    download: bool = False
    # Side length the images are resized to (imagefolder) or generated at (synthetic).
    image_size: int | None = Field(None, ge=8, le=512)
    # synthetic only: number of training images and classes.
    num_samples: int = Field(2048, ge=16)
    num_classes: int = Field(10, ge=2)


class ModelConfig(_Strict):
    arch: Literal["convnet", "resnet18", "resnet34", "resnet50"] = "convnet"
    exits: list[int] | None = None  # None: four evenly spaced exits
    head_width: float = Field(1.0, gt=0.0, le=4.0)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar below 64 px

    @field_validator("exits")
    @classmethod
    def _check_exits(cls, exits: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if exits is None:
            return None
        arch = info.data.get("arch", "convnet")
        blocks = BLOCKS_PER_ARCH[arch]
        if not exits:
            raise ValueError("must list at least the last block")
        if any(b < 1 or b > blocks for b in exits):
            raise ValueError(f"{arch} has blocks 1..{blocks}")
        if any(a >= b for a, b in itertools.pairwise(exits)):
            raise ValueError("must be strictly ascending")
        if exits[-1] != blocks:
            raise ValueError(f"must end with the last block of {arch} ({blocks})")
        return exits

    @model_validator(mode="after")
    def _default_exits(self) -> ModelConfig:
        if self.exits is None:
            step = BLOCKS_PER_ARCH[self.arch] // 4
            object.__setattr__(self, "exits", [step * i for i in range(1, 5)])
        return self


class DTDConfig(_Strict):
    """Dynamic temperature distillation (Wen et al., "Preparing Lessons")."""

    t0: float = Field(4.0, gt=0.0)
    beta: float = Field(2.0, ge=0.0)
    weighting: Literal["cwsm", "flsw"] = "cwsm"
    gamma: float = Field(1.0, gt=0.0)


class LossConfig(_Strict):
    kind: Literal["mate", "byot", "eed", "phuong_lampert", "dsn"] = "mate"
    temperature: float = Field(3.0, gt=0.0, le=100.0)
    kd_weight: float | None = Field(None, ge=0.0, le=1.0)  # None: the kind's default
    primary_weight: float = Field(0.7, ge=0.0, le=1.0)
    teacher_init: Literal["deeper", "uniform", "next"] = "deeper"
    dtd: DTDConfig | None = None
    teacher_adjust: Literal["none", "lsr", "ps"] = "none"
    correlation_weight: float = Field(0.0, ge=0.0)
    feature_weight: float = Field(1e-6, ge=0.0)  # byot's feature-hint weight b

    @model_validator(mode="after")
    def _resolve_kd_weight(self) -> LossConfig:
        if self.kd_weight is None:
            object.__setattr__(self, "kd_weight", DEFAULT_KD_WEIGHT[self.kind])
        return self


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5.0e-4, ge=0.0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = Field(0, ge=0)
    teacher_lr: float | None = Field(None, gt=0.0)  # MATE teacher weights; None: same as lr


class TrainConfig(_Strict):
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    exit_threshold: float = Field(0.9, gt=0.0, le=1.0)


class JobConfig(_Strict):
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def num_exits(self) -> int:
        return len(self.model.exits)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable dict (the resolved config)."""
        return self.model_dump(mode="json")


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        line = f"unknown key `{key}`"
    elif not key:
        line = msg
    else:
        line = f"`{key}` is {first['input']!r}, but {msg[0].lower()}{msg[1:]}"
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {line}{suffix}"


def parse_job_config(data: Mapping[str, Any] | None, source: str = "config") -> JobConfig:
    """Validate a nested mapping into a :class:`JobConfig`; errors become :class:`ConfigError`."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return JobConfig.model_validate(dict(data or {}))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning missing files and syntax errors into :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None


def load_job_config(path: str | Path) -> JobConfig:
    return parse_job_config(read_yaml(path), source=str(path))


def _section_model(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    """The config model behind field `name` of `cls` (unwrapping ``X | None``), if any."""
    annotation = cls.model_fields[name].annotation
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def apply_overrides(
    base: JobConfig, overrides: Mapping[str, Any], source: str = "overrides"
) -> JobConfig:
    """Return `base` with dotted keys (``"loss.temperature"``) replaced, re-validated.

    Overrides apply to what was set explicitly, so defaults that depend on other keys
    (``loss.kd_weight`` follows ``loss.kind``) are resolved again.
    """
    data = copy.deepcopy(base.model_dump(mode="json", exclude_unset=True))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        cls: type[BaseModel] | None = JobConfig
        node = data
        for part in parents:
            if part not in cls.model_fields or (cls := _section_model(cls, part)) is None:
                raise ConfigError(f"{source}: unknown key `{dotted}`")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if leaf not in cls.model_fields:
            raise ConfigError(f"{source}: unknown key `{dotted}`")
        node[leaf] = value
    return parse_job_config(data, source)
