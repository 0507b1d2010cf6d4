"""Lesson 3: locality strength alpha and the number of heads (Eq. 5).

Eq. 5 sets v_pos^h = alpha (2 Delta_x, 2 Delta_y, -1), so head h scores key j by
-alpha ||delta_ij - Delta_h||^2 (+ a constant that the softmax ignores): a bump of width
~1/sqrt(alpha) on the offset Delta_h. alpha decides how sharp the initial kernel is; the
number of heads decides its size, k*k heads for a k x k kernel. When H is not a square,
convit.kernel_centres gives the H heads the H kernel offsets nearest the centre.

Figures (in --out-dir):
  03_locality_strength.png  the 9 heads at alpha = 0.1, 1 and 10
  03_head_counts.png        where the heads look for H = 4, 9, 16 and for H = 6, 12 (not squares)

Positional attention does not depend on the image, so this lesson needs no data.
Run from the repository root:  python lessons/03_locality_and_heads.py [--quick]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import convit  # noqa: E402
from lessons._command import lesson_parser, parse  # noqa: E402
from lessons._draw import draw_map, save_figure  # noqa: E402
from lessons._report import Stopwatch  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0)
SQUARE_HEADS = (4, 9, 16)
OTHER_HEADS = (6, 12)


def build(grid: int, num_heads: int, alpha: float, device: str) -> convit.ConViT:
    """A ConViT at init with one GPSA block on a grid x grid patch grid (8 channels per head)."""
    model = convit.create_model("convit_small", img_size=16 * grid, num_heads=num_heads, embed_dim=8 * num_heads,
                                depth=2, local_up_to_layer=1, locality_strength=alpha, num_classes=0)
    return model.to(device).eval()


@torch.no_grad()
def positional_nonlocality(model: convit.ConViT) -> float:
    """Eq. 8 of the first layer with the gate fully open (sigma = 1): the positional term alone,
    averaged over heads. The image does not matter then, so a blank one is used."""
    gating_param = model.blocks[0].attn.gating_param
    saved = gating_param.clone()
    gating_param.fill_(50.0)  # sigma(50) = 1 in floating point
    blank = torch.zeros(1, model.cfg.in_chans, *model.cfg.img_size, device=gating_param.device)
    value = model.nonlocality(blank)[0].mean().item()
    gating_param.copy_(saved)
    return value


def plot_locality_strength(grid: int, args):
    centre = (grid * grid) // 2
    fig = plt.figure(figsize=(4 * len(ALPHAS), 4.6), layout="constrained")
    columns = fig.subfigures(1, len(ALPHAS))
    print(f"{'alpha':>6} | weight on its own offset | within 1 patch of it | positional nonlocality (Eq. 8)")
    for column, alpha in zip(columns, ALPHAS):
        model = build(grid, 9, alpha, args.device)
        with torch.no_grad():
            position_attn = model.blocks[0].attn.position_attention()[:, centre]  # (H, N): the centre query
        axes = column.subplots(3, 3)
        for head, (dx, dy) in enumerate(convit.kernel_centres(9).tolist()):
            draw_map(axes[int(dy) + 1, int(dx) + 1], position_attn[head], grid, grid, query=centre,
                     vmin=0, vmax=position_attn.max())
        own = position_attn.max(dim=1).values.mean().item()  # each head's peak sits on its own offset
        # the weight within one patch of the offset (its 3x3 neighbourhood), for the head whose offset is 0
        near = convit.relative_positions(grid, grid)[centre, :, :2].abs().amax(dim=-1) <= 1  # (N,)
        within = position_attn[convit.head_looking_at(9, 0.0, 0.0)].cpu()[near].sum().item()
        nonlocality = positional_nonlocality(model)
        column.suptitle(f"$\\alpha$ = {alpha:g}: {own:.2f} on its offset, {within:.2f} within 1 patch of it\n"
                        f"(centre head), nonlocality {nonlocality:.2f} patches", fontsize=10)
        print(f"{alpha:>6g} | {own:24.3f} | {within:20.3f} | {nonlocality:.2f} patches")
    fig.suptitle("The 9 heads of a GPSA layer at init for three locality strengths (red: the query)", fontsize=12)
    save_figure(fig, args.out_dir, "03_locality_strength.png",
                f"{grid}x{grid} patch grid, 9 heads, centre query; colour scale shared within each alpha", args.device)


def plot_head_counts(grid: int, args):
    centre = (grid * grid) // 2
    counts = SQUARE_HEADS + OTHER_HEADS
    fig, axes = plt.subplots(1, len(counts), figsize=(3.3 * len(counts), 4), layout="constrained")
    for ax, num_heads in zip(axes, counts):
        model = build(grid, num_heads, 1.0, args.device)
        with torch.no_grad():
            footprint = model.blocks[0].attn.position_attention()[:, centre].sum(0)  # (N,): all heads together
        kind = "square" if num_heads in SQUARE_HEADS else "not a square"
        draw_map(ax, footprint, grid, grid, f"H = {num_heads} ({kind})", query=centre, cmap="Greys")
        centres = convit.kernel_centres(num_heads)  # (H, 2) as (Delta_x, Delta_y)
        for head, (dx, dy) in enumerate(centres.tolist()):
            x, y = grid // 2 + dx, grid // 2 + dy  # the offset, in the drawing's patch coordinates
            ax.plot(x, y, "o", color="tab:orange", markersize=11, alpha=0.85)
            ax.text(x, y, str(head), ha="center", va="center", fontsize=7, color="black")
        print(f"H = {num_heads:2d}: centres (dx, dy) = {[tuple(c) for c in centres.tolist()]}")
    fig.suptitle("Where each head looks at init ($\\Delta_h$, orange, numbered by head), over the summed positional "
                 "attention of all heads (grey).\nEven k puts the centres between patches; H = 6 and 12 take the "
                 "offsets nearest the centre", fontsize=11)
    save_figure(fig, args.out_dir, "03_head_counts.png",
                f"{grid}x{grid} patch grid, centre query (red), alpha = 1, centres from convit.kernel_centres",
                args.device)


def main(argv=None):
    args = parse(lesson_parser(__doc__, __file__), argv)
    clock = Stopwatch("lesson 3")
    grid = 9 if args.quick else 11
    plot_locality_strength(grid, args)
    plot_head_counts(7 if args.quick else 9, args)
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
