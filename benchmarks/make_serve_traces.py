"""Writes the shipped serving traces (benchmarks/workloads/serve/*.json) for `bench serve`, seeded.

    python benchmarks/make_serve_traces.py

Each request: arrival time in seconds, prompt and output lengths in tokens.
Sized so that a `bench serve` of both modes on a 2-core CPU takes a few
minutes (README.md next to the traces says how each was made).
"""
import json
import math
import random
from pathlib import Path

OUT = Path(__file__).with_name("workloads") / "serve"


def lognormal(rng, median, sigma, lo, hi):
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def chat(rng):
    """ShareGPT-like chat: prompt and answer lengths log-normal and
    long-tailed (prompt median 180 tokens, answer median 60), Poisson
    arrivals at 3 requests per second."""
    reqs, t = [], 0.0
    for _ in range(40):
        reqs.append({"arrival": round(t, 3), "prompt": lognormal(rng, 180, 0.9, 8, 1024),
                     "output": lognormal(rng, 60, 0.7, 4, 256)})
        t += rng.expovariate(3.0)
    return {"name": "chat", "requests": reqs}


def long_context(rng):
    """Long documents with short answers: prompts of 1K to 4K tokens
    (uniform in 256-token steps), answers log-normal (median 48 tokens),
    Poisson arrivals at one request every 2 seconds."""
    reqs, t = [], 0.0
    for _ in range(8):
        reqs.append({"arrival": round(t, 3), "prompt": 256 * rng.randint(4, 16) + rng.randrange(0, 64),
                     "output": lognormal(rng, 48, 0.5, 16, 128)})
        t += rng.expovariate(0.5)
    return {"name": "long_context", "requests": reqs}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for make in (chat, long_context):
        doc = make(random.Random(f"serve-{make.__name__}"))
        doc["description"] = " ".join(make.__doc__.split())
        doc["arrival_unit"] = "s"
        doc = {k: doc[k] for k in ("name", "description", "arrival_unit", "requests")}
        (OUT / f"{doc['name']}.json").write_text(json.dumps(doc, indent=0) + "\n")
        print(doc["name"], len(doc["requests"]), "requests,", doc["requests"][-1]["arrival"], "s")
