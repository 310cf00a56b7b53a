"""A small stand-in feature extractor registered with torch-fidelity, for tests only.

The real Inception weights cannot be downloaded here. This extractor lets the
tests run torch-fidelity's real ``calculate_metrics`` (IS, FID, KID) offline:
images are pooled to 8x8 grey levels and mapped by a fixed, seeded random
two-layer network to 16 features (for FID/KID) and 10 logits (for IS). It is
registered under :data:`NAME` when this file is imported (``study generate
--extractor-plugin tests/standin_extractor.py --feature-extractor NAME``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "energy-study-standin"


class StandInExtractor(FeatureExtractorBase):
    """Fixed random features of 8x8 grey images; not a perceptual metric."""

    def __init__(self, name: str, features_list: list[str], **kwargs: object) -> None:
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("w1", torch.randn(64, 48, generator=g) / 8.0)
        self.register_buffer("w2", torch.randn(48, 16, generator=g) / 48**0.5)
        self.register_buffer("w3", torch.randn(16, 10, generator=g) / 4.0)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        grey = x.float().mean(1, keepdim=True) / 255.0
        small = F.adaptive_avg_pool2d(grey, (8, 8)).flatten(1)
        h = torch.tanh((small - 0.5) @ self.w1)
        feat = torch.tanh(h @ self.w2)
        out = {"16": feat, "logits_unbiased": feat @ self.w3}
        return tuple(out[a] for a in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "16", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "16", "kid": "16", "prc": "16"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(NAME, StandInExtractor)
