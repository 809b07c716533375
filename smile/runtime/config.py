"""Typed training configuration: dataclasses loaded from YAML/TOML/JSON, CLI overrides, validation.

Everything is checked before any process group starts: an unknown key, a value of the wrong type
or outside its allowed set raises :class:`ConfigError` naming the dotted field path, the bad value
and what is allowed. The loader is generic (:func:`from_dict`, :func:`load_config`), so a job
config that nests :class:`TrainConfig` next to its own model and data sections loads the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DistConfig",
    "EMAConfig",
    "LogConfig",
    "OptimizerConfig",
    "ParamGroupConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_dict",
    "from_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration field holds a value the runtime cannot use."""


# ---------------------------------------------------------------------------------------------
# The runtime's own sections.
# ---------------------------------------------------------------------------------------------
@dataclass
class ScheduleConfig:
    """Learning-rate schedule of one optimizer, as a multiplier of its peak ``lr``.

    kind: "constant", "linear" (decay to ``min_lr_ratio``) or "cosine" (half cosine to it).
    warmup_steps / warmup_ratio: warmup length in optimizer steps, or as a fraction of the
        schedule's total steps (at most one of them may be set).
    warmup_lr: None warms up linearly from 0 (step s gets ``(s + 1) / (warmup + 1)``); a number
        holds that absolute lr during warmup (the "constant warmup" of CoOp-style prompt tuning).
    min_lr_ratio: lr at the end of decay, as a fraction of the peak.
    total_steps: the decay horizon; None means the steps this optimizer takes in the run.
    """

    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    warmup_lr: float | None = None
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def validate(self, where: str) -> None:
        _at_least(f"{where}.warmup_steps", self.warmup_steps, 0)
        _in_range(f"{where}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        _in_range(f"{where}.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(
                f"{where}: set warmup_steps={self.warmup_steps} or warmup_ratio={self.warmup_ratio}, not both"
            )
        if self.warmup_lr is not None:
            _at_least(f"{where}.warmup_lr", self.warmup_lr, 0.0)
        if self.total_steps is not None:
            _at_least(f"{where}.total_steps", self.total_steps, 1)


@dataclass
class ParamGroupConfig:
    """Overrides for the parameters of one optimizer whose names match ``params`` (globs).

    lr_scale multiplies the optimizer's lr (layer-wise lr decay, a higher lr for a prompt bank);
    weight_decay, when set, replaces the optimizer's. The first matching override wins.
    """

    params: list[str] = field(default_factory=list)
    lr_scale: float = 1.0
    weight_decay: float | None = None

    def validate(self, where: str) -> None:
        if not self.params:
            raise ConfigError(f"{where}.params must list at least one parameter-name glob")
        _at_least(f"{where}.lr_scale", self.lr_scale, 0.0)
        if self.weight_decay is not None:
            _at_least(f"{where}.weight_decay", self.weight_decay, 0.0)


OPTIMIZER_TYPES = ("adamw", "adam", "sgd", "adafactor")


@dataclass
class OptimizerConfig:
    """One optimizer over a selection of the model's trainable parameters.

    name: unique label (metrics, checkpoints, ``optimizers.<name>.lr=...`` overrides).
    type: adamw (decoupled decay), adam (L2 decay added to the gradient), sgd, adafactor.
    params: globs over parameter names (``model.named_parameters()``); "*" takes every trainable
        parameter that no earlier optimizer took. Frozen parameters are never selected.
    decay_1d: apply weight decay to 1-D parameters (biases, norm scales) too; off by default.
    no_decay: extra globs of parameters that get no weight decay.
    groups: per-glob overrides (lr_scale, weight_decay).
    frequency: optimizer steps per turn when ``TrainConfig.optimizer_mode="alternate"``.
    """

    name: str = "main"
    type: Literal["adamw", "adam", "sgd", "adafactor"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    params: list[str] = field(default_factory=lambda: ["*"])
    decay_1d: bool = False
    no_decay: list[str] = field(default_factory=list)
    groups: list[ParamGroupConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    frequency: int = 1

    def validate(self, where: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"{where}.name={self.name!r} must be a non-empty name of letters, digits, _ or -"
            )
        _at_least(f"{where}.lr", self.lr, 0.0)
        _at_least(f"{where}.weight_decay", self.weight_decay, 0.0)
        _at_least(f"{where}.eps", self.eps, 0.0)
        _at_least(f"{where}.momentum", self.momentum, 0.0)
        _at_least(f"{where}.frequency", self.frequency, 1)
        for i, beta in enumerate(self.betas):
            _in_range(f"{where}.betas[{i}]", beta, 0.0, 1.0)
        if not self.params:
            raise ConfigError(f'{where}.params must list at least one glob ("*" selects all the rest)')
        if self.nesterov and (self.type != "sgd" or self.momentum <= 0):
            raise ConfigError(f"{where}.nesterov=true needs type='sgd' and momentum > 0")
        for i, group in enumerate(self.groups):
            group.validate(f"{where}.groups[{i}]")
        self.schedule.validate(f"{where}.schedule")


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and how to resume.

    dir: checkpoint root; None means ``<run_dir>/checkpoints``.
    every: save every this many optimizer steps (0: only at the end, if save_final).
    keep_last: complete checkpoints to keep (older ones are deleted after a save).
    resume: "auto" (newest complete checkpoint under dir, if any: what a torchrun restart needs),
        "never", or the path of one checkpoint directory.
    export_dir: if set, write a consolidated save_pretrained-style export there at the end.
    trainable_only: save only trainable parameters (``requires_grad``) and buffers; frozen
        parameters are recorded by name, shape and sha256, and on resume (or ``load_weights``) the
        model must already hold them, rebuilt from their source; a mismatch is refused.
    frozen_source: where the frozen part is rebuilt from (e.g. a base model id or path); recorded in
        the manifest and named in the error when the rebuilt frozen part does not match.
    reshardable: also save the optimizer state by parameter name (full fp32 masters and moments,
        gathered at each save), so the checkpoint resumes on another world size, topology, ZeRO
        stage or precision; without it such a resume carries the weights and re-initialises the
        optimizers.
    """

    dir: str | None = None
    every: int = 0
    keep_last: int = 3
    resume: str = "auto"
    save_final: bool = True
    export_dir: str | None = None
    trainable_only: bool = False
    frozen_source: str | None = None
    reshardable: bool = True

    def validate(self, where: str) -> None:
        _at_least(f"{where}.every", self.every, 0)
        _at_least(f"{where}.keep_last", self.keep_last, 1)
        if not self.resume:
            raise ConfigError(f"{where}.resume must be 'auto', 'never' or a checkpoint path, got ''")


@dataclass
class LogConfig:
    """Metrics and progress output (rank 0 writes).

    every: log a metrics record every this many optimizer steps.
    profile_every: every this many steps, run one step under torch.profiler and log the time
        spent in each ``smile.*`` section (router, dispatch, All2All, experts); 0 disables.
    peak_tflops: accelerator peak for MFU; None looks the device up in a small table (GPU only).
    """

    every: int = 10
    jsonl: bool = True
    tensorboard: bool = False
    progress_bar: bool = True
    plot: bool = True
    profile_every: int = 0
    peak_tflops: float | None = None

    def validate(self, where: str) -> None:
        _at_least(f"{where}.every", self.every, 1)
        _at_least(f"{where}.profile_every", self.profile_every, 0)
        if self.peak_tflops is not None:
            _at_least(f"{where}.peak_tflops", self.peak_tflops, 0.0)
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ConfigError(
                    f"{where}.tensorboard=true needs the 'tensorboard' package; install it or set it to false"
                ) from err


@dataclass
class DistConfig:
    """Process-group setup.

    backend: "auto" (nccl with CUDA, else gloo), "gloo" or "nccl".
    timeout_s: collective timeout; a dead or stuck peer raises after this long instead of hanging.
    sim_nodes: present the world as this many nodes (simulated multi-node on one machine).
    ep_nodes: nodes spanned by expert parallelism (default: all).
    """

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 300.0
    sim_nodes: int | None = None
    ep_nodes: int | None = None

    def validate(self, where: str) -> None:
        _at_least(f"{where}.timeout_s", self.timeout_s, 1.0)
        for name in ("sim_nodes", "ep_nodes"):
            if getattr(self, name) is not None:
                _at_least(f"{where}.{name}", getattr(self, name), 1)


@dataclass
class EMAConfig:
    """Exponential moving average of the weights (``smile.runtime.ema``), kept in the checkpoint.

    decay: shadow = decay * shadow + (1 - decay) * weights after every optimizer step; 0 disables
        (the default). Diffusion models decode with it (e.g. 0.9999).
    start_step: steps before the EMA starts; until then the shadow copies the weights.
    evaluate: run evaluation (``eval_fn`` / ``generate_fn`` / the loss) with the EMA weights.
    """

    decay: float = 0.0
    start_step: int = 0
    evaluate: bool = True

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0

    def validate(self, where: str) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"{where}.decay={self.decay} must be in [0, 1) (0 disables the EMA)")
        _at_least(f"{where}.start_step", self.start_step, 0)


@dataclass
class TrainConfig:
    """Everything the Trainer needs besides the model, the data and the loss function.

    max_steps: optimizer steps of the run (each one ``grad_accum_steps`` micro-batches per rank).
    micro_batch_size: samples per micro-batch per rank (DeepSpeed's bookkeeping; throughput
        counts the samples the loss function reports when it does).
    zero_stage: 0 (DDP-style), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters).
    precision: "auto" is bf16 on GPU and fp32 on CPU.
    grad_clip: global gradient-norm clip (0 disables).
    optimizer_mode: "joint" steps every optimizer on every step (one backward); "alternate"
        cycles through them, ``frequency`` steps each, with the others' parameters frozen.
    eval_every: evaluate every this many steps (0: only at the end, if eval data is given).
    eval_batches: batches per evaluation per rank (None: the whole eval iterable).
    ema: EMA weights (``EMAConfig``; off by default), saved in checkpoints, used for evaluation.
    deepspeed: extra DeepSpeed config, deep-merged over the generated one (expert use).
    """

    run_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 100
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_clip: float = 1.0
    optimizers: list[OptimizerConfig] = field(default_factory=lambda: [OptimizerConfig()])
    optimizer_mode: Literal["joint", "alternate"] = "joint"
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "train") -> None:
        if not self.run_dir:
            raise ConfigError(f"{where}.run_dir must be a non-empty path")
        _at_least(f"{where}.seed", self.seed, 0)
        _at_least(f"{where}.max_steps", self.max_steps, 1)
        _at_least(f"{where}.micro_batch_size", self.micro_batch_size, 1)
        _at_least(f"{where}.grad_accum_steps", self.grad_accum_steps, 1)
        _at_least(f"{where}.grad_clip", self.grad_clip, 0.0)
        _at_least(f"{where}.eval_every", self.eval_every, 0)
        if self.eval_batches is not None:
            _at_least(f"{where}.eval_batches", self.eval_batches, 1)
        if not self.optimizers:
            raise ConfigError(f"{where}.optimizers must hold at least one optimizer")
        names = [opt.name for opt in self.optimizers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{where}.optimizers: names must be unique, repeated: {duplicates}")
        for i, opt in enumerate(self.optimizers):
            opt.validate(f"{where}.optimizers[{i}]")
        if self.optimizer_mode == "alternate" and len(self.optimizers) < 2:
            raise ConfigError(f"{where}.optimizer_mode='alternate' needs at least two optimizers")
        if self.optimizer_mode == "alternate" and self.zero_stage == 3:
            raise ConfigError(f"{where}.optimizer_mode='alternate' supports zero_stage 0, 1 or 2, not 3")
        self.checkpoint.validate(f"{where}.checkpoint")
        self.log.validate(f"{where}.log")
        self.dist.validate(f"{where}.dist")
        self.ema.validate(f"{where}.ema")
        if self.ema.enabled and self.zero_stage == 3:
            raise ConfigError(
                f"{where}.ema needs zero_stage 0, 1 or 2 (ZeRO-3 partitions the weights), got 3"
            )

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Generic loading: mapping -> typed dataclass, with coercion of CLI strings and clear errors.
# ---------------------------------------------------------------------------------------------
def load_config(
    cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Any:
    """Build ``cls`` from a YAML/TOML/JSON file (or defaults) plus ``key.path=value`` overrides.

    The result is validated (every nested ``validate(where)`` runs) before it is returned.
    """
    data = _defaults(cls)
    if path is not None:
        data = merge_mappings(data, read_mapping(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def _defaults(cls: type) -> dict[str, Any]:
    """The default values of ``cls`` as a mapping (empty if it has required fields)."""
    try:
        return config_to_dict(cls())
    except TypeError:
        return {}


def merge_mappings(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; any other value (lists included) in ``top`` replaces ``base``'s.

    Neither input is modified: the result holds copies of ``top``'s values.
    """
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_mappings(out[key], value) if both else copy.deepcopy(value)
    return out


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Parse a config file into a dict, by extension (.yaml/.yml, .toml, .json).

    A file that does not parse raises :class:`ConfigError` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(
            f"config file {str(path)!r}: unknown extension {suffix!r}; allowed: .yaml, .yml, .toml, .json"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"config file {str(path)!r} line {line}: not UTF-8 text ({err.reason})") from None
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"config file {str(path)!r}{line}: invalid YAML: {one_line(problem)}") from None
        data = {} if data is None else data
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError as err:  # Python 3.10
            raise ConfigError("TOML configs need Python >= 3.11 (tomllib); use YAML instead") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            found = re.search(r"\(at line (\d+)", str(err))  # Python < 3.14 has no err.lineno
            line = getattr(err, "lineno", None) or (found and found.group(1))
            problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(err))
            where = f" line {line}" if line else ""
            raise ConfigError(
                f"config file {str(path)!r}{where}: invalid TOML: {one_line(problem)}"
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"config file {str(path)!r} line {err.lineno}: invalid JSON: {err.msg}"
            ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at top level, got {type(data).__name__}"
        )
    return data


def one_line(text: Any) -> str:
    """An error message on one line (YAML, TOML and OS errors span several), for CLI reports."""
    return " ".join(str(text).split())


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested mapping (values parsed as YAML scalars/lists).

    A path segment that is an integer indexes a list; for a list of named sections (such as
    ``optimizers``) a segment may also be the section's ``name``.
    """
    data = json.loads(json.dumps(data, default=_jsonable))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"override {item!r}: the value does not parse ({one_line(problem)})") from None
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            node = _descend(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _descend(node: Any, part: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override path {where!r} goes through a non-mapping value {node!r}")
    if part not in node:
        if not create:
            raise ConfigError(f"override path {where!r} does not exist")
        node[part] = {}
    return node[part]


def _list_index(items: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigError(f"override {where!r}: index {index} outside a list of {len(items)}")
        return index
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ConfigError(f"override {where!r}: no list entry named {part!r}; names: {names}")


def from_dict(cls: type, data: Any, where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types; every section validates."""
    return _build(cls, data, where or ("train" if cls is TrainConfig else cls.__name__))


def _build(cls: type, data: Any, where: str) -> Any:
    if isinstance(data, cls):
        obj = data
    elif "from_dict" in cls.__dict__:  # a section with its own loader (e.g. smile.data's DataConfig)
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping of {cls.__name__} fields, got {data!r}")
        _check_finite_values(data, where)  # before the section's own checks, which may miss NaN
        try:
            obj = cls.from_dict(data)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from err
    else:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping of {cls.__name__} fields, got {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{where} has no field(s) {unknown}; fields are: {', '.join(fields)}")
        hints = typing.get_type_hints(cls)
        obj = cls(**{name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()})
    validate = getattr(obj, "validate", None)
    if callable(validate):
        if inspect.signature(validate).parameters:
            validate(where)
        else:
            validate()
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert CLI/YAML strings where unambiguous."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except _NotFinite:
                raise
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
            if isinstance(value, str) and not isinstance(allowed, str) and value == str(allowed):
                return allowed
        raise ConfigError(f"{where}={value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must have {len(args)} entries, got {value!r}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where} must be a number, got {value!r}")
        _check_finite_number(where, number)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be a {tp.__name__}, got {value!r}")
    return value


def config_to_dict(obj: Any) -> Any:
    """A JSON/YAML-ready dict of a (nested) dataclass config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return config_to_dict(obj)
    raise TypeError(f"not serialisable in a config: {obj!r}")


class _NotFinite(ConfigError):
    """A float option holding NaN or an infinity (never a usable setting)."""


def _check_finite_number(where: str, number: float) -> None:
    if not math.isfinite(number):
        raise _NotFinite(
            f"{where}={number!r} is not allowed; a finite number is required (no nan, inf, -inf)"
        )


def _check_finite_values(value: Any, where: str) -> None:
    """Every float inside a raw section mapping (lists and nested mappings too) must be finite."""
    if isinstance(value, float):
        _check_finite_number(where, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite_values(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite_values(item, f"{where}[{i}]")


def _at_least(where: str, value: float, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"{where} must be >= {minimum}, got {value!r}")


def _in_range(where: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{where} must be in [{low}, {high}], got {value!r}")
