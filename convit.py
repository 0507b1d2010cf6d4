"""ConViT, built from first principles.

Paper: d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun,
"ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
ICML 2021, arXiv:2103.10697 (equation numbers are those of arXiv v2).

The idea in one paragraph. A self-attention head whose attention depends only on the
*relative* position of key and query, and peaks sharply at one offset Delta, copies the
patch at that offset. With k*k heads looking at the k*k offsets of a kernel, one
multi-head layer is exactly a k x k convolution (Eq. 4-5). ConViT starts its first ten
layers in that state (gated positional self-attention, GPSA, Eq. 6-7) and gives every
head a learned gate sigma(lambda) that mixes this positional attention with ordinary
content attention. Training then decides, head by head, how far to escape locality: in the
paper (Fig. 5/6) the nonlocality grows in every GPSA layer, most in the first and the last
(the intermediate ones, the second above all, stay more local), and the gates of the later
GPSA layers (6-10) fall to about 0, content attention, while the early ones keep a sizeable
positional share.

Legend of dimension letters used in the shape comments and einops patterns:
    B  batch                      N  patches (tokens) = rows * cols
    H  heads                      D  head dimension = C / H
    C  embedding dimension        i, j  query and key token index

Contents, in file order (nothing is used before it is defined):
    ConViTConfig, MODEL_PRESETS   one config dataclass and the table of Table 1's models (ConViT, DeiT)
    relative_positions            r_ij for a rows x cols patch grid (Eq. 4)
    kernel_centres                which offset Delta_h each head looks at (Eq. 5), and its inverse head_looking_at
    content_attention             softmax(QK^T / sqrt(D)), Eq. 1's attention matrix
    PatchEmbed                    image -> patch tokens
    GPSA                          gated positional self-attention (Eq. 6-7)
    PSA                           plain positional self-attention (Eq. 4), no gate: SM A's ablation
    MHSA                          plain multi-head self-attention (Eq. 1)
    MLP, DropPath, Block          the rest of a pre-norm transformer block
    ConViT                        the network, plus inspection (gates, Eq. 8 nonlocality)
    create_model                  building a model of Table 1 by name
    fit_pos_embed, load_state     fitting released weights onto a model (pos_embed resized, a new head)
    count_parameters, explicit_twin   small utilities
Reading .pth files (safely: no code runs) is checkpoints.py's; timing and Table 1 are bench.py's.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------
def is_whole(value) -> bool:
    """An int (Python's or numpy's), and not a bool, which Python counts as an int."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass
class ConViTConfig:
    img_size: int | tuple[int, int] = 224  # input height and width (an int means square)
    patch_size: int = 16  # side of the square patches; the grid is img_size / patch_size
    in_chans: int = 3  # colour channels of the input image
    num_classes: int = 1000  # outputs of the classifier head (0 = no head, return features)
    embed_dim: int = 192  # C, the width of every token
    depth: int = 12  # number of transformer blocks
    num_heads: int = 4  # H, attention heads in every block (k*k heads mimic a k x k kernel)
    mlp_ratio: float = 4.0  # hidden width of the MLP is mlp_ratio * C
    local_up_to_layer: int = 10  # the first blocks that are GPSA; 0 = no GPSA (the same-size baseline)
    attention: str = "gpsa"  # what those blocks are: "gpsa" (Eq. 6-7) or "psa", plain PSA (Eq. 4, no gate: SM A)
    locality_strength: float = 1.0  # alpha of Eq. 5: larger means a sharper initial kernel
    use_local_init: bool = True  # the convolutional initialisation of Eq. 5 (Table 3 "conv init")
    use_pos_embed: bool = True  # learned absolute position embedding on the patch tokens
    # DeiT's own network differs from a ConViT with no GPSA block in exactly these two fields:
    qkv_bias: bool = False  # a bias on MHSA's W_qry, W_key, W_val (DeiT: yes; ConViT's blocks have none)
    class_token_in_pos_embed: bool = False  # DeiT: pos_embed is (1, 1 + N, C), the class token joins before block 1
    # What the head reads: "token", the class token (the paper's), or "avg", the mean of the patch tokens, with no
    # class token at all; then every block may be GPSA, and no block after them sees the whole image for free.
    global_pool: str = "token"
    drop_rate: float = 0.0  # dropout on the embeddings and after each projection
    attn_drop_rate: float = 0.0  # dropout on the attention matrix
    drop_path_rate: float = 0.0  # stochastic depth, rising linearly to this value in the last block
    fused: bool = True  # fast attention (fused kernels); False runs the readable explicit path

    def __post_init__(self):
        # Sizes first, each named: a negative width would otherwise surface as torch's own error
        # deep inside nn.Linear, and depth=0 as a complaint about local_up_to_layer.
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if not is_whole(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
        if not is_whole(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be a whole number (0 = no head)")
        if not self.mlp_ratio > 0 or not math.isfinite(self.mlp_ratio):
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be a positive number")
        if self.attention not in ("gpsa", "psa"):
            raise ValueError(f"attention={self.attention!r} must be 'gpsa' (gated, Eq. 6-7) or 'psa' (Eq. 4)")
        if not math.isfinite(self.locality_strength):
            raise ValueError(f"locality_strength={self.locality_strength!r} must be a finite number")
        # "224" or 224.0 would otherwise reach int() or iteration and fail far from the cause.
        size = (self.img_size, self.img_size) if is_whole(self.img_size) else self.img_size
        if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(map(is_whole, size)):
            raise ValueError(f"img_size={self.img_size!r} must be a whole number (a square image) or a pair "
                             f"(height, width) of whole numbers, e.g. img_size=224 or img_size=(224, 320)")
        self.img_size = (int(size[0]), int(size[1]))
        h, w, p = *self.img_size, self.patch_size
        if h < 1 or w < 1:
            raise ValueError(f"img_size={self.img_size} must be at least 1 in each direction")
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not divisible by patch {p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"width {self.embed_dim} is not divisible by {self.num_heads} heads "
                f"(each head needs a whole head dimension D = C / H)"
            )
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={self.global_pool!r} must be 'token' (the class token) or 'avg' "
                             f"(the mean of the patch tokens)")
        if self.global_pool == "avg" and not 0 <= self.local_up_to_layer <= self.depth:
            raise ValueError(f"local_up_to_layer={self.local_up_to_layer} must lie in [0, depth={self.depth}]")
        if self.global_pool == "token" and not 0 <= self.local_up_to_layer < self.depth:
            raise ValueError(
                f"local_up_to_layer={self.local_up_to_layer} must lie in [0, depth={self.depth}): "
                f"the class token joins after the last GPSA block, so at least one MHSA block must follow "
                f"(global_pool='avg' has no class token and allows every block to be GPSA)"
            )
        if self.class_token_in_pos_embed and self.global_pool != "token":
            raise ValueError(f"class_token_in_pos_embed=True needs global_pool='token', got {self.global_pool!r}: "
                             f"there is no class token to give a position to")
        if self.class_token_in_pos_embed and self.local_up_to_layer > 0:
            raise ValueError(
                f"class_token_in_pos_embed=True needs local_up_to_layer=0, got {self.local_up_to_layer}: "
                f"GPSA sees patches only, so the class token cannot join before the first block"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1)")

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size


# The rows of Table 1, as a table of ConViTConfig fields. Two architectures:
# - ConViT: the first 10 of 12 blocks are GPSA; the class token joins after them; qkv has no bias.
# - DeiT's own network (the paper's baselines): no GPSA block, qkv with a bias, and a position
#   embedding that also covers the class token, which joins before the first block.
# ConViT keeps C = 48 per head (64 for the "+" models) and uses k*k heads to mimic a k x k kernel;
# each DeiT row has its own head count, as in the paper. (The *same-size baseline* of our speed
# comparisons and ablations is neither: create_model("convit_tiny", local_up_to_layer=0), a ConViT
# with no GPSA block, which differs from the ConViT only where GPSA does.)
ARCHITECTURES: dict[str, dict] = {
    "convit": {"local_up_to_layer": 10},
    "deit": {"local_up_to_layer": 0, "qkv_bias": True, "class_token_in_pos_embed": True},
}
TABLE1_MODELS: dict[str, tuple[str, int, int]] = {  # name: (architecture, embed_dim C, num_heads H)
    "convit_tiny": ("convit", 192, 4),
    "convit_tiny_plus": ("convit", 256, 4),
    "convit_small": ("convit", 432, 9),
    "convit_small_plus": ("convit", 576, 9),
    "convit_base": ("convit", 768, 16),
    "convit_base_plus": ("convit", 1024, 16),
    "deit_tiny": ("deit", 192, 3),
    "deit_tiny_plus": ("deit", 256, 4),
    "deit_small": ("deit", 384, 6),
    "deit_small_plus": ("deit", 576, 9),
    "deit_base": ("deit", 768, 12),
    "deit_base_plus": ("deit", 1024, 16),
}
MODEL_PRESETS: dict[str, dict] = {  # name: the ConViTConfig fields that make it
    name: dict(embed_dim=embed_dim, num_heads=num_heads, **ARCHITECTURES[architecture])
    for name, (architecture, embed_dim, num_heads) in TABLE1_MODELS.items()
}


# ---------------------------------------------------------------------------------------
# Geometry: relative positions and kernel centres
# ---------------------------------------------------------------------------------------
def relative_positions(rows: int, cols: int) -> torch.Tensor:
    """The fixed relative encoding r_ij of Eq. 4, for every query i and key j of the grid.

    delta_ij = position(key j) - position(query i) in patch units, and
    r_ij = (delta_x, delta_y, ||delta||^2) with x the column offset and y the row offset.
    The paper writes r in the order (||delta||^2, delta_1, delta_2); the released
    checkpoints use the order above, which fixes the layout of `pos_proj.weight`.
    Works for any grid, square or not. Returns (N, N, 3), N = rows * cols, raster order.
    """
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    position = torch.stack([x.flatten(), y.flatten()], dim=-1).float()  # (N, 2) as (x, y)
    delta = rearrange(position, "j xy -> 1 j xy") - rearrange(position, "i xy -> i 1 xy")  # (N, N, 2)
    squared_distance = (delta**2).sum(-1, keepdim=True)  # (N, N, 1)
    return torch.cat([delta, squared_distance], dim=-1)  # (N, N, 3)


def kernel_centres(num_heads: int) -> torch.Tensor:
    """The offset Delta_h = (Delta_x, Delta_y) that head h attends to at init (Eq. 5).

    With H = k*k heads the centres tile a k x k kernel around the query: integer offsets
    {-(k-1)/2 .. (k-1)/2}^2 for odd k (9 heads -> 3x3), half-integer offsets for even k
    (4 heads -> {-0.5, 0.5}^2), in the released order: head = a + k*b with
    Delta_y = a - c and Delta_x = b - c, c = (k-1)/2 the centre.

    Our rule for other head counts (the released code leaves those heads random): take
    k = ceil(sqrt(H)) and give the H heads the H kernel offsets nearest the centre, ties
    broken by the released order, and keep the released order among the chosen ones.
    So every head has its own local centre: 5 heads form a plus sign, 12 heads the 4x4
    kernel without its corners, 6 heads the plus sign and one corner. Returns (H, 2).
    """
    k = math.ceil(math.sqrt(num_heads))
    c = (k - 1) / 2
    candidates = [(b - c, a - c) for b in range(k) for a in range(k)]  # index a + k*b, as (dx, dy)
    nearest = sorted(range(k * k), key=lambda idx: candidates[idx][0] ** 2 + candidates[idx][1] ** 2)
    chosen = sorted(nearest[:num_heads])  # stable sort kept released order among ties
    return torch.tensor([candidates[idx] for idx in chosen])  # (H, 2)


def head_looking_at(num_heads: int, dx: float, dy: float) -> int:
    """The head whose kernel centre Delta_h (kernel_centres) is the offset (dx, dy)."""
    matches = (kernel_centres(num_heads) == torch.tensor([dx, dy])).all(dim=1)
    return int(matches.nonzero())


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def content_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. 1's attention matrix softmax_j(Q_i K_j^T / sqrt(D)), explicitly: (B, H, N, N), fp32.

    Under autocast the scores come out of the matrix product in bf16/fp16; the softmax runs
    in fp32, as it does inside the fused kernel (scaled_dot_product_attention), so that the
    explicit and fused paths round alike and the rows of A sum to 1 to fp32 precision."""
    scores = einsum(q, k, "b h i d, b h j d -> b h i j") / math.sqrt(q.shape[-1])
    return scores.float().softmax(dim=-1)


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping p x p patches and project each to C dims.

    A p x p convolution with stride p is exactly "flatten every patch, apply one linear map".
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.proj(images)  # (B, C, rows, cols)
        # rearrange only relabels strides; without the copy the tokens would stay channel-first
        # in memory through every GPSA block, and each matrix product would copy them again.
        return rearrange(patches, "b c rows cols -> b (rows cols) c").contiguous()  # (B, N, C)


class GPSA(nn.Module):
    """Gated positional self-attention, Eq. 6-7. For each head h:

        A^h_ij = (1 - sigma(lambda_h)) softmax_j(Q^h_i K^h_j^T / sqrt(D))
                 +     sigma(lambda_h)  softmax_j(v_pos^h^T r_ij)
        GPSA_h(X) = normalize(A^h) X W_val^h

    The first term is content attention, as in any transformer. The second (positional
    self-attention, Eq. 4) looks only at where key j sits relative to query i: r_ij is a
    fixed encoding (`relative_positions`) and v_pos^h a learned 3-vector per head (the rows
    of `pos_proj.weight`). The gate lambda_h (`gating_param`) starts at 1, so sigma = 0.73
    and the positional, convolution-like term dominates at init.

    Two paths compute the same output (tests prove them equal to 1e-5 in fp32, and within
    16 roundings of bf16 or fp16 under autocast, test_precision.py):
    - `attention()` + `forward_explicit()`: the readable path. It builds the B x H x N x N
      matrix A of Eq. 7 and multiplies. Read this one first; inspection uses it.
    - `forward_fused()`: the fast default, built on two exact identities.
      (a) The mix is convex and P = softmax(v_pos^T r) does not depend on the input, so
              A V = (1 - g) softmax(QK^T / sqrt(D)) V + g P V:
          the content term runs in torch's fused scaled_dot_product_attention, which never
          stores an N x N matrix.
      (b) P factorises over rows and columns. Since ||delta||^2 = delta_x^2 + delta_y^2,
              exp(v_pos . r_ij) = exp(w_x dx + w_d dx^2) * exp(w_y dy + w_d dy^2),
          and the softmax's normaliser (a sum over key rows times key columns) splits the
          same way. So P = P_rows (x) P_cols, a Kronecker product of a rows x rows and a
          cols x cols matrix per head, and P V is two 1-D mixes: along each row, then along
          each column. That costs N (rows + cols) instead of N^2 per channel: 7x fewer at 14 x 14.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        locality_strength: float = 1.0,
        use_local_init: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.locality_strength = locality_strength  # alpha
        self.fused = fused
        # Released names: qk and v are separate (no bias) so that v can start as the identity.
        self.qk = nn.Linear(dim, 2 * dim, bias=False)  # W_qry and W_key side by side
        self.v = nn.Linear(dim, dim, bias=False)  # W_val
        self.proj = nn.Linear(dim, dim)  # W_out, mixes the heads back together
        self.pos_proj = nn.Linear(3, num_heads)  # row h is v_pos^h; its bias cancels in the softmax
        self.gating_param = nn.Parameter(torch.ones(num_heads))  # lambda_h, initialised to 1
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        # r_ij never changes, so it is computed once and kept out of the state dict.
        self.grid = grid  # (rows, cols)
        self.register_buffer("rel_pos", relative_positions(*grid), persistent=False)  # (N, N, 3)
        # r_ij within one column of the grid, (0, dy, dy^2), and within one row, (dx, 0, dx^2):
        # the factors of P on the fast path (identity b below).
        self.register_buffer("column_rel_pos", relative_positions(grid[0], 1), persistent=False)  # (rows, rows, 3)
        self.register_buffer("row_rel_pos", relative_positions(1, grid[1]), persistent=False)  # (cols, cols, 3)
        self.use_local_init = use_local_init

    @torch.no_grad()
    def local_init(self):
        """Eq. 5: make every head a sharp bump on its own kernel offset, and W_val = I.

        v_pos^h . r_delta with v_pos^h = alpha (2 Delta_x, 2 Delta_y, -1) equals
        -alpha ||delta - Delta^h||^2 + alpha ||Delta^h||^2: the constant cancels in the
        softmax, leaving a Gaussian-like bump of width ~1/sqrt(alpha) centred on Delta^h.
        W_val = I so that, head by head, the layer copies the patch it attends to; W_out then
        plays the role of the convolution's weights (see test_gpsa_reduces_to_convolution).
        """
        self.v.weight.copy_(torch.eye(self.v.weight.shape[0]))
        centres = kernel_centres(self.num_heads)  # (H, 2) as (Delta_x, Delta_y)
        minus_one = -torch.ones(self.num_heads, 1)
        self.pos_proj.weight.copy_(self.locality_strength * torch.cat([2 * centres, minus_one], dim=1))
        self.pos_proj.bias.zero_()

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gating_param)  # sigma(lambda_h), (H,)

    def position_attention(self, rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        """softmax_j(v_pos^h . r_ij + bias_h), Eq. 4's positional attention, for the relative
        positions `rel_pos` (default: the whole grid, which gives the (H, N, N) matrix P of
        Eq. 7). It is the same for every image. The bias is constant along j: the softmax
        removes it, but it stays in the graph, so that its gradient is exactly what it is
        (zero, up to rounding) on both paths.

        Always computed in fp32, under autocast too. At init the scores are
        -alpha ||delta - Delta_h||^2 + const, some alpha (rows^2 + cols^2) in size (over 300 on a
        14 x 14 grid). bf16 keeps 8 significant bits: it rounds a score near 128 to a whole
        number, up to 0.5 off, which changes its exponential by up to a factor e^0.5 = 1.6."""
        rel_pos = self.rel_pos if rel_pos is None else rel_pos  # (I, J, 3)
        with torch.autocast(rel_pos.device.type, enabled=False):
            scores = F.linear(rel_pos.float(), self.pos_proj.weight.float(), self.pos_proj.bias.float())  # (I, J, H)
            return rearrange(scores.softmax(dim=1), "i j h -> h i j")  # (H, I, J)

    def position_attention_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_rows (H, rows, rows) and P_cols (H, cols, cols) with P = P_rows (x) P_cols, identity (b):
        the positional attention within one column of the grid (keys above and below the query,
        r = (0, dy, dy^2)) and within one row (r = (dx, 0, dx^2)). fp32, like P."""
        return self.position_attention(self.column_rel_pos), self.position_attention(self.row_rel_pos)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit gated attention matrix A of Eq. 7, (B, H, N, N), fp32. Rows sum to 1."""
        q, k = rearrange(self.qk(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        content_attn = content_attention(q, k)  # (B, H, N, N), fp32
        position_attn = self.position_attention()  # (H, N, N), fp32
        gate = rearrange(self.gate(), "h -> 1 h 1 1")
        attn = (1 - gate) * content_attn + gate * position_attn  # (B, H, N, N)
        # "normalize" of Eq. 7: a convex mix of two row-stochastic matrices already sums to 1,
        # so this division changes nothing but rounding. Kept here because the paper has it,
        # and kept in fp32: in bf16 each entry would be rounded (by up to 2^-8 of itself) and
        # the division would add that error instead of removing it.
        return attn / attn.sum(dim=-1, keepdim=True)

    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn_drop(self.attention(x))  # (B, H, N, N), fp32
        v = rearrange(self.v(x), "b n (h d) -> b h n d", h=self.num_heads)  # bf16/fp16 under autocast
        out = einsum(attn.to(v.dtype), v, "b h i j, b h j d -> b h i d")  # cast once, at the boundary
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        # The same maths as forward_explicit, rearranged for speed (identities a and b of the
        # class docstring). Beyond plain attention it adds steps 3 and 4: memory-bound work, 1% of
        # the layer's multiply-adds, that reads and writes B x N x C numbers a few times
        # (docs/speed.md: what it costs, and the layouts that ran slower).
        # 1. W_qry, W_key and W_val in one matrix product (stacked as the checkpoint stores them).
        qkv = F.linear(x, torch.cat([self.qk.weight, self.v.weight]))  # (B, N, 3C)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        # 2. Content term: softmax(QK^T / sqrt(D)) V in one fused kernel; no N x N matrix is kept.
        content_out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        # 3. Positional term P V, as two 1-D mixes (identity b): along each row of the
        #    grid with P_cols, then along each column with P_rows. The factors are fp32; under
        #    autocast they are cast once to V's dtype, so that no product sees two dtypes.
        p_rows, p_cols = (p.to(v.dtype) for p in self.position_attention_factors())
        #    V is copied once, into a contiguous head-major grid; then both mixes are plain
        #    matrix products that broadcast each head's factor over the batch (and the rows),
        #    read V where it lies and write their result in place of the next one's input.
        v_grid = rearrange(v, "b h (r c) d -> b h r c d", r=self.grid[0]).contiguous()
        mixed_in_rows = p_cols[:, None] @ v_grid  # (H, 1, c, c2) @ (B, H, r, c2, D) -> (B, H, r, c, D)
        mixed_in_rows = rearrange(mixed_in_rows, "b h r c d -> b h r (c d)")  # a view: c and D stay together
        position_out = p_rows @ mixed_in_rows  # (H, r, r2) @ (B, H, r2, c D) -> (B, H, r, c D)
        position_out = rearrange(position_out, "b h r (c d) -> b h (r c) d", d=v.shape[-1])  # (B, H, N, D)
        # 4. The gate: lerp(a, b, g) = (1 - g) a + g b, Eq. 7 applied to the outputs, not to A.
        #    sigma(lambda) is computed in fp32 and cast like the factors: lerp wants one dtype.
        gate = rearrange(self.gate(), "h -> h 1 1").to(content_out.dtype)
        out = torch.lerp(content_out, position_out, gate)  # (B, H, N, D)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Attention dropout acts on the *mixed* matrix A (as in the paper's code). The fused
        # path never forms A, so in training with attn_drop > 0 we take the explicit path:
        # same maths, same dropout, only slower. The DeiT recipe uses attn_drop = 0.
        dropping = self.training and self.attn_drop.p > 0
        return self.forward_fused(x) if self.fused and not dropping else self.forward_explicit(x)


class PSA(nn.Module):
    """Positional self-attention, Eq. 4: the layer that GPSA's gate replaces (SM A, Fig. 9). Per head h:

        A^h_ij = softmax_j(Q^h_i K^h_j^T / sqrt(D) + v_pos^h . r_ij)
        PSA_h(X) = A^h X W_val^h

    Content and position logits are summed before one softmax, so neither can be switched off.
    With the conv init the positional logits span some alpha (rows^2 + cols^2) along a row, the
    content logits at init about 0.1: the layer starts as GPSA does, as a convolution, and the
    paper finds that it "stays in the convolutional configuration and ignores the content
    information". GPSA instead mixes two separate softmaxes with a learned gate (Eq. 6-7).
    Eq. 4 writes Q K^T without the 1 / sqrt(D); we keep it, as in GPSA's content term, so that
    the two layers differ only in how position enters.

    The same parameters, names and conv init (Eq. 5, W_val = I) as GPSA, without the gate: a
    released GPSA checkpoint minus its gating_param fits. Two paths, proven equal in outputs and
    gradients (test_psa_fused_and_explicit_paths_agree): `attention()` + `forward_explicit()`,
    the readable one, read it first; `forward_fused()`, where the positional logits are exactly
    the additive attn_mask of torch's fused scaled_dot_product_attention.
    """

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], locality_strength: float = 1.0,
                 use_local_init: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.locality_strength = locality_strength  # alpha
        self.use_local_init = use_local_init
        self.fused = fused
        self.qk = nn.Linear(dim, 2 * dim, bias=False)  # W_qry and W_key side by side, as in GPSA
        self.v = nn.Linear(dim, dim, bias=False)  # W_val
        self.proj = nn.Linear(dim, dim)  # W_out
        self.pos_proj = nn.Linear(3, num_heads)  # row h is v_pos^h; its bias cancels in the softmax
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("rel_pos", relative_positions(*grid), persistent=False)  # r_ij, (N, N, 3)

    local_init = GPSA.local_init  # Eq. 5 and W_val = I, GPSA's very code: the same names and shapes
    forward_explicit = GPSA.forward_explicit  # A X W_val, then W_out: only A differs from GPSA's

    def position_scores(self) -> torch.Tensor:
        """Eq. 4's positional logits v_pos^h . r_ij + bias_h, (H, N, N), the same for every image;
        fp32 under autocast too, as GPSA's (GPSA.position_attention says why)."""
        with torch.autocast(self.rel_pos.device.type, enabled=False):
            scores = F.linear(self.rel_pos.float(), self.pos_proj.weight.float(), self.pos_proj.bias.float())
        return rearrange(scores, "i j h -> h i j")  # (H, N, N)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit attention matrix A of Eq. 4, (B, H, N, N), fp32. Rows sum to 1."""
        q, k = rearrange(self.qk(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        content_scores = einsum(q, k, "b h i d, b h j d -> b h i j") / math.sqrt(q.shape[-1])  # (B, H, N, N)
        return (content_scores.float() + self.position_scores()).softmax(dim=-1)  # one softmax for both

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        q, k = rearrange(self.qk(x), "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        v = rearrange(self.v(x), "b n (h d) -> b h n d", h=self.num_heads)
        # attn_mask is added to QK^T / sqrt(D) before the softmax: Eq. 4 exactly. Each row's largest
        # logit is subtracted first, a constant along j that the softmax removes: under autocast the
        # mask takes Q's dtype, and the logits that matter (those near the largest) then sit near 0,
        # where bf16 and fp16 hold them finely, rather than near alpha ||Delta_h||^2 + bias, which
        # training may take far from 0 (at 100, bf16's spacing is 0.5: a factor e^0.25 on A).
        scores = self.position_scores()  # (H, N, N), fp32
        mask = (scores - scores.amax(dim=-1, keepdim=True).detach()).to(q.dtype)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, N, D)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(x) if self.fused else self.forward_explicit(x)


class MHSA(nn.Module):
    """Multi-head self-attention, Eq. 1: SA(X) = softmax(Q K^T / sqrt(D)) X W_val, per head.

    Used by the last blocks of ConViT (after the class token joins) and by every block of
    DeiT (whose qkv has a bias: qkv_bias=True). The fused path is torch's scaled_dot_product_attention, which applies attention
    dropout itself (dropout_p) in training; `attention()` is the readable explicit matrix.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True,
                 qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # W_qry, W_key, W_val side by side
        self.proj = nn.Linear(dim, dim)  # W_out
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def queries_keys_values(self, x: torch.Tensor):
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.queries_keys_values(x)
        return content_attention(q, k)  # (B, H, N, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.queries_keys_values(x)  # each (B, H, N, D)
        if self.fused:
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, H, N, D)
        else:
            attn = self.attn_drop(content_attention(q, k))  # (B, H, N, N), fp32
            out = einsum(attn.to(v.dtype), v, "b h i j, b h j d -> b h i d")
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class MLP(nn.Module):
    """The position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: in training, skip a residual branch for a random subset of images,
    and scale the kept ones by 1 / keep_prob so that the expected output is unchanged."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep_prob)  # one coin per image
        return x * keep / keep_prob


class Block(nn.Module):
    """A pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    The attention is GPSA (or PSA, cfg.attention) in the first `local_up_to_layer` blocks and
    MHSA after them.
    """

    def __init__(self, cfg: ConViTConfig, positional: bool, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if positional:
            attention = {"gpsa": GPSA, "psa": PSA}[cfg.attention]
            self.attn = attention(
                dim, cfg.num_heads, cfg.grid, cfg.locality_strength, cfg.use_local_init,
                cfg.attn_drop_rate, cfg.drop_rate, cfg.fused,
            )
        else:
            self.attn = MHSA(dim, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate, cfg.fused, cfg.qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------
class ConViT(nn.Module):
    """ConViT: a DeiT backbone whose first blocks are GPSA. Also DeiT's own network (the
    deit_* presets), the same-size baseline (local_up_to_layer = 0), see MODEL_PRESETS, and
    SM A's PSA model (attention="psa": the first blocks are PSA, with no gate).

    Data flow: image -> patch tokens + absolute position embedding -> GPSA blocks on the
    patches only -> the class token joins -> MHSA blocks -> LayerNorm -> head on the class
    token. GPSA sees patches only because its relative geometry r_ij has no place for a
    class token; with no GPSA block the class token is present from the first block.
    DeiT differs in one more place (class_token_in_pos_embed): its class token joins *before*
    the position embedding is added, so that it gets a learned position of its own.
    With global_pool="avg" there is no class token: the head reads the mean of the patch
    tokens after the final LayerNorm, and every block may be GPSA.
    """

    def __init__(self, cfg: ConViTConfig):
        super().__init__()
        self.cfg = cfg
        rows, cols = cfg.grid
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.global_pool == "token" else None
        positions = int(cfg.class_token_in_pos_embed) + rows * cols  # DeiT: the class token's slot comes first
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, dim)) if cfg.use_pos_embed else None
        self.pos_embed_masked = False  # mask_pos_embed: evaluate without it (Table 5)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        drop_paths = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # rises linearly
        self.blocks = nn.ModuleList(
            Block(cfg, positional=i < cfg.local_up_to_layer, drop_path=drop_paths[i]) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # ||delta_ij|| between patches, for the nonlocality of Eq. 8 (also in MHSA blocks).
        distances = relative_positions(rows, cols)[..., 2].sqrt()  # (N, N)
        self.register_buffer("patch_distances", distances, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """DeiT's initialisation (truncated normal, std 0.02), then Eq. 5 on every GPSA or PSA layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in self.positional_layers():
            if layer.use_local_init:
                layer.local_init()
        for layer in self.gpsa_layers():
            layer.gating_param.fill_(1.0)

    def positional_layers(self) -> list[GPSA | PSA]:
        """The attention of the first local_up_to_layer blocks: GPSA, or PSA with attention="psa"."""
        return [block.attn for block in self.blocks[: self.cfg.local_up_to_layer]]

    def gpsa_layers(self) -> list[GPSA]:
        """The GPSA layers, the ones with gates (none in DeiT, nor in a PSA model)."""
        return [layer for layer in self.positional_layers() if isinstance(layer, GPSA)]

    def set_fused(self, fused: bool) -> ConViT:
        """Switch every attention layer between the fused and the explicit path."""
        for block in self.blocks:
            block.attn.fused = fused
        self.cfg = replace(self.cfg, fused=fused)
        return self

    def mask_pos_embed(self, masked: bool = True) -> ConViT:
        """Leave the absolute position embedding out of the forward pass (Table 5: "positional
        embeddings masked off at test time"): the weights stay, only `embed` stops adding them.
        GPSA still knows where each patch sits relative to the others, through r_ij."""
        self.pos_embed_masked = masked
        return self

    def check_input(self, images: torch.Tensor):
        cfg = self.cfg
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != cfg.in_chans:
            raise ValueError(f"image has {images.shape[1]} channels but the model expects in_chans={cfg.in_chans}")
        if tuple(images.shape[2:]) != cfg.img_size:
            (h, w), (mh, mw) = images.shape[2:], cfg.img_size
            raise ValueError(
                f"image {h}x{w} does not match the model's img_size {mh}x{mw}; "
                f"build the model with img_size=({h}, {w}) (load_checkpoint interpolates pos_embed)"
            )
        if not images.is_floating_point():
            raise ValueError(f"images are {images.dtype}, but the model takes floating-point images, normalised "
                             f"as in training: e.g. images.float() / 255, then minus the mean, over the std")
        weights = self.patch_embed.proj.weight.dtype
        # Under autocast torch casts both to one dtype itself; otherwise they must already agree.
        if images.dtype != weights and not torch.is_autocast_enabled(images.device.type):
            raise ValueError(f"images are {images.dtype}, but the model's weights are {weights}: "
                             f"pass images.to({weights})")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens plus the absolute position embedding: (B, N, C), or for DeiT, whose
        class token joins here and takes the embedding's first slot, (B, 1 + N, C)."""
        self.check_input(images)
        x = self.patch_embed(images)  # (B, N, C)
        if self.cfg.class_token_in_pos_embed:
            x = self.join_class_token(x)  # (B, 1 + N, C)
        if self.pos_embed is not None and not self.pos_embed_masked:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def join_class_token(self, x: torch.Tensor) -> torch.Tensor:
        # expand, not einops' repeat: einops registers each tensor type the first time it sees
        # one, and torch.compile guards on that registry; its first nn.Parameter seen inside a
        # compiled call would force a second compilation of the whole model.
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C), one token shared by the batch
        return torch.cat([cls, x], dim=1)  # (B, 1 + N, C)

    def class_token_joins_before(self, i: int) -> bool:
        """Whether the class token joins just before block i: after the last GPSA block (at
        once with no GPSA block), unless it already joined in embed() (DeiT) or there is none
        (global_pool="avg")."""
        cfg = self.cfg
        return cfg.global_pool == "token" and i == cfg.local_up_to_layer and not cfg.class_token_in_pos_embed

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)  # (B, N, C); DeiT (B, 1 + N, C)
        for i, block in enumerate(self.blocks):
            if self.class_token_joins_before(i):
                x = self.join_class_token(x)  # (B, 1 + N, C)
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cfg.global_pool == "token" else x.mean(dim=1)  # the class token or the mean, (B, C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))  # (B, num_classes)

    # --- inspection: what the paper plots -------------------------------------------------
    def gates(self) -> torch.Tensor:
        """sigma(lambda) of every GPSA layer and head, (n_gpsa, H), fp32: 1 = positional, 0 = content.
        A model without GPSA layers (DeiT, or PSA's, which has no gate) gives (0, H): no gate at all.
        Tab. 6's masks (probes.py) show here as gates of exactly 1 or 0 while they last."""
        if not self.gpsa_layers():
            return torch.empty(0, self.cfg.num_heads)
        return torch.stack([layer.gate().detach().float().cpu() for layer in self.gpsa_layers()])

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The explicit attention matrix of every block, each computed on that block's real
        input (the released script fed the patch embeddings to every layer; we do not).
        GPSA blocks give (B, H, N, N); MHSA blocks (B, H, 1 + N, 1 + N), class token first
        ((B, H, N, N) with global_pool="avg", which has no class token).
        A measurement, so it runs in fp32 even when called under autocast (which it switches
        off), and always returns fp32."""
        maps = []
        with torch.autocast(images.device.type, enabled=False):
            x = self.embed(images)
            for i, block in enumerate(self.blocks):
                if self.class_token_joins_before(i):
                    x = self.join_class_token(x)
                maps.append(block.attn.attention(block.norm1(x)).float())
                x = block(x)
        return maps

    @torch.no_grad()
    def nonlocality(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 8: D_loc^{h,l} = (1/L) sum_ij A^{h,l}_ij ||delta_ij||, attention averaged over
        the batch, for every block l and head h: (depth, H), fp32 (under autocast too, see
        attention_maps). Measured in patch units on each block's real input. For MHSA blocks
        only patch-to-patch attention counts: the class token has no position on the grid, and
        its share is left out, not renormalised away, so uniform attention over 1 + N tokens
        reads N / (N + 1) of the mean grid distance."""
        self.check_input(images)
        if images.shape[0] == 0:
            raise ValueError("nonlocality() needs at least one image: Eq. 8 averages attention over the batch")
        rows = []
        with torch.autocast(images.device.type, enabled=False):  # the contraction too stays fp32
            for attn in self.attention_maps(images):
                patch_attn = attn[:, :, -self.patch_distances.shape[0] :, -self.patch_distances.shape[0] :]
                mean_attn = patch_attn.mean(dim=0)  # (H, N, N)
                rows.append(einsum(mean_attn, self.patch_distances.float(), "h i j, i j -> h") / mean_attn.shape[-1])
        return torch.stack(rows).cpu()  # (depth, H)


# ---------------------------------------------------------------------------------------
# Building by name, and fitting released weights onto a model
# ---------------------------------------------------------------------------------------
def create_model(name: str, **overrides) -> ConViT:
    """Build a model of Table 1 by name, e.g. create_model("convit_tiny", img_size=32, patch_size=4).

    Any field of ConViTConfig can be overridden. Two overrides the paper's comparisons use:
    create_model("convit_tiny", local_up_to_layer=0) is the same-size baseline (a ConViT with no
    GPSA block: our speed comparisons and ablations), and create_model("deit_tiny", num_heads=4)
    is DeiT's own network at ConViT-Ti's width and heads (Table 3's row e at a ConViT's size).
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    known = {f.name for f in fields(ConViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {name}; options are: {', '.join(sorted(known))}")
    return ConViT(ConViTConfig(**{**MODEL_PRESETS[name], **overrides}))


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation of a (1, rows*cols, C) absolute position embedding (the patches'
    part only) to a new grid, so that a 224^2 checkpoint (14 x 14 patches) can be fine-tuned
    at 384^2 or at 32^2."""
    grid_embed = rearrange(pos_embed, "1 (rows cols) c -> 1 c rows cols", rows=old_grid[0], cols=old_grid[1])
    grid_embed = F.interpolate(grid_embed.float(), size=new_grid, mode="bicubic", align_corners=False)
    return rearrange(grid_embed, "1 c rows cols -> 1 (rows cols) c").to(pos_embed.dtype)


def fit_pos_embed(pos_embed: torch.Tensor, model: ConViT, path) -> tuple[torch.Tensor, str]:
    """A checkpoint's pos_embed resized to the model's grid, and a line saying so. DeiT's
    (1, 1 + rows*cols, C) keeps its class-token slot unchanged and only the grid part is
    interpolated; the checkpoint's grid is assumed square, as in every released one (14 x 14 at 224^2)."""
    class_slots = int(model.cfg.class_token_in_pos_embed)
    grid_positions = pos_embed.shape[1] - class_slots
    side = math.isqrt(max(grid_positions, 0))
    if grid_positions < 1 or side * side != grid_positions:
        other_kind = ("covers a class token (a DeiT checkpoint? build the model with a deit_* preset)"
                      if not class_slots else "has no class-token slot (a ConViT checkpoint?)")
        raise ValueError(f"{path}: pos_embed has {pos_embed.shape[1]} positions, which is not "
                         f"{'1 + ' if class_slots else ''}a square grid; perhaps it {other_kind}")
    class_part, grid_part = pos_embed[:, :class_slots], pos_embed[:, class_slots:]
    resized = torch.cat([class_part, resize_pos_embed(grid_part, (side, side), model.cfg.grid)], dim=1)
    note = (f"load_checkpoint: pos_embed interpolated from {side}x{side} to {model.cfg.grid[0]}x{model.cfg.grid[1]}"
            + (" (the class token's slot kept as it is)" if class_slots else ""))
    return resized, note


def load_state(model: ConViT, state: dict[str, torch.Tensor], path, verbose: bool) -> ConViT:
    """Load the weights `state` (read from `path`) into `model`, strictly, once they fit: a
    pos_embed of another grid is interpolated to the model's, a head for another number of classes
    is left newly initialised; any other difference is one ValueError naming every mismatch, and
    then nothing is loaded or printed. checkpoints.load_checkpoint reads the file and calls this."""
    own = model.state_dict()
    notes = []  # printed only once the whole state dict is known to fit
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"], note = fit_pos_embed(state["pos_embed"], model, path)
        notes.append(note)
    head_keys = [key for key in ("head.weight", "head.bias") if key in state and key in own]
    if any(state[key].shape != own[key].shape for key in head_keys):
        state.update({key: own[key] for key in head_keys})
        notes.append(f"load_checkpoint: head left newly initialised for {model.cfg.num_classes} classes")

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []  # at most ten names of each kind: a ResNet's state dict would fill the screen
        if missing:
            problems.append(f"missing from the checkpoint ({len(missing)}): {missing[:10]}")
        if unexpected:
            problems.append(f"not in the model ({len(unexpected)}): {unexpected[:10]}")
        if wrong_shape:
            problems.append(f"shapes differ ({len(wrong_shape)}): {wrong_shape[:10]}")
        raise ValueError(f"{path} does not fit this model ({model.cfg.embed_dim} wide, "
                         f"{model.cfg.num_heads} heads, {model.cfg.local_up_to_layer} {model.cfg.attention.upper()}): "
                         + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    if verbose:
        for note in notes:
            print(note)
    return model


# ---------------------------------------------------------------------------------------
# Utilities: parameter count, the explicit twin (bench.py does the timing)
# ---------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def explicit_twin(model: ConViT) -> ConViT:
    """A copy of `model` with the same weights that runs the readable explicit path."""
    return copy.deepcopy(model).set_fused(False)
