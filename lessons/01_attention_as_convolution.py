"""Lesson 1: self-attention can be a convolution (Eq. 4-5).

A positional attention head scores key j for query i by v_pos^T r_ij, where r_ij only says
where j sits relative to i (Eq. 4). The local initialisation (Eq. 5) makes head h a bump on
one offset Delta_h; nine heads on the nine offsets of a 3x3 kernel copy the nine neighbours of
every patch, and the output projection W_out then weighs them exactly like a 3x3 convolution.

Figures (in --out-dir):
  01_relative_positions.png  r_ij = (dx, dy, |delta|^2) for one query, and one head's score map
  01_heads_as_kernel.png     the 9 heads of a GPSA layer at init, drawn where they look
  01_conv_equality.png       a GPSA layer computing 3x3 filters, beside torch's conv2d

Run from the repository root:  python lessons/01_attention_as_convolution.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402

import cli  # noqa: E402
import convit  # noqa: E402
from lessons._command import lesson_parser, parse  # noqa: E402
from lessons._draw import draw_map, save_figure  # noqa: E402
from lessons._images import sample_images  # noqa: E402
from lessons._report import Stopwatch  # noqa: E402

HARD = 50.0  # alpha (and lambda) so large that softmax and sigmoid round to exactly 0 / 1 in float64


def gpsa_layer(grid: int, patch_size: int = 16, in_chans: int = 3, **overrides) -> convit.GPSA:
    """The first block's GPSA of a 9-head ConViT at init, on a grid x grid patch grid."""
    model = convit.create_model("convit_small", img_size=grid * patch_size, patch_size=patch_size,
                                in_chans=in_chans, depth=2, local_up_to_layer=1, num_classes=0, **overrides)
    return model.blocks[0].attn


def plot_relative_positions(layer: convit.GPSA, grid: int, args):
    centre = (grid * grid) // 2  # the middle patch is the query
    rel_pos = convit.relative_positions(grid, grid)  # (N, N, 3) as (dx, dy, |delta|^2)
    right = convit.head_looking_at(layer.num_heads, 1.0, 0.0)  # the head looking one patch to the right
    with torch.no_grad():
        scores = layer.pos_proj(rel_pos)[centre, :, right]  # v_pos^T r_ij for that head, (N,)
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
    panels = [(rel_pos[centre, :, 0], "$\\delta_x$ (column offset)"),
              (rel_pos[centre, :, 1], "$\\delta_y$ (row offset)"),
              (rel_pos[centre, :, 2], "$\\|\\delta\\|^2$"),
              (scores, f"head {right}: $v_{{pos}}^T r_{{ij}}$, $\\Delta$=(+1, 0)")]
    for ax, (values, title) in zip(axes, panels):
        draw_map(ax, values, grid, grid, title, query=centre, cmap="coolwarm", annotate=True)
    fig.suptitle("Eq. 4: r_ij for the query in the red square, and the score of one head (Eq. 5, alpha = 1)")
    save_figure(fig, args.out_dir, "01_relative_positions.png",
                f"{grid}x{grid} patch grid, 9-head GPSA at init, locality strength alpha = 1", args.device)


def plot_heads_as_kernel(layer: convit.GPSA, grid: int, args):
    centre = (grid * grid) // 2
    with torch.no_grad():
        position_attn = layer.position_attention()  # (H, N, N), softmax_j(v_pos^T r_ij)
    fig, axes = plt.subplots(3, 3, figsize=(8, 8.4), layout="constrained")
    for head, (dx, dy) in enumerate(convit.kernel_centres(layer.num_heads).tolist()):
        ax = axes[int(dy) + 1, int(dx) + 1]  # each head drawn at the kernel offset it looks at
        row = position_attn[head, centre]
        draw_map(ax, row, grid, grid, f"head {head}: $\\Delta$=({dx:+.0f}, {dy:+.0f}), peak {row.max():.2f}",
                 query=centre, vmin=0, vmax=position_attn[:, centre].max())
    fig.suptitle("The 9 heads of a GPSA layer at init: softmax$_j(v_{pos}^{h\\,T} r_{ij})$ for the red query,\n"
                 "each head placed at the offset $\\Delta_h$ it looks at: together, a 3x3 kernel")
    save_figure(fig, args.out_dir, "01_heads_as_kernel.png",
                f"{grid}x{grid} patch grid, 9 heads, locality strength alpha = 1 (Eq. 5)", args.device)
    return position_attn[:, centre].max().item()


def filters_3x3() -> tuple[torch.Tensor, list[str]]:
    """Nine 3x3 filters, (9, 1, 3, 3): two famous ones, then seven random ones."""
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])
    random = torch.randn(7, 3, 3, generator=torch.Generator().manual_seed(0))
    filters = torch.cat([torch.stack([sobel_x, laplacian]), random])
    return rearrange(filters, "o kh kw -> o 1 kh kw"), ["Sobel x", "Laplacian", "a random filter"]


@torch.no_grad()
def set_to_convolution(layer: convit.GPSA, filters: torch.Tensor):
    """Turn a 9-head GPSA layer with D = 1 into the convolution `filters` (9, 1, 3, 3).

    - alpha -> large: each head's positional attention becomes one-hot on its offset Delta_h.
    - lambda -> large: sigma(lambda) = 1, the content term is switched off exactly.
    - W_val: every head reads channel 0 (the image).  W_out[o, h] = filter o at offset Delta_h.
    """
    layer.pos_proj.weight.mul_(HARD / layer.locality_strength)  # same centres, sharper bumps
    layer.gating_param.fill_(HARD)
    layer.v.weight.zero_()
    layer.v.weight[:, 0] = 1.0
    for head, (dx, dy) in enumerate(convit.kernel_centres(layer.num_heads).long().tolist()):
        layer.proj.weight[:, head] = filters[:, 0, dy + 1, dx + 1]  # conv2d is a cross-correlation
    layer.proj.bias.zero_()


@torch.no_grad()
def convolution_equality(side: int, args):
    """Nine 3x3 filters computed by a GPSA layer and by F.conv2d, in float64 and float32."""
    filters, names = filters_3x3()
    image = sample_images("digits", 1, side, seed=3)  # (1, 1, S, S), one real handwritten digit (a 2)
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")  # why replicate: see the lesson's text
    results = {}
    for dtype in (torch.float64, torch.float32):
        layer = gpsa_layer(side, patch_size=1, in_chans=1, embed_dim=9).to(dtype=dtype, device=args.device)
        set_to_convolution(layer, filters)
        tokens = F.pad(rearrange(image, "b c h w -> b (h w) c"), (0, 8))  # (1, N, 9): the image in channel 0
        tokens = tokens.to(dtype=dtype, device=args.device)
        conv = F.conv2d(padded.to(dtype=dtype, device=args.device), filters.to(dtype=dtype, device=args.device))
        for path, run in (("explicit", layer.forward_explicit), ("fused", layer.forward_fused)):
            gpsa = rearrange(run(tokens), "b (h w) c -> b c h w", h=side)  # (1, 9, S, S)
            results[(str(dtype).removeprefix("torch."), path)] = (gpsa - conv).abs().max().item()
        if dtype == torch.float64:
            shown = (image, conv.cpu(), gpsa.cpu())  # the fused path, which the model runs by default
    for (dtype, path), diff in results.items():
        print(f"9 filters, {side}x{side} digit, {dtype:>7}, {path:>8} GPSA path: max |GPSA - conv2d| = {diff:.1e}")

    image, conv, gpsa = shown
    fig, axes = plt.subplots(3, 4, figsize=(11, 8.4), layout="constrained")
    draw_map(axes[0, 0], image.flatten(), side, side, "input: one digit", cmap="gray")
    for ax in axes[1:, 0]:
        ax.axis("off")
    for col, name in enumerate(names, start=1):
        lo, hi = conv[0, col - 1].min().item(), conv[0, col - 1].max().item()
        draw_map(axes[0, col], conv[0, col - 1].flatten(), side, side, f"F.conv2d, {name}", cmap="gray", vmin=lo, vmax=hi)
        draw_map(axes[1, col], gpsa[0, col - 1].flatten(), side, side, f"GPSA layer, {name}", cmap="gray", vmin=lo, vmax=hi)
        diff = (gpsa[0, col - 1] - conv[0, col - 1]).abs()
        draw_map(axes[2, col], diff.flatten(), side, side, f"|GPSA - conv|, max {diff.max():.1e}", cmap="magma")
    fig.suptitle("A GPSA layer with 9 one-hot heads (alpha = 50, sigma(lambda) = 1) and W_out holding the filters\n"
                 "computes the same numbers as a 3x3 convolution (float64, fused path shown)")
    save_figure(fig, args.out_dir, "01_conv_equality.png",
                f"{side}x{side} digit from scikit-learn, patch 1 (one token per pixel), embed_dim 9, 9 heads, "
                f"replicate padding", args.device)
    return results


@torch.no_grad()
def init_is_convolution(side: int, args) -> float:
    """The layer exactly as Eq. 5 leaves it (W_val = I), only sharpened: a 3x3 convolution whose
    weight at offset Delta_h is W_out restricted to the channels of head h."""
    head_dim = 2
    layer = gpsa_layer(side, patch_size=1, in_chans=1, embed_dim=9 * head_dim).double().to(args.device)
    layer.pos_proj.weight.mul_(HARD / layer.locality_strength)
    layer.gating_param.fill_(HARD)
    tokens = torch.randn(2, side * side, 9 * head_dim, dtype=torch.float64, device=args.device)  # (B, N, C)
    weight = torch.zeros(9 * head_dim, 9 * head_dim, 3, 3, dtype=torch.float64, device=args.device)
    for head, (dx, dy) in enumerate(convit.kernel_centres(9).long().tolist()):
        own = slice(head * head_dim, (head + 1) * head_dim)  # the channels W_val = I hands to this head
        weight[:, own, dy + 1, dx + 1] = layer.proj.weight[:, own]
    grid = rearrange(tokens, "b (h w) c -> b c h w", h=side)
    conv = F.conv2d(F.pad(grid, (1, 1, 1, 1), mode="replicate"), weight, layer.proj.bias)
    gpsa = rearrange(layer(tokens), "b (h w) c -> b c h w", h=side)
    diff = (gpsa - conv).abs().max().item()
    print(f"the init itself (W_val = I, C = 18, random tokens), sharpened: max |GPSA - conv2d| = {diff:.1e}")
    return diff


def main(argv=None):
    args = parse(lesson_parser(__doc__, __file__), argv)
    clock = Stopwatch("lesson 1")
    grid, side = (5, 16) if args.quick else (7, 32)
    layer = gpsa_layer(grid)
    plot_relative_positions(layer, grid, args)
    peak = plot_heads_as_kernel(layer, grid, args)
    print(f"at alpha = 1 each head puts {peak:.3f} of its attention on its own offset, the rest on its neighbours")
    convolution_equality(side, args)
    init_is_convolution(side // 2, args)
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
