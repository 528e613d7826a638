"""Audio encoders for the speech endpoint, fed 16-bit samples chunk by chunk as the engine decodes them.

`make_encoder(format, rate, streaming)` -> an encoder whose `write(samples)` returns the bytes ready to send
now and `finish()` the rest. Streaming (bytes leave as they are made) vs whole (one complete file at the end):
- pcm: raw s16le mono, the same either way.
- wav: streaming starts with an "unknown length" header (sizes 0xFFFFFFFF, as OpenAI sends it; libsndfile,
  ffmpeg and browsers read it); whole has the exact sizes.
- mp3 (libsndfile's LAME), constant bit rate (~80 kb/s): frames as they are encoded. Streaming leaves out the
  blank Xing/LAME tag frame that libsndfile writes first and fills in at the end (bytes already sent cannot
  change, and a blank tag frame decodes as garbage); whole keeps the filled-in tag (exact length). Constant
  rate because a stream has no tag: readers estimate a tagless file's length from its first frame's bit rate,
  so a variable-rate stream reads short (libsndfile read 9252 of 63360 samples of one).
- opus (Ogg Opus, libsndfile): Ogg pages of ~20 ms, so each chunk leaves at once (libsndfile's default waits
  for a second of audio per page).
- flac: libFLAC emits a frame per 4096 samples (~170 ms), so streamed FLAC arrives in such steps, and its header
  says "length unknown" (valid FLAC, read by ffmpeg and browsers, NOT by libsndfile 1.2 / soundfile); whole
  FLAC has the exact length and MD5. That is why flac is sent whole unless the request asks for `stream`.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from seseme_cli.audio.files import wav_header

MEDIA_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "flac": "audio/flac",
}
FORMATS = tuple(MEDIA_TYPES)
# Whether a format streams when the request does not say: where its streamed form is read by every common tool.
STREAMS_BY_DEFAULT = {"pcm": True, "wav": True, "mp3": True, "opus": True, "flac": False}
UNSUPPORTED = {"aac": "no AAC encoder is available to seseme (libsndfile has none)"}

_SNDFILE = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}
# libsndfile's compression level for MP3: 0 = its highest bit rate, 1 = its lowest; 0.5 gives ~80 kb/s at 24 kHz.
MP3_LEVEL = 0.5
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302  # sndfile.h (libsndfile >= 1.2); soundfile has no wrapper for it
OGG_PAGE_MS = 20.0


class Encoder:
    """`write(int16 samples) -> bytes` to send now; `finish() -> bytes`. `inline`: cheap enough for the event
    loop (else the caller runs it in a worker thread)."""

    inline = True

    def write(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""

    def close(self) -> None:
        """Drop an unfinished encoder (the request ended early)."""


class PcmEncoder(Encoder):
    def write(self, samples: np.ndarray) -> bytes:
        return _s16le(samples)


class WavEncoder(Encoder):
    def __init__(self, sample_rate: int, streaming: bool):
        self.sample_rate, self.streaming = sample_rate, streaming
        self.started = False
        self.pieces: list[bytes] = []  # whole files only

    def write(self, samples: np.ndarray) -> bytes:
        data = _s16le(samples)
        if not self.streaming:
            self.pieces.append(data)
            return b""
        if not self.started:
            self.started = True
            return wav_header(self.sample_rate) + data
        return data

    def finish(self) -> bytes:
        if self.streaming:
            return b"" if self.started else wav_header(self.sample_rate)
        data = b"".join(self.pieces)
        return wav_header(self.sample_rate, len(data)) + data


class _GrowingFile(io.RawIOBase):
    """The file libsndfile writes into, in memory. `take()` returns what was appended since the last take;
    rewrites of bytes already taken (headers patched at close) change only the local copy."""

    def __init__(self, skip_blank_first_frame: bool = False):
        self.buf = bytearray()
        self.pos = 0
        self.sent = 0
        self.skip_blank_first_frame = skip_blank_first_frame
        self.writes = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.buf)}[whence]
        self.pos = base + offset
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = len(self.buf) if size is None or size < 0 else self.pos + size
        data = bytes(self.buf[self.pos:end])
        self.pos += len(data)
        return data

    def write(self, data) -> int:
        data = bytes(data)
        if self.writes == 0 and self.pos == 0 and self.skip_blank_first_frame and _blank_mpeg_frame(data):
            self.sent = len(data)  # never send it: the real tag is only known at close
        self.writes += 1
        self.buf[self.pos:self.pos + len(data)] = data
        self.pos += len(data)
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buf[self.sent:])
        self.sent = len(self.buf)
        return data


def _blank_mpeg_frame(data: bytes) -> bool:
    """An MPEG audio frame header (11 sync bits) followed only by zeros: LAME's tag placeholder."""
    return len(data) > 4 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and not any(data[4:])


class SndfileEncoder(Encoder):
    inline = False  # LAME / libopus / libFLAC cost real CPU time: off the event loop (cffi releases the GIL)

    def __init__(self, fmt: str, sample_rate: int, streaming: bool):
        container, subtype = _SNDFILE[fmt]
        self.streaming = streaming
        self.file = _GrowingFile(skip_blank_first_frame=streaming and fmt == "mp3")
        options = {"bitrate_mode": "CONSTANT", "compression_level": MP3_LEVEL} if fmt == "mp3" else {}
        self.sf = sf.SoundFile(self.file, "w", samplerate=sample_rate, channels=1, format=container, subtype=subtype,
                               **options)
        if container == "OGG":
            _set_ogg_page_latency(self.sf, OGG_PAGE_MS)

    def write(self, samples: np.ndarray) -> bytes:
        self.sf.write(np.asarray(samples, dtype=np.int16))
        return self.file.take() if self.streaming else b""

    def finish(self) -> bytes:
        self.sf.close()
        if self.streaming:
            return self.file.take()
        return bytes(self.file.buf)  # the whole file, headers patched at close

    def close(self) -> None:
        """Drop an unfinished encoder (the request ended early)."""
        if not self.sf.closed:
            self.sf.close()


def _set_ogg_page_latency(f: sf.SoundFile, ms: float) -> None:
    from soundfile import _ffi, _snd

    value = _ffi.new("double*", ms)
    _snd.sf_command(f._file, _SFC_SET_OGG_PAGE_LATENCY_MS, value, _ffi.sizeof("double"))  # ignored by older libsndfile


def _s16le(samples: np.ndarray) -> bytes:
    if samples.dtype != np.int16:  # the server's engine decodes to int16; anything else is converted the WAV way
        from seseme_cli.audio.files import pcm16

        samples = pcm16(samples)
    return samples.astype("<i2", copy=False).tobytes()


def make_encoder(fmt: str, sample_rate: int, streaming: bool) -> Encoder:
    if fmt == "pcm":
        return PcmEncoder()
    if fmt == "wav":
        return WavEncoder(sample_rate, streaming)
    if fmt in _SNDFILE:
        return SndfileEncoder(fmt, sample_rate, streaming)
    raise ValueError(f"unknown format {fmt!r}")  # plan.py has checked it: a bug if reached
