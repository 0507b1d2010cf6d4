"""Training for the lessons (5, 6 and 8-10): the train.py command a run is recorded as, several
runs at once, and whether a run has converged (a run's settings come from _command.run_settings).

A lesson builds each run as settings, train.py's flags by field name ({"model": "deit_tiny",
"data_fraction": 0.1, ...}), and trains it through train.py's own functions:
    result = train.run(*train.configure(settings))   # train.py's main, without the parsing
Its JSON records config.command(settings), the train.py command that runs the same configuration:
run from the repository root, it gives the same top-1 again on the same kind of CPU (one-thread CPU
runs are deterministic there; another CPU rounds differently, lessons/06_sample_efficiency.md shows by how much).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from contextlib import contextmanager

import torch

import convit
import runs
import train
from lessons._command import REPO_ROOT


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
    evaluation's metrics and its convergence (not the model: results travel between processes).
    Settings with "resume" continue that checkpoint, as `train.py --resume` does; the result then
    says from which epoch (its seconds are the continuation's alone)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    with at_repository_root():
        cfg, resumed, notes = train.configure(settings)  # with "resume": the checkpoint it continues
        result = train.run(cfg, resumed, notes)
        records = runs.read_metrics(result["output_dir"])
    return {"val_top1": result["val_top1"], "val_top5": result["val_top5"], "val_loss": result["val_loss"],
            "parameters": convit.count_parameters(result["model"]), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "records": records, **convergence(records),
            **({"resumed_from_epoch": resumed["epoch"]} if resumed else {})}


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
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items)), _end_with, (os.getpid(),)) as pool:
        for i, result in pool.imap_unordered(_run_job, list(enumerate(jobs))):
            results[i] = result
            if done:
                done(items[i], result)
    return results


def _end_with(lesson_pid: int):
    """In a new worker process: end it when the lesson's process ends, however that ends. A worker
    that outlived a killed lesson would train on unseen for hours, holding its run folder's lock
    against the lesson started again. Linux only (prctl's PR_SET_PDEATHSIG); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != lesson_pid:  # the lesson ended before the request was made
            os._exit(1)


def _run_job(numbered_job):
    """In a worker process: set torch's threads, run one job, return it with its index."""
    index, (function, threads, item) = numbered_job
    if threads:
        torch.set_num_threads(threads)
    return index, function(item)
