"""Lesson 10: when far content matters. Do the later gates close on a task that needs it?

Lesson 5 found that on MNIST no GPSA gate closes: local features are enough there, and lambda's
gradient turns to noise once the model is good. The paper's later GPSA layers close their gates
(Figs. 5/6) on ImageNet, whose labels depend on content far apart. This lesson tests that reading:
the same ConViT and recipe as lesson 5, trained with the same measurements, on a task whose label
needs two digits far apart: `--dataset mnist10k-sum` (data.py), two half-size MNIST-10k digits in
opposite corners of a 28x28 image, labelled by their sum (0-18).

Three questions, in order:
  1. Is the task learnable by this model? Top-1 against chance (the most frequent sum, 10.1%) and
     against what one digit alone can give (11.25%: see `ONE_DIGIT_CEILING`).
  2. Do the gates and the nonlocality of the GPSA layers move differently from lesson 5's MNIST run?
  3. Who combines the two corners? The class token in the two MHSA blocks can, by itself: we
     measure how its attention splits between the two digits.

Outputs (in --out-dir):
  10_far_content.png   gates, nonlocality, Adam's step for lambda and top-1, beside lesson 5's MNIST-10k run
  10_far_content.json  every epoch's gates, nonlocality and top-1, the lambda measurements, the class token's split

Run from the repository root:  python lessons/10_far_content.py [--quick]
    the figure again from the JSON, training nothing:  ... --redraw
"""

import importlib
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
from lessons._command import FIGURES, parse, redraw_flag, run_folder, run_settings, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch, hardware, read_summary, write_summary  # noqa: E402
from lessons._training import at_repository_root, run_parallel  # noqa: E402

lesson5 = importlib.import_module("lessons.05_escaping_locality")  # its model, recipe and measurements

RECIPE, QUICK = lesson5.RECIPE, lesson5.QUICK
# No random crops: a crop of half the image would cut one of the two digits off, and the label with it.
TASK_SETTINGS = {"crop_scale": 1.0}
# A model that reads one digit perfectly and nothing of the other can do no better than adding
# the other's most frequent class (the pairs are drawn at random, so the two are independent):
# right as often as that class occurs, 11.25% of the 2,000 validation digits (a 1). Knowing
# neither, the most frequent sum (9): 10.1% of the validation pairs.
ONE_DIGIT_CEILING = 11.25
CHANCE = 10.1
MNIST_RUN = FIGURES / lesson5.SUMMARY  # lesson 5's committed MNIST-10k run
SUMMARY = "10_far_content.json"


def corner_attention(run_dir: Path, images: torch.Tensor) -> list[dict]:
    """How the class token's attention in each MHSA block splits between the two digits: its
    share on the top-left 3x3 patches (pixels 0-11, the first digit) and on the bottom-right 3x3
    (pixels 16-27, the second), mean of heads and images. A block that combines the digits looks
    at both; uniform attention would give 9/50 = 0.18 to each."""
    model = checkpoints.model_from_checkpoint(run_dir / "checkpoint.pth").eval()
    rows, cols = model.cfg.grid
    first, second = torch.zeros(rows, cols, dtype=torch.bool), torch.zeros(rows, cols, dtype=torch.bool)
    first[:3, :3], second[-3:, -3:] = True, True
    shares = []
    for block, attn in enumerate(model.attention_maps(images)):
        if attn.shape[-1] == rows * cols:  # a GPSA block: no class token yet
            continue
        from_class = attn[:, :, 0, 1:].mean(dim=(0, 1)).reshape(rows, cols)  # (rows, cols)
        shares.append({"block": block + 1, "first_digit": from_class[first].sum().item(),
                       "second_digit": from_class[second].sum().item()})
    return shares


def lesson5_run() -> dict:
    """Lesson 5's committed MNIST-10k run, which the figure draws beside this lesson's own."""
    if not MNIST_RUN.is_file():
        raise ValueError(f"lesson 10 draws lesson 5's committed run beside its own, and {MNIST_RUN} is missing: "
                         "restore it (git checkout lessons/figures) or run lesson 5 first")
    return read_summary(MNIST_RUN)


def plot(seed_runs: list[dict], mnist: dict, seeds: list[int], args, settings: str, machine: str):
    """The figure, from the runs as the JSON keeps them (lesson5.lesson_record); `machine` trained them."""
    fig, axes = plt.subplots(2, 4, figsize=(22, 9), layout="constrained")
    for row, (name, these) in zip(axes, (("two digits, their sum", seed_runs), ("MNIST-10k (lesson 5)", mnist["runs"]))):
        ax_gate, ax_nonlocal, ax_adam, ax_acc = row
        epoch = [r["epoch"] for r in these[0]["records"]]
        gates = torch.tensor([[r["gates"] for r in run["records"]] for run in these])  # (seeds, epochs, n_gpsa, H)
        nonlocality = torch.tensor([[r["nonlocality"] for r in run["records"]] for run in these])
        n_gpsa, depth = gates.shape[2], nonlocality.shape[2]
        colours = plots.layer_colours(depth)
        plots.draw_gates(ax_gate, epoch, gates, colours, over="heads and seeds")
        ax_gate.set_title(f"{name}: gates (Fig. 6)")
        uniform = convit.relative_positions(7, 7)[..., 2].sqrt().mean().item()
        plots.draw_nonlocality(ax_nonlocal, epoch, nonlocality, n_gpsa, colours, uniform, over="heads and seeds")
        ax_nonlocal.set_title(f"{name}: nonlocality (Fig. 5)")
        measured = [m["epoch"] for m in these[0]["measurements"]]
        ratio = torch.tensor([[m["adam_step_over_lr"] for m in run["measurements"]] for run in these])
        for layer in range(n_gpsa):
            ax_adam.plot(measured, ratio[:, :, layer].mean((0, 2)), "o-", color=colours[layer], label=f"GPSA {layer + 1}")
        noise = these[0]["measurements"][0]["noise_adam_step_over_lr"]
        ax_adam.axhline(noise, color="0.5", ls=":", label=f"pure noise, {noise:.2f}")
        ax_adam.set(xlabel="epoch", ylabel="$|\\hat m| / \\sqrt{\\hat v}$ for $\\lambda$", ylim=(0, 1),
                    title=f"{name}: Adam's step for $\\lambda$ / lr")
        ax_adam.legend(fontsize=7, ncol=2)
        plots.draw_curves(ax_acc, epoch, {f"seed {i}": [r.get("val_top1") for r in run["records"]]
                                          for i, run in enumerate(these)},
                          "validation top-1 (%)", f"{name}: top-1 " + ", ".join(f"{r['val_top1']:.1f}%" for r in these),
                          ylim=(0, 100))
        if these is seed_runs:
            ax_acc.axhline(CHANCE, color="0.5", ls=":", label=f"chance (most frequent sum), {CHANCE}%")
            ax_acc.axhline(ONE_DIGIT_CEILING, color="tab:red", ls=":", label=f"one digit alone, at most {ONE_DIGIT_CEILING}%")
            ax_acc.legend(fontsize=8)
    save_figure(fig, args.out_dir, "10_far_content.png", settings, args.device, machine)


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.set_defaults(dataset="mnist10k-sum")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--quick: 0)")
    redraw_flag(parser, SUMMARY)
    args = parse(parser, argv)
    mnist = lesson5_run()  # read first: a missing file should stop the lesson before it trains
    if args.redraw:
        summary = read_summary(args.out_dir / SUMMARY)
        plot(summary["runs"], mnist, summary["seeds"], args, summary["settings"], summary["hardware"])
        return
    clock = Stopwatch("lesson 10")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    count = min(lesson5.MEASUREMENTS, args.epochs)
    stops = sorted({round(args.epochs * (i + 1) / count) for i in range(count)})
    print(f"{len(seeds)} run(s), {args.workers} at a time: {args.epochs} epochs of {args.dataset}, "
          f"C = {args.embed_dim}, H = {args.num_heads}, {args.depth} blocks; lambda measured after epochs {stops}")
    with run_folder(args) as run_root:
        extra = {**TASK_SETTINGS, **(lesson5.QUICK_SETTINGS if args.quick else {})}
        jobs = [(run_settings(args, Path(run_root) / f"seed{seed}", seed=seed, **extra), stops) for seed in seeds]
        seed_runs = run_parallel(lesson5.train_and_measure, jobs, args.workers, args.threads,
                                 done=lambda job, run: print(f"  top-1 {run['val_top1']:.1f}% ({run['seconds']:.0f} s)",
                                                             flush=True))
        with at_repository_root():
            cfg, _ = config.resolve(jobs[0][0])
            _, val_set, _ = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
            images = train.nonlocality_images(data.transformed_once(val_set))
            corners = [corner_attention(Path(settings["output_dir"]), images) for settings, _ in jobs]
    settings = (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks "
                f"({max(args.depth - 2, 1)} GPSA), batch {args.batch_size}, AdamW lr {args.lr:g}, "
                f"{args.warmup_epochs} warmup epoch(s) from {args.warmup_lr:g}, cosine, {args.epochs} epochs, no crops, "
                f"seeds {', '.join(map(str, seeds))}; below: lesson 5's committed MNIST-10k run")
    plot(seed_runs, mnist, seeds, args, settings, hardware(args.device))

    rows, mnist_rows = lesson5.summarise(seed_runs), mnist["per_block"]
    print(f"\nPer block, mean of heads and of {len(seeds)} seed(s), init -> after epoch {args.epochs}; "
          f"lesson 5's MNIST-10k run beside it:")
    print("| block | sigma(lambda), sum | MNIST | nonlocality, sum | MNIST | Adam step / lr, sum | MNIST | "
          "|mean grad| / rms, sum | MNIST |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, other in zip(rows, mnist_rows):
        gpsa = row["kind"] == "GPSA"
        print(f"| {row['block']} ({row['kind']}) | "
              + (f"{row['gate_init']:.3f} -> {row['gate_end']:.3f} | {other['gate_end']:.3f} | " if gpsa else "- | - | ")
              + f"{row['nonlocality_init']:.2f} -> {row['nonlocality_end']:.2f} | {other['nonlocality_end']:.2f} | "
              + (f"{row['adam_step_over_lr']:.2f} | {other['adam_step_over_lr']:.2f} | {row['grad_mean_over_rms']:.2f} | "
                 f"{other['grad_mean_over_rms']:.2f} |" if gpsa else "- | - | - | - |"))
    print("\nThe class token's attention in the MHSA blocks, share on each digit (uniform: 0.18 each):")
    for seed, shares in zip(seeds, corners):
        print(f"  seed {seed}: " + "; ".join(f"block {s['block']}: first digit {s['first_digit']:.2f}, second "
                                             f"{s['second_digit']:.2f}" for s in shares))
    top1 = ", ".join(f"{run['val_top1']:.1f}%" for run in seed_runs)
    print(f"top-1 {top1} (chance {CHANCE}%, one digit alone at most {ONE_DIGIT_CEILING}%)")
    write_summary(args, __file__, SUMMARY, clock, argv, indent=None, settings=settings, seeds=seeds,
                  per_block=rows, mnist_per_block=mnist_rows, class_token_split=corners, chance=CHANCE,
                  one_digit_ceiling=ONE_DIGIT_CEILING, runs=[lesson5.lesson_record(run) for run in seed_runs])
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
