"""The training protocol of the lessons that compare models (6, 8 and 9): one recipe, chosen by
lesson 6's sweep for ConViT and DeiT alike, and every run's convergence checked by its twin.

A run at fraction f of the training set trains max(epochs, FLOOR_EPOCHS / f) epochs: the recipe's
epochs, its length on all the data, and never fewer steps than Table 2's
equal-steps protocol gives (FLOOR_EPOCHS on all the data: 3,000 steps), so that a small fraction
still sees its images as often as the paper's protocol shows them. It is evaluated EVALUATIONS
times the same steps apart.

A run is judged converged by its twin (`twin`; run_all(twins=True)): the same run, trained half
as long. When the twin comes within CONVERGED_WITHIN points of the run's top-1, training twice
as long as the twin added less than that, and the run, twice the twin's length, is past the
point where more training stops paying. The last quarter of one run's evaluations cannot say
this: a cosine schedule ends with a rise, as the lr anneals, in a run that has learnt what it can.

One pair's verdict is noisy (a top-1 on 2,000 images moves by half a point between evaluations of
a run that has stopped improving), so a setting, the runs that differ only in their seed, is
judged on the mean of its seeds. `run_until_converged` trains every run with its twin, then
trains each setting that the mean does not pass again twice as long, its twin being the run just
trained, and so on up the ladder of doublings until every setting has converged or has doubled
--max-doublings times: each model and fraction trains as long as it needs, no longer.

Each run keeps its train.py command, relative to the repository root: run from there, it gives
the same top-1 again (one-thread CPU runs are deterministic).

A lesson too long for one sitting loses nothing when it is stopped: run again with --keep-finished,
it reads back every run an earlier sitting finished (`reuse_finished_run`) and continues, as
`train.py --resume` does, every run it left unfinished (`unfinished_run`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import checkpoints
import cli
import config
import runs
from lessons._command import FIGURES, LessonRecipe, repo_path, run_settings, training_parser
from lessons._report import hardware, mean
from lessons._training import CONVERGED_WITHIN, at_repository_root, convergence, run_parallel, train_one

# The recipe (the warmup is in epochs at f = 100% and multiplied by 1/f; it starts from lr / 100).
# Its epochs, the length of a run on all the data (see FLOOR_EPOCHS for the other fractions), are
# where run_until_converged starts: 96 converge ConViT there by the twins' rule, and not DeiT,
# which still gains 1.2 points from 96 to 192 epochs and converges at 384, two doublings up
# (lesson 6, "How long is long enough?", 3 seeds).
# The rest is train.py's small preset: AdamW, weight decay 0.05, label smoothing 0.1, cosine to
# 1e-5, crops of 50-100% of the image; no RandAugment.
RECIPE = LessonRecipe(epochs=96, embed_dim=48, num_heads=4, depth=4, batch_size=64, lr=4e-3, warmup_epochs=4,
                      warmup_lr=4e-5)
# --quick: a tiny model, each run stopped after QUICK_STOP epochs of its schedule (seconds in all).
QUICK = LessonRecipe(epochs=1, embed_dim=16, num_heads=4, depth=3, batch_size=64, lr=2e-3, warmup_epochs=0,
                     warmup_lr=2e-5)
QUICK_STOP = 2
EVALUATIONS = 12  # per run, the same steps apart at every fraction
# Table 2's equal steps: 24 epochs on all the data (3,000 steps of 64 images), 24 / f at fraction f.
# Every run trains at least this long, so that runs on little data keep the paper's many epochs.
FLOOR_EPOCHS = 24
# How many times run_until_converged may double a setting's length (--max-doublings): 16 times the
# first length. The longest setting measured so far, DeiT at f = 5%, needs all 4: 480 to 7,680 epochs.
MAX_DOUBLINGS = 4

# The two models every comparison trains: the settings each adds to the recipe's ConViT.
MODELS = {
    "ConViT": {},
    "DeiT": {"model": "deit_tiny"},  # DeiT's own network at the recipe's C, H and depth: the paper's baseline
}


def schedule(args, fraction: float, warmup_epochs: int, doublings: int = 0) -> dict:
    """The settings that make a run at fraction f: the data, max(epochs, FLOOR_EPOCHS / f) epochs
    (times 2 ** doublings, up run_until_converged's ladder), the warmup times 1/f, and EVALUATIONS
    evaluations the same steps apart. --quick: epochs / f epochs, stopped after QUICK_STOP, each
    evaluated."""
    epochs = max(args.epochs, round(floor_epochs(args) / fraction)) * 2 ** doublings
    settings = {"data_fraction": fraction, "epochs": epochs, "warmup_epochs": round(warmup_epochs / fraction),
                "eval_every": 1 if args.quick else max(1, round(epochs / EVALUATIONS))}
    return {**settings, "stop_after": QUICK_STOP} if args.quick else settings


def floor_epochs(args) -> int:
    return args.epochs if args.quick else FLOOR_EPOCHS


def twin(settings: dict, folder: Path) -> dict:
    """The run of `settings` trained half as long, in `folder`: the same data, seed, warmup (in
    epochs) and number of evaluations; only the cosine is half as long."""
    epochs = max(1, settings["epochs"] // 2)
    return {**settings, "epochs": epochs, "eval_every": max(1, settings["eval_every"] // 2),
            "output_dir": str(folder)}


def what_defines(cfg: config.RunConfig) -> dict:
    """The fields that define a run (cli.RUN: not where or how it ran), its GPSA blocks counted the
    same whether they were typed or left to the model's default."""
    defining = {name: value for name, value in cfg.flat().items()
                if config.FIELDS[name].metadata["role"] == cli.RUN and name != "scale_epochs"}
    # --scale-epochs is left out: the epochs it scaled are in the resolved configuration.
    return {**defining, "local_up_to_layer": cfg.model.gpsa_blocks}


def defining_key(cfg: config.RunConfig) -> str:
    """`what_defines` as a string: two runs with the same key learn the same weights on one machine."""
    return json.dumps(what_defines(cfg), sort_keys=True)


class Held(NamedTuple):
    """What a run folder's checkpoint holds: what defines its run (`what_defines`; None if the file
    is not a checkpoint of train.py), the epoch it reached, and the model's parameter count."""

    run: dict | None
    epoch: int | None
    parameters: int | None


_HELD: dict[tuple, Held] = {}  # by path and version of the file


def run_in(path: Path) -> Held:
    """What the checkpoint file `path` holds, read once per version of the file: a lesson looks for
    each of its runs among every folder of another lesson's, a hundred checkpoints for each run."""
    try:
        stat = path.stat()
    except FileNotFoundError:  # gone since its folder was listed: another lesson, at work, renamed it
        return Held(None, None, None)
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _HELD:
        try:
            checkpoint = checkpoints.read_checkpoint_file(path)
            _HELD[key] = Held(what_defines(config.stored(checkpoint["args"])), checkpoint.get("epoch"),
                              sum(t.numel() for t in checkpoint["model"].values()))
        except (ValueError, KeyError, TypeError):
            _HELD[key] = Held(None, None, None)
    return _HELD[key]


def reuse_finished_run(settings: dict, beside: bool = True, elsewhere: tuple[Path, ...] = ()) -> dict | None:
    """If a folder beside this run's (with `beside`) or under a folder of `elsewhere` holds a run of
    exactly these settings trained to its last epoch, move it (from elsewhere: copy it) to this
    run's folder name and return its result; else None. It stands for the run: one-thread CPU runs
    are deterministic, so training it again would give the same numbers."""
    with at_repository_root():
        cfg, _ = config.resolve(settings)
        wanted, folder = what_defines(cfg), Path(cfg.runtime.output_dir)
        for candidate in [path for root in ((folder.parent,) if beside else ()) + tuple(elsewhere)
                          if root.is_dir()
                          for path in sorted(root.glob("*/" + checkpoints.CHECKPOINT))]:
            held = run_in(candidate)
            if held.run != wanted or held.epoch != last_epoch(cfg):
                continue
            if candidate.parent != folder:
                if folder.exists():
                    continue
                if candidate.parent.parent == folder.parent:
                    candidate.parent.rename(folder)
                else:
                    try:
                        shutil.copytree(candidate.parent, folder)
                    except (FileNotFoundError, shutil.Error):  # the lesson at work there renamed it mid-copy
                        shutil.rmtree(folder, ignore_errors=True)
                        continue
            records = runs.read_metrics(folder)
            last = records[-1]
            return {"val_top1": last["val_top1"], "val_top5": last["val_top5"], "val_loss": last["val_loss"],
                    "parameters": held.parameters,
                    "seconds": None, "cpu_seconds": None,  # its metrics log the evaluated epochs only
                    "records": records, "reused": True, **convergence(records)}
    return None


# The files a lesson records runs in: its JSON, and the JSON-lines file that keep_run adds to.
RECORD_SUFFIXES = (".json", ".jsonl")


def checks(lesson: str) -> Path:
    """figures/NN_check: the committed runs of lesson NN, each run trained whole on one machine and
    recorded with it (our 2-core AMD EPYC VM, or, in sittings.jsonl's later lines, our 2-core Intel
    Xeon VM), since the same command gives other numbers on another CPU (lesson 6's page shows by
    how much). Not the lesson's own figures/NN_*.json, which the lesson writes from them."""
    return FIGURES / f"{lesson}_check"


def sittings(lesson: str) -> Path:
    """Where --recorded adds each run that lesson NN trains, as it finishes (`keep_run`)."""
    return checks(lesson) / "sittings.jsonl"


def recorded_files(*lessons: str) -> tuple[Path, ...]:
    """Every file of these lessons' checks that records runs (`recorded_runs` reads them)."""
    return tuple(sorted(path for lesson in lessons for suffix in RECORD_SUFFIXES
                        for path in checks(lesson).rglob("*" + suffix)))


def add_records(parser, lesson: str, *shared: str):
    """--retrain and --recorded, for a lesson that would take many hours to train whole: by default
    it reads each run that its checks, and those of the lessons it `shared` runs with, record, and
    trains only the rest (`records_to_read`)."""
    parser.set_defaults(read_checks=(*shared, lesson), own_check=lesson)
    folders = " and ".join(repo_path(checks(name)) for name in (*shared, lesson))
    parser.add_argument("--retrain", action="store_true",
                        help=f"train every run, reading none that {folders} record (by default each run recorded "
                             "there, trained on our AMD or Intel VM, is read, and only the rest are trained)")
    parser.add_argument("--recorded", action="store_true",
                        help=f"add each run trained to {repo_path(sittings(lesson))} as it finishes, so that the next "
                             "sitting, on any machine, reads it (how we train a lesson of many hours in sittings)")


def records_to_read(args) -> tuple[Path, ...]:
    """The files whose runs this invocation reads (`add_records`): none with --retrain, or with
    --quick, whose tiny model is never recorded."""
    if args.recorded and (args.quick or args.retrain):
        raise ValueError("--recorded adds the runs trained here to those recorded already: not with --quick or "
                         "--retrain")
    return () if args.quick or args.retrain else recorded_files(*args.read_checks)


def records_to_keep(args) -> Path | None:
    """The file each run trained is added to: the lesson's sittings with --recorded, else none."""
    return sittings(args.own_check) if args.recorded else None


def recorded_runs(files: tuple[Path, ...]) -> dict[str, dict]:
    """Every run that these committed lesson JSON files record with its train.py command (a run, a
    run's twin under "half", a rung it climbed through), by what defines it (`what_defines`), the
    record with its curve where there are several. Two records of one run that differ are refused:
    a run is deterministic on one kind of CPU, not across CPUs, so they came from two machines."""
    found, machines = {}, {}
    for file in files:
        records = read_records(Path(file))
        machines[repo_path(file)] = records.get("hardware") if isinstance(records, dict) else None
        for record in run_records_in(records):
            with at_repository_root():
                cfg, _ = config.resolve(config.parse(shlex.split(record["command"])[2:]))  # after "python train.py"
            key = defining_key(cfg)
            record = {**record, "read_from": record.get("read_from", repo_path(file))}
            if key in found and found[key]["top1"] != record["top1"]:
                raise ValueError(f"two records of one run disagree: top-1 {found[key]['top1']} in "
                                 f"{found[key]['read_from']}, {record['top1']} in {record['read_from']} "
                                 f"({record['command']}); were they trained on different machines?")
            if key not in found or "curve" in record and "curve" not in found[key]:
                found[key] = record
    # A record without its own machine ran on that of the file that trained it (its read_from).
    return {key: record if record.get("hardware") else {**record, "hardware": machines.get(record["read_from"])}
            for key, record in found.items()}


def read_records(path: Path):
    """A lesson's JSON file, or a JSON-lines file of runs (keep_run's) as a list; a line torn by a
    machine that stopped mid-write is left out."""
    if path.suffix != ".jsonl":
        return json.loads(path.read_text())
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def run_records_in(value):
    """The dicts inside `value` that record a run: its command and its top-1."""
    if isinstance(value, dict):
        if "command" in value and "top1" in value:
            yield value
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from run_records_in(item)


def recorded_result(settings: dict, recorded: dict[str, dict]) -> dict | None:
    """The result of the run of `settings` as a committed JSON file records it (`recorded_runs`),
    else None. It stands for the run as a finished folder does: one-thread CPU runs are
    deterministic on one kind of CPU (recorded_runs refuses records from two that disagree)."""
    with at_repository_root():
        cfg, _ = config.resolve(settings)
    record = recorded.get(defining_key(cfg))
    if record is None or last_epoch(cfg) != cfg.recipe.epochs:  # a record is of a whole run
        return None
    records = [{"epoch": epoch, "val_top1": top1} for epoch, top1 in record.get("curve", [])]
    return {"val_top1": record["top1"], "val_top5": record.get("top5"), "val_loss": None,
            "parameters": record.get("parameters"), "seconds": None, "cpu_seconds": None, "records": records,
            "reused": True, "read_from": record["read_from"], "hardware": record.get("hardware"),
            **convergence(records)}


def unfinished_run(settings: dict) -> str | None:
    """The checkpoint in this run's own folder if it holds this very run, stopped before its last
    epoch (a lesson interrupted, a machine lost), else None: `train.py --resume` continues it to
    the weights the uninterrupted run would have had."""
    with at_repository_root():
        cfg, _ = config.resolve(settings)
        path = Path(cfg.runtime.output_dir) / checkpoints.CHECKPOINT
        if not path.is_file():
            return None
        held = run_in(path)
        return str(path) if held.run == what_defines(cfg) and held.epoch is not None and held.epoch < last_epoch(cfg) else None


def resume_if_cut_short(job: dict) -> dict:
    """`job`, set to continue its run's checkpoint where `unfinished_run` finds one (--keep-finished)."""
    path = unfinished_run(job)
    return {**job, "resume": path, "overwrite": False} if path else job


def last_epoch(cfg: config.RunConfig) -> int:
    """The epoch a run of `cfg` ends at: its last, or where --stop-after stops it (--quick's runs)."""
    return min(cfg.recipe.epochs, cfg.runtime.stop_after or cfg.recipe.epochs)


def run_all(args, plan: list[tuple], run_root: Path, reuse: bool = False, elsewhere: tuple[Path, ...] = (),
            twins: bool = False, doublings: list[int] | None = None, keep_in: Path | None = None) -> list[dict]:
    """Train every (table, name, fraction, seed, settings[, warmup epochs]) of `plan`, args.workers
    at a time, each doubled in length as many times as `doublings` says (default: none); each
    result gains its settings and its train.py command. With `twins`, each run's
    twin trains too (`twin`), and the result gains the twin's top-1 and command, what the second
    half of the run added, and its verdict, `converged`. A run that a folder of `elsewhere`
    (another lesson's) or, with reuse, of run_root already holds, finished with the same settings,
    or that a JSON file of `elsewhere` records (`recorded_result`),
    is read rather than trained again (`reuse_finished_run`): how lessons share runs, a sweep
    grows, and an interrupted lesson goes on, without training what they have. With `keep_in`,
    each run trained is added to that JSON-lines file as it finishes (`keep_run`)."""
    jobs, labels = [], []
    for (table, name, f, seed, changes, *rest), doubled in zip(plan, doublings or [0] * len(plan)):
        changes = {**changes, **schedule(args, f, (*rest, args.warmup_epochs)[0], doubled)}
        # The folder is named after the run's flags, so that the same run keeps its folder when a sweep grows.
        flags = config.command_line(run_settings(args, Path("."), seed=seed, **changes))
        digest = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]
        folder = Path(run_root) / f"{table}-{name.replace(' ', '_')}-{f:g}-seed{seed}-{digest}"
        jobs.append(run_settings(args, folder, seed=seed, **changes))
        labels.append(f"{name:<26} f = {f:<5g} seed {seed}")
    if twins:
        jobs += [twin(job, Path(f"{job['output_dir']}-half")) for job in jobs[:len(plan)]]
        labels += [f"{label}, half as long" for label in labels]
    results = train_or_read(args, jobs, labels, reuse, elsewhere, keep_in)
    results = [{**result, "settings": job, "command": config.command(job)} for job, result in zip(jobs, results)]
    if not twins:
        return results
    return [judged(run, half) for run, half in zip(results[:len(plan)], results[len(plan):])]


def setting_converged(second_half_adds: list[float]) -> bool:
    """The rule for a setting (its runs that differ only in their seed): what the second halves of
    its runs added, on the mean of the seeds, is under CONVERGED_WITHIN points. One pair is noisy;
    the mean of the seeds is what the lesson judges."""
    return mean(second_half_adds) < CONVERGED_WITHIN


def run_until_converged(args, plan: list[tuple], run_root: Path, reuse: bool = False,
                        elsewhere: tuple[Path, ...] = (), keep_in: Path | None = None) -> list[dict]:
    """run_all(twins=True), then up the ladder: each setting of `plan` (its runs that differ only in
    their seed) whose second half added CONVERGED_WITHIN points or more on the mean of its seeds
    trains again twice as long, its twin being the run just trained (read back from its folder),
    until the mean passes or the setting has doubled args.max_doublings times (--quick: never).
    Each result is its setting's last run, and gains `rungs`, every length it trained at (epochs,
    top-1, second half added, command), and `setting_converged`, the verdict on the mean of its seeds."""
    results = run_all(args, plan, run_root, reuse, elsewhere, twins=True, keep_in=keep_in)
    rungs = [[rung_of(result)] for result in results]
    settings = {}  # each setting's runs, by index into plan
    for i, (table, name, f, _seed, changes, *rest) in enumerate(plan):
        settings.setdefault((table, name, f, json.dumps(changes, sort_keys=True), *rest), []).append(i)
    doublings = dict.fromkeys(settings, 0)

    def converged(setting) -> bool:
        return setting_converged([results[i]["second_half_adds"] for i in settings[setting]])

    limit = 0 if args.quick else args.max_doublings
    while climbing := [s for s in settings if doublings[s] < limit and not converged(s)]:
        for setting in climbing:
            doublings[setting] += 1
        again_plan = [(i, doublings[setting]) for setting in climbing for i in settings[setting]]
        print(f"  {len(again_plan)} runs whose setting did not converge on the mean of its seeds: trained again twice "
              f"as long, the runs just trained their twins", flush=True)
        again = run_all(args, [plan[i] for i, _ in again_plan], run_root, reuse=True, elsewhere=elsewhere, twins=True,
                        doublings=[doubled for _, doubled in again_plan], keep_in=keep_in)
        for (i, _), result in zip(again_plan, again):
            results[i] = result
            rungs[i].append(rung_of(result))
    verdicts = {i: converged(setting) for setting, members in settings.items() for i in members}
    return [{**result, "rungs": rung, "setting_converged": verdicts[i]}
            for i, (result, rung) in enumerate(zip(results, rungs))]


def rung_of(result: dict) -> dict:
    """What a run's record keeps of one length it climbed through: enough to check it and run it again."""
    return {"epochs": result["settings"]["epochs"], "top1": result["val_top1"],
            "second_half_adds": result["second_half_adds"], "command": result["command"]}


def add_climbing(parser, default: int = MAX_DOUBLINGS):
    """--max-doublings, for the lessons whose runs climb run_until_converged's ladder."""
    parser.add_argument("--max-doublings", type=int, default=default, metavar="N",
                        help=f"double a setting's length at most N times while its second half adds {CONVERGED_WITHIN} "
                             f"points or more on the mean of its seeds (default {default}; 0: each run once, "
                             "beside its twin)")


def climbing_parser(doc: str, script: str, shared: str, doublings: int = MAX_DOUBLINGS):
    """The command line of a lesson whose settings climb the ladder on this recipe (lessons 8
    and 9): the training flags, --seeds, the records of the lesson and of lesson `shared`, whose
    runs it reuses, --keep-finished and --max-doublings (default `doublings`)."""
    parser = training_parser(doc, script, RECIPE, QUICK)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    add_records(parser, Path(script).name[:2], shared)
    add_keep_finished(parser)
    add_climbing(parser, doublings)
    return parser


def judged(run: dict, half: dict) -> dict:
    """A run's result with its twin's evidence and the verdict of the twins' rule."""
    adds = run["val_top1"] - half["val_top1"]
    return {**run, "converged": adds < CONVERGED_WITHIN, "second_half_adds": round(adds, 2),
            "half": {"epochs": half["settings"]["epochs"], "top1": half["val_top1"], "command": half["command"],
                     "seconds": None if half["seconds"] is None else round(half["seconds"], 1)}}


def train_or_read(args, jobs: list[dict], labels: list[str], reuse: bool, elsewhere: tuple[Path, ...],
                  keep_in: Path | None = None, finished=None) -> list[dict]:
    """Each job's result: read from a finished run of the same settings where one is found, else
    trained (and with `keep_in`, kept there as soon as it finishes; `finished(index, result)` is
    called then too, for what must follow a run before a sitting can end)."""
    started = time.perf_counter()
    folders = tuple(path for path in elsewhere if path.suffix not in RECORD_SUFFIXES)
    recorded = recorded_runs(tuple(path for path in elsewhere if path.suffix in RECORD_SUFFIXES))
    found = {i: reuse_finished_run(job, reuse, folders) or recorded_result(job, recorded)
             for i, job in enumerate(jobs)} if reuse or elsewhere else {}
    found = {i: result for i, result in found.items() if result is not None}
    if found:
        from_files = sum("read_from" in result for result in found.values())
        print(f"  {len(found)} of {len(jobs)} runs already done with the same flags: read from their folders"
              + (f" ({from_files} from the JSON files that record them)" if from_files else ""))

    todo = [i for i in range(len(jobs)) if i not in found]
    to_run = [jobs[i] for i in todo]
    if reuse:  # a run cut short keeps its epochs: continued, not trained again
        to_run = [resume_if_cut_short(job) for job in to_run]
        if continued := sum("resume" in job for job in to_run):
            print(f"  {continued} of {len(jobs)} runs stopped before their end: continued from their checkpoints")

    def report(run, result):
        i = todo[to_run.index(run)]
        gain = result["last_quarter_gain"]
        since = f", continued from epoch {result['resumed_from_epoch']}" if "resumed_from_epoch" in result else ""
        print(f"  [{time.perf_counter() - started:5.0f} s] {labels[i]}: top-1 {result['val_top1']:5.1f}%, "
              f"the last quarter added {gain if gain is None else f'{gain:+.2f}'} ({result['seconds']:.0f} s{since})",
              flush=True)
        if keep_in is not None:
            keep_run(keep_in, jobs[i], result, hardware(args.device))
        if finished is not None:
            finished(i, result)

    trained = iter(run_parallel(train_one, to_run, args.workers, args.threads, done=report))
    return [found[i] if i in found else next(trained) for i in range(len(jobs))]


def curve_of(records: list[dict]) -> list[list]:
    """[epoch, top-1] at each evaluation of a run: what the JSON files keep of its metrics."""
    return [[r["epoch"], r["val_top1"]] for r in records]


def keep_run(path: Path, job: dict, result: dict, machine: str):
    """Add one finished run to the JSON-lines file `path`, a line of its own written at once: a
    sitting cut short keeps every run it finished, and `recorded_runs` reads them back."""
    line = {"command": config.command(job), "top1": result["val_top1"], "top5": result["val_top5"],
            "curve": curve_of(result["records"]),
            "seconds": round(result["seconds"], 1), "hardware": machine,
            **({"resumed_from_epoch": result["resumed_from_epoch"]} if "resumed_from_epoch" in result else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(line) + "\n")


def top1_by_length(result: dict) -> dict[int, float]:
    """A climbed run's (run_until_converged's) top-1 at every length it trained: its first twin
    (the first rung's top-1 less what that rung's second half added), then each rung."""
    first = result["rungs"][0]
    lengths = {first["epochs"] // 2: round(first["top1"] - first["second_half_adds"], 2)}
    return lengths | {rung["epochs"]: round(rung["top1"], 2) for rung in result["rungs"]}


def print_by_length(names: list[str], seeds: list[int], results: list[dict]) -> dict:
    """Each setting's top-1 at every length it trained (lengths[name][epochs][seed]; `names` and
    `seeds` give each result's), printed as the mean of its seeds: a paper's figure is at one fixed
    budget, and a setting that converges sooner leads there."""
    lengths = {}
    for name, seed, result in zip(names, seeds, results):
        for epochs, top1 in top1_by_length(result).items():
            lengths.setdefault(name, {}).setdefault(epochs, {})[seed] = top1
    epochs = sorted({e for by in lengths.values() for e in by})
    print("\nEvery setting at each length it trained (mean top-1 of the seeds; each stops where it converged):")
    print("| setting | " + " | ".join(f"{e:,} epochs" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for name, by in lengths.items():
        print(f"| {name} | " + " | ".join(f"{mean(by[e].values()):.2f}" if e in by else "-" for e in epochs) + " |")
    return lengths


def run_record(table: str, name: str, fraction: float, seed: int, result: dict) -> dict:
    """What a lesson's JSON keeps of a run: enough to check it and to run it again, and with a twin
    (run_all's twins), the evidence of its verdict."""
    record = {"table": table, "name": name, "fraction": fraction, "seed": seed, "top1": result["val_top1"],
              "top5": result["val_top5"], "converged": result["converged"],
              "last_quarter_gain": result["last_quarter_gain"],
              "curve": curve_of(result["records"]),
              "parameters": result["parameters"],
              "seconds": None if result["seconds"] is None else round(result["seconds"], 1),
              "read_back": result.get("reused", False), "command": result["command"]}
    if "read_from" in result:  # not trained here: read from the record of the same command, and where
        record["read_from"] = result["read_from"]  # that record names it, the machine it was trained on
        if result.get("hardware"):
            record["hardware"] = result["hardware"]
    if "resumed_from_epoch" in result:  # its seconds are those after the interruption
        record["resumed_from_epoch"] = result["resumed_from_epoch"]
    if "half" in result:
        record.update(second_half_adds=result["second_half_adds"], half=result["half"])
    if "rungs" in result:
        record.update(rungs=result["rungs"], setting_converged=result["setting_converged"])
    return record


def add_keep_finished(parser):
    parser.add_argument("--keep-finished", action="store_true",
                        help="read the runs that an earlier, interrupted invocation finished with the same flags "
                             "from their folders rather than training them again, and continue the runs it left "
                             "unfinished from their checkpoints (one-thread runs are deterministic, and a resumed "
                             "run ends in the weights of an uninterrupted one)")


def convergence_rule(twins: bool) -> str:
    if twins:
        return (f"converged: the same run trained half as long came within {CONVERGED_WITHIN} points of its top-1, "
                f"so training twice as long as that added less than {CONVERGED_WITHIN}")
    return (f"converged: the best validation top-1 of the last quarter of a run's {EVALUATIONS} evaluations is less "
            f"than {CONVERGED_WITHIN} points above the best before them")


def convergence_line(results: list[dict]) -> str:
    verdicts = [r["converged"] for r in results]
    line = (f"converged: {verdicts.count(True)} runs, not converged: {verdicts.count(False)}, too few evaluations to "
            f"judge: {verdicts.count(None)} ({convergence_rule(all('half' in r for r in results))})")
    if not all("setting_converged" in r for r in results):
        return line
    on_the_mean = [r["setting_converged"] for r in results]
    return (f"{line}; on the mean of their setting's seeds: {on_the_mean.count(True)} runs converged, "
            f"{on_the_mean.count(False)} not, after doubling their length up to {max(len(r['rungs']) for r in results) - 1}"
            f" times")


def recipe_line(args) -> str:
    return (f"train.py on {args.dataset}, {args.embed_dim} wide, {args.num_heads} heads, {args.depth} blocks "
            f"(ConViT: {max(args.depth - 2, 1)} GPSA), batch {args.batch_size}, AdamW, peak lr {args.lr:g}, warmup "
            f"{args.warmup_epochs} x 1/f epochs from lr / 100, cosine, max({args.epochs}, {floor_epochs(args)} x 1/f) epochs, "
            f"no RandAugment")
