"""Write a `seseme batch` input of N short requests (for timing many requests). Usage:
python scripts/make_requests.py OUT.jsonl [N] [MAX_AUDIO_MS]"""

import json
import sys

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

path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512
max_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
with open(path, "w") as f:
    for i in range(n):
        f.write(json.dumps({"id": f"r{i:04d}", "text": SENTENCES[i % len(SENTENCES)], "speaker": i % 2,
                            "seed": i, "max_audio_ms": max_ms}) + "\n")
