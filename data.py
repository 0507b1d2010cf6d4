"""The data side of DeiT's recipe, for train.py: datasets, the loader's part of augmentation, sampling.

Split out of train.py so that the training loop stays one readable page. Nothing here knows
about the model; everything returns plain torch datasets of (image tensor, label), built from a
`Data` (the run's data settings) and an `augment.Augmentation`.

Contents, in file order:
    DatasetSpec, DATASETS          what each --dataset is (classes, channels, the flags it sets, its loader)
    Data                           the run's data settings (the flags of the same names)
    ArrayImageDataset, FirstClassesImageFolder
    train_transform, eval_transform  (the rest of the training augmentation runs on batches: augment.py)
    DIGIT_OPS, digits_split, load_digits, load_mnist10k
    load_mnist10k_sum              two far-apart digits labelled by their sum
    PlainDataUnpickler, load_cifar CIFAR's pickled batches, read without running any code
    load_imagefolder, load_fake, build_datasets, validation_set, check_training_set
    stratified_fraction            Table 2's subsets of each class
    RepeatedAugmentationSampler    DeiT's repeated augmentation
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset, DistributedSampler, Subset

import cli
from augment import Augmentation
from cli import HOW, flag

cli.require_torchvision()  # one line, not a traceback, when torchvision was built for another torch
import torchvision  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402


class DataError(ValueError):
    """A problem with the user's data, reported as `error: <message>` and exit code 2 (cli.run_command)."""


# ---------------------------------------------------------------------------------------
# What each dataset is
# ---------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)  # MNIST's usual values; our 10,000 digits give 0.1311 and 0.3087


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    about: str  # one line for --help
    num_classes: int | None  # None: as many as the image folder holds
    in_chans: int  # colour channels
    mean: tuple[float, ...]  # per-channel normalisation
    std: tuple[float, ...]
    load: Callable  # (Data, training transform, evaluation transform) -> (training set, validation set)
    # The flags that the dataset sets when they are left unset (config.py): the recipe that suits its
    # size (--preset), its image and patch size, and any recipe value that differs for it, such as
    # --hflip 0 for digits (a mirrored 2 is no 2).
    defaults: dict
    crop_pct: float = 1.0  # evaluation: resize to img_size / crop_pct, then centre-crop img_size
    crop_in_loader: bool = False  # images of many sizes: cropped per image before they can form a batch


# The RandAugment ops after which a handwritten digit is still the same digit, white on black:
# the geometric ones and the mild tonal ones. Left out: Invert and Solarize, which turn the strokes
# dark (an SVM fitted on clean digits recognises 10% and 61% of their outputs: test_augment.py),
# SolarizeAdd, which lifts the background, and Color, which does nothing to a grey image.
DIGIT_OPS = ("AutoContrast,Equalize,Posterize,Contrast,Brightness,Sharpness,"
             "Rotate,ShearX,ShearY,TranslateX,TranslateY")

DATASETS: dict[str, DatasetSpec] = {
    # 8x8 grey digits, upsampled to 16x16 and cut in 4x4 patches: a 4x4 grid of 16 tokens. (Patch 2,
    # an 8x8 grid, learns far more slowly: its first ~100 steps sit on a plateau at chance.)
    # A digit fills its frame, so crops keep 80% of it or more (the small recipe's 50% cuts strokes
    # off), and RandAugment draws only DIGIT_OPS: together +3 points of top-1 (docs/digits_recipe.md).
    # 40 epochs, not the small recipe's 50: the main job fits in 3 minutes on one thread, for 0.1
    # points of top-1 (the same doc).
    "digits": DatasetSpec(
        about="scikit-learn's 1,797 8x8 handwritten digits, offline", num_classes=10, in_chans=1,
        mean=(0.5,), std=(0.5,), load=lambda data, train_tf, eval_tf: load_digits(train_tf, eval_tf),
        defaults={"preset": "small", "img_size": 16, "patch_size": 4, "hflip": 0.0, "epochs": 40,
                  "crop_scale": 0.8, "crop_edge": "repeat", "randaug_op_set": DIGIT_OPS}),
    # 10,000 real 28x28 MNIST digits shipped in data/ (data/README.md): in 4x4 patches a 7x7 grid
    # of 49 tokens, far enough for a locality prior to matter (patch 2 gives 14x14, ImageNet's grid).
    "mnist10k": DatasetSpec(
        about="10,000 real 28x28 MNIST digits shipped in data/", num_classes=10, in_chans=1,
        mean=MNIST_MEAN, std=MNIST_STD,
        load=lambda data, train_tf, eval_tf: load_mnist10k(Path(data.data_dir), train_tf, eval_tf),
        defaults={"preset": "small", "img_size": 28, "patch_size": 4, "hflip": 0.0}),
    # Two MNIST-10k digits at half size in opposite corners of a 28x28 image, labelled by their sum
    # (0-18): a label that needs content from patches far apart (load_mnist10k_sum).
    "mnist10k-sum": DatasetSpec(
        about="two MNIST-10k digits in opposite corners, labelled by their sum", num_classes=19, in_chans=1,
        mean=MNIST_MEAN, std=MNIST_STD,
        load=lambda data, train_tf, eval_tf: load_mnist10k_sum(Path(data.data_dir), train_tf, eval_tf),
        defaults={"preset": "small", "img_size": 28, "patch_size": 4, "hflip": 0.0}),
    # 32x32 colour images in 4x4 patches: an 8x8 grid (patch 2 gives 16x16 = 256 tokens).
    "cifar10": DatasetSpec(
        about="CIFAR-10, read from --data-dir (downloaded when missing)", num_classes=10, in_chans=3,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        load=lambda data, train_tf, eval_tf: load_cifar_splits("cifar10", Path(data.data_dir), train_tf, eval_tf),
        defaults={"preset": "paper", "img_size": 32, "patch_size": 4, "hflip": 0.5}),
    "cifar100": DatasetSpec(
        about="CIFAR-100, the same way", num_classes=100, in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        load=lambda data, train_tf, eval_tf: load_cifar_splits("cifar100", Path(data.data_dir), train_tf, eval_tf),
        defaults={"preset": "paper", "img_size": 32, "patch_size": 4, "hflip": 0.5}),
    # ImageNet and its subsets as in the paper: 224x224 in 16x16 patches, a 14x14 grid.
    "imagefolder": DatasetSpec(
        about="--data-dir/train/ and --data-dir/val/, one folder of images per class (ImageNet)", num_classes=None,
        in_chans=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, crop_in_loader=True,
        load=lambda data, train_tf, eval_tf: load_imagefolder(Path(data.data_dir), data.num_classes_subset,
                                                              train_tf, eval_tf),
        defaults={"preset": "paper", "img_size": 224, "patch_size": 16, "hflip": 0.5}),
    # Random images and labels (torchvision FakeData): for smoke runs; nothing can be learnt.
    "fake": DatasetSpec(
        about="random images and labels, for smoke runs", num_classes=10, in_chans=3, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, load=lambda data, train_tf, eval_tf: load_fake(data.img_size, train_tf, eval_tf),
        defaults={"preset": "small", "img_size": 32, "patch_size": 4, "hflip": 0.5}),
}
FAKE_TRAIN_IMAGES, FAKE_VAL_IMAGES = 512, 128
# MNIST-10k: the copy committed with the project, and its fixed validation split.
MNIST10K_FILE = Path(__file__).resolve().parent / "data" / "mnist10k.npz"
MNIST10K_VAL_FRACTION, MNIST10K_SPLIT_SEED = 0.2, 0


@dataclass(frozen=True, kw_only=True)
class Data:
    """The run's data: one field per flag of train.py (config.py reads the table)."""

    dataset: str = flag("the data set: " + "; ".join(f"{name}, {spec.about}" for name, spec in DATASETS.items()),
                        default="digits", choices=list(DATASETS))
    data_dir: str = flag("where cifar is (or goes), or the root holding train/ and val/; an image that cannot be "
                         "read stops the run with an error naming the file (mnist10k: read from here if it holds "
                         "mnist10k.npz, else from the repository's data/)", default="data", role=HOW)
    num_classes_subset: int | None = flag("imagefolder: keep only the first K classes in sorted order (the paper: "
                                          "100); at least 2, or top-1 means nothing", default=None, interval="[2, inf)", metavar="K")
    data_fraction: float = flag("keep a seeded, stratified fraction F in (0, 1] of each training class (Table 2)",
                                default=1.0, interval="(0, 1]", metavar="F")
    scale_epochs: bool = flag("multiply the epochs by 1/F, so that a fraction sees as many steps (Table 2); the "
                              "warmup keeps its epochs, as in the released code (so it spans F times the steps)",
                              default=False)
    img_size: int = flag("side of the (square) image", interval="[1, inf)")  # the dataset's


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
class ArrayImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), with integer labels."""

    def __init__(self, images: torch.Tensor, targets: list[int], transform):
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = tv_tensors.Image(self.images[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def read_image(path: str):
    """torchvision's image loader, with an error that names a file it cannot decode. Such a file
    stops the run: skipping it would quietly change the data set (and its class balance)."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except OSError as err:  # PIL's UnidentifiedImageError and a truncated image are OSErrors
        raise DataError(f"image {path} cannot be read ({type(err).__name__}): it is damaged or not an image; "
                        f"delete or replace it") from None


class FirstClassesImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder that keeps only the first `keep` classes in sorted order (None = all).

    For ImageNet, sorted folder names are the synset ids, so the first 100 classes keep the
    labels 0..99 of the full 1000-class problem, as in the paper's Fig. 8 experiments."""

    def __init__(self, root, keep: int | None, transform):
        self.keep = keep
        super().__init__(root, transform=transform, loader=read_image)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        classes = classes[: self.keep] if self.keep else classes
        return classes, {name: index for index, name in enumerate(classes)}


def train_transform(img_size: int, augmentation: Augmentation, spec: DatasetSpec):
    """What the loader does to each training image: only what cannot wait for the batch.

    Images held in memory (digits, MNIST-10k, CIFAR, fake) all have one size, so the loader
    only hands them over as uint8 tensors, and augment.BatchAugment crops, flips and augments
    whole batches. Image folders hold images of every size, which cannot be stacked into a
    batch before they are cropped: the random resized crop and the flip happen here, per image,
    and the rest of the augmentation on the batch."""
    if not spec.crop_in_loader:
        return v2.ToImage()  # PIL image or tensor -> uint8 tensor image (C, H, W)
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(img_size, scale=(augmentation.crop_scale, 1.0),
                                                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.RandomHorizontalFlip(augmentation.hflip)])


def eval_transform(img_size: int, spec: DatasetSpec) -> v2.Compose:
    """Resize to img_size / crop_pct, keep the centre img_size (ImageNet: 256 -> 224)."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(img_size / spec.crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])


def digits_split():
    """The 1797 UCI handwritten digits that ship with scikit-learn, as (pixels (1797, 8, 8), each a
    whole number 0-16; labels (1797,); training indices; validation indices): a fixed, stratified
    80/20 split, seed 0 whatever --seed is, so that every run, and every classical baseline
    (docs/baselines.py), is judged on the same 360 images."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                          random_state=0)
    return digits.images, digits.target, train_idx, val_idx


def load_digits(train_tf, eval_tf):
    """scikit-learn's digits (digits_split) as uint8 images: 8x8, 17 grey levels spread over 0-255."""
    pixels, targets, train_idx, val_idx = digits_split()
    images = torch.from_numpy(pixels * (255 / 16)).round().to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = targets.tolist()
    return (ArrayImageDataset(images[train_idx], [labels[i] for i in train_idx], train_tf),
            ArrayImageDataset(images[val_idx], [labels[i] for i in val_idx], eval_tf))


def load_mnist10k(data_dir: Path, train_tf, eval_tf):
    """10,000 real MNIST digits, 28x28 grey (data/README.md: source, licence, counts), offline.

    Read from <data_dir>/mnist10k.npz if that exists, else from the copy in the repository's
    data/ folder. A fixed, stratified split: 20% of every class (seed 0 whatever --seed is)
    is the validation set, 2,000 images on which every run is judged; the other 8,000 train."""
    path = data_dir / MNIST10K_FILE.name if (data_dir / MNIST10K_FILE.name).is_file() else MNIST10K_FILE
    if not path.is_file():
        raise DataError(f"mnist10k: {path} not found; it ships with the repository "
                        f"(git checkout -- data/{MNIST10K_FILE.name} restores it)")
    try:
        with np.load(path) as arrays:  # allow_pickle stays False: loading runs no code
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, ValueError, KeyError, EOFError) as err:  # BadZipFile is an OSError
        raise DataError(f"mnist10k: {path} is not a readable MNIST-10k file ({type(err).__name__}: {err})") from None
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"mnist10k: {path} holds images {images.dtype} {images.shape} and labels {labels.shape}; "
                        f"expected uint8 (N, H, W) and (N,)")
    labels = labels.astype(np.int64).tolist()
    val_idx = stratified_fraction(labels, MNIST10K_VAL_FRACTION, MNIST10K_SPLIT_SEED)
    train_idx = sorted(set(range(len(labels))) - set(val_idx))
    images = rearrange(torch.from_numpy(images), "n h w -> n 1 h w")  # one grey channel
    return (ArrayImageDataset(images[train_idx], [labels[i] for i in train_idx], train_tf),
            ArrayImageDataset(images[val_idx], [labels[i] for i in val_idx], eval_tf))


def load_mnist10k_sum(data_dir: Path, train_tf, eval_tf):
    """A task whose label depends on content far apart: each image holds two MNIST-10k digits,
    shrunk to 14x14, one in the top-left and one in the bottom-right corner of a 28x28 image (on
    the 7x7 grid of 4x4 patches, 3.5 to 7 patches apart), and its label is their sum, 0 to 18.

    The training images pair up MNIST-10k's 8,000 training digits, the validation images its
    2,000 validation digits, so no digit is seen in both. Each split is paired by two fixed
    permutations (seed 0 whatever --seed is): every digit appears once in each corner, so the
    sums follow the product of the digit frequencies (sum 9 most often, about 10%)."""
    train_digits, val_digits = load_mnist10k(data_dir, None, None)
    return digit_pairs(train_digits, train_tf), digit_pairs(val_digits, eval_tf)


def digit_pairs(digits: ArrayImageDataset, transform) -> ArrayImageDataset:
    generator = torch.Generator().manual_seed(MNIST10K_SPLIT_SEED)
    first, second = (torch.randperm(len(digits), generator=generator) for _ in range(2))
    small = F.interpolate(digits.images.float(), size=(14, 14), mode="area").round().to(torch.uint8)  # (n, 1, 14, 14)
    images = torch.zeros(len(digits), 1, 28, 28, dtype=torch.uint8)
    images[:, :, :14, :14], images[:, :, 14:, 14:] = small[first], small[second]
    labels = [digits.targets[a] + digits.targets[b] for a, b in zip(first.tolist(), second.tolist())]
    return ArrayImageDataset(images, labels, transform)


# CIFAR's batches are pickles, and pickle.load calls whatever function a file names: a
# cifar-10-batches-py folder someone hands you could run any code. A batch is plain data (a dict
# of a uint8 array, lists, numbers and strings), which the pickle format builds without calling
# anything except numpy's array rebuilders. So those are the only globals a batch may name.
_ARRAY = np.zeros(1, dtype=np.uint8)
PICKLE_ALLOW_LIST = {
    ("numpy.core.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0],  # numpy 1, as in the official files
    ("numpy._core.multiarray", "_reconstruct"): _ARRAY.__reduce__()[0],  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0],  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"): _ARRAY.__reduce_ex__(5)[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes, in protocol 2 as Python 3 writes it
}


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and numpy arrays, and refuses every other global a
    file names before importing it, let alone calling it."""

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_ALLOW_LIST:
            raise pickle.UnpicklingError(f"it asks to load {module}.{name}, which is code, not data: "
                                         f"refused without running it")
        return PICKLE_ALLOW_LIST[module, name]


def load_cifar(name: str, root: Path, train: bool, transform) -> ArrayImageDataset:
    """CIFAR-10/100 from the python pickles, downloaded through torchvision when missing.

    We read the batches ourselves, with PlainDataUnpickler, so that any CIFAR-format folder
    loads (torchvision's loader accepts only files with the official md5 sums) and none runs code."""
    source = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / source.base_folder
    if not folder.is_dir():
        print(f"{name}: {folder} not found, downloading {source.url}", flush=True)
        try:
            source(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise DataError(f"could not download {name} into {root} ({err}); without a network, "
                             f"extract {source.filename} there by hand so that {folder} exists") from None
    images, targets = [], []
    for file_name, _md5 in source.train_list if train else source.test_list:
        try:
            with open(folder / file_name, "rb") as f:
                batch = PlainDataUnpickler(f, encoding="latin1").load()  # latin1: the official files are Python 2's
            images.append(torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8)).reshape(-1, 3, 32, 32))
            targets += batch["labels"] if "labels" in batch else batch["fine_labels"]
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise DataError(f"{folder / file_name} is not a readable {name} batch ({type(err).__name__}: {err}); "
                             f"delete {folder} to download it again") from None
    return ArrayImageDataset(torch.cat(images), targets, transform)


def load_imagefolder(root: Path, keep: int | None, train_tf, eval_tf):
    if not root.is_dir():
        raise DataError(f"data directory {root} {'is a file, not a folder' if root.exists() else 'does not exist'} "
                        f"(--data-dir)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"--dataset imagefolder expects {root}/train/ and {root}/val/ "
                             f"(one sub-folder of images per class); {root / split} is not a folder")
    try:
        train_set = FirstClassesImageFolder(root / "train", keep, train_tf)
        val_set = FirstClassesImageFolder(root / "val", keep, eval_tf)
    except (FileNotFoundError, OSError) as err:  # e.g. a class folder with no images
        raise DataError(f"cannot read the image folders under {root}: {err}") from None
    if train_set.classes != val_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise DataError(f"{root}/train and {root}/val hold different classes "
                         f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})")
    if keep and len(train_set.classes) < keep:
        raise DataError(f"--num-classes-subset {keep} but {root}/train has only {len(train_set.classes)} classes")
    return train_set, val_set


def load_cifar_splits(name: str, root: Path, train_tf, eval_tf):
    return load_cifar(name, root, True, train_tf), load_cifar(name, root, False, eval_tf)


def load_fake(img_size: int, train_tf, eval_tf):
    """FakeData draws each image and label from a seed set by its index: the same images every time."""
    shape = (DATASETS["fake"].in_chans, img_size, img_size)
    classes = DATASETS["fake"].num_classes
    return (torchvision.datasets.FakeData(FAKE_TRAIN_IMAGES, shape, classes, transform=train_tf),
            torchvision.datasets.FakeData(FAKE_VAL_IMAGES, shape, classes, transform=eval_tf,
                                          random_offset=FAKE_TRAIN_IMAGES))


def build_datasets(data: Data, augmentation: Augmentation, seed: int) -> tuple[Dataset, Dataset, int]:
    """(training set, validation set, number of classes); items are (image tensor, label). `seed`
    draws the --data-fraction subset; `augmentation` is needed only where the loader crops."""
    spec = DATASETS[data.dataset]
    train_set, val_set = spec.load(data, train_transform(data.img_size, augmentation, spec),
                                   eval_transform(data.img_size, spec))
    num_classes = spec.num_classes or len(train_set.classes)
    if data.data_fraction < 1.0:
        train_set = Subset(train_set, stratified_fraction(labels_of(train_set), data.data_fraction, seed))
    return train_set, val_set, num_classes


def validation_set(data: Data) -> Dataset:
    """The validation set alone, each image as the model sees it at evaluation (eval_transform):
    the images of a trained model's figures (plots.py --attention)."""
    spec = DATASETS[data.dataset]
    return spec.load(data, None, eval_transform(data.img_size, spec))[1]


def check_training_set(data: Data, train_set: Dataset, num_classes: int, global_batch: int):
    """A training set too small to train on, blamed on the flag that made it so; and one class,
    with which every prediction is right and top-1 is 100% whatever the model learns."""
    fraction = data.data_fraction
    whole = train_set.dataset if isinstance(train_set, Subset) else train_set
    full = len(whole)
    if num_classes < 2:  # only an image folder can have fewer (--num-classes-subset is at least 2)
        names = ", ".join(getattr(whole, "classes", []))
        raise DataError(f"{data.data_dir}/train holds {num_classes} class ({names}): every prediction would be right, "
                        f"and top-1 100% whatever the model learns; a classifier needs at least two classes")
    if fraction < 1 and fraction * full < num_classes:
        raise DataError(f"--data-fraction {fraction:g} keeps {fraction * full:.2g} of the {full} training images, "
                        f"less than one per class (each class would keep its one image, {len(train_set)} in all, "
                        f"not the fraction asked for); the least is {num_classes / full:.2g}")
    if len(train_set) < global_batch:
        cause = (f"--data-fraction {fraction:g} keeps {len(train_set)} of the {full} training images" if fraction < 1
                 else f"the training set has {len(train_set)} images")
        raise DataError(f"{cause}, fewer than one batch of {global_batch}; lower --batch-size"
                        + (" or raise --data-fraction" if fraction < 1 else ""))


def transformed_once(dataset: Dataset) -> Dataset:
    """A validation set held in memory, its (deterministic) transform applied once for all the
    evaluations of a run; other datasets are returned as they are."""
    if not isinstance(dataset, ArrayImageDataset):
        return dataset
    images = dataset.transform(tv_tensors.Image(dataset.images))  # deterministic: one call for all of them
    return ArrayImageDataset(images, dataset.targets, None)


def labels_of(dataset: Dataset) -> list[int]:
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # FakeData: draw them


def stratified_fraction(labels: list[int], fraction: float, seed: int) -> list[int]:
    """Indices of a seeded random fraction of every class (at least one image per class),
    so that a 10% subset keeps the class balance of the full set (Table 2)."""
    generator = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    keep = []
    for label in labels_t.unique().tolist():
        members = (labels_t == label).nonzero().flatten()
        shuffled = members[torch.randperm(len(members), generator=generator)]
        keep += shuffled[: max(1, round(fraction * len(members)))].tolist()
    return sorted(keep)


class RepeatedAugmentationSampler(DistributedSampler):
    """DeiT's repeated augmentation: each image appears `repeats` times in an epoch, under
    different random augmentations (and, with several processes, on different processes).
    The epoch keeps the dataset's length, so it visits len / repeats distinct images.
    With repeats = 1 it is a plain DistributedSampler; both reshuffle from (seed, epoch),
    which is what makes a resumed run draw the same batches as an uninterrupted one."""

    def __init__(self, dataset, repeats: int, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats = repeats

    def __iter__(self):
        if self.repeats == 1:
            return super().__iter__()
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).repeat_interleave(self.repeats)
        order = order[: self.total_size]  # repeats >= 2 makes it long enough for every process
        return iter(order[self.rank :: self.num_replicas].tolist())
