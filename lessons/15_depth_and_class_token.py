"""Lesson 15: do the paper's depth, or a head without the class token, make our gates close?

One of lesson 13's questions at a time (its file holds the machinery and says how a change is
judged): lesson 11's recipe on MNIST-10k, ConViT only (the question is its gates), seeds 0 and 1,
with and without

  depth         12 blocks, 10 of them GPSA (the paper's), then 2 MHSA blocks, against 4 + 2
  class token   a head that reads the mean of the patch tokens (no class token), 2 MHSA blocks
                still on top

The runs without a change, and the seed-0 mean-headed run, are lesson 11's: they are read from its
committed JSON, not trained again.

Outputs (in --out-dir):
  15_depth_and_class_token.png   one row per question: ConViT's gate per GPSA block (Fig. 6)
  15_depth_and_class_token.json  every run's train.py command, top-1, and per epoch its
                                 nonlocality and gates per block and head

Run from the repository root:  python lessons/15_depth_and_class_token.py [--quick] [--questions ...]
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import cli  # noqa: E402

lesson13 = importlib.import_module("lessons.13_what_makes_attention_local")  # the questions' machinery

LESSON = lesson13.Part(15, "15_depth_and_class_token", ("depth", "class token"), ("11_locality_over_training.json",))


def main(argv=None):
    return lesson13.main(argv, LESSON, __doc__, __file__)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
