"""Tests of train.py: on the CPU, with tiny models, on data the tests write themselves.

Each test states what the issue asks of train.py and asserts a number that could fail:
a short run learns, a resumed run equals an uninterrupted one bit for bit, two processes
under torchrun work, metrics.jsonl holds what the paper plots, and every bad input ends
with `error: ...` and exit code 2 instead of a traceback.
"""

import dataclasses
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoints
import config
import convit
import data
import train
from conftest import TINY, fails_with, metrics_of, resolved, tiny_model

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------
# It learns, and logs what the paper plots
# ---------------------------------------------------------------------------------------
def test_short_run_learns_colours(image_folder, tmp_path):
    result = train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY,
                         "--epochs", "5", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "1",
                         "--output-dir", str(tmp_path)])
    losses = [m["train_loss"] for m in metrics_of(tmp_path)]
    assert losses[-1] < 0.6 * losses[0], losses
    assert result["val_top1"] >= 90.0, result  # chance is 33%
    assert result["epochs_run"] == 5 and result["output_dir"] == str(tmp_path)


def test_metrics_jsonl_has_the_papers_fields(cifar_folder, tmp_path):
    train.main(["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--epochs", "2",
                "--batch-size", "20", "--output-dir", str(tmp_path)])
    lines = metrics_of(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "images_per_second"):
            assert isinstance(m[key], (int, float)), key
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 100 and m["images_per_second"] > 0
        assert np.array(m["gates"]).shape == (1, 4)  # one GPSA layer, four heads: sigma(lambda)
        assert np.all((np.array(m["gates"]) > 0.6) & (np.array(m["gates"]) < 0.9))  # near sigma(1) = 0.73
        assert np.array(m["nonlocality"]).shape == (3, 4)  # every block and head (Eq. 8)
        # At init the GPSA heads look at their 2x2 kernel offsets, much closer than the ~1.8
        # patches of uniform attention over a 4x4 grid.
        assert 0 < np.mean(m["nonlocality"][0]) < 1.5
    assert (tmp_path / "checkpoint.pth").is_file() and not list(tmp_path.glob("*.tmp"))


def test_data_fraction_is_stratified_and_seeded():
    labels = [0] * 10 + [1] * 20 + [2] * 30
    kept = data.stratified_fraction(labels, 0.1, seed=0)
    assert sorted(labels[i] for i in kept) == [0, 1, 1, 2, 2, 2]
    assert kept == data.stratified_fraction(labels, 0.1, seed=0)
    assert kept != data.stratified_fraction(labels, 0.1, seed=1)
    cfg = resolved("--dataset", "mnist10k", "--data-fraction", "0.25", "--scale-epochs")
    small = config.preset_values("small")  # MNIST-10k takes the small preset's epochs (the digits' own are 40)
    # 1/f times the epochs; the warmup keeps its epochs, as in the released code
    assert (cfg.recipe.epochs, cfg.recipe.warmup_epochs) == (4 * small["epochs"], small["warmup_epochs"])
    assert cfg.runtime.eval_every == 4  # every fraction is evaluated after the same numbers of steps


def test_eval_every_logs_and_saves_every_n_epochs_and_the_last(cifar_folder, tmp_path):
    result = train.main(["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--epochs", "5",
                         "--batch-size", "20", "--eval-every", "2", "--output-dir", str(tmp_path)])
    assert [m["epoch"] for m in metrics_of(tmp_path)] == [2, 4, 5]
    assert result["epoch"] == 5 and torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 5


MNIST10K_PER_CLASS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]  # data/README.md
MNIST10K_VAL_PER_CLASS = [200, 225, 198, 206, 196, 173, 203, 214, 189, 196]  # 20% of each, rounded


def mnist10k_sets(*flags):
    cfg = resolved("--dataset", "mnist10k", *flags)
    return data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)


def test_mnist10k_split_is_fixed_stratified_and_disjoint(tmp_path):
    train_set, val_set, num_classes = mnist10k_sets()
    assert num_classes == 10 and (len(train_set), len(val_set)) == (8000, 2000)
    assert np.bincount(val_set.targets).tolist() == MNIST10K_VAL_PER_CLASS
    assert np.bincount(train_set.targets).tolist() == [n - v for n, v in zip(MNIST10K_PER_CLASS, MNIST10K_VAL_PER_CLASS)]
    # The images are the file's, pixel for pixel, and every one of the 10,000 lands in exactly one set.
    with np.load(HERE / "data" / "mnist10k.npz") as arrays:
        file_images = {image.tobytes(): int(label) for image, label in zip(arrays["images"], arrays["labels"])}
    seen = [(image.numpy().tobytes(), label) for split in (train_set, val_set)
            for image, label in zip(split.images[:, 0], split.targets)]
    assert len(file_images) == 10000 and sorted(seen) == sorted(file_images.items())
    # Fixed: the same split whatever --seed is or where --data-dir points (a folder without the file).
    other_train, other_val, _ = mnist10k_sets("--seed", "7", "--data-dir", str(tmp_path))
    assert torch.equal(other_val.images, val_set.images) and torch.equal(other_train.images, train_set.images)
    # --data-fraction draws from the 8,000 training images only.
    subset, _, _ = mnist10k_sets("--data-fraction", "0.1")
    assert len(subset) == 800 and set(subset.indices) <= set(range(8000))
    # Grey 28x28, normalised, in 4x4 patches: a 7x7 grid; no horizontal flip.
    image, _ = val_set[0]
    assert image.shape == (1, 28, 28) and resolved("--dataset", "mnist10k").augment.hflip == 0.0
    assert resolved("--dataset", "mnist10k").model.patch_size == 4


def test_mnist10k_sum_pairs_far_apart_digits_labelled_by_their_sum(tmp_path):
    """The far-content task: two half-size digits in opposite corners, the label their sum."""
    train_set, val_set, num_classes = mnist10k_sets("--dataset", "mnist10k-sum")
    assert num_classes == 19 and (len(train_set), len(val_set)) == (8000, 2000)
    assert train_set.images.shape == (8000, 1, 28, 28) and train_set.images.dtype == torch.uint8
    assert not train_set.images[:, :, :14, 14:].any() and not train_set.images[:, :, 14:, :14].any()  # 2 corners
    digits_train, digits_val, _ = mnist10k_sets()
    for pairs, digits in ((train_set, digits_train), (val_set, digits_val)):
        small = torch.nn.functional.interpolate(digits.images.float(), size=(14, 14), mode="area").round().byte()
        label_of = {image.numpy().tobytes(): label for image, label in zip(small, digits.targets)}
        assert len(label_of) > 0.99 * len(digits)  # shrunk digits stay (nearly all) distinct
        corners = [pairs.images[:, :, :14, :14], pairs.images[:, :, 14:, 14:]]
        # Balance: each corner holds every digit of its split exactly once, so each corner's classes are MNIST's.
        for corner in corners:
            assert sorted(c.numpy().tobytes() for c in corner) == sorted(c.numpy().tobytes() for c in small)
        # The label is the sum of the two digits' labels.
        sums = [label_of.get(a.numpy().tobytes(), -99) + label_of.get(b.numpy().tobytes(), -99)
                for a, b in zip(*corners)]
        agree = np.mean([s == label for s, label in zip(sums, pairs.targets)])
        assert agree > 0.98, agree  # the few shrunk digits that collide are the only misses
        assert min(pairs.targets) == 0 and max(pairs.targets) == 18
    # No digit of the validation pairs appears in a training pair.
    train_corners = {c.numpy().tobytes() for c in train_set.images[:, :, :14, :14]}
    assert not train_corners & {c.numpy().tobytes() for c in val_set.images[:, :, :14, :14]}
    # The sums follow the digits' frequencies: sum 9 is the most frequent class, about 10%.
    counts = np.bincount(train_set.targets, minlength=19) / 8000
    assert counts.argmax() == 9 and 0.09 < counts[9] < 0.11 and counts[0] < 0.015 and counts[18] < 0.015
    # Fixed whatever --seed is.
    again, _, _ = mnist10k_sets("--dataset", "mnist10k-sum", "--seed", "5")
    assert torch.equal(again.images, train_set.images) and again.targets == train_set.targets


def test_short_mnist10k_run_learns(tmp_path):
    result = train.main(["--dataset", "mnist10k", "--embed-dim", "32", "--depth", "3", "--num-heads", "4",
                         "--epochs", "1", "--batch-size", "64", "--lr", "2e-3", "--warmup-epochs", "0",
                         "--randaug-ops", "0", "--crop-scale", "1", "--quiet", "--output-dir", str(tmp_path)])
    # One epoch (125 steps) lifts a small ViT well off chance, though not far: seed 0 reaches 28.1%
    # top-1 and a validation loss of 1.89. (A ViT learns MNIST slowly at first, from a plateau.)
    assert result["val_top1"] > 20.0 and result["val_loss"] < 2.1, result  # chance: 10%, and a loss of ln 10 = 2.30


def test_missing_or_damaged_mnist10k_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "MNIST10K_FILE", tmp_path / "nowhere" / "mnist10k.npz")
    fails_with(["--dataset", "mnist10k", "--data-dir", str(tmp_path)], capsys, "mnist10k.npz not found")
    (tmp_path / "mnist10k.npz").write_bytes(b"not a zip file")  # --data-dir's copy comes first
    fails_with(["--dataset", "mnist10k", "--data-dir", str(tmp_path)], capsys, "is not a readable MNIST-10k file")
    np.savez(tmp_path / "mnist10k.npz", images=np.zeros((5, 28, 28), np.float32), labels=np.zeros(5, np.uint8))
    fails_with(["--dataset", "mnist10k", "--data-dir", str(tmp_path)], capsys, "holds images float32")
    np.savez(tmp_path / "mnist10k.npz", pictures=np.zeros((5, 28, 28), np.uint8))
    fails_with(["--dataset", "mnist10k", "--data-dir", str(tmp_path)], capsys, "is not a readable MNIST-10k file")


def test_first_k_classes_of_an_image_folder(image_folder, tmp_path):
    cfg = resolved("--dataset", "imagefolder", "--data-dir", str(image_folder), "--num-classes-subset", "2", *TINY)
    train_set, val_set, num_classes = data.build_datasets(cfg.data, cfg.augment, cfg.recipe.seed)
    assert num_classes == 2 and train_set.classes == val_set.classes == ["a_red", "b_green"]
    assert (len(train_set), len(val_set)) == (2 * 32, 2 * 12)
    # A released checkpoint keeps its wider head, so its class indices still count on the subset.
    released = tiny_model(num_classes=3)
    torch.save({"model": released.state_dict()}, tmp_path / "released.pth")
    result = train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), "--num-classes-subset", "2",
                         *TINY, "--eval-only", "--checkpoint", str(tmp_path / "released.pth")])
    assert result["model"].cfg.num_classes == 3 and torch.equal(result["model"].head.weight, released.head.weight)


def test_no_weight_decay_on_biases_norms_embeddings_and_gates():
    model = tiny_model()
    decay, no_decay = train.parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.attn.gating_param", "blocks.0.attn.proj.bias",
            "blocks.0.norm1.weight", "norm.bias"} <= undecayed
    assert all(names[id(p)].endswith("weight") for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


GPSA_ATTENTION = ["qk.weight", "v.weight", "proj.weight", "proj.bias", "pos_proj.weight", "pos_proj.bias",
                  "gating_param"]


@pytest.mark.parametrize("flags, frozen", [
    ([], []),  # row a: everything trains
    (["--freeze-gates"], ["gating_param"]),  # b, d: "train gating: no"
    (["--freeze-gpsa"], GPSA_ATTENTION),  # the whole GPSA attention, its gates at their start value
    (["--freeze-gates", "--freeze-gpsa"], GPSA_ATTENTION),  # f, g: and the gates at 0
])
def test_table3_switches_freeze_exactly_their_tensors(image_folder, tmp_path, flags, frozen):
    """A short run from known weights: the frozen tensors come back bit for bit (the gates at
    exactly 0 with --freeze-gates), every other tensor moved, and the optimiser holds only
    the trainable ones."""
    start = tiny_model(num_classes=3)
    with torch.no_grad():
        start.blocks[0].attn.gating_param.normal_()  # gates away from 0 and 1: freezing at 0 is a change
    torch.save({"model": start.state_dict()}, tmp_path / "start.pth")
    result = train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY, "--epochs", "1",
                         "--batch-size", "16", "--lr", "2e-3", *flags, "--checkpoint", str(tmp_path / "start.pth"),
                         "--output-dir", str(tmp_path / "run")])
    model, before = result["model"], start.state_dict()
    after = model.state_dict()
    frozen_names = {f"blocks.0.attn.{name}" for name in frozen}
    for name in after:
        if name == "blocks.0.attn.gating_param" and "--freeze-gates" in flags:
            assert torch.equal(after[name], torch.zeros(4)), after[name]  # lambda = 0: sigma = 0.5
        elif name in frozen_names:
            assert torch.equal(after[name], before[name]), f"{name} moved but is frozen"
        elif name != "blocks.0.attn.pos_proj.bias":  # its gradient is 0: it cancels in the softmax
            assert not torch.equal(after[name], before[name]), f"{name} did not train"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(after) - frozen_names - ({"blocks.0.attn.gating_param"} if "--freeze-gates" in flags else set())
    decay, no_decay = train.parameter_groups(model, 0.05)
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)  # frozen ones stay out


def test_table3_switches_at_build_time():
    """What each row's flags build: b's gates at lambda = 0 (sigma = 0.5), c's GPSA random, f's
    attention frozen at Eq. 5's init (W_val = I), with the FFNs and norms still training."""
    def build(*flags):
        torch.manual_seed(0)
        return train.build_model(resolved(*TINY, *flags), 3)

    conv_init, random_init = build().blocks[0].attn, build("--no-conv-init").blocks[0].attn
    assert torch.equal(conv_init.v.weight, torch.eye(32)) and not torch.equal(random_init.v.weight, torch.eye(32))
    assert not torch.allclose(random_init.pos_proj.weight, conv_init.pos_proj.weight)
    gates_frozen = build("--freeze-gates")
    assert torch.equal(gates_frozen.gates(), torch.full((1, 4), 0.5))
    assert not gates_frozen.blocks[0].attn.gating_param.requires_grad
    f = build("--freeze-gates", "--freeze-gpsa")
    assert torch.equal(f.blocks[0].attn.v.weight, torch.eye(32)) and torch.equal(f.gates(), torch.full((1, 4), 0.5))
    assert not any(p.requires_grad for p in f.blocks[0].attn.parameters())
    assert all(p.requires_grad for p in [*f.blocks[0].mlp.parameters(), *f.blocks[0].norm1.parameters()])


def test_global_pool_avg_builds_a_model_without_class_token_whose_every_block_may_be_gpsa(cifar_folder, tmp_path):
    model = train.build_model(resolved(*TINY, "--global-pool", "avg", "--local-up-to-layer", "3"), 3)
    assert model.cfg.global_pool == "avg" and model.cls_token is None and len(model.gpsa_layers()) == 3
    assert train.build_model(resolved(*TINY), 3).cfg.global_pool == "token"  # the paper's head by default
    result = train.main(["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--epochs", "1",
                         "--batch-size", "20", "--global-pool", "avg", "--local-up-to-layer", "3",
                         "--output-dir", str(tmp_path)])
    assert np.array(metrics_of(tmp_path)[0]["gates"]).shape == (3, 4)  # every block's gates are logged
    assert checkpoints.model_from_checkpoint(tmp_path / "checkpoint.pth").cfg.global_pool == "avg"
    assert result["model"].cls_token is None


def test_row_e_is_deits_own_network_at_the_convits_size(image_folder, tmp_path, capsys):
    convit_args, deit_args = resolved(*TINY), resolved(*TINY, "--model", "deit_tiny")
    conv, deit = train.build_model(convit_args, 3), train.build_model(deit_args, 3)
    assert (deit.cfg.embed_dim, deit.cfg.num_heads, deit.cfg.depth) == (conv.cfg.embed_dim, conv.cfg.num_heads, 3)
    assert deit.cfg.qkv_bias and deit.cfg.class_token_in_pos_embed and not deit.gpsa_layers()
    assert deit.pos_embed.shape == (1, 1 + 16, 32)  # the class token's position, then the 4x4 grid
    result = train.main(["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY, "--model", "deit_tiny",
                         "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--output-dir", str(tmp_path)])
    record = metrics_of(tmp_path)[0]
    assert "gates" not in record and np.array(record["nonlocality"]).shape == (3, 4)
    assert record["lr"] == 2e-3  # one epoch: the warmup is capped to 0, so it trains at the peak lr
    assert result["model"].blocks[0].attn.qkv.bias.abs().sum() > 0
    fails_with([*TINY, "--model", "deit_tiny", "--local-up-to-layer", "2"], capsys,
               "deit_tiny is DeiT's own network, which has no GPSA block")
    fails_with([*TINY, "--model", "deit_tiny", "--freeze-gates"], capsys, "--freeze-gates act(s) on GPSA blocks")
    fails_with([*TINY, "--model", "deit_tiny", "--global-pool", "avg"], capsys,
               "--global-pool avg: deit_tiny is DeiT's own network")
    fails_with([*TINY, "--local-up-to-layer", "0", "--freeze-gpsa", "--no-conv-init"], capsys,
               "--freeze-gpsa --no-conv-init act(s) on GPSA blocks")


# ---------------------------------------------------------------------------------------
# DeiT's schedule (its augmentation: test_augment.py)
# ---------------------------------------------------------------------------------------
def test_warmup_is_capped_so_that_the_lr_leaves_warmup_lr(capsys):
    def learning_rates(*flags):
        cfg, notes = config.resolve(config.parse(list(flags)))
        recipe = cfg.replace(lr=1e-3).recipe
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
        scheduler = train.build_schedule(optimizer, recipe)
        lrs = []
        for _ in range(recipe.epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # (no gradient: a no-op, in the order train.py steps)
            scheduler.step()
        return recipe, lrs, notes

    recipe, lrs, notes = learning_rates("--epochs", "1")  # the small preset's 2 warmup epochs would hold 1e-6
    assert recipe.warmup_epochs == 0 and lrs == [1e-3]
    assert notes == ["note: --warmup-epochs 2 capped to 0, half of the 1 epochs, so that the lr reaches its peak"]
    recipe, lrs, notes = learning_rates("--epochs", "10", "--warmup-epochs", "8")
    assert recipe.warmup_epochs == 5 and lrs[0] == pytest.approx(1e-6) and lrs[5] == pytest.approx(1e-3)
    assert lrs[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 5) and max(lrs) == pytest.approx(1e-3)
    assert notes[0].startswith("note: --warmup-epochs 8 capped to 5")
    recipe, _, notes = learning_rates("--epochs", "50")
    assert recipe.warmup_epochs == 2 and notes == []  # the preset's own warmup
    notes = train.configure(config.parse(["--epochs", "1"]))[2]  # run() prints them once the run goes ahead
    assert notes == ["note: --warmup-epochs 2 capped to 0, half of the 1 epochs, so that the lr reaches its peak"]
    paper = resolved("--dataset", "cifar10")
    assert (paper.recipe.warmup_epochs, paper.augment.color_jitter, paper.augment.randaug_magnitude,
            paper.augment.randaug_magnitude_std) == (5, 0, 9, 0.5)
    assert not math.isclose(paper.augment.randaug_magnitude, 27)


# ---------------------------------------------------------------------------------------
# Checkpoints: exact resume, evaluation
# ---------------------------------------------------------------------------------------
def test_resumed_run_equals_uninterrupted_run(cifar_folder, tmp_path):
    # Every source of randomness on: RandAugment, flips and erasing (in a data-loading worker,
    # seeded through the loader's generator), MixUp/CutMix, drop path; and an EMA to restore.
    recipe = ["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--epochs", "4", "--workers", "1",
              "--batch-size", "20", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--drop-path", "0.1",
              "--ema", "--ema-decay", "0.9", "--hflip", "0.5"]
    whole = train.main([*recipe, "--output-dir", str(tmp_path / "whole")])
    train.main([*recipe, "--output-dir", str(tmp_path / "split"), "--stop-after", "2"])
    assert metrics_of(tmp_path / "split")[-1]["epoch"] == 2
    resumed = train.main([*recipe, "--resume", str(tmp_path / "split" / "checkpoint.pth")])

    assert resumed["epochs_run"] == 2 and resumed["output_dir"] == str(tmp_path / "split")
    whole_state, resumed_state = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)
    saved = [torch.load(tmp_path / run / "checkpoint.pth", weights_only=True) for run in ("whole", "split")]
    assert all(torch.equal(saved[0]["ema"][k], saved[1]["ema"][k]) for k in saved[0]["ema"])
    assert metrics_of(tmp_path / "whole")[-1]["val_loss"] == metrics_of(tmp_path / "split")[-1]["val_loss"]
    assert len(metrics_of(tmp_path / "split")) == 4


def test_eval_only_reports_our_checkpoint_and_a_released_format(cifar_folder, tmp_path):
    data = ["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--batch-size", "20"]
    trained = train.main([*data, "--epochs", "1", "--output-dir", str(tmp_path)])
    ours = train.main([*data, "--eval-only", "--checkpoint", str(tmp_path / "checkpoint.pth")])
    assert ours["val_top1"] == trained["val_top1"] and ours["val_top5"] == trained["val_top5"]
    rebuilt = checkpoints.model_from_checkpoint(tmp_path / "checkpoint.pth")  # the README's one call, no flags
    assert rebuilt.cfg == trained["model"].cfg
    assert all(torch.equal(value, trained["model"].state_dict()[key]) for key, value in rebuilt.state_dict().items())
    torch.save({"model": trained["model"].state_dict()}, tmp_path / "released.pth")  # the released layout
    released = train.main([*data, "--eval-only", "--checkpoint", str(tmp_path / "released.pth")])
    assert released["val_loss"] == pytest.approx(trained["val_loss"])


def test_eval_only_can_mask_the_position_embedding(cifar_folder, tmp_path, capsys):
    """Table 5's test-time masking through train.py: the same weights, evaluated without pos_embed."""
    data = ["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--batch-size", "20"]
    trained = train.main([*data, "--epochs", "1", "--output-dir", str(tmp_path)])
    with torch.no_grad():
        trained["model"].pos_embed.normal_()  # a trained embedding is far from its init
    state = trained["model"].state_dict()
    for name, pos_embed in (("moved", state["pos_embed"]), ("zeroed", torch.zeros_like(state["pos_embed"]))):
        torch.save({"cfg": dataclasses.asdict(trained["model"].cfg), "model": {**state, "pos_embed": pos_embed}},
                   tmp_path / f"{name}.pth")
    argv = [*data, "--eval-only", "--checkpoint", str(tmp_path / "moved.pth")]
    normal, masked = train.main(argv), train.main([*argv, "--mask-pos-embed"])
    assert masked["model"].pos_embed_masked and not normal["model"].pos_embed_masked
    # Masked is exactly the model with no embedding at all, and far from the unmasked one.
    zeroed = train.main([*data, "--eval-only", "--checkpoint", str(tmp_path / "zeroed.pth")])
    assert (masked["val_loss"], masked["val_top1"]) == (zeroed["val_loss"], zeroed["val_top1"])
    assert abs(masked["val_loss"] - normal["val_loss"]) > 0.05, (masked["val_loss"], normal["val_loss"])
    fails_with([*data, "--mask-pos-embed"], capsys, "use it with --eval-only")
    train.main([*data, "--epochs", "1", "--no-pos-embed", "--output-dir", str(tmp_path / "none")])
    fails_with([*data, "--no-pos-embed", "--eval-only", "--mask-pos-embed", "--checkpoint", str(tmp_path / "none")],
               capsys, "there is no position embedding to mask")


def test_eval_only_masks_content_or_position_in_the_first_k_gpsa_blocks(cifar_folder, tmp_path, capsys):
    """Tab. 6 through train.py: --mask-content K evaluates the model whose first K gates are 1
    (sigma(lambda) = 1.0 in fp32), --mask-position K the one whose first K gates are 0, and the
    result line says what was masked."""
    data = ["--dataset", "cifar10", "--data-dir", str(cifar_folder), *TINY, "--local-up-to-layer", "2",
            "--batch-size", "20"]
    trained = train.main([*data, "--epochs", "1", "--output-dir", str(tmp_path)])
    with torch.no_grad():  # content attention far from uniform, as after real training
        for layer in trained["model"].gpsa_layers():
            layer.qk.weight.normal_(std=0.5)
            layer.proj.weight.normal_(std=0.5)  # and weighing on the output
    state = trained["model"].state_dict()
    cfg = dataclasses.asdict(trained["model"].cfg)
    torch.save({"cfg": cfg, "model": state}, tmp_path / "moved.pth")
    for name, lam in (("content", 50.0), ("position", -50.0)):  # sigma = 1, or 2e-22: nothing beside 1 - 2e-22
        torch.save({"cfg": cfg, "model": {**state, "blocks.0.attn.gating_param": torch.full((4,), lam)}},
                   tmp_path / f"{name}.pth")
    evaluate = [*data, "--eval-only", "--checkpoint", str(tmp_path / "moved.pth")]
    images = torch.randn(8, 3, 16, 16)
    capsys.readouterr()
    normal = train.main(evaluate)
    for term in ("content", "position"):
        masked = train.main([*evaluate, f"--mask-{term}", "1"])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert f"{term} masked in GPSA block 1 (sigma(lambda) = {1 if term == 'content' else 0})" in line
        assert masked["masked"] == [f"{term} masked in GPSA block 1 (sigma(lambda) = {1 if term == 'content' else 0})"]
        analytic = train.main([*data, "--eval-only", "--checkpoint", str(tmp_path / f"{term}.pth")])
        assert masked["val_loss"] == pytest.approx(analytic["val_loss"], rel=1e-6)
        both = train.main([*evaluate, f"--mask-{term}", "2"])  # K counts blocks from the first
        gate = 1 if term == "content" else 0
        assert masked["model"].gates()[0].eq(gate).all() and masked["model"].gates()[1].ne(gate).all()
        assert both["model"].gates().eq(gate).all()
        with torch.no_grad():  # and each mask changes what the model computes
            unmasked, one, two = (result["model"](images) for result in (normal, masked, both))
        assert (one - unmasked).abs().max() > 1e-2 and (two - one).abs().max() > 1e-2, term
    fails_with([*evaluate, "--mask-content", "3"], capsys, "--mask-content 3: this convit_tiny has 2 GPSA blocks")
    fails_with([*data, "--mask-position", "1"], capsys, "--mask-position 1 forces gates at test time: use it with "
                                                         "--eval-only")
    fails_with([*evaluate, "--mask-content", "1", "--mask-position", "1"], capsys, "give one of the two")
    fails_with([*evaluate, "--attention", "psa", "--mask-content", "1"], capsys,
               "this convit_tiny has 0 GPSA blocks (PSA, --attention psa, has no gate)")


def test_a_psa_model_trains_and_logs_no_gates(folder, tmp_path, capsys):
    """SM A's model through train.py: --attention psa builds PSA blocks in place of GPSA, every
    weight of theirs trains (W_qry, W_key and v_pos among them), and no gate is logged."""
    flags = ["--dataset", "imagefolder", "--data-dir", str(folder), *TINY, "--batch-size", "8", "--attention", "psa"]
    init = train.build_model(resolved(*flags), 3)
    assert [type(block.attn).__name__ for block in init.blocks] == ["PSA", "MHSA", "MHSA"]
    result = train.main([*flags, "--epochs", "1", "--no-figure", "--output-dir", str(tmp_path)])
    trained = result["model"].blocks[0].attn
    for name in ("v.weight", "pos_proj.weight"):  # W_val = I and v_pos of Eq. 5 at init, whatever the seed
        assert (trained.get_parameter(name) - init.blocks[0].attn.get_parameter(name)).abs().max() > 1e-4, name
    assert "gates" not in metrics_of(tmp_path)[-1] and len(metrics_of(tmp_path)[-1]["nonlocality"]) == 3
    fails_with([*TINY, "--model", "deit_tiny", "--attention", "psa"], capsys, "--attention psa makes the first")
    fails_with([*TINY, "--attention", "psa", "--freeze-gates"], capsys, "PSA (--attention psa) has none")


# ---------------------------------------------------------------------------------------
# Two processes under torchrun (gloo on the CPU)
# ---------------------------------------------------------------------------------------
def test_torchrun_two_processes(image_folder, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "train.py"), "--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY,
               "--epochs", "2", "--batch-size", "8", "--output-dir", str(tmp_path)]
    command.remove("--quiet")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and done.stdout.count("done: val top-1") == 1  # rank 0 alone logs
    lines = metrics_of(tmp_path)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[-1]["val_top1"] > 50  # both shards of the validation set count (chance: 33%)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["args"]["batch_size"] == 8
    assert len(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["rng"]) == 2  # one per process


# ---------------------------------------------------------------------------------------
# Bad input: `error: ...`, exit code 2, no traceback
# ---------------------------------------------------------------------------------------
def test_bad_input_exits_2_without_traceback_from_the_command_line():
    done = subprocess.run([sys.executable, str(HERE / "train.py"), "--data-fraction", "1.5"],
                          capture_output=True, text=True, timeout=60, cwd=HERE)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --data-fraction must lie in (0, 1], got 1.5"


@pytest.mark.parametrize("argv, message", [
    (["--data-fraction", "0"], "--data-fraction must lie in (0, 1], got 0.0"),
    (["--data-fraction", "1.5"], "--data-fraction must lie in (0, 1], got 1.5"),
    (["--model", "convit_huge"], "invalid choice: 'convit_huge'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--randaug-magnitude", "27"], "--randaug-magnitude must lie in [0, 10], got 27.0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
    (["--embed-dim", "30"], "width 30 is not divisible by 4 heads"),  # convit's own ValueError
])
def test_bad_flags_are_rejected(argv, message, capsys):
    fails_with(argv, capsys, message)


def test_missing_or_malformed_data_directory(tmp_path, capsys):
    fails_with(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nowhere")], capsys, "does not exist")
    (tmp_path / "only_train" / "train" / "cat").mkdir(parents=True)
    fails_with(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "only_train")], capsys, "val is not a folder")
    (tmp_path / "only_train" / "val" / "cat").mkdir(parents=True)  # class folders without images
    fails_with(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "only_train")], capsys, "cannot read")
    broken = tmp_path / "cifar" / "cifar-10-batches-py"
    broken.mkdir(parents=True)
    (broken / "data_batch_1").write_bytes(b"not a pickle")
    fails_with(["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")], capsys, "is not a readable cifar10 batch")


def test_no_network_for_a_missing_cifar_says_so(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    fails_with(["--dataset", "cifar100", "--data-dir", str(tmp_path)], capsys, "could not download cifar100")


def test_checkpoint_of_another_model_is_refused(image_folder, tmp_path, capsys):
    data = ["--dataset", "imagefolder", "--data-dir", str(image_folder), "--batch-size", "16"]
    train.main([*data, *TINY, "--epochs", "1", "--output-dir", str(tmp_path)])
    other = [*data, *TINY, "--embed-dim", "48", "--epochs", "2"]  # the later flag wins: C = 48
    fails_with([*other, "--resume", str(tmp_path / "checkpoint.pth")], capsys, "--embed-dim 48 (checkpoint: 32)")
    fails_with([*other, "--eval-only", "--checkpoint", str(tmp_path / "checkpoint.pth")], capsys,
               "embed_dim=32 (checkpoint) vs 48 (this run)")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    fails_with([*other, "--eval-only", "--checkpoint", str(tmp_path / "junk.pth")], capsys, "truncated or damaged")


def test_checkpoint_saved_before_the_deit_fields_still_fits():
    model = tiny_model()
    cfg = dataclasses.asdict(model.cfg)
    del cfg["qkv_bias"], cfg["class_token_in_pos_embed"]  # as saved before DeiT's own network existed
    checkpoints.check_same_model({"cfg": cfg}, model, "old.pth")  # no error: they were False then
    with pytest.raises(checkpoints.CheckpointError, match="class_token_in_pos_embed=False .checkpoint. vs True"):
        checkpoints.check_same_model({"cfg": cfg}, convit.create_model("deit_tiny", img_size=16, patch_size=4,
                                                                       embed_dim=32, depth=3, num_heads=4), "old.pth")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, capsys):
    # Epoch 1 warms up at lr 1e-6 and is saved; epoch 2 runs at lr 1e30, which blows the
    # weights up after one step, so that the second step's loss is not finite.
    fails_with(["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY, "--batch-size", "16",
                "--epochs", "2", "--warmup-epochs", "1", "--warmup-lr", "1e-6", "--lr", "1e30",
                "--output-dir", str(tmp_path)], capsys, "non-finite loss",
               f"the last good checkpoint ({tmp_path / 'checkpoint.pth'}) is untouched")
    assert [m["epoch"] for m in metrics_of(tmp_path)] == [1]
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    # The same blow-up in epoch 1, before any checkpoint: the message names none.
    fails_with(["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY, "--batch-size", "16",
                "--epochs", "1", "--warmup-epochs", "0", "--lr", "1e30", "--output-dir", str(tmp_path / "fresh")],
               capsys, "at epoch 1, step", "no checkpoint had been saved yet")
