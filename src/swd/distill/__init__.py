"""Scale-wise distillation: the paper's losses (DMD, GAN, MMD), stage inputs, the student and
critic adapters on one backbone, the objective, the trainer and the export."""

from .dmd import dmd_gradient, dmd_loss, regression_loss
from .gan import gan_discriminator_loss, gan_generator_loss
from .mmd import mmd_linear, mmd_loss, mmd_rbf

__all__ = [
    "dmd_gradient",
    "dmd_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "mmd_linear",
    "mmd_loss",
    "mmd_rbf",
    "regression_loss",
]
