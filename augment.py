"""DeiT's training augmentation, run on whole batches on the training device.

Every image of a batch draws its own random crop, flip, RandAugment ops, erasing and MixUp or
CutMix partner, as in DeiT; but each step runs once for the whole batch, as tensor operations,
instead of once per image in Python: on a CPU, per-image augmentation would cost a small model
as much as its backward pass; on a GPU, this keeps the augmentation off the data-loading workers.

The loader hands over uint8 images (B, C, H, W); `BatchAugment` returns normalised float images.
Order, as in DeiT: random resized crop and flip -> RandAugment -> normalise -> random erasing;
MixUp/CutMix (`batch_mixer`) then acts on the normalised batch and its labels.

Contents, in file order:
    warp                        resample a batch through one affine map per image (crop, flip, rotate ...)
    crop_boxes, crop_and_flip   RandomResizedCrop + horizontal flip as one warp
    PIXEL_OPS, GEOMETRIC_OPS    timm's rand-m9-mstd0.5-inc1 ops on batches, each with its magnitude rule
    rand_augment                `num_ops` ops per image, each applied with probability 0.5
    random_erasing              DeiT's per-pixel noise rectangles
    BatchAugment                the whole training augmentation, built from train.py's flags
    batch_mixer                 MixUp / CutMix
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


# ---------------------------------------------------------------------------------------
# Geometry: one affine resampling per image
# ---------------------------------------------------------------------------------------
def warp(images: torch.Tensor, matrix: torch.Tensor, size: tuple[int, int], fill: torch.Tensor,
         outside: str = "fill") -> torch.Tensor:
    """Resample each image through its own affine map, bicubically.

    `matrix` (B, 2, 3) maps a point of the output image to the point of the input it is read
    from, in pixel units with the image spanning [0, W] x [0, H] (pixel centres at +0.5).
    Points outside the input read `fill` (C,), the dataset's mean colour, as timm fills."""
    (h_in, w_in), (h_out, w_out) = images.shape[-2:], size

    # grid_sample speaks in units where the image spans [-1, 1] (align_corners=False):
    # u = 2 x / W - 1. So theta = (to units of the input) . matrix . (from units of the output).
    to_unit_in = images.new_tensor([[2 / w_in, 0, -1], [0, 2 / h_in, -1], [0, 0, 1]])
    from_unit_out = images.new_tensor([[w_out / 2, 0, w_out / 2], [0, h_out / 2, h_out / 2], [0, 0, 1]])
    full = torch.cat([matrix, matrix.new_tensor([0, 0, 1]).expand(len(matrix), 1, 3)], dim=1)  # (B, 3, 3)
    theta = to_unit_in @ full @ from_unit_out  # (B, 3, 3): output units -> input units
    grid = F.affine_grid(theta[:, :2], [len(images), images.shape[1], h_out, w_out], align_corners=False)
    if outside == "border":  # TEMP(issue25): taps beyond the edge repeat the edge pixel
        return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    fill = fill.view(1, -1, 1, 1)
    # Sampling (image - fill) with zero padding, then adding fill back, fills the outside with
    # the mean colour and blends it smoothly into the border taps.
    return F.grid_sample(images - fill, grid, mode="bicubic", padding_mode="zeros", align_corners=False) + fill


def crop_boxes(count: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               device) -> torch.Tensor:
    """RandomResizedCrop's boxes (top, left, h, w), one per image: an area fraction drawn from
    U(scale), an aspect ratio log-uniform in `ratio`, ten tries per image for a box that fits
    (the first that fits wins); images with none keep the whole image, as torchvision does
    when the ratio fits the image (square images here)."""
    tries = 10
    area = height * width * torch.empty(count, tries, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(count, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits (0 if none does)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    none = ~fits.any(dim=1)
    w, h = torch.where(none, float(width), w), torch.where(none, float(height), h)
    top = torch.floor(torch.rand(count, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(count, device=device) * (width - w + 1))
    return torch.stack([top, left, h, w], dim=1)  # (B, 4)


def crop_and_flip(images: torch.Tensor, size: int, scale: float, flip: float, fill: torch.Tensor,
                  outside: str = "fill") -> torch.Tensor:
    """RandomResizedCrop(size, scale=(scale, 1), ratio=(3/4, 4/3)) and a horizontal flip with
    probability `flip`, as one bicubic resampling per image."""
    count, _, height, width = images.shape
    top, left, h, w = crop_boxes(count, height, width, (scale, 1.0), (3 / 4, 4 / 3), images.device).unbind(1)
    flipped = torch.rand(count, device=images.device) < flip
    sx = torch.where(flipped, -w / size, w / size)  # a flip reads the crop from right to left
    x0 = torch.where(flipped, left + w, left)
    zeros = torch.zeros_like(sx)
    matrix = torch.stack([torch.stack([sx, zeros, x0], 1), torch.stack([zeros, h / size, top], 1)], dim=1)
    return warp(images, matrix, (size, size), fill, outside)


# ---------------------------------------------------------------------------------------
# RandAugment, timm's rand-m9-mstd0.5-inc1 (paper.md), on batches
# ---------------------------------------------------------------------------------------
# Every op takes a magnitude per image on timm's 0-10 scale (n,) and a random sign per image
# (n,) for the ops that go both ways; the pixel ops also take the images, as floats on the
# 0-255 scale (n, C, H, W). At
# magnitude m: rotate +-3m degrees; shear by a factor +-0.03m; translate +-0.045m of the side;
# colour, contrast, brightness and sharpness by a factor 1 +- 0.09m ("increasing" variants:
# stronger at larger m); posterize to 4 - int(0.4m) bits; solarize the pixels at or above
# 256 - int(25.6m); add int(11m) to the pixels below 128 (SolarizeAdd).
def luminance(images: torch.Tensor) -> torch.Tensor:
    """Grey level of each pixel, (n, 1, H, W): ITU-R 601-2 luma, as PIL converts to "L"."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(images: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor (image - degenerate); factor 1 keeps the image."""
    return degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)


def factor(magnitude, sign):
    return 1 + sign * 0.09 * magnitude


# The geometric ops return their affine map (n, 2, 3), output pixel -> input pixel as `warp` takes
# it, so that one resampling serves every image of a batch that drew any of them.
def affine(rows_x, rows_y) -> torch.Tensor:
    return torch.stack([torch.stack(rows_x, 1), torch.stack(rows_y, 1)], dim=1)


def rotate(magnitude, sign, height, width):
    angle = torch.deg2rad(sign * 3 * magnitude)
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2, height / 2  # about the centre
    return affine((cos, -sin, cx - cos * cx + sin * cy), (sin, cos, cy - sin * cx - cos * cy))


def shear(magnitude, sign, axis):
    s, one, zero = sign * 0.03 * magnitude, torch.ones_like(magnitude), torch.zeros_like(magnitude)
    if axis == "x":  # about the top-left corner, as PIL's affine transform in timm
        return affine((one, s, zero), (zero, one, zero))
    return affine((one, zero, zero), (s, one, zero))


def translate(magnitude, sign, side, axis):
    one, zero = torch.ones_like(magnitude), torch.zeros_like(magnitude)
    shift = sign * 0.045 * magnitude * side
    if axis == "x":
        return affine((one, zero, shift), (zero, one, zero))
    return affine((one, zero, zero), (zero, one, shift))


GEOMETRIC_OPS = {  # name: op(magnitude, sign, height, width) -> (n, 2, 3)
    "Rotate": rotate,
    "ShearX": lambda m, s, h, w: shear(m, s, "x"),
    "ShearY": lambda m, s, h, w: shear(m, s, "y"),
    "TranslateX": lambda m, s, h, w: translate(m, s, w, "x"),
    "TranslateY": lambda m, s, h, w: translate(m, s, h, "y"),
}


def sharpness(images, magnitude, sign):
    """PIL's SMOOTH filter (3 x 3, centre weight 5 of 13) on the inner pixels, the border kept."""
    kernel = images.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    channels = images.shape[1]
    smooth = F.conv2d(images, kernel.expand(channels, 1, 3, 3), groups=channels).round()
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return blend(images, degenerate, factor(magnitude, sign))


def autocontrast(images, magnitude, sign):
    """Stretch each channel's range to 0-255 (channels of one level are kept)."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (images - low) * 255 / spread.clamp(min=1), images)


def equalize(images, magnitude, sign):
    """PIL's histogram equalisation, per channel: a level maps to its rank among the pixels, on
    steps of (pixels - count of the highest level) / 255; a channel with one level is kept."""
    n, channels, height, width = images.shape
    levels = images.reshape(n * channels, -1).long()  # (rows, pixels), 0..255
    hist = torch.zeros(len(levels), 256, device=images.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    top = 255 - (hist.flip(1) > 0).float().argmax(dim=1, keepdim=True)  # the highest level present
    step = torch.div(hist.sum(1, keepdim=True) - hist.gather(1, top), 255, rounding_mode="floor")  # (rows, 1)
    below = hist.cumsum(1) - hist  # pixels strictly below each level
    table = torch.div(below + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    out = torch.where(step > 0, table.clamp(max=255).gather(1, levels), levels.float())
    return out.view(n, channels, height, width)


def posterize(images, magnitude, sign):
    bits = 4 - torch.floor(0.4 * magnitude)  # 1 bit at m = 9 (0 at m = 10: every pixel black)
    step = (2 ** (8 - bits)).view(-1, 1, 1, 1)
    return torch.floor(images / step) * step


def solarize(images, magnitude, sign):
    threshold = (256 - torch.floor(25.6 * magnitude)).view(-1, 1, 1, 1)
    return torch.where(images >= threshold, 255 - images, images)


def solarize_add(images, magnitude, sign):
    added = torch.floor(11 * magnitude).view(-1, 1, 1, 1)
    return torch.where(images < 128, (images + added).clamp(max=255), images)


PIXEL_OPS = {  # name: op(images, magnitude, sign) -> images
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Invert": lambda x, m, s: 255 - x,
    "Posterize": posterize,
    "Solarize": solarize,
    "SolarizeAdd": solarize_add,
    "Color": lambda x, m, s: blend(x, luminance(x), factor(m, s)),
    "Contrast": lambda x, m, s: blend(x, luminance(x).mean(dim=(1, 2, 3), keepdim=True).round(), factor(m, s)),
    "Brightness": lambda x, m, s: blend(x, torch.zeros_like(x), factor(m, s)),
    "Sharpness": sharpness,
}
RAND_AUGMENT_OPS = [*PIXEL_OPS, *GEOMETRIC_OPS]  # the 15 ops of timm's increasing set


def rand_augment(images: torch.Tensor, num_ops: int, magnitude: float, magnitude_std: float,
                 fill: torch.Tensor, ops=None) -> torch.Tensor:
    """`num_ops` rounds; in each, every image draws one of the 15 ops uniformly, applies it with
    probability 0.5, at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]
    (timm's mstd), with a random sign. Images stay on the 0-255 scale, rounded to whole levels
    after every op as a uint8 image would be."""
    count, device = len(images), images.device
    height, width = images.shape[-2:]
    ops = list(ops or RAND_AUGMENT_OPS)
    geometric = torch.tensor([name in GEOMETRIC_OPS for name in ops], device=device)
    for _ in range(num_ops):
        chosen = torch.randint(len(ops), (count,), device=device)
        applied = torch.rand(count, device=device) < 0.5
        strength = (magnitude + magnitude_std * torch.randn(count, device=device)).clamp(0, 10)
        sign = torch.where(torch.rand(count, device=device) < 0.5, -1.0, 1.0)
        matrices = torch.zeros(count, 2, 3, device=device)
        for index, name in enumerate(ops):
            picked = (applied & (chosen == index)).nonzero().squeeze(1)
            if not len(picked):
                continue
            if name in PIXEL_OPS:
                out = PIXEL_OPS[name](images[picked], strength[picked], sign[picked])
                images = images.index_copy(0, picked, out.round().clamp(0, 255))
            else:
                matrices[picked] = GEOMETRIC_OPS[name](strength[picked], sign[picked], height, width)
        moved = (applied & geometric[chosen]).nonzero().squeeze(1)
        if len(moved):  # one resampling for every image that drew a geometric op
            out = warp(images[moved], matrices[moved], (height, width), fill)
            images = images.index_copy(0, moved, out.round().clamp(0, 255))
    return images


# ---------------------------------------------------------------------------------------
# Random erasing and the whole pipeline
# ---------------------------------------------------------------------------------------
def random_erasing(images: torch.Tensor, probability: float) -> torch.Tensor:
    """DeiT's RandomErasing: with `probability`, one rectangle of 2%-33% of the image, aspect
    ratio log-uniform in (0.3, 3.3), is replaced by per-pixel Gaussian noise (the images are
    normalised, so noise of std 1 looks like any other pixel). Ten tries per image for a
    rectangle that fits; an image with none is left as it is."""
    count, _, height, width = images.shape
    device, tries = images.device, 10
    area = height * width * torch.empty(count, tries, device=device).uniform_(0.02, 1 / 3)
    aspect = torch.exp(torch.empty(count, tries, device=device).uniform_(math.log(0.3), math.log(1 / 0.3)))
    h, w = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    fits = (h < height) & (w < width) & (h >= 1) & (w >= 1)
    first = fits.float().argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first), w.gather(1, first)  # (B, 1)
    erase = fits.any(dim=1, keepdim=True) & (torch.rand(count, 1, device=device) < probability)
    top = torch.floor(torch.rand(count, 1, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(count, 1, device=device) * (width - w + 1))
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    inside_rows = (rows >= top) & (rows < top + h)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + w)  # (B, W)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :] & erase[:, :, None])[:, None]  # (B, 1, H, W)
    return torch.where(mask, torch.randn_like(images), images)


class BatchAugment:
    """DeiT's training augmentation from train.py's flags, for a batch of uint8 images.

    crop: whether the random resized crop happens here (images held in memory, all one size) or
    already happened per image in the loader (image folders, whose images differ in size)."""

    def __init__(self, args, mean: tuple[float, ...], std: tuple[float, ...], crop: bool):
        self.size, self.crop, self.scale, self.flip = args.img_size, crop, args.crop_scale, args.hflip
        self.ops, self.magnitude, self.magnitude_std = args.randaug_ops, args.randaug_magnitude, args.randaug_magnitude_std
        self.jitter, self.reprob = args.color_jitter, args.reprob
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        # TEMP(issue25) experiment knobs
        names = getattr(args, "randaug_op_names", None)
        self.op_names = None if names in (None, "all") else [n for n in names.split(",") if n]
        self.fill_value = getattr(args, "aug_fill", None)
        self.crop_outside = getattr(args, "crop_outside", None) or "fill"
        # Colour jitter only where asked: in DeiT it was inert (timm adds it only without auto-augment).
        self.color_jitter = v2.ColorJitter(self.jitter, self.jitter, self.jitter) if self.jitter > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # (B, C, H, W), 0-255
        fill = (255 * self.mean).round().to(x.device)  # the mean colour fills what a warp uncovers
        if self.fill_value is not None:
            fill = torch.full_like(fill, self.fill_value)
        if self.crop:
            x = crop_and_flip(x, self.size, self.scale, self.flip, fill, self.crop_outside).round().clamp(0, 255)
        if self.ops > 0:
            x = rand_augment(x, self.ops, self.magnitude, self.magnitude_std, fill, self.op_names)
        x = x / 255
        if self.color_jitter is not None:  # per image: jitter draws one set of factors per call
            x = torch.stack([self.color_jitter(image) for image in x])
        x = (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)
        return random_erasing(x, self.reprob) if self.reprob > 0 else x


def batch_mixer(args, num_classes: int):
    """MixUp or CutMix on each batch (one of the two, chosen with probability 0.5 when both
    are on). Returns a function (images, labels) -> (images, soft targets (B, num_classes)),
    or None when both are off.

    The batch is shuffled first: torchvision's MixUp and CutMix mix image i with image i - 1,
    and repeated augmentation puts the copies of an image next to each other, so without the
    shuffle most images of a one-process run would be mixed with a copy of themselves.
    Shuffled, a partner is a copy only by chance, (copies - 1) / (B - 1)."""
    mixers = []
    if args.mixup > 0:
        mixers.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        mixers.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    mix_one_of = v2.RandomChoice(mixers)

    def shuffle_then_mix(images: torch.Tensor, labels: torch.Tensor):
        order = torch.randperm(len(labels), device=labels.device)
        return mix_one_of(images[order], labels[order])

    return shuffle_then_mix
