"""Sampling images from a robust classifier: initialisations and SGLD with momentum (METHODS.md §5).

Eq. 7 of the paper, on the joint energy E(x, y) = -logit_y of a chosen class::

    v_0 = 0
    v_{n+1} = ζ v_n − (η/2) ∇_x E(x_n, y)
    x_{n+1} = clamp(x_n + v_{n+1} + ε_n, 0, 1),   ε_n ~ N(0, γ² I)

**γ is a standard deviation here** (:data:`NOISE_IS_STD`), as in the authors'
reference code and at the scale of the paper's γ = 0.001; METHODS.md writes
N(0, γ I). ζ = 0 is plain SGLD.

Initialisations (registry :data:`INITS`): ``random`` (uniform noise, JEM),
``gaussian`` (one Gaussian per class with the class's mean and covariance) and
``pca`` (the paper's: x0 = μ_y + Σ_i λ_i α_i U_i over the components that keep
a fraction of the class variance, α ~ N(0, σ)). **λ_i are the singular values
of the class's centred data matrix** (``sklearn.decomposition.PCA.singular_values_``,
as in the reference code), so σ ≈ 0.01 moves x0 by about 0.01·sqrt(n_y - 1)
class standard deviations along each kept component. Class statistics are
fitted once per dataset and cached on disk (:func:`fit_class_stats`), never
per batch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trainables.energy import joint_energy
from trainables.errors import ConfigError
from trainables.registry import Registry

#: γ of Eq. 7 is the standard deviation of the noise (not its variance).
NOISE_IS_STD = True
CACHE_ENV = "ENERGY_STUDY_CACHE"


def default_cache_dir() -> Path:
    """``$ENERGY_STUDY_CACHE`` or ``~/.cache/energy-study``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "energy-study")


@dataclass
class ClassStats:
    """Per-class statistics of the training images (flattened to D = C·H·W).

    Attributes:
        shape: image shape ``(C, H, W)``.
        means: ``[K, D]`` class means.
        variances: per class, the covariance eigenvalues ``[r]``, descending.
        components: per class, the matching unit eigenvectors ``[r, D]``.
        singular_values: per class, singular values of the centred data ``[r]``.
        counts: ``[K]`` images per class.
        from_cache: whether these were read from the disk cache.
    """

    shape: tuple[int, int, int]
    means: Tensor
    variances: list[Tensor]
    components: list[Tensor]
    singular_values: list[Tensor]
    counts: Tensor
    from_cache: bool = False

    def kept_components(self, cls: int, retained_variance: float) -> int:
        """Smallest k whose components explain at least ``retained_variance`` of the variance."""
        check_retained(retained_variance)
        var = self.variances[cls].double()
        total = var.sum()
        if total <= 0:
            return 0
        ratio = torch.cumsum(var, 0) / total
        # tolerance for float round-off when the fraction is exactly reachable (e.g. 1.0)
        k = int(
            torch.searchsorted(ratio, torch.tensor(retained_variance - 1e-12, dtype=ratio.dtype))
        )
        return min(k + 1, len(var))


def check_retained(retained_variance: float) -> None:
    """Retained variance is a fraction in (0, 1]."""
    if not 0.0 < retained_variance <= 1.0:
        raise ConfigError(
            f"retained_variance = {retained_variance!r} is out of range; allowed: > 0 and <= 1"
        )


def _digest(images: Tensor, labels: Tensor, key: str) -> str:
    h = hashlib.sha1(key.encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(labels.cpu().numpy().tobytes())
    h.update(images.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:20]


def _centred_svd(centred: np.ndarray) -> tuple[Tensor, Tensor]:
    """Singular values ``[r]`` and right singular vectors ``[r, D]`` of a centred data matrix.

    centred = U S V^T: the covariance's eigenvalues are S²/(n-1), its eigenvectors
    the rows of V^T. With more images than pixels the D x D Gram matrix's
    eigen-decomposition gives the same (and is much faster for CIFAR-sized classes).
    """
    n, d = centred.shape
    if n > 2 * d:
        evals, evecs = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(evals)[::-1]
        s = np.sqrt(np.clip(evals[order], 0.0, None))
        vt = evecs[:, order].T
    else:
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return torch.from_numpy(np.ascontiguousarray(s)), torch.from_numpy(np.ascontiguousarray(vt))


def fit_class_stats(
    images: Tensor,
    labels: Tensor,
    *,
    cache_dir: str | Path | None = None,
    key: str = "data",
    num_classes: int | None = None,
) -> ClassStats:
    """Fit (or load from the disk cache) the per-class mean, covariance spectrum and PCA.

    Args:
        images: training images ``[N, C, H, W]`` as floats in [0, 1].
        labels: ``[N]`` class indices.
        cache_dir: folder of the cache (default :func:`default_cache_dir` ``/class_stats``).
        key: a readable name of the dataset (the file name also carries a content hash,
            so different data never share an entry).
        num_classes: K (default ``labels.max() + 1``).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "class_stats"
    digest = _digest(images, labels, key)
    path = folder / f"{key}-{digest}.pt"
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        return ClassStats(
            shape=tuple(state["shape"]),  # type: ignore[arg-type]
            means=state["means"],
            variances=list(state["variances"]),
            components=list(state["components"]),
            singular_values=list(state["singular_values"]),
            counts=state["counts"],
            from_cache=True,
        )
    x = images.detach().cpu().float().flatten(1)
    means, variances, components, singular, counts = [], [], [], [], []
    for c in range(k):
        xc = x[labels.cpu() == c].double()
        counts.append(len(xc))
        if len(xc) == 0:
            raise ConfigError(f"class {c} has no training images; cannot fit its statistics")
        mu = xc.mean(0)
        s, vt = _centred_svd((xc - mu).numpy())
        denom = max(len(xc) - 1, 1)
        means.append(mu.float())
        singular.append(s.float())
        variances.append((s**2 / denom).float())
        components.append(vt.float())
    stats = ClassStats(
        shape=tuple(images.shape[1:]),  # type: ignore[arg-type]
        means=torch.stack(means),
        variances=variances,
        components=components,
        singular_values=singular,
        counts=torch.tensor(counts),
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "shape": list(stats.shape),
            "means": stats.means,
            "variances": stats.variances,
            "components": stats.components,
            "singular_values": stats.singular_values,
            "counts": stats.counts,
        },
        tmp,
    )
    tmp.replace(path)  # atomic: concurrent trials never read a half-written file
    return stats


# --- initialisations -----------------------------------------------------------------------
InitFn = Callable[..., Tensor]
INITS: Registry[InitFn] = Registry("initialisation")


@INITS.register("random")
def _random_init(
    stats: ClassStats | None, y: Tensor, generator: torch.Generator, *, shape, **_: float
) -> Tensor:
    return torch.rand((len(y), *shape), generator=generator)


@INITS.register("gaussian")
def _gaussian_init(
    stats: ClassStats | None, y: Tensor, generator: torch.Generator, **_: float
) -> Tensor:
    assert stats is not None
    out = torch.empty(len(y), stats.means.shape[1])
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        z = torch.randn(len(idx), len(stats.variances[c]), generator=generator)
        scale = stats.variances[c].clamp_min(0).sqrt()
        out[idx] = stats.means[c] + (z * scale) @ stats.components[c]
    return out.view(len(y), *stats.shape).clamp_(0.0, 1.0)


@INITS.register("pca")
def _pca_init(
    stats: ClassStats | None,
    y: Tensor,
    generator: torch.Generator,
    *,
    sigma: float = 0.01,
    retained_variance: float = 0.99,
    **_: float,
) -> Tensor:
    assert stats is not None
    check_retained(retained_variance)
    out = torch.empty(len(y), stats.means.shape[1])
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        k = stats.kept_components(c, retained_variance)
        alpha = torch.randn(len(idx), k, generator=generator) * sigma
        lam = stats.singular_values[c][:k]
        out[idx] = stats.means[c] + (alpha * lam) @ stats.components[c][:k]
    return out.view(len(y), *stats.shape).clamp_(0.0, 1.0)


def initial_images(
    kind: str,
    stats: ClassStats | None,
    y: Tensor,
    generator: torch.Generator,
    *,
    shape: tuple[int, ...] | None = None,
    sigma: float = 0.01,
    retained_variance: float = 0.99,
) -> Tensor:
    """Starting images ``[B, C, H, W]`` in [0, 1] for the classes ``y``.

    Args:
        kind: ``random``, ``gaussian`` or ``pca``.
        stats: the class statistics (not needed for ``random``).
        y: ``[B]`` target classes.
        generator: CPU generator of the draws.
        shape: image shape ``(C, H, W)`` (default ``stats.shape``).
        sigma: σ of the PCA coefficients α ~ N(0, σ) (``pca`` only).
        retained_variance: fraction of the class variance the PCA keeps, in (0, 1].
    """
    fn = INITS.get(kind)
    if kind != "random" and stats is None:
        raise ConfigError(f"init {kind!r} needs the class statistics (fit_class_stats)")
    shape = tuple(shape) if shape is not None else stats.shape  # type: ignore[union-attr]
    check_retained(retained_variance)
    return fn(stats, y.cpu(), generator, shape=shape, sigma=sigma,
              retained_variance=retained_variance)  # fmt: skip


# --- the sampler ---------------------------------------------------------------------------
@dataclass
class SampleResult:
    """What :func:`sgld_sample` returns.

    Attributes:
        images: final images ``[B, C, H, W]`` in [0, 1].
        labels: their target classes ``[B]``.
        initial: the starting images.
        energy_target: ``[steps + 1]`` mean E(x_n, y) of the target class at each step.
        energy_other: ``[steps + 1]`` mean E(x_n, y') over the other classes.
    """

    images: Tensor
    labels: Tensor
    initial: Tensor
    energy_target: Tensor
    energy_other: Tensor


def sgld_step(
    model: nn.Module,
    x: Tensor,
    v: Tensor,
    y: Tensor,
    *,
    momentum: float,
    step_size: float,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of Eq. 7 with the given noise ε_n (already scaled by γ); returns (x, v)."""
    x = x.detach().requires_grad_(True)
    energy = joint_energy(model(x), y)
    (grad,) = torch.autograd.grad(energy.sum(), x)
    v = momentum * v - (step_size / 2.0) * grad
    return (x.detach() + v + noise).clamp_(0.0, 1.0), v


def sgld_sample(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    *,
    steps: int = 150,
    momentum: float = 0.8,
    step_size: float = 0.05,
    noise: float = 0.001,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> SampleResult:
    """Class-conditional SGLD with momentum (Eq. 7) from ``x0`` towards the classes ``y``.

    Args:
        model: the classifier (put in eval mode for the chain, its mode restored after).
        x0: starting images ``[B, C, H, W]`` in [0, 1] (on the model's device).
        y: target classes ``[B]``.
        steps: N, number of steps.
        momentum: ζ in [0, 1); 0 is plain SGLD.
        step_size: η (the gradient is scaled by η/2).
        noise: γ, the standard deviation of the Gaussian noise added each step.
        generator: CPU generator of the noise (seeded runs are reproducible).
        batch_size: images per chain batch (default all at once).
    """
    was_training = model.training
    model.eval()
    device = x0.device
    n = len(x0)
    bs = batch_size or n
    finals = []
    e_t = torch.zeros(steps + 1, dtype=torch.float64, device=device)
    e_o = torch.zeros(steps + 1, dtype=torch.float64, device=device)
    try:
        for start in range(0, n, bs):
            x = x0[start : start + bs].detach().clone()
            yb = y[start : start + bs].to(device)
            v = torch.zeros_like(x)
            for step in range(steps + 1):
                x.requires_grad_(True)
                logits = model(x)
                energies = -logits  # E(x, k) for every class k
                target = energies.gather(1, yb[:, None]).squeeze(1)
                k = energies.shape[1]
                e_t[step] += target.detach().double().sum()
                others = (energies.detach().sum(1) - target.detach()) / max(k - 1, 1)
                e_o[step] += others.double().sum()
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(target.sum(), x)
                eps = torch.randn(x.shape, generator=generator).to(device) * noise
                v = momentum * v - (step_size / 2.0) * grad
                x = (x.detach() + v + eps).clamp_(0.0, 1.0)
            finals.append(x.detach())
    finally:
        model.train(was_training)
    return SampleResult(
        images=torch.cat(finals) if finals else x0.clone(),
        labels=y.clone(),
        initial=x0.detach().clone(),
        energy_target=(e_t / max(n, 1)).float().cpu(),
        energy_other=(e_o / max(n, 1)).float().cpu(),
    )


# --- grids ---------------------------------------------------------------------------------
def _per_class(images: Tensor, labels: Tensor, per_class: int) -> tuple[list[Tensor], int]:
    rows = []
    for c in labels.unique().tolist():
        rows.append(images[labels == c][:per_class])
    width = max((len(r) for r in rows), default=1)
    return rows, width


def sample_grid(images: Tensor, labels: Tensor, per_class: int = 10) -> Tensor:
    """A grid ``[3, H', W']`` with one row per class (up to ``per_class`` images each)."""
    from torchvision.utils import make_grid

    rows, width = _per_class(images.detach().cpu(), labels.cpu(), per_class)
    tiles = []
    for r in rows:
        pad = torch.ones(width - len(r), *images.shape[1:])
        tiles.append(torch.cat([r, pad]))
    return make_grid(torch.cat(tiles), nrow=width, padding=1, pad_value=1.0)


def save_grid(images: Tensor, labels: Tensor, path: str | Path, per_class: int = 10) -> Path:
    """Write :func:`sample_grid` as a PNG."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(sample_grid(images, labels, per_class), path)
    return path


def save_init_final_grid(
    initial: Tensor, final: Tensor, labels: Tensor, path: str | Path, per_class: int = 8
) -> Path:
    """A PNG with, per class, a row of starting images above a row of the final ones."""
    from torchvision.utils import make_grid, save_image

    initial, final, labels = initial.detach().cpu(), final.detach().cpu(), labels.cpu()
    rows_i, width = _per_class(initial, labels, per_class)
    rows_f, _ = _per_class(final, labels, per_class)
    tiles = []
    for a, b in zip(rows_i, rows_f):
        for r in (a, b):
            tiles.append(torch.cat([r, torch.ones(width - len(r), *initial.shape[1:])]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(torch.cat(tiles), nrow=width, padding=1, pad_value=1.0), path)
    return path
