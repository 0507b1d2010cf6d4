"""A run's own figure: accuracy, loss, the nonlocality (Fig. 5) and the gates (Fig. 6) of every layer,
per epoch; and the attention maps of any checkpoint, each head titled with its gate (Figs. 7, 15-17).

    python plots.py RUN_DIR [RUN_DIR ...]   # writes RUN_DIR/figure.png from RUN_DIR/metrics.jsonl
    python plots.py --attention runs/digits-convit_tiny --out maps.png            # validation image 0
    python plots.py --attention convit_tiny.pth --model convit_tiny --image cat.jpg --out fig7.png
    python plots.py --attention RUN_DIR --average 100 --layers 1 10 --out fig15.png  # Fig. 15's mean

train.py draws the run's figure itself when a run ends (and when it is interrupted); the command
redraws it at any time, for example while a run is still going. Lesson 5 draws the gates,
nonlocality and accuracy panels of several seeds at once with the same functions.

--attention takes one of train.py's checkpoints (or its run folder), which knows its model and
its data, or a released ConViT/DeiT .pth with --model NAME (and --img-size where it is not 224).
It draws every head of the chosen blocks (default: 2 and depth - 2, the paper's 2 and 10) for one
query patch (default: the patch at the image centre), each GPSA head titled with sigma(lambda).
An image you give gets the model's own preprocessing: its dataset's evaluation transform, or for a
released file ImageNet's (resize to 256, centre crop 224, normalise).

matplotlib is imported only when a figure is drawn, so that `import train` stays light, and
only through its object interface (Figure), so that drawing never changes the pyplot backend
of the program that trains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from tqdm import tqdm

import checkpoints
import cli
import convit
import data
import probes
import runs

INIT_GATE = 1 / (1 + math.exp(-1))  # sigma(1) = 0.73: every gate at initialisation (lambda = 1)


def layer_colours(count: int) -> list:
    """One clearly distinct colour per block (matplotlib's qualitative tab10, or tab20 past ten
    blocks): a sequential colour map makes neighbouring layers near twins."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"].colors
    return [palette[i % len(palette)] for i in range(count)]


def draw_gates(ax, epochs: list, gates: torch.Tensor, colours: list, over: str = "heads"):
    """Fig. 6: sigma(lambda) of each GPSA layer against the epoch. gates is (runs, epochs, GPSA
    layers, H): the thick line is the mean of the heads and runs, each thin line one head of one run.

    The axis fits the gates, not their whole [0, 1] range: a short run moves them a few hundredths
    from 0.73, which on a 0-1 axis would squeeze every layer into one thick line. The label says
    the range, and its ends are drawn when the data reach near them."""
    for layer in range(gates.shape[2]):
        for run in range(gates.shape[0]):
            ax.plot(epochs, gates[run, :, layer], color=colours[layer], lw=0.8, alpha=0.5)  # (epochs, H): each head
        ax.plot(epochs, gates[:, :, layer].mean((0, 2)), color=colours[layer], lw=2.5, label=f"GPSA {layer + 1}")
    ax.axhline(INIT_GATE, color="0.3", ls=":", label="init, $\\sigma(1)$ = 0.73")
    low, high = min(gates.min().item(), INIT_GATE), max(gates.max().item(), INIT_GATE)
    pad = max(0.1 * (high - low), 0.005)
    low, high = max(low - pad, 0.0), min(high + pad, 1.0)
    for end in (0.0, 1.0):  # the ends of the range, where the axis reaches them
        if low <= end <= high:
            ax.axhline(end, color="k", lw=0.8)
    ax.set(xlabel="epoch", ylabel="$\\sigma(\\lambda)$ in [0, 1] (1 = positional, 0 = content)", ylim=(low, high),
           title=f"gates (Fig. 6): mean of {over} (thick), each head (thin)")
    ax.legend(fontsize=7, ncol=2)


def draw_nonlocality(ax, epochs: list, nonlocality: torch.Tensor, n_gpsa: int, colours: list,
                     uniform: float | None = None, over: str = "heads"):
    """Fig. 5: the nonlocality of Eq. 8 of each block against the epoch, GPSA solid, MHSA dashed.
    nonlocality is (runs, epochs, blocks, H); `uniform` marks what uniform attention would give."""
    for layer in range(nonlocality.shape[2]):
        kind = "GPSA" if layer < n_gpsa else "MHSA"
        ax.plot(epochs, nonlocality[:, :, layer].mean((0, 2)), color=colours[layer], lw=2,
                ls="-" if kind == "GPSA" else "--", label=f"{layer + 1} ({kind})")
    if uniform is not None:
        ax.axhline(uniform, color="0.5", ls=":", label=f"uniform, {uniform:.2f}")
    ax.set(xlabel="epoch", ylabel="nonlocality (Eq. 8), patches", title=f"nonlocality (Fig. 5), mean of {over}")
    ax.legend(fontsize=7, ncol=2)


def draw_curves(ax, epochs: list, curves: dict[str, list], ylabel: str, title: str, ylim=None):
    """One line per named curve against the epoch (accuracy of each seed, or train and val loss);
    a missing value (None) leaves a gap."""
    for label, values in curves.items():
        ax.plot(epochs, [math.nan if v is None else v for v in values], label=label)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title, ylim=ylim)
    ax.legend(fontsize=8)


def draw_run(run_dir) -> Path:
    """RUN_DIR/figure.png from RUN_DIR/metrics.jsonl: top-1 and top-5, train and val loss, the gates
    and the nonlocality of every layer (per epoch, mean of heads). Written atomically."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = [r for r in runs.read_metrics(run_dir) if "val_top1" in r and "nonlocality" in r]
    if not records:
        raise ValueError(f"{run_dir / runs.METRICS} holds no evaluated epoch yet: nothing to draw")
    check_records(records, run_dir / runs.METRICS)
    epochs = [r["epoch"] for r in records]
    nonlocality = torch.tensor([[r["nonlocality"] for r in records]])  # (1, epochs, blocks, H)
    gates = torch.tensor([[r["gates"] for r in records]]) if "gates" in records[0] else None  # (1, epochs, GPSA, H)
    n_gpsa, colours = 0 if gates is None else gates.shape[2], layer_colours(nonlocality.shape[2])

    fig = Figure(figsize=(13, 9))
    # Fixed margins: a constrained layout would double the time a figure takes to draw.
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.06, top=0.92, wspace=0.15, hspace=0.25)
    (ax_acc, ax_loss), (ax_gate, ax_nonlocal) = fig.subplots(2, 2)
    last = records[-1]
    accuracy = {"top-1": [r["val_top1"] for r in records], "top-5": [r["val_top5"] for r in records]}
    if "ema_val_top1" in last:
        accuracy["EMA top-1"] = [r.get("ema_val_top1") for r in records]
    draw_curves(ax_acc, epochs, accuracy, "validation accuracy (%)", f"top-1 {last['val_top1']:.1f}%, "
                f"top-5 {last['val_top5']:.1f}% after epoch {last['epoch']}", ylim=(0, 100))
    loss = {"train": [r["train_loss"] for r in records], "validation": [r["val_loss"] for r in records]}
    draw_curves(ax_loss, epochs, loss, "loss", "loss (train: with label smoothing and augmentation)")
    if gates is not None:
        draw_gates(ax_gate, epochs, gates, colours)
    else:
        ax_gate.text(0.5, 0.5, "no GPSA layer, no gate (DeiT)", ha="center", va="center", transform=ax_gate.transAxes)
        ax_gate.set_axis_off()
    draw_nonlocality(ax_nonlocal, epochs, nonlocality, n_gpsa, colours)
    fig.suptitle(f"{run_dir}: {len(records)} evaluations, epochs {epochs[0]}-{epochs[-1]}", fontsize=10)

    return write_png(fig, run_dir / runs.FIGURE)


NUMBERS = ("val_top1", "val_top5", "train_loss", "val_loss")  # what the figure reads from every line (and its
# epoch, which runs.read_metrics has checked is an int)


def check_records(records: list[dict], path: Path):
    """train.py writes every line of metrics.jsonl itself, so a line the figure cannot read was
    edited or damaged: one ValueError naming the file and the line's epoch, not a traceback from
    inside torch or matplotlib. Every line needs its numbers, and nonlocality (blocks x heads) and
    gates (GPSA blocks x heads, or none, as DeiT) of the first line's shape."""
    first = None
    for record in records:
        where = f"{path}, the line of epoch {record['epoch']}"
        bad = [key for key in NUMBERS if type(record.get(key)) not in (int, float)]
        if bad:
            raise ValueError(f"{where}: {', '.join(bad)} missing or not a number; train.py writes each line "
                             f"itself, so this file was edited or damaged")
        try:
            shapes = tuple(None if key not in record else tuple(torch.tensor(record[key], dtype=torch.float).shape)
                           for key in ("nonlocality", "gates"))
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{where}: nonlocality or gates is not a table of numbers ({cli.one_line(err)})") from None
        first = first or shapes
        if shapes != first or any(shape is not None and (len(shape) != 2 or 0 in shape) for shape in shapes):
            sizes = ", ".join(f"{key} {' x '.join(map(str, shape))}" if shape is not None else f"no {key}"
                              for key, shape in zip(("nonlocality", "gates"), first))
            raise ValueError(f"{where}: nonlocality and gates must be tables of blocks x heads, of the same shape "
                             f"on every line (the first line: {sizes})")


def write_png(fig, path: Path) -> Path:
    """Save `fig` as `path` through a temporary file: a run killed while drawing leaves the old
    figure or the new, whole. A figure that cannot be written is one ValueError naming the path,
    and leaves no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, dpi=80, format="png")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise runs.RunError(f"could not write {path} ({runs.os_reason(err)})") from None
    return path


def figure_of_run(run_dir) -> Path | None:
    """train.py's call when a run ends (or is interrupted): draw_run, or where matplotlib is
    missing None and a note. A figure that cannot be drawn or written is one ValueError that says
    the checkpoint and metrics are whole."""
    try:
        return draw_run(run_dir)
    except ImportError as err:  # the run itself is whole: say so rather than fail at its end
        print(f"note: no {runs.FIGURE} ({err}); pip install matplotlib, then python plots.py {run_dir}")
        return None
    except ValueError as err:
        raise runs.RunError(f"{err}; the checkpoint and metrics are whole: draw the figure later with python plots.py "
                            f"{run_dir}") from None


# ---------------------------------------------------------------------------------------
# The attention maps of any checkpoint, each head with its gate (Figs. 7, 15-17)
# ---------------------------------------------------------------------------------------
@dataclass
class AttentionMaps:
    """What `draw_attention` drew, for a reader or a test to check without reading the picture."""

    path: Path  # the PNG written
    layers: list[int]  # the blocks drawn, counted from 1 as in the paper
    query: tuple[int, int]  # (row, col) of the query patch on the grid, from 0 at the top left
    indices: list[int] | None  # the validation images averaged (one for --index), None for --image
    maps: torch.Tensor  # (layers, H, rows, cols): each head's attention from the query to every patch
    gates: list[list[float | None]]  # sigma(lambda) per layer and head; None where the block has no gate
    titles: list[list[str]]  # each head's panel title


def query_patch(text: str, grid: tuple[int, int]) -> tuple[int, int]:
    """--query: "centre" (the patch at the image centre, rows // 2 and cols // 2: on an even grid
    the one below and right of the centre point) or "ROW,COL" counted from 0 at the top left."""
    rows, cols = grid
    if text in ("centre", "center"):
        return rows // 2, cols // 2
    try:
        row, col = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--query {text!r}: give centre or ROW,COL, e.g. --query 3,5") from None
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"--query {text}: the grid is {rows}x{cols} patches, rows 0-{rows - 1} and columns 0-{cols - 1}")
    return row, col


@torch.no_grad()
def query_attention(model: convit.ConViT, images: torch.Tensor, layers: list[int], query: tuple[int, int],
                    progress: bool = False) -> torch.Tensor:
    """Each head's attention from the query patch (row, col) to every patch, in the blocks `layers`
    (counted from 1), averaged over `images` (B, C, H, W): (len(layers), H, rows, cols), fp32.
    Where the class token is present (MHSA blocks) only the patches are drawn, so those rows sum
    to 1 minus the class token's share."""
    model.eval()
    rows, cols = model.cfg.grid
    n, total = rows * cols, 0.0
    for start in tqdm(range(0, len(images), 16), desc="attention", disable=not progress):
        maps = model.attention_maps(images[start : start + 16])  # per block (B, H, N, N), or 1 + N with the class token
        patches = torch.stack([maps[layer - 1][:, :, -n:, -n:] for layer in layers])  # (L, B, H, N, N)
        total = total + patches[:, :, :, query[0] * cols + query[1]].sum(dim=1)  # (L, H, N)
    return rearrange(total / len(images), "l h (r c) -> l h r c", r=rows)


def head_titles(model: convit.ConViT, layers: list[int]) -> tuple[list[list[float | None]], list[list[str]]]:
    """sigma(lambda) of each head of `layers` (None where the block has no gate), and the panel titles."""
    gates, n_local, heads = model.gates(), model.cfg.local_up_to_layer, model.cfg.num_heads
    values, titles = [], []
    for layer in layers:
        gpsa = layer <= n_local and model.cfg.attention == "gpsa"
        values.append([gates[layer - 1, h].item() if gpsa else None for h in range(heads)])
        no_gate = " (PSA: no gate)" if layer <= n_local and not gpsa else ""
        titles.append([f"head {h + 1}: $\\sigma$ = {g:.2f}" if gpsa else f"head {h + 1}{no_gate}"
                       for h, g in enumerate(values[-1])])
    return values, titles


def draw_attention(model: convit.ConViT, images: torch.Tensor, spec: data.DatasetSpec, layers: list[int],
                   query: tuple[int, int], indices: list[int] | None, about: str, out: Path,
                   progress: bool = False) -> AttentionMaps:
    """One row per block of `layers`: the image with the query patch framed (or, for several
    images, what they are), then every head's map from the query patch, framed too."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    maps = query_attention(model, images, layers, query, progress)
    gates, titles = head_titles(model, layers)
    heads, p, (row, col) = model.cfg.num_heads, model.cfg.patch_size, query
    height = 1.9 * len(layers) + 0.8  # inches: a row per block, and two lines of title
    fig = Figure(figsize=(max(1.8 * (heads + 1), 7.5), height))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 / height, top=1 - 0.8 / height, wspace=0.1, hspace=0.3)
    axes = fig.subplots(len(layers), heads + 1, squeeze=False)
    mean, std = torch.tensor(spec.mean)[:, None, None], torch.tensor(spec.std)[:, None, None]
    for r, layer in enumerate(layers):
        kind = (model.cfg.attention.upper() if layer <= model.cfg.local_up_to_layer else "MHSA")
        ax = axes[r][0]
        if len(images) == 1:
            picture = (images[0].float() * std + mean).clamp(0, 1)  # (C, H, W), as the model saw it
            ax.imshow(rearrange(picture, "c h w -> h w c").squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.add_patch(Rectangle((col * p - 0.5, row * p - 0.5), p, p, fill=False, edgecolor="red", lw=1.5))
        else:
            ax.text(0.5, 0.5, f"mean of\n{len(images)} images", ha="center", va="center", transform=ax.transAxes)
            ax.spines[:].set_visible(False)
        ax.set_ylabel(f"layer {layer} ({kind})", fontsize=9)
        for h in range(heads):
            ax = axes[r][h + 1]
            ax.imshow(maps[r, h].numpy(), cmap="viridis", vmin=0)  # from 0: a uniform map looks uniform
            ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1))
            ax.set_title(titles[r][h], fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(about, fontsize=9)
    write_png(fig, out)
    return AttentionMaps(out, layers, query, indices, maps, gates, titles)


ATTENTION_FLAGS = ("model", "img_size", "image", "index", "average", "dataset", "data_dir", "layers", "query", "out")


def add_attention_flags(parser):
    group = parser.add_argument_group("attention maps of a checkpoint (Figs. 7, 15-17)")
    group.add_argument("--attention", metavar="CHECKPOINT", help="one of train.py's checkpoints (or its run folder), "
                       "or a released ConViT/DeiT .pth with --model")
    group.add_argument("--model", choices=list(convit.MODEL_PRESETS), help="the model of a released .pth")
    group.add_argument("--img-size", type=int, help="a released model's image size (default 224; pos_embed is "
                       "interpolated to it)")
    group.add_argument("--image", metavar="PATH", help="your own image (any size: it gets the model's preprocessing)")
    group.add_argument("--index", type=int, help="validation image I of the model's dataset (default: 0)")
    group.add_argument("--average", type=int, metavar="N", help="the mean of N validation images spread evenly over "
                       "the validation set (Fig. 15: 100)")
    group.add_argument("--dataset", choices=list(data.DATASETS), help="where a released model's --index and "
                       "--average images come from (default imagefolder, with --data-dir holding val/)")
    group.add_argument("--data-dir", help="where the data is (default: the run's own --data-dir, or data)")
    group.add_argument("--layers", type=int, nargs="+", metavar="L", help="blocks to draw, counted from 1 "
                       "(default: 2 and depth - 2, the paper's 2 and 10)")
    group.add_argument("--query", help="the query patch: centre (default) or ROW,COL from 0 at the top left")
    group.add_argument("--out", metavar="FILE.png", help="where to write the figure (default: attention.png)")


def images_for_maps(args, model: convit.ConViT, settings: data.Data, spec: data.DatasetSpec):
    """(images (B, C, H, W) as the model sees them, their validation indices or None, a caption)."""
    if args.image is not None:
        path = Path(args.image)
        if not path.is_file():
            raise ValueError(f"--image {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        picture = data.read_image(str(path))  # an RGB PIL image; an unreadable file is one error naming it
        picture = picture.convert("L") if model.cfg.in_chans == 1 else picture
        return data.eval_transform(settings.img_size, spec)(picture)[None], None, path.name
    val_set = data.validation_set(settings)
    if args.average is not None:
        if not 1 <= args.average <= len(val_set):
            raise ValueError(f"--average {args.average}: the validation set of {settings.dataset} has {len(val_set)} "
                             f"images")
        indices = torch.linspace(0, len(val_set) - 1, args.average).round().long().tolist()
        caption = f"mean of {args.average} {settings.dataset} validation images"
    else:
        index = args.index or 0
        if not 0 <= index < len(val_set):
            raise ValueError(f"--index {index}: the validation set of {settings.dataset} has {len(val_set)} images, "
                             f"0 to {len(val_set) - 1}")
        indices, caption = [index], f"{settings.dataset} validation image {index}"
    return torch.stack([val_set[i][0] for i in indices]), indices, caption


def attention_command(args) -> AttentionMaps:
    """python plots.py --attention CHECKPOINT ...: every check first, then the figure."""
    sources = [flag for flag, value in (("--image", args.image), ("--index", args.index), ("--average", args.average))
               if value is not None]
    if len(sources) > 1:
        raise ValueError(f"{' and '.join(sources)}: give one (your image, one validation image, or a mean of several)")
    out = Path(args.out or "attention.png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: name a .png file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    path = checkpoints.find_checkpoint(args.attention, "--attention")
    model, settings, spec = probes.model_and_data(path, args.model, args.img_size, args.dataset)
    if args.data_dir is not None:
        settings = dataclasses.replace(settings, data_dir=args.data_dir)
    depth = model.cfg.depth
    layers = args.layers or sorted({min(2, depth), max(depth - 2, 1)})
    outside = [layer for layer in layers if not 1 <= layer <= depth]
    if outside:
        raise ValueError(f"--layers {' '.join(map(str, outside))}: the model has {depth} blocks, 1 to {depth}")
    query = query_patch(args.query or "centre", model.cfg.grid)
    images, indices, caption = images_for_maps(args, model, settings, spec)
    rows, cols = model.cfg.grid
    about = (f"{path}: {args.model or 'a train.py checkpoint'} ({model.cfg.local_up_to_layer} "
             f"{model.cfg.attention.upper()} + {depth - model.cfg.local_up_to_layer} MHSA blocks)\n{caption}; "
             f"attention of the query patch (row {query[0]}, column {query[1]} of {rows}x{cols}, framed)")
    return draw_attention(model, images, spec, layers, query, indices, about, out, progress=sys.stderr.isatty())


def main(argv: list[str] | None = None):
    parser = cli.ArgumentParser(prog="python plots.py", description="Draw RUN_DIR/figure.png from the metrics.jsonl "
                                "of a train.py run; or, with --attention, the attention maps of a checkpoint.")
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="a train.py --output-dir")
    add_attention_flags(parser)
    args = parser.parse_args(argv)
    if args.attention is not None:
        if args.run_dirs:
            raise ValueError(f"{args.run_dirs[0]}: --attention draws one checkpoint; draw run folders without it")
        result = attention_command(args)
        print(f"wrote {result.path}")
        return result
    typed = [f"--{name.replace('_', '-')}" for name in ATTENTION_FLAGS if getattr(args, name) is not None]
    if typed:
        raise ValueError(f"{', '.join(typed)}: only with --attention CHECKPOINT")
    if not args.run_dirs:
        raise ValueError("give a RUN_DIR (a train.py --output-dir), or --attention CHECKPOINT")
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / runs.METRICS).is_file():
            raise ValueError(f"{run_dir} holds no {runs.METRICS}: is it the --output-dir of a train.py run?")
        print(f"wrote {draw_run(run_dir)}")


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
