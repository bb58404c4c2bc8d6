import pytest

from orchestrator.entities.space import load_space
from trainer.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    load_job_config,
    parse_job_config,
)


def test_parse_defaults_resolve_kind_dependent_values():
    cfg = parse_job_config({})
    assert cfg.loss.kind == "mate"
    assert cfg.loss.kd_weight == 1.0  # OKDDip's weight, with the exits' CE weighted 1
    assert cfg.model.exits == [1, 2, 3, 4]
    assert parse_job_config({"loss": {"kind": "byot"}}).loss.kd_weight == 0.1
    assert parse_job_config({"model": {"arch": "resnet18"}}).model.exits == [2, 4, 6, 8]
    assert parse_job_config({"model": {"arch": "resnet50"}}).model.exits == [4, 8, 12, 16]


@pytest.mark.parametrize(
    ("arch", "exits"),
    [
        ("convnet", [1, 2, 3, 4]),
        ("resnet18", [2, 4, 6, 8]),
        ("resnet50", [4, 8, 12, 16]),
        ("resnet20", [3, 5, 7, 9]),  # 9 blocks: the last exit is still the last block
        ("resnet32", [4, 8, 12, 15]),
        ("resnet56", [7, 14, 21, 27]),
        ("resnet110", [14, 27, 41, 54]),
    ],
)
def test_default_exits_close_each_quarter_and_end_with_the_last_block(arch, exits):
    assert parse_job_config({"model": {"arch": arch}}).model.exits == exits


@pytest.mark.parametrize(
    ("loss", "kd_weight", "temperature", "feature_weight"),
    [
        ({"kind": "byot"}, 0.1, 3.0, 1e-6),
        ({"kind": "eed"}, 1.0, 3.0, 1.0),
        ({"kind": "eed", "eed_output": "kl"}, 0.1, 3.0, 1.0),
        ({"kind": "phuong_lampert"}, 0.5, 1.0, 0.0),
        ({"kind": "mate"}, 1.0, 3.0, 0.0),
    ],
)
def test_parse_resolves_each_kinds_reference_defaults(loss, kd_weight, temperature, feature_weight):
    resolved = parse_job_config({"loss": loss}).loss
    assert (resolved.kd_weight, resolved.temperature) == (kd_weight, temperature)
    assert resolved.feature_weight == feature_weight


def test_overrides_re_resolve_kind_defaults_but_keep_explicit_values():
    base = parse_job_config({"loss": {"kind": "byot", "temperature": 4.0}})
    pl = apply_overrides(base, {"loss.kind": "phuong_lampert"})
    assert (pl.loss.kd_weight, pl.loss.temperature, pl.loss.feature_weight) == (0.5, 4.0, 0.0)


def test_kd_weight_above_one_only_where_no_ce_weight_turns_negative():
    assert parse_job_config({"loss": {"kind": "eed", "kd_weight": 5.0}}).loss.kd_weight == 5.0
    for kind in ("byot", "phuong_lampert"):
        with pytest.raises(ConfigError, match="CE weight is 1 - kd_weight") as err:
            parse_job_config({"loss": {"kind": kind, "kd_weight": 1.5}}, source="job.yaml")
        assert str(err.value) == (
            f"job.yaml: `loss.kd_weight` is 1.5, but must be <= 1 for {kind}, "
            "whose CE weight is 1 - kd_weight"
        )
    # MATE: only where its exits' CE is weighted 1 - lambda.
    assert parse_job_config({"loss": {"kind": "mate", "kd_weight": 1.5}}).loss.kd_weight == 1.5
    with pytest.raises(ConfigError) as err:
        loss = {"kind": "mate", "kd_weight": 1.5, "exit_ce_weight": "one_minus_kd"}
        parse_job_config({"loss": loss}, source="job.yaml")
    assert str(err.value) == (
        "job.yaml: `loss.kd_weight` is 1.5, but must be <= 1 with `loss.exit_ce_weight: "
        "one_minus_kd` (the exits' CE weight is 1 - kd_weight)"
    )


@pytest.mark.parametrize(
    ("loss", "why"),
    [
        ({"detach_targets": True}, "`loss.detach_targets` is true"),
        ({"kd_weight": 0.0}, "`loss.kd_weight` is 0"),
        ({"teacher_weights": "static", "detach_targets": True}, "`loss.detach_targets` is true"),
    ],
)
def test_mate_refuses_teacher_weights_without_gradient(loss, why):
    with pytest.raises(ConfigError) as err:
        parse_job_config({"loss": {"kind": "mate", **loss}}, source="job.yaml")
    assert str(err.value) == (
        f"job.yaml: `loss.teacher_ce` is 'none' and {why}, so MATE's teacher weights would "
        "get no gradient; set `loss.teacher_ce` to 'weights' or 'exits'"
    )
    # Either path gives the weights a gradient.
    for teacher_ce in ("weights", "exits"):
        parse_job_config({"loss": {"kind": "mate", **loss, "teacher_ce": teacher_ce}})
    parse_job_config({"loss": {"kind": "dsn", **loss}})  # only MATE has teacher weights


def test_parse_round_trips_through_dict():
    cfg = parse_job_config({"loss": {"dtd": {"t0": 5.0}}, "train": {"epochs": 3}})
    assert parse_job_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"loss": {"primary_weight": 1.4}}, "`loss.primary_weight` is 1.4, but input should be"),
        ({"loss": {"temperature": 0}}, "`loss.temperature` is 0, but input should be greater"),
        ({"loss": {"kind": "kd"}}, "`loss.kind` is 'kd', but input should be 'mate'"),
        ({"loss": {"foo": 1}}, "unknown key `loss.foo`"),
        ({"optimizer": {}}, "unknown key `optimizer`"),
        ({"loss": {"dtd": {"weighting": "x"}}}, "`loss.dtd.weighting` is 'x'"),
        ({"train": {"epochs": "many"}}, "`train.epochs` is 'many', but input should be"),
        ({"train": {"device": "tpu"}}, "`train.device` is 'tpu'"),
        ({"dataset": {"val_fraction": 1.0}}, "`dataset.val_fraction` is 1.0, but input should"),
        ({"dataset": {"train_fraction": 0}}, "`dataset.train_fraction` is 0, but input should be"),
        ({"dataset": {"train_fraction": 1.5}}, "`dataset.train_fraction` is 1.5, but input"),
        ({"model": {"arch": "resnet20", "exits": [3, 6]}}, "last block of resnet20 (9)"),
        ({"model": {"exits": [2, 1, 4]}}, "`model.exits` is [2, 1, 4], but must be strictly"),
        ({"model": {"exits": [1, 2]}}, "must end with the last block of convnet (4)"),
        ({"model": {"arch": "resnet18", "exits": [0, 8]}}, "resnet18 has blocks 1..8"),
        ({"model": {"exits": []}}, "must list at least the last block"),
    ],
)
def test_parse_rejects_bad_value_naming_dotted_key(data, message):
    with pytest.raises(ConfigError, match="^job.yaml: ") as err:
        parse_job_config(data, source="job.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_parse_rejects_non_mapping():
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        parse_job_config([1, 2], source="x.yaml")


@pytest.mark.parametrize("load", [load_job_config, load_space])
def test_load_reports_missing_file_and_bad_yaml(tmp_path, load):
    with pytest.raises(ConfigError, match=r"absent\.yaml: no such file"):
        load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {kind: mate\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+\)"):
        load(bad)


def test_apply_overrides_sets_dotted_keys_and_revalidates():
    base = parse_job_config({"loss": {"kind": "mate"}})
    cfg = apply_overrides(base, {"loss.kind": "byot", "loss.dtd.t0": 5.0, "model.head_width": 2})
    assert cfg.loss.kind == "byot"
    assert cfg.loss.kd_weight == 0.1  # the new kind's default, not mate's
    assert cfg.loss.dtd is not None and cfg.loss.dtd.t0 == 5.0
    assert cfg.model.head_width == 2.0
    assert base.loss.kind == "mate"  # frozen: the base is untouched


def test_apply_overrides_keeps_explicit_values():
    base = parse_job_config({"loss": {"kd_weight": 0.3}, "model": {"arch": "resnet18"}})
    cfg = apply_overrides(base, {"loss.kind": "eed", "model.exits": [4, 8]})
    assert cfg.loss.kd_weight == 0.3
    assert cfg.model.exits == [4, 8]


@pytest.mark.parametrize("key", ["loss.nope", "nope.x", "loss.kind.x", "loss.dtd.nope"])
def test_apply_overrides_rejects_unknown_key(key):
    with pytest.raises(ConfigError, match=f"space.yaml: unknown key `{key}`"):
        apply_overrides(JobConfig(), {key: 1}, source="space.yaml")


def test_apply_overrides_rejects_out_of_range_value():
    with pytest.raises(ConfigError, match="`loss.kd_weight` is 2"):
        apply_overrides(JobConfig(), {"loss.kind": "byot", "loss.kd_weight": 2})
