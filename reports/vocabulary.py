"""The MLflow vocabulary: every tag, run role and artifact path the project writes or reads.

Declared once, here, and imported by ``study/`` (which writes) and ``reports/`` (which
reads); plain names only, so that both may import it (``reports/`` never imports
``study/``). Metric names (``train/loss``, ``val/pgd_acc``, …) are the training
loop's own.

Layout of a study in MLflow: one experiment per study; a parent run (role
:data:`ROLE_STUDY`), one child run per trial (:data:`ROLE_TRIAL`, nested by
:data:`PARENT_TAG`) and sampling runs (:data:`ROLE_GENERATION`) nested under a
training run or under a generation-study run (:data:`ROLE_GENERATION_STUDY`), and replicate
runs (:data:`ROLE_REPLICATE`, ``study replicate``) nested under the trial they re-train.
"""

from __future__ import annotations

from trainables.files import (  # noqa: F401  (a trial's files, re-exported)
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ENERGIES_FILE,
    FINAL_FILE,
    GEN_METRICS_FILE,
    GENERATION_DIR,
    LAST_CHECKPOINT,
    METRICS_LOG,
)

# --- our run tags ------------------------------------------------------------------------
TAG_STUDY = "energy_study.study"  #: the study's name, on each of its runs
TAG_ROLE = "energy_study.role"  #: what a run is: one of :data:`ROLES`
TAG_TRIAL = "energy_study.trial_id"  #: the Tune trial id (:data:`TRAIN_TRIAL` for ``study train``)
TAG_PARENT = "energy_study.parent"  #: marks a parent run: :data:`PARENT_STUDY` or ``…_GENERATION``
TAG_METHOD = "energy_study.method"  #: a trial's training method
TAG_SEARCHED = "energy_study.searched"  #: the keys of a trial's Tune config, comma-separated
TAG_FAILURE = "energy_study.failure_reason"  #: the last line of a failed run's error
TAG_EARLY = "energy_study.early_stopped"  #: "true" when a trial stopped before its last epoch
TAG_PROCESS = "energy_study.process"  #: ``host:pid`` of the process a trial runs in
TAG_RESUMED = "energy_study.resumed_from_epoch"  #: the checkpoint's epoch a restarted trial took
TAG_FINALIST = "energy_study.finalist"  #: finalist rank: "1", "2", … (second evaluation stage)
TAG_SOURCE = "energy_study.source"  #: the checkpoint a generation study samples from
#: files a trial's run should have and lacks in MLflow: ``<file>: <reason>``, ``; ``-joined
TAG_ARTIFACT_ERROR = "energy_study.artifact_error"
TAG_METRICS_ERROR = "energy_study.metrics_error"  #: metric points lost after retries
#: "true"/"false": whether a trial met every constraint of its study (``--constraint``);
#: absent when the study has none. A trial tagged "false" is never "best".
TAG_CONSTRAINT_OK = "energy_study.constraint_ok"
TAG_CONSTRAINTS = "energy_study.constraints"  #: how a trial fared on each constraint
TAG_WARM_START = "energy_study.warm_start"  #: on a parent run: the study it was seeded from
TAG_WARM_START_TRIALS = "energy_study.warm_start_trials"  #: how many trials were seeded
TAG_REPLICATE_OF = "energy_study.replicate_of"  #: on a replicate run: the trial it re-trains
TAG_REPLICATE_SEED = "energy_study.replicate_seed"  #: on a replicate run: its training seed
TAG_REPLICATES = "energy_study.replicates"  #: on a parent run: replicate runs finished so far
#: On a final training's runs (``study train --config best.yaml``) and on registered model
#: versions: the study, the trial and the trial's MLflow run the config or weights came from.
TAG_SOURCE_STUDY = "energy_study.source_study"
TAG_SOURCE_TRIAL = "energy_study.source_trial"
TAG_SOURCE_RUN = "energy_study.source_run"
#: On a registered model version: the run whose weights it holds (its logged model's run).
TAG_MODEL_RUN = "energy_study.model_run"
#: On a registered model version: the metric it is judged by, its mode and its value.
TAG_OBJECTIVE = "energy_study.objective"
TAG_OBJECTIVE_MODE = "energy_study.objective_mode"
TAG_OBJECTIVE_VALUE = "energy_study.objective_value"
#: the epoch on whose result the ΔE stopper (``--stop-on-energy-divergence``) stopped a trial
TAG_STOP_EPOCH = "energy_study.stop_epoch"
TAG_STOP_REASON = "energy_study.stop_reason"  #: why the ΔE stopper stopped it (peak, fall)
#: the epoch of the ``best.pt`` a ΔE-stopped trial keeps (before the fall; empty: none)
TAG_KEPT_EPOCH = "energy_study.kept_epoch"
#: A ΔE-stopped trial's run logs its kept epoch's per-epoch metrics again under this
#: prefix (``kept/val/pgd_acc``, at that epoch's step): the values that stand for the
#: trial wherever trials are ranked (:func:`reports.ranking.result_metrics`).
KEPT_PREFIX = "kept/"

# --- MLflow's own tags -------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  #: nests a run under another in the UI
DESCRIPTION_TAG = "mlflow.note.content"  #: a run's description in the UI (Markdown)
#: The experiment tag with which MLflow's UI (without its workflow switch) opens an
#: experiment on its training view rather than the GenAI one, and that view's value.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
#: Experiment tag prefix of a saved ("shared") runs-table view, and our view's key.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "energy-study"

# --- values of TAG_ROLE, TAG_PARENT and TAG_TRIAL ----------------------------------------
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
ROLE_GENERATION = "generation"
ROLE_GENERATION_STUDY = "generation_study"
ROLE_REPLICATE = "replicate"  #: a top trial's configuration re-trained with another seed
ROLES = (ROLE_STUDY, ROLE_TRIAL, ROLE_GENERATION, ROLE_GENERATION_STUDY, ROLE_REPLICATE)
PARENT_STUDY = "true"
PARENT_GENERATION = "generation"
TRAIN_TRIAL = "train"

# --- the model registry (``study export --register``, ``study train --register``) --------
ALIAS_CANDIDATE = "candidate"  #: the version of a study's best trial
ALIAS_CHAMPION = "champion"  #: the final model that beat every earlier one on its objective
TRIAL_MODEL = "trial_model"  #: the name of a trial's logged model
FINAL_MODEL = "final_model"  #: the name of a final training's logged model

# --- artifacts (paths inside a run; a trial's files keep the same paths on disk) -------
ENERGY_HIST = "energy_hist.png"  #: the histogram of a trial's test energies
FINAL_ARTIFACT = "final_eval.npz"  #: a finalist's per point outcomes
SPEC_DIR = "spec"  #: the parent run's spec, space file and command
SPEC_ARTIFACT = "spec/study.yaml"
COMMAND_ARTIFACT = "spec/command.txt"
GRID_FILE = "samples.png"
INIT_GRID_FILE = "init_vs_final.png"
TRACE_FILE = "trace.npz"
GRID_ARTIFACT = f"{GENERATION_DIR}/{GRID_FILE}"
#: A sampling's files (in its run's ``generation/`` folder, or a trial's that sampled).
GENERATION_FILES = (GRID_FILE, INIT_GRID_FILE, TRACE_FILE, GEN_METRICS_FILE)
REPORT_ARTIFACT = "report"  #: ``study report``'s folder in the study's run
REPORT_INDEX = "index.html"  #: the report's page (in the report's folder)
REPORT_MARKDOWN = "index.md"
