"""A checked speech request body -> what to generate (a SpeechRequest) and how to send it (a Plan).

Everything that can be refused is refused here, before the request is queued, as a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field

import pydantic

from seseme_cli.errors import InputError
from seseme_cli.server import encoding
from seseme_cli.server.context import decode_context
from seseme_cli.server.errors import ApiError, bad_request
from seseme_cli.server.schemas import FIELDS, ContextTurn, SpeechBody, VoiceRef
from seseme_cli.server.settings import ServerSettings
from seseme_cli.speech.request import DEFAULT_MAX_AUDIO_MS, DEFAULT_TEMPERATURE, DEFAULT_TOPK, SpeechRequest


@dataclass
class Plan:
    request: SpeechRequest
    format: str
    stream: bool  # bytes leave as they are made (else one whole file at the end)
    sse: bool
    request_id: str
    ignored: list[str] = field(default_factory=list)  # fields accepted but without effect (instructions)

    @property
    def media_type(self) -> str:
        return "text/event-stream" if self.sse else encoding.MEDIA_TYPES[self.format]


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> SpeechBody:
    """JSON bytes -> SpeechBody, whatever the Content-Type said (curl -d sends a form type by default)."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)  # NaN and Infinity are not JSON
    except UnicodeDecodeError:
        raise bad_request("the body is not UTF-8 JSON", code="invalid_json") from None
    except ValueError as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    try:
        return SpeechBody.model_validate(data)
    except pydantic.ValidationError as e:
        raise validation_error(e.errors()) from None


_NAMES = {*FIELDS, *ContextTurn.model_fields, *VoiceRef.model_fields}


def validation_error(errors) -> ApiError:
    """pydantic's errors -> one 400 naming the first bad field (FastAPI's 422 shape never reaches a client)."""
    first = errors[0]
    # A location is field names and list indices; pydantic adds the member tried for a union ('str', 'VoiceRef').
    extra = first.get("type") == "extra_forbidden"  # then the last part is the unknown name itself
    loc = [str(p) for p in first.get("loc", ()) if isinstance(p, int) or p in _NAMES or extra]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    if extra:
        known = f"; the fields are: {', '.join(FIELDS)}" if len(loc) == 1 else ""
        return bad_request(f"unknown field {param!r}{known}", param, code="unknown_parameter")
    if param == "voice":
        return bad_request('voice must be a voice name or {"id": NAME}', param)
    if first.get("type") == "missing":
        return bad_request(f"{param} is required", param, code="missing_required_parameter")
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid body")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param)


def _check_format(body: SpeechBody) -> str:
    fmt = body.response_format.lower()
    if fmt in encoding.UNSUPPORTED:
        raise bad_request(f"response_format {fmt!r} is not supported: {encoding.UNSUPPORTED[fmt]}; use one of "
                          f"{', '.join(encoding.FORMATS)}", "response_format", "unsupported_format")
    if fmt not in encoding.FORMATS:
        raise bad_request(f"unknown response_format {body.response_format!r}; use one of "
                          f"{', '.join(encoding.FORMATS)}", "response_format")
    return fmt


def _check_stream(body: SpeechBody, fmt: str) -> bool:
    if body.stream_format == "sse":
        if body.stream is False:
            raise bad_request("stream_format 'sse' is a stream of events: leave out stream, or set it true", "stream")
        return True
    return encoding.STREAMS_BY_DEFAULT[fmt] if body.stream is None else body.stream


async def make_plan(body: SpeechBody, settings: ServerSettings, voices, sample_rate: int,
                    request_id: str | None = None) -> Plan:
    """Check the body against the server and build the request (inline context decoded in a worker thread)."""
    if body.model is not None and body.model not in settings.model_names:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server speaks with "
                            f"{', '.join(settings.model_names)}", param="model", code="model_not_found")
    if len(body.input) > settings.max_input_chars:
        raise bad_request(f"input is {len(body.input)} characters long; the limit is {settings.max_input_chars}",
                          "input", "string_above_max_length")
    text = " ".join(body.input.split())
    if not text:
        raise bad_request("input is empty: give the text to speak", "input", "empty_input")
    if body.speed != 1.0:
        raise bad_request(f"speed {body.speed:g} is not supported: seseme speaks at the model's own pace, so speed "
                          f"must be 1.0 (or left out)", "speed", "unsupported_value")
    fmt = _check_format(body)
    stream = _check_stream(body, fmt)
    max_audio_ms = body.max_audio_ms if body.max_audio_ms is not None else min(DEFAULT_MAX_AUDIO_MS, settings.max_audio_ms)
    if not max_audio_ms <= settings.max_audio_ms:  # also refuses NaN
        raise bad_request(f"max_audio_ms may be at most {settings.max_audio_ms:g} on this server", "max_audio_ms")
    if len(body.context) > settings.max_context_turns:
        raise bad_request(f"context has {len(body.context)} turns; the limit is {settings.max_context_turns}",
                          "context")

    speaker, context = 0, ()
    if body.voice_name is not None:
        try:
            voice = voices.resolve(body.voice_name)
        except InputError as e:
            raise bad_request(str(e), "voice", "voice_not_found") from None
        speaker, context = voice.speaker, voice.context
    if body.speaker is not None:
        speaker = body.speaker
    if body.context:
        context = (*context, *await asyncio.to_thread(decode_context, body.context, sample_rate,
                                                      settings.max_context_seconds))
    try:
        request = SpeechRequest.make(
            text, speaker, context, max_audio_ms,
            DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            DEFAULT_TOPK if body.topk is None else body.topk, body.seed)
    except InputError as e:  # the engine's own checks, should one be stricter than the schema's
        raise bad_request(str(e)) from None
    return Plan(request, fmt, stream, body.stream_format == "sse", request_id or f"speech_{uuid.uuid4().hex}",
                ["instructions"] if body.instructions else [])
