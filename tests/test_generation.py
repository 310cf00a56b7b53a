"""Generation: initialisations, SGLD with momentum (Eq. 7), torch-fidelity scores, `study generate`.

Scores run torch-fidelity's real ``calculate_metrics`` with a small stand-in
feature extractor (tests/standin_extractor.py): the Inception weights cannot be
downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from study import cli
from study.tracking import TAG_ROLE, TAG_STUDY, MlflowTracker
from trainables.data import load_data, to_float
from trainables.errors import ConfigError
from trainables.generation import (
    fit_class_stats,
    initial_images,
    sgld_sample,
    sgld_step,
)
from trainables.scores import INCEPTION_FILE, MissingWeightsError, generation_scores

PLUGIN = str(Path(__file__).with_name("standin_extractor.py"))
STANDIN = "energy-study-standin"


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def stats(digits, tmp_path_factory):
    return fit_class_stats(
        to_float(digits.train.x), digits.train.y, cache_dir=tmp_path_factory.mktemp("cache")
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A robust (TRADES) small CNN on digits, trained by `study train` into MLflow."""
    folder = tmp_path_factory.mktemp("trained")
    db = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["train", "--no-progress", "--tracking-uri", db, "--experiment", "src",
            "-o", str(folder / "run")]  # fmt: skip
    sets = {"method": "trades", "epochs": 4, "eps": 0.1, "step_size": 0.025,
            "attack_steps": 3, "aa_n": 0, "test_subset": 200, "num_threads": 1}  # fmt: skip
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main(args) == 0
    (run,) = MlflowTracker(db, "src").find_runs(**{TAG_ROLE: "trial"})
    from trainables.checkpoint import load_checkpoint
    from trainables.models import create_model

    ckpt = folder / "run" / "checkpoints" / "best.pt"
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    return {"db": db, "run_id": run.info.run_id, "ckpt": ckpt, "model": model.eval()}


# --- initialisations -----------------------------------------------------------------------
def test_pca_component_counts_match_numpy(digits, stats) -> None:
    x = to_float(digits.train.x).flatten(1).double().numpy()
    y = digits.train.y.numpy()
    for c in (0, 3, 7):
        cov = np.cov(x[y == c], rowvar=False)
        eig = np.sort(np.linalg.eigh(cov)[0])[::-1].clip(min=0)
        ratio = np.cumsum(eig) / eig.sum()
        for frac in (0.5, 0.9, 0.95, 0.99, 1.0):
            expected = int(np.searchsorted(ratio, frac - 1e-12) + 1)
            assert stats.kept_components(c, frac) == expected, (c, frac)
        np.testing.assert_allclose(stats.variances[c][:5].numpy(), eig[:5], rtol=1e-4)


def test_initialisations_have_the_claimed_shapes_and_statistics(digits, stats) -> None:
    y = torch.full((400,), 4)
    g = torch.Generator().manual_seed(0)
    mean4 = stats.means[4].view(1, 8, 8)
    pca0 = initial_images("pca", stats, y, g, sigma=1e-6, retained_variance=0.99)
    assert pca0.shape == (400, 1, 8, 8)
    torch.testing.assert_close(pca0.mean(0), mean4.clamp(0, 1), atol=1e-4, rtol=0)
    pca = initial_images("pca", stats, y, g, sigma=0.01, retained_variance=0.9)
    assert 0.0 <= pca.min() and pca.max() <= 1.0
    assert pca.std(0).mean() > pca0.std(0).mean() * 100
    gauss = initial_images("gaussian", stats, y, g)
    assert gauss.shape == (400, 1, 8, 8)
    # mean close to the class mean (clamping to [0, 1] biases it a little at the borders)
    assert (gauss.mean(0) - mean4).abs().mean() < 0.05
    rnd = initial_images("random", None, y, g, shape=(1, 8, 8))
    assert rnd.shape == (400, 1, 8, 8) and 0 <= rnd.min() and rnd.max() <= 1
    assert abs(float(rnd.mean()) - 0.5) < 0.02


def test_class_statistics_are_cached_on_disk(digits, tmp_path) -> None:
    x, y = to_float(digits.train.x), digits.train.y
    first = fit_class_stats(x, y, cache_dir=tmp_path, key="digits")
    files = list((tmp_path / "class_stats").glob("digits-*.pt"))
    assert len(files) == 1 and not first.from_cache
    again = fit_class_stats(x, y, cache_dir=tmp_path, key="digits")
    assert again.from_cache
    torch.testing.assert_close(again.means, first.means)
    other = fit_class_stats(x[:-10], y[:-10], cache_dir=tmp_path, key="digits")
    assert not other.from_cache  # different data, different entry


def test_bad_generation_inputs_fail_clearly(stats) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, dtype=torch.long)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="retained_variance"):
            initial_images("pca", stats, y, g, retained_variance=bad)
    with pytest.raises(ConfigError, match="initialisation"):
        initial_images("sobol", stats, y, g)
    from trainables.gen_config import SamplerConfig

    with pytest.raises(ConfigError, match="momentum"):
        SamplerConfig.from_dict({"momentum": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        SamplerConfig.from_dict({"step": 3})


# --- the sampler ---------------------------------------------------------------------------
def test_one_sgld_step_is_eq7_by_hand(trained) -> None:
    model = trained["model"]
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(5, 1, 8, 8, generator=g)
    y = torch.arange(5)
    zeta, eta, gamma = 0.8, 0.05, 0.01
    # by hand: v1 = ζ·0 − η/2 ∇E(x0, y); x1 = clamp(x0 + v1 + γ·n)
    x = x0.clone().requires_grad_(True)
    energy = -model(x).gather(1, y[:, None]).sum()
    (grad,) = torch.autograd.grad(energy, x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    expected = (x0 - eta / 2 * grad + gamma * noise).clamp(0, 1)
    got = sgld_sample(model, x0, y, steps=1, momentum=zeta, step_size=eta, noise=gamma,
                      generator=torch.Generator().manual_seed(9))  # fmt: skip
    torch.testing.assert_close(got.images, expected)
    x1, v1 = sgld_step(model, x0, torch.zeros_like(x0), y, momentum=zeta, step_size=eta,
                       noise=gamma * noise)  # fmt: skip
    torch.testing.assert_close(x1, expected)
    torch.testing.assert_close(v1, -eta / 2 * grad)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_target_energy_falls_along_the_chain(trained, stats) -> None:
    model = trained["model"]
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat_interleave(10)
    x0 = initial_images("pca", stats, y, g, sigma=0.01, retained_variance=0.95)
    res = sgld_sample(model, x0, y, steps=60, generator=g)
    trace = res.energy_target
    assert trace.shape == (61,)
    assert trace[-1] < trace[0] - 1.0, trace[::10]
    assert trace[-10:].mean() < trace[:10].mean()
    # the target class ends below the others
    assert res.energy_target[-1] < res.energy_other[-1]
    assert res.images.shape == x0.shape and 0 <= res.images.min() and res.images.max() <= 1


def test_pca_momentum_sgld_beats_random_noise_on_fid(trained, stats, digits, tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("standin_extractor", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = trained["model"]
    y = torch.arange(10).repeat_interleave(20)
    ref = to_float(digits.train.x)
    fids = {}
    for init in ("pca", "random"):
        g = torch.Generator().manual_seed(0)
        x0 = initial_images(init, stats, y, g, shape=(1, 8, 8), sigma=0.01,
                            retained_variance=0.95)  # fmt: skip
        res = sgld_sample(model, x0, y, steps=40, momentum=0.8, step_size=0.05, generator=g)
        scores = generation_scores(res.images, ref, reference_key="digits-train", labels=y,
                                   feature_extractor=STANDIN, cache_dir=tmp_path)  # fmt: skip
        fids[init] = scores["gen/fid"]
        assert scores["gen/is"] >= 1.0 and scores["gen/diversity"] > 0
        assert np.isfinite(scores["gen/kid"])
    print(f"FID (stand-in extractor): pca+momentum {fids['pca']:.4f}, random {fids['random']:.4f}")
    assert fids["pca"] < fids["random"]


def test_missing_inception_weights_say_which_file_and_where(tmp_path) -> None:
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(MissingWeightsError) as err:
        generation_scores(x, x, reference_key="r", weights_path=tmp_path / "none.pth")
    text = str(err.value)
    assert INCEPTION_FILE in text and "--inception-weights" in text and "https://" in text


# --- study generate ------------------------------------------------------------------------
def test_generate_once_from_a_run_nests_under_it(trained, tmp_path, capsys) -> None:
    db = trained["db"]
    code = cli.main(["generate", "--from", trained["run_id"], "--samples", "40", "--set",
                     "steps=10", "--tracking-uri", db, "--storage", str(tmp_path),
                     "--name", "once", "--extractor-plugin", PLUGIN,
                     "--feature-extractor", STANDIN])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tracker = MlflowTracker(db, "src")
    (run,) = tracker.find_runs(**{TAG_ROLE: "generation", TAG_STUDY: "once"})
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.info.status == "FINISHED"
    for key in ("gen/fid", "gen/is", "gen/kid", "gen/diversity"):
        assert np.isfinite(run.data.metrics[key]), key
    trace = tracker.client.get_metric_history(run.info.run_id, "gen/energy_target")
    assert sorted(m.step for m in trace) == list(range(11))
    names = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "generation")}
    assert {"generation/samples.png", "generation/init_vs_final.png"} <= names
    assert run.data.params["steps"] == "10" and run.data.params["init"] == "pca"


def test_generate_without_weights_fails_before_sampling(trained, tmp_path, capsys) -> None:
    code = cli.main(["generate", "--from", str(trained["ckpt"]), "--tracking-uri",
                     f"sqlite:///{tmp_path / 'm.db'}", "--storage", str(tmp_path),
                     "--inception-weights", str(tmp_path / "missing.pth")])  # fmt: skip
    assert code == 2
    assert INCEPTION_FILE in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()  # nothing was run or logged


@pytest.mark.usefixtures("ray_cluster")
def test_generation_study_from_a_checkpoint_file(trained, tmp_path, capsys) -> None:
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["generate", "--from", str(trained["ckpt"]), "--space", "sgld_smoke",
                     "--trials", "3", "--tracking-uri", db, "--storage", str(tmp_path),
                     "--name", "gstudy", "--extractor-plugin", PLUGIN,
                     "--feature-extractor", STANDIN])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tracker = MlflowTracker(db, "generation")
    (parent,) = tracker.find_runs(**{TAG_ROLE: "generation_study", TAG_STUDY: "gstudy"})
    runs = tracker.find_runs(**{TAG_ROLE: "generation", TAG_STUDY: "gstudy"})
    assert len(runs) == 3
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert np.isfinite(run.data.metrics["gen/fid"])
        assert run.data.params["samples"] == "40" and run.data.params["steps"] == "10"
        steps = tracker.client.get_metric_history(run.info.run_id, "gen/energy_target")
        assert len(steps) == 11
    out = capsys.readouterr().out
    assert "gen/fid" in out
