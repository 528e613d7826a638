"""Inline context turns of a request: base64 audio files (wav, flac, ogg, mp3: what libsndfile reads) decoded to
mono float at the model's rate, as `Segment`s the engine encodes with Mimi at admission.

Runs in a worker thread (decoding and resampling a minute of audio costs milliseconds to tens of them), never on
the event loop. Every problem is a 400 naming the turn (`context[i].audio`).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from seseme_cli.audio.files import read_mono
from seseme_cli.errors import InputError
from seseme_cli.server.errors import bad_request
from seseme_cli.speech.request import Segment


def decode_audio(data: str, sample_rate: int, max_seconds: float, param: str, limit_s: float | None = None) -> np.ndarray:
    """base64 text of an audio file -> 1-D float32 at `sample_rate` (channels averaged), at most `max_seconds`
    long (`limit_s`: the request's whole limit, for the message)."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} must be a base64-encoded audio file (wav, flac, ogg or mp3)", param) from None
    if not raw:
        raise bad_request(f"{param} is empty", param)
    try:
        return read_mono(io.BytesIO(raw), sample_rate, max_seconds, param)
    except InputError as e:
        message = str(e)
        if message.endswith(f"longer than {max_seconds:g} s"):
            message = f"{param}: the request's context audio is longer than the server's limit of " \
                      f"{limit_s or max_seconds:g} s in all"
        raise bad_request(message, param) from None


def decode_context(turns, sample_rate: int, max_seconds: float) -> list[Segment]:
    """The request's `context` list (schemas.ContextTurn) -> Segments, all turns within `max_seconds` together."""
    segments, left = [], max_seconds
    for i, turn in enumerate(turns):
        param = f"context[{i}].audio"
        audio = decode_audio(turn.audio, sample_rate, left, param, max_seconds)
        left -= len(audio) / sample_rate
        try:
            segments.append(Segment(turn.speaker, " ".join(turn.text.split()), audio))
        except InputError as e:
            raise bad_request(f"context[{i}]: {e}", f"context[{i}]") from None
    return segments
