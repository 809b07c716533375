"""LeMDA: Learning Multimodal Data Augmentation in Feature Space (Liu et al., ICLR 2023).

A late-fusion multimodal classifier trained jointly with a feature-space augmentation network
(a VAE, adversarial through gradient reversal, kept label-preserving by a confidence-masked
consistency term), on the shared ``smile.runtime`` Trainer with two optimizers.

The public names below are imported from their submodules on first use, so that importing the
package (and registering it in the zoo) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smile.models.registry import ZooMethod, lazy_exports, register

METHOD = register(
    ZooMethod(
        name="lemda",
        config_class="smile.models.lemda.config:JobConfig",
        train="smile.models.lemda.job:train",
        evaluate="smile.models.lemda.job:evaluate",
        cli="smile.models.lemda.cli",
        summary="LeMDA: a multimodal classifier with learned feature-space augmentation (ICLR 2023)",
    )
)

_EXPORTS = {
    "augmenter": ("MLPVAE", "FeatureAugmenter", "GradReverse", "TransformerVAE", "grad_reverse"),
    "config": ("DataConfig", "EncoderConfig", "FusionConfig", "JobConfig", "LeMDAConfig", "ModelConfig"),
    "encoders": ("HFEncoder", "TabularMLP", "build_encoder"),
    "fusion": ("LateFusionClassifier", "TaskNetwork"),
    "losses": ("consistency_loss", "vae_kl"),
    "model": ("LeMDA",),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from smile.models.lemda.augmenter import (
        MLPVAE,
        FeatureAugmenter,
        GradReverse,
        TransformerVAE,
        grad_reverse,
    )
    from smile.models.lemda.config import (
        DataConfig,
        EncoderConfig,
        FusionConfig,
        JobConfig,
        LeMDAConfig,
        ModelConfig,
    )
    from smile.models.lemda.encoders import HFEncoder, TabularMLP, build_encoder
    from smile.models.lemda.fusion import LateFusionClassifier, TaskNetwork
    from smile.models.lemda.losses import consistency_loss, vae_kl
    from smile.models.lemda.model import LeMDA

__all__ = [
    "DataConfig",
    "EncoderConfig",
    "FeatureAugmenter",
    "FusionConfig",
    "GradReverse",
    "HFEncoder",
    "JobConfig",
    "LateFusionClassifier",
    "LeMDA",
    "LeMDAConfig",
    "MLPVAE",
    "ModelConfig",
    "TabularMLP",
    "TaskNetwork",
    "TransformerVAE",
    "build_encoder",
    "consistency_loss",
    "grad_reverse",
    "vae_kl",
]
