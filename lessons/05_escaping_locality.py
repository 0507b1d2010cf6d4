"""Lesson 5: escaping locality. How sigma(lambda) and the nonlocality move during training.

ConViT starts every GPSA layer as a soft convolution (sigma(lambda) = 0.73, heads on a kernel)
and lets gradient descent decide, head by head, how much content attention to mix in.
The paper (Fig. 5/6, ConViT-S, 300 ImageNet epochs) finds that the nonlocality grows in every
GPSA layer, most in the first and the last, least in the second; and that the gates of the
later GPSA layers fall to about 0 (content attention) while the early layers keep a sizeable
positional share. Here we train a small ConViT on MNIST-10k (8,000 real 28x28 digits in 4x4
patches: a 7x7 grid) with train.py, two seeds side by side, and plot the same quantities from
its metrics.jsonl, one point per epoch.

If the gates barely move, the lesson measures why rather than guessing. The run is cut into
segments (train.py --stop-after, then --resume: exactly the uninterrupted run), and after each
segment it reads lambda's gradient and Adam's state from the checkpoint:
  - lambda's gradient on 16 training batches: |its mean| / its root mean square, 1 when every
    batch pushes the same way, 0.20 for pure noise (mean 0);
  - Adam's step for lambda relative to the lr, |m_hat| / sqrt(v_hat): 1 when the gradient keeps
    its sign, 0.18 for pure noise (lambda then only random-walks);
  - the learning rate, and the weight decay on lambda (none: train.py never decays gates);
  - how far lambda could have moved at most (Adam moves a parameter by at most about lr per step,
    so by the sum of the lr over the steps) against how far it did move.

Outputs (in --out-dir):
  05_escaping_locality.png   gates and nonlocality per GPSA layer and epoch, top-1, nonlocality by
                             block at init and at the end, Adam's step for lambda, lambda
  05_escaping_locality.json  every epoch's gates, nonlocality and top-1, and the lambda measurements

Run from the repository root:  python lessons/05_escaping_locality.py [--quick]
    on a GPU, longer:            ... --device cuda --epochs 300 --workers 1
    the figure again from the JSON, training nothing:  ... --redraw
"""

import math
import sys
import time
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
from lessons._command import (LessonRecipe, parse, recorded_flags, redraw_flag, run_folder, run_settings,  # noqa: E402
                              training_parser)
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch, hardware, mean, read_summary, write_summary  # noqa: E402
from lessons._training import run_parallel  # noqa: E402
from runs import read_metrics  # noqa: E402

# One long run per seed on the full 8,000-image training split; 2 seeds, one per core.
RECIPE = LessonRecipe(epochs=50, embed_dim=48, num_heads=4, depth=8, batch_size=64, lr=2e-3, warmup_epochs=2,
                      warmup_lr=2e-4)
# --quick: a tiny model on 5% of the training split, for seconds.
QUICK = LessonRecipe(epochs=2, embed_dim=16, num_heads=4, depth=4, batch_size=64, lr=1e-3, warmup_epochs=0,
                     warmup_lr=1e-4)
QUICK_SETTINGS = {"data_fraction": 0.05}
MEASUREMENTS = 10  # segments of the run, each followed by a measurement of lambda's gradient
GRADIENT_BATCHES = 16  # training batches per gradient measurement
SUMMARY = "05_escaping_locality.json"


def at_init(settings: dict) -> dict:
    """An "epoch 0" line of metrics.jsonl: the gates and nonlocality of the model train.py starts
    from (train.py seeds torch with the run's seed, then builds the model), on train.py's validation images."""
    cfg, _ = config.resolve(settings)
    torch.manual_seed(cfg.recipe.seed)
    _, val_set, num_classes = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    model = train.build_model(cfg, num_classes)
    return {"epoch": 0, **train.gates_and_nonlocality(model, train.nonlocality_images(val_set))}


def lambda_measurements(checkpoint_path: Path) -> dict:
    """From one of train.py's checkpoints: lambda (n_gpsa, H); its gradient on GRADIENT_BATCHES
    training batches (the mean over the batches and the root mean square); Adam's step for
    lambda relative to the lr, |m_hat| / (sqrt(v_hat) + eps), from the optimiser state; and the
    weight decay train.py applies to lambda. Everything as train.py builds it, from the
    configuration the checkpoint stores: the data, the model, the optimiser, the augmentation, the loss."""
    checkpoint = checkpoints.read_checkpoint_file(checkpoint_path)  # never runs code (weights_only=True)
    cfg = config.stored(checkpoint["args"])
    train_set, _, num_classes = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    model = train.build_model(cfg, num_classes)
    model.load_state_dict(checkpoint["model"])
    optimizer = train.build_optimizer(model, cfg.recipe)
    optimizer.load_state_dict(checkpoint["optimizer"])
    gates = [layer.gating_param for layer in model.gpsa_layers()]

    # Adam's state for each lambda, and the weight decay of its parameter group.
    gate_decay = sorted({group["weight_decay"] for group in optimizer.param_groups for p in group["params"]
                         if any(p is gate for gate in gates)})
    (beta1, beta2), eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
    adam_step = []
    for gate in gates:
        state = optimizer.state[gate]
        step = float(state["step"])
        m_hat, v_hat = state["exp_avg"] / (1 - beta1**step), state["exp_avg_sq"] / (1 - beta2**step)
        adam_step.append((m_hat.abs() / (v_hat.sqrt() + eps)).tolist())

    # lambda's gradient of the training loss, batch by batch, augmented as in training.
    augmentation, _ = train.batch_augmentation(cfg, num_classes)
    batch_size = cfg.recipe.batch_size
    torch.manual_seed(0)
    picked = torch.randperm(len(train_set))[: GRADIENT_BATCHES * batch_size].tolist()
    model.train()
    per_batch = []
    for start in range(0, len(picked), batch_size):
        images, labels = zip(*(train_set[i] for i in picked[start:start + batch_size]))
        loss = train.training_loss(model(augmentation(torch.stack(images))), torch.tensor(labels), cfg.recipe)
        model.zero_grad()
        loss.backward()
        per_batch.append(torch.stack([gate.grad for gate in gates]))  # (n_gpsa, H)
    per_batch = torch.stack(per_batch)  # (batches, n_gpsa, H)
    # What pure noise would show, a gradient of mean 0 whose sign flips at random from batch to
    # batch: the mean of n batches is about rms / sqrt(n), so E|mean| / rms = sqrt(2 / (pi n));
    # Adam's m averages about 2 / (1 - beta1) steps, so E|m_hat| / sqrt(v_hat) =
    # sqrt(2 / pi) sqrt((1 - beta1) / (1 + beta1)). A push that never changes sign gives 1 for both.
    noise_grad = math.sqrt(2 / (math.pi * len(per_batch)))
    noise_adam = math.sqrt(2 / math.pi) * math.sqrt((1 - beta1) / (1 + beta1))
    return {"epoch": checkpoint["epoch"], "lambda": torch.stack([gate.detach() for gate in gates]).tolist(),
            "grad_mean": per_batch.mean(0).tolist(), "grad_rms": per_batch.pow(2).mean(0).sqrt().tolist(),
            "adam_step_over_lr": adam_step, "gate_weight_decay": gate_decay,
            "noise_grad_mean_over_rms": noise_grad, "noise_adam_step_over_lr": noise_adam,
            "gradient_batches": len(per_batch),
            "steps_per_epoch": len(train_set) // batch_size}  # train.py drops the last partial batch


def train_and_measure(job: tuple) -> dict:
    """One seed: train.py in segments (stop_after, then resume: the same run as without the
    stops), measuring lambda after each. Returns the metrics (with an epoch-0 line) and the
    measurements."""
    settings, stops = job
    run_dir = Path(settings["output_dir"])
    start, measurements, result = time.perf_counter(), [], None
    for stop in stops:
        resume = {"resume": str(run_dir / "checkpoint.pth")} if result else {}
        result = train.run(*train.configure({**settings, **resume, "stop_after": stop}))
        measurements.append(lambda_measurements(run_dir / "checkpoint.pth"))
        gates = train.gates_per_layer(result["model"].gates().tolist())
        print(f"  seed {settings['seed']}, epoch {stop}: top-1 {result['val_top1']:.1f}%, "
              f"{gates} ({time.perf_counter() - start:.0f} s)", flush=True)
    records = [at_init(settings), *read_metrics(run_dir)]
    # Adam moves a parameter by at most about lr per step: the sum of the lr bounds lambda's journey.
    lr_sum = sum(r["lr"] for r in records[1:]) * measurements[0]["steps_per_epoch"]
    return {"val_top1": result["val_top1"], "seconds": time.perf_counter() - start, "records": records,
            "measurements": measurements, "lr_sum": lr_sum}


def lesson_record(run: dict) -> dict:
    """What the JSON keeps of one seed's run: every epoch's gates, nonlocality and top-1, and the lambda measurements."""
    return {key: run[key] for key in ("val_top1", "seconds", "lr_sum", "records", "measurements")}


def summarise(seed_runs: list[dict]) -> list[dict]:
    """Per GPSA or MHSA block, averaged over heads and seeds: what the text quotes."""
    gates = torch.tensor([[run["records"][0]["gates"], run["records"][-1]["gates"]] for run in seed_runs])  # (seeds, 2, L, H)
    nonlocality = torch.tensor([[run["records"][0]["nonlocality"], run["records"][-1]["nonlocality"]] for run in seed_runs])
    lam = torch.tensor([[m["lambda"] for m in run["measurements"]] for run in seed_runs])  # (seeds, points, n_gpsa, H)
    adam = torch.tensor([[m["adam_step_over_lr"] for m in run["measurements"]] for run in seed_runs])
    grad_mean = torch.tensor([[m["grad_mean"] for m in run["measurements"]] for run in seed_runs])
    grad_rms = torch.tensor([[m["grad_rms"] for m in run["measurements"]] for run in seed_runs])
    rows = []
    for layer in range(nonlocality.shape[2]):
        row = {"block": layer + 1, "kind": "GPSA" if layer < gates.shape[2] else "MHSA",
               "nonlocality_init": nonlocality[:, 0, layer].mean().item(),
               "nonlocality_end": nonlocality[:, 1, layer].mean().item(),
               "nonlocality_end_per_seed": nonlocality[:, 1, layer].mean(1).tolist()}
        if layer < gates.shape[2]:
            row.update({"gate_init": gates[:, 0, layer].mean().item(), "gate_end": gates[:, 1, layer].mean().item(),
                        "gate_end_per_head": gates[:, 1, layer].mean(0).tolist(),
                        "lambda_moved": (lam[:, -1, layer] - 1.0).abs().mean().item(),
                        "adam_step_over_lr": adam[:, :, layer].mean().item(),
                        "grad_mean_over_rms": (grad_mean[:, :, layer].abs() / grad_rms[:, :, layer]).mean().item()})
        rows.append(row)
    return rows


def uniform_nonlocality(args) -> float:
    """Eq. 8 of uniform attention on the patch grid of the lesson's runs, as train.py builds it from args."""
    cfg, _ = config.resolve(run_settings(args, args.out_dir))
    side = cfg.data.img_size // cfg.model.patch_size  # train.py's images are square
    return convit.relative_positions(side, side)[..., 2].sqrt().mean().item()


def plot(seed_runs: list[dict], seeds: list[int], args, settings: str, machine: str):
    """The figure, from the runs as the JSON keeps them (lesson_record); `machine` trained them."""
    epoch = [r["epoch"] for r in seed_runs[0]["records"]]
    gates = torch.tensor([[r["gates"] for r in run["records"]] for run in seed_runs])  # (seeds, epochs, n_gpsa, H)
    nonlocality = torch.tensor([[r["nonlocality"] for r in run["records"]] for run in seed_runs])  # (seeds, epochs, blocks, H)
    n_gpsa, depth = gates.shape[2], nonlocality.shape[2]
    colours = plots.layer_colours(depth)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9), layout="constrained")
    (ax_gate, ax_nonlocal, ax_acc), (ax_profile, ax_adam, ax_lambda) = axes

    # The panels of every run's own figure (plots.py), here over several seeds.
    plots.draw_gates(ax_gate, epoch, gates, colours, over="heads and seeds")
    plots.draw_nonlocality(ax_nonlocal, epoch, nonlocality, n_gpsa, colours, uniform_nonlocality(args),
                           over="heads and seeds")
    plots.draw_curves(ax_acc, epoch, {f"seed {seed}": [r.get("val_top1") for r in run["records"]]
                                      for run, seed in zip(seed_runs, seeds)},
                      "validation top-1 (%)", "top-1: " + ", ".join(f"{run['val_top1']:.1f}%" for run in seed_runs),
                      ylim=(0, 100))

    layers = list(range(1, depth + 1))
    for index, colour, label in ((0, "0.6", "at initialisation"), (-1, "k", f"after epoch {epoch[-1]}")):
        per_seed = nonlocality[:, index].mean(2)  # (seeds, depth)
        ax_profile.errorbar(layers, per_seed.mean(0), yerr=[per_seed.mean(0) - per_seed.min(0).values,
                                                              per_seed.max(0).values - per_seed.mean(0)],
                            fmt="o-", color=colour, capsize=3, label=label)
    ax_profile.axvspan(n_gpsa + 0.5, depth + 0.5, color="0.92", label="MHSA blocks")
    ax_profile.set(xlabel="block", ylabel="nonlocality (patches)", xticks=layers,
                   title="nonlocality by block (mean of heads; bars: min-max over seeds)")
    ax_profile.legend(fontsize=8)

    measured = [m["epoch"] for m in seed_runs[0]["measurements"]]
    ratio = torch.tensor([[m["adam_step_over_lr"] for m in run["measurements"]] for run in seed_runs])  # (seeds, points, L, H)
    lam = torch.cat([torch.logit(gates[:, :1]),  # lambda at initialisation, (seeds, 1, n_gpsa, H) ...
                     torch.tensor([[m["lambda"] for m in run["measurements"]] for run in seed_runs])], dim=1)  # ... then measured
    for layer in range(n_gpsa):
        ax_adam.plot(measured, ratio[:, :, layer].mean((0, 2)), "o-", color=colours[layer], label=f"GPSA {layer + 1}")
        ax_lambda.plot([0] + measured, lam[:, :, layer].mean((0, 2)), "o-", color=colours[layer], label=f"GPSA {layer + 1}")
    noise = seed_runs[0]["measurements"][0]["noise_adam_step_over_lr"]
    ax_adam.axhline(noise, color="0.5", ls=":", label=f"a gradient of pure noise, {noise:.2f}")
    ax_adam.set(xlabel="epoch", ylabel="$|\\hat m| / \\sqrt{\\hat v}$ for $\\lambda$", ylim=(0, 1),
                title="Adam's step for $\\lambda$, as a fraction of the lr (1 = a steady push)")
    ax_adam.legend(fontsize=7, ncol=2)
    reach = mean(run["lr_sum"] for run in seed_runs)
    ax_lambda.set(xlabel="epoch", ylabel="$\\lambda$ (mean of heads and seeds)",
                  title=f"$\\lambda$; the lr allowed a move of up to {reach:.3g} in this run")
    ax_lambda.legend(fontsize=7, ncol=2)
    save_figure(fig, args.out_dir, "05_escaping_locality.png", settings, args.device, machine)


def main(argv=None):
    parser = training_parser(__doc__, __file__, RECIPE, QUICK)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="one run per seed, --workers at a time (default 0 1; --quick: 0)")
    redraw_flag(parser, SUMMARY)
    args = parse(parser, argv)
    if args.redraw:
        summary = read_summary(args.out_dir / SUMMARY)
        plot(summary["runs"], summary["seeds"], recorded_flags(parser, summary, args.out_dir), summary["settings"],
             summary["hardware"])
        return
    clock = Stopwatch("lesson 5")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    count = min(MEASUREMENTS, args.epochs)
    stops = sorted({round(args.epochs * (i + 1) / count) for i in range(count)})
    print(f"{len(seeds)} run(s), {args.workers} at a time: {args.epochs} epochs of {args.dataset}, "
          f"C = {args.embed_dim}, H = {args.num_heads}, {args.depth} blocks, batch {args.batch_size}, lr {args.lr:g}; "
          f"lambda measured after epochs {stops}")
    with run_folder(args) as run_root:
        extra = QUICK_SETTINGS if args.quick else {}
        jobs = [(run_settings(args, Path(run_root) / f"seed{seed}", seed=seed, **extra), stops) for seed in seeds]
        seed_runs = run_parallel(train_and_measure, jobs, args.workers, args.threads,
                                 done=lambda job, run: print(f"  seed {job[0]['seed']}: top-1 {run['val_top1']:.1f}% "
                                                             f"({run['seconds']:.0f} s)", flush=True))
    settings = (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks "
                f"({max(args.depth - 2, 1)} GPSA), batch {args.batch_size}, AdamW lr {args.lr:g}, "
                f"{args.warmup_epochs} warmup epoch(s) from {args.warmup_lr:g}, cosine, {args.epochs} epochs, "
                f"no RandAugment, seeds {', '.join(map(str, seeds))}")
    plot(seed_runs, seeds, args, settings, hardware(args.device))

    rows = summarise(seed_runs)
    print(f"\nPer block, mean of heads and of {len(seeds)} seed(s); init -> after epoch {args.epochs}:")
    print("| block | sigma(lambda) | nonlocality (patches) | lambda moved | Adam step / lr | |mean grad| / rms grad |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        gate = (f"{row['gate_init']:.3f} -> {row['gate_end']:.3f} | " if row["kind"] == "GPSA" else "- | ")
        moves = (f" | {row['lambda_moved']:.2f} | {row['adam_step_over_lr']:.2f} | {row['grad_mean_over_rms']:.2f}"
                 if row["kind"] == "GPSA" else " | - | - | -")
        where = f"{row['nonlocality_init']:.2f} -> {row['nonlocality_end']:.2f}"
        print(f"| {row['block']} ({row['kind']}) | {gate}{where}{moves} |")
    decay = seed_runs[0]["measurements"][0]["gate_weight_decay"]
    top1 = ", ".join(f"{run['val_top1']:.1f}%" for run in seed_runs)
    noise = seed_runs[0]["measurements"][0]
    print(f"A gradient of pure noise (mean 0) would give Adam step / lr = {noise['noise_adam_step_over_lr']:.2f} and "
          f"|mean grad| / rms grad = {noise['noise_grad_mean_over_rms']:.2f} ({noise['gradient_batches']} batches); "
          f"a push that never changes sign, 1 and 1.")
    print(f"lr: peak {args.lr:g}, summed over the steps {mean(run['lr_sum'] for run in seed_runs):.3g} (about the farthest "
          f"Adam could move lambda); weight decay on lambda: {decay}; top-1 {top1}")
    write_summary(args, __file__, SUMMARY, clock, argv, indent=None, settings=settings,
                  seeds=seeds, per_block=rows, runs=[lesson_record(run) for run in seed_runs])
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
