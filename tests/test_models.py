"""trainer/models: backbones from the registry, exit heads, MultiExitNet and FLOPs per exit."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import BLOCKS_PER_ARCH, ModelConfig
from trainer.metrics import exit_at_threshold
from trainer.models import (
    BACKBONES,
    MultiExitNet,
    create_model,
    exit_gflops,
    register_backbone,
)
from trainer.models.early_exit import early_exit

NUM_CLASSES = 10
# Input (C, H, W) per arch: digits for the convnet, CIFAR for ResNet-18 and resnet20; the
# deeper ResNets see 16 px (final map 2x2, same CIFAR-stem code path) to keep CPU tests fast.
INPUT = {
    "convnet": (1, 8, 8),
    "resnet18": (3, 32, 32),
    "resnet34": (3, 16, 16),
    "resnet50": (3, 16, 16),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 16, 16),
    "resnet56": (3, 16, 16),
    "resnet110": (3, 16, 16),
}
FEATURE_DIM = {"convnet": 64, "resnet18": 512, "resnet34": 512, "resnet50": 2048} | dict.fromkeys(
    ["resnet20", "resnet32", "resnet56", "resnet110"], 64
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Batches of two: a second intra-op thread costs more in sync than it saves, much more
    # on a busy CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _model(arch: str, exits: list[int] | None = None, **kwargs: object) -> MultiExitNet:
    c, h, _ = INPUT[arch]
    cfg = ModelConfig(arch=arch, exits=exits, **kwargs)
    return create_model(cfg, num_classes=NUM_CLASSES, in_channels=c, image_size=h)


def _batch(arch: str, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *INPUT[arch])


def test_registry_covers_config_archs() -> None:
    assert set(BACKBONES) == set(BLOCKS_PER_ARCH)


def test_register_backbone_rejects_duplicate_name() -> None:
    with pytest.raises(ValueError, match="backbone `convnet` is already registered"):
        register_backbone("convnet")(BACKBONES["convnet"])


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_backbone_block_metadata_matches_blocks(arch: str) -> None:
    backbone = BACKBONES[arch](in_channels=3, stem="cifar")
    assert len(backbone.blocks) == BLOCKS_PER_ARCH[arch]
    h = backbone.stem(torch.randn(1, 3, 16, 16))
    for block, channels, stride in zip(
        backbone.blocks, backbone.block_channels, backbone.block_strides, strict=True
    ):
        out = block(h)
        assert out.shape[1] == channels
        assert out.shape[-1] == h.shape[-1] // stride
        h = out


@pytest.mark.parametrize(
    ("arch", "exits"),
    [
        ("convnet", [1, 2, 3, 4]),
        ("convnet", [2, 4]),
        ("convnet", [4]),
        ("resnet18", [2, 4, 6, 8]),
        ("resnet18", [4, 8]),
        ("resnet18", [1, 7, 8]),
        ("resnet18", [8]),
        ("resnet34", [4, 8, 12, 16]),
        ("resnet50", [4, 8, 12, 16]),
        ("resnet20", [3, 6, 9]),
        ("resnet110", [14, 27, 41, 54]),
    ],
)
def test_multi_exit_output_shapes(arch: str, exits: list[int]) -> None:
    model = _model(arch, exits)
    out = model(_batch(arch))
    dim = FEATURE_DIM[arch]
    assert (model.num_exits, model.exits, model.feature_dim) == (len(exits), exits, dim)
    assert out.logits.shape == (len(exits), 2, NUM_CLASSES)
    assert out.features.shape == (len(exits), 2, dim)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.features).all()


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_multi_exit_every_parameter_gets_gradient(arch: str) -> None:
    model = _model(arch)
    model(_batch(arch)).logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


@pytest.mark.parametrize(
    ("arch", "exits"),
    [
        ("convnet", [1, 2, 3, 4]),
        ("resnet18", [1, 2, 3, 4, 5, 6, 7, 8]),
        ("resnet50", [3, 4, 15, 16]),
        ("resnet20", [1, 3, 4, 6, 7, 9]),
    ],
)
def test_exit_heads_reach_final_resolution(arch: str, exits: list[int]) -> None:
    model = _model(arch, exits).eval()
    maps = []
    with torch.no_grad():
        h = model.backbone.stem(_batch(arch))
        for block, head in model.stages():
            h = block(h)
            if head is not None:
                maps.append(head.body(h))
    assert {m.shape[1:] for m in maps} == {h.shape[1:]}


def test_exit_heads_scale_with_head_width() -> None:
    def head_params(model: MultiExitNet) -> int:
        return sum(p.numel() for p in model.heads.parameters())

    assert head_params(_model("resnet18", head_width=0.5)) < head_params(_model("resnet18"))


@pytest.mark.parametrize(
    ("stem", "image_size", "has_maxpool"),
    [("auto", 32, False), ("auto", 63, False), ("auto", 64, True), ("imagenet", 32, True)],
)
def test_create_model_picks_stem(stem: str, image_size: int, has_maxpool: bool) -> None:
    cfg = ModelConfig(arch="convnet", stem=stem)
    model = create_model(cfg, num_classes=NUM_CLASSES, in_channels=3, image_size=image_size)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.backbone.stem.modules()) == has_maxpool


def test_create_model_imagenet_stem_on_64px() -> None:
    cfg = ModelConfig(arch="resnet18", exits=[2, 5, 8])
    model = create_model(cfg, num_classes=200, in_channels=3, image_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (3, 2, 200)
    assert out.features.shape == (3, 2, 512)


def test_multi_exit_channels_last_bf16_autocast() -> None:
    # 3x32x32 through the convnet: the CIFAR-sized path the demo and GPU runs take.
    model = create_model(ModelConfig(), num_classes=NUM_CLASSES, in_channels=3, image_size=32)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.logits.float().sum().backward()
    assert out.logits.shape == (4, 2, NUM_CLASSES)
    assert out.features.shape == (4, 2, 64)
    assert out.logits.dtype == out.features.dtype == torch.bfloat16
    assert torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_exit_gflops_strictly_increase(arch: str) -> None:
    # An exit after every block: then every placement (any subset) increases too.
    model = _model(arch, list(range(1, BLOCKS_PER_ARCH[arch] + 1)))
    gflops = exit_gflops(model, INPUT[arch])
    assert len(gflops) == model.num_exits
    assert all(a < b for a, b in itertools.pairwise(gflops))


def _forward_gflops(model) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, *INPUT["resnet18"]))
    return counter.get_total_flops() / 1e9


def test_exit_gflops_last_is_the_whole_forward() -> None:
    # Reaching the last exit in anytime inference evaluates every head on the way.
    single, multi = _model("resnet18", [8]), _model("resnet18")
    assert exit_gflops(single, INPUT["resnet18"]) == pytest.approx([_forward_gflops(single)])
    gflops = exit_gflops(multi, INPUT["resnet18"])
    assert gflops[-1] == pytest.approx(_forward_gflops(multi))
    assert gflops[-1] > _forward_gflops(single)  # the earlier heads are paid for


def test_exit_gflops_resnet18_cifar_matches_hand_count() -> None:
    # CIFAR ResNet-18 at 32 px is ~0.556 G multiply-adds (stem 1.8M, stage 1 151M, stages 2-4
    # ~134M each, fc); FlopCounterMode counts 2 FLOPs per multiply-add.
    gflops = exit_gflops(_model("resnet18", [8]), INPUT["resnet18"])
    assert 1.09 < gflops[-1] < 1.13


def test_exit_gflops_resnet20_matches_hand_count() -> None:
    # Multiply-adds at 32 px: stem 32*32*16*3*9; stage 1: 6 convs of 32*32*16*16*9; stages 2
    # and 3: a stride-2 conv of 1,179,648 plus 5 convs of 2,359,296 each; fc 64*10. Option-A
    # shortcuts cost nothing. He et al.: "about 41 M"; FlopCounterMode counts 2 per multiply-add.
    macs = 442_368 + 6 * 2_359_296 + 2 * (1_179_648 + 5 * 2_359_296) + 640
    assert macs == 40_551_040
    assert exit_gflops(_model("resnet20", [9]), INPUT["resnet20"]) == [2 * macs / 1e9]


@pytest.mark.parametrize(
    ("arch", "millions"),
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_cifar_resnet_parameters_match_the_paper(arch: str, millions: float) -> None:
    # He et al. 2016, Table 6 (CIFAR-10): the single-exit network, backbone plus classifier.
    model = _model(arch, [BLOCKS_PER_ARCH[arch]])
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2 if millions < 1 else 1) == millions


def test_cifar_resnet_option_a_shortcut_subsamples_and_zero_pads() -> None:
    block = BACKBONES["resnet20"](in_channels=3, stem="cifar").blocks[3]  # stage 2's first
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    expected = torch.zeros(2, 32, 2, 2)
    expected[:, 8:24] = x[:, :, 0::2, 0::2]  # 8 zero channels either side, every other pixel
    assert torch.equal(block.downsample(x), expected)
    assert not list(block.downsample.parameters())


def test_exit_gflops_keeps_mode_and_bn_stats() -> None:
    model = _model("convnet")
    model.heads[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exit_gflops(model, INPUT["convnet"])
    assert model.training and not model.heads[0].training and model.heads[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_projection_heads_run_in_training_only_and_cost_no_anytime_flops() -> None:
    c, h, _ = INPUT["convnet"]
    cfg = ModelConfig(arch="convnet")
    plain = create_model(cfg, num_classes=NUM_CLASSES, in_channels=c, image_size=h)
    torch.manual_seed(0)
    model = create_model(
        cfg, num_classes=NUM_CLASSES, in_channels=c, image_size=h, projection_heads=True
    )
    out = model(_batch("convnet", batch=4))
    assert out.projections.shape == (3, 4, 64)  # exits 1..3, D = 64
    out.projections.square().sum().backward()
    for name, param in model.projectors.named_parameters():
        assert param.grad is not None and param.grad.any(), name
    assert any(key.startswith("projectors.2.") for key in model.state_dict())  # checkpointed
    assert model.eval()(_batch("convnet")).projections is None
    assert exit_gflops(model, INPUT["convnet"]) == exit_gflops(plain, INPUT["convnet"])


def test_weight_network_scores_every_teacher_per_sample_in_training_only() -> None:
    c, h, _ = INPUT["convnet"]
    cfg = ModelConfig(arch="convnet")
    plain = create_model(cfg, num_classes=NUM_CLASSES, in_channels=c, image_size=h)
    model = create_model(
        cfg, num_classes=NUM_CLASSES, in_channels=c, image_size=h, weight_network=True
    )
    out = model(_batch("convnet", batch=4))
    assert out.teacher_scores.shape == (4, 4, 4)  # [B, J, K]
    q = model.weight_network.query(out.features)  # [K, B, 8]
    k = model.weight_network.key(out.features)
    torch.testing.assert_close(out.teacher_scores[2, 1, 3], q[1, 2] @ k[3, 2])  # q_j . k_k
    out.teacher_scores.square().sum().backward()
    for name, param in model.weight_network.named_parameters():
        assert param.grad is not None and param.grad.any(), name
    assert {"weight_network.query.weight", "weight_network.key.weight"} <= set(model.state_dict())
    assert model.eval()(_batch("convnet")).teacher_scores is None
    assert exit_gflops(model, INPUT["convnet"]) == exit_gflops(plain, INPUT["convnet"])


@pytest.mark.parametrize("where", ["all at exit 1", "all at the last exit", "mixed"])
def test_early_exit_decides_as_the_full_network(where: str) -> None:
    """early_exit's answers equal exit_at_threshold on the whole network's logits, including
    the shortcuts where everyone, or no one, leaves at an exit."""
    model = _model("convnet").eval()
    x = _batch("convnet", 64)
    with torch.no_grad():
        confidence, predicted = model(x).logits.softmax(dim=-1).max(dim=-1)  # [K, N]
    threshold = {
        "all at exit 1": float(confidence[0].min()),
        "all at the last exit": 1.0,
        "mixed": float(confidence[:-1].median()),
    }[where]
    exits = exit_at_threshold(confidence, torch.tensor([threshold]))[0]
    decision = early_exit(model, x, threshold)
    torch.testing.assert_close(decision.exit_index, exits, rtol=0, atol=0)
    torch.testing.assert_close(decision.predicted, predicted.gather(0, exits[None])[0])
    torch.testing.assert_close(decision.confidence, confidence.gather(0, exits[None])[0])
    # the case the threshold was picked for
    exits_taken = set(exits.tolist())
    if where == "all at exit 1":
        assert exits_taken == {0}
    elif where == "all at the last exit":
        assert exits_taken == {model.num_exits - 1}
    else:
        assert len(exits_taken) > 2
