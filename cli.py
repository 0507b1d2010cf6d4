"""The command line of every entry point (train.py, plots.py, bench.py, the lessons): one way to fail.

Bad input ends with one line on stderr, `error: <what is wrong>`, and exit code 2; Ctrl-C with one
line and exit code 130; never a traceback. Each entry point parses with `ArgumentParser`, which
raises a ValueError where argparse would print its usage and exit, and runs through `run_command`,
which turns every ValueError (ours, convit's, data.py's, argparse's) into that one line.

A run's configuration (config.py) is a table of dataclass fields, and `flag` is how a field says
what its command-line flag is: its help, the interval its values must lie in, its value in each
preset recipe, and its role (does it define the run, or only how or where this command runs it).
It lives here, at the bottom, because data.py and augment.py declare their own fields with it.

The same goes for the install: torchvision built for another torch fails at import with an
error that names neither (`require_torchvision` makes it one line that names both, and the fix).

Contents: ArgumentParser, one_line, run_command, torch_device, require_torchvision, flag (RUN,
HOW, COMMAND), and the flags of a dataclass: argument_kind, add_flags, check_field, check_range.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import math
import re
import sys

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag raises a ValueError naming it: main() must never
    exit the interpreter (lessons and tests call it in-process), and run_command prints it in one line.
    A flag must be typed whole: argparse would take `--epoch 3` for `--epochs 3` (and `--lr` for
    whichever flag it prefixes), so a typo could silently mean another flag."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise ValueError(f"{message}{self.suggestion(message)} (see {self.prog} --help)")

    def suggestion(self, message: str) -> str:
        """For an unknown flag, the flag it abbreviates or most resembles: ' (did you mean --epochs?)'."""
        if not message.startswith("unrecognized arguments"):
            return ""
        known = [option for option in self._option_string_actions if option.startswith("--")]
        meant = []
        for typed in re.findall(r"(--[\w-]+)", message):
            meant += [option for option in known if option.startswith(typed)] or \
                difflib.get_close_matches(typed, known, n=1)
        return f" (did you mean {' or '.join(dict.fromkeys(meant))}?)" if meant else ""


def one_line(err: Exception, limit: int | None = None) -> str:
    """A bad-input message as one line. An error raised in a data-loading worker reaches us
    wrapped by torch, with the worker's traceback in its text: keep the worker's own message.
    `limit` cuts a long one (a state_dict's list of keys) to that many characters and "..."."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def run_command(entry, argv: list[str] | None = None) -> int:
    """Run entry(argv) as a command-line program and return its exit code: bad input ends with one
    `error: ...` line on stderr and 2, Ctrl-C with one line (what the program says it can continue
    from) and 130. Use: sys.exit(cli.run_command(main))."""
    try:
        result = entry(argv)
    except ValueError as err:  # every module's input errors are ValueErrors
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(str(stop) or "interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0  # a program may report its own exit code (tools/gpu_check.py)


def torch_device(name: str, flag_name: str = "--device") -> torch.device:
    """The torch device called `name` (cpu, cuda, cuda:1, mps), checked to exist on this machine,
    so that a typo or a missing GPU is one clear ValueError (naming the flag) instead of torch's
    error at the first tensor moved there."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag_name} {name!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag_name} {name}, but torch sees no GPU on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag_name} {name}, but this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag_name} {name}, but torch sees no Apple GPU (mps) on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag_name} {name!r}: only cpu, cuda, cuda:N and mps are supported")
    return device


def require_torchvision():
    """Import torchvision, or end the program with one line naming both versions and the fix.

    torchvision's compiled operators are built against one torch: a CUDA torchvision beside a CPU
    torch (two installs from different indexes) fails at import with "operator torchvision::nms
    does not exist", which names neither package. Called before the first torchvision import of
    data.py and augment.py, and by conftest.py before any test."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:
        print(f"error: {torchvision_problem(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def torchvision_problem(err: Exception) -> str:
    """The one line for a torchvision that cannot be imported beside this torch."""
    try:
        installed = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return f"torchvision is not installed (torch {torch.__version__} is): pip install -r requirements.txt"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    version = re.match(r"(\d+)\.(\d+)\.(\d+)", torch.__version__)
    build = torch.__version__.partition("+")[2]  # cpu, cu130 ... (empty: PyPI's default build)
    # torchvision 0.(minor + 15) is the release made for torch 2.minor (0.15 for 2.0 ... 0.29 for 2.14)
    pair = (f"torch=={version[0]} torchvision==0.{int(version[2]) + 15}.{version[3]}" if version and version[1] == "2"
            else "torch torchvision")
    index = f" --index-url https://download.pytorch.org/whl/{build}" if build else ""
    return (f"torch {torch.__version__} and torchvision {installed} are builds that do not work together "
            f"({reason}): install both from one place, e.g. pip install --force-reinstall {pair}{index}")


# ---------------------------------------------------------------------------------------
# A configuration field that is also a flag
# ---------------------------------------------------------------------------------------
# The three roles of a field, which decide what --resume does with it:
RUN = "run"  # it defines what the run computes: --resume takes it from the checkpoint and refuses another value
HOW = "how"  # where and how the run executes (device, threads ...): from the checkpoint unless typed again
COMMAND = "command"  # what this one command does (--resume, --stop-after, --quiet ...): never from the checkpoint


def flag(help: str, default=None, *, interval: str | None = None, choices=None, metavar: str | None = None,
         role: str = RUN, typed: bool = True, **presets):
    """A dataclass field that is a command-line flag of the same name (`--batch-size` for
    batch_size). `interval` is the range its values must lie in, e.g. "(0, 1]" (NaN and inf are
    refused everywhere); `presets` its value in each preset recipe (paper=..., small=...), which
    an unset flag takes; `typed=False` makes a preset-only value with no flag. The type of the
    flag is the field's annotation: int, float, str; bool is a switch, and `bool | None` a
    --x / --no-x pair whose unset value is None."""
    return dataclasses.field(default=default, metadata={
        "help": help, "interval": interval, "choices": choices, "metavar": metavar, "role": role, "typed": typed,
        "presets": presets})


def argument_kind(field: dataclasses.Field) -> dict:
    """argparse's options for a field, from its annotation: a bool is a switch, `bool | None` a
    --x / --no-x pair, int, float and str a value."""
    kind, optional = field.type.split("|")[0].strip(), "None" in field.type
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction if optional else "store_true"}
    options = {"type": {"int": int, "float": float, "str": str}[kind]}
    options.update({key: field.metadata[key] for key in ("choices", "metavar") if field.metadata[key]})
    return options


def add_flags(parser, section) -> None:
    """The flags of a dataclass of cli.flag fields (bench.py's settings), each with its default
    and, in its help, that default."""
    for field in dataclasses.fields(section):
        default = "" if field.default in (None, False) else f" (default {field.default})"
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=field.default,
                            help=(field.metadata["help"] + default).replace("%", "%%"), **argument_kind(field))


def check_field(field: dataclasses.Field, value):
    """Refuse a value outside its field's interval or choices, in one line naming the flag."""
    if value is None:
        return
    if field.metadata["interval"]:
        check_range(field.name, value, field.metadata["interval"])
    choices = field.metadata["choices"]
    if choices and value not in choices:
        raise ValueError(f"--{field.name.replace('_', '-')} {value!r}: choose one of {', '.join(map(str, choices))}")


def check_range(name: str, value, interval: str):
    """Refuse `value` of the field `name` outside `interval` ("[0, 1)", "(0, inf)" ...), in one line."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low or (interval[0] == "[" and value == low)
    below = value < high or (interval[-1] == "]" and value == high)
    if not (math.isfinite(value) and above and below):
        rule = (f"lie in {interval}" if high < math.inf else
                f"be at least {low:g}" if interval.startswith("[") else f"be greater than {low:g}")
        raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {value}")
