"""A lesson's command line: the options every lesson shares, the recipe flags of the lessons that
train, the folders a lesson writes, and one way to fail (cli.run_command: one `error:` line).

Every lesson runs as `python lessons/NN_name.py [--quick]` and ends with sys.exit(cli.run_command(main)).
Its flags are checked as train.py checks its own: a recipe flag (--epochs, --lr ...) against the
range config.py gives the train.py flag of the same name, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # convit.py, train.py and the rest live in the repository root
import cli  # noqa: E402
import runs  # noqa: E402

FIGURES = REPO_ROOT / "lessons" / "figures"  # the committed figures: only default runs write here
QUICK_FIGURES = REPO_ROOT / "runs" / "lessons-quick"  # where --quick writes unless told (runs/ is ignored by git)


def lesson_parser(doc: str, script: str, uses_data: bool = False) -> argparse.ArgumentParser:
    """The options every lesson shares. `doc` is the lesson's module docstring, `script` its __file__.

    One CPU thread by default: the lessons' models are too small to gain from a second thread, and
    with one thread per core (torch's default) a run stalls whenever another program wants a core
    (docs/speed.md)."""
    parser = cli.ArgumentParser(prog=f"python lessons/{Path(script).name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
        import data  # it pulls in torchvision, so it is imported only here

        parser.add_argument("--dataset", default="digits", choices=list(data.DATASETS),
                            help="; ".join(f"{name}: {spec.about}" for name, spec in data.DATASETS.items()))
        parser.add_argument("--data-dir", default="data",
                            help="root of CIFAR or of an ImageFolder with train/ and val/ (see train.py)")
    return parser


@dataclass(frozen=True)
class LessonRecipe:
    """The light recipe a lesson that trains uses: train.py's flags of the same names, so that a
    CPU run fits in minutes. Everything else is train.py's small preset (AdamW, weight decay 0.05,
    label smoothing 0.1, cosine to 1e-5, crops of 50-100% of the image; the digits, 80-100%), with no
    RandAugment."""

    epochs: int  # epochs on the full training set; a fraction f trains epochs / f (lesson 6)
    embed_dim: int  # C
    num_heads: int  # H: 4 heads mimic a 2x2 kernel, 9 a 3x3 one
    depth: int  # blocks; a ConViT makes all but the last two GPSA
    batch_size: int
    lr: float  # peak learning rate
    warmup_epochs: int  # linear warmup (train.py steps its schedule once per epoch, as DeiT does) ...
    warmup_lr: float  # ... from this lr (a whole epoch at train.py's 1e-6 would be lost to a short run)


def training_parser(doc: str, script: str, recipe: LessonRecipe, quick: LessonRecipe) -> argparse.ArgumentParser:
    """lesson_parser plus what a lesson that trains through train.py needs: the recipe's flags
    (unset: the recipe's value, or with --quick the quick one's), --workers and --run-dir."""
    import config

    lesson = Path(script).name[:2]
    parser = lesson_parser(doc, script, uses_data=True)
    parser.set_defaults(dataset="mnist10k")  # real 28x28 digits, shipped in data/: a 7x7 grid of patches
    for field in dataclasses.fields(LessonRecipe):
        kind = {**config.argument_kind(config.FIELDS[field.name]), "metavar": field.name.upper()}  # train.py's type
        parser.add_argument("--" + field.name.replace("_", "-"), default=None, **kind,
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
    """Parse the command line, check it (the ranges of train.py's flags of the same names), apply
    --threads, and seed torch so that every figure can be made again."""
    import config

    args = parser.parse_args(argv)
    cli.torch_device(args.device)  # a typo or a missing GPU: one ValueError, now
    cli.check_range("threads", args.threads, config.FIELDS["threads"].metadata["interval"])
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
            cli.check_range(field.name, getattr(args, field.name), config.FIELDS[field.name].metadata["interval"])
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
    folder removed afterwards, whose runs draw no figure.png (lessons._training.run_settings:
    --no-figure). parse() leaves --run-dir unset only in that case."""
    if args.run_dir is not None:
        yield args.run_dir
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)
