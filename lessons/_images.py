"""Real images for the lessons that need a few: validation images exactly as train.py feeds them."""

from __future__ import annotations

import torch

import config
import data


def sample_images(dataset: str, count: int, img_size: int, data_dir: str = "data", seed: int = 0) -> torch.Tensor:
    """`count` validation images of `dataset`, exactly as train.py feeds them to a model (resized
    to img_size x img_size and normalised by its evaluation transform): the run configuration of
    `train.py --dataset DATASET --img-size IMG_SIZE`, and data.py's datasets.

    digits: scikit-learn's 8x8 handwritten digits (real data, bundled, nothing downloaded).
    Returns (count, channels, img_size, img_size); channels is 1 for digits, 3 otherwise.
    """
    cfg, _ = config.resolve({"dataset": dataset, "data_dir": str(data_dir), "img_size": img_size})
    _, val_set, _ = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    picked = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.stack([val_set[i][0] for i in picked])


def in_chans(dataset: str) -> int:
    """Colour channels of train.py's `dataset` (1 for digits, 3 for the others)."""
    return data.DATASETS[dataset].in_chans
