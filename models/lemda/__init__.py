"""LeMDA: Learning Multimodal Data Augmentation in Feature Space (Liu et al., ICLR 2023).

A late-fusion multimodal classifier trained jointly with a feature-space augmentation network
(a VAE, adversarial through gradient reversal, kept label-preserving by a confidence-masked
consistency term), on the shared ``smile.runtime`` Trainer with two optimizers.
"""

from smile.models.lemda.augmenter import MLPVAE, FeatureAugmenter, GradReverse, TransformerVAE, grad_reverse
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
