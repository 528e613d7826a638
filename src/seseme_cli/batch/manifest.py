"""`seseme batch`: requests from a JSONL file, their outputs, and the manifest.

One request per line (`text` required; `id`, `speaker`, `context`, `temperature`, `topk`, `max_audio_ms`,
`seed`, `out` optional). A bad line fails that request only, with its line number. Outputs are named
`<id>.<format>` (the line number without an id) in the output directory, or `out` relative to it; an `out`
that escapes the directory, or two requests with the same output, are rejected. An output that already exists
is skipped, so a rerun (also after kill -9) completes the rest: outputs are written atomically and the
manifest is append-only, one flushed line per request. The last record for an output is its current status.

Each line's speech settings become a `SpeechRequest` here (its checks and defaults; context audio is encoded
when the request is admitted). Everything here runs before the model loads; generation is in `batch.run`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from seseme_cli.audio.files import SUPPORTED_FORMATS
from seseme_cli.errors import InputError
from seseme_cli.speech.request import DEFAULT_MAX_AUDIO_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK, SpeechRequest

FIELDS = {"id", "text", "speaker", "context", "temperature", "topk", "max_audio_ms", "seed", "out"}
CONTEXT_FIELDS = {"audio", "text", "speaker"}
MAX_ID_BYTES = 200  # an id becomes a file name: <id>.<format> and the temp file's name must stay under 255 bytes
MAX_NAME_BYTES = 240  # each part of an `out` path, for the same reason


class RequestError(Exception):
    """What is wrong with one request (it fails alone)."""


@dataclass
class ContextTurn:
    audio: Path
    text: str
    speaker: int


@dataclass
class Request:
    """One line of the file: where it came from, where its audio goes, and what to say (`speech`; its context
    turns are the files in `context`, encoded when it runs)."""

    line: int
    id: str | None = None
    speech: SpeechRequest | None = None
    context: list[ContextTurn] = field(default_factory=list)
    out: str | None = None
    output: Path | None = None  # resolved output file
    error: str | None = None  # set when the request cannot run

    @property
    def name(self) -> str:
        return self.id if self.id is not None else f"line {self.line}"


# --- parsing ---------------------------------------------------------------------------------------------------

def _int(value, what: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{what} must be an integer, got {json.dumps(value)}")
    if minimum is not None and value < minimum:
        raise RequestError(f"{what} must be >= {minimum}, got {value}")
    return value


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what} must be a number, got {json.dumps(value)}")
    return float(value)


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be a string, got {json.dumps(value)}")
    if not value.strip():
        raise RequestError(f"{what} is empty")
    return value


def _text(value, what: str) -> str:
    return " ".join(_string(value, what).split())


def _unknown(obj: dict, known: set[str], what: str) -> None:
    extra = sorted(set(obj) - known)
    if extra:
        raise RequestError(f"unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} in {what} "
                           f"(known: {', '.join(sorted(known))})")


def _context(value, speaker: int) -> list[ContextTurn]:
    if not isinstance(value, list):
        raise RequestError("context must be a list of {\"audio\", \"text\", \"speaker\"} objects")
    turns = []
    for i, item in enumerate(value):
        what = f"context[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{what} must be an object with audio, text and speaker")
        _unknown(item, CONTEXT_FIELDS, what)
        for key in ("audio", "text"):
            if key not in item:
                raise RequestError(f"{what} has no {key!r}")
        audio = Path(_string(item["audio"], f"{what}.audio"))
        if not audio.is_file():
            raise RequestError(f"{what}.audio: cannot read audio {audio}: no such file")
        turns.append(ContextTurn(audio, _text(item["text"], f"{what}.text"),
                                 _int(item.get("speaker", speaker), f"{what}.speaker", 0)))
    return turns


def _id(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"id must be a string or an integer, got {json.dumps(value)}")
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise RequestError(f"id {text!r} cannot be a file name (use \"out\" to choose the output path)")
    if len(text.encode("utf-8")) > MAX_ID_BYTES:
        raise RequestError(f"id is {len(text.encode('utf-8'))} bytes long; an id names a file, at most {MAX_ID_BYTES} "
                           "bytes (use \"out\" to choose the output path)")
    return text


def parse_request(line: int, raw: str, chunk_ms: float | None = None) -> Request:
    """One JSONL line -> Request; RequestError says what is wrong (the Request so far, with its id when that
    much was readable, is in the error's `request`)."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RequestError("a request must be a JSON object")
    req = Request(line)
    try:
        if obj.get("id") is not None:
            req.id = _id(obj["id"])
        _unknown(obj, FIELDS, "the request")
        if "text" not in obj:
            raise RequestError("no \"text\" to speak")
        speaker = _int(obj.get("speaker", 0), "speaker", 0)
        if obj.get("out") is not None:
            req.out = _string(obj["out"], "out")
        req.context = _context(obj.get("context", []), speaker)
        req.speech = _speech(obj, speaker, chunk_ms)
    except RequestError as e:
        e.request = req
        raise
    return req


def _speech(obj: dict, speaker: int, chunk_ms: float | None) -> SpeechRequest:
    """The line's speech settings, checked by SpeechRequest itself (JSON types first: true is not a number)."""
    for key in ("temperature", "max_audio_ms"):
        if key in obj:
            _number(obj[key], key)
    for key in ("topk", "seed"):
        if obj.get(key) is not None:
            _int(obj[key], key)
    extra = {} if chunk_ms is None else {"chunk_ms": chunk_ms}
    try:
        return SpeechRequest.make(_text(obj["text"], "text"), speaker, (), obj.get("max_audio_ms", DEFAULT_MAX_AUDIO_MS),
                                  obj.get("temperature", DEFAULT_TEMPERATURE), obj.get("topk", DEFAULT_TOPK),
                                  obj.get("seed"), **extra)
    except InputError as e:
        raise RequestError(str(e)) from None


def read_requests(path: Path, chunk_ms: float | None = None) -> list[Request]:
    """Every non-blank line of the file as a Request (with `error` set when it is malformed)."""
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first request
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    requests = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            requests.append(parse_request(number, raw, chunk_ms))
        except RequestError as e:
            failed = getattr(e, "request", None) or Request(number)
            failed.error = str(e)
            requests.append(failed)
    if not requests:
        raise InputError(f"{path} holds no requests (one JSON object per line)")
    return requests


# --- outputs ---------------------------------------------------------------------------------------------------

def plan_outputs(requests: list[Request], out_dir: Path, fmt: str) -> None:
    """Set each request's output path; reject paths outside out_dir and outputs shared by several requests."""
    root = out_dir.resolve()
    for req in requests:
        if req.error:
            continue
        name = req.out if req.out is not None else f"{req.id if req.id is not None else req.line}.{fmt}"
        if "\0" in name:
            req.error = f"out {name!r} contains a NUL character"
            continue
        if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in Path(name).parts):
            req.error = f"out {name[:40]!r}...: a file or folder name longer than {MAX_NAME_BYTES} bytes"
            continue
        if Path(name).is_absolute():
            req.error = f"out {name!r} must be relative to the output directory"
            continue
        target = (root / name).resolve()
        if not target.is_relative_to(root) or target == root:
            req.error = f"out {name!r} is outside the output directory {out_dir}"
        elif target.suffix.lower() not in SUPPORTED_FORMATS:
            req.error = f"out {name!r}: unsupported file type; use one of {', '.join(SUPPORTED_FORMATS)}"
        elif target.is_dir():
            req.error = f"output {name!r} is a directory"
        else:
            req.output = target
    owners: dict[Path, list[Request]] = {}
    for req in requests:
        if req.output is not None:
            owners.setdefault(req.output, []).append(req)
    for path, reqs in owners.items():
        if len(reqs) > 1:
            lines = ", ".join(str(r.line) for r in reqs)
            for req in reqs:
                req.error = f"lines {lines} all write {path.relative_to(root)}: give each request its own id or out"


def stale_temp_files(output: Path) -> list[Path]:
    """Temp files an interrupted (killed) run left for `output` (audio_io's naming: .<name>.*.part)."""
    return list(output.parent.glob(f".{output.name}.*.part")) if output.parent.is_dir() else []


# --- one run per output folder and input -----------------------------------------------------------------------

@contextlib.contextmanager
def exclusive_run(folder: Path, input: Path):
    """Hold `<folder>/.<input stem>.lock` (an flock) for the run: a second `seseme batch` on the same input and
    folder would plan the same missing outputs and generate them twice, so it stops with one line instead. The
    lock goes with the process (also after kill -9, which leaves the empty file; the next run takes it over).
    The file is removed while still locked, so a run that opens it meanwhile fails to lock and stops."""
    import fcntl

    from seseme_cli.errors import InputError

    path = folder / f".{input.stem}.lock"
    try:
        handle = open(path, "a+")
    except OSError as e:
        raise InputError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another seseme batch is already running on {input.name} into {folder} (it holds "
                             f"{path}); wait for it to finish or use another --out-dir") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        handle.close()


# --- the manifest ----------------------------------------------------------------------------------------------

class Manifest:
    """Append-only JSONL, one record per request outcome, flushed at once (a kill loses nothing written)."""

    def __init__(self, path: Path, out_dir: Path):
        self.path, self.root = path, out_dir.resolve()
        self.ok: set[str] = set()  # outputs (relative) with an ok record
        if path.exists():
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(raw)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(rec, dict) and rec.get("status") == "ok" and isinstance(rec.get("output"), str):
                    self.ok.add(rec["output"])
        self.file = open(path, "a+b")
        self.file.seek(0, os.SEEK_END)
        if self.file.tell():  # end a line cut short by a kill, so the next record starts on its own line
            self.file.seek(-1, os.SEEK_END)
            if self.file.read(1) != b"\n":
                self.file.write(b"\n")

    def relative(self, output: Path | None) -> str | None:
        return None if output is None else str(output.relative_to(self.root))

    def append(self, req: Request, status: str, duration: float | None = None, error: str | None = None) -> None:
        rec = {"line": req.line, "id": req.id, "output": self.relative(req.output), "duration_s": duration,
               "status": status, "error": error}
        self.file.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        self.file.flush()

    def close(self) -> None:
        self.file.close()
