"""Trap and Replace (Wang et al., NeurIPS 2022): backdoor defense by trapping the backdoor in a
small, easy-to-replace classification head.

Stage 1 trains a stem shared by a light head and an image-reconstruction decoder on the poisoned
training set; stage 2 freezes the stem and trains a fresh head on a small clean holdout. Both
stages are runs of ``smile.runtime.Trainer``: ``smile zoo trap_replace train --stage 1|2``.
"""

from smile.models.trap_replace.attacks import ATTACKS, CLEAN_LABEL_ATTACKS, Trigger, make_trigger
from smile.models.trap_replace.config import DataCfg, OptimCfg, PoisonCfg, TrapReplaceConfig
from smile.models.trap_replace.datasets import ImageDataset, TensorImages, load_image_dataset
from smile.models.trap_replace.losses import Stage1Loss, Stage2Loss, total_variation
from smile.models.trap_replace.metrics import attack_success_rate, ca_asr, clean_accuracy
from smile.models.trap_replace.networks import StemHeadDecoder, build_network, replace_head
from smile.models.trap_replace.poison import PoisonSplit, make_poisoned_split, make_test_sets
from smile.models.trap_replace.stages import evaluate_stage, train_stage1, train_stage2

__all__ = [
    "ATTACKS",
    "CLEAN_LABEL_ATTACKS",
    "DataCfg",
    "ImageDataset",
    "OptimCfg",
    "PoisonCfg",
    "PoisonSplit",
    "Stage1Loss",
    "Stage2Loss",
    "StemHeadDecoder",
    "TensorImages",
    "TrapReplaceConfig",
    "Trigger",
    "attack_success_rate",
    "build_network",
    "ca_asr",
    "clean_accuracy",
    "evaluate_stage",
    "load_image_dataset",
    "make_poisoned_split",
    "make_test_sets",
    "make_trigger",
    "replace_head",
    "total_variation",
    "train_stage1",
    "train_stage2",
]
