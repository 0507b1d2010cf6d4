"""Run this first on any machine with a GPU: every line of the project that does something only
on CUDA, checked in one unattended command, with one report.

    python tools/gpu_check.py                        # on a GPU: every check, within 8 minutes (--budget)
    python tools/gpu_check.py --out gpu-report       # the report and the runs there (default: a new temporary folder)
    python tools/gpu_check.py --checks gpsa_paths train_resume     # some checks only (--help lists them)
    python tools/gpu_check.py --device cpu --smoke   # the checks' own plumbing on a CPU, tiny sizes, about a minute

On a machine without CUDA it says so in one line and exits 0. docs/gpu.md says what each check
covers and what its result would change in the README.

How it is built. Each check is a function that measures (in this process, or by running
train.py, bench.py or a lesson through its command line in a subprocess) and returns a record:
passed (True, False, or None for skipped), a one-line reason and its figures. Whether it passed
is decided by a pure `judge_*` function of the measured figures, so that test_gpu_check.py can
prove every decision on a CPU with crafted figures. A check that fails or crashes is recorded
and the next one runs; a check that would start after the time budget is skipped, and says so.
The report (gpu_check.json in the output folder) is rewritten after every check, so a run
stopped half-way still leaves one.

Exit code: 0 when no check failed (passed or skipped), 1 when one did, 2 for bad flags, 130 for
Ctrl-C (which stops the check's subprocesses too).

Contents, in file order: sizes and tolerances -> records and the runner -> subprocesses ->
the checks, each with its judge (device, gpsa_paths, table1, compare, train_resume,
fp16_scaler, train_compile, cifar10, torchrun, nccl, lesson6_time, device_flags) -> CHECKS,
the order they run in -> the command line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # convit.py and bench.py live in the repository root

import bench  # noqa: E402
import cli  # noqa: E402
from convit import create_model, explicit_twin  # noqa: E402


# ---------------------------------------------------------------------------------------
# Sizes and tolerances
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """How big each check is: the real thing on a GPU, or tiny (--smoke) to prove the plumbing."""

    table1_sizes: tuple[str, ...]  # Table 1's pairs to time
    batch: int  # images per timed call: the paper's Table 1 measured at 128
    img_size: int  # 224, the paper's
    rounds: int  # timed rounds per model (bench.time_interleaved)
    compare_jobs: tuple[str, ...]  # what `compare` times: "inference" and "training step"
    run_flags: tuple[str, ...]  # train.py's model and data for the training checks
    min_top1: float | None  # cifar10's one-epoch run must beat this top-1 (%); None: too short to judge


# Lesson 6's model (C 48, H 4, 4 blocks, batch 64, lr 4e-3) on MNIST-10k's 8,000 training
# digits: 125 steps an epoch. Drop path, MixUp and RandAugment (the small preset's) all draw
# random numbers, RandAugment on the GPU, so that a resume that lost a random state would show.
RUN_BATCH = 64
LESSON_MODEL = ("--dataset", "mnist10k", "--model", "convit_tiny", "--embed-dim", "48", "--num-heads", "4",
                "--depth", "4", "--batch-size", str(RUN_BATCH), "--lr", "4e-3", "--warmup-epochs", "0",
                "--drop-path", "0.1", "--mixup", "0.8")
FULL = Sizes(tuple(bench.TABLE1_SIZES), 128, 224, 5, ("inference", "training step"), LESSON_MODEL,
             min_top1=20.0)  # twice chance on 10 digits
# argparse keeps a flag's last value: the smoke runs shrink lesson 6's model and data to seconds.
SMOKE = Sizes(("tiny",), 2, 32, 1, ("inference",), LESSON_MODEL + ("--embed-dim", "16", "--depth", "2",
                                                                   "--data-fraction", "0.1", "--threads", "1"),
              min_top1=None)

# The CPU tests' tolerances (test_convit, test_precision). fp32: torch.allclose(atol=1e-5), whose
# rtol is 1e-5. Low precision, with u = eps / 2 of the type: the two paths within 16u of each other
# and each within 8u of the fp32 result, relative to the largest entry of the fp32 result.
FP32_ATOL = FP32_RTOL = 1e-5
UNIT_ROUNDOFF = {"tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}  # tf32 keeps fp16's 10 mantissa bits
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FUSED_SPEED_TARGET = 0.95  # docs/speed.md: fused ConViT-Ti at no less than 0.95x the same-size baseline
DRIFT_FACTOR = 4  # a nondeterministic resume may drift up to this many times two uninterrupted runs' drift
LESSON_MARGIN = 1.0  # points of top-1 that lesson 6's GPU run may fall outside its CPU seeds' range
# The run the check repeats on the GPU: lesson 6's ConViT at f = 100%, 24 epochs, from the earlier
# equal-steps protocol, whose JSON keeps each run's CPU seconds (the converged tables read theirs from records).
LESSON6_SUMMARY = REPO_ROOT / "lessons" / "figures" / "06_equal_steps.json"


# ---------------------------------------------------------------------------------------
# Records and the runner
# ---------------------------------------------------------------------------------------
def outcome(passed: bool | None, reason: str, **figures) -> dict:
    """What a check returns: passed (None = skipped), one line saying why, and its figures."""
    return {"passed": passed, "reason": reason, "figures": figures}


@dataclass
class Context:
    device: str  # "cuda" or "cpu"
    smoke: bool
    out: Path  # the report and every run folder go here
    budget: float  # seconds for all checks together
    cifar_dir: Path
    started: float = 0.0  # time.monotonic() when the checks began

    @property
    def sizes(self) -> Sizes:
        return SMOKE if self.smoke else FULL

    @property
    def on_cuda(self) -> bool:
        return self.device == "cuda"

    def seconds_left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def amp_dtype(self) -> str:
        """The autocast dtype that train.py picks by default on this device (bf16 where it exists)."""
        return "fp16" if self.on_cuda and not torch.cuda.is_bf16_supported() else "bf16"


class Check(NamedTuple):
    name: str
    title: str
    run: Callable[[Context], dict]


def run_checks(checks: list[Check], ctx: Context, report: Path, header: dict) -> list[dict]:
    """Every check in order, each recorded whatever happens to it; the report rewritten after each."""
    ctx.started = time.monotonic()
    results = []
    write_report(report, header, results, 0.0)
    for check in checks:
        elapsed = time.monotonic() - ctx.started
        print(f"[{elapsed:4.0f} s] {check.name}: {check.title}", flush=True)
        if ctx.seconds_left() <= 0:
            result = outcome(None, f"skipped: the time budget of {ctx.budget:g} s was spent before it started")
        else:
            try:
                result = check.run(ctx)
            except Exception as err:  # one check's crash must not stop the others
                result = outcome(False, f"crashed: {type(err).__name__}: {err}".splitlines()[0],
                                 traceback=traceback.format_exc())
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next check starts with the GPU's memory free
        result = {"name": check.name, "title": check.title, **result,
                  "seconds": round(time.monotonic() - ctx.started - elapsed, 1)}
        results.append(result)
        print(f"         {verdict(result['passed'])}: {result['reason']} ({result['seconds']:.0f} s)", flush=True)
        write_report(report, header, results, time.monotonic() - ctx.started)
    return results


def verdict(passed: bool | None) -> str:
    return {True: "passed", False: "FAILED", None: "skipped"}[passed]


def portable(text: str, out: Path) -> str:
    """`text` with no path of this machine in it, so that a report can be kept in the repository:
    the folder that holds the report as $OUT, this Python as python, the repository's files from
    its root (in that order: either of the first two may lie inside the repository)."""
    for path, name in ((str(out), "$OUT"), (sys.executable, "python"), (f"{REPO_ROOT}{os.sep}", "")):
        text = text.replace(path, name)
    return text


def write_report(path: Path, header: dict, results: list[dict], seconds: float):
    summary = {word: sum(verdict(r["passed"]) == word for r in results) for word in ("passed", "FAILED", "skipped")}
    report = {**header, "seconds": round(seconds, 1), "checks": results,
              "summary": {"passed": summary["passed"], "failed": summary["FAILED"], "skipped": summary["skipped"]}}
    path.write_text(portable(json.dumps(report, indent=1, default=str), path.parent) + "\n")


def format_table(results: list[dict]) -> str:
    """The report as a markdown table: one row per check."""
    rows = ["| check | result | seconds | what it found |", "|---|---|---:|---|"]
    rows += [f"| {r['name']} | {verdict(r['passed'])} | {r['seconds']:.0f} | {r['reason'].replace('|', '/')} |"
             for r in results]
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------
# Subprocesses: train.py, torchrun, bench.py and a lesson, through their command lines
# ---------------------------------------------------------------------------------------
class Finished(NamedTuple):
    returncode: int | None  # None: stopped when the time budget ran out
    seconds: float  # from the start until it was seen to end
    log: Path  # its stdout and stderr


def run_commands(commands: list[list[str]], logs: list[Path], ctx: Context) -> list[Finished]:
    """Run the commands side by side, each in a process group of its own (torchrun has children),
    and stop any still running when the time budget is spent."""
    started = time.monotonic()
    running = []
    for argv, log in zip(commands, logs, strict=True):
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:  # the child keeps its own copy of the file descriptor
            running.append(subprocess.Popen([str(a) for a in argv], cwd=REPO_ROOT, stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True))
    finished = []
    try:
        for process, log in zip(running, logs):
            try:
                code = process.wait(timeout=max(ctx.seconds_left(), 1.0))
            except subprocess.TimeoutExpired:
                code = None  # stopped below
            finished.append(Finished(code, round(time.monotonic() - started, 1), log))
    finally:  # the budget ran out, or Ctrl-C (which a new session does not pass on): nothing outlives the check
        for process in running:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return finished


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def trouble(finished: list[Finished]) -> dict | None:
    """The record of the first command that did not end well, or None when all exited with 0."""
    for run in finished:
        if run.returncode is None:
            return outcome(None, f"stopped: the time budget ran out while it ran (log: {run.log})")
        if run.returncode != 0:
            return outcome(False, f"exit code {run.returncode}: {last_line(run.log)} (log: {run.log})")
    return None


def train_command(ctx: Context, *flags) -> list[str]:
    """train.py on this device, without the figure or the progress bar (a log file is no terminal)."""
    return [sys.executable, "train.py", "--device", ctx.device, "--no-figure", "--no-progress", *flags]


def run_result(folder: Path) -> dict:
    """A finished run: its metrics lines and its checkpoint, read as data (weights_only)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checkpoint = torch.load(folder / "checkpoint.pth", map_location="cpu", weights_only=True)
    return {"records": records, "checkpoint": checkpoint}


def steps_of(record: dict, batch: int) -> int:
    """Optimiser steps of a logged epoch: train.py logs images/s = steps x batch / epoch_seconds."""
    return round(record["images_per_second"] * record["epoch_seconds"] / batch)


# ---------------------------------------------------------------------------------------
# 1. device: the device, the driver, CUDA and torch
# ---------------------------------------------------------------------------------------
def judge_device(works: bool, capability: tuple[int, int] | None) -> tuple[bool, str]:
    if not works:
        return False, "a tensor operation on the device failed"
    if capability is None:
        return True, "CPU only: the GPU checks below are skipped or run their CPU form"
    note = "" if capability >= (7, 0) else "; torch.compile's Triton needs compute capability 7.0: train_compile fails"
    return True, f"compute capability {capability[0]}.{capability[1]}{note}"


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def check_device(ctx: Context) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(), "cores": os.cpu_count()}
    capability = None
    if ctx.on_cuda:
        props = torch.cuda.get_device_properties(0)
        capability = (props.major, props.minor)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", driver=driver_version(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    works = (torch.ones(2, device=ctx.device) * 2).sum().item() == 4.0
    passed, reason = judge_device(works, capability)
    print("         " + ", ".join(f"{key} {value}" for key, value in info.items()), flush=True)
    return outcome(passed, f"{info.get('gpu', info['cpu'])}: {reason}", **info)


# ---------------------------------------------------------------------------------------
# 2. gpsa_paths: fused and explicit GPSA agree on the GPU, outputs and gradients
# ---------------------------------------------------------------------------------------
def allclose_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (atol + rtol |b|): torch.allclose's rule as a number, at most 1 where it holds."""
    a, b = a.double(), b.double()
    return ((a - b).abs() / (FP32_ATOL + FP32_RTOL * b.abs())).max().item()


def rounding_ratio(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor, units: int, u: float) -> float:
    """max |a - b| / (units x u x max |reference|): test_precision's rule as a number, at most 1 where it holds."""
    return ((a.double() - b.double()).abs().max() / (units * u * reference.double().abs().max())).item()


def judge_agreement(worst: dict[str, tuple[float, str]]) -> tuple[bool, str]:
    """worst: for each precision, the largest difference as a share of its tolerance, and where."""
    over = {mode: (ratio, where) for mode, (ratio, where) in worst.items() if not ratio <= 1.0}  # NaN is over
    shares = ", ".join(f"{mode} {ratio:.2f}" for mode, (ratio, _) in worst.items())
    if over:
        mode, (ratio, where) = max(over.items(), key=lambda item: item[1][0] if math.isfinite(item[1][0]) else math.inf)
        return False, f"{mode}: {where} at {ratio:.2f}x its tolerance (each precision, share of tolerance: {shares})"
    return True, f"largest difference as a share of the CPU tests' tolerance: {shares}"


def perturbed_pair(embed_dim: int, device: str):
    """test_precision's model (3 GPSA + 1 MHSA blocks on an 8 x 8 grid) with gates and v_pos moved
    off their init, and its explicit twin with the same weights."""
    torch.manual_seed(0)
    fused = create_model("convit_tiny", img_size=32, patch_size=4, depth=4, local_up_to_layer=3, num_classes=10,
                         embed_dim=embed_dim)
    with torch.no_grad():
        for layer in fused.gpsa_layers():
            layer.pos_proj.weight.mul_(1 + 0.1 * torch.randn_like(layer.pos_proj.weight))
            layer.gating_param.normal_()
    return fused.to(device), explicit_twin(fused).to(device)


@contextmanager
def tf32(enabled: bool):
    """TF32 matrix products and convolutions on or off (a CPU ignores both)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def outputs_and_gradients(model, images, labels, mode: str):
    """Logits and every parameter's gradient in `mode`: fp32, tf32, or autocast in bf16 or fp16
    (fp16 with test_precision's fixed loss scale, 2^10, as a gradient scaler would scale it)."""
    model.zero_grad(set_to_none=True)
    scale = 2.0**10 if mode == "fp16" else 1.0
    with tf32(mode == "tf32"):
        with torch.autocast(images.device.type, dtype=AMP_DTYPES.get(mode, torch.bfloat16), enabled=mode in AMP_DTYPES):
            logits = model(images)
        (F.cross_entropy(logits.float(), labels) * scale).backward()
    return logits.detach(), {name: p.grad / scale for name, p in model.named_parameters()}


def rounding_shares(tensors: dict[str, tuple], exact: dict[str, torch.Tensor], u: float,
                    against_fp32: bool = True) -> dict[str, float]:
    """test_precision's comparisons, each as a share of its tolerance: for each tensor, (fused,
    explicit) in low precision against each other (16u) and, if against_fp32, each against the fp32
    result (8u). The exact gradient of pos_proj's bias is 0 (the softmax removes a constant): both
    paths' are held to 16u of the weight's gradient instead."""
    shares = {}
    for what, (fused, explicit) in tensors.items():
        reference = exact[what]
        if what.endswith("pos_proj.bias"):
            scale = exact[what.replace("bias", "weight")]
            shares[f"{what}, fused vs 0"] = rounding_ratio(fused, torch.zeros_like(fused), scale, 16, u)
            shares[f"{what}, explicit vs 0"] = rounding_ratio(explicit, torch.zeros_like(explicit), scale, 16, u)
            continue
        shares[f"{what}, fused vs explicit"] = rounding_ratio(fused, explicit, reference, 16, u)
        if against_fp32:
            shares[f"{what}, fused vs fp32"] = rounding_ratio(fused, reference, reference, 8, u)
            shares[f"{what}, explicit vs fp32"] = rounding_ratio(explicit, reference, reference, 8, u)
    return shares


def worst_disagreement(fused, explicit, images, labels, mode: str, against_fp32: bool) -> tuple[float, str]:
    """The largest of every comparison the CPU tests make in `mode`, as a share of its tolerance, and which."""
    def named(logits, grads):
        return {"logits": logits} | {f"grad {name}": grad for name, grad in grads.items()}

    fused_out = named(*outputs_and_gradients(fused, images, labels, mode))
    explicit_out = named(*outputs_and_gradients(explicit, images, labels, mode))
    tensors = {what: (fused_out[what], explicit_out[what]) for what in fused_out}
    if mode == "fp32":
        shares = {f"{what}, fused vs explicit": allclose_ratio(a, b) for what, (a, b) in tensors.items()}
    else:
        exact = named(*outputs_and_gradients(explicit, images, labels, "fp32"))
        shares = rounding_shares(tensors, exact, UNIT_ROUNDOFF[mode], against_fp32)
    where = max(shares, key=lambda key: shares[key] if math.isfinite(shares[key]) else math.inf)
    return shares[where], where


# The models compared: C (H = 4 heads) -> whether each path is also held to 8u of the fp32 result.
# C = 48 is test_precision's model, with all its comparisons. Its head dim, 12, is no multiple of
# 8, which the GPU's fused 16-bit attention kernels (flash, memory-efficient) want, so there it
# runs the math kernel; C = 64 (head dim 16) takes those kernels. The bound against fp32 belongs
# to test_precision's model: at C = 64 it fails even on a CPU (a bf16 pos_proj.weight gradient of
# the explicit path lies 1.9 x 8u from fp32), so that model is held to the paths' agreement only.
GPSA_MODELS = {48: True, 64: False}


def check_gpsa_paths(ctx: Context) -> dict:
    modes = ["fp32", "tf32", "bf16", "fp16"] if ctx.on_cuda else ["fp32", "bf16", "fp16"]
    worst = {}
    for embed_dim, against_fp32 in GPSA_MODELS.items():
        fused, explicit = perturbed_pair(embed_dim, ctx.device)
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(3, 3, 32, 32, generator=generator).to(ctx.device)
        labels = torch.randint(0, 10, (3,), generator=generator).to(ctx.device)
        for mode in modes:
            worst[f"{mode} C={embed_dim}"] = worst_disagreement(fused, explicit, images, labels, mode, against_fp32)
    passed, reason = judge_agreement(worst)
    skipped = "" if ctx.on_cuda else " (tf32 exists only on CUDA)"
    return outcome(passed, reason + skipped,
                   worst={mode: {"share_of_tolerance": ratio, "where": where} for mode, (ratio, where) in worst.items()})


# ---------------------------------------------------------------------------------------
# 3. table1: Table 1's pairs at the paper's batch, fp32 and autocast, beside the GP100
# ---------------------------------------------------------------------------------------
def judge_table1(rows: list[dict]) -> tuple[bool, str]:
    """The fused path is the default because it is the faster: it must run at no less than
    FUSED_SPEED_TARGET of the explicit path's speed, in every pair and precision."""
    slow = []
    for row in rows:
        if row["path"] == "fused":
            explicit = next(r for r in rows if r["path"] == "explicit" and r["size"] == row["size"]
                            and r["precision"] == row["precision"])
            ratio = row["vs_deit"] / explicit["vs_deit"]
            if not ratio >= FUSED_SPEED_TARGET:
                slow.append(f"convit_{row['size']} {row['precision']} {ratio:.2f}x")
    if not rows:
        return False, "nothing was timed"
    if slow:
        return False, f"the fused path ran below {FUSED_SPEED_TARGET}x the explicit one's speed: {', '.join(slow)}"
    return True, f"the fused path at least {FUSED_SPEED_TARGET}x the explicit one in every pair and precision"


def precisions(ctx: Context) -> dict[str, torch.dtype | None]:
    return {"fp32": None, f"{ctx.amp_dtype()} autocast": AMP_DTYPES[ctx.amp_dtype()]}


def check_table1(ctx: Context) -> dict:
    sizes = ctx.sizes
    images = torch.randn(sizes.batch, 3, sizes.img_size, sizes.img_size, device=ctx.device)
    rows = []
    for size in sizes.table1_sizes:
        deit_name, convit_name = f"deit_{size}", f"convit_{size}"
        fused = create_model(convit_name, img_size=sizes.img_size)
        models = {"deit": create_model(deit_name, img_size=sizes.img_size), "fused": fused,
                  "explicit": explicit_twin(fused)}
        models = {path: model.to(ctx.device) for path, model in models.items()}
        for precision, dtype in precisions(ctx).items():
            jobs = {path: bench.inference_job(model, images, dtype) for path, model in models.items()}
            timings = bench.time_interleaved(jobs, sizes.rounds, device=ctx.device)  # the DeiT first: the baseline
            for path, timing in timings.items():
                paper = bench.PAPER_SPEED[deit_name if path == "deit" else convit_name]
                row = {"size": size, "path": path, "precision": precision,
                       "img_per_s": round(sizes.batch / timing.seconds, 1), "vs_deit": round(timing.speed_ratio, 3),
                       "paper_img_per_s": paper, "paper_vs_deit": round(paper / bench.PAPER_SPEED[deit_name], 2)}
                rows.append(row)
                print(f"         {size:<10} {path:<8} {precision:<14} {row['img_per_s']:9.1f} img/s  "
                      f"{row['vs_deit']:.2f}x DeiT   paper: {paper} img/s, {row['paper_vs_deit']:.2f}x", flush=True)
        del models, fused
    passed, reason = judge_table1(rows)
    setting = f"batch {sizes.batch}, {sizes.img_size}x{sizes.img_size}, {sizes.rounds} rounds"
    if not ctx.on_cuda:
        return outcome(None, f"timed on the CPU ({setting}), judged only on CUDA", setting=setting, rows=rows)
    return outcome(passed, reason, setting=setting, rows=rows)


# ---------------------------------------------------------------------------------------
# 4. compare: ConViT-Ti against the same-size baseline, inference, training, memory
# ---------------------------------------------------------------------------------------
def judge_compare(fused_vs_baseline: float, fused_step_mib: float, explicit_step_mib: float) -> tuple[bool, str]:
    """docs/speed.md's targets: fused ConViT-Ti at no less than 0.95x the same-size baseline's
    speed (fp32 inference), and a training step that needs less memory than the explicit path."""
    problems = []
    if not fused_vs_baseline >= FUSED_SPEED_TARGET:
        problems.append(f"fused ConViT-Ti at {fused_vs_baseline:.3f}x the baseline, below {FUSED_SPEED_TARGET}x")
    if not fused_step_mib < explicit_step_mib:
        problems.append(f"its training step takes {fused_step_mib:.0f} MiB at its peak, not less than the "
                        f"explicit path's {explicit_step_mib:.0f} MiB")
    if problems:
        return False, "; ".join(problems)
    return True, (f"fused ConViT-Ti at {fused_vs_baseline:.3f}x the baseline (target {FUSED_SPEED_TARGET}x); a "
                  f"training step takes {fused_step_mib:.0f} MiB at its peak, the explicit path's {explicit_step_mib:.0f}")


def training_step_mib(model, images) -> float:
    """GPU memory that one fp32 training step adds at its peak, above what was allocated before it:
    activations, gradients and AdamW's state (the last two the same for both paths)."""
    step = bench.training_job(model, images)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def check_compare(ctx: Context) -> dict:
    sizes = ctx.sizes
    models = {name: model.to(ctx.device) for name, model in bench.comparison_models(sizes.img_size).items()}
    images = torch.randn(sizes.batch, 3, sizes.img_size, sizes.img_size, device=ctx.device)
    speed = {}
    for precision, dtype in precisions(ctx).items():
        for what in sizes.compare_jobs:
            make_job = {"inference": bench.inference_job, "training step": bench.training_job}[what]
            jobs = {name: make_job(model, images, dtype) for name, model in models.items()}
            timings = bench.time_interleaved(jobs, sizes.rounds, device=ctx.device)
            speed[f"{what}, {precision}"] = {name: {"img_per_s": round(sizes.batch / t.seconds, 1),
                                                    "vs_baseline": round(t.speed_ratio, 3)} for name, t in timings.items()}
            print(f"         {what}, {precision}: " + ", ".join(
                f"{name} {t.speed_ratio:.3f}x" for name, t in timings.items()), flush=True)
    memory = {name: {"saved_for_backward_mib": round(bench.activation_memory(model, images), 1)}
              for name, model in models.items()}
    if ctx.on_cuda:
        for name, model in models.items():
            memory[name]["training_step_mib"] = round(training_step_mib(model, images), 1)
    figures = {"setting": f"batch {sizes.batch}, {sizes.img_size}x{sizes.img_size}, {sizes.rounds} rounds",
               "speed": speed, "memory": memory}
    if not ctx.on_cuda:
        return outcome(None, "timed and counted on the CPU, judged only on CUDA (no peak-memory counter here)",
                       **figures)
    passed, reason = judge_compare(speed["inference, fp32"]["convit fused"]["vs_baseline"],
                                   memory["convit fused"]["training_step_mib"],
                                   memory["convit explicit"]["training_step_mib"])
    return outcome(passed, reason, **figures)


# ---------------------------------------------------------------------------------------
# 5-7. train_resume, fp16_scaler, train_compile: real training runs through train.py
# ---------------------------------------------------------------------------------------
class Drift(NamedTuple):
    identical: bool  # every tensor equal, bit for bit
    max_abs: float  # the largest |difference| of any entry
    differing: int  # tensors that are not bit-identical
    tensors: int


def compare_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Drift:
    """How far two state dicts (the same keys) lie apart."""
    differing, max_abs = 0, 0.0
    for key, tensor in a.items():
        if not torch.equal(tensor, b[key]):
            differing += 1
            max_abs = max(max_abs, (tensor.double() - b[key].double()).abs().max().item())
    return Drift(differing == 0, max_abs, differing, len(a))


def same_tree(a, b) -> bool:
    """Whether two random states (nested dicts, lists and tuples of tensors and ints) are equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return a == b


def judge_resume(run_to_run: Drift, resumed: Drift, rng_equal: bool, device_rng_saved: bool | None) -> tuple[bool, str]:
    """Stopped after an epoch and resumed, a run must end where an uninterrupted one ends.

    run_to_run: two uninterrupted runs of the same flags, apart; resumed: the resumed run and the
    uninterrupted one, apart. Bit for bit where the device is deterministic (the two uninterrupted
    runs agree). Where it is not, the resumed run may drift as much as two uninterrupted runs do, up
    to DRIFT_FACTOR times (a lost random state or schedule moves the weights far more). The random
    states must agree in any case: the number of draws does not depend on the order of a sum.
    device_rng_saved: whether the checkpoint holds the CUDA random state (None on a CPU)."""
    if device_rng_saved is False:
        return False, "the checkpoint holds no CUDA random state"
    if not rng_equal:
        return False, "the resumed run ends with other random states than the uninterrupted run: it drew other numbers"
    if run_to_run.identical:
        if resumed.identical:
            return True, f"deterministic here, and the resumed run is bit-identical ({resumed.tensors} tensors)"
        return False, (f"deterministic here (two uninterrupted runs agree bit for bit), but the resumed run differs "
                       f"in {resumed.differing} of {resumed.tensors} tensors, by up to {resumed.max_abs:.3g}")
    bound = DRIFT_FACTOR * run_to_run.max_abs
    said = (f"not deterministic here: two uninterrupted runs differ by up to {run_to_run.max_abs:.3g}; the resumed "
            f"run by {resumed.max_abs:.3g}")
    if resumed.max_abs <= bound:
        return True, f"{said}, within {DRIFT_FACTOR}x that drift; random states identical"
    return False, f"{said}, beyond {DRIFT_FACTOR}x that drift ({bound:.3g})"


def training_flags(ctx: Context, epochs: int, *extra) -> list[str]:
    """A new run of the training checks' model and data; every run folder is ours, so --overwrite."""
    amp = ["--amp"] if not ctx.on_cuda else []  # autocast is train.py's default on a GPU only
    return [*ctx.sizes.run_flags, *amp, "--epochs", str(epochs), "--overwrite", *extra]


def check_resume(ctx: Context, name: str, extra: tuple[str, ...]) -> dict:
    """Two uninterrupted runs of 2 epochs and one stopped after 1 (side by side), then that one
    resumed; the resumed run is compared with the first uninterrupted one."""
    folders = {run: ctx.out / "runs" / f"{name}-{run}" for run in ("whole", "again", "split")}
    logs = {run: ctx.out / "logs" / f"{name}-{run}.log" for run in (*folders, "resume")}
    flags = training_flags(ctx, 2, *extra)
    first = run_commands([train_command(ctx, *flags, "--output-dir", folders["whole"]),
                          train_command(ctx, *flags, "--output-dir", folders["again"]),
                          train_command(ctx, *flags, "--stop-after", "1", "--output-dir", folders["split"])],
                         [logs["whole"], logs["again"], logs["split"]], ctx)
    failed = trouble(first)
    if failed is None:  # the resumed run takes every flag from its checkpoint but those that say how it runs
        resume = train_command(ctx, "--resume", folders["split"] / "checkpoint.pth", *extra)
        failed = trouble(run_commands([resume], [logs["resume"]], ctx))
    if failed is not None:
        return failed
    whole, again, split = (run_result(folders[run]) for run in ("whole", "again", "split"))
    run_to_run = compare_states(whole["checkpoint"]["model"], again["checkpoint"]["model"])
    after_resume = compare_states(whole["checkpoint"]["model"], split["checkpoint"]["model"])
    rng_equal = same_tree(whole["checkpoint"]["rng"], split["checkpoint"]["rng"])
    device_rng = "cuda" in whole["checkpoint"]["rng"][0] if ctx.on_cuda else None
    passed, reason = judge_resume(run_to_run, after_resume, rng_equal, device_rng)
    last = whole["records"][-1]
    val_loss = {"whole": last["val_loss"], "again": again["records"][-1]["val_loss"],
                "resumed": split["records"][-1]["val_loss"]}
    return outcome(passed, reason, command=shlex.join(map(str, train_command(ctx, *flags))),
                   steps=sum(steps_of(r, RUN_BATCH) for r in whole["records"]), run_to_run=run_to_run._asdict(),
                   resumed=after_resume._asdict(), random_states_equal=rng_equal, val_top1=last["val_top1"],
                   val_loss=val_loss, first_epoch_seconds=whole["records"][0]["epoch_seconds"],
                   images_per_second=last["images_per_second"])


def check_train_resume(ctx: Context) -> dict:
    return check_resume(ctx, "train_resume", ())


def check_train_compile(ctx: Context) -> dict:
    if not ctx.on_cuda:
        return outcome(None, "Triton only on CUDA (test_precision compiles for the CPU, a cold compile "
                             "there takes about 40 s)")
    return check_resume(ctx, "train_compile", ("--compile",))


def judge_scaler(scaler: dict, steps: int, train_loss: float) -> tuple[bool, str]:
    """fp16's gradient scaler ran: its scale starts at 2^16 and halves at each step it skips for an
    overflow (no growth within 2,000 steps); it counts the good steps since the last fall."""
    if not math.isfinite(train_loss):
        return False, f"non-finite training loss {train_loss}"
    if "scale" not in scaler:
        return False, "the checkpoint holds no gradient-scaler state: the scaler did not run"
    falls = 16 - math.log2(scaler["scale"]) if scaler["scale"] > 0 else math.inf
    tracker = scaler.get("_growth_tracker", 0)
    if not (falls >= 0 and falls == int(falls)):
        return False, f"scale {scaler['scale']} is not 2^16 halved a whole number of times"
    if not 1 <= tracker <= steps - falls:
        return False, f"{tracker} good steps counted since the last fall, outside 1..{steps - falls:.0f}"
    return True, f"scale 2^{16 - falls:.0f} after {falls:.0f} skipped step(s) of {steps}, then {tracker} good ones"


def check_fp16_scaler(ctx: Context) -> dict:
    folder, log = ctx.out / "runs" / "fp16_scaler", ctx.out / "logs" / "fp16_scaler.log"
    flags = training_flags(ctx, 1, "--amp-dtype", "fp16", "--output-dir", folder)
    failed = trouble(run_commands([train_command(ctx, *flags)], [log], ctx))
    if failed is not None:
        return failed
    run = run_result(folder)
    record = run["records"][-1]
    steps = steps_of(record, RUN_BATCH)
    passed, reason = judge_scaler(run["checkpoint"]["scaler"], steps, record["train_loss"])
    return outcome(passed, reason, scaler=run["checkpoint"]["scaler"], steps=steps,
                   train_loss=record["train_loss"], val_top1=record["val_top1"])


# ---------------------------------------------------------------------------------------
# 8-9. cifar10 and torchrun: a run learns
# ---------------------------------------------------------------------------------------
def judge_short_run(records: list[dict], epochs: int, min_top1: float | None) -> tuple[bool, str]:
    if not records or records[-1]["epoch"] != epochs:
        return False, f"metrics.jsonl ends at epoch {records[-1]['epoch'] if records else 0}, not {epochs}"
    top1 = records[-1]["val_top1"]
    if not math.isfinite(records[-1]["train_loss"]):
        return False, "non-finite training loss"
    if min_top1 is not None and not top1 >= min_top1:
        return False, f"top-1 {top1:.1f}% after {epochs} epoch(s), below {min_top1:.0f}%: it did not learn"
    judged = f"above {min_top1:.0f}%" if min_top1 is not None else "(too short to judge the learning)"
    return True, f"top-1 {top1:.1f}% after {epochs} epoch(s) {judged}"


def check_cifar10(ctx: Context) -> dict:
    batches = ctx.cifar_dir / "cifar-10-batches-py"
    if ctx.smoke:
        return outcome(None, "not with --smoke")
    if not batches.is_dir():
        return outcome(None, f"no CIFAR-10 at {batches} (never downloaded here: pass --cifar-dir)")
    folder, log = ctx.out / "runs" / "cifar10", ctx.out / "logs" / "cifar10.log"
    # The small recipe on 40% of CIFAR-10's 50,000 images: 312 steps of 64.
    flags = ["--dataset", "cifar10", "--data-dir", ctx.cifar_dir, "--preset", "small", "--data-fraction", "0.4",
             "--batch-size", str(RUN_BATCH), "--warmup-epochs", "0", "--epochs", "1", "--overwrite",
             "--output-dir", folder]
    finished = run_commands([train_command(ctx, *flags)], [log], ctx)
    failed = trouble(finished)
    if failed is not None:
        return failed
    records = run_result(folder)["records"]
    passed, reason = judge_short_run(records, 1, ctx.sizes.min_top1)
    return outcome(passed, reason, command=shlex.join(map(str, train_command(ctx, *flags))),
                   seconds=finished[0].seconds, val_top1=records[-1]["val_top1"],
                   images_per_second=records[-1]["images_per_second"])


def processes_per_node(ctx: Context) -> int:
    """One process per GPU, at most 2: train.py starts a process group (NCCL) only for 2 or more."""
    return min(2, torch.cuda.device_count()) if ctx.on_cuda else 1


# torchrun's run must show learning, which the training checks' recipe cannot in a few epochs: its
# MixUp, RandAugment and full lr from the first step leave one epoch at 18-20% on a CPU and on the
# GPU alike. Lesson 6's plain recipe with one warm-up epoch reaches 61.5% after 3 on a CPU.
TORCHRUN_EPOCHS = 3
TORCHRUN_FLAGS = ("--mixup", "0", "--drop-path", "0", "--randaug-ops", "0", "--warmup-epochs", "1")
TORCHRUN_MIN_TOP1 = 40.0  # four times chance on 10 digits


def check_torchrun(ctx: Context) -> dict:
    nproc = processes_per_node(ctx)
    folder, log = ctx.out / "runs" / "torchrun", ctx.out / "logs" / "torchrun.log"
    epochs, min_top1 = (1, None) if ctx.smoke else (TORCHRUN_EPOCHS, TORCHRUN_MIN_TOP1)
    flags = training_flags(ctx, epochs, *TORCHRUN_FLAGS, "--output-dir", folder)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *train_command(ctx, *flags)[1:]]
    finished = run_commands([command], [log], ctx)
    failed = trouble(finished)
    if failed is not None:
        return failed
    records = run_result(folder)["records"]
    passed, reason = judge_short_run(records, epochs, min_top1)
    group = f"{nproc} processes, {'NCCL' if ctx.on_cuda else 'gloo'} through train.py" if nproc > 1 else \
        "1 process, so train.py starts no process group (the nccl check starts one)"
    return outcome(passed, f"{group}: {reason}", processes=nproc,
                   command=shlex.join(map(str, command)), seconds=finished[0].seconds, val_top1=records[-1]["val_top1"])


# ---------------------------------------------------------------------------------------
# 10. nccl: a process group on the GPU, an all-reduce and a DDP step
# ---------------------------------------------------------------------------------------
# Run under torchrun, one process per GPU. train.py's own NCCL line needs 2 GPUs (one process
# starts no group); this probe takes the same calls on however many there are, 1 included.
NCCL_PROBE = """\
import json, os, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(device)
dist.init_process_group("nccl")
total = torch.full((3,), 2.0, device=device)
dist.all_reduce(total)
model = DistributedDataParallel(torch.nn.Linear(4, 2).to(device), device_ids=[device])
model(torch.ones(5, 4, device=device)).sum().backward()
if dist.get_rank() == 0:
    print(json.dumps({"world": dist.get_world_size(), "all_reduce": total.tolist(),
                      "grad": model.module.weight.grad.flatten().tolist()}))
dist.destroy_process_group()
"""


def judge_nccl(result: dict) -> tuple[bool, str]:
    """Each process adds 2.0: the sum is 2 x world. The gradient of the sum of 5 outputs of
    Linear(4, 2) at input ones is 5 for every weight, averaged over processes by DDP: still 5."""
    world = result.get("world", 0)
    if result.get("all_reduce") != [2.0 * world] * 3 or world < 1:
        return False, f"all-reduce over {world} process(es) gave {result.get('all_reduce')}, not {[2.0 * world] * 3}"
    if result.get("grad") != [5.0] * 8:
        return False, f"DDP's gradient is {result.get('grad')}, not 5 everywhere"
    return True, f"all-reduce and a DDP step over {world} process(es) give the exact sums"


def check_nccl(ctx: Context) -> dict:
    if not ctx.on_cuda:
        return outcome(None, "NCCL needs CUDA (the gloo twin is test_runs' torchrun test)")
    script, log = ctx.out / "nccl_probe.py", ctx.out / "logs" / "nccl.log"
    script.write_text(NCCL_PROBE)
    nproc = torch.cuda.device_count()
    failed = trouble(run_commands([[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc_per_node={nproc}", script]], [log], ctx))
    if failed is not None:
        return failed
    lines = [line[line.index('{"world"'):] for line in log.read_text().splitlines() if '{"world"' in line]
    result = json.loads(lines[-1]) if lines else {}  # torchrun may prefix a line with its rank
    passed, reason = judge_nccl(result)
    return outcome(passed, f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}: {reason}", **result)


# ---------------------------------------------------------------------------------------
# 11. lesson6_time: lesson 6's own run, on this device
# ---------------------------------------------------------------------------------------
def judge_lesson_run(epochs_done: int, epochs_planned: int, top1: float, cpu_top1s: list[float]) -> tuple[bool, str]:
    """The run ends its schedule, at a top-1 within LESSON_MARGIN points of the range of lesson 6's
    CPU seeds (autocast and the GPU's kernels round differently: not the same digits, the same model)."""
    if epochs_done != epochs_planned:
        return False, f"stopped at epoch {epochs_done} of {epochs_planned}"
    low, high = min(cpu_top1s) - LESSON_MARGIN, max(cpu_top1s) + LESSON_MARGIN
    if not low <= top1 <= high:
        return False, f"top-1 {top1:.2f}%, outside {low:.2f}-{high:.2f}% (lesson 6's CPU seeds +- {LESSON_MARGIN})"
    return True, f"top-1 {top1:.2f}%, within {low:.2f}-{high:.2f}% (lesson 6's CPU seeds +- {LESSON_MARGIN})"


def on_device(command: str, device: str, output_dir: Path) -> list[str]:
    """A recorded `python train.py ...` command, run with this Python on `device`, into `output_dir`."""
    argv = shlex.split(command)
    argv[0] = sys.executable
    for flag, value in (("--device", device), ("--output-dir", str(output_dir))):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def check_lesson6_time(ctx: Context) -> dict:
    if not ctx.on_cuda:
        return outcome(None, "a lesson-6 run takes about 4.5 minutes on a CPU: lesson 6 records its CPU time")
    if ctx.smoke:
        return outcome(None, "not with --smoke: it times the lesson's real run")
    summary = json.loads(LESSON6_SUMMARY.read_text()) if LESSON6_SUMMARY.exists() else {"runs": []}
    cpu_runs = sorted((run for run in summary["runs"] if run["table"] == "table2" and run["name"] == "ConViT"
                       and run["fraction"] == 1.0), key=lambda run: run["seed"])
    if not cpu_runs:
        return outcome(None, f"{LESSON6_SUMMARY} records no ConViT run at f = 100% to repeat")
    folder, log = ctx.out / "runs" / "lesson6", ctx.out / "logs" / "lesson6.log"
    command = on_device(cpu_runs[0]["command"], ctx.device, folder)
    finished = run_commands([command], [log], ctx)
    failed = trouble(finished)
    if failed is not None:
        return failed
    run = run_result(folder)
    top1 = run["records"][-1]["val_top1"]
    passed, reason = judge_lesson_run(run["checkpoint"]["epoch"], run["checkpoint"]["args"]["epochs"], top1,
                                      [r["top1"] for r in cpu_runs])
    seconds, cpu_seconds = finished[0].seconds, cpu_runs[0]["seconds"]
    return outcome(passed, f"{seconds:.0f} s on this GPU against {cpu_seconds:.0f} s on lesson 6's CPU: {reason}",
                   command=shlex.join(command), seconds=seconds, cpu_seconds=cpu_seconds,
                   cpu_hardware=summary["hardware"], speedup=round(cpu_seconds / seconds, 2), val_top1=top1,
                   cpu_top1s=[r["top1"] for r in cpu_runs], lesson6_runs=len(summary["runs"]),
                   lesson6_minutes_one_at_a_time=round(len(summary["runs"]) * seconds / 60, 1))


# ---------------------------------------------------------------------------------------
# 12. device_flags: bench.py and a lesson with --device cuda
# ---------------------------------------------------------------------------------------
def judge_device_flags(bench_rows: int, lesson_hardware: str | None) -> tuple[bool, str]:
    """bench.py printed its three rows (DeiT, fused, explicit), and the lesson's summary names the GPU."""
    if bench_rows != 3:
        return False, f"bench.py printed {bench_rows} rows of Table 1, not 3"
    if not (lesson_hardware or "").startswith("GPU "):
        return False, f"lesson 6's summary names {lesson_hardware!r}, not the GPU"
    return True, f"bench.py's table on the GPU; the lesson's figures captioned {lesson_hardware!r}"


def check_device_flags(ctx: Context) -> dict:
    if not ctx.on_cuda:
        return outcome(None, "--device cuda only on CUDA (test_bench and test_lessons run both on the CPU)")
    quick = ctx.out / "lesson6-quick"
    logs = [ctx.out / "logs" / "bench.log", ctx.out / "logs" / "lesson6-quick.log"]
    failed = trouble(run_commands(
        [[sys.executable, "bench.py", "--device", "cuda", "--sizes", "tiny", "--rounds", "1", "--batch-size", "2"],
         [sys.executable, "lessons/06_sample_efficiency.py", "--quick", "--device", "cuda", "--out-dir", quick]], logs, ctx))
    if failed is not None:
        return failed
    rows = sum(line.startswith(("| deit_tiny", "| convit_tiny")) for line in logs[0].read_text().splitlines())
    hardware = json.loads((quick / "06_sample_efficiency.json").read_text()).get("hardware")
    passed, reason = judge_device_flags(rows, hardware)
    return outcome(passed, reason, bench_rows=rows, lesson_hardware=hardware)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
# The order they run in: the surest and cheapest first, so that a budget spent early costs the
# least; --compile last, whose cold compile takes the longest and is the hardest to foresee.
CHECKS = [
    Check("device", "the device, the driver, CUDA and torch", check_device),
    Check("gpsa_paths", "fused and explicit GPSA agree, outputs and gradients, fp32/tf32/bf16/fp16", check_gpsa_paths),
    Check("table1", "Table 1's pairs at batch 128, fp32 and autocast, beside the paper's GP100", check_table1),
    Check("compare", "ConViT-Ti against the same-size baseline: inference, training step, memory", check_compare),
    Check("train_resume", "MNIST-10k, autocast: stopped, resumed, equal to an uninterrupted run", check_train_resume),
    Check("fp16_scaler", "MNIST-10k, fp16 autocast with the gradient scaler", check_fp16_scaler),
    Check("torchrun", "torchrun, a short run that learns", check_torchrun),
    Check("nccl", "an NCCL process group: all-reduce and a DDP step", check_nccl),
    Check("lesson6_time", "lesson 6's run (C 48, H 4, 4 blocks, 24 epochs) timed on the GPU", check_lesson6_time),
    Check("device_flags", "bench.py and lesson 6 --quick with --device cuda", check_device_flags),
    Check("cifar10", "CIFAR-10 from a folder, a few hundred steps", check_cifar10),
    Check("train_compile", "the same as train_resume with --compile (Triton)", check_train_compile),
]


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python tools/gpu_check.py", description=__doc__.split("\n\n")[0],
                                epilog="checks, in order: " + ", ".join(check.name for check in CHECKS))
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the report (gpu_check.json), the runs and their logs "
                             "(default: a new temporary folder, printed)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu (with --smoke): the checks' CPU form, to prove the command on a machine without a GPU")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, about a minute: proves the command works, measures nothing")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for all checks; a check that would start later is skipped (default 480)")
    parser.add_argument("--checks", nargs="+", choices=[check.name for check in CHECKS], default=None, metavar="NAME",
                        help="run only these checks, in the order below")
    parser.add_argument("--cifar-dir", type=Path, default=REPO_ROOT / "data",
                        help="a folder holding cifar-10-batches-py (never downloaded; default: data/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs with --smoke only: at the GPU's sizes the checks would take hours on a CPU")
    if not args.budget > 0:
        parser.error(f"--budget must be a number of seconds above 0, got {args.budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU: torch {torch.__version__} sees none on this machine, so there is nothing to check "
              f"(python tools/gpu_check.py --device cpu --smoke runs the checks' plumbing on the CPU)")
        return 0
    if args.device == "cpu":  # the checks' models are small: a second thread stalls whenever another program runs
        torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="convit-gpu-check-"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").touch()
    except OSError as err:
        parser.error(f"--out {out} is not a folder that can be written ({err.strerror})")
    ctx = Context(args.device, args.smoke, out.resolve(), args.budget, args.cifar_dir.resolve())
    checks = [check for check in CHECKS if args.checks is None or check.name in args.checks]
    report = ctx.out / "gpu_check.json"
    typed = sys.argv[1:] if argv is None else argv
    header = {"report": "tools/gpu_check.py", "schema": 1, "command": shlex.join(["python", "tools/gpu_check.py", *typed]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": args.device, "smoke": args.smoke,
              "budget_seconds": args.budget, "out": str(ctx.out)}
    print(f"gpu_check on {args.device}{' (smoke)' if args.smoke else ''}: {len(checks)} checks within "
          f"{args.budget:.0f} s; the report and the runs go to {ctx.out}", flush=True)
    try:
        results = run_checks(checks, ctx, report, header)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the checks done so far are in {report}", file=sys.stderr)
        return 130
    print("\n" + format_table(results))
    print(f"\nreport: {report}")
    return 1 if any(result["passed"] is False for result in results) else 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
