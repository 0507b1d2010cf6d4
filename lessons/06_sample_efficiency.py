"""Lesson 6: sample efficiency. Table 2 and Table 3 of the paper at small scale, trained to the end.

Table 2 trains ConViT and DeiT on a fraction f of every class for 1/f times the epochs, so that
every run takes the same number of steps; Table 3 removes ConViT's ingredients one at a time
on 10% of the data. Here both run on MNIST-10k (real 28x28 digits in 4x4 patches: a 7x7 grid)
with train.py, for a small ConViT and DeiT's own network at the same width, heads and depth,
3 seeds each. Whether each run has stopped improving is checked, not assumed: beside it trains
its twin, the same run half as long, and the run counts as converged when the twin comes within
0.5 points of it; a setting whose seeds do not pass on their mean trains again twice as long, until
they do (lessons/_protocol.py says why, and how long each fraction starts). A setting stops at
the first length that passes, so ConViT, the faster learner, is compared at a shorter length than
DeiT: each of its Table 2 settings then trains one doubling more (more, if that doubling still
adds 0.5 points), a check that can only help it.

The recipe was chosen by a sweep of lr and warmup for both models at f = 100% and 10%
(`--sweep`, its results in 06_sweep.json); every run of the default run uses it. With
--regularisers every run also trains with DeiT's MixUp, CutMix, drop path and random erasing.

Outputs (in --out-dir):
  06_sample_efficiency.png   top-1 against f, ours beside the paper's Table 2; ConViT's gain (the paper's
                             measure, with the check one doubling past) and the share of DeiT's errors it
                             avoids; the gain at every length both models trained, against epochs x f; and
                             what the second half of every run added (its convergence)
  06_ablations.png           Table 3 rows a-g at f = 10%, ours beside the paper's 10% column, and
                             each row's top-1 at every length it trained (table3_by_length in the JSON)
  06_sample_efficiency.json  every run's and its twin's train.py command and top-1, its verdict, ConViT one
                             doubling past the rule (convit_one_rung_past), both models at every length
                             both trained (table2_by_length), and the paper's numbers
  with --sweep instead:      06_sweep.png and 06_sweep.json (the lr x warmup sweep that chose the recipe)
  with --ladder instead:     06_ladder.png (a row for the recipe, a row for each change that both models
                             ran with twins), training nothing: every twin pair recorded in figures/06_check
                             (runs longer than the recipe's, at f = 5% and 100%), the gain at each
                             model's longest run, and the recipe tried again at long lengths, one change at a
                             time (recipe_check.json), with each change's gain at each model's longest run

Trained whole, the lesson takes 25 to 30 hours on 2 cores. So by default a run that the JSON files
of figures/06_check record (its train.py command, trained on our AMD EPYC or Intel Xeon VM) is read from them
rather than trained, and only the runs they lack are trained: with every run recorded, the
lesson draws its tables in seconds. --retrain trains every run again, on your machine. With
--recorded, each run trained is also added to figures/06_check/sittings.jsonl as it finishes: how
we train a lesson of 25 to 30 hours in sittings, on machines whose run folders do not last.

Run from the repository root:  python lessons/06_sample_efficiency.py [--quick | --sweep] [--fractions F ...]
"""

import json
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
from lessons._command import draw_only_flag, parse, run_folder, training_parser  # noqa: E402
from lessons._draw import save_figure, text_colour  # noqa: E402
from lessons._report import Stopwatch, cell, mean, trained_on, write_summary  # noqa: E402
from lessons._protocol import (CONVERGED_WITHIN, FLOOR_EPOCHS, MODELS, QUICK, RECIPE, add_climbing, add_keep_finished,  # noqa: E402
                               add_records, checks, convergence_line, convergence_rule, recipe_line, records_to_keep,
                               records_to_read, run_all, run_record, run_until_converged, setting_converged,
                               top1_by_length)

FRACTIONS, QUICK_FRACTIONS = (0.05, 0.1, 0.3, 0.5, 1.0), (0.05, 0.1)  # Table 2's fractions
FRACTION_TICKS = (list(FRACTIONS), [f"{f:.0%}" for f in FRACTIONS])  # the figures' x axis, log scale
ABLATION_FRACTION = 0.1  # Table 3's last column
SEEDS = (0, 1, 2)
# The sweep that chose RECIPE's lr and warmup, for both models at SWEEP_FRACTIONS, seed 0.
SWEEP = {"lr": (1e-3, 2e-3, 4e-3, 8e-3), "warmup_epochs": (1, 4)}
SWEEP_FRACTIONS = (1.0, 0.1)
QUICK_SWEEP = {"lr": (2e-3, 4e-3), "warmup_epochs": (1,)}  # --quick --sweep, at f = 10% only

# The twin pairs trained longer than the recipe: the lesson's own runs (e*/06_sample_efficiency.json)
# and train.py's, for lengths the lesson cannot set yet (ladder.json).
CHECKS = checks("06")

# --regularisers: DeiT's own (paper.md, "Training recipe") without RandAugment, for every run of both
# tables. The paper trains both models with them; the recipe above leaves them out, and the recipe
# check (--ladder) found that at f = 5%, trained to the end, they decide which model leads.
REGULARISERS = {"mixup": 0.8, "cutmix": 1.0, "drop_path": 0.1, "reprob": 0.25}
REGULARISER_FLAGS = " ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in REGULARISERS.items())

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


def plot_table2(table2: dict, gains: dict, past: dict, by_length: dict, runs: list[tuple], seeds: list[int], args,
                settings: str):
    """Top row: our top-1 against f, the paper's, and ConViT's gain in the paper's measure. Bottom
    row: the share of DeiT's errors ConViT avoids, ConViT's gain at every length both trained
    (by_length), and what the second half of each run added. table2[f][model]: top-1 over the
    seeds (mean drawn, bars min to max); gains[f]: each seed's gain (gains_of); past: ConViT one
    doubling past (one_rung_past); runs: (plan entry, result) of every run."""
    fractions, paper_f = sorted(table2), sorted(PAPER_TABLE2)
    fig, ((ours, paper, gain), (errors, lengths, twins)) = plt.subplots(2, 3, figsize=(19, 9.5), layout="constrained")
    for name in MODELS:
        spread_plot(ours, fractions, [table2[f][name] for f in fractions], "o-", COLOURS[name], name)
    for name, col in (("ConViT-S", 1), ("DeiT-S", 0)):
        paper.plot(paper_f, [PAPER_TABLE2[f][col] for f in paper_f], "s--", color=COLOURS["ConViT" if col else "DeiT"],
                   label=name)
    what = f"mean of {len(seeds)} seeds, bars: min to max" if len(seeds) > 1 else f"seed {seeds[0]}"
    low = min(min(v) for by_model in table2.values() for v in by_model.values())
    spread_plot(gain, fractions, [gains[f]["relative"] for f in fractions], "o-", "k",
                "ours, each model where it converged")
    if past:
        spread_plot(gain, [f * 1.08 for f in sorted(past)], [past[f]["gain"]["relative"] for f in sorted(past)], "o",
                    COLOURS["ConViT"], "ours, ConViT one doubling past", mfc="none")
    gain.plot(paper_f, [100 * (PAPER_TABLE2[f][1] / PAPER_TABLE2[f][0] - 1) for f in paper_f], "s--", color="0.5",
              label="paper (equal steps)")
    spread_plot(errors, fractions, [gains[f]["errors_avoided"] for f in fractions], "o:", "k",
                "ours, each model where it converged")
    for ax, title, ylabel, floor in (
            (ours, f"ours: {args.dataset}, C = {args.embed_dim}, H = {args.num_heads}, trained until converged ({what})",
             "top-1 (%)", max(0, 5 * int(low / 5) - 5)),
            (paper, "paper, Table 2: ImageNet, -S models, equal steps", "top-1 (%)", 0),
            (gain, "ConViT's gain over DeiT, the paper's measure: ConViT / DeiT - 1", "%", None),
            (errors, "the share of DeiT's errors that ConViT avoids", "%", None)):
        ax.set(xscale="log", xlabel="fraction f of the training set", ylabel=ylabel, title=title, xlim=(0.04, 1.3))
        if floor is not None:
            ax.set_ylim(floor, 100)
        else:
            ax.axhline(0, color="0.8")
        ax.set_xticks(*FRACTION_TICKS)
        ax.legend(fontsize=8, loc="lower right" if floor is not None else "best")
    plot_by_length(lengths, by_length)
    plot_twins(twins, runs)
    save_figure(fig, args.out_dir, "06_sample_efficiency.png", settings, args.device,
                trained_on((r for _, r in runs), args.device))


def spread_plot(ax, xs: list[float], values: list[list[float]], style: str, colour, label: str, **kwargs):
    """The mean of each x's values, with a bar from their lowest to their highest."""
    means = [mean(v) for v in values]
    ax.errorbar(xs, means, yerr=[[m - min(v) for v, m in zip(values, means)], [max(v) - m for v, m in zip(values, means)]],
                fmt=style, color=colour, capsize=3, label=label, **kwargs)


def plot_by_length(ax, by_length: dict):
    """ConViT's gain at every length both models trained, one line per fraction, against the steps
    in epochs of all 8,000 images (epochs x f), so that the paper's equal steps are one x."""
    steps = set()
    for i, (f, by_epochs) in enumerate(sorted(by_length.items())):
        epochs = sorted(by_epochs)
        steps |= {e * f for e in epochs}
        spread_plot(ax, [e * f for e in epochs], [by_epochs[e]["gain"]["relative"] for e in epochs], "o-",
                    plt.cm.plasma(0.85 * i / max(1, len(by_length) - 1)), f"f = {f:.0%}")
    ax.axvline(FLOOR_EPOCHS, color="0.5", ls="--", lw=1, label=f"the paper's equal steps ({FLOOR_EPOCHS} x 1/f epochs)")
    ax.axhline(0, color="0.8")
    ax.set(xscale="log", xlabel="epochs x f (steps, in epochs of all the training images)", ylabel="%",
           title="ConViT's gain at every length both models trained")
    ticks = [2 ** k * 3 for k in range(8) if min(steps, default=3) / 2 <= 2 ** k * 3 <= 2 * max(steps, default=3)]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=8)


def plot_twins(ax, runs: list[tuple]):
    named = set()
    for (table, name, f, _seed, _), result in runs:
        if table == "table2":
            ax.plot(f * (1.06 if name == "ConViT" else 0.94), result["second_half_adds"], "o", color=COLOURS[name],
                    alpha=0.8, label=None if name in named else name)
            named.add(name)
    ax.axhline(CONVERGED_WITHIN, color="k", ls="--", lw=1, label=f"{CONVERGED_WITHIN} points: converged below")
    ax.axhline(0, color="0.8")
    ax.set(xscale="log", xlim=(0.04, 1.3), xlabel="fraction f", ylabel="top-1 of the run - top-1 of its twin (points)",
           title="what the second half of each run added (twin: the run half as long)")
    ax.set_xticks(*FRACTION_TICKS)
    ax.legend(fontsize=8)


def plot_table3(table3: dict, lengths: dict, results: list[dict], seeds: list[int], args, settings: str):
    """Left: each row's top-1 where its setting converged, beside the paper's 10% column. Right:
    each row's mean top-1 at every length it trained (lengths_of), its converged length ringed.
    results: the runs at 10%, for the machines that trained them."""
    rows = [row for row in TABLE3 if table3.get(row)]
    fig, (ax, climb) = plt.subplots(1, 2, figsize=(20, 4.8), layout="constrained", width_ratios=(3, 2))
    x = list(range(len(rows)))
    means = [mean(table3[r]) for r in rows]
    spread = [[m - min(table3[r]) for r, m in zip(rows, means)], [max(table3[r]) - m for r, m in zip(rows, means)]]
    ours = ax.bar([i - 0.2 for i in x], means, 0.4, yerr=spread, capsize=3, color="tab:red",
                  label=f"ours: {args.dataset}, {ABLATION_FRACTION:.0%} of the data, trained until it stops improving"
                        + (f", mean of {len(seeds)} seeds (bars: min to max)" if len(seeds) > 1 else ""))
    paper = ax.bar([i + 0.2 for i in x], [TABLE3[r].paper_tenth for r in rows], 0.4, color="0.6",
                   label="paper: ConViT-S+, 10% of ImageNet")
    for bars in (ours, paper):
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{r}: {TABLE3[r].what}" for r in rows], fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 105), title="Table 3: which ingredient matters when data is scarce")
    ax.legend(loc="lower left", fontsize=8)
    low, ticks = 100.0, sorted({e for by_epochs in lengths.values() for e in by_epochs})
    for i, row in enumerate(rows):
        by_epochs = lengths.get(row, {})
        if not by_epochs:
            continue
        epochs = sorted(by_epochs)
        curve = [mean(by_epochs[e].values()) for e in epochs]
        low = min(low, *curve)
        climb.plot(epochs, curve, "o-", color=plt.cm.tab10(i), label=f"{row}: {TABLE3[row].what}")
        climb.plot(epochs[-1], curve[-1], "o", ms=12, mfc="none", color=plt.cm.tab10(i))
    climb.set(xscale="log", xlabel=f"epochs at f = {ABLATION_FRACTION:.0%} (each a doubling; the first, the twin)",
              ylabel="top-1 (%), mean of the seeds", ylim=(max(0, 5 * int(low / 5) - 5), 100),
              title="every row at each length it trained (ringed: where it converged)")
    climb.set_xticks(ticks, [f"{e:,}" for e in ticks])
    climb.minorticks_off()
    climb.legend(fontsize=8, loc="lower right")
    save_figure(fig, args.out_dir, "06_ablations.png", settings, args.device, trained_on(results, args.device))


def lengths_of(plan: list[tuple], results: list[dict], fraction: float, rows: bool = True) -> dict:
    """lengths[row][epochs][seed]: each seed's top-1 at every length its setting trained at
    `fraction`, the first twin included (a rung's top-1 less what its second half added). Rows are
    Table 3's (Table 2's ConViT and DeiT being a and e); rows=False: Table 2's models alone, by name."""
    lengths = {}
    for (table, name, f, seed, _), result in zip(plan, results):
        if f != fraction or (table != "table2" and not rows):
            continue
        row = next((r for r, model in SHARED_ROWS.items() if model == name), name) if table == "table2" and rows else name
        for epochs, top1 in top1_by_length(result).items():
            lengths.setdefault(row, {}).setdefault(epochs, {})[seed] = top1
    return lengths


def table2_by_length(plan: list[tuple], results: list[dict], fractions: list[float], past: dict) -> dict:
    """by[f][epochs]: both models' top-1 by seed and ConViT's gain (gains_of) at each length both
    trained, ConViT's check one doubling past its rule (one_rung_past) included: the paper's
    equal-steps comparison, at every length of the climb."""
    by = {}
    for f in fractions:
        lengths = lengths_of(plan, results, f, rows=False)
        if f in past:
            lengths["ConViT"].update(past[f]["lengths"])
        for epochs in sorted(set(lengths.get("ConViT", {})) & set(lengths.get("DeiT", {}))):
            top1 = {name: lengths[name][epochs] for name in MODELS}
            by.setdefault(f, {})[epochs] = {**top1, "gain": gains_of(top1)}
    return by


def print_table2_by_length(by: dict):
    print("\nTable 2 at every length both models trained (the paper compares at one, its equal steps):")
    print("| f | epochs | DeiT | ConViT | gain vs DeiT |")
    print("|---|---|---|---|---|")
    for f, by_epochs in sorted(by.items()):
        for epochs, at in by_epochs.items():
            print(f"| {f:.0%} | {epochs} | {cell(list(at['DeiT'].values()), 2)} | {cell(list(at['ConViT'].values()), 2)} | "
                  f"{cell(at['gain']['relative'], 2)}% |")


def print_lengths(lengths: dict):
    """Table 3 at every length: where two rows both trained, the paper's fixed budget compares them."""
    if not lengths:
        return
    epochs = sorted({e for by_epochs in lengths.values() for e in by_epochs})
    print(f"\nTable 3 at every length its rows trained (f = {ABLATION_FRACTION:.0%}; mean top-1 of the seeds; "
          "a row stops where it converged):")
    print("| row | " + " | ".join(f"{e} epochs" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for row in TABLE3:
        if row in lengths:
            print(f"| {row}: {TABLE3[row].what} | "
                  + " | ".join(f"{mean(lengths[row][e].values()):.2f}" if e in lengths[row] else "-" for e in epochs)
                  + " |")


def print_tables(table2: dict, epochs: dict, gains: dict, table3: dict, lengths: dict):
    """epochs[f][model]: the length where each setting of Table 2 converged (or stopped climbing);
    lengths: Table 3's rows at every length they trained (lengths_of), the last where each converged."""
    print("\nTable 2, ours (top-1 %, mean of the seeds and their range; each model where it converged) beside the "
          "paper's (ImageNet, -S models, equal steps):")
    print("| f | epochs: DeiT, ConViT | DeiT | ConViT | gain vs DeiT | DeiT's errors avoided | paper: DeiT-S | "
          "paper: ConViT-S | paper gain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f in sorted(set(table2) | set(PAPER_TABLE2)):
        if f in table2:
            ours = (f"{epochs[f]['DeiT']:,}, {epochs[f]['ConViT']:,} | {cell(table2[f]['DeiT'])} | "
                    f"{cell(table2[f]['ConViT'])} | {cell(gains[f]['relative'])}% | {cell(gains[f]['errors_avoided'], 0)}%")
        else:
            ours = "- | - | - | - | -"
        paper = PAPER_TABLE2.get(f)
        paper_cells = f"{paper[0]} | {paper[1]} | {100 * (paper[1] / paper[0] - 1):+.0f}%" if paper else "- | - | -"
        print(f"| {f:.0%} | {ours} | {paper_cells} |")
    if not table3:
        return
    print(f"\nTable 3 at f = {ABLATION_FRACTION:.0%}, ours beside the paper's (ConViT-S+ on ImageNet):")
    equal = round(FLOOR_EPOCHS / ABLATION_FRACTION)  # the paper's budget: Table 2's equal steps at 10%
    print(f"| row | train gating | conv init | train GPSA | use GPSA | epochs | ours, 10% | ours at {equal} epochs "
          "| paper, 10% | paper, full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, (what, gating, init, train_gpsa, use_gpsa, _settings, full, tenth) in TABLE3.items():
        at_equal = lengths[row].get(equal)
        print(f"| {row}: {what} | {gating} | {init} | {train_gpsa} | {use_gpsa} | {max(lengths[row]):,} | "
              f"{cell(table3[row])} | {cell(list(at_equal.values())) if at_equal else '-'} | {tenth} | {full} |")


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
        low, high = min(map(min, top1)) - 1, max(map(max, top1))
        ax.imshow(top1, cmap="viridis", vmin=low, vmax=high)
        for i, w in enumerate(grid["warmup_epochs"]):
            for j, lr in enumerate(grid["lr"]):
                run = cells[name, f, lr, w]
                ax.text(j, i, f"{run['val_top1']:.1f}" + ("" if run["converged"] else "*"), ha="center", va="center",
                        color=text_colour(run["val_top1"], low, high), fontsize=9)
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


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())  # json never runs code
    except (OSError, ValueError) as err:
        raise ValueError(f"--ladder: cannot read {path} ({err})") from None


def ladder_lesson_files(folder: Path = CHECKS) -> list[Path]:
    """The lesson's own JSON files whose runs belong to the light recipe's ladder: its runs at one
    length (e*/) and its climb (climb/, the last pair of each run)."""
    return sorted([*folder.glob("e*/06_sample_efficiency.json"), *folder.glob("climb/06_sample_efficiency.json")])


def ladder_pairs(folder: Path = CHECKS) -> list[dict]:
    """Every Table 2 twin pair of the light recipe recorded in `folder`, each as ladder.json keeps
    it: name, seed, fraction, epochs, top1, half (its twin: epochs, top1), second_half_adds,
    converged, command. They are the ladder's own runs (ladder.json) and those of
    `ladder_lesson_files`. A pair recorded twice is kept once."""
    pairs = []
    for path in ladder_lesson_files(folder):
        pairs += [{**run, "epochs": config.parse(shlex.split(run["command"])[2:])["epochs"]}
                  for run in read_json(path)["runs"] if run["table"] == "table2"]
    pairs += read_json(folder / "ladder.json")["runs"]
    unique = {(p["name"], p["seed"], p["fraction"], p["epochs"]): p for p in reversed(pairs)}
    return sorted(unique.values(), key=lambda p: (p["fraction"], p["seed"], p["name"], p["epochs"]))


def ladder_points(pairs: list[dict]) -> tuple[dict, dict]:
    """points[fraction, name, seed]: {epochs: top-1} of every run and twin, and verdicts[...][epochs]
    the verdict of each run that has a twin."""
    points, verdicts = {}, {}
    for p in pairs:
        key = (p["fraction"], p["name"], p["seed"])
        points.setdefault(key, {}).update({p["half"]["epochs"]: p["half"]["top1"], p["epochs"]: p["top1"]})
        verdicts.setdefault(key, {})[p["epochs"]] = p["converged"]
    return points, verdicts


def longest_runs(points: dict, verdicts: dict) -> dict:
    """longest[fraction][name][seed]: (epochs, top-1, verdict) of the longest run of each model and
    seed, from ladder_points."""
    longest = {}
    for (f, name, seed), by_epochs in points.items():
        epochs = max(by_epochs)
        longest.setdefault(f, {}).setdefault(name, {})[seed] = (epochs, by_epochs[epochs],
                                                                verdicts[f, name, seed].get(epochs))
    return longest


def ladder(args):
    """--ladder: the twin pairs of figures/06_check, printed and drawn, and the gain at each model's
    longest run, seed by seed, with the answer to "does the gain shrink with data?" read from them."""
    pairs = ladder_pairs()
    print(f"{len(pairs)} twin pairs in {CHECKS} ({convergence_rule(True)}):")
    print("| model | seed | f | twin: epochs, top-1 | run: epochs, top-1 | second half added | converged |")
    print("|---|---|---|---|---|---|---|")
    for p in pairs:
        print(f"| {p['name']} | {p['seed']} | {p['fraction']:.0%} | {p['half']['epochs']}: {p['half']['top1']:.2f} | "
              f"{p['epochs']}: {p['top1']:.2f} | {p['second_half_adds']:+.2f} | {'yes' if p['converged'] else 'no'} |")
    print_rungs(pairs)
    points, verdicts = ladder_points(pairs)
    print("\nEach model's longest run, seed by seed (epochs: top-1, converged by its twin?):")
    gains = print_longest(points, verdicts)
    print(f"\nDoes the gain shrink with data, at each model's longest run? {does_the_gain_shrink(gains)} "
          f"{longest_caveat(pairs)}")
    checked = print_recipe_check(points)
    plot_ladder([("the recipe", points, verdicts)] + checked, args)


def print_longest(points: dict, verdicts: dict) -> dict:
    """The table of each model's longest run, seed by seed, and the gain there (points and verdicts
    from ladder_points); returns the gains by fraction, for the fractions where both models ran."""
    longest = longest_runs(points, verdicts)
    print("| f | seed | ConViT | DeiT | gain: ConViT / DeiT - 1 |")
    print("|---|---|---|---|---|")
    verdict = {True: "yes", False: "no", None: "no twin"}
    gains = {}
    for f, by_model in sorted(longest.items()):
        seeds = sorted(set(by_model.get("ConViT", {})) & set(by_model.get("DeiT", {})))
        for seed in seeds:
            (ce, c, cv), (de, d, dv) = by_model["ConViT"][seed], by_model["DeiT"][seed]
            print(f"| {f:.0%} | {seed} | {ce}: {c:.2f} ({verdict[cv]}) | {de}: {d:.2f} ({verdict[dv]}) | "
                  f"{100 * (c / d - 1):+.2f}% |")
        if seeds:
            gains[f] = gains_of({name: {seed: top1 for seed, (_, top1, _) in runs.items() if seed in seeds}
                                 for name, runs in by_model.items()})
    return gains


def print_recipe_check(points: dict) -> list[tuple]:
    """The recipe tried again at long lengths (recipe_check.json): each run beside the recipe's own
    run of the same model, fraction, seed and length, from the ladder's points; then, for each change
    that both models ran with twins, each rung on the mean of its seeds, and each model's longest run
    and the gain there, as the ladder's. Returns (change, points, verdicts) of each such change."""
    check = read_json(CHECKS / "recipe_check.json")
    print(f"\nThe recipe checked at long lengths ({check['what']}):")
    print("| model | f | seed | epochs | change to the recipe | top-1 | the recipe's top-1 | difference "
          "| second half added (its twin) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in check["runs"]:
        own = points.get((run["fraction"], run["name"], run["seed"]), {}).get(run["epochs"])
        theirs = "not trained this long | -" if own is None else f"{own:.2f} | {run['top1'] - own:+.2f}"
        half = (f"{run['second_half_adds']:+.2f} ({run['half']['epochs']}: {run['half']['top1']:.2f})" if "half" in run
                else "no twin trained")
        print(f"| {run['name']} | {run['fraction']:.0%} | {run['seed']} | {run['epochs']} | {run['change']} | "
              f"{run['top1']:.2f} | {theirs} | {half} |")
    checked = []
    for change in dict.fromkeys(run["change"] for run in check["runs"]):
        changed = [r for r in check["runs"] if r["change"] == change and "half" in r]
        changed_points, changed_verdicts = ladder_points(changed)
        if len({name for _, name, _ in changed_points}) < 2:
            continue
        checked.append((f"with {change}", changed_points, changed_verdicts))
        print(f"\nWith {change}:", end="")
        print_rungs(changed)
        print("\nEach model's longest run, seed by seed (epochs: top-1, converged by its twin?):")
        gains = print_longest(changed_points, changed_verdicts)
        print(f"\nDoes the gain shrink with data, with {change}? {does_the_gain_shrink(gains)} {longest_caveat(changed)}")
    return checked


def rungs_of(pairs: list[dict]) -> dict:
    """rungs[name, fraction][epochs][seed]: the twin pair of that rung and seed, models in order of
    fraction, then name; rungs in order of length; seeds in order."""
    rungs = {}
    for p in sorted(pairs, key=lambda p: (p["fraction"], p["name"], p["epochs"], p["seed"])):
        rungs.setdefault((p["name"], p["fraction"]), {}).setdefault(p["epochs"], {})[p["seed"]] = p
    return rungs


def longest_caveat(pairs: list[dict]) -> str:
    """Whether the answer rests on converged runs. Each model and fraction is judged as the lesson's
    rule judges a setting: at its longest rung that every one of its seeds ran, on the mean of what
    their second halves added. A rung that only some seeds reached (a climb under way) is named,
    but cannot pass the setting alone: one pair is too noisy for that."""
    climbing = []
    for (name, f), by_epochs in rungs_of(pairs).items():
        seeds = set().union(*by_epochs.values())
        top = max((epochs for epochs, by_seed in by_epochs.items() if set(by_seed) == seeds), default=None)
        adds = [p["second_half_adds"] for p in by_epochs[top].values()] if top is not None else []
        if adds and setting_converged(adds):
            continue
        above = [f"{epochs} has {len(by_epochs[epochs])} of {len(seeds)} seeds" for epochs in by_epochs
                 if top is None or epochs > top]
        climbing.append(f"{name} at {f:.0%} (" + "; ".join(
            ([f"+{mean(adds):.2f} at {top} epochs"] if adds else []) + above) + ")")
    if not climbing:
        return "Every model's longest runs are converged on the mean of their seeds."
    verb, whose = ("climbs", "its") if len(climbing) == 1 else ("climb", "their")
    return (f"Not a finding yet: {', '.join(climbing)} still {verb} on the mean of {whose} seeds (what the second "
            "half added, at the longest length that every seed ran).")


def print_rungs(pairs: list[dict]):
    """Each rung (model, fraction, length) trained with two or more seeds: what its second half
    added, seed by seed and on the mean of the seeds, where the noise of one pair averages out."""
    print("\nEach rung with two or more seeds (top-1 and what the second half added: mean of the seeds, and range):")
    print("| model | f | twin -> run (epochs) | seeds | run's top-1 | second half added | converged: seeds; on the mean |")
    print("|---|---|---|---|---|---|---|")
    for (name, f), by_epochs in rungs_of(pairs).items():
        for epochs, by_seed in by_epochs.items():
            if len(by_seed) < 2:
                continue
            found = list(by_seed.values())
            adds = [p["second_half_adds"] for p in found]
            print(f"| {name} | {f:.0%} | {found[0]['half']['epochs']} -> {epochs} | {', '.join(map(str, by_seed))} | "
                  f"{cell([p['top1'] for p in found], 2)} | {cell(adds, 2)} | "
                  f"{sum(p['converged'] for p in found)} of {len(found)}; {'yes' if setting_converged(adds) else 'no'} |")


def plot_ladder(rows: list[tuple], args):
    """One row of panels per recipe (title, points, verdicts from ladder_points): top-1 against epochs at
    each fraction (a line per model and seed; a filled marker: the run is converged by its twin, open:
    not, a dot: a twin only), and the gain where both models trained the same epochs."""
    columns = max(len({f for f, _, _ in points}) for _, points, _ in rows) + 1
    fig, grid = plt.subplots(len(rows), columns, figsize=(6 * columns, 4.6 * len(rows)), layout="constrained",
                             squeeze=False)
    for axes, (recipe, points, verdicts) in zip(grid, rows):
        fractions = sorted({f for f, _, _ in points})
        for ax, f in zip(axes, fractions):
            plot_rungs(ax, {key: by for key, by in points.items() if key[0] == f}, verdicts)
            ax.set_title(f"{recipe}\nf = {f:.0%}", fontsize=10)
        plot_gains(axes[-1], points, fractions)
        axes[-1].set_title(f"{recipe}\nConViT's gain where both models trained the same epochs", fontsize=10)
        for ax in axes[len(fractions):-1]:
            ax.set_visible(False)
    save_figure(fig, args.out_dir, "06_ladder.png",
                "each run beside its twin, the same run half as long; a filled marker: the run converged by its "
                "twin, open: not, a dot: a twin only; "
                "every train.py command in lessons/figures/06_check", args.device,
                machine=read_json(CHECKS / "ladder.json")["hardware"])


LINES = ("-", "--", ":")  # a line style per seed (seed % 3)


def plot_rungs(ax, points: dict, verdicts: dict):
    """Top-1 against epochs of one fraction's runs, a line per model and seed."""
    for (f, name, seed), by_epochs in sorted(points.items()):
        epochs = sorted(by_epochs)
        ax.plot(epochs, [by_epochs[e] for e in epochs], LINES[seed % 3], color=COLOURS[name], lw=1,
                label=f"{name}, seed {seed}")
        for e in epochs:
            judged = verdicts[f, name, seed].get(e)
            ax.plot(e, by_epochs[e], "o" if judged is not None else ".", color=COLOURS[name],
                    mfc=COLOURS[name] if judged else "white", ms=6)
    ax.set(xscale="log", xlabel="epochs", ylabel="top-1 (%)")
    log_ticks(ax, {e for by in points.values() for e in by})
    ax.legend(fontsize=7)


def plot_gains(ax, points: dict, fractions: list[float]):
    """ConViT / DeiT - 1 wherever both trained the same epochs, against steps (epochs x f, in epochs
    of all the data), so that the fractions share an axis."""
    for f, marker in zip(fractions, "so^v"):
        for seed in sorted({s for f_, _, s in points if f_ == f}):
            convit, deit = points.get((f, "ConViT", seed), {}), points.get((f, "DeiT", seed), {})
            both = sorted(set(convit) & set(deit))
            if both:
                ax.plot([e * f for e in both], [100 * (convit[e] / deit[e] - 1) for e in both],
                        marker + LINES[seed % 3], color="k", mfc="white" if f < 1 else "k",
                        label=f"f = {f:.0%}, seed {seed}")
    ax.axhline(0, color="0.7")
    ax.set(xscale="log", xlabel="steps, in epochs of all the data (epochs x f)", ylabel="ConViT / DeiT - 1 (%)")
    log_ticks(ax, {e * f for (f, _, _), by in points.items() for e in by})
    ax.legend(fontsize=7)


def log_ticks(ax, ticks):
    """A tick at each length trained, written plainly (480, not 4.8 x 10^2), on a log axis."""
    ax.set_xticks(sorted(ticks))
    ax.get_xaxis().set_major_formatter("{x:g}")
    ax.minorticks_off()


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
    draw_only_flag(parser, "ladder", "train nothing: print and draw every twin pair recorded in lessons/figures/06_check "
                                     "(runs longer than the recipe's) into --out-dir; takes no other flag but --out-dir")
    parser.add_argument("--regularisers", action="store_true",
                        help=f"every run of both tables also trains with DeiT's regularisers: {REGULARISER_FLAGS}")
    add_records(parser, "06")
    add_keep_finished(parser)
    add_climbing(parser)
    args = parse(parser, argv)
    if args.ladder:
        return ladder(args)
    if not all(0 < f <= 1 for f in args.fractions or [1]):  # NaN fails too
        raise ValueError(f"--fractions must each lie in (0, 1], got {' '.join(map(str, args.fractions))}")
    if args.recorded and args.sweep:
        raise ValueError("--recorded keeps the recipe's runs of both tables, not the sweep's: drop --recorded")
    if args.sweep and args.regularisers:
        raise ValueError("--sweep repeats the sweep that chose the recipe, without regularisers: drop --regularisers")
    recorded = records_to_read(args)  # checked before anything is written
    clock = Stopwatch("lesson 6")
    if args.sweep:
        with run_folder(args) as run_root:
            return sweep(args, Path(run_root) / "sweep", clock, argv)
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    fractions = sorted(set(args.fractions or (QUICK_FRACTIONS if args.quick else FRACTIONS)))
    # Every run: (table, row or model, fraction, seed, extra flags). Table 3 (at 10%, so only when
    # 10% is among the fractions) shares its rows a and e with Table 2.
    extra = REGULARISERS if args.regularisers else {}
    plan = [("table2", name, f, seed, {**changes, **extra})
            for f in fractions for name, changes in MODELS.items() for seed in seeds]
    if ABLATION_FRACTION in fractions:
        plan += [("table3", row, ABLATION_FRACTION, seed, {**ablation.settings, **extra})
                 for row, ablation in TABLE3.items() if row not in SHARED_ROWS for seed in seeds]
    recipe = recipe_line(args) + (f", with DeiT's regularisers ({REGULARISER_FLAGS})" if extra else "")
    print(f"{len(plan)} training runs and their twins (half as long), {args.workers} at a time: {recipe}")
    with run_folder(args) as run_root:
        results = run_until_converged(args, plan, run_root, reuse=args.keep_finished, elsewhere=recorded,
                                      keep_in=records_to_keep(args))
        table2, table3 = tables_of(plan, results, fractions)
        past = one_rung_past(args, plan, results, run_root, recorded, table2)
    report(args, argv, clock, plan, results, (table2, table3), past, recipe, seeds, fractions)


def report(args, argv, clock: Stopwatch, plan: list[tuple], results: list[dict], tables: tuple[dict, dict],
           past: dict, recipe: str, seeds: list[int], fractions: list[float]):
    """Both tables (tables_of) printed and drawn, every run's verdict, the answer, and the JSON summary."""
    table2, table3 = tables
    gains = {f: gains_of(table2[f]) for f in fractions}
    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe}, {what}"
    top1 = {f: {name: list(by_seed.values()) for name, by_seed in runs_f.items()} for f, runs_f in table2.items()}
    by_length = table2_by_length(plan, results, fractions, past)
    plot_table2(top1, gains, past, by_length, list(zip(plan, results)), seeds, args, settings)
    lengths = lengths_of(plan, results, ABLATION_FRACTION) if ABLATION_FRACTION in fractions else {}
    if lengths:
        plot_table3(table3, lengths, [r for run, r in zip(plan, results) if run[2] == ABLATION_FRACTION], seeds, args,
                    settings)
    epochs = {f: {} for f in fractions}
    for (table, name, f, _seed, _), result in zip(plan, results):
        if table == "table2":
            epochs[f][name] = max(epochs[f].get(name, 0), result["rungs"][-1]["epochs"])
    print_tables(top1, epochs, gains, table3 if lengths else {}, lengths)
    print_lengths(lengths)
    print_table2_by_length(by_length)
    print_past(past, gains)
    print_convergence(plan, results)
    answer = does_the_gain_shrink(gains)
    print(f"\nDoes the gain shrink with data? {answer}")
    print(convergence_line(results))
    write_summary(
        args, __file__, "06_sample_efficiency.json", clock, argv, settings=settings, seeds=seeds,
        rule=convergence_line(results),
        runs=[run_record(table, name, f, seed, result) for (table, name, f, seed, _), result in zip(plan, results)],
        table2_mean_top1={f"{f:g}": {name: mean(v) for name, v in runs_f.items()} for f, runs_f in top1.items()},
        table2_epochs={f"{f:g}": by_model for f, by_model in epochs.items()},
        gain_per_seed={f"{f:g}": g for f, g in gains.items()}, does_the_gain_shrink=answer,
        convit_one_rung_past={f"{f:g}": at for f, at in past.items()},
        table2_by_length={f"{f:g}": by_epochs for f, by_epochs in by_length.items()},
        table3_mean_top1={row: mean(v) for row, v in table3.items() if v},
        table3_by_length={row: dict(sorted(by.items())) for row, by in lengths.items()},
        paper={"table2": {f"{f:g}": {"DeiT-S": d, "ConViT-S": c} for f, (d, c) in PAPER_TABLE2.items()},
               "table3": {row: {"full": row_.paper_full, "10%": row_.paper_tenth} for row, row_ in TABLE3.items()}})
    clock.done()


def tables_of(plan: list[tuple], results: list[dict], fractions: list[float]) -> tuple[dict, dict]:
    """table2[f][model]: top-1 by seed; table3[row]: top-1 of each seed (rows a and e: Table 2's runs at 10%)."""
    table2 = {f: {name: {} for name in MODELS} for f in fractions}
    table3 = {row: [] for row in TABLE3}
    for (table, name, f, seed, _settings), result in zip(plan, results):
        if table == "table2":
            table2[f][name][seed] = result["val_top1"]
        else:
            table3[name].append(result["val_top1"])
    if ABLATION_FRACTION in fractions:
        for row, name in SHARED_ROWS.items():
            table3[row] = list(table2[ABLATION_FRACTION][name].values())
    return table2, table3


def one_rung_past(args, plan: list[tuple], results: list[dict], run_root: Path, recorded: tuple[Path, ...],
                  table2: dict) -> dict:
    """The rule's one bias, checked: each setting stops at the first length that passes, so the
    model that learns faster, ConViT, is compared at a shorter length than DeiT, and its next
    doubling could still add up to CONVERGED_WITHIN points. Here every Table 2 setting of ConViT
    that passed trains one doubling more (the run where it passed being the twin), and DeiT keeps
    its own length. Where that doubling adds CONVERGED_WITHIN or more on the mean of the seeds, the
    setting had not converged after all, and it climbs on (up to --max-doublings). The check can
    only help ConViT: where ConViT still trails DeiT, the rule did not make it trail. past[f]: the
    check's last length, its top-1 by seed, what its doubling added, whether it passed, the gain."""
    picks = [(i, len(results[i]["rungs"])) for i, (table, name, *_) in enumerate(plan)
             if table == "table2" and name == "ConViT" and results[i]["setting_converged"]]
    past, lengths = {}, {}
    while picks:
        print(f"  {len(picks)} runs of ConViT, one doubling past the length where their setting passed the rule "
              "(the check that stopping at the first pass does not decide the sign)", flush=True)
        again = run_all(args, [plan[i] for i, _ in picks], run_root, reuse=True, elsewhere=recorded, twins=True,
                        doublings=[doubled for _, doubled in picks], keep_in=records_to_keep(args))
        for f in {plan[i][2] for i, _ in picks}:
            past[f] = {"epochs": None, "top1": {}, "adds": {}}
        for (i, _), result in zip(picks, again):
            at = past[plan[i][2]]
            at["epochs"] = result["settings"]["epochs"]
            at["top1"][plan[i][3]], at["adds"][plan[i][3]] = result["val_top1"], result["second_half_adds"]
        for f, at in past.items():
            at["passed"] = mean(at["adds"].values()) < CONVERGED_WITHIN
            lengths.setdefault(f, {})[at["epochs"]] = at["top1"]
        picks = [(i, doubled + 1) for i, doubled in picks
                 if not past[plan[i][2]]["passed"] and doubled < (0 if args.quick else args.max_doublings)]
    for f, at in past.items():
        at["gain"] = gains_of({"ConViT": at["top1"], "DeiT": table2[f]["DeiT"]})
        at["lengths"] = lengths[f]  # every length the check trained, the last being `epochs`
    return past


def print_past(past: dict, gains: dict):
    if not past:
        return
    print("\nConViT one doubling past its rule's length (more where that doubling still added "
          f"{CONVERGED_WITHIN} points), DeiT at its own (the check can only help ConViT):")
    print("| f | ConViT's epochs | top-1 | the last doubling added | converged | gain vs DeiT | at the rule's length |")
    print("|---|---|---|---|---|---|---|")
    for f, at in sorted(past.items()):
        top1, adds = list(at["top1"].values()), list(at["adds"].values())
        print(f"| {f:.0%} | {at['epochs']} | {cell(top1)} | {mean(adds):+.2f} | {'yes' if at['passed'] else 'no'} | "
              f"{cell(at['gain']['relative'], 2)}% | {cell(gains[f]['relative'], 2)}% |")
    if len(past) > 1:
        print(f"Does the gain shrink, with ConViT one doubling past? "
              f"{does_the_gain_shrink({f: at['gain'] for f, at in past.items()})}")


def gains_of(by_model: dict) -> dict:
    """ConViT's gain over DeiT at one fraction, seed by seed (a seed draws both models' subset):
    the paper's measure, ConViT / DeiT - 1, and the share of DeiT's errors that ConViT avoids, in %."""
    seeds = sorted(set(by_model["ConViT"]) & set(by_model["DeiT"]))
    convit, deit = ([by_model[name][s] for s in seeds] for name in ("ConViT", "DeiT"))
    return {"relative": [round(100 * (c / d - 1), 2) for c, d in zip(convit, deit)],
            "errors_avoided": [round(100 * (c - d) / (100 - d), 1) for c, d in zip(convit, deit)]}


def does_the_gain_shrink(gains: dict) -> str:
    """The answer in one sentence: the gain (ConViT / DeiT - 1, the paper's measure) at the largest
    fraction against the smallest, seed by seed; a change counts only when the two ranges of seeds
    do not overlap. The share of DeiT's errors avoided follows: near 100% top-1, the paper's
    measure shrinks with DeiT's errors even where ConViT avoids as large a share of them. Where no
    seed of ConViT beats DeiT at either end there is no gain to shrink, and the sentence says so
    before it says which way the deficit moves."""
    low, high = min(gains), max(gains)
    if low == high:
        return f"one fraction ({low:.0%}) cannot say: run two or more (--fractions)."
    at_low, at_high = gains[low]["relative"], gains[high]["relative"]
    seeds = f"mean and range of {len(at_high)} seeds" if len(at_high) > 1 else "one seed"
    said = (f"the gain is {cell(at_low, 2)}% at f = {low:.0%} and {cell(at_high, 2)}% at f = {high:.0%} ({seeds}), "
            f"and the share of DeiT's errors that ConViT avoids is {cell(gains[low]['errors_avoided'], 0)}% and "
            f"{cell(gains[high]['errors_avoided'], 0)}%")
    moves = direction(at_low, at_high)
    if max(at_low + at_high) <= 0:
        deficit = {1: "narrows", -1: "widens", 0: "does not change beyond the seeds' spread"}
        errors = direction(gains[low]["errors_avoided"], gains[high]["errors_avoided"])
        return (f"no, there is no gain to shrink: no seed of ConViT beats DeiT at either end; {said}; in the paper's "
                f"measure the deficit {deficit[moves]} with data, as a share of DeiT's errors it {deficit[errors]}.")
    if moves < 0:
        return f"yes: {said}; every seed's gain at {high:.0%} is below every seed's at {low:.0%}."
    if moves > 0:
        return f"no, it grows: {said}; every seed's gain at {high:.0%} is above every seed's at {low:.0%}."
    return f"not beyond the seeds' spread: {said}; the two ranges overlap."


def direction(before: list[float], after: list[float]) -> int:
    """-1 if every seed's value after is below every seed's before, 1 if above, 0 if the ranges overlap."""
    return -1 if max(after) < min(before) else 1 if min(after) > max(before) else 0


def print_convergence(plan: list[tuple], results: list[dict]):
    print(f"\nEvery run against its twin, trained half as long (converged: the twin within {CONVERGED_WITHIN} points):")
    print("| table | run | f | seed | epochs (each doubling) | top-1 | twin's epochs | twin's top-1 | second half added "
          "| converged: the run; its setting, on the mean of its seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    yes = {True: "yes", False: "no"}
    for (table, name, f, seed, _), result in zip(plan, results):
        print(f"| {table} | {name} | {f:.0%} | {seed} | {' -> '.join(str(r['epochs']) for r in result['rungs'])} | "
              f"{result['val_top1']:.2f} | {result['half']['epochs']} | {result['half']['top1']:.2f} | "
              f"{result['second_half_adds']:+.2f} | {yes[result['converged']]}; {yes[result['setting_converged']]} |")


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
