"""Train and evaluate ConViT (and DeiT) with DeiT's recipe: on a CPU, one GPU or many.

The commands, from the smallest to the largest:

    # CPU, offline, about 2.5 minutes on 2 cores: a small ConViT on the UCI handwritten digits
    # that ship with scikit-learn, to about 97-98% validation top-1
    python train.py

    # 10,000 real MNIST digits, shipped in data/ (offline): 28x28 in 4x4 patches, a 7x7 grid
    python train.py --dataset mnist10k

    # CIFAR-10 / CIFAR-100 from scratch (downloaded into --data-dir when missing)
    python train.py --dataset cifar10 --data-dir data
    python train.py --dataset cifar100 --data-dir data --patch-size 2 --model convit_tiny_plus

    # An ImageNet subset: the first 100 classes of an ImageFolder tree (train/ and val/)
    python train.py --dataset imagefolder --data-dir /path/to/imagenet --num-classes-subset 100 \\
        --model convit_small

    # One node, 8 GPUs (each process takes --batch-size images; lr scales with the total)
    torchrun --nproc_per_node=8 train.py --dataset imagefolder --data-dir /path/to/imagenet \\
        --model convit_small
    # Two nodes of 8 GPUs: run this on each node, with --node_rank=0 on the first, 1 on the second
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST0 --master_port=29500 \\
        train.py --dataset imagefolder --data-dir /path/to/imagenet --model convit_small
    # Two processes on a CPU (gloo): the same code path, testable anywhere
    torchrun --nproc_per_node=2 train.py --epochs 2

    # Continue an interrupted run exactly (same flags, plus --resume)
    python train.py --resume runs/digits-convit_tiny/checkpoint.pth
    # Top-1 / top-5 of one of our checkpoints, or of a released ConViT .pth
    python train.py --eval-only --checkpoint runs/digits-convit_tiny/checkpoint.pth
    python train.py --dataset imagefolder --data-dir /path/to/imagenet --model convit_tiny \\
        --eval-only --checkpoint convit_tiny.pth

    # Table 2 (sample efficiency) at small scale, on the digits: keep a stratified fraction f of
    # each class and train 1/f times the epochs; ConViT, then a DeiT of the same width and heads
    python train.py --data-fraction 0.1 --scale-epochs --output-dir runs/t2-convit-0.1
    python train.py --data-fraction 0.1 --scale-epochs --local-up-to-layer 0 --output-dir runs/t2-deit-0.1

    # Table 3 (ablations), one command per row; add --data-fraction 0.1 --scale-epochs for its
    # last column, and --dataset imagefolder --data-dir ... --model convit_small_plus for its scale
    python train.py --output-dir runs/t3-a                                          # a: ConViT
    python train.py --freeze-gates --output-dir runs/t3-b                           # b: gates frozen
    python train.py --no-conv-init --output-dir runs/t3-c                           # c: no conv init
    python train.py --freeze-gates --no-conv-init --output-dir runs/t3-d            # d
    python train.py --local-up-to-layer 0 --output-dir runs/t3-e                    # e: DeiT
    python train.py --freeze-gates --freeze-positional --output-dir runs/t3-f       # f: GPSA frozen at conv init
    python train.py --freeze-gates --freeze-positional --no-conv-init --output-dir runs/t3-g  # g: ... at random
    # Fig. 8: more GPSA blocks, stronger locality (--locality-strength is alpha of Eq. 5)
    python train.py --local-up-to-layer 2 --locality-strength 3 --output-dir runs/f8-2-3

Every run writes <output-dir>/metrics.jsonl (one JSON line per epoch: loss, lr, top-1, top-5,
images/s and, per GPSA layer and head, sigma(lambda) and the nonlocality of Eq. 8) and
<output-dir>/checkpoint.pth (replaced atomically after every epoch). With --eval-every N (and by
default with --scale-epochs, N = 1/F), both happen every N epochs and after the last.

Every flag left unset takes its value from the dataset (image and patch size) and from the
recipe, --preset paper (DeiT's, the default for cifar and imagefolder) or --preset small (the
default for digits and fake); `python train.py --help` lists both values of each flag.

Contents, in file order: presets (recipes) -> command line -> model, optimiser, schedule -> processes -> checkpoints -> evaluation -> setting up a run ->
the training loop (`train`) -> `evaluate_only`, `main` and the command-line entry `cli`.
The data side of the recipe (datasets, augmentation, repeated augmentation, MixUp/CutMix)
is data.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

import convit
import data


class TrainError(Exception):
    """A problem with the user's input or run, reported as `error: <message>` and exit code 2."""


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
    randaug_ops: int  # RandAugment: number of operations per image (0 = off) ...
    randaug_magnitude: int  # ... and their strength, on a scale of 0 to 30
    color_jitter: float  # brightness, contrast and saturation jitter (0 = off)
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
        color_jitter=0.4, crop_scale=0.08, reprob=0.25, repeated_aug=3, drop_path=0.1,
        ema_decay=0.99996, depth=12, head_width=None, threads=None,
    ),
    # For a dataset of a few thousand small images and a few CPU minutes: a 6-block model,
    # 24 dims per head, a short schedule, more steps (batch 32) at a larger lr (1e-3 at batch 32),
    # and gentler augmentation (no MixUp/CutMix, milder crops: 16x16 digits do not survive the paper's).
    # One CPU thread: matrices this small gain nothing from a second core, and split across two
    # they stall whenever another program is busy (we measured 25x slower steps on a shared 2-core CPU).
    "small": Recipe(
        epochs=50, batch_size=32, base_lr=1.6e-2, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
        weight_decay=0.05, smoothing=0.1, mixup=0.0, cutmix=0.0, randaug_ops=2, randaug_magnitude=5,
        color_jitter=0.0, crop_scale=0.5, reprob=0.0, repeated_aug=1, drop_path=0.0,
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train or evaluate ConViT / DeiT (see the commands at the top of train.py).")

    def preset(group, name: str, text: str, kind=float):
        """A recipe flag: left unset, it takes the preset's value (shown in --help)."""
        values = ", ".join(f"{r}: {getattr(RECIPES[r], name.replace('-', '_'))}" for r in RECIPES)
        group.add_argument(f"--{name}", type=kind, default=None, help=f"{text} [{values}]")

    data_flags = p.add_argument_group("data")
    data_flags.add_argument("--dataset", choices=list(data.DATASETS), default="digits")
    data_flags.add_argument("--data-dir", default="data", help="where cifar is (or goes), or the root holding train/ and val/ "
                                 "(mnist10k: read from here if it holds mnist10k.npz, else from the repository's data/)")
    data_flags.add_argument("--num-classes-subset", type=int, default=None, metavar="K",
                      help="imagefolder: keep only the first K classes in sorted order (the paper: 100)")
    data_flags.add_argument("--data-fraction", type=float, default=1.0, metavar="F",
                      help="keep a seeded, stratified fraction F in (0, 1] of each training class (Table 2)")
    data_flags.add_argument("--scale-epochs", action="store_true",
                      help="multiply epochs (and warmup) by 1/F, so that a fraction sees as many steps (Table 2)")
    data_flags.add_argument("--workers", type=int, default=None,
                      help="data-loading processes (default: 0 on a CPU, up to 8 per GPU)")

    model = p.add_argument_group("model (defaults: the --model preset, shrunk by --preset small)")
    model.add_argument("--model", default="convit_tiny", choices=list(convit.MODEL_PRESETS))
    model.add_argument("--img-size", type=int, default=None,
                       help="default: the dataset's (digits 16, mnist10k 28, cifar 32, imagefolder 224)")
    model.add_argument("--patch-size", type=int, default=None,
                       help="default: the dataset's (digits 4, mnist10k 4, cifar 4, imagefolder 16)")
    model.add_argument("--embed-dim", type=int, default=None, help="C")
    model.add_argument("--depth", type=int, default=None)
    model.add_argument("--num-heads", type=int, default=None, help="H")

    ablation = p.add_argument_group("the paper's ablations (Table 3, Fig. 8)")
    ablation.add_argument("--local-up-to-layer", type=int, default=None,
                          help="number of GPSA blocks; 0 = DeiT (default: all but the last two for a ConViT)")
    ablation.add_argument("--locality-strength", type=float, default=1.0, help="alpha of Eq. 5")
    ablation.add_argument("--no-conv-init", action="store_true",
                          help="GPSA starts random instead of as a convolution (Eq. 5)")
    ablation.add_argument("--freeze-gates", action="store_true", help="lambda is not trained: sigma(lambda) stays 0.73")
    ablation.add_argument("--freeze-positional", action="store_true", help="v_pos is not trained: it stays at its init")
    ablation.add_argument("--no-pos-embed", action="store_true", help="no absolute position embedding")

    recipe = p.add_argument_group("recipe (unset flags take the --preset's value)")
    recipe.add_argument("--preset", choices=list(RECIPES), default=None,
                        help="paper = DeiT's recipe; small = for tiny datasets (default for digits and fake)")
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
    preset(recipe, "randaug-ops", "RandAugment operations per image (0 = off)", int)
    preset(recipe, "randaug-magnitude", "RandAugment magnitude (0-30)", int)
    preset(recipe, "color-jitter", "colour jitter strength (0 = off)")
    preset(recipe, "crop-scale", "smallest area kept by RandomResizedCrop")
    preset(recipe, "reprob", "RandomErasing probability")
    preset(recipe, "repeated-aug", "repeated augmentation: copies of each image per epoch", int)
    preset(recipe, "drop-path", "stochastic depth rate")
    preset(recipe, "ema-decay", "EMA decay per step")
    recipe.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (default: the dataset's)")
    recipe.add_argument("--ema", action="store_true",
                        help="keep an exponential moving average of the weights and evaluate it too")
    recipe.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")

    run = p.add_argument_group("speed, checkpoints, logging")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                     help="mixed precision on a GPU: bf16 where supported, else fp16 with a gradient scaler "
                          "(never on a CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1, ...")
    preset(run, "threads", "CPU threads per process (None: torch's choice)", int)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output-dir", default=None, help="default: runs/<dataset>-<model>")
    run.add_argument("--resume", default=None, metavar="PATH", help="continue exactly from one of our checkpoints")
    run.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                     help="stop once this many epochs are done, the schedule still spanning --epochs "
                          "(for jobs with a time limit: continue later with --resume)")
    run.add_argument("--eval-every", type=int, default=None, metavar="EPOCHS",
                     help="evaluate, log to metrics.jsonl and save the checkpoint every this many epochs and after "
                          "the last (default 1; with --scale-epochs 1/F: the same steps apart at every fraction)")
    run.add_argument("--eval-only", action="store_true", help="only report top-1 / top-5 of --checkpoint")
    run.add_argument("--checkpoint", default=None, metavar="PATH",
                     help="weights to evaluate (--eval-only) or to start from: one of ours or a released ConViT .pth")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch only)")
    run.add_argument("--quiet", action="store_true", help="print only the final result")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every unset flag from the dataset and the recipe, and check the values."""
    spec = data.DATASETS[args.dataset]
    args.preset = args.preset or spec.preset
    if args.base_lr is None and args.preset == "paper" and args.model.endswith("_plus"):
        args.base_lr = 4e-4  # paper.md: the "+" models train at 4e-4 per 512 images
    for name, value in dataclasses.asdict(RECIPES[args.preset]).items():
        if getattr(args, name, None) is None:  # head_width has no flag: --embed-dim sets the width
            setattr(args, name, value)
    args.img_size = args.img_size or spec.img_size
    args.patch_size = args.patch_size or spec.patch_size
    args.hflip = spec.hflip if args.hflip is None else args.hflip
    args.output_dir = args.output_dir or (
        str(Path(args.resume).parent) if args.resume else f"runs/{args.dataset}-{args.model}")

    if not 0.0 < args.data_fraction <= 1.0:
        raise TrainError(f"--data-fraction must lie in (0, 1], got {args.data_fraction}")
    if args.scale_epochs:
        args.epochs = round(args.epochs / args.data_fraction)
        args.warmup_epochs = round(args.warmup_epochs / args.data_fraction)
    if args.eval_every is None:  # evaluating a 5% run 20 times as often as a full one would cost more than training it
        args.eval_every = max(1, round(1 / args.data_fraction)) if args.scale_epochs else 1
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.eval_only and not args.checkpoint:
        raise TrainError("--eval-only needs --checkpoint PATH (one of our checkpoints or a released ConViT .pth)")
    if args.num_classes_subset is not None and args.num_classes_subset < 1:
        raise TrainError(f"--num-classes-subset must be at least 1, got {args.num_classes_subset}")
    return args


# ---------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------
def build_model(args, num_classes: int) -> convit.ConViT:
    """The --model preset, resized by the flags and the recipe, with the ablations applied."""
    preset_dim, preset_heads, preset_gpsa = convit.MODEL_PRESETS[args.model]
    num_heads = args.num_heads or preset_heads
    width = args.embed_dim or (num_heads * args.head_width if args.head_width else preset_dim)
    depth = args.depth
    # A ConViT makes all blocks GPSA but the last two (10 of 12 in the paper); a DeiT none.
    local_up_to_layer = args.local_up_to_layer if args.local_up_to_layer is not None else (
        max(depth - 2, 1) if preset_gpsa > 0 else 0)
    model = convit.create_model(
        args.model, img_size=args.img_size, patch_size=args.patch_size, in_chans=data.DATASETS[args.dataset].in_chans,
        num_classes=num_classes, embed_dim=width, depth=depth, num_heads=num_heads,
        local_up_to_layer=local_up_to_layer, locality_strength=args.locality_strength,
        use_local_init=not args.no_conv_init, use_pos_embed=not args.no_pos_embed, drop_path_rate=args.drop_path,
    )
    for layer in model.gpsa_layers():
        if args.freeze_gates:  # Table 3 "train gating: no": sigma(lambda) stays at sigma(1) = 0.73
            layer.gating_param.requires_grad_(False)
        if args.freeze_positional:  # Table 3 "train GPSA: no": v_pos stays at its init
            layer.pos_proj.requires_grad_(False)
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


def mixed_precision(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it (no scaler needed), fp16 otherwise, nothing on a CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    use_cuda = torch.cuda.is_available() and not device_flag.startswith("cpu")
    if world == 1:
        try:
            device = torch.device("cuda" if use_cuda else "cpu") if device_flag == "auto" else torch.device(device_flag)
        except RuntimeError as err:
            raise TrainError(f"--device {device_flag}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {device_flag}, but torch sees no GPU here")
        return Processes(0, 1, device, started_group=False)
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
# Checkpoints
# ---------------------------------------------------------------------------------------
# Flags that change how a run is executed or reported, not what it computes.
RUN_ONLY_FLAGS = {"resume", "stop_after", "output_dir", "workers", "threads", "quiet", "no_progress", "compile",
                  "device", "eval_every"}


def read_checkpoint(path) -> dict:
    if not Path(path).is_file():
        raise TrainError(f"checkpoint {path} does not exist")
    try:  # weights_only=False: our checkpoints also hold RNG states and the args
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch.load raises many kinds for a file that is not a checkpoint
        raise TrainError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from None
    if not isinstance(checkpoint, dict):
        raise TrainError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint")
    return checkpoint


def check_same_model(checkpoint: dict, model: convit.ConViT, path):
    """Refuse to continue or evaluate a checkpoint of another architecture, naming each difference."""
    saved, wanted = checkpoint["cfg"], dataclasses.asdict(model.cfg)
    saved["img_size"] = tuple(saved["img_size"])
    differences = [f"{key}={saved[key]} (checkpoint) vs {wanted[key]} (this run)"
                   for key in wanted if key != "fused" and saved.get(key) != wanted[key]]
    if differences:
        raise TrainError(f"{path} was saved from another model: {'; '.join(differences)}. "
                         f"Pass the flags of the run that wrote it.")


def rng_states(loader_generator: torch.Generator, procs: Processes) -> list[dict]:
    """Every random number generator that training draws from, for each process (rank order):
    torch's (augmentation, drop path, MixUp/CutMix), CUDA's, Python's, and the generator that
    seeds the data-loading workers. The sampler's order needs none: it follows from (seed, epoch)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "loader": loader_generator.get_state()}
    if procs.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(procs.device)
    if not procs.distributed:
        return [state]
    states = [None] * procs.world
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(states: list[dict], loader_generator: torch.Generator, procs: Processes):
    if len(states) != procs.world:
        print(f"note: the checkpoint has RNG states of {len(states)} processes, this run has {procs.world}; "
              "the run goes on with fresh seeds (not bit-identical)")
        torch.manual_seed(torch.seed() + procs.rank)
        return
    state = states[procs.rank]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    loader_generator.set_state(state["loader"])
    if "cuda" in state and procs.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], procs.device)


def save_atomically(obj, path: Path):
    """Write to a temporary file, then rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def what_the_paper_plots(model: convit.ConViT, fixed_batch: torch.Tensor) -> dict:
    """sigma(lambda) of each GPSA layer and head (Fig. 5) and the nonlocality of Eq. 8 of
    every block and head (Fig. 6), measured on the same validation images every epoch."""
    model.eval()
    plots = {"nonlocality": [[round(x, 4) for x in row] for row in model.nonlocality(fixed_batch).tolist()]}
    if model.gpsa_layers():
        plots["gates"] = [[round(x, 4) for x in row] for row in model.gates().tolist()]
    return plots


def per_layer(rows: list[list[float]]) -> str:
    return " ".join(f"{sum(row) / len(row):.2f}" for row in rows)


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


def resume(args, model, optimizer, scheduler, scaler, ema, loader_generator, procs: Processes, log) -> int:
    """Restore everything a run depends on from --resume; return the number of epochs done."""
    checkpoint = read_checkpoint(args.resume)
    if "optimizer" not in checkpoint:
        raise TrainError(f"{args.resume} is not a checkpoint of train.py (a released .pth? use --checkpoint)")
    check_same_model(checkpoint, model, args.resume)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and checkpoint["ema"] is not None:
        ema.load_state_dict(checkpoint["ema"])
    restore_rng_states(checkpoint["rng"], loader_generator, procs)
    changed = [f"{key} {checkpoint['args'].get(key)} -> {value}" for key, value in vars(args).items()
               if key not in RUN_ONLY_FLAGS and checkpoint["args"].get(key) != value]
    if changed:  # the restored schedule and RNG states still follow the original run
        log(f"note: these flags differ from the run being resumed: {', '.join(changed)}")
    return checkpoint["epoch"]


def start_metrics_file(path: Path, epochs_done: int):
    """A fresh run starts an empty metrics.jsonl; a resumed one keeps the lines of the epochs
    its checkpoint holds (and drops any written after it, or torn by a crash)."""

    def epoch_of(line: str) -> float:
        try:
            return json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):
            return math.inf

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if epochs_done and path.exists() else []
    path.write_text("".join(line + "\n" for line in lines if epoch_of(line) <= epochs_done))


def describe(args, model: convit.ConViT, train_set, val_set, num_classes: int, procs: Processes) -> str:
    n_gpsa, n_params = len(model.gpsa_layers()), sum(p.numel() for p in model.parameters())
    return (f"{args.model} ({n_gpsa} GPSA + {model.cfg.depth - n_gpsa} MHSA blocks, C={model.cfg.embed_dim}, "
            f"H={model.cfg.num_heads}, {n_params / 1e6:.2f}M parameters) on {args.dataset}: {len(train_set)} training / "
            f"{len(val_set)} validation images of {args.img_size}x{args.img_size}, patch {args.patch_size}, "
            f"{num_classes} classes; {procs.world} process(es) on {procs.device}, batch {args.batch_size * procs.world}, "
            f"lr {args.lr:.2e}, {args.epochs} epochs ({args.preset} recipe)")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def train(args, procs: Processes) -> dict:
    is_main = procs.rank == 0
    log = print if is_main and not args.quiet else (lambda *a, **k: None)
    show_progress = is_main and not (args.quiet or args.no_progress) and sys.stderr.isatty()
    torch.manual_seed(args.seed)  # the same initial weights in every process
    random.seed(args.seed)

    # --- data (rank 0 first: it may download CIFAR, which the others then read) --------
    if not is_main:
        dist.barrier()
    train_set, val_set, num_classes = data.build_datasets(args)
    if is_main and procs.distributed:
        dist.barrier()
    global_batch = args.batch_size * procs.world
    if len(train_set) < global_batch:
        raise TrainError(f"the training set has {len(train_set)} images, fewer than one batch of {global_batch}; "
                         "lower --batch-size")
    sampler, loader_generator, train_loader, val_loader = make_loaders(args, procs, train_set, val_set)
    fixed_batch = torch.stack([val_set[i][0] for i in range(min(64, len(val_set)))]).to(procs.device)  # for Eq. 8
    mixer = data.batch_mixer(args, num_classes)

    # --- model, optimiser, schedule -----------------------------------------------------
    model = build_model(args, num_classes).to(procs.device)
    torch.manual_seed(args.seed + procs.rank)  # from here on, each process draws its own augmentations
    if args.checkpoint:  # start from given weights (fine-tuning); the head is re-initialised if the classes differ
        convit.load_checkpoint(model, args.checkpoint, verbose=is_main)
    if args.lr is None:
        args.lr = args.base_lr * global_batch / 512  # DeiT's linear scaling rule
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, eps=1e-8)
    scheduler = build_schedule(optimizer, args)
    amp_dtype = mixed_precision(procs.device, args.amp)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True) if args.ema else None
    if procs.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    train_model = DistributedDataParallel(model, device_ids=[procs.device] if procs.device.type == "cuda" else None) \
        if procs.distributed else model
    train_model = torch.compile(train_model) if args.compile else train_model

    # --- where to start from, where to write --------------------------------------------
    start_epoch = resume(args, model, optimizer, scheduler, scaler, ema, loader_generator, procs, log) \
        if args.resume else 0
    out = Path(args.output_dir)
    checkpoint_path, metrics_path = out / "checkpoint.pth", out / "metrics.jsonl"
    if is_main:
        start_metrics_file(metrics_path, start_epoch)
    log(describe(args, model, train_set, val_set, num_classes, procs))

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
            targets = labels
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

        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / steps,
                  **evaluate(model, val_loader, procs, amp_dtype, show_progress),
                  "images_per_second": steps * global_batch / train_seconds, "epoch_seconds": train_seconds}
        if ema is not None:
            record.update({f"ema_{k}": v for k, v in evaluate(ema.module, val_loader, procs, amp_dtype, False).items()})
        states = rng_states(loader_generator, procs)  # every process takes part in the gather
        if is_main:
            record.update(what_the_paper_plots(model, fixed_batch))
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            save_atomically({
                "cfg": dataclasses.asdict(model.cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch + 1, "rng": states, "args": vars(args), "metrics": record,
            }, checkpoint_path)
            gates = f"  sigma(lambda) per GPSA layer {per_layer(record['gates'])}" if "gates" in record else ""
            log(f"epoch {epoch + 1:>3}/{args.epochs}  lr {lr:.2e}  train loss {record['train_loss']:.3f}  "
                f"val loss {record['val_loss']:.3f}  top-1 {record['val_top1']:5.1f}%  top-5 {record['val_top5']:5.1f}%  "
                f"{record['images_per_second']:.0f} img/s{gates}", flush=True)

    if record is None:  # resumed a run that had already finished
        record = {"epoch": start_epoch, **evaluate(model, val_loader, procs, amp_dtype, show_progress)}
    minutes, seconds = divmod(time.perf_counter() - run_start, 60)
    epochs_run = record["epoch"] - start_epoch
    log(f"done: val top-1 {record['val_top1']:.1f}%, top-5 {record['val_top5']:.1f}% after {record['epoch']} epochs "
        f"({epochs_run} in this run, {minutes:.0f}m{seconds:02.0f}s); metrics in {metrics_path}")
    return {**record, "epochs_run": epochs_run, "output_dir": str(out), "model": model}


def evaluate_only(args, procs: Processes) -> dict:
    """Top-1 / top-5 of one of our checkpoints, or of a released ConViT .pth (e.g. on ImageNet val)."""
    _train_set, val_set, num_classes = data.build_datasets(args)
    checkpoint = read_checkpoint(args.checkpoint)
    ours = "cfg" in checkpoint
    if not ours:  # a released checkpoint: keep its head, so that its class indices still count
        head = checkpoint.get("model", checkpoint).get("head.weight")
        num_classes = head.shape[0] if torch.is_tensor(head) and head.shape[0] > num_classes else num_classes
    model = build_model(args, num_classes).to(procs.device)
    if ours:
        check_same_model(checkpoint, model, args.checkpoint)
    convit.load_checkpoint(model, args.checkpoint, verbose=procs.rank == 0)
    val_shard = Subset(val_set, range(procs.rank, len(val_set), procs.world))
    loader = DataLoader(val_shard, args.batch_size, num_workers=args.workers or 0, pin_memory=procs.device.type == "cuda")
    show = procs.rank == 0 and not (args.quiet or args.no_progress) and sys.stderr.isatty()
    result = evaluate(model, loader, procs, mixed_precision(procs.device, args.amp), show)
    if procs.rank == 0:
        print(f"{args.checkpoint} on {args.dataset} ({len(val_set)} images): top-1 {result['val_top1']:.2f}%  "
              f"top-5 {result['val_top5']:.2f}%  loss {result['val_loss']:.4f}", flush=True)
    return {**result, "epoch": checkpoint.get("epoch", 0), "epochs_run": 0, "output_dir": args.output_dir, "model": model}


def main(argv: list[str] | None = None) -> dict:
    """Train (or with --eval-only, evaluate) as the flags say; return the final metrics:
    epoch, val_loss, val_top1, val_top5 (percent), epochs_run, output_dir, and the trained
    `model` (unwrapped, on its device). Raises TrainError (or convit's ValueError) on bad input;
    never exits the interpreter, and leaves no process group behind unless torchrun made one."""
    args = resolve_args(build_parser().parse_args(argv))
    procs = start_processes(args.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads_before)
    try:
        return evaluate_only(args, procs) if args.eval_only else train(args, procs)
    finally:  # leave the interpreter as we found it: lessons call main() in-process
        torch.set_num_threads(threads_before)
        if procs.started_group:
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """The command-line entry: a clear `error: ...` line and exit code 2 for bad input, no traceback."""
    try:
        main(argv)
    except (TrainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; continue with --resume <output-dir>/checkpoint.pth", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
