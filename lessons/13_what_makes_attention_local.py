"""Lesson 13: what would make our SA layers local, and our gates close? Longer training, and less data.

Lesson 11 trained DeiT and ConViT on MNIST-10k (a 7x7 grid, 20 epochs) and found the nonlocality of
DeiT's blocks only a little below uniform attention (Fig. 5 left, nonlocality), and ConViT's gates
rising (Fig. 6), where the paper's fall to 0 in layers 6-10. The issue behind it names what could
make the difference. Each is one change to lesson 11's recipe, trained for DeiT and ConViT (or
ConViT alone where only the gates are in question), seeds 0 and 1, and compared with the runs
without it. Lessons 13 to 17 share this file's machinery; each asks what fits in 45 minutes
(lesson 17: an hour):

  13  length        40 epochs, against lesson 11's 20
      data          50% of the training set, against all of it
  14  RandAugment   the paper's 2 ops at magnitude 9 (std 0.5), drawn from the digits' 11 ops (the
                    other 4 make a digit another digit: docs/digits_recipe.md), against none
      MixUp/CutMix  the paper's 0.8 / 1.0, against none
  15  depth         ConViT with 10 GPSA blocks, the paper's, then 2 MHSA blocks (12 in all), against 4 + 2
      class token   ConViT whose head reads the mean of the patch tokens, 2 MHSA blocks still on top
  16  grid          a 14x14 grid (2x2 patches, ImageNet's grid), against the 7x7 grid; both on half of
                    the training set (the 7x7 runs are lesson 13's)
  17  9 heads       ConViT with 9 heads, 108 wide (ConViT-S's heads, at our head width of 12), against
                    4 heads, 48 wide (ConViT-Ti's heads): the paper's SM D, about an hour
      16 heads      ConViT with 16 heads, 192 wide (ConViT-B's heads), at the lr scaled by 48 / 192,
                    against the same

A run whose train.py flags equal one of an earlier lesson's runs (all but --output-dir and
--eval-every) is read from that lesson's committed JSON instead of being trained again: one-thread
CPU runs are deterministic. That is where the reference runs (lesson 11's DeiT and ConViT, seeds 0
and 1) and the seed-0 controls come from; `python lessons/11_locality_over_training.py --controls`
makes them again.

Outputs (in --out-dir):
  13_what_makes_attention_local.png   one row per question: DeiT's nonlocality per block
                                      against uniform attention (Fig. 5 left, nonlocality), and ConViT's
                                      gate per GPSA block (Fig. 6), with and without the change
  13_what_makes_attention_local.json  every run's train.py command, top-1, and per epoch its
                                      nonlocality per block and head and its gates per block and head

Run from the repository root:  python lessons/13_what_makes_attention_local.py [--quick] [--questions ...]
"""

import importlib
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import plots  # noqa: E402
import train  # noqa: E402
from lessons._command import FIGURES, parse, run_folder, run_settings, training_parser  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._protocol import add_keep_finished, resume_if_cut_short, reuse_finished_run  # noqa: E402
from lessons._report import Stopwatch, cell, mean, write_summary  # noqa: E402
from lessons._training import at_repository_root, run_parallel, train_one  # noqa: E402

lesson11 = importlib.import_module("lessons.11_locality_over_training")  # its recipe, runs and measures

RANDAUGMENT = {"randaug_ops": 2, "randaug_magnitude": 9, "randaug_magnitude_std": 0.5, "randaug_op_set": data.DIGIT_OPS}
MODELS = {"DeiT": {"model": "deit_tiny"}, "ConViT": {}}  # the settings each adds to the recipe
BOTH = tuple(MODELS)


def questions(args) -> dict[str, tuple]:
    """question -> (what it changes, the models it trains, the settings without and with the change),
    for the recipe of `args` (with --quick too: its length question doubles the quick recipe's epochs)."""
    head_width = args.embed_dim // args.num_heads
    return {
        "length": (f"{2 * args.epochs} epochs against {args.epochs}", BOTH, {}, {"epochs": 2 * args.epochs}),
        # MNIST-10k is all the data we have offline, so "more data" can only be tested as less
        "data": ("50% of the training set against all of it", BOTH, {}, {"data_fraction": 0.5}),
        "RandAugment": ("2 ops, magnitude 9, std 0.5, against none", BOTH, {}, RANDAUGMENT),
        "MixUp/CutMix": ("MixUp 0.8 / CutMix 1.0 against none", BOTH, {}, lesson11.MIXING),
        "depth": (f"{args.depth + 6} blocks, {args.depth + 4} of them GPSA, against {args.depth}, {args.depth - 2} GPSA "
                  "(the paper: 10 GPSA)",
                  ("ConViT",), {}, {"depth": args.depth + 6, "local_up_to_layer": args.depth + 4}),
        # lesson 11's control names its GPSA blocks (depth - 2, the default) on the command line
        "class token": ("a mean-pooled head (no class token) against the class token", ("ConViT",), {},
                        {"global_pool": "avg", "local_up_to_layer": args.depth - 2}),
        # Both arms on half the data, so that a 14x14 run (5x the time of a 7x7 one) fits; the 14x14
        # runs are evaluated every 2nd epoch. Evaluating draws nothing from the training's random
        # numbers (test_evaluating_changes_no_weight), so that saves time and changes no result.
        "grid": ("a 14x14 grid (2x2 patches) against 7x7, both on 50% of the data", BOTH,
                 {"data_fraction": 0.5}, {"data_fraction": 0.5, "patch_size": 2, "eval_every": 2}),
        # The paper's sizes keep the head width (48) and add heads: Ti 4, S 9, B 16. So do these. At
        # 16 heads, 192 wide, the recipe's lr (swept at 48 wide) is too high: once the warmup ended,
        # top-1 fell (seed 0 from 69% to 33%, seed 1 from 85% to 73%) and stayed at 55-81% up to
        # epoch 12 of 20, where we stopped both, so that size trains at the lr scaled by the
        # width, 48 / 192: 1e-3.
        "9 heads": (f"9 heads, {9 * head_width} wide, against {args.num_heads}, {args.embed_dim} wide", ("ConViT",), {},
                    {"num_heads": 9, "embed_dim": 9 * head_width}),
        "16 heads": (f"16 heads, {16 * head_width} wide, at the lr x {args.embed_dim}/{16 * head_width}, against "
                     f"{args.num_heads}, {args.embed_dim} wide", ("ConViT",), {},
                     {"num_heads": 16, "embed_dim": 16 * head_width, "lr": args.lr * args.embed_dim / (16 * head_width),
                      "warmup_lr": args.warmup_lr * args.embed_dim / (16 * head_width)}),
    }


class Part(NamedTuple):
    """One lesson of these questions. Each asks what one lesson can answer in 45 minutes on our 2
    cores, and reads the runs it shares with earlier lessons from their committed JSON."""
    number: int
    stem: str  # the name of its figure and JSON
    asks: tuple[str, ...]
    reads: tuple[str, ...]  # earlier lessons' JSON files, in lessons/figures
    convit_nonlocality: bool = False  # its questions are ConViT's alone, and ask about its nonlocality too (Fig. 13)


LESSON = Part(13, "13_what_makes_attention_local", ("length", "data"), ("11_locality_over_training.json",))
SEEDS = (0, 1)


def plan_of(args) -> list[tuple[str, str, str, dict, int]]:
    """Every run of the chosen questions: (question, model, 'without' or 'with', settings, seed).
    The runs without a change that several questions share are trained once (same folder name)."""
    seeds, asked = SEEDS[:1] if args.quick else SEEDS, questions(args)
    return [(question, model, arm, {**MODELS[model], **changes}, seed)
            for question in args.questions
            for model in asked[question][1]
            for arm, changes in zip(("without", "with"), asked[question][2:])
            for seed in seeds]


def folder_name(model: str, settings: dict, seed: int) -> str:
    """A folder per distinct run, named after what it changes: the same run shares one folder."""
    changes = "_".join(f"{k}-{v}" for k, v in sorted(settings.items()) if k not in ("model", "randaug_op_set", "eval_every"))
    return re.sub("[^A-Za-z0-9_.-]+", "_", f"{model}-{changes or 'recipe'}-seed{seed}")


def earlier_runs(part: Part) -> dict[str, dict]:
    """The committed runs of the lessons `part` reads, by their train.py command without
    --output-dir and --eval-every (how often a run was measured, not what it learnt)."""
    found = {}
    for name in part.reads:
        if (FIGURES / name).is_file():
            runs = json.loads((FIGURES / name).read_text())["runs"]  # lesson 11: a list; these lessons: by folder
            for run in runs.values() if isinstance(runs, dict) else runs:
                run = {**run, "read_from": run.get("read_from", f"lesson {int(name[:2])}")}
                found.setdefault(as_run(run["command"]), run)
    return found


def as_run(command: str) -> str:
    return re.sub(r" --(output-dir|eval-every) \S+", "", command)


def train_plan(args, part: Part, plan: list[tuple]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Run (or read) every distinct run of the plan; returns each run's record and its curves
    (`curves`), by folder name."""
    known = {} if args.quick else earlier_runs(part)
    jobs, records = {}, {}
    with run_folder(args) as run_root:
        for _question, model, _arm, settings, seed in plan:
            name = folder_name(model, settings, seed)
            jobs[name] = run_settings(args, Path(run_root) / name, seed=seed, **settings)
        for name, job in jobs.items():
            found = known.get(as_run(config.command(job)))
            if found is not None:
                records[name] = found
        found = {name: reuse_finished_run(job) for name, job in jobs.items()
                 if name not in records and args.keep_finished}
        with at_repository_root():  # the jobs' paths start there
            configs = {name: config.resolve(job)[0] for name, job in jobs.items()}
        # Longest first, so that the two workers finish together (a 14x14 run is 5x a 7x7 one).
        todo = sorted((name for name in jobs if name not in records and found.get(name) is None),
                      key=lambda name: -expected_cost(configs[name]))
        print(f"{len(jobs)} distinct runs: {len(records)} read from earlier lessons, "
              f"{sum(r is not None for r in found.values())} finished before, {len(todo)} to train, "
              f"{args.workers} at a time", flush=True)
        trained = run_parallel(train_one, [resume_if_cut_short(jobs[name]) if args.keep_finished else jobs[name]
                                           for name in todo], args.workers, args.threads,
                               done=lambda job, run: print(f"  {Path(job['output_dir']).name}: top-1 "
                                                           f"{run['val_top1']:.1f}% ({run['seconds']:.0f} s)", flush=True))
        for name, result in [*((n, r) for n, r in found.items() if r is not None), *zip(todo, trained)]:
            records[name] = lesson11.run_record(name.split("-")[0], jobs[name]["seed"],
                                                {**result, "command": config.command(jobs[name])})
    return records, {name: curves(records[name], configs[name]) for name in jobs}


def expected_cost(cfg: config.RunConfig) -> float:
    """A run's time, roughly: epochs x data x blocks x tokens^1.15 (attention grows faster than the tokens)."""
    tokens = (cfg.data.img_size // cfg.model.patch_size) ** 2
    return cfg.recipe.epochs * cfg.data.data_fraction * cfg.model.depth * tokens ** 1.15


def curves(run: dict, cfg: config.RunConfig) -> dict[str, torch.Tensor | None]:
    """Per epoch, what each question is judged on:
    pull (epochs, blocks), the nonlocality of Fig. 5 left: how far each block's Eq. 8 (mean of its
        heads) lies below uniform attention, 1 - Eq. 8 / uniform, so that two grids compare
        (lesson 11's DeiT: 3-6%);
    gates (epochs, GPSA blocks), Fig. 6: each GPSA block's mean sigma(lambda) (init 0.731; the
        paper's fall to 0 in layers 6-10)."""
    side = cfg.data.img_size // cfg.model.patch_size  # train.py's images are square
    n, uniform = side * side, lesson11.uniform_nonlocality(side, side)
    nonlocality = torch.tensor(run["nonlocality"]).mean(-1)  # (epochs, blocks)
    # A block that also attends to the class token reads N / (N + 1) of uniform: the token has no distance.
    with_token = (torch.arange(nonlocality.shape[1]) >= cfg.model.gpsa_blocks) & (cfg.model.global_pool == "token")
    pull = 1 - nonlocality / torch.where(with_token, uniform * n / (n + 1), uniform)
    return {"pull": pull, "gates": torch.tensor(run["gates"]).mean(-1) if run["gates"] else None}


def verdicts(plan: list[tuple], records: dict[str, dict], measured: dict[str, dict],
             convit_nonlocality: bool = False) -> list[dict]:
    """Per question and model: the measure at the end without and with the change, per seed, and
    whether the change moved it beyond the other arm's range in every seed; with
    `convit_nonlocality`, ConViT's pull below uniform of its first block too."""
    rows = []
    for question in dict.fromkeys(q for q, *_ in plan):
        for model in dict.fromkeys(m for q, m, *_ in plan if q == question):
            arms = {arm: [folder_name(model, s, seed) for q, m, a, s, seed in plan
                          if q == question and m == model and a == arm] for arm in ("without", "with")}
            last = {arm: [{key: None if c is None else c[-1].tolist() for key, c in measured[name].items()}
                          for name in names] for arm, names in arms.items()}
            row = {"question": question, "model": model,
                   "top1": {a: [records[name]["top1"] for name in names] for a, names in arms.items()}}
            if model == "DeiT":
                row["mean_pull"] = {a: [mean(m["pull"]) for m in ms] for a, ms in last.items()}
                row["deepest_pull"] = {a: [max(m["pull"]) for m in ms] for a, ms in last.items()}
            else:  # the upper half of the GPSA stack: where the paper's gates reach 0
                row["upper_gates"] = {a: [mean(m["gates"][len(m["gates"]) // 2:]) for m in ms] for a, ms in last.items()}
                row["last_gate"] = {a: [m["gates"][-1] for m in ms] for a, ms in last.items()}
                if convit_nonlocality:  # Fig. 13: the larger models' first layers end the least local
                    row["first_pull"] = {a: [m["pull"][0] for m in ms] for a, ms in last.items()}
            key = "mean_pull" if model == "DeiT" else "upper_gates"
            before, after = row[key]["without"], row[key]["with"]
            row["moved"] = ("up" if min(after) > max(before) else "down" if max(after) < min(before)
                            else "within the seeds' range")
            if model == "ConViT":  # the paper's finding: the upper gates fall below their init
                row["upper_gates_below_init"] = {a: [g < plots.INIT_GATE for g in v] for a, v in row[key].items()}
            rows.append(row)
    return rows


def nonlocality_at_init(args, plan: list[tuple]) -> dict[str, dict[str, list[float]]]:
    """Per question, Eq. 8 of each block of ConViT (mean of its heads) at init, without and with the
    change, as seed 0 starts it, on 16 images of noise: where the pull's curves begin. With more
    heads the conv init's kernel is wider (4 heads 2x2, 9 heads 3x3, 16 heads 4x4), so a larger
    model starts less local."""
    found = {}
    for question, model, arm, settings, seed in plan:
        if model == "ConViT" and seed == 0:
            with at_repository_root():
                cfg = config.resolve(run_settings(args, Path("unused"), seed=0, **settings))[0]
            torch.manual_seed(0)  # as train.setup seeds the weights of seed 0
            net = train.build_model(cfg, 10).eval()
            with torch.no_grad():
                eq8 = net.nonlocality(torch.randn(16, net.cfg.in_chans, cfg.data.img_size, cfg.data.img_size))
            found.setdefault(question, {})[arm] = [round(v, 3) for v in eq8.mean(-1).tolist()]
    return found


MEASURES = {"mean_pull": "DeiT: pull below uniform, mean of blocks (%)",
            "deepest_pull": "DeiT: pull of the most local block (%)",
            "upper_gates": "ConViT: mean gate of the upper half of the GPSA blocks",
            "last_gate": "ConViT: mean gate of the last GPSA block",
            "first_pull": "ConViT: pull of block 1 below uniform (%)"}


def verdict_table(rows: list[dict]) -> list[str]:
    """The lesson's table: per question and measure, without -> with the change (mean and range of
    the seeds), whether every seed with the change lies beyond the other arm's range, and top-1."""
    lines = ["| question | measure | without | with | every seed beyond the other arm's | top-1 without | top-1 with |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for key in [k for k in MEASURES if k in row]:
            scale, digits = (100, 1) if "pull" in key else (1, 3)
            values = {arm: [scale * v for v in row[key][arm]] for arm in ("without", "with")}
            moved = row["moved"] if key in ("mean_pull", "upper_gates") else ""
            lines.append(f"| {row['question']} | {MEASURES[key]} | {cell(values['without'], digits)} | "
                         f"{cell(values['with'], digits)} | {moved} | {cell(row['top1']['without'])} | "
                         f"{cell(row['top1']['with'])} |")
    return lines


def draw_question(axes, question: str, about: str, plan: list[tuple], records: dict[str, dict],
                  measured: dict[str, dict], convit_nonlocality: bool = False):
    """One row: DeiT's pull below uniform per block (with `convit_nonlocality`, ConViT's), and
    ConViT's gate per GPSA block, over the share of training done; the run without the change
    dashed grey, with it in colour."""
    for ax, model, key in zip(axes, ("ConViT" if convit_nonlocality else "DeiT", "ConViT"), ("pull", "gates")):
        names = {arm: [folder_name(m, s, seed) for q, m, arm_, s, seed in plan
                       if q == question and m == model and arm_ == arm] for arm in ("without", "with")}
        if not names["with"]:
            ax.axis("off")
            continue
        for arm, arm_names in names.items():
            curve = torch.stack([measured[name][key] for name in arm_names])  # (seeds, epochs, blocks)
            epochs = records[arm_names[0]]["epochs"]
            share = torch.tensor(epochs, dtype=torch.float) / epochs[-1]
            colours = plots.layer_colours(curve.shape[2])
            for block in range(curve.shape[2]):
                style = dict(color="0.6", ls="--", lw=1) if arm == "without" else dict(color=colours[block], lw=1.8)
                ax.plot(share, curve[:, :, block].mean(0), **style,
                        label=f"block {block + 1}" if arm == "with" else ("without" if block == 0 else None))
        if key == "gates":
            ax.axhline(plots.INIT_GATE, color="k", lw=0.6, ls=":")
        else:
            ax.axhline(0, color="k", lw=0.6, ls=":")
        figure = ("Fig. 13, pull below uniform" if model == "ConViT" else "Fig. 5 left, pull below uniform") \
            if key == "pull" else "Fig. 6, gates"
        ax.set(xlabel="share of training done", ylabel="1 - Eq. 8 / uniform" if key == "pull" else "gate sigma(lambda)",
               title=f"{question}, {model}: {figure}\n"
                     f"with: {about} (colour); without: dashed; mean of seeds")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6, ncol=3)


def main(argv=None, part: Part = LESSON, doc: str = __doc__, script: str = __file__):
    """Lessons 13 to 17: `part` names the questions, `doc` and `script` are the lesson's own."""
    parser = training_parser(doc, script, lesson11.RECIPE, lesson11.QUICK)
    parser.add_argument("--questions", nargs="+", choices=part.asks, default=list(part.asks),
                        help="which questions to run (default: all); their runs are trained or read as above")
    add_keep_finished(parser)
    args = parse(parser, argv)
    clock = Stopwatch(f"lesson {part.number}")
    plan = plan_of(args)
    if args.quick:  # a tiny model on the 8x8 digits (2x2 patches; 1x1 for the finer grid), one seed: seconds
        plan = [(q, m, a, {**s, "dataset": "digits", "img_size": 8, "patch_size": 1 if "patch_size" in s else 2,
                           "data_fraction": 0.2}, seed) for q, m, a, s, seed in plan]
    records, measured = train_plan(args, part, plan)
    rows = verdicts(plan, records, measured, part.convit_nonlocality)
    fig, axes = plt.subplots(len(args.questions), 2, figsize=(13, 3.6 * len(args.questions)), layout="constrained",
                             squeeze=False)
    for row, question in zip(axes, args.questions):
        draw_question(row, question, questions(args)[question][0], plan, records, measured, part.convit_nonlocality)
    settings = (f"lesson 11's recipe (train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, "
                f"{args.depth} blocks, {args.epochs} epochs), one change per row; seeds {', '.join(map(str, SEEDS[:1] if args.quick else SEEDS))}")
    save_figure(fig, args.out_dir, f"{part.stem}.png", settings, args.device)
    at_init = nonlocality_at_init(args, plan) if part.convit_nonlocality else None
    if at_init:
        print("\nConViT's nonlocality (Eq. 8, patches) per block at init, seed 0, without -> with the change")
        print("\n".join(f"  {q}: {' '.join(f'{v:.2f}' for v in arms['without'])} -> "
                        f"{' '.join(f'{v:.2f}' for v in arms['with'])}" for q, arms in at_init.items()))
    deep = [records[folder_name(m, s, seed)] for q, m, arm, s, seed in plan if q == "depth" and arm == "with"]
    if deep:  # every head of the deep ConViT: the paper's Fig. 6 has 10 GPSA layers
        print("\nthe last gate of each head of the deep ConViT, per seed")
        print("\n".join(lesson11.heads_table(deep)))
    print("\n" + "\n".join(verdict_table(rows)))
    write_summary(args, script, f"{part.stem}.json", clock, argv, indent=None, settings=settings,
                  questions={q: questions(args)[q][0] for q in args.questions}, verdicts=rows,
                  plan=[{"question": q, "model": m, "arm": a, "seed": seed, "run": folder_name(m, s, seed)}
                        for q, m, a, s, seed in plan],
                  runs=records, **({"nonlocality_at_init": at_init} if at_init else {}))
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
