"""The smile model zoo: methods from related papers, each training through ``smile.runtime``.

Installed as ``smile.models``; one sub-package per method, registered below by import paths (so
importing ``smile.models`` loads no method: :mod:`smile.models.registry` imports on use).
"""

from smile.models.registry import ZooMethod, register

register(ZooMethod(
    "lemda", "smile.models.lemda.config:JobConfig", "smile.models.lemda.job:train",
    "smile.models.lemda.job:evaluate",
    summary="LeMDA: a multimodal classifier with learned feature-space augmentation (ICLR 2023)",
))  # fmt: skip
register(ZooMethod(
    "peft_design_spaces", "smile.models.peft_design_spaces.training:JobConfig",
    "smile.models.peft_design_spaces.method:train", "smile.models.peft_design_spaces.method:evaluate",
    summary="PEFT design spaces: S4 parameter-efficient fine-tuning of T5/RoBERTa (ICLR 2023)",
))  # fmt: skip
register(ZooMethod(
    "trap_replace", "smile.models.trap_replace.config:TrapReplaceConfig",
    "smile.models.trap_replace.method:train", "smile.models.trap_replace.method:evaluate",
    summary="Trap and Replace: a backdoor defense with a replaceable classification head (NeurIPS 2022)",
))  # fmt: skip
register(ZooMethod(
    "pomp", "smile.models.pomp.config:POMPConfig", "smile.models.pomp.method:train",
    "smile.models.pomp.method:evaluate",
    summary="POMP: prompt pre-training over twenty-thousand classes with local contrast (NeurIPS 2023)",
))  # fmt: skip
register(ZooMethod(
    "zeroshot_eval", "smile.models.zeroshot_eval.config:ZeroShotEvalConfig",
    "smile.models.zeroshot_eval.method:train", "smile.models.zeroshot_eval.method:evaluate",
    summary="Zero-shot(-CoT) evaluation on the 20 datasets of 'Is ChatGPT a General-Purpose NLP Task "
    "Solver?' (EMNLP 2023); evaluation only: train is not applicable",
))  # fmt: skip
register(ZooMethod(
    "masked_diffuse_lm", "smile.models.masked_diffuse_lm.config:MDLMConfig",
    "smile.models.masked_diffuse_lm.method:train", "smile.models.masked_diffuse_lm.method:evaluate",
    summary="Masked-Diffuse LM: diffusion LM with soft-masked noise, cross-entropy denoiser (EMNLP 2023)",
))  # fmt: skip
register(ZooMethod(
    "mm_cot", "smile.models.mm_cot.config:MMCoTConfig", "smile.models.mm_cot.method:train",
    "smile.models.mm_cot.method:evaluate",
    summary="Multimodal-CoT: gated vision fusion in T5, rationale then answer generation (TMLR 2024)",
))  # fmt: skip
register(ZooMethod(
    "aim", "smile.models.aim.config:AIMConfig", "smile.models.aim.method:train",
    "smile.models.aim.method:evaluate",
    summary="AIM: frozen CLIP ViT adapted to video by spatial/temporal/joint adapters (ICLR 2023)",
))  # fmt: skip
register(ZooMethod(
    "spt", "smile.models.spt.config:JobConfig", "smile.models.spt.method:train",
    "smile.models.spt.method:evaluate",
    summary="SPT: semi-parametric prompt tuning, a memory bank of prompts retrieved by the discrete "
    "prompt, on T5 (arXiv 2212.10929)",
))  # fmt: skip
