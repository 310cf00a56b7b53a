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
from study.generate import GenerationSpec, ShippedFile, run_generation
from study.tracking import TAG_ROLE, TAG_STUDY, MlflowTracker
from trainables.data import load_data, to_float
from trainables.errors import ConfigError
from trainables.generation import (
    CACHE_ENV,
    NOISE_IS_STD,
    fit_class_stats,
    grid_to_uint8,
    initial_images,
    sample_grid,
    save_grid,
    sgld_sample,
    sgld_step,
)
from trainables.models import create_model
from trainables.scores import (
    INCEPTION,
    INCEPTION_FILE,
    INCEPTION_URL,
    MissingWeightsError,
    generation_scores,
)

PLUGIN = str(Path(__file__).with_name("standin_extractor.py"))
STANDIN = "energy-study-standin"


@pytest.fixture(scope="module")
def standin():
    """Register the stand-in extractor with torch-fidelity (test-only; see its docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("standin_extractor", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NAME


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
    sets = {"method": "trades", "epochs": 4, "eps": 0.1, "step_size": 0.025, "attack_steps": 3,
            "autoattack": False, "test_subset": 200, "num_threads": 1}  # fmt: skip
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
    for c in (0, 3, 7, 9):
        xc = x[y == c]
        cov = np.cov(xc, rowvar=False)
        eig = np.sort(np.linalg.eigh(cov)[0])[::-1].clip(min=0)
        ratio = np.cumsum(eig) / eig.sum()
        for frac in (0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
            # smallest k with ratio[k - 1] >= frac (1e-12: round-off at exactly 1.0)
            expected = int(np.argmax(ratio >= frac - 1e-12)) + 1
            assert stats.kept_components(c, frac) == expected, (c, frac)
        assert stats.kept_components(c, 0.9) < stats.kept_components(c, 0.99) < 64
        np.testing.assert_allclose(stats.variances[c][:10].numpy(), eig[:10], rtol=1e-4)
        # λ_i: singular values of the centred data matrix, = sqrt((n - 1) eigenvalue)
        sv = np.linalg.svd(xc - xc.mean(0), compute_uv=False)
        np.testing.assert_allclose(stats.singular_values[c][:10].numpy(), sv[:10], rtol=1e-4)
        np.testing.assert_allclose(sv[:10] ** 2 / (len(xc) - 1), eig[:10], rtol=1e-4)


def test_gaussian_init_has_the_class_mean_and_covariance(digits, stats) -> None:
    x = to_float(digits.train.x).flatten(1).double().numpy()
    xc = x[digits.train.y.numpy() == 4]
    mu, cov = xc.mean(0), np.cov(xc, rowvar=False)
    y = torch.full((20000,), 4)
    raw = initial_images("gaussian", stats, y, torch.Generator().manual_seed(1), clamp=False)
    draws = raw.flatten(1).double().numpy()
    assert np.abs(draws.mean(0) - mu).max() < 0.01
    rel = np.linalg.norm(np.cov(draws, rowvar=False) - cov) / np.linalg.norm(cov)
    assert rel < 0.05, rel
    clamped = initial_images("gaussian", stats, y[:500], torch.Generator().manual_seed(1))
    assert 0.0 <= clamped.min() and clamped.max() <= 1.0
    torch.testing.assert_close(clamped, raw[:500].clamp(0, 1))  # same draws, then clamped


def test_pca_init_scales_the_kept_components_by_sigma_times_singular_values(stats) -> None:
    c, sigma = 6, 0.01
    k = stats.kept_components(c, 0.9)
    y = torch.full((20000,), c)
    x0 = initial_images("pca", stats, y, torch.Generator().manual_seed(2), sigma=sigma,
                        retained_variance=0.9, clamp=False).flatten(1).double()  # fmt: skip
    centred = x0 - stats.means[c].double()
    u = stats.components[c].double()
    coef = centred @ u.T  # coordinates along every component
    ratio = coef[:, :k].std(0) / (sigma * stats.singular_values[c][:k].double())
    torch.testing.assert_close(ratio, torch.ones(k, dtype=ratio.dtype), atol=0.03, rtol=0)
    assert coef[:, k:].abs().max() < 1e-5  # nothing beyond the k kept components


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


def test_class_statistics_are_cached_on_disk(digits, tmp_path, monkeypatch) -> None:
    x, y = to_float(digits.train.x), digits.train.y
    first = fit_class_stats(x, y, cache_dir=tmp_path, key="digits")
    files = list((tmp_path / "class_stats").glob("digits-*.pt"))
    assert files == [first.path] and not first.from_cache
    mtime = first.path.stat().st_mtime_ns
    again = fit_class_stats(x, y, cache_dir=tmp_path, key="digits")
    assert again.from_cache and again.path == first.path
    assert first.path.stat().st_mtime_ns == mtime  # read, not rewritten
    torch.testing.assert_close(again.means, first.means)
    for a, b in zip(again.components, first.components):
        torch.testing.assert_close(a, b)
    other = fit_class_stats(x[:-10], y[:-10], cache_dir=tmp_path, key="digits")
    assert not other.from_cache  # different data, different entry
    assert len(list((tmp_path / "class_stats").glob("*.pt"))) == 2
    assert not list((tmp_path / "class_stats").glob("*.tmp"))
    # the default location follows $ENERGY_STUDY_CACHE
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    from_env = fit_class_stats(x, y, key="digits")
    assert from_env.path.parent == tmp_path / "env" / "class_stats"


def test_bad_generation_inputs_fail_clearly(stats) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(2, dtype=torch.long)
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="retained_variance"):
            initial_images("pca", stats, y, g, retained_variance=bad)
    with pytest.raises(ConfigError, match="unknown initialisation 'sobol'"):
        initial_images("sobol", stats, y, g)
    with pytest.raises(ConfigError, match="class statistics"):
        initial_images("pca", None, y, g)
    with pytest.raises(ConfigError, match="shape"):
        initial_images("random", None, y, g)
    with pytest.raises(ConfigError, match="target classes"):
        initial_images("gaussian", stats, torch.tensor([10]), g)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    x0 = torch.rand(2, 1, 8, 8)
    for bad in ({"momentum": 1.0}, {"noise": -0.1}, {"steps": -1}, {"record_every": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            sgld_sample(model, x0, y, **bad)
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


def test_two_sgld_steps_carry_the_momentum_by_hand(trained) -> None:
    model = trained["model"]
    assert NOISE_IS_STD
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.arange(6)
    zeta, eta, gamma = 0.8, 0.05, 0.01

    def grad(x):
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(-model(x).gather(1, y[:, None]).sum(), x)[0]

    g = torch.Generator().manual_seed(5)
    n0, n1 = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    v1 = -eta / 2 * grad(x0)
    x1 = (x0 + v1 + gamma * n0).clamp(0, 1)
    v2 = zeta * v1 - eta / 2 * grad(x1)
    x2 = (x1 + v2 + gamma * n1).clamp(0, 1)  # ε_n = γ·N(0, I): γ is a standard deviation
    got = sgld_sample(model, x0, y, steps=2, momentum=zeta, step_size=eta, noise=gamma,
                      generator=torch.Generator().manual_seed(5))  # fmt: skip
    torch.testing.assert_close(got.images, x2)
    # ζ = 0, γ = 0: plain gradient descent on the energy
    plain = sgld_sample(model, x0, y, steps=2, momentum=0.0, step_size=eta, noise=0.0)
    p1 = (x0 - eta / 2 * grad(x0)).clamp(0, 1)
    torch.testing.assert_close(plain.images, (p1 - eta / 2 * grad(p1)).clamp(0, 1))
    e = [-model(x).gather(1, y[:, None]).squeeze(1).mean() for x in (x0, x1, x2)]
    torch.testing.assert_close(got.energy_target, torch.stack(e).detach())


def test_chains_are_per_image_restore_modes_and_leave_parameters_alone() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x0 = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10)
    whole = sgld_sample(model, x0, y, steps=5, noise=0.0)
    batched = sgld_sample(model, x0, y, steps=5, noise=0.0, batch_size=3)
    torch.testing.assert_close(batched.images, whole.images)  # per-image gradients
    torch.testing.assert_close(batched.energy_target, whole.energy_target)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    seeded = [
        sgld_sample(model, x0, y, steps=5, batch_size=4, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    torch.testing.assert_close(seeded[0].images, seeded[1].images)
    sparse = sgld_sample(model, x0, y, steps=7, noise=0.0, record_every=3)
    assert sparse.trace_steps.tolist() == [0, 3, 6, 7]
    full = sgld_sample(model, x0, y, steps=7, noise=0.0)
    assert full.trace_steps.tolist() == list(range(8)) and full.energy_target.shape == (8,)
    torch.testing.assert_close(sparse.energy_target, full.energy_target[[0, 3, 6, 7]])
    with torch.no_grad():  # the chain takes its own gradients even inside no_grad
        inside = sgld_sample(model, x0, y, steps=5, noise=0.0)
    torch.testing.assert_close(inside.images, whole.images)


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


def test_pca_momentum_sgld_beats_random_noise_on_fid(
    trained, stats, digits, standin, tmp_path
) -> None:
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
                                   feature_extractor=standin, cache_dir=tmp_path)  # fmt: skip
        fids[init] = scores["gen/fid"]
        assert scores["gen/is"] >= 1.0 and scores["gen/diversity"] > 0
        assert np.isfinite(scores["gen/kid"]) and np.isfinite(scores["gen/kid_std"])
    print(f"FID (stand-in extractor): pca+momentum {fids['pca']:.4f}, random {fids['random']:.4f}")
    assert fids["pca"] < fids["random"]


def test_reference_features_are_cached_and_few_samples_score(digits, standin, tmp_path) -> None:
    ref = to_float(digits.train.x)
    fake = ref[:7].flip(-1)  # 7 samples: IS splits and KID subset size shrink to fit
    first = generation_scores(fake, ref, reference_key="digits/train", feature_extractor=standin,
                              cache_dir=tmp_path)  # fmt: skip
    files = sorted((tmp_path / "fidelity").glob("digits_train-n*.pt"))
    assert files, list((tmp_path / "fidelity").iterdir())  # features + FID statistics
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = generation_scores(fake, ref, reference_key="digits/train", feature_extractor=standin,
                              cache_dir=tmp_path)  # fmt: skip
    assert again == first and [f.stat().st_mtime_ns for f in files] == mtimes
    assert all(np.isfinite(v) for v in first.values()), first
    # another reference under the same key gets its own entry (pixel hash in the name)
    generation_scores(fake, ref[:500], reference_key="digits/train", feature_extractor=standin,
                      cache_dir=tmp_path, isc=False)  # fmt: skip
    assert len(sorted((tmp_path / "fidelity").glob("digits_train-n500-*.pt"))) >= 1
    with pytest.raises(ConfigError, match="too few"):
        generation_scores(fake[:1], ref, reference_key="r", feature_extractor=standin,
                          cache_dir=tmp_path)  # fmt: skip
    only = generation_scores(fake, ref, reference_key="r", isc=False, fid=False, kid=False)
    assert set(only) == {"gen/diversity"}  # no extractor, no weights needed


def test_sample_grid_has_one_row_per_class(tmp_path) -> None:
    images = torch.rand(13, 1, 8, 8)
    labels = torch.tensor([0] * 5 + [3] * 8)
    grid = sample_grid(images, labels, per_class=4)
    assert grid.shape == (3, 2 * 9 + 1, 4 * 9 + 1)  # 2 classes x 4 tiles of 8 + 1 px padding
    assert grid_to_uint8(grid).shape == (19, 37, 3)
    path = save_grid(images, labels, tmp_path / "g" / "s.png", per_class=4)
    from PIL import Image

    assert Image.open(path).size == (37, 19)


def test_missing_inception_weights_say_which_file_and_where(tmp_path, monkeypatch) -> None:
    x = torch.rand(4, 1, 8, 8)
    empty = tmp_path / "weights"
    empty.mkdir()
    for where in (empty, tmp_path / "none.pth"):
        with pytest.raises(MissingWeightsError) as err:
            generation_scores(x, x, reference_key="r", feature_extractor=INCEPTION,
                              weights_path=where, cache_dir=tmp_path)  # fmt: skip
        text = str(err.value)
        assert INCEPTION_FILE in text and str(where) in text and INCEPTION_URL in text
        assert "--inception-weights" in text and "ENERGY_STUDY_INCEPTION_WEIGHTS" in text
        print(text)
    monkeypatch.setenv("ENERGY_STUDY_INCEPTION_WEIGHTS", str(empty))
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        generation_scores(x, x, reference_key="r", cache_dir=tmp_path)
    assert not (tmp_path / "fidelity").exists()  # failed before any work


# --- study generate ------------------------------------------------------------------------
def test_generate_once_from_a_run_nests_under_it(trained, tmp_path) -> None:
    db = trained["db"]
    base = {"samples": 40, "steps": 10, "extractor_plugin": PLUGIN, "feature_extractor": STANDIN}
    spec = GenerationSpec(name="once", source=trained["run_id"], base=base, tracking_uri=db,
                          storage=str(tmp_path))  # fmt: skip
    (outcome,) = run_generation(spec)
    assert outcome.trial_id == "single" and outcome.status == "FINISHED"
    tracker = MlflowTracker(db, "src")
    (run,) = tracker.find_runs(**{TAG_ROLE: "generation", TAG_STUDY: "once"})
    assert run.info.run_id == outcome.run_id
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.info.status == "FINISHED"
    for key in ("gen/fid", "gen/is", "gen/kid", "gen/diversity"):
        assert np.isfinite(run.data.metrics[key]), key
        assert run.data.metrics[key] == pytest.approx(outcome.metrics[key])
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
def test_generation_study_from_a_checkpoint_file(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths are resolved on the driver
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = {"extractor_plugin": PLUGIN, "feature_extractor": STANDIN}
    spec = GenerationSpec(name="gstudy", source=str(trained["ckpt"]), space="sgld_smoke",
                          trials=3, base=base, tracking_uri=db, storage=".")  # fmt: skip
    outcomes = run_generation(spec)
    assert [o.status for o in outcomes] == ["FINISHED"] * 3
    tracker = MlflowTracker(db, "generation")
    (parent,) = tracker.find_runs(**{TAG_ROLE: "generation_study", TAG_STUDY: "gstudy"})
    runs = tracker.find_runs(**{TAG_ROLE: "generation", TAG_STUDY: "gstudy"})
    assert len(runs) == 3
    assert {r.info.run_id for r in runs} == {o.run_id for o in outcomes}
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert np.isfinite(run.data.metrics["gen/fid"])
        assert run.data.params["samples"] == "40" and run.data.params["steps"] == "10"
        steps = tracker.client.get_metric_history(run.info.run_id, "gen/energy_target")
        assert len(steps) == 11
    for outcome in outcomes:  # the sampled values and the space's constants
        assert {"init", "momentum", "step_size", "samples", "steps"} <= set(outcome.config)
        assert np.isfinite(outcome.metrics["gen/fid"])
    # one machine: the trials opened the driver's files themselves, no copy was made
    assert not (tmp_path / "cache" / "shipped").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_a_trial_without_the_dataset_names_its_node_and_the_data_root(tmp_path) -> None:
    """The training data does not travel with a trial: a node without it fails the trial
    with a message naming the node, the data_root and that every node needs it."""
    import socket

    from trainables.checkpoint import save_checkpoint

    root = tmp_path / "no-cifar"
    config = {"dataset": "cifar10", "data_root": str(root)}
    ckpt = save_checkpoint(tmp_path / "best.pt", {"config": config, "model": {}})
    spec = GenerationSpec(name="nodata", source=str(ckpt), space="sgld_smoke", trials=1,
                          base={"score": False}, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          storage=str(tmp_path))  # fmt: skip
    (outcome,) = run_generation(spec)
    assert outcome.status == "FAILED"
    assert "DataNotFoundError" in outcome.error and "cifar10 files not found" in outcome.error
    assert f"on node {socket.gethostname()}" in outcome.error, outcome.error
    assert f"data_root = {str(root)!r} on every node" in outcome.error, outcome.error


@pytest.mark.usefixtures("ray_cluster")
def test_a_shipped_file_is_the_drivers_on_its_node_and_a_copy_elsewhere(tmp_path) -> None:
    """The driver's file itself on the driver's node; on another node (its Ray node id
    differs) a copy of the same bytes fetched from the object store, once per node."""
    import dataclasses

    driver = tmp_path / "driver" / "best.pt"
    driver.parent.mkdir()
    driver.write_bytes(bytes(range(256)) * 40)
    scratch = tmp_path / "scratch"
    shipped = ShippedFile.put(driver)
    assert shipped.local(scratch) == driver and not scratch.exists()

    elsewhere = dataclasses.replace(shipped, node_id="another-node")
    copy = elsewhere.local(scratch)
    assert copy != driver and copy.name == "best.pt" and copy.parent.parent == scratch
    assert copy.read_bytes() == driver.read_bytes()
    mtime = copy.stat().st_mtime_ns
    assert elsewhere.local(scratch) == copy and copy.stat().st_mtime_ns == mtime  # not refetched
    assert [p.name for p in scratch.rglob("*") if p.is_file()] == ["best.pt"]  # no temp left

    # the driver's node, but its file gone (a driver that cleaned up): the copy is used
    driver.unlink()
    assert shipped.local(scratch) == copy


@pytest.mark.usefixtures("ray_cluster")
def test_a_study_ships_every_driver_file_its_trials_open(trained, tmp_path) -> None:
    """The source checkpoint always; a ``.py`` plugin and the Inception weights the
    driver found when the runs are scored with Inception; nothing else."""
    import ray

    from study.generate import SOURCE_KEY, resolve_source, ship_trial_files
    from trainables.gen_config import SamplerConfig

    src = resolve_source(str(trained["ckpt"]), "sqlite:///unused.db", tmp_path, "generation")
    weights = tmp_path / "weights" / INCEPTION_FILE
    weights.parent.mkdir()
    weights.write_bytes(b"not really Inception")
    scored = SamplerConfig.from_dict(
        {"feature_extractor": INCEPTION, "inception_weights": str(weights.parent),
         "extractor_plugin": PLUGIN}
    )  # fmt: skip
    files = ship_trial_files(src, scored)
    assert set(files) == {SOURCE_KEY, "extractor_plugin", "inception_weights"}
    for key, path in ((SOURCE_KEY, trained["ckpt"]), ("extractor_plugin", Path(PLUGIN)),
                      ("inception_weights", weights)):  # fmt: skip
        assert files[key].path == str(path.resolve())  # the folder given: the file in it
        assert ray.get(files[key].ref) == path.read_bytes(), key
    standin_only = SamplerConfig.from_dict({"feature_extractor": STANDIN, "extractor_plugin": "m"})
    assert set(ship_trial_files(src, standin_only)) == {SOURCE_KEY}  # a module is not a file
    unscored = SamplerConfig.from_dict({"score": False, "inception_weights": str(weights)})
    assert set(ship_trial_files(src, unscored)) == {SOURCE_KEY}
