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
#: A trial that samples after training (a study over training and generation): the
#: folder of its sampling's files and the scores file in it.
GENERATION_DIR = "generation"
GEN_METRICS_FILE = "metrics.json"

#: What a run that trained all its epochs leaves (its final Ray checkpoint carries them).
FINISHED_RUN_FILES = (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    CONFIG_FILE,
    METRICS_LOG,
    ENERGIES_FILE,
    FINAL_FILE,
)
#: What a run stopped before its last epoch leaves (no test evaluation; ``best.pt``
#: only once an epoch was eligible for selection).
STOPPED_RUN_FILES = (LAST_CHECKPOINT, CONFIG_FILE, METRICS_LOG)
