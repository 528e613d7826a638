"""`seseme say`'s inputs, checked before the model loads (a typo costs no model load): the text, the context
turns, and where the outputs go."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from seseme_cli.errors import InputError


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); anything else is one error naming the first bad byte.
    Standard input is read as bytes: Python's own decoding of it depends on the locale and, in the C locale,
    lets undecodable bytes through as surrogates that fail much later."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert it first, e.g. with iconv -t UTF-8") from None


def read_text(text: str | None, file: Path | None) -> str:
    """The text to speak from TEXT, `-` (stdin) or --file, with whitespace runs collapsed to one space."""
    if text is not None and file is not None:
        raise InputError("give the text either as TEXT or with --file, not both")
    if file is not None:
        where = f"--file {file}"
        if file.is_dir():
            raise InputError(f"cannot read {where}: it is a directory")
        try:
            text = decode_text(file.read_bytes(), where)
        except OSError as e:
            raise InputError(f"cannot read {where}: {e.strerror or e}") from None
    elif text == "-":
        where = "standard input"
        stream = getattr(sys.stdin, "buffer", None)
        text = decode_text(stream.read(), where) if stream is not None else sys.stdin.read()
    elif text is None:
        raise InputError("no text to speak: give TEXT, --file PATH, or - to read standard input")
    else:
        where = "TEXT"
    if "\0" in text:
        raise InputError(f"the text to speak ({where}) contains a NUL character: is it a binary file?")
    text = " ".join(text.split())
    if not text:
        raise InputError(f"the text to speak is empty ({where})")
    return text


def parse_context(value: str) -> tuple[Path, str, int]:
    """AUDIO:TRANSCRIPT:SPEAKER -> (audio path, transcript, speaker). The path ends at the first ':' and the
    speaker starts after the last one, so a transcript may contain ':'."""
    audio, _, rest = value.partition(":")
    transcript, sep, speaker = rest.rpartition(":")
    usage = f"--context {value!r}: expected AUDIO:TRANSCRIPT:SPEAKER, e.g. hello.wav:Hello there.:1"
    if not audio or not sep:
        raise InputError(usage)
    if not transcript.strip():
        raise InputError(f"{usage} (the transcript is empty)")
    try:
        speaker_id = int(speaker)
    except ValueError:
        raise InputError(f"{usage} (speaker {speaker!r} is not an integer)") from None
    if speaker_id < 0:
        raise InputError(f"{usage} (speaker must be >= 0)")
    return Path(audio), transcript.strip(), speaker_id


def load_context(values: list[str], sample_rate: int) -> list:
    """The --context turns as Segments, their audio read at the model's rate."""
    from seseme_cli.audio.files import load_audio
    from seseme_cli.speech.request import Segment

    parsed = [parse_context(value) for value in values]  # every turn's syntax before any audio is read
    return [Segment(speaker, transcript, load_audio(path, target_sample_rate=sample_rate))
            for path, transcript, speaker in parsed]


def check_codes_path(path: Path) -> None:
    if path.suffix.lower() != ".npy":
        raise InputError(f"--codes {path}: the file name must end in .npy")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"--codes {path}: folder {folder} does not exist")
    if path.is_dir():
        raise InputError(f"--codes {path}: it is a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--codes {path}: cannot write in folder {folder}")
    from seseme_cli.audio.files import check_name_length

    check_name_length(path, f"--codes {path}")
