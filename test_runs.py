"""Tests of issue 17: a run's folder is its own.

Each test walks a case through train.py (or a lesson, or plots.py) and asserts what the user
would see: the exit code and the one `error:` line naming the real problem, and what is on disk
afterwards (which checkpoint epoch, which metrics lines, byte for byte where nothing may change).
- No silent overwrite: a folder that holds another run is refused, --overwrite replaces it, and
  nothing is removed before the new run has its data and model.
- One writer: a second process is refused while the first holds the folder's lock; a SIGKILLed
  holder leaves no stale lock.
- --resume continues the run as it was started: its flags come from the checkpoint, and only
  typed flags may differ.
- Output failures (a file in the way, a read-only folder, a full disk) are one line each, and
  the folder stays consistent.
- Values that used to be ignored without a word are refused.
- Every finished run folder holds its own figure.png: nonlocality (Fig. 5), gates (Fig. 6).
- --overwrite never leaves less than there was: the old run stays whole until the new one has
  written its first checkpoint, whatever stops it first (bad data, Ctrl-C, a full disk, kill -9).
- A refused run writes nothing and prints one line: the reason, and no note before it.
The data is conftest's `folder` of 24 tiny PNGs; a run of the 3-block model takes about a second.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoints
import cli
import config
import data
import plots
import runs
import train
from conftest import (TINY, colour_image_folder, lesson, metrics_of, one_error_line, run_train, snapshot,
                      start_stalled, truncated_png)

HERE = Path(__file__).resolve().parent


def flags(folder: Path, epochs: int = 3, *more: str) -> list[str]:
    """A tiny run; unlike test_safety's run_flags it leaves --warmup-epochs to the recipe (2)."""
    return ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8",
            "--epochs", str(epochs), *more]


def checkpoint_epoch(run: Path) -> int:
    return checkpoints.read_checkpoint_file(run / checkpoints.CHECKPOINT)["epoch"]


# ---------------------------------------------------------------------------------------
# 1. A new run never destroys an earlier one
# ---------------------------------------------------------------------------------------
def test_a_folder_holding_another_run_is_refused_and_left_as_it_was(folder, tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*flags(folder, 2), "--output-dir", str(run)])
    before = snapshot(run)
    assert {"checkpoint.pth", "metrics.jsonl", "figure.png"} <= set(before)

    one_error_line(run_train([*flags(folder, 1), "--output-dir", str(run)]), capsys.readouterr().err,
                   f"--output-dir {run} holds another run (logged up to epoch 2)", f"--resume {run}", "--overwrite")
    assert snapshot(run) == before

    replaced = train.main([*flags(folder, 1), "--output-dir", str(run), "--overwrite"])
    assert replaced["epoch"] == 1 and checkpoint_epoch(run) == 1
    assert [m["epoch"] for m in metrics_of(run)] == [1]


def test_the_shared_default_folder_and_an_empty_output_dir(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder, runs/<dataset>-<model>, is relative to here
    train.main(flags(folder, 1))
    default = Path("runs/imagefolder-convit_tiny")
    before = snapshot(default)
    one_error_line(run_train([*flags(folder, 1), "--amp"]), capsys.readouterr().err,
                   f"--output-dir {default} holds another run", "--overwrite")
    one_error_line(run_train([*flags(folder, 1), "--output-dir", ""]), capsys.readouterr().err,
                   "--output-dir is empty: name a folder")
    assert snapshot(default) == before


class CtrlC(Exception):
    pass


def test_interrupted_before_the_first_epoch_the_folder_never_disagrees_with_itself(folder, tmp_path, capsys,
                                                                                      monkeypatch):
    run = tmp_path / "run"
    train.main([*flags(folder, 2), "--output-dir", str(run)])
    before = snapshot(run)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C while the data loads: --overwrite has removed nothing yet.
    with monkeypatch.context() as patch:
        patch.setattr(data, "build_datasets", ctrl_c)
        assert run_train([*flags(folder, 1), "--output-dir", str(run), "--overwrite"]) == 130
    assert snapshot(run) == before
    assert "no checkpoint written yet" in capsys.readouterr().err

    # Ctrl-C at the first step of a new run into an empty folder: nothing to continue, and the folder is free.
    fresh = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        patch.setattr(torch.amp.GradScaler, "step", ctrl_c)
        assert run_train([*flags(folder, 1), "--output-dir", str(fresh)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted before the first epoch ended: no checkpoint written yet (to {fresh.resolve()})"]
    assert train.main([*flags(folder, 1), "--output-dir", str(fresh)])["epoch"] == 1


# ---------------------------------------------------------------------------------------
# 2. One writer at a time; a killed one leaves no lock behind
# ---------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(folder, tmp_path, capsys):
    run = tmp_path / "run"
    holder = start_stalled(tmp_path, [*flags(folder, 3), "--output-dir", str(run)])
    try:
        for second in ([*flags(folder, 3), "--output-dir", str(run)],  # the same command again
                       [*flags(folder, 3), "--output-dir", str(run), "--overwrite"],
                       ["--resume", str(run)]):
            one_error_line(run_train(second), capsys.readouterr().err, f"--output-dir {run} is in use by another run",
                           f"pid {holder.pid} on ", "wait for it to end")
        assert checkpoint_epoch(run) == 1 and [m["epoch"] for m in metrics_of(run)] == [1]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert holder.returncode == -signal.SIGKILL
    resumed = train.main(["--resume", str(run), "--quiet"])  # the OS dropped the lock with its process
    assert resumed["epoch"] == 3 and [m["epoch"] for m in metrics_of(run)] == [1, 2, 3]
    assert (run / runs.LOCK).read_text() == ""  # released: nobody holds it


def test_under_torchrun_every_process_stops_when_the_folder_is_refused(folder, tmp_path):
    """Only rank 0 claims the folder; rank 1 must stop with it rather than wait forever."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')  # another run's
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "train.py"), *flags(folder, 1), "--output-dir", str(run)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert done.stderr.count(f"error: --output-dir {run} holds another run (logged up to epoch 1)") == 2, done.stderr
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


# ---------------------------------------------------------------------------------------
# 3. --resume continues the run as it was started
# ---------------------------------------------------------------------------------------
def test_typed_flags_are_read_from_the_command_line_not_from_the_defaults():
    typed = config.parse(["--epochs=6", "--seed", "0", "--resume", "x", "--no-amp", "--lr", "5e-4"])
    assert typed == {"epochs": 6, "seed": 0, "resume": "x", "amp": False, "lr": 5e-4}  # --seed 0 is the default, yet typed
    with pytest.raises(ValueError, match=r"unrecognized arguments: --epoch 3 \(did you mean --epochs\?\)"):
        config.parse(["--epoch", "3"])  # argparse's prefix matching would take it for --epochs 3


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory) -> dict:
    """A 3-epoch run with flags away from their defaults: what the resumed runs must equal."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train.main([*flags(folder, 3, "--seed", "1", "--lr", "2e-3", "--smoothing", "0.2"), "--output-dir", str(out)])
    return {"state": result["model"].state_dict(), "metrics": metrics_of(out)}


def same_weights(result: dict, reference: dict) -> bool:
    state = result["model"].state_dict()
    return all(torch.equal(state[key], reference["state"][key]) for key in reference["state"])


def test_evaluating_changes_no_weight(folder, uninterrupted, tmp_path):
    """How often a run is measured (--eval-every) changes nothing it learns: evaluation has a
    generator of its own and draws nothing from training's. Lessons 13 to 16 rely on it: they read
    a run evaluated every epoch as the run evaluated every 2nd, and evaluate 14x14 runs half as often."""
    result = train.main([*flags(folder, 3, "--seed", "1", "--lr", "2e-3", "--smoothing", "0.2"), "--eval-every", "2",
                         "--output-dir", str(tmp_path / "run")])
    assert same_weights(result, uninterrupted)
    assert [(m["epoch"], m["val_loss"], m["nonlocality"]) for m in metrics_of(tmp_path / "run")] == \
        [(m["epoch"], m["val_loss"], m["nonlocality"]) for m in uninterrupted["metrics"] if m["epoch"] in (2, 3)]


def test_ctrl_c_message_typed_word_for_word_continues_the_same_run(folder, uninterrupted, tmp_path):
    run = tmp_path / "run"
    holder = start_stalled(tmp_path, [*flags(folder, 3, "--seed", "1", "--lr", "2e-3", "--smoothing", "0.2"),
                                      "--output-dir", str(run)])
    holder.send_signal(signal.SIGINT)
    holder.wait(timeout=120)
    message = (tmp_path / "stderr").read_text().strip()
    assert holder.returncode == 130 and message.endswith(f"continue with --resume {(run / 'checkpoint.pth').resolve()}")
    assert (run / runs.FIGURE).is_file()  # the epochs done so far, drawn on Ctrl-C

    resumed = train.main(message.split("continue with ")[1].split())  # only the words of the message
    assert resumed["epoch"] == 3 and resumed["epochs_run"] == 2  # not the preset's 50 epochs
    assert same_weights(resumed, uninterrupted)
    assert [(m["epoch"], m["val_loss"], m["lr"]) for m in metrics_of(run)] == \
        [(m["epoch"], m["val_loss"], m["lr"]) for m in uninterrupted["metrics"]]


def test_extending_a_run_whose_warmup_was_capped(folder, tmp_path, capsys):
    short, shortest = tmp_path / "short", tmp_path / "shortest"
    train.main([*flags(folder, 2), "--output-dir", str(short)])  # the recipe's 2 warmup epochs capped to 1
    train.main([*flags(folder, 1), "--output-dir", str(shortest)])  # ... and to 0
    capsys.readouterr()
    for run, planned, epochs, warmup in ((short, 2, 6, 1), (shortest, 1, 2, 0)):
        assert run_train(["--resume", str(run), "--epochs", str(epochs)]) == 0, capsys.readouterr().err
        assert f"note: --epochs grew from {planned} to {epochs}" in capsys.readouterr().out
        stored = checkpoints.read_checkpoint_file(run / "checkpoint.pth")["args"]
        assert (stored["epochs"], stored["warmup_epochs"]) == (epochs, warmup)
        assert [m["epoch"] for m in metrics_of(run)] == list(range(1, epochs + 1))


def test_resume_with_fewer_epochs_and_with_changed_typed_flags(folder, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*flags(folder, 4), "--output-dir", str(run), "--stop-after", "1"])  # warmup 2: not capped
    one_error_line(run_train(["--resume", str(run), "--epochs", "2"]), capsys.readouterr().err,
                   "--epochs 2 is fewer than the 4 the run was planned for (1 done)", "--stop-after")
    # A typed flag that changes what the run computes is named, even at its default value (--seed 0).
    one_error_line(run_train(["--resume", str(run), "--seed", "3", "--smoothing", "0.1"]), capsys.readouterr().err,
                   "--seed 3 (checkpoint: 0)")
    assert "--smoothing" not in capsys.readouterr().err  # 0.1 is the run's own value: no difference
    # The full original command plus --resume still works, and where and how it runs may change.
    result = train.main([*flags(folder, 4), "--resume", str(run), "--stop-after", "2", "--threads", "1"])
    assert result["epoch"] == 2 and checkpoint_epoch(run) == 2


def test_resume_into_another_folder_brings_the_metrics_along(folder, tmp_path, capsys):
    first, moved = tmp_path / "first", tmp_path / "moved"
    train.main([*flags(folder, 3), "--output-dir", str(first), "--stop-after", "2"])
    result = train.main(["--resume", str(first), "--output-dir", str(moved), "--quiet"])
    assert result["epoch"] == 3 and [m["epoch"] for m in metrics_of(moved)] == [1, 2, 3]
    assert [m["epoch"] for m in metrics_of(first)] == [1, 2]  # the folder resumed from is left alone


# ---------------------------------------------------------------------------------------
# 4. Output failures: one line, before training where it can be, and a consistent folder
# ---------------------------------------------------------------------------------------
@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the run gets as far as reading its data."""
    def never(*args, **kwargs):
        raise AssertionError("the data was read before the output folder was checked")

    monkeypatch.setattr(data, "build_datasets", never)


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(folder, tmp_path, capsys, monkeypatch,
                                                                          no_data):
    a_file = tmp_path / "a file"
    a_file.write_text("not a folder")
    cases = {str(a_file): f"--output-dir {a_file} is a file, not a folder",
             str(a_file / "run"): f"--output-dir {a_file / 'run'} cannot be created: {a_file} is a file"}
    for out, says in cases.items():
        one_error_line(run_train([*flags(folder, 1), "--output-dir", out]), capsys.readouterr().err, says)

    # A read-only file system (simulated: as root, permissions alone would not stop a write).
    read_only = tmp_path / "read-only"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == read_only:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", mkdir)
        one_error_line(run_train([*flags(folder, 1), "--output-dir", str(read_only)]), capsys.readouterr().err,
                       f"--output-dir {read_only} cannot be written (Read-only file system)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder of mode 0o500")
def test_an_output_dir_without_write_permission_is_refused(folder, tmp_path, capsys, no_data):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    one_error_line(run_train([*flags(folder, 1), "--output-dir", str(locked)]), capsys.readouterr().err,
                   f"--output-dir {locked} cannot be written (Permission denied)")


class DiskFullAt:
    """A file object that takes `limit` bytes, writes what fits of the next chunk, and then says
    that the disk is full."""

    def __init__(self, f, limit: int):
        self.f, self.left = f, limit

    def write(self, chunk):
        if len(chunk) > self.left:
            self.f.write(chunk[: self.left])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(chunk)
        return self.f.write(chunk)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_saving_keeps_the_last_good_checkpoint(folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # epoch 2's checkpoint meets a full disk halfway
        return real_save(obj, DiskFullAt(f, 20_000) if obj.get("epoch") == 2 else f, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save)
        one_error_line(run_train([*flags(folder, 3), "--output-dir", str(run)]), capsys.readouterr().err,
                       f"could not write {run / 'checkpoint.pth'} (No space left on device)", "untouched")
    assert checkpoint_epoch(run) == 1 and [m["epoch"] for m in metrics_of(run)] == [1]
    assert not list(run.glob("*.tmp"))
    assert train.main(["--resume", str(run), "--quiet"])["epoch"] == 3


def test_a_metrics_line_that_cannot_be_written_comes_back_on_resume(folder, uninterrupted, tmp_path, capsys,
                                                                     monkeypatch):
    run = tmp_path / "run"
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.jsonl" and mode == "ab" and checkpoint_epoch(self.parent) == 2:
            return DiskFullAt(f, 10)  # a torn line: 10 bytes, then the disk is full
        return f

    with monkeypatch.context() as patch:
        patch.setattr(Path, "open", open_)
        one_error_line(run_train([*flags(folder, 3, "--seed", "1", "--lr", "2e-3", "--smoothing", "0.2"),
                                  "--output-dir", str(run)]), capsys.readouterr().err,
                       f"could not append epoch 2 to {run / 'metrics.jsonl'} (No space left on device)")
    assert checkpoint_epoch(run) == 2 and [m["epoch"] for m in metrics_of(run)] == [1]  # cut back, not torn
    resumed = train.main(["--resume", str(run), "--quiet"])
    assert same_weights(resumed, uninterrupted)
    timing = ("images_per_second", "epoch_seconds")  # the only fields that differ between two runs
    assert [{k: v for k, v in m.items() if k not in timing} for m in metrics_of(run)] == \
        [{k: v for k, v in m.items() if k not in timing} for m in uninterrupted["metrics"]]


@pytest.mark.parametrize("argv, says", [
    (["--out-dir", "{file}"], "--out-dir {file} is a file, not a folder"),
    (["--out-dir", "{file}/figures"], "--out-dir {file}/figures cannot be created: {file} is a file"),
    (["--run-dir", "{file}"], "--run-dir {file} is a file, not a folder"),
    (["--quick", "--run-dir", "{file}"], "--run-dir {file} is a file, not a folder"),
])
def test_lesson_output_folders_that_cannot_be_written(argv, says, tmp_path, capsys, no_data):
    a_file = tmp_path / "a file"
    a_file.write_text("not a folder")
    argv = [a.replace("{file}", str(a_file)) for a in argv]
    out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "figures")]
    one_error_line(cli.run_command(lesson("05").main, [*argv, *out]), capsys.readouterr().err,
                   says.replace("{file}", str(a_file)))


def test_a_folder_the_system_will_not_make_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """The check makes the folder for real, so it holds even where os.access says yes to root
    (under /proc, say); refused or not, the check leaves no folder of its own behind."""
    real_mkdir = Path.mkdir

    def refuse_under_locked(self, *args, **kwargs):
        if "locked" in self.parts:
            raise OSError(errno.EACCES, "Permission denied")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_under_locked)
    figures = tmp_path / "locked" / "figures"
    one_error_line(cli.run_command(lesson("05").main, ["--quick", "--out-dir", str(figures)]), capsys.readouterr().err,
                   f"--out-dir {figures} cannot be written (Permission denied)")
    assert runs.writable_folder(tmp_path / "new" / "figures", "--out-dir", create=False) == tmp_path / "new" / "figures"
    assert sorted(tmp_path.iterdir()) == []  # neither refused nor proved folders were left


def test_a_full_disk_under_a_lessons_figures_is_one_line(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    one_error_line(cli.run_command(lesson("03").main, ["--quick", "--out-dir", str(tmp_path)]), capsys.readouterr().err,
                   f"could not write {tmp_path}/03_", "(No space left on device)")


def test_a_lesson_run_again_replaces_its_own_runs(tmp_path, capsys):
    """Lesson 5 --quick into a --run-dir of our choosing, twice: the second run replaces the first
    (the lessons pass --overwrite for their own run folders)."""
    argv = ["--quick", "--dataset", "digits", "--run-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "figures")]
    for _ in range(2):
        assert cli.run_command(lesson("05").main, argv) == 0, capsys.readouterr().err
    assert [m["epoch"] for m in metrics_of(tmp_path / "runs" / "seed0")] == [1, 2]
    assert (tmp_path / "runs" / "seed0" / runs.FIGURE).is_file()


# ---------------------------------------------------------------------------------------
# 5. Values that used to be ignored without a word
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--img-size", "0"], "--img-size must be at least 1, got 0"),
    (["--patch-size", "0"], "--patch-size must be at least 1, got 0"),
    (["--dataset", "digits", "--num-classes-subset", "3"],
     "--num-classes-subset keeps the first K classes of an image folder (--dataset imagefolder); --dataset digits"),
    (["--data-fraction", "1e-9"], "--data-fraction 1e-09 keeps 2.4e-08 of the 24 training images, less than one per "
                                  "class (each class would keep its one image, 3 in all"),
    (["--data-fraction", "0.2"], "--data-fraction 0.2 keeps 6 of the 24 training images, fewer than one batch of 8; "
                                 "lower --batch-size or raise --data-fraction"),
])
def test_values_that_were_silently_ignored_are_refused(argv, says, folder, tmp_path, capsys):
    code = run_train([*flags(folder, 1), "--output-dir", str(tmp_path / "run"), *argv])
    one_error_line(code, capsys.readouterr().err, says)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_help_names_every_dataset_of_each_preset():
    text = " ".join(config.build_parser().format_help().split())
    assert "the default for digits, mnist10k, mnist10k-sum, fake" in text
    assert "the default for cifar10, cifar100, imagefolder" in text
    assert "--overwrite" in text and "is refused" in text


# ---------------------------------------------------------------------------------------
# 6. Every run's own figure: the nonlocality (Fig. 5) and the gates (Fig. 6)
# ---------------------------------------------------------------------------------------
def is_png(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and image.size[0] > 300


def test_a_finished_run_folder_holds_its_own_figure_and_plots_py_redraws_it(folder, tmp_path, capsys):
    run = tmp_path / "run"
    result = train.main([*flags(folder, 2), "--output-dir", str(run)])
    figure = run / runs.FIGURE
    assert result["figure"] == str(figure) and is_png(figure)

    figure.unlink()
    assert plots.main([str(run)]) is None and is_png(figure)
    assert f"wrote {figure}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds no metrics.jsonl"):
        plots.main([str(tmp_path)])
    done = subprocess.run([sys.executable, str(HERE / "plots.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=HERE)
    one_error_line(done.returncode, done.stderr, f"{tmp_path} holds no metrics.jsonl")


def test_a_metrics_line_the_figure_cannot_read_is_one_line_naming_it(folder, tmp_path, capsys):
    """metrics.jsonl edited or damaged by hand: plots.py names the file and the epoch's line, and
    train.py's call at a run's end adds that the run itself is whole. Bytes that are not text, like
    a torn line, are skipped."""
    run = tmp_path / "run"
    train.main([*flags(folder, 2), "--output-dir", str(run), "--no-figure"])
    lines = [json.loads(line) for line in (run / runs.METRICS).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2] and "gates" in lines[1]
    cases = [
        (lambda r: r.pop("val_top5"), "val_top5 missing or not a number"),
        (lambda r: r.update(val_top1=None), "val_top1 missing or not a number"),
        (lambda r: r.update(nonlocality=[]), "nonlocality and gates must be tables of blocks x heads"),
        (lambda r: r.update(nonlocality=5), "nonlocality and gates must be tables of blocks x heads"),
        (lambda r: r.update(gates=[[0.7, None]]), "nonlocality or gates is not a table of numbers"),
        (lambda r: r.pop("gates"), "nonlocality and gates must be tables of blocks x heads, of the same shape on "
                                   "every line (the first line: nonlocality 3 x 4, gates 1 x 4)"),
    ]
    for change, says in cases:
        last = json.loads(json.dumps(lines[1]))
        change(last)
        (run / runs.METRICS).write_text("".join(json.dumps(line) + "\n" for line in (lines[0], last)))
        one_error_line(cli.run_command(plots.main, [str(run)]), capsys.readouterr().err,
                       f"{run / runs.METRICS}, the line of epoch 2: {says}")
    with pytest.raises(runs.RunError, match="the line of epoch 2: .*; the checkpoint and metrics are whole: draw"):
        plots.figure_of_run(run)
    (run / runs.METRICS).write_bytes(json.dumps(lines[0]).encode() + b"\n\xff\xfe not text\n")
    assert plots.main([str(run)]) is None and is_png(run / runs.FIGURE)  # epoch 1 drawn; the bad bytes skipped
    assert not list(run.glob("*.tmp"))


def test_no_figure_draws_none_and_says_so_and_a_quick_lesson_passes_it_only_for_scratch_runs(folder, tmp_path, capsys):
    run = tmp_path / "run"
    result = train.main([*flags(folder, 1), "--output-dir", str(run), "--no-figure"])
    assert result["figure"] is None and not (run / runs.FIGURE).exists()
    assert "; metrics in " in capsys.readouterr().out
    assert plots.main([str(run)]) is None and is_png(run / runs.FIGURE)  # drawn later from metrics.jsonl

    from lessons._command import parse, run_folder, training_parser
    from lessons._protocol import QUICK, RECIPE
    from lessons._command import run_settings

    for typed, scratch in (([], True), (["--run-dir", str(tmp_path / "mine")], False)):
        args = parse(training_parser("", "lessons/99_test.py", RECIPE, QUICK), ["--quick", *typed])
        with run_folder(args) as run_root:
            assert run_settings(args, run_root / "r").get("no_figure", False) is scratch, typed


def figure_numbers(title: str) -> list[str]:
    return re.findall(r"Fig\. (\d+)", title)


def test_the_run_figure_fits_its_gates_and_tells_layers_and_heads_apart():
    """The gates of a short run move a few hundredths from sigma(1) = 0.73: on a 0-1 axis four
    layers would be one thick line. The axis fits the data (the 0-1 range and the init value
    marked), each head's line can be seen, each layer has its own colour, and the panels carry
    the paper's numbers: Fig. 5 the nonlocality, Fig. 6 the gates."""
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    epochs = list(range(1, 11))
    rise = torch.linspace(0, 1, 10)[None, :, None, None]  # (1, epochs, 1, 1)
    spread = torch.tensor([0.0, 0.01, 0.02, 0.03])[None, None, None, :]  # (1, 1, 1, H): four heads apart
    gates = plots.INIT_GATE + rise * (0.02 + 0.01 * torch.arange(4.0)[None, None, :, None] + spread)  # (1, 10, 4, 4)
    colours = plots.layer_colours(6)
    ax = Figure().subplots()
    plots.draw_gates(ax, epochs, gates, colours)
    low, high = ax.get_ylim()
    assert low <= plots.INIT_GATE and high >= gates.max() and high - low < 3 * (gates.max() - plots.INIT_GATE)
    assert "[0, 1]" in ax.get_ylabel() and any("0.73" in line.get_label() for line in ax.lines)
    heads = [line for line in ax.lines if line.get_label().startswith("_")]  # unlabelled: one per head
    assert len(heads) == 16 and all(line.get_alpha() >= 0.5 and line.get_linewidth() >= 0.8 for line in heads)
    rgb = torch.tensor([to_rgb(colour) for colour in colours])
    apart = torch.cdist(rgb, rgb) + torch.eye(len(rgb)) * 10
    assert apart.min() > 0.25, "two layers share nearly one colour"
    assert figure_numbers(ax.get_title()) == ["6"]  # the gates are the paper's Fig. 6

    nonlocal_ax = Figure().subplots()
    plots.draw_nonlocality(nonlocal_ax, epochs, torch.rand(1, 10, 6, 4) + 1, 4, colours)
    assert figure_numbers(nonlocal_ax.get_title()) == ["5"]  # and the nonlocality its Fig. 5
    many = torch.tensor([to_rgb(colour) for colour in plots.layer_colours(12)])  # the paper's 12 blocks
    assert (torch.cdist(many, many) + torch.eye(12) * 10).min() > 0.1


def test_the_figure_of_a_deit_run_has_no_gates(folder, tmp_path):
    run = tmp_path / "deit"
    train.main([*flags(folder, 1), "--model", "deit_tiny", "--output-dir", str(run)])
    assert "gates" not in metrics_of(run)[0] and is_png(run / runs.FIGURE)


# ---------------------------------------------------------------------------------------
# 7. --overwrite loses nothing: the old run stays whole until the new one has a checkpoint
# ---------------------------------------------------------------------------------------
def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("failure", ["bad data", "Ctrl-C", "a full disk"])
def test_overwrite_puts_the_old_run_back_when_the_new_one_fails_before_its_first_checkpoint(
        failure, folder, truncated_folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "ow"
    train.main([*flags(folder, 2), "--output-dir", str(run)])
    before = snapshot(run)
    argv = [*flags(folder, 1), "--output-dir", str(run), "--overwrite"]
    real_save = torch.save
    with monkeypatch.context() as patch:
        if failure == "bad data":  # a truncated PNG, read in the first epoch (batches of 5 read all 25)
            argv = [*flags(truncated_folder, 1, "--batch-size", "5"), "--output-dir", str(run), "--overwrite"]
        elif failure == "Ctrl-C":  # at the first optimiser step
            patch.setattr(torch.amp.GradScaler, "step", ctrl_c)
        else:  # the first checkpoint meets a full disk halfway
            patch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, DiskFullAt(f, 20_000), *a, **k))
        code = run_train(argv)
    err = capsys.readouterr().err
    back = f"the run that --overwrite was replacing is back in {run}"
    if failure == "Ctrl-C":
        assert code == 130 and err.strip().splitlines() == [
            f"interrupted before the first epoch ended: no checkpoint written yet (to {run.resolve()}); {back}"]
    else:
        one_error_line(code, err, "truncated.png cannot be read" if failure == "bad data" else
                       f"could not write {run / 'checkpoint.pth'} (No space left on device)", back)
    assert snapshot(run) == before  # checkpoint, metrics and figure, byte for byte
    assert sorted(path.name for path in run.iterdir()) == sorted([*before, runs.LOCK])  # nothing aside is left


def test_overwrite_removes_the_old_run_once_the_new_one_has_its_first_checkpoint(folder, tmp_path, monkeypatch):
    run = tmp_path / "ow"
    train.main([*flags(folder, 2), "--output-dir", str(run)])
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):  # what the folder holds while the first checkpoint is written
        seen.append({path.name for path in run.iterdir()} - {"checkpoint.pth.tmp"})
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    train.main([*flags(folder, 1), "--output-dir", str(run), "--overwrite"])
    monkeypatch.undo()
    assert seen[0] == {runs.LOCK, runs.REPLACED}  # the old run aside, whole, until then
    assert sorted(path.name for path in run.iterdir()) == sorted([runs.LOCK, "checkpoint.pth", "metrics.jsonl",
                                                                   "figure.png"])
    assert [m["epoch"] for m in metrics_of(run)] == [1]


def test_a_killed_overwrite_leaves_the_old_run_for_the_next_command_to_put_back(folder, tmp_path, capsys):
    """kill -9 (or a power cut) gives the run no moment to put anything back: the old run waits,
    whole, in the hidden folder, and the next train.py that names the folder puts it back."""
    run = tmp_path / "ow"
    train.main([*flags(folder, 2), "--output-dir", str(run)])
    before = snapshot(run)
    for next_command in ("a new run", "--resume"):
        (tmp_path / "here").unlink(missing_ok=True)  # start_stalled's signal that the run has stalled
        holder = start_stalled(tmp_path, [*flags(folder, 1), "--output-dir", str(run), "--overwrite"], "first step")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        if next_command == "a new run":  # refused as the old run's folder again, and nothing lost
            one_error_line(run_train([*flags(folder, 1), "--output-dir", str(run)]), capsys.readouterr().err,
                           f"--output-dir {run} holds another run (logged up to epoch 2)")
            assert snapshot(run) == before
        else:  # or the old run goes on where it stopped
            assert train.main(["--resume", str(run), "--epochs", "3", "--quiet"])["epoch"] == 3
            assert [m["epoch"] for m in metrics_of(run)] == [1, 2, 3]
        assert not (run / runs.REPLACED).exists()


def test_a_run_killed_after_its_first_checkpoint_keeps_it_and_the_old_run_goes(folder, tmp_path):
    """The other moment kill -9 can hit: the new run has written its checkpoint but not yet removed
    the old run. The new run is the one asked for: the next command removes the old one."""
    run, old = tmp_path / "ow", tmp_path / "old"
    train.main([*flags(folder, 1), "--output-dir", str(run)])
    train.main([*flags(folder, 2), "--output-dir", str(old)])
    (run / runs.REPLACED).mkdir()
    for name in ("checkpoint.pth", "metrics.jsonl"):
        (old / name).rename(run / runs.REPLACED / name)
    assert train.main(["--resume", str(run), "--epochs", "2", "--quiet"])["epoch"] == 2
    assert not (run / runs.REPLACED).exists() and [m["epoch"] for m in metrics_of(run)] == [1, 2]


# ---------------------------------------------------------------------------------------
# 8. A refused run writes nothing, and prints only why
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["an image the patches do not tile", "one class", "fewer images than a batch",
                                  "another run's folder"])
def test_a_refused_run_writes_nothing(case, folder, one_class_folder, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    argv, says = {
        "an image the patches do not tile": ([*flags(folder, 1), "--img-size", "18"],
                                             "image 18x18 is not divisible by patch 4"),
        "one class": (flags(one_class_folder, 1, "--batch-size", "4"), "1 class"),
        "fewer images than a batch": ([*flags(folder, 1), "--data-fraction", "0.2"], "fewer than one batch of 8"),
        "another run's folder": (flags(folder, 1), "holds another run"),
    }[case]
    if case == "another run's folder":  # a finished run, copied without its lock file
        train.main([*flags(folder, 1), "--output-dir", str(out)])
        (out / runs.LOCK).unlink()
        before = snapshot(out)
    one_error_line(run_train([*argv, "--output-dir", str(out)]), capsys.readouterr().err, says)
    if case == "another run's folder":
        assert snapshot(out) == before and not (out / runs.LOCK).exists()
    else:
        assert not (tmp_path / "new").exists()  # neither the folder nor its parent


def test_fewer_than_two_classes_are_refused(folder, one_class_folder, tmp_path, capsys):
    """One class makes every prediction right: top-1 would read 100% whatever the model learnt."""
    one_error_line(run_train([*flags(one_class_folder, 1, "--batch-size", "4"), "--output-dir", str(tmp_path / "a")]),
                   capsys.readouterr().err, f"{one_class_folder}/train holds 1 class (a_red)", "at least two")
    one_error_line(run_train([*flags(folder, 1), "--num-classes-subset", "1", "--output-dir", str(tmp_path / "b")]),
                   capsys.readouterr().err, "--num-classes-subset must be at least 2, got 1")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["an image the patches do not tile", "another run's folder",
                                  "a read-only output folder", "a truncated validation image"])
def test_a_refused_run_prints_its_reason_and_no_note(case, folder, tmp_path, tmp_path_factory, capsys, monkeypatch):
    """--epochs 1 caps the recipe's 2 warmup epochs to 0: a note, but only for a run that goes ahead."""
    out = tmp_path / "run"
    data_dir = folder
    if case == "another run's folder":
        train.main([*flags(folder, 1), "--output-dir", str(out)])
    elif case == "a read-only output folder":
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == out:
                raise OSError(errno.EROFS, "Read-only file system")
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    elif case == "a truncated validation image":  # read while the run is set up
        data_dir = colour_image_folder(tmp_path_factory.mktemp("bad-val"), 8, 4)
        truncated_png(data_dir / "val" / "a_red" / "0.png")
    capsys.readouterr()
    extra = ["--img-size", "18"] if case == "an image the patches do not tile" else []
    loud = [flag for flag in flags(data_dir, 1) if flag != "--quiet"] + ["--no-progress"]
    code = run_train([*loud, "--output-dir", str(out), *extra])
    captured = capsys.readouterr()
    assert captured.out == "", captured.out  # refused before the run's first line: no note either
    one_error_line(code, captured.err)

    loud = [flag for flag in flags(folder, 1) if flag != "--quiet"] + ["--no-progress"]
    assert run_train([*loud, "--output-dir", str(tmp_path / "goes-ahead")]) == 0
    assert "note: --warmup-epochs 2 capped to 0" in capsys.readouterr().out
