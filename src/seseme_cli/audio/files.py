"""Audio files in and out: any rate / channel count in, mono float at the model rate; atomic writes out.

Reading goes through soundfile, resampling through soxr (no ABI tie to a torch build). Every problem a user
can cause (missing file, bad format, unwritable directory) becomes one InputError line naming the path.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from seseme_cli.errors import InputError

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000
MAX_CONTEXT_SECONDS = 600  # context audio beyond the 2048-frame window (164 s) is useless anyway

# suffix -> (libsndfile format, subtype). MP3 and Opus need libsndfile >= 1.1 built with LAME/mpg123 and libopus
# (the wheels of soundfile >= 0.12 bundle such a build); `writable_format` checks the linked one.
SUPPORTED_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
    ".opus": ("OGG", "OPUS"),  # Ogg Opus; 24 kHz is one of Opus' own rates, so nothing is resampled
}


def _unsupported(path: Path, what: str) -> InputError:
    return InputError(f"{what}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                      f"{', '.join(SUPPORTED_FORMATS)}")


@functools.cache
def _linked_can_write(fmt: str, subtype: str) -> bool:
    return fmt in sf.available_formats() and subtype in sf.available_subtypes(fmt)


def writable_format(path, what: str | None = None) -> tuple[str, str]:
    """(format, subtype) for writing `path`, chosen by its suffix; one InputError line (starting with `what`,
    default "cannot write PATH") when the suffix is unknown or the linked libsndfile cannot write that format."""
    path = Path(path)
    what = what or f"cannot write {path}"
    found = SUPPORTED_FORMATS.get(path.suffix.lower())
    if found is None:
        raise _unsupported(path, what)
    if not _linked_can_write(*found):
        usable = [suffix for suffix, f in SUPPORTED_FORMATS.items() if _linked_can_write(*f)]
        raise InputError(f"{what}: the linked libsndfile {sf.__libsndfile_version__} cannot write "
                         f"{found[0]} {found[1]} (libsndfile 1.1+ with MP3 and Opus support can: upgrade soundfile); "
                         f"use one of {', '.join(usable)}")
    return found


class GuardedFile(io.RawIOBase):
    """A binary file handed to libsndfile (soundfile's virtual I/O) that keeps the first OSError of a write
    instead of raising it: raised inside libsndfile's callback, an error becomes a printed traceback and a short
    write that libsndfile may not report at all (its Vorbis writer ignores a full disk). `check()` raises it
    after each libsndfile call."""

    def __init__(self, raw):
        super().__init__()
        self.raw, self.error = raw, None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(size)

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.raw.write(data)
            except OSError as e:
                self.error = e
        # Reported as written: libsndfile then finishes quietly, and check() raises the real reason (disk full).
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        if self.error is None and not self.raw.closed:  # also called when this object is collected
            try:
                self.raw.flush()
            except OSError as e:
                self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def write_error(path, e: BaseException) -> InputError:
    """One line for a failed write of `path` (disk full, read-only, libsndfile's refusal)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    elif isinstance(e, sf.LibsndfileError):
        reason = e.error_string.rstrip(".")
    else:
        reason = str(e)
    return InputError(f"cannot write {path}: {reason}")


def umask() -> int:
    # os.umask is the only portable way to read it, and it sets it: put it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_mono(source, target_sample_rate: int, max_seconds: float, what: str) -> np.ndarray:
    """An audio file (a path or a binary file object) -> 1-D float32 at `target_sample_rate`, channels averaged,
    at most `max_seconds` long. Every problem is one InputError line starting with `what`."""
    try:
        with sf.SoundFile(source) as f:
            # A header can claim any rate; resampling 2^31 Hz to 24 kHz would allocate gigabytes for nothing.
            if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
                raise InputError(f"{what}: sample rate {f.samplerate} Hz is outside "
                                 f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
            # Read at most one sample more than allowed: a header may lie about the length, the data cannot.
            limit = int(max_seconds * f.samplerate) + 1
            data, rate = f.read(limit, dtype="float32", always_2d=True), f.samplerate  # (frames, channels)
    except sf.LibsndfileError as e:  # error_string is libsndfile's reason without the repeated path
        raise InputError(f"{what}: {e.error_string.rstrip('.')}") from None
    except (OSError, RuntimeError, TypeError) as e:
        raise InputError(f"{what}: {e}") from None
    if data.shape[0] == 0:
        raise InputError(f"{what}: the file holds no samples")
    if data.shape[0] >= limit:
        raise InputError(f"{what}: it is longer than {max_seconds:g} s")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise InputError(f"{what}: it holds NaN or infinite samples")
    if rate != target_sample_rate:
        mono = soxr.resample(mono, rate, target_sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_audio(path, target_sample_rate: int = 24000) -> torch.Tensor:
    """Read an audio file as 1-D float32 at `target_sample_rate`; several channels are averaged."""
    import torch  # here: the CLI imports this module for its checks and --help, which need no torch

    path = Path(path)
    if not path.exists():
        raise InputError(f"cannot read audio {path}: no such file")
    if path.is_dir():
        raise InputError(f"cannot read audio {path}: it is a directory")
    return torch.from_numpy(read_mono(str(path), target_sample_rate, MAX_CONTEXT_SECONDS, f"cannot read audio {path}"))


def check_output_path(path) -> None:
    """Fail before any generation if `path` cannot be written: unknown suffix, missing or read-only directory, a
    name too long for its temp file."""
    path = Path(path)
    writable_format(path)
    parent = path.parent  # Path("out.wav").parent is Path(".")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    check_name_length(path, f"cannot write {path}")


TEMP_NAME_EXTRA = len(".") + len(".") + 8 + len(".part")  # mkstemp's `.<name>.<8 random>.part` beside `path`


def check_name_length(path: Path, what: str) -> None:
    """The temp file beside `path` needs 15 more bytes than its name: a name that fits alone can still fail, and
    only once the audio is made (File name too long)."""
    try:
        limit = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no answer: the common limit
        limit = 255
    size = len(os.fsencode(path.name))
    if size + TEMP_NAME_EXTRA > limit:
        raise InputError(f"{what}: the file name is {size} bytes long; at most {limit - TEMP_NAME_EXTRA} fit here")


def write_audio(path, audio, sample_rate: int) -> None:
    """Write mono audio (clipped to [-1, 1]) with the format chosen by the suffix (SUPPORTED_FORMATS: wav and flac
    16-bit PCM, ogg Vorbis, mp3, opus = Ogg Opus). `audio`: a 1-D tensor or array, or a list of 1-D arrays written one after the other (how
    `seseme batch` hands over a request's decoded rounds); float samples, or int16 samples already converted by
    `pcm16` / `pcm16_on_device` (what `seseme batch` hands over when every output is WAV). Atomic: a temp file in
    the same directory is renamed over `path`, so a reader never sees a partial file and a failure leaves nothing
    behind. The same as PendingAudioFile(path).write(audio, sample_rate); `seseme batch` makes the
    PendingAudioFile earlier.

    `seseme batch` writes hundreds of files at once when many requests end together, so WAV takes a lean path:
    16-bit samples (`pcm16`, as libsndfile makes them for WAV; a test checks it against libsndfile) written after a
    plain header. Measured on a 2-core machine, 512 files of 4 s handed over at once: 0.45-0.50 s until the last
    was written when each request's audio was first concatenated, then converted and encoded by libsndfile (four
    writer threads); 0.19-0.24 s with numpy's conversion into one buffer (one thread: see
    batch_run.writer_threads), ~0.4 ms per file, of which the conversion was ~0.14 ms. FLAC and Vorbis go through
    libsndfile (its FLAC encoder rounds float samples rather than floors), as do MP3 and Opus."""
    PendingAudioFile(path).write(audio, sample_rate)


class PendingAudioFile:
    """An output file made in two steps: creating it makes its temp file (`.<name>.<random>.part` next to `path`,
    the name batch.stale_temp_files looks for), `write` fills that and renames it over `path`, `discard` removes it.

    Creating the file is most of the cost of writing a short one. Measured on a 2-core machine (ext4, /tmp): mkstemp
    0.14-0.9 ms (it varies from run to run), opening the empty temp file again ~3 us, writing 200 KB into it and
    closing it 60-75 us, the rename ~15 us; 512 files of 4 s written in one thread took 0.19-0.67 s when each was
    created then, 0.11-0.13 s into files created beforehand. So `seseme batch` creates each request's temp file
    while the request generates. The temp file is closed between the steps (`write` opens it again): a batch can
    hold one per row plus those waiting to be written, and open descriptors are limited (often to 1024).

    Every failure is one InputError line naming `path` (an unsupported suffix before anything is created), and
    leaves no temp file behind and an existing `path` as it was."""

    def __init__(self, path):
        self.path = Path(path)
        self.format, self.subtype = writable_format(self.path)
        self.tmp: str | None = None
        with self._or_discard():
            # Same directory, so os.replace is a rename on one filesystem, never a copy.
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
            os.close(fd)
            os.chmod(self.tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the mode a plain open() would

    def write(self, audio, sample_rate: int) -> None:
        """Write the audio (see write_audio) into the temp file and rename it over `path`."""
        if self.tmp is None:
            raise RuntimeError(f"{self.path}: the temp file was already written or discarded")
        try:
            pieces = _pieces(audio)  # audio that is not 1-D is the caller's bug: a ValueError, not an InputError
        except BaseException:
            self.discard()
            raise
        with self._or_discard():
            with open(self.tmp, "r+b") as f:  # the empty file made by mkstemp; "r+" never creates one
                if self.format == "WAV":
                    _write_wav16(f, pieces, sample_rate)
                else:  # 16-bit pieces go to libsndfile as they are (no clipping to do)
                    data = np.concatenate(pieces)
                    if data.dtype != np.int16:
                        data = np.clip(data, -1.0, 1.0)
                    guarded = GuardedFile(f)
                    try:
                        sf.write(guarded, data, sample_rate, format=self.format, subtype=self.subtype)
                    finally:
                        guarded.check()  # the real reason (disk full) before libsndfile's own
            os.replace(self.tmp, self.path)
            self.tmp = None

    def discard(self) -> None:
        """Remove the temp file; nothing to do once written or discarded."""
        tmp, self.tmp = self.tmp, None
        if tmp is not None:
            # One we cannot remove (its directory made read-only since) is left to the next run's stale-part cleanup:
            # raising here would hide the error that led to the discard.
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _or_discard(self):
        """Any failure inside removes the temp file; the ones a user's file system can cause become InputError."""
        try:
            yield
        except BaseException as e:
            self.discard()
            if isinstance(e, (sf.LibsndfileError, OSError, RuntimeError, ValueError)):
                raise write_error(self.path, e) from None
            raise


def _pieces(audio) -> list[np.ndarray]:
    """write_audio's input as a list of 1-D numpy arrays, all float32 or all int16 (samples already converted by
    `pcm16` or `pcm16_on_device`), without copies where none are needed. numpy, not torch, from here on: torch's
    CPU ops share one intra-op thread pool, and writer threads would queue on it."""
    if type(audio).__module__.startswith("torch"):  # a tensor (torch is loaded then: no import cost)
        import torch

        audio = audio.detach().cpu()
        audio = (audio if audio.dtype == torch.int16 else audio.float()).numpy()
    pieces = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    for p in pieces:
        if not isinstance(p, np.ndarray) or p.ndim != 1:
            raise ValueError(f"write_audio expects 1-D audio, got {type(p).__name__} of shape {np.shape(p)}")
    if not pieces:
        return [np.zeros(0, np.float32)]
    if all(p.dtype == np.int16 for p in pieces):
        return pieces
    if any(p.dtype == np.int16 for p in pieces):
        raise ValueError("write_audio expects all pieces float or all 16-bit PCM, not a mix")
    return [p.astype(np.float32, copy=False) for p in pieces]


def _write_wav16(f, pieces: list[np.ndarray], sample_rate: int) -> None:
    if not 0 < sample_rate < 2**31:
        raise ValueError(f"bad sample rate {sample_rate}")
    f.write(wav_header(sample_rate, 2 * sum(len(p) for p in pieces)))
    for p in pieces:
        if p.dtype != np.int16:
            p = pcm16(p)
        f.write(memoryview(p.astype("<i2", copy=False)).cast("B"))


def pcm16(samples: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float samples -> 16-bit little-endian PCM as libsndfile 1.2 makes it for WAV: floor(x * 32768) clipped to the
    int16 range (so clipping x to [-1, 1] first changes nothing). One conversion for every WAV we write."""
    scaled = np.floor(np.asarray(samples, dtype=np.float32) * np.float32(32768))
    np.clip(scaled, -32768, 32767, out=scaled)
    if out is None:
        return scaled.astype("<i2")
    out[...] = scaled
    return out


def pcm16_on_device(samples: torch.Tensor) -> torch.Tensor:
    """`pcm16` for a tensor where it is (int16, same shape): floor(x * 32768) clipped, exact in fp32 as in numpy, so
    the samples are the same. `seseme batch` converts each round's audio of all rows at once on the GPU, copies half
    the bytes to the host, and leaves its writer only the file to write."""
    import torch

    return torch.floor(samples.float() * 32768).clamp_(-32768, 32767).to(torch.int16)


def wav_header(sample_rate: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM16 mono WAV header; the default sizes 0xFFFFFFFF mean 'unknown length' (a stream)."""
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
            2 * sample_rate, 2, 16) + b"data" + struct.pack("<I", data_bytes))
