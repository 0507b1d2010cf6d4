"""A lesson's command line: the options every lesson shares, the recipe flags of the lessons that
train and the settings of one run they make (run_settings), the folders a lesson writes, --redraw
(a figure drawn again from the JSON of its runs), and one way to fail (cli.run_command: one
`error:` line).

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
QUICK_FOLDER = "convit-lessons-quick"  # --quick writes here, in the system's temporary folder, unless told


def quick_figures() -> Path:
    """Where --quick writes its figures unless --out-dir says otherwise: outside the checkout, so that
    a quick run (CI, the tests) never writes into it; read at each call, so that TMPDIR is honoured."""
    return Path(tempfile.gettempdir()) / QUICK_FOLDER


def lesson_parser(doc: str, script: str, uses_data: bool = False) -> argparse.ArgumentParser:
    """The options every lesson shares. `doc` is the lesson's module docstring, `script` its __file__.

    One CPU thread by default: the lessons' models are too small to gain from a second thread, and
    with one thread per core (torch's default) a run stalls whenever another program wants a core
    (docs/speed.md)."""
    parser = cli.ArgumentParser(prog=f"python lessons/{Path(script).name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a much smaller run (seconds) that still writes every figure, into {QUICK_FOLDER}/ in the "
                             "system's temporary folder unless --out-dir says otherwise; used by CI")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the figures go (default: lessons/figures, the committed ones; "
                             f"with --quick: {QUICK_FOLDER}/ in the temporary folder, so that a quick run never replaces them)")
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
        kind = {**cli.argument_kind(config.FIELDS[field.name]), "metavar": field.name.upper()}  # train.py's type
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
    """Parse the command line, check it (the ranges of train.py's flags of the same names, and the
    network and run they make), apply --threads, and seed torch so that every figure can be made
    again. Every check comes before the first folder is made: a refused lesson writes nothing."""
    import config

    args = parser.parse_args(argv)
    for flag in getattr(parser, "draw_only", ()):
        if getattr(args, flag):
            check_draw_only(parser, args, flag)
    cli.torch_device(args.device)  # a typo or a missing GPU: one ValueError, now
    cli.check_range("threads", args.threads, config.FIELDS["threads"].metadata["interval"])
    if hasattr(args, "recipes"):  # a training lesson: unset recipe flags take the recipe's values
        check_training_flags(args)
    if args.out_dir is None:
        args.out_dir = quick_figures() if args.quick else FIGURES
    # A file in the way, or a read-only disk: one line now, not after training. Made only when
    # written into: a lesson may still refuse its own flags after parse(), and then leaves nothing.
    runs.writable_folder(args.out_dir, "--out-dir", create=False)
    if getattr(args, "run_dir", None) is not None:
        runs.writable_folder(args.run_dir, "--run-dir", create=False)
    if args.quick and args.out_dir == quick_figures():
        print(f"--quick: the figures go to {args.out_dir}", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def redraw_flag(parser: argparse.ArgumentParser, summary: str):
    """--redraw: draw the lesson's figure again from the JSON its finished runs wrote (`summary`),
    training nothing, so that a change of drawing needs no new runs."""
    draw_only_flag(parser, "redraw", f"train nothing: draw the figure again from {summary} in --out-dir (default "
                                     "lessons/figures), with the machine its runs were trained on in the caption; "
                                     "takes no other flag but --out-dir")


def draw_only_flag(parser: argparse.ArgumentParser, name: str, help: str):
    """A flag that trains nothing and only draws from finished runs' JSON (--redraw, lesson 6's
    --ladder). parse() refuses it beside any flag but --out-dir, which it would silently ignore."""
    parser.add_argument(f"--{name}", action="store_true", help=help)
    parser.draw_only = (*getattr(parser, "draw_only", ()), name)


def check_draw_only(parser: argparse.ArgumentParser, args, flag: str):
    """--`flag` trains nothing: any flag but --out-dir would be silently ignored, so it is refused."""
    given = [name for name, value in vars(args).items()
             if name not in (flag, "out_dir") and value != parser.get_default(name)]
    if given:
        raise ValueError(f"--{flag} draws from the JSON of finished runs and trains nothing: "
                         f"drop --{given[0].replace('_', '-')}, or drop --{flag}")


def recorded_flags(parser: argparse.ArgumentParser, summary: dict, out_dir: Path) -> argparse.Namespace:
    """The flags of the command a lesson's JSON records, filled as parse() fills them, with
    `out_dir` for the figure: the configuration of the runs a figure is drawn again from (--redraw).
    Nothing is checked against this machine (its device, its folders): nothing will run."""
    args = parser.parse_args(summary["command"].split()[2:])  # write_summary joined it with spaces
    check_training_flags(args)
    args.out_dir = out_dir
    return args


def check_training_flags(args):
    """A training lesson's flags: the recipe's values where unset, each in train.py's range, a seed
    named once, and the run they make accepted by train.py's own checks (config.resolve: the
    network's shape above all), so that no run fails after the lesson has started writing."""
    import config

    recipe = args.recipes[1] if args.quick else args.recipes[0]
    for field in dataclasses.fields(LessonRecipe):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(recipe, field.name))
        cli.check_range(field.name, getattr(args, field.name), config.FIELDS[field.name].metadata["interval"])
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    args.workers = args.workers or (1 if args.quick else 2)
    if getattr(args, "max_doublings", 0) < 0:
        raise ValueError(f"--max-doublings must be 0 or more, got {args.max_doublings}")
    for flag in ("seeds", "pair_seeds"):  # lesson 11 adds --pair-seeds
        seeds = getattr(args, flag, None) or []
        for seed in seeds:
            cli.check_range(flag, seed, config.FIELDS["seed"].metadata["interval"])
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"--{flag.replace('_', '-')} {' '.join(map(str, seeds))} names a seed twice: its runs "
                             f"would share one folder")
    if args.run_dir is None and not args.quick:
        args.run_dir = args.lesson_run_dir
    config.resolve(run_settings(args, args.run_dir or Path(tempfile.gettempdir()) / "unused"))


def repo_path(path) -> str:
    """`path` as a recorded command should name it: relative to the repository when inside it, so
    that the command runs on any machine from the repository root."""
    absolute = Path(path).resolve()
    return str(absolute.relative_to(REPO_ROOT)) if absolute.is_relative_to(REPO_ROOT) else str(absolute)


def run_settings(args, out_dir: Path, seed: int = 0, **changes) -> dict:
    """The settings (train.py's flags by field name) of one run of the lesson's recipe: `changes`
    (data_fraction, the ablations, model="deit_tiny" ...) replace the recipe's values. Paths are
    relative to the repository root, where train_one runs it.

    With overwrite: a lesson's run folders are its own, and running the lesson again replaces them
    (train.py refuses a folder that holds another run unless told so; its lock still stops two
    lessons writing one folder at once).

    A convit_tiny shrunk to the recipe's C, H and depth, on train.py's image and patch size
    (mnist10k: 28x28 in 4x4 patches, a 7x7 grid). On the 8x8 sklearn digits the image is cut
    into 2x2 patches instead (a 4x4 grid), which keeps each run to seconds."""
    settings = {"dataset": args.dataset, "data_dir": repo_path(args.data_dir), "device": args.device,
                "model": "convit_tiny", "embed_dim": args.embed_dim, "num_heads": args.num_heads, "depth": args.depth,
                "batch_size": args.batch_size, "lr": args.lr, "epochs": args.epochs,
                "warmup_epochs": args.warmup_epochs, "warmup_lr": args.warmup_lr, "randaug_ops": 0, "seed": seed,
                "output_dir": repo_path(out_dir), "overwrite": True, "no_progress": True, "quiet": True}
    if args.threads:
        settings["threads"] = args.threads
    if args.run_dir is None:  # run_folder's temporary folder, removed at the end: a figure there is wasted time
        settings["no_figure"] = True
    if args.dataset == "digits":
        settings.update({"img_size": 8, "patch_size": 2})
    return {**settings, **changes}


@contextmanager
def run_folder(args):
    """Where train.py should write: --run-dir, or with --quick (and no --run-dir) a temporary
    folder removed afterwards, whose runs draw no figure.png (run_settings:
    --no-figure). parse() leaves --run-dir unset only in that case."""
    if args.run_dir is not None:
        yield args.run_dir
        return
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(scratch)
