"""Lesson 14: does the paper's augmentation make our SA layers local, and our gates close?

One of lesson 13's questions at a time (its file holds the machinery and says how a change is
judged): lesson 11's recipe on MNIST-10k, DeiT and ConViT, seeds 0 and 1, with and without

  RandAugment   the paper's 2 ops at magnitude 9 (std 0.5), drawn from the digits' 11 ops (the
                other 4 make a digit another digit: docs/digits_recipe.md)
  MixUp/CutMix  the paper's MixUp 0.8 / CutMix 1.0

The runs without a change, and the seed-0 MixUp/CutMix runs, are lesson 11's: they are read from
its committed JSON, not trained again.

Outputs (in --out-dir):
  14_augmentation_and_locality.png   one row per question: DeiT's pull below uniform attention per
                                     block (Fig. 5 left, nonlocality), ConViT's gate per GPSA block (Fig. 6)
  14_augmentation_and_locality.json  every run's train.py command, top-1, and per epoch its
                                     nonlocality and gates per block and head

Run from the repository root:  python lessons/14_augmentation_and_locality.py [--quick] [--questions ...]
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import cli  # noqa: E402

lesson13 = importlib.import_module("lessons.13_what_makes_attention_local")  # the questions' machinery

LESSON = lesson13.Part(14, "14_augmentation_and_locality", ("RandAugment", "MixUp/CutMix"),
                       ("11_locality_over_training.json",))


def main(argv=None):
    return lesson13.main(argv, LESSON, __doc__, __file__)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
