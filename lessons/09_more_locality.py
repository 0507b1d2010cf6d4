"""Lesson 9: how much convolution? More GPSA layers and a stronger locality (the paper's Fig. 8).

The paper trains ConViT-S+ on the first 100 ImageNet classes with 0, 3, 6 or 9 GPSA layers and
a locality strength alpha (Eq. 5) of 0.01, 0.1 or 1, and finds that top-1 rises with both:
"the more convolutional, the better". Here the same grid at small scale: lesson 6's ConViT
(4 blocks, of which 0, 2 or 3 are GPSA, the last always plain attention) on 10% of MNIST-10k,
trained until it stops improving with lesson 6's recipe, 3 seeds per setting. With no GPSA
layer alpha means nothing, so that row is trained once per seed; 2 GPSA layers at alpha = 1 is
lesson 6's ConViT, read from lesson 6's run folder or its records.

Trained whole, the lesson takes hours, so by default each run that figures/09_check or
figures/06_check records (its train.py command, trained on our AMD EPYC or Intel Xeon VM) is read rather than
trained, as lesson 6 does; --retrain trains every run on your machine.

Outputs (in --out-dir):
  09_more_locality.png   top-1 over (GPSA layers, alpha) as a heat map, and against the number of GPSA layers
  09_more_locality.json  every run's train.py command, top-1, curve and convergence

Run from the repository root:  python lessons/09_more_locality.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402
from lessons._command import parse, run_folder, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch, cell, mean, write_summary  # noqa: E402
from lessons._protocol import (QUICK, RECIPE, add_climbing, add_keep_finished, add_records,  # noqa: E402
                               convergence_line, recipe_line, records_to_keep, records_to_read, run_record,
                               run_until_converged, top1_by_length)

LAYERS = (0, 2, 3)  # GPSA blocks of the 4: none, lesson 6's ConViT (2), all but the last
STRENGTHS = (0.01, 0.1, 1.0)  # alpha, the paper's range; 1 is the default
FRACTION = 0.1
SEEDS = (0, 1, 2)
PAPER = ("Fig. 8 (ConViT-S+, first 100 ImageNet classes, 300 epochs): GPSA layers 0, 3, 6, 9 x alpha 0.01, 0.1, 1; "
         "top-1 from about 77 to 81, rising with both")


def settings_grid(quick: bool) -> list[tuple[int, float]]:
    layers, strengths = ((0, 2), (0.1, 1.0)) if quick else (LAYERS, STRENGTHS)
    return [(n, alpha) for n in layers for alpha in (strengths if n else (1.0,))]


def plot(top1: dict, seeds: list[int], args, settings: str):
    """top1[(layers, alpha)]: the top-1 of every seed."""
    layers = sorted({n for n, _ in top1})
    strengths = sorted({a for n, a in top1 if n})
    fig, (heat, lines) = plt.subplots(1, 2, figsize=(13, 4.6), layout="constrained")
    grid = [[mean(top1[n, a] if n else top1[0, 1.0]) for n in layers] for a in strengths]
    image = heat.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i, a in enumerate(strengths):
        for j, n in enumerate(layers):
            heat.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", color="w", fontsize=10)
    heat.set_xticks(range(len(layers)), [f"{n}" + (" (no GPSA: alpha unused)" if n == 0 else "") for n in layers],
                    fontsize=8)
    heat.set_yticks(range(len(strengths)), [f"{a:g}" for a in strengths])
    what = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    heat.set(xlabel="GPSA layers (of 4 blocks)", ylabel="locality strength alpha (Eq. 5)",
             title=f"ours: top-1 at f = {FRACTION:.0%} of {args.dataset} ({what})")
    fig.colorbar(image, ax=heat, label="top-1 (%)")
    colours = plt.get_cmap("plasma")([0.1, 0.45, 0.8])
    for colour, a in zip(colours, strengths):
        values = [top1[n, a] if n else top1[0, 1.0] for n in layers]
        means = [mean(v) for v in values]
        lines.errorbar(layers, means, yerr=[[m - min(v) for m, v in zip(means, values)],
                                            [max(v) - m for m, v in zip(means, values)]],
                       fmt="o-", color=colour, capsize=3, label=f"alpha = {a:g}")
    lines.set_xticks(layers)
    lines.set(xlabel="GPSA layers (of 4 blocks)", ylabel="top-1 (%)",
              title="the same, against the number of GPSA layers (bars: min to max)")
    lines.legend(fontsize=8)
    lines.text(0.02, 0.02, "paper, " + PAPER, transform=lines.transAxes, fontsize=7, wrap=True, va="bottom",
               color="0.3")
    save_figure(fig, args.out_dir, "09_more_locality.png", settings, args.device)


def print_by_length(plan: list[tuple], results: list[dict]) -> dict:
    """Each setting's top-1 at every length it trained (lengths[setting][epochs][seed]), printed as
    means: the paper's Fig. 8 is at one fixed budget, and a setting that converges sooner leads there."""
    lengths = {}
    for (_, name, _, seed, _), result in zip(plan, results):
        for epochs, top1 in top1_by_length(result).items():
            lengths.setdefault(name, {}).setdefault(epochs, {})[seed] = top1
    epochs = sorted({e for by in lengths.values() for e in by})
    print("\nEvery setting at each length it trained (mean top-1 of the seeds; each stops where it converged):")
    print("| setting | " + " | ".join(f"{e:,} epochs" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for name, by in lengths.items():
        print(f"| {name} | " + " | ".join(f"{mean(by[e].values()):.2f}" if e in by else "-" for e in epochs) + " |")
    return lengths


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    add_records(parser, "09", "06")
    add_keep_finished(parser)
    add_climbing(parser)
    args = parse(parser, argv)
    recorded = records_to_read(args)
    clock = Stopwatch("lesson 9")
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    grid = settings_grid(args.quick)
    plan = [("fig8", f"{n} GPSA, alpha {a:g}", FRACTION, seed, {"local_up_to_layer": n, "locality_strength": a})
            for n, a in grid for seed in seeds]
    print(f"{len(plan)} training runs, {args.workers} at a time: {recipe_line(args)}, f = {FRACTION:.0%}")
    with run_folder(args) as run_root:
        # 2 GPSA blocks at alpha 1 is lesson 6's ConViT at f = 10%: read from its run folder or its records.
        results = run_until_converged(args, plan, run_root, reuse=args.keep_finished,
                                      elsewhere=(Path(run_root).parent / "06", *recorded),
                                      keep_in=records_to_keep(args))
    top1 = {setting: [] for setting in grid}
    records = []
    for (n, a), seed, result in zip([s for s in grid for _ in seeds], [s for _ in grid for s in seeds], results):
        top1[n, a].append(result["val_top1"])
        records.append({**run_record("fig8", f"{n} GPSA, alpha {a:g}", FRACTION, seed, result),
                        "gpsa_layers": n, "locality_strength": a})
    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe_line(args)}, f = {FRACTION:.0%}, {what}"
    plot(top1, seeds, args, settings)
    print(f"\nFig. 8, ours: top-1 % at f = {FRACTION:.0%} (mean of the seeds and their range)")
    strengths = sorted({a for n, a in grid if n})
    print("| GPSA layers | " + " | ".join(f"alpha {a:g}" for a in strengths) + " |")
    print("|---|" + "---|" * len(strengths))
    for n in sorted({n for n, _ in grid}):
        print(f"| {n} | " + " | ".join(cell(top1[n, a] if n else top1[0, 1.0]) for a in strengths) + " |")
    lengths = print_by_length(plan, results)
    print(convergence_line(results))
    write_summary(args, __file__, "09_more_locality.json", clock, argv, settings=settings, seeds=seeds,
                  rule=convergence_line(results), runs=records,
                  mean_top1={f"{n} GPSA, alpha {a:g}": mean(v) for (n, a), v in top1.items()},
                  top1_by_length=lengths, paper=PAPER)
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
