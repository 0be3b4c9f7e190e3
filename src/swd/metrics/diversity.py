"""Fidelity and diversity as separate numbers: precision, recall, density and coverage.

Precision: the share of generated samples inside the real manifold; recall: the share of real
samples inside the generated one (Kynkäänniemi et al. 2019); density and coverage are their
outlier-robust versions (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models"). Each manifold is the union of balls reaching every sample's k-th nearest
neighbour in Inception feature space, k = 5 as in the paper.

Computed with the PyPI package ``prdc``: the authors' small reference implementation (numpy and
scikit-learn only). torch-fidelity also has precision / recall, but it needs torchvision, which
cannot be installed beside this project's torch build.
"""

from __future__ import annotations

import contextlib
import io

import torch
from prdc import compute_prdc
from torch import Tensor

DEFAULT_K = 5
PRDC_KEYS = ("precision", "recall", "density", "coverage")


def equal_size_subset(features: Tensor, n: int, seed: int = 0) -> Tensor:
    """``n`` rows of ``features`` (N, d) drawn without replacement under ``seed`` (all of them if N <= n).

    The k-NN manifolds are compared at equal sample counts, as in the paper (10k real, 10k fake);
    this also keeps the real-real distance matrix at n x n instead of 10k x 10k.
    """
    if len(features) <= n:
        return features
    index = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:n]
    return features[index.sort().values]


def check_set_sizes(num_real: int, num_fake: int, k: int) -> None:
    """prdc's k-th neighbour excludes the sample itself: each side needs at least k + 2 samples."""
    if k < 1:
        raise ValueError(f"eval.pr_k (nearest neighbours) must be >= 1, got {k}")
    if min(num_real, num_fake) < k + 2:
        raise ValueError(f"precision / recall with k = {k} nearest neighbours need at least {k + 2} images on each side, "
                         f"got {num_fake} generated and {num_real} reference; raise eval.num_samples or lower eval.pr_k")


def precision_recall(real: Tensor, fake: Tensor, k: int = DEFAULT_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (M, d) against ``real`` (N, d) features.

    ``real`` is first cut to a random subset of M rows when it has more (:func:`equal_size_subset`).
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision / recall need features (N, d) and (M, d) of one size d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real = equal_size_subset(real, len(fake))
    check_set_sizes(len(real), len(fake), k)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        scores = compute_prdc(real.float().numpy(), fake.float().numpy(), nearest_k=k)
    return {name: float(scores[name]) for name in PRDC_KEYS}
