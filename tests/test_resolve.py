"""A trial's config is resolved once, on the driver, and handed along as one object.

The space file is read once per spec (validation, the searcher, ASHA and every
trial config share it); trials build their config from the pickled
:class:`~study.spec.TrialTemplate` without opening the space file; paths are
absolute before they leave the driver.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import search_spaces.space
from study.generate import GenerationSpec
from study.spec import StudySpec, TrialTemplate
from trainables.errors import ConfigError

SPACE = """\
fixed:
  dataset: digits
  epochs: 4
  eps: 0.1
params:
  beta: {type: float, low: 1.0, high: 10.0}
  weight_fn: {type: categorical, choices: [weat, exp]}
  weight_params.temperature: {type: float, low: 0.5, high: 20.0, when: {weight_fn: exp}}
"""


@pytest.fixture
def space_loads(monkeypatch) -> list[str]:
    """The sources of every space file parsed while the test runs."""
    loads: list[str] = []
    parse = search_spaces.space.parse_space

    def counted(text: str, source: str = "<string>"):
        loads.append(source)
        return parse(text, source)

    monkeypatch.setattr(search_spaces.space, "parse_space", counted)
    return loads


def make_spec(folder: Path, **kw) -> StudySpec:
    (folder / "space.yaml").write_text(SPACE)
    values = {"name": "resolve", "space": str(folder / "space.yaml"), "epochs": 2}
    return StudySpec(**{**values, "storage": str(folder / "studies"), **kw})


def test_the_driver_reads_the_space_once_per_study(tmp_path, space_loads) -> None:
    spec = make_spec(tmp_path, asha=True, grace_period=1)
    spec.validate()  # every choice and range end, the metric, ASHA
    assert spec.uses_asha() and spec.default_epochs == 2
    template = pickle.loads(pickle.dumps(spec.template))  # what a trial receives
    for beta in (1.0, 2.5, 9.0):
        assert template.config({"beta": beta}).beta == beta
        assert spec.trial_config({"beta": beta, "weight_fn": "weat"}).weight_fn == "weat"
    assert len(space_loads) == 1, space_loads


def test_a_trial_config_never_reads_the_space_file(tmp_path, space_loads) -> None:
    spec = make_spec(tmp_path)
    template = spec.template
    (tmp_path / "space.yaml").write_text(SPACE.replace("eps: 0.1", "eps: 0.3"))
    edited = pickle.loads(pickle.dumps(template)).config({"beta": 3.0})
    (tmp_path / "space.yaml").unlink()
    cfg = pickle.loads(pickle.dumps(template)).config(
        {"beta": 3.0, "weight_fn": "exp", "weight_params.temperature": 2.0}
    )
    assert edited.eps == cfg.eps == 0.1  # the file as the study started
    assert cfg.dataset == "digits" and cfg.weight_params == {"temperature": 2.0}
    assert cfg.epochs == 2 and cfg.autoattack is False  # the study's overrides win
    assert spec.trial_config({"beta": 3.0}) == edited  # the spec's own copy too
    assert len(space_loads) == 1


def test_the_template_layers_base_fixed_sampled_and_overrides(tmp_path) -> None:
    spec = make_spec(tmp_path, base={"eps": 0.05, "lr_max": 0.02, "autoattack": True})
    template = spec.template
    assert isinstance(template, TrialTemplate)
    assert template.values["eps"] == 0.1  # fixed > base
    assert template.values["lr_max"] == 0.02  # base kept
    assert template.overrides == {"epochs": 2, "autoattack": False}
    cfg = template.config({"eps": 0.2, "epochs": 9, "autoattack": True})
    assert (cfg.eps, cfg.epochs, cfg.autoattack) == (0.2, 2, False)  # sampled < overrides


def test_relative_paths_become_absolute_on_the_driver(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(SPACE)
    spec = StudySpec(
        name="rel",
        space="space.yaml",
        storage="studies",
        base={"data_root": "data", "val_npz": "~/val.npz", "output_dir": "runs/x"},
    )
    assert spec.space == str(tmp_path / "space.yaml")
    assert spec.storage == str(tmp_path / "studies")
    assert spec.folder.is_absolute()
    values = spec.template.values
    assert values["data_root"] == str(tmp_path / "data")
    assert values["val_npz"] == str(Path("~/val.npz").expanduser())
    assert values["output_dir"] == str(tmp_path / "runs" / "x")
    monkeypatch.chdir("/")  # a trial's working folder is Tune's
    assert spec.trial_config({"beta": 2.0}).data_root == str(tmp_path / "data")
    assert StudySpec(name="shipped", space="smoke").space == "smoke"  # a name stays a name


def test_generation_spec_is_validated_at_the_door(tmp_path, space_loads) -> None:
    good = {"name": "gen", "source": "run", "space": "sgld_smoke", "storage": str(tmp_path)}
    spec = GenerationSpec(**good, base={"samples": 40})
    spec.validate()
    assert spec.trial_config({"steps": 7}).steps == 7
    assert spec.trial_config({}).samples == 40
    assert len(space_loads) == 1
    for bad, match in (
        ({"name": "a b"}, "study name"),
        ({"source": ""}, "source"),
        ({"metrics": ["val/pgd_acc"]}, "generation objectives"),
        ({"metrics": ["gen/fid", "gen/is"]}, "2 metric"),
        ({"trials": 0}, "trials"),
        ({"base": {"steps": -1}}, "steps"),
        ({"space": "smoke"}, "not a config key"),
    ):
        with pytest.raises(ConfigError, match=match):
            GenerationSpec(**{**good, **bad}).validate()
    single = GenerationSpec(name="one", source="run", base={"inception_weights": "w.pth"})
    single.validate()  # no space: one sampling run
    assert Path(single.trial_config({}).inception_weights).is_absolute()
