"""Sampling images from a robust classifier: initialisations and SGLD with momentum (METHODS.md §5).

Eq. 7 of the paper, on the joint energy E(x, y) = -logit_y of a chosen class::

    v_0 = 0
    v_{n+1} = ζ v_n − (η/2) ∇_x E(x_n, y)
    x_{n+1} = clamp(x_n + v_{n+1} + ε_n, 0, 1),   ε_n ~ N(0, γ² I)

**γ is a standard deviation here** (:data:`NOISE_IS_STD`): ε_n = γ · N(0, I), as
in the authors' reference code and at the scale of the paper's γ = 0.001 (pixels
of images in [0, 1]); METHODS.md writes N(0, γ I). ζ = 0 is plain SGLD. The
gradient is that of the *sum* of the batch's energies, i.e. each image gets its
own gradient (the model is in eval mode, so images do not interact).

Initialisations (registry :data:`INITS`, looked up by :func:`initial_images`):

* ``random``: uniform noise in [0, 1] (JEM).
* ``gaussian``: one Gaussian per class with the class's mean and (sample)
  covariance Σ_y, drawn as ``μ_y + (z · sqrt(var)) @ U`` with ``Σ_y = Uᵀ diag(var) U``
  its eigen-decomposition: a factor that is PSD by construction (eigenvalues
  clamped at 0), so rank-deficient covariances (fewer images than pixels, or
  constant border pixels) need no jitter and no Cholesky.
* ``pca`` (the paper's): ``x0 = μ_y + Σ_{i<k} λ_i α_i U_i``, α_i ~ N(0, σ²) (σ a
  standard deviation), over the smallest number k of components whose cumulative
  explained-variance ratio reaches the retained fraction. **λ_i are the singular
  values of the class's centred data matrix** ``X_y - μ_y`` (what
  ``sklearn.decomposition.PCA.singular_values_`` returns, as in the reference
  code), *not* the square roots of the covariance eigenvalues: λ_i = sqrt((n_y - 1)
  · var_i). So σ ≈ 0.01 moves x0 by about 0.01·sqrt(n_y - 1) class standard
  deviations along each kept component.

Both ``gaussian`` and ``pca`` results are clamped to [0, 1] (unless ``clamp=False``).

Class statistics (mean and full covariance spectrum of every class) are fitted
once per dataset and cached on disk by :func:`fit_class_stats`, never per batch.
The cache entry holds the whole spectrum, so one entry serves every
initialisation, σ and retained fraction.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from trainables.energy import joint_energy
from trainables.errors import ConfigError
from trainables.registry import Registry

#: γ of Eq. 7 is the standard deviation of the noise ε_n (not its variance).
NOISE_IS_STD = True
#: Environment variable of the cache root (default ``~/.cache/energy-study``).
CACHE_ENV = "ENERGY_STUDY_CACHE"
#: Sub-folder of the cache root holding the class statistics.
CLASS_STATS_DIR = "class_stats"
#: Version of the cache file layout; files of another version are refitted.
STATS_FORMAT = 2


def default_cache_dir() -> Path:
    """The cache root: ``$ENERGY_STUDY_CACHE`` or ``~/.cache/energy-study``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "energy-study")


# --- class statistics ----------------------------------------------------------------------
@dataclass
class ClassStats:
    """Per-class statistics of the training images (flattened to D = C·H·W pixels).

    Attributes:
        shape: image shape ``(C, H, W)``.
        means: ``[K, D]`` class means (pixel values in [0, 1]).
        variances: per class, the covariance eigenvalues ``[r]``, descending
            (pixel², with the unbiased n_y - 1 denominator).
        components: per class, the matching unit eigenvectors ``[r, D]`` (rows).
        singular_values: per class, the singular values ``[r]`` of the centred data
            matrix ``X_y - μ_y`` (= sqrt((n_y - 1) · variances)).
        counts: ``[K]`` training images per class.
        from_cache: whether these were read from the disk cache rather than fitted.
        path: the cache file (None when not cached).
    """

    shape: tuple[int, int, int]
    means: Tensor
    variances: list[Tensor]
    components: list[Tensor]
    singular_values: list[Tensor]
    counts: Tensor
    from_cache: bool = False
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return int(self.means.shape[0])

    def kept_components(self, cls: int, retained_variance: float) -> int:
        """Smallest k whose first k components explain at least ``retained_variance``.

        The cumulative explained-variance ratio ``r_k = Σ_{i<k} var_i / Σ var`` is
        compared with the fraction up to a round-off tolerance of 1e-12 (so that
        1.0 is reachable in floating point); a class without variance keeps 0.

        Args:
            cls: class index.
            retained_variance: fraction of the class's total variance, in (0, 1].
        """
        check_retained(retained_variance)
        var = self.variances[cls].double().clamp_min(0)
        total = var.sum()
        if total <= 0:
            return 0
        ratio = torch.cumsum(var, 0) / total
        target = torch.tensor(retained_variance - 1e-12, dtype=ratio.dtype)
        k = int(torch.searchsorted(ratio, target))  # first index with ratio >= target
        return min(k + 1, len(var))


def check_retained(retained_variance: float) -> None:
    """Raise :class:`ConfigError` unless the retained variance is a fraction in (0, 1]."""
    if not 0.0 < retained_variance <= 1.0:
        raise ConfigError(
            f"retained_variance = {retained_variance!r} is out of range; allowed: a fraction of "
            "the class variance > 0 and <= 1 (the paper uses 0.99)"
        )


def _digest(images: Tensor, labels: Tensor, key: str) -> str:
    """A content hash of the data: name, shape, dtype, labels and every pixel."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{key}|{tuple(images.shape)}|{images.dtype}|{STATS_FORMAT}".encode())
    h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    h.update(images.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _centred_svd(centred: np.ndarray) -> tuple[Tensor, Tensor]:
    """Singular values ``[r]`` and right singular vectors ``[r, D]`` of a centred data matrix.

    centred = U S Vᵀ: the covariance's eigenvalues are S²/(n-1), its eigenvectors
    the rows of Vᵀ. With many more images than pixels the D x D Gram matrix's
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


def _load_stats(path: Path) -> ClassStats | None:
    """The cached statistics at ``path``, or None when missing, unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged entry is refitted, not fatal
        return None
    if not isinstance(state, dict) or state.get("format") != STATS_FORMAT:
        return None
    return ClassStats(
        shape=tuple(state["shape"]),  # type: ignore[arg-type]
        means=state["means"],
        variances=list(state["variances"]),
        components=list(state["components"]),
        singular_values=list(state["singular_values"]),
        counts=state["counts"],
        from_cache=True,
        path=path,
    )


def fit_class_stats(
    images: Tensor,
    labels: Tensor,
    *,
    cache_dir: str | Path | None = None,
    key: str = "data",
    num_classes: int | None = None,
    cache: bool = True,
) -> ClassStats:
    """Fit (or load from the disk cache) every class's mean and covariance spectrum.

    The cache file is ``<cache_dir>/class_stats/<key>-<hash>.pt``, where the hash
    covers the key, the image shape and dtype, the labels and every pixel, so
    different data (another subset, split or image size) never share an entry.
    It is written atomically (concurrent trials never read a half-written file).

    Args:
        images: training images ``[N, C, H, W]``: floats in [0, 1] or uint8 (0..255).
        labels: ``[N]`` class indices.
        cache_dir: the cache root (default :func:`default_cache_dir`, i.e.
            ``$ENERGY_STUDY_CACHE`` or ``~/.cache/energy-study``).
        key: a readable name of the dataset, the start of the file name.
        num_classes: K (default ``labels.max() + 1``); every class needs an image.
        cache: read and write the disk cache (False: always fit, write nothing).

    Returns:
        The statistics; ``from_cache`` tells whether they were read from disk.
    """
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or len(images) == 0:
        raise ConfigError(
            f"fit_class_stats needs images [N, C, H, W] and labels [N] with N > 0; got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}"
        )
    safe_key = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in key)
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / CLASS_STATS_DIR
    path = folder / f"{safe_key}-{_digest(images, labels, key)}.pt"
    if cache:
        cached = _load_stats(path)
        if cached is not None:
            return cached

    x = images.detach().cpu()
    x = (x.double() / 255.0 if x.dtype == torch.uint8 else x.double()).flatten(1)
    y = labels.detach().cpu()
    k = int(num_classes if num_classes is not None else int(y.max()) + 1)
    means, variances, components, singular, counts = [], [], [], [], []
    for c in range(k):
        xc = x[y == c]
        if len(xc) == 0:
            raise ConfigError(f"class {c} has no training images; cannot fit its statistics")
        mu = xc.mean(0)
        s, vt = _centred_svd((xc - mu).numpy())
        means.append(mu.float())
        singular.append(s.float())
        variances.append((s**2 / max(len(xc) - 1, 1)).float())
        components.append(vt.float())
        counts.append(len(xc))
    stats = ClassStats(
        shape=tuple(images.shape[1:]),  # type: ignore[arg-type]
        means=torch.stack(means),
        variances=variances,
        components=components,
        singular_values=singular,
        counts=torch.tensor(counts),
    )
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        state = {
            "format": STATS_FORMAT,
            "key": key,
            "shape": list(stats.shape),
            "means": stats.means,
            "variances": stats.variances,
            "components": stats.components,
            "singular_values": stats.singular_values,
            "counts": stats.counts,
        }
        try:
            torch.save(state, tmp)
            tmp.replace(path)  # atomic rename; a unique tmp name per writer
        finally:
            tmp.unlink(missing_ok=True)
        stats.path = path
    return stats


# --- initialisations -----------------------------------------------------------------------
@dataclass(frozen=True)
class InitSpec:
    """A registered SGLD initialisation.

    Attributes:
        draw: ``draw(stats, y, generator, *, shape, sigma, retained_variance)`` returns flat
            starting images ``[B, C·H·W]`` (not yet clamped).
        needs_stats: whether ``draw`` reads the class statistics (:func:`fit_class_stats`).
    """

    draw: Callable[..., Tensor]
    needs_stats: bool = True


INITS: Registry[InitSpec] = Registry("initialisation", InitSpec)


@INITS.register("random", needs_stats=False)
def _random_init(
    stats: ClassStats | None,
    y: Tensor,
    generator: torch.Generator | None,
    *,
    shape: tuple[int, ...],
    **_: float,
) -> Tensor:
    """Uniform noise in [0, 1] (JEM's start)."""
    return torch.rand((len(y), int(np.prod(shape))), generator=generator)


@INITS.register("gaussian")
def _gaussian_init(
    stats: ClassStats, y: Tensor, generator: torch.Generator | None, **_: float
) -> Tensor:
    """x0 ~ N(μ_y, Σ_y) via the eigen factor of Σ_y (PSD by construction)."""
    out = torch.empty(len(y), stats.means.shape[1])
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        z = torch.randn(len(idx), len(stats.variances[c]), generator=generator)
        scale = stats.variances[c].clamp_min(0).sqrt()
        out[idx] = stats.means[c] + (z * scale) @ stats.components[c]
    return out


@INITS.register("pca")
def _pca_init(
    stats: ClassStats,
    y: Tensor,
    generator: torch.Generator | None,
    *,
    sigma: float,
    retained_variance: float,
    **_: float,
) -> Tensor:
    """x0 = μ_y + Σ_{i<k} λ_i α_i U_i, α_i ~ N(0, σ²), λ_i singular values of the centred data."""
    out = torch.empty(len(y), stats.means.shape[1])
    for c in y.unique().tolist():
        idx = (y == c).nonzero().squeeze(1)
        k = stats.kept_components(c, retained_variance)
        alpha = torch.randn(len(idx), k, generator=generator) * sigma
        lam = stats.singular_values[c][:k]
        out[idx] = stats.means[c] + (alpha * lam) @ stats.components[c][:k]
    return out


def initial_images(
    kind: str,
    stats: ClassStats | None,
    y: Tensor,
    generator: torch.Generator | None = None,
    *,
    shape: tuple[int, ...] | None = None,
    sigma: float = 0.01,
    retained_variance: float = 0.99,
    clamp: bool = True,
) -> Tensor:
    """Starting images ``[B, C, H, W]`` for the target classes ``y`` (on the CPU).

    Args:
        kind: ``random``, ``gaussian`` or ``pca`` (see the module docstring).
        stats: the class statistics (:func:`fit_class_stats`; not needed for ``random``).
        y: ``[B]`` target classes.
        generator: CPU generator of the draws (None: torch's global generator).
        shape: image shape ``(C, H, W)`` (default ``stats.shape``; required without stats).
        sigma: σ, the standard deviation of the PCA coefficients α (``pca`` only; a
            multiple of the singular values, see the module docstring).
        retained_variance: fraction of each class's variance the PCA keeps, in (0, 1].
        clamp: clamp to [0, 1] (the pixel range); False returns the raw Gaussian draws.
    """
    init = INITS.get(kind)
    check_retained(retained_variance)
    if sigma < 0:
        raise ConfigError(f"sigma = {sigma!r} is out of range; allowed: >= 0 (a std)")
    if init.needs_stats and stats is None:
        raise ConfigError(f"init {kind!r} needs the class statistics (fit_class_stats)")
    if shape is None:
        if stats is None:
            raise ConfigError(f"init {kind!r} without class statistics needs shape=(C, H, W)")
        shape = stats.shape
    shape = tuple(int(s) for s in shape)
    if stats is not None and shape != tuple(stats.shape):
        raise ConfigError(f"shape {shape} differs from the class statistics' {stats.shape}")
    y = y.detach().cpu().long()
    if y.ndim != 1:
        raise ConfigError(f"y must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if stats is not None and len(y) and not 0 <= int(y.min()) <= int(y.max()) < stats.num_classes:
        raise ConfigError(
            f"target classes must be in [0, {stats.num_classes}); got {y.unique().tolist()}"
        )
    flat = init.draw(
        stats, y, generator, shape=shape, sigma=sigma, retained_variance=retained_variance
    )
    x = flat.view(len(y), *shape)
    return x.clamp_(0.0, 1.0) if clamp else x


# --- the sampler ---------------------------------------------------------------------------
@dataclass
class SampleResult:
    """What :func:`sgld_sample` returns.

    Attributes:
        images: final images ``[B, C, H, W]`` in [0, 1], on the model's device.
        labels: their target classes ``[B]``.
        initial: the starting images ``[B, C, H, W]``, on the model's device.
        energy_target: mean joint energy E(x_n, y) of the target class over the images,
            at each recorded step (``[steps + 1]`` with ``record_every = 1``); CPU, float32.
        energy_other: mean over the images of the mean E(x_n, y') over the other classes
            y' ≠ y, at the same steps (the two curves of the paper's Fig. 5e).
        trace_steps: the step index n of each trace entry (0 = the starting images).
    """

    images: Tensor
    labels: Tensor
    initial: Tensor
    energy_target: Tensor
    energy_other: Tensor
    trace_steps: Tensor


def _eq7_update(
    x: Tensor, v: Tensor, grad: Tensor, eps: Tensor | None, momentum: float, step_size: float
) -> tuple[Tensor, Tensor]:
    """v ← ζ v − (η/2) ∇E; x ← clamp(x + v + ε, 0, 1)."""
    v = momentum * v - (step_size / 2.0) * grad
    x = x.detach() + v
    if eps is not None:
        x = x + eps
    return x.clamp_(0.0, 1.0), v


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
    """One step of Eq. 7 with a given noise draw; returns ``(x_{n+1}, v_{n+1})``.

    Args:
        model: the classifier (used as it is: put it in eval mode first).
        x: current images ``[B, C, H, W]`` in [0, 1].
        v: current velocity ``[B, C, H, W]`` (zeros at the start).
        y: ``[B]`` target classes.
        momentum: ζ.
        step_size: η (the gradient is scaled by η/2).
        noise: ε_n itself, already scaled by γ (same shape as ``x``).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        energy = joint_energy(model(x), y)
        (grad,) = torch.autograd.grad(energy.sum(), x)
    return _eq7_update(x, v, grad, noise, momentum, step_size)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


def _check_sampler_args(
    x0: Tensor,
    y: Tensor,
    steps: int,
    momentum: float,
    step_size: float,
    noise: float,
    batch_size: int | None,
    record_every: int,
) -> None:
    """Raise one :class:`ConfigError` listing every bad argument of :func:`sgld_sample`."""
    problems = []
    if x0.ndim != 4 or y.ndim != 1 or len(x0) != len(y):
        problems.append(f"x0 [B, C, H, W] and y [B] (got {tuple(x0.shape)}, {tuple(y.shape)})")
    if not x0.is_floating_point():
        problems.append(f"x0 must be floats in [0, 1] (got {x0.dtype})")
    if steps < 0:
        problems.append(f"steps = {steps} (allowed: >= 0)")
    if not 0.0 <= momentum < 1.0:
        problems.append(f"momentum = {momentum} (ζ, allowed: 0 <= ζ < 1)")
    if step_size < 0:
        problems.append(f"step_size = {step_size} (η, allowed: >= 0)")
    if noise < 0:
        problems.append(f"noise = {noise} (γ, a standard deviation, allowed: >= 0)")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size = {batch_size} (allowed: >= 1)")
    if record_every < 1:
        problems.append(f"record_every = {record_every} (allowed: >= 1)")
    if problems:
        raise ConfigError("bad SGLD arguments: " + "; ".join(problems))


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
    record_every: int = 1,
) -> SampleResult:
    """Class-conditional SGLD with momentum (Eq. 7) from ``x0`` towards the classes ``y``.

    Runs on the model's device (``x0`` and ``y`` are moved there). The model is
    put in eval mode for the chain and every submodule's mode is restored after;
    gradients are taken with respect to the images only (``torch.autograd.grad``),
    so no parameter's ``.grad`` is touched and ``requires_grad`` flags are left as
    they are. The energy trace is accumulated on the device (no host sync per step).

    Args:
        model: the classifier, logits ``[B, K]`` from images in [0, 1].
        x0: starting images ``[B, C, H, W]`` in [0, 1].
        y: target classes ``[B]``.
        steps: N, the number of Eq. 7 updates (paper: 150; 20 for SAT models).
        momentum: ζ in [0, 1) (paper: 0.8; 0.5 for SAT); 0 is plain SGLD.
        step_size: η in pixels per unit of -∇E (paper: 0.05); the update uses η/2.
        noise: γ, the **standard deviation** of the Gaussian noise added each step,
            in pixels (paper: 0.001); see :data:`NOISE_IS_STD`.
        generator: generator of the noise (None: torch's global one). A CPU generator
            gives the same noise whatever the model's device.
        batch_size: images per chain (default all at once); chains are independent,
            the noise is drawn batch after batch, step after step.
        record_every: record the energy trace every this many steps (step 0 and the
            last step are always recorded).

    Returns:
        A :class:`SampleResult` with the final and initial images and the energy trace.
    """
    _check_sampler_args(x0, y, steps, momentum, step_size, noise, batch_size, record_every)
    device = _model_device(model, x0.device)
    n = len(x0)
    bs = batch_size or max(n, 1)
    recorded = sorted(set(range(0, steps + 1, record_every)) | {steps})
    slot = {s: i for i, s in enumerate(recorded)}
    e_t = torch.zeros(len(recorded), dtype=torch.float64, device=device)
    e_o = torch.zeros(len(recorded), dtype=torch.float64, device=device)
    x_init = x0.detach().to(device)
    y_all = y.detach().to(device).long()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    finals = []
    try:
        for start in range(0, n, bs):
            x = x_init[start : start + bs].clone()
            yb = y_all[start : start + bs]
            v = torch.zeros_like(x)
            for step in range(steps + 1):
                last = step == steps
                with torch.set_grad_enabled(not last):  # also inside a caller's no_grad
                    x.requires_grad_(not last)
                    logits = model(x)
                    target = joint_energy(logits, yb)  # E(x_n, y) per image
                    total = target.sum()  # Σ_b E(x_b, y_b): per-image gradients
                if step in slot:
                    k = logits.shape[1]
                    t = target.detach().double()
                    others = (-logits.detach().double().sum(1) - t) / max(k - 1, 1)
                    e_t[slot[step]] += t.sum()
                    e_o[slot[step]] += others.sum()
                if last:
                    break
                (grad,) = torch.autograd.grad(total, x)
                eps = None
                if noise > 0:
                    draw_on = generator.device if generator is not None else device
                    eps = torch.randn(x.shape, generator=generator, device=draw_on, dtype=x.dtype)
                    eps = eps.to(device).mul_(noise)
                x, v = _eq7_update(x, v, grad, eps, momentum, step_size)
            finals.append(x.detach())
    finally:
        for m, mode in modes:
            m.training = mode
    return SampleResult(
        images=torch.cat(finals) if finals else x_init.clone(),
        labels=y.detach().clone(),
        initial=x_init,
        energy_target=(e_t / max(n, 1)).float().cpu(),
        energy_other=(e_o / max(n, 1)).float().cpu(),
        trace_steps=torch.tensor(recorded),
    )


# --- grids ---------------------------------------------------------------------------------
def _per_class(images: Tensor, labels: Tensor, per_class: int) -> tuple[list[Tensor], int]:
    rows = [images[labels == c][:per_class] for c in labels.unique().tolist()]
    width = max((len(r) for r in rows), default=1)
    return rows, width


def _padded(rows: list[Tensor], width: int, shape: tuple[int, ...]) -> Tensor:
    """Rows of images, each padded with white tiles to ``width``."""
    return torch.cat([torch.cat([r, torch.ones(width - len(r), *shape)]) for r in rows])


def sample_grid(images: Tensor, labels: Tensor, per_class: int = 10) -> Tensor:
    """A grid image ``[3, H', W']`` in [0, 1]: one row per class (sorted), up to ``per_class`` each.

    Args:
        images: ``[B, C, H, W]`` in [0, 1] (C = 1 or 3).
        labels: ``[B]`` classes.
        per_class: images per row (the grid's ``nrow``).
    """
    from torchvision.utils import make_grid

    images, labels = images.detach().float().cpu(), labels.detach().cpu()
    rows, width = _per_class(images, labels, per_class)
    tiles = _padded(rows, width, tuple(images.shape[1:]))
    return make_grid(tiles, nrow=width, padding=1, pad_value=1.0)


def grid_to_uint8(grid: Tensor) -> np.ndarray:
    """A ``[3, H, W]`` grid in [0, 1] as an ``[H, W, 3]`` uint8 array (for PIL or MLflow)."""
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def save_grid(images: Tensor, labels: Tensor, path: str | Path, per_class: int = 10) -> Path:
    """Write :func:`sample_grid` as a PNG at ``path`` (folders created); returns the path."""
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

    initial, final = initial.detach().float().cpu(), final.detach().float().cpu()
    labels = labels.detach().cpu()
    rows_i, width = _per_class(initial, labels, per_class)
    rows_f, _ = _per_class(final, labels, per_class)
    rows = [r for pair in zip(rows_i, rows_f) for r in pair]
    tiles = _padded(rows, width, tuple(initial.shape[1:]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=width, padding=1, pad_value=1.0), path)
    return path
