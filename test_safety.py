"""Tests of issue 9: checkpoints that cannot run code, a run that survives being killed, and
no bad input that ends in a traceback.

Each test states a claim and asserts something that could fail: a file that would run code
creates nothing, each bad file is one `error:` line (exit code 2) or a ValueError naming its
path, a run killed at any moment (even while its checkpoint is being written) resumes to the
very weights of an uninterrupted run, and every bad flag of train.py and of the lessons is one
`error:` line. Data and models are tiny and written by the tests; the whole file takes well
under a minute on two CPU cores.
"""

import argparse
import math
import os
import pickle
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import cli
import config
import convit
import data
import runs
import train
from conftest import (TINY, colour_image_folder, lesson, metrics_of, one_error_line, run_train, snapshot, start_stalled,
                      tiny_model)

HERE = Path(__file__).resolve().parent


def run_flags(folder: Path, epochs: int = 3) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8",
            "--epochs", str(epochs), "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch run: what every interrupted run must end up as, bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    result = train.main([*run_flags(folder), "--output-dir", str(out)])
    return {"state": result["model"].state_dict(), "metrics": metrics_of(out), "dir": out}


# ---------------------------------------------------------------------------------------
# 1. Every load is weights_only=True; nothing we load runs code
# ---------------------------------------------------------------------------------------
def test_our_checkpoint_loads_with_weights_only_and_no_allow_list(reference):
    checkpoint = torch.load(reference["dir"] / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 3 and isinstance(checkpoint["args"], dict)
    state = checkpoint["rng"][0]
    assert all(torch.is_tensor(state[key]) for key in ("torch", "loader"))
    assert isinstance(state["python"][1], tuple) and all(isinstance(x, int) for x in state["python"][1])


def test_released_layout_with_its_args_namespace_loads(tmp_path, capsys):
    """What a released ConViT/DeiT .pth holds: real optimiser, scheduler and scaler states, an
    EMA copy and the training script's argparse.Namespace."""
    model = tiny_model(num_classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300)
    args = argparse.Namespace(model="convit_tiny", lr=5e-4, epochs=300, input_size=224, opt_betas=None,
                              sched="cosine", mixup=0.8, device="cuda", dist_url="env://", output_dir="")
    released = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "epoch": 299, "args": args, "scaler": torch.amp.GradScaler("cpu").state_dict(),
                "model_ema": model.state_dict()}
    path = tmp_path / "convit_tiny.pth"
    torch.save(released, path)

    read = checkpoints.read_checkpoint_file(path)
    assert read["args"] == args and read["epoch"] == 299
    loaded = checkpoints.load_checkpoint(tiny_model(num_classes=3), path, verbose=False)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


class Evil:
    """A pickle that runs a shell command when it is loaded (if torch.load were not told weights_only)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil_files(tmp_path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PWNED"
    files = {"top level": {"model": Evil(marker)},
             "inside the args Namespace": {"model": tiny_model(num_classes=3).state_dict(),
                                           "args": argparse.Namespace(x=Evil(marker))}}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"evil {len(paths)}.pth"
        torch.save(content, paths[name])
    return paths, marker


def test_evil_checkpoint_runs_no_code_through_the_library_or_train(evil_files, folder, capsys):
    paths, marker = evil_files
    for path in paths.values():
        with pytest.raises(ValueError, match="posix.system, which is code") as refused:
            checkpoints.load_checkpoint(tiny_model(num_classes=3), path)
        assert str(path) in str(refused.value)
        flags = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8"]
        for how in (["--eval-only", "--checkpoint", str(path)], ["--checkpoint", str(path)], ["--resume", str(path)]):
            one_error_line(run_train([*flags, *how]), capsys.readouterr().err, str(path), "refused without running it")
    assert not marker.exists()


def test_evil_checkpoint_runs_no_code_from_the_command_line(evil_files):
    paths, marker = evil_files
    path = paths["top level"]
    done = subprocess.run([sys.executable, str(HERE / "train.py"), "--eval-only", "--checkpoint", str(path),
                           "--dataset", "fake"], capture_output=True, text=True, timeout=300, cwd=HERE)
    one_error_line(done.returncode, done.stderr, str(path), "asks to load posix.system")
    assert not marker.exists()


def test_no_load_anywhere_can_run_code():
    """One torch.load in the code, checkpoints.read_checkpoint_file's, and no file that turns weights_only off."""
    sources = {path: path.read_text() for path in [*HERE.glob("*.py"), *HERE.glob("lessons/*.py")]}
    unsafe = "weights_only=" + "False"  # spelled apart, so that this file does not match itself
    assert [str(path) for path, text in sources.items() if unsafe in text] == []
    loads = [str(path.name) for path, text in sources.items() for _ in range(text.count("torch.load(")) if
             not path.name.startswith("test_")]
    assert loads == ["checkpoints.py"]
    assert "torch.load(path, map_location=\"cpu\", weights_only=True)" in sources[HERE / "checkpoints.py"]
    unpickling = ["pickle." + "load(", "pickle." + "loads(", "allow_pickle=" + "True"]  # data files: no code either
    assert [path.name for path, text in sources.items() for call in unpickling
            if call in text and not path.name.startswith("test_")] == []


def test_evil_cifar_batch_runs_no_code_and_a_plain_one_still_loads(cifar_folder, tmp_path, capsys):
    """CIFAR's batches are pickles too: a cifar-10-batches-py folder someone hands over must not run code."""
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil" / "cifar-10-batches-py"
    evil.mkdir(parents=True)
    for plain in (cifar_folder / "cifar-10-batches-py").iterdir():
        (evil / plain.name).write_bytes(plain.read_bytes())
    with open(evil / "data_batch_3", "wb") as f:  # one batch among plain ones
        pickle.dump({"data": Evil(marker), "labels": [0]}, f)
    with pytest.raises(ValueError, match="data_batch_3 .*asks to load posix.system, which is code, not data"):
        data.load_cifar("cifar10", tmp_path / "evil", True, transform=None)
    one_error_line(run_train(["--dataset", "cifar10", "--data-dir", str(tmp_path / "evil"), *TINY]),
                   capsys.readouterr().err, "refused without running it")
    assert not marker.exists()
    plain = data.load_cifar("cifar10", cifar_folder, True, transform=None)  # the test's own CIFAR-format files
    assert plain.images.shape == (100, 3, 32, 32) and plain.targets[:11] == [*range(10), 0]


# ---------------------------------------------------------------------------------------
# 2. Bad files: each a clear refusal, from the library and from train.py
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(reference, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad files")
    good = (reference["dir"] / "checkpoint.pth").read_bytes()
    files = {"random bytes": root / "random.pth", "empty": root / "empty.pth", "truncated": root / "truncated.pth",
             "a folder": root / "folder", "an int": root / "int.pth", "another model": root / "small.pth",
             "NaN weights": root / "nan.pth", "missing": root / "missing.pth", "a raw pickle": root / "raw.pth"}
    files["a raw pickle"].write_bytes(pickle.dumps({"model": {}}, protocol=4))  # not torch.save's format
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["a folder"].mkdir()
    torch.save(3, files["an int"])
    torch.save(convit.create_model("convit_tiny", img_size=16, patch_size=4, num_classes=3, embed_dim=64, depth=2,
                                   local_up_to_layer=1).state_dict(), files["another model"])
    nan = torch.load(reference["dir"] / "checkpoint.pth", weights_only=True)
    nan["model"]["blocks.0.attn.qk.weight"][0, 0] = math.nan
    torch.save(nan, files["NaN weights"])
    return files


# kind: what the message says, from the library (load_checkpoint) and from train.py
BAD_FILES = {
    "random bytes": ("truncated or damaged", "truncated or damaged"),
    "empty": ("empty file", "empty file"),
    "truncated": ("truncated or damaged", "truncated or damaged"),
    "a folder": ("is a folder", "folder"),
    "an int": ("holds an int, not a dict", "holds an int, not a dict"),
    "another model": ("does not fit this model", "does not fit this model"),
    "NaN weights": ("NaN or inf in 1 tensor(s), e.g. blocks.0.attn.qk.weight", "NaN"),
    "missing": ("does not exist", "does not exist"),
    "a raw pickle": ("not a PyTorch file", "not a PyTorch file"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_checkpoint_file_is_one_clear_refusal(kind, bad_files, folder, capsys, recwarn):
    path = bad_files[kind]
    library_says, train_says = BAD_FILES[kind]
    with pytest.raises(ValueError) as refused:
        checkpoints.load_checkpoint(tiny_model(num_classes=3), path, verbose=False)
    assert str(path) in str(refused.value) and library_says in str(refused.value)

    flags = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8", "--epochs", "4"]
    for how in (["--eval-only", "--checkpoint"], ["--checkpoint"], ["--resume"]):
        says = train_says
        if how == ["--resume"] and kind == "another model":
            says = "is not a checkpoint of train.py"  # a bare state dict: nothing to resume
        if how == ["--resume"] and kind == "NaN weights":
            says = "holds NaN or inf (model.blocks.0.attn.qk.weight): the run had diverged, so it cannot be resumed"
        one_error_line(run_train([*flags, *how, str(path)]), capsys.readouterr().err, str(path), says)
    assert not [str(w.message) for w in recwarn if "pickle" in str(w.message)]  # torch's warning: a second line


@pytest.mark.parametrize("edit", [{"epoch": -1}, {"epoch": 0}, {"epoch": 99}, {"epoch": "2"}, {"epochs": "3"}])
def test_a_checkpoint_with_a_damaged_epoch_count_is_refused_and_its_run_kept(edit, folder, tmp_path, capsys):
    """Edited by hand, epoch -1 once restarted the schedule and rewrote metrics.jsonl to match."""
    run = tmp_path / "run"
    assert run_train([*run_flags(folder, epochs=2), "--output-dir", str(run)]) == 0
    checkpoint = torch.load(run / "checkpoint.pth", weights_only=True)
    if "epoch" in edit:
        checkpoint["epoch"] = edit["epoch"]
    else:
        checkpoint["args"]["epochs"] = edit["epochs"]
    torch.save(checkpoint, run / "checkpoint.pth")
    before = snapshot(run)
    one_error_line(run_train(["--resume", str(run), "--epochs", "3"]), capsys.readouterr().err,
                   f"{run / 'checkpoint.pth'} has a damaged epoch count")
    assert snapshot(run) == before


def test_weights_that_do_not_fit_their_own_config_say_which(folder, tmp_path, capsys):
    """torch's message starts 'Error(s) in loading state_dict for ConViT:' and names the tensor on
    the next line, which a message cut at its first line would lose."""
    run = tmp_path / "run"
    assert run_train([*run_flags(folder, epochs=2), "--output-dir", str(run)]) == 0
    checkpoint = torch.load(run / "checkpoint.pth", weights_only=True)
    checkpoint["model"]["head.weight"] = checkpoint["model"]["head.weight"][:, :-1]
    torch.save(checkpoint, run / "checkpoint.pth")
    before = snapshot(run)
    one_error_line(run_train(["--resume", str(run), "--epochs", "3"]), capsys.readouterr().err,
                   "does not restore this run (RuntimeError: Error(s) in loading state_dict for ConViT: "
                   "size mismatch for head.weight")
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------
# 3. Killed at any moment, nothing lost
# ---------------------------------------------------------------------------------------
def start_and_stop(tmp_path, moment: str, argv: list[str], how: signal.Signals) -> subprocess.CompletedProcess:
    """Run train.py until it reaches `moment` (conftest.start_stalled), send it `how`, return what it said."""
    out = (tmp_path / "stdout").open("w+")
    process = start_stalled(tmp_path, argv, moment, stdout=out)
    process.send_signal(how)
    process.wait(timeout=120)
    out.seek(0)
    return subprocess.CompletedProcess(process.args, process.returncode, out.read(), (tmp_path / "stderr").read_text())


# moment: the epoch of the checkpoint on disk afterwards, the epochs in metrics.jsonl afterwards
MOMENTS = {
    "mid-epoch": (1, [1]),
    "half written": (1, [1]),
    "before the rename": (1, [1]),
    "after the rename": (2, [1]),  # epoch 2's metrics line follows its checkpoint; --resume puts it back
}


@pytest.mark.parametrize("moment", MOMENTS)
def test_killed_at_any_moment_resumes_to_the_same_weights(moment, folder, reference, tmp_path):
    run = tmp_path / "run"
    flags = run_flags(folder)
    killed = start_and_stop(tmp_path, moment, [*flags, "--output-dir", str(run)], signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    on_disk, epochs_logged = MOMENTS[moment]
    if moment in ("half written", "before the rename"):  # killed with the new checkpoint on its way
        assert (run / "checkpoint.pth.tmp").stat().st_size > 0
    assert checkpoints.read_checkpoint_file(run / "checkpoint.pth")["epoch"] == on_disk  # it loads: the last whole epoch
    assert [m["epoch"] for m in metrics_of(run)] == epochs_logged

    resumed = train.main([*flags, "--resume", str(run)])  # a run folder: its checkpoint.pth
    assert resumed["epochs_run"] == 3 - on_disk
    state = resumed["model"].state_dict()
    assert all(torch.equal(state[key], reference["state"][key]) for key in reference["state"])
    # metrics.jsonl holds each epoch once, with the uninterrupted run's figures
    assert [(m["epoch"], m["val_loss"], m["lr"]) for m in metrics_of(run)] == \
        [(m["epoch"], m["val_loss"], m["lr"]) for m in reference["metrics"]]
    assert not list(run.glob("*.tmp"))  # the torn temporary file was replaced and renamed


def test_ctrl_c_names_the_real_checkpoint_and_resumes_exactly(folder, reference, tmp_path):
    run = tmp_path / "run"
    flags = run_flags(folder)
    stopped = start_and_stop(tmp_path, "mid-epoch", [*flags, "--output-dir", str(run)], signal.SIGINT)
    path = (run / "checkpoint.pth").resolve()
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines() == [
        f"interrupted; the last checkpoint is {path}: continue with --resume {path}"]
    resumed = train.main([*flags, "--resume", str(path)])
    state = resumed["model"].state_dict()
    assert all(torch.equal(state[key], reference["state"][key]) for key in reference["state"])


def test_ctrl_c_before_the_first_checkpoint_says_none_was_written(folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pth").write_bytes(b"an earlier run's")  # older than this run: not its checkpoint
    os.utime(run / "checkpoint.pth", (0, 0))

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.amp.GradScaler, "step", ctrl_c)
    code = run_train([*run_flags(folder), "--output-dir", str(run), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"interrupted before the first epoch ended: no checkpoint written yet (to {run.resolve()}); "
        f"the run that --overwrite was replacing is back in {run}"]
    assert (run / "checkpoint.pth").read_bytes() == b"an earlier run's"  # the older run's file, back in place


# ---------------------------------------------------------------------------------------
# 4. --resume with changed flags
# ---------------------------------------------------------------------------------------
def test_resume_refuses_changed_recipe_flags_and_allows_run_only_ones(folder, reference, tmp_path, capsys):
    checkpoint = str(reference["dir"] / "checkpoint.pth")
    flags = run_flags(folder)
    lr = checkpoints.read_checkpoint_file(checkpoint)["args"]["lr"]  # 1.6e-2 * 8 / 512 = 2.5e-4
    one_error_line(run_train([*flags, "--lr", "0.5", "--depth", "4", "--resume", checkpoint]),
                   capsys.readouterr().err, "--depth 4 (checkpoint: 3)", f"--lr 0.5 (checkpoint: {lr})")
    one_error_line(run_train([*run_flags(folder, epochs=2), "--resume", checkpoint]), capsys.readouterr().err,
                   "--epochs 2 is fewer than the 3 the run was planned for", "--stop-after")
    # Where and how it runs may change: another output folder, workers, threads, no progress bar.
    moved = train.main([*flags, "--resume", checkpoint, "--output-dir", str(tmp_path), "--workers", "1",
                        "--threads", "1", "--no-progress"])
    assert moved["epochs_run"] == 0 and moved["epoch"] == 3
    # The run had finished: the new folder is a whole copy of it, which --resume continues in turn.
    assert (tmp_path / "checkpoint.pth").read_bytes() == Path(checkpoint).read_bytes()
    assert runs.read_metrics(tmp_path) == runs.read_metrics(reference["dir"])


def test_more_epochs_on_resume_refit_the_rest_of_the_cosine(folder, tmp_path, capsys):
    """A 4-epoch run stopped after 2, resumed with --epochs 6: the lr goes on from where it was
    and falls along a cosine to --min-lr at epoch 6 (telescoping, see train.refit_cosine)."""
    flags = [*run_flags(folder, epochs=4), "--lr", "1e-3", "--min-lr", "1e-5", "--output-dir", str(tmp_path)]
    train.main([*flags, "--stop-after", "2"])
    grown = [*flags[:-2], "--epochs", "6"]  # the later --epochs wins
    result = train.main([*grown, "--resume", str(tmp_path)])
    lrs = [m["lr"] for m in metrics_of(tmp_path)]
    peak, low = 1e-3, 1e-5
    assert result["epochs_run"] == 4 and len(lrs) == 6
    # epoch 3 is trained at the lr the 4-epoch plan had reached (T = 3 cosine epochs after 1 of warmup) ...
    assert lrs[2] == pytest.approx(low + (peak - low) * (1 + math.cos(math.pi / 3)) / 2, rel=1e-9)
    # ... and from there the cosine is stretched to end at epoch 6 (T = 5)
    for epoch in (4, 5, 6):
        expected = low + (lrs[2] - low) * (1 + math.cos(math.pi * (epoch - 2) / 5)) / (1 + math.cos(math.pi / 5))
        assert lrs[epoch - 1] == pytest.approx(expected, rel=1e-9)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # it never rises again
    final = checkpoints.read_checkpoint_file(tmp_path / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"]
    assert final == pytest.approx(low, rel=1e-9)


# ---------------------------------------------------------------------------------------
# 5. Every other bad input: one `error:` line, exit code 2, never a traceback
# ---------------------------------------------------------------------------------------
def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


# (who, argv, what the line says); {folder}, {tmp} and {corrupt} are filled in by the test
BAD_INPUTS = [
    ("train", ["--threads", "-1"], "--threads must be at least 0, got -1"),
    ("train", ["--lr", "-1"], "--lr must be greater than 0, got -1.0"),
    ("train", ["--lr", "nan"], "--lr must be greater than 0, got nan"),
    ("train", ["--workers", "-1"], "--workers must be at least 0, got -1"),
    ("train", ["--device", "foo"], "--device 'foo' is not a device"),
    ("train", ["--device", "cuda"], "--device cuda, but torch sees no GPU"),
    ("train", ["--stop-after", "0"], "--stop-after must be at least 1, got 0"),
    ("train", ["--stop-after", "-1"], "--stop-after must be at least 1, got -1"),
    ("train", ["--smoothing", "1"], "--smoothing must lie in [0, 1), got 1.0"),
    ("train", ["--embed-dim", "-8"], "--embed-dim must be at least 1, got -8"),
    ("train", ["--depth", "0"], "--depth must be at least 1, got 0"),
    ("train", ["--seed", "-1"], "--seed must be at least 0, got -1"),
    ("train", ["--checkpoint", "{tmp}/missing.pth"], "--checkpoint {tmp}/missing.pth does not exist"),
    ("train", ["--checkpoint", "{tmp}/corrupt.pth"], "checkpoint {tmp}/corrupt.pth is truncated or damaged"),
    ("train", ["--resume", "{tmp}"], "--resume {tmp} is a folder without a checkpoint.pth"),
    ("train", ["--resume", ""], "--resume is empty: give a .pth file"),  # not the current folder, resumed unasked
    ("train", ["--eval-only", "--checkpoint", ""], "--eval-only needs --checkpoint PATH"),
    # batch 1: every image is drawn (batches of 8 would drop one image of the 25, maybe the broken one)
    ("train", ["--data-dir", "{corrupt}", "--batch-size", "1"], "image {corrupt}/train/a_red/broken.png cannot be read"),
    ("train", ["--data-dir", "{corrupt}", "--batch-size", "1", "--workers", "1"],  # raised in a loader worker
     "image {corrupt}/train/a_red/broken.png cannot be read"),
    ("train", ["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    ("lesson 01", ["--device", "cuda"], "--device cuda, but torch sees no GPU"),
    ("lesson 03", ["--threads", "-1"], "--threads must be at least 0, got -1"),
    ("lesson 07", ["--device", "foo"], "--device 'foo' is not a device"),
    ("lesson 02", ["--dataset", "imagefolder", "--data-dir", "{tmp}/nowhere"], "data directory {tmp}/nowhere does not exist"),
    ("lesson 02", ["--dataset", "imagefolder", "--data-dir", "{tmp}/corrupt.pth"],
     "data directory {tmp}/corrupt.pth is a file, not a folder (--data-dir)"),
    ("lesson 04", ["--dataset", "cifar10", "--data-dir", "{tmp}"], "could not download cifar10"),
    ("lesson 05", ["--quick", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("lesson 05", ["--quick", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    ("lesson 05", ["--quick", "--lr", "nan"], "--lr must be greater than 0, got nan"),
    ("lesson 11", ["--quick", "--pair-seeds", "-1"], "--pair-seeds must be at least 0, got -1"),  # not after training
    ("lesson 06", ["--quick", "--fractions", "0"], "--fractions must each lie in (0, 1], got 0.0"),
    ("lesson 06", ["--quick", "--sweep", "--regularisers"],
     "--sweep repeats the sweep that chose the recipe, without regularisers: drop --regularisers"),
    ("lesson 06", ["--quick", "--recorded"],  # a --quick run must not add its runs to the committed record
     "--recorded adds the runs trained here to those recorded already: not with --quick or --retrain"),
    ("lesson 09", ["--retrain", "--recorded", "--quick"],
     "--recorded adds the runs trained here to those recorded already: not with --quick or --retrain"),
    ("lesson 06", ["--quick", "--sweep", "--recorded"],
     "--recorded keeps the recipe's runs of both tables, not the sweep's: drop --recorded"),
]


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory) -> Path:
    """The image folder with one PNG that is not an image."""
    root = colour_image_folder(tmp_path_factory.mktemp("corrupt"), 8, 4)
    (root / "train" / "a_red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of an image")
    return root


@pytest.mark.parametrize("who, argv, says", BAD_INPUTS, ids=[f"{w} {' '.join(a)}" for w, a, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line(who, argv, says, folder, corrupt_folder, tmp_path, capsys, monkeypatch):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # a missing CIFAR must not reach the network
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 a zip that ends here")
    fill = {"{tmp}": str(tmp_path), "{corrupt}": str(corrupt_folder)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        says = says.replace(key, value)
    if who == "train":
        data = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8", "--epochs", "1",
                "--output-dir", str(tmp_path / "run")]
        code = run_train([*data, *argv])  # the later flag wins where both give one
    else:
        module = lesson(who.split()[1])
        code = cli.run_command(module.main, [*argv, "--out-dir", str(tmp_path / "figures")])
    one_error_line(code, capsys.readouterr().err, says)


@pytest.mark.parametrize("script, argv, says", [
    ("train.py", ["--device", "cuda"], "--device cuda, but torch sees no GPU"),
    ("lessons/06_sample_efficiency.py", ["--fractions", "0"], "--fractions must each lie in (0, 1], got 0.0"),
    ("lessons/05_escaping_locality.py", ["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
])
def test_bad_input_is_one_error_line_from_the_scripts_themselves(script, argv, says):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(HERE / script), *argv], capture_output=True, text=True,
                          timeout=300, cwd=HERE)
    one_error_line(done.returncode, done.stderr, says)


def test_quiet_prints_only_the_final_result_line(folder, tmp_path, capsys):
    assert run_train([*run_flags(folder, epochs=2), "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done: val top-1") and "after 2 epochs" in lines[0]
    data = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY]
    assert run_train([*data, "--eval-only", "--checkpoint", str(tmp_path)]) == 0  # a run folder is accepted
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "top-1" in lines[0]
    help_text = config.build_parser().format_help()
    assert "--quiet" in help_text and "only the final result line" in help_text


def test_num_heads_alone_says_that_it_widens_c(folder, tmp_path, capsys):
    flags = ["--dataset", "imagefolder", "--data-dir", str(folder), "--img-size", "16", "--patch-size", "4",
             "--depth", "3", "--preset", "small", "--workers", "0", "--batch-size", "8", "--epochs", "1",
             "--no-progress", "--output-dir", str(tmp_path)]
    result = train.main([*flags, "--num-heads", "5"])
    assert result["model"].cfg.embed_dim == 120  # --preset small keeps 24 dims per head
    assert "C=120 = 5 heads x 24," in capsys.readouterr().out
    train.main([*flags, "--num-heads", "5", "--embed-dim", "40", "--output-dir", str(tmp_path / "fixed")])
    assert "C=40," in capsys.readouterr().out  # an explicit C is kept, and nothing more is said


@pytest.mark.parametrize("field, value", [("embed_dim", -8), ("depth", 0), ("num_heads", 0), ("patch_size", 0),
                                          ("mlp_ratio", 0.0), ("num_classes", -1)])
def test_create_model_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}={value}"):
        convit.create_model("convit_tiny", **{field: value})


def test_docs_list_every_overridable_field():
    reference = (HERE / "docs" / "checkpoints.md").read_text()
    paragraph = reference[reference.index("`create_model(name, **overrides)`"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    missing = [f.name for f in convit.fields(convit.ConViTConfig) if f"`{f.name}`" not in paragraph]
    assert missing == []


# ---------------------------------------------------------------------------------------
# Every entry point: no prefix matching, and the lessons' own flags checked before anything is written
# ---------------------------------------------------------------------------------------
def entry_points() -> dict:
    """Every command of the project, by name: its main(argv), and a flag it has with a value (for
    plots.py, which has no flag of its own, the run folder it needs) that would be accepted, or
    refused for its own reason, if a prefix of the flag were taken for it."""
    import bench
    import plots
    from tools import baselines, gpu_check, gpu_profile

    points = {"train.py": (train.main, "--epochs", "0"), "bench.py": (bench.main, "--device", "foo"),
              "plots.py": (plots.main, "--help", "RUN_DIR"), "tools/gpu_check.py": (gpu_check.main, "--budget", "-1"),
              "tools/gpu_profile.py": (gpu_profile.main, "--batch-size", "0"),
              "tools/baselines.py": (baselines.main, "--defaults-only", None)}
    for path in sorted((HERE / "lessons").glob("[0-9][0-9]_*.py")):
        points[f"lessons/{path.name}"] = (lesson(path.name[:2]).main, "--threads", "-1")
    return points


@pytest.mark.parametrize("script", ["train.py", "bench.py", "plots.py", "tools/gpu_check.py", "tools/gpu_profile.py",
                                    "tools/baselines.py",
                                    *[f"lessons/{path.name}" for path in sorted((HERE / "lessons").glob("[0-9][0-9]_*.py"))]])
def test_an_abbreviated_flag_is_refused_by_every_entry_point(script, capsys):
    """argparse takes a unique prefix for the whole flag (`--epoch 3` for --epochs 3) unless told not
    to: a typo then silently means something else. Every parser refuses it and names the flag meant."""
    main, option, value = entry_points()[script]
    typed = option[:-2]  # --epochs -> --epoc, --help -> --he
    code = cli.run_command(main, [typed] + ([value] if value else []))
    one_error_line(code, capsys.readouterr().err, f"unrecognized arguments: {typed}", f"did you mean {option}?")


@pytest.mark.parametrize("argv, says", [
    (["--quick", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["--quick", "--seeds", "0", "0"], "--seeds 0 0 names a seed twice"),
    (["--quick", "--seeds", "0", "-1"], "--seeds must be at least 0, got -1"),
    (["--quick", "--embed-dim", "10"], "width 10 is not divisible by 4 heads"),
    (["--quick", "--depth", "1"], "--depth 1"),
    (["--redraw", "--quick"], "--redraw draws from the JSON of finished runs and trains nothing: "
                              "drop --quick"),
])
def test_a_lessons_bad_flags_are_refused_before_it_writes(argv, says, tmp_path, capsys):
    out, runs_at = tmp_path / "figures", tmp_path / "runs"
    code = cli.run_command(lesson("05").main, [*argv, "--out-dir", str(out), "--run-dir", str(runs_at)])
    one_error_line(code, capsys.readouterr().err, says)
    assert not out.exists() and not runs_at.exists()


# ---------------------------------------------------------------------------------------
# torch and torchvision from different builds: one line naming both, at import and in the suite
# ---------------------------------------------------------------------------------------
@pytest.fixture
def mismatched_torchvision(tmp_path) -> dict:
    """The environment of a process whose torchvision fails at import the way a torchvision built
    for another torch does (a fake package first on the path: nothing is installed)."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    return {**os.environ, "PYTHONPATH": str(fake.parent)}


def versions_line(text: str) -> str:
    from importlib.metadata import version

    lines = [line for line in text.splitlines() if f"torch {torch.__version__}" in line]
    assert len(lines) == 1, text[-3000:]
    assert f"torchvision {version('torchvision')}" in lines[0] and "pip install" in lines[0], lines[0]
    assert "Traceback" not in text, text[-3000:]
    return lines[0]


def test_a_mismatched_torchvision_is_one_line_at_import_of_train_py(mismatched_torchvision):
    done = subprocess.run([sys.executable, str(HERE / "train.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=HERE, env=mismatched_torchvision)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == versions_line(done.stderr) and done.stderr.startswith("error: ")


def test_a_mismatched_torchvision_stops_the_test_session_in_one_line(mismatched_torchvision):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_layout.py"],
                          capture_output=True, text=True, timeout=120, cwd=HERE, env=mismatched_torchvision)
    assert done.returncode != 0
    versions_line(done.stdout + done.stderr)
