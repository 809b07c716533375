"""Checkpoint directories: atomic writes, a checksummed manifest, verified loads, keep-last-K.

Layout under the checkpoint root::

    step_00000100/           a complete checkpoint (renamed into place after its manifest)
        manifest.json        files with sha256 and size, step, world/topology, format version
        model.safetensors    non-expert parameters and buffers (rank 0)
        experts-ep0.safetensors ...   expert parameters of each expert-parallel rank
        rank0.safetensors / rank0.json ...   per-rank optimizer, RNG, data and loop state
    step_00000200.tmp/       being written (or cut off by a crash): never listed, never loaded

Every file is written to ``<name>.partial``, fsynced and renamed; the directory is renamed from
``.tmp`` only after rank 0 wrote the manifest, so a crash at any point leaves either the
previous complete checkpoint or a new complete one. Loading checks a file's sha256 against the
manifest before parsing it, and parses only safetensors and JSON (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

FORMAT = "smile-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, tampered with, or does not fit this run."""


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{step_dir_name(step)}.tmp"


def write_file(directory: Path, name: str, data: bytes) -> FileRecord:
    """Write ``data`` atomically (temp + fsync + rename) and return its checksum record."""
    path = directory / name
    partial = directory / f"{name}.partial"
    with open(partial, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)
    return FileRecord(hashlib.sha256(data).hexdigest(), len(data))


def write_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> FileRecord:
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return write_file(directory, name, save_safetensors(cpu))


def write_json(directory: Path, name: str, obj: Any) -> FileRecord:
    return write_file(directory, name, json.dumps(obj, indent=1, allow_nan=False).encode())


def commit(root: Path, step: int, files: dict[str, FileRecord], meta: dict[str, Any]) -> Path:
    """Rank 0, after every rank wrote its files: write the manifest and move the dir into place."""
    stage = staging_dir(root, step)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        **meta,
        "files": {name: {"sha256": r.sha256, "size": r.size} for name, r in sorted(files.items())},
    }
    write_json(stage, MANIFEST, manifest)
    final = root / step_dir_name(step)
    if final.exists():
        trash = root / f"{step_dir_name(step)}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(stage, final)
    _fsync_dir(root)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed-into-place checkpoint dirs with a manifest, oldest first (staging dirs skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale staging dirs."""
    found = complete_checkpoints(root)
    doomed = found[:-keep_last] if keep_last > 0 else found
    newest = found[-1].name if found else None
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and path.name.endswith((".tmp", ".old")) and newest and path.name < newest:
            doomed.append(path)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{manifest_path}: format {manifest.get('format')!r} v{manifest.get('version')} is not "
            f"{FORMAT!r} v{VERSION}"
        )
    return manifest


def read_verified(path: Path, manifest: dict[str, Any], name: str) -> bytes:
    """The bytes of one checkpoint file, after checking size and sha256 against the manifest."""
    record = manifest["files"].get(name)
    if record is None:
        raise CheckpointError(f"checkpoint {path} has no file {name!r} in its manifest")
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is missing shard {name!r} listed in its manifest")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != record["size"] or digest != record["sha256"]:
        raise CheckpointError(
            f"checkpoint file {file} fails verification (sha256 {digest[:16]}..., {len(data)} bytes; "
            f"manifest says {record['sha256'][:16]}..., {record['size']} bytes): it was modified or truncated"
        )
    return data


def read_tensors(path: Path, manifest: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(read_verified(path, manifest, name))


def read_json(path: Path, manifest: dict[str, Any], name: str) -> Any:
    return json.loads(read_verified(path, manifest, name))


def verify_all(path: Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; return the manifest."""
    manifest = read_manifest(path)
    for name in manifest["files"]:
        read_verified(path, manifest, name)
    return manifest
