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

The flags are config.py's: each one is defined there once, with its range and its value in each
preset recipe, --preset paper (DeiT's) or --preset small (for datasets of a few thousand small
images); every flag left unset takes the dataset's value or the recipe's, and `python train.py
--help` lists both. In code, a lesson does what the command line does:
    cfg, notes = config.resolve({"dataset": "mnist10k", "epochs": 5}); result = train.run(cfg)

Contents, in file order: the model, optimiser and schedule -> data -> evaluation -> setting up a
run (`setup`) -> the training loop (`train`) -> `evaluate_only` -> `run` (a configuration in, the
final metrics out) and `main` (the command line). The data is data.py's and augment.py's; the
processes (one, or one per GPU under torchrun) and the run folder are runs.py's; checkpoint files
are checkpoints.py's.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import augment
import checkpoints
import cli
import config
import convit
import data
import plots
import probes
import runs
from config import RunConfig


class TrainError(ValueError):
    """A problem with the user's input or run, reported as `error: <message>` and exit code 2.
    A ValueError, like convit's and data.py's, so that cli.run_command catches them all."""


# ---------------------------------------------------------------------------------------
# Model, optimiser, schedule
# ---------------------------------------------------------------------------------------
def build_model(cfg: RunConfig, num_classes: int) -> convit.ConViT:
    """The --model preset, resized by the flags and the recipe, with Table 3's switches applied."""
    settings = cfg.model
    model = convit.create_model(
        settings.model, img_size=cfg.data.img_size, patch_size=settings.patch_size,
        in_chans=data.DATASETS[cfg.data.dataset].in_chans, num_classes=num_classes, embed_dim=settings.width,
        depth=settings.depth, num_heads=settings.heads, local_up_to_layer=settings.gpsa_blocks,
        locality_strength=settings.locality_strength, use_local_init=not settings.no_conv_init,
        use_pos_embed=not settings.no_pos_embed, drop_path_rate=cfg.recipe.drop_path, attention=settings.attention,
        global_pool=settings.global_pool,
    )
    return freeze_for_table3(model, settings)


def freeze_for_table3(model: convit.ConViT, settings: config.Model) -> convit.ConViT:
    """Table 3's "train GPSA: no" and "train gating: no" (its footnote: gates frozen at lambda = 0).
    Frozen parameters keep requires_grad=False, so parameter_groups leaves them out of the optimiser."""
    for layer in model.positional_layers():  # GPSA, or PSA (--attention psa)
        if settings.freeze_gpsa:  # W_qry, W_key (qk), W_val (v), W_out (proj), v_pos (pos_proj) and GPSA's lambda
            layer.requires_grad_(False)
    for layer in model.gpsa_layers():
        if settings.freeze_gates:  # sigma(0) = 0.5: content and positional attention mixed half and half
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


def build_optimizer(model: torch.nn.Module, recipe: config.Recipe) -> torch.optim.AdamW:
    # fused: one kernel for all the parameters instead of a dozen per tensor (docs/speed.md)
    return torch.optim.AdamW(parameter_groups(model, recipe.weight_decay), lr=recipe.lr, eps=1e-8, fused=True)


def build_schedule(optimizer, recipe: config.Recipe) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, as in DeiT: linear warmup from warmup_lr, then cosine to min_lr."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(recipe.epochs - recipe.warmup_epochs, 1), eta_min=recipe.min_lr)
    if recipe.warmup_epochs == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=min(recipe.warmup_lr / recipe.lr, 1.0), total_iters=recipe.warmup_epochs)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[recipe.warmup_epochs])


def refit_cosine(scheduler, recipe: config.Recipe):
    """Stretch the cosine of a resumed run whose --epochs grew.

    torch's CosineAnnealingLR steps recursively: each step multiplies (lr - min_lr) by
    (1 + cos(pi t / T)) / (1 + cos(pi (t - 1) / T)). The product telescopes, so once T is the
    new length the lr falls smoothly from where it is now to min_lr exactly at the new last
    epoch (a cosine that had already ended stays at min_lr). Kept at the old T, the lr would
    rise again after the old last epoch: the cosine is periodic."""
    cosine = scheduler._schedulers[-1] if isinstance(scheduler, torch.optim.lr_scheduler.SequentialLR) else scheduler
    cosine.T_max = max(recipe.epochs - recipe.warmup_epochs, 1)


def training_loss(logits: torch.Tensor, targets: torch.Tensor, recipe: config.Recipe) -> torch.Tensor:
    """Cross-entropy with label smoothing, in fp32 whatever autocast computed the logits in;
    targets are labels (B,) or MixUp's soft targets (B, classes)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=recipe.smoothing)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with a gradient scaler"}


def mixed_precision(device: torch.device, amp: bool | None, amp_dtype: str | None) -> torch.dtype | None:
    """The autocast dtype of the run, or None for fp32.

    Autocast is on by default on a GPU and off by default on a CPU: there it is opt-in (--amp),
    because fp32 keeps the CPU runs comparable with the figures we report, and whether bf16 is
    faster depends on the CPU and the model's size (docs/speed.md). --amp runs the very same loop in bf16 on a CPU,
    which is how the tests prove the GPU's mixed-precision path without a GPU. bf16 needs no
    gradient scaler (it has fp32's exponent range); fp16 does (setup turns it on)."""
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
# Data: the datasets, their loaders, and what training does to each batch
# ---------------------------------------------------------------------------------------
def load_data(cfg: RunConfig, proc: runs.Process) -> tuple[Dataset, Dataset, int]:
    """The training and validation sets and the number of classes; rank 0 loads first (it may
    download CIFAR, which the others then read). A validation set held in memory is transformed once."""
    if proc.rank != 0:
        dist.barrier()
    train_set, val_set, num_classes = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    val_set = data.transformed_once(val_set)
    if proc.rank == 0 and proc.distributed:
        dist.barrier()
    return train_set, val_set, num_classes


def make_loaders(cfg: RunConfig, proc: runs.Process, train_set: Dataset, val_set: Dataset):
    """The training loader (sharded, reshuffled every epoch, whole batches only) and the
    validation loader (a disjoint shard per process, nothing padded, so the figures are exact)."""
    # Workers: none on a CPU, where the model needs every core; on GPUs, a share of the node's cores.
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = cfg.runtime.workers if cfg.runtime.workers is not None else (
        min(8, (os.cpu_count() or 1) // processes_here) if proc.device.type == "cuda" else 0)
    options = dict(num_workers=workers, pin_memory=proc.device.type == "cuda")
    seed, batch_size = cfg.recipe.seed, cfg.recipe.batch_size
    sampler = data.RepeatedAugmentationSampler(train_set, cfg.augment.repeated_aug, proc.world, proc.rank, seed)
    # This generator seeds the workers' augmentations; its state goes into every checkpoint.
    generator = torch.Generator().manual_seed(seed + proc.rank)
    train_loader = DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, generator=generator, **options)
    val_shard = Subset(val_set, range(proc.rank, len(val_set), proc.world))
    # The validation loader has a generator of its own, so that evaluating draws nothing from the global RNG.
    val_loader = DataLoader(val_shard, 2 * batch_size, generator=torch.Generator(), **options)
    return sampler, generator, train_loader, val_loader


def batch_augmentation(cfg: RunConfig, num_classes: int):
    """What training does to each batch of uint8 images, (B, C, H, W): DeiT's augmentation, which
    returns normalised floats, and MixUp/CutMix (images, labels) -> (images, soft targets), or None."""
    spec = data.DATASETS[cfg.data.dataset]
    return (augment.BatchAugment(cfg.augment, cfg.data.img_size, spec.mean, spec.std, crop=not spec.crop_in_loader),
            augment.batch_mixer(cfg.augment, num_classes))


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, proc: runs.Process, amp_dtype, show_progress: bool) -> dict:
    """Loss, top-1 and top-5 (in percent) over the validation set; each process takes a
    disjoint shard and the sums are added across processes, so the figures are exact."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=proc.device)  # loss sum, top-1 hits, top-5 hits, images
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        images, labels = images.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)
        with torch.autocast(proc.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images).float()  # (B, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]  # (B, 5)
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                               hits.any(dim=1).sum(), torch.tensor(len(labels), device=proc.device)]).double()
    loss, top1, top5, count = runs.global_sum(totals, proc).tolist()
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


NONLOCALITY_IMAGES = 64  # validation images on which every evaluation measures Eq. 8


def nonlocality_images(val_set: Dataset) -> torch.Tensor:
    """The first NONLOCALITY_IMAGES validation images, (B, C, H, W): every evaluation measures the
    nonlocality on the same ones, so that its curve moves with the model only."""
    return torch.stack([val_set[i][0] for i in range(min(NONLOCALITY_IMAGES, len(val_set)))])


def gates_and_nonlocality(model: convit.ConViT, images: torch.Tensor) -> dict:
    """What the paper plots, for metrics.jsonl: sigma(lambda) of each GPSA layer and head (Fig. 6,
    "gates") and the nonlocality of Eq. 8 of every block and head (Fig. 5), measured on `images`."""
    model.eval()
    record = {"nonlocality": [[round(x, 4) for x in row] for row in model.nonlocality(images).tolist()]}
    if model.gpsa_layers():
        record["gates"] = [[round(x, 4) for x in row] for row in model.gates().tolist()]
    return record


def gates_per_layer(gates: list[list[float]]) -> str:
    """The log's summary of Fig. 6: sigma(lambda) of each GPSA layer, the mean of its heads."""
    return "sigma(lambda) per GPSA layer " + " ".join(f"{sum(row) / len(row):.2f}" for row in gates)


# ---------------------------------------------------------------------------------------
# Setting up a run
# ---------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """What a checkpoint holds besides the configuration, the epoch and the random states, and
    what --resume restores (checkpoints.py describes the file)."""

    model: convit.ConViT  # unwrapped: its state_dict keys are those of convit.py, under DDP and compile alike
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    loader_generator: torch.Generator  # seeds the data-loading workers' augmentations

    def checkpoint(self, epoch: int, cfg: RunConfig, rng: list[dict], record: dict) -> dict:
        return {"cfg": asdict(self.model.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": epoch, "rng": rng, "args": cfg.flat(), "metrics": record}

    def restore(self, checkpoint: dict, cfg: RunConfig, proc: runs.Process, log) -> int:
        """Everything the run depends on, from its --resume checkpoint; returns the epochs done."""
        path = cfg.runtime.resume
        checkpoints.check_same_model(checkpoint, self.model, path)
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None and checkpoint.get("ema") is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            runs.restore_rng_states(checkpoint["rng"], self.loader_generator, proc)
        except (KeyError, RuntimeError, TypeError, ValueError, IndexError) as err:  # a damaged or hand-edited file
            raise TrainError(f"{path} does not restore this run ({type(err).__name__}: "
                             f"{cli.one_line(err, limit=300)})") from None
        planned, recipe = checkpoint["args"]["epochs"], cfg.recipe
        if recipe.epochs != planned:  # config.resume allows growth only
            refit_cosine(self.scheduler, recipe)
            log(f"note: --epochs grew from {planned} to {recipe.epochs}: the rest of the cosine is re-fitted, from "
                f"the lr where epoch {checkpoint['epoch']} ended down to --min-lr {recipe.min_lr:g} at epoch "
                f"{recipe.epochs}")
        return checkpoint["epoch"]


@dataclass
class Training:
    """A run set up to train (`setup`): everything the loop reads."""

    cfg: RunConfig  # with the absolute peak lr
    proc: runs.Process
    state: TrainingState
    train_model: torch.nn.Module  # the model as it trains: wrapped by DDP and torch.compile where asked
    sampler: data.RepeatedAugmentationSampler
    train_loader: DataLoader
    val_loader: DataLoader
    augmentation: augment.BatchAugment  # uint8 batch -> normalised, augmented floats
    mixer: object  # MixUp/CutMix (augment.batch_mixer), or None
    amp_dtype: torch.dtype | None
    nonlocality_batch: torch.Tensor  # the validation images of Eq. 8
    folder: runs.RunFolder | None  # rank 0's run folder; None on the other ranks, which write nothing
    start_epoch: int
    log: object  # print, or nothing
    show_progress: bool


def setup(cfg: RunConfig, proc: runs.Process, resumed: dict | None, folder: runs.RunFolder | None,
          notes: list[str] = ()) -> Training:
    """Data, model, optimiser, schedule, precision, EMA, DDP and compile, and the state of a
    resumed run. `resumed` is the --resume checkpoint (or None); `folder` the run folder that
    rank 0 has claimed: it becomes this run's only here, once data and model are ready, and the
    run's first lines (what it trains, then `notes`) are printed."""
    is_main = proc.rank == 0
    log = print if is_main and not cfg.runtime.quiet else (lambda *a, **k: None)
    global_batch = cfg.recipe.batch_size * proc.world
    if cfg.recipe.lr is None:
        cfg = cfg.replace(lr=cfg.recipe.base_lr * global_batch / 512)  # DeiT's linear scaling rule
    torch.manual_seed(cfg.recipe.seed)  # the same initial weights in every process
    random.seed(cfg.recipe.seed)

    train_set, val_set, num_classes = load_data(cfg, proc)
    data.check_training_set(cfg.data, train_set, num_classes, global_batch)
    sampler, loader_generator, train_loader, val_loader = make_loaders(cfg, proc, train_set, val_set)
    nonlocality_batch = nonlocality_images(val_set).to(proc.device)
    augmentation, mixer = batch_augmentation(cfg, num_classes)

    model = build_model(cfg, num_classes).to(proc.device)
    torch.manual_seed(cfg.recipe.seed + proc.rank)  # from here on, each process draws its own augmentations
    if cfg.runtime.checkpoint:  # start from given weights (fine-tuning); the head is re-initialised if the classes differ
        checkpoints.load_checkpoint(model, cfg.runtime.checkpoint, verbose=is_main and not cfg.runtime.quiet)
        freeze_for_table3(model, cfg.model)  # the checkpoint brought its own gates: --freeze-gates sets them to 0 again
    optimizer = build_optimizer(model, cfg.recipe)
    scheduler = build_schedule(optimizer, cfg.recipe)
    amp_dtype = mixed_precision(proc.device, cfg.runtime.amp, cfg.runtime.amp_dtype)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=amp_dtype == torch.float16)  # fp16's narrow range
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.recipe.ema_decay), use_buffers=True) \
        if cfg.recipe.ema else None
    if proc.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    train_model = DistributedDataParallel(model, device_ids=[proc.device] if proc.device.type == "cuda" else None) \
        if proc.distributed else model
    train_model = torch.compile(train_model) if cfg.runtime.compile else train_model

    state = TrainingState(model, optimizer, scheduler, scaler, ema, loader_generator)
    start_epoch = state.restore(resumed, cfg, proc, log) if resumed else 0
    if folder is not None:
        folder.start(start_epoch, cfg.runtime.resume, resumed.get("metrics") if resumed else None)
    log(describe(cfg, model, train_set, val_set, num_classes, proc, amp_dtype))
    for note in notes:
        log(note, flush=True)
    show_progress = is_main and not (cfg.runtime.quiet or cfg.runtime.no_progress) and sys.stderr.isatty()
    return Training(cfg, proc, state, train_model, sampler, train_loader, val_loader, augmentation, mixer, amp_dtype,
                    nonlocality_batch, folder, start_epoch, log, show_progress)


def describe(cfg: RunConfig, model: convit.ConViT, train_set, val_set, num_classes: int, proc: runs.Process,
             amp_dtype) -> str:
    """The run's first line: model, data, processes, batch, lr, epochs and precision."""
    n_local, n_params = model.cfg.local_up_to_layer, sum(p.numel() for p in model.parameters())
    blocks = f"{n_local} {model.cfg.attention.upper()} + {model.cfg.depth - n_local} MHSA blocks"  # GPSA or PSA
    settings, recipe = cfg.model, cfg.recipe
    # --num-heads alone, in a recipe with a fixed head width, changes C too: say so
    width = f"{model.cfg.embed_dim} = {model.cfg.num_heads} heads x {settings.head_width}" \
        if settings.num_heads and not settings.embed_dim and settings.head_width else model.cfg.embed_dim
    return (f"{settings.model} ({blocks}, C={width}, "
            f"H={model.cfg.num_heads}, {n_params / 1e6:.2f}M parameters) on {cfg.data.dataset}: {len(train_set)} "
            f"training / {len(val_set)} validation images of {cfg.data.img_size}x{cfg.data.img_size}, patch "
            f"{settings.patch_size}, {num_classes} classes; {proc.world} process(es) on {proc.device}, batch "
            f"{recipe.batch_size * proc.world}, lr {recipe.lr:.2e}, {recipe.epochs} epochs ({recipe.preset} recipe), "
            f"{PRECISION_NAMES[amp_dtype]}")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def train(training: Training) -> dict:
    """The loop: data, forward, loss, backward, step; after every --eval-every epochs, evaluate,
    save and log (end_of_epoch). Returns the last evaluation's metrics and the trained model."""
    cfg, proc, state, recipe = training.cfg, training.proc, training.state, training.cfg.recipe
    global_batch = recipe.batch_size * proc.world
    checkpoint_path = Path(cfg.runtime.output_dir, checkpoints.CHECKPOINT)
    record, run_start = None, time.perf_counter()
    last_epoch = min(recipe.epochs, cfg.runtime.stop_after or recipe.epochs)
    for epoch in range(training.start_epoch, last_epoch):
        training.train_model.train()
        training.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same in a resumed run
        lr = state.optimizer.param_groups[0]["lr"]
        loss_sum, steps, epoch_start = 0.0, 0, time.perf_counter()
        bar = tqdm(total=len(training.train_loader) * global_batch, unit="img", leave=False,
                   desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not training.show_progress)
        for images, labels in training.train_loader:
            images, labels = images.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)
            images, targets = training.augmentation(images), labels  # uint8 (B, C, H, W) -> normalised floats
            if training.mixer is not None:
                images, targets = training.mixer(images, labels)  # soft targets, (B, classes)
            with torch.autocast(proc.device.type, dtype=training.amp_dtype, enabled=training.amp_dtype is not None):
                logits = training.train_model(images)  # (B, classes)
            loss = training_loss(logits, targets, recipe)

            # The mean loss over all processes: every process sees the same number, so they all
            # stop together, before any step or save, and the last good checkpoint survives.
            loss_value = runs.global_sum(loss.detach().clone(), proc).item() / proc.world
            if not math.isfinite(loss_value):
                kept = (f"the last good checkpoint ({checkpoint_path}) is untouched" if checkpoint_path.is_file()
                        else "no checkpoint had been saved yet")
                raise TrainError(f"non-finite loss ({loss_value}) at epoch {epoch + 1}, step {steps + 1}: stopped "
                                 f"before the optimiser step; {kept}. Lower --lr or set --clip-grad.")

            state.optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            if recipe.clip_grad:
                state.scaler.unscale_(state.optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), recipe.clip_grad)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            if state.ema is not None:
                state.ema.update_parameters(state.model)

            loss_sum, steps = loss_sum + loss_value, steps + 1
            bar.update(global_batch)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        bar.close()
        state.scheduler.step()
        seconds = time.perf_counter() - epoch_start

        if (epoch + 1) % cfg.runtime.eval_every and epoch + 1 < last_epoch:
            continue  # --eval-every: evaluate, log and save every few epochs (and after the last)
        record = end_of_epoch(training, epoch + 1, lr, loss_sum / steps, steps * global_batch / seconds, seconds)

    if record is None:  # resumed a run that had already finished
        record = {"epoch": training.start_epoch, **evaluate(state.model, training.val_loader, proc, training.amp_dtype,
                                                        training.show_progress)}
        if training.folder is not None and not training.folder.same_run:  # into another folder: a whole run there
            training.folder.adopt(cfg.runtime.resume)
    return finish(training, record, time.perf_counter() - run_start)


def end_of_epoch(training: Training, epoch: int, lr: float, train_loss: float, images_per_second: float,
                 seconds: float) -> dict:
    """After an evaluated epoch: top-1 and top-5 (and the EMA's), the gates and nonlocality of
    Eq. 8, the checkpoint and then its metrics line, and the log line."""
    state, proc = training.state, training.proc
    record = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
              **evaluate(state.model, training.val_loader, proc, training.amp_dtype, training.show_progress),
              "images_per_second": images_per_second, "epoch_seconds": seconds}
    if state.ema is not None:
        ema = evaluate(state.ema.module, training.val_loader, proc, training.amp_dtype, False)
        record.update({f"ema_{key}": value for key, value in ema.items()})
    rng = runs.rng_states(state.loader_generator, proc)  # every process takes part in the gather
    if training.folder is not None:
        record.update(gates_and_nonlocality(state.model, training.nonlocality_batch))
        training.folder.save(state.checkpoint(epoch, training.cfg, rng, record), record)
        gates = f"  {gates_per_layer(record['gates'])}" if "gates" in record else ""
        training.log(f"epoch {epoch:>3}/{training.cfg.recipe.epochs}  lr {lr:.2e}  train loss {train_loss:.3f}  "
                f"val loss {record['val_loss']:.3f}  top-1 {record['val_top1']:5.1f}%  top-5 {record['val_top5']:5.1f}%  "
                f"{record['images_per_second']:.0f} img/s{gates}", flush=True)
    return record


def finish(training: Training, record: dict, seconds: float) -> dict:
    """The run's figure, drawn once, at the end rather than after every evaluation (docs/speed.md),
    and the final result line, the one line --quiet prints."""
    output_dir, epochs_run = training.cfg.runtime.output_dir, record["epoch"] - training.start_epoch
    figure = draw_figure(training.folder) if not training.cfg.runtime.no_figure else None
    if training.proc.rank == 0:
        minutes, seconds = divmod(seconds, 60)
        print(f"done: val top-1 {record['val_top1']:.1f}%, top-5 {record['val_top5']:.1f}% after {record['epoch']} "
              f"epochs ({epochs_run} in this run, {minutes:.0f}m{seconds:02.0f}s); metrics"
              f"{' and figure' * bool(figure)} in {output_dir}", flush=True)
    return {**record, "epochs_run": epochs_run, "output_dir": output_dir, "model": training.state.model,
            "figure": str(figure) if figure else None}


def draw_figure(folder: runs.RunFolder | None) -> Path | None:
    """The run's own Fig. 5/6 (plots.py) from its metrics.jsonl, if this process writes a folder
    that has logged an evaluated epoch."""
    return plots.figure_of_run(folder.path) if folder is not None and folder.holds_metrics() else None


def evaluate_only(cfg: RunConfig, proc: runs.Process) -> dict:
    """Top-1 / top-5 of one of our checkpoints, or of a released ConViT .pth (e.g. on ImageNet val)."""
    path, runtime = cfg.runtime.checkpoint, cfg.runtime
    checkpoint = checkpoints.read_checkpoint_file(path)  # before the data: a wrong file fails at once
    _train_set, val_set, num_classes = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    ours = "cfg" in checkpoint
    if not ours:  # a released checkpoint: keep its head, so that its class indices still count
        state = checkpoint.get("model", checkpoint)
        head = state.get("head.weight") if isinstance(state, dict) else None
        num_classes = head.shape[0] if torch.is_tensor(head) and head.shape[0] > num_classes else num_classes
    model = build_model(cfg, num_classes).to(proc.device)
    if ours:
        checkpoints.check_same_model(checkpoint, model, path)
    checkpoints.load_checkpoint(model, path, verbose=proc.rank == 0 and not runtime.quiet)
    masked = mask_at_test_time(model, runtime)
    val_shard = Subset(val_set, range(proc.rank, len(val_set), proc.world))
    loader = DataLoader(val_shard, cfg.recipe.batch_size, num_workers=runtime.workers or 0,
                        pin_memory=proc.device.type == "cuda")
    show = proc.rank == 0 and not (runtime.quiet or runtime.no_progress) and sys.stderr.isatty()
    result = evaluate(model, loader, proc, mixed_precision(proc.device, runtime.amp, runtime.amp_dtype), show)
    if proc.rank == 0:
        print(f"{path} on {cfg.data.dataset} ({len(val_set)} images{''.join(', ' + m for m in masked)}): top-1 "
              f"{result['val_top1']:.2f}%  top-5 {result['val_top5']:.2f}%  loss {result['val_loss']:.4f}", flush=True)
    return {**result, "epoch": checkpoint.get("epoch", 0), "epochs_run": 0, "output_dir": runtime.output_dir,
            "figure": None, "model": model, "masked": masked}


def mask_at_test_time(model: convit.ConViT, runtime: config.Runtime) -> list[str]:
    """Table 5's --mask-pos-embed and Tab. 6's --mask-content / --mask-position K (config.py has
    refused a K beyond the model's GPSA blocks, and both at once); returns what was masked, in words."""
    masked = []
    if runtime.mask_pos_embed:
        if model.pos_embed is None:
            raise TrainError(f"--mask-pos-embed: {runtime.checkpoint} was trained with --no-pos-embed; there is no "
                             f"position embedding to mask")
        model.mask_pos_embed()
        masked.append("position embedding masked")
    for first, gate, term in ((runtime.mask_content, 1, "content"), (runtime.mask_position, 0, "position")):
        if first:
            probes.mask_gates(model, first, gate)
            blocks = f"blocks 1-{first}" if first > 1 else "block 1"
            masked.append(f"{term} masked in GPSA {blocks} (sigma(lambda) = {gate})")
    return masked


# ---------------------------------------------------------------------------------------
# A configuration in, the final metrics out; and the command line
# ---------------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the line that says which checkpoint the run can continue from."""


def run(cfg: RunConfig, resumed: dict | None = None, notes: list[str] = ()) -> dict:
    """Train (or with --eval-only, evaluate) as `cfg` says; `resumed` is the checkpoint that a
    --resume continues (configure reads it), `notes` what to print once the run goes ahead.
    Returns the final metrics: epoch, val_loss, val_top1, val_top5 (percent), epochs_run,
    output_dir, figure, and the trained `model` (unwrapped, on its device); with --eval-only also
    `masked`, what was masked, in words. Raises a ValueError on bad input; never exits the
    interpreter, and leaves no process group behind unless torchrun made one. Ctrl-C raises
    Interrupted (a KeyboardInterrupt) naming the checkpoint to continue from. A run that stops
    before its first checkpoint leaves its folder as it found it (an overwritten run back in
    place), and its error line says so."""
    started, runtime = time.time(), cfg.runtime
    proc = runs.start_process(runtime.device)
    threads_before, folder = torch.get_num_threads(), None
    torch.set_num_threads(runtime.threads or threads_before)
    try:
        if runtime.eval_only:
            return evaluate_only(cfg, proc)
        folder = runs.claim(runtime.output_dir, runtime.overwrite, runtime.resume, proc)  # before the data: refused at once
        return train(setup(cfg, proc, resumed, folder, notes))
    except KeyboardInterrupt:
        if runtime.eval_only:
            raise Interrupted("interrupted (evaluation only: nothing to continue)") from None
        draw_when_stopped(None if runtime.no_figure else folder)
        raise Interrupted(runs.where_to_continue(runtime.output_dir, runtime.resume, started) + give_up(folder)) from None
    except ValueError as err:
        back = give_up(folder)
        if back:
            err.args = (cli.one_line(err) + back,)
        raise
    except BaseException:
        give_up(folder)
        raise
    finally:  # leave the interpreter as we found it: lessons call run() in-process
        if folder is not None:
            folder.release()
        torch.set_num_threads(threads_before)
        if proc.started_group:
            dist.destroy_process_group()


def give_up(folder: runs.RunFolder | None) -> str:
    """The folder as the run found it, if it stopped before its first checkpoint (RunFolder.give_up)."""
    return folder.give_up() if folder is not None else ""


def draw_when_stopped(folder: runs.RunFolder | None):
    """Ctrl-C: the figure of the epochs done so far, if it can be had at once; the message
    that names the checkpoint comes first, so nothing here may stop it."""
    try:
        draw_figure(folder)
    except (ValueError, KeyboardInterrupt):
        pass


def configure(settings: dict) -> tuple[RunConfig, dict | None, list[str]]:
    """The configuration of the command whose typed flags are `settings` (config.parse), with
    --resume the checkpoint it continues (else None), and a new run's notes, which run() prints
    only once the run goes ahead: a refused run prints its reason alone."""
    if settings.get("resume") is None or settings.get("eval_only"):
        cfg, notes = config.resolve(settings)
        return cfg, None, notes
    folder = Path(settings["resume"])
    runs.settle(folder if folder.is_dir() else folder.parent)  # an --overwrite of it killed outright
    path = checkpoints.find_checkpoint(settings["resume"], "--resume")
    checkpoint = checkpoints.read_resumable(path)
    return config.resume(settings, checkpoint, path), checkpoint, []


def main(argv: list[str] | None = None) -> dict:
    """train.py's command line, in-process: run() of the configuration its flags give."""
    return run(*configure(config.parse(argv)))


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
