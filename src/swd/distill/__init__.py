"""Scale-wise distillation: losses, stage inputs, student/critic adapters, trainer, export."""

from .losses import dmd_gradient, dmd_loss, gan_discriminator_loss, gan_generator_loss, mmd_linear, mmd_loss, mmd_rbf, regression_loss

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
