"""The names of every metric a training run reports: one vocabulary for Tune, MLflow,
the objective check of a study and the report.

Per epoch (step = epoch, from 1): ``train/*``, ``val/*``, ``train_probe/*``,
``time/*`` and ``lr``; once, after the last epoch: ``test/*``, ``best/val_pgd_acc``
and ``best_epoch``; for a study's finalists (:mod:`study.finals`): ``final/*``.
Every accuracy measured on a subset also has ``<name>_ci_low`` and
``<name>_ci_high`` (95 % Wilson bounds, :mod:`trainables.stats`) and its
namespace an ``n``.

>>> is_metric("val/pgd_acc"), is_epoch_metric("test/aa_acc"), is_metric("val/pgd")
(True, False, False)
"""

from __future__ import annotations

from trainables.stats import HIGH_SUFFIX, LOW_SUFFIX

#: what :func:`trainables.loop.evaluate` measures on a set of points
_EVAL = (
    "clean_acc",
    "pgd_acc",
    "energy_nat",
    "energy_adv",
    "delta_energy",
    "delta_energy_std",
    "delta_energy_joint",
    "n",
)
#: what the final evaluation adds with AutoAttack
_AA = ("aa_acc", "aa_clean_acc", "robust_acc")

EPOCH_METRICS: frozenset[str] = frozenset(
    {
        "lr",
        "train/loss",
        "train/mean_weight",
        "train/clean_acc",
        "train/adv_acc",
        *(f"val/{k}" for k in _EVAL),
        "train_probe/delta_energy",
        "train_probe/delta_energy_std",
        "train_probe/delta_energy_xy",
        "train_probe/energy_nat",
        "train_probe/energy_adv",
        "train_probe/adv_acc",
        "train_probe/n",
        "time/epoch_s",
        "time/train_s",
        "time/val_s",
        "time/probe_s",
    }
)
FINAL_METRICS: frozenset[str] = frozenset(
    {
        "best_epoch",
        "best/val_pgd_acc",
        *(f"test/{k}" for k in (*_EVAL, *_AA)),
        *(f"final/{k}" for k in (*_EVAL, *_AA)),
    }
)


def _base(name: str) -> str:
    for suffix in (LOW_SUFFIX, HIGH_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_epoch_metric(name: str) -> bool:
    """Whether a run reports ``name`` every epoch (what a scheduler can act on)."""
    base = _base(name)
    return base in EPOCH_METRICS and (base == name or base.endswith("_acc"))


def is_metric(name: str) -> bool:
    """Whether a training run reports ``name`` at all (each epoch or at the end)."""
    base = _base(name)
    known = base in EPOCH_METRICS or base in FINAL_METRICS
    return known and (base == name or base.endswith("_acc"))


def objective_names() -> list[str]:
    """The metrics worth optimising, for messages: accuracies and energy gaps."""
    return sorted(
        m
        for m in EPOCH_METRICS | FINAL_METRICS
        if m.endswith(("_acc", "delta_energy")) and not m.startswith("final/")
    )
