"""Read rows from files or the hub and check them, before any model loads (examples.py turns them into token
ids + labels).

Two steps, so bad data costs seconds, not a model load: `read_data` reads and validates every row
once, before the model loads, and keeps the clean rows; `tokenize_data` turns those same rows into
token ids once the tokenizer is there. Local files are read by us, not by `datasets`, so text stays
exactly as written (pyarrow would turn a column of dates into datetimes) and every error can name
the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from gemmatune.config import DataConfig
from gemmatune.data.templates import default_template
from gemmatune.errors import GemmatuneError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")


@dataclass
class Row:
    where: str  # "file.jsonl line 12": what an error message names
    data: dict
    folder: Path | None = None  # the data file's folder: image/audio paths in the row are relative to it


def is_local(spec: str) -> bool:
    return Path(spec).suffix.lower() in LOCAL_SUFFIXES or Path(spec).exists()


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """All rows of a local file, or of a hub data set split (e.g. `train[:1000]`)."""
    return read_rows_and_fingerprint(spec, split)[0]


def read_rows_and_fingerprint(spec: str, split: str) -> tuple[list[Row], str]:
    """The rows and a fingerprint for the run record: the sha256 of the bytes read, or `hub:NAME`."""
    if not is_local(spec):
        rows, fingerprint = _read_hub(spec, split), "hub:" + spec
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            raise GemmatuneError(f"{path} is a folder; give a .jsonl/.json/.csv/.parquet file")
        if not path.is_file():
            raise GemmatuneError(f"data file {path} not found")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise GemmatuneError(f"{path}: unknown data format '{suffix}'; use .json, .jsonl, .csv or .parquet")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise GemmatuneError(f"{path} cannot be read ({exc.strerror}); check its permissions") from None
        reader = {".json": _read_json, ".jsonl": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}[suffix]
        rows, fingerprint = reader(path, raw), hashlib.sha256(raw).hexdigest()
        for row in rows:
            row.folder = path.parent
    if not rows:
        raise GemmatuneError(f"{spec}: no rows; the data set is empty")
    return rows, fingerprint


def _text(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise GemmatuneError(f"{path} line {line}: not UTF-8 text; re-save the file as UTF-8") from None


def _read_json(path: Path, raw: bytes) -> list[Row]:
    """A JSON list of rows, or JSON Lines (in a .json file too, as `datasets` reads them)."""
    text = _text(path, raw)
    is_list = text.lstrip().startswith("[")
    if not is_list and (path.suffix.lower() == ".jsonl" or not text.strip()):
        return _read_json_lines(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and not is_list:  # a second document follows the first: JSON Lines
            return _read_json_lines(path, text)
        raise GemmatuneError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(data, list):
        # One row alone in a .json file is much more often a wrapper ({"data": [...]}) or a mistake.
        kind = "object" if isinstance(data, dict) else type(data).__name__
        raise GemmatuneError(f"{path}: one JSON {kind}, not a list of rows; write the rows as a JSON list "
                             "[{...}, {...}] or one object per line (.jsonl)")
    return [Row(f"{path.name} row {i + 1}", r) for i, r in enumerate(data)]


def _read_json_lines(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(Row(f"{path.name} line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise GemmatuneError(f"{path} line {n}: malformed JSON ({exc.msg}); one JSON object per line") from None
    return rows


def _read_csv(path: Path, raw: bytes) -> list[Row]:
    reader = csv.DictReader(_text(path, raw).splitlines())
    try:
        return [Row(f"{path.name} line {reader.line_num}", dict(r)) for r in reader]
    except csv.Error as exc:
        raise GemmatuneError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, raw: bytes) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise GemmatuneError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return [Row(f"{path.name} row {i + 1}", r) for i, r in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, bad split: all end the same way for the user
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise GemmatuneError(
            f"data set {name} (split {split}) could not be loaded ({first}); without internet, give a local file"
        ) from None
    return [Row(f"{name}[{split}] row {i + 1}", r) for i, r in enumerate(ds)]


def detect_format(rows: list[Row], requested: str) -> str:
    if requested != "auto":
        return requested
    keys = rows[0].data.keys() if isinstance(rows[0].data, dict) else ()
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise GemmatuneError(
        f"{rows[0].where}: cannot tell the format from its fields {sorted(keys)}; expected instruction/input/output "
        "(alpaca), messages (chat) or text; or set data.format"
    )


def need_str(row: Row, key: str, value, allow_empty: bool = False) -> str:
    """`value` when it is text (non-empty unless `allow_empty`), else the one-line error naming the row and key."""
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise GemmatuneError(f"{row.where}: field '{key}' is {kind}")
    if not allow_empty and not value.strip():
        raise GemmatuneError(f"{row.where}: field '{key}' is empty")
    return value


def normalize(row: Row, fmt: str) -> dict:
    """A clean row of the given format, or a one-line error naming the row and field."""
    d = row.data
    if not isinstance(d, dict):
        raise GemmatuneError(f"{row.where}: expected a JSON object, got {type(d).__name__}")
    if fmt == "alpaca":
        inp = d.get("input")
        return {
            "instruction": need_str(row, "instruction", d.get("instruction")),
            "input": "" if inp is None else need_str(row, "input", inp, allow_empty=True),
            "output": need_str(row, "output", d.get("output")),
        }
    if fmt == "text":
        return {"text": need_str(row, "text", d.get("text"))}
    clean = clean_messages(row, d.get("messages"))
    if not any(m["role"] == "assistant" for m in clean):
        raise GemmatuneError(f"{row.where}: no assistant message, so nothing to learn")
    return {"messages": clean}


def clean_messages(row: Row, messages) -> list[dict]:
    """The `messages` of a chat row as {role, content} dicts; every chat row, trained on or prompted, passes here.

    `content` is text, or a list of parts (media.py) whose image/audio files are checked here and whose paths
    become absolute."""
    if not isinstance(messages, list) or not messages:
        raise GemmatuneError(f"{row.where}: field 'messages' must be a non-empty list of {{role, content}}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise GemmatuneError(f"{row.where}: messages[{i}] needs a role of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            content = _clean_parts(row, f"messages[{i}].content", content, media_allowed=m["role"] != "assistant")
        else:
            content = need_str(row, f"messages[{i}].content", content)
        message = {"role": m["role"], "content": content}
        thinking = m.get("reasoning", m.get("reasoning_content"))
        if thinking is not None and m["role"] == "assistant":
            # The reply's thinking, rendered by chat templates that know it (Gemma 4's thinking channel).
            message["reasoning"] = need_str(row, f"messages[{i}].reasoning", thinking)
        clean.append(message)
    return clean


def _clean_parts(row: Row, key: str, parts: list, media_allowed: bool) -> list[dict]:
    """A content list of text, image and audio parts, each checked; image/audio files must exist and be readable
    as their kind. Replies are text only: the model writes no image or audio."""
    from gemmatune.data.media import KINDS, check_media_file

    if not parts:
        raise GemmatuneError(f"{row.where}: field '{key}' is an empty list of parts")
    clean = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            clean.append({"type": "text", "text": need_str(row, f"{key}[{j}].text", part.get("text"))})
            continue
        if kind not in KINDS:
            raise GemmatuneError(f"{row.where}: {key}[{j}] needs a type of text, {', '.join(KINDS)}")
        if not media_allowed:
            raise GemmatuneError(f"{row.where}: {key}[{j}] is an {kind} part in an assistant turn; replies are text")
        path = Path(need_str(row, f"{key}[{j}].path", part.get("path"))).expanduser()
        if not path.is_absolute():
            path = (row.folder or Path.cwd()) / path
        check_media_file(kind, path, f"{row.where} {key}[{j}]")
        clean.append({"type": kind, "path": str(path)})
    return clean


def has_media(rows: list[Row]) -> str | None:
    """Where the first image or audio part is (file and line), or None for text-only rows."""
    for row in rows:
        for m in row.data.get("messages", ()) if isinstance(row.data, dict) else ():
            if isinstance(m.get("content"), list) and any(p["type"] != "text" for p in m["content"]):
                return row.where
    return None


def media_prompt_row(prompt: str, images: list[str], audios: list[str]) -> dict:
    """A chat row asking `prompt` about image and audio files (given on the command line), each file checked."""
    content = [{"type": "image", "path": p} for p in images] + [{"type": "audio", "path": p} for p in audios]
    content.append({"type": "text", "text": prompt})
    row = Row("--image/--audio", {}, Path.cwd())
    return {"messages": clean_messages(row, [{"role": "user", "content": content}])}


def read_prompt_rows(spec: str) -> list[dict]:
    """Rows to answer, each kept whole (extra fields such as `adapter` or an id stay): `instruction` (+ `input`),
    `messages` (checked like training rows; a final assistant turn is left out of the prompt), or `prompt`."""
    out = []
    for row in read_rows(spec):
        data = row.data if isinstance(row.data, dict) else {}
        messages = data.get("messages")
        if isinstance(messages, list) and messages:
            out.append({**data, "messages": clean_messages(row, messages)})
        elif isinstance(data.get("instruction"), str):
            out.append({**data, "input": data.get("input") or ""})
        elif isinstance(data.get("prompt"), str):
            out.append({**data, "instruction": data["prompt"], "input": ""})
        else:
            raise GemmatuneError(f"{row.where}: a prompt row needs 'instruction' (and 'input'), 'messages' or 'prompt'")
    return out


def read_eval_rows(spec: str | Path, limit: int | None = None) -> list[dict]:
    """Rows with a prompt and a reference answer: Alpaca rows, or chat rows ending in an assistant message."""
    rows = read_rows(str(spec))
    fmt = detect_format(rows, "auto")
    if fmt == "text":
        raise GemmatuneError(f"{spec}: text rows have no reference answer; eval needs alpaca or chat rows")
    clean = []
    for row in rows[:limit] if limit else rows:
        item = normalize(row, fmt)
        if fmt == "messages" and item["messages"][-1]["role"] != "assistant":
            raise GemmatuneError(f"{row.where}: the last message must be the assistant's reference answer")
        clean.append(item)
    return clean


@dataclass
class CheckedRows:
    """The training and validation rows, read and validated once (before the model loads), normalized."""

    fmt: str
    template: str
    train: list[Row]
    eval: list[Row]  # empty without a validation set
    files: dict[str, str]  # file -> sha256 of the bytes read (or hub:NAME), for the run record
    media_at: str | None = None  # where the first row with image/audio parts is, if any


def require_multimodal(rows: CheckedRows, multimodal: bool) -> None:
    """Rows with image/audio parts need the full multimodal model: one line naming the first such row."""
    if rows.media_at and not multimodal:
        raise GemmatuneError(f"{rows.media_at}: has image/audio parts, which need the full multimodal model: set "
                             "model.multimodal: true (and pip install 'gemmatune[multimodal]')")


def read_data(cfg: DataConfig, seed: int) -> CheckedRows:
    """Read every training and validation row once, validate and normalize it, and split off validation rows;
    no tokenizer needed, so this runs before the model loads. Raises GemmatuneError naming the file and line."""
    if not cfg.train_file:
        raise GemmatuneError("config key data.train_file: no training data given (a .jsonl/.json/.csv/.parquet file)")
    rows, fingerprint = read_rows_and_fingerprint(cfg.train_file, cfg.split)
    files = {cfg.train_file: fingerprint}
    fmt = detect_format(rows, cfg.format)
    template = default_template(fmt) if cfg.template == "auto" else cfg.template
    rows = _normalized(rows, fmt)  # every row, also those max_rows leaves out: a bad file is refused whole
    rng = random.Random(seed)
    eval_rows: list[Row] = []
    if cfg.eval_file or cfg.eval_split:
        eval_spec = cfg.eval_file or cfg.train_file
        eval_rows, files[eval_spec] = read_rows_and_fingerprint(eval_spec, cfg.eval_split or "train")
        eval_rows = _normalized(eval_rows, fmt)
    else:
        rows, eval_rows = carve_eval_rows(rows, cfg, rng)
    rows = sample_max_rows(rows, cfg, rng)
    return CheckedRows(fmt, template, rows, eval_rows, files, has_media(rows + eval_rows))


def _normalized(rows: list[Row], fmt: str) -> list[Row]:
    return [Row(r.where, normalize(r, fmt)) for r in rows]


def carve_eval_rows(rows: list, cfg: DataConfig, rng: random.Random) -> tuple[list, list]:
    """(training rows, validation rows): `data.eval_ratio` of the rows held out, chosen by `rng`, both kept in file
    order; no validation rows at ratio 0. Supervised rows and preference pairs are split the same way."""
    if cfg.eval_ratio <= 0:
        return rows, []
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = max(1, round(len(rows) * cfg.eval_ratio))
    if n_eval >= len(rows):
        raise GemmatuneError(f"config key data.eval_ratio: {cfg.eval_ratio} leaves no training rows")
    return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]


def sample_max_rows(rows: list, cfg: DataConfig, rng: random.Random) -> list:
    """`data.max_rows` of the training rows, sampled by `rng` and kept in file order (all of them without a cap)."""
    if cfg.max_rows is not None and cfg.max_rows < len(rows):
        return [rows[i] for i in sorted(rng.sample(range(len(rows)), cfg.max_rows))]
    return rows
