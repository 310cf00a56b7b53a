"""One study over training and generation: a space with a ``generation:`` section makes
each trial sample from its best checkpoint once it trained, and score the samples, in
its own child run; the study optimises robustness and FID together, and the report
shows their Pareto front with the front's sample grids.

FID comes from the stand-in feature extractor (tests/standin_extractor.py): the
Inception weights cannot be downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_search import make_spec

from trainables.errors import ConfigError

PLUGIN = str(Path(__file__).with_name("standin_extractor.py"))
STANDIN = "energy-study-standin"
ROOT = Path(__file__).parents[1]


def joint_space(tmp_path: Path, **generation) -> Path:
    """The smoke space (digits, WEAT), sampling a little after training, its SGLD step
    size searched."""
    space = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())
    space["study"] = {}
    space["generation"] = {
        "steps": 3, "samples": 20, "batch_size": 20, "feature_extractor": STANDIN,
        "extractor_plugin": PLUGIN, "reference_n": 100, "device": "cpu", **generation,
    }  # fmt: skip
    space["params"]["generation.step_size"] = {"type": "float", "low": 0.01, "high": 0.1}
    path = tmp_path / "joint.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def test_a_space_with_generation_searches_sampler_values_apart_from_training(tmp_path) -> None:
    """The Tune config's ``generation.*`` values go to the sampler, never to the
    training config; the sampler gets the space's settings under them."""
    spec = make_spec(tmp_path, "j", space=str(joint_space(tmp_path)), metrics=["val/pgd_acc",
                     "gen/fid"], modes=["max", "min"], scheduler="none")  # fmt: skip
    spec.validate()
    sampled = {"method": "weat_adv", "beta": 2.0, "weight_fn": "weat",
               "generation.step_size": 0.05}  # fmt: skip
    assert spec.trial_config(sampled).beta == 2.0
    sampler = spec.template.sampler(sampled)
    assert sampler["step_size"] == 0.05 and sampler["steps"] == 3
    assert make_spec(tmp_path, "t").template.sampler(sampled) is None  # a training space


@pytest.mark.parametrize(
    ("change", "says"),
    [({"backend": "train"}, "direct backend"), ({"metrics": ["gen/fidd"]}, "gen/fidd")],
)
def test_a_joint_study_that_cannot_run_is_refused(tmp_path, change, says) -> None:
    spec = make_spec(tmp_path, "j", space=str(joint_space(tmp_path)), scheduler="none",
                     **change)  # fmt: skip
    with pytest.raises(ConfigError, match=says):
        spec.validate()


def test_bad_sampler_settings_are_refused_naming_the_space(tmp_path) -> None:
    spec = make_spec(tmp_path, "j", space=str(joint_space(tmp_path, steps=-1)), scheduler="none")
    with pytest.raises(ConfigError, match="joint.yaml: generation: .*steps"):
        spec.validate()
    unscored = joint_space(tmp_path, score=False)
    spec = make_spec(tmp_path, "j", space=str(unscored), scheduler="none", metrics=["gen/fid"])
    with pytest.raises(ConfigError, match="gen/fid: .* samples without scores"):
        spec.validate()


def test_the_extractor_plugin_is_found_before_any_trial_trains(tmp_path, monkeypatch) -> None:
    """A relative plugin path is made absolute on the driver (trials run in folders of
    their own); a plugin that is not there stops the study before it starts."""
    from trainables.errors import UserError

    local = tmp_path / "standin_extractor.py"
    local.write_text(Path(PLUGIN).read_text())
    monkeypatch.chdir(tmp_path)
    spec = make_spec(tmp_path, "j", space=str(joint_space(tmp_path, extractor_plugin=local.name)),
                     scheduler="none")  # fmt: skip
    spec.validate()
    assert spec.template.generation["extractor_plugin"] == str(local)
    gone = joint_space(tmp_path, extractor_plugin=str(tmp_path / "gone.py"))
    with pytest.raises(UserError, match="gone.py"):
        make_spec(tmp_path, "k", space=str(gone), scheduler="none").validate()


def test_each_trial_trains_samples_and_scores_in_one_run(tmp_path, ray_cluster) -> None:
    """Two trials of two epochs of a multi-objective study (val/pgd_acc max, gen/fid min;
    gen/fid comes with the last result only, which Tune must accept): each child
    run holds its training, its sampler's parameters, gen/* scores and sample grids;
    Optuna has both values of each trial; the report's robustness-vs-FID section shows
    the front's trials with their samples."""
    import optuna

    from reports.build import build_report
    from reports.vocabulary import GRID_ARTIFACT, TAG_TRIAL
    from study.export import trial_runs
    from study.runner import run_study
    from study.tracking import MlflowTracker

    spec = make_spec(
        tmp_path, "joint", space=str(joint_space(tmp_path)), trials=2, epochs=2,
        metrics=["val/pgd_acc", "gen/fid"], modes=["max", "min"], scheduler="none",
        max_concurrent=1, optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )  # fmt: skip
    outcome = run_study(spec)
    assert [t.status for t in outcome.trials] == ["FINISHED", "FINISHED"]
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = trial_runs(tracker, spec.name)
    assert len(runs) == 2
    for run in runs:
        m, params = run.data.metrics, run.data.params
        assert m["gen/fid"] >= 0 and m["gen/samples"] == 20 and "test/pgd_acc" in m
        assert (
            params["generation.steps"] == "3"
            and 0.01 <= float(params["generation.step_size"]) <= 0.1
        )
        files = {f.path for f in tracker.client.list_artifacts(run.info.run_id, "generation")}
        assert GRID_ARTIFACT in files, files
    study = optuna.load_study(study_name=None, storage=spec.optuna_storage)
    fids = {r.data.tags[TAG_TRIAL]: r.data.metrics["gen/fid"] for r in runs}
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2
    assert sorted(t.values[1] for t in done) == pytest.approx(sorted(fids.values()))

    index = build_report("joint", spec.tracking_uri, tmp_path / "report")
    html = index.read_text()
    assert "Robustness vs sample quality" in html
    front = [line for line in html.splitlines() if "samples of trial" in line]
    assert front, "no sample grid of a Pareto trial in the report"
    for tid in fids:
        shown = (tmp_path / "report" / "figures" / f"samples-{tid}.png").is_file()
        assert shown == any(tid in line for line in front)


def test_a_trial_that_already_sampled_reports_its_scores_again(tmp_path) -> None:
    """A finished trial started again by ``study resume`` is not trained again: its last
    result comes back from its files, the sampler's scores included (else Optuna would
    be told a trial without its FID)."""
    import json

    from trainables.files import (
        CONFIG_FILE,
        FINAL_FILE,
        GEN_METRICS_FILE,
        GENERATION_DIR,
        METRICS_LOG,
    )
    from trainables.ray_adapter import finished_run

    spec = make_spec(tmp_path, "f", epochs=1)
    cfg = spec.trial_config(spec.load_space().sample_defaults())
    out = tmp_path / "run"
    (out / GENERATION_DIR).mkdir(parents=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict()))
    (out / METRICS_LOG).write_text(json.dumps({"epoch": 1, "val/pgd_acc": 0.5}) + "\n")
    (out / FINAL_FILE).write_text(json.dumps({"metrics": {"test/pgd_acc": 0.4}}))
    assert "gen/fid" not in finished_run(out, cfg)
    (out / GENERATION_DIR / GEN_METRICS_FILE).write_text(json.dumps({"gen/fid": 12.5}))
    assert finished_run(out, cfg) == {"epoch": 1, "val/pgd_acc": 0.5, "test/pgd_acc": 0.4,
                                      "gen/fid": 12.5}  # fmt: skip
