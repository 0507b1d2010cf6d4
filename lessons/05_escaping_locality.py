"""Lesson 5: escaping locality. How sigma(lambda) and the nonlocality move during training.

ConViT starts every GPSA layer as a soft convolution (sigma(lambda) = 0.73, heads on a kernel)
and lets gradient descent decide, head by head, how much content attention to mix in.
The paper (Fig. 5/6, 300 ImageNet epochs) finds that the nonlocality grows in every GPSA
layer: the first and the last GPSA layers escape locality most, the intermediate ones (the
second above all) stay more local. The gates of the later GPSA layers (6-10) fall to about 0,
pure content attention, while the early layers keep a sizeable positional share. Here we
train a small ConViT with train.py and plot the same two quantities from its metrics.jsonl,
one line per epoch.

Figure (in --out-dir):
  05_escaping_locality.png  sigma(lambda) per GPSA layer, nonlocality per layer, top-1, per epoch

Run from the repository root:  python lessons/05_escaping_locality.py [--quick]
    a real dataset / a GPU:      ... --dataset cifar10 --data-dir data --device cuda --epochs 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import convit  # noqa: E402
from lessons._common import Stopwatch, cli, parse, run_folder, save_figure, train_small, training_parser  # noqa: E402

DEPTH = 6  # 4 GPSA blocks, then 2 MHSA blocks (train.py keeps the last two plain)


def main(argv=None):
    args = parse(training_parser(__doc__, "05", epochs=60, quick_epochs=3), argv)
    clock = Stopwatch("lesson 5")
    epochs = args.epochs
    with run_folder(args) as run_dir:
        result, records = train_small(args, run_dir, epochs, "--depth", str(DEPTH), warmup=2, quiet=False)

    epoch = [r["epoch"] for r in records]
    gates = torch.tensor([r["gates"] for r in records])  # (epochs, n_gpsa, H)
    nonlocality = torch.tensor([r["nonlocality"] for r in records])  # (epochs, depth, H)
    n_gpsa, depth = gates.shape[1], nonlocality.shape[1]
    colours = plt.get_cmap("viridis")(torch.linspace(0, 0.9, depth).tolist())

    fig, (ax_gate, ax_nonlocal, ax_acc) = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    for layer in range(n_gpsa):
        ax_gate.plot(epoch, gates[:, layer].mean(1), color=colours[layer], lw=2, label=f"GPSA layer {layer + 1}")
        ax_gate.plot(epoch, gates[:, layer], color=colours[layer], lw=0.6, alpha=0.4)  # each head
    ax_gate.axhline(torch.sigmoid(torch.tensor(1.0)), color="0.5", ls=":", label="init, $\\sigma(1)$ = 0.73")
    ax_gate.set(xlabel="epoch", ylabel="$\\sigma(\\lambda)$ (1 = positional, 0 = content)",
                title="gates (Fig. 5): mean of heads (thick), each head (thin)")
    ax_gate.legend(fontsize=8)
    for layer in range(depth):
        kind = "GPSA" if layer < n_gpsa else "MHSA"
        ax_nonlocal.plot(epoch, nonlocality[:, layer].mean(1), color=colours[layer], lw=2,
                         ls="-" if kind == "GPSA" else "--", label=f"layer {layer + 1} ({kind})")
    uniform = convit.relative_positions(*result["model"].cfg.grid)[..., 2].sqrt().mean()  # Eq. 8 of uniform attention
    ax_nonlocal.axhline(uniform, color="0.5", ls=":", label=f"uniform attention, {uniform:.2f}")
    ax_nonlocal.set(xlabel="epoch", ylabel="nonlocality (Eq. 8), patches", title="nonlocality (Fig. 6), mean of heads")
    ax_nonlocal.legend(fontsize=8)
    ax_acc.plot(epoch, [r["val_top1"] for r in records], color="k")
    ax_acc.set(xlabel="epoch", ylabel="validation top-1 (%)", ylim=(0, 100),
               title=f"top-1: {result['val_top1']:.1f}% after {epochs} epochs")
    grid = "8x8 images in 2x2 patches (4x4 grid)" if args.dataset == "digits" else "train.py's image and patch size"
    save_figure(fig, args.out_dir, "05_escaping_locality.png",
                f"train.py on {args.dataset} ({grid}), convit_tiny shrunk to C = 32, 4 heads, {DEPTH} blocks "
                f"({n_gpsa} GPSA), batch 32, lr {args.lr:g}, {epochs} epochs, no RandAugment, seed 0", args.device)

    print("layer | sigma(lambda) epoch 1 -> last | nonlocality epoch 1 -> last")
    for layer in range(depth):
        gate = f"{gates[0, layer].mean():.3f} -> {gates[-1, layer].mean():.3f}" if layer < n_gpsa else "  (MHSA)      "
        print(f"{layer + 1:>5} | {gate:>28} | {nonlocality[0, layer].mean():.2f} -> {nonlocality[-1, layer].mean():.2f}")
    print(f"per-head sigma(lambda) at the end: {[[round(g, 2) for g in row] for row in gates[-1].tolist()]}")
    clock.done()


if __name__ == "__main__":
    sys.exit(cli(main))
