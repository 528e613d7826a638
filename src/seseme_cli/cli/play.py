"""`seseme say --play`: the audio through the default output device while it is generated (sounddevice, i.e.
PortAudio; imported only here). Whether a device is there is checked before the model loads."""

from __future__ import annotations

from seseme_cli.errors import InputError

HINT = "write a file with -o instead"


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise InputError(f"--play: needs the sounddevice package (pip install sounddevice), or {HINT}") from None
    except OSError as e:  # the package is there, the PortAudio library it loads is not
        raise InputError(f"--play: cannot play audio here: {e} (install PortAudio, e.g. apt install "
                         f"libportaudio2), or {HINT}") from None
    return sounddevice


def check_output_device() -> str:
    """The default output device's name; one InputError line when there is none."""
    sd = _sounddevice()
    try:
        device = sd.query_devices(kind="output")
    except (sd.PortAudioError, ValueError) as e:
        raise InputError(f"--play: no audio output device here ({e}); {HINT}") from None
    return str(device["name"]) if isinstance(device, dict) else str(device)


class Player:
    """A sink (see audio.stream) that plays 1-D float chunks as they come. `write` blocks while the device's buffer
    is full, so playback paces the consumer, not generation (which runs ahead in its own thread)."""

    def __init__(self, sample_rate: int):
        sd = _sounddevice()
        self.sample_rate, self.samples = sample_rate, 0
        try:
            # latency "high": a deeper buffer rides out a slow frame instead of clicking.
            self.stream = sd.OutputStream(samplerate=sample_rate, channels=1, dtype="float32", latency="high")
            self.stream.start()
        except (sd.PortAudioError, ValueError) as e:
            raise InputError(f"--play: cannot open the audio output ({e}); {HINT}") from None
        self._errors = (sd.PortAudioError,)

    def write(self, audio) -> None:
        samples = audio.detach().float().clamp(-1.0, 1.0).cpu().numpy().reshape(-1, 1)
        try:
            self.stream.write(samples)
        except self._errors as e:
            self.abort()
            raise InputError(f"--play: the audio output failed ({e})") from None
        self.samples += len(samples)

    def commit(self) -> None:
        """Wait until everything written has been played."""
        try:
            self.stream.stop()
        finally:
            self.stream.close()

    def abort(self) -> None:
        """Stop at once (what is buffered is dropped)."""
        try:
            if not self.stream.closed:
                self.stream.abort()
        finally:
            self.stream.close()
