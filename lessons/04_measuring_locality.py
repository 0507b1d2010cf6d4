"""Lesson 4: measuring locality with the nonlocality of Eq. 8.

How far does a head look? Eq. 8 weighs every query-key distance by the attention paid to it:
    D_loc^{h,l} = (1/L) sum_ij A^{h,l}_ij ||delta_ij||      (attention averaged over the images)
in patch units. A head that copies the query's own patch scores 0, a 3x3 kernel about 1, and
uniform attention the mean distance between two patches of the grid. convit.py measures it on
each layer's real input (the released script fed the patch embeddings to every layer).

Here: the same-size baseline (ConViT-Ti with no GPSA block: every block plain self-attention,
as in DeiT) and ConViT-Ti, both freshly initialised, layer by layer, on real images and on noise.

Figure (in --out-dir):
  04_nonlocality_at_init.png  nonlocality per layer, the same-size baseline vs ConViT, real images vs noise

Run from the repository root:  python lessons/04_measuring_locality.py [--quick] [--dataset cifar10 --data-dir data]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import convit  # noqa: E402
from lessons._command import lesson_parser, parse  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._images import in_chans, sample_images  # noqa: E402
from lessons._report import Stopwatch  # noqa: E402


def plot_layers(ax, nonlocality: torch.Tensor, style: str, colour: str, label: str, heads: bool = False):
    """One curve: the mean over heads of each layer's nonlocality; with heads=True also each
    head as a faint dot."""
    layers = torch.arange(1, len(nonlocality) + 1)  # numbered from 1, as in the text
    ax.plot(layers, nonlocality.mean(1), style, color=colour, label=f"{label} (mean of heads)")
    if heads:
        for head in range(nonlocality.shape[1]):
            ax.plot(layers, nonlocality[:, head], ".", color=colour, alpha=0.3)
    print(f"{label:<48} nonlocality per layer: " + " ".join(f"{v:.2f}" for v in nonlocality.mean(1).tolist()))


def main(argv=None):
    args = parse(lesson_parser(__doc__, __file__, uses_data=True), argv)
    clock = Stopwatch("lesson 4")
    img_size, batch = (112, 4) if args.quick else (224, 16)  # 224 / 16 = the paper's 14 x 14 grid
    grid = img_size // 16
    channels = in_chans(args.dataset)
    models = {  # ConViT-Ti, and the same-size baseline (width 192, 4 heads, no GPSA): only the GPSA layers differ
        "ConViT-Ti at init": convit.create_model("convit_tiny", img_size=img_size, in_chans=channels),
        "same-size baseline (no GPSA) at init": convit.create_model("convit_tiny", img_size=img_size,
                                                                    in_chans=channels, local_up_to_layer=0),
    }
    images = {args.dataset: sample_images(args.dataset, batch, img_size, args.data_dir),
              "Gaussian noise": torch.randn(batch, channels, img_size, img_size)}
    uniform = convit.relative_positions(grid, grid)[..., 2].sqrt().mean().item()  # uniform attention's Eq. 8

    convit_model = models["ConViT-Ti at init"]
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    for (name, model), colour in zip(models.items(), ("tab:red", "tab:blue")):
        model.to(args.device).eval()
        for (source, batch_images), style in zip(images.items(), ("-o", ":x")):
            nonlocality = model.nonlocality(batch_images.to(args.device))  # (depth, H), Eq. 8
            plot_layers(ax, nonlocality, style, colour, f"{name}, {source}", heads=style == "-o")
    with torch.no_grad():  # open every gate fully: what the positional term alone would give
        for block in convit_model.blocks[: convit_model.cfg.local_up_to_layer]:
            block.attn.gating_param.fill_(50.0)  # sigma(50) = 1 in floating point
    positional = convit_model.nonlocality(images[args.dataset].to(args.device))
    plot_layers(ax, positional, "--s", "tab:orange", f"ConViT-Ti, gates forced to sigma = 1, {args.dataset}")
    ax.axhline(uniform, color="0.5", linestyle="--", label=f"uniform attention: {uniform:.2f} patches")
    ax.axvspan(0.5, convit_model.cfg.local_up_to_layer + 0.5, color="tab:red", alpha=0.06)
    ax.text(1, 0.3, "ConViT's GPSA layers", color="tab:red", fontsize=9)
    ax.set(xlabel="layer", ylabel="nonlocality (Eq. 8), patches", ylim=(0, uniform * 1.15),
           title=f"Nonlocality at init, layer by layer ({grid}x{grid} patches; faint dots: single heads)")
    ax.set_xticks(range(1, convit_model.cfg.depth + 1))
    ax.legend(fontsize=8, loc="center right")
    save_figure(fig, args.out_dir, "04_nonlocality_at_init.png",
                f"{batch} {args.dataset} images (and {batch} noise images) at {img_size}x{img_size}, patch 16, "
                f"C = 192, 4 heads, 12 blocks (ConViT: 10 GPSA), alpha = 1, seed 0", args.device)
    print(f"uniform attention over a {grid}x{grid} grid: {uniform:.2f} patches")
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
