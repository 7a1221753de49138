"""The full-scale code path on a real GPU. Skipped where CUDA is absent (CI has none); on a GPU machine run
``python -m pytest tests/gpu -q``. The hub models cannot be downloaded in our sandboxes, so these tests drive the
zoo models and config-built stand-ins through the same device/dtype code the full-scale chapters use."""
import pytest
import torch

import dmlab
from dmlab import exact, samplers, schedules, zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_full_scale_setup_picks_the_gpu(monkeypatch):
    monkeypatch.setenv("DMLAB_SCALE", "full")
    sc, gen = dmlab.setup(seed=0)
    assert sc.full and sc.device == "cuda" and sc.dtype in (torch.float16, torch.float32)
    assert gen.device.type == "cpu"  # noise is drawn on the CPU: same starting noise on every machine


@pytest.mark.parametrize("name", ["sample_heun", "sample_dpmpp_2m", "sample_unipc", "sample_ddpm"])
def test_samplers_run_on_cuda_and_match_cpu(name, smooth_gmm):
    solver = getattr(samplers, name)
    sig = schedules.karras(12, 0.01, 20.0)
    x = 20 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = {"generator": torch.Generator().manual_seed(1)}
    out_cpu = solver(smooth_gmm, x, sig, **kw)
    gpu_gmm = smooth_gmm  # exact denoisers compute on the input's device
    kw = {"generator": torch.Generator().manual_seed(1)}
    try:
        out_gpu = solver(gpu_gmm, x.cuda(), sig, **kw)
    except RuntimeError as e:  # an exact denoiser whose buffers live on the CPU
        pytest.fail(f"{name} on CUDA failed: {e}")
    assert out_gpu.device.type == "cuda"
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("model", ["unet_l", "dit_l"])
def test_zoo_model_in_half_precision_on_cuda(model):
    den_cpu, _ = zoo.load_denoiser(model)
    den_gpu, net = zoo.load_denoiser(model, device="cuda")
    net.half()
    g = torch.Generator().manual_seed(0)
    sig = schedules.karras(10, 0.01, 80.0)
    x = sig[0] * torch.randn(32, 1, 8, 8, generator=g)
    y = torch.arange(32) % 10
    a = samplers.sample_dpmpp_2m(den_cpu, x, sig, cond={"class_labels": y})
    b = samplers.sample_dpmpp_2m(den_gpu, x.cuda(), sig, cond={"class_labels": y.cuda()})
    assert b.dtype == torch.float32 and b.device.type == "cuda"
    err = (a - b.cpu()).abs().max().item()
    clf = zoo.load("classifier")
    acc_cpu = (clf(a).argmax(1) == y).float().mean().item()
    acc_gpu = (clf(b.cpu()).argmax(1) == y).float().mean().item()
    print(f"{model}: fp16 CUDA vs fp32 CPU max |diff| {err:.3g}, class accuracy {acc_gpu:.2f} vs {acc_cpu:.2f}")
    assert err < 0.2 and acc_gpu >= acc_cpu - 0.1


def test_deepcache_removal_is_exact_on_cuda():
    from dmlab.accelerators import DeepCacheConfig, apply_deepcache

    den, unet = zoo.load_denoiser("unet_l", device="cuda")
    g = torch.Generator().manual_seed(0)
    sig = schedules.karras(9, 0.01, 80.0)
    x = (sig[0] * torch.randn(16, 1, 8, 8, generator=g)).cuda()
    y = (torch.arange(16) % 10).cuda()
    base = samplers.sample_euler(den, x, sig, cond={"class_labels": y})
    with apply_deepcache(unet, DeepCacheConfig(interval=3)) as h:
        fast = samplers.sample_euler(den, x, sig, cond={"class_labels": y})
    after = samplers.sample_euler(den, x, sig, cond={"class_labels": y})
    assert torch.equal(base, after)
    assert not torch.equal(base, fast) and h.stats


def test_gpu_timing_synchronizes_and_reports_peak_memory():
    from dmlab import bench

    a = torch.randn(2048, 2048, device="cuda")
    small = lambda: a @ a  # noqa: E731
    big = lambda: torch.cat([a @ a for _ in range(4)])  # noqa: E731
    t = bench.time_pair(small, big, pairs=3)
    assert t.baseline_peak_bytes >= 4 * 2048 * 2048 and t.method_peak_bytes > t.baseline_peak_bytes
    assert t.method_s > t.baseline_s  # 4 matmuls timed to the end of their kernels, not to their launch
