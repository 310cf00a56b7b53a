"""Datasets: the real loaders on bundled, shared and self-written data; the batch iterator."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainables.data import TensorData, augment_batch, iterate_batches, load_data, num_batches
from trainables.errors import ConfigError, DataNotFoundError

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-jpeg"


def test_digits_splits() -> None:
    d = load_data("digits")
    assert d.num_classes == 10 and d.in_channels == 1 and d.image_size == (8, 8)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert d.train.x.dtype == torch.float32 and 0 <= d.train.x.min() and d.train.x.max() <= 1
    # test split is fixed; validation split follows split_seed, reproducibly
    other = load_data("digits", split_seed=1)
    assert torch.equal(d.test.x, other.test.x)
    assert not torch.equal(d.val.y, other.val.y) or not torch.equal(d.val.x, other.val.x)
    again = load_data("digits", split_seed=0)
    assert torch.equal(d.val.x, again.val.x)
    # disjoint: no test image appears in train or val (digits has few exact duplicates)
    flat = lambda t: {tuple(r) for r in t.x.flatten(1).tolist()}  # noqa: E731
    assert len(flat(d.test) & flat(d.val)) <= 2


def _write_cifar(root: Path, n_per_batch: int = 6) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels, "batch_label": name}, f)
        written[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [*names, "truck"]}, f)
    return written


def test_cifar10_through_torchvision_format(tmp_path) -> None:
    written = _write_cifar(tmp_path)
    d = load_data("cifar10", str(tmp_path), val_fraction=0.0)
    assert d.class_names[-1] == "truck" and d.in_channels == 3 and d.augment == "crop_flip"
    test_data, test_labels = written["test_batch"]
    assert torch.equal(d.test.x, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert d.test.y.tolist() == test_labels
    assert len(d.train) == 30
    first = written["data_batch_1"][0].reshape(-1, 3, 32, 32)
    assert torch.equal(d.train.x[:6], torch.from_numpy(first))


def test_missing_cifar_names_the_file_and_how_to_get_it(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match=r"data_batch_1.*download"):
        load_data("cifar10", str(tmp_path))
    with pytest.raises(ConfigError, match="data_root"):
        load_data("cifar10", None)


def test_imagefolder_reads_the_shared_cifar_jpegs() -> None:
    if not CIFAR_JPEG.is_dir():
        pytest.skip(f"{CIFAR_JPEG} not present")
    d = load_data("imagefolder", str(CIFAR_JPEG), val_fraction=0.1)
    assert d.class_names[:2] == ["airplane", "automobile"] and d.num_classes == 10
    assert len(d.train) + len(d.val) + len(d.test) == 10_000
    assert d.train.x.shape[1:] == (3, 32, 32) and d.train.x.dtype == torch.uint8
    counts = torch.bincount(torch.cat([d.train.y, d.val.y, d.test.y]), minlength=10)
    assert counts.tolist() == [1000] * 10


def test_imagefolder_layouts(tmp_path) -> None:
    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            folder = tmp_path / "tree" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixel = np.full((12, 12, 3), 40 * label + i, dtype=np.uint8)
                Image.fromarray(pixel).save(folder / f"{i}.png")
    d = load_data("imagefolder", str(tmp_path / "tree"), val_fraction=0.0)
    assert d.class_names == ["cat", "dog"] and len(d.train) == 6 and len(d.test) == 6
    assert d.test.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.test.x[3, 0, 0, 0].item() == 40  # dog/0.png
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_data("imagefolder", str(tmp_path / "nothing"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="no images"):
        load_data("imagefolder", str(tmp_path / "empty"))


def test_val_npz(tmp_path) -> None:
    x = np.random.default_rng(0).random((5, 8, 8, 1)).astype(np.float32)
    np.savez(tmp_path / "gen.npz", x=x, y=np.arange(5))
    d = load_data("digits", val_npz=str(tmp_path / "gen.npz"))
    assert d.val.x.shape == (5, 1, 8, 8) and d.val.y.tolist() == [0, 1, 2, 3, 4]
    assert len(d.train) + len(d.test) == 1797
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 3, 32, 32)), y=np.arange(5))
    with pytest.raises(ConfigError, match="expected x of shape"):
        load_data("digits", val_npz=str(tmp_path / "bad.npz"))
    with pytest.raises(DataNotFoundError):
        load_data("digits", val_npz=str(tmp_path / "missing.npz"))


def _toy(n: int = 50) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) / n, torch.arange(n))


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_point_once_and_leave_global_rng_alone(shuffle: bool) -> None:
    data = _toy()
    state = torch.get_rng_state()
    ys = [y for _, y in iterate_batches(data, 16, shuffle=shuffle, seed=3, epoch=1)]
    assert torch.equal(torch.get_rng_state(), state)
    assert sorted(torch.cat(ys).tolist()) == list(range(50))
    assert len(ys) == num_batches(50, 16) == 4
    again = [y for _, y in iterate_batches(data, 16, shuffle=shuffle, seed=3, epoch=1)]
    assert torch.equal(torch.cat(ys), torch.cat(again))
    other = [y for _, y in iterate_batches(data, 16, shuffle=shuffle, seed=3, epoch=2)]
    assert torch.equal(torch.cat(ys), torch.cat(other)) != shuffle


def test_sharding_covers_the_data() -> None:
    data = _toy(51)
    shards = [
        torch.cat(
            [
                y
                for _, y in iterate_batches(
                    data, 8, shuffle=True, seed=0, epoch=0, rank=r, world_size=2
                )
            ]
        )  # fmt: skip
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 26
    assert set(torch.cat(shards).tolist()) == set(range(51))


def _is_crop(img: torch.Tensor, padded: torch.Tensor) -> bool:
    size = img.shape[-1]
    return any(
        torch.equal(padded[:, dy : dy + size, dx : dx + size], img)
        for dy in range(padded.shape[-2] - size + 1)
        for dx in range(padded.shape[-1] - size + 1)
    )


def test_crop_and_flip_are_shifted_copies() -> None:
    x = torch.rand(6, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = augment_batch(x, "crop", torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert all(_is_crop(out[i], padded[i]) for i in range(6))
    assert not torch.equal(out, x)
    flipped = augment_batch(x, "crop_flip", torch.Generator().manual_seed(1))
    kinds = []
    for i in range(6):
        plain, mirrored = _is_crop(flipped[i], padded[i]), _is_crop(flipped[i].flip(-1), padded[i])
        assert plain or mirrored
        kinds.append(mirrored and not plain)
    assert any(kinds) and not all(kinds), kinds
