"""The SwD losses against hand computations."""

import math

import pytest
import torch

from swd.distill.dmd import dmd_gradient, dmd_loss, regression_loss
from swd.distill.gan import gan_discriminator_loss, gan_generator_loss
from swd.distill.mmd import mmd_linear, mmd_loss, mmd_rbf


def feats(seed, b=3, l=6, c=5, scale=1.0):
    return torch.randn(b, l, c, generator=torch.Generator().manual_seed(seed)) * scale


def test_mmd_zero_on_identical_features():
    f = feats(0)
    assert torch.allclose(mmd_linear(f, f.clone()), torch.zeros(3), atol=1e-7)
    # unbiased RBF on identical sets: the two within-set terms equal the cross term up to the diagonal
    g = feats(1, l=50, scale=20.0)
    assert mmd_rbf(g, g.clone(), bandwidth=100.0).abs().max() < 0.05
    assert mmd_linear(f, f + 1.0).min() > 0.9  # and not zero when they differ


def test_mmd_symmetric():
    a, b = feats(0), feats(1)
    assert torch.allclose(mmd_linear(a, b), mmd_linear(b, a))
    assert torch.allclose(mmd_rbf(a, b, 3.0), mmd_rbf(b, a, 3.0), atol=1e-6)


def test_mmd_linear_hand_computation():
    real = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # token means (2, 1)
    fake = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # token means (0, 1)
    c = 0.5
    expected = ((math.sqrt(4 + c * c) - c) + (math.sqrt(0 + c * c) - c)) / 2
    assert mmd_linear(real, fake, c).item() == pytest.approx(expected, rel=1e-6)


def test_mmd_is_per_image_not_batch_pooled():
    # two images whose errors cancel when pooled over the batch must still give a positive loss
    real = torch.zeros(2, 4, 3)
    fake = torch.stack([torch.ones(4, 3), -torch.ones(4, 3)])
    assert (mmd_linear(real, fake) > 0.9).all()


def test_mmd_rbf_equals_brute_force_unbiased_estimate():
    x, y, s = feats(2, b=2, l=5, c=4), feats(3, b=2, l=5, c=4), 1.7

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s))

    out = mmd_rbf(x, y, s)
    for b in range(2):
        n = x.shape[1]
        xx = sum(k(x[b, i], x[b, j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        yy = sum(k(y[b, i], y[b, j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        xy = sum(k(x[b, i], y[b, j]) for i in range(n) for j in range(n)) / (n * n)
        assert out[b].item() == pytest.approx(xx + yy - 2 * xy, abs=1e-6)


def test_mmd_rejects_mismatched_shapes_and_unknown_kernel():
    with pytest.raises(ValueError, match="same shape|one shape"):
        mmd_linear(feats(0), feats(1, l=7))
    with pytest.raises(ValueError, match="unknown MMD kernel"):
        mmd_loss(feats(0), feats(1), kernel="cosine")


def test_dmd_gradient_is_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x0_hat = torch.randn(4, 1, 6, 6, generator=g, requires_grad=True)
    x0_real, x0_fake = torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
    loss = dmd_loss(x0_hat, x0_real, x0_fake)
    assert loss.shape == (4,)
    loss.sum().backward()
    p_real, p_fake = x0_hat.detach() - x0_real, x0_hat.detach() - x0_fake
    expected = (p_real - p_fake) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    d = x0_hat[0].numel()
    assert torch.allclose(x0_hat.grad * d, expected, atol=1e-5)
    assert torch.allclose(dmd_gradient(x0_hat.detach(), x0_real, x0_fake), expected, atol=1e-6)


def test_dmd_gradient_nan_becomes_zero():
    x = torch.ones(2, 1, 2, 2)
    g = dmd_gradient(x, x.clone(), torch.zeros_like(x))  # p_real = 0: 0/0 and x/0
    assert torch.isfinite(g).all()


def test_gan_losses_have_the_right_signs():
    confident_real, confident_fake = torch.full((3,), 8.0), torch.full((3,), -8.0)
    # the generator is happy when the head calls its samples real
    assert (gan_generator_loss(confident_real) < gan_generator_loss(confident_fake)).all()
    assert gan_generator_loss(confident_real).max() < 1e-3
    # the discriminator is happy when fakes score low and reals score high
    good = gan_discriminator_loss(confident_fake, confident_real)
    bad = gan_discriminator_loss(confident_real, confident_fake)
    assert good.max() < 1e-3 and bad.min() > 15
    # the generator's gradient pushes its logits up, the discriminator's pushes fakes down
    logit = torch.zeros(2, requires_grad=True)
    gan_generator_loss(logit).sum().backward()
    assert (logit.grad < 0).all()
    logit = torch.zeros(2, requires_grad=True)
    gan_discriminator_loss(logit, torch.zeros(2)).sum().backward()
    assert (logit.grad > 0).all()


def test_regression_loss_per_sample():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    assert regression_loss(a, b).tolist() == [0.0, 4.0]
