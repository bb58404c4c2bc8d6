"""The typed job config: one model shared by `orchestrate train`, the trainable and promote.

Defaults live here and nowhere else. Unknown keys, wrong types and out-of-range values
raise :class:`ConfigError` with a single line that names the dotted key.
"""

from __future__ import annotations

import itertools
import math
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
    "parse_job_file",
    "read_yaml",
]

# Number of residual/conv blocks of each backbone: `model.exits` indexes these, 1-based.
# resnet20/32/56/110 are He et al.'s CIFAR ResNets: 3 stages of n basic blocks, 3n in all.
BLOCKS_PER_ARCH: dict[str, int] = {
    "convnet": 4,
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "resnet110": 54,
}

# Each kind's defaults when `loss.kd_weight`, `loss.temperature` or `loss.feature_weight` is
# not given: the reference code's values (README, "Losses"); mate is a reconstruction.
DEFAULT_KD_WEIGHT: dict[str, float] = {
    "mate": 1.0,  # lambda: OKDDip train_GL.py --alpha 1.0 (with the exits' CE weighted 1)
    "byot": 0.1,  # alpha, pytorch-be-your-own-teacher train.py --alpha
    "eed": 1.0,  # MSE output term (Exit-Ensemble-Distillation train.py); 0.1 with eed_output: kl
    "phuong_lampert": 0.5,  # C, multiexit-distillation train_cifar.py
    "dsn": 0.0,
}
EED_KL_WEIGHT = 0.1  # EED's weight of its T^2 soft-CE output term (--loss_output KL)
DEFAULT_TEMPERATURE: dict[str, float] = {
    "mate": 3.0,
    "byot": 3.0,  # train.py --temperature
    "eed": 3.0,  # train.py --temperature (KL output term only)
    "phuong_lampert": 1.0,  # DistillationBasedLoss: T starts at 1 and is annealed
    "dsn": 3.0,  # unused
}
DEFAULT_FEATURE_WEIGHT: dict[str, float] = {
    "byot": 1e-6,  # train.py --beta
    "eed": 1.0,  # train.py: L_F enters the total with weight 1
}
# Kinds whose loss has a (1 - kd_weight) CE term, so kd_weight > 1 would make it negative
# (mate only with `exit_ce_weight: one_minus_kd`).
_CONVEX_KINDS = ("byot", "phuong_lampert")
# MATE's distillation ramp-up, as a fraction of the epochs: OKDDip (train_GL.py --length 80)
# and ONE (cifar_one.py --consistency_rampup 80) both ramp over the first 80 of 300 epochs.
DEFAULT_KD_RAMPUP = 80 / 300


class ConfigError(ValueError):
    """A config or space file is invalid; the message is one line for the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetConfig(_Strict):
    name: Literal["digits", "synthetic", "cifar10", "cifar100", "tinyimagenet", "imagefolder"] = (
        "digits"
    )
    root: str = "~/data"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # Class-stratified share of the training split (after val is carved) a job trains on.
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    download: bool = False
    # Side length the images are resized to (imagefolder) or generated at (synthetic).
    image_size: int | None = Field(None, ge=8, le=512)
    # synthetic only: number of training images and classes.
    num_samples: int = Field(2048, ge=16)
    num_classes: int = Field(10, ge=2)


class ModelConfig(_Strict):
    arch: Literal[
        "convnet",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet110",
    ] = "convnet"
    exits: list[int] | None = None  # None: four exits, at the end of each quarter of the blocks
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
            # After the last block of each quarter, rounded up: ends with the last block, and
            # strictly ascending since every arch has >= 4 blocks (resnet20: 3, 5, 7, 9).
            blocks = BLOCKS_PER_ARCH[self.arch]
            object.__setattr__(self, "exits", [math.ceil(i * blocks / 4) for i in range(1, 5)])
        return self


class DTDConfig(_Strict):
    """Dynamic temperature distillation (Wen et al., "Preparing Lessons"): per-sample
    temperatures t0 + beta (mean w - w_i); cwsm weights are scaled to (0, 1] by the batch's
    largest, so temperatures stay within t0 +- beta for any number of classes."""

    t0: float = Field(4.0, gt=0.0)
    beta: float = Field(2.0, ge=0.0)
    weighting: Literal["cwsm", "flsw"] = "cwsm"
    gamma: float = Field(1.0, gt=0.0)


class LossConfig(_Strict):
    kind: Literal["mate", "byot", "eed", "phuong_lampert", "dsn"] = "mate"
    temperature: float | None = Field(None, gt=0.0, le=100.0)  # None: the kind's default
    kd_weight: float | None = Field(None, ge=0.0)  # None: the kind's default
    feature_weight: float | None = Field(None, ge=0.0)  # byot's b, eed's feature weight
    eed_output: Literal["mse", "kl"] = "mse"  # eed's output distillation term
    # phuong_lampert: after each step T *= anneal_factor while the final exit's mean
    # max-probability at T exceeds anneal_max_prob (1.0 keeps T fixed).
    anneal_factor: float = Field(1.05, ge=1.0, le=2.0)
    anneal_max_prob: float = Field(0.5, gt=0.0, lt=1.0)
    primary_weight: float = Field(0.7, ge=0.0, le=1.0)
    # MATE's ensemble teachers (docs/mate.md): per-sample weights from a self-attention weight
    # network over the exits' pooled features (the paper's figure, OKDDip's projections), or
    # a trainable weight vector per teacher (`static`, the earlier reconstruction).
    teacher_weights: Literal["attention", "static"] = "attention"
    teacher_init: Literal["deeper", "uniform", "next"] = "deeper"  # static only
    teacher_support: Literal["all", "deeper"] = "all"  # deeper: teacher j mixes exits j..K
    # A cross entropy on the teachers and what its gradient reaches: none (OKDDip), only the
    # teacher weights (exit logits detached inside t_j), or the exits too (ONE).
    teacher_ce: Literal["none", "weights", "exits"] = "none"
    detach_targets: bool = False  # KL targets t_j detached (ONE) or not (OKDDip)
    # Distillation weight ramp-up exp(-5 (1 - e/R)^2) over the first R = kd_rampup * epochs
    # epochs (e 0-based; 0: off).
    kd_rampup: float = Field(DEFAULT_KD_RAMPUP, ge=0.0, le=1.0)
    exit_ce_weight: Literal["one", "one_minus_kd"] = "one"  # the exits' CE: 1 or 1 - lambda
    dtd: DTDConfig | None = None
    teacher_adjust: Literal["none", "lsr", "ps"] = "none"
    correlation_weight: float = Field(0.0, ge=0.0)  # 0: off; 10 recommended (docs/losses.md)

    @field_validator("kd_weight")
    @classmethod
    def _check_kd_weight(cls, kd_weight: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("kind", "mate")
        if kd_weight is not None and kind in _CONVEX_KINDS and kd_weight > 1.0:
            raise ValueError(f"must be <= 1 for {kind}, whose CE weight is 1 - kd_weight")
        return kd_weight

    @model_validator(mode="after")
    def _resolve_kind_defaults(self) -> LossConfig:
        if self.kd_weight is None:
            eed_kl = self.kind == "eed" and self.eed_output == "kl"
            object.__setattr__(
                self, "kd_weight", EED_KL_WEIGHT if eed_kl else DEFAULT_KD_WEIGHT[self.kind]
            )
        if self.temperature is None:
            object.__setattr__(self, "temperature", DEFAULT_TEMPERATURE[self.kind])
        if self.feature_weight is None:
            object.__setattr__(self, "feature_weight", DEFAULT_FEATURE_WEIGHT.get(self.kind, 0.0))
        return self

    @model_validator(mode="after")
    def _check_mate(self) -> LossConfig:
        if self.kind != "mate":
            return self
        if self.exit_ce_weight == "one_minus_kd" and self.kd_weight > 1.0:
            raise ValueError(
                f"`loss.kd_weight` is {self.kd_weight}, but must be <= 1 with "
                "`loss.exit_ce_weight: one_minus_kd` (the exits' CE weight is 1 - kd_weight)"
            )
        if self.teacher_ce == "none" and (self.detach_targets or self.kd_weight == 0.0):
            why = (
                "`loss.detach_targets` is true" if self.detach_targets else "`loss.kd_weight` is 0"
            )
            raise ValueError(
                f"`loss.teacher_ce` is 'none' and {why}, so MATE's teacher weights would get no "
                "gradient; set `loss.teacher_ce` to 'weights' or 'exits'"
            )
        return self

    @property
    def uses_correlation(self) -> bool:
        """Whether the correlation term is on (dsn has no distillation term at all)."""
        return self.correlation_weight > 0.0 and self.kind != "dsn"


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

    def explicit_dict(self) -> dict[str, Any]:
        """Only the keys set explicitly (by the file, by overrides), as a plain dict: parsed
        again with overrides (:func:`apply_overrides`), the defaults that follow other keys
        are resolved anew, so a trial that switches ``loss.kind`` gets that kind's defaults."""
        return self.model_dump(mode="json", exclude_unset=True)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        line = f"unknown key `{key}`"
    elif not key or msg.startswith("`"):  # a whole-model rule names its keys itself
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (which it would
    otherwise resolve silently to the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the safe loader itself says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory")
        if path.exists() and not path.is_file():  # a FIFO would block, a device never end
            raise ConfigError(f"{path}: is not a regular file")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with a safe loader; a missing or unreadable file, a syntax error or
    a duplicate key is a :class:`ConfigError`."""
    path = Path(path)
    text = _read_text(path)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(
            f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None


def parse_job_file(data: Any, source: str) -> JobConfig:
    """A job config read from a file: an empty document (an empty file, only comments,
    ``{}``) is an error rather than a job made only of defaults (200 epochs of them)."""
    if data is None or data == {}:
        raise ConfigError(f"{source}: is empty; a job config sets at least its `dataset`")
    return parse_job_config(data, source)


def load_job_config(path: str | Path) -> JobConfig:
    return parse_job_file(read_yaml(path), source=str(path))


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
    data = base.explicit_dict()
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
