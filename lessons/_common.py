"""Plumbing shared by the lessons: the command line, sample images, drawing, saving figures.

Nothing about ConViT itself lives here; every lesson takes the model from convit.py (and the
training loop from train.py). This file only keeps the seven scripts from repeating the same
argparse lines, image loading and figure captions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to PNG files; no display is needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from einops import rearrange  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # convit.py and train.py live in the repository root
import convit  # noqa: E402  (train.py and data.py are imported where needed: they pull in torchvision)

FIGURES = REPO_ROOT / "lessons" / "figures"


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
class LessonArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # Instead of argparse's usage block and sys.exit(2): one ValueError, which cli() below
        # reports as one `error: ...` line, as train.py does.
        raise ValueError(f"{message} (see --help)")


def cli(main, argv=None) -> int:
    """A lesson's command-line entry, the same error path as train.py's: bad input (a missing
    data set, a device that is not there, a flag out of range) ends with one `error: ...` line
    and exit code 2, Ctrl-C with one line and 130, never a traceback. Use: sys.exit(cli(main))."""
    import train  # imported here, not at the top: it pulls in torchvision

    return train.run_reporting_errors(main, argv)


def lesson_parser(doc: str, uses_data: bool = False) -> argparse.ArgumentParser:
    """The options every lesson shares. `doc` is the lesson's module docstring.

    One CPU thread by default: the lessons' models are small, and torch's default of one thread
    per core collapses when another process wants the same cores (on our shared 2-core machine
    a training run fell from 1,660 to 20-50 images/s with 2 threads; with 1 it kept its speed)."""
    parser = LessonArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run (seconds) that still writes every figure; used by CI")
    parser.add_argument("--out-dir", type=Path, default=FIGURES, help="where the PNG figures go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1; 0 = torch's default, one per core)")
    if uses_data:
        import data  # train.py's datasets (it pulls in torchvision, so it is imported only here)

        parser.add_argument("--dataset", default="digits", choices=list(data.DATASETS),
                            help="digits = scikit-learn's 8x8 handwritten digits, bundled, no download")
        parser.add_argument("--data-dir", default="data",
                            help="root of CIFAR or of an ImageFolder with train/ and val/ (see train.py)")
    return parser


def training_parser(doc: str, lesson: str, epochs: int, quick_epochs: int) -> argparse.ArgumentParser:
    """lesson_parser plus what a lesson that trains through train.py needs."""
    parser = lesson_parser(doc, uses_data=True)
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs on the full training set (default {epochs}; with --quick {quick_epochs})")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "lessons" / lesson,
                        help="where train.py writes metrics.jsonl and checkpoints (with --quick: a temporary folder)")
    parser.set_defaults(default_epochs=(epochs, quick_epochs))
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the command line, apply --threads, and seed torch so that every figure can be made again."""
    args = parser.parse_args(argv)
    convit.torch_device(args.device, "--device")  # a typo or a missing GPU: one ValueError, now
    if args.threads < 0:
        raise ValueError(f"--threads must be at least 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "epochs", 0) is None:
        args.epochs = args.default_epochs[1] if args.quick else args.default_epochs[0]
    torch.manual_seed(0)
    return args


@contextmanager
def run_folder(args):
    """Where train.py should write: --run-dir, or with --quick a temporary folder removed afterwards."""
    if not args.quick:
        yield args.run_dir
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)


def hardware(device: str) -> str:
    """One line naming the machine, for the caption under every figure."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch on {threads} thread{'s' * (threads > 1)}, torch {torch.__version__}"


class Stopwatch:
    """Prints how long the whole lesson took, so that README's timings can be checked."""

    def __init__(self, name: str):
        self.name, self.start = name, time.perf_counter()

    def done(self):
        print(f"[{self.name}] finished in {time.perf_counter() - self.start:.1f} s")


def head_looking_at(num_heads: int, dx: float, dy: float) -> int:
    """The head whose kernel centre Delta_h (convit.kernel_centres) is the offset (dx, dy)."""
    matches = (convit.kernel_centres(num_heads) == torch.tensor([dx, dy])).all(dim=1)
    return int(matches.nonzero())


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------
def sample_images(dataset: str, count: int, img_size: int, data_dir: str = "data", seed: int = 0) -> torch.Tensor:
    """`count` validation images of `dataset`, exactly as train.py feeds them to a model
    (resized to img_size x img_size and normalised by its evaluation transform).

    digits: scikit-learn's 8x8 handwritten digits (real data, bundled, nothing downloaded).
    Returns (count, channels, img_size, img_size); channels is 1 for digits, 3 otherwise.
    """
    import data
    import train  # resolves the flags as a training run would; the images come from data.py

    argv = ["--dataset", dataset, "--data-dir", str(data_dir), "--img-size", str(img_size)]
    _, val_set, _ = data.build_datasets(train.resolve_args(train.build_parser().parse_args(argv)))
    picked = torch.randperm(len(val_set), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    return torch.stack([val_set[i][0] for i in picked])


def in_chans(dataset: str) -> int:
    """Colour channels of train.py's `dataset` (1 for digits, 3 for the others)."""
    import data

    return data.DATASETS[dataset].in_chans


# ---------------------------------------------------------------------------------------
# Training (lessons 5 and 6): one small recipe, through train.main
# ---------------------------------------------------------------------------------------
def train_small(args, out_dir: Path, epochs: int, *flags: str, warmup: int = 1, seed: int = 0, quiet: bool = True):
    """Train a small convit_tiny through train.main and return (final metrics, per-epoch records).

    The recipe of the lessons: width 32 (4 heads of 8), batch 32, peak lr --lr, `warmup`
    epochs of warmup, no RandAugment; `flags` add to it (--depth, --data-fraction,
    the ablations ...). On digits the 8x8 image is cut into 2x2 patches: a 4x4 grid of 16
    tokens, which is what lets each run finish in seconds on a CPU. Other datasets keep
    train.py's image and patch sizes."""
    import train

    argv = ["--dataset", args.dataset, "--data-dir", str(args.data_dir), "--device", args.device,
            "--model", "convit_tiny", "--embed-dim", "32", "--batch-size", "32", "--lr", str(args.lr),
            "--epochs", str(epochs), "--warmup-epochs", str(warmup), "--randaug-ops", "0", "--seed", str(seed),
            "--output-dir", str(out_dir), "--no-progress", *(["--quiet"] if quiet else [])]
    if args.dataset == "digits":
        argv += ["--img-size", "8", "--patch-size", "2"]
    result = train.main(argv + list(flags))
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return result, records


# ---------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------
def draw_map(ax, values: torch.Tensor, rows: int, cols: int, title: str = "", query: int | None = None,
             cmap: str = "viridis", vmin=None, vmax=None, annotate: bool = False, fmt: str = "{:.0f}",
             gamma: float = 1.0):
    """Draw one row of an attention matrix (N,) as the rows x cols patch grid it lives on.
    `query` (a token index) is marked with a red square: the patch that is looking.
    gamma < 1 stretches the colour scale near zero, so that small weights stay visible."""
    grid = rearrange(values.detach().float().cpu(), "(rows cols) -> rows cols", rows=rows, cols=cols)
    if gamma == 1.0:
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax)
    else:
        image = ax.imshow(grid, cmap=cmap, norm=matplotlib.colors.PowerNorm(gamma, vmin=vmin, vmax=vmax))
    if query is not None:
        qy, qx = divmod(query, cols)
        ax.add_patch(plt.Rectangle((qx - 0.5, qy - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    if annotate:
        middle = (grid.max() + grid.min()) / 2
        for y in range(rows):
            for x in range(cols):
                ax.text(x, y, fmt.format(grid[y, x].item()), ha="center", va="center", fontsize=7,
                        color="black" if grid[y, x] > middle else "white")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return image


def save_figure(fig, out_dir: Path, name: str, settings: str, device: str) -> Path:
    """Write the figure as out_dir/name with its settings and hardware printed underneath."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.text(0.5, -0.01, f"{settings}\n{hardware(device)}", ha="center", va="top", fontsize=7, color="0.35")
    path = out_dir / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path
