"""Lesson 6: sample efficiency. Table 2 and Table 3 of the paper at small scale, trained to the end.

Table 2 trains ConViT and DeiT on a fraction f of every class for 1/f times the epochs, so that
every run takes the same number of steps; Table 3 removes ConViT's ingredients one at a time
on 10% of the data. Here both run on MNIST-10k (real 28x28 digits in 4x4 patches: a 7x7 grid)
with train.py, for a small ConViT and DeiT's own network at the same width, heads and depth,
3 seeds each, every run trained until its validation top-1 stops improving (checked, not
assumed: see `convergence` in lessons/_training.py).

The recipe was chosen by a sweep of lr and warmup for both models at f = 100% and 10%
(`--sweep`, its results in 06_sweep.json); every run of the default run uses it.

Outputs (in --out-dir):
  06_sample_efficiency.png   top-1 against f, ours beside the paper's Table 2, the relative gain,
                             and the top-1 curves that show each run has converged
  06_ablations.png           Table 3 rows a-g at f = 10%, ours beside the paper's 10% column
  06_sample_efficiency.json  every run's train.py command, top-1, curve and convergence, and the paper's numbers
  with --sweep instead:      06_sweep.png and 06_sweep.json (the lr x warmup sweep that chose the recipe)
  with --budget-check:       06_budget.png and 06_budget.json (what twice the epochs would add)

Run from the repository root:  python lessons/06_sample_efficiency.py [--quick | --sweep]
"""

import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402
from lessons._command import parse, run_folder, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch, cell, mean, write_summary  # noqa: E402
from lessons._protocol import (CONVERGED_WITHIN, MODELS, QUICK, RECIPE, add_keep_finished, convergence_line,  # noqa: E402
                               recipe_line, run_all, run_record)

FRACTIONS, QUICK_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0), (0.05, 0.1)
ABLATION_FRACTION = 0.1  # Table 3's last column
SEEDS = (0, 1, 2)
# The sweep that chose RECIPE's lr and warmup, for both models at SWEEP_FRACTIONS, seed 0.
SWEEP = {"lr": (1e-3, 2e-3, 4e-3, 8e-3), "warmup_epochs": (1, 4)}
SWEEP_FRACTIONS = (1.0, 0.1)
QUICK_SWEEP = {"lr": (2e-3, 4e-3), "warmup_epochs": (1,)}  # --quick --sweep, at f = 10% only

COLOURS = {"ConViT": "tab:red", "DeiT": "tab:blue"}
PAPER_TABLE2 = {0.05: (34.8, 47.8), 0.1: (48.0, 59.6), 0.3: (66.1, 73.7), 0.5: (74.6, 78.2), 1.0: (79.9, 81.4)}

class Ablation(NamedTuple):
    """A row of Table 3 (paper.md) and the settings that make it here."""

    what: str
    train_gating: str  # "no": every lambda frozen at 0 (sigma = 0.5)
    conv_init: str
    train_gpsa: str  # "no": the whole attention module of every GPSA layer frozen
    use_gpsa: str
    settings: dict  # what the row changes in the recipe's ConViT
    paper_full: float  # the paper's top-1, ConViT-S+ on full ImageNet ...
    paper_tenth: float  # ... and on 10% of it


# Rows a and e are Table 2's ConViT and DeiT runs at f = 10%.
TABLE3 = {
    "a": Ablation("ConViT", "yes", "yes", "yes", "yes", MODELS["ConViT"], 82.2, 59.7),
    "b": Ablation("gates frozen", "no", "yes", "yes", "yes", {"freeze_gates": True}, 82.0, 57.4),
    "c": Ablation("no conv init", "yes", "no", "yes", "yes", {"no_conv_init": True}, 81.4, 56.9),
    "d": Ablation("both", "no", "no", "yes", "yes", {"freeze_gates": True, "no_conv_init": True}, 81.6, 54.6),
    "e": Ablation("DeiT", "no", "no", "no", "no", MODELS["DeiT"], 79.1, 47.8),
    "f": Ablation("GPSA frozen at conv init", "no", "yes", "no", "yes", {"freeze_gates": True, "freeze_gpsa": True},
                  78.6, 54.3),
    "g": Ablation("GPSA frozen at random", "no", "no", "no", "yes",
                  {"freeze_gates": True, "freeze_gpsa": True, "no_conv_init": True}, 73.7, 44.8),
}
SHARED_ROWS = {"a": "ConViT", "e": "DeiT"}  # Table 3 rows that are Table 2 runs


def plot_table2(table2: dict, curves: dict, seeds: list[int], args, settings: str):
    """table2[f][model]: top-1 over the seeds (mean drawn, bars min to max); curves[(model, f)]:
    each seed's top-1 against the fraction of the run done."""
    fractions, paper_f = sorted(table2), sorted(PAPER_TABLE2)
    ticks = ([0.05, 0.1, 0.25, 0.5, 1.0], ["5%", "10%", "25%", "50%", "100%"])
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6), layout="constrained")
    ours, paper, gain, curve_ax = axes
    for name in MODELS:
        means = [mean(table2[f][name]) for f in fractions]
        spread = [[m - min(table2[f][name]) for f, m in zip(fractions, means)],
                  [max(table2[f][name]) - m for f, m in zip(fractions, means)]]
        ours.errorbar(fractions, means, yerr=spread, fmt="o-", color=COLOURS[name], capsize=4, label=name)
    for name, col in (("ConViT-S", 1), ("DeiT-S", 0)):
        paper.plot(paper_f, [PAPER_TABLE2[f][col] for f in paper_f], "s--", color=COLOURS["ConViT" if col else "DeiT"],
                   label=name)
    what = f"mean of {len(seeds)} seeds, bars: min to max" if len(seeds) > 1 else f"seed {seeds[0]}"
    low = min(min(v) for by_model in table2.values() for v in by_model.values())
    for ax, title, floor in ((ours, f"ours: {args.dataset}, C = {args.embed_dim}, H = {args.num_heads} ({what})",
                              max(0, 5 * int(low / 5) - 5)), (paper, "paper, Table 2: ImageNet, -S models", 0)):
        ax.set(xscale="log", xlabel="fraction f of the training set (epochs x 1/f)", ylabel="top-1 (%)", title=title,
               ylim=(floor, 100))
        ax.set_xticks(*ticks)
        ax.legend(fontsize=8, loc="lower right")
    errors = [100 * (mean(table2[f]["ConViT"]) - mean(table2[f]["DeiT"])) / (100 - mean(table2[f]["DeiT"]))
              for f in fractions]
    gain.plot(fractions, [100 * (mean(table2[f]["ConViT"]) / mean(table2[f]["DeiT"]) - 1) for f in fractions], "o-",
              color="k", label="ours: ConViT / DeiT - 1")
    gain.plot(fractions, errors, "o:", color="k", label="ours: DeiT's errors ConViT avoids")
    gain.plot(paper_f, [100 * (PAPER_TABLE2[f][1] / PAPER_TABLE2[f][0] - 1) for f in paper_f], "s--", color="0.5",
              label="paper: ConViT-S / DeiT-S - 1")
    gain.axhline(0, color="0.8")
    gain.set(xscale="log", xlabel="fraction f", ylabel="%", title="ConViT's gain over DeiT")
    gain.set_xticks(*ticks)
    gain.legend(fontsize=8)
    for (name, f), seed_curves in sorted(curves.items()):
        for i, curve in enumerate(seed_curves):
            last = curve[-1][0]
            curve_ax.plot([e / last for e, _ in curve], [t for _, t in curve], color=COLOURS[name],
                          ls="-" if f == max(fractions) else ":", lw=1, alpha=0.8,
                          label=f"{name}, f = {f:.0%}" if i == 0 else None)
    curve_ax.set(xlabel="fraction of the run done", ylabel="validation top-1 (%)", ylim=(max(0, low - 30), 100),
                 title=f"every seed's curve at f = {max(fractions):.0%} and {min(fractions):.0%}")
    curve_ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, args.out_dir, "06_sample_efficiency.png", settings, args.device)


def plot_table3(table3: dict, seeds: list[int], args, settings: str):
    rows = [row for row in TABLE3 if table3.get(row)]
    fig, ax = plt.subplots(figsize=(12, 4.5), layout="constrained")
    x = list(range(len(rows)))
    means = [mean(table3[r]) for r in rows]
    spread = [[m - min(table3[r]) for r, m in zip(rows, means)], [max(table3[r]) - m for r, m in zip(rows, means)]]
    ours = ax.bar([i - 0.2 for i in x], means, 0.4, yerr=spread, capsize=3, color="tab:red",
                  label=f"ours: {args.dataset}, {ABLATION_FRACTION:.0%} of the data"
                        + (f", mean of {len(seeds)} seeds (bars: min to max)" if len(seeds) > 1 else ""))
    paper = ax.bar([i + 0.2 for i in x], [TABLE3[r].paper_tenth for r in rows], 0.4, color="0.6",
                   label="paper: ConViT-S+, 10% of ImageNet")
    for bars in (ours, paper):
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r}: {TABLE3[r].what}" for r in rows], fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 105), title="Table 3: which ingredient matters when data is scarce")
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, args.out_dir, "06_ablations.png", settings, args.device)


def print_tables(table2: dict, table3: dict):
    print("\nTable 2, ours (top-1 %, mean of the seeds and their range) beside the paper's (ImageNet, -S models):")
    print("| f | DeiT | ConViT | gain vs DeiT | paper: DeiT-S | paper: ConViT-S | paper gain |")
    print("|---|---|---|---|---|---|---|")
    for f in sorted(set(table2) | set(PAPER_TABLE2)):
        if f in table2:
            top1 = table2[f]
            ours = (f"{cell(top1['DeiT'])} | {cell(top1['ConViT'])} | "
                    f"{100 * (mean(top1['ConViT']) / mean(top1['DeiT']) - 1):+.1f}%")
        else:
            ours = "- | - | -"
        paper = PAPER_TABLE2.get(f)
        paper_cells = f"{paper[0]} | {paper[1]} | {100 * (paper[1] / paper[0] - 1):+.0f}%" if paper else "- | - | -"
        print(f"| {f:.0%} | {ours} | {paper_cells} |")
    print(f"\nTable 3 at f = {ABLATION_FRACTION:.0%}, ours beside the paper's (ConViT-S+ on ImageNet):")
    print("| row | train gating | conv init | train GPSA | use GPSA | ours, 10% | paper, 10% | paper, full |")
    print("|---|---|---|---|---|---|---|---|")
    for row, (what, gating, init, train_gpsa, use_gpsa, _settings, full, tenth) in TABLE3.items():
        print(f"| {row}: {what} | {gating} | {init} | {train_gpsa} | {use_gpsa} | {cell(table3[row])} | {tenth} | {full} |")


def sweep(args, run_root: Path, clock: Stopwatch, argv):
    """lr x warmup for both models at SWEEP_FRACTIONS, seed 0: the runs that chose RECIPE."""
    grid, fractions = (QUICK_SWEEP, (0.1,)) if args.quick else (SWEEP, SWEEP_FRACTIONS)
    settings = [(name, f, lr, warmup) for name in MODELS for f in fractions
                for lr in grid["lr"] for warmup in grid["warmup_epochs"]]
    plan = [("sweep", name, f, 0, {**MODELS[name], "lr": lr, "warmup_lr": lr / 100}, warmup)
            for name, f, lr, warmup in settings]
    results = list(zip(settings, run_all(args, plan, run_root, reuse=True)))
    fig, axes = plt.subplots(1, len(MODELS) * len(fractions), figsize=(16, 3.6), layout="constrained", squeeze=False)
    cells = {}
    for (name, f, lr, warmup), result in results:
        cells[name, f, lr, warmup] = result
    for ax, (name, f) in zip(axes[0], [(n, f) for n in MODELS for f in fractions]):
        top1 = [[cells[name, f, lr, w]["val_top1"] for lr in grid["lr"]] for w in grid["warmup_epochs"]]
        ax.imshow(top1, cmap="viridis", vmin=min(map(min, top1)) - 1, vmax=max(map(max, top1)))
        for i, w in enumerate(grid["warmup_epochs"]):
            for j, lr in enumerate(grid["lr"]):
                run = cells[name, f, lr, w]
                ax.text(j, i, f"{run['val_top1']:.1f}" + ("" if run["converged"] else "*"), ha="center", va="center",
                        color="w", fontsize=9)
        ax.set_xticks(range(len(grid["lr"])), [f"{lr:g}" for lr in grid["lr"]])
        ax.set_yticks(range(len(grid["warmup_epochs"])), [f"{w} / f" for w in grid["warmup_epochs"]])
        ax.set(xlabel="peak lr", ylabel="warmup epochs", title=f"{name}, f = {f:.0%}")
    save_figure(fig, args.out_dir, "06_sweep.png", f"seed 0, top-1 %; * = did not converge "
                f"(the last quarter of evaluations added {CONVERGED_WITHIN} points or more). "
                f"{recipe_line(args).split(', peak lr')[0]}; lr and warmup as marked, the warmup from lr / 100",
                args.device)
    print("\n| model | f | lr | warmup (x 1/f epochs) | top-1 | last quarter added | converged |")
    print("|---|---|---|---|---|---|---|")
    for (name, f, lr, warmup), result in results:
        print(f"| {name} | {f:.0%} | {lr:g} | {warmup} | {result['val_top1']:.1f} | {result['last_quarter_gain']} | "
              f"{result['converged']} |")
    write_summary(args, __file__, "06_sweep.json", clock, argv, rule=convergence_line([r for _, r in results]),
                  runs=[{**run_record("sweep", name, f, 0, result), "lr": lr, "warmup_epochs": warmup}
                        for (name, f, lr, warmup), result in results])


def budget_check(args, run_root: Path, clock: Stopwatch, argv):
    """Is RECIPE's budget enough? Seed 0 of both models at SWEEP_FRACTIONS, trained for the
    recipe's epochs and for twice as many: what the longer run adds is what a run of the default
    one still lacked (a cosine schedule always ends with a rise, as the lr anneals, so the last
    quarter of one run cannot say this by itself)."""
    fractions = tuple(args.fractions or ((0.1,) if args.quick else SWEEP_FRACTIONS))
    cells = [(name, f, epochs) for name in MODELS for f in fractions for epochs in (args.epochs, 2 * args.epochs)]
    plan = [("budget", name, f, 0, {**MODELS[name], "epochs": epochs}) for name, f, epochs in cells]
    # The runs of the recipe's length are Table 2's: read from the lesson's run folder if it holds them.
    results = run_all(args, plan, run_root, reuse=True, elsewhere=(run_root.parent,))
    fig, axes = plt.subplots(1, len(MODELS) * len(fractions), figsize=(16, 3.8), layout="constrained", squeeze=False)
    found = dict(zip(cells, results))
    print("\n| model | f | top-1, recipe's epochs | top-1, twice the epochs | the longer run adds |")
    print("|---|---|---|---|---|")
    for ax, (name, f) in zip(axes[0], [(n, f) for n in MODELS for f in fractions]):
        short, long = found[name, f, args.epochs], found[name, f, 2 * args.epochs]
        for result, style, label in ((short, "o-", f"{args.epochs} x 1/f epochs"), (long, "s--", f"{2 * args.epochs} x 1/f")):
            last = result["records"][-1]["epoch"]
            ax.plot([r["epoch"] / last for r in result["records"]], [r["val_top1"] for r in result["records"]], style,
                    label=f"{label}: {result['val_top1']:.1f}%")
        ax.set(xlabel="fraction of the run done", ylabel="validation top-1 (%)", ylim=(80, 100),
               title=f"{name}, f = {f:.0%}: the longer run adds {long['val_top1'] - short['val_top1']:+.1f}")
        ax.legend(fontsize=8, loc="lower right")
        print(f"| {name} | {f:.0%} | {short['val_top1']:.1f} | {long['val_top1']:.1f} | "
              f"{long['val_top1'] - short['val_top1']:+.1f} |")
    save_figure(fig, args.out_dir, "06_budget.png", f"seed 0; {recipe_line(args)}; the longer runs with twice the epochs",
                args.device)
    write_summary(args, __file__, "06_budget.json", clock, argv,
                  runs=[{**run_record("budget", name, f, 0, result), "epochs": epochs}
                        for (name, f, epochs), result in zip(cells, results)],
                  longer_run_adds={f"{name} {f:g}": found[name, f, 2 * args.epochs]["val_top1"]
                                   - found[name, f, args.epochs]["val_top1"] for name in MODELS for f in fractions})


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help=f"default {' '.join(map(str, FRACTIONS))} (--quick: {' '.join(map(str, QUICK_FRACTIONS))})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one run per seed and setting (default 0 1 2; --quick: 0); "
                             "the figures show the mean and the range")
    parser.add_argument("--sweep", action="store_true",
                        help=f"instead: the lr x warmup sweep that chose the recipe ({len(MODELS) * len(SWEEP_FRACTIONS)}"
                             f" x {len(SWEEP['lr']) * len(SWEEP['warmup_epochs'])} runs of seed 0)")
    parser.add_argument("--budget-check", action="store_true",
                        help="instead: seed 0 of both models at f = 100%% and 10%% (or --fractions), trained for the "
                             "recipe's epochs and for twice as many, to show what a longer run would add")
    add_keep_finished(parser)
    args = parse(parser, argv)
    if not all(0 < f <= 1 for f in args.fractions or [1]):  # NaN fails too
        raise ValueError(f"--fractions must each lie in (0, 1], got {' '.join(map(str, args.fractions))}")
    clock = Stopwatch("lesson 6")
    if args.sweep or args.budget_check:
        with run_folder(args) as run_root:
            if args.sweep:
                return sweep(args, Path(run_root) / "sweep", clock, argv)
            return budget_check(args, Path(run_root) / "budget", clock, argv)
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    fractions = sorted(set(args.fractions or (QUICK_FRACTIONS if args.quick else FRACTIONS)) | {ABLATION_FRACTION})
    # Every run: (table, row or model, fraction, seed, extra flags). Table 3's rows a and e are Table 2's.
    plan = [("table2", name, f, seed, changes) for f in fractions for name, changes in MODELS.items() for seed in seeds]
    plan += [("table3", row, ABLATION_FRACTION, seed, ablation.settings) for row, ablation in TABLE3.items()
             if row not in SHARED_ROWS for seed in seeds]
    print(f"{len(plan)} training runs, {args.workers} at a time: {args.epochs} epochs x 1/f of {args.dataset}, "
          f"C = {args.embed_dim}, H = {args.num_heads}, {args.depth} blocks, batch {args.batch_size}, lr {args.lr:g}")
    with run_folder(args) as run_root:
        results = run_all(args, plan, run_root, reuse=args.keep_finished)

    table2 = {f: {name: [] for name in MODELS} for f in fractions}
    table3 = {row: [] for row in TABLE3}
    curves = {}
    for (table, name, f, _seed, _settings), result in zip(plan, results):
        (table2[f][name] if table == "table2" else table3[name]).append(result["val_top1"])
        if table == "table2" and f in (min(fractions), max(fractions)):
            curves.setdefault((name, f), []).append([[r["epoch"], r["val_top1"]] for r in result["records"]])
    for row, name in SHARED_ROWS.items():
        table3[row] = table2[ABLATION_FRACTION][name]
    table2_shown = {f: table2[f] for f in fractions if args.fractions is None or f in args.fractions}

    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe_line(args)}, {what}"
    plot_table2(table2_shown, curves, seeds, args, settings)
    plot_table3(table3, seeds, args, settings)
    print_tables(table2_shown, table3)
    print(convergence_line(results))
    write_summary(
        args, __file__, "06_sample_efficiency.json", clock, argv, settings=settings, seeds=seeds,
        rule=convergence_line(results),
        runs=[run_record(table, name, f, seed, result) for (table, name, f, seed, _), result in zip(plan, results)],
        table2_mean_top1={f"{f:g}": {name: mean(v) for name, v in runs_f.items()} for f, runs_f in table2_shown.items()},
        table3_mean_top1={row: mean(v) for row, v in table3.items()},
        paper={"table2": {f"{f:g}": {"DeiT-S": d, "ConViT-S": c} for f, (d, c) in PAPER_TABLE2.items()},
               "table3": {row: {"full": row_.paper_full, "10%": row_.paper_tenth} for row, row_ in TABLE3.items()}})
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
