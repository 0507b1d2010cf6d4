"""Lesson 6: sample efficiency. ConViT against a DeiT of the same size, on a fraction of the data.

A convolutional prior should matter most when data is scarce: with little to learn from, a
model that starts out local has less to discover. The paper's Table 2 trains DeiT-S and
ConViT-S on a fraction f of each ImageNet class for 1/f times the epochs (the same number of
steps) and finds a gain that shrinks as f grows, from +37% at 5% to +2% at 100%.
Its Table 3 then asks which ingredient matters: the trained gates, the convolutional init,
training the positional part at all.

Here: the same protocol through train.py (--data-fraction f --scale-epochs), with a small
ConViT and DeiT's own network (--model deit_tiny: qkv with a bias, a position for the class
token) at the ConViT's width, heads and depth (--num-heads 4), and Table 3's seven rows a-g at
the smallest fraction, each one documented flag combination (see train.py's header).

Figures (in --out-dir):
  06_sample_efficiency.png  top-1 against f, ours beside the paper's Table 2, and the relative gain
  06_ablations.png          Table 3 rows a-g: ours (at the smallest f) beside the paper's 10% column

Run from the repository root:  python lessons/06_sample_efficiency.py [--quick]
    a real dataset / a GPU:      ... --dataset cifar10 --data-dir data --device cuda --epochs 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import convit  # noqa: E402
from lessons._common import Stopwatch, cli, parse, run_folder, save_figure, train_small, training_parser  # noqa: E402

DEPTH = 4  # 2 GPSA + 2 MHSA blocks for ConViT; 4 MHSA blocks for the DeiT
DEIT = ["--model", "deit_tiny", "--num-heads", "4"]  # DeiT's own network at the ConViT's C, H and depth
MODELS = {"ConViT": [], "DeiT": DEIT}
PAPER_TABLE2 = {0.05: (34.8, 47.8), 0.1: (48.0, 59.6), 0.3: (66.1, 73.7), 0.5: (74.6, 78.2), 1.0: (79.9, 81.4)}
# row: (what it is, train.py flags beyond ConViT's, the paper's top-1 on 10% of ImageNet, ConViT-S+)
TABLE3 = {
    "a": ("ConViT", [], 59.7),
    "b": ("gates frozen at 0", ["--freeze-gates"], 57.4),
    "c": ("no conv init", ["--no-conv-init"], 56.9),
    "d": ("gates frozen, no conv init", ["--freeze-gates", "--no-conv-init"], 54.6),
    "e": ("DeiT", DEIT, 47.8),
    "f": ("GPSA frozen at conv init", ["--freeze-gates", "--freeze-gpsa"], 54.3),
    "g": ("GPSA frozen at random", ["--freeze-gates", "--freeze-gpsa", "--no-conv-init"], 44.8),
}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def plot_table2(ours: dict, args, settings: str):
    """ours[f][model] is the list of top-1 over the seeds: the mean is drawn, and the range when
    there are several seeds."""
    fractions = sorted(ours)
    paper_f = sorted(PAPER_TABLE2)
    ticks = ([0.05, 0.1, 0.25, 0.5, 1.0], ["5%", "10%", "25%", "50%", "100%"])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    for name, colour, col in (("ConViT", "tab:red", 1), ("DeiT", "tab:blue", 0)):
        means = [mean(ours[f][name]) for f in fractions]
        spread = [[m - min(ours[f][name]) for f, m in zip(fractions, means)],
                  [max(ours[f][name]) - m for f, m in zip(fractions, means)]]
        left.errorbar(fractions, means, yerr=spread, fmt="o-", color=colour, capsize=4, label=f"{name} (ours)")
        middle.plot(paper_f, [PAPER_TABLE2[f][col] for f in paper_f], "s--", color=colour, label=f"{name}-S (paper)")
    seeds = f"mean of {len(args.seeds)} seeds, bars: min to max" if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    for ax, title in ((left, f"ours: {args.dataset}, small models ({seeds})"),
                      (middle, "paper, Table 2: ImageNet, -S models")):
        ax.set(xscale="log", xlabel="fraction f of the training set (epochs x 1/f)", ylabel="top-1 (%)", title=title)
        ax.set_xticks(*ticks)
        ax.legend()
    gain = [100 * (mean(ours[f]["ConViT"]) / mean(ours[f]["DeiT"]) - 1) for f in fractions]
    paper_gain = [100 * (PAPER_TABLE2[f][1] / PAPER_TABLE2[f][0] - 1) for f in paper_f]
    right.plot(fractions, gain, "o-", color="k", label="ours")
    right.plot(paper_f, paper_gain, "s--", color="0.5", label="paper")
    right.axhline(0, color="0.8")
    right.set(xscale="log", xlabel="fraction f", ylabel="ConViT / DeiT - 1 (%)", title="relative gain of ConViT")
    right.set_xticks(*ticks)
    right.legend()
    save_figure(fig, args.out_dir, "06_sample_efficiency.png", settings, args.device)


def plot_table3(ours: dict, fraction: float, args, settings: str):
    rows = list(TABLE3)
    fig, ax = plt.subplots(figsize=(13, 4.3), layout="constrained")
    x = range(len(rows))
    ours_bars = ax.bar([i - 0.2 for i in x], [mean(ours[r]) for r in rows], 0.4, color="tab:red",
                       label=f"ours: {args.dataset}, {fraction:.0%} of the data"
                             + (f", mean of {len(args.seeds)} seeds" if len(args.seeds) > 1 else ""))
    paper_bars = ax.bar([i + 0.2 for i in x], [TABLE3[r][2] for r in rows], 0.4, color="0.6",
                        label="paper: ConViT-S+, 10% of ImageNet")
    for bars in (ours_bars, paper_bars):
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(x), [f"{r}: {TABLE3[r][0]}" for r in rows], fontsize=9)
    ax.set(ylabel="top-1 (%)", ylim=(0, 105), title="Table 3 ablations: which ingredient matters when data is scarce")
    ax.legend(loc="upper right", fontsize=8)
    save_figure(fig, args.out_dir, "06_ablations.png", settings, args.device)


def cell(values: list[float]) -> str:
    """'86.9', or with several seeds '87.5 (86.9, 85.8, 89.7)'."""
    return f"{mean(values):.1f}" + (f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else "")


def main(argv=None):
    parser = training_parser(__doc__, "06", epochs=20, quick_epochs=1)  # a fraction f trains epochs / f
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="default 0.1 0.25 0.5 1.0 (--quick: 0.5 1.0); the smallest also runs the ablations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed and setting (default: 0); the figures show the mean and the range")
    args = parse(parser, argv)
    if not all(0 < f <= 1 for f in args.fractions or [1]):  # NaN fails too
        raise ValueError(f"--fractions must each lie in (0, 1], got {' '.join(map(str, args.fractions))}")
    clock = Stopwatch("lesson 6")
    epochs = args.epochs
    fractions = sorted(args.fractions or ((0.5, 1.0) if args.quick else (0.1, 0.25, 0.5, 1.0)))
    smallest = fractions[0]

    table2, table3 = {}, {}
    with run_folder(args) as run_root:

        def run(name: str, fraction: float, flags: list[str]) -> list[float]:
            top1 = []
            for seed in args.seeds:
                result, _ = train_small(args, run_root / f"{name}-{fraction:g}-seed{seed}", epochs, "--depth", str(DEPTH),
                                        "--data-fraction", str(fraction), "--scale-epochs", *flags, seed=seed)
                top1.append(result["val_top1"])
                print(f"  {name:<26} f = {fraction:<5g} seed {seed}: top-1 {result['val_top1']:5.1f}%  "
                      f"({convit.count_parameters(result['model']) / 1e3:.1f}k parameters)", flush=True)
            return top1

        print("Table 2: ConViT against DeiT's own network at the ConViT's width and heads")
        for fraction in fractions:
            table2[fraction] = {name: run(name, fraction, flags) for name, flags in MODELS.items()}
        print(f"Table 3: ablations at f = {smallest:g} (rows a and e are the runs above)")
        for row, (what, flags, _paper) in TABLE3.items():
            table3[row] = table2[smallest][what] if what in MODELS else run(f"{row} {what}", smallest, flags)

    grid = "8x8 images in 2x2 patches (4x4 grid)" if args.dataset == "digits" else "train.py's image and patch size"
    seeds = f"seeds {', '.join(map(str, args.seeds))}" if len(args.seeds) > 1 else f"one seed ({args.seeds[0]})"
    settings = (f"train.py on {args.dataset} ({grid}), convit_tiny shrunk to C = 32, 4 heads, {DEPTH} blocks "
                f"(ConViT: 2 GPSA), batch 32, lr {args.lr:g}, {epochs} epochs x 1/f, no RandAugment, {seeds}")
    plot_table2(table2, args, settings)
    plot_table3(table3, smallest, args, settings)

    print("\n| f | DeiT top-1 | ConViT top-1 | gain | paper DeiT-S | paper ConViT-S | paper gain |")
    print("|---|---|---|---|---|---|---|")
    for f in fractions:
        deit, conv = table2[f]["DeiT"], table2[f]["ConViT"]
        paper = PAPER_TABLE2.get(f)
        paper_cells = f"{paper[0]} | {paper[1]} | {100 * (paper[1] / paper[0] - 1):+.0f}%" if paper else "- | - | -"
        print(f"| {f:.0%} | {cell(deit)} | {cell(conv)} | {100 * (mean(conv) / mean(deit) - 1):+.1f}% | {paper_cells} |")
    print(f"\n| row | ours, {smallest:.0%} | paper, 10% |")
    print("|---|---|---|")
    for row, (what, _flags, paper) in TABLE3.items():
        print(f"| {row}: {what} | {cell(table3[row])} | {paper} |")
    clock.done()


if __name__ == "__main__":
    sys.exit(cli(main))
