"""Documents from local files: .txt, .jsonl and .parquet, named by file, directory or glob.

Order is deterministic: ``paths`` in the order given, each directory walked recursively and
each glob expanded in sorted order, a file listed twice read once. A .txt file is one document
(``txt_doc="file"``) or one per blank-line-separated paragraph (``"paragraph"``); a .jsonl line
and a .parquet row give one document from ``text_field``. Blank documents are dropped.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def expand_paths(paths: list[str]) -> list[Path]:
    """Resolve files, directories and globs to the ordered list of data files they name."""
    files: list[Path] = []
    for spec in paths:
        if glob.has_magic(spec):
            matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"DataConfig.paths: glob {spec!r} matches no file")
            files.extend(m for m in matches if _check_suffix(m, strict=False))
        elif Path(spec).is_dir():
            inside = sorted(p for p in Path(spec).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not inside:
                raise FileNotFoundError(
                    f"DataConfig.paths: directory {spec!r} holds no {'/'.join(SUFFIXES)} file"
                )
            files.extend(inside)
        elif Path(spec).is_file():
            _check_suffix(Path(spec), strict=True)
            files.append(Path(spec))
        else:
            raise FileNotFoundError(f"DataConfig.paths: {spec!r} is not a file, directory or matching glob")
    unique = list(dict.fromkeys(files))
    if not unique:
        raise FileNotFoundError(f"DataConfig.paths {paths!r} name no {'/'.join(SUFFIXES)} file")
    return unique


def _check_suffix(path: Path, strict: bool) -> bool:
    if path.suffix in SUFFIXES:
        return True
    if strict:
        raise ValueError(
            f"DataConfig.paths: {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(SUFFIXES)}"
        )
    return False


def iter_file_documents(files: list[Path], text_field: str, txt_doc: str) -> Iterator[str]:
    """Documents of ``files`` in order, blank ones dropped."""
    for path in files:
        for doc in _READERS[path.suffix](path, text_field, txt_doc):
            if doc.strip():
                yield doc


def _decode(path: Path, data: bytes, first_line: int = 1) -> str:
    """``data`` as UTF-8; an invalid byte raises naming the file and line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data[: err.start].count(b"\n")
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {data[err.start]:#04x}: {err.reason}); "
            "DataConfig.paths files must be UTF-8"
        ) from None


def _read_txt(path: Path, text_field: str, txt_doc: str) -> Iterator[str]:
    text = _decode(path, path.read_bytes())
    if txt_doc == "file":
        yield text.strip()
    else:
        yield from (para.strip() for para in _PARAGRAPH_BREAK.split(text))


def _read_jsonl(path: Path, text_field: str, txt_doc: str) -> Iterator[str]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(path, raw, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not a JSON record ({err.msg} at column {err.colno})"
                ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{path}:{number}: no string field DataConfig.text_field={text_field!r} "
                    f"(record has {keys})"
                )
            yield text


def _read_parquet(path: Path, text_field: str, txt_doc: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({' '.join(str(err).split())})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column DataConfig.text_field={text_field!r}; columns are {columns}")
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise ValueError(
                        f"{path}: row {row}: column DataConfig.text_field={text_field!r} holds "
                        f"{type(text).__name__}, not text"
                    )
                yield text
    except (pa.ArrowException, OSError) as err:
        raise ValueError(
            f"{path}: row {row + 1}: unreadable parquet data ({' '.join(str(err).split())})"
        ) from None


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
