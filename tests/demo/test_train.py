"""Pieces of the embedded model's training: the hybrid diffusion loss and adaLN-Zero."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq.demo import train
from jdq.sampling import ddpm

TAB = train.diffusion_tables()


def test_tables_match_the_sampler_at_1000_steps():
    s = ddpm(1000)  # no respacing: step i is timestep 999 - i
    for ours, theirs in (("coef_x0", "coef_x0"), ("coef_xt", "coef_xt"), ("post_log_var", "min_log"),
                         ("log_betas", "max_log"), ("sqrt_recip_ac", "sqrt_recip_ac")):
        np.testing.assert_allclose(np.asarray(TAB[ours]), s.tables[theirs][::-1], rtol=1e-6)


def test_normal_kl_against_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    m1, m2 = rng.standard_normal(50), rng.standard_normal(50)
    lv1, lv2 = rng.uniform(-3, 1, 50), rng.uniform(-3, 1, 50)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.exp(lv1 / 2))),
                                            torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(lv2 / 2))))
    got = np.asarray(train.normal_kl(m1, lv1, m2, lv2), np.float64)
    # ours: float32 (inputs rounded by u relative each), torch: float64 (exact by comparison).
    # First-order bound of ours: the exp's argument is off by u(|lv1| + |lv2| + |lv1 − lv2|) (+ 2 ulps of
    # the exp itself); (m1 − m2)² by 2|Δm|·u(|m1| + |m2| + |Δm|) + 2u·Δm²; e^-lv2 by u|lv2| + 2u; the five-term
    # sum by γ_5 of the sum of the terms' magnitudes; the 1/2 is exact.
    u = 2.0**-24
    e, dm = np.exp(lv1 - lv2), m1 - m2
    q = dm**2 * np.exp(-lv2)
    d_exp = e * (u * (np.abs(lv1) + np.abs(lv2) + np.abs(lv1 - lv2)) + 2 * u)
    d_q = np.exp(-lv2) * (2 * np.abs(dm) * u * (np.abs(m1) + np.abs(m2) + np.abs(dm)) + 2 * u * dm**2) \
        + q * (u * np.abs(lv2) + 2 * u)
    terms = 1 + np.abs(lv2) + np.abs(lv1) + e + q
    gamma_5 = 5 * u / (1 - 5 * u)
    bound = 0.5 * (gamma_5 * terms + u * (np.abs(lv1) + np.abs(lv2)) + d_exp + d_q)
    assert np.all(np.abs(got - ref.numpy()) <= bound)


@pytest.mark.parametrize("mean, log_scale", [(0.1, np.log(0.05)), (-0.95, np.log(0.3)), (0.7, np.log(1.2))])
def test_discretized_likelihood_sums_to_one_over_the_256_levels(mean, log_scale):
    levels = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)
    p = jnp.exp(-train.discretized_gaussian_nll(levels, jnp.float32(mean), jnp.float32(log_scale)))
    np.testing.assert_allclose(float(p.sum()), 1.0, rtol=2e-3)


def test_hybrid_loss_vanishes_for_the_true_noise_and_posterior_variance():
    key = jax.random.key(0)
    x0 = jnp.clip(jax.random.normal(key, (4, 6, 6, 1)), -1, 1)
    eps = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.array([5, 100, 500, 999])
    x_t = train._bcast(TAB["sqrt_ac"][t], x0) * x0 + train._bcast(TAB["sqrt_1m_ac"][t], x0) * eps
    perfect = jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)  # v = -1: the posterior variance
    np.testing.assert_allclose(np.asarray(train.hybrid_loss(perfect, x0, x_t, eps, t, TAB)), 0.0, atol=1e-4)
    wrong_var = jnp.concatenate([eps, jnp.ones_like(eps)], axis=-1)
    assert float(train.hybrid_loss(wrong_var, x0, x_t, eps, t, TAB)[0]) > 1e-3  # at small t, β_t differs from β̃_t


def test_adaln_zero_makes_a_fresh_dit_output_zero():
    from jdq.models import dit

    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    model = dit.from_config(cfg, key=0)
    params = train.adaln_zero(model.params)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
    out = model.apply(params, x, jnp.array([3.0, 700.0]), jnp.array([0, 3]))
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    assert float(jnp.abs(model.apply(model.params, x, jnp.array([3.0, 700.0]), jnp.array([0, 3]))).max()) > 0
    # only the modulations and the final linear were zeroed
    np.testing.assert_array_equal(params["blocks"][0]["mlp"]["fc1"]["kernel"], model.params["blocks"][0]["mlp"]["fc1"]["kernel"])


def test_install_chooses_the_best_cheap_sampler_and_copies_a_run(tmp_path):
    import json

    from jdq.demo import classifier as clf
    from jdq.demo import install
    from jdq.models import base, dit, load

    metrics = {"sample_accuracy": [
        {"sampler": "ddpm", "steps": 250, "guidance": 2.0, "accuracy": 0.99},
        {"sampler": "ddpm", "steps": 50, "guidance": 2.0, "accuracy": 0.95},
        {"sampler": "ddim", "steps": 50, "guidance": 4.0, "accuracy": 0.95},
        {"sampler": "ddim", "steps": 50, "guidance": 1.0, "accuracy": 0.60}]}
    assert install.choose_sampling(metrics) == {"sampler": "ddpm", "steps": 50, "guidance": 2.0}
    run = tmp_path / "run"
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    base.save(dit.from_config(cfg, key=0), run / "dit")
    clf.save(clf.init(jax.random.key(0)), run / "classifier.safetensors")
    (run / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FileNotFoundError, match="samples.png"):
        install.install(run, tmp_path / "assets", tmp_path / "docs")
    (run / "samples.png").write_bytes(b"png")
    chosen = install.install(run, tmp_path / "assets", tmp_path / "docs")
    assert chosen["steps"] == 50
    model, _ = load(tmp_path / "assets" / "animal_dit")
    assert model.config == cfg
    sampling = json.loads((tmp_path / "assets" / "animal_dit" / "sampling.json").read_text())
    assert sampling["pixel_space"] and len(sampling["class_names"]) == 10 and sampling["sampler"] == "ddpm"
    assert (tmp_path / "docs" / "samples.png").read_bytes() == b"png"
    assert set(clf.load(tmp_path / "assets" / "animal_classifier.safetensors")) == set(clf.init(jax.random.key(0)))
