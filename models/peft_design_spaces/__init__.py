"""PEFT design spaces (Chen et al., ICLR 2023): S4 models on stock transformers T5 and RoBERTa.

A design is layer grouping x parameter allocation x tunable groups x per-group strategies
(Adapter, Prefix, BitFit, LoRA). ``apply_design`` attaches one to a frozen backbone;
``DesignSpaceSearch`` runs the paper's greedy progressive refinement; the ``smile zoo
peft_design_spaces`` command trains, evaluates and searches through smile.runtime.
"""

from smile.models.peft_design_spaces.config import (
    ALLOCATIONS,
    GROUPINGS,
    S4_ROBERTA_BASE,
    S4_STRATEGIES,
    S4_T5_BASE,
    STRATEGIES,
    DesignSpaceConfig,
    GroupSpec,
    group_sizes_for,
)
from smile.models.peft_design_spaces.peft_model import (
    PEFTModel,
    apply_design,
    budget_report,
    is_peft,
    load_peft,
    save_peft,
)

__all__ = [
    "ALLOCATIONS",
    "GROUPINGS",
    "S4_ROBERTA_BASE",
    "S4_STRATEGIES",
    "S4_T5_BASE",
    "STRATEGIES",
    "DesignSpaceConfig",
    "GroupSpec",
    "PEFTModel",
    "apply_design",
    "budget_report",
    "group_sizes_for",
    "is_peft",
    "load_peft",
    "save_peft",
]
