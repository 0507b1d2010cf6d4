"""Reading checkpoint files: safely (no code runs), the released ConViT/DeiT ones and train.py's own.

    from checkpoints import load_checkpoint, model_from_checkpoint
    model = load_checkpoint(create_model("convit_tiny"), "convit_tiny.pth")   # a released file
    model = model_from_checkpoint("runs/digits-convit_tiny/checkpoint.pth")    # one of train.py's

convit.py is the model and the mapping of released weights onto it (`convit.load_state`); this
file opens the .pth files. Every file the project reads goes through `read_checkpoint_file`.

train.py's checkpoint (its run folder's checkpoint.pth; runs.py writes it atomically) is a dict:
    cfg        the model's ConViTConfig, as a plain dict (model_from_checkpoint rebuilds it)
    model      its state dict, with convit.py's names (no "module." or "_orig_mod.")
    optimizer, scheduler, scaler, ema   their state dicts (ema: None without --ema)
    epoch      epochs done; metrics: that epoch's line of metrics.jsonl
    rng        every random state of every process (runs.rng_states)
    args       the run's configuration, one entry per flag (config.RunConfig.flat), as train.py
               stored its argparse flags before config.py existed: the same keys, so that every
               checkpoint ever written resumes
All of it is tensors and plain data, so it loads with weights_only=True and no allow-list.

Contents: CHECKPOINT_SAFE_GLOBALS, read_checkpoint_file, non_finite_tensors, state_dict_in (the
wrappers and prefixes of other trainers), load_checkpoint, model_from_checkpoint, find_checkpoint,
read_resumable, check_same_model.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
import warnings
from pathlib import Path

import torch

import convit

CHECKPOINT = "checkpoint.pth"  # the checkpoint's name in a run folder
TRAIN_KEYS = {"cfg", "model", "optimizer", "scheduler", "rng", "args", "epoch"}  # what --resume needs


class CheckpointError(ValueError):
    """A checkpoint that cannot serve: reported as one `error:` line, exit code 2 (cli.run_command)."""


# ---------------------------------------------------------------------------------------
# Any .pth file: released weights and ours
# ---------------------------------------------------------------------------------------
# Reading a .pth never runs its code: torch.load with weights_only=True rebuilds tensors and plain
# data (dict, list, tuple, str, numbers, None, OrderedDict) and refuses every other Python global
# a pickle names. The released ConViT/DeiT files hold {"model", "optimizer", "lr_scheduler",
# "epoch", "scaler", "model_ema", "args"}; all of it is plain data except "args", the training
# script's argparse.Namespace, a bag of attributes with no code. That is the whole allow-list.
# Our own checkpoints (train.py) need none of it: they store their flags as a plain dict.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]


def read_checkpoint_file(path) -> dict:
    """The dict stored in the .pth file at `path`, read without running any of its code.

    Every way the file can be wrong (missing, a folder, empty, damaged or truncated, a pickle
    that asks for anything beyond tensors, plain data and argparse.Namespace, something other
    than a dict) raises a ValueError that names the path and says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder; give the .pth file inside it")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is an empty file (0 bytes): it was never written completely")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS), warnings.catch_warnings():
            # A file torch.save did not write gets this warning before the refusal below: a second line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused it, or the bytes are no pickle at all
        needed = re.search(r"GLOBAL ([\w.]+)", str(err))
        if needed:
            raise ValueError(
                f"checkpoint {path} asks to load {needed.group(1)}, which is code, not weights: refused without "
                f"running it (a checkpoint may hold only tensors, plain data and argparse.Namespace)") from None
        raise ValueError(f"checkpoint {path} is truncated or damaged, or not a PyTorch file ({brief(err)})") from None
    except Exception as err:  # a damaged file can fail in many ways (a truncated zip: RuntimeError)
        raise ValueError(f"checkpoint {path} is truncated or damaged, or not a PyTorch file ({brief(err)})") from None
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ValueError(f"checkpoint {path} holds {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a dict of weights")
    return checkpoint


def brief(err: Exception) -> str:
    """torch's reason for refusing a file, cut to its one telling line."""
    text = str(err).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines and not lines[0].startswith("Weights only load failed") else (lines or [""])[-1]
    return f"{type(err).__name__}: {line.split('. ')[0][:150]}" if line else type(err).__name__


def non_finite_tensors(tree, prefix: str = "") -> list[str]:
    """The names of the floating-point tensors in a (nested) dict/list that hold NaN or inf."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        bad = torch.is_tensor(tree) and tree.is_floating_point() and not torch.isfinite(tree).all()
        return [prefix] if bad else []
    return [name for key, value in items for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def state_dict_in(checkpoint: dict, path) -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint read from `path`: a bare state dict, or one wrapped as
    {"model": ...} / {"state_dict": ...} / {"model_ema": ...}, with the prefixes that
    DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") add to every name removed.
    Refuses (ValueError) entries that are not tensors and weights that hold NaN or inf, which no
    training should continue from."""
    state = checkpoint
    for wrapper in ("model", "state_dict", "model_ema"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
            break
    not_tensors = [f"{key} ({type(value).__name__})" for key, value in state.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise ValueError(f"checkpoint {path} holds no state dict of weights: {len(not_tensors)} entries are not "
                         f"tensors, e.g. {', '.join(map(str, not_tensors[:3]))}")
    broken = non_finite_tensors(state)
    if broken:
        raise ValueError(f"checkpoint {path} holds NaN or inf in {len(broken)} tensor(s), e.g. {', '.join(broken[:3])}: "
                         f"these weights come from a run that diverged")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", key): value for key, value in state.items()}


def load_checkpoint(model: convit.ConViT, path, verbose: bool = True) -> convit.ConViT:
    """Load a released ConViT or DeiT .pth (or one of ours) from `path` into `model`, strictly.

    Accepts a bare state dict or one wrapped as {"model": ...} / {"state_dict": ...}, with or
    without the "module." of DistributedDataParallel and the "_orig_mod." of torch.compile. If the
    model was built for another image size, pos_embed is interpolated to its grid (convit.fit_pos_embed;
    DeiT's class-token slot is kept). If the number of classes differs, the head is left freshly
    initialised, for fine-tuning. Any other difference raises a ValueError that names it, and
    then nothing is loaded or printed. Nothing is downloaded: fetch the file first, and nothing
    in it runs (read_checkpoint_file).
    """
    return convit.load_state(model, state_dict_in(read_checkpoint_file(path), path), path, verbose)


def model_from_checkpoint(path) -> convit.ConViT:
    """The model a train.py checkpoint holds, rebuilt in one call: its ConViTConfig, which the
    checkpoint stores as a plain dict ("cfg"), then its weights. A released .pth has no config:
    build that model by name instead, load_checkpoint(create_model("convit_tiny"), path)."""
    checkpoint = read_checkpoint_file(path)
    cfg = checkpoint.get("cfg")
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint {path} holds no model config ('cfg'), as train.py's checkpoints do; for a "
                         f"released file build the model by name: load_checkpoint(create_model(name), path)")
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(convit.ConViTConfig)})
    if unknown:
        raise ValueError(f"checkpoint {path} has config fields this convit.py does not know: {unknown}")
    return convit.load_state(convit.ConViT(convit.ConViTConfig(**cfg)), state_dict_in(checkpoint, path), path, verbose=False)



# ---------------------------------------------------------------------------------------
# train.py's checkpoints: --resume, --checkpoint, --eval-only
# ---------------------------------------------------------------------------------------
def find_checkpoint(path: str | None, flag: str) -> str | None:
    """--resume and --checkpoint take a .pth file, or a run folder for the checkpoint.pth inside it."""
    if path is None:
        return None
    if str(path) == "":  # Path("") is the current folder: a run there would be resumed unasked
        raise CheckpointError(f"{flag} is empty: give a .pth file, or the --output-dir of a run")
    if not Path(path).exists():
        raise CheckpointError(f"{flag} {path} does not exist")
    if Path(path).is_dir():
        if not (Path(path) / CHECKPOINT).is_file():
            raise CheckpointError(f"{flag} {path} is a folder without a {CHECKPOINT}: give a .pth file, "
                                  "or the --output-dir of a run")
        return str(Path(path) / CHECKPOINT)
    return path


def read_resumable(path: str) -> dict:
    """A --resume checkpoint: one of train.py's, with finite numbers (config.py checks its flags)."""
    checkpoint = read_checkpoint_file(path)  # a ValueError names the path and the problem
    if not TRAIN_KEYS <= set(checkpoint):
        raise CheckpointError(f"{path} is not a checkpoint of train.py (a released .pth? use --checkpoint)")
    if not isinstance(checkpoint["args"], dict) or "epochs" not in checkpoint["args"]:
        raise CheckpointError(f"{path} has damaged flags (args); it is not a checkpoint of this train.py")
    # train.py saves after each epoch, so epoch counts the epochs done, 1 to the run's planned length;
    # anything else would restart the schedule in the wrong place, and rewrite metrics.jsonl to match.
    done, planned = checkpoint["epoch"], checkpoint["args"]["epochs"]
    if type(done) is not int or type(planned) is not int or not 1 <= done <= planned:
        raise CheckpointError(f"{path} has a damaged epoch count (epoch {done!r} of {planned!r}); it is not a "
                              f"checkpoint as train.py writes one")
    broken = non_finite_tensors({key: checkpoint[key] for key in ("model", "optimizer", "ema") if key in checkpoint})
    if broken:
        raise CheckpointError(f"{path} holds NaN or inf ({', '.join(broken[:3])}): the run had diverged, so it "
                              f"cannot be resumed from there; start again, e.g. with a lower --lr or --clip-grad")
    return checkpoint


def check_same_model(checkpoint: dict, model: convit.ConViT, path):
    """Refuse to continue or evaluate a checkpoint of another architecture, naming each difference."""
    if not isinstance(checkpoint["cfg"], dict) or "img_size" not in checkpoint["cfg"]:
        raise CheckpointError(f"{path} has a damaged model config (cfg); it is not a checkpoint of this train.py")
    # A field that an older checkpoint lacks (qkv_bias, class_token_in_pos_embed) had its default then.
    defaults = {field.name: field.default for field in dataclasses.fields(convit.ConViTConfig)}
    stored, wanted = {**defaults, **checkpoint["cfg"]}, dataclasses.asdict(model.cfg)
    stored["img_size"] = tuple(stored["img_size"])
    differences = [f"{key}={stored[key]} (checkpoint) vs {wanted[key]} (this run)"
                   for key in wanted if key != "fused" and stored.get(key) != wanted[key]]
    if differences:
        raise CheckpointError(f"{path} was saved from another model: {'; '.join(differences)}. "
                              f"Pass the flags of the run that wrote it.")
