"""ResidualShiftScheduler against the closed forms of the residual-shifting process (ResShift)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.schedulers import ResidualShiftScheduler

T, KAPPA, P, MIN_NOISE, SQRT_ETA_END = 15, 2.0, 0.3, 0.04, 0.99


def eq14(T=T, kappa=KAPPA, p=P, min_noise=MIN_NOISE, end=SQRT_ETA_END):
    """sqrt(eta_t), t = 1..T, straight from the paper's formula (independent of the implementation)."""
    s1 = min(min_noise / kappa, min_noise)
    return np.array([s1 * math.exp(((t - 1) / (T - 1)) ** p * math.log(end / s1)) for t in range(1, T + 1)])


def gaussian_product(m1, v1, m2, v2):
    """Mean and variance of N(m1, v1) * N(m2, v2) (normalised), element-wise."""
    v = v1 * v2 / (v1 + v2)
    return v * (m1 / v1 + m2 / v2), v


@pytest.fixture
def sched():
    return ResidualShiftScheduler()


# ---------------------------------------------------------------- schedule
def test_schedule_matches_eq14(sched):
    ref = eq14()
    assert sched.sqrt_etas.dtype == torch.float64 and sched.etas.dtype == torch.float64
    assert sched.sqrt_etas.shape == (T,) and sched.kappa == KAPPA and sched.num_train_timesteps == T
    np.testing.assert_allclose(sched.sqrt_etas.numpy(), ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sched.etas.numpy(), ref**2, rtol=1e-12, atol=0)
    assert float(sched.sqrt_etas[0]) == pytest.approx(0.02, abs=1e-15)
    assert float(sched.sqrt_etas[-1]) == pytest.approx(0.99, abs=1e-15)
    assert bool((torch.diff(sched.etas) > 0).all())
    # a non-default schedule: kappa < 1 makes sqrt(eta_1) = min_noise_level
    s = ResidualShiftScheduler(num_train_timesteps=4, kappa=0.5, power=1.0, min_noise_level=0.1, sqrt_eta_end=0.9)
    np.testing.assert_allclose(s.sqrt_etas.numpy(), eq14(4, 0.5, 1.0, 0.1, 0.9), rtol=1e-12)
    assert float(s.sqrt_etas[0]) == pytest.approx(0.1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        ResidualShiftScheduler(num_train_timesteps=1)
    with pytest.raises(ValueError):
        ResidualShiftScheduler(sqrt_eta_end=1.0)


# ---------------------------------------------------------------- forward process
def test_add_noise_mean_per_sample(sched):
    g = torch.Generator().manual_seed(0)
    x0, y0 = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 7, 14])
    out = sched.add_noise(x0, torch.zeros_like(x0), t, residual_target=y0)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    eta = eq14()[t.numpy()] ** 2
    expected = x0.double() + torch.tensor(eta).view(3, 1, 1, 1) * (y0 - x0).double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    # noise enters with kappa sqrt(eta_t)
    eps = torch.randn(x0.shape, generator=g)
    diff = sched.add_noise(x0, eps, t, y0) - out
    torch.testing.assert_close(diff.double(), KAPPA * torch.tensor(eq14()[t.numpy()]).view(3, 1, 1, 1) * eps.double())
    # lower-precision inputs keep their dtype; a scalar timestep broadcasts
    h = sched.add_noise(x0.half(), eps.half(), 3, y0.half())
    assert h.dtype == torch.float16
    with pytest.raises(ValueError):
        sched.add_noise(x0, eps, t, y0[:, :1])


def test_add_noise_monte_carlo(sched):
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0, y0 = torch.tensor([0.3, -0.5], dtype=torch.float64), torch.tensor([1.0, 0.2], dtype=torch.float64)
    for i in (0, 6, 14):
        eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
        xt = sched.add_noise(x0.expand(n, 2), eps, torch.full((n,), i), y0.expand(n, 2))
        eta = eq14()[i] ** 2
        var = KAPPA**2 * eta
        tol = 5 * math.sqrt(var / n)
        np.testing.assert_allclose(xt.mean(0).numpy(), (x0 + eta * (y0 - x0)).numpy(), atol=tol)
        np.testing.assert_allclose(xt.var(0).numpy(), [var, var], rtol=0.01)


def test_prior(sched):
    y0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sched.prior_sample(y0, eps), y0 + KAPPA * 0.99 * eps)
    torch.testing.assert_close(sched.prior_sample(y0, torch.zeros_like(y0)), y0)


# ---------------------------------------------------------------- reverse process
def test_posterior_is_gaussian_product(sched):
    """q(x_{t-1}|x_t,x0,y0) from N(x0 + eta_{t-1} e0, k^2 eta_{t-1}) * N(x_t - alpha_t e0, k^2 alpha_t)."""
    g = torch.Generator().manual_seed(2)
    x0, y0, xt = (torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    eta = eq14() ** 2
    for i in range(1, T):
        alpha = eta[i] - eta[i - 1]
        e0 = y0 - x0
        m, v = gaussian_product(x0 + eta[i - 1] * e0, KAPPA**2 * eta[i - 1], xt - alpha * e0, KAPPA**2 * alpha)
        # the y0 terms cancel: same product for any y0
        m_other, _ = gaussian_product(
            x0 + eta[i - 1] * (5 - x0), KAPPA**2 * eta[i - 1], xt - alpha * (5 - x0), 4 * alpha
        )
        torch.testing.assert_close(m, m_other)
        mean, x0_hat = sched.step(x0, i, xt, noise=torch.zeros_like(xt))
        assert x0_hat is x0
        torch.testing.assert_close(mean, m, rtol=1e-12, atol=1e-12)
        assert float(sched.get_variance(i)) == pytest.approx(v, rel=1e-12)
        assert float(sched.alphas[i]) == pytest.approx(alpha, rel=1e-12)
        z = torch.randn(xt.shape, generator=g, dtype=torch.float64)
        noisy, _ = sched.step(x0, i, xt, noise=z)
        torch.testing.assert_close(noisy, m + math.sqrt(v) * z, rtol=1e-12, atol=1e-12)


def test_last_step_adds_no_noise(sched):
    xt, x0_hat = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    out, pred = sched.step(x0_hat, 0, xt, noise=1e6 * torch.ones_like(xt))
    assert torch.equal(out, x0_hat) and torch.equal(pred, x0_hat)
    out, _ = sched.step(x0_hat, 0, xt, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x0_hat)
    assert float(sched.get_variance(0)) == 0.0


def test_step_determinism_and_dtype(sched):
    x0_hat, xt = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    a, _ = sched.step(x0_hat, 9, xt, generator=torch.Generator().manual_seed(7))
    b, _ = sched.step(x0_hat, 9, xt, generator=torch.Generator().manual_seed(7))
    c, _ = sched.step(x0_hat, 9, xt, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # half-precision prediction with a float32 chain (autocast): the chain keeps float32
    d, _ = sched.step(x0_hat.bfloat16(), torch.tensor(9), xt, generator=torch.Generator().manual_seed(7))
    assert d.dtype == torch.float32
    e, _ = sched.step(x0_hat.bfloat16(), 9, xt.bfloat16())
    assert e.dtype == torch.bfloat16


def test_clip_sample():
    s = ResidualShiftScheduler(clip_sample=True, clip_sample_min=-1.0, clip_sample_max=1.0)
    out, pred = s.step(torch.full((1, 1, 2, 2), 3.0), 0, torch.zeros(1, 1, 2, 2))
    assert torch.equal(pred, torch.ones(1, 1, 2, 2)) and torch.equal(out, pred)


# ---------------------------------------------------------------- respacing
def test_set_timesteps_respacing(sched):
    full = {k: getattr(sched, k).clone() for k in ("alphas", "posterior_variance", "prev_etas")}
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [14, 9, 5, 0]  # round(linspace(14, 0, 4)), descending
    kept = sorted(sched.timesteps.tolist())
    gaps = np.diff(kept)
    assert kept[0] == 0 and kept[-1] == T - 1 and gaps.max() - gaps.min() <= 1
    eta = eq14() ** 2
    chain = [0.0] + [eta[k] for k in kept]
    for j, k in enumerate(kept):
        assert float(sched.alphas[k]) == pytest.approx(chain[j + 1] - chain[j], rel=1e-12)
        assert float(sched.get_variance(k)) == pytest.approx(
            KAPPA**2 * chain[j] / chain[j + 1] * (chain[j + 1] - chain[j]), rel=1e-12
        )
    assert float(sched.alphas.sum()) == pytest.approx(eta[-1], rel=1e-12)
    assert set(torch.nonzero(sched.alphas).flatten().tolist()) == set(kept)
    with pytest.raises(ValueError):
        sched.step(torch.zeros(1), 3, torch.zeros(1))  # not in the chain
    # n = T restores the training chain exactly
    sched.set_timesteps(T)
    assert sched.timesteps.tolist() == list(range(T - 1, -1, -1))
    for k, v in full.items():
        assert torch.equal(getattr(sched, k), v), k
    assert float(sched.alphas.sum()) == pytest.approx(eta[-1], rel=1e-12)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [T - 1] and float(sched.get_variance(T - 1)) == 0.0
    for bad in (0, T + 1):
        with pytest.raises(ValueError):
            sched.set_timesteps(bad)


@pytest.mark.parametrize("steps", [T, 4])
def test_oracle_chain_ends_exactly_at_x0(sched, steps):
    g = torch.Generator().manual_seed(3)
    x0, y0 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    sched.set_timesteps(steps)
    x = sched.prior_sample(y0, torch.randn(x0.shape, generator=g))
    for t in sched.timesteps:
        x, _ = sched.step(x0, t, x, generator=g)
    assert torch.equal(x, x0)


def test_oracle_chain_keeps_the_marginals(sched):
    """Stepping with the true x0 keeps x_t ~ N(x0 + eta_t e0, kappa^2 eta_t) along a respaced chain."""
    g = torch.Generator().manual_seed(4)
    n = 200_000
    x0, y0 = torch.full((n, 1), 0.25, dtype=torch.float64), torch.full((n, 1), -0.75, dtype=torch.float64)
    sched.set_timesteps(4)
    x = sched.prior_sample(y0, torch.randn(n, 1, generator=g, dtype=torch.float64))
    ts = sched.timesteps.tolist()
    for t, t_prev in zip(ts[:-1], ts[1:]):
        x, _ = sched.step(x0, t, x, generator=g)
        eta = float(sched.etas[t_prev])
        assert float(x.mean()) == pytest.approx(0.25 + eta * (-1.0), abs=5 * math.sqrt(KAPPA**2 * eta / n))
        assert float(x.var()) == pytest.approx(KAPPA**2 * eta, rel=0.015)


def test_module_to_dtype_and_timesteps_device(sched):
    sched.set_timesteps(5, device="cpu")
    assert sched.timesteps.dtype == torch.long and sched.timesteps.device.type == "cpu"
    assert sched.state_dict() == {}  # schedule buffers are not persistent
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    out = sched.add_noise(x, torch.zeros_like(x), torch.tensor([2]), torch.zeros_like(x))
    assert out.dtype == torch.float64


# ---------------------------------------------------------------- the inferer's residual pairing
def test_inferer_pairs_each_target_with_its_condition_channel(sched):
    """A permuted pairing (target 0 <- condition 2, 1 <- 0, 2 <- 1): the training marginal and the
    prior are built from exactly those channels (the identity pairing would fail both checks)."""
    from common.inferers import ResidualShiftInferer

    pairing = [2, 0, 1]
    inferer = ResidualShiftInferer(sched, residual_channels=pairing)
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 11])
    seen = {}

    def net(x, timesteps):
        seen["x"], seen["t"] = x, timesteps
        return x[:, :3]

    inferer(x0, net, noise, t, condition=cond)
    eta = torch.tensor([float(sched.etas[3]), float(sched.etas[11])], dtype=torch.float64).view(2, 1, 1, 1)
    y0 = torch.stack([cond[:, 2], cond[:, 0], cond[:, 1]], dim=1)
    expected = x0 + eta * (y0 - x0) + sched.kappa * eta.sqrt() * noise
    torch.testing.assert_close(seen["x"][:, :3], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["x"][:, 3:], cond)  # the network also sees the whole condition
    assert seen["t"].tolist() == [3, 11]
    # sampling starts from the prior around the paired channels: x_T = y0 + kappa sqrt(eta_T) eps
    sched.set_timesteps(1)
    captured = {}

    def first_call(x, timesteps):
        captured.setdefault("x", x.clone())
        return torch.zeros_like(x[:, :3])

    inferer.sample(noise, first_call, conditioning=cond, verbose=False)
    prior = y0 + sched.kappa * math.sqrt(float(sched.etas[-1])) * noise
    torch.testing.assert_close(captured["x"][:, :3], prior, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="refers past"):
        ResidualShiftInferer(sched, residual_channels=[0, 1, 5]).paired_condition(cond, 3)
