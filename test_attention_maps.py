"""`python plots.py --attention CHECKPOINT`: every head's attention from one query patch, each GPSA
head titled with its sigma(lambda) (Figs. 7, 15-17), for one of train.py's checkpoints or a
released-style ConViT/DeiT file. The tool returns what it drew (plots.AttentionMaps), so the
tests read the gates, titles and maps back from that, not from the picture; every figure goes
to tmp_path.
"""

import math

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

import checkpoints
import cli
import convit
import data
import plots
import train
from conftest import TINY, one_error_line

GATES = [-2.0, -0.5, 0.5, 2.0]  # lambda of the 4 heads of the GPSA block: sigma = 0.12, 0.38, 0.62, 0.88


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint of a 1-epoch train.py run on the digits (TINY: 1 GPSA + 2 MHSA blocks, a 4x4
    grid), its gates then set apart so that each head's title can be told from the others."""
    folder = tmp_path_factory.mktemp("run")
    train.main([*TINY, "--epochs", "1", "--data-fraction", "0.2", "--no-figure", "--output-dir", str(folder)])
    checkpoint = torch.load(folder / checkpoints.CHECKPOINT, weights_only=True)
    checkpoint["model"]["blocks.0.attn.gating_param"] = torch.tensor(GATES)
    torch.save(checkpoint, folder / "gates.pth")
    return folder / "gates.pth"


def draw(*argv) -> plots.AttentionMaps:
    return plots.main(["--attention", *map(str, argv)])


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def query_row(model, images, layer, index) -> torch.Tensor:
    """What the figure should show, straight from the model: block `layer`'s attention from patch
    `index` to every patch (the class token's column left out), mean over the images, (H, r, c)."""
    n, rows = model.cfg.grid[0] * model.cfg.grid[1], model.cfg.grid[0]
    attn = model.attention_maps(images)[layer - 1][:, :, -n:, -n:]
    return rearrange(attn[:, :, index].mean(0), "h (r c) -> h r c", r=rows)


def test_each_gpsa_head_is_titled_with_its_gate_and_the_query_is_the_centre_patch(ours, tmp_path):
    result = draw(ours, "--out", tmp_path / "maps.png")
    assert is_png(tmp_path / "maps.png") and result.path == tmp_path / "maps.png"
    assert result.layers == [1, 2]  # 2 and depth - 2 (the paper's 2 and 10), for 3 blocks
    assert result.query == (2, 2) and result.indices == [0]  # the 4x4 grid's centre patch, validation image 0
    sigmas = [1 / (1 + math.exp(-lam)) for lam in GATES]
    assert result.gates[0] == pytest.approx(sigmas, abs=1e-6) and result.gates[1] == [None] * 4  # MHSA: no gate
    assert result.titles[0] == [f"head {h + 1}: $\\sigma$ = {s:.2f}" for h, s in enumerate(sigmas)]
    assert result.titles[1] == [f"head {h + 1}" for h in range(4)]
    model = checkpoints.model_from_checkpoint(ours).eval()
    image = data.validation_set(data.Data(dataset="digits", img_size=16))[0][0][None]
    for r, layer in enumerate(result.layers):
        assert torch.allclose(result.maps[r], query_row(model, image, layer, 2 * 4 + 2), atol=1e-6)
    other = draw(ours, "--query", "1,3", "--layers", "3", "--out", tmp_path / "other.png")  # row 1, column 3
    assert torch.allclose(other.maps[0], query_row(model, image, 3, 1 * 4 + 3), atol=1e-6)
    assert not torch.allclose(other.maps[0], query_row(model, image, 3, 3 * 4 + 1), atol=1e-3)


def test_average_over_n_images_is_the_mean_of_their_single_maps(ours, tmp_path):
    """Fig. 15: the map averaged over N validation images, spread over the set."""
    mean = draw(ours, "--average", "3", "--layers", "1", "2", "3", "--out", tmp_path / "mean.png")
    assert is_png(tmp_path / "mean.png") and mean.indices == [0, 180, 359]  # the digits' 360 validation images
    singles = [draw(ours, "--index", i, "--layers", "1", "2", "3", "--out", tmp_path / f"{i}.png").maps
               for i in mean.indices]
    assert torch.allclose(mean.maps, torch.stack(singles).mean(0), atol=1e-6)
    assert (singles[0] - singles[1]).abs().max() > 1e-3  # the images differ, so the mean is no single map


def test_your_image_gets_the_models_preprocessing(ours, tmp_path):
    """A photo of any size: for our digits model, grey, resized to 16 and normalised as its
    validation images are; the maps are those of that tensor."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 45, 3), dtype=np.uint8)).save(photo)
    result = draw(ours, "--image", photo, "--out", tmp_path / "mine.png")
    grey = data.eval_transform(16, data.DATASETS["digits"])(Image.open(photo).convert("L"))  # (1, 16, 16)
    model = checkpoints.model_from_checkpoint(ours).eval()
    assert result.indices is None
    assert torch.allclose(result.maps[0], query_row(model, grey[None], 1, 10), atol=1e-6)


@pytest.mark.parametrize("name", ["convit_tiny", "deit_tiny"])
def test_a_released_file_is_drawn_with_imagenets_preprocessing(tmp_path, name):
    """A randomly initialised model saved as the released files are ({"model": state_dict}), at
    img_size 64 (a 4x4 grid): every GPSA head titled sigma(1) = 0.73, DeiT's heads with none; the
    image resized to 64 / 0.875 = 73, centre-cropped to 64 and normalised with ImageNet's mean and std."""
    torch.manual_seed(0)
    model = convit.create_model(name, img_size=64).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "released.pth")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(photo)
    result = draw(tmp_path / "released.pth", "--model", name, "--img-size", 64, "--image", photo,
                  "--out", tmp_path / "fig7.png")
    assert is_png(tmp_path / "fig7.png") and result.layers == [2, 10]
    if name == "convit_tiny":
        assert result.titles[1] == [f"head {h}: $\\sigma$ = 0.73" for h in range(1, 5)]  # layer 10, GPSA
    else:
        assert result.gates == [[None] * 3, [None] * 3]
    image = data.eval_transform(64, data.DATASETS["imagefolder"])(Image.open(photo).convert("RGB"))
    assert torch.allclose(result.maps[1], query_row(model, image[None], 10, 2 * 4 + 2), atol=1e-6)


def test_bad_input_is_one_error_line_and_writes_nothing(ours, tmp_path, capsys):
    torch.save({"model": convit.create_model("convit_tiny", img_size=64).state_dict()}, tmp_path / "released.pth")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    out = ["--out", str(tmp_path / "x.png")]
    cases = [
        ([ours, "--image", tmp_path / "nope.png", *out], "--image " + str(tmp_path / "nope.png") + " does not exist"),
        ([ours, "--image", tmp_path / "broken.png", *out], "cannot be read"),
        ([ours, "--layers", "2", "4", *out], "--layers 4: the model has 3 blocks, 1 to 3"),
        ([ours, "--query", "4,0", *out], "--query 4,0: the grid is 4x4 patches"),
        ([ours, "--query", "middle", *out], "give centre or ROW,COL"),
        ([ours, "--index", "360", *out], "--index 360: the validation set of digits has 360 images"),
        ([ours, "--image", tmp_path / "broken.png", "--index", "1", *out], "--image and --index: give one"),
        ([ours, "--model", "convit_tiny", *out], "--model: " + str(ours) + " is one of train.py's checkpoints"),
        ([tmp_path / "released.pth", *out], "name its model, e.g. --model convit_tiny"),
        ([tmp_path / "released.pth", "--model", "convit_tiny", "--img-size", "100", *out],
         "image 100x100 is not divisible by patch 16"),
        ([tmp_path / "nothing.pth", *out], "--attention " + str(tmp_path / "nothing.pth") + " does not exist"),
        ([ours, "--out", tmp_path / "x.jpg"], "name a .png file"),
        ([ours, "--out", tmp_path / "no" / "x.png"], "the folder " + str(tmp_path / "no") + " does not exist"),
        ([ours, "--out", tmp_path / "folder.png"], f"could not write {tmp_path / 'folder.png'} (Is a directory)"),
    ]
    (tmp_path / "folder.png").mkdir()
    unknown = torch.load(ours, weights_only=True)
    unknown["args"]["dataset"] = "imagenet21k"  # edited, or written by a newer version
    torch.save(unknown, tmp_path / "unknown.pth")
    cases.append(([tmp_path / "unknown.pth", *out], f"{tmp_path / 'unknown.pth'} was trained on --dataset "
                                                      "'imagenet21k', which this code does not know (it knows digits,"))
    for argv, message in cases:
        one_error_line(cli.run_command(plots.main, ["--attention", *map(str, argv)]), capsys.readouterr().err, message)
    one_error_line(cli.run_command(plots.main, ["--layers", "2", *out]), capsys.readouterr().err,
                   "--layers, --out: only with --attention CHECKPOINT")
    assert [path.name for path in tmp_path.glob("**/*.png*") if path.is_file()] == ["broken.png"]  # no figure, whole or partial
