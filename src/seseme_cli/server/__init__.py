"""`seseme serve`: an OpenAI-compatible speech server over one engine loop (continuous batching, streaming).

- settings: the limits and options of one server, in one dataclass;
- service: the engine thread (load, warm up, run_forever, drain) and the door requests come in through;
- engine_process: the same door with the engine loop in a child process (the default on a GPU), over a pipe;
- voices: named voices (stored context: Mimi codes + transcript + speaker) and OpenAI's voice names;
- schemas, plan: the request body as OpenAI defines it (+ seseme's fields), checked into a SpeechRequest;
- context: inline context audio (base64) decoded into Segments;
- encoding: streaming encoders for pcm, wav, flac, mp3 and opus;
- responses: the ASGI response of one speech request (audio bytes, SSE events, or one whole file);
- metrics: Prometheus metrics, one registry per app;
- app: the FastAPI app; http: uvicorn with a draining shutdown.
- replicas: the service over several engine replicas (`--gpus N`: Ray actors, least-loaded routing).
"""
