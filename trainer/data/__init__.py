"""Data sets and the device-resident input pipeline (docs/design.md §7).

:func:`load_splits` reads a whole data set once into uint8 tensors on the training device;
:class:`DeviceLoader` serves normalised float batches from them, shuffling with an on-device
permutation and augmenting whole batches at once (random crop with zero padding and
horizontal flip folded into one gather): no workers, no per-image PIL in the hot loop.
After airbench, https://github.com/KellerJordan/cifar10-airbench.

Splits. ``train`` is the official training set minus ``val``: a class-stratified
``dataset.val_fraction`` share drawn from the job seed alone, which the hyperparameter search
selects on. ``dataset.train_fraction`` < 1 then keeps a class-stratified share of ``train``,
also drawn from the seed alone; ``val`` is carved first, so it is the same for every
fraction, and smaller fractions give nested subsets. ``test`` is fixed for every seed: the
official test split (TinyImageNet: its labelled ``val`` folder, since the official test
images have no labels), for digits a fixed stratified 20 % of the 1797 images, for synthetic
a generated set of ``num_samples // 5``.

Data sets (``dataset.name``; paths below are under ``dataset.root``, ``~`` expanded):

============  ===============================================  ======  =================
name          on disk                                          pixels  mean/std
============  ===============================================  ======  =================
digits        bundled with scikit-learn (1 channel, 0..16      8       train split
              scaled to 0..255)
synthetic     generated from a fixed seed                      32 [*]  train split
cifar10       ``cifar-10-batches-py/`` (torchvision's)         32      standard constants
cifar100      ``cifar-100-python/`` (torchvision's)            32      standard constants
tinyimagenet  ``tiny-imagenet-200/`` (the official zip)        64 [*]  train split
imagefolder   ``root`` itself: ``train/<class>/<image>`` and   64 [*]  train split
              ``test/<class>/<image>`` (or ``val/``)
============  ===============================================  ======  =================

[*] ``dataset.image_size`` overrides it; decoded images are resized so the shorter side fits
and centre-cropped. 64 px keeps an imagefolder set small enough for device memory (10k
images: 120 MB); fine-grained work usually wants ``image_size: 224``. tinyimagenet and
imagefolder are decoded once per node into a memory-mapped cache (:mod:`trainer.images`);
later jobs map it instead of decoding.

Augmentation (training only): zero padding of ``DataSplits.pad = image_size // 8`` pixels
(4 for 32 px, 1 for 8 px digits, 8 for 64 px) with a random crop back to size, and a random
horizontal flip where ``DataSplits.flip`` says mirrored images keep their label: not for
digits, whose meaning flipping can change.

Modules: :mod:`~trainer.data.sources` (the data sets), :mod:`~trainer.data.tensors` (image
tensors, stratified splits, statistics), :mod:`~trainer.data.splits` (:func:`load_splits`),
:mod:`~trainer.data.loader` (:class:`DeviceLoader`) and :mod:`~trainer.data.errors`
(:class:`DataError`). The public names are importable from ``trainer.data``; all but
``DataError`` load their module (and torch) when first used, so catching ``DataError``
costs nothing at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer.data.errors import DataError

if TYPE_CHECKING:
    from trainer.data.loader import DeviceLoader
    from trainer.data.sources import check_available
    from trainer.data.splits import load_splits
    from trainer.data.tensors import DataSplits, ImageTensors

__all__ = [
    "DataError",
    "DataSplits",
    "DeviceLoader",
    "ImageTensors",
    "check_available",
    "load_splits",
]

_MODULE_OF = {
    "DataSplits": "trainer.data.tensors",
    "DeviceLoader": "trainer.data.loader",
    "ImageTensors": "trainer.data.tensors",
    "check_available": "trainer.data.sources",
    "load_splits": "trainer.data.splits",
}


def __getattr__(name: str) -> Any:
    """The torch-using names, imported on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
