"""Masked-Diffuse LM (Chen et al., EMNLP 2023): continuous diffusion over word embeddings with
soft-masked noise (words noised in order of importance) and a cross-entropy denoiser trained
with the paper's two-term objective (a [MASK] class for the words still masked at t-1); MBR
decoding; classifier-guided controllable generation (content, length, POS, syntax spans).
``smile zoo masked_diffuse_lm train|eval``."""

from smile.models.masked_diffuse_lm.config import BackboneCfg, ControlCfg, DataCfg, MDLMConfig
from smile.models.masked_diffuse_lm.control import (
    LatentClassifier,
    POSClassifier,
    SpanClassifier,
    guidance,
    pos_guidance,
    span_guidance,
)
from smile.models.masked_diffuse_lm.data import Grammar, Parse
from smile.models.masked_diffuse_lm.denoiser import Denoiser, bert_config, moefy_bert
from smile.models.masked_diffuse_lm.diffusion import MaskedDiffuseLM, masked_ce, mbr_select, paper_ce
from smile.models.masked_diffuse_lm.importance import ImportanceScorer, buckets, importance
from smile.models.masked_diffuse_lm.schedule import SoftMaskSchedule
from smile.models.masked_diffuse_lm.vocab import Vocab, tokenize

__all__ = [
    "BackboneCfg",
    "ControlCfg",
    "DataCfg",
    "Denoiser",
    "Grammar",
    "ImportanceScorer",
    "LatentClassifier",
    "MDLMConfig",
    "MaskedDiffuseLM",
    "POSClassifier",
    "Parse",
    "SoftMaskSchedule",
    "SpanClassifier",
    "Vocab",
    "bert_config",
    "buckets",
    "guidance",
    "importance",
    "masked_ce",
    "mbr_select",
    "moefy_bert",
    "paper_ce",
    "pos_guidance",
    "span_guidance",
    "tokenize",
]
