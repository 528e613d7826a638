"""The body of `POST /v1/audio/speech`: OpenAI's fields, then seseme's own (all optional).

Unknown fields are refused (a typo such as `temprature` would otherwise be ignored silently), as OpenAI does.
Shapes and types are checked here; values that depend on the server (formats, voices, limits) in plan.py.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from seseme_cli.speech.request import SEED_SPACE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VoiceRef(_Strict):
    """OpenAI's custom-voice form: {"id": "NAME"}."""

    id: StrictStr


class ContextTurn(_Strict):
    """One turn of context before the text: what was said, by whom, and the audio (a base64 wav/flac/ogg/mp3)."""

    audio: StrictStr
    text: StrictStr = Field(min_length=1)
    speaker: int = Field(0, ge=0)


class SpeechBody(_Strict):
    # --- OpenAI's fields ---
    model: Optional[StrictStr] = None  # required by OpenAI; here the served model when left out
    input: StrictStr
    voice: Union[StrictStr, VoiceRef, None] = None  # None: no stored voice (speaker 0, or `speaker`)
    instructions: Optional[StrictStr] = None  # accepted and ignored: CSM takes no instructions (see X-Seseme-Ignored)
    response_format: StrictStr = "mp3"  # OpenAI's default
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    # --- seseme's fields ---
    stream: Optional[StrictBool] = None  # audio: send bytes as they are made; None = the format's default
    speaker: Optional[int] = Field(None, ge=0)  # CSM speaker id (default: the voice's, else 0)
    temperature: Optional[float] = Field(None, ge=0)
    topk: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=SEED_SPACE)
    max_audio_ms: Optional[float] = None
    context: list[ContextTurn] = Field(default_factory=list)

    @property
    def voice_name(self) -> str | None:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


FIELDS = tuple(SpeechBody.model_fields)
