"""The options and limits of one server, in one place (the CLI fills them from its flags, tests directly)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from seseme_cli.errors import InputError
from seseme_cli.speech.request import DEFAULT_MAX_AUDIO_MS, FRAME_MS

DEFAULT_MODEL_NAME = "csm-1b"
# OpenAI's speech model names, accepted as aliases so that clients written for OpenAI work unchanged.
OPENAI_MODEL_NAMES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")


def default_voices_dir() -> Path:
    """$SESEME_VOICES, else $XDG_DATA_HOME/seseme/voices (~/.local/share/seseme/voices): where `seseme voice add`
    stores voices and `seseme serve` finds them when neither is given --voices."""
    if os.environ.get("SESEME_VOICES"):
        return Path(os.environ["SESEME_VOICES"]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "seseme" / "voices"


@dataclass
class ServerSettings:
    model: str = "sesame/csm-1b"  # what to load (--model)
    device: str = "cpu"
    served_model_name: str = DEFAULT_MODEL_NAME  # the id clients send as `model` and /v1/models lists
    max_batch: int = 64  # engine rows: requests generated together
    max_queue: int = 256  # requests waiting for a row; beyond this: 429
    max_input_chars: int = 4096  # OpenAI's limit
    max_body_bytes: int = 16 * 1024 * 1024  # room for inline context audio (base64)
    max_audio_ms: float = DEFAULT_MAX_AUDIO_MS  # the most a request may ask for per generation
    max_context_turns: int = 8
    max_context_seconds: float = 120.0  # inline context audio per request, all turns together
    voices_dir: Path | None = None
    openai_voices: bool = True  # map OpenAI's voice names to speaker ids when no stored voice has the name
    api_key: str | None = None  # when set, /v1/* wants `Authorization: Bearer <key>`
    drain_timeout_s: float = 60.0  # on SIGTERM: how long in-flight requests may take before they are aborted
    retry_after_s: int = 1  # Retry-After of a 429 (queue full)
    unavailable_retry_after_s: int = 5  # Retry-After of a 503 (loading, draining)
    warm_up: bool = True  # speak one short request before /health says ready
    # Python's GIL switch interval while serving (sys.setswitchinterval). The engine thread lets go of the GIL at
    # every CUDA launch and sync; when the HTTP side holds it then, the engine waits for the interval (Python's
    # default: 5 ms) before it can ask for it back: many times per step at hundreds of streams.
    switch_interval_ms: float = 1.0
    aliases: tuple[str, ...] = field(default=OPENAI_MODEL_NAMES)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_input_chars", "max_body_bytes", "max_context_turns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_context_turns" else 1):
                raise InputError(f"--{name.replace('_', '-')} must be a positive whole number, got {value!r}")
        if not 0.05 <= self.switch_interval_ms <= 100:
            raise InputError(f"--switch-interval-ms must be between 0.05 and 100, got {self.switch_interval_ms}")
        if not self.max_audio_ms >= FRAME_MS:
            raise InputError(f"--max-audio-ms must be at least {FRAME_MS}, got {self.max_audio_ms}")
        if not self.served_model_name.strip():
            raise InputError("--served-model-name must not be empty")
        if self.voices_dir is not None:
            self.voices_dir = Path(self.voices_dir).expanduser()

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every `model` value a request may name: ours first, then the aliases."""
        return (self.served_model_name, *[a for a in self.aliases if a != self.served_model_name])
