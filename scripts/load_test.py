"""Load generator for `seseme serve`: N concurrent streaming clients over real HTTP, as listeners feel it.

    python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 1,8,64,256,512 --json out.json

For each N, N clients each speak requests back to back for --seconds (so N streams are in flight at all times),
each a text drawn from a realistic mix (short voice-agent turns, a few sentences, a paragraph), streamed as raw
PCM (the bytes say exactly how much audio has arrived). Per N it reports:
- time to first audio (request sent -> first audio byte), p50 / p90 / p99;
- the share of streams that never stall: a listener starts playing at the first byte (plus --prebuffer-ms) and
  a stall is a chunk that arrives after the audio received before it has finished playing;
- the aggregate real-time factor: seconds of audio received per wall second, all streams together;
- the same first-audio and stall figures for the requests sent after the ramp only (clients' later requests,
  arriving as earlier ones end, not in the ramp's burst of N new streams);
- errors by HTTP status (429: the server's queue was full; size --max-queue to at least N - --max-batch).

Random weights never end a generation by themselves, so each request asks for max_audio_ms in proportion to its
text (--ms-per-char, ~14 characters per second of speech): the durations a real model would speak. With real
weights this is only a cap. Needs only httpx (and uses uvloop when it is installed). The server must run with
--max-batch >= the largest N to batch every stream, e.g. `seseme serve --max-batch 512 --max-queue 1024`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import httpx

SAMPLE_RATE = 24_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # s16le mono

SHORT = ["Sure, I can help with that.", "Your order has shipped.", "Could you repeat the account number?",
         "Thanks for waiting.", "One moment, please.", "That's right.", "Is there anything else?",
         "The meeting starts at three.", "I've sent you a confirmation email.", "Great, you're all set!"]
SENTENCES = [
    "The train to the airport leaves every fifteen minutes from platform four.",
    "If you would like to change your delivery address, I can do that for you right now.",
    "Our support team is available around the clock, including weekends and public holidays.",
    "The forecast for tomorrow shows light rain in the morning, clearing up by the afternoon.",
    "Please keep your receipt, because you will need it if you decide to return the item.",
    "She opened the old wooden box and found a stack of letters tied with a faded ribbon.",
    "Before we continue, I need to confirm a few details about your reservation.",
    "The museum's new exhibition brings together paintings that have never been shown side by side.",
    "Most customers find that the basic plan covers everything they need for the first year.",
    "He walked along the river until the lights of the city disappeared behind the hills.",
]
# (weight, how many sentences): half short turns, a third a few sentences, the rest a paragraph
MIX = [(0.5, 0), (0.35, 2), (0.15, 6)]


def make_text(rng: random.Random) -> str:
    r, acc = rng.random(), 0.0
    for weight, sentences in MIX:
        acc += weight
        if r <= acc:
            break
    if sentences == 0:
        return rng.choice(SHORT)
    return " ".join(rng.choice(SENTENCES) for _ in range(sentences))


class Stream:
    """One request's timeline: when it was sent, when each chunk came and how many bytes."""

    def __init__(self, text: str):
        self.text, self.sent = text, time.perf_counter()
        self.first: float | None = None
        self.bytes = 0
        self.stalls = 0
        self.stall_s = 0.0
        self.status: int | str | None = None
        self.retry_after = 1.0
        self.ended: float | None = None
        self.arrivals: list[tuple[float, int]] = []  # (time, bytes) of each chunk
        self._played_until = 0.0  # wall time at which the audio received so far finishes playing

    def chunk(self, size: int, now: float, prebuffer_s: float) -> None:
        if self.first is None:
            self.first = now
            self._played_until = now + prebuffer_s
        elif now > self._played_until:  # the listener ran out of audio before this chunk came
            self.stalls += 1
            self.stall_s += now - self._played_until
            self._played_until = now
        self._played_until += size / BYTES_PER_SECOND
        self.bytes += size
        self.arrivals.append((now, size))

    @property
    def audio_s(self) -> float:
        return self.bytes / BYTES_PER_SECOND


async def one_request(client: httpx.AsyncClient, url: str, text: str, args) -> Stream:
    stream = Stream(text)
    body = {"model": args.model, "input": text, "response_format": "pcm",
            "max_audio_ms": min(args.max_audio_ms, max(1000, len(text) * args.ms_per_char))}
    if args.voice:
        body["voice"] = args.voice
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as r:
            stream.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                stream.retry_after = float(r.headers.get("retry-after", "1") or 1)
            else:
                async for data in r.aiter_raw():
                    stream.chunk(len(data), time.perf_counter(), args.prebuffer_ms / 1000)
    except httpx.HTTPError as e:
        stream.status = type(e).__name__
    stream.ended = time.perf_counter()
    return stream


async def client_loop(client, url, args, rng: random.Random, until: float, out: list) -> None:
    await asyncio.sleep(rng.uniform(0, args.ramp_s))  # arrivals spread over the ramp, not one thundering herd
    while time.perf_counter() < until:
        stream = await one_request(client, url, make_text(rng), args)
        out.append(stream)
        if stream.status == 429 or stream.status == 503:
            await asyncio.sleep(stream.retry_after)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def client_group(url: str, clients: list[int], args, until: float) -> list[Stream]:
    limits = httpx.Limits(max_connections=len(clients) + 8, max_keepalive_connections=len(clients) + 8)
    timeout = httpx.Timeout(args.timeout_s, connect=30.0)
    streams: list[Stream] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(client_loop(client, url, args, random.Random(args.seed * 100_003 + i), until, streams)
                               for i in clients))
    return streams


def run_group(url: str, clients: list[int], args, until: float) -> list[Stream]:
    """One client process's share of the clients (its own event loop)."""
    return event_loop_runner()(client_group(url, clients, args, until))


def event_loop_runner():
    try:
        import uvloop

        return uvloop.run
    except (ImportError, AttributeError):
        return asyncio.run


def run_level(url: str, n: int, args) -> dict:
    """N clients, spread over --processes client processes: one Python event loop reading hundreds of streams
    (and opening their connections at once) falls behind, and its lag would be counted as the server's. The
    processes' clocks agree: time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for the whole machine."""
    processes = max(1, min(n, args.processes or (1 if n < 64 else min(8, max(1, (os.cpu_count() or 2) // 2)))))
    groups = [list(range(i, n, processes)) for i in range(processes)]
    started = time.perf_counter()
    until = started + args.ramp_s + args.seconds
    if processes == 1:
        streams = run_group(url, groups[0], args, until)
    else:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            streams = [s for part in pool.map(run_group, [url] * processes, groups, [args] * processes,
                                              [until] * processes) for s in part]
    wall = time.perf_counter() - started
    ok = [s for s in streams if s.status == 200 and s.first is not None]
    errors: dict[str, int] = {}
    for s in streams:
        if s.status != 200:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    ttfa = [1000 * (s.first - s.sent) for s in ok]
    audio = sum(s.audio_s for s in ok)
    # Steady state: audio that arrived after the ramp and before the last request started (all N streams busy).
    lo, hi = started + args.ramp_s, until
    # Requests sent after the ramp: each replaces one that ended, so they arrive at the workload's own rate and
    # not in the ramp's burst (N new streams within --ramp-s, each waiting for its prefill behind the others).
    later = [s for s in ok if s.sent >= lo]
    later_ttfa = [1000 * (s.first - s.sent) for s in later]
    steady = sum(size for s in ok for t, size in s.arrivals if lo <= t <= hi) / BYTES_PER_SECOND
    never = [s for s in ok if s.stalls == 0]
    rtf = [s.audio_s / (s.ended - s.first) for s in ok if s.ended - s.first > 0]
    return {
        "concurrency": n,
        "client_processes": processes,
        "requests": len(streams),
        "completed": len(ok),
        "errors": errors,
        "ttfa_ms": {"p50": percentile(ttfa, 0.5), "p90": percentile(ttfa, 0.9), "p99": percentile(ttfa, 0.99),
                    "max": max(ttfa, default=None)},
        "no_stall_share": len(never) / len(ok) if ok else None,
        "after_ramp": {"requests": len(later),
                       "ttfa_ms": {"p50": percentile(later_ttfa, 0.5), "p99": percentile(later_ttfa, 0.99)},
                       "no_stall_share": sum(s.stalls == 0 for s in later) / len(later) if later else None},
        "stalls_per_stream": statistics.fmean(s.stalls for s in ok) if ok else None,
        "stall_s_p99": percentile([s.stall_s for s in ok], 0.99),
        "audio_s": audio,
        "wall_s": wall,
        "aggregate_rtf": steady / (hi - lo) if hi > lo else None,  # audio seconds per second, all streams
        "aggregate_rtf_whole_run": audio / wall if wall else None,
        "stream_rtf_p50": percentile(rtf, 0.5),  # how much faster than real time one stream's audio arrived
        "stream_rtf_p01": percentile(rtf, 0.01),
        "mean_audio_s_per_request": audio / len(ok) if ok else None,
    }


async def wait_ready(url: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            try:
                r = await client.get(f"{url}/health")
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"error: {url}/health did not answer 200 within {seconds:g} s")
            await asyncio.sleep(0.5)


def print_table(levels: list[dict], slo_ms: float) -> None:
    head = f"{'N':>5} {'reqs':>6} {'err':>5} {'ttfa p50':>9} {'p90':>7} {'p99':>7} {'no stall':>9} {'agg RTF':>8} " \
           f"{'stream RTF p50':>15} | after the ramp: {'reqs':>5} {'ttfa p50':>9} {'p99':>7} {'no stall':>9}"
    print(head)
    for lv in levels:
        t = lv["ttfa_ms"]

        def ms(v):
            return f"{v:.0f}" if v is not None else "-"

        share = f"{100 * lv['no_stall_share']:.1f}%" if lv["no_stall_share"] is not None else "-"
        rtf = f"{lv['stream_rtf_p50']:.1f}" if lv["stream_rtf_p50"] is not None else "-"
        later = lv["after_ramp"]
        later_share = f"{100 * later['no_stall_share']:.1f}%" if later["no_stall_share"] is not None else "-"
        print(f"{lv['concurrency']:>5} {lv['requests']:>6} {sum(lv['errors'].values()):>5} {ms(t['p50']):>9} "
              f"{ms(t['p90']):>7} {ms(t['p99']):>7} {share:>9} {lv['aggregate_rtf'] or 0:>8.1f} {rtf:>15} | "
              f"{'':>15} {later['requests']:>5} {ms(later['ttfa_ms']['p50']):>9} {ms(later['ttfa_ms']['p99']):>7} "
              f"{later_share:>9}")
    good = [lv["concurrency"] for lv in levels if lv["ttfa_ms"]["p99"] is not None and lv["ttfa_ms"]["p99"] < slo_ms
            and lv["no_stall_share"] == 1.0 and not lv["errors"]]
    print(f"largest N with p99 time to first audio < {slo_ms:g} ms, no stall and no error: "
          f"{max(good) if good else 'none'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,8,64,256,512", help="comma-separated numbers of concurrent clients")
    p.add_argument("--seconds", type=float, default=30.0, help="how long each level keeps starting requests")
    p.add_argument("--ramp-s", type=float, default=1.0, help="clients start spread over this many seconds")
    p.add_argument("--prebuffer-ms", type=float, default=0.0, help="audio a listener buffers before playing")
    p.add_argument("--ms-per-char", type=float, default=70.0, help="max_audio_ms per character of text")
    p.add_argument("--max-audio-ms", type=float, default=30_000.0)
    p.add_argument("--model", default="csm-1b")
    p.add_argument("--voice", default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the texts each client draws")
    p.add_argument("--timeout-s", type=float, default=300.0, help="read timeout of one request")
    p.add_argument("--wait-ready-s", type=float, default=600.0, help="wait this long for /health to say ready")
    p.add_argument("--ttfa-slo-ms", type=float, default=150.0)
    p.add_argument("--processes", type=int, default=None,
                   help="client processes (default: 1 below 64 clients, else up to 8, half the CPUs)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        levels_wanted = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    if not levels_wanted or min(levels_wanted) < 1:
        p.error("--concurrency needs numbers >= 1")
    url = args.url.rstrip("/")
    health = event_loop_runner()(wait_ready(url, args.wait_ready_s))
    levels = []
    for n in levels_wanted:
        print(f"N = {n}: {args.seconds:g} s of back-to-back streams...", file=sys.stderr, flush=True)
        levels.append(run_level(url, n, args))
    print_table(levels, args.ttfa_slo_ms)
    if args.json_path:
        result = {"url": url, "server": health, "args": vars(args), "levels": levels,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
