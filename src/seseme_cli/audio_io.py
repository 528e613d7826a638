"""Audio files in and out: any rate / channel count in, mono float at the model rate; atomic writes out.

Reading goes through soundfile because torchaudio 2.9 needs TorchCodec to read files. Every problem a user
can cause (missing file, bad format, unwritable directory) becomes one InputError line naming the path.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from seseme_cli.errors import InputError

SUPPORTED_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
_SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS"}


def _format_for(path: Path) -> str:
    fmt = SUPPORTED_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"cannot write {path}: unsupported file type {path.suffix or '(none)'!r}; "
                         f"use one of {', '.join(SUPPORTED_FORMATS)}")
    return fmt


def _umask() -> int:
    # os.umask is the only portable way to read it, and it sets it: put it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_audio(path, target_sample_rate: int = 24000) -> torch.Tensor:
    """Read an audio file as 1-D float32 at `target_sample_rate`; several channels are averaged."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read audio {path}: no such file")
    if path.is_dir():
        raise InputError(f"cannot read audio {path}: it is a directory")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except sf.LibsndfileError as e:  # error_string is libsndfile's reason without the repeated path
        raise InputError(f"cannot read audio {path}: {e.error_string.rstrip('.')}") from None
    except (OSError, RuntimeError) as e:
        raise InputError(f"cannot read audio {path}: {e}") from None
    if data.shape[0] == 0:
        raise InputError(f"cannot read audio {path}: the file holds no samples")
    audio = torch.from_numpy(data).mean(dim=1)
    if rate != target_sample_rate:
        audio = AF.resample(audio, rate, target_sample_rate)
    return audio.contiguous()


def check_output_path(path) -> None:
    """Fail before any generation if `path` cannot be written: unknown suffix, missing or read-only directory."""
    path = Path(path)
    _format_for(path)
    parent = path.parent  # Path("out.wav").parent is Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")


def write_audio(path, audio: torch.Tensor, sample_rate: int) -> None:
    """Write 1-D audio (clipped to [-1, 1]) with the format chosen by the suffix: wav = 16-bit PCM, flac,
    ogg = Vorbis. Atomic: a temp file in the same directory is renamed over `path`, so a reader never sees a
    partial file and a failure leaves nothing behind.

    `seseme batch` writes hundreds of files at the end of a run, so this is kept lean: encoded in memory and written
    with one plain write. WAV is converted to 16 bits by numpy as libsndfile 1.2 does it for WAV (floor of
    x * 32768, clipped to the int16 range; a test checks it against libsndfile), which it does more slowly (a 4 s
    file: 1.24 ms from floats, 0.68 ms from int16, on the CI-class machine). Its FLAC encoder rounds instead, so
    FLAC and Vorbis get floats."""
    path = Path(path)
    fmt = _format_for(path)
    if audio.dim() != 1:
        raise ValueError(f"write_audio expects 1-D audio, got shape {tuple(audio.shape)}")
    # numpy, not torch: torch's CPU ops share one intra-op thread pool, so writer threads would queue on it.
    data = audio.detach().to("cpu", torch.float32).numpy()
    subtype = _SUBTYPES[fmt]
    if fmt == "WAV":
        scaled = np.floor(data * np.float32(32768))
        data = np.clip(scaled, -32768, 32767, out=scaled).astype(np.int16)  # = clipping to [-1, 1] first
    else:
        data = np.clip(data, -1.0, 1.0)
    tmp = None
    try:
        encoded = io.BytesIO()
        sf.write(encoded, np.ascontiguousarray(data), sample_rate, format=fmt, subtype=subtype)
        # Same directory, so os.replace is a rename on one filesystem, never a copy.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(encoded.getbuffer())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
        tmp = None
    except (sf.LibsndfileError, OSError, RuntimeError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise InputError(f"cannot write {path}: {reason}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
