"""Training for the lessons (5, 6 and 8-10): a run's configuration from the lesson's recipe, the
train.py command it is recorded as, several runs at once, and whether a run has converged.

A lesson builds each run as settings, train.py's flags by field name ({"model": "deit_tiny",
"data_fraction": 0.1, ...}), and trains it through train.py's own functions:
    cfg, _ = config.resolve(settings); result = train.run(cfg)
Its JSON records config.command(settings), the train.py command that runs the same configuration:
run from the repository root, it gives the same top-1 again (one-thread CPU runs are deterministic).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import config
import convit
import runs
import train
from lessons._command import REPO_ROOT


def repo_path(path) -> str:
    """`path` as a recorded command should name it: relative to the repository when inside it, so
    that the command runs on any machine from the repository root."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(REPO_ROOT)) if absolute.is_relative_to(REPO_ROOT) else str(absolute)


def run_settings(args, out_dir: Path, seed: int = 0, **changes) -> dict:
    """The settings (train.py's flags by field name) of one run of the lesson's recipe: `changes`
    (data_fraction, the ablations, model="deit_tiny" ...) replace the recipe's values. Paths are
    relative to the repository root, where train_one runs it.

    With overwrite: a lesson's run folders are its own, and running the lesson again replaces them
    (train.py refuses a folder that holds another run unless told so; its lock still stops two
    lessons writing one folder at once).

    A convit_tiny shrunk to the recipe's C, H and depth, on train.py's image and patch size
    (mnist10k: 28x28 in 4x4 patches, a 7x7 grid). On the 8x8 sklearn digits the image is cut
    into 2x2 patches instead (a 4x4 grid), which keeps each run to seconds."""
    settings = {"dataset": args.dataset, "data_dir": repo_path(args.data_dir), "device": args.device,
                "model": "convit_tiny", "embed_dim": args.embed_dim, "num_heads": args.num_heads, "depth": args.depth,
                "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
                "warmup_epochs": args.warmup_epochs, "warmup_lr": args.warmup_lr, "randaug_ops": 0, "seed": seed,
                "output_dir": repo_path(out_dir), "overwrite": True, "no_progress": True, "quiet": True}
    if args.threads:
        settings["threads"] = args.threads
    if args.run_dir is None:  # run_folder's temporary folder, removed at the end: a figure there is wasted time
        settings["no_figure"] = True
    if args.dataset == "digits":
        settings.update({"img_size": 8, "patch_size": 2})
    return {**settings, **changes}


# The protocol's test that a run was trained to the end: its best top-1 over the last quarter
# of its evaluations is less than this many points above its best top-1 before them.
CONVERGED_WITHIN = 0.5


def convergence(records: list[dict]) -> dict:
    """How much the last quarter of a run's evaluations added to its best top-1, and whether
    that is under CONVERGED_WITHIN points (None: fewer than 4 evaluations, too few to judge)."""
    top1 = [r["val_top1"] for r in records if "val_top1" in r]
    if len(top1) < 4:
        return {"last_quarter_gain": None, "converged": None}
    last = max(1, len(top1) // 4)
    gain = max(top1[-last:]) - max(top1[:-last])
    return {"last_quarter_gain": round(gain, 2), "converged": gain < CONVERGED_WITHIN}


@contextmanager
def at_repository_root():
    """Run train.py's configurations where their recorded paths start: the repository root."""
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


def train_one(settings: dict) -> dict:
    """One train.py run of `settings`, from the repository root (their paths are relative to it);
    returns its final scores, its parameter count, its wall-clock and CPU seconds, every
    evaluation's metrics and its convergence (not the model: results travel between processes)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with at_repository_root():
        cfg, _ = config.resolve(settings)
        result = train.run(cfg)
        records = runs.read_metrics(result["output_dir"])
    return {"val_top1": result["val_top1"], "val_top5": result["val_top5"], "val_loss": result["val_loss"],
            "parameters": convit.count_parameters(result["model"]), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "records": records, **convergence(records)}


def run_parallel(function, items: list, workers: int, threads: int, done=None) -> list:
    """[function(item) for item in items], `workers` at a time, each in its own process with
    torch on `threads` threads; `done(item, result)` is called as each one finishes.

    Small models gain little from a second thread, and two one-thread processes on two cores
    keep both busy without fighting over them. Processes are spawned, not forked (a forked copy
    of a process that has started torch's thread pool can hang). With workers <= 1, runs here."""
    results = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = function(item)
            if done:
                done(item, results[i])
        return results
    jobs = [(function, threads, item) for item in items]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        for i, result in pool.imap_unordered(_run_job, list(enumerate(jobs))):
            results[i] = result
            if done:
                done(items[i], result)
    return results


def _run_job(numbered_job):
    """In a worker process: set torch's threads, run one job, return it with its index."""
    index, (function, threads, item) = numbered_job
    if threads:
        torch.set_num_threads(threads)
    return index, function(item)
