"""Drawing for the lessons: an attention row on its patch grid, and a figure saved with its
settings and the machine printed underneath."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files; no display is needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

import runs  # noqa: E402
from lessons._report import hardware  # noqa: E402


def text_colour(value: float, low: float, high: float) -> str:
    """Black on the light half of a colour scale from low to high, white on the dark half: viridis
    (our maps' colours) runs from dark purple to light yellow."""
    return "black" if value > (low + high) / 2 else "white"


def draw_map(ax, values: torch.Tensor, rows: int, cols: int, title: str = "", query: int | None = None,
             cmap: str = "viridis", vmin=None, vmax=None, annotate: bool = False, fmt: str = "{:.0f}",
             gamma: float = 1.0):
    """Draw one row of an attention matrix (N,) as the rows x cols patch grid it lives on.
    `query` (a token index) is marked with a red square: the patch that is looking.
    gamma < 1 stretches the colour scale near zero, so that small weights stay visible."""
    # numpy for matplotlib: a tensor there goes through numpy's deprecated __array__ without copy=
    grid = rearrange(values.detach().float().cpu(), "(rows cols) -> rows cols", rows=rows, cols=cols).numpy()
    if gamma == 1.0:
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax)
    else:
        image = ax.imshow(grid, cmap=cmap, norm=matplotlib.colors.PowerNorm(gamma, vmin=vmin, vmax=vmax))
    if query is not None:
        qy, qx = divmod(query, cols)
        ax.add_patch(plt.Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if annotate:
        for y in range(rows):
            for x in range(cols):
                ax.text(x, y, fmt.format(grid[y, x].item()), ha="center", va="center", fontsize=7,
                        color=text_colour(grid[y, x], grid.min(), grid.max()))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return image


def save_figure(fig, out_dir: Path, name: str, settings: str, device: str, machine: str | None = None) -> Path:
    """Write the figure as out_dir/name with its settings and hardware printed underneath: this
    machine's, or `machine`, the one its runs were trained on, for a figure drawn again from its JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.text(0.5, -0.01, f"{settings}\n{machine or hardware(device)}", ha="center", va="top", fontsize=7, color="0.35")
    path = out_dir / name
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as err:  # a full disk: one `error:` line, as train.py's
        raise ValueError(f"could not write {path} ({runs.os_reason(err)})") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return path
