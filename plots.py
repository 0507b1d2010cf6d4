"""A run's own figure: accuracy, loss, the nonlocality (Fig. 5) and the gates (Fig. 6) of every layer, per epoch.

    python plots.py RUN_DIR [RUN_DIR ...]   # writes RUN_DIR/figure.png from RUN_DIR/metrics.jsonl

train.py draws this figure itself when a run ends (and when it is interrupted); the command
redraws it at any time, for example while a run is still going. Lesson 5 draws the gates,
nonlocality and accuracy panels of several seeds at once with the same functions.

matplotlib is imported only when a figure is drawn, so that `import train` stays light, and
only through its object interface (Figure), so that drawing never changes the pyplot backend
of the program that trains.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch

import cli
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

    path = run_dir / runs.FIGURE
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=80, format="png")
    os.replace(tmp, path)  # a run killed while drawing leaves the old figure or the new, whole
    return path


def figure_of_run(run_dir) -> Path | None:
    """train.py's call when a run ends (or is interrupted): draw_run, or where matplotlib is
    missing None and a note. A figure that cannot be written is one ValueError that says the
    checkpoint and metrics are whole."""
    try:
        return draw_run(run_dir)
    except ImportError as err:  # the run itself is whole: say so rather than fail at its end
        print(f"note: no {runs.FIGURE} ({err}); pip install matplotlib, then python plots.py {run_dir}")
        return None
    except OSError as err:
        raise runs.RunError(f"could not write {Path(run_dir) / runs.FIGURE} ({runs.os_reason(err)}); the checkpoint "
                            f"and metrics are whole: draw it later with python plots.py {run_dir}") from None


def main(argv: list[str] | None = None):
    parser = cli.ArgumentParser(prog="python plots.py",
                                description="Draw RUN_DIR/figure.png from the metrics.jsonl of a train.py run.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a train.py --output-dir")
    for run_dir in parser.parse_args(argv).run_dirs:
        if not (Path(run_dir) / runs.METRICS).is_file():
            raise ValueError(f"{run_dir} holds no {runs.METRICS}: is it the --output-dir of a train.py run?")
        try:
            print(f"wrote {draw_run(run_dir)}")
        except OSError as err:
            raise ValueError(f"could not write {Path(run_dir) / runs.FIGURE} ({runs.os_reason(err)})") from None


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
