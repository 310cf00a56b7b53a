"""Figure 5, sampler throughput: SGLD images per second vs its floor.

The sampler is ``trainables.generation.sgld_sample`` when that module exists and
imports; otherwise an inline implementation of Eq. 7 (METHODS.md §5), marked as
such in the results. Its floor is N timed input-gradient passes of the same
model and batch (forward of the joint energy, gradient with respect to the
input): the arithmetic SGLD cannot avoid. Sampler and floor alternate, one
warm-up round, medians.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import alternate, median
from trainables.models import create_model

BATCH = 128


def sgld_inline(
    model: nn.Module,
    x0: Tensor,
    y: Tensor,
    *,
    steps: int,
    momentum: float,
    step_size: float,
    noise: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Eq. 7: v ← ζ v − (η/2) ∇x E(x, y); x ← clamp(x + v + γ·N(0, I), 0, 1).

    ``noise`` (γ) is used as a standard deviation, as in the reference code.
    """
    x = x0.detach().clone()
    v = torch.zeros_like(x)
    idx = y.view(-1, 1)
    for _ in range(steps):
        x.requires_grad_(True)
        energy = -model(x).gather(1, idx).sum()  # joint energy E(x, y) = -f(x)[y]
        (grad,) = torch.autograd.grad(energy, x)
        with torch.no_grad():
            v.mul_(momentum).add_(grad, alpha=-step_size / 2)
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = (x.detach() + v + noise * eps).clamp_(0.0, 1.0)
    return x.detach()


def _sampler() -> tuple[Callable[..., Tensor], str]:
    try:
        from trainables.generation import sgld_sample  # written by the generation issue
    except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
        return sgld_inline, f"inline Eq. 7 (trainables.generation not importable: {exc!r:.80})"
    return sgld_sample, "trainables.generation.sgld_sample"


def run(quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=3).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # a sampler needs no parameter gradients
    x0 = torch.rand(BATCH, 3, 32, 32)
    y = torch.arange(BATCH) % 10
    sample, source = _sampler()
    params = {"momentum": 0.8, "step_size": 0.05, "noise": 0.001}
    rows = {}
    fallback = None
    for steps in (20,) if quick else (20, 150):  # quick: a smoke test, N = 20 only

        def run_sampler(steps: int = steps) -> float:
            nonlocal sample, source, fallback
            g = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            try:
                sample(model, x0, y, steps=steps, generator=g, **params)
            except TypeError as exc:  # another signature than the one expected
                fallback = f"{source} rejected the call ({exc}); inline Eq. 7 used"
                sample, source = sgld_inline, "inline Eq. 7"
                t = time.perf_counter()
                sample(model, x0, y, steps=steps, generator=g, **params)
            return time.perf_counter() - t

        def run_floor(steps: int = steps) -> float:
            idx = y.view(-1, 1)
            t = time.perf_counter()
            for _ in range(steps):
                x = x0.detach().requires_grad_(True)
                torch.autograd.grad(-model(x).gather(1, idx).sum(), x)
            return time.perf_counter() - t

        times = alternate({"sampler": run_sampler, "floor": run_floor}, 1 if quick else 5)
        t_s, t_f = median(times["sampler"]), median(times["floor"])
        rows[str(steps)] = {
            "sampler_images_per_s": BATCH / t_s,
            "floor_images_per_s": BATCH / t_f,
            "sampler_over_floor": t_s / t_f,
            "raw_s": times,
        }
    return {
        "setup": {
            "model": "small_cnn (random weights, eval mode)",
            "batch": BATCH,
            "image": "3x32x32",
            "params": params,
            "torch_threads": torch.get_num_threads(),
            "smoke": quick,
        },
        "sampler": source,
        "fallback": fallback,
        "steps": rows,
    }
