"""The zoo's quality numbers are re-measured here, not read back from ``registry.json``.

Each committed model is sampled again on a small set (60 samples, 6 per class, fixed noise) and its class accuracy
and digits-FD are compared with the values recorded at registration (500 samples) within a tolerance derived from
the noise of both measurements:

* accuracy: 4 binomial standard errors of the difference of two independent estimates,
  ``4 sqrt(p (1 - p) (1/n + 1/n_rec))`` with ``p`` the recorded accuracy;
* digits-FD: FD is biased upwards at small n, so the comparable quantity is the *excess over the real-vs-real
  floor* drawn like the samples (same n, same class balance, :func:`dmlab.metrics.digits_real_like`); its
  tolerance is 4 standard deviations of the floor over real draws at the small n (times sqrt 2: the generated
  set's FD is as noisy as the floor's), which bounds the noise of both sides.

KID is checked against its own floor: a model's KID interval (per-sample terms, :func:`dmlab.metrics.kid_terms`)
must not lie entirely below the real-vs-real KID floor's interval (a generated set cannot beat real digits).
"""
import math

import pytest
import torch

from dmlab import claims, metrics, zoo
from dmlab.data import load_digits
from dmlab.zoo import store
from dmlab.zoo.evaluate import sample_digits

N_PER_CLASS = 6
FLOOR_DRAWS = 5


@pytest.fixture(scope="module")
def yardstick():
    clf = zoo.load("classifier")
    labels = torch.arange(10).repeat_interleave(N_PER_CLASS)
    f_test = metrics.digits_features(load_digits("test")[0], clf)
    g = torch.Generator().manual_seed(1)
    real = [metrics.digits_features(metrics.digits_real_like(labels, generator=g), clf) for _ in range(FLOOR_DRAWS)]
    fd_floor = torch.tensor([metrics.frechet_distance(f, f_test) for f in real], dtype=torch.float64)
    kid_floor = claims.paired_bootstrap(torch.stack([metrics.kid_terms(f, f_test) for f in real]), generator=g)
    return clf, labels, f_test, fd_floor, kid_floor


def test_classifier_accuracy_is_re_measured():
    rec = store.read_registry()["classifier"]["metrics"]["test_accuracy"]
    x, y = load_digits("test")
    acc = metrics.class_accuracy(x, y, classifier=zoo.load("classifier"))
    assert abs(acc - rec) <= 1 / len(y), (acc, rec)   # deterministic: within one test image (rounding)


@pytest.mark.parametrize("name", ["unet_s", "unet_l", "dit_s", "dit_l"])
def test_pixel_model_quality_matches_its_registry_entry(name, yardstick):
    clf, labels, f_test, fd_floor, kid_floor = yardstick
    rec = store.read_registry()[name]["metrics"]
    den, _ = zoo.load_denoiser(name)
    x = sample_digits(den, labels, generator=torch.Generator().manual_seed(0))
    n, n_rec = len(labels), rec["n_samples"]

    acc = metrics.class_accuracy(x, labels, classifier=clf)
    p = min(max(rec["class_accuracy"], 1 / n_rec), 1 - 1 / n_rec)
    tol = 4 * math.sqrt(p * (1 - p) * (1 / n + 1 / n_rec))
    assert abs(acc - rec["class_accuracy"]) <= tol, f"{name}: accuracy {acc:.3f} vs recorded " \
        f"{rec['class_accuracy']:.3f} (tolerance {tol:.3f})"

    f = metrics.digits_features(x, clf)
    excess = metrics.frechet_distance(f, f_test) - float(fd_floor.mean())
    excess_rec = rec["digits_fd"] - rec["digits_fd_floor"]
    g = torch.Generator().manual_seed(3)
    boot = torch.tensor([metrics.frechet_distance(f[torch.randint(0, n, (n,), generator=g)], f_test)
                         for _ in range(100)], dtype=torch.float64)
    tol_fd = 4 * math.sqrt(float(boot.std()) ** 2 + float(fd_floor.std()) ** 2)
    assert abs(excess - excess_rec) <= tol_fd, f"{name}: FD excess over the floor {excess:.2f} at n={n} vs " \
        f"recorded {excess_rec:.2f} at n={n_rec} (tolerance {tol_fd:.2f})"

    k = claims.paired_bootstrap(metrics.kid_terms(f, f_test), generator=torch.Generator().manual_seed(2))
    assert k.high >= kid_floor.low, f"{name}: KID {claims.fmt(k)} below the real floor {claims.fmt(kid_floor)}"


def test_sd_tiny_prompt_accuracy_matches_its_registry_entry():
    from dmlab.zoo.latent import generate

    rec = store.read_registry()["sd_tiny"]["metrics"]
    pipe, clf = zoo.load("sd_tiny"), zoo.load("classifier")
    labels = torch.arange(10).repeat_interleave(5)
    imgs = generate(pipe, labels.tolist(), generator=torch.Generator().manual_seed(0), steps=25, guidance=2.0)
    acc = metrics.class_accuracy(imgs, labels, classifier=clf)
    p = min(max(rec["prompt_accuracy"], 1 / rec["n_samples"]), 1 - 1 / rec["n_samples"])
    tol = 4 * math.sqrt(p * (1 - p) * (1 / len(labels) + 1 / rec["n_samples"]))
    assert abs(acc - rec["prompt_accuracy"]) <= tol, (acc, rec["prompt_accuracy"], tol)
