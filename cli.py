"""The command line of every entry point (train.py, plots.py, bench.py, the lessons): one way to fail.

Bad input ends with one line on stderr, `error: <what is wrong>`, and exit code 2; Ctrl-C with one
line and exit code 130; never a traceback. Each entry point parses with `ArgumentParser`, which
raises a ValueError where argparse would print its usage and exit, and runs through `run_command`,
which turns every ValueError (ours, convit's, data.py's, argparse's) into that one line.

A run's configuration (config.py) is a table of dataclass fields, and `flag` is how a field says
what its command-line flag is: its help, the interval its values must lie in, its value in each
preset recipe, and its role (does it define the run, or only how or where this command runs it).
It lives here, at the bottom, because data.py and augment.py declare their own fields with it.

Contents: ArgumentParser, one_line, run_command, torch_device, flag (RUN, HOW, COMMAND), check_range.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag raises a ValueError naming it: main() must never
    exit the interpreter (lessons and tests call it in-process), and run_command prints it in one line."""

    def error(self, message):
        raise ValueError(f"{message} (see {self.prog} --help)")


def one_line(err: Exception) -> str:
    """A bad-input message as one line. An error raised in a data-loading worker reaches us
    wrapped by torch, with the worker's traceback in its text: keep the worker's own message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


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


def check_range(name: str, value, interval: str):
    """Refuse `value` of the field `name` outside `interval` ("[0, 1)", "(0, inf)" ...), in one line."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low or (interval[0] == "[" and value == low)
    below = value < high or (interval[-1] == "]" and value == high)
    if not (math.isfinite(value) and above and below):
        rule = (f"lie in {interval}" if high < math.inf else
                f"be at least {low:g}" if interval.startswith("[") else f"be greater than {low:g}")
        raise ValueError(f"--{name.replace('_', '-')} must {rule}, got {value}")
