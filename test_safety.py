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
import importlib.util
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convit
import data
import test_train
import train

HERE = Path(__file__).resolve().parent
cifar_folder = test_train.cifar_folder  # the fixture: a CIFAR-10-format folder of plain pickles
# The model of test_train.TINY: 16x16 images in 4x4 patches, C = 32, H = 4, 3 blocks (1 GPSA).
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "3", "--num-heads", "4",
        "--preset", "small", "--workers", "0", "--quiet"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def tiny_model(**overrides) -> convit.ConViT:
    return convit.create_model("convit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                               local_up_to_layer=1, num_classes=3, **overrides)


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def one_error_line(code: int, err: str, *phrases: str):
    """Exit code 2, exactly one line on stderr, `error: ...` holding every phrase, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def small_image_folder(root: Path, train_count: int = 8, val_count: int = 4) -> Path:
    """train/ and val/ of three colour classes, 16x16 PNGs: batch 8 makes 3 steps an epoch."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_count), ("val", val_count)):
        for name, colour in zip(("a_red", "b_green", "c_blue"), COLOURS):
            (root / split / name).mkdir(parents=True)
            noise = rng.normal(0, 40, (count, 16, 16, 3))
            for i, pixels in enumerate(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)):
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return small_image_folder(tmp_path_factory.mktemp("images"))


def run_flags(folder: Path, epochs: int = 3) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8",
            "--epochs", str(epochs), "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch run: what every interrupted run must end up as, bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    result = train.main([*run_flags(folder), "--output-dir", str(out)])
    return {"state": result["model"].state_dict(), "metrics": metrics_of(out), "dir": out}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Lessons set torch's thread count for the whole process; put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
    model = tiny_model()
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

    read = convit.read_checkpoint_file(path)
    assert read["args"] == args and read["epoch"] == 299
    loaded = convit.load_checkpoint(tiny_model(), path, verbose=False)
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
             "inside the args Namespace": {"model": tiny_model().state_dict(), "args": argparse.Namespace(x=Evil(marker))}}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"evil {len(paths)}.pth"
        torch.save(content, paths[name])
    return paths, marker


def test_evil_checkpoint_runs_no_code_through_the_library_or_train(evil_files, folder, capsys):
    paths, marker = evil_files
    for path in paths.values():
        with pytest.raises(ValueError, match="posix.system, which is code") as refused:
            convit.load_checkpoint(tiny_model(), path)
        assert str(path) in str(refused.value)
        flags = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8"]
        for how in (["--eval-only", "--checkpoint", str(path)], ["--checkpoint", str(path)], ["--resume", str(path)]):
            one_error_line(train.cli([*flags, *how]), capsys.readouterr().err, str(path), "refused without running it")
    assert not marker.exists()


def test_evil_checkpoint_runs_no_code_from_the_command_line(evil_files):
    paths, marker = evil_files
    path = paths["top level"]
    done = subprocess.run([sys.executable, str(HERE / "train.py"), "--eval-only", "--checkpoint", str(path),
                           "--dataset", "fake"], capture_output=True, text=True, timeout=300, cwd=HERE)
    one_error_line(done.returncode, done.stderr, str(path), "asks to load posix.system")
    assert not marker.exists()


def test_no_load_anywhere_can_run_code():
    """One torch.load in the code, convit.read_checkpoint_file's, and no file that turns weights_only off."""
    sources = {path: path.read_text() for path in [*HERE.glob("*.py"), *HERE.glob("lessons/*.py")]}
    unsafe = "weights_only=" + "False"  # spelled apart, so that this file does not match itself
    assert [str(path) for path, text in sources.items() if unsafe in text] == []
    loads = [str(path.name) for path, text in sources.items() for _ in range(text.count("torch.load(")) if
             not path.name.startswith("test_")]
    assert loads == ["convit.py"]
    assert "torch.load(path, map_location=\"cpu\", weights_only=True)" in sources[HERE / "convit.py"]
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
    one_error_line(train.cli(["--dataset", "cifar10", "--data-dir", str(tmp_path / "evil"), *TINY]),
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
             "NaN weights": root / "nan.pth", "missing": root / "missing.pth"}
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
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_checkpoint_file_is_one_clear_refusal(kind, bad_files, folder, capsys):
    path = bad_files[kind]
    library_says, train_says = BAD_FILES[kind]
    with pytest.raises(ValueError) as refused:
        convit.load_checkpoint(tiny_model(), path, verbose=False)
    assert str(path) in str(refused.value) and library_says in str(refused.value)

    flags = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8", "--epochs", "4"]
    for how in (["--eval-only", "--checkpoint"], ["--checkpoint"], ["--resume"]):
        says = train_says
        if how == ["--resume"] and kind == "another model":
            says = "is not a checkpoint of train.py"  # a bare state dict: nothing to resume
        if how == ["--resume"] and kind == "NaN weights":
            says = "holds NaN or inf (model.blocks.0.attn.qk.weight): the run had diverged, so it cannot be resumed"
        one_error_line(train.cli([*flags, *how, str(path)]), capsys.readouterr().err, str(path), says)


# ---------------------------------------------------------------------------------------
# 3. Killed at any moment, nothing lost
# ---------------------------------------------------------------------------------------
# The run in a subprocess: train.cli, with torch.save, os.replace or the optimiser step
# wrapped so that at the chosen moment of epoch 2 it writes a file for the test and stalls
# until the test kills it. train.py has no hooks for this.
WRAPPER = '''
import io, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import train

# Ctrl-C as a terminal delivers it: a job that a shell started in the background (a CI runner's,
# say) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)

moment, here = sys.argv[2], Path(sys.argv[3])
saves = []


def stall():
    here.write_text(moment)  # the test waits for this file, then kills us
    while True:
        time.sleep(0.01)


real_replace, real_save, real_step = os.replace, torch.save, torch.amp.GradScaler.step


def replace(src, dst):
    if not str(dst).endswith("checkpoint.pth"):
        return real_replace(src, dst)
    saves.append(dst)
    if moment == "before the rename" and len(saves) == 2:
        stall()
    real_replace(src, dst)
    if moment == "after the rename" and len(saves) == 2:
        stall()


def save(obj, f, *args, **kwargs):
    if moment == "half written" and isinstance(obj, dict) and obj.get("epoch") == 2:
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        f.flush()
        stall()
    return real_save(obj, f, *args, **kwargs)


def step(self, optimizer, *args, **kwargs):
    if moment == "mid-epoch" and saves:
        saves.append("step")
        if saves.count("step") == 2:  # the second step of epoch 2
            stall()
    return real_step(self, optimizer, *args, **kwargs)


os.replace, torch.save, torch.amp.GradScaler.step = replace, save, step
sys.exit(train.cli(sys.argv[4:]))
'''


def start_and_stop(tmp_path, moment: str, argv: list[str], how: signal.Signals) -> subprocess.CompletedProcess:
    """Run the wrapper until it reaches `moment`, send it `how`, return what it said."""
    wrapper, here = tmp_path / "wrapper.py", tmp_path / "here"
    wrapper.write_text(WRAPPER)
    out, err = (tmp_path / "stdout").open("w+"), (tmp_path / "stderr").open("w+")
    process = subprocess.Popen([sys.executable, str(wrapper), str(HERE), moment, str(here), *argv],
                               stdout=out, stderr=err, text=True, cwd=HERE)
    deadline = time.monotonic() + 300  # generous: two shared cores may be busy with other work
    while not here.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            err.seek(0)
            pytest.fail(f"the run never reached {moment!r}: {err.read()[-3000:]}")
        time.sleep(0.02)
    process.send_signal(how)
    process.wait(timeout=120)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())


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
    assert convit.read_checkpoint_file(run / "checkpoint.pth")["epoch"] == on_disk  # it loads: the last whole epoch
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
    code = train.cli([*run_flags(folder), "--output-dir", str(run), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"interrupted before the first epoch ended: no checkpoint written yet (to {run.resolve()})"]


# ---------------------------------------------------------------------------------------
# 4. --resume with changed flags
# ---------------------------------------------------------------------------------------
def test_resume_refuses_changed_recipe_flags_and_allows_run_only_ones(folder, reference, tmp_path, capsys):
    checkpoint = str(reference["dir"] / "checkpoint.pth")
    flags = run_flags(folder)
    lr = convit.read_checkpoint_file(checkpoint)["args"]["lr"]  # 1.6e-2 * 8 / 512 = 2.5e-4
    one_error_line(train.cli([*flags, "--lr", "0.5", "--depth", "4", "--resume", checkpoint]),
                   capsys.readouterr().err, "--depth 4 (checkpoint: 3)", f"--lr 0.5 (checkpoint: {lr})")
    one_error_line(train.cli([*run_flags(folder, epochs=2), "--resume", checkpoint]), capsys.readouterr().err,
                   "--epochs 2 is fewer than the 3 the run was planned for", "--stop-after")
    # Where and how it runs may change: another output folder, workers, threads, no progress bar.
    moved = train.main([*flags, "--resume", checkpoint, "--output-dir", str(tmp_path), "--workers", "1",
                        "--threads", "1", "--no-progress"])
    assert moved["epochs_run"] == 0 and moved["epoch"] == 3


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
    final = convit.read_checkpoint_file(tmp_path / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"]
    assert final == pytest.approx(low, rel=1e-9)


# ---------------------------------------------------------------------------------------
# 5. Every other bad input: one `error:` line, exit code 2, never a traceback
# ---------------------------------------------------------------------------------------
def lesson(number: str):
    """A lesson script as a module (their names start with a digit, so no plain import)."""
    path = next((HERE / "lessons").glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"lesson_{number}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    ("train", ["--checkpoint", "{tmp}/missing.pth"], "--checkpoint {tmp}/missing.pth does not exist"),
    ("train", ["--checkpoint", "{tmp}/corrupt.pth"], "checkpoint {tmp}/corrupt.pth is truncated or damaged"),
    ("train", ["--resume", "{tmp}"], "--resume {tmp} is a folder without a checkpoint.pth"),
    # batch 1: every image is drawn (batches of 8 would drop one image of the 25, maybe the broken one)
    ("train", ["--data-dir", "{corrupt}", "--batch-size", "1"], "image {corrupt}/train/a_red/broken.png cannot be read"),
    ("train", ["--data-dir", "{corrupt}", "--batch-size", "1", "--workers", "1"],  # raised in a loader worker
     "image {corrupt}/train/a_red/broken.png cannot be read"),
    ("train", ["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    ("lesson 01", ["--device", "cuda"], "--device cuda, but torch sees no GPU"),
    ("lesson 03", ["--threads", "-1"], "--threads must be at least 0, got -1"),
    ("lesson 07", ["--device", "foo"], "--device 'foo' is not a device"),
    ("lesson 02", ["--dataset", "imagefolder", "--data-dir", "{tmp}/nowhere"], "data directory {tmp}/nowhere does not exist"),
    ("lesson 04", ["--dataset", "cifar10", "--data-dir", "{tmp}"], "could not download cifar10"),
    ("lesson 05", ["--quick", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    ("lesson 05", ["--quick", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    ("lesson 05", ["--quick", "--lr", "nan"], "--lr must be greater than 0, got nan"),
    ("lesson 06", ["--quick", "--fractions", "0"], "--fractions must each lie in (0, 1], got 0.0"),
]


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory) -> Path:
    """The image folder with one PNG that is not an image."""
    root = small_image_folder(tmp_path_factory.mktemp("corrupt"))
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
        code = train.cli([*data, *argv])  # the later flag wins where both give one
    else:
        module = lesson(who.split()[1])
        from lessons._common import cli

        code = cli(module.main, [*argv, "--out-dir", str(tmp_path / "figures")])
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
    assert train.cli([*run_flags(folder, epochs=2), "--output-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("done: val top-1") and "after 2 epochs" in lines[0]
    data = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY]
    assert train.cli([*data, "--eval-only", "--checkpoint", str(tmp_path)]) == 0  # a run folder is accepted
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "top-1" in lines[0]
    assert "--quiet" in train.build_parser().format_help() and "only the final result line" in \
        train.build_parser().format_help()


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


def test_readme_lists_every_overridable_field():
    readme = (HERE / "README.md").read_text()
    paragraph = readme[readme.index("`create_model(name, **overrides)`"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    missing = [f.name for f in convit.fields(convit.ConViTConfig) if f"`{f.name}`" not in paragraph]
    assert missing == []
