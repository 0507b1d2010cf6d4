"""Lesson 11: Section 4 of the paper at small scale. Does the nonlocality of plain SA layers fall
(Fig. 5, left), and that of GPSA layers grow (Fig. 5, right)?
And do the gates close (Fig. 6)?

The paper trains DeiT-S and ConViT-S for 300 ImageNet epochs and plots, per layer, the
nonlocality of Eq. 8 (Fig. 5: DeiT left, ConViT right) and the mean gate sigma(lambda) of each
GPSA layer (Fig. 6). Here DeiT's own network and a ConViT of the same width, heads and depth are
trained side by side on MNIST-10k (a 7x7 grid of 4x4 patches) with train.py, and the same
quantities are read from each run's metrics.jsonl, one point per epoch. A third model tests why
lessons 5 and 10 saw every gate rise: a ConViT with no class token, whose head reads the mean of
the patch tokens (--global-pool avg), and whose every block is GPSA, so that no MHSA block on
top can gather far content for it.

With --controls, three single-seed runs say which of the third model's two changes matters and
whether the paper's MixUp/CutMix changes the picture: the mean-pooled ConViT with the usual 2
MHSA blocks on top, and DeiT and ConViT with MixUp 0.8 / CutMix 1.0.

Outputs (in --out-dir):
  11_locality_over_training.png   Fig. 5 (nonlocality per layer, each model) and Fig. 6 (the gates
                                  of every head), top-1; with --controls a third row
  11_deit_attention_maps.png      Fig. 15: DeiT's attention maps averaged over 100 images, in the
                                  first and last block, before and after training (seed 0)
  11_locality_over_training.json  every run's train.py command, top-1, and per epoch its
                                  nonlocality per block and head and its gates per GPSA block and head

Run from the repository root:  python lessons/11_locality_over_training.py [--quick] [--controls]
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import checkpoints  # noqa: E402
import cli  # noqa: E402
import config  # noqa: E402
import convit  # noqa: E402
import data  # noqa: E402
import plots  # noqa: E402
import train  # noqa: E402
from lessons._command import LessonRecipe, parse, run_folder, run_settings, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._protocol import add_keep_finished, resume_if_cut_short, reuse_finished_run  # noqa: E402
from lessons._report import Stopwatch, cell, mean, write_summary  # noqa: E402
from lessons._training import at_repository_root, run_parallel, train_one  # noqa: E402

# 20 epochs at a peak lr of 4e-3, 6 blocks (the ConViT: 4 GPSA + 2 MHSA). Whether each run had
# stopped improving (the lessons' rule, lessons/_training.py) is in the JSON, run by run.
RECIPE = LessonRecipe(epochs=20, embed_dim=48, num_heads=4, depth=6, batch_size=64, lr=4e-3, warmup_epochs=3,
                      warmup_lr=4e-5)
# --quick: a tiny model on 20% of the 8x8 digits (a 4x4 grid): seconds, where MNIST-10k's 2,000 validation
# images would take most of the time.
QUICK = LessonRecipe(epochs=2, embed_dim=16, num_heads=4, depth=3, batch_size=64, lr=1e-3, warmup_epochs=0,
                     warmup_lr=1e-4)
QUICK_SETTINGS = {"dataset": "digits", "img_size": 8, "patch_size": 2, "data_fraction": 0.2}
MIXING = {"mixup": 0.8, "cutmix": 1.0}  # the paper's MixUp / CutMix (DeiT's recipe)


def models(depth: int) -> dict[str, dict]:
    """The compared networks: the settings each adds to the recipe's ConViT."""
    return {
        "DeiT": {"model": "deit_tiny"},  # DeiT's own network at the recipe's C, H and depth (Fig. 5, left)
        "ConViT": {},  # depth - 2 GPSA blocks, the class token, 2 MHSA blocks (Fig. 5 right, Fig. 6)
        "ConViT, mean head, all GPSA": {"global_pool": "avg", "local_up_to_layer": depth},
    }


def controls(depth: int) -> dict[str, dict]:
    """--controls: one seed each."""
    return {
        "ConViT, mean head, 2 MHSA on top": {"global_pool": "avg", "local_up_to_layer": depth - 2},
        "DeiT + MixUp/CutMix": {"model": "deit_tiny", **MIXING},
        "ConViT + MixUp/CutMix": MIXING,
    }


def uniform_nonlocality(rows: int, cols: int) -> float:
    """Eq. 8 of uniform attention over the patches: the mean distance between two patches of the grid
    (3.61 on 7x7). An MHSA block that also attends to the class token reads N / (N + 1) of it."""
    return convit.relative_positions(rows, cols)[..., 2].sqrt().mean().item()


def class_token_share(run_dir: Path, images: torch.Tensor) -> list[float | None]:
    """Per block of a trained run, the share of the patch queries' attention that goes to the class
    token (mean of heads, queries and images), None where the block has none (GPSA, a mean head).
    Eq. 8 leaves this share out (it has no distance), so a block whose attention moved to the class
    token would read as more local without being so: this says how much of a fall that can explain."""
    model = checkpoints.model_from_checkpoint(run_dir / checkpoints.CHECKPOINT).eval()
    n = model.patch_distances.shape[0]
    return [attn[:, :, -n:, 0].mean().item() if attn.shape[-1] == n + 1 else None
            for attn in model.attention_maps(images)]


def initial_model(cfg: config.RunConfig, num_classes: int) -> convit.ConViT:
    """A run's weights before its first step: train.setup seeds torch with the run's seed and
    builds the model, and loading MNIST-10k draws nothing from torch's generator in between (checked
    against the first weights of a pilot run, saved before its first step)."""
    torch.manual_seed(cfg.recipe.seed)
    return train.build_model(cfg, num_classes).eval()


def centre_attention(model: convit.ConViT, images: torch.Tensor, block: int) -> torch.Tensor:
    """Fig. 15: the attention of the centre patch's query over the patches in `block`, averaged
    over `images`: (H, N). Its share on the class token is left out, as in Eq. 8."""
    rows, cols = model.cfg.grid
    n = rows * cols
    attn = model.attention_maps(images)[block]  # (B, H, [1 +] N, [1 +] N)
    return attn[:, :, -n:, -n:][:, :, (rows // 2) * cols + cols // 2].mean(0)  # (H, N)


def draw_fig15(args, job: dict, images: torch.Tensor) -> dict[str, list[float]]:
    """DeiT's attention maps (the paper's Fig. 15) before and after training, first and last block;
    returns each panel's mean distance from the centre patch, per head."""
    from lessons._draw import draw_map

    with at_repository_root():
        cfg, _ = config.resolve(job)
        after = checkpoints.model_from_checkpoint(Path(cfg.runtime.output_dir) / checkpoints.CHECKPOINT).eval()
    before = initial_model(cfg, after.cfg.num_classes)
    rows, cols = after.cfg.grid
    centre, last = (rows // 2) * cols + cols // 2, after.cfg.depth - 1
    panels = [(f"{when}, block {block + 1}", centre_attention(model, images, block))
              for when, model in (("init", before), ("trained", after)) for block in (0, last)]
    distances = after.patch_distances[centre].float()  # (N,)
    top = max(maps.max().item() for _, maps in panels)  # one colour scale: uniform attention looks flat
    fig, axes = plt.subplots(len(panels), after.cfg.num_heads, figsize=(2.2 * after.cfg.num_heads, 9),
                             layout="constrained", squeeze=False)
    mean_distances = {}
    for row, (title, maps) in zip(axes, panels):
        mean_distances[title] = ((maps * distances).sum(-1) / maps.sum(-1)).tolist()  # (H,)
        for head, ax in enumerate(row):
            draw_map(ax, maps[head], rows, cols, f"{title}, head {head + 1}\nmean distance "
                     f"{mean_distances[title][head]:.2f}", query=centre, vmin=0, vmax=top)
    fig.suptitle(f"Fig. 15: DeiT (seed {cfg.recipe.seed}), the centre patch's attention averaged over {len(images)} "
                 f"validation images; uniform: mean distance {distances.mean():.2f}", fontsize=9)
    save_figure(fig, args.out_dir, "11_deit_attention_maps.png", f"DeiT, seed {cfg.recipe.seed}: the first run of "
                f"11_locality_over_training.json, its train.py command there", args.device)
    return mean_distances


def run_record(name: str, seed: int, result: dict) -> dict:
    """What the JSON keeps of a run: its command, top-1, and per epoch Eq. 8 and the gates (per head)."""
    records = result["records"]
    return {"model": name, "seed": seed, "command": result["command"], "top1": result["val_top1"],
            "converged": result["converged"], "last_quarter_gain": result["last_quarter_gain"],
            "read_back": result.get("reused", False), "epochs": [r["epoch"] for r in records],
            "top1_curve": [r["val_top1"] for r in records],
            "nonlocality": [r["nonlocality"] for r in records],  # (epochs, blocks, H)
            "gates": [r["gates"] for r in records] if "gates" in records[0] else None}  # (epochs, GPSA, H)


def summarise(runs: list[dict]) -> list[dict]:
    """Per block, over the seeds of one model: Eq. 8 after the first epoch (still the init: the
    warmup's lr is 4e-5), its lowest and its last value; the gate (mean of heads) first and last."""
    nonlocality = torch.tensor([run["nonlocality"] for run in runs]).mean(-1)  # (seeds, epochs, blocks)
    gates = torch.tensor([run["gates"] for run in runs]).mean(-1) if runs[0]["gates"] else None  # (seeds, epochs, GPSA)
    rows = []
    for block in range(nonlocality.shape[2]):
        curve = nonlocality[:, :, block]  # (seeds, epochs)
        row = {"block": block + 1, "kind": "GPSA" if gates is not None and block < gates.shape[2] else "MHSA",
               "nonlocality_first": curve[:, 0].tolist(), "nonlocality_lowest": curve.min(1).values.tolist(),
               "epoch_of_lowest": (curve.argmin(1) + 1).tolist(), "nonlocality_last": curve[:, -1].tolist()}
        if row["kind"] == "GPSA":
            row.update(gate_first=gates[:, 0, block].tolist(), gate_last=gates[:, -1, block].tolist())
        rows.append(row)
    return rows


def stacked(runs: list[dict], key: str) -> torch.Tensor:
    return torch.tensor([run[key] for run in runs])  # (seeds, epochs, blocks, H)


def draw_model(ax, runs: list[dict], name: str, what: str, grid: int):
    """Fig. 5 (what = "nonlocality") or Fig. 6 (what = "gates") of one model, every seed."""
    epochs, seeds = runs[0]["epochs"], ", ".join(str(run["seed"]) for run in runs)
    nonlocality = stacked(runs, "nonlocality")
    n_gpsa = len(runs[0]["gates"][0]) if runs[0]["gates"] else 0
    colours = plots.layer_colours(nonlocality.shape[2])
    if what == "gates":
        plots.draw_gates(ax, epochs, stacked(runs, "gates"), colours, over=f"heads and seeds {seeds}")
    else:
        uniform = uniform_nonlocality(grid, grid)
        plots.draw_nonlocality(ax, epochs, nonlocality, n_gpsa, colours, uniform, over=f"heads and seeds {seeds}")
        if n_gpsa < nonlocality.shape[2]:  # MHSA blocks also attend to the class token, which has no distance
            with_token = uniform * grid**2 / (grid**2 + 1)
            ax.axhline(with_token, color="0.7", ls=":", lw=0.8, label=f"uniform over 1 + N tokens, {with_token:.2f}")
            ax.legend(fontsize=7, ncol=2)
        ax.set_ylim(0, 1.1 * uniform)  # one scale for every model, as the paper's two panels
    ax.set_title(f"{name}\n{ax.get_title()}", fontsize=9)


def plot(results: dict[str, list[dict]], args, settings: str, grid: int):
    extra = [name for name in controls(args.depth) if name in results]
    fig, axes = plt.subplots(3 if extra else 2, 3, figsize=(20, 14 if extra else 9.5), layout="constrained")
    deit, conv, mean_head = models(args.depth)
    draw_model(axes[0][0], results[deit], deit, "nonlocality", grid)
    draw_model(axes[0][1], results[conv], conv, "nonlocality", grid)
    draw_model(axes[0][2], results[mean_head], mean_head, "nonlocality", grid)
    draw_model(axes[1][0], results[conv], conv, "gates", grid)
    draw_model(axes[1][1], results[mean_head], mean_head, "gates", grid)
    curves = {f"{run['model']}, seed {run['seed']}": run["top1_curve"] for runs in results.values() for run in runs}
    plots.draw_curves(axes[1][2], results[deit][0]["epochs"], curves, "validation top-1 (%)", "top-1 of every run",
                      ylim=(0, 100))
    for ax, name in zip(axes[2] if extra else [], extra):
        draw_model(ax, results[name], name, "nonlocality" if results[name][0]["gates"] is None else "gates", grid)
    save_figure(fig, args.out_dir, "11_locality_over_training.png", settings, args.device)


def change(first: list[float], last: list[float], digits: int) -> str:
    """'1.64 -> 1.48 (1.47-1.50)': the mean after epoch 1, then the mean (range) of the seeds at the end."""
    return f"{mean(first):.{digits}f} -> {cell(last, digits)}"


def fig5_table(summaries: dict[str, list[dict]]) -> list[str]:
    """One row per block: each model's nonlocality (mean of heads) after epoch 1 -> after the last."""
    names, depth = list(summaries), len(next(iter(summaries.values())))
    lines = ["| block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for block in range(depth):
        cells = [change(rows[block]["nonlocality_first"], rows[block]["nonlocality_last"], 2)
                 + ("" if rows[block]["kind"] == "GPSA" else " (SA)") for rows in summaries.values()]
        lines.append(f"| block {block + 1} | " + " | ".join(cells) + " |")
    return lines


def fig6_table(summaries: dict[str, list[dict]]) -> list[str]:
    """One row per GPSA block: each ConViT's mean gate sigma(lambda) after epoch 1 -> after the last."""
    names = [name for name, rows in summaries.items() if rows[0]["kind"] == "GPSA"]
    lines = ["| GPSA block | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    depth = max(sum(row["kind"] == "GPSA" for row in summaries[name]) for name in names)
    for block in range(depth):
        cells = [change(summaries[name][block]["gate_first"], summaries[name][block]["gate_last"], 3)
                 if summaries[name][block]["kind"] == "GPSA" else "-" for name in names]
        lines.append(f"| GPSA {block + 1} | " + " | ".join(cells) + " |")
    return lines


def heads_table(runs: list[dict]) -> list[str]:
    """The last gate of every head of every GPSA block, one row per block, each seed's heads in turn."""
    lines = ["| GPSA block | " + " | ".join(f"seed {run['seed']}" for run in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for block in range(len(runs[0]["gates"][-1])):
        cells = [" ".join(f"{g:.2f}" for g in run["gates"][-1][block]) for run in runs]
        lines.append(f"| heads of GPSA {block + 1} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick: 0)")
    parser.add_argument("--pair-seeds", type=int, nargs="+", default=[],
                        help="more seeds of DeiT and ConViT only, the paper's pair (the budget allowed us seed 2)")
    parser.add_argument("--controls", action="store_true",
                        help="also the single-seed controls: the mean head with 2 MHSA blocks on top, and DeiT and "
                             "ConViT with MixUp/CutMix (3 more runs; --quick always runs them)")
    add_keep_finished(parser)
    args = parse(parser, argv)
    clock = Stopwatch("lesson 11")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    pair = list(models(args.depth))[:2]
    plan = [(name, changes, seed) for name, changes in models(args.depth).items()
            for seed in seeds + [s for s in args.pair_seeds if name in pair and s not in seeds]]
    if args.controls or args.quick:
        plan += [(name, changes, seeds[0]) for name, changes in controls(args.depth).items()]
    print(f"{len(plan)} run(s), {args.workers} at a time: {args.epochs} epochs of {args.dataset}, C = {args.embed_dim}, "
          f"H = {args.num_heads}, {args.depth} blocks")
    with run_folder(args) as run_root:
        extra = QUICK_SETTINGS if args.quick else {}
        jobs = [run_settings(args, Path(run_root) / f"{re.sub('[^A-Za-z0-9]+', '_', name)}-seed{seed}", seed=seed,
                             **changes, **extra) for name, changes, seed in plan]
        found = {i: reuse_finished_run(job) for i, job in enumerate(jobs)} if args.keep_finished else {}
        found = {i: result for i, result in found.items() if result is not None}
        todo = [resume_if_cut_short(job) if args.keep_finished else job for i, job in enumerate(jobs) if i not in found]
        trained = iter(run_parallel(train_one, todo, args.workers, args.threads,
                                    done=lambda job, run: print(f"  top-1 {run['val_top1']:.1f}% ({run['seconds']:.0f} s)",
                                                                flush=True)))
        results = [found[i] if i in found else next(trained) for i in range(len(jobs))]
        with at_repository_root():  # before run_folder removes a --quick run's folder
            cfg, _ = config.resolve(jobs[0])
            _, val_set, _ = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
            val_set = data.transformed_once(val_set)
            images = train.nonlocality_images(val_set)  # the 64 that Eq. 8 is measured on
            shares = [class_token_share(Path(job["output_dir"]), images) for job in jobs]
            hundred = torch.stack([val_set[i][0] for i in range(min(100, len(val_set)))])  # Fig. 15's 100 images
        fig15 = draw_fig15(args, jobs[0], hundred)
    by_model: dict[str, list[dict]] = {}
    for (name, _, seed), job, result, share in zip(plan, jobs, results, shares):
        record = run_record(name, seed, {**result, "command": config.command(job)})
        by_model.setdefault(name, []).append({**record, "class_token_share": share})
    grid = cfg.data.img_size // cfg.model.patch_size  # every run has the same square grid
    uniform = uniform_nonlocality(grid, grid)
    settings = (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks, "
                f"batch {args.batch_size}, AdamW lr {args.lr:g}, {args.warmup_epochs} warmup epoch(s) from "
                f"{args.warmup_lr:g}, cosine, {args.epochs} epochs, no RandAugment; seeds {', '.join(map(str, seeds))}"
                + (f" (DeiT and ConViT also {', '.join(map(str, args.pair_seeds))})" if args.pair_seeds else ""))
    plot(by_model, args, settings, grid)
    summaries = {name: summarise(runs) for name, runs in by_model.items()}
    print_tables(by_model, summaries, grid, fig15, seeds[0], args.depth)
    write_summary(args, __file__, "11_locality_over_training.json", clock, argv, indent=None, settings=settings,
                  seeds=seeds, pair_seeds=args.pair_seeds, uniform_nonlocality=uniform, per_block=summaries,
                  fig15_mean_distance_from_centre=fig15,
                  runs=[run for runs in by_model.values() for run in runs])
    clock.done()


def print_tables(by_model: dict, summaries: dict, grid: int, fig15: dict, first_seed: int, depth: int):
    """What the figures show, as numbers: Figs. 5 and 6 per block, the class token's share, Fig. 15's
    distances, the last gate of every head, and each model's top-1."""
    print("\nFig. 5: nonlocality per block (mean of heads), after epoch 1 -> after the last, mean (range) of seeds; "
          "(SA): a plain self-attention block")
    print("\n".join(fig5_table(summaries)))
    print("\nFig. 6: gate sigma(lambda) per GPSA block (mean of heads), after epoch 1 -> after the last")
    print("\n".join(fig6_table(summaries)))
    all_gpsa = list(models(depth))[2]
    print("\nshare of the patch queries' attention on the class token at the end, per SA block, mean (range) of seeds")
    for name, runs in by_model.items():
        blocks = [[run["class_token_share"][b] for run in runs] for b in range(len(runs[0]["class_token_share"]))]
        if any(v is not None for v in blocks[-1]):
            print(f"  {name}: " + "; ".join(f"block {b + 1} {cell(v, 3)}" for b, v in enumerate(blocks)
                                           if v[0] is not None))
    centre = (grid // 2) * (grid + 1)  # the middle patch of the grid
    from_centre = convit.relative_positions(grid, grid)[centre, :, 2].sqrt().mean().item()
    print(f"\nFig. 15, DeiT seed {first_seed}: mean distance of the centre patch's attention from it, per head "
          f"(uniform: {from_centre:.2f})")
    for title, values in fig15.items():
        print(f"  {title}: " + " ".join(f"{v:.2f}" for v in values))
    print(f"\n{all_gpsa}: the last gate of each head")
    print("\n".join(heads_table(by_model[all_gpsa])))
    print("\ntop-1: " + "; ".join(f"{name} {cell([run['top1'] for run in runs])}" for name, runs in by_model.items()))


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
