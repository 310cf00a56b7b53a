"""Generation scores: IS, FID and KID through torch-fidelity, plus a diversity figure.

Scores go through torch-fidelity's real ``calculate_metrics`` against the real
training images of the same dataset. Images are handed over as a
``torch.utils.data.Dataset`` of uint8 ``[3, H, W]`` tensors (grey images are
repeated to three channels); resizing to what the extractor needs is the
extractor's business (Inception-v3 resizes to 299x299 itself).

The reference's features and FID statistics are cached by torch-fidelity
(``cache_root`` + ``input2_cache_name``) under ``<cache_dir>/fidelity``; the
cache name carries the caller's ``reference_key``, the number of images and a
hash of their pixels, so a search computes them once and a different reference
never reuses a stale entry.

The default extractor is torch-fidelity's ``inception-v3-compat``. Its weights
are never downloaded at run time: they come from a local file given by
argument, by ``$ENERGY_STUDY_INCEPTION_WEIGHTS``, or found in torch's hub cache;
otherwise :class:`MissingWeightsError` says which file, where to put it and the
URL it is normally downloaded from. Another extractor is only ever used when
asked for by name (the tests register a small stand-in with
``torch_fidelity.register_feature_extractor``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainables.errors import ConfigError, UserError

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
WEIGHTS_ENV = "ENERGY_STUDY_INCEPTION_WEIGHTS"
#: torch-fidelity's defaults, reduced when there are fewer images.
ISC_SPLITS = 10
KID_SUBSET_SIZE = 1000


class MissingWeightsError(UserError):
    """The Inception weights file is not on this machine."""


def hub_weights_path() -> Path:
    """Where torch's hub cache keeps the Inception weights torch-fidelity would download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(path: str | Path | None = None) -> Path:
    """The local Inception weights file: ``path``, else the env variable, else the hub cache.

    Args:
        path: the weights file, or a folder holding :data:`INCEPTION_FILE`.

    Raises:
        MissingWeightsError: naming the file, where it was looked for and how to get it.
    """
    if path:
        where = Path(path)
    elif os.environ.get(WEIGHTS_ENV):
        where = Path(os.environ[WEIGHTS_ENV])
    else:
        where = hub_weights_path()
    if where.is_file():
        return where
    if where.is_dir() and (where / INCEPTION_FILE).is_file():
        return where / INCEPTION_FILE
    raise MissingWeightsError(
        f"the Inception weights for IS/FID/KID are missing: {INCEPTION_FILE} was not found "
        f"(looked at {where}). Nothing is downloaded at run time: fetch {INCEPTION_URL} on a "
        f"machine with internet and put it at {hub_weights_path()}, or anywhere and pass "
        f"--inception-weights FILE (or set {WEIGHTS_ENV}=FILE); --no-score samples without scores"
    )


def _as_uint8_rgb(images: Tensor, what: str) -> Tensor:
    """``[N, 1 or 3, H, W]`` floats in [0, 1] (or uint8) as a contiguous uint8 ``[N, 3, H, W]``."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"{what} must be images [N, 1 or 3, H, W]; got {tuple(images.shape)}")
    x = images.detach().cpu()
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise UserError(
                f"{what} contain NaN or infinite pixels (a diverged chain?); lower the SGLD "
                "step size or check the model"
            )
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        raise ConfigError(f"{what} must be floats in [0, 1] or uint8, got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class _Uint8Images(Dataset):
    """Images as torch-fidelity wants them: a Dataset of uint8 ``[3, H, W]`` tensors."""

    def __init__(self, images: Tensor, what: str = "images") -> None:
        self.x = _as_uint8_rgb(images, what)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]

    def digest(self) -> str:
        """A short hash of every pixel (and the shape)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(str(tuple(self.x.shape)).encode())
        h.update(self.x.numpy().tobytes())
        return h.hexdigest()


def diversity(images: Tensor, labels: Tensor | None = None, *, max_per_class: int = 2000) -> float:
    """Mean pairwise L2 distance between images of the same class (a simple diversity figure).

    Distances are over all C·H·W pixel values of images in [0, 1] (so an all-black
    and an all-white 8x8 grey image are 8 apart); pairs within each class are
    averaged, then classes are averaged. Higher = more varied samples.

    Args:
        images: ``[N, C, H, W]`` in [0, 1].
        labels: ``[N]`` classes (None: all images form one group).
        max_per_class: only the first this many images of a class count (memory is
            quadratic in it).
    """
    x = images.detach().float().flatten(1)
    if labels is None:
        groups = [x]
    else:
        labels = labels.detach().to(x.device)
        groups = [x[labels == c] for c in labels.unique()]
    values = []
    for g in groups:
        g = g[:max_per_class]
        n = len(g)
        if n < 2:
            continue
        values.append(float(torch.cdist(g, g).sum() / (n * (n - 1))))
    return sum(values) / len(values) if values else 0.0


def generation_scores(
    samples: Tensor,
    reference: Tensor,
    *,
    reference_key: str,
    labels: Tensor | None = None,
    feature_extractor: str = INCEPTION,
    weights_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    cache: bool = True,
    isc: bool = True,
    fid: bool = True,
    kid: bool = True,
    batch_size: int = 64,
    cuda: bool | None = None,
) -> dict[str, float]:
    """IS, FID, KID (torch-fidelity's ``calculate_metrics``) and diversity of ``samples``.

    IS is computed on the samples alone with ``min(10, N)`` splits; FID and KID
    compare them with ``reference``. KID's subset size is ``min(1000, N, N_ref)``.

    Args:
        samples: generated images ``[N, C, H, W]``, floats in [0, 1] (C = 1 or 3).
        reference: real training images of the same dataset ``[M, C, H, W]``, floats in
            [0, 1] or uint8.
        reference_key: a readable name of the reference (dataset, split, classes); the
            cache entry also carries M and a hash of the pixels.
        labels: the samples' classes ``[N]`` (for the per-class diversity).
        feature_extractor: a torch-fidelity extractor name (default Inception-v3, whose
            weights must be on disk: see :func:`inception_weights`).
        weights_path: local Inception weights file or folder (Inception only).
        cache_dir: the cache root (default ``$ENERGY_STUDY_CACHE`` or
            ``~/.cache/energy-study``); torch-fidelity's files go to ``<cache_dir>/fidelity``.
        cache: cache the reference's features and statistics (False: recompute).
        isc, fid, kid: which scores to compute.
        batch_size: images per extractor batch.
        cuda: run the extractor on the GPU (default: when one is available).

    Returns:
        ``gen/is``, ``gen/is_std``, ``gen/fid``, ``gen/kid``, ``gen/kid_std`` (those asked
        for) and ``gen/diversity``.

    Raises:
        MissingWeightsError: Inception asked for and its weights file is not on disk.
        ConfigError: images of the wrong shape, or too few for the asked scores.
    """
    out: dict[str, float] = {}
    if isc or fid or kid:
        kwargs: dict = {}
        if feature_extractor == INCEPTION:  # checked first: fail before any work
            kwargs["feature_extractor_weights_path"] = str(inception_weights(weights_path))
        fake = _Uint8Images(samples, "samples")
        real = _Uint8Images(reference, "reference images")
        n1, n2 = len(fake), len(real)
        if fake.x.shape[1:] != real.x.shape[1:]:
            raise ConfigError(
                f"samples {tuple(samples.shape[1:])} and reference {tuple(reference.shape[1:])} "
                "images differ in shape; score against the same dataset"
            )
        if n1 < 1 or ((fid or kid) and min(n1, n2) < 2):
            raise ConfigError(
                f"too few images to score: {n1} samples, {n2} reference images (FID and KID "
                "need at least 2 of each)"
            )
        if cache:
            from trainables.generation import default_cache_dir

            root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "fidelity"
            root.mkdir(parents=True, exist_ok=True)
            name = f"{reference_key}-n{n2}-{real.digest()}"
            kwargs["cache_root"] = str(root)
            kwargs["input2_cache_name"] = "".join(
                ch if ch.isalnum() or ch in "._-" else "_" for ch in name
            )
        import torch_fidelity

        metrics = torch_fidelity.calculate_metrics(
            input1=fake,
            input2=real,
            cuda=torch.cuda.is_available() if cuda is None else cuda,
            batch_size=batch_size,
            isc=isc,
            fid=fid,
            kid=kid,
            isc_splits=min(ISC_SPLITS, n1),
            kid_subset_size=min(KID_SUBSET_SIZE, n1, n2),
            feature_extractor=feature_extractor,
            cache=cache,
            verbose=False,
            save_cpu_ram=True,  # no DataLoader worker processes: the images are in memory
            **kwargs,
        )
        names = {
            "inception_score_mean": "gen/is",
            "inception_score_std": "gen/is_std",
            "frechet_inception_distance": "gen/fid",
            "kernel_inception_distance_mean": "gen/kid",
            "kernel_inception_distance_std": "gen/kid_std",
        }
        for key, name in names.items():
            if key in metrics:
                out[name] = float(metrics[key])
    out["gen/diversity"] = diversity(samples, labels)
    return out
