"""Mixed precision and torch.compile, proven on the CPU through the code that a GPU runs.

One GPU has run this project, once (an H200: docs/gpu.md); CI has none. On a GPU, train.py trains under autocast by default (bf16, or fp16
with a gradient scaler) and `--compile` adds torch.compile. Autocast and compile are the same
code on the CPU (only the kernels differ), so these tests drive that path here: the model in
bf16 and fp16 on both GPSA paths, `--amp` and `--compile` end to end through train.py.

Tolerance for bf16 / fp16 against each other and against fp32. u = eps / 2 is the unit
roundoff of the low-precision type: 2^-8 for bf16 (8 significant bits), 2^-11 for fp16 (11).
Every matrix product and the fused attention kernel accumulate in fp32 on the CPU, so the
reduction lengths here (at most 192: C = 48, N = 64 patches, the MLP's 192 hidden units) add at
most 192 x 2^-24 ~ 1e-5 relative error, negligible against u. What remains is rounding each
operand and each result to the low-precision type: along the longest chain of a block, about 8
times (the input, the weights, Q/K/V, the attention probabilities or P, the two positional
mixes, the gate mix, the projection). To first order each path is then within 8u of the exact
value, relative to the scale of the tensor compared (its largest entry), and the two paths
within 16u of each other. Measured: at most 5u. A positional softmax computed in bf16 instead
of fp32 is caught exactly, by the tests that P, the gates and the inspection are fp32.
"""

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import convit
import train
from conftest import TINY, metrics_of

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def runs_on_this_cpu_or_skip(dtype: torch.dtype):
    """Skip, naming the torch version, where this torch cannot run `dtype` autocast on the CPU."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            q = F.linear(torch.randn(1, 4, 8), torch.randn(8, 8)).unsqueeze(1)  # (1, 1, 4, 8)
            F.scaled_dot_product_attention(q, q, q).float().sum()
        if dtype == torch.float16:
            torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError) as err:
        pytest.skip(f"torch {torch.__version__} cannot run {NAMES[dtype]} autocast on the CPU: {err}")


def perturbed_pair(attention: str = "gpsa"):
    """A small ConViT (3 GPSA, or PSA, + 1 MHSA blocks, 8x8 patches) on the fused path with its
    gates and v_pos moved off their init, and its explicit twin with the same weights."""
    torch.manual_seed(0)
    fused = convit.create_model("convit_tiny", img_size=32, patch_size=4, depth=4, local_up_to_layer=3,
                                num_classes=10, embed_dim=48, attention=attention)
    with torch.no_grad():
        for layer in fused.positional_layers():
            layer.pos_proj.weight.mul_(1 + 0.1 * torch.randn_like(layer.pos_proj.weight))  # off bf16's grid
            if attention == "gpsa":
                layer.gating_param.normal_()
            else:  # logits near 100, where bf16's spacing is 0.5: PSA's fused path must not cast them so
                layer.pos_proj.bias.fill_(100.0)
    return fused, convit.explicit_twin(fused)


def logits_and_gradients(model, images, labels, dtype):
    """Forward under autocast (dtype None: fp32), then backward; fp16 with a fixed loss scale,
    as its gradient scaler would (2^10 keeps the small gradients above fp16's smallest normal
    number, 6e-5, without overflowing the largest sums)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(images)
    scale = 2.0**10 if dtype == torch.float16 else 1.0
    (F.cross_entropy(logits.float(), labels) * scale).backward()
    return logits, {name: p.grad / scale for name, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["gpsa", "psa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_and_explicit_paths_agree_under_autocast(dtype, attention):
    runs_on_this_cpu_or_skip(dtype)
    u = torch.finfo(dtype).eps / 2
    fused, explicit = perturbed_pair(attention)
    images, labels = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    exact_logits, exact_grads = logits_and_gradients(explicit, images, labels, None)  # fp32
    results = {path: logits_and_gradients(model, images, labels, dtype)
               for path, model in (("fused", fused), ("explicit", explicit))}
    for logits, _ in results.values():
        assert logits.dtype == dtype  # autocast really ran: the head's output is low precision

    def close(a, b, reference, tolerance):
        return (a.float() - b.float()).abs().max() <= tolerance * u * reference.abs().max()

    (fused_logits, fused_grads), (explicit_logits, explicit_grads) = results.values()
    assert close(fused_logits, explicit_logits, exact_logits, 16)
    assert close(fused_logits, exact_logits, exact_logits, 8) and close(explicit_logits, exact_logits, exact_logits, 8)
    for name, exact in exact_grads.items():
        if name.endswith("pos_proj.bias"):
            # Its exact gradient is 0 (the softmax removes a constant); rounding leaves ~1e-10.
            scale = exact_grads[name.replace("bias", "weight")]
            assert close(fused_grads[name], torch.zeros(1), scale, 16) and close(explicit_grads[name], torch.zeros(1), scale, 16)
            continue
        assert close(fused_grads[name], explicit_grads[name], exact, 16), name
        assert close(fused_grads[name], exact, exact, 8) and close(explicit_grads[name], exact, exact, 8), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_positional_attention_gates_and_inspection_stay_fp32_under_autocast(dtype):
    runs_on_this_cpu_or_skip(dtype)
    model, _ = perturbed_pair()
    layer = model.gpsa_layers()[0]
    images = torch.randn(2, 3, 32, 32)

    def measured():
        return [layer.position_attention(), *layer.position_attention_factors(), model.gates(),
                *model.attention_maps(images), model.nonlocality(images)]

    full_precision = measured()
    with torch.autocast("cpu", dtype=dtype):
        under_autocast = measured()
        assert model(images).dtype == dtype  # while the forward pass itself is low precision
    for exact, value in zip(full_precision, under_autocast, strict=True):
        assert value.dtype == torch.float32 and torch.equal(value, exact)


def test_mixed_precision_defaults_and_the_gpu_bf16_check(monkeypatch):
    """The choice of dtype, CUDA branch included: torch.cuda.is_bf16_supported is replaced, so the
    GPU logic runs on a CPU (a torch.device("cuda") needs no GPU to exist)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert train.mixed_precision(cpu, None, None) is None  # fp32 by default on a CPU
    assert train.mixed_precision(cpu, True, None) == torch.bfloat16  # --amp
    assert train.mixed_precision(cpu, None, "fp16") == torch.float16  # --amp-dtype implies --amp
    assert train.mixed_precision(gpu, False, None) is None  # --no-amp
    with pytest.raises(train.TrainError, match="--amp-dtype fp16 contradicts --no-amp"):
        train.mixed_precision(cpu, False, "fp16")
    for has_bf16, default in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda has_bf16=has_bf16: has_bf16)
        assert train.mixed_precision(gpu, None, None) == default  # on by default on a GPU
        assert train.mixed_precision(gpu, None, "fp16") == torch.float16
    with pytest.raises(train.TrainError, match="this GPU has no bf16 support"):
        train.mixed_precision(gpu, True, "bf16")


# ---------------------------------------------------------------------------------------
# train.py --amp and --compile, end to end on the CPU
# ---------------------------------------------------------------------------------------
def tiny_run(image_folder, out, *flags) -> list[str]:
    """The flags of a short training run on conftest's image_folder (3 classes, 96 training images)."""
    return ["--dataset", "imagefolder", "--data-dir", str(image_folder), *TINY, "--batch-size", "16",
            "--warmup-epochs", "0", "--lr", "2e-3", "--output-dir", str(out), *flags]


@pytest.mark.parametrize("dtype", DTYPES)
def test_amp_trains_an_epoch_and_says_so(dtype, image_folder, tmp_path, capsys):
    runs_on_this_cpu_or_skip(dtype)
    name = NAMES[dtype]
    full = train.main(tiny_run(image_folder, tmp_path / "fp32", "--epochs", "1"))
    verbose = [flag for flag in tiny_run(image_folder, tmp_path / name, "--epochs", "1", "--amp-dtype", name)
               if flag != "--quiet"]
    capsys.readouterr()
    mixed = train.main(verbose)
    start_line = capsys.readouterr().out.splitlines()[0]
    assert start_line.endswith({"bf16": ", bf16 autocast", "fp16": ", fp16 autocast with a gradient scaler"}[name])
    # The same six steps, rounded differently: the losses agree closely, and the weights differ by
    # what rounding to 8 or 11 bits makes of six Adam steps of lr 2e-3 (about 5e-3 and 4e-3 here),
    # far more than fp32 alone moves them when its sums are reordered (1.5e-5, on 2 threads against 1).
    full_loss, mixed_loss = metrics_of(tmp_path / "fp32")[0]["train_loss"], metrics_of(tmp_path / name)[0]["train_loss"]
    assert abs(mixed_loss - full_loss) <= 0.01 * full_loss, (full_loss, mixed_loss)
    full_state, mixed_state = full["model"].state_dict(), mixed["model"].state_dict()
    gap = max((full_state[key] - mixed_state[key]).abs().max().item() for key in full_state)
    assert gap > 5e-4, gap
    saved = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
    scaler = saved["scaler"]
    if dtype == torch.bfloat16:
        assert scaler == {}  # bf16 has fp32's range: no scaler
    else:
        # The scaler ran: its scale starts at 2^16 and halves at each step it skips for an overflow,
        # and it counts the good steps since the last fall. Adam counts the steps it took: of the 6
        # that 96 images make, all but the skipped ones.
        falls = math.log2(2.0**16 / scaler["scale"])
        taken = {int(state["step"]) for state in saved["optimizer"]["state"].values()}
        assert falls.is_integer() and taken == {96 // 16 - int(falls)}, (scaler, taken)
        assert 1 <= scaler["_growth_tracker"] <= 96 // 16 - falls, scaler


@pytest.mark.parametrize("dtype", DTYPES)
def test_amp_run_resumes_bit_exactly(dtype, image_folder, tmp_path):
    """Stopped after one epoch and resumed, a mixed-precision run ends with the weights, the
    optimiser and the gradient scaler of an uninterrupted one, bit for bit."""
    runs_on_this_cpu_or_skip(dtype)
    recipe = ["--epochs", "2", "--amp-dtype", NAMES[dtype], "--drop-path", "0.1", "--mixup", "0.8"]
    whole = train.main(tiny_run(image_folder, tmp_path / "whole", *recipe))
    train.main(tiny_run(image_folder, tmp_path / "split", *recipe, "--stop-after", "1"))
    resumed = train.main(tiny_run(image_folder, tmp_path / "split", *recipe,
                                  "--resume", str(tmp_path / "split" / "checkpoint.pth")))
    assert resumed["epochs_run"] == 1
    whole_state, resumed_state = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(whole_state[key], resumed_state[key]) for key in whole_state)
    saved = [torch.load(tmp_path / run / "checkpoint.pth", weights_only=True) for run in ("whole", "split")]
    assert saved[0]["scaler"] == saved[1]["scaler"]
    assert metrics_of(tmp_path / "whole")[-1]["val_loss"] == metrics_of(tmp_path / "split")[-1]["val_loss"]


def test_compiled_run_keeps_eager_checkpoint_keys_resumes_and_evaluates(image_folder, tmp_path):
    """--compile end to end with torch's default backend (inductor, C++ on the CPU), on the smallest
    model that still has both block types: 1 GPSA + 1 MHSA block. Compiling its training step
    (forward and backward) takes most of this test: about 40 s with a cold cache on our 2 shared
    cores, a few seconds once inductor has cached it."""
    if not any(shutil.which(compiler) for compiler in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        pytest.skip("torch.compile on a CPU writes C++ and needs a C++ compiler; none is on the PATH")
    small = ["--depth", "2", "--epochs", "2"]
    eager = train.main(tiny_run(image_folder, tmp_path / "eager", *small, "--stop-after", "1"))
    compiled = train.main(tiny_run(image_folder, tmp_path / "compiled", *small, "--stop-after", "1", "--compile"))
    saved = torch.load(tmp_path / "compiled" / "checkpoint.pth", weights_only=True)
    eager_saved = torch.load(tmp_path / "eager" / "checkpoint.pth", weights_only=True)
    assert list(saved["model"]) == list(eager_saved["model"])  # no "_orig_mod." prefix
    # The compiled step computes what the eager one does, up to the order of fp32 roundings.
    eager_loss, compiled_loss = (metrics_of(tmp_path / run)[0]["train_loss"] for run in ("eager", "compiled"))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    resumed = train.main(tiny_run(image_folder, tmp_path / "compiled", *small, "--compile",
                                  "--resume", str(tmp_path / "compiled" / "checkpoint.pth")))
    assert resumed["epochs_run"] == 1 and [m["epoch"] for m in metrics_of(tmp_path / "compiled")] == [1, 2]
    evaluated = train.main(tiny_run(image_folder, tmp_path / "compiled", *small, "--eval-only",
                                    "--checkpoint", str(tmp_path / "compiled" / "checkpoint.pth")))
    assert evaluated["val_loss"] == pytest.approx(metrics_of(tmp_path / "compiled")[-1]["val_loss"], rel=1e-6)
    assert eager["epochs_run"] == compiled["epochs_run"] == 1

