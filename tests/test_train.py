"""dmlab.train.fit: determinism, resume, EMA/accumulation/clipping, errors, and data parallel on 2 CPU processes."""
import os
import pathlib
import socket

import pytest
import torch

from dmlab.train import EMA, FitConfig, RunStateError, fit, lr_at

X = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _linear_run(steps=12, run=None, stop_after=None, **cfg):
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(0)

    def data(g):
        i = torch.randint(len(X), (32,), generator=g)
        return X[i], Y[i]

    config = FitConfig(steps=steps, lr=0.3, schedule="cosine", log_every=4, **cfg)
    res = fit(lambda b: ((m(b[0]) - b[1]) ** 2).mean(), m, config, generator=gen, data=data, run=run,
              stop_after=stop_after)
    return m, res


def test_fit_is_deterministic_and_learns():
    m1, r1 = _linear_run()
    m2, r2 = _linear_run()
    assert torch.equal(m1.weight, m2.weight) and r1.losses == r2.losses
    assert r1.complete and r1.steps == 12 and len(r1.losses) == 12 and [s for s, _ in r1.curve] == [4, 8, 12]
    assert r1.losses[-1] < 0.5 * r1.losses[0]


def test_dit_label_dropout_does_not_draw_from_the_global_rng():
    """diffusers' DiT drops class labels in train mode with torch's global RNG; fit switches that off (labels are
    dropped by the batches, with the run's generator), so the weights do not depend on the global seed."""
    from diffusers import DiTTransformer2DModel

    def run(global_seed):
        torch.manual_seed(0)
        net = DiTTransformer2DModel(in_channels=1, out_channels=1, sample_size=4, patch_size=2, num_layers=1,
                                    num_attention_heads=2, attention_head_dim=4, num_embeds_ada_norm=3)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 1, 4, 4, generator=gen), torch.arange(16) % 3

        def loss(g):
            return net(x, timestep=torch.full((16,), 10), class_labels=y).sample.square().mean()

        torch.manual_seed(global_seed)
        fit(loss, net, FitConfig(steps=3, lr=1e-2, progress=False), generator=gen)
        return net

    a, b = run(1), run(2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    emb = [m for m in a.modules() if type(m).__name__ == "LabelEmbedding"]
    assert emb and all(m.dropout_prob > 0 for m in emb)  # restored after the run


def test_progress_in_a_chapter_run_is_one_finished_line(monkeypatch, capsys):
    monkeypatch.setenv("DMLAB_CI", "1")
    _, r = _linear_run(progress=True, desc="linear")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"linear: 12/12 steps, loss {r.curve[-1][1]:.4f}"]
    _linear_run(progress=False)
    assert capsys.readouterr().err == ""


def test_interrupted_run_resumes_to_the_same_weights_and_says_so(tmp_path, capsys):
    full, rf = _linear_run(ema=0.9, checkpoint_every=5)
    _, part = _linear_run(ema=0.9, checkpoint_every=5, run=tmp_path / "r", stop_after=7)
    assert part.steps == 7 and not part.complete
    resumed, rr = _linear_run(ema=0.9, checkpoint_every=5, run=tmp_path / "r")
    assert "resuming fit from step 7/12" in capsys.readouterr().err
    assert rr.resumed_from == 7 and rr.complete and rr.losses == rf.losses
    assert torch.equal(resumed.weight, full.weight) and torch.equal(resumed.bias, full.bias)


def test_saved_state_is_verified_before_reuse(tmp_path):
    _linear_run(run=tmp_path / "r", stop_after=3)
    victim = next(p for p in sorted((tmp_path / "r" / "state").iterdir()) if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(RunStateError, match="does not match its manifest"):
        _linear_run(run=tmp_path / "r")
    with pytest.raises(RunStateError, match="another run"):
        _linear_run(steps=13, run=tmp_path / "r")


def test_ema_accumulation_clipping_and_schedule():
    m, r = _linear_run(ema=0.5)
    raw, _ = _linear_run()
    assert not torch.equal(m.weight, raw.weight)  # the model holds the EMA weights
    _, acc = _linear_run(grad_accum=2)
    assert len(acc.losses) == 12 and acc.losses != _linear_run()[1].losses
    clipped, _ = _linear_run(grad_clip=1e-3)
    assert (clipped.weight - raw.weight).abs().max() > 1e-2  # tiny gradients: the clipped run barely moves
    _, bf = _linear_run(mixed_precision="bf16")  # accelerate's autocast: same course at bf16 matmul precision
    _, fp = _linear_run()
    assert bf.losses != fp.losses and bf.losses[-1] == pytest.approx(fp.losses[-1], rel=0.05)
    cfg = FitConfig(steps=100, lr=1.0, schedule="cosine", warmup=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == pytest.approx(0.0)
    e = EMA(torch.nn.Linear(2, 2), 0.9)
    assert e.count == 0


def test_free_tensors_and_bad_input():
    w = torch.zeros(3, requires_grad=True)
    target = torch.tensor([1.0, 2.0, 3.0])
    r = fit(lambda g: ((w - target) ** 2).sum(), None, FitConfig(steps=200, lr=0.1),
            generator=torch.Generator().manual_seed(0), params=[w])
    assert torch.allclose(w.detach(), target, atol=1e-2) and r.complete
    with pytest.raises(ValueError, match="optimizer"):
        FitConfig(steps=1, optimizer="sgd9")
    with pytest.raises(ValueError, match="steps"):
        FitConfig(steps=-1)
    with pytest.raises(TypeError, match="torch.Generator"):
        fit(lambda g: w.sum(), None, FitConfig(steps=1), generator=0, params=[w])
    with pytest.raises(ValueError, match="nothing to train"):
        fit(lambda g: w.sum(), None, FitConfig(steps=1), generator=torch.Generator(), params=[])


# ----------------------------------------------------------------------------------------------- data parallel
DP_TOL = 1e-3  # max |weight difference| 2 processes vs 1 after 6 steps (summation order only; a half-batch run differs by ~1e-2)


def _tiny_recipe(batch_size=16):
    from dmlab import zoo

    return zoo.get_recipe("unet_s").with_steps(6, batch_size=batch_size, checkpoint_every=3, warmup=2)


def _dp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="yes")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):  # the forked parent's single-process state
        state._shared_state.clear()
    import torch.distributed as dist

    from dmlab.zoo import evaluate
    from dmlab.zoo import train as ztrain

    model, log = ztrain.train(_tiny_recipe(), progress=False, state_dir=pathlib.Path(out) / "run")
    from dmlab.denoisers import DiscreteVPDenoiser

    den = DiscreteVPDenoiser(model, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
    x = evaluate.sample_digits_sharded(den, torch.arange(5), generator=torch.Generator().manual_seed(3), n_steps=2)
    if rank == 0:
        torch.save({"state": model.state_dict(), "log": log, "world": dist.get_world_size(), "samples": x},
                   pathlib.Path(out) / "dp.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_like_one(tmp_path):
    """A tiny unet_s recipe on 2 gloo processes (each takes half of every global batch; gradients averaged) ends
    within DP_TOL of the 1-process run, while a 1-process run on half batches ends far from it; the metric samples,
    split between the processes and gathered, match the 1-process samples."""
    import torch.multiprocessing as mp

    from dmlab.denoisers import DiscreteVPDenoiser
    from dmlab.zoo import evaluate
    from dmlab.zoo import train as ztrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, log1 = ztrain.train(_tiny_recipe(), progress=False, state_dir=tmp_path / "one")
        half, _ = ztrain.train(_tiny_recipe(batch_size=8), progress=False, state_dir=tmp_path / "half")
        mp.start_processes(_dp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    finally:
        torch.set_num_threads(threads)
    dp = torch.load(tmp_path / "dp.pt")
    assert dp["world"] == 2 and dp["log"]["processes"] == 2 and dp["log"]["complete"]
    diff = max((dp["state"][k] - v).abs().max().item() for k, v in one.state_dict().items())
    control = max((half.state_dict()[k] - v).abs().max().item() for k, v in one.state_dict().items())
    print(f"2 processes vs 1: max |dweight| = {diff:.2e} (tolerance {DP_TOL:.0e}); half-batch control {control:.2e}")
    assert diff < DP_TOL < control
    assert [s for s, _ in dp["log"]["curve"]] == [s for s, _ in log1["curve"]]
    for (_, a), (_, b) in zip(dp["log"]["curve"], log1["curve"]):
        assert a == pytest.approx(b, rel=1e-4)
    one.load_state_dict(dp["state"])  # the same weights, sampled on one process
    den = DiscreteVPDenoiser(one, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0))
    ref = evaluate.sample_digits(den, torch.arange(5), generator=torch.Generator().manual_seed(3), n_steps=2)
    rel = ((dp["samples"] - ref).abs().max() / ref.abs().max()).item()
    print(f"sharded samples vs 1 process: max relative difference {rel:.1e}")
    assert dp["samples"].shape == ref.shape and rel < 1e-5
