"""`seseme serve` (the OpenAI-compatible speech server) and `seseme voice add|list|remove` (its named voices).

cli/main.py lists both in its COMMANDS table (imported when they run). This module imports cli.main only inside the
commands, so either module may be imported first (the tests register them on their own Typer app).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from seseme_cli.errors import InputError
from seseme_cli.model.config import DEFAULT_MODEL
from seseme_cli.server.settings import DEFAULT_MODEL_NAME, ServerSettings, default_voices_dir
from seseme_cli.speech.request import FRAME_MS

VoicesDir = Annotated[Optional[Path], typer.Option(
    "--voices", envvar="SESEME_VOICES", show_default=False,
    help="Folder of named voices [default: $XDG_DATA_HOME/seseme/voices, i.e. ~/.local/share/seseme/voices].")]
ModelOption = Annotated[str, typer.Option(help="Hugging Face id, local checkpoint, 'random' or 'tiny-random'.")]
DeviceOption = Annotated[Optional[str], typer.Option(
    metavar="[cuda|cpu]", help="Where to run (default: cuda when available).", show_default=False)]


def _device(device: str | None) -> str:
    from seseme_cli.cli.common import Device, pick_device

    try:
        choice = Device(device) if device is not None else None
    except ValueError:
        raise InputError(f"--device must be cuda or cpu, got {device!r}") from None
    return pick_device(choice)


def _listen(host: str, port: int) -> socket.socket:
    """Bind the port before the model loads: a port in use is one error line, not a load then a failure."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = None,
    max_batch: Annotated[int, typer.Option(help="Requests generated together (engine rows).")] = 64,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a row; beyond that: 429.")] = 256,
    max_input_chars: Annotated[int, typer.Option(help="Longest `input` text, in characters.")] = 4096,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (inline context audio is base64).")]
    = 16 * 1024 * 1024,
    max_audio_ms: Annotated[float, typer.Option(help="Largest max_audio_ms a request may ask for.")] = 90_000,
    max_context_seconds: Annotated[float, typer.Option(help="Inline context audio per request, in seconds.")] = 120,
    voices: VoicesDir = None,
    openai_voices: Annotated[bool, typer.Option(
        help="Accept OpenAI's voice names (alloy, echo, ...) as speaker ids when no stored voice has the name.")] = True,
    served_model_name: Annotated[str, typer.Option(help="The model id clients send and /v1/models lists.")]
    = DEFAULT_MODEL_NAME,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="SESEME_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/*.", show_default=False)] = None,
    drain_timeout: Annotated[float, typer.Option(
        help="On SIGTERM, seconds in-flight requests may take before they are aborted.")] = 60,
    switch_interval_ms: Annotated[float, typer.Option(
        help="Python's GIL switch interval while serving: how long the engine thread may wait for the GIL "
             "the HTTP side holds (Python's default is 5).")] = 1.0,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level (debug, info, warning, error).")] = "info",
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    gpus: Annotated[Optional[str], typer.Option(
        metavar="N|all", show_default=False,
        help="Serve from N GPUs (or all), one engine replica each, through Ray (the `ray` extra); each request goes "
             "to the least-loaded replica, --max-batch and --max-queue are per replica. Default: one GPU, in this "
             "process.")] = None,
    engine_process: Annotated[Optional[bool], typer.Option(
        "--engine-process/--in-process", show_default=False,
        help="Run the engine in a process of its own, so that HTTP work never holds the GIL the engine's frames "
             "need (default: on a GPU), or in the server's process (default on the CPU).")] = None,
    replicas: Annotated[Optional[int], typer.Option(
        hidden=True, help="Engine replicas on the CPU (with --device cpu): the --gpus path, for tests.")] = None,
) -> None:
    """Serve OpenAI's /v1/audio/speech (streaming, continuous batching) until SIGTERM or Ctrl+C, then drain."""
    from seseme_cli.cli.common import err, load_model, out, user_errors
    from seseme_cli.errors import SesemeError
    from seseme_cli.server.app import create_app
    from seseme_cli.server.http import make_server
    from seseme_cli.server.engine_process import EngineProcessService, engine_process_default
    from seseme_cli.server.service import SpeechService

    with user_errors():
        settings = ServerSettings(
            model=model, served_model_name=served_model_name, max_batch=max_batch, max_queue=max_queue,
            max_input_chars=max_input_chars, max_body_bytes=max_body_bytes, max_audio_ms=max_audio_ms,
            max_context_seconds=max_context_seconds, voices_dir=voices or default_voices_dir(),
            openai_voices=openai_voices, api_key=api_key or None, drain_timeout_s=drain_timeout,
            switch_interval_ms=switch_interval_ms)
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise InputError(f"--log-level must be debug, info, warning or error, got {log_level!r}")
        settings.device = _device(device)
        count = 1
        if gpus is not None or replicas is not None:
            from seseme_cli.replicas.cluster import replica_count

            count = replica_count(gpus, replicas, settings.device)
        sock = _listen(host, port)
        url = _url(host, sock.getsockname()[1])
        if count > 1:
            from seseme_cli.replicas.cluster import ReplicaSpec
            from seseme_cli.server.replicas import ReplicaService

            service = ReplicaService(ReplicaSpec(count, model, settings.device), settings).start()
        elif engine_process if engine_process is not None else engine_process_default(settings.device):
            service = EngineProcessService(settings).start()
        else:
            service = SpeechService(lambda: load_model(model, settings.device), settings).start()
        app = create_app(service, settings)
        per = f" on each of {count} engine replicas" if count > 1 else ""

        def ready(server) -> None:
            out.print(f"seseme serve: ready on {url} (POST {url}/v1/audio/speech; model {service.tts.description}, "
                      f"{settings.max_batch} rows, queue {settings.max_queue}{per})", markup=False)
            if count > 1 and service.tts.is_random:  # one process loads the model: load_model's warning
                err.print(f"WARNING: --model {model} has RANDOM weights: the output is noise, not speech.",
                          style="bold red", markup=False)

        server = make_server(app, service, host, port, settings.drain_timeout_s, ready, log_level, access_log)
        err.print(f"seseme serve: listening on {url}; /health answers 503 until the model is loaded", markup=False)
        try:
            server.run(sockets=[sock])
        finally:
            service.stop()
            sock.close()
        if service.error is not None:
            if isinstance(service.error, SesemeError):
                raise service.error
            raise SesemeError(f"the engine failed: {type(service.error).__name__}: {service.describe_error()}")
        if server.aborted:
            err.print(f"seseme serve: drained after {settings.drain_timeout_s:g} s; requests still running then were "
                      f"aborted", style="yellow", markup=False)


# --- voices ----------------------------------------------------------------------------------------------------

voice_app = typer.Typer(help="Named voices for `seseme serve`: a clip's Mimi codes, its transcript and speaker.",
                        no_args_is_help=True)


@voice_app.command("add")
def voice_add(
    name: Annotated[str, typer.Argument(help="Voice name (letters, digits, '_', '-'); requests name it as `voice`.")],
    clip: Annotated[Path, typer.Argument(help="Audio clip of the voice (wav, flac, ogg, mp3), ideally 5-20 s.")],
    transcript: Annotated[str, typer.Argument(help="What is said in the clip.")],
    speaker: Annotated[int, typer.Option(help="Speaker id of the voice (CSM's speaker token).")] = 0,
    voices: VoicesDir = None,
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a voice of the same name.")] = False,
) -> None:
    """Encode CLIP once with the model's codec and store it as voice NAME."""
    from seseme_cli.audio.files import load_audio
    from seseme_cli.cli.common import SAMPLE_RATE, err, out, user_errors
    from seseme_cli.model.checkpoints import load_checkpoint
    from seseme_cli.server.voices import MAX_VOICE_SECONDS, VoiceFolder, check_name, codec_id

    with user_errors():
        check_name(name)
        folder = VoiceFolder(voices or default_voices_dir())
        if not transcript.strip():
            raise InputError("the transcript is empty: give what is said in the clip")
        if speaker < 0:
            raise InputError(f"--speaker must be >= 0, got {speaker}")
        if (folder.folder / f"{name}.json").exists() and not force:
            raise InputError(f"voice {name!r} already exists in {folder.folder}: pass --force to replace it")
        audio = load_audio(clip, target_sample_rate=SAMPLE_RATE)
        if len(audio) / SAMPLE_RATE > MAX_VOICE_SECONDS:
            raise InputError(f"{clip} is {len(audio) / SAMPLE_RATE:.0f} s long; a voice may be at most "
                             f"{MAX_VOICE_SECONDS:.0f} s: cut it shorter")
        device_name = _device(device)
        with err.status(f"encoding {clip} with the codec of {model}..."):
            checkpoint = load_checkpoint(model)  # only the codec is needed: the 1B model is not built
            codec = checkpoint.make_codec(device_name)
            codes = codec.encode(audio).cpu().T.contiguous()  # (frames, K), as CSM.encode_audio makes them
        path = folder.add(name, codes, transcript, speaker, codec_id(codec), checkpoint.description, str(clip), force)
        out.print(f"added voice {name}: {codes.shape[0]} frames ({codes.shape[0] * FRAME_MS / 1000:.2f} s), speaker {speaker}, "
                  f"in {path.parent}", markup=False)


@voice_app.command("list")
def voice_list(voices: VoicesDir = None) -> None:
    """List the stored voices."""
    from rich.table import Table

    from seseme_cli.cli.common import out, user_errors
    from seseme_cli.server.voices import VoiceFolder

    with user_errors():
        folder = VoiceFolder(voices or default_voices_dir())
        names = folder.names()
        if not names:
            out.print(f"no voices in {folder.folder} (add one with `seseme voice add NAME CLIP TRANSCRIPT`)",
                      markup=False)
            return
        table = Table(title=str(folder.folder))
        for column in ("name", "speaker", "seconds", "transcript", "model"):
            table.add_column(column, justify="right" if column in ("speaker", "seconds") else "left")
        for name in names:
            try:
                meta = folder.metadata(name)
            except InputError as e:
                table.add_row(name, "", "", f"(unreadable: {e})", "")
                continue
            table.add_row(name, str(meta.get("speaker")), f"{meta.get('frames', 0) * FRAME_MS / 1000:.2f}",
                          str(meta.get("transcript", "")), str(meta.get("model", "")))
        out.print(table)


@voice_app.command("remove")
def voice_remove(name: Annotated[str, typer.Argument(help="The voice to remove.")], voices: VoicesDir = None) -> None:
    """Remove a stored voice."""
    from seseme_cli.cli.common import out, user_errors
    from seseme_cli.server.voices import VoiceFolder

    with user_errors():
        folder = VoiceFolder(voices or default_voices_dir())
        folder.remove(name)
        out.print(f"removed voice {name} from {folder.folder}", markup=False)
