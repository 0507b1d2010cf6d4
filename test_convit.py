"""The paper's claims about the model, each checked with a number that would fail if the maths
were wrong. Runs on the CPU in well under a minute: `pytest test_convit.py`.

Facts quoted below (released layout, Table 1, Eq. 5-8) come from the paper (arXiv:2103.10697)
and the released checkpoints' state-dict specification.
"""

import dataclasses
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import convit
from checkpoints import load_checkpoint, model_from_checkpoint
from convit import GPSA, MHSA, PSA, create_model, kernel_centres, relative_positions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small(name="convit_tiny", **overrides):
    """A small model of the same family: 32x32 images, patch 4 (an 8x8 grid), 4 blocks."""
    settings = dict(img_size=32, patch_size=4, depth=4, local_up_to_layer=3, num_classes=10, embed_dim=48)
    return create_model(name, **{**settings, **overrides})


# --- Geometry (Eq. 4-5) --------------------------------------------------------------------
def test_relative_positions_are_key_minus_query_in_released_order():
    r = relative_positions(2, 3)  # grid of 2 rows, 3 columns; patch index = row * 3 + col
    query, key = 1, 5  # (row 0, col 1) and (row 1, col 2)
    assert r.shape == (6, 6, 3)
    assert r[query, key].tolist() == [1.0, 1.0, 2.0]  # (dx, dy, ||d||^2)
    assert r[key, query].tolist() == [-1.0, -1.0, 2.0]
    assert torch.all(r[torch.arange(6), torch.arange(6)] == 0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kernel_centres_follow_released_order(k):
    # Released rule: head = a + k*b, Delta_y = a - c, Delta_x = b - c, c = (k - 1) / 2.
    c = (k - 1) / 2
    expected = torch.zeros(k * k, 2)
    for a, b in itertools.product(range(k), range(k)):
        expected[a + k * b] = torch.tensor([b - c, a - c])
    assert torch.equal(kernel_centres(k * k), expected)


def test_local_init_sets_released_values():
    alpha = 0.7
    layer = GPSA(dim=36, num_heads=9, grid=(5, 5), locality_strength=alpha)
    layer.local_init()
    assert torch.equal(layer.v.weight, torch.eye(36))  # W_val = I
    for a, b in itertools.product(range(3), range(3)):
        dx, dy = b - 1, a - 1
        assert torch.allclose(layer.pos_proj.weight[a + 3 * b], torch.tensor([2 * dx, 2 * dy, -1.0]) * alpha)
    assert torch.allclose(layer.gate(), torch.full((9,), 1 / (1 + math.exp(-1))))  # sigma(1) = 0.731


@pytest.mark.parametrize("num_heads", [4, 9, 16])
def test_local_init_attends_to_kernel_offsets(num_heads):
    rows = cols = 15
    layer = GPSA(dim=num_heads * 4, num_heads=num_heads, grid=(rows, cols))
    layer.local_init()
    attn = layer.position_attention().detach()  # (H, N, N)
    query = 7 * cols + 7  # the centre patch: far from every border
    offsets = relative_positions(rows, cols)[query, :, :2]  # (N, 2): (dx, dy) of every key
    for h, centre in enumerate(kernel_centres(num_heads)):
        weights = attn[h, query]
        centre_of_mass = (weights[:, None] * offsets).sum(0)
        assert torch.allclose(centre_of_mass, centre, atol=1e-5), (h, centre_of_mass, centre)
        # The peak: the one offset Delta_h (odd k), or the 4 integer offsets around it (even k).
        nearest = torch.isclose((offsets - centre).norm(dim=1), (offsets - centre).norm(dim=1).min())
        top = weights.topk(int(nearest.sum())).indices
        assert set(top.tolist()) == set(nearest.nonzero().flatten().tolist())


@pytest.mark.parametrize("num_heads", [1, 2, 3, 5, 6, 8, 12])
def test_non_square_head_counts_get_distinct_local_centres(num_heads):
    centres = kernel_centres(num_heads)
    k = math.ceil(math.sqrt(num_heads))
    assert len({tuple(c.tolist()) for c in centres}) == num_heads  # no two heads share a centre
    assert centres.abs().max() <= (k - 1) / 2  # all inside the k x k kernel
    everything = kernel_centres(k * k)
    chosen_radius = centres.norm(dim=1).max()
    left_out = [c for c in everything if not (centres == c).all(dim=1).any()]
    assert all(c.norm() >= chosen_radius - 1e-6 for c in left_out)  # the nearest offsets were chosen


def test_init_is_far_more_local_than_random_mhsa():
    # The paper's 14x14 grid, from 56x56 images in 4x4 patches, narrow and shallow.
    shape = dict(img_size=56, patch_size=4, embed_dim=48, depth=3)
    images = torch.randn(2, 3, 56, 56)
    convit_nonlocality = create_model("convit_tiny", **shape, local_up_to_layer=2).eval().nonlocality(images)[:2]
    baseline_nonlocality = create_model("convit_tiny", **shape, local_up_to_layer=0).eval().nonlocality(images)
    # Uniform attention on a 14x14 grid sits ~7.2 patches away; the conv init pulls GPSA to ~2.7
    # (0.73 of the mass on offsets of norm 0.7, 0.27 still on near-uniform content attention).
    assert baseline_nonlocality.mean() > 7.0
    assert convit_nonlocality.mean() < 0.4 * baseline_nonlocality.mean()


# --- GPSA limits (Eq. 6-7) -----------------------------------------------------------------
def as_convolution(layer, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """What a layer of 9 heads that copy the patch at their kernel offsets computes: a 3x3
    convolution whose kernel at offset Delta_h is W_out^h W_val^h, replicate-padded at the border
    (a head whose offset leaves the grid falls on the nearest patch inside)."""
    channels = x.shape[-1]
    head_dim = channels // 9
    kernel = torch.zeros(channels, channels, 3, 3)  # (out, in, ky, kx)
    for h, (dx, dy) in enumerate(kernel_centres(9).long().tolist()):
        block = slice(h * head_dim, (h + 1) * head_dim)
        kernel[:, :, dy + 1, dx + 1] = layer.proj.weight[:, block] @ layer.v.weight[block, :]
    image = F.pad(rearrange(x, "b (r c) ch -> b ch r c", r=rows), (1, 1, 1, 1), mode="replicate")
    return rearrange(F.conv2d(image, kernel, layer.proj.bias), "b ch r c -> b (r c) ch")


def test_gpsa_reduces_to_convolution():
    """sigma(lambda) -> 1 and a large alpha: 9 heads compute a 3x3 convolution whose kernel at
    offset Delta_h is W_out^h W_val^h (each head copies the patch at its offset)."""
    rows, cols, channels = 6, 7, 18
    layer = GPSA(dim=channels, num_heads=9, grid=(rows, cols), locality_strength=100.0)
    layer.local_init()
    with torch.no_grad():
        layer.gating_param.fill_(50.0)  # sigma(50) = 1 in fp32
        layer.v.weight.normal_()  # any W_val: the kernel absorbs it
        layer.proj.bias.normal_()
    x = torch.randn(2, rows * cols, channels)
    for path in (layer.forward_explicit, layer.forward_fused):
        assert torch.allclose(path(x), as_convolution(layer, x, rows, cols), atol=1e-5)


def test_psa_at_init_reduces_to_convolution():
    """Plain PSA (Eq. 4) with GPSA's conv init and a large alpha is the same convolution, with no
    gate to open: its positional logits fall by alpha per unit of squared distance, and swamp the
    content logits, whatever W_qry and W_key are at init. With alpha = 1 they do not."""
    rows, cols, channels = 6, 7, 18
    x = torch.randn(2, rows * cols, channels)
    for alpha, equal in ((100.0, True), (1.0, False)):
        layer = PSA(dim=channels, num_heads=9, grid=(rows, cols), locality_strength=alpha)
        layer.local_init()
        with torch.no_grad():
            layer.v.weight.normal_()
            layer.proj.bias.normal_()
        for path in (layer.forward_explicit, layer.forward_fused):
            assert torch.allclose(path(x), as_convolution(layer, x, rows, cols), atol=1e-5) == equal, alpha


def test_psa_at_init_attends_as_gpsa_with_its_gate_open():
    """At DeiT's init (W_qry, W_key of std 0.02) Eq. 4's content logits are ~0.02 beside positional
    logits that fall by alpha = 1 per unit of squared distance: PSA's A is, to 3e-2, the
    positional attention P that a GPSA with the same weights and sigma(lambda) = 1 reads. Once
    W_qry and W_key grow, PSA's A leaves P: content enters, through the one softmax."""
    torch.manual_seed(0)
    psa = small(attention="psa").eval()
    gpsa = small().eval()
    gpsa.load_state_dict({**gpsa.state_dict(), **psa.state_dict()})  # all but the gates
    with torch.no_grad():
        for layer in gpsa.gpsa_layers():
            layer.gating_param.fill_(float("inf"))  # sigma = 1.0 exactly
    images = torch.randn(2, 3, 32, 32)
    for psa_map, gpsa_map in zip(psa.attention_maps(images)[:3], gpsa.attention_maps(images)[:3]):
        assert (psa_map - gpsa_map).abs().max() < 3e-2  # ~0.02 logits move a weight of 0.77 by 2-3%
        assert gpsa_map.max() > 0.3  # and P is local, not uniform (1/64)
    with torch.no_grad():
        for layer in psa.positional_layers():
            layer.qk.weight.normal_(std=0.3)
    assert max((p - g).abs().max() for p, g in zip(psa.attention_maps(images)[:3], gpsa.attention_maps(images)[:3])) > 0.1


def content_attention_only(layer, x: torch.Tensor) -> torch.Tensor:
    """Eq. 1 with a GPSA or PSA layer's weights, for 4 heads: softmax(QK^T / sqrt(D)) X W_val, then W_out."""
    q, k = rearrange(layer.qk(x), "b n (two h d) -> two b h n d", two=2, h=4)
    v = rearrange(layer.v(x), "b n (h d) -> b h n d", h=4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return layer.proj(rearrange(attn @ v, "b h n d -> b n (h d)"))


def test_psa_without_positions_is_plain_attention():
    """v_pos = 0 leaves Eq. 4's content logits alone: softmax(QK^T / sqrt(D)) X W_val W_out, on
    both paths. pos_proj's bias adds one number per head to every logit of a row: no change."""
    layer = PSA(dim=24, num_heads=4, grid=(4, 5))
    with torch.no_grad():
        layer.pos_proj.weight.zero_()
        layer.pos_proj.bias.normal_(std=3.0)
        layer.qk.weight.normal_(std=0.3)
    x = torch.randn(3, 20, 24)
    expected = content_attention_only(layer, x)
    for path in (layer.forward_explicit, layer.forward_fused):
        assert torch.allclose(path(x), expected, atol=1e-5)
    with torch.no_grad():
        layer.pos_proj.weight.normal_()  # and with positions, it is not
    assert not torch.allclose(layer(x), expected, atol=1e-3)


def test_gpsa_with_closed_gate_is_content_attention():
    layer = GPSA(dim=24, num_heads=4, grid=(4, 5))
    with torch.no_grad():
        layer.gating_param.fill_(-50.0)  # sigma(-50) = 0: positional term switched off
        layer.qk.weight.normal_(std=0.3)
    x = torch.randn(3, 20, 24)
    for path in (layer.forward_explicit, layer.forward_fused):
        assert torch.allclose(path(x), content_attention_only(layer, x), atol=1e-5)


def test_position_attention_factorises_over_rows_and_columns():
    layer = GPSA(dim=16, num_heads=4, grid=(5, 7))
    with torch.no_grad():
        layer.pos_proj.weight.normal_()
        layer.pos_proj.bias.normal_()
    p_rows, p_cols = layer.position_attention_factors()  # (H, 5, 5), (H, 7, 7)
    kronecker = rearrange(p_rows[:, :, None, :, None] * p_cols[:, None, :, None, :], "h r c r2 c2 -> h (r c) (r2 c2)")
    assert torch.allclose(kronecker, layer.position_attention(), atol=1e-6)


def perturbed(model):
    """Move every GPSA (or PSA) layer away from its init so that equalities are not special cases."""
    with torch.no_grad():
        for layer in model.positional_layers():
            layer.pos_proj.weight.add_(torch.randn_like(layer.pos_proj.weight) * 0.5)
        for layer in model.gpsa_layers():
            layer.gating_param.normal_()
    return model


@pytest.mark.parametrize("attention", ["gpsa", "psa"])
def test_fused_and_explicit_paths_agree_in_outputs_and_gradients(attention):
    images = torch.randn(3, 3, 32, 48)
    labels = torch.randint(0, 10, (3,))
    fused = perturbed(small(img_size=(32, 48), attention=attention))
    explicit = small(img_size=(32, 48), attention=attention, fused=False)
    explicit.load_state_dict(fused.state_dict())
    outputs, grads = [], []
    for model in (fused, explicit):
        out = model(images)
        F.cross_entropy(out, labels).backward()
        outputs.append(out.detach())
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_every_parameter_gets_a_gradient_and_nothing_is_nan():
    """Every gradient is non-zero but one: pos_proj's bias adds the same number to a whole row of
    positional scores, which the softmax removes, so its exact gradient is 0 and only rounding
    is left of it."""
    models = (small(), small(fused=False), small(attention="psa"), small(attention="psa", fused=False),
              small("deit_tiny", local_up_to_layer=0))
    for model in models:
        out = model(torch.randn(2, 3, 32, 32))
        out.sum().backward()
        assert torch.isfinite(out).all()
        grads = {name: p.grad for name, p in model.named_parameters()}
        for name, grad in grads.items():
            assert grad is not None and torch.isfinite(grad).all(), name
            if name.endswith("pos_proj.bias"):
                weight_grad = grads[name.replace("bias", "weight")]
                # fp32 rounding leaves about 1e-6 of the weight's gradient; a bias that did not cancel, ~1
                assert grad.abs().max() < 1e-4 * weight_grad.abs().max(), (name, grad, weight_grad)
            else:
                assert grad.abs().sum() > 0, name


def test_attention_dropout_is_unbiased_in_training():
    layer = GPSA(dim=16, num_heads=4, grid=(3, 3), attn_drop=0.5)
    layer.local_init()
    x = torch.randn(1, 9, 16).expand(4000, 9, 16)  # one input, 4000 independent dropout draws
    mhsa = MHSA(dim=16, num_heads=4, attn_drop=0.5)  # drops inside the fused kernel
    for attention in (layer, mhsa):
        clean = attention.eval()(x[:1]).detach()
        draws = attention.train()(x).detach()
        assert not torch.allclose(draws[0], draws[1])  # dropout is on
        assert torch.allclose(draws.mean(0), clean[0], atol=0.03)  # E[dropout(A)] = A


# --- The network -------------------------------------------------------------------------
# Table 1 (millions of parameters, rounded by the paper) and the architecture's exact count.
TABLE1_PARAMS = {
    "convit_tiny": 6, "convit_tiny_plus": 10, "convit_small": 27, "convit_small_plus": 48,
    "convit_base": 86, "convit_base_plus": 152, "deit_tiny": 6, "deit_tiny_plus": 10,
    "deit_small": 22, "deit_small_plus": 48, "deit_base": 86, "deit_base_plus": 152,
}


def expected_parameters(embed_dim, num_heads, num_gpsa, deit=False, depth=12, patch=16, patches=196, classes=1000):
    """The closed form. deit=True: DeiT's own network, whose qkv has a bias (3C more per block)
    and whose pos_embed has one more position, the class token's."""
    c, h = embed_dim, num_heads
    shared = 4 * c + 8 * c * c + 5 * c + c * c + c  # two norms, MLP (ratio 4), W_out with bias
    gpsa = shared + 3 * c * c + 4 * h + h  # qk, v (no bias), pos_proj (3 -> H, bias), gates
    mhsa = shared + 3 * c * c + (3 * c if deit else 0)  # qkv (a bias in DeiT only)
    stem = 3 * patch * patch * c + c + c + (patches + deit) * c  # patch embedding, class token, pos_embed
    return stem + num_gpsa * gpsa + (depth - num_gpsa) * mhsa + 2 * c + c * classes + classes


@pytest.mark.parametrize("name", list(TABLE1_PARAMS))
def test_parameter_counts_match_table1(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = create_model(name)
    count = convit.count_parameters(model)
    architecture, embed_dim, num_heads = convit.TABLE1_MODELS[name]
    num_gpsa = 10 if architecture == "convit" else 0
    assert count == expected_parameters(embed_dim, num_heads, num_gpsa, deit=architecture == "deit")
    assert abs(count / 1e6 - TABLE1_PARAMS[name]) < 1.2  # the paper rounds to whole millions


def test_deit_presets_are_deits_own_network():
    # The parameter counts of the released deit_{tiny,small,base}_patch16_224 models.
    released = {"deit_tiny": 5_717_416, "deit_small": 22_050_664, "deit_base": 86_567_656}
    for name, count in released.items():
        with torch.device("meta"):
            assert convit.count_parameters(create_model(name)) == count, name
    # The same-size baseline (a ConViT with no GPSA block) is another network: 37 C fewer
    # parameters (no qkv bias in 12 blocks, no class-token position).
    with torch.device("meta"):
        baseline = create_model("convit_tiny", local_up_to_layer=0, num_heads=3)
    assert convit.count_parameters(baseline) == released["deit_tiny"] - 37 * 192


def released_layout(embed_dim=192, num_heads=4, classes=1000, deit=False):
    """Names and shapes of a released ConViT checkpoint (12 blocks, 10 GPSA, 224^2, patch 16),
    or with deit=True of a released DeiT (timm's deit_*_patch16_224: 12 MHSA blocks whose qkv has
    a bias, and a pos_embed of 1 + 196 positions)."""
    c = embed_dim
    num_gpsa = 0 if deit else 10
    layout = {
        "patch_embed.proj.weight": (c, 3, 16, 16), "patch_embed.proj.bias": (c,),
        "cls_token": (1, 1, c), "pos_embed": (1, 197 if deit else 196, c),
        "norm.weight": (c,), "norm.bias": (c,), "head.weight": (classes, c), "head.bias": (classes,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        layout.update({b + "norm1.weight": (c,), b + "norm1.bias": (c,), b + "norm2.weight": (c,),
                       b + "norm2.bias": (c,), b + "mlp.fc1.weight": (4 * c, c), b + "mlp.fc1.bias": (4 * c,),
                       b + "mlp.fc2.weight": (c, 4 * c), b + "mlp.fc2.bias": (c,),
                       b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,)})
        if i < num_gpsa:
            layout.update({b + "attn.qk.weight": (2 * c, c), b + "attn.v.weight": (c, c),
                           b + "attn.pos_proj.weight": (num_heads, 3), b + "attn.pos_proj.bias": (num_heads,),
                           b + "attn.gating_param": (num_heads,)})
        else:
            layout[b + "attn.qkv.weight"] = (3 * c, c)
            if deit:
                layout[b + "attn.qkv.bias"] = (3 * c,)
    return layout


@pytest.mark.parametrize("name, embed_dim, num_heads", [
    ("convit_tiny", 192, 4), ("convit_small", 432, 9), ("convit_base", 768, 16),
    ("deit_tiny", 192, 3), ("deit_small", 384, 6), ("deit_base", 768, 12)])
def test_state_dict_matches_released_layout(name, embed_dim, num_heads):
    with torch.device("meta"):
        model = create_model(name)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes == released_layout(embed_dim, num_heads, deit=name.startswith("deit"))


@pytest.mark.parametrize("name, embed_dim, num_heads", [("convit_tiny", 192, 4), ("deit_tiny", 192, 3)])
def test_released_checkpoint_loads_strictly(tmp_path, name, embed_dim, num_heads):
    layout = released_layout(embed_dim, num_heads, deit=name.startswith("deit"))
    released = {key: torch.randn(shape) for key, shape in layout.items()}
    path = tmp_path / "released.pth"
    torch.save({"model": released}, path)  # the released files wrap the weights in "model"
    model = load_checkpoint(create_model(name), path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, released[key]), key


def test_released_files_load_into_the_default_gpsa_model_and_psa_has_their_layout_but_the_gates(tmp_path):
    """attention="gpsa" is the default, so the released files load as before (the test above); a
    PSA model has the very same names and shapes except the gates, and a released file refuses to
    load into it, naming them."""
    assert create_model("convit_tiny").cfg.attention == "gpsa"
    with torch.device("meta"):
        psa = create_model("convit_tiny", attention="psa")
    shapes = {key: tuple(value.shape) for key, value in psa.state_dict().items()}
    assert shapes == {key: shape for key, shape in released_layout().items() if not key.endswith("gating_param")}
    torch.save({"model": {key: torch.randn(shape) for key, shape in released_layout().items()}}, tmp_path / "r.pth")
    with pytest.raises(ValueError, match=r"\(192 wide, 4 heads, 10 PSA\): not in the model \(10\): "
                                         r"\['blocks.0.attn.gating_param'"):
        load_checkpoint(create_model("convit_tiny", attention="psa"), tmp_path / "r.pth")


def narrow(name="convit_tiny", **overrides):
    """A released geometry (224^2 in 16x16 patches: a 14x14 grid), made narrow and shallow."""
    layers = dict(depth=2, local_up_to_layer=1) if name.startswith("convit") else dict(depth=2)
    return create_model(name, **{"embed_dim": 24, **layers, **overrides})


def test_load_checkpoint_interpolates_pos_embed_and_resets_head(tmp_path, capsys):
    source = narrow()
    with torch.no_grad():
        source.pos_embed.fill_(0.25)  # a constant embedding stays constant under bicubic resizing
    path = tmp_path / "ours.pth"
    torch.save(source.state_dict(), path)

    for size in (384, 32):
        target = load_checkpoint(narrow(img_size=size, num_classes=10), path)
        patches = (size // 16) ** 2
        assert capsys.readouterr().out.splitlines() == [
            f"load_checkpoint: pos_embed interpolated from 14x14 to {size // 16}x{size // 16}",
            "load_checkpoint: head left newly initialised for 10 classes"]
        assert target.pos_embed.shape == (1, patches, 24)
        assert torch.allclose(target.pos_embed, torch.full_like(target.pos_embed, 0.25), atol=1e-6)
        assert target.head.weight.shape == (10, 24)
        assert torch.equal(target.blocks[0].attn.pos_proj.weight, source.blocks[0].attn.pos_proj.weight)
        assert target(torch.randn(1, 3, size, size)).shape == (1, 10)

    same = load_checkpoint(narrow(), path, verbose=False).eval()
    images = torch.randn(1, 3, 224, 224)
    assert torch.equal(same(images), source.eval()(images))


def test_deit_pos_embed_resizing_keeps_the_class_token_slot(tmp_path):
    source = narrow("deit_tiny")
    with torch.no_grad():
        source.pos_embed[:, 0].fill_(-3.0)  # the class token's position
        source.pos_embed[:, 1:].fill_(0.25)  # the 14 x 14 grid: constant, so resizing keeps it 0.25
    path = tmp_path / "deit.pth"
    torch.save({"model": source.state_dict()}, path)
    for size in (384, 32):
        target = load_checkpoint(narrow("deit_tiny", img_size=size, num_classes=10), path, verbose=False)
        assert target.pos_embed.shape == (1, 1 + (size // 16) ** 2, 24)
        assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])  # kept bit for bit
        assert torch.allclose(target.pos_embed[:, 1:], torch.full_like(target.pos_embed[:, 1:], 0.25), atol=1e-6)
        assert target(torch.randn(1, 3, size, size)).shape == (1, 10)
    # A DeiT checkpoint is no same-size baseline: the message names the class-token position and the biases.
    with pytest.raises(ValueError, match="covers a class token"):
        load_checkpoint(narrow(local_up_to_layer=0, num_heads=3, img_size=32), path)
    with pytest.raises(ValueError, match=r"not in the model \(2\): \['blocks\.0\.attn\.qkv\.bias'"):
        load_checkpoint(narrow(local_up_to_layer=0, num_heads=3, class_token_in_pos_embed=True), path)


def test_checkpoint_from_another_model_is_rejected(tmp_path, capsys):
    path = tmp_path / "small.pth"
    torch.save(small("convit_small", embed_dim=36).state_dict(), path)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qk\.weight: checkpoint \(72, 36\) vs model \(96, 48\)"):
        load_checkpoint(small(), path)
    # Checked before anything is said: no line about the grid or the head precedes the refusal.
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(small(img_size=64, num_classes=5), path)
    assert capsys.readouterr().out == ""


def test_class_token_joins_after_the_last_gpsa_block():
    model = small()
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    assert [m.shape[-1] for m in maps] == [64, 64, 64, 65]  # 3 GPSA on 8x8 patches, then MHSA with cls
    deit = small("deit_tiny", local_up_to_layer=0, num_heads=3)
    assert not deit.gpsa_layers() and deit.gates().shape == (0, 3)
    assert [m.shape[-1] for m in deit.attention_maps(torch.randn(2, 3, 32, 32))] == [65] * 4


def test_mean_pooled_model_has_no_class_token_and_may_be_all_gpsa():
    """global_pool="avg": the head reads the mean of the normed patch tokens; no class token
    joins anywhere, so every block may be GPSA and no block sees a token outside the grid."""
    images = torch.randn(2, 3, 32, 32)
    model = small(global_pool="avg", local_up_to_layer=4)  # all 4 blocks GPSA
    assert model.cls_token is None and "cls_token" not in model.state_dict()
    assert len(model.gpsa_layers()) == 4 and model.gates().shape == (4, 4)
    assert [m.shape[-1] for m in model.attention_maps(images)] == [64] * 4
    with torch.no_grad():
        x = model.embed(images)
        for block in model.blocks:
            x = block(x)
        expected = model.head(model.norm(x).mean(dim=1))
    assert torch.allclose(model(images), expected, atol=1e-6)
    model(images).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    mixed = small(global_pool="avg", local_up_to_layer=2)  # 2 GPSA, then 2 MHSA on the patches alone
    assert [m.shape[-1] for m in mixed.attention_maps(images)] == [64] * 4


def test_deit_class_token_joins_before_the_position_embedding():
    """DeiT adds its position embedding to the class token too (slot 0); the same-size
    baseline adds it to the patches only and joins the class token later, untouched."""
    images = torch.randn(2, 3, 32, 32)
    deit = small("deit_tiny", local_up_to_layer=0)
    tokens = deit.embed(images)  # (B, 1 + N, C)
    assert tokens.shape == (2, 65, 48)
    assert torch.equal(tokens[:, 0], (deit.cls_token + deit.pos_embed[:, :1]).expand(2, 1, 48)[:, 0])
    assert torch.equal(tokens[:, 1:], deit.patch_embed(images) + deit.pos_embed[:, 1:])
    baseline = small(local_up_to_layer=0)
    assert baseline.embed(images).shape == (2, 64, 48) and baseline.pos_embed.shape == (1, 64, 48)


def test_deit_nonlocality_counts_patches_only_with_the_class_token_first():
    rows, cols = 3, 4
    deit = small("deit_tiny", img_size=(12, 16), depth=2, local_up_to_layer=0)
    with torch.no_grad():
        for block in deit.blocks:
            block.attn.qkv.weight.zero_()  # queries and keys 0: uniform attention over 1 + N tokens
            block.attn.qkv.bias.zero_()
    points = list(itertools.product(range(rows), range(cols)))
    mean_distance = sum(math.dist(p, q) for p in points for q in points) / len(points) ** 2
    n = rows * cols
    nonlocality = deit.nonlocality(torch.randn(2, 3, 12, 16))  # the class token's 1/(1 + N) left out
    assert nonlocality.shape == (2, 3)  # 2 blocks, DeiT-Ti's 3 heads
    assert torch.allclose(nonlocality, torch.full((2, 3), mean_distance * n / (n + 1)), atol=1e-5)


def test_nonlocality_of_uniform_attention_is_the_mean_grid_distance():
    rows, cols = 3, 4
    model = small(img_size=(12, 16), depth=2, local_up_to_layer=1)
    layer = model.blocks[0].attn
    with torch.no_grad():
        layer.gating_param.fill_(-50.0)  # content attention only ...
        layer.qk.weight.zero_()  # ... and uniform: every key gets 1/N
    points = list(itertools.product(range(rows), range(cols)))
    mean_distance = sum(math.dist(p, q) for p in points for q in points) / len(points) ** 2
    nonlocality = model.nonlocality(torch.randn(2, 3, 12, 16))
    assert torch.allclose(nonlocality[0], torch.full((4,), mean_distance), atol=1e-5)


def test_nonlocality_of_sharp_kernel_heads_is_the_length_of_their_offsets():
    """A known attention map: 9 heads on a 3x3 kernel (Eq. 5), so sharp (alpha = 100) and so
    positional (sigma(lambda) = 1) that each query attends to one patch: its kernel offset, or
    where that falls off the 5x5 grid, the nearest patch on it. Eq. 8 is then the mean length of
    that offset: 0 for the centre head; 1 for (0, 1) except in the 5 queries of the far edge (0.8);
    sqrt(2) for (1, 1), 1 on the 8 edge queries where it slides along the edge, 0 in the corner."""
    model = small(img_size=20, depth=2, num_heads=9, embed_dim=72, local_up_to_layer=1, locality_strength=100.0)
    with torch.no_grad():
        model.blocks[0].attn.gating_param.fill_(50.0)
    nonlocality = model.nonlocality(torch.randn(2, 3, 20, 20))[0].sort().values
    expected = torch.tensor([0.0] + [0.8] * 4 + [(16 * math.sqrt(2) + 8) / 25] * 4)
    assert torch.allclose(nonlocality, expected, atol=1e-4), nonlocality


def test_inspection_uses_each_layers_real_input():
    model = perturbed(small()).eval()
    with torch.no_grad():
        for block in model.blocks[:2]:
            block.mlp.fc2.weight.normal_(std=0.5)  # blocks that change the residual stream a lot
        model.blocks[2].attn.qk.weight.normal_(std=0.5)  # content attention that depends on its input
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = model.embed(images)
        for block in model.blocks[:2]:
            x = block(x)
        third = model.blocks[2].attn
        expected = third.attention(model.blocks[2].norm1(x))
        buggy = third.attention(model.blocks[2].norm1(model.embed(images)))  # the released script's input
    maps = model.attention_maps(images)
    assert torch.allclose(maps[2], expected, atol=1e-6)
    assert (maps[2] - buggy).abs().max() > 1e-3


def test_gates_start_at_sigmoid_one():
    gates = create_model("convit_small", embed_dim=36, img_size=32).gates()  # 10 GPSA blocks of 9 heads
    assert gates.shape == (10, 9)
    assert torch.allclose(gates, torch.full((10, 9), 0.7311), atol=1e-4)


def test_rectangular_image():
    model = small(img_size=(24, 40), patch_size=8)  # a 3 x 5 grid
    assert model.cfg.grid == (3, 5)
    assert model.pos_embed.shape == (1, 15, 48)
    assert model(torch.randn(2, 3, 24, 40)).shape == (2, 10)
    assert model.nonlocality(torch.randn(2, 3, 24, 40)).shape == (4, 4)


# --- Bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("build, message", [
    (lambda: create_model("convit_tiny", img_size=225), "image 225x225 is not divisible by patch 16"),
    (lambda: create_model("convit_tinny"), "unknown model 'convit_tinny'"),
    (lambda: create_model("convit_tiny", embed_dim=90), "width 90 is not divisible by 4 heads"),
    (lambda: create_model("convit_tiny", local_up_to_layer=12), "local_up_to_layer=12 must lie in"),
    (lambda: create_model("deit_tiny", local_up_to_layer=2), "class_token_in_pos_embed=True needs local_up_to_layer=0"),
    (lambda: create_model("convit_tiny", global_pool="max"), "global_pool='max' must be 'token'"),
    (lambda: create_model("convit_tiny", global_pool="avg", local_up_to_layer=13), "local_up_to_layer=13 must lie in [0, depth=12]"),
    (lambda: create_model("deit_tiny", global_pool="avg"), "class_token_in_pos_embed=True needs global_pool='token'"),
    (lambda: create_model("convit_tiny", patch=16), "unknown option"),
    (lambda: create_model("convit_tiny", img_size="224"), "img_size='224' must be a whole number (a square image)"),
    (lambda: create_model("convit_tiny", img_size=224.0), "img_size=224.0 must be a whole number"),
    (lambda: create_model("convit_tiny", img_size=(224, 224, 3)), "img_size=(224, 224, 3) must be a whole number"),
])
def test_bad_configuration_raises(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 40, 32), "image 40x32 does not match the model's img_size 32x32"),
    ((1, 1, 32, 32), "image has 1 channels but the model expects in_chans=3"),
    ((3, 32, 32), r"expected a batch of images \(B, C, H, W\), got shape \(3, 32, 32\)"),
])
def test_bad_images_raise(shape, message):
    with pytest.raises(ValueError, match=message):
        small()(torch.randn(*shape))


@pytest.mark.parametrize("dtype, message", [
    (torch.uint8, "images are torch.uint8, but the model takes floating-point images"),
    (torch.float64, r"images are torch.float64, but the model's weights are torch.float32: pass images.to\(torch.float32\)"),
])
def test_images_of_another_dtype_say_what_to_pass(dtype, message):
    model = small()
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, 32, 32, dtype=dtype))
    assert model.double()(torch.zeros(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64  # agreeing: fine


def test_nonlocality_of_an_empty_batch_is_an_error_not_nan():
    with pytest.raises(ValueError, match="needs at least one image"):
        small().nonlocality(torch.zeros(0, 3, 32, 32))


def test_load_checkpoint_strips_the_prefixes_of_compile_and_ddp(tmp_path):
    source = small()
    compiled = torch.compile(source)  # compiles at its first call, so none happens here
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    for name, state in (("compiled", compiled.state_dict()),
                        ("ddp of compiled", {"module." + key: value for key, value in compiled.state_dict().items()})):
        torch.save({"model": state}, tmp_path / f"{name}.pth")
        loaded = load_checkpoint(small(), tmp_path / f"{name}.pth", verbose=False)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items()), name


def test_model_from_checkpoint_rebuilds_what_train_py_saved(tmp_path):
    """train.py stores the config as a plain dict beside the weights (test_train checks a real run's)."""
    source = perturbed(small(img_size=(32, 48), num_classes=7))
    cfg = dataclasses.asdict(source.cfg)
    torch.save({"cfg": cfg, "model": source.state_dict(), "epoch": 3}, tmp_path / "ours.pth")
    rebuilt = model_from_checkpoint(tmp_path / "ours.pth")
    assert rebuilt.cfg == source.cfg
    images = torch.randn(2, 3, 32, 48)
    assert torch.equal(rebuilt.eval()(images), source.eval()(images))
    # A config saved before DeiT's two fields existed takes their defaults, as it did then.
    old = {key: value for key, value in cfg.items() if key not in ("qkv_bias", "class_token_in_pos_embed")}
    torch.save({"cfg": old, "model": source.state_dict()}, tmp_path / "old.pth")
    assert model_from_checkpoint(tmp_path / "old.pth").cfg == source.cfg
    torch.save({"cfg": {**cfg, "wings": 2}, "model": source.state_dict()}, tmp_path / "future.pth")
    with pytest.raises(ValueError, match=r"config fields this convit.py does not know: \['wings'\]"):
        model_from_checkpoint(tmp_path / "future.pth")
    torch.save({"model": source.state_dict()}, tmp_path / "released.pth")
    with pytest.raises(ValueError, match=r"holds no model config .* load_checkpoint\(create_model\(name\), path\)"):
        model_from_checkpoint(tmp_path / "released.pth")


@pytest.mark.parametrize("name", ["convit_tiny", "deit_tiny"])
def test_masked_position_embedding_is_not_read(name):
    """Table 5 masks the absolute position embedding at test time: the masked model's output does
    not depend on pos_embed at all (NaN there changes nothing), and differs from the unmasked one."""
    torch.manual_seed(0)
    model = create_model(name, img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=5,
                         **({"local_up_to_layer": 1} if name.startswith("convit") else {})).eval()
    with torch.no_grad():
        model.pos_embed.normal_()  # a trained embedding is far from its init (std 0.02)
        images = torch.randn(4, 3, 16, 16)
        normal = model(images)
        masked = model.mask_pos_embed()(images)
        model.pos_embed.fill_(float("nan"))
        assert torch.equal(model(images), masked)
        assert not torch.allclose(normal, masked, atol=1e-3)
        assert torch.isnan(model.mask_pos_embed(False)(images)).all()  # unmasked, it reads pos_embed again


# --- PSA's inspection -----------------------------------------------------------------------
def test_psa_is_inspected_like_gpsa_and_has_no_gate():
    """With W_qry = W_key = 0 the content logits vanish: PSA's A is then softmax(v_pos . r), the
    positional attention P that GPSA reads alone when its content is masked (sigma forced to 1).
    So the two models, with the same weights, have the same attention maps and nonlocality."""
    psa = perturbed(small(attention="psa")).eval()
    gpsa = small().eval()
    gpsa.load_state_dict({**gpsa.state_dict(), **psa.state_dict()})  # all but the gates
    with torch.no_grad():
        for layer in psa.positional_layers() + gpsa.positional_layers():
            layer.qk.weight.zero_()
        for layer in gpsa.gpsa_layers():
            layer.gating_param.fill_(float("inf"))  # sigma = 1.0 exactly: P alone
    images = torch.randn(2, 3, 32, 32)
    assert psa.gates().shape == (0, 4) and gpsa.gates().shape == (3, 4)  # PSA: no gate at all
    maps = psa.attention_maps(images)
    for psa_map, gpsa_map in zip(maps[:3], gpsa.attention_maps(images)[:3]):
        assert torch.allclose(psa_map, gpsa_map, atol=1e-6)
        assert torch.allclose(psa_map.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(psa.nonlocality(images)[:3], gpsa.nonlocality(images)[:3], atol=1e-5)
    assert (psa.nonlocality(images)[0] - small().nonlocality(images)[0]).abs().max() > 0.1  # and v_pos counts
