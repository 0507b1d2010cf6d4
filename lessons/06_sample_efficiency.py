"""Lesson 6: sample efficiency. ConViT against DeiT on a fraction of the data (Tables 2 and 3).

A convolutional prior should matter most when data is scarce: with little to learn from, a
model that starts out local has less to discover. The paper's Table 2 trains DeiT-S and
ConViT-S on a fraction f of each ImageNet class for 1/f times the epochs (the same number of
steps) and finds a gain that shrinks as f grows, from +37% at 5% to +2% at 100%.
Its Table 3 then asks which ingredient matters: the trained gates, the convolutional init,
training the GPSA layers at all.

Here: the same two protocols through train.py (--data-fraction f --scale-epochs), on MNIST-10k
(real 28x28 digits in 4x4 patches: a 7x7 grid), with a small ConViT and two baselines of the
same width, heads and depth: the same network with no GPSA layer (--local-up-to-layer 0) and
DeiT's own network (--model deit_tiny: qkv with bias, a position embedding that also covers the
class token). DeiT's own network is the paper's comparison. Every setting runs with 3 seeds.

Outputs (in --out-dir):
  06_sample_efficiency.png   top-1 against f, ours beside the paper's Table 2, and the relative gain
  06_ablations.png           Table 3 rows a-g at f = 10%, ours beside the paper's 10% column
  06_sample_efficiency.json  every run's settings and top-1, and the paper's numbers

Run from the repository root:  python lessons/06_sample_efficiency.py [--quick]
    on a GPU, with more steps:   ... --device cuda --epochs 20 --workers 1
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

from lessons._common import (LessonRecipe, Stopwatch, cli, hardware, parse, run_folder, run_parallel,  # noqa: E402
                             save_figure, train_argv, train_one, training_parser)

# The lesson's recipe: 60 runs must fit in 30 minutes on two CPU cores, so every run gets 1,000
# steps of 32 images (4 epochs of the 8,000 at f = 100%, 80 of the 400 at f = 5%). The lr is the
# small preset's (1.6e-2 per 512 images); the warmup (one epoch x 1/f, from lr / 10) keeps the
# first steps from stalling a run on the plateau at chance, which they did without it. Depth 4
# (2 GPSA + 2 MHSA blocks): with 5 blocks, 54 of the 60 runs took 27 minutes on our shared
# machine and learnt less in their 1,000 steps.
RECIPE = LessonRecipe(epochs=4, embed_dim=48, num_heads=4, depth=4, batch_size=32, lr=1e-3, warmup_epochs=1,
                      warmup_lr=1e-4)
# --quick: a tiny model, and each run stops after the first epoch of its schedule (seconds in all).
QUICK = LessonRecipe(epochs=1, embed_dim=16, num_heads=4, depth=3, batch_size=64, lr=1e-3, warmup_epochs=0,
                     warmup_lr=1e-4)
FRACTIONS, QUICK_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0), (0.05, 0.1)
ABLATION_FRACTION = 0.1  # Table 3's last column

# Table 2's models: the flags each adds to the lesson's ConViT (same C, H and depth for all three).
MODELS = {
    "ConViT": [],
    "ConViT without GPSA": ["--local-up-to-layer", "0"],  # the same network, every block plain MHSA
    "DeiT": ["--model", "deit_tiny"],  # DeiT's own network (C, H and depth from the recipe): the paper's baseline
}
PAPER_TABLE2 = {0.05: (34.8, 47.8), 0.1: (48.0, 59.6), 0.3: (66.1, 73.7), 0.5: (74.6, 78.2), 1.0: (79.9, 81.4)}

# Table 3 (paper.md): row -> (train gating, conv init, train GPSA, use GPSA, train.py flags,
# the paper's top-1 on full ImageNet and on 10% of it, ConViT-S+). "Train gating: no" freezes
# every lambda at 0 (sigma = 0.5); "train GPSA: no" freezes the whole attention module of
# every GPSA layer. Rows a and e are Table 2's ConViT and DeiT runs at f = 10%.
TABLE3 = {
    "a": ("ConViT", "yes", "yes", "yes", "yes", [], 82.2, 59.7),
    "b": ("gates frozen", "no", "yes", "yes", "yes", ["--freeze-gates"], 82.0, 57.4),
    "c": ("no conv init", "yes", "no", "yes", "yes", ["--no-conv-init"], 81.4, 56.9),
    "d": ("both", "no", "no", "yes", "yes", ["--freeze-gates", "--no-conv-init"], 81.6, 54.6),
    "e": ("DeiT", "no", "no", "no", "no", MODELS["DeiT"], 79.1, 47.8),
    "f": ("GPSA frozen at conv init", "no", "yes", "no", "yes", ["--freeze-gates", "--freeze-gpsa"], 78.6, 54.3),
    "g": ("GPSA frozen at random", "no", "no", "no", "yes", ["--freeze-gates", "--freeze-gpsa", "--no-conv-init"],
          73.7, 44.8),
}
SHARED_ROWS = {"a": "ConViT", "e": "DeiT"}  # Table 3 rows that are Table 2 runs


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cell(values: list[float]) -> str:
    """'86.9', or with several seeds '87.5 (85.8-89.7)': the mean and the range."""
    return f"{mean(values):.1f}" + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")


def missing_flags(flags: list[str]) -> list[str]:
    """The flags of a row that this train.py does not know (so the row cannot run)."""
    import train

    known = train.build_parser()._option_string_actions
    return [flag for flag in flags if flag.startswith("--") and flag not in known]


def plot_table2(table2: dict, seeds: list[int], args, settings: str):
    """table2[f][model] is the list of top-1 over the seeds: the mean is drawn, with bars from
    the lowest to the highest seed."""
    fractions, paper_f = sorted(table2), sorted(PAPER_TABLE2)
    ticks = ([0.05, 0.1, 0.25, 0.5, 1.0], ["5%", "10%", "25%", "50%", "100%"])
    colours = {"ConViT": "tab:red", "ConViT without GPSA": "tab:green", "DeiT": "tab:blue"}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    for name in MODELS:
        means = [mean(table2[f][name]) for f in fractions]
        spread = [[m - min(table2[f][name]) for f, m in zip(fractions, means)],
                  [max(table2[f][name]) - m for f, m in zip(fractions, means)]]
        left.errorbar(fractions, means, yerr=spread, fmt="o-", color=colours[name], capsize=4, label=name)
    for name, col in (("ConViT-S", 1), ("DeiT-S", 0)):
        middle.plot(paper_f, [PAPER_TABLE2[f][col] for f in paper_f], "s--",
                    color=colours["ConViT" if col else "DeiT"], label=name)
    what = f"mean of {len(seeds)} seeds, bars: min to max" if len(seeds) > 1 else f"seed {seeds[0]}"
    for ax, title in ((left, f"ours: {args.dataset}, C = {args.embed_dim}, H = {args.num_heads} ({what})"),
                      (middle, "paper, Table 2: ImageNet, -S models")):
        ax.set(xscale="log", xlabel="fraction f of the training set (epochs x 1/f)", ylabel="top-1 (%)", title=title,
               ylim=(0, 100))
        ax.set_xticks(*ticks)
        ax.legend(fontsize=8, loc="lower left")
    for name, style in (("DeiT", "o-"), ("ConViT without GPSA", "o:")):
        gain = [100 * (mean(table2[f]["ConViT"]) / mean(table2[f][name]) - 1) for f in fractions]
        right.plot(fractions, gain, style, color="k", label=f"ours: ConViT / {name} - 1")
    right.plot(paper_f, [100 * (PAPER_TABLE2[f][1] / PAPER_TABLE2[f][0] - 1) for f in paper_f], "s--",
               color="0.5", label="paper: ConViT-S / DeiT-S - 1")
    right.axhline(0, color="0.8")
    right.set(xscale="log", xlabel="fraction f", ylabel="relative gain of ConViT (%)", title="relative gain of ConViT")
    right.set_xticks(*ticks)
    right.legend(fontsize=8)
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
    paper = ax.bar([i + 0.2 for i in x], [TABLE3[r][7] for r in rows], 0.4, color="0.6",
                   label="paper: ConViT-S+, 10% of ImageNet")
    for bars in (ours, paper):
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r}: {TABLE3[r][0]}" for r in rows], fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 105), title="Table 3: which ingredient matters when data is scarce")
    ax.legend(loc="upper right", fontsize=8)
    save_figure(fig, args.out_dir, "06_ablations.png", settings, args.device)


def print_tables(table2: dict, table3: dict, skipped: dict):
    print("\nTable 2, ours (top-1 %, mean of the seeds and their range) beside the paper's (ImageNet, -S models):")
    print("| f | ConViT without GPSA | DeiT | ConViT | gain vs DeiT | paper: DeiT-S | paper: ConViT-S | paper gain |")
    print("|---|---|---|---|---|---|---|---|")
    for f in sorted(set(table2) | set(PAPER_TABLE2)):
        if f in table2:
            runs = table2[f]
            ours = (f"{cell(runs['ConViT without GPSA'])} | {cell(runs['DeiT'])} | {cell(runs['ConViT'])} | "
                    f"{100 * (mean(runs['ConViT']) / mean(runs['DeiT']) - 1):+.1f}%")
        else:
            ours = "- | - | - | -"
        paper = PAPER_TABLE2.get(f)
        paper_cells = f"{paper[0]} | {paper[1]} | {100 * (paper[1] / paper[0] - 1):+.0f}%" if paper else "- | - | -"
        print(f"| {f:.0%} | {ours} | {paper_cells} |")
    print(f"\nTable 3 at f = {ABLATION_FRACTION:.0%}, ours beside the paper's (ConViT-S+ on ImageNet):")
    print("| row | train gating | conv init | train GPSA | use GPSA | ours, 10% | paper, 10% | paper, full |")
    print("|---|---|---|---|---|---|---|---|")
    for row, (what, gating, init, train_gpsa, use_gpsa, _flags, full, tenth) in TABLE3.items():
        ours = cell(table3[row]) if table3.get(row) else f"not run ({skipped[row]})"
        print(f"| {row}: {what} | {gating} | {init} | {train_gpsa} | {use_gpsa} | {ours} | {tenth} | {full} |")


def main(argv=None):
    parser = training_parser(__doc__, "06", RECIPE, QUICK)
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help=f"default {' '.join(map(str, FRACTIONS))} "
                             f"(--quick: {' '.join(map(str, QUICK_FRACTIONS))})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one run per seed and setting (default 0 1 2; --quick: 0); "
                             "the figures show the mean and the range")
    args = parse(parser, argv)
    if not all(0 < f <= 1 for f in args.fractions or [1]):  # NaN fails too
        raise ValueError(f"--fractions must each lie in (0, 1], got {' '.join(map(str, args.fractions))}")
    clock = Stopwatch("lesson 6")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    fractions = sorted(set(args.fractions or (QUICK_FRACTIONS if args.quick else FRACTIONS)) | {ABLATION_FRACTION})
    skipped = {row: f"train.py has no {', '.join(missing)}" for row, spec in TABLE3.items()
               if (missing := missing_flags(spec[5]))}

    # Every run: (table, row or model, fraction, seed, extra flags). Table 3's rows a and e are Table 2's.
    runs = [("table2", name, f, seed, flags) for f in fractions for name, flags in MODELS.items() for seed in seeds]
    runs += [("table3", row, ABLATION_FRACTION, seed, spec[5]) for row, spec in TABLE3.items()
             if row not in SHARED_ROWS and row not in skipped for seed in seeds]
    for row, why in skipped.items():
        print(f"note: Table 3 row {row} skipped: {why}")
    print(f"{len(runs)} training runs, {args.workers} at a time: {args.epochs} epochs x 1/f of {args.dataset}, "
          f"C = {args.embed_dim}, H = {args.num_heads}, {args.depth} blocks, batch {args.batch_size}, lr {args.lr:g}")

    quick_stop = ["--stop-after", "1"] if args.quick else []
    with run_folder(args) as run_root:
        jobs = [train_argv(args, Path(run_root) / f"{table}-{name.replace(' ', '_')}-{f:g}-seed{seed}",
                           "--data-fraction", str(f), "--scale-epochs", *flags, *quick_stop,
                           # --scale-epochs leaves the warmup alone, as the released code does; this
                           # lesson scales it too (see RECIPE), so the later flag sets it to warmup / f
                           "--warmup-epochs", str(round(args.warmup_epochs / f)), seed=seed)
                for table, name, f, seed, flags in runs]
        started = time.perf_counter()

        def report(job, result):
            _table, name, f, seed, _flags = runs[jobs.index(job)]
            print(f"  [{time.perf_counter() - started:5.0f} s] {name:<22} f = {f:<5g} seed {seed}: top-1 "
                  f"{result['val_top1']:5.1f}%  ({result['parameters'] / 1e3:.1f}k parameters, "
                  f"{result['seconds']:.0f} s)", flush=True)

        results = run_parallel(train_one, jobs, args.workers, args.threads, done=report)

    table2 = {f: {name: [] for name in MODELS} for f in fractions}
    table3 = {row: [] for row in TABLE3 if row not in skipped}
    for (table, name, f, _seed, _flags), result in zip(runs, results):
        (table2[f][name] if table == "table2" else table3[name]).append(result["val_top1"])
    for row, name in SHARED_ROWS.items():
        table3[row] = table2[ABLATION_FRACTION][name]
    table2_shown = {f: table2[f] for f in fractions if args.fractions is None or f in args.fractions}

    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks "
                f"(ConViT: {max(args.depth - 2, 1)} GPSA), batch {args.batch_size}, AdamW lr {args.lr:g}, "
                f"warmup {args.warmup_epochs} x 1/f epochs from {args.warmup_lr:g}, cosine, {args.epochs} x 1/f epochs, "
                f"no RandAugment, {what}")
    plot_table2(table2_shown, seeds, args, settings)
    plot_table3(table3, seeds, args, settings)
    print_tables(table2_shown, table3, skipped)

    summary = {
        "command": " ".join(["python", "lessons/06_sample_efficiency.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": settings, "hardware": hardware(args.device), "seeds": seeds,
        "seconds": round(time.perf_counter() - clock.start, 1),
        "runs": [{"table": table, "name": name, "fraction": f, "seed": seed, "top1": result["val_top1"],
                  "top5": result["val_top5"], "parameters": result["parameters"],
                  "seconds": round(result["seconds"], 1), "cpu_seconds": round(result["cpu_seconds"], 1), "argv": job}
                 for (table, name, f, seed, _), job, result in zip(runs, jobs, results)],
        "table2_mean_top1": {f"{f:g}": {name: mean(v) for name, v in runs_f.items()}
                             for f, runs_f in table2_shown.items()},
        "table3_mean_top1": {row: mean(v) for row, v in table3.items() if v},
        "skipped_rows": skipped,
        "paper": {"table2": {f"{f:g}": {"DeiT-S": d, "ConViT-S": c} for f, (d, c) in PAPER_TABLE2.items()},
                  "table3": {row: {"full": spec[6], "10%": spec[7]} for row, spec in TABLE3.items()}},
    }
    path = Path(args.out_dir) / "06_sample_efficiency.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {path}")
    clock.done()


if __name__ == "__main__":
    sys.exit(cli(main))
