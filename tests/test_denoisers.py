import pytest
import torch

from dmlab import samplers, schedules
from dmlab.denoisers import (CFG, DiscreteVPDenoiser, EDMPrecond, FlowDenoiser, RecordingDenoiser, as_sigma, cfg,
                             clamp, switch_at_sigma)
from dmlab.exact import GaussianDenoiser

G = GaussianDenoiser(torch.tensor([0.5, -0.5]), torch.tensor([[0.3, 0.1], [0.1, 0.2]]))
AC = torch.cumprod(1 - schedules.betas_for(1000), 0)
ST = schedules.sigmas_from_alphas_cumprod(AC)


def vp_net(kind):
    """A 'network' that answers exactly what a perfectly trained VP model of G would, in its own variables."""
    def net(x_vp, timestep):
        sigma = schedules.index_to_sigma(timestep, ST)
        alpha, sigma_t = schedules.alpha_sigma_t(sigma)
        x = x_vp / alpha[:, None]
        x0 = G(x, sigma)
        eps = (x - x0) / sigma[:, None]
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha[:, None] * eps - sigma_t[:, None] * x0}[kind]
    return net


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_discrete_vp_adapter_recovers_the_denoiser(kind, gen):
    d = DiscreteVPDenoiser(vp_net(kind), AC, kind)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64) * 3
    sig = torch.cat([ST[[0, 10, 500, 999]], torch.tensor([0.37, 5.0], dtype=torch.float64)])
    torch.testing.assert_close(d(x, sig), G(x, sig), rtol=1e-9, atol=1e-9)


def test_from_scheduler_reads_config():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    d = DiscreteVPDenoiser.from_scheduler(lambda x, timestep: x, sch)
    assert d.prediction_type == "v_prediction"
    torch.testing.assert_close(d.sigmas_train, schedules.train_sigmas(1000, 0.00085, 0.012, "scaled_linear"), rtol=1e-6, atol=0)
    d2 = DiscreteVPDenoiser.from_scheduler(lambda x, timestep: x, dict(sch.config))
    torch.testing.assert_close(d2.sigmas_train, d.sigmas_train, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteVPDenoiser(lambda x, timestep: x, AC, "eps")


def test_ddim_is_euler_on_a_diffusers_unet(unet, gen):
    """DDIM (eta = 0) on a config-built diffusers UNet equals dmlab's Euler on the adapted denoiser."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(set_alpha_to_one=True, clip_sample=False)
    sch.set_timesteps(10)
    noise = torch.randn(2, 1, 8, 8, generator=gen)
    x = noise.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    d = DiscreteVPDenoiser.from_scheduler(unet, sch)
    sigmas = schedules.append_zero(d.sigmas_train[sch.timesteps].float())
    ours = samplers.sample_euler(d, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_edm_precond_coefficients():
    seen = {}

    def F(x_in, c_noise):
        seen["x_in"], seen["c_noise"] = x_in, c_noise
        return torch.ones_like(x_in)

    d = EDMPrecond(F, sigma_data=0.5)
    x = torch.full((1, 2), 3.0)
    out = d(x, 2.0)
    sd, s = 0.5, 2.0
    torch.testing.assert_close(seen["x_in"], x / (s ** 2 + sd ** 2) ** 0.5)
    torch.testing.assert_close(seen["c_noise"], torch.tensor([torch.log(torch.tensor(2.0)).item() / 4]))
    torch.testing.assert_close(out, sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / (s ** 2 + sd ** 2) ** 0.5)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(F, sigma_data=0)


def test_flow_adapter_recovers_the_denoiser(gen):
    def v_net(x_t, timestep):  # exact velocity eps - x0 of G
        t = timestep
        sigma = t / (1 - t)
        x = x_t / (1 - t)[:, None]
        x0 = G(x, sigma)
        eps = (x - x0) / sigma[:, None]
        return eps - x0

    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    sig = torch.tensor([0.1, 1.0, 4.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(FlowDenoiser(v_net)(x, sig), G(x, sig))


def test_cfg_and_transformers(gen):
    def d(x, sigma, class_labels):
        return x * 0 + class_labels[:, None].to(x.dtype)

    x = torch.randn(3, 2, generator=gen)
    u = {"class_labels": torch.full((3,), 10)}
    c = {"class_labels": torch.tensor([1, 2, 3])}
    for batched in (False, True):
        g = cfg(d, 2.0, u, batched=batched)
        torch.testing.assert_close(g(x, 1.0, **c), 10 + 2.0 * (c["class_labels"][:, None].float() - 10).expand(3, 2))
    assert isinstance(g, CFG)
    torch.testing.assert_close(cfg(d, 1.0, u)(x, 1.0, **c), d(x, 1.0, **c))
    with pytest.raises(ValueError, match="keys"):
        cfg(d, 2.0, u)(x, 1.0)
    with pytest.raises(TypeError, match="uncond"):
        cfg(d, 2.0, None)
    big = lambda x, sigma: x * 0 + 5  # noqa: E731
    torch.testing.assert_close(clamp(big)(x, 1.0), torch.ones_like(x))
    hi, lo = (lambda x, s: x * 0 + 1), (lambda x, s: x * 0 - 1)
    out = switch_at_sigma(hi, lo, 1.0)(x, torch.tensor([2.0, 1.0, 0.5]))
    assert out[:, 0].tolist() == [1.0, -1.0, -1.0]
    rec = RecordingDenoiser(lo)
    rec(x, 0.5), rec(x, 0.2)
    assert rec.nfe == 2


def test_as_sigma_errors():
    x = torch.zeros(3, 2)
    assert as_sigma(0.5, x).shape == (3,)
    with pytest.raises(ValueError, match="shape \\[B\\]"):
        as_sigma(torch.ones(2), x)
    with pytest.raises(ValueError, match="non-negative"):
        as_sigma(-0.1, x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        as_sigma(0.1, [1.0])


def test_net_output_reads_diffusers_returns():
    from types import SimpleNamespace

    from dmlab.accelerators.finetune import net_output as reexported
    from dmlab.denoisers import net_output

    t = torch.ones(2)
    assert net_output(t) is t and net_output(SimpleNamespace(sample=t)) is t and net_output((t, None)) is t
    assert reexported is net_output
    with pytest.raises(TypeError, match="cannot read a tensor"):
        net_output(("not a tensor",))


# ----------------------------------------------------------------------------------------------- reliability
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}


class _Lin(torch.nn.Module):
    """A 'network' with one parameter in the model's dtype: output = 0.5 * input (no cancellation in x0)."""

    def __init__(self, dtype):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((), 0.5, dtype=dtype))
        self.seen = []

    def forward(self, x, timestep=None, **cond):
        self.seen.append(x.detach().clone())
        return x * self.w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_in_half_precision_match_float64_up_to_sigma_1e4(dtype, gen):
    x64 = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    for s in schedules.karras(10, 0.002, 1e4)[:-1].tolist():
        xh = (x64 * s).to(dtype)
        for kind in ("epsilon", "v_prediction", "sample"):
            net = _Lin(dtype)
            out = DiscreteVPDenoiser(net, AC, kind)(xh, s)
            ref = DiscreteVPDenoiser(_Lin(torch.float64), AC, kind)(xh.double(), s)
            assert out.dtype == dtype and torch.isfinite(out).all(), (kind, s)
            assert (out.double() - ref).norm() <= HALF_TOL[dtype] * ref.norm(), (kind, s)
            assert net.seen[-1].abs().max() > 0  # alpha x is not flushed to 0 above sigma = 256
        for den in (EDMPrecond(lambda x, c: torch.tanh(x)), FlowDenoiser(lambda x, timestep: 0.5 * x),
                    cfg(G, 3.0, {})):
            out, ref = den(xh, s), den(xh.double(), s)
            assert out.dtype == dtype and torch.isfinite(out).all(), (den, s)
            assert (out.double() - ref).norm() <= HALF_TOL[dtype] * ref.norm().clamp_min(1e-3), (den, s)


def test_sigma_beyond_half_range_names_the_dtype():
    x = torch.zeros(2, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="does not fit in torch.float16.*float32"):
        as_sigma(torch.full((2,), 1e5, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="inf in torch.float16.*float32"):
        as_sigma(torch.full((2,), 1e5).half(), x)
    with pytest.raises(ValueError, match="finite and non-negative"):  # a real NaN keeps the plain message
        as_sigma(torch.full((2,), float("nan")), x)


def test_discrete_vp_refuses_a_reversed_alphas_cumprod():
    with pytest.raises(ValueError, match="decrease with the training index.*flip"):
        DiscreteVPDenoiser(lambda x, timestep: x, torch.linspace(0.01, 0.99, 10))
    with pytest.raises(ValueError, match="finite"):
        DiscreteVPDenoiser(lambda x, timestep: x, torch.tensor([0.9, float("nan"), 0.1]))


def test_cfg_batched_needs_batched_conditioning():
    with pytest.raises(ValueError, match="batch dimension"):
        cfg(G, 2.0, {"class_labels": torch.tensor(10)}, batched=True)
    d = cfg(lambda x, s, **c: x, 2.0, {"class_labels": torch.full((3,), 10)}, batched=True)
    with pytest.raises(ValueError, match="batch size B = 3"):
        d(torch.zeros(3, 2), 1.0, class_labels=torch.zeros(2).long())
    with pytest.raises(ValueError, match="finite"):
        cfg(G, float("inf"), {})
