"""Lesson 16: does ImageNet's 14x14 grid make our SA layers local, and our gates close?

One of lesson 13's questions (its file holds the machinery and says how a change is judged):
lesson 11's recipe on MNIST-10k, DeiT and ConViT, seeds 0 and 1, on a 14x14 grid of 2x2 patches
(196 tokens, ImageNet's grid at 224 / 16) against the 7x7 grid of 4x4 patches (49 tokens). Both
train on half of the training set, so that the 14x14 runs fit: each takes about 20 minutes on one
thread, 5x a 7x7 run on the same data. They are evaluated every 2nd epoch, which saves a tenth of
that and changes no weight. The 7x7 runs are lesson 13's (its data question), read from its
committed JSON.

Outputs (in --out-dir):
  16_the_grid.png   DeiT's pull below uniform attention per block (Fig. 5 left, nonlocality), on
                    either grid, and ConViT's gate per GPSA block (Fig. 6)
  16_the_grid.json  every run's train.py command, top-1, and per epoch its nonlocality and gates
                    per block and head

Run from the repository root:  python lessons/16_the_grid.py [--quick]
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import cli  # noqa: E402

lesson13 = importlib.import_module("lessons.13_what_makes_attention_local")  # the questions' machinery

LESSON = lesson13.Part(16, "16_the_grid", ("grid",),
                       ("11_locality_over_training.json", "13_what_makes_attention_local.json"))


def main(argv=None):
    return lesson13.main(argv, LESSON, __doc__, __file__)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
