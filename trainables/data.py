"""Datasets by name, held in memory as tensors, and a fast on-device batch iterator.

==================  ============================================================
name                source
==================  ============================================================
``digits``          scikit-learn's bundled 8×8 handwritten digits (no download)
``cifar10``         torchvision's CIFAR-10 files under ``root``
``cifar100``        torchvision's CIFAR-100 files under ``root``
``svhn``            torchvision's SVHN ``.mat`` files under ``root``
``imagefolder``     any folder-per-class tree (``train/`` + ``test/`` or ``val/``
                    subfolders, or the classes directly under ``root``)
==================  ============================================================

Every dataset is kept in memory (uint8 for image files, float32 for digits);
batches are converted to float in [0, 1] and augmented on the device. A
seeded held-out split of the training data is the validation set unless an
``.npz`` validation set is given. The test split of datasets that have none
(digits, a flat image folder) is drawn with a fixed seed, so it never moves
with the training seed.
"""

from __future__ import annotations

import os
import pickle
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.errors import ConfigError, DataNotFoundError
from trainables.registry import Registry

AUGMENTS = ("none", "crop", "crop_flip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TEST_SPLIT_SEED = 0


@dataclass
class TensorData:
    """Images and labels in memory.

    Attributes:
        x: ``[N, C, H, W]`` uint8 (0..255) or float32 in [0, 1].
        y: ``[N]`` int64 class indices.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> TensorData:
        """The first ``n`` points of a seeded permutation (all points if ``n`` is None or ≥ N)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return TensorData(self.x[idx], self.y[idx])


@dataclass
class DataBundle:
    """A dataset ready for training: splits, shape facts and the augmentation policy."""

    name: str
    train: TensorData
    val: TensorData
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    augment: str


@dataclass
class _Loaded:
    train: TensorData
    test: TensorData | None  # None: split a test set off train with the fixed seed
    class_names: list[str]
    augment: str


DATASETS: Registry[Callable[..., _Loaded]] = Registry("dataset")


def to_float(x: Tensor) -> Tensor:
    """A batch as float32 in [0, 1] (uint8 is divided by 255)."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)`` of a seeded random split."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = int(round(n * fraction))
    return perm[k:].sort().values, perm[:k].sort().values


def _take(d: TensorData, idx: Tensor) -> TensorData:
    return TensorData(d.x[idx], d.y[idx])


# --- loaders ------------------------------------------------------------------------
@DATASETS.register("digits")
def _digits(root: str | None, download: bool) -> _Loaded:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    return _Loaded(TensorData(x, y), None, [str(i) for i in range(10)], "none")


def _require_root(name: str, root: str | None) -> Path:
    if not root:
        raise ConfigError(
            f"data_root must be set for dataset {name!r} (the folder holding its files)"
        )
    return Path(root)


def _torchvision_cifar(name: str, root: str | None, download: bool) -> _Loaded:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    path = _require_root(name, root)

    class LocalCIFAR(base):  # type: ignore[misc, valid-type]
        """torchvision's reader, checking that the files exist instead of their md5
        (so small files written in the same format load too)."""

        def _check_integrity(self) -> bool:
            return not _missing(self)

        def _load_meta(self) -> None:
            meta = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(meta, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def _missing(ds) -> list[str]:
        names = [n for n, _ in ds.train_list + ds.test_list] + [ds.meta["filename"]]
        folder = Path(ds.root) / ds.base_folder
        return [str(folder / n) for n in names if not (folder / n).is_file()]

    probe = LocalCIFAR.__new__(LocalCIFAR)
    probe.root = str(path)
    missing = _missing(probe)
    if missing and not download:
        raise DataNotFoundError(
            f"{name} files not found: {', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''}. Get them with download: true on a machine "
            f"with internet, or download {base.url} and extract it under {path} (so that "
            f"{path / base.base_folder} exists)."
        )
    sets = []
    for train in (True, False):
        ds = LocalCIFAR(str(path), train=train, download=download)
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorData(x, torch.tensor(ds.targets, dtype=torch.int64)))
    return _Loaded(sets[0], sets[1], list(ds.classes), "crop_flip")


DATASETS.add("cifar10", lambda root, download: _torchvision_cifar("cifar10", root, download))
DATASETS.add("cifar100", lambda root, download: _torchvision_cifar("cifar100", root, download))


@DATASETS.register("svhn")
def _svhn(root: str | None, download: bool) -> _Loaded:
    from torchvision.datasets import SVHN

    path = _require_root("svhn", root)

    class LocalSVHN(SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    sets = []
    for split in ("train", "test"):
        url, filename, _ = SVHN.split_list[split]
        if not (path / filename).is_file() and not download:
            raise DataNotFoundError(
                f"svhn file not found: {path / filename}. Get it with download: true on a "
                f"machine with internet, or download {url} into {path}."
            )
        ds = LocalSVHN(str(path), split=split, download=download)
        sets.append(TensorData(torch.from_numpy(ds.data), torch.from_numpy(ds.labels)))
    return _Loaded(sets[0], sets[1], [str(i) for i in range(10)], "crop")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_tree(folder: Path, classes: list[str] | None = None) -> tuple[TensorData, list[str]]:
    dirs = _class_dirs(folder)
    classes = classes or [d.name for d in dirs]
    files, labels = [], []
    for label, name in enumerate(classes):
        d = folder / name
        if not d.is_dir():
            continue
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise DataNotFoundError(
            f"no images found under {folder} (expected one folder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS[:3])} … files)"
        )
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        images = list(pool.map(_read_image, files, chunksize=64))
    size = Counter(im.shape[:2] for im in images).most_common(1)[0][0]
    if any(im.shape[:2] != size for im in images):
        from PIL import Image

        images = [
            im
            if im.shape[:2] == size
            else np.asarray(Image.fromarray(im).resize((size[1], size[0]), Image.BILINEAR))
            for im in images
        ]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return TensorData(x, torch.tensor(labels, dtype=torch.int64)), classes


@DATASETS.register("imagefolder")
def _imagefolder(root: str | None, download: bool) -> _Loaded:
    path = _require_root("imagefolder", root)
    if not path.is_dir():
        raise DataNotFoundError(
            f"image folder {path} does not exist (expected one sub-folder per class, or "
            "train/ and test/ sub-folders each holding one folder per class)"
        )
    test_dir = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        train, classes = _read_tree(path / "train")
        test, _ = _read_tree(test_dir, classes)
        return _Loaded(train, test, classes, "crop_flip")
    train, classes = _read_tree(path)
    return _Loaded(train, None, classes, "crop_flip")


def _load_npz(path: str, like: TensorData) -> TensorData:
    p = Path(path)
    if not p.is_file():
        raise DataNotFoundError(f"validation set {p} does not exist (val_npz)")
    with np.load(p) as f:
        if "x" not in f or "y" not in f:
            raise ConfigError(f"val_npz {p}: needs arrays 'x' and 'y', found {sorted(f.files)}")
        x, y = f["x"], f["y"]
    c, h, w = like.x.shape[1:]
    if x.ndim == 4 and x.shape[1:] == (h, w, c) and x.shape[1:] != (c, h, w):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (c, h, w) or len(x) != len(y):
        raise ConfigError(
            f"val_npz {p}: x has shape {x.shape} and y {y.shape}; expected x of shape "
            f"(N, {c}, {h}, {w}) or (N, {h}, {w}, {c}) and y of shape (N,)"
        )
    xt = torch.from_numpy(np.ascontiguousarray(x))
    if xt.dtype != torch.uint8:
        xt = xt.float()
    return TensorData(xt, torch.from_numpy(y.astype(np.int64)))


def load_data(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    val_npz: str | None = None,
    split_seed: int = 0,
    download: bool = False,
    augment: str = "auto",
    train_subset: int | None = None,
) -> DataBundle:
    """Load a dataset by name with its train / validation / test splits.

    Args:
        name: one of :data:`DATASETS`.
        root: folder holding the dataset's files (not needed for ``digits``).
        val_fraction: fraction of the training data held out for validation.
        val_npz: an ``.npz`` file with ``x`` and ``y`` used as validation set instead
            (e.g. generated images, as in the paper); the training data then stays whole.
        split_seed: seed of the validation split.
        download: let torchvision download missing files (needs internet).
        augment: ``auto`` (the dataset's default), ``none``, ``crop`` or ``crop_flip``.
        train_subset: keep only this many training points (seeded).
    """
    loader = DATASETS.get(name)
    if augment != "auto" and augment not in AUGMENTS:
        raise ConfigError(f"augment = {augment!r}; allowed: auto, {', '.join(AUGMENTS)}")
    loaded = loader(root, download)
    train, test = loaded.train, loaded.test
    if test is None:
        keep, held = _split(len(train), 0.2, TEST_SPLIT_SEED)
        train, test = _take(train, keep), _take(train, held)
    if val_npz:
        val = _load_npz(val_npz, train)
    else:
        keep, held = _split(len(train), val_fraction, split_seed)
        train, val = _take(train, keep), _take(train, held)
    if train_subset is not None:
        train = train.subset(train_subset, seed=split_seed)
    c, h, w = train.x.shape[1:]
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=len(loaded.class_names),
        in_channels=int(c),
        image_size=(int(h), int(w)),
        class_names=loaded.class_names,
        augment=loaded.augment if augment == "auto" else augment,
    )


# --- batches ----------------------------------------------------------------------------
def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches per epoch for one of ``world_size`` workers."""
    per_worker = -(-n // world_size)
    return per_worker // batch_size if drop_last else -(-per_worker // batch_size)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 8 + stream)


def augment_batch(x: Tensor, policy: str, generator: torch.Generator) -> Tensor:
    """Random crop (zero padding of H/8 pixels, at least 1) and optional horizontal flip.

    Vectorised over the batch; randomness comes from ``generator`` (on the CPU) so
    the result is the same on any device.
    """
    if policy == "none":
        return x
    b, _, h, w = x.shape
    pad = max(1, round(h / 8))
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    if policy == "crop_flip":
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        cols = torch.where(flip, cols.flip(-1), cols)
    batch_idx = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chan_idx = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    return padded[batch_idx, chan_idx, rows, cols]


def iterate_batches(
    data: TensorData,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    device: torch.device | str = "cpu",
    augment: str = "none",
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches: float32 images in [0, 1] and int64 labels on ``device``.

    The order and the augmentation draw from generators seeded by ``(seed, epoch)``,
    never from the global RNGs. With ``world_size > 1`` each rank gets the
    ``rank``-th share of a padded permutation (like ``DistributedSampler``).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment = {augment!r}; allowed: {', '.join(AUGMENTS)}")
    n = len(data)
    if shuffle:
        order = torch.randperm(n, generator=_generator(seed, epoch, 0))
    else:
        order = torch.arange(n)
    if world_size > 1:
        total = -(-n // world_size) * world_size
        order = torch.cat([order, order[: total - n]])[rank::world_size]
    aug_gen = _generator(seed, epoch, 1)
    device = torch.device(device)
    non_blocking = pin_memory and device.type == "cuda"
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x, y = data.x[idx], data.y[idx]
        if non_blocking:
            x, y = x.pin_memory(), y.pin_memory()
        x = to_float(x.to(device, non_blocking=non_blocking))
        y = y.to(device, non_blocking=non_blocking)
        if augment != "none":
            x = augment_batch(x, augment, aug_gen)
        yield x, y
