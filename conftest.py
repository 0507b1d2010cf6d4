"""What the tests share: tiny models and data the tests write themselves, how a command's one
`error:` line is checked, and a wrapper that stops a train.py process at a chosen moment.

Test files import these helpers (`from conftest import TINY, metrics_of`) and get the fixtures
(image_folder, folder, cifar_folder ...) by name; no test file imports another.

The session itself checks two things: torch and torchvision can work together (else one line
naming both, before any test), and the tests wrote nothing into the checkout (`git status`,
ignored files included, is the same at the end as at the start; else the session fails).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli

cli.require_torchvision()  # a torchvision built for another torch: one line, before any test
import config  # noqa: E402
import convit  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

HERE = Path(__file__).resolve().parent

# A ConViT small enough for a CPU test: 16x16 images in 4x4 patches (a 4x4 grid), C = 32,
# H = 4 (a 2x2 kernel), 3 blocks of which the first is GPSA.
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "3", "--num-heads", "4",
        "--preset", "small", "--workers", "0", "--quiet"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # one class per colour: an easy task


def tiny_model(**overrides) -> convit.ConViT:
    """The model that TINY's flags build, straight from convit."""
    return convit.create_model("convit_tiny", img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4,
                               local_up_to_layer=1, **overrides)


def resolved(*argv: str) -> config.RunConfig:
    """The configuration that `python train.py ARGV` runs."""
    cfg, _notes = config.resolve(config.parse(list(argv)))
    return cfg


def metrics_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run folder, byte for byte (the lock file aside: it is not the run's)."""
    return {path.name: path.read_bytes() for path in sorted(run.iterdir()) if path.name != runs.LOCK}


def run_train(argv: list[str]) -> int:
    """train.py's command line in-process: its exit code; what it printed is in capsys."""
    return cli.run_command(train.main, argv)


def one_error_line(code: int, err: str, *phrases: str):
    """Exit code 2, exactly one line on stderr, `error: ...` holding every phrase, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def fails_with(argv: list[str], capsys, *phrases: str):
    """train.py with these flags refuses them in one `error:` line holding every phrase."""
    one_error_line(run_train(argv), capsys.readouterr().err, *phrases)


def lesson(number: str):
    """A lesson script as a module (their names start with a digit, so no plain import)."""
    path = next((HERE / "lessons").glob(f"{number}_*.py"))
    spec = importlib.util.spec_from_file_location(f"lesson_{number}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkout_status() -> list[str]:
    """What git sees in the checkout that is not committed, ignored files too (runs/ is ignored,
    yet a run folder there is a write into the checkout); the interpreter's caches aside. Empty
    outside a git checkout."""
    done = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=HERE,
                          capture_output=True, text=True)
    return sorted(line for line in done.stdout.splitlines()
                  if "__pycache__/" not in line and ".pytest_cache/" not in line) if done.returncode == 0 else []


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or the only process), not an xdist worker
        session.config.checkout_before = checkout_status()


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if its tests left anything in the checkout: they must write into tmp_path."""
    before = getattr(session.config, "checkout_before", None)
    if before is None:
        return
    written = sorted(set(checkout_status()) - set(before))
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests wrote into the checkout (use tmp_path): {', '.join(written[:10])}"
        if reporter is not None:
            reporter.write_line(message, red=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """train.py and the lessons set torch's thread count in-process; put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# Data the tests write themselves
# ---------------------------------------------------------------------------------------
def colour_image_folder(root: Path, train_count: int, val_count: int, classes: int = 3) -> Path:
    """train/ and val/ of (up to) three classes told apart by colour, 16x16 PNGs of one colour plus noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_count), ("val", val_count)):
        for name, colour in list(zip(("a_red", "b_green", "c_blue"), COLOURS))[:classes]:
            (root / split / name).mkdir(parents=True)
            noise = rng.normal(0, 40, (count, 16, 16, 3))
            for i, pixels in enumerate(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)):
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """96 training and 36 validation images: enough for a short run to learn the colours."""
    return colour_image_folder(tmp_path_factory.mktemp("imagefolder"), 32, 12)


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> Path:
    """24 training and 12 validation images: batch 8 makes 3 steps an epoch, a run of the tiny model a second."""
    return colour_image_folder(tmp_path_factory.mktemp("images"), 8, 4)


def truncated_png(path: Path):
    """A PNG cut off halfway, as a full disk or an interrupted copy leaves one: its header reads,
    its pixels do not."""
    whole = path.with_name("whole.png")
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(whole)
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()


@pytest.fixture(scope="session")
def truncated_folder(tmp_path_factory) -> Path:
    """conftest's `folder` with one truncated PNG more in train/: 25 images, so batches of 5 read
    them all in the first epoch."""
    root = colour_image_folder(tmp_path_factory.mktemp("truncated"), 8, 4)
    truncated_png(root / "train" / "a_red" / "truncated.png")
    return root


@pytest.fixture(scope="session")
def one_class_folder(tmp_path_factory) -> Path:
    """An image folder of one class: every prediction is right, so top-1 means nothing."""
    return colour_image_folder(tmp_path_factory.mktemp("one-class"), 8, 4, classes=1)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> Path:
    """A CIFAR-10-format folder (cifar-10-batches-py: pickled data_batch_1..5, test_batch,
    batches.meta) whose ten classes differ in brightness."""
    root = tmp_path_factory.mktemp("cifar")
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    rng = np.random.default_rng(1)

    def write_batch(name, count):
        labels = [i % 10 for i in range(count)]
        grey = np.array(labels, dtype=np.float32)[:, None] * 25 + rng.normal(0, 8, (count, 3 * 32 * 32))
        pixels = np.clip(grey, 0, 255).astype(np.uint8)  # (count, 3072): the red, green, blue planes in a row
        with open(batches / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": labels}, f)

    for i in range(1, 6):
        write_batch(f"data_batch_{i}", 20)
    write_batch("test_batch", 40)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"grey{i}" for i in range(10)]}, f)
    return root


# ---------------------------------------------------------------------------------------
# train.py in a subprocess, stopped at a chosen moment
# ---------------------------------------------------------------------------------------
# The run in a subprocess: train.py's command line, with torch.save, os.replace or the optimiser
# step wrapped so that at the chosen moment of epoch 2 it writes a file for the test and stalls
# until the test kills it. train.py has no hooks for this.
WRAPPER = '''
import io, os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
import cli
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
    if not str(dst).endswith("checkpoint.pth") or ".before-overwrite" in str(dst):  # an old run moved aside
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
    if moment == "first step" and not saves:  # epoch 1, before any checkpoint
        stall()
    if moment == "mid-epoch" and saves:
        saves.append("step")
        if saves.count("step") == 2:  # the second step of epoch 2
            stall()
    return real_step(self, optimizer, *args, **kwargs)


os.replace, torch.save, torch.amp.GradScaler.step = replace, save, step
sys.exit(cli.run_command(train.main, sys.argv[4:]))
'''


def start_stalled(tmp_path: Path, argv: list[str], moment: str = "mid-epoch", stdout=subprocess.DEVNULL
                  ) -> subprocess.Popen:
    """train.py in a subprocess, stalled at `moment` of epoch 2 (or at the first step of epoch 1);
    its stderr goes to tmp_path/stderr."""
    wrapper, here = tmp_path / "wrapper.py", tmp_path / "here"
    wrapper.write_text(WRAPPER)
    process = subprocess.Popen([sys.executable, str(wrapper), str(HERE), moment, str(here), *argv],
                               stdout=stdout, stderr=(tmp_path / "stderr").open("w"), cwd=HERE)
    deadline = time.monotonic() + 300  # generous: two shared cores may be busy with other work
    while not here.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run never reached {moment!r}: {(tmp_path / 'stderr').read_text()[-3000:]}")
        time.sleep(0.02)
    return process
