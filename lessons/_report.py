"""What a lesson reports beside its figures: the machine it ran on, how long it took, its numbers
as JSON with the command that made them, and the two ways the texts quote a set of seeds."""

from __future__ import annotations

import collections
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


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


def trained_on(results, device: str) -> str:
    """The machines that trained a figure's runs, with how many each: a run read from the records
    names its own (or its file's), a run trained or read back here ran on this one."""
    machines = collections.Counter(
        (r.get("hardware") or "a machine its record does not name") if r.get("read_from") else hardware(device)
        for r in results)
    return "runs trained on: " + "; ".join(f"{machine} ({n})" for machine, n in sorted(machines.items()))


def print_same_commands(what: tuple[str, str], pairs: list[dict], seeds: list[list[float]]):
    """pairs: one train.py command's top-1 on two machines each ({"name", "seed", "first": {"machine",
    "top1"}, "second": ...}; `what` says where each column comes from), printed side by side with how
    far they differ, beside how far two seeds of one setting differ (seeds: each setting's top-1s).
    One-thread CPU runs are deterministic on one kind of CPU, not across two: this says by how much
    two of ours part."""
    if not pairs:
        return
    print("\nThe same train.py command on two machines: " + "; ".join(
        f"{label}, on {' and '.join(sorted({pair[column]['machine'] for pair in pairs}))}"
        for label, column in zip(what, ("first", "second"))))
    print(f"| setting | seed | {what[0]} | {what[1]} | difference |\n|---|---|---|---|---|")
    for pair in pairs:
        first, second = pair["first"]["top1"], pair["second"]["top1"]
        print(f"| {pair['name']} | {pair['seed']} | {first:.2f} | {second:.2f} | {second - first:+.2f} |")
    gaps = [abs(pair["first"]["top1"] - pair["second"]["top1"]) for pair in pairs]
    apart = [abs(a - b) for top1 in seeds for i, a in enumerate(top1) for b in top1[i + 1:]]
    print(f"{len(pairs)} commands: they differ by {mean(gaps):.2f} points of top-1 on average, at most "
          f"{max(gaps):.2f}; {sum(g == 0 for g in gaps)} give the same top-1. Two seeds of one setting differ by "
          f"{mean(apart):.2f} on average, at most {max(apart):.2f}.")


class Stopwatch:
    """Prints how long the whole lesson took, so that README's timings can be checked."""

    def __init__(self, name: str):
        self.name, self.start = name, time.perf_counter()

    def done(self):
        print(f"[{self.name}] finished in {time.perf_counter() - self.start:.1f} s")


def write_summary(args, lesson_file: str, name: str, clock: Stopwatch, argv, indent: int | None = 1,
                  **fields) -> Path:
    """A lesson's numbers as JSON beside its figures (--out-dir/name): the command that ran the
    lesson, the hardware and how long it took, then `fields`, so that its text can be checked
    against them and every number run again."""
    command = " ".join(["python", f"lessons/{Path(lesson_file).name}", *(sys.argv[1:] if argv is None else argv)])
    summary = {"command": command, "hardware": hardware(args.device),
               "seconds": round(time.perf_counter() - clock.start, 1), **fields}
    path = Path(args.out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=indent) + "\n")
    print(f"wrote {path}")
    return path


def read_summary(path: Path) -> dict:
    """A lesson's JSON as write_summary wrote it, to draw its figure again (--redraw); one line
    if it is missing or holds no lesson's runs. json never runs code."""
    try:
        summary = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--redraw: there is no {path}; run the lesson without --redraw first, "
                         "or give --out-dir the folder that holds its JSON") from None
    except (OSError, ValueError) as err:  # unreadable, or not JSON (json's error is a ValueError)
        raise ValueError(f"--redraw: cannot read {path} ({err})") from None
    missing = [key for key in ("command", "hardware", "settings", "seeds", "runs")
               if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise ValueError(f"--redraw: {path} is not a lesson's JSON with its runs (no {', '.join(missing)})")
    return summary


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def cell(values: list[float], digits: int = 1) -> str:
    """'86.9', or with several seeds '87.5 (85.8-89.7)': the mean and the range, to `digits` decimals;
    '0.10 (-0.35 to 0.35)' where the range starts below zero, so that no minus sign reads as a dash."""
    if len(values) == 1:
        return f"{mean(values):.{digits}f}"
    low, high = min(values), max(values)
    return f"{mean(values):.{digits}f} ({low:.{digits}f}{' to ' if low < 0 else '-'}{high:.{digits}f})"
