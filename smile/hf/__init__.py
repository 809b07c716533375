"""The transformers integration: moefy (dense FFN -> MoE layer) and SwitchTransformers import/export."""

from smile.hf.moefy import ConvertError, MoEFeedForward, ffn_sites, moe_dropped_fraction, moe_modules, moefy
from smile.hf.switch import export_switch, import_switch, switch_skeleton, switch_spec

__all__ = [
    "ConvertError",
    "MoEFeedForward",
    "export_switch",
    "ffn_sites",
    "import_switch",
    "moe_dropped_fraction",
    "moe_modules",
    "moefy",
    "switch_skeleton",
    "switch_spec",
]
