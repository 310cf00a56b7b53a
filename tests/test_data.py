"""Datasets: the real loaders on bundled, shared and self-written data; the batch iterator."""

from __future__ import annotations

import os
import pickle
import random
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import (
    DATASETS,
    TensorData,
    augment_batch,
    epoch_order,
    iterate_batches,
    load_data,
    num_batches,
    stratified_split,
    to_float,
)
from trainables.errors import ConfigError, DataNotFoundError

# beside the checkout (../shared/data), as on the development and CI machines;
# ENERGY_STUDY_CIFAR_JPEG points elsewhere
_CANDIDATES = [
    Path(os.environ.get("ENERGY_STUDY_CIFAR_JPEG", "/nonexistent")),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-jpeg",
    Path("/work/shared/data/cifar10-test-jpeg"),
]
CIFAR_JPEG = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[1])
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _rows(*parts: TensorData) -> Counter:
    """Multiset of (label, pixels) over the given splits."""
    return Counter((int(y), tuple(x.flatten().tolist())) for d in parts for x, y in zip(d.x, d.y))


# --- digits -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_digits_shapes_ranges_and_classes(digits) -> None:
    d = digits
    assert d.name == "digits" and d.augment == "none"
    assert d.num_classes == 10 and d.class_names == [str(i) for i in range(10)]
    assert d.in_channels == 1 and d.image_size == (8, 8)
    for split in (d.train, d.val, d.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8) and split.x.shape[0] == len(split)
        assert split.x.min() >= 0 and split.x.max() <= 1
        assert set(split.y.tolist()) == set(range(10))
    assert d.train.x.max() == 1.0  # value 16 maps to exactly 1


def test_digits_splits_partition_the_bundled_set(digits) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    everything = TensorData(
        torch.from_numpy(raw.images.astype(np.float32) / 16).unsqueeze(1),
        torch.from_numpy(raw.target),
    )
    d = digits
    assert (len(d.test), len(d.val), len(d.train)) == (359, 144, 1294)
    # train, val and test together are exactly the 1797 images (as a multiset)
    assert _rows(d.train, d.val, d.test) == _rows(everything)
    # stratified: every class has its share of the test set, up to one image
    per_class = torch.bincount(everything.y, minlength=10).double()
    assert (torch.bincount(d.test.y, minlength=10) - 0.2 * per_class).abs().max() <= 1


def test_digits_test_split_is_fixed_and_val_split_follows_split_seed(digits) -> None:
    other = load_data("digits", split_seed=1)
    assert torch.equal(digits.test.x, other.test.x) and torch.equal(digits.test.y, other.test.y)
    assert _rows(digits.val) != _rows(other.val)
    assert _rows(digits.train, digits.val) == _rows(other.train, other.val)
    again = load_data("digits", split_seed=0)
    assert torch.equal(digits.val.x, again.val.x) and torch.equal(digits.train.x, again.train.x)


def test_subsets_and_fractions() -> None:
    d = load_data("digits", val_fraction=0.25, train_subset=100, test_subset=50)
    assert (len(d.train), len(d.test)) == (100, 50)
    assert len(d.val) == round(0.25 * 1438)
    full = load_data("digits", val_fraction=0.25)
    assert set(_rows(d.train)) <= set(_rows(full.train))
    # the test subset does not move with the split seed
    other = load_data("digits", val_fraction=0.25, test_subset=50, split_seed=5)
    assert torch.equal(d.test.x, other.test.x)
    none = load_data("digits", val_fraction=0.0)
    assert len(none.val) == 0 and len(none.train) == 1438


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'.*cifar10.*digits"):
        load_data("mnist")
    with pytest.raises(ConfigError, match="augment"):
        load_data("digits", augment="rotate")
    with pytest.raises(ConfigError, match="val_fraction"):
        load_data("digits", val_fraction=1.0)
    with pytest.raises(ConfigError, match="train_subset"):
        load_data("digits", train_subset=0)
    with pytest.raises(ConfigError, match="image_size"):
        load_data("digits", image_size=16)
    assert set(DATASETS.names()) >= {"digits", "cifar10", "cifar100", "svhn", "imagefolder"}
    assert load_data("digits", augment="crop_flip").augment == "crop_flip"


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.1, 0.5, 0.9])
def test_stratified_split(fraction: float) -> None:
    y = torch.tensor([0] * 40 + [1] * 7 + [2] * 1 + [3] * 12)
    keep, held = stratified_split(y, fraction, seed=3)
    assert len(held) == round(len(y) * fraction)
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(len(y)))
    counts = torch.bincount(y[held], minlength=4).double()
    assert (counts - fraction * torch.bincount(y).double()).abs().max() <= 1
    again = stratified_split(y, fraction, seed=3)
    assert torch.equal(held, again[1])


# --- TensorData / to_float ------------------------------------------------------------
def test_subset_and_to_float() -> None:
    d = TensorData(torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1), torch.arange(20))
    assert d.subset(None, seed=0) is d and d.subset(20, seed=0) is d
    s = d.subset(5, seed=1)
    assert len(s) == 5 and len(set(s.y.tolist())) == 5
    assert torch.equal(s.x.flatten().long(), s.y)  # rows stay paired with their labels
    assert torch.equal(s.y, d.subset(5, seed=1).y)
    assert not torch.equal(s.y, d.subset(5, seed=2).y)
    u = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.equal(to_float(u), torch.tensor([0.0, 0.2, 1.0]))
    f = torch.rand(3)
    assert to_float(f) is f and to_float(f.double()).dtype == torch.float32
    with pytest.raises(TypeError):
        to_float(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="TensorData"):
        TensorData(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.int64))


# --- CIFAR through torchvision's file format -------------------------------------------
def _write_cifar(root: Path, n_per_batch: int = 6, hundred: bool = False) -> dict:
    """Small files in torchvision's (the official python) CIFAR format."""
    rng = np.random.default_rng(0)
    written = {}
    if hundred:
        folder, names = root / "cifar-100-python", ["train", "test"]
        label_key, meta = "fine_labels", ("meta", "fine_label_names", 100)
    else:
        folder, names = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
        names.append("test_batch")
        label_key, meta = "labels", ("batches.meta", "label_names", 10)
    folder.mkdir(parents=True)
    for name in names:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, meta[2], size=n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels, "batch_label": name}, f, protocol=2)
        written[name] = (data, labels)
    class_names = CIFAR_CLASSES if not hundred else [f"c{i}" for i in range(100)]
    with open(folder / meta[0], "wb") as f:
        pickle.dump({meta[1]: class_names}, f, protocol=2)
    return written


def test_cifar10_through_torchvision_format(tmp_path) -> None:
    written = _write_cifar(tmp_path)
    d = load_data("cifar10", str(tmp_path), val_fraction=0.0)
    assert d.class_names == CIFAR_CLASSES and d.num_classes == 10
    assert d.in_channels == 3 and d.image_size == (32, 32) and d.augment == "crop_flip"
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape == (30, 3, 32, 32)
    test_data, test_labels = written["test_batch"]
    assert d.test.y.tolist() == test_labels
    # the row layout is 1024 red, then green, then blue values, each row-major
    n, c, h, w = 4, 2, 5, 17
    assert d.test.x[n, c, h, w].item() == test_data[n, c * 1024 + h * 32 + w]
    assert torch.equal(d.test.x, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    train_data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(d.train.x, torch.from_numpy(train_data.reshape(-1, 3, 32, 32)))
    assert d.train.y.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # with the default validation split, the points move from train to val
    split = load_data("cifar10", str(tmp_path))
    assert (len(split.train), len(split.val)) == (27, 3)
    assert _rows(split.train, split.val) == _rows(d.train)


def test_cifar100_through_torchvision_format(tmp_path) -> None:
    written = _write_cifar(tmp_path, n_per_batch=8, hundred=True)
    d = load_data("cifar100", str(tmp_path), val_fraction=0.0)
    assert d.num_classes == 100 and d.class_names[7] == "c7"
    assert torch.equal(d.train.x, torch.from_numpy(written["train"][0].reshape(-1, 3, 32, 32)))
    assert d.test.y.tolist() == written["test"][1]


def test_missing_cifar_names_the_file_and_how_to_get_it(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match=r"data_batch_1.*download") as err:
        load_data("cifar10", str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(err.value)  # the official archive URL
    assert isinstance(err.value, FileNotFoundError)
    _write_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="test_batch") as err:
        load_data("cifar10", str(tmp_path / "partial"))
    assert "data_batch_1" not in str(err.value)
    with pytest.raises(DataNotFoundError, match=r"cifar-100-python.*download"):
        load_data("cifar100", str(tmp_path))


def test_failed_download_is_reported(tmp_path, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no internet")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError, match=r"downloading https://.*failed.*no internet"):
        load_data("cifar10", str(tmp_path), download=True)


# --- SVHN through torchvision's file format -----------------------------------------------
def test_svhn_through_torchvision_format(tmp_path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    written = {}
    for split, n in (("train", 7), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # the .mat layout
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)  # digit 0 is stored as 10
        y[0] = 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    d = load_data("svhn", str(tmp_path), val_fraction=0.0)
    assert d.augment == "crop" and d.num_classes == 10 and d.image_size == (32, 32)
    x, y = written["train"]
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape == (7, 3, 32, 32)
    assert d.train.x[3, 2, 5, 9].item() == x[5, 9, 2, 3]  # [N, C, H, W] <- [H, W, C, N]
    assert d.train.y.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]
    assert len(d.test) == 5
    (tmp_path / "test_32x32.mat").unlink()
    with pytest.raises(DataNotFoundError, match=r"test_32x32\.mat.*download"):
        load_data("svhn", str(tmp_path))


# --- image folders --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cifar_jpeg():
    if not CIFAR_JPEG.is_dir():
        pytest.skip(f"{CIFAR_JPEG} not present")
    return load_data("imagefolder", str(CIFAR_JPEG))


def test_imagefolder_reads_the_shared_cifar_jpegs(cifar_jpeg) -> None:
    d = cifar_jpeg
    folders = sorted(p.name for p in CIFAR_JPEG.iterdir() if p.is_dir())
    assert (CIFAR_JPEG / "README.md").is_file()  # present, and ignored
    assert d.class_names == folders == CIFAR_CLASSES and d.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (7200, 800, 2000)
    for split in (d.train, d.val, d.test):
        assert split.x.shape[1:] == (3, 32, 32) and split.x.dtype == torch.uint8
    assert d.augment == "crop_flip" and d.in_channels == 3 and d.image_size == (32, 32)
    counts = torch.bincount(torch.cat([d.train.y, d.val.y, d.test.y]), minlength=10)
    assert counts.tolist() == [1000] * 10
    assert torch.bincount(d.test.y, minlength=10).tolist() == [200] * 10  # stratified
    # labels match folders: an image from each folder is found, with its folder's label
    all_x = torch.cat([d.train.x, d.val.x, d.test.x]).flatten(1)
    all_y = torch.cat([d.train.y, d.val.y, d.test.y])
    for label, name in enumerate(CIFAR_CLASSES):
        img = np.asarray(Image.open(CIFAR_JPEG / name / "0123.jpg").convert("RGB"))
        flat = torch.from_numpy(img.copy()).permute(2, 0, 1).flatten()
        hits = (all_x == flat).all(dim=1).nonzero().flatten()
        assert len(hits) >= 1 and set(all_y[hits].tolist()) == {label}, name


def _png(path: Path, value: int, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[0], size[1], 3) if mode == "RGB" else size
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_imagefolder_train_test_layout(tmp_path) -> None:
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            for i in range(3):
                _png(
                    root / split / cls / f"{i}.png",
                    40 * label + i + (100 if split == "test" else 0),
                )
    _png(root / "train" / "dog" / "nested" / "deep.png", 77)  # class folders are recursive
    _png(root / "train" / ".hidden" / "x.png", 1)  # hidden folder: not a class
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("ignored")
    d = load_data("imagefolder", str(root), val_fraction=0.0)
    assert d.class_names == ["cat", "dog"] and len(d.train) == 7 and len(d.test) == 6
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert d.train.x[:, 0, 0, 0].tolist() == [0, 1, 2, 40, 41, 42, 77]
    assert d.test.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.test.x[:, 1, 5, 5].tolist() == [100, 101, 102, 140, 141, 142]
    assert d.train.x.shape == (7, 3, 12, 12) and d.train.x.dtype == torch.uint8

    # val/ instead of test/
    (root / "test").rename(root / "val")
    assert len(load_data("imagefolder", str(root), val_fraction=0.0).test) == 6
    # a test class that training lacks is an error
    _png(root / "val" / "bird" / "0.png", 5)
    with pytest.raises(ConfigError, match="bird"):
        load_data("imagefolder", str(root))


def test_imagefolder_flat_layout_sizes_and_modes(tmp_path) -> None:
    root = tmp_path / "flat"
    for label, cls in enumerate(("a", "b", "c")):
        for i in range(10):
            _png(root / cls / f"{i:02d}.png", 10 * label + i)
    _png(root / "a" / "big.png", 200, size=(20, 30))  # odd size: resized to 12x12
    _png(root / "b" / "gray.png", 123, mode="L")  # grayscale: converted to RGB
    d = load_data("imagefolder", str(root), val_fraction=0.0)
    assert d.image_size == (12, 12) and d.class_names == ["a", "b", "c"]
    assert len(d.train) + len(d.test) == 32 and len(d.test) == round(0.2 * 32)
    rows = _rows(d.train, d.test)
    assert rows[(0, tuple([200] * 3 * 144))] == 1  # big.png, resized (constant stays)
    assert rows[(1, tuple([123] * 3 * 144))] == 1  # gray.png in all three channels
    # the test split of a flat folder is fixed: independent of split_seed
    other = load_data("imagefolder", str(root), val_fraction=0.2, split_seed=9)
    assert torch.equal(d.test.x, other.test.x)
    resized = load_data("imagefolder", str(root), image_size=(8, 6), val_fraction=0.0)
    assert resized.image_size == (8, 6) and resized.train.x.shape[1:] == (3, 8, 6)


def test_imagefolder_missing_or_empty(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match=r"nothing.*does not exist"):
        load_data("imagefolder", str(tmp_path / "nothing"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        load_data("imagefolder", str(tmp_path / "empty"))
    (tmp_path / "noclasses").mkdir()
    with pytest.raises(DataNotFoundError, match="no class folders"):
        load_data("imagefolder", str(tmp_path / "noclasses"))


# --- validation set from .npz ---------------------------------------------------------------
def test_val_npz(tmp_path) -> None:
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float32)  # NHWC float
    np.savez(tmp_path / "gen.npz", x=x, y=np.arange(5))
    d = load_data("digits", val_npz=str(tmp_path / "gen.npz"))
    assert d.val.x.shape == (5, 1, 8, 8) and d.val.y.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(d.val.x[:, 0], torch.from_numpy(x[..., 0]))
    assert len(d.train) + len(d.test) == 1797  # training data stays whole
    u8 = np.full((3, 1, 8, 8), 255, dtype=np.uint8)  # NCHW uint8
    np.savez(tmp_path / "u8.npz", x=u8, y=np.array([1, 2, 3]))
    v = load_data("digits", val_npz=str(tmp_path / "u8.npz")).val
    assert v.x.dtype == torch.uint8 and to_float(v.x).min() == 1.0


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((5, 3, 32, 32)), "y": np.arange(5)}, "expected x of shape"),
        ({"x": np.zeros((5, 1, 8, 8)), "y": np.arange(4)}, "expected x of shape"),
        ({"images": np.zeros((5, 1, 8, 8)), "y": np.arange(5)}, "needs arrays 'x' and 'y'"),
        ({"x": np.zeros((2, 1, 8, 8)), "y": np.array([0, 10])}, r"labels must lie in 0\.\.9"),
        ({"x": np.full((2, 1, 8, 8), 2.0), "y": np.array([0, 1])}, r"\[0, 1\]"),
    ],
)
def test_val_npz_errors_name_file_and_problem(tmp_path, arrays, message) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=message) as err:
        load_data("digits", val_npz=str(tmp_path / "bad.npz"))
    assert "bad.npz" in str(err.value)


def test_val_npz_missing_or_not_npz(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match="missing.npz"):
        load_data("digits", val_npz=str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(ConfigError, match="junk.npz"):
        load_data("digits", val_npz=str(tmp_path / "junk.npz"))


# --- batches ------------------------------------------------------------------------------
def _toy(n: int = 50) -> TensorData:
    """Point i has label i and every pixel equal to i (uint8)."""
    return TensorData(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1), torch.arange(n))


def _labels(data: TensorData, bs: int, **kw) -> torch.Tensor:
    return torch.cat([y for _, y in iterate_batches(data, bs, **kw)])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_batches_cover_each_point_once_and_leave_global_rngs_alone(shuffle, augment) -> None:
    data = _toy()
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    batches = list(iterate_batches(data, 16, shuffle=shuffle, seed=3, epoch=1, augment=augment))
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(50))  # every index exactly once
    assert [len(y) for _, y in batches] == [16, 16, 16, 2] and num_batches(50, 16) == 4
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        if augment == "none":
            assert torch.equal(x.flatten(), y.float() / 255)  # pixels stay with labels
    assert torch.equal(ys, torch.arange(50)) != shuffle
    again = list(iterate_batches(data, 16, shuffle=shuffle, seed=3, epoch=1, augment=augment))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = _labels(data, 16, shuffle=shuffle, seed=3, epoch=2)
    assert torch.equal(ys, other) != shuffle
    other_seed = _labels(data, 16, shuffle=shuffle, seed=4, epoch=1)
    assert torch.equal(ys, other_seed) != shuffle


def test_drop_last_and_num_batches() -> None:
    data = _toy(50)
    ys = list(iterate_batches(data, 16, shuffle=True, seed=0, epoch=0, drop_last=True))
    assert len(ys) == num_batches(50, 16, drop_last=True) == 3
    assert all(len(y) == 16 for _, y in ys)
    for n, bs, drop, ws in [
        (50, 16, False, 2),
        (51, 8, True, 2),
        (7, 4, False, 3),
        (0, 4, False, 1),
    ]:
        counted = sum(
            1
            for rank in range(ws)
            for _ in iterate_batches(
                _toy(n), bs, shuffle=True, seed=1, epoch=0, drop_last=drop, rank=rank, world_size=ws
            )
        )
        assert counted == ws * num_batches(n, bs, drop, ws), (n, bs, drop, ws)


@pytest.mark.parametrize("n, world_size", [(51, 2), (50, 2), (10, 3), (2, 4)])
def test_sharding_covers_the_data_like_distributed_sampler(n: int, world_size: int) -> None:
    data = _toy(n)
    shards = [
        _labels(data, 8, shuffle=True, seed=0, epoch=5, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    per_rank = -(-n // world_size)
    assert all(len(s) == per_rank for s in shards)
    assert set(torch.cat(shards).tolist()) == set(range(n))
    # one permutation shared by all ranks, padded by wrapping, rank r takes perm[r::ws]
    perm = epoch_order(n, shuffle=True, seed=0, epoch=5).tolist()
    padded = (perm * world_size)[: per_rank * world_size]
    for r in range(world_size):
        assert shards[r].tolist() == padded[r::world_size]


def _crop_offsets(img: torch.Tensor, padded: torch.Tensor) -> list[tuple[int, int]]:
    h, w = img.shape[-2:]
    return [
        (dy, dx)
        for dy in range(padded.shape[-2] - h + 1)
        for dx in range(padded.shape[-1] - w + 1)
        if torch.equal(padded[:, dy : dy + h, dx : dx + w], img)
    ]


def test_crop_is_a_shifted_copy() -> None:
    x = torch.rand(64, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = [_crop_offsets(out[i], padded[i]) for i in range(64)]
    assert all(len(o) == 1 for o in offsets)  # each sample is one crop of its padded image
    shifts = {o[0] for o in offsets}
    assert len(shifts) > 10 and {dy for dy, _ in shifts} <= set(range(9))
    # one sample against a manual crop
    dy, dx = offsets[0][0]
    manual = torch.zeros(3, 32, 32)
    src = x[0, :, max(0, dy - 4) : 32 + min(0, dy - 4), max(0, dx - 4) : 32 + min(0, dx - 4)]
    manual[:, max(0, 4 - dy) : 32 - max(0, dy - 4), max(0, 4 - dx) : 32 - max(0, dx - 4)] = src
    assert torch.equal(out[0], manual)
    # same generator state: same crops; padding for 8x8 images is 1 pixel
    assert torch.equal(out, augment_batch(x, "crop", torch.Generator().manual_seed(0)))
    small = torch.rand(32, 1, 8, 8)
    out8 = augment_batch(small, "crop", torch.Generator().manual_seed(0))
    pad8 = torch.nn.functional.pad(small, (1, 1, 1, 1))
    assert all(len(_crop_offsets(out8[i], pad8[i])) == 1 for i in range(32))
    assert augment_batch(x, "none", torch.Generator()) is x


def test_crop_flip_flips_about_half() -> None:
    x = torch.rand(64, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(1))
    flipped = []
    for i in range(64):
        plain = _crop_offsets(out[i], padded[i])
        mirrored = _crop_offsets(out[i].flip(-1), padded[i])
        assert len(plain) + len(mirrored) == 1
        flipped.append(bool(mirrored))
    assert 10 < sum(flipped) < 54, sum(flipped)


def test_augmented_batches_are_deterministic_per_epoch() -> None:
    data = TensorData((torch.rand(40, 3, 32, 32) * 255).to(torch.uint8), torch.arange(40))

    def run(epoch: int, rank: int = 0) -> list[torch.Tensor]:
        kw = {"seed": 7, "epoch": epoch, "augment": "crop_flip", "rank": rank, "world_size": 2}
        return [x for x, _ in iterate_batches(data, 16, shuffle=False, **kw)]

    a, b, c, r1 = run(0), run(0), run(1), run(0, rank=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert not all(torch.equal(u, v) for u, v in zip(a, r1))  # ranks see other points
    assert a[0].shape == (16, 3, 32, 32) and 0 <= a[0].min() and a[0].max() <= 1


def test_bad_batch_arguments() -> None:
    with pytest.raises(ConfigError, match="augment"):
        next(iterate_batches(_toy(), 4, shuffle=False, seed=0, epoch=0, augment="rotate"))
    with pytest.raises(ConfigError, match="batch_size"):
        next(iterate_batches(_toy(), 0, shuffle=False, seed=0, epoch=0))
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(_toy(), 4, shuffle=False, seed=0, epoch=0, rank=2, world_size=2))
