"""Where the engine loop's time goes on a mixed workload: drive SpeechEngine directly (no files) with the requests
of `make_requests.py --mixed`, with and without decoding audio, and print frames/s against the frame engine's own
step rate, plus a cProfile of the loop's thread (time blocked in `synchronize` is the GPU's share).

    python scripts/profile_loop.py [--model random] [--n 1024] [--batch 512] [--profile out.txt]
"""

import argparse
import cProfile
import io
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_requests import mixed  # noqa: E402

from seseme_cli import load_csm_1b_optimized  # noqa: E402
from seseme_cli.speech.request import SpeechRequest  # noqa: E402


def requests(n: int) -> list[SpeechRequest]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        line = mixed(i, rng)
        out.append(SpeechRequest.make(line["text"], line["speaker"], max_audio_ms=line["max_audio_ms"], seed=line["seed"]))
    return out


def run(tts, reqs, batch: int, decode: bool, profile: cProfile.Profile | None):
    engine = tts.speech_engine(batch, decode_audio=decode, pcm16=True)
    for r in reqs:
        engine.add_request(r, keep_audio=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    engine.drain()
    if profile is not None:
        profile.disable()
    wall = time.perf_counter() - start
    frames, steps = engine.stats.frames, engine.stats.steps
    engine.close()
    return frames, wall, steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="random")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--profile", type=Path)
    args = p.parse_args()
    tts = load_csm_1b_optimized(args.model, device="cuda")
    reqs = requests(args.n)
    report = io.StringIO()
    for decode in (False, True):
        prof = cProfile.Profile() if args.profile else None
        frames, wall, steps = run(tts, reqs, args.batch, decode, prof)
        line = (f"decode_audio={decode}: {frames} frames in {wall:.2f} s = {frames / wall:.0f} frames/s, "
                f"{steps} steps, {wall / steps * 1000:.2f} ms/step, {frames * 0.08 / wall:.0f}x real time")
        print(line, flush=True)
        report.write(line + "\n")
        if prof is not None:
            stats = pstats.Stats(prof, stream=report)
            stats.sort_stats("tottime").print_stats(25)
    if args.profile:
        args.profile.write_text(report.getvalue())


if __name__ == "__main__":
    main()
