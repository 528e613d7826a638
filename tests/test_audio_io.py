"""Audio file reading and atomic writing, on real files in tmp_path."""

import os
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from seseme_cli.audio import files
from seseme_cli.audio.files import (SUPPORTED_FORMATS, PendingAudioFile, check_output_path, load_audio, pcm16,
                                    pcm16_on_device, write_audio, writable_format)
from seseme_cli.audio.stream import FileSink
from seseme_cli.batch.manifest import stale_temp_files
from seseme_cli.errors import InputError
from conftest import FullDisk


def _tone(seconds, rate, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_stereo_44k_to_mono_24k(tmp_path):
    path = tmp_path / "stereo.wav"
    left, right = _tone(1.5, 44100), _tone(1.5, 44100, 660.0)
    sf.write(path, np.stack([left, right], axis=1), 44100)
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert audio.shape[0] == 36000  # 1.5 s at 24 kHz
    # Downmix is the mean of the channels, then a band-limited resample: the 440/660 Hz tones come out as the
    # same tones at 24 kHz (compared with the exact signal away from the ends, where the filter settles).
    t = np.arange(36000) / 24000
    expected = 0.5 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 660 * t)) / 2
    inner = slice(2400, -2400)
    np.testing.assert_allclose(audio.numpy()[inner], expected[inner], atol=2e-3)  # 16-bit file quantisation


def test_mono_16k_to_24k_flac(tmp_path):
    path = tmp_path / "mono.flac"
    sf.write(path, _tone(2.0, 16000), 16000)
    assert load_audio(path).shape == (48000,)
    assert load_audio(path, target_sample_rate=16000).shape == (32000,)


def test_unreadable_inputs(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 24000)
    for path, reason in [(junk, "not recognised"), (tmp_path / "nope.wav", "no such file"),
                         (empty, "no samples"), (tmp_path, "directory")]:
        with pytest.raises(InputError, match=reason) as err:
            load_audio(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


LOSSY = (".ogg", ".mp3", ".opus")


def _same_signal(back: torch.Tensor, audio: torch.Tensor, suffix: str) -> None:
    """wav/flac are 16-bit PCM: the same samples. Vorbis, MP3 and Opus are lossy and delay or smear the signal a
    little, so for them: the same length and a strongly correlated waveform."""
    assert back.shape == audio.shape
    expected = audio.clamp(-1, 1)
    if suffix not in LOSSY:
        assert (back - expected).abs()[200:-200].max() < 1e-3
        return
    a, b = expected[2400:-2400].numpy(), back[2400:-2400].numpy()
    assert np.corrcoef(a, b)[0, 1] > 0.9, suffix


@pytest.mark.parametrize("suffix", list(SUPPORTED_FORMATS))
def test_write_and_read_back(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    audio = torch.from_numpy(_tone(1.0, 24000))
    audio[100] = 3.0  # out of range: clipped, not wrapped
    write_audio(path, audio, 24000)
    back = load_audio(path)
    _same_signal(back, audio, suffix)
    assert back.abs().max() <= 1.0 + (0.1 if suffix in LOSSY else 1e-3)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind
    info = sf.info(path)
    assert (info.format, info.subtype) == SUPPORTED_FORMATS[suffix] and info.samplerate == 24000


@pytest.mark.parametrize("suffix", list(SUPPORTED_FORMATS))
def test_streamed_file_reads_back(tmp_path, suffix):
    # FileSink (say --stream) writes the same formats chunk by chunk.
    audio = torch.from_numpy(_tone(1.0, 24000))
    sink = FileSink(tmp_path / f"out{suffix}", 24000)
    for start in range(0, len(audio), 1920):
        sink.write(audio[start:start + 1920])
    sink.commit()
    sink.abort()  # after the commit: nothing to remove
    assert os.listdir(tmp_path) == [f"out{suffix}"]
    _same_signal(load_audio(tmp_path / f"out{suffix}"), audio, suffix)


def test_a_libsndfile_without_mp3_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_linked_can_write", lambda fmt, subtype: fmt != "MP3")
    for call in (check_output_path, PendingAudioFile, lambda p: FileSink(p, 24000)):
        with pytest.raises(InputError, match=r"libsndfile .* cannot write MP3 .*use one of \.wav, \.flac, \.ogg, \.opus$"):
            call(tmp_path / "out.mp3")
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="^--format mp3: the linked libsndfile"):
        writable_format("x.mp3", "--format mp3")


# --- a full disk -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", list(SUPPORTED_FORMATS))
@pytest.mark.parametrize("room", [0, 1000])
def test_disk_full_whole_file_is_one_line_and_no_file(tmp_path, monkeypatch, suffix, room, capfd):
    real_open = open
    monkeypatch.setattr(files, "open", lambda *a, **k: FullDisk(real_open(*a, **k), room), raising=False)
    path = tmp_path / f"out{suffix}"
    with pytest.raises(InputError, match=f"^cannot write {path}: No space left on device$"):
        write_audio(path, torch.from_numpy(_tone(1.0, 24000)), 24000)
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in capfd.readouterr().err  # nothing printed from inside libsndfile's callbacks


@pytest.mark.parametrize("suffix", list(SUPPORTED_FORMATS))
@pytest.mark.parametrize("room", [0, 1000])
def test_disk_full_while_streaming_is_one_line_and_no_file(tmp_path, monkeypatch, suffix, room, capfd):
    import seseme_cli.audio.stream as stream

    real_fdopen = os.fdopen
    monkeypatch.setattr(stream.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k), room))
    path = tmp_path / f"out{suffix}"
    audio = torch.from_numpy(_tone(1.0, 24000))
    with pytest.raises(InputError, match=f"^cannot write {path}: No space left on device$"):
        sink = FileSink(path, 24000)
        for start in range(0, len(audio), 1920):
            sink.write(audio[start:start + 1920])
        sink.commit()
    assert os.listdir(tmp_path) == []
    assert "Traceback" not in capfd.readouterr().err


# --- context audio whose header lies ---------------------------------------------------------------------------

def _wav_header_claiming(rate: int, data: bytes = b"\0" * 2000) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, (2 * rate) & 0xFFFFFFFF, 2, 16)
            + b"data" + struct.pack("<I", len(data)) + data)


@pytest.mark.parametrize("rate", [2**31, 2**31 - 1, 10**9, 384_001, 999])
def test_absurd_sample_rate_is_refused_before_reading(tmp_path, rate):
    # Resampling 2^31 Hz to 24 kHz would allocate gigabytes; such a header is refused (by libsndfile itself for
    # 2^31, which overflows its int) with one line, before any sample is read.
    path = tmp_path / "fast.wav"
    path.write_bytes(_wav_header_claiming(rate))
    with pytest.raises(InputError, match=f"^cannot read audio {path}: ") as err:
        load_audio(path)
    assert "\n" not in str(err.value)


def test_longest_context_is_refused(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(1000 * 601, np.float32), 1000)  # 601 s at the lowest rate allowed
    with pytest.raises(InputError, match="longer than 600 s"):
        load_audio(path)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_pcm_samples_are_libsndfiles_own_conversion(tmp_path, suffix):
    # write_audio converts WAV to 16 bits itself (numpy): the samples must be those libsndfile writes from floats.
    audio = torch.from_numpy(np.random.default_rng(0).uniform(-1.2, 1.2, 24001).astype(np.float32))
    audio[:6] = torch.tensor([0.7, -0.3, 100.5, -100.5, 32767.6, -32768.6]) / 32768  # rounding, both range ends
    write_audio(tmp_path / f"ours{suffix}", audio, 24000)
    sf.write(tmp_path / f"theirs{suffix}", audio.clamp(-1, 1).numpy(), 24000, subtype="PCM_16")
    ours, _ = sf.read(tmp_path / f"ours{suffix}", dtype="int16")
    theirs, _ = sf.read(tmp_path / f"theirs{suffix}", dtype="int16")
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_pcm16_pieces_write_the_same_file(tmp_path, suffix):
    # seseme batch hands over 16-bit samples converted on the device (pcm16_on_device): same samples, same file.
    rng = np.random.default_rng(1)
    pieces = [rng.uniform(-1.1, 1.1, n).astype(np.float32) for n in (1920, 3840, 7)]
    pieces[0][:4] = np.array([0.7, -0.3, 32767.6, -32768.6], dtype=np.float32) / 32768
    ints = [pcm16_on_device(torch.from_numpy(p)).numpy() for p in pieces]
    assert all(np.array_equal(i, pcm16(p)) for i, p in zip(ints, pieces))
    write_audio(tmp_path / f"float{suffix}", pieces, 24000)
    write_audio(tmp_path / f"int{suffix}", ints, 24000)
    a, _ = sf.read(tmp_path / f"float{suffix}", dtype="int16")
    b, _ = sf.read(tmp_path / f"int{suffix}", dtype="int16")
    if suffix == ".wav":
        assert (tmp_path / "float.wav").read_bytes() == (tmp_path / "int.wav").read_bytes()
    else:  # libsndfile's FLAC rounds float samples where WAV floors them: at most one step apart
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert np.array_equal(b, np.concatenate(ints))
    with pytest.raises(ValueError, match="not a mix"):
        write_audio(tmp_path / f"mixed{suffix}", [pieces[0], ints[1]], 24000)


def test_unknown_suffix(tmp_path):
    for call in (lambda p: write_audio(p, torch.zeros(10), 24000), check_output_path, PendingAudioFile,
                 lambda p: FileSink(p, 24000)):
        for name in ("out.aac", "out"):
            with pytest.raises(InputError, match=r"use one of \.wav, \.flac, \.ogg, \.mp3, \.opus$"):
                call(tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_missing_directory(tmp_path):
    target = tmp_path / "no_such_dir" / "out.wav"
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(target)
    with pytest.raises(InputError, match="cannot write"):
        write_audio(target, torch.zeros(10), 24000)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_audio(not_a_dir / "out.wav", torch.zeros(10), 24000)
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output_path(ro / "out.wav")
        for call in (lambda p: write_audio(p, torch.zeros(10), 24000), PendingAudioFile):
            with pytest.raises(InputError, match=f"cannot write {ro / 'out.wav'}: Permission denied"):
                call(ro / "out.wav")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_directory_made_read_only_after_the_temp_file(tmp_path):
    # The one failure that cannot clean up: neither the rename nor the unlink is allowed. The error is the
    # rename's, and the temp file is the kind the next `seseme batch` run removes (batch.stale_temp_files).
    path = tmp_path / "out.wav"
    pending = PendingAudioFile(path)
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match=f"cannot write {path}: Permission denied"):
            pending.write(torch.zeros(10), 24000)
    finally:
        tmp_path.chmod(0o700)
    [left] = os.listdir(tmp_path)
    assert not path.exists() and stale_temp_files(path) == [tmp_path / left]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    # A failure after the temp file exists (the WAV writer rejects the rate): the temp file is removed and an
    # existing output is untouched. This runs as root too, unlike the permission test above.
    path = tmp_path / "out.wav"
    write_audio(path, torch.zeros(2400), 24000)
    before = path.read_bytes()
    with pytest.raises(InputError, match=f"cannot write {path}"):
        write_audio(path, torch.ones(2400) * 0.5, 0)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.wav"]


def test_name_length_counts_the_temp_file(tmp_path):
    # The temp file `.<name>.<8 random>.part` needs 15 bytes more than the name: 240 fit in 255, 241 do not.
    fits, too_long = tmp_path / ("x" * 236 + ".wav"), tmp_path / ("x" * 237 + ".wav")
    check_output_path(fits)
    write_audio(fits, torch.zeros(10), 24000)
    with pytest.raises(InputError, match="the file name is 241 bytes long; at most 240 fit here"):
        check_output_path(too_long)
    assert os.listdir(tmp_path) == [fits.name]


def test_check_output_path_ok(tmp_path):
    check_output_path(tmp_path / "fine.ogg")
    taken = tmp_path / "d.wav"
    taken.mkdir()
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(taken)


# --- PendingAudioFile: the temp file made first, written (or discarded) later ----------------------------------

def test_pending_file_then_write(tmp_path):
    path = tmp_path / "out.wav"
    pending = PendingAudioFile(path)
    [tmp] = os.listdir(tmp_path)  # only the temp file, named as batch.stale_temp_files expects
    assert stale_temp_files(path) == [tmp_path / tmp] and not path.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / tmp).stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it
    audio = torch.from_numpy(_tone(0.5, 24000))
    pending.write([audio[:5000].numpy(), audio[5000:].numpy()], 24000)
    write_audio(tmp_path / "direct.wav", audio, 24000)
    assert path.read_bytes() == (tmp_path / "direct.wav").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["direct.wav", "out.wav"]
    pending.discard()  # after the write: nothing to do
    assert path.exists()
    with pytest.raises(RuntimeError, match="already written"):
        pending.write(audio, 24000)


def test_pending_file_discard(tmp_path):
    path = tmp_path / "out.flac"
    path.write_bytes(b"old")
    pending = PendingAudioFile(path)
    assert len(os.listdir(tmp_path)) == 2
    pending.discard()
    pending.discard()
    assert os.listdir(tmp_path) == ["out.flac"] and path.read_bytes() == b"old"


@pytest.mark.parametrize("audio,rate,error", [
    (torch.ones(2400) * 0.5, 0, InputError),  # the WAV writer rejects the rate, after opening the temp file
    (torch.zeros(2, 100), 24000, ValueError),  # not 1-D: the caller's bug, raised as it is
])
def test_pending_file_failed_write_leaves_old_file_and_no_temp(tmp_path, audio, rate, error):
    path = tmp_path / "out.wav"
    write_audio(path, torch.zeros(2400), 24000)
    before = path.read_bytes()
    pending = PendingAudioFile(path)
    with pytest.raises(error):
        pending.write(audio, rate)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.wav"]
