"""Timesteps, sigmas and single update steps against diffusers' schedulers (independent reference)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the reference backend (pip install '.[torch]')")
diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference scheduler library")

import jax.numpy as jnp  # noqa: E402

from jdq.sampling import ddim, ddpm, dpm_solver_pp_2m, flow_euler, schedules  # noqa: E402

SHAPE = (2, 4, 6, 6)  # NCHW, as diffusers expects; our update takes channel_axis=1


def _rand(rng, shape=SHAPE):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 7, 50, 100, 250, 1000])
def test_dit_respacing_equals_diffusers_linspace_timesteps(n):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ddpm(n).timesteps, ref.timesteps.numpy())
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ddim(n).timesteps, ref.timesteps.numpy())


def test_space_timesteps_sections_and_ddim_stride():
    assert schedules.space_timesteps(300, [10, 15, 20])[:3] == [0, 11, 22]
    assert len(schedules.space_timesteps(300, "10,15,20")) == 45
    assert schedules.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="cannot divide"):
        schedules.space_timesteps(10, [20])


def test_dit_betas_equal_diffusers_linear():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    # diffusers: float32 linspace (start + i·step, a few roundings: <= 8 ulps = 1e-6 relative)
    np.testing.assert_allclose(schedules.dit_betas(), ref.betas.numpy(), rtol=1e-6)
    # ours: a float64 cumprod; diffusers': a float32 cumprod of 1000 positive factors, each product
    # rounded, so within γ_1000 = 1000·u/(1 − 1000·u) ≈ 6e-5 relative (plus the factors' own 1e-6)
    gamma_1000 = 1000 * 2.0**-24 / (1 - 1000 * 2.0**-24)
    np.testing.assert_allclose(schedules.alphas_cumprod(schedules.dit_betas()), ref.alphas_cumprod.numpy(),
                               rtol=gamma_1000 + 1e-6)


@pytest.mark.parametrize("n", [10, 250])
def test_ddpm_learned_range_steps_equal_diffusers(n):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                                  clip_sample=False, timestep_spacing="linspace")
    ref.set_timesteps(n)
    ours = ddpm(n)
    rng = np.random.default_rng(0)
    for i in sorted({0, 1, n // 2, n - 2, n - 1}):
        t = int(ref.timesteps[i])
        assert ours.timesteps[i] == t
        x = _rand(rng)
        out = np.concatenate([_rand(rng), rng.uniform(-1, 1, SHAPE).astype(np.float32)], axis=1)
        gen = torch.Generator().manual_seed(i)
        expect = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=gen).prev_sample.numpy()
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy()
        got, _ = ours.update(i, jnp.asarray(x), jnp.asarray(out), jnp.zeros(SHAPE), jnp.asarray(noise), channel_axis=1)
        np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=2e-4 * max(1.0, float(ours.tables["sqrt_recip_ac"][i]) / 10))


def test_ddpm_fixed_variance_without_learned_channels():
    """A C-channel output uses the posterior (fixed small) variance, diffusers' ``fixed_small``."""
    n = 20
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                  clip_sample=False, timestep_spacing="linspace")
    ref.set_timesteps(n)
    ours = ddpm(n)
    rng = np.random.default_rng(1)
    for i in (0, 5, 18):
        x, eps = _rand(rng), _rand(rng)
        t = int(ref.timesteps[i])
        expect = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(3)).prev_sample.numpy()
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).numpy()
        got, _ = ours.update(i, jnp.asarray(x), jnp.asarray(eps), None, jnp.asarray(noise), channel_axis=1)
        np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_respaced_steps_equal_diffusers_on_the_respaced_process(eta):
    """ADM's respaced DDIM is DDIM on a process with the respaced betas (diffusers, ``trained_betas``)."""
    n = 25
    new_betas, _ = schedules.respace(schedules.dit_betas(), schedules.space_timesteps(1000, [n]))
    ref = diffusers.DDIMScheduler(num_train_timesteps=n, trained_betas=new_betas, clip_sample=False,
                                  set_alpha_to_one=True, timestep_spacing="linspace")
    ref.set_timesteps(n)
    ours = ddim(n, eta=eta)
    rng = np.random.default_rng(2)
    for i in (0, 1, 12, n - 1):
        x, eps, noise = _rand(rng), _rand(rng), _rand(rng)
        t = int(ref.timesteps[i])
        assert t == n - 1 - i
        expect = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=eta,
                          variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        got, _ = ours.update(i, jnp.asarray(x), jnp.asarray(eps), None, jnp.asarray(noise), channel_axis=1)
        scale = max(1.0, float(ours.tables["sqrt_recip_ac"][i]) / 10)
        np.testing.assert_allclose(np.asarray(got), expect, rtol=1e-4, atol=2e-4 * scale)


def test_ddim_stride_spacing_equals_diffusers_leading():
    """With the DDIM paper's stride (``"ddim20"``), DiT's timesteps equal diffusers' ``leading`` spacing."""
    n = 20
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="leading")
    ref.set_timesteps(n)
    assert schedules.space_timesteps(1000, f"ddim{n}")[::-1] == ref.timesteps.tolist()


@pytest.mark.parametrize("n", [5, 20])
def test_dpm_solver_pp_2m_trajectory_equals_diffusers(n):
    ref = diffusers.DPMSolverMultistepScheduler()  # PixArt-Σ's: linear 1e-4..0.02, dpmsolver++, order 2, midpoint
    ref.set_timesteps(n)
    ours = dpm_solver_pp_2m(n)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    sig = ref.sigmas.numpy()
    alpha = 1 / np.sqrt(sig[:-1] ** 2 + 1)
    np.testing.assert_allclose(ours.tables["sigma_s"], sig[:-1] * alpha, rtol=1e-5)
    rng = np.random.default_rng(3)
    x = _rand(rng)
    xt, xo, carry = torch.from_numpy(x), jnp.asarray(x), jnp.zeros(SHAPE)
    for i, t in enumerate(ref.timesteps):
        eps = _rand(rng)
        xt = ref.step(torch.from_numpy(eps), t, xt).prev_sample
        xo, carry = ours.update(i, xo, jnp.asarray(eps), carry, channel_axis=1)
        np.testing.assert_allclose(np.asarray(xo), xt.numpy(), rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(x).max())))


def test_flow_euler_sigmas_and_trajectory_equal_diffusers():
    n = 28
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(n)
    ours = flow_euler(n, shift=3.0)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(schedules.flow_sigmas(n, 3.0), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    rng = np.random.default_rng(4)
    x = _rand(rng)
    xt, xo = torch.from_numpy(x), jnp.asarray(x)
    for i, t in enumerate(ref.timesteps):
        v = _rand(rng)
        xt = ref.step(torch.from_numpy(v), t, xt).prev_sample
        xo, _ = ours.update(i, xo, jnp.asarray(v), None, channel_axis=1)
    np.testing.assert_allclose(np.asarray(xo), xt.numpy(), rtol=1e-5, atol=1e-5)
