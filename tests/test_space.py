import copy
import json
from pathlib import Path

import optuna
import pytest
import yaml

from orchestrator.entities.space import (
    SpaceSpec,
    decode_params,
    is_space_file,
    load_space,
    parse_space,
    sweep_params,
)
from orchestrator.stores.study import make_sampler, optuna_distributions, suggest_params
from orchestrator.tuning.searcher import OptunaSearcher
from trainer.config import ConfigError, JobConfig

SHIPPED = sorted((Path(__file__).parent.parent / "search_spaces").glob("*.yaml"))

# A small valid space file; the validation tests break one thing in a copy of it.
VALID = {
    "base": {
        "dataset": {"name": "digits"},
        "model": {"arch": "convnet", "exits": [1, 2, 3, 4]},
        "train": {"epochs": 6, "batch_size": 64},
    },
    "search": {
        "metric": "val/mean_exit_acc",
        "num_samples": 4,
        "pruner": {"kind": "asha", "min_resource": 1, "reduction_factor": 2, "max_epochs": 3},
        "resources": {"cpu": 1, "gpu": 0.25},
    },
    "space": {
        "loss.temperature": {"type": "float", "low": 1.0, "high": 8.0},
        "optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        "train.batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "model.exits": {"type": "categorical", "choices": [[1, 2, 3, 4], [2, 4]]},
        "loss.dtd": {"type": "categorical", "choices": [None, {"t0": 4.0, "weighting": "flsw"}]},
        "loss.teacher_init": {"type": "categorical", "choices": ["deeper", "next"]},
    },
}


def _with(path: tuple[str, ...], value):
    """A copy of VALID with the value at `path` replaced (or removed when value is ...)."""
    data = copy.deepcopy(VALID)
    node = data
    for part in path[:-1]:
        node = node[part]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_load_space_accepts_shipped_file(path):
    spec = load_space(path)
    assert spec.source == str(path)
    assert spec.space


def test_load_space_ships_the_documented_files():
    documented = {"mate_cifar.yaml", "mate_tinyimagenet.yaml", "baselines_cifar.yaml"}
    assert documented | {"mate_digits.yaml"} <= {p.name for p in SHIPPED}


def test_load_space_digits_is_small_and_prunes():
    spec = load_space(Path(__file__).parent.parent / "search_spaces" / "mate_digits.yaml")
    assert spec.base.dataset.name == "digits"
    assert spec.search.num_samples <= 8
    assert spec.max_epochs <= 10
    assert spec.search.pruner.kind == "asha"
    assert spec.search.pruner.reduction_factor == 2
    assert spec.search.resources.gpu == 0


def test_optuna_distributions_match_space():
    dists = optuna_distributions(parse_space(VALID, "x.yaml"))
    assert dists["loss.temperature"] == optuna.distributions.FloatDistribution(1.0, 8.0)
    assert dists["optim.lr"] == optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    assert dists["train.batch_size"] == optuna.distributions.IntDistribution(32, 128, step=32)
    assert dists["model.exits"].choices == ("[1, 2, 3, 4]", "[2, 4]")
    assert dists["loss.dtd"].choices[0] is None
    assert json.loads(dists["loss.dtd"].choices[1]) == {"t0": 4.0, "weighting": "flsw"}
    assert dists["loss.teacher_init"].choices == ("deeper", "next")


def test_decode_params_round_trips_list_and_dict_choices():
    spec = parse_space(VALID, "x.yaml")
    dists = optuna_distributions(spec)
    params = {
        "model.exits": dists["model.exits"].choices[1],
        "loss.dtd": dists["loss.dtd"].choices[1],
        "loss.teacher_init": "next",
        "loss.temperature": 2.5,
    }
    assert decode_params(spec, params) == {
        "model.exits": [2, 4],
        "loss.dtd": {"t0": 4.0, "weighting": "flsw"},
        "loss.teacher_init": "next",
        "loss.temperature": 2.5,
    }
    assert decode_params(spec, {"loss.dtd": None}) == {"loss.dtd": None}


def test_decode_params_rejects_unknown_param():
    with pytest.raises(ConfigError, match=r"^x.yaml: `loss.kind` is not a parameter"):
        decode_params(parse_space(VALID, "x.yaml"), {"loss.kind": "dsn"})


def test_job_for_applies_params_and_max_epochs():
    spec = parse_space(VALID, "x.yaml")
    job = spec.job_for({"model.exits": [2, 4], "loss.temperature": 5.0, "loss.dtd": {"t0": 2.0}})
    assert isinstance(job, JobConfig)
    assert job.model.exits == [2, 4]
    assert job.loss.temperature == 5.0
    assert job.loss.dtd.t0 == 2.0
    assert job.train.epochs == spec.max_epochs == 3
    assert job.train.batch_size == 64  # untouched base value


def test_job_for_uses_base_epochs_without_max_epochs():
    spec = parse_space(_with(("search", "pruner", "max_epochs"), None), "x.yaml")
    assert spec.max_epochs == 6
    assert spec.job_for({}).train.epochs == 6


def test_job_for_rejects_invalid_combination():
    spec = parse_space(VALID, "x.yaml")
    with pytest.raises(ConfigError, match=r"^x.yaml: trial: `model.exits` is \[1, 3\]"):
        spec.job_for({"model.exits": [1, 3]})


@pytest.mark.parametrize("path", [*SHIPPED, None], ids=[*(p.name for p in SHIPPED), "valid"])
def test_sampled_configs_validate(path):
    spec = parse_space(VALID, "x.yaml") if path is None else load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = decode_params(spec, suggest_params(spec, trial))
        job = spec.job_for(params)
        assert all(spec.space[key].applies(params) for key in params)
        for key, value in params.items():
            section, _, name = key.partition(".")
            if not isinstance(value, dict):  # loss.dtd becomes a DTDConfig
                assert getattr(getattr(job, section), name) == value
        study.tell(trial, 0.5)


def test_sweep_params_flattens_search_settings():
    params = sweep_params(parse_space(VALID, "x.yaml"))
    assert params["search.metric"] == "val/mean_exit_acc"
    assert params["search.sampler.kind"] == "tpe"
    assert params["search.num_samples"] == "4"
    assert params["search.pruner.max_epochs"] == "3"
    assert params["search.resources.gpu"] == "0.25"
    assert all(isinstance(v, str) for v in params.values())
    no_budget = parse_space(_with(("search", "pruner", "max_epochs"), None), "x.yaml")
    assert sweep_params(no_budget)["search.pruner.max_epochs"] == "6"  # resolved from base


def test_is_space_file_tells_space_from_job_config():
    assert is_space_file(VALID)
    assert is_space_file({"search": {}})
    assert not is_space_file(VALID["base"])
    assert not is_space_file([1, 2])
    assert not is_space_file(None)


# (where in VALID, "a/b/c"; the new value, ... to delete it; part of the expected message)
RULES = [
    # top level and base
    ("extra", 1, "unknown key `extra`"),
    ("space", ..., "`space` is required"),
    ("space", {}, "`space` is {}, but must map at least one dotted key"),
    ("base/loss", {"kind": "kd"}, "`base.loss.kind` is 'kd', but input should be"),
    ("base/model/exits", [1, 2], "`base.model.exits` is [1, 2], but must end"),
    ("base/optimizer", {}, "unknown key `base.optimizer`"),
    # search settings
    ("search/metric", "val/acc", "`search.metric` is 'val/acc', but must be one of"),
    ("search/metric", "lr", "`search.metric` is 'lr', but must be one of"),
    ("search/metric", "test/exit1/acc", "`search.metric` is 'test/exit1/acc'"),
    ("search/metric", "val/exit3/acc", "with k <= 2 (the fewest exits a trial can have)"),
    ("search/mode", "best", "`search.mode` is 'best', but input should be"),
    ("search/num_samples", 0, "`search.num_samples` is 0, but input should be"),
    ("search/sampler", {"kind": "cmaes"}, "`search.sampler.kind` is 'cmaes'"),
    ("search/sampler", {"n_startup_trials": -1}, "`search.sampler.n_startup_trials` is -1"),
    ("search/pruner/reduction_factor", 1, "`search.pruner.reduction_factor` is 1, but"),
    ("search/pruner/min_resource", 0, "`search.pruner.min_resource` is 0, but"),
    ("search/pruner/min_resource", 4, "is 4, but must be <= the epochs per trial (3)"),
    ("search/pruner/max_epochs", 0, "`search.pruner.max_epochs` is 0, but"),
    ("search/resources/gpu", 0.3, "`search.resources.gpu` is 0.3, but must divide 1"),
    ("search/resources/gpu", 1.5, "`search.resources.gpu` is 1.5, but must be a whole"),
    ("search/resources/cpu", 0, "`search.resources.cpu` is 0, but input should be"),
    ("search/time_budget_s", 0, "`search.time_budget_s` is 0, but input should be"),
    ("search/max_concurrent", 0, "`search.max_concurrent` is 0, but input should be"),
    ("search/seed", 1, "unknown key `search.seed`"),
    # parameter specs
    ("space/loss.temperature/low", 9.0, "`space.loss.temperature.low` is 9.0, but must be < high"),
    ("space/loss.temperature/low", "abc", "`space.loss.temperature.low` is 'abc', but must be a"),
    ("space/loss.temperature/high", float("inf"), "`space.loss.temperature.high` is inf, but"),
    ("space/loss.temperature/low", ..., "temperature.low` is None, but float parameters need low"),
    ("space/loss.temperature/type", "normal", "`space.loss.temperature.type` is 'normal'"),
    ("space/loss.temperature/type", ..., "`space.loss.temperature.type` is required"),
    (
        "space/loss.temperature/choices",
        [1.0],
        "temperature.choices` is [1.0], but float parameters take",
    ),
    ("space/loss.temperature/scale", 1, "unknown key `space.loss.temperature.scale`"),
    ("space/loss.temperature", [1, 8], "`space.loss.temperature` is [1, 8], but input should"),
    ("space/optim.lr/low", 0, "`space.optim.lr.low` is 0, but must be > 0 when log is true"),
    ("space/optim.lr/step", 0.01, "`space.optim.lr.step` is 0.01, but cannot be combined"),
    ("space/train.batch_size/low", 200, "`space.train.batch_size.low` is 200, but must be <="),
    ("space/train.batch_size/high", 9.5, "`space.train.batch_size.high` is 9.5, but must be an"),
    ("space/train.batch_size/step", 0, "`space.train.batch_size.step` is 0, but must be > 0"),
    ("space/model.exits/choices", [], "`space.model.exits.choices` is [], but must list at"),
    ("space/model.exits/choices", [[2, 4], "[2, 4]"], "but lists '[2, 4]' twice"),
    ("space/model.exits/low", 1, "`space.model.exits.low` is 1, but categorical parameters"),
    ("space/model.exits/log", True, "`space.model.exits.log` is True, but categorical"),
    # every bound and every choice must be a valid value for its key in the base config
    ("space/loss.temprature", {"type": "int", "low": 1, "high": 2}, "`space.loss.temprature`: "),
    ("space/loss.temprature", {"type": "int", "low": 1, "high": 2}, "unknown key `loss.tempra"),
    ("space/model.exits/choices", [[1, 3]], "`space.model.exits`: `model.exits` is [1, 3], but"),
    ("space/model.exits/choices", [[1, 3]], "must end with the last block of convnet (4)"),
    ("space/loss.dtd/choices", [{"t0": -1}], "`space.loss.dtd`: `loss.dtd.t0` is -1, but"),
    ("space/loss.temperature/low", 0.0, "`space.loss.temperature`: `loss.temperature` is 0.0"),
    ("space/loss.temperature/high", 200.0, "`loss.temperature` is 200.0, but input should be"),
    ("space/train.batch_size/type", "float", "`space.train.batch_size.type` is 'float', but"),
    ("space/train.batch_size/type", "float", "`train.batch_size` takes whole numbers"),
    ("space/train.epochs", {"type": "int", "low": 2, "high": 4}, "`space.train.epochs`: cannot"),
]


@pytest.mark.parametrize(("where", "value", "message"), RULES)
def test_load_space_rejects_bad_file_naming_key(tmp_path, where, value, message):
    file = _write(tmp_path, _with(tuple(where.split("/")), value))
    with pytest.raises(ConfigError) as err:
        load_space(file)
    text = str(err.value)
    assert text.startswith(f"{file}: ")
    assert message in text
    assert "\n" not in text


def test_load_space_accepts_per_exit_metric_every_trial_reports():
    spec = parse_space(_with(("search", "metric"), "val/exit2/acc"), "x.yaml")
    assert spec.search.metric == "val/exit2/acc"
    loss = _with(("search", "metric"), "val/exit1/loss")
    loss["search"]["mode"] = "min"
    assert parse_space(loss, "x.yaml").search.mode == "min"


def test_load_space_rejects_loss_metric_with_max_mode():
    with pytest.raises(ConfigError, match=r"^x.yaml: `search.mode` is 'max', but train/loss needs"):
        parse_space(_with(("search", "metric"), "train/loss"), "x.yaml")


def test_parse_space_reads_exponent_strings_as_numbers():
    # PyYAML reads `1e-4` (no dot) as a string; bounds accept it as the number it means.
    spec = parse_space(
        yaml.safe_load("""
base: {dataset: {name: digits}}
space: {optim.weight_decay: {type: float, low: 1e-4, high: 1e-3, log: true}}
"""),
        "x.yaml",
    )
    assert spec.space["optim.weight_decay"].low == 1e-4
    assert optuna_distributions(spec)["optim.weight_decay"].high == 1e-3


def test_parse_space_rejects_non_mapping():
    with pytest.raises(
        ConfigError, match=r"^x\.yaml: expected a mapping with base, search and space"
    ):
        parse_space([1, 2], "x.yaml")


def test_space_spec_is_frozen():
    spec = parse_space(VALID, "x.yaml")
    assert isinstance(spec, SpaceSpec)
    with pytest.raises(ValueError, match="frozen"):
        spec.source = "y.yaml"


# A conditional space: each method searched over its own knobs.
CONDITIONAL = {
    **copy.deepcopy(VALID),
    "space": {
        "loss.kind": {"type": "categorical", "choices": ["mate", "byot", "dsn"]},
        "loss.teacher_weights": {
            "type": "categorical",
            "choices": ["attention", "static"],
            "when": {"loss.kind": "mate"},
        },
        "loss.temperature": {
            "type": "float",
            "low": 1.0,
            "high": 8.0,
            "when": {"loss.kind": ["mate", "byot"]},
        },
        "optim.lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
    },
}


def test_conditional_parameters_are_sampled_only_where_their_condition_holds():
    spec = parse_space(CONDITIONAL, "x.yaml")
    assert spec.conditional and spec.sampling_order()[:2] == ["loss.kind", "optim.lr"]
    study = optuna.create_study(sampler=make_sampler(spec))
    kinds = set()
    for _ in range(30):
        trial = study.ask()
        params = decode_params(spec, suggest_params(spec, trial))
        kind = params["loss.kind"]
        kinds.add(kind)
        assert ("loss.teacher_weights" in params) == (kind == "mate")
        assert ("loss.temperature" in params) == (kind in ("mate", "byot"))
        assert "optim.lr" in params
        job = spec.job_for(params)
        if kind == "dsn":
            assert job.loss.temperature == 3.0  # the kind's default, not a sampled value
        study.tell(trial, 0.5)
    assert kinds == {"mate", "byot", "dsn"}
    # TPE models the groups of parameters that occur together.
    assert make_sampler(spec)._group


def test_searcher_hands_tune_only_the_active_parameters(tmp_path):
    spec = parse_space(CONDITIONAL, "x.yaml")
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 's.db'}", "cond", num_samples=12)
    for index in range(12):
        overrides = searcher.suggest(f"t{index}")["overrides"]
        assert ("loss.teacher_weights" in overrides) == (overrides["loss.kind"] == "mate")
    stored = searcher.study.get_trials(deepcopy=False)
    assert {t.params.keys() == {"loss.kind", "optim.lr"} for t in stored} == {True, False}


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (
            {"loss.primary_weight": 0.5},
            "`space.loss.temperature.when.loss.primary_weight` is 0.5, but "
            "`loss.primary_weight` is not a searched key",
        ),
        (
            {"loss.kind": "eed"},
            "`space.loss.temperature.when.loss.kind` is 'eed', but must be among the choices "
            "of `loss.kind`: ['mate', 'byot', 'dsn']",
        ),
        (
            {"loss.kind": ["mate", "kd"]},
            "`space.loss.temperature.when.loss.kind` is ['mate', 'kd'], but must be among the "
            "choices of `loss.kind`: ['mate', 'byot', 'dsn']",
        ),
        (
            {"optim.lr": 0.1},
            "`space.loss.temperature.when.optim.lr` is 0.1, but `optim.lr` must be a "
            "categorical key with scalar choices",
        ),
        (
            {"loss.teacher_weights": "static"},
            "`space.loss.temperature.when.loss.teacher_weights` is 'static', but "
            "`loss.teacher_weights` is conditional itself; a condition names an unconditional key",
        ),
    ],
)
def test_space_refuses_conditions_that_cannot_hold(when, message):
    data = copy.deepcopy(CONDITIONAL)
    data["space"]["loss.temperature"]["when"] = when
    with pytest.raises(ConfigError) as err:
        parse_space(data, "x.yaml")
    assert str(err.value) == f"x.yaml: {message}"


def test_grid_search_refuses_conditional_parameters():
    data = copy.deepcopy(CONDITIONAL)
    data["search"]["sampler"] = {"kind": "grid"}
    for ranged in ("loss.temperature", "optim.lr"):
        del data["space"][ranged]
    with pytest.raises(ConfigError) as err:
        parse_space(data, "x.yaml")
    assert str(err.value) == (
        "x.yaml: `search.sampler.kind` is 'grid', but takes unconditional parameters only; "
        "`space.loss.teacher_weights` has a condition"
    )


def test_conditional_values_are_checked_under_their_condition():
    data = copy.deepcopy(VALID)
    data["space"] = {
        "loss.teacher_ce": {"type": "categorical", "choices": ["none", "weights"]},
        "loss.detach_targets": {
            "type": "categorical",
            "choices": [False, True],
            "when": {"loss.teacher_ce": "weights"},
        },
    }
    parse_space(data, "x.yaml")  # detached targets are fine where a teacher CE trains
    del data["space"]["loss.detach_targets"]["when"]
    with pytest.raises(ConfigError, match="`loss.detach_targets` is true, so MATE's teacher"):
        parse_space(data, "x.yaml")
