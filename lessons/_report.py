"""What a lesson reports beside its figures: the machine it ran on, how long it took, its numbers
as JSON with the command that made them, and the two ways the texts quote a set of seeds."""

from __future__ import annotations

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


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def cell(values: list[float]) -> str:
    """'86.9', or with several seeds '87.5 (85.8-89.7)': the mean and the range."""
    return f"{mean(values):.1f}" + (f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else "")
