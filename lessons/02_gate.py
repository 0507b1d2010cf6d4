"""Lesson 2: the gate sigma(lambda) mixes content and positional attention (Eq. 6-7).

Every GPSA head h owns one learned scalar lambda_h. Its attention is the convex mix
    A^h = (1 - sigma(lambda_h)) softmax(Q K^T / sqrt(D)) + sigma(lambda_h) softmax(v_pos^T r),
content attention (where to look depends on what the patches contain) against positional
attention (where to look depends only on where the patches are). lambda starts at 1, so
sigma = 0.73 and the convolution-like term dominates at init; training may lower it.

Figures (in --out-dir):
  02_gate_maps.png   one head's attention for one query as lambda goes from -30 to 30, for the
                     model at init and for a head whose content attention has been given meaning
  02_gate_curve.png  sigma(lambda), and the head's nonlocality (Eq. 8), which moves linearly in sigma

Run from the repository root:  python lessons/02_gate.py [--quick] [--dataset cifar10 --data-dir data]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import reduce  # noqa: E402

import cli  # noqa: E402
import convit  # noqa: E402
from lessons._command import lesson_parser, parse  # noqa: E402
from lessons._draw import draw_map, save_figure  # noqa: E402
from lessons._images import in_chans, sample_images  # noqa: E402
from lessons._report import Stopwatch  # noqa: E402

LAMBDAS = [-30.0, -1.0, 0.0, 1.0, 3.0, 30.0]  # sigma = 0, 0.27, 0.50, 0.73 (the init), 0.95, 1


def build(img_size: int, patch_size: int, channels: int, device: str) -> convit.ConViT:
    """A 9-head ConViT at init (D = 16), cut to one GPSA block (and the MHSA block that must follow)."""
    model = convit.create_model("convit_small", img_size=img_size, patch_size=patch_size, in_chans=channels,
                                embed_dim=9 * 16, depth=2, local_up_to_layer=1, num_classes=0)
    return model.to(device).eval()


@torch.no_grad()
def give_content_meaning(layer: convit.GPSA):
    """W_qry = W_key = I: then Q_i K_j^T is the dot product of the (layer-normed) tokens i and j,
    so each head's content attention goes to the patches that look most like the query.
    A stand-in for what training teaches; at init W_qry and W_key are small and random."""
    dim = layer.v.weight.shape[0]
    layer.qk.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)]))


def set_gate(layer: convit.GPSA, head: int, lam: float):
    with torch.no_grad():
        layer.gating_param[head] = lam


def main(argv=None):
    args = parse(lesson_parser(__doc__, __file__, uses_data=True), argv)
    clock = Stopwatch("lesson 2")
    img_size, patch_size, batch = (32, 4, 4) if args.quick else (64, 4, 8)
    channels = in_chans(args.dataset)
    images = sample_images(args.dataset, batch, img_size, args.data_dir, seed=3).to(args.device)  # first: a 2

    at_init = build(img_size, patch_size, channels, args.device)
    with_meaning = build(img_size, patch_size, channels, args.device)
    with_meaning.load_state_dict(at_init.state_dict())  # the same weights, apart from W_qry and W_key:
    give_content_meaning(with_meaning.blocks[0].attn)
    models = {"at init (random $W_{qry}, W_{key}$)": at_init, "$W_{qry} = W_{key} = I$ (content has meaning)": with_meaning}
    head = convit.head_looking_at(9, 1.0, 0.0)  # the head looking one patch to the right
    draw_gate_maps(args, models, head, images, patch_size)
    draw_gate_curve(args, models, head, images, patch_size)
    clock.done()


def draw_gate_maps(args, models: dict, head: int, images: torch.Tensor, patch_size: int):
    """Figure 1: one query's attention in `head` as its gate moves from content to position."""
    img_size = images.shape[-1]
    rows = cols = img_size // patch_size
    # The query: the brightest patch away from the edges, so a patch on a stroke of the digit.
    brightness = reduce(images[0], "c (rows p) (cols q) -> rows cols", "mean", p=patch_size, q=patch_size)
    central = torch.zeros_like(brightness, dtype=torch.bool)
    central[rows // 4: 3 * rows // 4, cols // 4: 3 * cols // 4] = True
    query = int(brightness.masked_fill(~central, float("-inf")).argmax())  # raster index = token index

    fig, axes = plt.subplots(2, len(LAMBDAS) + 1, figsize=(2.2 * (len(LAMBDAS) + 1), 5.4), layout="constrained")
    for r, (label, model) in enumerate(models.items()):
        layer = model.blocks[0].attn
        draw_map(axes[r, 0], images[0].mean(0).flatten().cpu(), img_size, img_size, "input image", cmap="gray")
        qy, qx = divmod(query, cols)  # draw the query patch on the image, in pixels
        axes[r, 0].add_patch(plt.Rectangle((qx * patch_size - 0.5, qy * patch_size - 0.5), patch_size, patch_size,
                                           fill=False, edgecolor="red", linewidth=1.5))
        axes[r, 0].set_ylabel(label, fontsize=8)
        maps = []
        for lam in LAMBDAS:
            set_gate(layer, head, lam)
            maps.append(model.attention_maps(images[:1])[0][0, head, query])  # (N,): block 0, image 0, this query
        set_gate(layer, head, 1.0)
        top = max(m.max().item() for m in maps)  # one colour scale per row
        for c, (lam, attn) in enumerate(zip(LAMBDAS, maps), start=1):
            sigma = torch.sigmoid(torch.tensor(lam)).item()
            note = " (init)" if lam == 1.0 else " content" if sigma < 1e-6 else " position" if sigma > 1 - 1e-6 else ""
            title = f"$\\lambda$={lam:g}, $\\sigma$={sigma:.2f}{note}\nmax weight {attn.max():.3f}"
            draw_map(axes[r, c], attn, rows, cols, title, query=query, vmin=0, vmax=top, gamma=0.4)
    fig.suptitle(f"Head {head} ($\\Delta$ = (+1, 0)) of a GPSA layer: attention of the red query as the gate moves "
                 f"from content ($\\sigma$=0) to position ($\\sigma$=1).\nTop: the model at init. "
                 f"Bottom: the same layer with $W_{{qry}} = W_{{key}} = I$, so content attention follows the digit "
                 f"(colour scale: weight$^{{0.4}}$, shared along a row)")
    save_figure(fig, args.out_dir, "02_gate_maps.png",
                f"{args.dataset} image at {img_size}x{img_size}, patch {patch_size} ({rows}x{cols} grid), "
                f"9 heads, C = 144, alpha = 1; only lambda of head {head} is changed", args.device)


def draw_gate_curve(args, models: dict, head: int, images: torch.Tensor, patch_size: int):
    """Figure 2: sigma(lambda), and the nonlocality of `head`, linear in sigma."""
    side = images.shape[-1]
    sweep = torch.linspace(-6, 6, 5 if args.quick else 9)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    dense = torch.linspace(-6, 6, 200)
    left.plot(dense, torch.sigmoid(dense), color="k")
    left.scatter([1.0], [torch.sigmoid(torch.tensor(1.0))], color="red", zorder=3,
                 label="init: $\\lambda$=1, $\\sigma$=0.73")
    left.set(xlabel="$\\lambda$", ylabel="$\\sigma(\\lambda)$ = weight of positional attention", title="the gate")
    left.legend()
    for (label, model), colour in zip(models.items(), ("tab:blue", "tab:orange")):
        layer = model.blocks[0].attn
        measured = []
        for lam in sweep.tolist():
            set_gate(layer, head, lam)
            measured.append(model.nonlocality(images)[0, head].item())  # Eq. 8, block 0, this head
        set_gate(layer, head, 1.0)
        sigmas = torch.sigmoid(sweep)
        right.plot(sigmas, measured, "o", color=colour, label=f"{label}, measured")
        right.plot([sigmas[0], sigmas[-1]], [measured[0], measured[-1]], "-", color=colour, alpha=0.5)  # end to end
        print(f"{label}: nonlocality of head {head} from {measured[0]:.2f} (sigma={sigmas[0]:.3f}) "
              f"to {measured[-1]:.2f} (sigma={sigmas[-1]:.3f}); at init (sigma=0.73) "
              f"{model.nonlocality(images)[0, head]:.2f} patches")
    right.set(xlabel="$\\sigma(\\lambda)$", ylabel="nonlocality (Eq. 8), patches",
              title=f"head {head}: nonlocality is linear in $\\sigma$")
    right.legend(fontsize=8)
    save_figure(fig, args.out_dir, "02_gate_curve.png",
                f"{len(images)} {args.dataset} images at {side}x{side}, patch {patch_size}, 9 heads, alpha = 1; "
                f"lambda of head {head} swept over [-6, 6]", args.device)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
