"""Lesson 7: speed. Why the fused GPSA is exact, and what it buys.

Eq. 7 builds, for every image and head, the N x N matrix
    A = (1 - g) softmax(Q K^T / sqrt(D)) + g P,   g = sigma(lambda),  P = softmax(v_pos^T r),
normalises its rows and multiplies by V. Three facts make a faster, equal computation possible:
  1. the mix is convex and both terms are row-stochastic, so the normalisation divides by 1;
  2. P depends on no image, only on the patch geometry and v_pos;
  3. ||delta||^2 = dx^2 + dy^2, so P is a Kronecker product P_rows (x) P_cols.
Hence A V = (1 - g) softmax(Q K^T / sqrt(D)) V + g P V: the content term is exactly what a
fused attention kernel (torch's scaled_dot_product_attention) computes without storing the
N x N matrix, and P V is two small 1-D mixes, along the rows and along the columns of the grid.

Figures (in --out-dir):
  07_throughput.png  images per second of the same-size baseline (ConViT-Ti with no GPSA block, plain
                     attention everywhere), ConViT fused, ConViT explicit

Run from the repository root:  python lessons/07_speed.py [--quick] [--device cuda]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py and bench.py live in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import einsum, rearrange  # noqa: E402

import bench  # noqa: E402
import cli  # noqa: E402
import convit  # noqa: E402
from lessons._command import lesson_parser, parse  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch  # noqa: E402


@torch.no_grad()
def check_exactness(img_size: int, device: str) -> dict[str, float]:
    """Facts 1 and 3 of the docstring and the equality of the two paths, measured. (Fact 2
    needs no measurement: GPSA.position_attention() takes no input at all.)"""
    model = convit.create_model("convit_tiny", img_size=img_size).to(device).eval()
    for block in model.blocks[: model.cfg.local_up_to_layer]:  # gates away from their init: no special case
        block.attn.gating_param.normal_(0.0, 2.0)
    images = torch.randn(4, 3, img_size, img_size, device=device)
    layer = model.blocks[0].attn
    tokens = model.blocks[0].norm1(model.embed(images))  # the first block's real input, (B, N, C)
    attn = layer.attention(tokens)  # (B, H, N, N), Eq. 7 with its row normalisation
    p_rows, p_cols = layer.position_attention_factors()  # (H, rows, rows), (H, cols, cols)
    kronecker = rearrange(einsum(p_rows, p_cols, "h r r2, h c c2 -> h r c r2 c2"), "h r c r2 c2 -> h (r c) (r2 c2)")
    results = {
        "max |row sum of A - 1| (so normalize divides by 1)": (attn.sum(-1) - 1).abs().max().item(),
        "max |P - P_rows (x) P_cols| (P factorises)": (layer.position_attention() - kronecker).abs().max().item(),
        "max |fused - explicit|, first GPSA layer":
            (layer.forward_fused(tokens) - layer.forward_explicit(tokens)).abs().max().item(),
    }
    fused_logits = model.set_fused(True)(images)
    explicit_logits = model.set_fused(False)(images)
    model.set_fused(True)
    results["max |fused - explicit|, logits of the whole model"] = (fused_logits - explicit_logits).abs().max().item()
    for what, value in results.items():
        print(f"{what:<52} {value:.1e}")
    return results


BASELINE = bench.BASELINE  # "same-size baseline": convit_tiny with local_up_to_layer=0
COLOURS = {BASELINE: "tab:blue", "ConViT fused": "tab:red", "ConViT explicit": "tab:orange"}


def three_models(img_size: int, device: str) -> dict:
    """The same-size baseline (convit_tiny with local_up_to_layer=0: no GPSA), and ConViT-Ti on each
    path, the two sharing weights (bench.comparison_models, the set `python bench.py --compare` times)."""
    names = {BASELINE: BASELINE, "convit fused": "ConViT fused", "convit explicit": "ConViT explicit"}
    return {names[name]: model.to(device) for name, model in bench.comparison_models(img_size).items()}


def measure(models: dict, make_job, batch: int, img_size: int, rounds: int, device: str, what: str) -> dict:
    """img/s of each model and its speed relative to the first (the baseline): the models run in
    turn, their order rotated every round, and each ratio is the median of the per-round ratios
    (bench.time_interleaved), so that a slow spell of a shared machine hits all of them alike."""
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    jobs = {name: make_job(model, images) for name, model in models.items()}
    timings = bench.time_interleaved(jobs, rounds=rounds, device=device)  # on a GPU it synchronises
    threads = f"{torch.get_num_threads()} thread(s)" if device == "cpu" else device
    for name, timing in timings.items():
        print(f"{what:<14} {img_size}x{img_size}: {name:<17} {batch / timing.seconds:8.1f} img/s  "
              f"{timing.speed_ratio:5.2f}x baseline (batch {batch}, {threads})")
    return {name: (batch / timing.seconds, timing.speed_ratio) for name, timing in timings.items()}


def plot(bars: dict, sweep: dict, settings: str, args):
    """bars: {"inference": measured, "training step": measured} at one size; sweep: {img_size: inference
    measured}; each `measured` maps a model to (img/s, median per-round speed ratio to the baseline)."""
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.3), layout="constrained")
    for ax, (what, measured) in zip(axes, bars.items()):
        speeds = [speed for speed, _ in measured.values()]
        drawn = ax.bar(list(measured), speeds, color=[COLOURS[n] for n in measured])
        ax.bar_label(drawn, [f"{speed:.1f}\n{ratio:.2f}x" for speed, ratio in measured.values()], fontsize=9)
        ax.set(ylabel="images / second", title=what, ylim=(0, max(speeds) * 1.25))
        ax.tick_params(axis="x", labelsize=8)
    tokens = [(size // 16) ** 2 for size in sweep]
    for name in ("ConViT fused", "ConViT explicit"):
        ratio = [measured[name][1] for measured in sweep.values()]
        axes[2].plot(tokens, ratio, "o-", color=COLOURS[name], label=name)
    axes[2].axhline(1.0, color=COLOURS[BASELINE], ls=":", label=BASELINE)
    axes[2].set_xticks(tokens, [f"{n}\n({size}px)" for n, size in zip(tokens, sweep)])
    axes[2].set(xlabel="patches N (image side)", ylabel="speed / the baseline's speed", ylim=(0, 1.2),
                title="inference, relative to the same-size baseline, as N grows")
    axes[2].legend(fontsize=8)
    paper = bench.PAPER_SPEED["convit_tiny"] / bench.PAPER_SPEED["deit_tiny"]
    fig.suptitle(f"ConViT-Ti against the same-size baseline, no GPSA (paper, Table 1: ConViT-Ti runs at "
                 f"{paper:.2f}x DeiT-Ti, explicit attention, GP100)", fontsize=10)
    save_figure(fig, args.out_dir, "07_throughput.png", settings, args.device)


def main(argv=None):
    args = parse(lesson_parser(__doc__, __file__), argv)
    clock = Stopwatch("lesson 7")
    img_size, batch, rounds = (64, 4, 2) if args.quick else (224, 8, 7)
    sizes = (32, 64) if args.quick else (112, 224, 320)
    check_exactness(img_size, args.device)
    models = three_models(img_size, args.device)
    bars = {"inference": measure(models, bench.inference_job, batch, img_size, rounds, args.device, "inference"),
            "training step": measure(models, bench.training_job, batch, img_size, rounds, args.device, "training step")}
    sweep = {size: bars["inference"] if size == img_size else
             measure(three_models(size, args.device), bench.inference_job, batch, size, rounds, args.device, "inference")
             for size in sizes}
    settings = (f"convit_tiny (C = 192, 4 heads, 10 GPSA + 2 MHSA), patch 16, fp32, batch {batch} "
                f"(training: one AdamW step), bars at {img_size}x{img_size}, {torch.get_num_threads()} thread(s); "
                f"ratios: median of {rounds} per-round ratios, the order rotated every round")
    plot(bars, sweep, settings, args)
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
