"""Lesson 12: what each head does, what each layer uses, and why the gate (Figs. 7, 9, 15; Tab. 6).

Three pieces of the paper's evidence, on models trained here:

  1. attention maps: every head of every block of a trained ConViT, DeiT and PSA model, from the
     query patch at the image centre, each GPSA head titled with its sigma(lambda) (Fig. 7), and
     DeiT's and ConViT's averaged over 100 validation images (Fig. 15)  -- python plots.py --attention;
  2. Tab. 6: the trained ConViT evaluated with content masked (sigma(lambda) = 1) or position
     masked (sigma(lambda) = 0) in its first K GPSA layers  -- python probes.py;
  3. SM A / Fig. 9: plain positional self-attention (PSA, Eq. 4: content and position logits
     in one softmax, the same conv init, no gate) trained beside GPSA and DeiT's own network,
     top-1 over training, at two fractions of the data  -- python train.py --attention psa.

Every model: lesson 6's recipe and width (C = 48, 4 heads, 4 blocks, the first 2 GPSA or PSA),
3 seeds, on the scikit-learn digits by default (8x8 images in 2x2 patches, a 4x4 grid: one run
takes about a minute on one thread), each fraction f trained 1/f times the epochs.

Outputs (in --out-dir):
  12_curves.png         top-1 over training of PSA, GPSA (ConViT) and DeiT at each fraction (Fig. 9)
  12_table6.png         Tab. 6: ours beside the paper's
  12_maps_convit.png, 12_maps_deit.png, 12_maps_psa.png   Fig. 7 for one validation image
  12_maps_deit_mean.png, 12_maps_convit_mean.png           Fig. 15: the mean over 100 images
  12_what_heads_use.json   every run's train.py command and curve, every table's and map's command

Run from the repository root:  python lessons/12_what_heads_use.py [--quick]
"""

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import checkpoints  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import plots  # noqa: E402
import probes  # noqa: E402
from lessons._command import REPO_ROOT, LessonRecipe, parse, repo_path, run_folder, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._protocol import QUICK, add_keep_finished, convergence_line, recipe_line, run_all, run_record  # noqa: E402
from lessons._report import Stopwatch, cell, mean, write_summary  # noqa: E402
from lessons._training import at_repository_root  # noqa: E402

# Lesson 6's recipe, trained twice as long: on the digits its 24 epochs still gain at the end.
RECIPE = LessonRecipe(epochs=48, embed_dim=48, num_heads=4, depth=4, batch_size=64, lr=4e-3, warmup_epochs=4,
                      warmup_lr=4e-5)
SEEDS = (0, 1, 2)
FRACTIONS = (1.0, 0.25)
MODELS = {  # the settings each adds to the recipe's ConViT
    "ConViT": {},  # GPSA in the first 2 blocks
    "PSA": {"attention": "psa"},  # Eq. 4 in the same blocks, with the same conv init and no gate
    "DeiT": {"model": "deit_tiny"},  # DeiT's own network at the same C, H and depth
}
COLOURS = {"ConViT": "tab:blue", "PSA": "tab:red", "DeiT": "tab:grey"}
# Fig. 7's ConViT-Ti gates (layer 2; in layer 10 every head reads content), for the text's comparison.
PAPER_FIG7_LAYER2_GATES = [0.00, 0.09, 0.51, 0.73]
MAPS = {"convit": "ConViT", "deit": "DeiT", "psa": "PSA"}


def plot_curves(results: list[dict], plan: list[tuple], fractions, settings: str, args):
    """Top-1 over the schedule, mean of the seeds with their range shaded, one panel per fraction."""
    fig, axes = plt.subplots(1, len(fractions), figsize=(6 * len(fractions), 4.2), layout="constrained", squeeze=False)
    for ax, f in zip(axes[0], fractions):
        for name in MODELS:
            curves = [r["records"] for (_t, n, rf, *_), r in zip(plan, results) if n == name and rf == f]
            epochs = [rec["epoch"] for rec in curves[0] if "val_top1" in rec]
            top1 = [[rec["val_top1"] for rec in curve if "val_top1" in rec] for curve in curves]
            share = [e / epochs[-1] for e in epochs]  # the fraction of the schedule: the steps, at every f
            means = [mean(column) for column in zip(*top1)]
            label = {"ConViT": "ConViT (GPSA)", "PSA": "PSA (no gate)"}.get(name, name)
            ax.plot(share, means, "o-", ms=3, color=COLOURS[name], label=f"{label}, {len(top1)} seeds")
            ax.fill_between(share, [min(c) for c in zip(*top1)], [max(c) for c in zip(*top1)], color=COLOURS[name],
                            alpha=0.2)
        ax.set(xlabel="share of the training schedule", ylabel="validation top-1 (%)", ylim=(0, 100),
               title=f"f = {f:.0%} of the training set ({args.dataset})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, args.out_dir, "12_curves.png", settings, args.device)


def plot_table6(tables: list[dict], firsts: list[int], settings: str, args):
    """Tab. 6 as bars: ours (mean of the seeds, range as error bars) beside the paper's."""
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    rows = [("no mask", [t["none"] for t in tables], "tab:grey")]
    rows += [(f"{mask} masked, K={k}", [t[mask][k] for t in tables], colour)
             for mask, colour in (("content", "tab:orange"), ("position", "tab:green")) for k in firsts]
    for i, (label, values, colour) in enumerate(rows):
        m = mean(values)
        bar = ours.bar(i, m, color=colour, yerr=[[m - min(values)], [max(values) - m]], capsize=3)
        ours.bar_label(bar, fmt="%.1f", fontsize=8, padding=2)
    ours.set_xticks(range(len(rows)), [label for label, *_ in rows], rotation=20, fontsize=8)
    ours.set(ylabel="top-1 (%)", ylim=(0, 105), title=f"ours: {len(tables)} ConViT seeds, K of {len(firsts)} GPSA layers")
    paper_rows = [("no mask", probes.PAPER_TABLE6["none"], "tab:grey")]
    paper_rows += [(f"{mask} masked, K={k}", v, colour) for mask, colour in (("content", "tab:orange"),
                                                                          ("position", "tab:green"))
                   for k, v in probes.PAPER_TABLE6[mask].items()]
    bars = paper.bar(range(len(paper_rows)), [v for _, v, _ in paper_rows], color=[c for *_, c in paper_rows])
    paper.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    paper.set_xticks(range(len(paper_rows)), [label for label, *_ in paper_rows], rotation=20, fontsize=8)
    paper.set(ylabel="top-1 (%)", ylim=(0, 105), title="paper, Tab. 6: ConViT-Ti on ImageNet, K of 10 GPSA layers")
    save_figure(fig, args.out_dir, "12_table6.png", settings, args.device)


def measure_table6(results: list[dict], plan: list[tuple], args) -> tuple[list[dict], list[dict]]:
    """probes.table6 on every ConViT at f = 100%, K = 1 .. its GPSA layers: the tables, and what
    the JSON keeps of each (its probes.py command and the learned gates)."""
    tables, records = [], []
    for (_t, name, f, seed, *_), result in zip(plan, results):
        if name != "ConViT" or f != 1.0:
            continue
        folder = result["settings"]["output_dir"]
        path = checkpoints.find_checkpoint(str(REPO_ROOT / folder), "run")
        model, settings, _ = probes.model_and_data(path, None, None, None)
        firsts = list(range(1, len(model.gpsa_layers()) + 1))
        table = probes.table6(model, data.validation_set(settings), firsts)
        tables.append(table)
        records.append({"seed": seed, **table, "gates": [[round(g, 3) for g in row] for row in model.gates().tolist()],
                        "command": f"python probes.py {shlex.quote(folder)}"})
    return tables, records


def draw_maps(results: list[dict], plan: list[tuple], args) -> dict:
    """plots.py --attention on seed 0 of each model at f = 100%: every block, one validation image;
    and DeiT's and the ConViT's mean over 100 images (Fig. 15). Returns each figure's command and gates."""
    drawn = {}
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)  # plots.py refuses an --out folder that is not there
    for short, name in MAPS.items():
        result = next(r for (_t, n, f, *_), r in zip(plan, results) if n == name and f == 1.0)
        folder = result["settings"]["output_dir"]
        layers = [str(layer) for layer in range(1, args.depth + 1)]
        jobs = [(f"12_maps_{short}.png", ["--index", "0"])]
        if short in ("convit", "deit"):
            jobs.append((f"12_maps_{short}_mean.png", ["--average", "100"]))
        for figure, images in jobs:
            argv = [folder, "--layers", *layers, *images, "--out", str(Path(args.out_dir).resolve() / figure)]
            with at_repository_root():  # the run's recorded folder is relative to it
                maps = plots.main(["--attention", *argv])
            shown = [folder, "--layers", *layers, *images, "--out", repo_path(Path(args.out_dir) / figure)]
            drawn[figure] = {"command": "python plots.py --attention " + shlex.join(shown), "gates": maps.gates}
    return drawn


def nonlocality_by_block(results: list[dict], plan: list[tuple]) -> dict:
    """Eq. 8's nonlocality of every block (mean of its heads and of the seeds) at the first and the
    last evaluation of each model at f = 100%: does PSA stay as local as it started?"""
    table = {}
    for name in MODELS:
        runs = [r["records"] for (_t, n, f, *_), r in zip(plan, results) if n == name and f == 1.0]
        evaluated = [[rec for rec in records if "nonlocality" in rec] for records in runs]
        table[name] = {when: [round(mean(mean(records[i]["nonlocality"][block]) for records in evaluated), 2)
                              for block in range(len(evaluated[0][0]["nonlocality"]))]
                       for when, i in (("first", 0), ("last", -1))}
    return table


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.set_defaults(dataset="digits")  # a minute a run: 3 models x 2 fractions x 3 seeds fit in the budget
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    add_keep_finished(parser)
    args = parse(parser, argv)
    clock = Stopwatch("lesson 12")
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    fractions = (1.0,) if args.quick else FRACTIONS  # --quick: 3 runs, to stay in seconds
    plan = [("heads", name, f, seed, changes) for f in fractions for name, changes in MODELS.items() for seed in seeds]
    print(f"{len(plan)} training runs, {args.workers} at a time: {recipe_line(args)}")
    with run_folder(args) as run_root:
        results = run_all(args, plan, run_root, reuse=args.keep_finished)
        tables, table_records = measure_table6(results, plan, args)
        maps = draw_maps(results, plan, args)

    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe_line(args)}, {what}"
    plot_curves(results, plan, fractions, settings, args)
    firsts = list(tables[0]["content"])
    plot_table6(tables, firsts, settings, args)

    print("\nTop-1 at the end (mean of the seeds and their range), and at the first evaluation:")
    print("| f | model | final top-1 | first evaluation |\n|---|---|---|---|")
    for f in fractions:
        for name in MODELS:
            mine = [r for (_t, n, rf, *_), r in zip(plan, results) if n == name and rf == f]
            first = [next(rec["val_top1"] for rec in r["records"] if "val_top1" in rec) for r in mine]
            print(f"| {f:.0%} | {name} | {cell([r['val_top1'] for r in mine])} | {cell(first)} |")
    print(f"\nTab. 6, ours (mean of {len(tables)} ConViT seeds and their range) beside the paper's:")
    print("| mask | K | ours | paper (K of 10) |\n|---|---|---|---|")
    print(f"| none | - | {cell([t['none'] for t in tables])} | {probes.PAPER_TABLE6['none']} |")
    for mask in probes.MASKS:
        paper = ", ".join(f"K={k}: {v}" for k, v in probes.PAPER_TABLE6[mask].items())
        for k in firsts:
            print(f"| {mask} | {k} | {cell([t[mask][k] for t in tables])} | {paper} |")
    nonlocality = nonlocality_by_block(results, plan)
    print("\nNonlocality (Eq. 8, patches; mean of the heads and seeds, f = 100%), first -> last evaluation:")
    print("| model | " + " | ".join(f"block {b + 1}" for b in range(args.depth)) + " |\n|---|" + "---|" * args.depth)
    for name, row in nonlocality.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f} -> {b:.2f}" for a, b in zip(row["first"], row["last"])) + " |")
    print(convergence_line(results))
    write_summary(args, __file__, "12_what_heads_use.json", clock, argv, settings=settings, seeds=seeds,
                  rule=convergence_line(results),
                  runs=[run_record("heads", name, f, seed, result)
                        for (_t, name, f, seed, _c), result in zip(plan, results)],
                  table6=table_records, maps=maps, nonlocality=nonlocality,
                  paper={"table6": {"none": probes.PAPER_TABLE6["none"],
                                    **{m: {str(k): v for k, v in probes.PAPER_TABLE6[m].items()}
                                       for m in probes.MASKS}},
                         "fig7_layer2_gates": PAPER_FIG7_LAYER2_GATES})
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
