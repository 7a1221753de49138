"""Mixtures of low-rank Gaussians and subspace clustering (paper 66)."""
import pytest
import torch

from dmlab.exact import EmpiricalDenoiser
from dmlab.probes import (LowRankDenoiser, generalisation, molrg, sample_per_subspace,
                          subspace_clustering,
                          subspace_distance, train_lowrank_dae)
from dmlab.probes.subspace import lowrank_denoise


def test_lowrank_denoiser_is_the_exact_posterior_mean(gen):
    gmm, U = molrg(12, 3, 2, generator=gen)
    assert U.shape == (3, 12, 2)
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))
    x = gmm.sample(50, gen) + 0.3 * torch.randn(50, 12, generator=gen, dtype=torch.float64)
    for s in (0.05, 0.3, 2.0):
        sig = torch.full((50,), s, dtype=torch.float64)
        torch.testing.assert_close(lowrank_denoise(x, sig, U), gmm(x, sig), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(LowRankDenoiser(U)(x, 0.3), gmm(x, 0.3), rtol=1e-9, atol=1e-9)


def test_subspace_clustering_needs_d_plus_one_samples_per_subspace():
    gen = torch.Generator().manual_seed(0)
    for d in (2, 4):
        gmm, U = molrg(32, 2, d, generator=gen)
        err = {}
        for N in (d - 1, d + 1, 3 * d):
            x, labels = sample_per_subspace(U, N, generator=gen)
            assert torch.equal(torch.bincount(labels), torch.tensor([N, N]))
            err[N] = subspace_distance(subspace_clustering(x, 2, d, generator=gen)[0], U)
        assert err[d - 1] > 0.2 and err[d + 1] < 1e-6 and err[3 * d] < 1e-6


def test_dsm_on_the_parametrised_denoiser_finds_the_clustering_solution():
    gen = torch.Generator().manual_seed(1)
    gmm, U = molrg(16, 2, 2, generator=gen)
    x = gmm.sample(60, gen)
    sc, labels = subspace_clustering(x, 2, 2, generator=gen)
    dae = train_lowrank_dae(x, 2, 2, generator=gen, steps=100, n_init=3)
    assert subspace_distance(sc, U) < 1e-6 and subspace_distance(dae, U) < 0.05
    assert subspace_distance(dae, sc) < 0.05
    assert labels.shape == (60,)


def test_generalisation_metric_separates_memorising_and_generalising_denoisers():
    gen = torch.Generator().manual_seed(2)
    gmm, U = molrg(10, 2, 2, generator=gen)
    train = gmm.sample(8, gen)
    fresh = gmm.sample(200, gen)
    g = generalisation(fresh, U, train, delta=0.05)
    assert g["on_support"] == 1.0 and g["generalised"] > 0.9
    copies = train[torch.randint(8, (50,), generator=gen)]
    m = generalisation(copies, U, train, delta=0.05)
    assert m["memorised"] == 1.0 and m["generalised"] == 0.0
    noise = torch.randn(100, 10, generator=gen, dtype=torch.float64)
    assert generalisation(noise, U, train)["on_support"] < 0.1
    # the empirical denoiser of the same training set is pure memorisation
    emp = EmpiricalDenoiser(train)
    x = train[:4] + 0.01 * torch.randn(4, 10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(emp(x, 0.01), train[:4], rtol=0, atol=1e-6)


def test_errors(gen):
    with pytest.raises(ValueError, match="dim"):
        molrg(4, 2, 5, generator=gen)
    with pytest.raises(TypeError, match="Generator"):
        molrg(4, 2, 1, generator=None)
    with pytest.raises(ValueError, match="bases"):
        lowrank_denoise(torch.zeros(2, 3), torch.ones(2), torch.zeros(3, 2))
    _, U = molrg(6, 2, 2, generator=gen)
    with pytest.raises(ValueError, match="same shape"):
        subspace_distance(U, U[:, :, :1])
