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
  09_more_locality.png   top-1 over (GPSA layers, alpha) as heat maps, at the paper's fixed budget (240 epochs)
                         and where each setting converged; and every setting at each length it trained
  09_more_locality.json  every run's train.py command, top-1, curve and convergence, and each setting's
                         top-1 at every length

Run from the repository root:  python lessons/09_more_locality.py [--quick]
"""

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
from lessons._command import FIGURES, parse, run_folder  # noqa: E402
from lessons._draw import save_figure, text_colour  # noqa: E402
from lessons._report import Stopwatch, cell, mean, print_same_commands, trained_on, write_summary  # noqa: E402
from lessons._protocol import (climbing_parser, convergence_line, recipe_line, recorded_result,  # noqa: E402
                               recorded_runs, records_to_keep, records_to_read, print_by_length, run_record,
                               run_until_converged, schedule)

LAYERS = (0, 2, 3)  # GPSA blocks of the 4: none, lesson 6's ConViT (2), all but the last
STRENGTHS = (0.01, 0.1, 1.0)  # alpha, the paper's range; 1 is the default
FRACTION = 0.1
SEEDS = (0, 1, 2)
# The earlier protocol's runs (240 epochs each, seeds 0 and 1, on our Intel Xeon VM): their commands are
# those of the first rung of today's climb, recorded on our AMD EPYC VM, so they measure two machines.
EARLIER = FIGURES / "09_equal_steps.json"
PAPER = ("Fig. 8 (ConViT-S+, first 100 ImageNet classes, 300 epochs): GPSA layers 0, 3, 6, 9 x alpha 0.01, 0.1, 1; "
         "top-1 from about 77 to 81, rising with both")


def settings_grid(quick: bool) -> list[tuple[int, float]]:
    layers, strengths = ((0, 2), (0.1, 1.0)) if quick else (LAYERS, STRENGTHS)
    return [(n, alpha) for n in layers for alpha in (strengths if n else (1.0,))]


def heat_map(ax, fig, cells: dict, layers: list[int], strengths: list[float], title: str, scale: tuple[float, float],
             epochs: dict | None = None):
    """cells[(layers, alpha)]: every seed's top-1, drawn as their mean on the (GPSA layers, alpha)
    grid, coloured on `scale` (low, high); with `epochs`, each cell also names the length it was read at
    (epochs[(layers, alpha)], as length_label gives it)."""
    grid = [[mean(cells[n, a] if n else cells[0, 1.0]) for n in layers] for a in strengths]
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=scale[0], vmax=scale[1])
    for i, a in enumerate(strengths):
        for j, n in enumerate(layers):
            length = "\n" + epochs[n, a if n else 1.0].replace(", ", "\n") if epochs else ""
            ax.text(j, i, f"{grid[i][j]:.1f}{length}", ha="center", va="center", color=text_colour(grid[i][j], *scale),
                    fontsize=9)
    ax.set_xticks(range(len(layers)), [f"{n}" + (" (alpha unused)" if n == 0 else "") for n in layers], fontsize=8)
    ax.set_yticks(range(len(strengths)), [f"{a:g}" for a in strengths])
    ax.set(xlabel="GPSA layers (of 4 blocks)", ylabel="locality strength alpha (Eq. 5)", title=title)
    fig.colorbar(image, ax=ax, label="top-1 (%)")


def plot(top1: dict, at_budget: dict, epochs: dict, lengths: dict, converged: set[str], budget: int, seeds: list[int],
         args, settings: str, machines: str):
    """Fig. 8 twice, as heat maps: at the paper's fixed budget (at_budget) and where each setting
    converged (top1, at `epochs`); then every setting at each length it trained (lengths[name][epochs][seed]),
    ringed at its last where its setting's name is in `converged`."""
    layers = sorted({n for n, _ in top1})
    strengths = sorted({a for n, a in top1 if n})
    fig, (fixed, ends, climb) = plt.subplots(1, 3, figsize=(20, 4.8), layout="constrained", width_ratios=(1, 1, 1.2))
    what = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    means = [mean(v) for cells in (at_budget, top1) for v in cells.values()]
    scale = (min(means), max(means))  # one colour scale for both maps, so that their cells compare
    heat_map(fixed, fig, at_budget, layers, strengths, f"at the paper's budget, {budget:,} epochs ({what})", scale)
    heat_map(ends, fig, top1, layers, strengths, f"trained until it stops improving ({what})", scale, epochs)
    ticks = sorted({e for by in lengths.values() for e in by})
    for i, (name, by) in enumerate(lengths.items()):
        lengths_trained = sorted(by)
        curve = [mean(by[e].values()) for e in lengths_trained]
        colour = plt.cm.tab10(i)
        climb.plot(lengths_trained, curve, "o-", color=colour, label=name)
        if name in converged:
            climb.plot(lengths_trained[-1], curve[-1], "o", ms=12, mfc="none", color=colour)
    climb.axvline(budget, color="0.5", ls="--", lw=1, label="the paper's budget (equal steps)")
    highest = max(mean(seeds.values()) for by in lengths.values() for seeds in by.values())
    climb.set_ylim(top=highest + 1.5)  # room for the paper's line above the curves
    climb.set(xscale="log", xlabel=f"epochs at f = {FRACTION:.0%} (each a doubling; the first, the twin)",
              ylabel="top-1 (%), mean of the seeds", title="every setting at each length it trained (ringed: where it "
                                                          "converged)")
    climb.set_xticks(ticks, [f"{e:,}" for e in ticks])
    climb.minorticks_off()
    climb.legend(fontsize=7, loc="lower right")
    climb.text(0.02, 0.98, "paper, " + PAPER, transform=climb.transAxes, fontsize=7, wrap=True, va="top", color="0.3")
    save_figure(fig, args.out_dir, "09_more_locality.png", settings, args.device, machines)


def main(argv=None):
    args = parse(climbing_parser(__doc__, __file__, "06"), argv)
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
    epochs, labels, records = {}, {}, []
    for (n, a), seed, result in zip([s for s in grid for _ in seeds], [s for _ in grid for s in seeds], results):
        top1[n, a].append(result["val_top1"])
        epochs[n, a] = result["settings"]["epochs"]
        labels[n, a] = length_label(result)
        records.append({**run_record("fig8", f"{n} GPSA, alpha {a:g}", FRACTION, seed, result),
                        "gpsa_layers": n, "locality_strength": a})
    lengths = print_by_length([name for _, name, *_ in plan], [seed for *_, seed, _ in plan], results)
    budget = plan_epochs(args)  # where every setting starts: the paper's equal steps at f = 10%
    at_budget = {(n, a): list(lengths[f"{n} GPSA, alpha {a:g}"][budget].values()) for n, a in grid}
    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe_line(args)}, f = {FRACTION:.0%}, {what}"
    converged = {name for (_, name, *_), result in zip(plan, results) if result["setting_converged"]}
    plot(top1, at_budget, labels, lengths, converged, budget, seeds, args, settings, trained_on(results, args.device))
    print_grid(f"Fig. 8, ours at the paper's budget, {budget:,} epochs at f = {FRACTION:.0%} (top-1 %, mean of the seeds "
               "and their range)", grid, at_budget)
    print_grid("Fig. 8, ours trained until each setting stops improving (top-1 %, mean of the seeds and their range, "
               "at the length where its setting converged)", grid, top1, labels)
    print(convergence_line(results))
    machines = same_commands_on_two_machines(recorded, at_budget)
    write_summary(args, __file__, "09_more_locality.json", clock, argv, settings=settings, seeds=seeds,
                  rule=convergence_line(results), runs=records,
                  mean_top1={f"{n} GPSA, alpha {a:g}": mean(v) for (n, a), v in top1.items()},
                  epochs={f"{n} GPSA, alpha {a:g}": e for (n, a), e in epochs.items()}, budget_epochs=budget,
                  mean_top1_at_budget={f"{n} GPSA, alpha {a:g}": mean(v) for (n, a), v in at_budget.items()},
                  top1_by_length=lengths, same_command_two_machines=machines, paper=PAPER)
    clock.done()


def length_label(result: dict) -> str:
    """Where a setting's top-1 is read: '960 epochs', or '1,920 epochs, not converged' where its
    setting hit --max-doublings before the mean of its seeds passed the rule."""
    return f"{result['settings']['epochs']:,} epochs" + ("" if result["setting_converged"] else ", not converged")


def same_commands_on_two_machines(recorded: tuple[Path, ...], at_budget: dict) -> list[dict]:
    """Each run of EARLIER beside the record of the same train.py command in `recorded`, where both
    exist, printed: one-thread CPU runs are deterministic on one kind of CPU, not across two, and
    this says by how much two of ours differ on the same command, beside how much two seeds differ
    at the same length (at_budget[setting]: each seed's top-1)."""
    if not EARLIER.is_file() or not recorded:
        return []
    earlier, records = json.loads(EARLIER.read_text()), recorded_runs(recorded)
    pairs = []
    for run in earlier["runs"]:
        again = recorded_result(config.parse(shlex.split(run["command"])[2:]), records)
        if again is not None and again["hardware"] != earlier["hardware"]:
            pairs.append({"name": run["name"], "seed": run["seed"], "command": run["command"],
                          "first": {"machine": earlier["hardware"], "top1": run["top1"]},
                          "second": {"machine": again["hardware"], "top1": again["val_top1"]}})
    print_same_commands((f"earlier ({EARLIER.name})", "recorded"), pairs, list(at_budget.values()))
    return pairs


def plan_epochs(args) -> int:
    """The first length of every setting: the recipe's at f = 10%, 240 epochs, the paper's equal steps."""
    return schedule(args, FRACTION, args.warmup_epochs)["epochs"]


def print_grid(title: str, grid: list[tuple[int, float]], top1: dict, epochs: dict | None = None):
    """Fig. 8 as a table, one row per number of GPSA layers; with `epochs` (length_label's), each
    cell's length after it."""
    print(f"\n{title}")
    strengths = sorted({a for n, a in grid if n})
    print("| GPSA layers | " + " | ".join(f"alpha {a:g}" for a in strengths) + " |")
    print("|---|" + "---|" * len(strengths))
    for n in sorted({n for n, _ in grid}):
        keys = [(n, a) if n else (0, 1.0) for a in strengths]
        print(f"| {n} | " + " | ".join(cell(top1[k]) + (f" at {epochs[k]}" if epochs else "") for k in keys) + " |")


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
