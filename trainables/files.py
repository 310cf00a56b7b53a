"""The names of the files a training run writes in its output folder.

Declared once, here: the loop and the Ray adapter write them, ``study/`` moves them
into MLflow under the same paths, and :mod:`reports.vocabulary` re-exports them.
"""

from __future__ import annotations

CONFIG_FILE = "config.yaml"  #: the run's full training config
CHECKPOINT_DIR = "checkpoints"  #: folder of the two checkpoints below
BEST_CHECKPOINT = f"{CHECKPOINT_DIR}/best.pt"  #: the selected epoch's weights
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.pt"  #: the last epoch's full state (resume)
ENERGIES_FILE = "energies.npz"  #: per test point energies, natural and adversarial
METRICS_LOG = "metrics.jsonl"  #: one line of metrics per epoch
FINAL_FILE = "final.json"  #: the test metrics, written once after the last epoch
