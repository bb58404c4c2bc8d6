"""Load a data set onto the training device and carve its validation split and training
subset."""

from __future__ import annotations

import torch

from trainer.config import DatasetConfig
from trainer.data.errors import DataError
from trainer.data.sources import SOURCES
from trainer.data.tensors import DataSplits, channel_stats, stratified_split

__all__ = ["load_splits"]


def load_splits(
    cfg: DatasetConfig, device: torch.device | str = "cpu", *, seed: int = 0
) -> DataSplits:
    """Load ``cfg.name`` onto `device`, carve the validation split and the training subset.

    Both draws depend on `seed` alone. The validation split comes first, from the whole
    training set, so it is the same for every ``cfg.train_fraction``; the subset is a
    class-stratified share of what remains (smaller fractions give nested subsets).
    Raises :class:`DataError` when the data set is missing (naming where it looked and how to
    get it), malformed, or too small for ``cfg.val_fraction`` or ``cfg.train_fraction``.
    """
    device = torch.device(device)
    source = SOURCES[cfg.name](cfg, device)
    train, val = source.train, None
    if cfg.val_fraction > 0:
        train, val = stratified_split(source.train, cfg.val_fraction, seed)
        if len(val) == 0 or len(train) == 0:
            raise DataError(
                f"dataset.val_fraction {cfg.val_fraction} leaves an empty split of the "
                f"{len(source.train)} {cfg.name} training images"
            )
    if cfg.train_fraction < 1:
        _, subset = stratified_split(train, cfg.train_fraction, seed)
        if subset.labels.unique().numel() < train.labels.unique().numel():
            raise DataError(
                f"dataset.train_fraction {cfg.train_fraction} leaves some classes without "
                f"images ({len(subset)} of {len(train)} {cfg.name} training images); raise it"
            )
        train = subset
    mean, std = source.stats or channel_stats(train.images)
    _, channels, height, width = train.images.shape
    assert height == width, "loaders produce square images"
    return DataSplits(
        train=train.to(device),
        val=None if val is None else val.to(device),
        test=source.test.to(device),
        num_classes=source.num_classes,
        in_channels=channels,
        image_size=height,
        mean=mean,
        std=std,
        flip=source.flip,
        pad=height // 8,
    )
