"""Zero-shot evaluation harness of "Is ChatGPT a General-Purpose Natural Language Processing Task
Solver?" (Qin et al., EMNLP 2023): 20 datasets in 7 categories, zero-shot and zero-shot-CoT, for
local transformers LMs (dense or smile MoE) and OpenAI-compatible endpoints. Evaluation only:
``smile zoo zeroshot_eval eval --config <yaml>``.
"""

from smile.models.zeroshot_eval.backends import (
    EndpointError,
    HFCausalBackend,
    HFSeq2SeqBackend,
    OpenAICompatBackend,
)
from smile.models.zeroshot_eval.config import EndpointCfg, ZeroShotEvalConfig
from smile.models.zeroshot_eval.data import Example, load_examples
from smile.models.zeroshot_eval.evaluate import answer_prompt, evaluate_task, first_prompt, run_eval
from smile.models.zeroshot_eval.metrics import accuracy, entity_f1, rouge
from smile.models.zeroshot_eval.report import collect, format_table
from smile.models.zeroshot_eval.tasks import PAPER_TASKS, TASKS, HFSource, Task, get_tasks, protocol_hash

__all__ = [
    "PAPER_TASKS",
    "TASKS",
    "EndpointCfg",
    "EndpointError",
    "Example",
    "HFCausalBackend",
    "HFSeq2SeqBackend",
    "HFSource",
    "OpenAICompatBackend",
    "Task",
    "ZeroShotEvalConfig",
    "accuracy",
    "answer_prompt",
    "entity_f1",
    "evaluate_task",
    "first_prompt",
    "format_table",
    "get_tasks",
    "load_examples",
    "protocol_hash",
    "collect",
    "rouge",
    "run_eval",
]
