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
batches are converted to float in [0, 1] and augmented on the device. A seeded,
class-stratified held-out split of the training data is the validation set
unless an ``.npz`` validation set is given. The test split of datasets that have
none (digits, a flat image folder) is drawn with a fixed seed, so it never moves
with the training or split seed.

Randomness: data order and augmentation come from private ``torch.Generator``
objects seeded from ``(seed, epoch)``; the global torch / numpy / ``random``
states are never touched (the training loop relies on them for bit-exact resume).
"""

from __future__ import annotations

import os
import pickle
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.config import AUGMENTS
from trainables.errors import ConfigError, DataNotFoundError
from trainables.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
TEST_SPLIT_SEED = 0  #: seed of the test split of datasets without one (never the run's seed)
TEST_FRACTION = 0.2  #: fraction of such datasets held out as test set
_TV_DECODABLE = (".jpg", ".jpeg", ".png")  # decoded by torchvision.io (faster), others by PIL
_U64 = (1 << 64) - 1
_DECODE_PROBE = 64  # images decoded serially to time them
_THREADED_DECODE_SECONDS = 3e-4  # per image; above this the rest is decoded by threads


# --- containers -----------------------------------------------------------------------
@dataclass
class TensorData:
    """Images and labels in memory.

    Attributes:
        x: images ``[N, C, H, W]``, uint8 (0..255) or float32 in [0, 1].
        y: labels ``[N]``, int64 class indices.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorData needs x [N, C, H, W] and y [N]; got x {tuple(self.x.shape)} "
                f"and y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int) -> TensorData:
        """A seeded random subset, in the original order.

        Args:
            n: number of points to keep; ``None`` or ``n >= N`` keeps all (returns ``self``).
            seed: seed of the permutation whose first ``n`` entries are kept.
        """
        if n is None or n >= len(self):
            return self
        return self.take(self.subset_indices(n, seed))

    def subset_indices(self, n: int | None, seed: int) -> Tensor:
        """The indices (ascending) of the points :meth:`subset` keeps."""
        if n is None or n >= len(self):
            return torch.arange(len(self))
        if n < 0:
            raise ConfigError(f"subset size must be >= 0, got {n}")
        perm = torch.randperm(len(self), generator=_seeded(seed))
        return perm[:n].sort().values

    def take(self, idx: Tensor) -> TensorData:
        """The points at indices ``idx`` (a 1-D int64 tensor)."""
        return TensorData(self.x[idx], self.y[idx])


@dataclass
class DataBundle:
    """A dataset ready for training.

    Attributes:
        train: training points (validation points removed unless ``val_npz`` was given).
        val: validation points (model selection).
        test: test points (final scores only).
        num_classes: number of classes (``len(class_names)``).
        in_channels: image channels C.
        image_size: ``(H, W)`` in pixels.
        class_names: class index -> name.
        augment: the resolved augmentation policy (``none``, ``crop`` or ``crop_flip``).
        name: the dataset's registry name.
    """

    train: TensorData
    val: TensorData
    test: TensorData
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: list[str]
    augment: str
    name: str


class LoadedData(NamedTuple):
    """What a dataset loader returns: ``(train, test, class_names, default_augment)``."""

    train: TensorData
    test: TensorData
    class_names: list[str]
    default_augment: str


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        load: ``load(root, *, download: bool, image_size: tuple[int, int] | None)`` returns
            a :class:`LoadedData`; ``root`` is the ``data_root`` folder (``None`` unless
            ``needs_root``).
        needs_root: whether it reads files under ``data_root`` (else it ships with a library).
    """

    load: Callable[..., LoadedData]
    needs_root: bool = True


DATASETS: Registry[DatasetSpec] = Registry("dataset", DatasetSpec)


def to_float(x: Tensor) -> Tensor:
    """A batch of images as float32 in [0, 1].

    Args:
        x: uint8 images (0..255, divided by 255) or floating images already in [0, 1]
            (float32 returned as is, other float types cast to float32).
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if x.is_floating_point():
        return x if x.dtype == torch.float32 else x.to(torch.float32)
    raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")


# --- seeded splits ------------------------------------------------------------------------
def _seeded(seed: int) -> torch.Generator:
    """A fresh CPU generator (never the global one) seeded with ``seed`` (any int)."""
    return torch.Generator().manual_seed(seed & _U64)


def _mixed_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from several ints (no global RNG involved)."""
    words = np.random.SeedSequence([p & _U64 for p in parts]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(keep, held_out)`` of a seeded, class-stratified random split.

    Exactly ``round(N * fraction)`` points are held out, each class contributing its
    share up to ±1 (systematic sampling over a class-grouped random order, so even
    classes with a single point or tiny fractions work).

    Args:
        y: labels ``[N]``.
        fraction: fraction of the points to hold out, in [0, 1).
        seed: seed of the split.

    Returns:
        Sorted int64 index tensors ``keep`` and ``held_out``, disjoint, covering ``0..N-1``.
    """
    n = len(y)
    k = int(round(n * fraction))
    if k <= 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    g = _seeded(seed)
    perm = torch.randperm(n, generator=g)
    grouped = perm[torch.sort(y[perm], stable=True).indices]  # by class, random within
    step = n / k
    start = float(torch.rand((), generator=g, dtype=torch.float64)) * step
    pos = (start + step * torch.arange(k, dtype=torch.float64)).floor().long().clamp_(max=n - 1)
    held = torch.zeros(n, dtype=torch.bool)
    held[grouped[pos]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def _fixed_test_split(data: TensorData) -> tuple[TensorData, TensorData]:
    keep, held = stratified_split(data.y, TEST_FRACTION, TEST_SPLIT_SEED)
    return data.take(keep), data.take(held)


def require_root(name: str, root: str | Path | None) -> Path:
    """``root`` as a path; :class:`ConfigError` naming ``data_root`` when it is not set."""
    if root is None or str(root) == "":
        raise ConfigError(
            f"data_root must be set for dataset {name!r} (the folder holding its files)"
        )
    return Path(root).expanduser()


# --- digits -------------------------------------------------------------------------------
@DATASETS.register("digits", needs_root=False)
def _digits(root: Path | None, *, download: bool, image_size: tuple[int, int] | None) -> LoadedData:
    """scikit-learn's 1797 8×8 digits (values 0..16 → float32 / 16), fixed 20% test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = _fixed_test_split(TensorData(x, y))
    return LoadedData(train, test, [str(i) for i in range(10)], "none")


# --- torchvision CIFAR / SVHN ---------------------------------------------------------------
@cache
def _local_cifar(name: str) -> type:
    """torchvision's CIFAR reader that checks the files exist instead of their md5 sums."""
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class LocalCIFAR(base):  # type: ignore[misc, valid-type]
        def _check_integrity(self) -> bool:
            return not _missing_cifar_files(Path(self.root), type(self))

        def _load_meta(self) -> None:
            meta = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(meta, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    LocalCIFAR.__name__ = LocalCIFAR.__qualname__ = f"Local{base.__name__}"
    return LocalCIFAR


def _missing_cifar_files(root: Path, cls: Any) -> list[Path]:
    folder = root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [folder / n for n in names if not (folder / n).is_file()]


def _torchvision_cifar(
    name: str, path: Path, *, download: bool, image_size: tuple[int, int] | None
) -> LoadedData:
    cls = _local_cifar(name)
    missing = _missing_cifar_files(path, cls)
    if missing and not download:
        shown = ", ".join(str(m) for m in missing[:3]) + (" …" if len(missing) > 3 else "")
        raise DataNotFoundError(
            f"{name} files not found: {shown}. Set download: true on a machine with internet "
            f"(torchvision fetches {cls.url}), or download that archive yourself and place "
            f"the extracted {cls.base_folder} folder under {path}."
        )
    sets = []
    for train in (True, False):
        try:
            ds = cls(str(path), train=train, download=download)
        except (OSError, RuntimeError) as e:  # failed download (URLError is an OSError)
            if not download:
                raise
            raise DataNotFoundError(
                f"{name}: downloading {cls.url} into {path} failed ({e}). Download it on a "
                f"machine with internet and place the extracted {cls.base_folder} folder "
                f"under {path}."
            ) from e
        except (EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
            raise DataNotFoundError(
                f"{name} files under {path / cls.base_folder} cannot be read ({e!r}); they "
                f"are truncated or not the python version of the dataset. Replace them with "
                f"the extracted {cls.url}."
            ) from e
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        sets.append(TensorData(x, torch.tensor(ds.targets, dtype=torch.int64)))
    return LoadedData(sets[0], sets[1], [str(c) for c in ds.classes], "crop_flip")


@DATASETS.register("cifar10")
def _cifar10(path: Path, *, download: bool, image_size: tuple[int, int] | None) -> LoadedData:
    """CIFAR-10 from torchvision's ``cifar-10-batches-py`` folder under ``root``."""
    return _torchvision_cifar("cifar10", path, download=download, image_size=image_size)


@DATASETS.register("cifar100")
def _cifar100(path: Path, *, download: bool, image_size: tuple[int, int] | None) -> LoadedData:
    """CIFAR-100 (fine labels) from torchvision's ``cifar-100-python`` folder under ``root``."""
    return _torchvision_cifar("cifar100", path, download=download, image_size=image_size)


@cache
def _local_svhn() -> type:
    from torchvision.datasets import SVHN

    class LocalSVHN(SVHN):
        def _check_integrity(self) -> bool:
            return (Path(self.root) / self.filename).is_file()

    return LocalSVHN


@DATASETS.register("svhn")
def _svhn(path: Path, *, download: bool, image_size: tuple[int, int] | None) -> LoadedData:
    """SVHN from torchvision's ``train_32x32.mat`` and ``test_32x32.mat`` under ``root``."""
    cls = _local_svhn()
    missing = [
        (url, path / fname)
        for url, fname, _ in (cls.split_list["train"], cls.split_list["test"])
        if not (path / fname).is_file()
    ]
    if missing and not download:
        raise DataNotFoundError(
            f"svhn files not found: {', '.join(str(p) for _, p in missing)}. Set download: true "
            f"on a machine with internet, or download {' and '.join(u for u, _ in missing)} "
            f"into {path}."
        )
    sets = []
    for split in ("train", "test"):
        try:
            ds = cls(str(path), split=split, download=download)
        except (OSError, RuntimeError) as e:
            if not download:
                raise
            raise DataNotFoundError(
                f"svhn: downloading {cls.split_list[split][0]} into {path} failed ({e}); "
                f"download it on a machine with internet and place it in {path}."
            ) from e
        except (ValueError, KeyError) as e:  # scipy cannot parse the .mat file
            raise DataNotFoundError(
                f"svhn file {path / cls.split_list[split][1]} cannot be read ({e!r}); replace "
                f"it with {cls.split_list[split][0]}."
            ) from e
        x = torch.from_numpy(np.ascontiguousarray(ds.data))
        sets.append(TensorData(x, torch.from_numpy(ds.labels.astype(np.int64).reshape(-1))))
    return LoadedData(sets[0], sets[1], [str(i) for i in range(10)], "crop")


# --- image folders --------------------------------------------------------------------------
def _find_classes(folder: Path) -> list[str]:
    """Class folder names, sorted like torchvision's ``ImageFolder`` (hidden folders skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image paths and labels, walking each class folder recursively in sorted order."""
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, fnames in sorted(os.walk(class_dir, followlinks=True)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in sorted(fnames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, f))
                    labels.append(label)
    return files, labels


@cache
def _torchvision_decoder() -> Callable[[Tensor], Tensor] | None:
    """torchvision.io's RGB decoder (about 3× faster than PIL on small JPEGs), if present."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # torchvision announced its removal (superseded by torchcodec)
        return None
    return lambda raw: decode_image(raw, mode=ImageReadMode.RGB)


def _decode(path: str) -> Tensor:
    """One image file as uint8 ``[3, H, W]`` RGB (torchvision.io for JPEG/PNG, else PIL)."""
    decoder = _torchvision_decoder() if path.lower().endswith(_TV_DECODABLE) else None
    if decoder is not None:
        try:
            with open(path, "rb") as f:
                raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
            img = decoder(raw)
            if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3:
                return img
        except (RuntimeError, ValueError):
            pass  # unusual variant (CMYK, 16 bit, truncated, ...): let PIL try or explain
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataNotFoundError(f"cannot read image {path} ({e}); remove or replace it") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _decode_all(files: list[str]) -> list[Tensor]:
    """Decode ``files`` in order; a thread pool is used only where it pays.

    Decoding releases the GIL, so threads help for large images; for small ones
    (CIFAR-size: ~0.05 ms each) file opening and Python overhead dominate and
    threads measured 2× slower, so a serial probe of the first files decides.
    """
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # torchvision warns on every decode that it is deprecated
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        probe = files[:_DECODE_PROBE]
        t0 = time.perf_counter()
        images = [_decode(f) for f in probe]
        per_file = (time.perf_counter() - t0) / max(1, len(probe))
        rest = files[len(probe) :]
        if workers > 1 and len(rest) >= 2 * workers and per_file > _THREADED_DECODE_SECONDS:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                images.extend(pool.map(_decode, rest, chunksize=16))
        else:
            images.extend(_decode(f) for f in rest)
    return images


def _resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    from PIL import Image

    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def _read_tree(
    folder: Path, classes: list[str], size: tuple[int, int] | None
) -> tuple[TensorData, tuple[int, int]]:
    """All images under ``folder/<class>/`` as uint8 ``[N, 3, H, W]``.

    Args:
        folder: folder holding one sub-folder per class.
        classes: class names, their position is the label.
        size: ``(H, W)`` to resize every image to; ``None`` = the most common size.
    """
    files, labels = _image_files(folder, classes)
    if not files:
        raise DataNotFoundError(
            f"no images found under {folder} (expected one folder per class holding "
            f"{', '.join(IMAGE_EXTENSIONS[:4])} … files)"
        )
    images = _decode_all(files)
    if size is None:
        size = Counter(tuple(im.shape[1:]) for im in images).most_common(1)[0][0]
    images = [im if tuple(im.shape[1:]) == size else _resize(im, size) for im in images]
    data = TensorData(torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    return data, (int(size[0]), int(size[1]))


@DATASETS.register("imagefolder")
def _imagefolder(path: Path, *, download: bool, image_size: tuple[int, int] | None) -> LoadedData:
    """Any folder-per-class tree, decoded into memory as uint8 RGB.

    Layouts: ``root/train/<class>/…`` with ``root/test/<class>/…`` (or ``val/``), or
    ``root/<class>/…`` (then a fixed-seed 20% test split). Files directly under a
    split folder (a README) and hidden entries are ignored; class folders are read
    recursively.
    """
    if not path.is_dir():
        raise DataNotFoundError(
            f"image folder {path} does not exist (expected one sub-folder per class, or "
            "train/ and test/ sub-folders each holding one folder per class)"
        )
    if (path / "train").is_dir():
        train_dir = path / "train"
        test_dir = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    else:  # the classes directly under root
        train_dir, test_dir = path, None
    classes = _find_classes(train_dir)
    if not classes:
        raise DataNotFoundError(f"no class folders under {train_dir} (one folder per class)")
    train, size = _read_tree(train_dir, classes, image_size)
    if test_dir is None:
        train, test = _fixed_test_split(train)
    else:
        extra = sorted(set(_find_classes(test_dir)) - set(classes))
        if extra:
            raise ConfigError(
                f"{test_dir} has class folders that {train_dir} lacks: {', '.join(extra[:5])}"
            )
        test, _ = _read_tree(test_dir, classes, size)
    return LoadedData(train, test, classes, "crop_flip")


# --- validation set from .npz ------------------------------------------------------------------
def load_npz(path: str | Path, like: TensorData, num_classes: int) -> TensorData:
    """A validation set from an ``.npz`` file with arrays ``x`` and ``y``.

    Args:
        path: the file.
        like: data whose channels and image size ``x`` must match.
        num_classes: labels must lie in ``0..num_classes-1``.

    ``x`` may be ``(N, C, H, W)`` or ``(N, H, W, C)`` (``(N, H, W)`` for one channel),
    uint8 0..255 (any integer type with values in that range) or float in [0, 1].
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"validation set {p} does not exist (val_npz)")
    try:
        loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"val_npz {p} is not a readable .npz file ({e})") from e
    if not hasattr(loaded, "files"):  # a plain .npy array
        raise ConfigError(f"val_npz {p} is a single array; expected an .npz with 'x' and 'y'")
    with loaded:
        if "x" not in loaded.files or "y" not in loaded.files:
            raise ConfigError(
                f"val_npz {p}: needs arrays 'x' and 'y', found {sorted(loaded.files)}"
            )
        try:
            x, y = loaded["x"], loaded["y"]
        except (ValueError, OSError, EOFError) as e:
            raise ConfigError(f"val_npz {p}: arrays cannot be read ({e})") from e
    c, h, w = (int(s) for s in like.x.shape[1:])
    if x.ndim == 3 and c == 1:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1:] != (c, h, w) or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(
            f"val_npz {p}: x has shape {x.shape} and y {y.shape}; expected x of shape "
            f"(N, {c}, {h}, {w}) or (N, {h}, {w}, {c}) and y of shape (N,) to match the dataset"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"val_npz {p}: y must hold integer labels, got dtype {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ConfigError(
            f"val_npz {p}: labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}"
        )
    if np.issubdtype(x.dtype, np.integer):
        if len(x) and (x.min() < 0 or x.max() > 255):
            raise ConfigError(f"val_npz {p}: integer images must lie in 0..255")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    elif np.issubdtype(x.dtype, np.floating):
        if len(x) and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise ConfigError(f"val_npz {p}: float images must lie in [0, 1]")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise ConfigError(f"val_npz {p}: x must be uint8 or float, got dtype {x.dtype}")
    return TensorData(xt, torch.from_numpy(y.astype(np.int64)))


# --- entry point --------------------------------------------------------------------------
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
    test_subset: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> DataBundle:
    """Load a dataset by name with its train / validation / test splits.

    Args:
        name: a name in :data:`DATASETS` (unknown names raise :class:`ConfigError`).
        root: folder holding the dataset's files (``data_root``; for datasets that ``needs_root``).
        val_fraction: fraction in [0, 1) of the training data held out (stratified by
            class, seeded by ``split_seed``) as validation set; ignored with ``val_npz``.
        val_npz: an ``.npz`` file with ``x`` and ``y`` used as validation set instead
            (e.g. generated images, as in the paper); the training data then stays whole.
        split_seed: seed of the validation split and of ``train_subset``.
        download: let torchvision download missing files (needs internet).
        augment: ``auto`` (the dataset's default), ``none``, ``crop`` or ``crop_flip``.
        train_subset: keep only this many training points (seeded by ``split_seed``).
        test_subset: keep only this many test points (fixed seed, independent of
            ``split_seed``).
        image_size: ``imagefolder`` only: resize every image to this size in pixels
            (``H`` or ``(H, W)``); default the most common size. Other datasets accept
            only their native size here.
    """
    dataset = DATASETS.get(name)
    path = require_root(name, root) if dataset.needs_root else None
    if augment != "auto" and augment not in AUGMENTS:
        raise ConfigError(f"augment = {augment!r}; allowed: auto, {', '.join(AUGMENTS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction = {val_fraction} must lie in [0, 1)")
    for field_name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and value < 1:
            raise ConfigError(f"{field_name} = {value} must be >= 1 (or None for all)")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ConfigError(f"image_size = {image_size} must be positive")

    train, test, class_names, default_augment = dataset.load(
        path, download=download, image_size=size
    )
    c, h, w = (int(s) for s in train.x.shape[1:])
    if size is not None and size != (h, w):
        raise ConfigError(
            f"image_size = {image_size} but dataset {name!r} has {h}x{w} images and cannot be "
            f"resized (only imagefolder resizes)"
        )
    if val_npz:
        val = load_npz(val_npz, train, len(class_names))
    else:
        keep, held = stratified_split(train.y, val_fraction, split_seed)
        train, val = train.take(keep), train.take(held)
    train = train.subset(train_subset, seed=split_seed)
    test = test.subset(test_subset, seed=TEST_SPLIT_SEED)
    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        in_channels=c,
        image_size=(h, w),
        class_names=list(class_names),
        augment=default_augment if augment == "auto" else augment,
        name=name,
    )


# --- batches ------------------------------------------------------------------------------
def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Batches per epoch for one of ``world_size`` workers.

    Args:
        n: number of points in the dataset.
        batch_size: points per batch (per worker).
        drop_last: whether a final short batch is dropped.
        world_size: number of data-parallel workers (each gets ``ceil(n / world_size)``).
    """
    per_worker = -(-n // world_size)
    return per_worker // batch_size if drop_last else -(-per_worker // batch_size)


def epoch_order(
    n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> Tensor:
    """The indices one worker visits in one epoch (CPU int64).

    The permutation comes from a generator seeded with ``seed * 1_000_003 + epoch``,
    the same on every rank; like ``DistributedSampler`` it is padded (by wrapping
    around) to a multiple of ``world_size`` and rank ``r`` takes ``perm[r::world_size]``.
    """
    if shuffle:
        order = torch.randperm(n, generator=_seeded(seed * 1_000_003 + epoch))
    else:
        order = torch.arange(n)
    if world_size > 1 and n > 0:
        total = -(-n // world_size) * world_size
        if total > n:
            order = order.repeat(-(-total // n))[:total]
        order = order[rank::world_size]
    return order


def augment_batch(x: Tensor, policy: str, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding, and for ``crop_flip`` a horizontal flip with p = 0.5.

    Vectorised over the batch: one pad, one gather (no loop over samples).

    Args:
        x: float images ``[B, C, H, W]`` on any device.
        policy: ``none``, ``crop`` or ``crop_flip``.
        generator: CPU generator the offsets and flips are drawn from (then moved to
            ``x.device``), so the result is the same on every device.

    The padding is ``max(1, round(H / 8))`` rows and ``max(1, round(W / 8))`` columns
    (4 pixels for 32×32 images); offsets are uniform in ``0..2·pad``.
    """
    if policy == "none":
        return x
    if policy not in AUGMENTS:
        raise ConfigError(f"augment = {policy!r}; allowed: {', '.join(AUGMENTS)}")
    b, c, h, w = x.shape
    if b == 0:
        return x
    py, px = max(1, round(h / 8)), max(1, round(w / 8))
    padded = F.pad(x, (px, px, py, py))
    pw = w + 2 * px
    dy = torch.randint(0, 2 * py + 1, (b, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * px + 1, (b, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    if policy == "crop_flip":
        flip = torch.rand(b, 1, 1, generator=generator) < 0.5
        cols = torch.where(flip, cols.flip(-1), cols)
    idx = (rows * pw + cols).view(b, 1, h * w).to(x.device)
    out = padded.reshape(b, c, -1).gather(2, idx.expand(b, c, h * w))
    return out.view(b, c, h, w)


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

    Args:
        data: the points (on the CPU, or already on ``device``).
        batch_size: points per batch on this worker.
        shuffle: visit the points in a seeded random order (else in index order).
        seed: the run's seed; order and augmentation depend only on ``(seed, epoch)``
            (augmentation also on ``rank``), never on the global RNGs.
        epoch: epoch number (0-based), so every epoch has its own order.
        device: where the batches go; uint8 images are moved first, then converted.
        augment: ``none``, ``crop`` or ``crop_flip`` (see :func:`augment_batch`).
        drop_last: drop a final short batch.
        rank, world_size: this worker's share of the epoch (see :func:`epoch_order`).
        pin_memory: pin each CPU batch and copy it asynchronously (CUDA only).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment = {augment!r}; allowed: {', '.join(AUGMENTS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    order = epoch_order(
        len(data), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size
    )
    aug_gen = _seeded(_mixed_seed(seed, epoch, rank, 1)) if augment != "none" else None
    device = torch.device(device)
    src = data.x.device
    pin = pin_memory and device.type == "cuda" and src.type == "cpu"
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        if src.type != "cpu":
            idx = idx.to(src)
        x, y = data.x[idx], data.y[idx]
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        x = to_float(x.to(device, non_blocking=pin))
        y = y.to(device, non_blocking=pin)
        if aug_gen is not None:
            x = augment_batch(x, augment, aug_gen)
        yield x, y
