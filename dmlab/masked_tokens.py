"""Masked generative transformers over image tokens: a patch VQ and a MaskGIT-style sampler (chapter 27).

Meissonic (Bai et al., "Meissonic: Revitalizing Masked Generative Transformers for Efficient High-Resolution
Text-to-Image Synthesis", 2024) generates images without diffusion: a VQ tokenizer turns an image into a grid of
discrete tokens, a *bidirectional* transformer is trained to predict randomly masked tokens (mask ratio drawn from
a cosine schedule), and sampling starts from an all-masked grid and fills it in ``K`` parallel steps, each keeping
the most confident predictions and re-masking the rest, with ``cos(pi/2 * k/K)`` of the tokens still masked after
step ``k`` (MaskGIT, Chang et al. 2022; MUSE, Chang et al. 2023). This is a small re-implementation from the papers'
text:

* :class:`PatchVQ`: the tokenizer, a k-means codebook (:func:`kmeans`) of non-overlapping ``p x p`` patches
  (no learned encoder: enough for 8x8 digits; Meissonic uses a VQ-GAN);
* :class:`MaskedTokenTransformer`: a pre-norm bidirectional transformer with a class token (the null class for
  unconditional use) and a ``[MASK]`` token;
* :func:`mask_batch`, :func:`maskgit_loss`: the cosine-masking training objective;
* :func:`maskgit_sample`: parallel decoding in ``K`` steps with confidence-based re-masking;
* :func:`train_maskgit`: the training run, by :func:`dmlab.train.fit`;
* :class:`TokenGenerator`: tokenizer and transformer together (the zoo's ``maskgit`` entries), images in, images out.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["kmeans", "PatchVQ", "MaskedTokenTransformer", "cosine_mask_ratio", "mask_batch", "maskgit_loss",
           "maskgit_sample", "train_maskgit", "TokenGenerator", "fit_token_generator"]


def _check_gen(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator: every random draw goes through it")


@torch.no_grad()
def kmeans(x: Tensor, k: int, *, generator: torch.Generator, iters: int = 25) -> Tensor:
    """Lloyd's k-means of the rows of ``x [N, D]``: ``k`` centroids ``[k, D]``, initialised by k-means++ (Arthur
    & Vassilvitskii 2007) from ``generator``; an empty cluster keeps its previous centroid."""
    _check_gen(generator)
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError("x must be a 2-D tensor [N, D] of points")
    if not isinstance(k, int) or not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be an int in 1..{x.shape[0]} (the number of points), got {k!r}")
    x = x.double()
    c = x[torch.randint(0, x.shape[0], (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: next centre with probability proportional to squared distance
        d2 = torch.cdist(x, c).pow(2).min(1).values
        c = torch.cat([c, x[torch.multinomial(d2 / d2.sum(), 1, generator=generator)]])
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).unsqueeze(1)
        c = torch.where(cnt > 0, sums / cnt.clamp(min=1), c)
    return c.float()


class PatchVQ(nn.Module):
    """Tokenizer of ``[B, 1, H, W]`` images: each non-overlapping ``patch x patch`` patch becomes the index of its
    nearest codebook vector (``codebook [K, patch**2]``). ``encode`` gives tokens ``[B, (H/p)(W/p)]`` in raster
    order, ``decode`` the images made of the codebook patches."""

    def __init__(self, codebook: Tensor, patch: int = 2, size: int = 8):
        super().__init__()
        if codebook.ndim != 2 or codebook.shape[1] != patch * patch:
            raise ValueError(f"codebook must be [K, patch**2] = [K, {patch * patch}], got {tuple(codebook.shape)}")
        if size % patch:
            raise ValueError(f"size {size} is not a multiple of patch {patch}")
        self.patch, self.size = patch, size
        self.register_buffer("codebook", codebook.float().clone())

    @classmethod
    def fit(cls, x: Tensor, k: int, *, generator: torch.Generator, patch: int = 2, iters: int = 25) -> "PatchVQ":
        """The k-means codebook of every patch of the images ``x``."""
        vq = cls(torch.zeros(1, patch * patch), patch, x.shape[-1])
        return cls(kmeans(vq.patches(x), k, generator=generator, iters=iters), patch, x.shape[-1])

    @property
    def n_tokens(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def vocab(self) -> int:
        return self.codebook.shape[0]

    def patches(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] != self.size:
            raise ValueError(f"x must be images [B, 1, {self.size}, {self.size}], got {tuple(x.shape)}")
        p = F.unfold(x, self.patch, stride=self.patch)  # [B, p*p, L]
        return p.transpose(1, 2).reshape(-1, self.patch * self.patch)

    def encode(self, x: Tensor) -> Tensor:
        d = torch.cdist(self.patches(x).double(), self.codebook.double())
        return d.argmin(1).reshape(x.shape[0], self.n_tokens)

    def decode(self, tokens: Tensor) -> Tensor:
        p = self.codebook[tokens]  # [B, L, p*p]
        return F.fold(p.transpose(1, 2), (self.size, self.size), self.patch, stride=self.patch)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: Tensor) -> Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        h = h + self.proj(a)
        return h + self.mlp(self.norm2(h))


class MaskedTokenTransformer(nn.Module):
    """Bidirectional transformer ``f(tokens [B, L], labels [B]) -> logits [B, L, vocab]``. Token id ``vocab`` is
    ``[MASK]``; the class label (``n_classes`` is the null class) is a prefix token; positions are learned."""

    def __init__(self, vocab: int, n_tokens: int, *, width: int = 64, depth: int = 4, heads: int = 4,
                 n_classes: int = 10):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")
        self.vocab, self.n_tokens, self.n_classes = vocab, n_tokens, n_classes
        self.tok = nn.Embedding(vocab + 1, width)
        self.cls = nn.Embedding(n_classes + 1, width)
        self.pos = nn.Parameter(torch.zeros(1, n_tokens + 1, width))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    @property
    def mask_id(self) -> int:
        return self.vocab

    def config(self) -> dict:
        b = self.blocks[0]
        return {"vocab": self.vocab, "n_tokens": self.n_tokens, "width": self.tok.embedding_dim,
                "depth": len(self.blocks), "heads": b.heads, "n_classes": self.n_classes}

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ValueError(f"tokens must be [B, {self.n_tokens}], got {tuple(tokens.shape)}")
        h = torch.cat([self.cls(labels)[:, None], self.tok(tokens)], 1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h[:, 1:]))


def cosine_mask_ratio(u: Tensor | float) -> Tensor:
    """MaskGIT's schedule ``gamma(u) = cos(pi u / 2)``: the fraction of tokens masked at progress ``u`` in [0, 1]."""
    return torch.cos(torch.as_tensor(u, dtype=torch.float64) * math.pi / 2)


def mask_batch(tokens: Tensor, mask_id: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(masked_tokens, mask)``: per row, ``ceil(gamma(u) L)`` (at least one) random positions replaced by
    ``mask_id``, ``u ~ U(0, 1)`` (every draw from ``generator``)."""
    _check_gen(generator)
    b, n = tokens.shape
    r = cosine_mask_ratio(torch.rand(b, generator=generator, dtype=torch.float64))
    n_mask = torch.ceil(r * n).clamp(min=1).long()
    rank = torch.rand(b, n, generator=generator).argsort(1).argsort(1)
    mask = rank < n_mask[:, None]
    return torch.where(mask, torch.full_like(tokens, mask_id), tokens), mask


def maskgit_loss(model: MaskedTokenTransformer, batch: dict) -> Tensor:
    """Cross-entropy of the masked tokens (``batch`` from :func:`mask_batch` plus ``tokens`` and ``y``)."""
    logits = model(batch["masked"], batch["y"])
    return F.cross_entropy(logits[batch["mask"]], batch["tokens"][batch["mask"]])


@torch.no_grad()
def maskgit_sample(model: MaskedTokenTransformer, labels: Tensor, n_steps: int, *, generator: torch.Generator,
                   temperature: float = 1.0, choice_temperature: float = 2.0) -> Tensor:
    """Tokens ``[B, L]`` decoded from an all-masked grid in ``n_steps`` parallel steps (``n_steps`` network calls).

    Step ``k`` samples every masked token from the softmax at ``temperature``, scores each new token by its log
    probability plus Gumbel noise scaled by ``choice_temperature * (1 - (k+1)/K)``, and re-masks the
    ``floor(L cos(pi/2 (k+1)/K))`` lowest-scoring ones (MaskGIT); the last step unmasks everything."""
    _check_gen(generator)
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    labels = torch.as_tensor(labels, dtype=torch.long)
    b, n = labels.shape[0], model.n_tokens
    if n_steps > n:
        raise ValueError(f"n_steps must be <= the number of tokens ({n}): each step unmasks at least one")
    tokens = torch.full((b, n), model.mask_id, dtype=torch.long)
    for k in range(n_steps):
        masked = tokens == model.mask_id
        logp = torch.log_softmax(model(tokens, labels).double() / temperature, -1)
        g = -torch.log(-torch.log(torch.rand(logp.shape, generator=generator, dtype=torch.float64)))
        pred = (logp + g).argmax(-1)  # a categorical draw (Gumbel-max)
        conf = logp.gather(-1, pred[..., None])[..., 0]
        tokens = torch.where(masked, pred, tokens)
        left = int(math.floor(n * float(cosine_mask_ratio((k + 1) / n_steps)))) if k < n_steps - 1 else 0
        if left == 0:
            continue
        u = torch.rand(conf.shape, generator=generator, dtype=torch.float64)
        score = conf + choice_temperature * (1 - (k + 1) / n_steps) * -torch.log(-torch.log(u))
        score = torch.where(masked, score, torch.full_like(score, math.inf))  # decided tokens stay
        left = min(left, int(masked.sum(1).min()) - 1)
        if left > 0:
            remask = score.argsort(1)[:, :left]
            tokens = tokens.scatter(1, remask, model.mask_id)
    return tokens


def train_maskgit(tokens: Tensor, labels: Tensor, *, vocab: int, steps: int, batch_size: int = 128, lr: float = 2e-3,
                  seed: int = 0, p_uncond: float = 0.1, warmup: int = 50, ema: float = 0.99, width: int = 64,
                  depth: int = 4, heads: int = 4) -> tuple[MaskedTokenTransformer, dict]:
    """Train a :class:`MaskedTokenTransformer` on ``tokens [N, L]`` with labels (dropped to the null class with
    probability ``p_uncond``) by :func:`dmlab.train.fit` (AdamW, warmup then cosine decay, EMA); returns ``(model, log)``."""
    from .train import FitConfig, fit

    if tokens.ndim != 2 or labels.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [N, L] and labels [N], got {tuple(tokens.shape)} and {tuple(labels.shape)}")
    model = MaskedTokenTransformer(vocab, tokens.shape[1], width=width, depth=depth, heads=heads)
    n_classes = model.n_classes

    def data(g):
        idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
        tok, y = tokens[idx], labels[idx]
        masked, mask = mask_batch(tok, model.mask_id, g)
        drop = torch.rand(batch_size, generator=g) < p_uncond
        return {"tokens": tok, "masked": masked, "mask": mask, "y": torch.where(drop, n_classes, y)}

    t0 = time.time()
    res = fit(lambda b: maskgit_loss(model, b), model,
              FitConfig(steps=steps, lr=lr, optimizer="adamw", schedule="cosine", warmup=min(warmup, steps),
                        ema=ema or None, log_every=max(1, steps // 10)),
              generator=torch.Generator().manual_seed(seed), data=data)
    log = {"steps": steps, "train_seconds": round(time.time() - t0, 1),
           "loss": [[s, round(v, 6)] for s, v in res.curve]}
    return model.eval(), log


class TokenGenerator(nn.Module):
    """A :class:`PatchVQ` and a :class:`MaskedTokenTransformer` trained on its tokens: ``generate(labels, n_steps,
    generator=...)`` returns images ``[B, 1, size, size]`` decoded from :func:`maskgit_sample` (what a zoo
    ``maskgit`` entry loads as)."""

    def __init__(self, vq: PatchVQ, model: MaskedTokenTransformer):
        super().__init__()
        if vq.vocab != model.vocab or vq.n_tokens != model.n_tokens:
            raise ValueError(f"tokenizer ({vq.vocab} codes, {vq.n_tokens} tokens) and transformer ({model.vocab}, "
                             f"{model.n_tokens}) do not match")
        self.vq, self.model = vq, model

    @torch.no_grad()
    def generate(self, labels: Tensor, n_steps: int, *, generator: torch.Generator, **kw) -> Tensor:
        return self.vq.decode(maskgit_sample(self.model, labels, n_steps, generator=generator, **kw))


def fit_token_generator(x: Tensor, y: Tensor, cfg: dict, *, steps: int, batch_size: int, lr: float, seed: int,
                        p_uncond: float, warmup: int, ema: float) -> tuple[TokenGenerator, dict]:
    """Fit the VQ codebook (``cfg``: ``vocab``, ``patch``, ``kmeans_seed``, ``kmeans_iters``) on the images ``x``, then
    train the transformer (``width``, ``depth``, ``heads``) on their tokens with :func:`train_maskgit`."""
    vq = PatchVQ.fit(x, cfg["vocab"], generator=torch.Generator().manual_seed(cfg["kmeans_seed"]),
                     patch=cfg["patch"], iters=cfg["kmeans_iters"])
    model, log = train_maskgit(vq.encode(x), y, vocab=vq.vocab, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                               p_uncond=p_uncond, warmup=warmup, ema=ema, width=cfg["width"], depth=cfg["depth"],
                               heads=cfg["heads"])
    return TokenGenerator(vq, model), log
