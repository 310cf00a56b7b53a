"""The typed configuration of one sampling run (METHODS.md §5), validated at the door.

A :class:`SamplerConfig` holds the SGLD sampler's parameters (Eq. 7), the
initialisation and its parameters, how many images to draw and how to score
them. Its keys are what ``search_spaces/sgld.yaml`` searches; unknown keys and
out-of-range values fail with the field, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from trainables.config import DEVICES, ConfigBase
from trainables.errors import ConfigError
from trainables.registry import check_choice, check_range

DEFAULT_EXTRACTOR = "inception-v3-compat"


@dataclass
class SamplerConfig(ConfigBase):
    """One sampling run. Defaults are the paper's (Table E) for robust TRADES-style models."""

    KIND: ClassVar[str] = "sampler"

    init: str = "pca"  #: initialisation (trainables.generation.INITS): random | gaussian | pca
    steps: int = 150  #: N, SGLD steps
    momentum: float = 0.8  #: ζ in [0, 1); 0 = plain SGLD
    step_size: float = 0.05  #: η, pixels (images in [0, 1]) per unit of -∇E, halved in Eq. 7
    noise: float = 0.001  #: γ, the noise term of Eq. 7 (see trainables.generation for std/var)
    pca_sigma: float = 0.01  #: σ of the PCA coefficients α ~ N(0, σ)
    retained_variance: float = 0.99  #: fraction of the class variance the PCA keeps, in (0, 1]
    samples: int = 500  #: images drawn in total, spread evenly over the classes
    classes: list[str] | None = None  #: class indices to sample (None = all)
    batch_size: int = 250  #: images per sampler batch
    seed: int = 0  #: seed of the initialisation and the sampler noise
    device: str = "auto"  #: auto | cpu | cuda
    score: bool = True  #: compute IS/FID/KID against the real training images
    feature_extractor: str = DEFAULT_EXTRACTOR  #: torch-fidelity feature extractor
    inception_weights: str | None = None  #: local Inception weights file (else env/hub cache)
    extractor_plugin: str | None = None  #: a .py file or module that registers an extractor
    reference_n: int | None = None  #: real training images for the reference (None = all)

    def class_list(self, num_classes: int) -> list[int]:
        """The classes to sample, checked against the model's class count."""
        if self.classes is None:
            return list(range(num_classes))
        out = []
        for c in self.classes:
            try:
                k = int(c)
            except ValueError:
                raise ConfigError(f"classes: {c!r} is not a class index") from None
            if not 0 <= k < num_classes:
                raise ConfigError(f"classes: {k} is out of range; the model has {num_classes}")
            out.append(k)
        return out

    def validate(self) -> None:
        """Check names and ranges."""
        from trainables.generation import INITS

        check_choice("init", self.init, INITS.names())
        check_choice("device", self.device, DEVICES)
        check_range("steps", self.steps, lo=0)
        check_range("momentum", self.momentum, lo=0.0, hi=0.999999)
        check_range("step_size", self.step_size, lo=0.0)
        check_range("noise", self.noise, lo=0.0)
        check_range("pca_sigma", self.pca_sigma, lo=0.0)
        check_range("retained_variance", self.retained_variance, lo=0.0, hi=1.0, lo_open=True)
        check_range("samples", self.samples, lo=1)
        check_range("batch_size", self.batch_size, lo=1)
        if self.reference_n is not None:
            check_range("reference_n", self.reference_n, lo=2)
        if self.classes is not None and not self.classes:
            raise ConfigError("classes: an empty list samples nothing; leave it out for all")
