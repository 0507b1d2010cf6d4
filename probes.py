"""What a trained model uses: Tab. 6's test-time masks of content or position, measured.

    python probes.py runs/digits-convit_tiny                       # one of train.py's checkpoints
    python probes.py convit_tiny.pth --model convit_tiny --data-dir /path/to/imagenet --first 3 5 10

The paper (Tab. 6) takes a trained ConViT-Ti and, at test time only, forces sigma(lambda) to 1 in
the first K GPSA layers (every head attends by position alone: content masked) or to 0 (by content
alone: position masked). What the top-1 loses tells which term those layers *use*, even where
their gates barely moved in training. This module measures that; the model itself (convit.py) has
no mask in it: `masked_gates` sets lambda to +inf or -inf for the measurement, where the sigmoid is
exactly 1 or 0, and gives the learned lambda back after it.

Why exactly nothing of the masked term gets in: Eq. 7 mixes (1 - sigma) softmax(QK^T) + sigma P;
with sigma exactly 0.0 or 1.0, the masked matrix is multiplied by 0.0, and any finite number
times 0.0 is 0.0 (the fused path's torch.lerp at weight 1.0 returns its end point exactly too).
test_probes.py moves the masked weights at random and finds the output unchanged, bit for bit.

The command loads its checkpoint as plots.py --attention does (`model_and_data`): one of
train.py's, with its own data, or a released ConViT .pth with --model, and prints our top-1 for
each K beside the paper's ConViT-Ti numbers.

Contents: PAPER_TABLE6, model_and_data, mask_gates, masked_gates, top1, table6, format_table6, main.
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import checkpoints
import cli
import convit
import data

# Tab. 6 (ConViT-Ti on ImageNet, top-1 %): the first K of its 10 GPSA layers masked at test time.
PAPER_TABLE6 = {"none": 73.1, "content": {3: 62.3, 5: 35.0, 10: 1.3}, "position": {3: 63.5, 5: 53.1, 10: 46.8}}
MASKS = {"content": 1.0, "position": 0.0}  # what each mask forces sigma(lambda) to


def model_and_data(path: str, model_name: str | None, img_size: int | None, dataset: str | None
                   ) -> tuple[convit.ConViT, data.Data, data.DatasetSpec]:
    """The model in `path` and the data it reads: for one of train.py's checkpoints its own model
    and run's data settings; for a released file create_model(--model) at --img-size (224), whose
    images get ImageNet's preprocessing and come from --dataset (default imagefolder)."""
    checkpoint = checkpoints.read_checkpoint_file(path)  # weights_only: nothing in the file runs
    if "cfg" in checkpoint:
        typed = [flag for flag, value in (("--model", model_name), ("--img-size", img_size), ("--dataset", dataset))
                 if value is not None]
        if typed:
            raise ValueError(f"{' and '.join(typed)}: {path} is one of train.py's checkpoints, which knows its model "
                             f"and data; leave {'them' if len(typed) > 1 else 'it'} out")
        if not isinstance(checkpoint.get("args"), dict) or "dataset" not in checkpoint["args"]:
            raise ValueError(f"{path} holds no run settings ('args'), so the preprocessing of its images is unknown")
        args = checkpoint["args"]
        if args["dataset"] not in data.DATASETS:  # edited, or written by a newer version of this code
            raise ValueError(f"{path} was trained on --dataset {args['dataset']!r}, which this code does not know "
                             f"(it knows {', '.join(data.DATASETS)})")
        settings = data.Data(**{field.name: args[field.name] for field in dataclasses.fields(data.Data)
                                if field.name in args})
        return checkpoints.model_from_checkpoint(path), settings, data.DATASETS[settings.dataset]
    if model_name is None:
        raise ValueError(f"{path} is not one of train.py's checkpoints (it holds no model config): name its model, "
                         f"e.g. --model convit_tiny for a released convit_tiny.pth")
    model = checkpoints.load_checkpoint(convit.create_model(model_name, img_size=img_size or 224), path, verbose=False)
    settings = data.Data(dataset=dataset or "imagefolder", img_size=img_size or 224)
    return model, settings, data.DATASETS["imagefolder"]


@torch.no_grad()
def mask_gates(model: convit.ConViT, first: int, sigma: float) -> list[torch.Tensor]:
    """Tab. 6's mask: sigma(lambda) = `sigma` (1.0: content masked, 0.0: position masked) in every
    head of the first `first` GPSA layers, by setting lambda to +inf or -inf (sigmoid(+-inf) is
    exactly 1.0 or 0.0 in floating point). Returns the lambdas it replaced, for `masked_gates` to
    put back."""
    layers = model.gpsa_layers()
    if sigma not in (0.0, 1.0):
        raise ValueError(f"sigma(lambda) can be forced to 1 (content masked) or 0 (position masked), not {sigma!r}")
    if not 0 <= first <= len(layers):
        kind = f" ({model.cfg.attention.upper()} has no gate)" if model.cfg.attention != "gpsa" else ""
        raise ValueError(f"the first {first} GPSA layers: this model has {len(layers)}{kind}")
    saved = [layer.gating_param.detach().clone() for layer in layers[:first]]
    for layer in layers[:first]:
        layer.gating_param.fill_(float("inf") if sigma == 1.0 else float("-inf"))
    return saved


@contextmanager
def masked_gates(model: convit.ConViT, first: int, sigma: float):
    """`with masked_gates(model, 3, 1.0): ...` evaluates with content masked in GPSA layers 1-3,
    then gives the learned gates back, also when the evaluation fails."""
    saved = mask_gates(model, first, sigma)
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, gating_param in zip(model.gpsa_layers(), saved):
                layer.gating_param.copy_(gating_param)


@torch.no_grad()
def top1(model: convit.ConViT, dataset: Dataset, batch_size: int = 256, progress: bool = False) -> float:
    """Top-1 (percent) of `model` on `dataset`, on the model's device, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    hits = count = 0
    for images, labels in tqdm(DataLoader(dataset, batch_size), desc="top-1", leave=False, disable=not progress):
        hits += (model(images.to(device)).argmax(dim=1).cpu() == labels).sum().item()
        count += len(labels)
    return 100 * hits / count


def table6(model: convit.ConViT, dataset: Dataset, firsts: list[int], progress: bool = False) -> dict:
    """Tab. 6 of `model` on `dataset`: {"none": top-1, "content": {K: top-1}, "position": {K: top-1}},
    each mask on the first K GPSA layers, the learned gates everywhere else."""
    table = {"none": top1(model, dataset, progress=progress), "content": {}, "position": {}}
    for mask, sigma in MASKS.items():
        for first in firsts:
            with masked_gates(model, first, sigma):
                table[mask][first] = top1(model, dataset, progress=progress)
    return table


def format_table6(ours: dict, n_gpsa: int) -> str:
    """Our rows beside the paper's, as a Markdown table; the paper's K are of its 10 GPSA layers."""
    lines = [f"| mask | first K of our {n_gpsa} GPSA layers | ours top-1 | paper (ConViT-Ti, ImageNet), K of 10 |",
             "|---|---|---|---|", f"| none | - | {ours['none']:.1f} | {PAPER_TABLE6['none']} |"]
    for mask in MASKS:
        paper = ", ".join(f"K={k}: {v}" for k, v in PAPER_TABLE6[mask].items())
        for first, value in ours[mask].items():
            lines.append(f"| {mask} (sigma = {MASKS[mask]:g}) | {first} | {value:.1f} | {paper} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = cli.ArgumentParser(prog="python probes.py", description="Tab. 6: a checkpoint's top-1 with content "
                                "or position masked in its first K GPSA layers, beside the paper's.")
    parser.add_argument("checkpoint", help="one of train.py's checkpoints (or its run folder), or a released "
                        "ConViT .pth with --model")
    parser.add_argument("--model", choices=list(convit.MODEL_PRESETS), help="the model of a released .pth")
    parser.add_argument("--img-size", type=int, help="a released model's image size (default 224)")
    parser.add_argument("--dataset", choices=list(data.DATASETS), help="a released model's data (default "
                        "imagefolder, whose val/ is under --data-dir)")
    parser.add_argument("--data-dir", help="where the data is (default: the run's own --data-dir, or data)")
    parser.add_argument("--first", type=int, nargs="+", metavar="K", help="the K to mask (default: 1 to the "
                        "number of GPSA layers; the paper's are 3 5 10)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    path = checkpoints.find_checkpoint(args.checkpoint, "checkpoint")
    model, settings, _ = model_and_data(path, args.model, args.img_size, args.dataset)
    n_gpsa = len(model.gpsa_layers())
    if n_gpsa == 0:
        raise ValueError(f"{path} has no GPSA layer, so no gate to force (DeiT, PSA or --local-up-to-layer 0)")
    firsts = args.first or list(range(1, n_gpsa + 1))
    outside = [k for k in firsts if not 1 <= k <= n_gpsa]
    if outside:
        raise ValueError(f"--first {' '.join(map(str, outside))}: this model has {n_gpsa} GPSA layers, 1 to {n_gpsa}")
    if args.data_dir is not None:
        settings = dataclasses.replace(settings, data_dir=args.data_dir)
    model = model.to(cli.torch_device(args.device))
    table = table6(model, data.validation_set(settings), firsts, progress=sys.stderr.isatty())
    print(f"{path} on {settings.dataset} (validation set), Tab. 6:\n{format_table6(table, n_gpsa)}")
    return table


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
