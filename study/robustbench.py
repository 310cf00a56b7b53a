"""``study export NAME --robustbench DIR [--n 10000]``: the best trial, ready for RobustBench.

The best finished trial of the study (:func:`study.export.best_runs`, the order of
``study export``) is written into the new or empty folder ``DIR``:

* ``model.pt``: its eval-mode ``state_dict`` (the ``checkpoints/best.pt`` weights), under
  the names of a plain model definition;
* ``model.py``: that definition, importing nothing but ``torch``
  (:mod:`study.robustbench_models`, with ``build_model()`` and ``load_model(path)`` for
  this export appended). ResNet-18, PreAct-ResNet-18 and WRN-34-10 have the module
  layout of RobustBench's model zoo; inputs are images in [0, 1], the normalisation is
  inside the model (buffers ``mu`` and ``sigma``);
* ``model_info.json``: RobustBench's fields (:data:`INFO_FIELDS`), the accuracies from a
  standard AutoAttack run (APGD-CE, APGD-T, FAB-T, Square) on the first ``n`` test
  points, in percent with two decimals as RobustBench writes them.

The evaluation is logged to the trial's MLflow run: ``robustbench/clean_acc``,
``robustbench/aa_acc`` (fractions), ``robustbench/n`` and their 95 % Wilson bounds, and
the JSON as the artifact :data:`INFO_ARTIFACT`.

Nothing is written for bad input: ``n``, ``DIR``, the study, its best run, its weights
and data are all checked before the evaluation starts, and the files are written to a
hidden folder beside ``DIR`` that becomes ``DIR`` in one rename at the end (after a
fresh import of the written ``model.py`` gave the project model's logits).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from reports.vocabulary import TAG_TRIAL
from study import robustbench_models
from trainables.errors import ConfigError, UserError
from trainables.registry import Registry

#: The files written into ``DIR``.
MODEL_FILE = "model.py"
WEIGHTS_FILE = "model.pt"
INFO_FILE = "model_info.json"
#: Where the ``model_info`` JSON goes in the trial's MLflow run.
INFO_ARTIFACT = "robustbench/model_info.json"
#: Namespace of the logged metrics (``robustbench/aa_acc`` …).
NAMESPACE = "robustbench"
#: Test points evaluated by default (RobustBench evaluates all 10,000 of CIFAR-10's).
DEFAULT_N = 10_000
#: Points per AutoAttack call; progress is shown after each.
CHUNK = 500
#: The fields of RobustBench's ``model_info`` files, in their order.
INFO_FIELDS = (
    "name",
    "architecture",
    "dataset",
    "threat_model",
    "eps",
    "clean_acc",
    "autoattack_acc",
    "number_forward_passes",
    "additional_data",
    "reported",
    "footnote",
)
#: Test points on which the written model must give the project model's logits.
CHECK_POINTS = 64


# --- the plain architectures and the name mapping ------------------------------------------
@dataclass(frozen=True)
class PlainArchitecture:
    """How one of the project's models is written as a plain definition.

    Attributes:
        cls: the class in :mod:`study.robustbench_models`.
        label: RobustBench's architecture name, from the model's options.
        options: the class's arguments (besides ``num_classes``, ``in_channels``,
            ``mean``, ``std``) from the model's options (``model_kwargs``).
        renames: ``(pattern, replacement)`` regular expressions from the project's
            parameter names to the definition's; the first full match renames a key,
            a key no pattern matches keeps its name.
    """

    cls: str
    label: Callable[[Mapping[str, Any]], str]
    options: Callable[[Mapping[str, Any]], dict[str, Any]]
    renames: tuple[tuple[str, str], ...] = ()


#: The project's models (:data:`trainables.models.MODELS` names) that can be exported.
PLAIN_MODELS: Registry[PlainArchitecture] = Registry("exportable model")
PLAIN_MODELS.add(
    "resnet18",
    PlainArchitecture("ResNet", lambda o: "ResNet-18", lambda o: {"num_blocks": (2, 2, 2, 2)}),
)
PLAIN_MODELS.add(
    "preact_resnet18",
    PlainArchitecture(
        "PreActResNet",
        lambda o: "PreActResNet-18",
        lambda o: {"num_blocks": (2, 2, 2, 2), "bn_before_fc": bool(o.get("final_bn", True))},
        # a projection shortcut is a bare conv in the project, Sequential(conv) in the zoo
        renames=((r"(layer\d+\.\d+)\.shortcut\.weight", r"\1.shortcut.0.weight"),),
    ),
)
PLAIN_MODELS.add(
    "wrn34_10",
    PlainArchitecture(
        "WideResNet",
        lambda o: f"WideResNet-{int(o.get('depth', 34))}-{int(o.get('widen', 10))}",
        lambda o: {"depth": int(o.get("depth", 34)), "widen_factor": int(o.get("widen", 10))},
        renames=(
            (r"block(\d)\.(\d+)\.shortcut\.weight", r"block\1.layer.\2.convShortcut.weight"),
            (r"block(\d)\.(\d+)\.(.+)", r"block\1.layer.\2.\3"),
            (r"bn\.(.+)", r"bn1.\1"),
        ),
    ),
)
PLAIN_MODELS.add(
    "small_cnn",
    PlainArchitecture(
        "SmallCNN",
        lambda o: "SmallCNN",
        lambda o: {"width": int(o.get("width", 32)), "stem_stride": o.get("stem_stride")},
    ),
)


@dataclass
class PlainModel:
    """A project model as a plain definition.

    Attributes:
        cls: its class in :mod:`study.robustbench_models`.
        kwargs: the class's arguments (plain Python values: they are written as code).
        architecture: RobustBench's name of the architecture (``ResNet-18`` …).
        state_dict: the weights under the definition's names (CPU tensors).
    """

    cls: str
    kwargs: dict[str, Any]
    architecture: str
    state_dict: dict[str, Tensor]

    def build(self, module: ModuleType = robustbench_models) -> nn.Module:
        """The model from ``module`` (default: this package's copy), weights loaded
        strictly (every key used, none missing), in eval mode."""
        model = getattr(module, self.cls)(**self.kwargs)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def _split_normalization(
    state: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
    """The body's weights and the ``Normalize`` buffers of ``create_model(mean=, std=)``
    (``Sequential(normalize=…, model=…)``), or ``None`` when the model has none."""
    if "normalize.mean" not in state:
        return dict(state), None, None
    body = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    other = sorted(set(state) - {"normalize.mean", "normalize.std"} - {f"model.{k}" for k in body})
    if other:
        raise ConfigError(f"checkpoint has keys outside the normalised model: {other[:5]}")
    return body, state["normalize.mean"], state["normalize.std"]


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
    return key


def plain_model(
    model: str, model_kwargs: Mapping[str, Any], state: Mapping[str, Tensor]
) -> PlainModel:
    """Map a project model's weights onto its plain definition.

    Every parameter and buffer of ``state`` gets exactly one name of the definition
    (the :class:`PlainArchitecture`'s renames; the normalisation's ``normalize.mean``
    and ``normalize.std`` become ``mu`` and ``sigma``, 0 and 1 when the model has
    none), and :meth:`PlainModel.build` loads them strictly.

    Args:
        model: the run's model name (``resnet18``, ``preact_resnet18``, ``wrn34_10``,
            ``small_cnn``); another raises :class:`ConfigError` naming these.
        model_kwargs: the run's model options (``TrainConfig.model_kwargs``).
        state: the run's weights (a checkpoint's ``"model"``, keys of ``create_model``).
    """
    arch = PLAIN_MODELS.get(model)
    body, mean, std = _split_normalization(state)
    conv = body.get("conv1.weight")
    head = body.get("linear.weight", body.get("fc.weight"))
    if conv is None or head is None:
        raise ConfigError(f"checkpoint of model {model!r} lacks conv1.weight or its linear layer")
    in_channels, num_classes = int(conv.shape[1]), int(head.shape[0])
    if mean is None or std is None:
        mean = torch.zeros(1, in_channels, 1, 1)
        std = torch.ones(1, in_channels, 1, 1)
    mapped: dict[str, Tensor] = {
        "mu": mean.detach().cpu().clone(),
        "sigma": std.detach().cpu().clone(),
    }
    for key, value in body.items():
        name = _rename(key, arch.renames)
        if name in mapped:
            raise ConfigError(f"model {model!r}: {key!r} and another key both map to {name!r}")
        mapped[name] = value.detach().cpu().clone()
    kwargs = {
        **arch.options(model_kwargs),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "mean": tuple(float(v) for v in mean.flatten().tolist()),
        "std": tuple(float(v) for v in std.flatten().tolist()),
    }
    plain = PlainModel(arch.cls, kwargs, arch.label(model_kwargs), mapped)
    plain.build()  # strict: a key of the project's model without a place fails here
    return plain


def model_source(plain: PlainModel) -> str:
    """The text of ``model.py``: :mod:`study.robustbench_models` and, appended,
    ``build_model()`` and ``load_model(path)`` of this export."""
    args = ", ".join(f"{k}={v!r}" for k, v in plain.kwargs.items())
    footer = f'''

# --- the exported model (appended by `study export --robustbench`) -------------------------
#: RobustBench's name of the architecture.
ARCHITECTURE = {plain.architecture!r}


def build_model() -> nn.Module:
    """The exported model (architecture, classes, normalisation), weights not loaded."""
    return {plain.cls}({args})


def load_model(path: str) -> nn.Module:
    """The exported model with the weights of ``path`` (``{WEIGHTS_FILE}``), in eval mode."""
    model = build_model()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
'''
    return Path(robustbench_models.__file__).read_text() + footer


def load_written_model(folder: Path) -> nn.Module:
    """``load_model`` of the ``model.py`` in ``folder``, imported afresh from that file."""
    name = f"energy_study_export_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, folder / MODEL_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    writes, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in DIR
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes
    return module.load_model(str(folder / WEIGHTS_FILE))


def _same_logits(a: nn.Module, b: nn.Module, x: Tensor, what: str) -> None:
    with torch.no_grad():
        la, lb = a(x), b(x)
    if not torch.equal(la, lb):
        gap = (la - lb).abs().max().item()
        raise RuntimeError(
            f"{what} gives other logits than the project's model (max gap {gap:.3g})"
        )


# --- RobustBench's fields --------------------------------------------------------------------
def eps_text(eps: float, norm: str) -> str:
    """``eps`` as RobustBench writes it: ``8/255`` for an L∞ radius on the 1/255 grid, else
    the number (``0.5``).

    Args:
        eps: the radius in input units (pixel values in [0, 1]).
        norm: ``linf`` or ``l2``.
    """
    steps = eps * 255
    if norm == "linf" and abs(steps - round(steps)) < 1e-6 and round(steps) > 0:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def percent(fraction: float) -> str:
    """An accuracy (a fraction in [0, 1]) as RobustBench writes it: percent, two decimals."""
    return f"{100 * fraction:.2f}"


# --- the evaluation --------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    """``3m07s``, or ``2h05m`` from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def autoattack_with_progress(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    device: torch.device,
    chunk: int = CHUNK,
    seed: int = 0,
    echo: Callable[[str], Any] = print,
) -> tuple[float, float, tuple[str, ...]]:
    """Standard AutoAttack on ``(x, y)`` in chunks of ``chunk`` points, a progress line
    after each (points done, accuracies so far, time elapsed and left).

    Args:
        model: the classifier (inputs in [0, 1], logits out).
        x: images ``[N, C, H, W]`` in [0, 1] (on the CPU; chunks move to ``device``).
        y: labels ``[N]``.
        eps: radius in input units; ``norm``: ``Linf`` or ``L2``.
        device: where the model runs.
        chunk: points per AutoAttack call (and its batch size).
        seed: the library's seed.
        echo: where the progress lines go.

    Returns:
        ``(clean_acc, robust_acc, attacks)``: fractions of the ``N`` points, and the
        attacks that ran.
    """
    from trainables.autoattack import autoattack_accuracy

    n, clean, robust, attacks = len(y), 0, 0, ()
    start = time.perf_counter()
    for first in range(0, n, chunk):
        xb, yb = x[first : first + chunk], y[first : first + chunk]
        result = autoattack_accuracy(
            model, xb.to(device), yb.to(device), eps=eps, norm=norm, version="standard",
            batch_size=chunk, seed=seed, device=device,
        )  # fmt: skip
        clean += int(round(result.clean_acc * len(yb)))
        robust += int(result.robust_mask.sum().item())
        attacks = result.attacks
        done = first + len(yb)
        elapsed = time.perf_counter() - start
        echo(
            f"  AutoAttack {done}/{n} points: clean {percent(clean / done)} %, robust "
            f"{percent(robust / done)} % so far; {_duration(elapsed)} elapsed, about "
            f"{_duration(elapsed / done * (n - done))} left"
        )
    return clean / n, robust / n, attacks


# --- the target folder ----------------------------------------------------------------------
def check_target(out: str | Path) -> Path:
    """``out`` as an absolute path, if it is a new or empty folder that can be written.

    Raises:
        UserError: ``out`` is a file or a folder that is not empty, or the folder that
            will hold it (its nearest existing parent) is not a writable folder.
    """
    target = Path(out).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UserError(f"--robustbench {target}: exists and is not a folder")
        if any(target.iterdir()):
            raise UserError(
                f"--robustbench {target}: the folder is not empty; give a new or empty folder"
            )
        if not os.access(target, os.W_OK | os.X_OK):
            raise UserError(f"--robustbench {target}: the folder is not writable")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--robustbench {target}: {parent} is not a folder")
    try:  # the files are written beside the target first: that folder must take a file
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UserError(
            f"--robustbench {target}: cannot write in {parent} ({exc.strerror})"
        ) from None
    return target


# --- the command -----------------------------------------------------------------------------
@dataclass
class RobustBenchExport:
    """What ``study export --robustbench`` wrote.

    Attributes:
        folder: the export folder (``model.py``, ``model.pt``, ``model_info.json``).
        run_id: the MLflow run of the exported trial.
        info: the ``model_info`` fields as written.
        metrics: the metrics logged to the run (``robustbench/*``).
    """

    folder: Path
    run_id: str
    info: dict[str, Any]
    metrics: dict[str, float]


def export_robustbench(
    tracking_uri: str,
    study: str,
    out: str | Path,
    *,
    n: int = DEFAULT_N,
    metric: str = "val/pgd_acc",
    mode: str = "max",
    chunk: int = CHUNK,
    echo: Callable[[str], Any] = print,
) -> RobustBenchExport:
    """Write the study's best trial into ``out`` for RobustBench (see the module's docstring).

    Args:
        tracking_uri: the MLflow store of the study.
        study: the study's name (its MLflow experiment).
        out: a new or empty folder.
        n: how many test points (the first ``n`` of the test set; all when it has fewer)
            the standard AutoAttack evaluation runs on; at least 1.
        metric: the metric that ranks the trials first (as ``study export``).
        mode: ``max`` or ``min`` for ``metric``.
        chunk: points per AutoAttack call (a progress line after each).
        echo: where progress goes.

    Raises:
        UserError: bad ``n`` or ``out``, an unknown study, a study without a finished
            trial, a run without its weights, a model that cannot be exported, a
            dataset that is not on disk. Nothing is written then.
    """
    from mlflow.tracking import MlflowClient

    from study.export import best_runs, trial_checkpoint
    from study.tracking import MlflowTracker, quiet_mlflow
    from trainables.data import to_float
    from trainables.loop import accuracies_with_n, trained_model

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--n = {n!r}; the number of test points must be an integer >= 1")
    target = check_target(out)
    quiet_mlflow()
    if MlflowClient(tracking_uri).get_experiment_by_name(study) is None:
        raise UserError(
            f"no study {study!r} in {tracking_uri} (study list --tracking-uri URI lists them)"
        )
    tracker = MlflowTracker(tracking_uri, study)
    (run,) = best_runs(tracker, study, metric, mode, 1)
    run_id, trial = run.info.run_id, run.data.tags.get(TAG_TRIAL, "?")
    cfg, weights = trial_checkpoint(tracker, run)
    project, data = trained_model(cfg, weights, device="cpu")  # a missing dataset fails here
    plain = plain_model(cfg.model, cfg.model_kwargs, project.state_dict())
    exported = plain.build()
    size = min(n, len(data.test))
    points = data.test.take(torch.arange(size))
    x, y = to_float(points.x), points.y
    _same_logits(project, exported, x[:CHECK_POINTS], "the plain definition")
    echo(
        f"exporting trial {trial} of study {study!r} (run {run_id}): {plain.architecture} "
        f"({cfg.model}), {cfg.method} on {cfg.dataset}"
    )
    if size < n:
        echo(f"the test set of {cfg.dataset} has {size} points: evaluating all of them, not {n}")
    norm = "Linf" if cfg.norm == "linf" else "L2"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    echo(
        f"standard AutoAttack ({norm}, eps = {eps_text(cfg.eps, cfg.norm)}) on the first "
        f"{size} test points, {chunk} at a time, on {device.type}:"
    )
    clean_acc, aa_acc, attacks = autoattack_with_progress(
        exported.to(device), x, y, eps=cfg.eps, norm=norm, device=device, chunk=chunk, echo=echo
    )
    exported.cpu()
    whole = "the whole test set" if size == len(data.test) else f"not all {len(data.test)}"
    info: dict[str, Any] = {
        "name": f"{study} (trial {trial}, {cfg.method})",
        "architecture": plain.architecture,
        "dataset": cfg.dataset,
        "threat_model": norm,
        "eps": eps_text(cfg.eps, cfg.norm),
        "clean_acc": percent(clean_acc),
        "autoattack_acc": percent(aa_acc),
        "number_forward_passes": 1,
        "additional_data": False,  # trained on the dataset's own training split only
        "reported": percent(aa_acc),  # what this evaluation measured (no paper number)
        "footnote": (
            f"energy-study study {study!r}, trial {trial}, MLflow run {run_id}: {cfg.method}, "
            f"{cfg.epochs} epochs; accuracies on the first {size} test points ({whole}), "
            f"AutoAttack standard ({', '.join(attacks)})."
        ),
    }
    assert tuple(info) == INFO_FIELDS
    info_text = json.dumps(info, indent=2) + "\n"
    metrics = accuracies_with_n(NAMESPACE, {"clean_acc": clean_acc, "aa_acc": aa_acc}, size)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        torch.save(plain.state_dict, staging / WEIGHTS_FILE)
        (staging / MODEL_FILE).write_text(model_source(plain))
        (staging / INFO_FILE).write_text(info_text)
        _same_logits(
            project, load_written_model(staging), x[:CHECK_POINTS], f"the written {MODEL_FILE}"
        )
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's folder is private; DIR is not
        os.replace(staging, target)  # an empty target folder is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # logged once DIR holds the files: a failed rename leaves the run as it was
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_text(run_id, info_text, INFO_ARTIFACT)
    echo(
        f"clean {info['clean_acc']} %, AutoAttack {info['autoattack_acc']} % on {size} test "
        f"points; logged to run {run_id} as {NAMESPACE}/* and {INFO_ARTIFACT}"
    )
    return RobustBenchExport(target, run_id, info, metrics)
