"""Plumbing shared by the lessons: the command line, sample images, drawing, saving figures.

Nothing about ConViT itself lives here; every lesson takes the model from convit.py (and the
training loop from train.py). This file only keeps the seven scripts from repeating the same
argparse lines, image loading and figure captions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
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
import runs  # noqa: E402

FIGURES = REPO_ROOT / "lessons" / "figures"  # the committed figures: only default runs write here
QUICK_FIGURES = REPO_ROOT / "runs" / "lessons-quick"  # where --quick writes unless told (runs/ is ignored by git)


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

    One CPU thread by default: the lessons' models are too small to gain from a second thread, and
    with one thread per core (torch's default) a run stalls whenever another program wants a core
    (docs/speed.md)."""
    parser = LessonArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run (seconds) that still writes every figure, into runs/lessons-quick/ "
                             "unless --out-dir says otherwise; used by CI")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the figures go (default: lessons/figures, the committed ones; "
                             "with --quick: runs/lessons-quick, so that a quick run never replaces them)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1; 0 = torch's default, one per core)")
    if uses_data:
        import data  # train.py's datasets (it pulls in torchvision, so it is imported only here)

        parser.add_argument("--dataset", default="digits", choices=list(data.DATASETS),
                            help="digits = scikit-learn's 8x8 handwritten digits (the default of lessons 2 and 4); "
                                 "mnist10k = 10,000 real 28x28 MNIST digits shipped in data/ (lessons 5 and 6); "
                                 "both offline")
        parser.add_argument("--data-dir", default="data",
                            help="root of CIFAR or of an ImageFolder with train/ and val/ (see train.py)")
    return parser


@dataclass(frozen=True)
class LessonRecipe:
    """The light recipe lessons 5 and 6 train with: train.py's flags of the same names, so that
    a CPU run fits in minutes. Everything else is train.py's small preset (AdamW, weight decay
    0.05, label smoothing 0.1, cosine to 1e-5, crops of 50-100% of the image), with no RandAugment."""

    epochs: int  # epochs on the full training set; a fraction f trains epochs / f (lesson 6)
    embed_dim: int  # C
    num_heads: int  # H: 4 heads mimic a 2x2 kernel, 9 a 3x3 one
    depth: int  # blocks; a ConViT makes all but the last two GPSA
    batch_size: int
    lr: float  # peak learning rate
    warmup_epochs: int  # linear warmup (train.py steps its schedule once per epoch, as DeiT does) ...
    warmup_lr: float  # ... from this lr (a whole epoch at train.py's 1e-6 would be lost to a short run)


def training_parser(doc: str, lesson: str, recipe: LessonRecipe, quick: LessonRecipe) -> argparse.ArgumentParser:
    """lesson_parser plus what a lesson that trains through train.py needs: the recipe's
    flags (unset: the recipe's value, or with --quick the quick one's), --workers, --run-dir."""
    parser = lesson_parser(doc, uses_data=True)
    parser.set_defaults(dataset="mnist10k")  # real 28x28 digits, shipped in data/: a 7x7 grid of patches
    for field in dataclasses.fields(LessonRecipe):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(recipe, field.name)), default=None, metavar=field.name.upper(),
                            help=f"default {getattr(recipe, field.name)} (--quick: {getattr(quick, field.name)})")
    parser.add_argument("--workers", type=int, default=None,
                        help="training runs at once, each a process with --threads threads "
                             "(default 2, one per core of our machine; --quick: 1, in this process)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help=f"where train.py writes each run's folder (default: runs/lessons/{lesson}; with --quick: "
                             "a temporary folder, removed afterwards). Re-running the lesson replaces its runs there")
    parser.set_defaults(recipes=(recipe, quick), lesson_run_dir=REPO_ROOT / "runs" / "lessons" / lesson)
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the command line, apply --threads, and seed torch so that every figure can be made again."""
    args = parser.parse_args(argv)
    convit.torch_device(args.device, "--device")  # a typo or a missing GPU: one ValueError, now
    if args.threads < 0:
        raise ValueError(f"--threads must be at least 0, got {args.threads}")
    if args.out_dir is None:
        args.out_dir = QUICK_FIGURES if args.quick else FIGURES
    runs.writable_folder(args.out_dir, "--out-dir")  # a file, or a read-only disk: one line now, not after training
    if args.threads:
        torch.set_num_threads(args.threads)
    if hasattr(args, "recipes"):  # a training lesson: unset recipe flags take the recipe's values
        recipe = args.recipes[1] if args.quick else args.recipes[0]
        for field in dataclasses.fields(LessonRecipe):
            if getattr(args, field.name) is None:
                setattr(args, field.name, getattr(recipe, field.name))
        args.workers = args.workers or (1 if args.quick else 2)
        if args.run_dir is None and not args.quick:
            args.run_dir = args.lesson_run_dir
        if args.run_dir is not None:
            runs.writable_folder(args.run_dir, "--run-dir")
    torch.manual_seed(0)
    return args


@contextmanager
def run_folder(args):
    """Where train.py should write: --run-dir, or with --quick (and no --run-dir) a temporary
    folder removed afterwards, whose runs draw no figure.png (train_argv: --no-figure). parse()
    leaves --run-dir unset only in that case."""
    if args.run_dir is not None:
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


def write_summary(args, lesson_file: str, name: str, clock: "Stopwatch", argv, indent: int | None = 1,
                  **fields) -> Path:
    """A lesson's numbers as JSON beside its figures (--out-dir/name): the command that ran the
    lesson, the hardware and how long it took, then `fields`, so that its text can be checked
    against them and every number run again."""
    command = " ".join(["python", f"lessons/{Path(lesson_file).name}", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "hardware": hardware(args.device),
               "seconds": round(time.perf_counter() - clock.start, 1), **fields}
    path = Path(args.out_dir) / name
    path.write_text(json.dumps(summary, indent=indent) + "\n")
    print(f"wrote {path}")
    return path


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
# Training (lessons 5 and 6): train.main with the lesson's recipe, several runs at once
# ---------------------------------------------------------------------------------------
def repo_path(path) -> str:
    """`path` as a recorded command should name it: relative to the repository when inside it, so
    that the command runs on any machine from the repository root."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(REPO_ROOT)) if absolute.is_relative_to(REPO_ROOT) else str(absolute)


def train_argv(args, out_dir: Path, *flags: str, seed: int = 0) -> list[str]:
    """train.py's command line for one run of the lesson's recipe, each flag once: a flag in
    `flags` (--data-fraction, the ablations, --model deit_tiny ...) replaces the recipe's value.
    Paths are relative to the repository root, where train_one runs it.

    With --overwrite: a lesson's run folders are its own, and running the lesson again replaces
    them (train.py refuses a folder that holds another run unless told so; its lock still stops
    two lessons writing one folder at once).

    A convit_tiny shrunk to the recipe's C, H and depth, on train.py's image and patch size
    (mnist10k: 28x28 in 4x4 patches, a 7x7 grid). On the 8x8 sklearn digits the image is cut
    into 2x2 patches instead (a 4x4 grid), which keeps each run to seconds."""
    options = {"--dataset": args.dataset, "--data-dir": repo_path(args.data_dir), "--device": args.device,
               "--model": "convit_tiny", "--embed-dim": args.embed_dim, "--num-heads": args.num_heads,
               "--depth": args.depth, "--batch-size": args.batch_size, "--lr": args.lr, "--epochs": args.epochs,
               "--warmup-epochs": args.warmup_epochs, "--warmup-lr": args.warmup_lr, "--randaug-ops": 0,
               "--seed": seed, "--output-dir": repo_path(out_dir), "--overwrite": None, "--no-progress": None, "--quiet": None}
    if args.threads:
        options["--threads"] = args.threads
    if args.run_dir is None:  # run_folder's temporary folder, removed at the end: a figure there is wasted time
        options["--no-figure"] = None
    if args.dataset == "digits":
        options.update({"--img-size": 8, "--patch-size": 2})
    tokens = list(flags)
    for i, token in enumerate(tokens):
        if token.startswith("--"):  # a switch, or a flag whose value follows it
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            options[token] = tokens[i + 1] if has_value else None
    return [str(item) for flag, value in options.items() for item in ((flag,) if value is None else (flag, value))]


def command_line(argv: list[str]) -> str:
    """The shell command that repeats a run of train_argv, from the repository root."""
    return " ".join(["python", "train.py", *(shlex.quote(a) for a in argv)])


# The protocol's test that a run was trained to the end: its best top-1 over the last quarter
# of its evaluations is less than this many points above its best top-1 before them.
CONVERGED_WITHIN = 0.5


def convergence(records: list[dict]) -> dict:
    """How much the last quarter of a run's evaluations added to its best top-1, and whether
    that is under CONVERGED_WITHIN points (None: fewer than 4 evaluations, too few to judge)."""
    top1 = [r["val_top1"] for r in records if "val_top1" in r]
    if len(top1) < 4:
        return {"last_quarter_gain": None, "converged": None}
    last = max(1, len(top1) // 4)
    gain = max(top1[-last:]) - max(top1[:-last])
    return {"last_quarter_gain": round(gain, 2), "converged": gain < CONVERGED_WITHIN}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def cell(values: list[float]) -> str:
    """'86.9', or with several seeds '87.5 (85.8-89.7)': the mean and the range."""
    return f"{mean(values):.1f}" + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")


@contextmanager
def at_repository_root():
    """Run train.py's commands where their recorded paths start: the repository root."""
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


def train_one(argv: list[str]) -> dict:
    """One train.main run, from the repository root (the argv's paths are relative to it);
    returns its final scores, its parameter count, its wall-clock and CPU seconds, every
    evaluation's metrics and its convergence (not the model: results travel between processes)."""
    import train

    start, cpu_start = time.perf_counter(), time.process_time()
    with at_repository_root():
        result = train.main(argv)
        records = runs.read_metrics(result["output_dir"])
    return {"val_top1": result["val_top1"], "val_top5": result["val_top5"], "val_loss": result["val_loss"],
            "parameters": convit.count_parameters(result["model"]), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "records": records, **convergence(records)}


def run_parallel(function, items: list, workers: int, threads: int, done=None) -> list:
    """[function(item) for item in items], `workers` at a time, each in its own process with
    torch on `threads` threads; `done(item, result)` is called as each one finishes.

    Small models gain little from a second thread, and two one-thread processes on two cores
    keep both busy without fighting over them. Processes are spawned, not forked (a forked copy
    of a process that has started torch's thread pool can hang). With workers <= 1, runs here."""
    results = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for i, item in enumerate(items):
            results[i] = function(item)
            if done:
                done(item, results[i])
        return results
    jobs = [(function, threads, item) for item in items]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        for i, result in pool.imap_unordered(_run_job, list(enumerate(jobs))):
            results[i] = result
            if done:
                done(items[i], result)
    return results


def _run_job(numbered_job):
    """In a worker process: set torch's threads, run one job, return it with its index."""
    index, (function, threads, item) = numbered_job
    if threads:
        torch.set_num_threads(threads)
    return index, function(item)


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
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as err:  # a full disk: one `error:` line, as train.py's
        raise ValueError(f"could not write {path} ({runs.os_reason(err)})") from None
    finally:
        plt.close(fig)
    print(f"wrote {path}")
    return path
