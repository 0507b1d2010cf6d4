"""The training protocol of the lessons that compare models (6, 8 and 9): one recipe, chosen by
lesson 6's sweep for ConViT and DeiT alike, and every run trained until it stops improving.

A run at fraction f of the training set trains 1/f times the epochs (Table 2's protocol, so
every run takes the same steps), is evaluated EVALUATIONS times the same steps apart, and is
judged converged when the last quarter of those evaluations adds less than CONVERGED_WITHIN
points to its best top-1 (`convergence`, lessons/_training.py). Each run keeps its train.py
command, relative to the repository root: run from there, it gives the same top-1 again
(one-thread CPU runs are deterministic).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import checkpoints
import cli
import config
import runs
from lessons._command import LessonRecipe, run_settings
from lessons._training import CONVERGED_WITHIN, at_repository_root, convergence, run_parallel, train_one

# The recipe (the warmup is in epochs at f = 100% and, like the epochs, multiplied by 1/f; it
# starts from lr / 100). The rest is train.py's small preset: AdamW, weight decay 0.05, label
# smoothing 0.1, cosine to 1e-5, crops of 50-100% of the image; and no RandAugment.
RECIPE = LessonRecipe(epochs=24, embed_dim=48, num_heads=4, depth=4, batch_size=64, lr=4e-3, warmup_epochs=4,
                      warmup_lr=4e-5)
# --quick: a tiny model, each run stopped after QUICK_STOP epochs of its schedule (seconds in all).
QUICK = LessonRecipe(epochs=1, embed_dim=16, num_heads=4, depth=3, batch_size=64, lr=2e-3, warmup_epochs=0,
                     warmup_lr=2e-5)
QUICK_STOP = 2
EVALUATIONS = 12  # per run, the same steps apart at every fraction

# The two models every comparison trains: the settings each adds to the recipe's ConViT.
MODELS = {
    "ConViT": {},
    "DeiT": {"model": "deit_tiny"},  # DeiT's own network at the recipe's C, H and depth: the paper's baseline
}


def schedule(args, fraction: float, warmup_epochs: int) -> dict:
    """The settings that make a run at fraction f: the data, 1/f the epochs and the warmup (scaled
    too, so that it is the same share of every run), and EVALUATIONS evaluations the same steps
    apart (--quick: QUICK_STOP epochs, each evaluated)."""
    every = 1 if args.quick else max(1, round(args.epochs / fraction / EVALUATIONS))
    settings = {"data_fraction": fraction, "scale_epochs": True, "warmup_epochs": round(warmup_epochs / fraction),
                "eval_every": every}
    return {**settings, "stop_after": QUICK_STOP} if args.quick else settings


def what_defines(cfg: config.RunConfig) -> dict:
    """The fields that define a run (cli.RUN: not where or how it ran), its GPSA blocks counted the
    same whether they were typed or left to the model's default."""
    return {**{name: value for name, value in cfg.flat().items() if config.FIELDS[name].metadata["role"] == cli.RUN},
            "local_up_to_layer": cfg.model.gpsa_blocks}


def reuse_finished_run(settings: dict, beside: bool = True, elsewhere: tuple[Path, ...] = ()) -> dict | None:
    """If a folder beside this run's (with `beside`) or under a folder of `elsewhere` holds a run of
    exactly these settings trained to its last epoch, move it (from elsewhere: copy it) to this
    run's folder name and return its result; else None. It stands for the run: one-thread CPU runs
    are deterministic, so training it again would give the same numbers."""
    with at_repository_root():
        cfg, _ = config.resolve(settings)
        wanted, folder = what_defines(cfg), Path(cfg.runtime.output_dir)
        for candidate in [path for root in ((folder.parent,) if beside else ()) + tuple(elsewhere)
                          if root.is_dir()
                          for path in sorted(root.glob("*/" + checkpoints.CHECKPOINT))]:
            try:
                checkpoint = checkpoints.read_checkpoint_file(candidate)
                done = what_defines(config.stored(checkpoint["args"]))
            except (ValueError, KeyError, TypeError):  # not a checkpoint of train.py
                continue
            if done != wanted or checkpoint.get("epoch") != cfg.recipe.epochs:
                continue
            if candidate.parent != folder:
                if folder.exists():
                    continue
                if candidate.parent.parent == folder.parent:
                    candidate.parent.rename(folder)
                else:
                    shutil.copytree(candidate.parent, folder)
            records = runs.read_metrics(folder)
            last = records[-1]
            return {"val_top1": last["val_top1"], "val_top5": last["val_top5"], "val_loss": last["val_loss"],
                    "parameters": sum(t.numel() for t in checkpoint["model"].values()),
                    "seconds": None, "cpu_seconds": None,  # its metrics log the evaluated epochs only
                    "records": records, "reused": True, **convergence(records)}
    return None


def run_all(args, plan: list[tuple], run_root: Path, reuse: bool = False, elsewhere: tuple[Path, ...] = ()) -> list[dict]:
    """Train every (table, name, fraction, seed, settings[, warmup epochs]) of `plan`, args.workers
    at a time; each result gains its settings and its train.py command. A run that a folder of
    `elsewhere` (another lesson's) or, with reuse, of run_root already holds, finished with the same
    settings, is read rather than trained again (`reuse_finished_run`): how lessons share runs, a
    sweep grows, and an interrupted lesson goes on, without training what they have."""
    jobs = []
    for table, name, f, seed, changes, *rest in plan:
        changes = {**changes, **schedule(args, f, (*rest, args.warmup_epochs)[0])}
        # The folder is named after the run's flags, so that the same run keeps its folder when a sweep grows.
        flags = config.command_line(run_settings(args, Path("."), seed=seed, **changes))
        digest = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
        folder = Path(run_root) / f"{table}-{name.replace(' ', '_')}-{f:g}-seed{seed}-{digest}"
        jobs.append(run_settings(args, folder, seed=seed, **changes))
    started = time.perf_counter()
    found = {i: reuse_finished_run(job, reuse, elsewhere) for i, job in enumerate(jobs)} if reuse or elsewhere else {}
    found = {i: result for i, result in found.items() if result is not None}
    if found:
        print(f"  {len(found)} of {len(jobs)} runs already done with the same flags: read from their folders")

    def report(job, result):
        _table, name, f, seed, *_ = plan[jobs.index(job)]
        gain = result["last_quarter_gain"]
        print(f"  [{time.perf_counter() - started:5.0f} s] {name:<26} f = {f:<5g} seed {seed}: top-1 "
              f"{result['val_top1']:5.1f}%, the last quarter added {gain if gain is None else f'{gain:+.2f}'} "
              f"({result['seconds']:.0f} s)", flush=True)

    todo = [job for i, job in enumerate(jobs) if i not in found]
    trained = iter(run_parallel(train_one, todo, args.workers, args.threads, done=report))
    results = [found[i] if i in found else next(trained) for i in range(len(jobs))]
    return [{**result, "settings": job, "command": config.command(job)} for job, result in zip(jobs, results)]


def run_record(table: str, name: str, fraction: float, seed: int, result: dict) -> dict:
    """What a lesson's JSON keeps of a run: enough to check it and to run it again."""
    return {"table": table, "name": name, "fraction": fraction, "seed": seed, "top1": result["val_top1"],
            "top5": result["val_top5"], "converged": result["converged"],
            "last_quarter_gain": result["last_quarter_gain"],
            "curve": [[r["epoch"], r["val_top1"]] for r in result["records"]],
            "parameters": result["parameters"],
            "seconds": None if result["seconds"] is None else round(result["seconds"], 1),
            "read_back": result.get("reused", False), "command": result["command"]}


def add_keep_finished(parser):
    parser.add_argument("--keep-finished", action="store_true",
                        help="read the runs that an earlier, interrupted invocation finished with the same flags "
                             "from their folders rather than training them again (one-thread runs are deterministic)")


def convergence_rule() -> str:
    return (f"converged: the best validation top-1 of the last quarter of a run's {EVALUATIONS} evaluations is less "
            f"than {CONVERGED_WITHIN} points above the best before them")


def convergence_line(results: list[dict]) -> str:
    verdicts = [r["converged"] for r in results]
    return (f"converged: {verdicts.count(True)} runs, not converged: {verdicts.count(False)}, too few evaluations to "
            f"judge: {verdicts.count(None)} ({convergence_rule()})")


def recipe_line(args) -> str:
    return (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks "
            f"(ConViT: {max(args.depth - 2, 1)} GPSA), batch {args.batch_size}, AdamW, peak lr {args.lr:g}, warmup "
            f"{args.warmup_epochs} x 1/f epochs from lr / 100, cosine, {args.epochs} x 1/f epochs, no RandAugment")
