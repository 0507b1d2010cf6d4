"""Lesson 8: position without a position embedding (the paper's Table 5).

GPSA knows where every patch sits relative to the others: r_ij is built into its positional
attention. DeiT's only sense of position is the learned absolute embedding added to the patch
tokens. The paper masks that embedding off at test time: DeiT-Ti falls from 72.2 to 38.3 top-1
on ImageNet, ConViT-Ti only from 73.1 to 67.1. Here, on MNIST-10k with lesson 6's recipe and
models (same width, heads and depth; 3 seeds; trained until they stop improving, for at most
768 epochs: see DOUBLINGS), we

  1. train ConViT and DeiT's own network, and evaluate each with and without its position
     embedding (train.py --eval-only --mask-pos-embed);
  2. train both again with no position embedding at all (train.py --no-pos-embed).

Trained whole, the lesson takes hours, so by default each run that figures/08_check or
figures/06_check records (its train.py command, trained on our AMD EPYC or Intel Xeon VM) is read rather than
trained, as lesson 6 does, except where its weights are needed: a run tested masked is trained
again unless lesson 6's run folder holds it or figures/08_check/masked.jsonl records its test
(--recorded adds each test there as its run finishes). --retrain trains every run on your machine.

Outputs (in --out-dir):
  08_position_embedding.png   top-1 of the four cases per model, ours beside the paper's Table 5
  08_position_embedding.json  every run's and every evaluation's train.py command and top-1

Run from the repository root:  python lessons/08_position_embedding.py [--quick]
"""

import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # convit.py lives in the repository root

import matplotlib.pyplot as plt  # noqa: E402

import cli  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402
from lessons._command import parse, run_folder  # noqa: E402
from lessons._draw import save_figure  # noqa: E402
from lessons._report import Stopwatch, cell, hardware, mean, print_same_commands, trained_on, write_summary  # noqa: E402
from lessons._training import at_repository_root  # noqa: E402
from lessons._protocol import (MODELS, checks, climbing_parser, convergence_line, defining_key,  # noqa: E402
                               print_by_length, read_records, recipe_line, records_to_keep, records_to_read, run_record,
                               run_until_converged, train_or_read)

SEEDS = (0, 1, 2)
MASKED = checks("08") / "masked.jsonl"  # each run tested masked in a sitting (--recorded), and its weights' top-1s
PAPER_TABLE5 = {"DeiT": ("DeiT-Ti", 72.2, 38.3), "ConViT": ("ConViT-Ti", 73.1, 67.1)}  # no mask, masked
CASES = {  # what each bar shows
    "trained with, tested with": "the usual model",
    "trained with, tested masked": "the same weights, pos_embed left out at test time (Table 5)",
    "trained without": "--no-pos-embed: no absolute position at all, in training or test",
}
TRAINED_AS = {"trained with, tested masked": "trained with, tested with"}  # masked tests reuse those runs' weights
# This lesson climbs 3 doublings, not the protocol's 4, because its runs train on all the data:
# the one setting still climbing at 768 epochs, DeiT without a position embedding, would go to
# 1,536 epochs of 8,000 images next, four times the images of lesson 6's longest runs (7,680
# epochs of 400), about 6.4 h on 2 cores with its three seeds together at its 768-epoch pace.
# Its gains per doubling (4.75, 3.75, 2.55, 2.80 points) are not slowing, so one more doubling is
# unlikely to bring them under 0.5; the page reports it as not converged, a lower bound.
# --max-doublings 4 trains that rung.
DOUBLINGS = 3


def masked_evaluation(settings: dict) -> tuple[dict, dict]:
    """The run's own settings plus --eval-only --mask-pos-embed on its checkpoint: its top-1
    without the position embedding, and the settings that give it."""
    evaluation = {**settings, "eval_only": True, "mask_pos_embed": True, "checkpoint": settings["output_dir"]}
    with at_repository_root():
        cfg, _ = config.resolve(evaluation)
        result = train.run(cfg)
    return evaluation, {"val_top1": result["val_top1"], "val_top5": result["val_top5"]}


def run_key(settings: dict) -> str:
    with at_repository_root():
        return defining_key(config.resolve(settings)[0])


def masked_tests(path: Path) -> dict[str, dict]:
    """The masked tests that earlier sittings recorded in `path` (keep_masked_test), by the run they tested."""
    if not path.is_file():
        return {}
    return {run_key(config.parse(shlex.split(line["run"]["command"])[2:])): line for line in read_records(path)}


def keep_masked_test(path: Path, result: dict, evaluation: tuple[dict, dict], machine: str):
    """Add a run's masked test to `path` (MASKED) at once, with both top-1s of the weights it tested and the
    machine that trained them: the weights are gone when the sitting's machine is, the test stays.
    No key pairs a command with a top-1 (`run_records_in`): the weights' top-1 is a second record of
    a run lesson 6 may record on another machine."""
    evaluated, scores = evaluation
    line = {"run": {"command": config.command(result["settings"])}, "evaluation": {"command": config.command(evaluated)},
            "top1": {"unmasked": result["val_top1"], "masked": scores["val_top1"]},
            "top5": {"unmasked": result["val_top5"], "masked": scores["val_top5"]}, "hardware": machine}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(line) + "\n")


def weighed(result: dict, top1: float, top5: float, machine: str) -> dict:
    """`result` with the top-1 of the weights tested masked and the machine that trained them, and where
    its record came from another machine, both top-1s: how far two machines part on one command, at
    convergence."""
    elsewhere = result.get("hardware") if result.get("read_from") else None
    pair = {"first": {"machine": elsewhere, "top1": result["val_top1"]}, "second": {"machine": machine, "top1": top1}}
    return {**result, "val_top1": top1, "val_top5": top5, "hardware": machine,
            **({"two_machines": pair} if elsewhere not in (None, machine) else {})}


def tested_masked(args, plan: list[tuple], results: list[dict], folders: tuple[Path, ...], recorded: dict[str, dict],
                  keep_in: Path | None) -> tuple[list, list]:
    """`results`, and each run with the position embedding tested masked (masked_evaluation; None for
    a run without it). A record keeps no weights, so a run read from one is found finished in its
    folder or `folders`, or continued from its checkpoint, or trained again, and its top-1 unmasked
    becomes that of these weights (on the machine that made the record, the same); a test an earlier
    sitting recorded (`recorded`, masked_tests') is read instead.
    With `keep_in`, each test is added there as soon as its run finishes."""
    results, masked = list(results), [None] * len(results)
    to_test = [i for i, result in enumerate(results) if not result["settings"].get("no_pos_embed")]
    for i in to_test:
        if (line := recorded.get(run_key(results[i]["settings"]))) is not None:
            results[i] = weighed(results[i], line["top1"]["unmasked"], line["top5"]["unmasked"], line["hardware"])
            masked[i] = (config.parse(shlex.split(line["evaluation"]["command"])[2:]),
                         {"val_top1": line["top1"]["masked"], "val_top5": line["top5"]["masked"]})

    def test(i: int, weights: dict):  # results[i]'s weights are in its folder, and score `weights`
        machine = weights.get("hardware") if weights.get("read_from") else hardware(args.device)
        results[i] = weighed(results[i], weights["val_top1"], weights["val_top5"], machine)
        masked[i] = masked_evaluation(results[i]["settings"])
        if keep_in is not None:
            keep_masked_test(keep_in, results[i], masked[i], machine)

    # Weights come from a finished run in a folder (its own top-1s, read back), a run cut short is
    # continued, and only then is one trained from the start: a checkpoint is not a finished run.
    unweighed = [i for i in to_test if masked[i] is None]
    weights = train_or_read(args, [results[i]["settings"] for i in unweighed],
                            [f"{plan[i][1]} seed {plan[i][3]}, for its weights" for i in unweighed],
                            reuse=True, elsewhere=folders, finished=lambda j, result: test(unweighed[j], result))
    for i, result in zip(unweighed, weights):  # read from a finished folder, not trained: no test yet
        if masked[i] is None:
            test(i, result)
    return results, masked


def plot(top1: dict, epochs: dict, seeds: list[int], args, settings: str, machines: str):
    """top1[model][case]: the top-1 of every seed; epochs as print_table5 takes them. A bar whose
    setting stopped climbing before it converged says so: its height is a lower bound."""
    fig, (ours, paper) = plt.subplots(1, 2, figsize=(14, 4.6), layout="constrained", width_ratios=(3, 2))
    colours = ["tab:green", "tab:orange", "tab:purple"]
    width = 0.8 / len(CASES)
    for i, case in enumerate(CASES):
        values = [top1[name][case] for name in MODELS]
        means = [mean(v) for v in values]
        bars = ours.bar([m + (i - 1) * width for m in range(len(MODELS))], means, width, color=colours[i], label=case,
                        yerr=[[a - min(v) for a, v in zip(means, values)], [max(v) - a for a, v in zip(means, values)]],
                        capsize=3)
        stops = [epochs[name, TRAINED_AS.get(case, case)] for name in MODELS]  # a masked test: where its runs stopped
        labels = [f"{m:.1f}" + ("" if converged else f"\n{trained:,} epochs,\nnot converged")
                  for m, (trained, converged) in zip(means, stops)]
        ours.bar_label(bars, labels, fontsize=8, padding=2)
    what = f"mean of {len(seeds)} seeds, bars: min to max" if len(seeds) > 1 else f"seed {seeds[0]}"
    ours.set_xticks(range(len(MODELS)), list(MODELS))
    ours.set(ylabel="top-1 (%)", ylim=(0, 105), title=f"ours: {args.dataset}, C = {args.embed_dim}, H = "
                                                       f"{args.num_heads}, {args.depth} blocks ({what})")
    ours.legend(fontsize=8, loc="lower center")
    for i, case in enumerate(list(CASES)[:2]):
        bars = paper.bar([m + (i - 0.5) * width for m in range(len(MODELS))],
                         [PAPER_TABLE5[name][1 + i] for name in MODELS], width, color=colours[i], label=case)
        paper.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    paper.set_xticks(range(len(MODELS)), [PAPER_TABLE5[name][0] for name in MODELS])
    paper.set(ylabel="top-1 (%)", ylim=(0, 105), title="paper, Table 5: ImageNet (not trained without)")
    paper.legend(fontsize=8, loc="lower center")
    save_figure(fig, args.out_dir, "08_position_embedding.png", settings, args.device, machines)


def setting_name(model: str, changes: dict) -> str:
    return f"{model}, {'without' if changes.get('no_pos_embed') else 'with'} pos_embed"


def print_table5(top1: dict, epochs: dict):
    """top1[model][case]: every seed's top-1; epochs[(model, case)]: the length its setting stopped at,
    and whether it converged there."""
    def length(name: str, case: str) -> str:
        trained, converged = epochs[name, case]
        return f"{trained:,}" + ("" if converged else " (not converged)")

    print("\nTable 5, ours (top-1 %, mean of the seeds and their range, each trained until it stops improving) beside "
          "the paper's (ImageNet, -Ti models):")
    print("| model | epochs: with, without | tested with pos_embed | masked at test | drop | trained without | "
          "paper: with | paper: masked |")
    print("|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        cases = top1[name]
        drop = mean(cases["trained with, tested with"]) - mean(cases["trained with, tested masked"])
        paper_name, paper_with, paper_masked = PAPER_TABLE5[name]
        print(f"| {name} | {length(name, 'trained with, tested with')}, {length(name, 'trained without')} | "
              f"{cell(cases['trained with, tested with'])} | {cell(cases['trained with, tested masked'])} | "
              f"{drop:.1f} | {cell(cases['trained without'])} | {paper_name} {paper_with} | {paper_masked} |")


def main(argv=None):
    args = parse(climbing_parser(__doc__, __file__, "06", DOUBLINGS), argv)
    recorded = records_to_read(args)
    clock = Stopwatch("lesson 8")
    seeds = args.seeds or ([0] if args.quick else list(SEEDS))
    fraction = 0.1 if args.quick else 1.0
    plan = [("table5", name, fraction, seed, {**changes, **extra}) for extra in ({}, {"no_pos_embed": True})
            for name, changes in MODELS.items() for seed in seeds]
    print(f"{len(plan)} training runs, {args.workers} at a time, then {len(plan) // 2} masked evaluations: "
          f"{recipe_line(args)}")
    with run_folder(args) as run_root:
        # The runs with the position embedding are lesson 6's at f = 100%: read from its run folder or its records.
        lesson6 = Path(run_root).parent / "06"
        results = run_until_converged(args, plan, run_root, reuse=args.keep_finished, elsewhere=(lesson6, *recorded),
                                      keep_in=records_to_keep(args))
        results, masked = tested_masked(args, plan, results, (lesson6,), masked_tests(MASKED) if recorded else {},
                                        MASKED if args.recorded else None)

    top1 = {name: {case: [] for case in CASES} for name in MODELS}
    epochs, records = {}, []
    for (_table, name, f, seed, changes), result, evaluation in zip(plan, results, masked):
        case = "trained without" if changes.get("no_pos_embed") else "trained with, tested with"
        top1[name][case].append(result["val_top1"])
        epochs[name, case] = result["settings"]["epochs"], result["setting_converged"]
        record = {**run_record(case, name, f, seed, result), "pos_embed": case != "trained without"}
        if evaluation is not None:
            evaluated, scores = evaluation
            top1[name]["trained with, tested masked"].append(scores["val_top1"])
            record["masked"] = {"top1": scores["val_top1"], "top5": scores["val_top5"],
                                "command": config.command(evaluated)}
        if "two_machines" in result:  # its weights trained again on another machine than its record's
            record["two_machines"] = result["two_machines"]
        records.append(record)

    lengths = print_by_length([setting_name(name, changes) for _, name, _, _, changes in plan],
                              [seed for *_, seed, _ in plan], results)
    what = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
    settings = f"{recipe_line(args)}, f = {fraction:.0%}, {what}"
    plot(top1, epochs, seeds, args, settings, trained_on(results, args.device))
    print_table5(top1, epochs)
    print(convergence_line(results))
    pairs = [{"name": name, "seed": seed, **result["two_machines"]}
             for (_, name, _, seed, _), result in zip(plan, results) if "two_machines" in result]
    print_same_commands(("recorded", "trained again here for its weights"), pairs,
                        [v for cases in top1.values() for v in cases.values()])
    write_summary(args, __file__, "08_position_embedding.json", clock, argv, settings=settings, seeds=seeds,
                  rule=convergence_line(results), runs=records,
                  mean_top1={name: {case: mean(v) for case, v in cases.items()} for name, cases in top1.items()},
                  epochs={f"{name}, {case}": e for (name, case), (e, _) in epochs.items()}, top1_by_length=lengths,
                  paper={name: {"model": p[0], "no mask": p[1], "masked": p[2]} for name, p in PAPER_TABLE5.items()})
    clock.done()


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
