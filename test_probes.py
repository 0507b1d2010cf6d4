"""Tab. 6's test-time masks (probes.py): content masked (sigma(lambda) = 1) or position masked
(sigma(lambda) = 0) in the first K GPSA layers, and `python probes.py` printing the table."""

import copy

import pytest
import torch

import cli
import convit
import probes
import train
from conftest import TINY, one_error_line


def model_with_moved_weights():
    """A small ConViT (3 GPSA + 1 MHSA blocks, an 8x8 grid), every GPSA term weighing on the
    output: content attention far from uniform and far from P, gates spread."""
    torch.manual_seed(0)
    model = convit.create_model("convit_tiny", img_size=32, patch_size=4, depth=4, local_up_to_layer=3,
                                num_classes=10, embed_dim=48).eval()
    with torch.no_grad():
        for layer in model.gpsa_layers():
            layer.qk.weight.normal_(std=0.3)
            layer.pos_proj.weight.add_(torch.randn_like(layer.pos_proj.weight) * 0.5)
            layer.gating_param.normal_()
    return model


def moved(model, layers: list[int], names: list[str]):
    """A copy of `model` whose weights `names` in GPSA layers `layers` are redrawn at random."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for i in layers:
            for name in names:
                other.blocks[i].attn.get_parameter(name).normal_(std=2.0)
    return other


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mask, sigma, term", [("content", 1.0, ["qk.weight"]),
                                                ("position", 0.0, ["pos_proj.weight", "pos_proj.bias"])])
def test_masked_term_is_never_read_and_only_the_first_k_layers_are_masked(mask, sigma, term, fused):
    """With content masked in the first 2 GPSA layers, W_qry and W_key of those layers can be
    anything: the output is the same, bit for bit (and v_pos likewise with position masked). The
    same weights of layer 3 still count: K counts from the first. The learned gates come back."""
    model = model_with_moved_weights().set_fused(fused)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        learned = model(images)
        lambdas = [layer.gating_param.clone() for layer in model.gpsa_layers()]
        with probes.masked_gates(model, 2, sigma):
            masked = model(images)
            assert model.gates()[:2].eq(sigma).all() and model.gates()[2].ne(sigma).all()
        other = moved(model, [0, 1], term)
        with probes.masked_gates(other, 2, sigma):
            assert torch.equal(other(images), masked)  # the masked weights are never read
        third = moved(model, [2], term)
        with probes.masked_gates(third, 2, sigma):
            assert (third(images) - masked).abs().max() > 1e-3  # layer 3 is not masked
        assert (masked - learned).abs().max() > 1e-3  # and masking changes the output
        assert torch.equal(model(images), learned)  # the learned gates are back
        assert all(torch.equal(layer.gating_param, lam) for layer, lam in zip(model.gpsa_layers(), lambdas))


def test_mask_refuses_what_it_cannot_do():
    model = model_with_moved_weights()
    with pytest.raises(ValueError, match="the first 4 GPSA layers: this model has 3"):
        probes.mask_gates(model, 4, 1.0)
    with pytest.raises(ValueError, match=r"forced to 1 \(content masked\) or 0 \(position masked\), not 0.5"):
        probes.mask_gates(model, 1, 0.5)
    psa = convit.create_model("convit_tiny", img_size=32, patch_size=4, depth=4, local_up_to_layer=3, attention="psa")
    with pytest.raises(ValueError, match=r"this model has 0 \(PSA has no gate\)"):
        probes.mask_gates(psa, 1, 0.0)


def test_table6_command_prints_ours_beside_the_papers(tmp_path, capsys):
    """python probes.py RUN: top-1 unmasked, then each mask for K = 1 .. the GPSA layers, the
    paper's row beside; each number is the top-1 that train.py --eval-only gives with that mask."""
    data = [*TINY, "--local-up-to-layer", "2", "--data-fraction", "0.2"]  # the digits
    train.main([*data, "--epochs", "1", "--output-dir", str(tmp_path), "--no-figure"])
    capsys.readouterr()
    table = probes.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert set(table["content"]) == set(table["position"]) == {1, 2}
    assert "| content (sigma = 1) | 2 |" in out and "K=3: 62.3, K=5: 35.0, K=10: 1.3" in out
    for mask, first in (("content", 2), ("position", 1)):
        evaluated = train.main([*data, "--eval-only", "--checkpoint", str(tmp_path), f"--mask-{mask}", str(first),
                                "--output-dir", str(tmp_path / "eval")])
        assert evaluated["val_top1"] == pytest.approx(table[mask][first], abs=1e-9)
    assert evaluated["masked"] == ["position masked in GPSA block 1 (sigma(lambda) = 0)"]


def test_table6_command_bad_input_is_one_line(tmp_path, capsys):
    released = tmp_path / "deit.pth"
    torch.save({"model": convit.create_model("deit_tiny", img_size=32).state_dict()}, released)
    cases = [([str(tmp_path / "nothing.pth")], "does not exist"),
             ([str(released)], "name its model, e.g. --model convit_tiny"),
             ([str(released), "--model", "deit_tiny", "--img-size", "32", "--dataset", "digits"],
              "has no GPSA layer"),
             ([str(released), "--model", "convit_tiny", "--img-size", "32"], "a DeiT checkpoint? build the model with a deit_* preset")]
    for argv, message in cases:
        one_error_line(cli.run_command(probes.main, argv), capsys.readouterr().err, message)
