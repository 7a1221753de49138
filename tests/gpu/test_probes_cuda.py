"""The full-scale code paths of the classifier, correspondence and drift probes (papers 33, 54, 10, 35) on a real GPU in
half precision, driven by the zoo's latent pipeline (the hub models cannot be downloaded in our sandboxes).
Skipped where CUDA is absent; run ``python -m pytest tests/gpu -q`` on a GPU machine."""
import pytest
import torch

from dmlab import denoisers, schedules, zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def sd():
    from dmlab.data import load_digits
    from dmlab.zoo.latent import prompt

    pipe = zoo.load("sd_tiny").to("cuda", torch.float16)
    D = denoisers.DiscreteVPDenoiser.from_scheduler(pipe.unet, pipe.scheduler)
    with torch.no_grad():
        emb, neg = pipe.encode_prompt([prompt(c) for c in range(10)], "cuda", 1, True, [""] * 10)
        x16, y = load_digits("test", size=16)
        z = pipe.vae.encode(x16[:24].to("cuda", torch.float16)).latent_dist.mean * pipe.vae.config.scaling_factor
    return pipe, D, emb, neg, z, y[:24]


def test_diffusion_classifier_half_precision_matches_cpu(sd):
    from dmlab.probes.classifier import diffusion_classify

    pipe, D, emb, _, z, y = sd
    r = diffusion_classify(D, z, {"encoder_hidden_states": emb}, n_samples=(4, 8), to_keep=(3, 1),
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(r.scores.gather(1, r.pred[:, None])).all()
    cpu_pipe = zoo.load("sd_tiny")
    Dc = denoisers.DiscreteVPDenoiser.from_scheduler(cpu_pipe.unet, cpu_pipe.scheduler)
    rc = diffusion_classify(Dc, z.float().cpu(), {"encoder_hidden_states": emb.float().cpu()}, n_samples=(4, 8),
                            to_keep=(3, 1), generator=torch.Generator().manual_seed(0))
    assert (r.pred.cpu() == rc.pred).double().mean() >= 0.9  # fp16 vs fp32 on the same noise
    assert r.accuracy(y) >= 0.8


def test_drift_and_features_half_precision(sd):
    from dmlab.probes import extract_features
    from dmlab.probes.correspondence import fuse, layer_descriptor, match_points
    from dmlab.probes.drift import feature_drift

    pipe, D, emb, neg, z, _ = sd
    g = denoisers.cfg(D, 2.0, {"encoder_hidden_states": neg[:4]}, batched=True)
    sig = schedules.discrete(10, D.sigmas_train).to("cuda", torch.float32)
    x = sig[0] * torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)
    rep = feature_drift(g, pipe.unet, x, sig, cond={"encoder_hidden_states": emb[:4]})
    assert rep.calls == 10 and all(torch.isfinite(v).all() for v in rep.relative.values())
    assert sum(len(m._forward_hooks) for m in pipe.unet.modules()) == 0
    f = extract_features(D, pipe.unet, z[:2], float(D.sigmas_train[100]), ["up_blocks.1", "up_blocks.2"],
                         ensemble=2, generator=torch.Generator().manual_seed(2),
                         cond={"encoder_hidden_states": emb[:1].expand(2, -1, -1)})
    a, b = layer_descriptor([f["up_blocks.1"][0], f["up_blocks.2"][0]], [f["up_blocks.1"][1], f["up_blocks.2"][1]],
                            (16, 16), pca_dims=[16, 8])
    assert a.device.type == "cuda" and a.shape == (24, 16, 16)
    p = match_points(fuse([a]).float().cpu(), fuse([a]).float().cpu(), torch.tensor([[3.0, 4.0]]),
                     image_size_a=(16, 16), image_size_b=(16, 16))
    assert torch.equal(p, torch.tensor([[3.0, 4.0]], dtype=torch.float64))


def test_linear_probe_features_on_cuda(sd):
    from dmlab.probes.classifier import probe_grid

    pipe, D, emb, _, z, y = sd
    c = {"encoder_hidden_states": emb[:1].expand(len(z), -1, -1)}
    acc = probe_grid(D, pipe.unet, z, y, z, y, ["mid_block", "up_blocks.2"], [0.0, 0.3], generator=torch.Generator(),
                     cond_train=c, cond_test=c)
    assert acc.shape == (2, 2) and (acc > 0.5).all()  # train = test: a linear probe fits 24 points
