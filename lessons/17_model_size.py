"""Lesson 17: do larger models keep more locality? The paper's SM D, at our scale.

The paper trains ConViT at three sizes, Ti, S and B (4, 9 and 16 heads of width 48), and finds
that the larger the model, the more nonlocal its first layers end (Fig. 13), and the more of its
GPSA layers keep attending to position: Ti up to layer 4, S up to 5, B up to 6 (Fig. 14). One of
lesson 13's questions at a time (its file holds the machinery and says how a change is judged):
lesson 11's recipe on MNIST-10k, ConViT only, seeds 0 and 1, with its 4 heads of width 12 against

  9 heads     108 wide: ConViT-S's heads at our head width
  16 heads    192 wide: ConViT-B's heads

The 4-headed runs are lesson 11's: they are read from its committed JSON, not trained again.
The 16-headed runs are the slow ones (about 2 min an epoch on one core, against 1 min at 9 heads
and 20 s at 4), so the lesson takes about an hour on our 2 cores.

Outputs (in --out-dir):
  17_model_size.png   one row per size: ConViT's nonlocality per block as its pull below uniform
                      attention (Fig. 13) and its gate per GPSA block (Fig. 14, as Fig. 6)
  17_model_size.json  every run's train.py command, top-1, and per epoch its nonlocality and
                      gates per block and head

Run from the repository root:  python lessons/17_model_size.py [--quick] [--questions ...]
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import cli  # noqa: E402

lesson13 = importlib.import_module("lessons.13_what_makes_attention_local")  # the questions' machinery

LESSON = lesson13.Part(17, "17_model_size", ("9 heads", "16 heads"), ("11_locality_over_training.json",),
                       convit_nonlocality=True)


def main(argv=None):
    return lesson13.main(argv, LESSON, __doc__, __file__)


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
