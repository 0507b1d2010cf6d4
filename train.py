"""Train and evaluate ConViT (and DeiT) with DeiT's recipe: on a CPU, one GPU or many.

    python train.py                                       # CPU, offline, ~3 min: a small ConViT on the digits
    python train.py --dataset mnist10k                    # 10,000 real MNIST digits, shipped in data/
    python train.py --dataset cifar10 --data-dir data     # CIFAR-10 from scratch (downloaded when missing)
    torchrun --nproc_per_node=8 train.py --dataset imagefolder --data-dir /path/to/imagenet --model convit_small
    python train.py --resume runs/digits-convit_tiny      # continue that run exactly as it was started
    python train.py --overwrite                           # or replace it with a new run
    python train.py --eval-only --checkpoint runs/digits-convit_tiny
    python plots.py runs/digits-convit_tiny               # (re)draw the run's own Fig. 5/6, figure.png

The README has the commands of Tables 2 and 3 and of Fig. 8. docs/runs.md says what a run folder
(--output-dir) holds: checkpoint.pth, metrics.jsonl (one JSON line per evaluated epoch: loss, lr,
top-1, top-5, images/s and, per layer and head, sigma(lambda) and the nonlocality of Eq. 8) and
figure.png; when a folder is refused, and what --resume keeps.

Every flag left unset takes its value from the dataset (image and patch size) and from the
recipe, --preset paper (DeiT's) or --preset small (for datasets of a few thousand small images);
`python train.py --help` lists both values of each flag, and which datasets default to which.

Contents, in file order: presets (recipes) -> command line (and --resume's flags) -> model,
optimiser, schedule -> processes -> evaluation -> setting up a run -> the training loop (`train`)
-> `evaluate_only`, `main` and the command-line entry `cli`. The data side of the recipe is
data.py; the run folder, its lock and the checkpoint files are runs.py; the figure is plots.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import augment
import convit
import data
import runs


class TrainError(ValueError):
    """A problem with the user's input or run, reported as `error: <message>` and exit code 2.
    A ValueError, like convit's and data.py's, so that one `except ValueError` catches them all."""


# ---------------------------------------------------------------------------------------
# Presets: the two recipes (what each dataset looks like is data.DATASETS)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The knobs with a preset value. Each one but head_width is also a flag of the same name."""

    epochs: int
    batch_size: int  # per process
    base_lr: float  # lr = base_lr * (batch_size * processes) / 512, as in DeiT
    warmup_epochs: int  # linear warmup from warmup_lr to lr ...
    warmup_lr: float
    min_lr: float  # ... then a cosine down to min_lr
    weight_decay: float  # AdamW; never on biases, norms, pos_embed, cls_token or gates
    smoothing: float  # label smoothing
    mixup: float  # alpha of MixUp's Beta(alpha, alpha); 0 = off
    cutmix: float  # alpha of CutMix; with both on, each batch picks one (probability 0.5)
    randaug_ops: int  # RandAugment: operations per image, each applied with probability 0.5 (0 = off) ...
    randaug_magnitude: float  # ... their strength on timm's scale of 0 to 10 (rotate: +-3 x this, in degrees) ...
    randaug_magnitude_std: float  # ... plus Gaussian noise of this std, drawn for every op (augment.rand_augment)
    color_jitter: float  # brightness, contrast and saturation jitter (0 = off; inert in DeiT, see data.py)
    crop_scale: float  # RandomResizedCrop keeps between crop_scale and all of the image's area
    reprob: float  # RandomErasing probability
    repeated_aug: int  # repeated augmentation: each image this many times per epoch (1 = off)
    drop_path: float  # stochastic depth of the last block
    ema_decay: float  # weight EMA decay per step (used with --ema)
    depth: int  # transformer blocks; a ConViT makes all but the last two GPSA
    head_width: int | None  # C / H; None keeps the model's own width
    threads: int | None  # CPU threads per process; None leaves torch's choice


RECIPES: dict[str, Recipe] = {
    # DeiT's recipe as paper.md gives it ("+" models use base_lr 4e-4, see resolve_args).
    "paper": Recipe(
        epochs=300, batch_size=64, base_lr=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
        weight_decay=0.05, smoothing=0.1, mixup=0.8, cutmix=1.0, randaug_ops=2, randaug_magnitude=9,
        randaug_magnitude_std=0.5, color_jitter=0.0, crop_scale=0.08, reprob=0.25, repeated_aug=3, drop_path=0.1,
        ema_decay=0.99996, depth=12, head_width=None, threads=None,
    ),
    # For a dataset of a few thousand small images and a few CPU minutes: a 6-block model,
    # 24 dims per head, a short schedule, more steps (batch 32) at a larger lr (1e-3 at batch 32),
    # and gentler augmentation: no MixUp/CutMix, milder crops (16x16 digits do not survive the
    # paper's) and RandAugment at 1.7 of timm's 10, each op still a coin flip with a noisy magnitude.
    # One CPU thread: matrices this small gain nothing from a second, which stalls them whenever
    # another program is busy (docs/speed.md).
    "small": Recipe(
        epochs=50, batch_size=32, base_lr=1.6e-2, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
        weight_decay=0.05, smoothing=0.1, mixup=0.0, cutmix=0.0, randaug_ops=2, randaug_magnitude=1.7,
        randaug_magnitude_std=0.5, color_jitter=0.0, crop_scale=0.5, reprob=0.0, repeated_aug=1, drop_path=0.0,
        ema_decay=0.999, depth=6, head_width=24, threads=1,
    ),
}


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would print the usage and call sys.exit(2); main() must never exit the
        # interpreter (lessons call it in-process), so the problem travels as a TrainError.
        raise TrainError(f"{message} (see python train.py --help)")


def datasets_of(preset: str) -> str:
    return ", ".join(name for name, spec in data.DATASETS.items() if spec.preset == preset)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train or evaluate ConViT / DeiT (see the commands at the top of train.py; "
                                   "docs/runs.md: the run folder, --resume and --overwrite).")

    def preset(group, name: str, text: str, kind=float):
        """A recipe flag: left unset, it takes the preset's value (shown in --help)."""
        values = ", ".join(f"{r}: {getattr(RECIPES[r], name.replace('-', '_'))}" for r in RECIPES)
        group.add_argument(f"--{name}", type=kind, default=None, help=f"{text} [{values}]")

    data_flags = p.add_argument_group("data")
    data_flags.add_argument("--dataset", choices=list(data.DATASETS), default="digits")
    data_flags.add_argument("--data-dir", default="data",
                            help="where cifar is (or goes), or the root holding train/ and val/; an image that "
                                 "cannot be read stops the run with an error naming the file (mnist10k: read from "
                                 "here if it holds mnist10k.npz, else from the repository's data/)")
    data_flags.add_argument("--num-classes-subset", type=int, default=None, metavar="K",
                      help="imagefolder: keep only the first K classes in sorted order (the paper: 100)")
    data_flags.add_argument("--data-fraction", type=float, default=1.0, metavar="F",
                      help="keep a seeded, stratified fraction F in (0, 1] of each training class (Table 2)")
    data_flags.add_argument("--scale-epochs", action="store_true",
                      help="multiply the epochs by 1/F, so that a fraction sees as many steps (Table 2); the "
                           "warmup keeps its epochs, as in the released code (so it spans F times the steps)")
    data_flags.add_argument("--workers", type=int, default=None,
                      help="data-loading processes, 0 or more (default: 0 on a CPU, up to 8 per GPU)")

    model = p.add_argument_group("model (defaults: the --model preset, shrunk by --preset small)")
    model.add_argument("--model", default="convit_tiny", choices=list(convit.MODEL_PRESETS))
    model.add_argument("--img-size", type=int, default=None,
                       help="default: the dataset's (digits 16, mnist10k 28, cifar 32, imagefolder 224)")
    model.add_argument("--patch-size", type=int, default=None,
                       help="default: the dataset's (digits 4, mnist10k 4, cifar 4, imagefolder 16)")
    model.add_argument("--embed-dim", type=int, default=None, help="C")
    model.add_argument("--depth", type=int, default=None)
    model.add_argument("--num-heads", type=int, default=None,
                       help="H; without --embed-dim, --preset small keeps 24 dims per head, so C = 24 H")

    ablation = p.add_argument_group("the paper's ablations (Table 3, Fig. 8)")
    ablation.add_argument("--local-up-to-layer", type=int, default=None,
                          help="number of GPSA blocks (default: all but the last two for a ConViT); 0 = the "
                               "same-size baseline, a ConViT with no GPSA (DeiT's own network is --model deit_*)")
    ablation.add_argument("--locality-strength", type=float, default=1.0, help="alpha of Eq. 5")
    ablation.add_argument("--no-conv-init", action="store_true",
                          help="Table 3 'conv init: no': GPSA starts random instead of as a convolution (Eq. 5)")
    ablation.add_argument("--freeze-gates", action="store_true",
                          help="Table 3 'train gating: no': every gate lambda is set to 0 (sigma = 0.5: content "
                               "and position weigh the same) and never trained")
    ablation.add_argument("--freeze-gpsa", action="store_true",
                          help="Table 3 'train GPSA: no': the whole attention of every GPSA block (W_qry, W_key, "
                               "W_val, W_out, v_pos and the gates) keeps its init; the FFNs, norms and the rest train")
    ablation.add_argument("--no-pos-embed", action="store_true", help="no absolute position embedding")

    recipe = p.add_argument_group("recipe (unset flags take the --preset's value)")
    recipe.add_argument("--preset", choices=list(RECIPES), default=None,
                        help="paper = DeiT's recipe, the default for " + datasets_of("paper") + "; small = for "
                             "datasets of a few thousand small images, the default for " + datasets_of("small"))
    preset(recipe, "epochs", "epochs", int)
    preset(recipe, "batch-size", "images per process and step", int)
    preset(recipe, "base-lr", "lr per 512 images of the global batch")
    recipe.add_argument("--lr", type=float, default=None, help="absolute peak lr (default: base-lr * global batch / 512)")
    preset(recipe, "warmup-epochs", "linear warmup epochs", int)
    preset(recipe, "warmup-lr", "lr at the start of the warmup")
    preset(recipe, "min-lr", "lr at the end of the cosine")
    preset(recipe, "weight-decay", "AdamW weight decay")
    preset(recipe, "smoothing", "label smoothing")
    preset(recipe, "mixup", "MixUp alpha (0 = off)")
    preset(recipe, "cutmix", "CutMix alpha (0 = off)")
    preset(recipe, "randaug-ops", "RandAugment operations per image, each applied with probability 0.5 (0 = off)", int)
    preset(recipe, "randaug-magnitude", "RandAugment magnitude on timm's scale of 0-10, as in DeiT's rand-m9 "
                                        "(9: rotate +-27 degrees, brightness x (1 +- 0.81)); data.py lists what "
                                        "still differs from timm")
    preset(recipe, "randaug-magnitude-std", "std of the Gaussian noise on the magnitude, drawn for every op "
                                            "(timm's mstd; 0 = none)")
    preset(recipe, "color-jitter", "colour jitter strength (0 = off; in DeiT's recipe 0.4 was inert: timm adds "
                                   "no ColorJitter when RandAugment is on)")
    preset(recipe, "crop-scale", "smallest area kept by RandomResizedCrop")
    preset(recipe, "reprob", "RandomErasing probability")
    preset(recipe, "repeated-aug", "repeated augmentation: copies of each image per epoch", int)
    preset(recipe, "drop-path", "stochastic depth rate")
    preset(recipe, "ema-decay", "EMA decay per step")
    # TEMP(issue25): experiment knobs
    recipe.add_argument("--randaug-op-names", default=None, help="TEMP: comma list of RandAugment ops, or all")
    recipe.add_argument("--aug-fill", type=float, default=None, help="TEMP: fill level 0-255 (default: mean colour)")
    recipe.add_argument("--crop-outside", choices=["fill", "border"], default=None, help="TEMP")
    recipe.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (default: the dataset's)")
    recipe.add_argument("--ema", action="store_true",
                        help="keep an exponential moving average of the weights and evaluate it too")
    recipe.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")

    run = p.add_argument_group("speed, checkpoints, logging")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                     help="mixed precision (autocast): on by default on a GPU, off by default on a CPU, "
                          "where --amp runs bf16 autocast")
    run.add_argument("--amp-dtype", choices=["bf16", "fp16"], default=None,
                     help="autocast dtype (implies --amp): bf16 (default where the device has it) or fp16, "
                          "which trains with a gradient scaler")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    preset(run, "threads", "CPU threads per process (0 or None: torch's choice)", int)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default=None,
                     help="the run folder: checkpoint.pth, metrics.jsonl and figure.png, the run's own Fig. 5/6, "
                          "drawn when it ends (python plots.py DIR redraws it). Default: runs/<dataset>-<model>; "
                          "with --resume, the folder of the checkpoint. A folder that holds another run is "
                          "refused (continue it with --resume, or replace it with --overwrite), and so is a folder "
                          "that another train.py is writing")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --output-dir: its checkpoint, metrics and figure are removed once this "
                          "run has its data and model, just before its first epoch")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="continue one of our checkpoints (or a run folder holding checkpoint.pth) exactly as the run "
                          "was started: every flag comes from the checkpoint. A flag typed now may change where and "
                          "how it runs (--output-dir, --device, --workers, --threads, --amp, --stop-after ...), and "
                          "--epochs may grow (the rest of the cosine is re-fitted); any other flag must be its own")
    run.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                     help="stop once this many epochs (at least 1) are done, the schedule still spanning --epochs "
                          "(for jobs with a time limit: continue later with --resume)")
    run.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS",
                     help="evaluate, log to metrics.jsonl and save the checkpoint every this many epochs and after "
                          "the last (default 1; with --scale-epochs 1/F: the same steps apart at every fraction)")
    run.add_argument("--eval-only", action="store_true", help="only report top-1 / top-5 of --checkpoint")
    run.add_argument("--mask-pos-embed", action="store_true",
                     help="with --eval-only: evaluate without the absolute position embedding (Table 5: ConViT's "
                          "GPSA keeps its sense of position through r_ij, DeiT has no other)")
    run.add_argument("--checkpoint", default=None, metavar="PATH",
                     help="weights to evaluate (--eval-only) or to start from: one of ours or a released ConViT "
                          "or DeiT .pth, with the matching --model (read with weights_only=True: a file that needs "
                          "anything but tensors and plain data is refused)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    run.add_argument("--quiet", action="store_true", help="print only the final result line (and errors)")
    run.add_argument("--no-figure", action="store_true",
                     help="draw no figure.png at the end (python plots.py RUN_DIR draws it from metrics.jsonl later)")
    return p


# The values each numeric flag may take, as an interval; NaN and inf are refused everywhere.
FLAG_RANGES = {
    "data_fraction": "(0, 1]", "num_classes_subset": "[1, inf)", "workers": "[0, inf)",
    "img_size": "[1, inf)", "patch_size": "[1, inf)", "embed_dim": "[1, inf)", "depth": "[1, inf)",
    "num_heads": "[1, inf)", "local_up_to_layer": "[0, inf)", "locality_strength": "[0, inf)",
    "epochs": "[1, inf)", "batch_size": "[1, inf)", "base_lr": "(0, inf)", "lr": "(0, inf)",
    "warmup_epochs": "[0, inf)", "warmup_lr": "(0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)",
    "smoothing": "[0, 1)", "mixup": "[0, inf)", "cutmix": "[0, inf)", "randaug_ops": "[0, inf)",
    "randaug_magnitude": "[0, 10]", "randaug_magnitude_std": "[0, inf)", "color_jitter": "[0, inf)", "crop_scale": "(0, 1]", "reprob": "[0, 1]",
    "repeated_aug": "[1, inf)", "drop_path": "[0, 1)", "ema_decay": "[0, 1]", "hflip": "[0, 1]",
    "clip_grad": "(0, inf)", "threads": "[0, inf)", "stop_after": "[1, inf)", "eval_every": "[1, inf)",
}


def check_range(name: str, value, interval: str):
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low or (interval[0] == "[" and value == low)
    below = value < high or (interval[-1] == "]" and value == high)
    if not (math.isfinite(value) and above and below):
        rule = (f"lie in {interval}" if high < math.inf else
                f"be at least {low:g}" if interval.startswith("[") else f"be greater than {low:g}")
        raise TrainError(f"--{name.replace('_', '-')} must {rule}, got {value}")


def check_table3_switches(args):
    """Table 3's switches act on GPSA blocks: DeiT's own network (--model deit_*) has none to add
    or to switch, nor has a ConViT with --local-up-to-layer 0 (the same-size baseline)."""
    is_deit = convit.MODEL_PRESETS[args.model].get("class_token_in_pos_embed", False)
    if is_deit and args.local_up_to_layer:
        raise TrainError(f"--local-up-to-layer {args.local_up_to_layer}: {args.model} is DeiT's own network, which "
                         f"has no GPSA block; for a ConViT of its size use --model convit_{args.model[5:]} --num-heads "
                         f"{convit.MODEL_PRESETS[args.model]['num_heads']}")
    switches = [flag for flag, on in (("--freeze-gates", args.freeze_gates), ("--freeze-gpsa", args.freeze_gpsa),
                                      ("--no-conv-init", args.no_conv_init)) if on]
    if switches and (is_deit or args.local_up_to_layer == 0):
        raise TrainError(f"{' '.join(switches)} act(s) on GPSA blocks, and this model has none "
                         f"(Table 3's row e, DeiT, is --model deit_* with no switch)")


def fill_unset(args: argparse.Namespace):
    """Every flag left unset takes the dataset's value or the recipe's."""
    spec = data.DATASETS[args.dataset]
    args.preset = args.preset or spec.preset
    if args.base_lr is None and args.preset == "paper" and args.model.endswith("_plus"):
        args.base_lr = 4e-4  # paper.md: the "+" models train at 4e-4 per 512 images
    for name, value in dataclasses.asdict(RECIPES[args.preset]).items():
        if getattr(args, name, None) is None:  # head_width has no flag: --embed-dim sets the width
            setattr(args, name, value)
    args.img_size = spec.img_size if args.img_size is None else args.img_size
    args.patch_size = spec.patch_size if args.patch_size is None else args.patch_size
    args.hflip = spec.hflip if args.hflip is None else args.hflip
    if args.eval_every is None:  # evaluating a 5% run 20 times as often as a full one would cost more than training it
        args.eval_every = max(1, round(1 / args.data_fraction)) if args.scale_epochs else 1


def check_flags(args: argparse.Namespace):
    """Values that no run can use: one TrainError naming the flag and the problem."""
    for name, interval in FLAG_RANGES.items():
        if getattr(args, name, None) is not None:
            check_range(name, getattr(args, name), interval)
    if args.mask_pos_embed and not args.eval_only:
        raise TrainError("--mask-pos-embed masks the position embedding at test time: use it with --eval-only")
    if args.eval_only and not args.checkpoint:
        raise TrainError("--eval-only needs --checkpoint PATH (one of our checkpoints or a released ConViT .pth)")
    if args.num_classes_subset is not None and args.dataset != "imagefolder":
        raise TrainError(f"--num-classes-subset keeps the first K classes of an image folder (--dataset imagefolder); "
                         f"--dataset {args.dataset} always trains all its classes")
    if args.output_dir == "":
        raise TrainError("--output-dir is empty: name a folder (or leave the flag out for runs/<dataset>-<model>)")
    check_table3_switches(args)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags of a new run: fill every unset flag from the dataset and the recipe, and check the values."""
    fill_unset(args)
    check_flags(args)
    args.resume = runs.find_checkpoint(args.resume, "--resume")
    args.checkpoint = runs.find_checkpoint(args.checkpoint, "--checkpoint")
    if args.output_dir is None:
        args.output_dir = str(Path(args.resume).parent) if args.resume else f"runs/{args.dataset}-{args.model}"
    if args.scale_epochs:  # the warmup is not scaled: the released code leaves it at its 5 epochs
        args.epochs = round(args.epochs / args.data_fraction)
    if args.warmup_epochs > args.epochs // 2:
        # A warmup as long as the run would hold the lr at --warmup-lr throughout (`--epochs 1` would
        # train at 1e-6): it may take at most half of the epochs.
        if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
            print(f"note: --warmup-epochs {args.warmup_epochs} capped to {args.epochs // 2}, half of the "
                  f"{args.epochs} epochs, so that the lr reaches its peak", flush=True)
        args.warmup_epochs = args.epochs // 2
    return args


# A resumed run is the run as it was started: every flag takes the value its checkpoint stores,
# except those typed now. These say how one command runs, not what the run is, so they are never
# taken from the checkpoint (its --stop-after 2 would stop the run again at once).
INVOCATION_FLAGS = {"resume", "stop_after", "eval_only", "mask_pos_embed", "checkpoint", "output_dir", "overwrite", "quiet",
                    "no_progress", "no_figure", "compile"}
# Typed with --resume, these may differ from the checkpoint's: they change where and how the run
# executes, not what it computes (--checkpoint gave starting weights that the resumed ones replace;
# --data-dir may move). --epochs may grow; any other typed flag must equal the run's own value.
RUN_ONLY_FLAGS = INVOCATION_FLAGS | {"workers", "threads", "device", "amp", "amp_dtype", "data_dir", "eval_every"}


def typed_flags(argv: list[str] | None) -> set[str]:
    """The flags the user typed (their argparse dests), told apart from the defaults by parsing
    once more with every default suppressed: a flag not typed then leaves no attribute at all."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resume_args(args: argparse.Namespace, typed: set[str]) -> tuple[argparse.Namespace, dict]:
    """--resume: the flags of the run as it was started (stored in its checkpoint), with the
    flags typed now on top where RUN_ONLY_FLAGS allows it; returns them and the checkpoint."""
    path = runs.find_checkpoint(args.resume, "--resume")
    checkpoint = runs.read_resumable(path)
    started = checkpoint["args"]  # resolved when the run began: scaled epochs, capped warmup, absolute lr
    kept = {key: value for key, value in started.items() if key not in typed and key not in INVOCATION_FLAGS}
    resumed = argparse.Namespace(**{**vars(args), **kept, "resume": path})
    # A typed value means what it meant when the run began: resolve it as the start did.
    if "epochs" in typed and started.get("scale_epochs"):
        resumed.epochs = round(args.epochs / started["data_fraction"])
    if "warmup_epochs" in typed:
        resumed.warmup_epochs = min(args.warmup_epochs, started["epochs"] // 2)
    if args.output_dir is None:
        resumed.output_dir = str(Path(path).parent)
    fill_unset(resumed)  # a flag newer than the checkpoint
    check_flags(resumed)
    resumed.checkpoint = runs.find_checkpoint(resumed.checkpoint, "--checkpoint")

    if resumed.epochs < started["epochs"]:
        raise TrainError(f"--resume {path}: --epochs {resumed.epochs} is fewer than the {started['epochs']} the run "
                         f"was planned for ({checkpoint['epoch']} done); to end it early, pass --stop-after instead")
    changed = [f"--{key.replace('_', '-')} {getattr(resumed, key)} (checkpoint: {started[key]})" for key in vars(args)
               if key in typed and key in started and key not in RUN_ONLY_FLAGS | {"epochs"}
               and getattr(resumed, key) != started[key]]
    if changed:
        raise TrainError(f"--resume {path}: these flags differ from the run that wrote it: {', '.join(changed)}. "
                         f"A resumed run keeps its own flags: leave these out. Only --epochs may grow, and where and "
                         f"how it runs may change (--output-dir, --device, --workers, --threads ...)")
    return resumed, checkpoint


def parse_flags(argv: list[str] | None) -> tuple[argparse.Namespace, dict | None]:
    """The flags of this command, and with --resume the checkpoint it continues (else None)."""
    args = build_parser().parse_args(argv)
    if args.resume is None or args.eval_only:
        return resolve_args(args), None
    return resume_args(args, typed_flags(argv))


# ---------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------
def gpsa_blocks(args) -> int:
    """--local-up-to-layer, or by default: a ConViT makes all blocks GPSA but the last two (10 of
    12 in the paper); DeiT none."""
    if args.local_up_to_layer is not None:
        return args.local_up_to_layer
    return max(args.depth - 2, 1) if convit.MODEL_PRESETS[args.model]["local_up_to_layer"] > 0 else 0


def build_model(args, num_classes: int) -> convit.ConViT:
    """The --model preset, resized by the flags and the recipe, with Table 3's switches applied."""
    preset = convit.MODEL_PRESETS[args.model]
    num_heads = args.num_heads or preset["num_heads"]
    width = args.embed_dim or (num_heads * args.head_width if args.head_width else preset["embed_dim"])
    depth = args.depth
    model = convit.create_model(
        args.model, img_size=args.img_size, patch_size=args.patch_size, in_chans=data.DATASETS[args.dataset].in_chans,
        num_classes=num_classes, embed_dim=width, depth=depth, num_heads=num_heads,
        local_up_to_layer=gpsa_blocks(args), locality_strength=args.locality_strength,
        use_local_init=not args.no_conv_init, use_pos_embed=not args.no_pos_embed, drop_path_rate=args.drop_path,
    )
    return freeze_for_table3(model, args)


def freeze_for_table3(model: convit.ConViT, args) -> convit.ConViT:
    """Table 3's "train GPSA: no" and "train gating: no" (its footnote: gates frozen at lambda = 0).
    Frozen parameters keep requires_grad=False, so parameter_groups leaves them out of the optimiser."""
    for layer in model.gpsa_layers():
        if args.freeze_gpsa:  # W_qry, W_key (qk), W_val (v), W_out (proj), v_pos (pos_proj) and lambda
            layer.requires_grad_(False)
        if args.freeze_gates:  # sigma(0) = 0.5: content and positional attention mixed half and half
            with torch.no_grad():
                layer.gating_param.zero_()
            layer.gating_param.requires_grad_(False)
    return model


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """DeiT's weight decay: none on 1-D tensors (biases, LayerNorm weights, and the gates
    lambda_h, which are (H,)), nor on pos_embed and cls_token. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_schedule(optimizer, args) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, as in DeiT: linear warmup from warmup_lr, then cosine to min_lr."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(args.epochs - args.warmup_epochs, 1), eta_min=args.min_lr)
    if args.warmup_epochs == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=min(args.warmup_lr / args.lr, 1.0), total_iters=args.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[args.warmup_epochs])


def refit_cosine(scheduler, args):
    """Stretch the cosine of a resumed run whose --epochs grew.

    torch's CosineAnnealingLR steps recursively: each step multiplies (lr - min_lr) by
    (1 + cos(pi t / T)) / (1 + cos(pi (t - 1) / T)). The product telescopes, so once T is the
    new length the lr falls smoothly from where it is now to min_lr exactly at the new last
    epoch (a cosine that had already ended stays at min_lr). Kept at the old T, the lr would
    rise again after the old last epoch: the cosine is periodic."""
    cosine = scheduler._schedulers[-1] if isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR) else scheduler
    cosine.T_max = max(args.epochs - args.warmup_epochs, 1)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with a gradient scaler"}


def mixed_precision(device: torch.device, amp: bool | None, amp_dtype: str | None) -> torch.dtype | None:
    """The autocast dtype of the run, or None for fp32.

    Autocast is on by default on a GPU and off by default on a CPU: there it is opt-in (--amp),
    because fp32 keeps the CPU runs comparable with the figures we report, and whether bf16 is
    faster depends on the CPU and the model's size (docs/speed.md). --amp runs the very same loop in bf16 on a CPU,
    which is how the tests prove the GPU's mixed-precision path without a GPU. bf16 needs no
    gradient scaler (it has fp32's exponent range); fp16 does (train() turns it on)."""
    if amp is False:
        if amp_dtype is not None:
            raise TrainError(f"--amp-dtype {amp_dtype} contradicts --no-amp")
        return None
    if amp is None and amp_dtype is None and device.type != "cuda":
        return None
    cuda_without_bf16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    if amp_dtype == "bf16" and cuda_without_bf16:
        raise TrainError("--amp-dtype bf16: this GPU has no bf16 support; use --amp-dtype fp16")
    return AMP_DTYPES[amp_dtype or ("fp16" if cuda_without_bf16 else "bf16")]


# ---------------------------------------------------------------------------------------
# Processes: one, or one per GPU under torchrun
# ---------------------------------------------------------------------------------------
@dataclass
class Processes:
    rank: int  # this process, 0 .. world - 1; rank 0 logs and saves
    world: int  # number of processes
    device: torch.device
    started_group: bool  # whether we created the process group (and so must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start_processes(device_flag: str) -> Processes:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = convit.torch_device(device_flag, "--device")  # a ValueError for a typo or a missing GPU
    use_cuda = chosen.type == "cuda"
    if world == 1:
        return Processes(0, 1, chosen, started_group=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if use_cuda else "gloo")  # gloo: CPU processes
    return Processes(dist.get_rank(), world, device, started_group=started)


def global_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.distributed:
        dist.all_reduce(values)
    return values


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, procs: Processes, amp_dtype, show_progress: bool) -> dict:
    """Loss, top-1 and top-5 (in percent) over the validation set; each process takes a
    disjoint shard and the sums are added across processes, so the figures are exact."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=procs.device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        images, labels = images.to(procs.device, non_blocking=True), labels.to(procs.device, non_blocking=True)
        with torch.autocast(procs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()  # (B, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]  # (B, 5)
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(len(labels), device=procs.device)]).double()
    loss, top1, top5, count = global_sum(totals, procs).tolist()
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


NONLOCALITY_IMAGES = 64  # validation images on which every evaluation measures Eq. 8


def nonlocality_images(val_set: Dataset) -> torch.Tensor:
    """The first NONLOCALITY_IMAGES validation images, (B, C, H, W): every evaluation measures the
    nonlocality on the same ones, so that its curve moves with the model only."""
    return torch.stack([val_set[i][0] for i in range(min(NONLOCALITY_IMAGES, len(val_set)))])


def what_the_paper_plots(model: convit.ConViT, fixed_batch: torch.Tensor) -> dict:
    """sigma(lambda) of each GPSA layer and head (Fig. 5) and the nonlocality of Eq. 8 of
    every block and head (Fig. 6), measured on the nonlocality_images."""
    model.eval()
    plots = {"nonlocality": [[round(x, 4) for x in row] for row in model.nonlocality(fixed_batch).tolist()]}
    if model.gpsa_layers():
        plots["gates"] = [[round(x, 4) for x in row] for row in model.gates().tolist()]
    return plots


def gates_per_layer(gates: list[list[float]]) -> str:
    """The log's summary of Fig. 5: sigma(lambda) of each GPSA layer, the mean of its heads."""
    return "sigma(lambda) per GPSA layer " + " ".join(f"{sum(row) / len(row):.2f}" for row in gates)


# ---------------------------------------------------------------------------------------
# Setting up a run
# ---------------------------------------------------------------------------------------
def make_loaders(args, procs: Processes, train_set: Dataset, val_set: Dataset):
    """The training loader (sharded, reshuffled every epoch, whole batches only) and the
    validation loader (a disjoint shard per process, nothing padded, so the figures are exact)."""
    # Workers: none on a CPU, where the model needs every core; on GPUs, a share of the node's cores.
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = args.workers if args.workers is not None else (
        min(8, (os.cpu_count() or 1) // processes_here) if procs.device.type == "cuda" else 0)
    options = dict(num_workers=workers, pin_memory=procs.device.type == "cuda")
    sampler = data.RepeatedAugmentationSampler(train_set, args.repeated_aug, procs.world, procs.rank, args.seed)
    # This generator seeds the workers' augmentations; its state goes into every checkpoint.
    generator = torch.Generator().manual_seed(args.seed + procs.rank)
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, generator=generator, **options)
    val_shard = Subset(val_set, range(procs.rank, len(val_set), procs.world))
    # The validation loader has a generator of its own, so that evaluating draws nothing from the global RNG.
    val_loader = DataLoader(val_shard, 2 * args.batch_size, generator=torch.Generator(), **options)
    return sampler, generator, train_loader, val_loader


@dataclass
class TrainingState:
    """What a checkpoint holds besides the flags, the epoch and the random states, and what
    --resume restores."""

    model: convit.ConViT  # unwrapped: its state_dict keys are those of convit.py, under DDP and compile alike
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    loader_generator: torch.Generator  # seeds the data-loading workers' augmentations

    def checkpoint(self, epoch: int, args, rng: list[dict], record: dict) -> dict:
        return {"cfg": dataclasses.asdict(self.model.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": epoch, "rng": rng, "args": vars(args), "metrics": record}


def resume(checkpoint: dict, args, state: TrainingState, procs: Processes, log) -> int:
    """Restore everything the run depends on from its --resume checkpoint (resume_args read it);
    return the number of epochs done."""
    runs.check_same_model(checkpoint, state.model, args.resume)
    try:
        state.model.load_state_dict(checkpoint["model"])
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.scaler.load_state_dict(checkpoint["scaler"])
        if state.ema is not None and checkpoint.get("ema") is not None:
            state.ema.load_state_dict(checkpoint["ema"])
        runs.restore_rng_states(checkpoint["rng"], state.loader_generator, procs)
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as err:  # a damaged or hand-edited file
        raise TrainError(f"{args.resume} does not restore this run ({type(err).__name__}: {err})".splitlines()[0]) from None
    planned = checkpoint["args"]["epochs"]
    if args.epochs != planned:  # resume_args allows growth only
        refit_cosine(state.scheduler, args)
        log(f"note: --epochs grew from {planned} to {args.epochs}: the rest of the cosine is re-fitted, from the lr "
            f"where epoch {checkpoint['epoch']} ended down to --min-lr {args.min_lr:g} at epoch {args.epochs}")
    return checkpoint["epoch"]


def check_training_set(args, train_set: Dataset, num_classes: int, global_batch: int):
    """A training set too small to train on, blamed on the flag that made it so."""
    full = len(train_set.dataset) if isinstance(train_set, Subset) else len(train_set)
    if args.data_fraction < 1 and args.data_fraction * full < num_classes:
        raise TrainError(f"--data-fraction {args.data_fraction:g} keeps {args.data_fraction * full:.2g} of the {full} "
                         f"training images, less than one per class (each class would keep its one image, "
                         f"{len(train_set)} in all, not the fraction asked for); the least is {num_classes / full:.2g}")
    if len(train_set) < global_batch:
        cause = (f"--data-fraction {args.data_fraction:g} keeps {len(train_set)} of the {full} training images"
                 if args.data_fraction < 1 else f"the training set has {len(train_set)} images")
        raise TrainError(f"{cause}, fewer than one batch of {global_batch}; lower --batch-size"
                         + (" or raise --data-fraction" if args.data_fraction < 1 else ""))


def describe(args, model: convit.ConViT, train_set, val_set, num_classes: int, procs: Processes, amp_dtype) -> str:
    n_gpsa, n_params = len(model.gpsa_layers()), sum(p.numel() for p in model.parameters())
    # --num-heads alone, in a recipe with a fixed head width, changes C too: say so
    width = f"{model.cfg.embed_dim} = {model.cfg.num_heads} heads x {args.head_width}" \
        if args.num_heads and not args.embed_dim and args.head_width else model.cfg.embed_dim
    return (f"{args.model} ({n_gpsa} GPSA + {model.cfg.depth - n_gpsa} MHSA blocks, C={width}, "
            f"H={model.cfg.num_heads}, {n_params / 1e6:.2f}M parameters) on {args.dataset}: {len(train_set)} training / "
            f"{len(val_set)} validation images of {args.img_size}x{args.img_size}, patch {args.patch_size}, "
            f"{num_classes} classes; {procs.world} process(es) on {procs.device}, batch {args.batch_size * procs.world}, "
            f"lr {args.lr:.2e}, {args.epochs} epochs ({args.preset} recipe), {PRECISION_NAMES[amp_dtype]}")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def train(args, procs: Processes, resumed: dict | None, folder: runs.RunFolder | None) -> dict:
    """Train as the flags say; `resumed` is the --resume checkpoint (or None), `folder` the run
    folder that rank 0 has claimed (None on the other ranks, which write nothing)."""
    is_main = procs.rank == 0
    log = print if is_main and not args.quiet else (lambda *a, **k: None)
    show_progress = is_main and not (args.quiet or args.no_progress) and sys.stderr.isatty()
    global_batch = args.batch_size * procs.world
    if args.lr is None:
        args.lr = args.base_lr * global_batch / 512  # DeiT's linear scaling rule
    torch.manual_seed(args.seed)  # the same initial weights in every process
    random.seed(args.seed)

    # --- data (rank 0 first: it may download CIFAR, which the others then read) --------
    if not is_main:
        dist.barrier()
    train_set, val_set, num_classes = data.build_datasets(args)
    val_set = data.transformed_once(val_set)
    if is_main and procs.distributed:
        dist.barrier()
    check_training_set(args, train_set, num_classes, global_batch)
    sampler, loader_generator, train_loader, val_loader = make_loaders(args, procs, train_set, val_set)
    fixed_batch = nonlocality_images(val_set).to(procs.device)  # for Eq. 8
    spec = data.DATASETS[args.dataset]
    augmentation = augment.BatchAugment(args, spec.mean, spec.std, crop=not spec.crop_in_loader)  # on whole batches
    mixer = augment.batch_mixer(args, num_classes)

    # --- model, optimiser, schedule -----------------------------------------------------
    model = build_model(args, num_classes).to(procs.device)
    torch.manual_seed(args.seed + procs.rank)  # from here on, each process draws its own augmentations
    if args.checkpoint:  # start from given weights (fine-tuning); the head is re-initialised if the classes differ
        convit.load_checkpoint(model, args.checkpoint, verbose=is_main and not args.quiet)
        freeze_for_table3(model, args)  # the checkpoint brought its own gates: --freeze-gates sets them to 0 again
    # fused: one kernel for all parameters instead of a dozen per tensor (the step of a small model 7x faster)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, eps=1e-8, fused=True)
    scheduler = build_schedule(optimizer, args)
    amp_dtype = mixed_precision(procs.device, args.amp, args.amp_dtype)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype == torch.float16)  # fp16's narrow range
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True) if args.ema else None
    if procs.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    train_model = DistributedDataParallel(model, device_ids=[procs.device] if procs.device.type == "cuda" else None) \
        if procs.distributed else model
    train_model = torch.compile(train_model) if args.compile else train_model

    # --- where to start from, where to write ------------------------------------------
    state = TrainingState(model, optimizer, scheduler, scaler, ema, loader_generator)
    start_epoch = resume(resumed, args, state, procs, log) if resumed else 0
    checkpoint_path = Path(args.output_dir, runs.CHECKPOINT)
    if folder is not None:  # the folder becomes this run's only now that data and model are ready
        folder.start(start_epoch, args.resume, resumed.get("metrics") if resumed else None)
    log(describe(args, model, train_set, val_set, num_classes, procs, amp_dtype))

    def end_of_epoch(epoch: int, lr: float, train_loss: float, images_per_second: float, seconds: float) -> dict:
        """After an evaluated epoch: top-1 and top-5 (and the EMA's), the gates and nonlocality
        of Eq. 8, the checkpoint and then its metrics line, and the log line."""
        record = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                  **evaluate(model, val_loader, procs, amp_dtype, show_progress),
                  "images_per_second": images_per_second, "epoch_seconds": seconds}
        if ema is not None:
            record.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, procs, amp_dtype, False).items()})
        rng = runs.rng_states(loader_generator, procs)  # every process takes part in the gather
        if folder is not None:
            record.update(what_the_paper_plots(model, fixed_batch))
            folder.save(state.checkpoint(epoch, args, rng, record), record)
            gates = f"  {gates_per_layer(record['gates'])}" if "gates" in record else ""
            log(f"epoch {epoch:>3}/{args.epochs}  lr {lr:.2e}  train loss {train_loss:.3f}  "
                f"val loss {record['val_loss']:.3f}  top-1 {record['val_top1']:5.1f}%  top-5 {record['val_top5']:5.1f}%  "
                f"{record['images_per_second']:.0f} img/s{gates}", flush=True)
        return record

    # --- the loop: data, forward, loss, backward, step, log ----------------------------
    record, run_start = None, time.perf_counter()
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, last_epoch):
        train_model.train()
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same in a resumed run
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, steps, epoch_start = 0.0, 0, time.perf_counter()
        bar = tqdm(total=len(train_loader) * global_batch, unit="img", leave=False,
                   desc=f"epoch {epoch + 1}/{args.epochs}", disable=not show_progress)
        for images, labels in train_loader:
            images, labels = images.to(procs.device, non_blocking=True), labels.to(procs.device, non_blocking=True)
            images, targets = augmentation(images), labels  # uint8 (B, C, H, W) -> normalised floats
            if mixer is not None:
                images, targets = mixer(images, labels)  # soft targets, (B, classes)
            with torch.autocast(procs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = train_model(images)  # (B, classes)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=args.smoothing)

            # The mean loss over all processes: every process sees the same number, so they all
            # stop together, before any step or save, and the last good checkpoint survives.
            loss_value = global_sum(loss.detach().clone(), procs).item() / procs.world
            if not math.isfinite(loss_value):
                raise TrainError(f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {steps + 1}: stopped "
                                 f"before the optimiser step; the last good checkpoint ({checkpoint_path}) is "
                                 f"untouched. Lower --lr or set --clip-grad.")

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)

            loss_sum, steps = loss_sum + loss_value, steps + 1
            bar.update(global_batch)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        bar.close()
        scheduler.step()
        train_seconds = time.perf_counter() - epoch_start

        if (epoch + 1) % args.eval_every and epoch + 1 < last_epoch:
            continue  # --eval-every: evaluate, log and save every few epochs (and after the last)

        record = end_of_epoch(epoch + 1, lr, loss_sum / steps, steps * global_batch / train_seconds, train_seconds)

    if record is None:  # resumed a run that had already finished
        record = {"epoch": start_epoch, **evaluate(model, val_loader, procs, amp_dtype, show_progress)}
    minutes, seconds = divmod(time.perf_counter() - run_start, 60)
    epochs_run = record["epoch"] - start_epoch
    # Drawn once, at the end: after every evaluation it would cost a small run several percent of its time.
    figure = folder.draw_figure() if folder is not None and not args.no_figure else None
    if is_main:  # the final result line: the one line --quiet prints
        print(f"done: val top-1 {record['val_top1']:.1f}%, top-5 {record['val_top5']:.1f}% after {record['epoch']} epochs "
              f"({epochs_run} in this run, {minutes:.0f}m{seconds:02.0f}s); metrics{' and figure' * bool(figure)} in "
              f"{args.output_dir}",
              flush=True)
    return {**record, "epochs_run": epochs_run, "output_dir": args.output_dir, "model": model,
            "figure": str(figure) if figure else None}


def evaluate_only(args, procs: Processes) -> dict:
    """Top-1 / top-5 of one of our checkpoints, or of a released ConViT .pth (e.g. on ImageNet val)."""
    checkpoint = convit.read_checkpoint_file(args.checkpoint)  # before the data: a wrong file fails at once
    _train_set, val_set, num_classes = data.build_datasets(args)
    ours = "cfg" in checkpoint
    if not ours:  # a released checkpoint: keep its head, so that its class indices still count
        state = checkpoint.get("model", checkpoint)
        head = state.get("head.weight") if isinstance(state, dict) else None
        num_classes = head.shape[0] if torch.is_tensor(head) and head.shape[0] > num_classes else num_classes
    model = build_model(args, num_classes).to(procs.device)
    if ours:
        runs.check_same_model(checkpoint, model, args.checkpoint)
    convit.load_checkpoint(model, args.checkpoint, verbose=procs.rank == 0 and not args.quiet)
    if args.mask_pos_embed:
        if model.pos_embed is None:
            raise TrainError(f"--mask-pos-embed: {args.checkpoint} was trained with --no-pos-embed; there is "
                             f"no position embedding to mask")
        model.mask_pos_embed()
    val_shard = Subset(val_set, range(procs.rank, len(val_set), procs.world))
    loader = DataLoader(val_shard, args.batch_size, num_workers=args.workers or 0, pin_memory=procs.device.type == "cuda")
    show = procs.rank == 0 and not (args.quiet or args.no_progress) and sys.stderr.isatty()
    result = evaluate(model, loader, procs, mixed_precision(procs.device, args.amp, args.amp_dtype), show)
    if procs.rank == 0:
        masked = ", position embedding masked" if args.mask_pos_embed else ""
        print(f"{args.checkpoint} on {args.dataset} ({len(val_set)} images{masked}): top-1 {result['val_top1']:.2f}%  "
              f"top-5 {result['val_top5']:.2f}%  loss {result['val_loss']:.4f}", flush=True)
    return {**result, "epoch": checkpoint.get("epoch", 0), "epochs_run": 0, "output_dir": args.output_dir,
            "figure": None, "model": model}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the line that says which checkpoint the run can continue from."""


def one_line(err: Exception) -> str:
    """A bad-input message as one line. An error raised in a data-loading worker reaches us
    wrapped by torch, with the worker's traceback in its text: keep the worker's own message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> dict:
    """Train (or with --eval-only, evaluate) as the flags say; return the final metrics:
    epoch, val_loss, val_top1, val_top5 (percent), epochs_run, output_dir, figure, and the trained
    `model` (unwrapped, on its device). Raises TrainError (or convit's ValueError) on bad input;
    never exits the interpreter, and leaves no process group behind unless torchrun made one.
    Ctrl-C raises Interrupted (a KeyboardInterrupt) naming the checkpoint to continue from."""
    started = time.time()
    args, resumed = parse_flags(argv)
    procs = start_processes(args.device)
    threads_before, folder = torch.get_num_threads(), None
    torch.set_num_threads(args.threads or threads_before)
    try:
        if args.eval_only:
            return evaluate_only(args, procs)
        folder = runs.claim(args.output_dir, args.overwrite, args.resume, procs)  # before the data: refused at once
        return train(args, procs, resumed, folder)
    except KeyboardInterrupt:
        if args.eval_only:
            raise Interrupted("interrupted (evaluation only: nothing to continue)") from None
        draw_when_stopped(None if args.no_figure else folder)
        raise Interrupted(runs.where_to_continue(args.output_dir, args.resume, started)) from None
    finally:  # leave the interpreter as we found it: lessons call main() in-process
        if folder is not None:
            folder.release()
        torch.set_num_threads(threads_before)
        if procs.started_group:
            dist.destroy_process_group()


def draw_when_stopped(folder: runs.RunFolder | None):
    """Ctrl-C: the figure of the epochs done so far, if it can be had at once; the message
    that names the checkpoint comes first, so nothing here may stop it."""
    try:
        if folder is not None:
            folder.draw_figure()
    except (ValueError, KeyboardInterrupt):
        pass


def cli(argv: list[str] | None = None) -> int:
    """The command-line entry: a clear `error: ...` line and exit code 2 for bad input, no traceback."""
    return run_reporting_errors(main, argv)


def run_reporting_errors(entry, argv: list[str] | None = None) -> int:
    """Run entry(argv) as a command-line program (train.py's and every lesson's): bad input
    ends with one `error: ...` line on stderr and exit code 2, Ctrl-C with one line and 130."""
    try:
        entry(argv)
    except ValueError as err:  # TrainError, data.DataError and convit's errors alike
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C: one line, the checkpoint to continue from
        print(str(stop) or "interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
