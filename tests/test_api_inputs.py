"""Bad input through the Python API gets a clear InputError (a ValueError/TypeError-like SesemeError), and input a
user would expect to work (numpy or list audio, int16 PCM) is converted; `seseme batch` runs one at a time per
input and folder."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from seseme_cli.batch.manifest import exclusive_run
from seseme_cli.errors import InputError
from seseme_cli.speech.request import Segment, SpeechRequest, as_audio


@pytest.mark.parametrize("ms", [math.nan, math.inf, 0, -5, 79, "100", True])
def test_max_audio_length_must_be_a_finite_number_of_at_least_one_frame(tts, ms):
    with pytest.raises(InputError, match="max_audio_ms"):
        tts.generate("Hi.", max_audio_length_ms=ms)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=math.nan), "temperature"), (dict(temperature=-0.1), "temperature"),
    (dict(topk=0), "topk"), (dict(topk=2.5), "topk"), (dict(seed=-1), "seed"), (dict(seed=1 << 63), "seed"),
    (dict(speaker=-1), "speaker"), (dict(speaker=1.5), "speaker"), (dict(chunk_ms=100), "chunk_ms"),
])
def test_bad_settings(tts, kwargs, match):
    with pytest.raises(InputError, match=match):
        tts.generate("Hi.", max_audio_length_ms=160, **kwargs)


def test_text_must_be_a_non_empty_str(tts):
    with pytest.raises(InputError, match="not bytes"):
        tts.generate(b"Hi.")
    with pytest.raises(InputError, match="empty"):
        tts.generate("   ")
    with pytest.raises(InputError, match="must be a str"):
        tts.generate(42)


def test_setup_caches_takes_a_whole_number_of_rows(tts):
    for bad in (2.5, 0, -1, True, "2"):
        with pytest.raises(InputError, match="batch size"):
            tts.setup_caches(bad)


def test_decode_checks_its_codes(tts):
    with pytest.raises(InputError, match="0..2050"):
        tts.decode(torch.full((3, 32), -1))
    with pytest.raises(InputError, match="0..2050"):
        tts.decode(torch.full((3, 32), 5000))
    with pytest.raises(InputError, match=r"\(frames, 32\)"):
        tts.decode(torch.zeros(3, 31, dtype=torch.long))
    with pytest.raises(InputError, match="integers"):
        tts.decode(torch.zeros(3, 32))
    assert tts.decode(np.zeros((2, 32), dtype=np.int64)).shape == (2 * 1920,)  # numpy codes are fine


def test_segment_audio_as_numpy_list_or_int16_is_converted():
    tone = (0.25 * np.sin(np.arange(2400) / 10)).astype(np.float32)
    as_tensor = Segment(0, "A tone.", torch.from_numpy(tone)).audio
    assert torch.equal(Segment(0, "A tone.", tone).audio, as_tensor)
    assert torch.allclose(Segment(0, "A tone.", tone.tolist()).audio, as_tensor)
    pcm = np.round(tone * 32767).astype(np.int16)  # int16 PCM means the same sound, scaled into [-1, 1]
    assert (Segment(0, "A tone.", pcm).audio - as_tensor).abs().max() < 1e-4
    assert Segment(0, "A tone.", pcm).audio.dtype == torch.float32


@pytest.mark.parametrize("audio,match", [
    (np.zeros((2, 100), np.float32), "1-D"), (np.zeros(0, np.float32), "non-empty"),
    (np.array([0.0, math.nan], np.float32), "NaN"), ("noise.wav", "tensor, numpy array or list"),
    (np.zeros(10, dtype=bool), "float or int16"),
])
def test_bad_segment_audio(audio, match):
    with pytest.raises(InputError, match=match):
        as_audio(audio, "Segment.audio")


def test_context_must_be_segments(tts):
    with pytest.raises(InputError, match="context"):
        SpeechRequest.make("Hi.", context=[("a.wav", "text")])
    with pytest.raises(InputError, match="list of Segment"):
        SpeechRequest.make("Hi.", context=Segment(0, "x", np.zeros(10, np.float32)))


def test_a_second_batch_on_the_same_input_and_folder_stops_with_one_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "Hi."}) + "\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from seseme_cli.batch.manifest import exclusive_run\n"
        f"with exclusive_run(Path({str(tmp_path)!r}), Path({str(src)!r})):\n"
        "    print('held', flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([sys.executable, "-m", "seseme_cli", "batch", str(src), "--model", "tiny-random",
                                 "--device", "cpu"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert lines == [line for line in lines if line.startswith("error:")] and len(lines) == 1
        assert "another seseme batch is already running" in lines[0] and "Traceback" not in result.stderr
        assert not (tmp_path / "1.wav").exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive_run(tmp_path, src):  # free again once the holder is gone (even killed)
        pass
