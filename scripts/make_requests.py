"""Write a `seseme batch` input for timing many requests.

    python scripts/make_requests.py OUT.jsonl [N] [MAX_AUDIO_MS]      N equal short requests (default 512, 4000 ms)
    python scripts/make_requests.py OUT.jsonl 1024 --mixed            a mixed workload: 3-40 words, 0.5-12 s of
                                                                      audio, two speakers (seeded: the same file
                                                                      every time)

Random weights never end a generation on their own, so each request runs to its max_audio_ms: the lengths of the
workload are the max_audio_ms values.
"""

import argparse
import json
import random

SENTENCES = [
    "Your order has shipped and should arrive on Thursday.",
    "Please hold while I transfer your call.",
    "The meeting moved to half past three.",
    "Turn left at the next light, then keep right.",
    "Thanks for waiting, your table is ready.",
    "It will be sunny this afternoon with a light breeze.",
    "Remember to bring your ticket and a photo ID.",
    "The library closes early on public holidays.",
]
WORDS = " ".join(SENTENCES).replace(",", "").replace(".", "").split()


def mixed(i: int, rng: random.Random) -> dict:
    words = rng.randint(3, 40)
    text = " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."
    return {"id": f"m{i:05d}", "text": text, "speaker": i % 2, "seed": i,
            "max_audio_ms": rng.randrange(500, 12_001, 80)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("n", nargs="?", type=int, default=512)
    parser.add_argument("max_audio_ms", nargs="?", type=int, default=4000)
    parser.add_argument("--mixed", action="store_true", help="mixed text lengths and audio lengths")
    args = parser.parse_args()
    rng = random.Random(0)
    with open(args.out, "w") as f:
        for i in range(args.n):
            line = mixed(i, rng) if args.mixed else {
                "id": f"r{i:04d}", "text": SENTENCES[i % len(SENTENCES)], "speaker": i % 2, "seed": i,
                "max_audio_ms": args.max_audio_ms}
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
