"""Continuous noise-level conditioning (Palette / DCE-diff): schedules, noise levels, training, sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from common.engines import NoiseLevelPrepareBatch
from common.inferers import NoiseLevelInferer
from common.monai_compat import consistent_timesteps, ddim_steps_offset, float64_tables
from common.schedulers.noise_level import (
    NoiseLevelSchedule,
    add_noise_at_level,
    embedding_input_to_noise_level,
    noise_level_to_embedding_input,
)

C_OUT, C_COND = 2, 4
INFERENCE_JSON = Path(__file__).resolve().parents[1] / "bundles" / "dcediff" / "configs" / "inference.json"


def _bundle(**overrides) -> ConfigParser:
    """dcediff's inference.json (the schedules are declared there, shared byte for byte with train.json)."""
    p = ConfigParser()
    p.read_config([str(INFERENCE_JSON.with_name("train.json")), str(INFERENCE_JSON)])
    p.update({"device": "cpu", **overrides})
    return p


def stock(name: str = "scheduler", **overrides):
    """A stock MONAI scheduler as the JSON declares it: ``training_schedule``, ``scheduler`` (DDPM), ``ddim_scheduler``."""
    return _bundle(**overrides).get_parsed_content(name)


def train_scheduler() -> DDPMScheduler:
    """The training schedule: DDPMScheduler(2000, linear_beta, 1e-6 .. 0.01), as declared in the JSON."""
    return stock("training_schedule")


def inference_scheduler(
    kind: str = "ddpm",
    num_inference_steps: int = 1000,
    clip_sample: bool = False,
    clip_sample_min: float = -1.0,
    clip_sample_max: float = 1.0,
):
    """The sampler the bundle runs (``slice_inferer#scheduler``: the JSON's DDPM/DDIM through
    ``float64_tables`` and ``consistent_timesteps``), with ``sampler`` / ``num_inference_steps`` /
    clipping overridden (defaults: no clipping)."""
    return _bundle(
        sampler=kind,
        num_inference_steps=num_inference_steps,
        clip_sample=clip_sample,
        clip_sample_min=clip_sample_min,
        clip_sample_max=clip_sample_max,
    ).get_parsed_content("slice_inferer#scheduler")


class SpyNet(torch.nn.Module):
    """Records every ``timesteps`` and input it gets; predicts zero noise (or an oracle's eps)."""

    def __init__(self, oracle_x0: torch.Tensor | None = None, levels=None, half: bool = False) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.oracle_x0 = oracle_x0
        self.levels = None if levels is None else levels.detach().double()  # the scheduler's alphas_cumprod
        self.half = half

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None) -> torch.Tensor:
        self.calls.append((x.detach().clone(), timesteps.detach().clone()))
        x_t = x[:, :C_OUT]
        if self.oracle_x0 is None:
            return torch.zeros_like(x_t)
        # the exact eps implied by x_t at the level the network is told. The float32 embedding input
        # resolves gamma near 1 only to ~1e-7 (1 - gamma = 1e-4 there), so invert the mapping and snap
        # to the scheduler's level whose embedding input it is exactly
        approx = embedding_input_to_noise_level(timesteps)
        k = (self.levels[None, :] - approx[:, None]).abs().argmin(1)
        assert torch.equal(noise_level_to_embedding_input(self.levels[k]), timesteps)
        g = self.levels[k].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x_t - g.sqrt() * self.oracle_x0) / (1 - g).sqrt()
        return eps.half() if self.half else eps


def _gammas(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------- schedules
def test_schedules_match_closed_forms():
    train = train_scheduler()
    betas = np.linspace(1e-6, 0.01, 2000)
    assert train.num_train_timesteps == 2000
    np.testing.assert_allclose(train.betas.double().numpy(), betas, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(train.alphas_cumprod.double().numpy(), _gammas(betas), rtol=2e-5)
    assert train.alphas_cumprod[0].item() == pytest.approx(1 - 1e-6, abs=6e-8)  # float32 spacing at 1
    # gamma_T = prod(1 - beta) ~ 4.39e-5
    assert train.alphas_cumprod[-1].item() == pytest.approx(np.prod(1 - betas), rel=1e-4)
    assert 4.3e-5 < train.alphas_cumprod[-1].item() < 4.5e-5

    betas_i = np.linspace(1e-4, 0.09, 1000)
    g_i = _gammas(betas_i)
    for sched in (inference_scheduler("ddpm"), inference_scheduler("ddim", 50)):
        assert sched.num_train_timesteps == 1000
        np.testing.assert_allclose(sched.betas.double().numpy(), betas_i, rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), g_i, rtol=2e-4)
        assert sched.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=6e-8)
        for i in (1, 100, 300, 999):
            assert sched.alphas_cumprod[i].item() == pytest.approx(g_i[i], rel=2e-4)
        # gamma_T of the inference schedule is tiny: ~ exp(-sum beta) = exp(-45.05) ~ 6.6e-21
        assert sched.alphas_cumprod[-1].item() < 1e-19
        assert sched.alphas_cumprod[-1].item() == pytest.approx(g_i[-1], rel=2e-4)
        assert not sched.clip_sample and sched.prediction_type == "epsilon"
    assert isinstance(inference_scheduler("ddpm"), DDPMScheduler)

    sched = train_scheduler()
    sch = NoiseLevelSchedule(sched)
    assert sch.gammas.dtype == torch.float64 and sch.num_train_timesteps == 2000
    # float64 recomputation from MONAI's betas: the closed form to float64 accuracy, MONAI's float32 to float32's
    np.testing.assert_allclose(sch.gammas.numpy(), _gammas(sched.betas.double().numpy()), rtol=1e-12)
    np.testing.assert_allclose(sch.gammas.numpy(), _gammas(betas), rtol=1e-6)
    torch.testing.assert_close(sch.gammas, sched.alphas_cumprod.double(), rtol=2e-5, atol=0)
    assert 1 - sch.gammas[0].item() == pytest.approx(1e-6, rel=1e-6)  # float32: 1.0133e-6
    assert sch.gammas_prev[0] == 1.0 and torch.equal(sch.gammas_prev[1:], sch.gammas[:-1])
    assert torch.equal(sch.gamma_at(torch.tensor([0, 1999])), sch.gammas[[0, 1999]])


def test_json_schedulers_and_monai_compat_guards():
    # the JSON declares stock MONAI schedulers with the published numbers: the tables are MONAI's own
    published = {
        "training_schedule": (DDPMScheduler, 2000, 1e-6, 0.01),
        "scheduler": (DDPMScheduler, 1000, 1e-4, 0.09),
        "ddim_scheduler": (DDIMScheduler, 1000, 1e-4, 0.09),
    }
    for name, (cls, steps, lo, hi) in published.items():
        declared, ref = stock(name), cls(steps, "linear_beta", beta_start=lo, beta_end=hi)
        assert type(declared) is cls and declared.prediction_type == "epsilon"
        for table in ("betas", "alphas", "alphas_cumprod"):
            assert torch.equal(getattr(declared, table), getattr(ref, table)), (name, table)
    assert stock("ddim_scheduler").final_alpha_cumprod.item() == 1.0 and stock("ddim_scheduler").steps_offset == 0
    # the bundle's clipping defaults: on, x0_hat clamped to [-2, 4] (DCE enhancement reaches ~2-3)
    for name in ("scheduler", "ddim_scheduler"):
        assert stock(name).clip_sample and stock(name).clip_sample_values == [-2.0, 4.0]
    # the DDIM offset workaround (monai_compat), applied from the JSON
    with pytest.raises(ValueError, match="DDPM"):
        consistent_timesteps(float64_tables(stock("scheduler")), 100)
    with pytest.raises(ValueError, match="dividing"):
        consistent_timesteps(float64_tables(stock("ddim_scheduler")), 30)
    with pytest.raises(ValueError, match="DDPMScheduler or DDIMScheduler"):
        consistent_timesteps(object(), 10)
    for bad in (("ddpm", 100), ("ddim", 30), ("pndm", 10)):  # the same through the config
        with pytest.raises(RuntimeError):
            inference_scheduler(*bad)
    assert ddim_steps_offset(1000, 10) == 99 and ddim_steps_offset(1000, 1000) == 0
    ddim = inference_scheduler("ddim", 10)
    assert isinstance(ddim, DDIMScheduler) and ddim.steps_offset == 99
    assert ddim.timesteps.tolist() == list(range(999, -1, -100))
    shared = stock("ddim_scheduler")
    consistent_timesteps(float64_tables(shared), 10)  # on a copy: the shared scheduler is untouched
    assert shared.steps_offset == 0 and shared.betas.dtype == torch.float32
    clipped = inference_scheduler("ddpm", clip_sample=True, clip_sample_min=-1.0, clip_sample_max=4.0)
    assert clipped.clip_sample and clipped.clip_sample_values == [-1.0, 4.0]
    assert clipped.timesteps.tolist() == list(range(999, -1, -1))


# ---------------------------------------------------------------------------- noise levels
def test_sample_gamma_between_levels_and_uniform():
    sch = NoiseLevelSchedule(train_scheduler())
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for i in (0, 1, 777, 1999):
        g = sch.sample_gamma(torch.full((n,), i), generator=gen)
        assert g.dtype == torch.float64 and g.shape == (n,)
        lo, hi = sch.gammas[i].item(), (1.0 if i == 0 else sch.gammas[i - 1].item())
        width = hi - lo
        assert width > 0
        assert (g >= lo).all() and (g <= hi).all()
        # both ends are reached and the draws are uniform: mean, variance, and fill of each end
        assert g.min().item() - lo < 0.002 * width and hi - g.max().item() < 0.002 * width
        assert abs(g.mean().item() - (lo + hi) / 2) < 4 * width / np.sqrt(12 * n)
        assert g.var().item() == pytest.approx(width**2 / 12, rel=0.05)
        assert ((g - lo) < width / 4).double().mean().item() == pytest.approx(0.25, abs=0.02)
    # random indices: each gamma lies in its own interval
    t = torch.randint(0, 2000, (5000,), generator=gen)
    g = sch.sample_gamma(t, generator=gen)
    assert (g <= sch.gammas_prev[t]).all() and (g >= sch.gammas[t]).all()
    # reproducible with a generator
    a = sch.sample_gamma(t[:10], generator=torch.Generator().manual_seed(3))
    b = sch.sample_gamma(t[:10], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="t_index"):
        sch.sample_gamma(torch.tensor([2000]))


def test_embedding_mapping_closed_form_and_monotone():
    g = torch.tensor([0.0, 1e-20, 0.25, 0.5, 0.81, 1.0], dtype=torch.float64)
    e = noise_level_to_embedding_input(g)
    assert e.dtype == torch.float32
    np.testing.assert_allclose(e.numpy(), 1000 * np.sqrt(g.numpy()), rtol=1e-6)
    assert noise_level_to_embedding_input(0.25, scale=10.0).item() == pytest.approx(5.0)
    np.testing.assert_allclose(embedding_input_to_noise_level(e).numpy(), g.numpy(), rtol=1e-6, atol=1e-12)
    # strictly decreasing along both schedules (clean -> noisy), even in float32
    for sched in (train_scheduler(), inference_scheduler()):
        emb = noise_level_to_embedding_input(NoiseLevelSchedule(sched).gammas)
        assert (emb[1:] < emb[:-1]).all()
        assert 0 <= emb.min() and emb.max() <= 1000
    # a gamma between two levels maps between their embedding inputs
    sch = NoiseLevelSchedule(train_scheduler())
    for i in (1, 400, 1500, 1999):
        mid = sch.sample_gamma(torch.full((100,), i), generator=torch.Generator().manual_seed(i))
        e_mid = noise_level_to_embedding_input(mid)
        e_lo = noise_level_to_embedding_input(sch.gammas[i])
        e_hi = noise_level_to_embedding_input(sch.gammas[i - 1])
        assert (e_mid >= e_lo).all() and (e_mid <= e_hi).all()
    with pytest.raises(ValueError):
        noise_level_to_embedding_input(0.5, scale=0.0)


def test_add_noise_closed_form():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 2, 5, 5, generator=gen) * 2
    noise = torch.randn(3, 2, 5, 5, generator=gen)
    gamma = torch.tensor([0.0, 0.36, 1.0], dtype=torch.float64)
    zeros = torch.zeros_like(x0)
    torch.testing.assert_close(add_noise_at_level(x0, zeros, gamma), torch.sqrt(gamma).float().view(-1, 1, 1, 1) * x0)
    sigma = torch.sqrt(1 - gamma).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(add_noise_at_level(zeros, noise, gamma), sigma * noise)
    out = add_noise_at_level(x0, noise, gamma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], noise[0])
    torch.testing.assert_close(out[1], 0.6 * x0[1] + 0.8 * noise[1])
    torch.testing.assert_close(out[2], x0[2])
    torch.testing.assert_close(add_noise_at_level(x0, noise, 0.36), 0.6 * x0 + 0.8 * noise)
    # the discrete levels reproduce MONAI's own forward process
    sched = inference_scheduler()
    t = torch.tensor([0, 150, 999])
    gam = NoiseLevelSchedule(sched).gamma_at(t)
    torch.testing.assert_close(add_noise_at_level(x0, noise, gam), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        add_noise_at_level(x0, noise, torch.tensor([0.5, 1.5, 0.1]))


# ---------------------------------------------------------------------------- training forward pass
def _batch(b: int = 3, size: int = 8, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, C_COND, size, size, generator=gen),
        "label": torch.rand(b, C_OUT, size, size, generator=gen) * 3 - 0.5,
    }


def test_prepare_batch_and_forward_feed_the_mapping():
    sched = train_scheduler()
    prep = NoiseLevelPrepareBatch(sched)
    batch = _batch()
    torch.manual_seed(0)
    images, target, args, kwargs = prep(batch, torch.device("cpu"))
    assert torch.equal(images, batch["label"]) and args == ()
    assert torch.equal(target, kwargs["noise"])  # epsilon prediction
    assert torch.equal(kwargs["condition"], batch["image"])
    t, gamma = kwargs["timesteps"], kwargs["gamma"]
    assert t.shape == gamma.shape == (3,) and t.dtype == torch.long
    sch = NoiseLevelSchedule(sched)
    assert (gamma >= sch.gammas[t]).all() and (gamma <= sch.gammas_prev[t]).all()

    spy = SpyNet()
    inferer = NoiseLevelInferer(inference_scheduler())
    pred = inferer(images, spy, *args, **kwargs)
    assert pred.shape == images.shape
    ((x, emb),) = spy.calls
    torch.testing.assert_close(emb, (1000 * gamma.sqrt()).float())
    g4 = gamma.view(-1, 1, 1, 1)
    x_noisy = (g4.sqrt() * images.double() + (1 - g4).sqrt() * kwargs["noise"].double()).float()
    torch.testing.assert_close(x[:, :C_OUT], x_noisy)
    torch.testing.assert_close(x[:, C_OUT:], batch["image"])
    with pytest.raises(ValueError, match="gamma"):
        inferer(images, spy, kwargs["noise"], t, condition=kwargs["condition"])
    # a NoiseLevelSchedule is accepted too, and the indices cover 0..T-1
    prep2 = NoiseLevelPrepareBatch(sch)
    ts = torch.cat([prep2(_batch(64, 2), "cpu")[3]["timesteps"] for _ in range(20)])
    assert ts.min() >= 0 and ts.max() <= 1999 and ts.max() > 1500 and ts.min() < 500


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind,steps", [("ddpm", 1000), ("ddim", 10), ("ddim", 50)])
def test_sampling_feeds_the_scheduler_noise_level(kind, steps):
    sched = inference_scheduler(kind, steps)
    spy = SpyNet()
    inferer = NoiseLevelInferer(sched)
    cond = torch.randn(2, C_COND, 4, 4)
    out = inferer.sample(torch.randn(2, C_OUT, 4, 4), spy, conditioning=cond, verbose=False)
    assert out.shape == (2, C_OUT, 4, 4) and torch.isfinite(out).all()
    assert len(spy.calls) == len(sched.timesteps) == steps
    gammas = NoiseLevelSchedule(sched).gammas
    for (x, emb), t in zip(spy.calls, sched.timesteps):
        assert emb.shape == (2,)
        assert torch.equal(emb, noise_level_to_embedding_input(gammas[int(t)]).expand(2))
        # = mapping(alphas_cumprod[t]) of MONAI's scheduler, and of the closed form
        g_closed = np.prod(1 - np.linspace(1e-4, 0.09, 1000)[: int(t) + 1])
        monai_level = noise_level_to_embedding_input(sched.alphas_cumprod[int(t)]).expand(2)
        torch.testing.assert_close(emb, monai_level, rtol=1e-5, atol=0)
        torch.testing.assert_close(emb[0].item(), 1000 * np.sqrt(g_closed), rtol=1e-6, atol=0)
        assert torch.equal(x[:, C_OUT:], cond)
    # the first step is the noisiest level, the last the cleanest, strictly in between
    embs = torch.stack([c[1][0] for c in spy.calls])
    assert (embs[1:] > embs[:-1]).all()


# ---------------------------------------------------------------------------- trained noise levels only
#: inference levels whose 1000 sqrt(gamma) lies below the trained 6.62, per sampler (issue 11)
BELOW_TRAINED = {("ddpm", 1000): 532, ("ddim", 50): 27, ("ddim", 10): 6, ("ddim", 2): 2}


def test_noise_level_range_clamps_the_network_input_only():
    inferer = NoiseLevelInferer(inference_scheduler(), noise_level_range=(0.25, 0.81))
    emb = inferer.embedding_input(
        torch.tensor([0.0, 1e-30, 0.5, 0.81, 1.0], dtype=torch.float64), 5, torch.device("cpu")
    )
    torch.testing.assert_close(emb, torch.tensor([500.0, 500.0, 1000 * 0.5**0.5, 900.0, 900.0]), rtol=1e-7, atol=0)
    assert NoiseLevelInferer(inference_scheduler()).embedding_input(0.0, 2, torch.device("cpu")).tolist() == [0.0, 0.0]
    for bad in ((0.5, 0.5), (-0.1, 1.0), (0.1, 1.5)):
        with pytest.raises(ValueError, match="noise_level_range"):
            NoiseLevelInferer(inference_scheduler(), noise_level_range=bad)


@pytest.mark.parametrize("kind,steps", list(BELOW_TRAINED))
def test_no_sampler_feeds_an_untrained_noise_level(kind, steps):
    p = _bundle(sampler=kind, num_inference_steps=steps)
    # the trained range is derived from the training schedule: (gamma_T, 1] of 2000 linear betas 1e-6 .. 0.01
    lo, hi = p.get_parsed_content("trained_noise_levels")
    assert (lo, hi) == (NoiseLevelSchedule(train_scheduler()).gammas[-1].item(), 1.0)
    assert lo == pytest.approx(np.prod(1 - np.linspace(1e-6, 0.01, 2000)), rel=1e-6)  # float32 betas: 6e-8 each
    e_lo, e_hi = noise_level_to_embedding_input(lo).item(), noise_level_to_embedding_input(hi).item()
    assert e_lo == pytest.approx(6.6227, abs=1e-4) and e_hi == 1000.0
    # what the sampling schedule alone would tell the network
    sched = inference_scheduler(kind, steps)
    raw = noise_level_to_embedding_input(NoiseLevelSchedule(sched).gammas[sched.timesteps])
    assert int((raw < e_lo).sum()) == BELOW_TRAINED[(kind, steps)]
    # the bundle's own volume inferer (what inference.json runs) with a network that records its inputs
    spy = SpyNet()
    out = p.get_parsed_content("inferer")(torch.randn(1, C_COND, 8, 8, 2), spy)
    assert out.shape == (1, C_OUT, 8, 8, 2) and torch.isfinite(out).all()
    embs = torch.stack([c[1] for c in spy.calls])  # (steps, slices)
    assert embs.shape == (steps, 2)
    assert (embs >= e_lo).all() and (embs <= e_hi).all()
    # exactly the clamped schedule: the levels below the trained range are told its lowest level, the rest unchanged
    torch.testing.assert_close(embs[:, 0], raw.clamp(min=e_lo), rtol=0, atol=0)
    assert int((embs[:, 0] == e_lo).sum()) == BELOW_TRAINED[(kind, steps)]


@pytest.mark.parametrize("kind,steps,eta", [("ddpm", 1000, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0)])
def test_reverse_mean_and_variance_at_every_step(kind, steps, eta):
    """Each step of the bundle's sampler against the closed forms, intermediate steps included:
    DDPM x_{t-1} = mu + sqrt(var) z, mu = sqrt(g_{t-1}) b_t / (1 - g_t) x0_hat + sqrt(1 - b_t) (1 - g_{t-1}) / (1 - g_t) x_t,
    var = (1 - g_{t-1}) / (1 - g_t) b_t (Ho et al. eq. 6-7, the posterior variance as in Palette; z = 0 at t = 0);
    DDIM x_prev = sqrt(g_prev) x0_hat + sqrt(1 - g_prev - s^2) eps_hat + s z, s^2 = eta^2 (1 - g_prev) / (1 - g_t)
    (1 - g_t / g_prev) (Song et al. eq. 12, 16), x0_hat = (x_t - sqrt(1 - g_t) eps_hat) / sqrt(g_t). The levels in the
    step are the sampling schedule's own, also where the network's input is clamped to the trained range."""

    class Affine(SpyNet):
        def forward(self, x, timesteps, context=None):
            super().forward(x, timesteps)
            return 0.3 * x[:, :C_OUT] + 0.1 * x[:, C_OUT : C_OUT + C_OUT]

    inferer = _bundle(sampler=kind, num_inference_steps=steps, clip_sample=False, eta=eta).get_parsed_content(
        "slice_inferer"
    )
    assert inferer.noise_level_range is not None and inferer.eta == eta
    sched = inferer.scheduler
    g = NoiseLevelSchedule(sched).gammas
    betas = sched.betas.double()
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, C_OUT, 4, 4, generator=gen, dtype=torch.float64)
    cond = torch.randn(2, C_COND, 4, 4, generator=gen, dtype=torch.float64)
    net = Affine()
    out = inferer.sample(x_T, net, conditioning=cond, verbose=False, generator=torch.Generator().manual_seed(7))
    assert out.dtype == torch.float64
    xs = [c[0][:, :C_OUT] for c in net.calls] + [out]
    z_gen = torch.Generator().manual_seed(7)  # replays the step noise MONAI draws
    ts = [int(t) for t in sched.timesteps]
    checked_var = []
    for k, t in enumerate(ts):
        x_t = xs[k]
        eps = 0.3 * x_t + 0.1 * cond[:, :C_OUT]
        g_t = g[t].item()
        x0 = (x_t - (1 - g_t) ** 0.5 * eps) / g_t**0.5
        if kind == "ddpm":
            g_prev, b = (g[t - 1].item() if t > 0 else 1.0), betas[t].item()
            mean = g_prev**0.5 * b / (1 - g_t) * x0 + (1 - b) ** 0.5 * (1 - g_prev) / (1 - g_t) * x_t
            var = (1 - g_prev) / (1 - g_t) * b if t > 0 else 0.0
            z = torch.randn(x_t.shape, generator=z_gen, dtype=torch.float64) if t > 0 else torch.zeros_like(x_t)
        else:
            t_prev = t - 1000 // steps
            g_prev = g[t_prev].item() if t_prev >= 0 else 1.0
            var = eta**2 * (1 - g_prev) / (1 - g_t) * (1 - g_t / g_prev)
            mean = g_prev**0.5 * x0 + (1 - g_prev - var) ** 0.5 * eps
            z = torch.randn(x_t.shape, generator=z_gen, dtype=torch.float64) if eta > 0 else torch.zeros_like(x_t)
        torch.testing.assert_close(xs[k + 1], mean + var**0.5 * z, rtol=1e-9, atol=1e-12, msg=f"step t={t}")
        checked_var.append(var)
    assert len(checked_var) == steps
    if kind == "ddpm":  # the intermediate posterior variances, e.g. at t = 500 (index 499)
        i = ts.index(499)
        b = betas[499].item()
        assert checked_var[i] == pytest.approx((1 - g[498].item()) / (1 - g[499].item()) * b, rel=1e-12)
        assert 0 < checked_var[i] < b
    elif eta > 0:  # stochastic DDIM: noise at every step but the last (g_prev = 1 there, s = 0)
        assert all(v > 0 for v in checked_var[:-1]) and checked_var[-1] == 0.0


def test_sampling_same_network_other_scheduler_and_intermediates():
    # a scheduler passed to sample() overrides self.scheduler; intermediates as MONAI
    inferer = NoiseLevelInferer(inference_scheduler())
    ddim = inference_scheduler("ddim", 20)
    spy = SpyNet()
    out, inter = inferer.sample(
        torch.randn(1, C_OUT, 4, 4),
        spy,
        scheduler=ddim,
        conditioning=torch.randn(1, C_COND, 4, 4),
        save_intermediates=True,
        intermediate_steps=1,
        verbose=False,
    )
    assert len(spy.calls) == 20 and len(inter) == 20 and torch.equal(inter[-1], out)
    assert spy.calls[0][1].item() == pytest.approx(1000 * ddim.alphas_cumprod[999].double().sqrt().item(), rel=1e-5)


def test_oracle_recovers_x0():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, C_OUT, 6, 6, generator=gen, dtype=torch.float64) * 3.5 - 1.0  # [-1, 2.5]: beyond [-1, 1]
    cond = torch.randn(2, C_COND, 6, 6, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, C_OUT, 6, 6, generator=gen, dtype=torch.float64)
    short_ddpm = DDPMScheduler(50, "linear_beta", clip_sample=False, beta_start=1e-4, beta_end=0.3)
    cases = [
        inference_scheduler("ddim", 10),  # DDIM, eta = 0, 10 steps
        short_ddpm,  # a short DDPM schedule: 50 steps with their own betas
        inference_scheduler("ddpm"),  # the paper's 1000 refinement steps
    ]
    for sched in cases:
        spy = SpyNet(oracle_x0=x0, levels=NoiseLevelSchedule(sched).gammas)
        out = NoiseLevelInferer(sched).sample(noise.clone(), spy, conditioning=cond, verbose=False)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    # MONAI's default clip_sample=True saturates intensities beyond [-1, 1] (the documented consequence)
    for sched in (inference_scheduler("ddim", 10, clip_sample=True), DDPMScheduler(50, clip_sample=True)):
        spy = SpyNet(oracle_x0=x0, levels=NoiseLevelSchedule(sched).gammas)
        out = NoiseLevelInferer(sched).sample(noise.clone(), spy, conditioning=cond, verbose=False)
        torch.testing.assert_close(out, x0.clamp(-1, 1), rtol=0, atol=1e-5)
    # float16 network output (autocast) is cast to the sample dtype before step; result stays float32 & close
    x0f, noisef, condf = x0.float(), noise.float(), cond.float()
    ddim = inference_scheduler("ddim", 10)
    out = NoiseLevelInferer(ddim).sample(
        noisef,
        SpyNet(oracle_x0=x0f, levels=NoiseLevelSchedule(ddim).gammas, half=True),
        conditioning=condf,
        verbose=False,
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, x0f, rtol=0, atol=5e-3)


def test_float64_step_removes_monai_float32_bias():
    sched = stock("scheduler", clip_sample=False)  # MONAI's own float32 tables
    x0 = torch.full((1, C_OUT, 2, 2), 2.0)
    # last DDPM step (t = 0): posterior mean = beta_1 / (1 - gamma_1) * x0_hat exactly, no noise
    x_t = sched.alphas_cumprod[0].sqrt() * x0
    plain, _ = sched.step(torch.zeros_like(x_t), 0, x_t)  # MONAI's float32 tables: x0 * 0.99983
    assert plain[0, 0, 0, 0].item() == pytest.approx(2.0 * 0.9998341, rel=1e-6)
    shadow = float64_tables(sched)
    x_t64 = shadow.alphas_cumprod[0].sqrt() * x0.double()
    fixed, _ = shadow.step(torch.zeros_like(x_t64), 0, x_t64)
    torch.testing.assert_close(fixed, x0.double(), rtol=1e-12, atol=0)
    assert sched.betas.dtype == sched.alphas_cumprod.dtype == torch.float32  # the original is untouched
    assert shadow.timesteps is sched.timesteps and shadow.clip_sample == sched.clip_sample
    ddim = float64_tables(stock("ddim_scheduler"))
    assert ddim.final_alpha_cumprod.item() == 1.0 and ddim.alphas_cumprod.dtype == torch.float64
    # idempotent: the bundle's sampler already has float64 tables, a second pass changes nothing
    once = inference_scheduler()
    twice = float64_tables(once)
    assert once.alphas_cumprod.dtype == torch.float64
    for table in ("betas", "alphas", "alphas_cumprod", "one"):
        assert torch.equal(getattr(once, table), getattr(twice, table))


def test_scheduler_checks():
    inferer = NoiseLevelInferer(inference_scheduler())
    cond, noise = torch.randn(1, C_COND, 4, 4), torch.randn(1, C_OUT, 4, 4)
    respaced = stock("scheduler")
    respaced.set_timesteps(100)  # MONAI DDPM cannot skip levels
    with pytest.raises(ValueError, match="consecutive"):
        inferer.sample(noise, SpyNet(), scheduler=respaced, conditioning=cond, verbose=False)
    plain_ddim = DDIMScheduler(1000, "linear_beta", beta_start=1e-4, beta_end=0.09, clip_sample=False)
    plain_ddim.set_timesteps(10)  # MONAI's default spacing: 999, 888, ... while step lands on 899, ...
    with pytest.warns(UserWarning, match="inconsistent"):
        inferer.sample(noise, SpyNet(), scheduler=plain_ddim, conditioning=cond, verbose=False)
    vpred = DDIMScheduler(1000, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="epsilon"):
        inferer.sample(noise, SpyNet(), scheduler=vpred, conditioning=cond, verbose=False)
    with pytest.raises(ValueError, match="conditioning"):
        inferer.sample(noise, SpyNet(), verbose=False)


# ---------------------------------------------------------------------------- one real training step
def test_supervised_trainer_one_step():
    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=C_OUT + C_COND,
        out_channels=C_OUT,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=16,
    )
    # MONAI zero-initialises the output conv and each res block's second conv; give them small weights
    # so that one step reaches every layer, the noise-level (time) embedding included
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        decollate=False,
        train_data_loader=[_batch(2, 16)],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=torch.nn.MSELoss(),
        inferer=NoiseLevelInferer(inference_scheduler()),
        prepare_batch=NoiseLevelPrepareBatch(train_scheduler()),
    )
    trainer.run()
    loss = trainer.state.output["loss"]
    assert torch.isfinite(torch.as_tensor(loss)).all()
    assert trainer.state.output["pred"].shape == (2, C_OUT, 16, 16)
    assert trainer.state.iteration == 1
    unchanged = [n for n, p in net.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged
    # the forward pass under autocast (bfloat16 on CPU) stays finite; the noised input is built in float32
    prep = NoiseLevelPrepareBatch(train_scheduler())
    images, _, args, kwargs = prep(_batch(2, 16), "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pred = NoiseLevelInferer(inference_scheduler())(images, net, *args, **kwargs)
    assert pred.shape == (2, C_OUT, 16, 16) and torch.isfinite(pred.float()).all()
    # the trained net samples with the DDIM inference schedule
    out = NoiseLevelInferer(inference_scheduler("ddim", 10)).sample(
        torch.randn(1, C_OUT, 16, 16), net, conditioning=torch.randn(1, C_COND, 16, 16), verbose=False
    )
    assert out.shape == (1, C_OUT, 16, 16) and torch.isfinite(out).all()


def test_volume_inferer_runs_the_noise_level_sampler():
    import warnings

    from common.inferers import DiffusionVolumeInferer

    sampler = NoiseLevelInferer(inference_scheduler("ddim", 10))
    spy = SpyNet()
    vol = DiffusionVolumeInferer(sampler, out_channels=C_OUT, num_inference_steps=10, spatial_divisor=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the chain stays consistent after set_timesteps(10)
        out = vol(torch.randn(1, C_COND, 6, 6, 3), spy)
    assert out.shape == (1, C_OUT, 6, 6, 3) and torch.isfinite(out).all()
    assert len(spy.calls) == 10 and spy.calls[0][1].shape == (3,)  # all 3 slices per step
    assert sampler.scheduler.timesteps.tolist() == list(range(999, -1, -100))
