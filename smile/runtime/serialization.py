"""Safe serialization of nested state (optimizer, RNG, data position) without pickle.

A state tree of dicts, lists, tuples, scalars, strings, numpy arrays and tensors is split into
a JSON tree and a flat ``{key: tensor}`` map for safetensors. Decoding only rebuilds those
types, so loading a checkpoint can never execute code carried in the file.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import numpy as np
import torch

_TENSOR, _TUPLE, _ITEMS, _ARRAY, _FLOAT = "__tensor__", "__tuple__", "__items__", "__ndarray__", "__float__"


def encode(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Return ``(json_tree, tensors)``; tensors are detached CPU copies keyed by their path."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(tree, prefix or "t", tensors), tensors


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        key = f"{path}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, enum.Enum):
        return _encode(obj.value, path, tensors)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors)
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {
            _ITEMS: [
                [_encode(k, f"{path}.k", tensors), _encode(v, f"{path}.{k}", tensors)] for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"cannot serialize {type(obj).__module__}.{type(obj).__name__} at {path!r} in a checkpoint"
    )


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if _TENSOR in tree:
        key = tree[_TENSOR]
        if key not in tensors:
            raise KeyError(f"checkpoint tensor {key!r} is missing from its safetensors file")
        return tensors[key]
    if _TUPLE in tree:
        return tuple(decode(v, tensors) for v in tree[_TUPLE])
    if _ITEMS in tree:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in tree[_ITEMS]}
    if _ARRAY in tree:
        return np.asarray(tree[_ARRAY], dtype=np.dtype(tree["dtype"]))
    if _FLOAT in tree:
        return float(tree[_FLOAT])
    return {k: decode(v, tensors) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def dumps(tree: Any) -> str:
    return json.dumps(tree, allow_nan=False)
