"""Chapter 27: block removal and KD losses (dmlab.distill.architecture), patch VQ and MaskGIT (dmlab.masked_tokens)."""
import math

import pytest
import torch

from dmlab import hooks
from dmlab.distill import architecture as arch
from dmlab.masked_tokens import (MaskedTokenTransformer, PatchVQ, TokenGenerator, cosine_mask_ratio, kmeans,
                                 mask_batch, maskgit_loss, maskgit_sample)
from dmlab.train import ddpm_batch


def _dit(layers=4, in_channels=1, ada=11, width=32, sample=8):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=width // 2, in_channels=in_channels,
                                 out_channels=2 * in_channels, num_layers=layers, sample_size=sample, patch_size=2,
                                 num_embeds_ada_norm=ada).eval()


def _batch(channels=1, n=6, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n * 2, channels, 8, 8, generator=g)
    y = torch.randint(0, classes, (n * 2,), generator=g)
    ac = torch.linspace(0.999, 0.01, 1000)
    return ddpm_batch(x0, ac, n, g, labels=y), x0, y, ac


def test_remove_blocks_copies_kept_blocks_and_keep_all_is_identity():
    t = _dit()
    b, *_ = _batch()
    full = arch.remove_blocks(t, [0, 1, 2, 3]).eval()
    kw = {"timestep": b["t"], "class_labels": b["y"]}
    with torch.no_grad():
        assert torch.equal(full(b["xt"], **kw).sample, t(b["xt"], **kw).sample)
    s = arch.remove_blocks(t, [0, 3])
    assert len(s.transformer_blocks) == 2
    for j, i in enumerate([0, 3]):
        for (n1, p1), (n2, p2) in zip(s.transformer_blocks[j].named_parameters(),
                                      t.transformer_blocks[i].named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(s.proj_out_2.weight, t.proj_out_2.weight)
    per_block = sum(p.numel() for p in t.transformer_blocks[0].parameters())
    assert sum(p.numel() for p in t.parameters()) - sum(p.numel() for p in s.parameters()) == 2 * per_block


def test_remove_blocks_lowers_flops_and_errors():
    from dmlab.bench import count_flops

    t = _dit()
    s = arch.remove_blocks(t, [0, 3]).eval()
    x, kw = torch.zeros(1, 1, 8, 8), {"timestep": torch.tensor([500]), "class_labels": torch.tensor([1])}
    with torch.no_grad():
        ft, fs = count_flops(lambda: t(x, **kw)), count_flops(lambda: s(x, **kw))
    assert 0.4 < fs / ft < 0.6
    with pytest.raises(ValueError, match="keep is empty"):
        arch.remove_blocks(t, [])
    with pytest.raises(ValueError, match="strictly increasing"):
        arch.remove_blocks(t, [2, 1])
    with pytest.raises(ValueError, match="0..3"):
        arch.remove_blocks(t, [0, 4])
    with pytest.raises(TypeError, match="transformer_blocks"):
        arch.remove_blocks(torch.nn.Linear(2, 2), [0])


def test_kd_sites_and_loss():
    t = _dit()
    assert arch.kd_sites(t, "attn", [0, 2]) == ["transformer_blocks.0.attn1", "transformer_blocks.2.attn1"]
    assert arch.kd_sites(t, "ff", [1]) == ["transformer_blocks.1.ff"]
    assert arch.kd_sites(t, "block", [3]) == ["transformer_blocks.3"]
    assert arch.kd_sites(t, "out") == []
    with pytest.raises(ValueError, match="site must be one of"):
        arch.kd_sites(t, "resnet")
    b, *_ = _batch()
    # the full copy of the teacher: every distillation term is 0, what is left is the DDPM loss of the teacher
    same = arch.remove_blocks(t, [0, 1, 2, 3])
    with torch.no_grad():
        task = torch.nn.functional.mse_loss(t(b["xt"], timestep=b["t"], class_labels=b["y"]).sample[:, :1], b["eps"])
    for site in arch.SITES:
        torch.testing.assert_close(arch.kd_loss(same, t, b, keep=[0, 1, 2, 3], site=site), task)
    assert not hooks.active_handles(t) and not hooks.active_handles(same)
    # a student with blocks removed: the feature term adds to the loss and reaches the student's weights
    s = arch.remove_blocks(t, [0, 3])
    l_out = arch.kd_loss(s, t, b, keep=[0, 3], site="out")
    l_attn = arch.kd_loss(s, t, b, keep=[0, 3], site="attn")
    assert l_attn > l_out
    s.zero_grad()
    arch.kd_loss(s, t, b, keep=[0, 3], site="attn", w_out=0.0).backward()
    assert s.transformer_blocks[0].attn1.to_q.weight.grad.abs().sum() > 0
    assert not hooks.active_handles(s)
    with pytest.raises(ValueError, match="student has 2 blocks"):
        arch.kd_loss(s, t, b, keep=[0, 1, 3], site="attn")


def test_distill_student_is_reproducible():
    t = _dit(layers=3)
    _, x0, y, ac = _batch()
    a, log = arch.distill_student(t, [0, 2], "attn", x0, y, ac, steps=3, batch_size=4, seed=1)
    b, _ = arch.distill_student(t, [0, 2], "attn", x0, y, ac, steps=3, batch_size=4, seed=1)
    assert log["site"] == "attn" and log["steps"] == 3
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), arch.remove_blocks(t, [0, 2]).parameters()))


def test_full_scale_path_on_a_latent_dit():
    """The full-scale cell's path (DiT-XL/2: latents with 4 channels, 1000 ImageNet classes, learned sigma) on a
    config-built DiT."""
    t = _dit(layers=4, in_channels=4, ada=1000, width=32)
    s = arch.remove_blocks(t, [0, 2])
    b, *_ = _batch(channels=4, classes=1000)
    for site in arch.SITES:
        loss = arch.kd_loss(s, t, b, keep=[0, 2], site=site)
        assert loss.ndim == 0 and torch.isfinite(loss)


def test_kmeans_and_patch_vq():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(30, 0) + 0.1 * torch.randn(90, 2, generator=g)
    c = kmeans(x, 3, generator=g)
    order = c[:, 0].argsort()
    assert torch.cdist(c, centres).min(1).values.max() < 0.1
    assert len(set(torch.cdist(c, centres).argmin(1).tolist())) == 3 and order.numel() == 3
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 91, generator=g)
    code = torch.randn(5, 4, generator=g)
    vq = PatchVQ(code, patch=2, size=8)
    tok = torch.randint(0, 5, (3, 16), generator=g)
    img = vq.decode(tok)
    assert img.shape == (3, 1, 8, 8)
    assert torch.equal(vq.encode(img), tok)  # images made of codebook patches round-trip exactly
    with pytest.raises(ValueError, match="codebook must be"):
        PatchVQ(torch.zeros(5, 3), patch=2)


def test_mask_batch_follows_the_cosine_schedule():
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 7, (200, 16), generator=g)
    masked, mask = mask_batch(tok, 7, torch.Generator().manual_seed(3))
    g2 = torch.Generator().manual_seed(3)
    r = cosine_mask_ratio(torch.rand(200, generator=g2, dtype=torch.float64))
    assert torch.equal(mask.sum(1), torch.ceil(r * 16).clamp(min=1).long())
    assert torch.equal(masked[mask], torch.full_like(masked[mask], 7)) and torch.equal(masked[~mask], tok[~mask])


class _Recorder(MaskedTokenTransformer):
    def forward(self, tokens, labels):
        self.seen.append(int((tokens == self.mask_id).sum(1).max()))
        return super().forward(tokens, labels)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_maskgit_sample_unmasks_on_the_cosine_schedule(steps):
    torch.manual_seed(0)
    m = _Recorder(6, 16, width=16, depth=1, heads=2).eval()
    m.seen = []
    y = torch.arange(5)
    out = maskgit_sample(m, y, steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 16) and int(out.max()) < 6 and int(out.min()) >= 0
    assert len(m.seen) == steps  # one network call per step
    want = [16] + [math.floor(16 * float(cosine_mask_ratio(k / steps))) for k in range(1, steps)]
    assert m.seen == want
    again = maskgit_sample(m, y, steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="n_steps must be <="):
        maskgit_sample(m, y, 17, generator=torch.Generator())
    with pytest.raises(TypeError, match="torch.Generator"):
        maskgit_sample(m, y, 2, generator=None)


def test_maskgit_loss_and_token_generator():
    torch.manual_seed(0)
    m = MaskedTokenTransformer(6, 16, width=16, depth=1, heads=2)
    tok = torch.randint(0, 6, (8, 16))
    masked, mask = mask_batch(tok, m.mask_id, torch.Generator().manual_seed(0))
    loss = maskgit_loss(m, {"tokens": tok, "masked": masked, "mask": mask, "y": torch.zeros(8, dtype=torch.long)})
    assert abs(float(loss.detach()) - math.log(6)) < 1.0
    gen = TokenGenerator(PatchVQ(torch.randn(6, 4), 2, 8), m.eval())
    assert gen.generate(torch.arange(3), 4, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="do not match"):
        TokenGenerator(PatchVQ(torch.randn(5, 4), 2, 8), m)
