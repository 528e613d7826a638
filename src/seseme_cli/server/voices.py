"""Named voices: a stored context turn (Mimi codes + transcript + speaker) that a request names as `voice`.

A voice is two files in the voices folder: NAME.npy, the clip's Mimi codes (frames, 32) as int16, encoded once by
`seseme voice add`, and NAME.json, what was said, by which speaker, and which codec made the codes. The .json is
written last and removed first, each through a temp file and a rename: a voice exists exactly when its .json does,
and a reader never sees half of one.

The codes only mean something to the codec that made them (the tiny test model's Mimi is not kyutai's), so each
voice records a fingerprint of its codec; a server whose codec differs skips the voice and says so.

OpenAI's voice names (alloy, echo, ...) are accepted too, unless turned off: a name with no stored voice maps to a
speaker id with no context (OPENAI_VOICES order: alloy = 0, ash = 1, ...). CSM has no fixed voice per speaker id:
without context the timbre follows the seed. Store a voice under that name (`seseme voice add alloy ...`) to give
it one: a stored voice always wins over the built-in mapping.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seseme_cli.errors import InputError
from seseme_cli.speech.request import FRAME_MS, Turn

log = logging.getLogger("seseme")

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
FORMAT_VERSION = 1
MAX_VOICE_SECONDS = 60.0  # a voice is prompt context on every request: longer clips eat the 2048-frame window


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InputError(f"voice name {name!r} is not valid: use 1-64 letters, digits, '_' or '-', starting with "
                         f"a letter or digit")
    return name


def codec_id(codec) -> str:
    """A fingerprint of the codec's first (semantic) codebook: codes from another codec would decode to noise."""
    cb = next(m for m in codec.model.modules() if hasattr(m, "embedding_sum"))
    digest = hashlib.sha256()
    for t in (cb.embedding_sum, cb.cluster_usage):
        digest.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Voice:
    name: str
    speaker: int
    transcript: str = ""
    codes: torch.Tensor | None = None  # (frames, K) int64; None for an OpenAI name mapped to a bare speaker id
    kind: str = "stored"  # or "builtin"

    @property
    def context(self) -> tuple:
        return () if self.codes is None else (Turn(self.speaker, self.transcript, self.codes),)

    @property
    def seconds(self) -> float:
        return 0.0 if self.codes is None else self.codes.shape[0] * FRAME_MS / 1000

    def describe(self) -> dict:
        return {"id": self.name, "object": "voice", "name": self.name, "kind": self.kind, "speaker": self.speaker,
                "transcript": self.transcript or None, "seconds": round(self.seconds, 3)}


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a server running as another user must read it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class VoiceFolder:
    """The files of the voices folder (no model needed, except to make the codes `add` is given)."""

    def __init__(self, folder):
        self.folder = Path(folder).expanduser()

    def _paths(self, name: str) -> tuple[Path, Path]:
        check_name(name)
        return self.folder / f"{name}.json", self.folder / f"{name}.npy"

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.json") if NAME.fullmatch(p.stem))

    def add(self, name: str, codes: torch.Tensor, transcript: str, speaker: int, codec: str, model: str = "",
            source: str = "", force: bool = False) -> Path:
        meta_path, codes_path = self._paths(name)
        if not transcript.strip():
            raise InputError("the transcript is empty: give what is said in the clip")
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
            raise InputError(f"--speaker must be a whole number >= 0, got {speaker!r}")
        if codes.dim() != 2 or codes.shape[0] == 0:
            raise InputError("the clip encodes to no audio frames")
        seconds = codes.shape[0] * FRAME_MS / 1000
        if seconds > MAX_VOICE_SECONDS:
            raise InputError(f"the clip is {seconds:.0f} s long; a voice may be at most {MAX_VOICE_SECONDS:.0f} s "
                             f"(it is context on every request, inside a 2048-frame window): cut it shorter")
        if meta_path.exists() and not force:
            raise InputError(f"voice {name!r} already exists in {self.folder}: pass --force to replace it")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            array = codes.to(torch.int16).numpy()  # codes are < 2051: int16 holds them in half the bytes
            _write_atomic(codes_path, lambda f: np.save(f, array, allow_pickle=False))
            meta = {"version": FORMAT_VERSION, "name": name, "transcript": " ".join(transcript.split()),
                    "speaker": speaker, "frames": int(codes.shape[0]), "codebooks": int(codes.shape[1]),
                    "codec": codec, "model": model, "source": source,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            _write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
        except OSError as e:
            raise InputError(f"cannot write voice {name!r} into {self.folder}: {e.strerror or e}") from None
        return meta_path

    def remove(self, name: str) -> None:
        meta_path, codes_path = self._paths(name)
        if not meta_path.exists():
            known = ", ".join(self.names()) or "none"
            raise InputError(f"no voice {name!r} in {self.folder} (voices there: {known})")
        try:
            meta_path.unlink()  # first: from here on the voice does not exist, whatever happens next
            codes_path.unlink(missing_ok=True)
        except OSError as e:
            raise InputError(f"cannot remove voice {name!r}: {e.strerror or e}") from None

    def metadata(self, name: str) -> dict:
        meta_path, _ = self._paths(name)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"voice {name!r}: cannot read {meta_path}: {e}") from None
        if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
            raise InputError(f"voice {name!r}: {meta_path} is not a seseme voice (version {FORMAT_VERSION})")
        return meta

    def load(self, name: str, codec: str, num_codebooks: int, cardinality: int) -> Voice:
        """The voice, checked against the codec that will decode it; InputError says why it cannot be used."""
        meta = self.metadata(name)
        _, codes_path = self._paths(name)
        if meta.get("codec") != codec:
            raise InputError(f"voice {name!r} was encoded by another codec (model {meta.get('model') or '?'}): "
                             f"add it again with this server's model")
        try:
            codes = np.load(codes_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"voice {name!r}: cannot read {codes_path}: {e}") from None
        if codes.ndim != 2 or codes.shape[1] != num_codebooks or codes.shape[0] == 0 \
                or not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= cardinality:
            raise InputError(f"voice {name!r}: {codes_path} does not hold (frames, {num_codebooks}) codes "
                             f"in 0..{cardinality - 1}")
        speaker, transcript = meta.get("speaker"), meta.get("transcript")
        if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0 or not isinstance(transcript, str):
            raise InputError(f"voice {name!r}: its speaker or transcript is missing from {name}.json")
        return Voice(name, speaker, transcript, torch.from_numpy(codes.astype(np.int64)))


class VoiceBook:
    """The voices a server knows: the folder's (read again when the folder changes, so `seseme voice add`
    works on a running server) and, unless turned off, OpenAI's names."""

    def __init__(self, folder, openai_voices: bool, codec: str, num_codebooks: int, cardinality: int):
        self.files = VoiceFolder(folder) if folder is not None else None
        self.openai_voices = openai_voices
        self._codec = (codec, num_codebooks, cardinality)
        self._stored: dict[str, Voice] = {}
        self._stamp = None
        self.refresh()

    def refresh(self) -> None:
        """Load the folder again if it changed (adding or removing a voice renames a file in it)."""
        if self.files is None:
            return
        try:
            stamp = self.files.folder.stat().st_mtime_ns
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return
        self._stamp = stamp
        stored = {}
        for name in self.files.names():
            try:
                stored[name] = self.files.load(name, *self._codec)  # small: a 60 s voice is 48 KB of codes
            except InputError as e:
                log.warning("skipping %s", " ".join(str(e).split()))
        self._stored = stored

    def voices(self) -> list[Voice]:
        self.refresh()
        builtin = [Voice(n, i, kind="builtin") for i, n in enumerate(OPENAI_VOICES) if n not in self._stored] \
            if self.openai_voices else []
        return [*self._stored.values(), *builtin]

    def known(self) -> list[str]:
        return [v.name for v in self.voices()]

    def resolve(self, name: str) -> Voice:
        """The voice called `name`; InputError naming the known ones if there is none."""
        self.refresh()
        if name in self._stored:
            return self._stored[name]
        if self.openai_voices and name in OPENAI_VOICES:
            return Voice(name, OPENAI_VOICES.index(name), kind="builtin")
        known = ", ".join(self.known()) or "none (add one with `seseme voice add`)"
        raise InputError(f"unknown voice {name!r}; known voices: {known}")
