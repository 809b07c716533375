"""Non-finite numbers (nan, inf, -inf) are refused in every float option of every config class.

The check lives in the generic loader (``smile.runtime.config``), so each class below is walked
field by field: every float field (alone, optional, in a union, a tuple or a list; nested
sections too) is set to each non-finite value through an override and through a YAML, JSON and
TOML file, and the error must name that field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

from smile.data import DataConfig
from smile.moe import MoEConfig
from smile.pretrain.config import JobConfig as PretrainJob
from smile.pretrain.config import ModelConfig
from smile.runtime import ConfigError, TrainConfig, config_to_dict, load_config
from smile.runtime.config import _defaults, merge_mappings, read_mapping

NON_FINITE = [".nan", ".inf", "-.inf", "nan", "inf", "-inf"]


def _zoo_classes() -> list[type]:
    from models.lemda.config import JobConfig as LemdaJob
    from models.peft_design_spaces.config import DesignSpaceConfig
    from models.trap_replace.config import TrapReplaceConfig

    return [LemdaJob, DesignSpaceConfig, TrapReplaceConfig]


CLASSES = [TrainConfig, PretrainJob, ModelConfig, MoEConfig, DataConfig, *_zoo_classes()]
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
# A class whose defaults alone do not validate is checked over one of its shipped configs.
BASES = {CLASSES[5]: ROOT / "models/lemda/configs/wine_tiny.yaml"}


def _base_mapping(cls: type) -> dict:
    data = config_to_dict(cls()) if _defaults(cls) else {}
    return merge_mappings(data, read_mapping(BASES[cls])) if cls in BASES else data


def _has_float(tp: typing.Any) -> bool:
    if tp is float:
        return True
    return any(_has_float(a) for a in typing.get_args(tp) if a is not Ellipsis)


def float_paths(cls: type, defaults: typing.Any, prefix: str = "") -> list[tuple[str, str]]:
    """(override path, how to write a value) for every float field reachable from ``defaults``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, value, path = hints[f.name], defaults.get(f.name), f"{prefix}{f.name}"
        origin = typing.get_origin(tp)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if origin in (typing.Union, types.UnionType) and len(inner) == 1:
            tp, origin = inner[0], typing.get_origin(inner[0])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out += float_paths(tp, value, f"{path}.")
        elif origin is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            if value:  # a list of sections: the first entry's fields, by index
                out += float_paths(typing.get_args(tp)[0], value[0], f"{path}.0.")
        elif origin in (list, tuple) and _has_float(tp):
            size = len(typing.get_args(tp)) if origin is tuple else 1
            out.append((path, "[" + ",".join(["0.5"] * (size - 1) + ["{}"]) + "]"))
        elif _has_float(tp):
            out.append((path, "{}"))
    return out


CASES = [
    pytest.param(cls, path, form, id=f"{cls.__module__.split('.')[-2]}.{cls.__name__}.{path}")
    for cls in CLASSES
    for path, form in float_paths(cls, _base_mapping(cls))
]


def test_every_class_has_float_fields_to_check():
    for cls in CLASSES:
        load_config(cls, BASES.get(cls))  # the base itself is valid
    found = {case.values[0] for case in CASES}
    assert found == set(CLASSES), set(CLASSES) - found
    assert len(CASES) > 60


@pytest.mark.parametrize("cls, path, form", CASES)
def test_non_finite_override_is_refused_naming_the_field(cls, path, form):
    for raw in NON_FINITE:
        with pytest.raises(ConfigError) as info:
            load_config(cls, BASES.get(cls), [f"{path}={form.format(raw)}"])
        message = str(info.value)
        assert "\n" not in message
        field = path.split(".")[-1]
        assert field in message, (raw, message)
        if raw.startswith((".", "-.")):  # a YAML float (a bare "nan" may also be refused as a non-number)
            assert "finite" in message, (raw, message)


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "max_steps: 5\ngrad_clip: .nan\n"),
        (".yaml", "optimizers:\n  - name: main\n    lr: -.inf\n"),
        (".json", '{"max_steps": 5, "grad_clip": NaN}'),
        (".json", '{"dist": {"timeout_s": Infinity}}'),
        (".toml", "max_steps = 5\ngrad_clip = nan\n"),
        (".toml", "[dist]\ntimeout_s = inf\n"),
    ],
)
def test_non_finite_in_config_files_is_refused(tmp_path, suffix, text):
    path = tmp_path / f"train{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"(grad_clip|lr|timeout_s)=.*finite number is required"):
        load_config(TrainConfig, path)


def test_data_section_non_finite_is_refused_even_where_its_own_check_misses_it():
    # DataConfig validates itself (from_dict); mean_span_length=inf passed its ">= 1" check.
    with pytest.raises(ConfigError, match=r"data.mean_span_length=inf"):
        load_config(PretrainJob, None, ["data.mean_span_length=.inf"])


def test_finite_values_still_load():
    cfg = load_config(TrainConfig, None, ["grad_clip=0.5", "optimizers.main.lr=3e-4", "dist.timeout_s=1e3"])
    assert (cfg.grad_clip, cfg.optimizers[0].lr, cfg.dist.timeout_s) == (0.5, 3e-4, 1000.0)
    assert json.loads(json.dumps(config_to_dict(cfg)))["grad_clip"] == 0.5
