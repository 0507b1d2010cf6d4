"""The lessons run, and their texts show what their scripts draw.

Each lesson script runs with --quick in a fresh process, exactly as the README shows it (no
--out-dir), and must exit 0, write every figure it promises into the scratch folder it prints
(convit-lessons-quick in the system's temporary folder, never inside the checkout), and leave the
checkout as it was: every committed figure byte for byte, and nothing new. Each text must
embed every figure its script writes, and every figure a text embeds must be committed under
lessons/figures. No text calls the gates Fig. 5 or the nonlocality Fig. 6 (the paper's are the
other way round), and --redraw draws lessons 5 and 10 again from their JSON without changing it.
The README names the batch and the machine of what it measured.
"""

import collections
import contextlib
import hashlib
import importlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import config
from conftest import checkout_status, lesson, one_error_line
from lessons._command import QUICK_FOLDER  # --quick writes there, under the system's temporary folder
from lessons._report import cell, mean  # the lessons' own (statistics.mean can round a .x5 the other way)

ROOT = Path(__file__).resolve().parent
LESSONS = ROOT / "lessons"
FIGURES = {  # script -> the PNG files it writes
    "01_attention_as_convolution.py": ["01_relative_positions.png", "01_heads_as_kernel.png", "01_conv_equality.png"],
    "02_gate.py": ["02_gate_maps.png", "02_gate_curve.png"],
    "03_locality_and_heads.py": ["03_locality_strength.png", "03_head_counts.png"],
    "04_measuring_locality.py": ["04_nonlocality_at_init.png"],
    "05_escaping_locality.py": ["05_escaping_locality.png"],
    "06_sample_efficiency.py": ["06_sample_efficiency.png", "06_ablations.png"],
    "07_speed.py": ["07_throughput.png"],
    "08_position_embedding.py": ["08_position_embedding.png"],
    "09_more_locality.py": ["09_more_locality.png"],
    "10_far_content.py": ["10_far_content.png"],
    "11_locality_over_training.py": ["11_locality_over_training.png", "11_deit_attention_maps.png"],
    "12_what_heads_use.py": ["12_curves.png", "12_table6.png", "12_maps_convit.png", "12_maps_convit_mean.png",
                             "12_maps_deit.png", "12_maps_deit_mean.png", "12_maps_psa.png"],
    "13_what_makes_attention_local.py": ["13_what_makes_attention_local.png"],
    "14_augmentation_and_locality.py": ["14_augmentation_and_locality.png"],
    "15_depth_and_class_token.py": ["15_depth_and_class_token.png"],
    "16_the_grid.py": ["16_the_grid.png"],
    "17_model_size.py": ["17_model_size.png"],
}


SUMMARIES = {  # script -> the machine-readable results it writes beside its figures
    "05_escaping_locality.py": ["05_escaping_locality.json"],
    "06_sample_efficiency.py": ["06_sample_efficiency.json"],
    "08_position_embedding.py": ["08_position_embedding.json"],
    "09_more_locality.py": ["09_more_locality.json"],
    "10_far_content.py": ["10_far_content.json"],
    "11_locality_over_training.py": ["11_locality_over_training.json"],
    "12_what_heads_use.py": ["12_what_heads_use.json"],
    "13_what_makes_attention_local.py": ["13_what_makes_attention_local.json"],
    "14_augmentation_and_locality.py": ["14_augmentation_and_locality.json"],
    "15_depth_and_class_token.py": ["15_depth_and_class_token.json"],
    "16_the_grid.py": ["16_the_grid.json"],
    "17_model_size.py": ["17_model_size.json"],
}


# The protocol's tests train on sklearn's 8x8 digits (2x2 patches): what they check does not need
# MNIST-10k's 28x28 images, and each run takes a fraction of the time.
DIGITS = ["--dataset", "digits"]


def committed_figures() -> dict[str, str]:
    return {str(path.relative_to(LESSONS)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((LESSONS / "figures").rglob("*")) if path.is_file()}


def quick(tmp_path: Path, *argv: str) -> Path:
    """`python lessons/SCRIPT --quick ARGV` from the repository root, in a fresh process whose
    temporary folder is tmp_path; returns the folder it says it wrote its figures into."""
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = tmp_path / QUICK_FOLDER
    assert f"--quick: the figures go to {out}" in done.stdout, done.stdout[:2000]
    return out


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_quick_run_as_the_readme_shows_writes_to_scratch_and_leaves_the_checkout(script, tmp_path):
    before, checkout, started = committed_figures(), checkout_status(), time.time()
    out = quick(tmp_path, str(LESSONS / script), "--quick")
    for name in FIGURES[script] + SUMMARIES.get(script, []):
        written = out / name
        assert written.is_file() and written.stat().st_size > 200, f"{script} did not write {name}"
        assert written.stat().st_mtime >= started - 1, f"{script} left an old {written}"
    assert committed_figures() == before, f"{script} --quick changed committed files under lessons/figures"
    assert checkout_status() == checkout, f"{script} --quick wrote into the checkout"


def test_quick_sweep_writes_its_table_and_leaves_the_checkout(tmp_path):
    before, checkout, started = committed_figures(), checkout_status(), time.time()
    out = quick(tmp_path, str(LESSONS / "06_sample_efficiency.py"), "--quick", "--sweep", *DIGITS)
    sweep = json.loads((out / "06_sweep.json").read_text())
    assert (out / "06_sweep.json").stat().st_mtime >= started - 1
    assert {(run["name"], run["lr"]) for run in sweep["runs"]} == {(m, lr) for m in ("ConViT", "DeiT") for lr in (2e-3, 4e-3)}
    assert committed_figures() == before and checkout_status() == checkout


def test_regularisers_reach_every_run_and_twin_of_both_tables(tmp_path):
    """--regularisers: DeiT's regularisers in the train.py command of every run, its twin's too,
    for both models and Table 3's rows, and named in the settings the figures print."""
    out = quick(tmp_path, str(LESSONS / "06_sample_efficiency.py"), "--quick", "--regularisers", "--fractions", "0.1",
                *DIGITS)
    summary = json.loads((out / "06_sample_efficiency.json").read_text())
    flags = ["--mixup 0.8", "--cutmix 1", "--drop-path 0.1", "--reprob 0.25"]
    assert {run["table"] for run in summary["runs"]} == {"table2", "table3"}
    for run in summary["runs"]:
        for command in (run["command"], run["half"]["command"]):
            assert all(flag in command for flag in flags), command
    assert f"with DeiT's regularisers ({' '.join(flags)})" in summary["settings"]


def test_a_recorded_command_gives_the_recorded_top1_again(tmp_path):
    """What a lesson records of a run is the train.py command that, run again from the repository
    root in a fresh process, gives the same top-1: each flag once, paths relative to the repository."""
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK),
                 ["--quick", "--run-dir", str(tmp_path / "runs"), *DIGITS])
    (result,) = run_all(args, [("t", "DeiT", 0.05, 3, {"model": "deit_tiny"})], tmp_path / "runs")
    argv = shlex.split(result["command"])
    assert argv[:2] == ["python", "train.py"]
    flags = [token for token in argv if token.startswith("--")]
    assert len(flags) == len(set(flags)), f"a flag appears twice: {result['command']}"
    assert argv[argv.index("--data-dir") + 1] == "data" and str(ROOT) not in result["command"].replace(str(tmp_path), "")
    again = tmp_path / "again"
    argv[argv.index("--output-dir") + 1] = str(again)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads((again / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val_top1"] == result["val_top1"] and last["val_loss"] == result["val_loss"]


def test_a_grown_sweep_reads_its_finished_runs_instead_of_training_them_again(tmp_path, monkeypatch):
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, reuse_finished_run, run_all

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick = False  # whole runs (of 1 x 1/f epochs), which a sweep may read back
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 1)
    (first,) = run_all(args, [("t", "DeiT", 0.1, 0, {"model": "deit_tiny"})], tmp_path, reuse=True)
    assert not first.get("reused")
    convit, deit = run_all(args, [("t", "ConViT", 0.1, 0, {}), ("t", "DeiT", 0.1, 0, {"model": "deit_tiny"})],
                           tmp_path, reuse=True)
    assert deit["reused"] and deit["val_loss"] == first["val_loss"] and deit["command"] == first["command"]
    assert not convit.get("reused") and convit["val_loss"] != first["val_loss"]
    # Another lesson's run folder: the run is copied, not moved, and it is the same model whether its
    # GPSA blocks were typed or left to the default (QUICK's 3 blocks make 1 GPSA block).
    (shared,) = run_all(args, [("u", "ConViT", 0.1, 0, {"local_up_to_layer": 1})], tmp_path / "other",
                        elsewhere=(tmp_path,))
    assert shared["reused"] and shared["val_loss"] == convit["val_loss"]
    assert Path(convit["settings"]["output_dir"]).is_dir()
    # A folder renamed by the lesson at work there while it was being copied: no run, and no half copy.
    def torn_copy(source, target):
        Path(target).mkdir(parents=True)
        raise shutil.Error([(str(source), str(target), "No such file or directory")])
    torn = {**convit["settings"], "output_dir": str(tmp_path / "other3" / "run")}
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copytree", torn_copy)
        assert reuse_finished_run(torn, beside=False, elsewhere=(tmp_path,)) is None
    assert not (tmp_path / "other3" / "run").exists()
    other = {**convit["settings"], "local_up_to_layer": 2, "output_dir": str(tmp_path / "other2" / "run")}
    reads = []
    monkeypatch.setattr(_protocol.checkpoints, "read_checkpoint_file",
                        lambda path, read=_protocol.checkpoints.read_checkpoint_file: reads.append(path) or read(path))
    assert reuse_finished_run(other, beside=False, elsewhere=(tmp_path,)) is None  # another model: not the same run
    assert reuse_finished_run({**other, "seed": 1}, beside=False, elsewhere=(tmp_path,)) is None
    assert reads == []  # every checkpoint there was read once already, when the runs above were looked for
    run = Path(convit["settings"]["output_dir"]) / "checkpoint.pth"
    os.utime(run, ns=(run.stat().st_atime_ns, run.stat().st_mtime_ns + 1))  # the file written again: read again
    assert reuse_finished_run(other, beside=False, elsewhere=(tmp_path,)) is None and reads == [run]
    assert _protocol.run_in(tmp_path / "renamed-since" / "checkpoint.pth").run is None  # another lesson moved it


def test_keep_finished_continues_a_run_cut_short_to_the_uninterrupted_runs_weights(tmp_path, monkeypatch, capsys):
    """A sitting stopped mid-run (the machine lost): run again with --keep-finished (reuse), the
    lesson continues that run from its checkpoint instead of training it from epoch 0, and ends
    with what the run would have given uninterrupted; its record says where it was continued."""
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all, run_record, unfinished_run
    from lessons._training import train_one

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick = False  # whole runs of 4 x 1/f epochs
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 4)
    plan = [("t", "DeiT", 0.1, 0, {"model": "deit_tiny"})]
    (whole,) = run_all(args, plan, tmp_path / "whole")
    job = whole["settings"]
    cut = {**job, "output_dir": str(tmp_path / "cut" / Path(job["output_dir"]).name)}
    assert unfinished_run(cut) is None  # no folder yet
    train_one({**cut, "stop_after": 15})  # 15 of 40 epochs, then the sitting ends
    assert unfinished_run(cut) == str(Path(cut["output_dir"]) / "checkpoint.pth")
    assert unfinished_run({**cut, "seed": 1}) is None  # another run's checkpoint is not continued
    assert unfinished_run({**cut, "stop_after": 15}) is None  # a run asked to stop there (--quick's) is done
    (again,) = run_all(args, plan, tmp_path / "cut", reuse=True)
    assert again["resumed_from_epoch"] == 15 and not again.get("reused")
    assert "1 of 1 runs stopped before their end: continued" in capsys.readouterr().out
    assert (again["val_top1"], again["val_loss"]) == (whole["val_top1"], whole["val_loss"])
    assert [r["epoch"] for r in again["records"]] == [r["epoch"] for r in whole["records"]]
    assert again["command"] == whole["command"].replace(str(tmp_path / "whole"), str(tmp_path / "cut"))
    assert run_record("t", "DeiT", 0.1, 0, again)["resumed_from_epoch"] == 15
    (done,) = run_all(args, plan, tmp_path / "cut", reuse=True)  # finished now: read, not continued
    assert done["reused"] and done["val_loss"] == whole["val_loss"]


def test_a_run_recorded_in_a_committed_json_is_read_not_trained(tmp_path, monkeypatch):
    """--recorded: a run whose train.py command a lesson JSON records (here a run's twin, under
    "half", written with another --output-dir and --eval-every) is read from the record, with its
    curve, wherever its folder went; a run the files lack is trained, and kept in a JSON-lines file
    as it finishes, from which it is read back in turn."""
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all, run_record

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick = False
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 2)
    plan = [("t", "DeiT", 0.1, 0, {"model": "deit_tiny"})]
    (whole,) = run_all(args, plan, tmp_path / "first", twins=True)
    record = run_record("t", "DeiT", 0.1, 0, whole)
    record["half"]["command"] = re.sub(r"--eval-every \d+", "--eval-every 5", record["half"]["command"])
    record["half"]["curve"] = [[10, whole["half"]["top1"]]]
    (tmp_path / "06_check.json").write_text(json.dumps({"runs": [record]}))
    shutil.rmtree(tmp_path / "first")
    (again,) = run_all(args, plan, tmp_path / "second", twins=True, elsewhere=(tmp_path / "06_check.json",))
    assert again["reused"] and again["read_from"].endswith("06_check.json")
    assert (again["val_top1"], again["half"]["top1"], again["second_half_adds"]) == (
        whole["val_top1"], whole["half"]["top1"], whole["second_half_adds"])
    assert [r["epoch"] for r in again["records"]] == [r["epoch"] for r in whole["records"]]
    assert not (tmp_path / "second").exists()  # nothing trained
    assert run_record("t", "DeiT", 0.1, 0, again)["read_from"] == again["read_from"]
    seed1 = [("t", "DeiT", 0.1, 1, {"model": "deit_tiny"})]
    kept = tmp_path / "sittings.jsonl"
    (other,) = run_all(args, seed1, tmp_path / "second", elsewhere=(tmp_path / "06_check.json",), keep_in=kept)
    assert not other.get("reused") and "read_from" not in other  # seed 1: not recorded, so trained ...
    (line,) = [json.loads(line) for line in kept.read_text().splitlines()]  # ... and kept as it finished
    assert (line["command"], line["top1"]) == (other["command"], other["val_top1"])
    shutil.rmtree(tmp_path / "second")
    with open(kept, "a") as file:
        file.write('{"command": "python train.py --seed')  # a line cut short by a machine that stopped
    (back,) = run_all(args, seed1, tmp_path / "third", elsewhere=(kept,))
    assert back["reused"] and back["val_top1"] == other["val_top1"] and not (tmp_path / "third").exists()
    # The same run recorded twice with two top-1s (two machines): refused, not one picked
    (tmp_path / "other.json").write_text(json.dumps({"runs": [{**record, "top1": record["top1"] - 1}]}))
    with pytest.raises(ValueError, match="two records of one run disagree"):
        run_all(args, plan, tmp_path / "fourth", elsewhere=(tmp_path / "06_check.json", tmp_path / "other.json"))


def test_lesson8_trains_again_for_its_weights_a_run_read_from_a_record(tmp_path, monkeypatch):
    """A record keeps a run's top-1, not its weights, and lesson 8 tests each run with the position
    embedding masked: a run with the embedding read from a record is trained again, to the top-1 the
    record holds (one machine, deterministic), and then tested masked; a run without it is not. Each
    test is kept as its run finishes, so that the next sitting, on a machine without the weights,
    reads it and trains nothing."""
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, recorded_runs, run_all, run_record
    from lessons._report import hardware
    from lessons._training import at_repository_root
    import train

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick = False
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 2)
    plan = [("t", "DeiT", 0.1, 0, {"model": "deit_tiny"}), ("t", "DeiT", 0.1, 0, {"model": "deit_tiny", "no_pos_embed": True})]
    first = run_all(args, plan, tmp_path / "first")
    (tmp_path / "records.json").write_text(json.dumps({"runs": [run_record("t", "DeiT", 0.1, 0, r) for r in first]}))
    shutil.rmtree(tmp_path / "first")
    read = run_all(args, plan, tmp_path / "second", elsewhere=(tmp_path / "records.json",))
    assert [r.get("reused") for r in read] == [True, True] and not (tmp_path / "second").exists()
    module = lesson("08")
    # A sitting cut short left the weights half trained: they are continued to the end, not tested as they are.
    with at_repository_root():
        train.run(config.resolve({**read[0]["settings"], "stop_after": 1})[0])
    weighed, masked = module.tested_masked(args, plan, read, (), {}, None)
    assert [path.name for path in (tmp_path / "second").iterdir()] == [Path(read[0]["settings"]["output_dir"]).name]
    assert (weighed[0]["val_top1"], weighed[1], masked[1]) == (first[0]["val_top1"], read[1], None)
    evaluation, scores = masked[0]
    assert evaluation["mask_pos_embed"] and evaluation["checkpoint"] == weighed[0]["settings"]["output_dir"]
    # The weights tested masked are the recorded run's: tested unmasked, they give its top-1 exactly.
    with at_repository_root():
        unmasked = train.run(config.resolve({**evaluation, "mask_pos_embed": False})[0])
    assert unmasked["val_top1"] == first[0]["val_top1"]
    assert "two_machines" not in weighed[0]  # a record that names no machine: taken as this one
    # A record from another machine: the weights trained here keep both top-1s, each with its machine,
    # and their test is kept as soon as it is made (keep_in), with the top-1s of the weights it tested.
    shutil.rmtree(tmp_path / "second")
    (tmp_path / "other.json").write_text(json.dumps({"hardware": "CPU Other, 2 cores", "runs": [
        {**run_record("t", "DeiT", 0.1, 0, r), "top1": r["val_top1"] - 1.5} for r in first]}))
    read = run_all(args, plan, tmp_path / "second", elsewhere=(tmp_path / "other.json",))
    kept = tmp_path / "08_check" / "masked.jsonl"
    weighed, masked = module.tested_masked(args, plan, read, (), {}, kept)
    assert weighed[0]["two_machines"] == {"first": {"machine": "CPU Other, 2 cores", "top1": first[0]["val_top1"] - 1.5},
                                          "second": {"machine": hardware(args.device), "top1": first[0]["val_top1"]}}
    assert weighed[0]["val_top1"] == first[0]["val_top1"] and "two_machines" not in weighed[1]
    assert weighed[0]["hardware"] == hardware(args.device)  # what trained_on names for the top-1 it now holds
    (line,) = [json.loads(line) for line in kept.read_text().splitlines()]
    assert line["top1"] == {"unmasked": first[0]["val_top1"], "masked": scores["val_top1"]}
    assert line["hardware"] == hardware(args.device) and line["evaluation"]["command"] == config.command(masked[0][0])
    assert recorded_runs((kept,)) == {}  # not a second record of the run, which lesson 6 may hold from another machine
    # The next sitting, without the weights: reads the test, trains and evaluates nothing.
    shutil.rmtree(tmp_path / "second")
    read = run_all(args, plan, tmp_path / "second", elsewhere=(tmp_path / "other.json",))
    monkeypatch.setattr(module, "masked_evaluation", lambda settings: pytest.fail("evaluated again"))
    again, again_masked = module.tested_masked(args, plan, read, (), module.masked_tests(kept), None)
    assert not (tmp_path / "second").exists()
    assert (again[0]["val_top1"], again[0]["two_machines"]) == (weighed[0]["val_top1"], weighed[0]["two_machines"])
    assert again_masked[0][1] == masked[0][1] and config.command(again_masked[0][0]) == config.command(masked[0][0])


def test_lesson6_recorded_reads_one_machines_runs_and_finds_every_ladder_run_in_them():
    """--recorded's files agree with each other (recorded_runs refuses two top-1s for one run), and
    every run and twin of the ladder is found there by its command, with its recorded top-1."""
    from lessons._protocol import defining_key, recorded_files, recorded_runs

    module = lesson("06")
    files = recorded_files("06")
    assert module.CHECKS / "ladder.json" in files and module.CHECKS / "recipe_check.json" in files
    assert not any(path.parent == LESSONS / "figures" for path in files)  # the Intel VM's runs: another CPU
    recorded = recorded_runs(files)
    # The ladder holds the last pair of every Table 2 run of the lesson's own climb (figures/06_check/climb).
    climb = json.loads((module.CHECKS / "climb" / "06_sample_efficiency.json").read_text())["runs"]
    pairs = {(p["name"], p["seed"], p["fraction"], p["top1"], p["half"]["top1"]) for p in module.ladder_pairs()}
    assert {(r["name"], r["seed"], r["fraction"], r["top1"], r["half"]["top1"]) for r in climb} <= pairs
    assert module.CHECKS / "climb" / "06_sample_efficiency.json" in module.ladder_lesson_files()
    for run in [p for pair in module.ladder_pairs() for p in (pair, pair["half"])]:
        cfg, _ = config.resolve(config.parse(shlex.split(run["command"])[2:]))
        assert recorded[defining_key(cfg)]["top1"] == run["top1"], run["command"]


def test_lesson6_by_default_reads_the_recorded_runs_and_trains_only_what_they_lack(tmp_path, monkeypatch, capsys):
    """The lesson takes 25 to 30 hours to train whole, so by default it reads each run figures/06_check
    records: at f = 5% and 100%, every rung of both models' climbs is there, so it trains nothing
    and gives the climb's Table 2 again, without writing into the checkout; --retrain trains them."""
    from lessons import _protocol

    def no_training(function, jobs, *rest, **options):
        if jobs:
            raise RuntimeError(f"trained {len(jobs)} runs")
        return []

    module, before, checkout = lesson("06"), committed_figures(), checkout_status()
    monkeypatch.setattr(_protocol, "run_parallel", no_training)
    flags = ["--fractions", "0.05", "1", "--out-dir", str(tmp_path / "out"), "--run-dir", str(tmp_path / "runs")]
    assert cli.run_command(module.main, flags) == 0
    summary = json.loads((tmp_path / "out" / "06_sample_efficiency.json").read_text())
    climb = committed("06_check/climb/06_sample_efficiency.json")
    assert [run["read_from"].startswith("lessons/figures/06_check/") for run in summary["runs"]] == [True] * 12
    assert summary["table2_mean_top1"] == climb["table2_mean_top1"], capsys.readouterr().out
    assert summary["gain_per_seed"] == climb["gain_per_seed"]
    # The check on the rule: ConViT one doubling past where it passed (960 epochs at 5%, 96 at 100%),
    # its twin the run the rule stopped at, and its gain against DeiT at DeiT's own length.
    past = summary["convit_one_rung_past"]
    assert {f: at["epochs"] for f, at in past.items()} == {"0.05": 1920, "1": 192}
    for f, at in past.items():
        rule = {run["seed"]: run for run in summary["runs"] if run["fraction"] == float(f) and run["table"] == "table2"
                and run["name"] == "ConViT"}
        deit = {run["seed"]: run["top1"] for run in summary["runs"] if run["fraction"] == float(f)
                and run["name"] == "DeiT"}
        assert at["adds"] == {str(s): round(at["top1"][str(s)] - rule[s]["top1"], 2) for s in (0, 1, 2)}
        assert at["gain"]["relative"] == [round(100 * (at["top1"][str(s)] / deit[s] - 1), 2) for s in (0, 1, 2)]
    # Table 2 at every length both trained: each climb's first twin up to ConViT's check.
    by_length = summary["table2_by_length"]
    assert {f: list(by) for f, by in by_length.items()} == {"0.05": ["240", "480", "960", "1920"],
                                                           "1": ["48", "96", "192"]}
    assert list(by_length["0.05"]["1920"]["ConViT"].values()) == list(past["0.05"]["top1"].values())
    assert committed_figures() == before and checkout_status() == checkout
    with pytest.raises(RuntimeError, match="trained 24 runs"):  # 12 runs and their twins
        module.main([*flags, "--retrain"])


def test_each_fraction_trains_the_recipes_epochs_and_never_fewer_steps_than_table2s(tmp_path):
    """The protocol of lesson 6: max(96, 24 / f) epochs, the warmup 4 / f, 12 evaluations; the twin
    differs from its run in its length alone (and so in how often it is evaluated)."""
    from lessons._command import parse, run_settings, training_parser
    from lessons._protocol import QUICK, RECIPE, schedule, twin

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--run-dir", str(tmp_path)])
    made = {f: schedule(args, f, args.warmup_epochs) for f in (0.05, 0.1, 0.3, 0.5, 1.0)}
    assert {f: s["epochs"] for f, s in made.items()} == {0.05: 480, 0.1: 240, 0.3: 96, 0.5: 96, 1.0: 96}
    assert {f: s["warmup_epochs"] for f, s in made.items()} == {0.05: 80, 0.1: 40, 0.3: 13, 0.5: 8, 1.0: 4}
    assert {f: s["eval_every"] for f, s in made.items()} == {0.05: 40, 0.1: 20, 0.3: 8, 0.5: 8, 1.0: 8}
    run = run_settings(args, tmp_path / "run", seed=2, **made[0.05])
    half = twin(run, tmp_path / "run-half")
    assert (half["epochs"], half["eval_every"], half["output_dir"]) == (240, 20, str(tmp_path / "run-half"))
    assert {k: v for k, v in half.items() if k not in ("epochs", "eval_every", "output_dir")} == \
        {k: v for k, v in run.items() if k not in ("epochs", "eval_every", "output_dir")}


def test_a_run_typed_with_scale_epochs_is_the_same_run_as_its_epochs_typed_out():
    import config
    from lessons._protocol import what_defines

    typed_out = what_defines(config.resolve({"dataset": "digits", "data_fraction": 0.05, "epochs": 20})[0])
    scaled = {"dataset": "digits", "data_fraction": 0.05, "epochs": 1, "scale_epochs": True}
    assert what_defines(config.resolve(scaled)[0]) == typed_out
    assert what_defines(config.resolve({**scaled, "epochs": 2})[0]) != typed_out


def test_a_run_is_judged_by_its_twin_trained_half_as_long(tmp_path, monkeypatch):
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_all, run_record

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick = False  # whole runs, not stopped after QUICK_STOP epochs, so that the twin is shorter ...
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 1)  # ... of 1 x 1/f epochs: seconds
    (run,) = run_all(args, [("t", "ConViT", 0.25, 0, {})], tmp_path, twins=True)
    assert (run["settings"]["epochs"], run["half"]["epochs"]) == (4, 2)
    assert " --epochs 2 " in run["half"]["command"] and f" --output-dir {run['settings']['output_dir']}-half " in \
        run["half"]["command"]
    assert run["second_half_adds"] == round(run["val_top1"] - run["half"]["top1"], 2)
    assert run["converged"] == (run["val_top1"] - run["half"]["top1"] < 0.5)
    record = run_record("t", "ConViT", 0.25, 0, run)
    assert record["half"] == run["half"] and record["second_half_adds"] == run["second_half_adds"]


def test_a_setting_not_converged_climbs_the_ladder_and_each_rungs_twin_is_the_run_before_it(tmp_path, monkeypatch):
    """run_until_converged doubles a setting's length while its second half adds 0.5 points or more,
    up to --max-doublings times; the twin of each new rung is the run of the rung below, read back
    from its folder, so that a ladder of k rungs trains k + 1 runs, not 2k."""
    from lessons import _protocol, _training
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_until_converged

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick, args.max_doublings = False, 2  # whole runs, of 1 x 1/f epochs at the first rung
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 1)
    trained = []
    monkeypatch.setattr(_protocol, "train_one", lambda settings: trained.append(settings["epochs"]) or
                        _training.train_one(settings))
    monkeypatch.setattr(_protocol, "CONVERGED_WITHIN", -1000.0)  # never converged: it climbs to the top
    (run,) = run_until_converged(args, [("t", "ConViT", 0.25, 0, {})], tmp_path)
    assert [rung["epochs"] for rung in run["rungs"]] == [4, 8, 16] and sorted(trained) == [2, 4, 8, 16]
    assert (run["settings"]["epochs"], run["half"]["epochs"], run["setting_converged"]) == (16, 8, False)
    assert run["rungs"][1]["top1"] == run["half"]["top1"]  # the twin of the top rung is the rung below
    assert run["rungs"][-1]["command"] == run["command"] and " --epochs 8 " in run["rungs"][1]["command"]
    monkeypatch.setattr(_protocol, "CONVERGED_WITHIN", 1000.0)  # always converged: one rung
    (run,) = run_until_converged(args, [("u", "ConViT", 0.25, 0, {})], tmp_path)
    assert [rung["epochs"] for rung in run["rungs"]] == [4] and run["setting_converged"]


@pytest.mark.parametrize("adds, climbs", [((0.8, 0.0, 0.3), False), ((0.8, 0.4, 0.4), True)])
def test_a_setting_is_judged_on_the_mean_of_its_seeds(tmp_path, monkeypatch, adds, climbs):
    """Seed 0's second half adds 0.8 points: a setting whose seeds' mean stays under 0.5 stops there,
    and one whose mean reaches it trains every seed again twice as long."""
    from lessons import _protocol
    from lessons._command import parse, training_parser
    from lessons._protocol import QUICK, RECIPE, run_until_converged

    def fake_run(settings):  # the run at epochs E ends at 90 + adds[seed] where its twin ends at 90
        top1 = 90.0 + (adds[settings["seed"]] if settings["epochs"] % 4 == 0 else 0.0)
        return {"val_top1": top1, "val_top5": 100.0, "val_loss": 0.1, "parameters": 1, "seconds": 0.0,
                "cpu_seconds": 0.0, "records": [], "last_quarter_gain": None, "converged": None}

    args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", "--run-dir", str(tmp_path), *DIGITS])
    args.quick, args.max_doublings = False, 1
    monkeypatch.setattr(_protocol, "FLOOR_EPOCHS", 1)
    monkeypatch.setattr(_protocol, "train_one", fake_run)
    plan = [("t", "ConViT", 0.25, seed, {}) for seed in (0, 1, 2)] + [("t", "DeiT", 0.25, 0, {"model": "deit_tiny"})]
    results = run_until_converged(args, plan, tmp_path)
    assert [r["rungs"][0]["second_half_adds"] for r in results[:3]] == list(adds)
    assert [len(r["rungs"]) for r in results] == [2 if climbs else 1] * 3 + [2]  # DeiT, a setting of its own: +0.8
    assert [r["settings"]["epochs"] for r in results] == [8 if climbs else 4] * 3 + [8]


def test_lesson6_table3_by_length_keeps_every_rung_and_the_first_twin():
    """Table 3 at every length: Table 2's ConViT and DeiT are rows a and e, the first twin's top-1
    is its run's less what the second half added, and other fractions are left out."""
    module = lesson("06")
    plan = [("table2", "ConViT", 0.1, 0, {}), ("table3", "g", 0.1, 0, {}), ("table2", "DeiT", 0.05, 0, {})]

    def result(*rungs):
        return {"rungs": [{"epochs": e, "top1": top1, "second_half_adds": adds} for e, top1, adds in rungs]}

    results = [result((240, 94.9, 1.0)), result((240, 91.0, 8.0), (480, 93.0, 2.0)), result((480, 90.0, 1.0))]
    assert module.lengths_of(plan, results, 0.1) == {"a": {120: {0: 93.9}, 240: {0: 94.9}},
                                                     "g": {120: {0: 83.0}, 240: {0: 91.0}, 480: {0: 93.0}}}


@pytest.mark.parametrize("at_full, answer", [((1.0, 0.5, 1.2), "yes"), ((3.6, 4.0, 5.0), "no, it grows"),
                                            ((2.0, 3.0, 4.0), "not beyond the seeds' spread")])
def test_lesson6_says_the_gain_shrinks_only_when_the_seeds_ranges_part(at_full, answer):
    gains = {0.05: {"relative": [3.0, 2.5, 3.5], "errors_avoided": [30, 20, 25]},
             0.5: {"relative": [9.0, 9.0, 9.0], "errors_avoided": [50, 50, 50]},
             1.0: {"relative": list(at_full), "errors_avoided": [40, 45, 50]}}
    said = lesson("06").does_the_gain_shrink(gains)
    assert said.startswith(answer + ":") and "at f = 5%" in said and "at f = 100%" in said, said
    assert "the share of DeiT's errors that ConViT avoids is 25 (20-30)% and 45 (40-50)%" in said, said
    assert lesson("06").does_the_gain_shrink({1.0: gains[1.0]}).startswith("one fraction (100%) cannot say")


def test_lesson6_says_there_is_no_gain_to_shrink_where_convit_never_beats_deit():
    """Our converged ends: ConViT behind with every seed at 5% and 100%. The deficit narrows in the
    paper's measure (the ranges part) while the share of errors overlaps; one seed level with DeiT
    still counts as no gain, one seed ahead does not."""
    gains = {0.05: {"relative": [-2.86, -2.47, -1.63], "errors_avoided": [-70, -52, -33]},
             1.0: {"relative": [-0.71, -0.46, -0.15], "errors_avoided": [-82, -46, -16]}}
    said = lesson("06").does_the_gain_shrink(gains)
    assert said.startswith("no, there is no gain to shrink:"), said
    assert said.endswith("the deficit narrows with data, as a share of DeiT's errors it does not change beyond the "
                         "seeds' spread."), said
    gains[1.0]["relative"][2] = 0.0
    assert lesson("06").does_the_gain_shrink(gains).startswith("no, there is no gain to shrink:")
    gains[1.0]["relative"][2] = 0.1
    assert lesson("06").does_the_gain_shrink(gains).startswith("no, it grows:")


def test_lesson6_ladder_answer_names_the_settings_whose_longest_runs_still_climb():
    def pair(name, seed, epochs, adds):
        return {"name": name, "seed": seed, "fraction": 1.0, "epochs": epochs, "second_half_adds": adds}

    # DeiT's longest rung that every seed ran is 192 (mean of 1.0, 0.9, 0.8 = 0.9): seed 0's pair of
    # 384 (+0.1) alone cannot pass the setting, though the mean of each seed's longest (0.6) ...
    deit = [pair("DeiT", 0, 192, 1.0), pair("DeiT", 0, 384, 0.1), pair("DeiT", 1, 192, 0.9), pair("DeiT", 2, 192, 0.8)]
    convit = [pair("ConViT", seed, 192, adds) for seed, adds in enumerate((0.2, 0.7, 0.4))]  # mean 0.43
    said = lesson("06").longest_caveat(convit + deit)
    assert said == ("Not a finding yet: DeiT at 100% (+0.90 at 192 epochs; 384 has 1 of 3 seeds) still climbs on the "
                    "mean of its seeds (what the second half added, at the longest length that every seed ran)."), said
    # ... and the mean of each seed's longest would pass it here (0.1, 0.1, 0.8: 0.33), where the rung of
    # 384 is still short of seed 2
    mixed = deit + [pair("DeiT", 1, 384, 0.1)]
    assert "DeiT at 100% (+0.90 at 192 epochs; 384 has 2 of 3 seeds)" in lesson("06").longest_caveat(convit + mixed)
    slow = [pair("ConViT", seed, 192, 0.6) for seed in range(3)]  # two settings climbing: the plural
    assert lesson("06").longest_caveat(slow + deit).startswith(
        "Not a finding yet: ConViT at 100% (+0.60 at 192 epochs), DeiT at 100% (+0.90 at 192 epochs; 384 has 1 of 3 "
        "seeds) still climb on the mean of their seeds")
    assert lesson("06").longest_caveat(convit + mixed + [pair("DeiT", 2, 384, 0.6)]).startswith(
        "Every model's longest runs are converged")  # 384 on every seed: mean 0.27
    assert lesson("06").longest_caveat(convit + deit[:2]).startswith("Every model's longest runs are converged")


def test_convergence_rule_compares_the_last_quarter_with_the_best_before_it():
    from lessons._training import convergence

    def records(*top1):
        return [{"epoch": i + 1, "val_top1": t} for i, t in enumerate(top1)]

    assert convergence(records(10, 50, 80, 90, 95, 96, 96.2, 96.3)) == {"last_quarter_gain": 0.3, "converged": True}
    assert convergence(records(10, 50, 80, 90, 95, 96, 96.2, 97.0)) == {"last_quarter_gain": 1.0, "converged": False}
    assert convergence(records(10, 50, 97, 96, 95, 94, 96.5, 96.0)) == {"last_quarter_gain": -0.5, "converged": True}
    assert convergence(records(10, 50, 80)) == {"last_quarter_gain": None, "converged": None}  # too few to judge


def test_a_cell_is_the_mean_and_range_of_the_seeds_and_a_minus_sign_never_reads_as_a_dash():
    assert cell([86.9]) == "86.9" and cell([85.8, 87.0, 89.7]) == "87.5 (85.8-89.7)"
    assert cell([-0.35, 0.35], 2) == "0.00 (-0.35 to 0.35)" and cell([-3.0, -1.0]) == "-2.0 (-3.0 to -1.0)"


def test_training_runs_in_parallel_processes_keep_their_order():
    from lessons._training import run_parallel

    finished = []
    results = run_parallel(math.sqrt, [16.0, 1.0, 9.0, 4.0], workers=2, threads=1,
                           done=lambda item, result: finished.append(item))
    assert results == [4.0, 1.0, 3.0, 2.0] and sorted(finished) == [1.0, 4.0, 9.0, 16.0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with their lesson on Linux only")
def test_a_killed_lessons_workers_end_with_it_rather_than_train_on():
    """A lesson killed outright (SIGKILL: no handler of its own runs) takes its training processes
    with it, so that started again it finds no run folder still locked by an orphan."""
    lesson = subprocess.Popen([sys.executable, "-c", "import time; from lessons._training import run_parallel; "
                               "run_parallel(time.sleep, [600.0, 600.0], workers=2, threads=1)"], cwd=ROOT)

    def proc(pid: int, name: str) -> str:  # a field of a live process from /proc, "" once it has ended
        try:
            return Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            return ""

    def state(pid: int) -> list[str]:  # /proc/PID/stat after the command's name: [state, parent, ...]
        return proc(pid, "stat").rsplit(")", 1)[-1].split() or ["ended"]

    sleeping, deadline = set(), time.time() + 120
    try:
        while len(sleeping) < 2 and time.time() < deadline:  # both workers inside their job, time.sleep
            time.sleep(0.5)
            pids = [int(path.name) for path in Path("/proc").glob("[0-9]*")]
            children = {pid for pid in pids if state(pid)[1:2] == [str(lesson.pid)]}
            sleeping = {pid for pid in children if "nanosleep" in proc(pid, "wchan")}
        assert len(sleeping) == 2, "the lesson's two workers never started their jobs"
        lesson.kill()
        lesson.wait()
        deadline = time.time() + 30
        while (alive := {pid for pid in sleeping if state(pid)[0] not in ("ended", "Z")}) and time.time() < deadline:
            time.sleep(0.5)
        assert not alive, f"workers {sorted(alive)} outlived their killed lesson"
    finally:
        lesson.kill()
        for pid in sleeping:  # where the test fails, the orphans it found
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("script", sorted(FIGURES))
def test_lesson_text_embeds_the_committed_figures_of_its_script(script):
    text = (LESSONS / script).with_suffix(".md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(figures/([^)]+\.png)\)", text)
    missing = set(FIGURES[script]) - set(embedded)
    assert not missing, f"{script}'s text does not show {sorted(missing)}"
    for name in embedded:
        assert (LESSONS / "figures" / name).is_file(), f"figures/{name} is not committed"


def test_reading_order_lists_every_lesson():
    readme = (LESSONS / "README.md").read_text()
    for script in FIGURES:
        assert f"({Path(script).stem}.md)" in readme, f"lessons/README.md does not link {Path(script).stem}.md"


# ---------------------------------------------------------------------------------------
# The texts quote the committed results: every number is recomputed from the JSON the default
# run wrote (every run's top-1, or its metrics.jsonl records) and looked up in the text, in the
# line that should hold it, formatted as the script prints it.
# ---------------------------------------------------------------------------------------
def rounds_to(quoted: str, value: float) -> bool:
    """A number quoted to its last digit is `value` rounded: within half a unit of that digit (and
    a hair more, for a value on a tie, which a float32 mean and a float64 one can round apart)."""
    digits = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - value) <= 0.5 * 10 ** -digits + 1e-6


def committed(name: str) -> dict:
    return json.loads((LESSONS / "figures" / name).read_text())


def line_of(text: str, start: str) -> str:
    found = [line.replace("**", "") for line in text.splitlines() if line.startswith(start)]
    assert found, f"no line starts with {start!r}"
    return found[0]


def text_of(lesson: str) -> str:
    return (LESSONS / lesson).read_text()


def readme_finding(start: str) -> str:
    return line_of((ROOT / "README.md").read_text(), f"| {start}")


def test_lesson5_quotes_its_runs():
    lesson5, text = committed("05_escaping_locality.json"), text_of("05_escaping_locality.md")
    runs = lesson5["runs"]
    for row in lesson5["per_block"]:
        block = row["block"] - 1
        line = line_of(text, f"| {row['block']} ({row['kind']}) |")
        first, last = (mean(mean(run["records"][i]["nonlocality"][block]) for run in runs) for i in (0, -1))
        quoted = re.search(r"\| (\d\.\d\d) -> (\d\.\d\d) \|", line)
        assert quoted and rounds_to(quoted[1], first) and rounds_to(quoted[2], last), \
            f"block {row['block']}: nonlocality {first:.2f} -> {last:.2f}: {line}"
        if row["kind"] == "GPSA":
            gate = mean(mean(run["records"][-1]["gates"][block]) for run in runs)
            quoted = re.search(r"\| \d\.\d{3} -> (\d\.\d{3}) \|", line)
            assert quoted and rounds_to(quoted[1], gate), f"block {row['block']}: final sigma(lambda) {gate:.3f}: {line}"
    epochs = runs[0]["records"][-1]["epoch"]
    quoted = " and ".join(f"{run['val_top1']:.1f}%" for run in runs)
    assert f"Top-1 after {epochs} epochs: {quoted}." in " ".join(text.split()), f"lesson 5: top-1 {quoted}"


def test_lesson6_quotes_its_runs_and_its_sweep():
    """Table 2 and Table 3 as the page quotes them, from the JSON's runs: each model where its
    setting converged (the length from its command), the gain seed by seed, ConViT's check one
    doubling past, Table 3 at the paper's 240 epochs, and the answer; and the earlier protocol's
    equal-steps Table 2 from its own JSON."""
    lesson6, text = committed("06_sample_efficiency.json"), text_of("06_sample_efficiency.md")
    table2 = text.split("## Table 2")[1].split("### At the paper's equal steps")[0]
    top1, epochs = collections.defaultdict(dict), collections.defaultdict(set)
    for run in lesson6["runs"]:
        top1[run["table"], run["name"], run["fraction"]][run["seed"]] = run["top1"]
        epochs[run["name"], run["fraction"]].add(int(re.search(r" --epochs (\d+) ", run["command"])[1]))
        assert run["command"].startswith("python train.py ") and " --seed " in run["command"]
        assert run["converged"] == (run["second_half_adds"] < 0.5) and run["setting_converged"], run["command"]
    past = lesson6["convit_one_rung_past"]
    for fraction in sorted({f for table, _, f in top1 if table == "table2"}):
        deit, convit = top1["table2", "DeiT", fraction], top1["table2", "ConViT", fraction]
        gains = [round(100 * (convit[s] / deit[s] - 1), 2) for s in sorted(deit)]
        (deit_epochs,), (convit_epochs,) = epochs["DeiT", fraction], epochs["ConViT", fraction]
        line = line_of(table2, f"| {fraction:.0%} |")
        assert (f"| {deit_epochs:,}, {convit_epochs:,} | {cell(list(deit.values()))} | {cell(list(convit.values()))} "
                f"| {cell(gains)}% |") in line, f"lesson 6, f = {fraction:.0%}: {line}"
        at = past[f"{fraction:g}"]
        line = line_of(table2.split("**ConViT one doubling past the rule**")[1], f"| {fraction:.0%} |")
        assert f"| {at['epochs']} | {cell(list(at['top1'].values()))} |" in line, f"lesson 6's check at {fraction:.0%}"
        assert f"| {cell(at['gain']['relative'], 2)}% | {cell(gains, 2)}% |" in line, line
    assert lesson6["does_the_gain_shrink"] in " ".join(table2.split()), lesson6["does_the_gain_shrink"]
    table3 = text.split("## Table 3")[1]
    for row, by_length in lesson6["table3_by_length"].items():
        values = list(top1["table3", row, 0.1].values()) or list(
            top1["table2", {"a": "ConViT", "e": "DeiT"}[row], 0.1].values())
        last = max(by_length, key=int)
        assert list(by_length[last].values()) == values and rounds_to(f"{lesson6['table3_mean_top1'][row]:.2f}",
                                                                      mean(values))
        quoted = f"| {int(last):,} | {cell(values)} | {cell(list(by_length['240'].values()))} |"
        assert quoted in line_of(table3, f"| {row}: "), f"lesson 6, Table 3 row {row}: {quoted}"
    equal = committed("06_equal_steps.json")
    old = collections.defaultdict(list)
    for run in equal["runs"]:
        old[run["name"], run["fraction"]].append(run["top1"])
    for fraction in sorted({f for _, f in old}):
        deit, convit = old["DeiT", fraction], old["ConViT", fraction]
        line = line_of(text.split("### At the paper's equal steps")[1], f"| {fraction:.0%} |")
        assert f"| {cell(deit)} | {cell(convit)} | {100 * (mean(convit) / mean(deit) - 1):+.1f}% |" in line, line
    sweep = committed("06_sweep.json")
    for name in ("ConViT", "DeiT"):
        for fraction in (1.0, 0.1):
            cells = [f"{run['top1']:.1f}" for run in sorted(sweep["runs"], key=lambda r: (r["lr"], r["warmup_epochs"]))
                     if run["name"] == name and run["fraction"] == fraction]
            line = line_of(text, f"| {name}, f = {fraction:.0%} |")
            assert re.search(r"\s*\|\s*".join(map(re.escape, cells)), line), f"lesson 6's sweep, {name} at {fraction}: {line}"
    deit_full = list(top1["table2", "DeiT", 1.0].values())
    sanity = line_of(text, "- **The sanity check: DeiT's own network at f = 100% reaches")
    assert f"reaches {mean(deit_full):.1f}% ({min(deit_full):.1f}-{max(deit_full):.1f})" in sanity, sanity


def test_lesson6_quotes_the_twins_that_test_its_protocol():
    """The runs that tested the new protocol's length: every run and its twin, as the table quotes them."""
    text = text_of("06_sample_efficiency.md")
    for check in ("e96_seed0", "e96_seed1", "e192_seed0"):
        lesson6 = committed(f"06_check/{check}/06_sample_efficiency.json")
        assert lesson6["command"].startswith("python lessons/06_sample_efficiency.py --fractions ")
        for run in lesson6["runs"]:
            epochs = int(re.search(r" --epochs (\d+) ", run["command"])[1])
            quoted = (f"| {run['name']} | {run['seed']} | {run['fraction']:.0%} | {run['half']['epochs']}: "
                      f"{run['half']['top1']:.2f} | "
                      f"{epochs}: {run['top1']:.2f} | {run['second_half_adds']:+.2f} | {'yes' if run['converged'] else 'no'} |")
            assert run["half"]["epochs"] * 2 == epochs and f" --epochs {epochs // 2} " in run["half"]["command"]
            assert quoted in text, f"lesson 6's twins: {quoted}"


def test_lesson6_quotes_the_longer_twins_and_the_batch_probe():
    """The next rungs of the ladder (train.py commands in 06_check/ladder.json): each twin is its
    run made half as long by the protocol's own `twin`, and each row and verdict is quoted as the
    JSON has it; the batch probe's rows too, with their steps on MNIST-10k's 8,000 training images."""
    from lessons._protocol import CONVERGED_WITHIN, twin
    text, ladder = text_of("06_sample_efficiency.md"), committed("06_check/ladder.json")
    assert ladder["runs"], "no twin pairs"
    for run in ladder["runs"]:
        epochs, half = run["epochs"], run["half"]
        settings, half_settings = (config.parse(shlex.split(c)[2:]) for c in (run["command"], half["command"]))
        # The twins the lesson trained carry --overwrite, which decides where a run may go, not what it is.
        half_settings.pop("overwrite", None)
        assert settings["epochs"] == epochs and half_settings["epochs"] == half["epochs"]
        assert twin(settings, Path(half_settings["output_dir"])) == half_settings, half["command"]
        assert run["second_half_adds"] == round(run["top1"] - half["top1"], 2)
        assert run["converged"] == (run["second_half_adds"] < CONVERGED_WITHIN)
        quoted = (f"| {run['name']} | {run['seed']} | {run['fraction']:.0%} | {half['epochs']}: {half['top1']:.2f} | "
                  f"{epochs}: {run['top1']:.2f} | {run['second_half_adds']:+.2f} | {'yes' if run['converged'] else 'no'} |")
        assert quoted in text, f"lesson 6's longer twins: {quoted}"
    # The probe's last column: the batch-64 run of the same model, seed and fraction at the same steps.
    points, _ = lesson("06").ladder_points(lesson("06").ladder_pairs())
    for probe in ladder["batch_probe"]:
        steps = probe["epochs"] * 8000 // probe["batch_size"]
        assert f" --batch-size {probe['batch_size']} " in probe["command"]
        same_steps = steps * 64 // 8000
        batch64 = points[probe["fraction"], probe["name"], probe["seed"]][same_steps]
        assert (f"| {probe['batch_size']} | {probe['epochs']} ({steps:,}) | {probe['top1']:.2f} | "
                f"{batch64:.2f} ({same_steps} epochs) |") in text, probe


def test_lesson6_ladder_prints_every_recorded_pair_and_the_page_quotes_it(tmp_path, capsys):
    """--ladder trains nothing: it reads every Table 2 twin pair recorded in figures/06_check (the
    lesson's own runs, its climb's and ladder.json's), prints each, each rung of several seeds on their mean, each
    model's longest run seed by seed and the answer read from them, and draws 06_ladder.png. The
    page quotes every row and the answer as printed: a recorded pair missing from the page, or a
    top-1 changed in either, fails."""
    module, before, checkout = lesson("06"), committed_figures(), checkout_status()
    drawn, plot_ladder = [], module.plot_ladder  # a fresh module: nothing to restore
    module.plot_ladder = lambda rows, args: drawn.extend(rows) or plot_ladder(rows, args)
    assert cli.run_command(module.main, ["--ladder", "--out-dir", str(tmp_path)]) == 0
    out, text = capsys.readouterr().out, text_of("06_sample_efficiency.md")
    assert (tmp_path / "06_ladder.png").read_bytes()[:4] == b"\x89PNG"
    # a row of the figure for the recipe's ladder, and one for the regularised runs of the recipe check
    regularised = {r["change"] for r in committed("06_check/recipe_check.json")["runs"] if r["change"].startswith("mixup")}
    assert [title for title, _, _ in drawn] == ["the recipe"] + [f"with {change}" for change in regularised], drawn
    assert set(drawn[1][1]) == {(f, name, seed) for f in (0.05, 1.0) for name in ("ConViT", "DeiT")
                                            for seed in (0, 1, 2)}
    assert "](figures/06_ladder.png)" in text and (LESSONS / "figures" / "06_ladder.png").is_file()
    assert committed_figures() == before and checkout_status() == checkout
    recorded = committed("06_check/ladder.json")["runs"] + [
        run for check in module.ladder_lesson_files() for run in json.loads(check.read_text())["runs"]]
    epochs = collections.defaultdict(set)  # every length trained, runs and twins, by model, fraction and seed
    for run in recorded:
        length = config.parse(shlex.split(run["command"])[2:])["epochs"]
        epochs[run["name"], run["fraction"], run["seed"]] |= {length, run["half"]["epochs"]}
    ladder_out, recipe_out = out.split("The recipe checked at long lengths")
    rows = [line for line in ladder_out.splitlines() if line.startswith("| ") and not line.startswith(("| model", "| f |"))]
    pairs = {(run["name"], run["seed"], run["fraction"], run["half"]["epochs"]) for run in recorded}
    longest = {(f, seed) for (name, f, seed) in epochs if (("ConViT" if name == "DeiT" else "DeiT"), f, seed) in epochs}
    seeds_of_rung = collections.Counter((name, f, half) for name, _seed, f, half in pairs)
    rungs = [rung for rung, seeds in seeds_of_rung.items() if seeds > 1]  # printed with the mean of their seeds
    assert len(rows) == len(pairs) + len(rungs) + len(longest), out
    for row in rows:
        assert row in text, f"lesson 6 does not quote --ladder's row {row}"
    for f, seed in longest:  # each model's longest is the most epochs it was trained at that fraction and seed
        row = next(row for row in rows if row.startswith(f"| {f:.0%} | {seed} | "))
        assert [int(cell_.split(":")[0]) for cell_ in row.split(" | ")[2:4]] == [
            max(epochs["ConViT", f, seed]), max(epochs["DeiT", f, seed])], row
    answer = out.split("Does the gain shrink with data, at each model's longest run? ")[1].splitlines()[0]
    assert answer in " ".join(text.split()), answer
    # The recipe checked at a long length: every run printed beside the recipe's own, and quoted;
    # then, for each change both models ran with twins, their longest runs and the answer, quoted too.
    recipe_out, *changed = recipe_out.split("\nWith ")
    checks = [line for line in recipe_out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    for section in changed:
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| f |")]
        answer = section.split("? ")[-1].splitlines()[0]
        assert rows and all(row in text for row in rows) and answer in " ".join(text.split()), section
    assert len(checks) == len(committed("06_check/recipe_check.json")["runs"]) > 0
    trained = {(name, f"{f:.0%}", str(seed)): lengths for (name, f, seed), lengths in epochs.items()}
    for row in checks:
        assert row in text, f"lesson 6 does not quote --ladder's row {row}"
        name, f, seed, length = row.split(" | ")[:4]
        # beside the recipe's own run of that length wherever the ladder trained one, else said so
        assert ("not trained this long" in row) == (int(length) not in trained[name[2:], f, seed]), row


def test_lesson6_ladder_takes_no_training_flag(tmp_path, capsys):
    code = cli.run_command(lesson("06").main, ["--ladder", "--seeds", "1", "--out-dir", str(tmp_path)])
    one_error_line(code, capsys.readouterr().err, "--ladder draws from the JSON of finished runs and trains nothing: "
                                                  "drop --seeds")
    assert not any(tmp_path.iterdir())


def check_the_climb(summary: dict, text: str, setting_of, default_limit: int) -> None:
    """What lessons 8 and 9 share: each run's rungs double from its first and end in its own command;
    each setting (`setting_of(run)`) climbed past a rung exactly while the mean of its seeds' second
    halves added 0.5 points or more, up to the --max-doublings its command gives (or the lesson's
    default); and the page's table of every setting at each length quotes the mean of its seeds there."""
    from lessons._protocol import CONVERGED_WITHIN, top1_by_length
    doublings = re.search(r"--max-doublings (\d+)", summary["command"])  # where the climb was told to stop
    limit = int(doublings[1]) if doublings else default_limit
    lengths, added = collections.defaultdict(lambda: collections.defaultdict(list)), collections.defaultdict(list)
    for run in summary["runs"]:
        setting, first = setting_of(run), run["rungs"][0]["epochs"]
        assert [rung["epochs"] for rung in run["rungs"]] == [first * 2 ** i for i in range(len(run["rungs"]))]
        assert run["rungs"][-1]["command"] == run["command"]
        assert run["rungs"][-1]["epochs"] == int(re.search(r" --epochs (\d+) ", run["command"])[1])
        for length, top1 in top1_by_length(run).items():
            lengths[setting][length].append(top1)
        for i, rung in enumerate(run["rungs"]):
            added[setting, i].append(rung["second_half_adds"])
    for (setting, i), gains in added.items():  # a setting climbs past a rung only where its seeds' mean says so
        climbed = (setting, i + 1) in added
        assert climbed == (mean(gains) >= CONVERGED_WITHIN) or (not climbed and i == limit), (setting, i, gains)
    every = sorted({e for by in lengths.values() for e in by})
    for setting, by in lengths.items():
        row = " | ".join(f"{mean(by[e]):.2f}" if e in by else "-" for e in every)
        assert line_of(text, f"| {setting} | ") == f"| {setting} | {row} |", f"the lengths of {setting}"


def test_lesson8_quotes_its_runs():
    """Table 5 as the page quotes it, from the JSON's runs: each model with its position embedding,
    masked at test, and trained without one, each setting at the length where the mean of its seeds
    converged; the climb and every setting at each length it trained (check_the_climb); each masked
    test read that run's own folder; and the earlier protocol's runs (24 epochs), from their own JSON."""
    lesson8, text = committed("08_position_embedding.json"), text_of("08_position_embedding.md")

    def setting_of(run: dict) -> str:
        return f"{run['name']}, {'with' if run['pos_embed'] else 'without'} pos_embed"

    shown = line_of(text, "python lessons/08_position_embedding.py")  # the first command: what this page shows
    assert shown.split("#")[0].strip() == lesson8["command"] and "what this page shows" in shown
    check_the_climb(lesson8, text, setting_of, lesson("08").DOUBLINGS)
    labels, top1 = {}, collections.defaultdict(list)
    for run in lesson8["runs"]:
        epochs = int(re.search(r" --epochs (\d+) ", run["command"])[1])
        labels[setting_of(run)] = f"{epochs:,}" + ("" if run["setting_converged"] else " (not converged)")
        top1[setting_of(run)].append(run["top1"])
        if run["pos_embed"]:
            top1[run["name"], "masked"].append(run["masked"]["top1"])
            folder = run["command"].split("--output-dir ")[1].split()[0]
            assert run["masked"]["command"].endswith("--mask-pos-embed --checkpoint " + folder), run["masked"]["command"]
    for name in lesson8["mean_top1"]:
        with_, without, masked = top1[f"{name}, with pos_embed"], top1[f"{name}, without pos_embed"], top1[name, "masked"]
        quoted = (f"| {name} | {labels[f'{name}, with pos_embed']}, {labels[f'{name}, without pos_embed']} | "
                  f"{cell(with_)} | {cell(masked)} | {mean(with_) - mean(masked):.1f} | {cell(without)} |")
        assert line_of(text, f"| {name} |").startswith(quoted), f"lesson 8, {name}"
    earlier, old = committed("08_equal_steps.json"), collections.defaultdict(list)
    for run in earlier["runs"]:
        old[run["name"], run["pos_embed"]].append(run["top1"])
        if run["pos_embed"]:
            old[run["name"], "masked"].append(run["masked"]["top1"])
    section = text.split("## At the paper's equal steps: the earlier protocol")[1]
    for name in earlier["mean_top1"]:
        drop = mean(old[name, True]) - mean(old[name, "masked"])
        assert line_of(section, f"| {name} |") == (f"| {name} | {cell(old[name, True])} | {cell(old[name, 'masked'])} | "
                                                   f"{drop:.1f} | {cell(old[name, False])} |"), f"lesson 8's earlier protocol, {name}"


def test_lesson9_quotes_its_runs():
    """Fig. 8 as the page quotes it, from the JSON's runs: at the paper's budget (each run's top-1 at
    240 epochs, read from its rungs), where each setting converged (the run's own top-1, at the length
    its command gives), every setting at each length it trained, and the same command on two
    machines; each setting climbed exactly while the mean of its seeds' second halves added 0.5 points
    or more. The earlier protocol's grid is quoted from its own JSON."""
    from lessons._protocol import CONVERGED_WITHIN, MAX_DOUBLINGS, top1_by_length
    lesson9, text = committed("09_more_locality.json"), text_of("09_more_locality.md")
    budget = lesson9["budget_epochs"]
    check_the_climb(lesson9, text, lambda run: run["name"], MAX_DOUBLINGS)
    at_budget, ends, labels, first_rung = collections.defaultdict(list), collections.defaultdict(list), {}, {}
    for run in lesson9["runs"]:
        setting, epochs = (run["gpsa_layers"], run["locality_strength"]), int(re.search(r" --epochs (\d+) ", run["command"])[1])
        assert run["rungs"][0]["epochs"] == budget, "every setting's climb starts at the paper's budget"
        assert run["converged"] == (run["second_half_adds"] < CONVERGED_WITHIN), run["command"]
        by_length = top1_by_length(run)
        at_budget[setting].append(by_length[budget])
        first_rung[run["name"], run["seed"]] = by_length[budget]
        ends[setting].append(run["top1"])
        labels[setting] = f"{epochs:,} epochs" + ("" if run["setting_converged"] else ", not converged")
    strengths = sorted({a for n, a in at_budget if n})
    fixed = text.split("## At the paper's budget")[1].split("\n## ")[0]
    converged = text.split("## Trained until it stops improving")[1].split("\n## ")[0]
    for layers in sorted({n for n, _ in at_budget}):
        keys = [(layers, a) if layers else (0, 1.0) for a in strengths]
        assert f"| {layers} | " + " | ".join(cell(at_budget[k]) for k in keys) + " |" == line_of(fixed, f"| {layers} |")
        quoted = " | ".join(f"{cell(ends[k])} at {labels[k]}" for k in keys)
        assert f"| {layers} | {quoted} |" == line_of(converged, f"| {layers} |"), f"lesson 9, {layers} GPSA"
    pairs = lesson9["same_command_two_machines"]
    assert pairs, "lesson 9 measures two machines on the earlier protocol's commands"
    for pair in pairs:
        first, second = pair["first"]["top1"], pair["second"]["top1"]
        assert second == first_rung[pair["name"], pair["seed"]], "the recorded run is the climb's first rung"
        assert f"| {pair['name']} | {pair['seed']} | {first:.2f} | {second:.2f} | {second - first:+.2f} |" in text, pair
    earlier, old = committed("09_equal_steps.json"), collections.defaultdict(list)
    for run in earlier["runs"]:
        old[run["gpsa_layers"], run["locality_strength"]].append(run["top1"])
    section = text.split("## At the paper's equal steps: the earlier protocol")[1]
    for layers in sorted({n for n, _ in old}):
        keys = [(layers, a) if layers else (0, 1.0) for a in strengths]
        assert f"| {layers} | " + " | ".join(cell(old[k]) for k in keys) + " |" == line_of(section, f"| {layers} |")


def test_lesson10_quotes_its_runs_beside_lesson5s():
    lesson10, text = committed("10_far_content.json"), text_of("10_far_content.md")
    lesson5 = committed("05_escaping_locality.json")
    assert lesson10["mnist_per_block"] == lesson5["per_block"], "lesson 10 must be drawn beside the committed lesson 5"
    for row, other in zip(lesson10["per_block"], lesson10["mnist_per_block"]):
        line = line_of(text, f"| {row['block']} ({row['kind']}) |")
        assert f"{row['nonlocality_init']:.2f} -> {row['nonlocality_end']:.2f} | {other['nonlocality_end']:.2f}" in line
        if row["kind"] == "GPSA":
            assert f"{row['gate_init']:.3f} -> {row['gate_end']:.3f} | {other['gate_end']:.3f}" in line, line
    quoted = " and ".join(f"{run['val_top1']:.1f}%" for run in lesson10["runs"])
    assert f"{quoted} (seeds {' and '.join(map(str, lesson10['seeds']))})" in line_of(text, "Top-1 after"), quoted
    for seed, shares in zip(lesson10["seeds"], lesson10["class_token_split"]):
        cells = " | ".join(f"{share['first_digit']:.2f} | {share['second_digit']:.2f}" for share in shares)
        assert line_of(text, f"| {seed} |") == f"| {seed} | {cells} |", f"lesson 10, the class token of seed {seed}"


def lesson11_change(runs: list[dict], key: str, block: int, digits: int) -> str:
    """What lesson 11's tables print: the mean of heads and seeds after epoch 1 -> the mean (range) at the end."""
    first = mean(mean(run[key][0][block]) for run in runs)
    last = [mean(run[key][-1][block]) for run in runs]
    spread = f" ({min(last):.{digits}f}-{max(last):.{digits}f})" if len(last) > 1 else ""
    return f"{first:.{digits}f} -> {mean(last):.{digits}f}{spread}"


def test_lesson11_quotes_its_runs_and_its_finding():
    lesson11, text = committed("11_locality_over_training.json"), text_of("11_locality_over_training.md")
    by_model = collections.defaultdict(list)
    for run in lesson11["runs"]:
        by_model[run["model"]].append(run)
        assert run["command"].startswith("python train.py ") and f"--seed {run['seed']}" in run["command"], run
    assert all("--global-pool avg" in run["command"] for run in by_model["ConViT, mean head, all GPSA"])
    header = line_of(text, "| block | ")
    assert header == "| block | " + " | ".join(by_model) + " |", header
    for block in range(6):
        cells = [lesson11_change(runs, "nonlocality", block, 2) for runs in by_model.values()]
        line = line_of(text, f"| block {block + 1} |")
        assert all(cell_ in line for cell_ in cells), f"lesson 11, Fig. 5, block {block + 1}: {cells} in {line}"
    gated = {name: runs for name, runs in by_model.items() if runs[0]["gates"]}
    for block in range(6):
        cells = [lesson11_change(runs, "gates", block, 3) for runs in gated.values() if block < len(runs[0]["gates"][0])]
        line = line_of(text, f"| GPSA {block + 1} |")
        assert all(cell_ in line for cell_ in cells), f"lesson 11, Fig. 6, GPSA {block + 1}: {cells} in {line}"
    # The finding the text states: with the class token, every gate ends above its init in every seed; with
    # every block GPSA and a mean head, the last two GPSA blocks end below it in every seed.
    init = 1 / (1 + math.exp(-1))
    assert all(mean(gates) > init for run in by_model["ConViT"] for gates in run["gates"][-1])
    assert all(mean(gates) < init for run in by_model["ConViT, mean head, all GPSA"] for gates in run["gates"][-1][-2:])
    top1 = line_of(text, "Top-1 after 20 epochs:")
    assert all(f"{name} {cell([run['top1'] for run in runs])}" in top1 for name, runs in by_model.items()), top1
LESSON13_MEASURES = {"mean_pull": "DeiT: pull below uniform, mean of blocks (%)",
                     "deepest_pull": "DeiT: pull of the most local block (%)",
                     "upper_gates": "ConViT: mean gate of the upper half of the GPSA blocks",
                     "last_gate": "ConViT: mean gate of the last GPSA block",
                     "first_pull": "ConViT: pull of block 1 below uniform (%)"}


@pytest.mark.parametrize("model", ["deit_tiny", "convit_tiny"])
@pytest.mark.parametrize("patch", [4, 2])  # lesson 13's two grids, 7x7 and 14x14
def test_lesson13_pull_of_uniform_attention_is_zero_on_either_grid(model, patch):
    """Lesson 13's pull, 1 - Eq. 8 / uniform, against the model's own Eq. 8 (convit.nonlocality) of
    uniform attention: queries and keys zeroed, every gate on content. It is 0 in every block, GPSA
    and MHSA, only if the lesson's uniform value has the right grid and leaves out the class
    token's share where a block attends to it (N / (N + 1) of the mean distance)."""
    import config
    import train

    lesson13 = importlib.import_module("lessons.13_what_makes_attention_local")
    cfg, _ = config.resolve({"dataset": "mnist10k", "data_dir": "data", "model": model, "embed_dim": 48,
                             "num_heads": 4, "depth": 6, "patch_size": patch})
    net = train.build_model(cfg, 10).eval()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if ".attn.qk" in name:  # qkv (MHSA) or qk (GPSA): every attention logit 0
                param.zero_()
            elif name.endswith("gating_param"):
                param.fill_(-100.0)  # sigma(lambda) = 0: content attention only
    eq8 = net.nonlocality(torch.randn(2, 1, 28, 28))  # (blocks, H)
    run = {"nonlocality": [eq8.tolist()], "gates": [[[0.0] * 4] * cfg.model.gpsa_blocks] if cfg.model.gpsa_blocks else None}
    pull = lesson13.curves(run, cfg)["pull"]
    assert pull.shape == (1, 6) and pull.abs().max() < 1e-5, pull


QUESTION_LESSONS = ("13_what_makes_attention_local", "14_augmentation_and_locality", "15_depth_and_class_token",
                    "16_the_grid")  # lesson 13's questions, one lesson each for what fits in 45 minutes
SIZE_LESSON = "17_model_size"  # the same machinery, on the paper's model sizes (SM D)


def question_verdicts() -> dict[tuple[str, str], dict]:
    """Lessons 13 to 16's verdicts by (question, model)."""
    return {(row["question"], row["model"]): row for stem in QUESTION_LESSONS
            for row in committed(f"{stem}.json")["verdicts"]}


@pytest.mark.parametrize("stem", [*QUESTION_LESSONS, SIZE_LESSON])
def test_lessons_13_to_17_quote_their_verdicts_and_read_earlier_runs_unchanged(stem):
    summary, text = committed(f"{stem}.json"), text_of(f"{stem}.md")
    as_run = importlib.import_module("lessons.13_what_makes_attention_local").as_run  # how the lessons match runs
    earlier = {}
    for name in ("11_locality_over_training", *QUESTION_LESSONS):
        runs = committed(f"{name}.json")["runs"]
        for run in (runs.values() if isinstance(runs, dict) else runs):
            if "read_from" not in run:  # a run the lesson trained itself
                earlier[f"lesson {int(name[:2])}", as_run(run["command"])] = run
    for name, run in summary["runs"].items():
        assert run["command"].startswith("python train.py ") and f"--seed {run['seed']}" in run["command"], name
        if "read_from" in run:  # read, not trained: it is that lesson's run, number for number
            twin = earlier[run["read_from"], as_run(run["command"])]
            assert (twin["top1"], twin["gates"], twin["nonlocality"]) == (run["top1"], run["gates"], run["nonlocality"])
    assert {p["seed"] for p in summary["plan"]} == {0, 1}
    table = [line.replace("**", "") for line in text.splitlines() if line.startswith("| ")]
    for row in summary["verdicts"]:
        for key, measure in LESSON13_MEASURES.items():
            if key not in row:
                continue
            scale, digits = (100, 1) if "pull" in key else (1, 3)
            cells = [cell([scale * v for v in row[key][arm]], digits) for arm in ("without", "with")]
            start = f"| {row['question']} | {measure} | {cells[0]} | {cells[1]} |"
            found = [line for line in table if line.startswith(start)]
            assert found, f"{stem}: no table line starts with {start!r}"
            assert f"| {cell(row['top1']['without'])} | {cell(row['top1']['with'])} |" in found[0], found[0]
            if key in ("mean_pull", "upper_gates"):
                assert f"| {row['moved']} |" in found[0], found[0]


def test_lessons_13_to_16_state_what_they_find_together():
    """The findings lesson 16 states for the four: with the paper's layout no change takes the upper
    gates below their init in both seeds; less data, depth and the grid lower them, the rest do not;
    the paper's augmentation pulls DeiT's blocks further below uniform in every seed, nothing else does."""
    verdicts = question_verdicts()
    assert not any(all(row["upper_gates_below_init"]["with"]) for row in verdicts.values() if row["model"] == "ConViT")
    moved = {key: row["moved"] for key, row in verdicts.items()}
    assert [q for (q, m), way in moved.items() if m == "ConViT" and way == "down"] == ["data", "depth", "grid"]
    assert [q for (q, m), way in moved.items() if m == "ConViT" and way == "up"] == \
        ["length", "RandAugment", "MixUp/CutMix"]
    assert [q for (q, m), way in moved.items() if m == "DeiT" and way == "up"] == ["RandAugment", "MixUp/CutMix"]
    assert not [q for (q, m), way in moved.items() if m == "DeiT" and way == "down"]
    grid = committed("16_the_grid.json")
    assert all(run["epochs"] == list(range(2, 21, 2)) for name, run in grid["runs"].items() if "patch_size-2" in name)


def test_lesson17_states_what_it_finds():
    """Lesson 17's findings, from its JSON: block 1 ends less local the more heads (the paper's
    Fig. 13 order), in the order the conv init starts it, and each size's block 1 ends more local
    than at init; 9 heads raise the upper gates beyond the 4-headed runs in both seeds, 16 heads (at
    a quarter of the lr) lower them; the page quotes the init's nonlocality as the script prints it."""
    summary, text = committed(f"{SIZE_LESSON}.json"), " ".join(text_of(f"{SIZE_LESSON}.md").split())
    rows = {row["question"]: row for row in summary["verdicts"]}
    ends = [mean(rows["9 heads"]["first_pull"]["without"]), mean(rows["9 heads"]["first_pull"]["with"]),
            mean(rows["16 heads"]["first_pull"]["with"])]
    assert ends == sorted(ends, reverse=True)  # 4, 9, 16 heads: less and less pull below uniform
    init = summary["nonlocality_at_init"]
    starts = [init["9 heads"]["without"][0], init["9 heads"]["with"][0], init["16 heads"]["with"][0]]
    assert starts == sorted(starts)  # the wider kernel of more heads starts less local
    assert f"{starts[0]:.2f}, {starts[1]:.2f} and {starts[2]:.2f} patches" in text
    uniform = importlib.import_module("lessons.11_locality_over_training").uniform_nonlocality(7, 7)
    assert all(end > 1 - start / uniform for end, start in zip(ends, starts))  # every block 1 grew more local
    assert (rows["9 heads"]["moved"], rows["16 heads"]["moved"]) == ("up", "down")
    assert " --lr 0.001 " in next(run["command"] for name, run in summary["runs"].items() if "num_heads-16" in name)


def test_lesson12_quotes_its_runs_its_table6_and_its_gates():
    lesson12, text = committed("12_what_heads_use.json"), text_of("12_what_heads_use.md")
    runs = collections.defaultdict(list)
    for run in lesson12["runs"]:
        runs[run["fraction"], run["name"]].append(run)
        assert run["command"].startswith("python train.py ") and " --seed " in run["command"]
        assert (" --attention psa" in run["command"]) == (run["name"] == "PSA"), run["command"]
    for (fraction, name), group in runs.items():
        final, first = [run["top1"] for run in group], [run["curve"][0][1] for run in group]
        line = line_of(text, f"| {fraction:.0%} | {name} |")
        assert f"| {cell(final)} | {cell(first)} |" in line, f"lesson 12, {name} at f = {fraction:.0%}: {line}"
    tables = lesson12["table6"]
    assert len(tables) == len(lesson12["seeds"]) and all(t["command"].startswith("python probes.py ") for t in tables)
    assert f"| {cell([t['none'] for t in tables])} |" in line_of(text, "| none | - |")
    for mask in ("content", "position"):
        for k in tables[0][mask]:
            line = line_of(text, f"| {mask} | {k} |")
            assert f"| {cell([t[mask][k] for t in tables])} |" in line, f"lesson 12, Tab. 6, {mask} K={k}: {line}"
    for table in tables:
        quoted = " | ".join(", ".join(f"{g:.2f}" for g in layer) for layer in table["gates"])
        assert line_of(text, f"| seed {table['seed']} |").startswith(f"| seed {table['seed']} | {quoted} |")
    assert all(m["command"].startswith("python plots.py --attention runs/lessons/12/") for m in lesson12["maps"].values())
    budget = committed("12_budget.json")["runs"]
    assert all(run["command"].startswith("python train.py ") and " --epochs 96 " in run["command"] for run in budget)
    for name in ("PSA", "ConViT", "DeiT"):
        quoted = f"{name} {cell([run['top1_96'] for run in budget if run['name'] == name])}"
        assert quoted in " ".join(text.split()), f"lesson 12's budget check: {quoted}"


def test_readme_findings_quote_the_lessons():
    lesson6 = committed("06_sample_efficiency.json")
    at = lesson6["table2_mean_top1"]
    for fraction, start in (("0.1", "sample efficiency, 10%"), ("1", "sample efficiency, 100%")):
        line = readme_finding(start)
        assert f"DeiT {at[fraction]['DeiT']:.1f} / ConViT {at[fraction]['ConViT']:.1f}" in line, line
    line = readme_finding("ablations at 10% (Table 3)")
    for row, average in lesson6["table3_mean_top1"].items():
        assert f"{row} {average:.1f}" in line, f"README's Table 3 finding: row {row} is {average:.1f}"
    lesson8 = committed("08_position_embedding.json")["mean_top1"]
    line = readme_finding("masking the position embedding at test time (Table 5)")
    for name in ("DeiT", "ConViT"):
        cases = lesson8[name]
        assert f"{name} {cases['trained with, tested with']:.1f} -> {cases['trained with, tested masked']:.1f}" in line
    lesson9 = committed("09_more_locality.json")["mean_top1_at_budget"]
    line = readme_finding("more GPSA layers and a stronger locality help (Fig. 8)")
    at = {name: f"{top1:.1f}" for name, top1 in lesson9.items()}
    assert (f"0 / 2 / 3 GPSA blocks at alpha = 1 give {at['0 GPSA, alpha 1']} / {at['2 GPSA, alpha 1']} / "
            f"{at['3 GPSA, alpha 1']}") in line, line
    assert (f"3 blocks at alpha = 0.01 / 0.1 / 1 give {at['3 GPSA, alpha 0.01']} / {at['3 GPSA, alpha 0.1']} / "
            f"{at['3 GPSA, alpha 1']}") in line, line
    lesson11 = committed("11_locality_over_training.json")
    line = readme_finding("SA layers are pulled towards locality; GPSA layers escape it")
    all_gpsa = lesson11["per_block"]["ConViT, mean head, all GPSA"]
    upper = [mean(row["gate_last"]) for row in all_gpsa[3:]]
    convit_ = [mean(row["gate_last"]) for row in lesson11["per_block"]["ConViT"] if row["kind"] == "GPSA"]
    assert f"{min(upper):.2f}-{max(upper):.2f}" in line and f"({min(convit_):.3f}-{max(convit_):.3f})" in line, line
    lesson12 = committed("12_what_heads_use.json")
    line = readme_finding("what each layer uses: content or position masked at test time (Tab. 6)")
    tables = lesson12["table6"]
    quoted = [f"{mean(t[mask][k] for t in tables):.1f}" for mask in ("content", "position") for k in ("1", "2")]
    assert f"content masked in block 1 / both {quoted[0]} / {quoted[1]}, position masked {quoted[2]} / {quoted[3]} " \
           f"({mean(t['none'] for t in tables):.1f} unmasked)" in line, line
    line = readme_finding("why the gate: plain PSA")
    final = {(run["name"], run["fraction"]): [] for run in lesson12["runs"]}
    for run in lesson12["runs"]:
        final[run["name"], run["fraction"]].append(run["top1"])
    for name in ("PSA", "ConViT", "DeiT"):
        assert f"{name} {mean(final[name, 1.0]):.1f} / {mean(final[name, 0.25]):.1f}" in line, f"README: {name} {line}"
    lesson10 = committed("10_far_content.json")
    line = readme_finding("the later gates close where far content matters")
    assert all(f"{run['val_top1']:.1f}%" in line for run in lesson10["runs"]), line
    verdicts = question_verdicts()
    line = readme_finding("what makes SA layers local and gates close")
    gates = [f"{mean(verdicts[q, 'ConViT']['upper_gates'][arm]):.3f}" for q, arm in
             (("grid", "with"), ("grid", "without"), ("depth", "with"), ("data", "with"), ("data", "without"))]
    pulls = [f"{100 * mean(verdicts[q, 'DeiT']['mean_pull'][arm]):.1f}%" for q, arm in
             (("RandAugment", "with"), ("MixUp/CutMix", "with"), ("RandAugment", "without"))]
    assert all(quoted in line for quoted in gates + pulls), (gates, pulls, line)


def test_ci_runs_the_readmes_test_command():
    """CI (.ci/run) runs exactly the test command the README's set-up gives a newcomer."""
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1]
    readme = [line.split("#")[0].strip() for line in setup.splitlines() if "pytest" in line and line.startswith("python")]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert len(readme) == 1 and ci == readme, (readme, ci)


# ---------------------------------------------------------------------------------------
# The paper's numbering: Fig. 5 is the nonlocality, Fig. 6 the gates
# ---------------------------------------------------------------------------------------
def wrong_figure_labels(text: str) -> list[str]:
    """Lines that name the gates Fig. 5 or the nonlocality Fig. 6: a "Fig. N" (not "Figs. 5/6",
    "Fig. 5 and 6") with the wrong quantity and not the right one within 40 characters of it."""
    wrong = []
    for line in text.splitlines():
        for match in re.finditer(r"Fig(?:ure|\.)? ?([56])(?![0-9]|\s*(?:/|and|,|-)\s*[56])", line, re.IGNORECASE):
            near = line[max(0, match.start() - 40): match.end() + 40].lower()
            mislabelled, labelled = ("gate", "nonlocal") if match[1] == "5" else ("nonlocal", "gate")
            if mislabelled in near and labelled not in near:
                wrong.append(line.strip())
    return wrong


def test_the_figure_label_check_finds_a_wrong_pairing_and_passes_the_right_one():
    five, six = "Fig" + ". 5", "Fig" + ". 6"  # spelt apart, so that this file holds no wrong pairing itself
    assert wrong_figure_labels(f'title="gates ({five})"') and wrong_figure_labels(f"the nonlocality of Eq. 8 ({six})")
    assert not wrong_figure_labels(f"gates ({six}) and nonlocality ({five})")
    assert not wrong_figure_labels(f"the run's own {five}/6: gates and nonlocality")


def test_no_tracked_text_calls_the_gates_fig5_or_the_nonlocality_fig6():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    wrong = {}
    for name in tracked:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".txt", ".json", ".toml", ".cfg", ".yml", ".yaml") or name == ".ci/run":
            found = wrong_figure_labels(path.read_text())
            if found:
                wrong[name] = found
    assert wrong == {}


def test_lesson10_without_lesson5s_run_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    module = lesson("10")
    copy = tmp_path / "10_far_content.json"
    copy.write_text((LESSONS / "figures" / copy.name).read_text())
    monkeypatch.setattr(module, "MNIST_RUN", tmp_path / "05_escaping_locality.json")
    one_error_line(cli.run_command(module.main, ["--redraw", "--out-dir", str(tmp_path)]), capsys.readouterr().err,
                   "lesson 5's committed run", "05_escaping_locality.json is missing")


@pytest.mark.parametrize("number, name", [("05", "05_escaping_locality"), ("10", "10_far_content")])
def test_redraw_draws_the_recorded_runs_with_their_machine_and_changes_no_file(number, name, tmp_path, capsys,
                                                                               monkeypatch):
    """--redraw draws a lesson's figure again from a copy of its committed JSON, training nothing:
    the paper's figure numbers, the runs' top-1, and the machine the JSON says they were trained
    on; the JSON byte for byte as it was, nothing written into the checkout. No JSON: one line."""
    module, before, checkout = lesson(number), committed_figures(), checkout_status()
    argv, copy = ["--redraw", "--out-dir", str(tmp_path)], tmp_path / f"{name}.json"
    one_error_line(cli.run_command(module.main, argv), capsys.readouterr().err, f"there is no {copy}")
    summary = json.loads((LESSONS / "figures" / copy.name).read_text())
    summary["hardware"] = "the machine that trained these runs"  # whatever machine this test runs on
    copy.write_text(json.dumps(summary))
    written, drawn, save_figure = copy.read_bytes(), [], module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda fig, *args: drawn.append(fig) or save_figure(fig, *args))
    assert cli.run_command(module.main, argv) == 0, capsys.readouterr().err
    [figure] = drawn
    assert figure.texts[-1].get_text() == f"{summary['settings']}\n{summary['hardware']}"
    titles = "\n".join(ax.get_title() for ax in figure.axes)
    assert "gates (Fig. 6)" in titles and "nonlocality (Fig. 5)" in titles and not wrong_figure_labels(titles)
    assert all(f"{run['val_top1']:.1f}%" in titles for run in summary["runs"])
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and copy.read_bytes() == written
    assert sorted(path.name for path in tmp_path.iterdir()) == [copy.name, f"{name}.png"]
    assert committed_figures() == before and checkout_status() == checkout


# ---------------------------------------------------------------------------------------
# The README says what a newcomer can reproduce
# ---------------------------------------------------------------------------------------
def readme_paragraphs() -> list[str]:
    return [" ".join(paragraph.split()) for paragraph in (ROOT / "README.md").read_text().split("\n\n")]


def test_readme_bench_figures_name_the_batch_their_command_uses():
    """Each `python bench.py` command the README quotes figures of types its batch, and the
    paragraph states that batch: bench's defaults are not what was measured."""
    quoted, paragraphs = 0, readme_paragraphs()
    for paragraph, after in zip(paragraphs, [*paragraphs[1:], ""]):
        table = after if after.startswith("|") else ""  # a table's figures belong to the paragraph above it
        for command in re.findall(r"`(python bench\.py[^`]*)`", paragraph):
            if not re.search(r"\d\.\d+x", paragraph + table):
                continue  # a command named without figures
            quoted += 1
            argv = shlex.split(command)
            assert "--batch-size" in argv, f"{command}: the figures' batch is bench's default, unstated"
            batch = argv[argv.index("--batch-size") + 1]
            assert f"batch {batch}" in paragraph, f"{command}: the paragraph does not say batch {batch}"
            stated = set(re.findall(r"\bbatch (\d+)", paragraph))
            if "--compare" in argv and "--inference-only" not in argv:
                stated -= {argv[argv.index("--train-batch-size") + 1]} if "--train-batch-size" in argv else set()
            assert stated == {batch}, f"{command}: the paragraph names batches {sorted(stated)}"
    assert quoted >= 1  # Table 1's summary; the other figures, each with its command, are in docs/speed.md


def test_readme_keeps_no_history_and_names_one_machine_per_figure():
    """History (dated runs, what an earlier version did) lives in docs/; each measured figure names
    its machine, and a paragraph does not mix two machines' figures."""
    months = "January|February|March|April|May|June|July|August|September|October|November|December"
    for paragraph in readme_paragraphs():
        assert not re.search(rf"\b\d{{1,2}} ({months})\b|\b({months}) \d{{4}}\b", paragraph), paragraph[:300]
        machines = {name for name in ("Intel Xeon", "AMD EPYC") if name in paragraph}
        assert len(machines) <= 1, f"two machines in one paragraph: {paragraph[:300]}"
        if re.search(r"\b\d+ min \d+ s\b|img/s|\d\.\d+x\b", paragraph) and "paper" not in paragraph[:40]:
            assert machines or "table" in paragraph.lower() or "lesson" in paragraph.lower(), \
                f"a measured figure without its machine: {paragraph[:300]}"
