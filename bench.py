"""Measuring ConViT: Table 1 on this machine, and ConViT-Ti against the same-size baseline.

    python bench.py                    # Table 1: params, MACs, img/s and the ConViT/DeiT ratio, every pair
    python bench.py --sizes tiny --rounds 1 --batch-size 2     # one pair, in seconds
    python bench.py --compare          # ConViT-Ti (fused, explicit) against the same-size baseline:
                                       # inference, a training step, and the activations kept for backward
    python bench.py --small            # lesson 6's ConViT and DeiT (28x28 digits, a 7x7 grid): train.py's step
    python bench.py --small --before /tmp/old   # ... beside the same models built by an older checkout's convit.py
    python bench.py --small --compile  # ... compiled, beside the same models left eager
    python bench.py --small --profile  # where the time of that step goes, by kind of work (torch.profiler)

The model lives in convit.py; this file only times it. docs/speed.md holds what it measured here
and how to read it.

How a ratio is measured (time_interleaved): the models of one comparison run one after the other
in every round, the order rotated from round to round, and a model's ratio is the median over
rounds of the baseline's time divided by its own time in the same round. A slow spell of a shared
machine then stretches both times of a ratio alike. img/s comes from each model's median time,
so img/s ratios and the printed ratio can differ a little.

Contents, in file order:
    count_macs                     multiply-accumulates per image (torch's FLOP counter)
    Timing, time_interleaved       the timing rule above
    inference_job, training_job    what is timed: a forward pass, or forward + backward + AdamW
    activation_memory              the bytes autograd keeps for backward, counted exactly
    BASELINE, comparison_models    ConViT-Ti on both paths and the same-size baseline
    SMALL, small_models, code_from lesson 6's models, built by this convit.py or an older one
    PAPER_SPEED                    Table 1's img/s of the paper (the one copy in the project)
    print_table1, print_comparison, print_small
    PROFILE_KINDS, profile_shares, print_small_profile   --small --profile
    Settings, build_parser, check, main   the flags, each with its range, checked first
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cli
from convit import ConViT, ConViTConfig, count_parameters, create_model, explicit_twin


def count_macs(model: ConViT) -> int:
    """Multiply-accumulates per image, counted by torch's own FLOP counter (1 MAC = 2 FLOPs).

    Counted on the explicit path, whose matrix products the counter sees one by one; the fused
    path performs the same products inside its kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    explicit = model.cfg.fused
    model.set_fused(False)
    images = torch.zeros(1, model.cfg.in_chans, *model.cfg.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    model.set_fused(explicit)
    return counter.get_total_flops() // 2


class Timing(NamedTuple):
    seconds: float  # median seconds per call
    speed_ratio: float  # median over rounds of (baseline's seconds / this job's seconds); 1.0 for the baseline
    times: tuple[float, ...]  # seconds of each round, for ratios between any two jobs (speed_ratio_between)


def speed_ratio_between(job: Timing, reference: Timing) -> float:
    """Median over rounds of reference's seconds / job's seconds, each pair timed in the same round."""
    return statistics.median(r / t for r, t in zip(reference.times, job.times))


def time_interleaved(jobs: dict[str, callable], rounds: int, warmup: int = 1, device: str = "cpu",
                     clock: callable | None = None) -> dict[str, Timing]:
    """Time each job once per round, the order of the jobs rotated every round, and compare
    each with the first job (the baseline) within the same round.

    Why per-round ratios: on a shared machine a slow spell stretches every job timed during it.
    The ratio of two jobs timed one after the other in the same round cancels that spell; the
    ratio of two separate medians does not. Why rotate: a job that always runs right after
    another one (or always first, with cold caches) would carry that position's cost in every
    round; rotating spreads it over all jobs. The median of the per-round ratios ignores the
    odd round that a spell hit half-way through.

    `clock` defaults to the wall clock; time.thread_time (CPU time of this thread) leaves out the
    time other programs take from the core, and is right only when torch runs on one thread."""
    clock = clock or time.perf_counter
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)  # GPU work is async
    names = list(jobs)
    for job in jobs.values():
        for _ in range(warmup):
            job()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # round r starts with job r
            sync()
            start = clock()
            jobs[name]()
            sync()
            times[name].append(clock() - start)
    baseline = times[names[0]]
    return {name: Timing(statistics.median(ts), statistics.median(b / t for b, t in zip(baseline, ts)), tuple(ts))
            for name, ts in times.items()}


def inference_job(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None):
    """A forward pass without grad, in fp32 or (amp_dtype) under autocast."""
    model.eval()

    def run():
        with torch.no_grad(), torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            model(images)

    return run


def training_job(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None,
                 as_train_py: bool = False):
    """Forward, backward and one AdamW step, in fp32 or (amp_dtype) under autocast. as_train_py:
    the step as train.py runs it, with its label smoothing (0.1), its fused AdamW, and the loss
    read back as a number (which waits for a GPU)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=as_train_py or None)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)

    def run():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1 if as_train_py else 0.0)
        loss.backward()
        optimizer.step()
        if as_train_py:
            loss.item()

    return run


def activation_memory(model: nn.Module, images: torch.Tensor) -> float:
    """MiB of activations a training step holds for backward: every distinct tensor storage
    that autograd saves during the forward pass, counted exactly (the weights that autograd keeps
    for the inputs' gradients included: 22 MiB of ConViT-Ti's).

    This is what grows with the batch and what differs between the fused and explicit paths
    (weights, gradients and optimiser state are the same for both): the part of the peak that
    torch.cuda.max_memory_allocated would see move on a GPU. The CPU has no such counter."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    return sum(storages.values()) / 2**20


BASELINE = "same-size baseline"  # convit_tiny with local_up_to_layer=0: ConViT-Ti with no GPSA block


def comparison_models(img_size: int | tuple[int, int] = 224) -> dict[str, ConViT]:
    """ConViT-Ti on both paths (sharing weights) and, first, the same-size baseline: convit_tiny with
    local_up_to_layer=0, the same width, heads and blocks with plain MHSA in place of GPSA. It
    differs from ConViT-Ti only where GPSA does, so it is the fair yardstick for GPSA's speed
    (DeiT-Ti itself has 3 heads, a qkv bias and one more position: see convit.MODEL_PRESETS)."""
    fused = create_model("convit_tiny", img_size=img_size)
    return {BASELINE: create_model("convit_tiny", img_size=img_size, local_up_to_layer=0),
            "convit fused": fused, "convit explicit": explicit_twin(fused)}


# Lesson 6's models (lessons/_protocol.py's RECIPE on train.py's small preset): MNIST-10k's 28x28
# grey digits in 4x4 patches (a 7x7 grid; 2x2 patches make it 14x14), C 48, H 4, 4 blocks, batch 64.
# DeiT is DeiT's own network at that size; the ConViT makes all blocks GPSA but the last two.
SMALL = dict(img_size=28, in_chans=1, num_classes=10, embed_dim=48, num_heads=4, depth=4)
SMALL_MODELS = {"deit_tiny": {}, "convit_tiny": {"local_up_to_layer": 2}}


def small_models(patch_size: int = 4, model_code=None) -> dict[str, ConViT]:
    """Lesson 6's DeiT and ConViT, built by `model_code` (a convit module; default this one)."""
    build = (model_code.create_model if model_code else create_model)
    return {name: build(name, patch_size=patch_size, **SMALL, **extra) for name, extra in SMALL_MODELS.items()}


def code_from(folder) -> object:
    """The convit.py of another checkout (e.g. `git worktree add /tmp/old main`), imported under
    its own name, so that models built by the old and the new code can be timed side by side."""
    spec = importlib.util.spec_from_file_location("convit_before", os.path.join(folder, "convit.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def twins_before(folder, patch_size: int, models: dict[str, ConViT]) -> dict[str, ConViT]:
    """`models` as the convit.py in `folder` builds them, with the same weights. That file is
    another checkout's code, which may not parse, build these models or take these weights:
    whatever it raises is one line naming --before, not a traceback from inside it."""
    try:
        twins = small_models(patch_size, code_from(folder))
        for name, twin in twins.items():
            twin.load_state_dict(models[name].state_dict())
    except Exception as err:  # noqa: BLE001 - foreign code can raise anything; we only name it
        raise ValueError(f"--before {folder}: its convit.py cannot build lesson 6's models with these weights "
                         f"({type(err).__name__}: {cli.one_line(err, limit=300)})") from None
    return twins


# Table 1's pairs, and the paper's throughput: img/s, fp32, batch 128, on a Quadro GP100.
TABLE1_SIZES = ["tiny", "tiny_plus", "small", "small_plus", "base", "base_plus"]
PAPER_SPEED = {"deit_tiny": 1442, "convit_tiny": 734, "deit_tiny_plus": 1036, "convit_tiny_plus": 625,
               "deit_small": 587, "convit_small": 305, "deit_small_plus": 480, "convit_small_plus": 382,
               "deit_base": 187, "convit_base": 141, "deit_base_plus": 114, "convit_base_plus": 96}


def markdown_row(cells: list, widths: list[int]) -> str:
    """One row of a markdown table, the first cell left-aligned and the others right-aligned."""
    return "| " + " | ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, w) in enumerate(zip(cells, widths))) + " |"


def markdown_header(cells: list, widths: list[int]) -> str:
    """A markdown table's header row and the rule under it."""
    return markdown_row(cells, widths) + "\n|" + "|".join("-" * (w + 2) for w in widths) + "|"


def clock(args):
    """--cpu-time: the main thread's CPU time, which one thread makes the whole job's."""
    return time.thread_time if getattr(args, "cpu_time", False) else time.perf_counter


def load_average() -> str:
    """The machine's load, printed beside every figure: above the number of cores, other programs
    were waiting for them, and the figures are noisier."""
    return f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if hasattr(os, "getloadavg") else ""


def settings(args, batch: int, side: int | None = None) -> str:
    """What every measured ratio depends on, printed beside it."""
    precision = "bf16 autocast" if getattr(args, "amp", False) else "fp32"
    precision += ", torch.compile" if getattr(args, "compile", False) else ""
    timed = "CPU time of the thread" if getattr(args, "cpu_time", False) else "wall clock"
    load = load_average()
    side = side or getattr(args, "img_size", 224)
    return (f"{args.device}, {precision}, batch {batch}, {side}x{side}, {torch.get_num_threads()} thread(s), {timed}, "
            f"{args.rounds} rounds, order rotated every round{load}")


def prepared(model: nn.Module, args) -> nn.Module:
    """The model on args.device, compiled with --compile (compiling happens at the warm-up call)."""
    model = model.to(args.device)
    return torch.compile(model) if getattr(args, "compile", False) else model


def print_table1(args):
    """Each DeiT row of Table 1 is timed interleaved with its ConViT row (fused and explicit),
    so the ConViT/DeiT ratios are fair even on a noisy machine."""
    side = getattr(args, "img_size", 224)
    images = torch.randn(args.batch_size, 3, side, side, device=args.device)
    amp_dtype = torch.bfloat16 if getattr(args, "amp", False) else None
    print(f"Table 1 measured here: {settings(args, args.batch_size)}")
    print(f"vs DeiT: speed / the DeiT's speed, median of {args.rounds} per-round ratios")
    header = ["model", "heads", "C", "params", "GMACs", "img/s", "vs DeiT", "paper img/s", "paper vs DeiT"]
    widths = [28, 5, 5, 7, 6, 8, 7, 11, 13]
    print(markdown_header(header, widths))
    for size in args.sizes:
        deit_name, convit_name = f"deit_{size}", f"convit_{size}"
        fused = create_model(convit_name, img_size=side)
        models = {deit_name: create_model(deit_name, img_size=side), convit_name + " (fused)": fused,
                  convit_name + " (explicit)": explicit_twin(fused)}
        macs = {name: count_macs(model) for name, model in models.items()}
        jobs = {name: inference_job(prepared(model, args), images, amp_dtype) for name, model in models.items()}
        timings = time_interleaved(jobs, args.rounds, device=args.device, clock=clock(args))  # the DeiT first: the baseline
        for name, model in models.items():
            base = name.split(" ")[0]
            speed = args.batch_size / timings[name].seconds
            paper_ratio = PAPER_SPEED[base] / PAPER_SPEED[deit_name]
            cells = [name, model.cfg.num_heads, model.cfg.embed_dim, f"{count_parameters(model) / 1e6:.1f}M",
                     f"{macs[name] / 1e9:.2f}", f"{speed:.1f}", f"{timings[name].speed_ratio:.2f}x", PAPER_SPEED[base],
                     f"{paper_ratio:.2f}x"]
            print(markdown_row(cells, widths), flush=True)


def print_comparison(args):
    """ConViT-Ti (fused and explicit) against the same-size baseline, which comparison_models puts first."""
    side = getattr(args, "img_size", 224)
    models = comparison_models(side)
    amp_dtype = torch.bfloat16 if getattr(args, "amp", False) else None
    for what, make_job, batch in (("inference", inference_job, args.batch_size),
                                  ("training step", training_job, args.train_batch_size)):
        if what == "training step" and args.inference_only:
            continue
        images = torch.randn(batch, 3, side, side, device=args.device)
        jobs = {name: make_job(prepared(model, args), images, amp_dtype) for name, model in models.items()}
        timings = time_interleaved(jobs, args.rounds, device=args.device, clock=clock(args))
        print(f"ConViT-Ti {what} against the {BASELINE} (convit_tiny, local_up_to_layer=0): {settings(args, batch)}")
        print(f"  {'model':<18} {'img/s':>8}   speed / the baseline's: median of {args.rounds} per-round ratios")
        for name, timing in timings.items():
            ratio = "(the baseline)" if name == BASELINE else f"{timing.speed_ratio:.3f}x"
            print(f"  {name:<18} {batch / timing.seconds:8.1f}   {ratio}", flush=True)
    if args.inference_only:
        return
    memory_images = torch.randn(args.memory_batch_size, 3, side, side, device=args.device)
    print(f"training memory at batch {args.memory_batch_size}: activations saved for backward (exact count):")
    for name, model in models.items():
        print(f"  {name:<18} {activation_memory(model, memory_images):8.0f} MiB")


def print_small(args):
    """Lesson 6's DeiT and ConViT: train.py's training step and an evaluation pass (batch 2 x 64, as
    train.py's validation loader). Each model runs in the same rounds as a reference twin with the
    same weights, and the speed-up is printed: with --before, the model as another checkout's
    convit.py builds it; else with --compile, the model left eager (the compiling time is printed)."""
    side = SMALL["img_size"]
    grid = side // args.patch_size
    amp_dtype = torch.bfloat16 if getattr(args, "amp", False) else None
    compiling = getattr(args, "compile", False)
    models = small_models(args.patch_size)
    reference, twins = None, {}
    if args.before:
        reference, twins = "before", twins_before(args.before, args.patch_size, models)
    elif compiling:
        reference, twins = "eager", {name: copy.deepcopy(model) for name, model in models.items()}
    for what, make_job, batch in (("training step", partial(training_job, as_train_py=True), args.train_batch_size),
                                  ("evaluation", inference_job, 2 * args.train_batch_size)):
        images = torch.randn(batch, SMALL["in_chans"], side, side, device=args.device)
        print(f"lesson 6's models, {what}, {grid}x{grid} grid (patch {args.patch_size}): {settings(args, batch, side)}")
        jobs = {}
        for name, model in models.items():
            if name in twins:
                twin = twins[name].to(args.device) if reference == "eager" else prepared(twins[name], args)
                jobs[f"{name} {reference}"] = make_job(twin, images, amp_dtype)
            jobs[name] = make_job(prepared(model, args), images, amp_dtype)
            if compiling:  # compiling happens at the first call
                started = time.perf_counter()
                jobs[name]()
                print(f"  {name}: first call, compiling, {time.perf_counter() - started:.0f} s", flush=True)
        timings = time_interleaved(jobs, args.rounds, device=args.device, clock=clock(args))
        this = "compiled" if reference == "eager" else "now"
        columns = ["model", "img/s"] + ([f"{reference} img/s", f"{this} / {reference}"] if reference else [])
        widths = [11, 7, 12, 17][: len(columns)]
        print(markdown_header(columns, widths))
        for name in models:
            cells = [name, f"{batch / timings[name].seconds:.0f}"]
            if reference:
                twin = timings[f"{name} {reference}"]
                cells += [f"{batch / twin.seconds:.0f}", f"{speed_ratio_between(timings[name], twin):.3f}x"]
            print(markdown_row(cells, widths), flush=True)


# What --small --profile sorts torch.profiler's operations into (their self time, on a CPU).
PROFILE_KINDS = {
    "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention kernel, forward": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "attention kernel, backward": ("aten::_scaled_dot_product_flash_attention_for_cpu_backward",),
    "GELU, forward and backward": ("aten::gelu", "aten::gelu_backward"),
    "LayerNorm, forward and backward": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "copies (copy_, cat)": ("aten::copy_", "aten::cat"),
}
PROFILE_REST = "everything else: elementwise ops, Python, dispatch, autograd"


def profile_shares(job: callable, steps: int) -> tuple[float, dict[str, float]]:
    """Milliseconds per call under torch.profiler, and each PROFILE_KINDS' share of the self time."""
    from torch.profiler import ProfilerActivity, profile

    job()
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the default also looks for a GPU: 14 s here
        for _ in range(steps):
            job()
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    shares = {kind: sum(event.self_cpu_time_total for event in events if event.key in names) / total
              for kind, names in PROFILE_KINDS.items()}
    return total / steps / 1000, {**shares, PROFILE_REST: 1 - sum(shares.values())}


def print_small_profile(args):
    """--small --profile: where the time of lesson 6's training step goes, by kind of work."""
    side = SMALL["img_size"]
    images = torch.randn(args.train_batch_size, SMALL["in_chans"], side, side)
    profiles = {name: profile_shares(training_job(model, images, as_train_py=True), args.rounds)
                for name, model in small_models(args.patch_size).items()}
    grid = side // args.patch_size
    load = load_average()
    print(f"lesson 6's models, training step, {grid}x{grid} grid (patch {args.patch_size}), torch.profiler over "
          f"{args.rounds} steps: cpu, fp32, batch {args.train_batch_size}, {torch.get_num_threads()} thread(s){load}")
    widths = [60] + [11] * len(profiles)
    print(markdown_header(["share of the self time", *profiles], widths))
    for kind in [*PROFILE_KINDS, PROFILE_REST]:
        print(markdown_row([kind, *(f"{shares[kind]:.0%}" for _, shares in profiles.values())], widths))
    print(markdown_row(["ms per step (the profiler adds some)", *(f"{ms:.1f}" for ms, _ in profiles.values())], widths))


@dataclass
class Settings:
    """bench.py's flags (but --sizes), each with its range: checked as train.py checks its own
    (cli.check_field), so that no measurement of nothing (a median of 0 rounds, img/s of empty
    batches) is ever printed."""

    batch_size: int = cli.flag("inference batch", 16, interval="[1, inf)")
    train_batch_size: int | None = cli.flag("training-step batch (--compare: default 32; --small: 64)",
                                            interval="[1, inf)")
    memory_batch_size: int = cli.flag("batch of the activation-memory count (with --compare)", 64, interval="[1, inf)")
    rounds: int = cli.flag("timed rounds per model (--profile: profiled steps)", 5, interval="[1, inf)")
    img_size: int = cli.flag("image side in pixels (the paper's Table 1: 224, 14 x 14 patches of 16); its "
                             "models and --compare's cut it into patches of 16", 224, interval="[1, inf)")
    device: str = cli.flag("torch device, e.g. cpu or cuda", "cuda" if torch.cuda.is_available() else "cpu")
    threads: int = cli.flag("CPU threads for torch", torch.get_num_threads(), interval="[1, inf)")
    compare: bool = cli.flag("instead: ConViT-Ti fused/explicit vs the same-size baseline: inference, training, memory",
                             False)
    inference_only: bool = cli.flag("with --compare: skip training and memory", False)
    small: bool = cli.flag("instead: lesson 6's DeiT and ConViT (28x28, C 48, H 4, 4 blocks), train.py's training "
                           "step at --train-batch-size (64, the lesson's) and an evaluation pass at twice that", False)
    patch_size: int = cli.flag("with --small: 4 makes the 7x7 grid of lesson 6, 2 a 14x14 grid", 4, choices=[2, 4, 7, 14])
    profile: bool = cli.flag("with --small, on a CPU: instead of timing, torch.profiler's op time by kind, over "
                             "--rounds steps", False)
    before: str | None = cli.flag("with --small: also time the models built by DIR/convit.py (an older checkout), in "
                                  "the same rounds, and print now / before (--small --compile alone: compiled / eager)",
                                  metavar="DIR")
    amp: bool = cli.flag("time under bf16 autocast instead of fp32", False)
    compile: bool = cli.flag("torch.compile every model first (at the warm-up call)", False)
    cpu_time: bool = cli.flag("with --threads 1: time the thread's CPU time, not the wall clock, so that time other "
                              "programs take from the core does not count (their use of caches and memory still does)",
                              False)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python bench.py",
                                description="Measure Table 1 (params, MACs, img/s, ConViT/DeiT) on this machine.")
    parser.add_argument("--sizes", nargs="*", default=TABLE1_SIZES, choices=TABLE1_SIZES,
                        help="which DeiT/ConViT pairs of Table 1 (default: all)")
    cli.add_flags(parser, Settings)
    return parser


def check(args):
    """Every flag in its range, the flags that contradict each other, and the image the models
    must tile: one line each, before anything is built, timed or printed."""
    for field in dataclasses.fields(Settings):
        cli.check_field(field, getattr(args, field.name))
    if args.cpu_time and args.threads != 1:
        raise ValueError("--cpu-time measures one thread: add --threads 1")
    cli.torch_device(args.device)  # a typo or a missing GPU: one line, before any model is built
    if args.small and args.compare:
        raise ValueError("--small and --compare are two different measurements: give one")
    check_read(args)
    if (args.before or args.profile) and not args.small:
        raise ValueError("--before and --profile work on lesson 6's models: add --small")
    if args.profile and (args.before or args.compile or args.amp):
        raise ValueError("--profile profiles lesson 6's eager fp32 step: leave out --before, --compile and --amp")
    if args.profile and args.device != "cpu":
        raise ValueError("--profile sorts the CPU's operations: add --device cpu")
    if args.before and not os.path.isfile(os.path.join(args.before, "convit.py")):
        raise ValueError(f"--before {args.before}: no convit.py there; give the root of a checkout of this project")
    if not args.small:  # Table 1's models and --compare's: ConViTConfig's own check, named by the flag
        try:
            ConViTConfig(img_size=args.img_size)
        except ValueError as err:
            raise ValueError(f"--img-size {args.img_size}: {err}") from None


# The measurements that read each flag; a flag typed for another would be silently ignored, so a
# value other than its default is refused.
TABLE1 = "Table 1 (neither --small nor --compare)"
READ_BY = {"sizes": [TABLE1], "batch_size": [TABLE1, "--compare"], "img_size": [TABLE1, "--compare"],
           "train_batch_size": ["--compare", "--small"], "memory_batch_size": ["--compare"],
           "inference_only": ["--compare"], "patch_size": ["--small"]}


def check_read(args):
    """Refuse, in one line, a flag given a value that this measurement would not read."""
    measurement = "--small" if args.small else "--compare" if args.compare else TABLE1
    defaults = {field.name: field.default for field in dataclasses.fields(Settings)} | {"sizes": TABLE1_SIZES}
    for name, readers in READ_BY.items():
        if measurement not in readers and getattr(args, name) != defaults[name]:
            raise ValueError(f"--{name.replace('_', '-')} is read only by {' and '.join(readers)}, "
                             f"not by {measurement}")


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    check(args)
    args.train_batch_size = args.train_batch_size or (64 if args.small else 32)
    torch.set_num_threads(args.threads)
    if args.small:
        print_small_profile(args) if args.profile else print_small(args)
    else:
        print_comparison(args) if args.compare else print_table1(args)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
