"""Generation scores: IS, FID and KID through torch-fidelity, plus a diversity figure.

Scores go through torch-fidelity's real ``calculate_metrics`` against the real
training images of the same dataset; the reference features are cached
(``input2_cache_name``), so a search computes them once.

The default extractor is torch-fidelity's ``inception-v3-compat``. Its weights
are never downloaded at run time: they come from a local file given by
argument, by ``$ENERGY_STUDY_INCEPTION_WEIGHTS``, or found in torch's hub cache;
otherwise :class:`MissingWeightsError` says which file and where to put it.
Another extractor is only ever used when asked for by name (tests register a
small stand-in with ``torch_fidelity.register_feature_extractor``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from trainables.errors import UserError

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
)
WEIGHTS_ENV = "ENERGY_STUDY_INCEPTION_WEIGHTS"


class MissingWeightsError(UserError):
    """The Inception weights file is not on this machine."""


def hub_weights_path() -> Path:
    """Where torch's hub cache keeps the Inception weights torch-fidelity would download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_weights(path: str | Path | None = None) -> Path:
    """The local Inception weights: ``path``, else the env variable, else the hub cache.

    Raises:
        MissingWeightsError: naming the file, where it was looked for and how to get it.
    """
    candidates: list[Path] = []
    if path:
        candidates.append(Path(path))
    elif os.environ.get(WEIGHTS_ENV):
        candidates.append(Path(os.environ[WEIGHTS_ENV]))
    else:
        candidates.append(hub_weights_path())
    for c in candidates:
        if c.is_file():
            return c
        if c.is_dir() and (c / INCEPTION_FILE).is_file():
            return c / INCEPTION_FILE
    looked = ", ".join(str(c) for c in candidates)
    raise MissingWeightsError(
        f"the Inception weights for IS/FID/KID are missing: {INCEPTION_FILE} was not found "
        f"(looked at {looked}). Nothing is downloaded at run time: fetch {INCEPTION_URL} on a "
        f"machine with internet and put it at {hub_weights_path()}, or anywhere and pass "
        f"--inception-weights FILE (or set {WEIGHTS_ENV}=FILE); --no-score samples without scores"
    )


class _Uint8Images(Dataset):
    """Float images in [0, 1] as torch-fidelity wants them: uint8 ``[3, H, W]``."""

    def __init__(self, images: Tensor) -> None:
        x = images.detach().cpu()
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self.x = x.contiguous()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


def diversity(images: Tensor, labels: Tensor | None = None) -> float:
    """Mean pairwise L2 distance (pixels in [0, 1]) between images of the same class."""
    x = images.detach().float().flatten(1)
    groups = [x] if labels is None else [x[labels == c] for c in labels.unique()]
    values = []
    for g in groups:
        if len(g) < 2:
            continue
        d = torch.cdist(g, g)
        n = len(g)
        values.append(float(d.sum() / (n * (n - 1))))
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
    isc: bool = True,
    fid: bool = True,
    kid: bool = True,
    batch_size: int = 64,
) -> dict[str, float]:
    """IS, FID, KID (torch-fidelity) and diversity of ``samples`` against ``reference``.

    Args:
        samples: generated images ``[N, C, H, W]``, floats in [0, 1].
        reference: real training images of the same dataset, floats in [0, 1].
        reference_key: a name for the reference's cached features (dataset and split).
        labels: the samples' classes (for the per-class diversity).
        feature_extractor: a torch-fidelity extractor name (default Inception-v3).
        weights_path: local Inception weights (see :func:`inception_weights`).
        cache_dir: folder of torch-fidelity's feature cache.
        isc, fid, kid: which scores to compute.
        batch_size: images per extractor batch.

    Returns:
        ``gen/is``, ``gen/is_std``, ``gen/fid``, ``gen/kid``, ``gen/kid_std``,
        ``gen/diversity`` (those asked for).
    """
    import torch_fidelity

    kwargs: dict = {}
    if feature_extractor == INCEPTION:
        kwargs["feature_extractor_weights_path"] = str(inception_weights(weights_path))
    n1, n2 = len(samples), len(reference)
    cache_root = Path(cache_dir) if cache_dir is not None else None
    if cache_root is not None:
        cache_root = cache_root / "fidelity"
        cache_root.mkdir(parents=True, exist_ok=True)
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(reference),
        cuda=torch.cuda.is_available(),
        batch_size=batch_size,
        isc=isc,
        fid=fid,
        kid=kid and min(n1, n2) >= 2,
        kid_subset_size=max(2, min(1000, n1, n2)),
        feature_extractor=feature_extractor,
        cache=cache_root is not None,
        cache_root=str(cache_root) if cache_root is not None else None,
        input2_cache_name=f"{reference_key}-{feature_extractor}".replace("/", "_"),
        verbose=False,
        save_cpu_ram=True,  # no DataLoader worker processes: the images are in memory
        **kwargs,
    )
    out: dict[str, float] = {}
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
