"""Checkpoint directories: atomic writes, a checksummed manifest, verified loads, keep-last-K.

Layout under the checkpoint root::

    step_00000100/           a complete checkpoint (renamed into place after its manifest)
        manifest.json        files with sha256 and size, step, run id, world/topology, format version
        model.safetensors    non-expert parameters and buffers (rank 0)
        experts-ep0.safetensors ...   expert parameters of each expert-parallel rank
        rank0.safetensors / rank0.json ...   per-rank optimizer, RNG, data and loop state
    step_00000200.tmp/       being written (or cut off by a crash): never listed, never loaded

Every file is written to ``<name>.partial``, fsynced and renamed; the directory is renamed from
``.tmp`` only after rank 0 wrote the manifest, so a crash at any point leaves either the
previous complete checkpoint or a new complete one. Loading checks a file's sha256 against the
manifest before parsing it, and parses only safetensors and JSON (no pickle).

Resume picks :func:`latest_verified`: the newest step directory whose manifest is present and
whose every file matches its size and sha256 (:func:`verify_all`); broken ones (no manifest, a
truncated or modified file, a missing shard) are skipped and reported, so a corrupt newest
checkpoint costs one fallback, not every restart of the job.

Each manifest records the ``run_id`` of the run that wrote it. :func:`commit` refuses to replace
an existing ``step_N`` written by another run (or one without a readable manifest); the same run
re-saving its own step is fine. The run directory's lock (:mod:`smile.runtime.lock`) keeps two
jobs out of one run directory; its holder removes a crash's leftovers (``step_*.tmp``
directories, ``*.partial`` files) at start-up with :func:`clean_leftovers`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

log = logging.getLogger(__name__)

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
    final = root / step_dir_name(step)
    conflict = owner_conflict(root, step, meta.get("run_id"))
    if conflict:
        raise CheckpointError(conflict)
    write_json(stage, MANIFEST, manifest)
    if final.exists():
        trash = root / f"{step_dir_name(step)}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(stage, final)
    _fsync_dir(root)
    return final


def owner_conflict(root: Path, step: int, run_id: str | None) -> str | None:
    """Why run ``run_id`` may not replace ``step_N`` under ``root`` (None: absent, or its own)."""
    final = Path(root) / step_dir_name(step)
    if not final.exists():
        return None
    try:
        owner = read_manifest(final).get("run_id")
    except CheckpointError as err:
        return (
            f"refusing to replace {final}: it has no readable manifest ({err}), so it cannot be "
            f"shown to belong to this run ({run_id}); move it away to continue"
        )
    if owner != run_id:
        return (
            f"refusing to replace {final}: it was written by run {owner!r}, this run is {run_id!r} "
            "(two runs share this checkpoint dir?); use another checkpoint dir, or move it away"
        )
    return None


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
    """Newest complete checkpoint by name (not verified; resume uses :func:`latest_verified`)."""
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory, with or without a manifest, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_verified(root: Path) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
    """The newest step directory that passes :func:`verify_all`, its manifest, and the newer
    ones skipped with the reason each failed (newest first)."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(step_dirs(root)):
        try:
            return path, verify_all(path), skipped
        except (CheckpointError, OSError, KeyError, TypeError, ValueError, AttributeError) as err:
            reason = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
            skipped.append((path, reason))
    return None, None, skipped


def clean_leftovers(root: Path, *extra_dirs: Path) -> list[Path]:
    """Remove what a crash left behind: ``step_*.tmp`` directories under ``root`` and
    ``*.partial`` files in ``root``, its step directories and ``extra_dirs``. Only the holder of
    the run-dir lock may call this (nothing else is writing there)."""
    root = Path(root)
    removed: list[Path] = []
    dirs = [root, *step_dirs(root), *(Path(d) for d in extra_dirs)]
    for path in root.iterdir() if root.is_dir() else []:
        if path.is_dir() and path.name.startswith("step_") and path.name.endswith(".tmp"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for directory in dirs:
        for path in directory.glob("*.partial") if directory.is_dir() else []:
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.warning(
            "removed %d leftover(s) of an interrupted run: %s", len(removed), ", ".join(map(str, removed))
        )
    return removed


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
    """Check every file of a checkpoint against its manifest (size and sha256, streamed);
    return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, record in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing shard {name!r} listed in its manifest")
        digest, size = hashlib.sha256(), 0
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
                size += len(chunk)
        if size != record["size"] or digest.hexdigest() != record["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} fails verification (sha256 {digest.hexdigest()[:16]}..., "
                f"{size} bytes; manifest says {record['sha256'][:16]}..., {record['size']} bytes): "
                "it was modified or truncated"
            )
    return manifest


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (how a rebuilt frozen tensor is matched)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{list(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
