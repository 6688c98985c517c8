"""Writes the shipped KV workloads (benchmarks/workloads/*.json), seeded.

    python benchmarks/make_workloads.py

Each request: arrival step, prompt and output lengths, and optionally a
shared-prefix id with the length of the shared part.
"""
import json
import math
import random
from pathlib import Path

OUT = Path(__file__).with_name("workloads")


def lognormal(rng, median, sigma, lo, hi):
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def chat(rng):
    """Chat traffic: short-to-medium prompts, half of them behind one of four
    system prompts, Poisson arrivals of ~1.5 requests per decode step."""
    reqs, t = [], 0.0
    for _ in range(400):
        t += rng.expovariate(1.5)
        shared = rng.random() < 0.5
        prefix_len = 512 if shared else 0
        prompt = prefix_len + lognormal(rng, 400, 0.8, 16, 4000)
        reqs.append({"arrival": int(t), "prompt": prompt, "output": lognormal(rng, 200, 0.7, 8, 1500),
                     "prefix": f"system{rng.randrange(4)}" if shared else None, "prefix_len": prefix_len})
    return {"name": "chat", "requests": reqs}


def long_context(rng):
    """Long documents: 8K-48K-token prompts with short answers, a few at a time,
    some asking several questions about the same document (shared prefix)."""
    reqs, t = [], 0.0
    for i in range(40):
        t += rng.expovariate(0.02)
        doc = rng.randrange(12)
        doc_len = 8192 + 4096 * (doc % 10)
        reqs.append({"arrival": int(t), "prompt": doc_len + rng.randrange(32, 256),
                     "output": lognormal(rng, 128, 0.5, 16, 512), "prefix": f"doc{doc}", "prefix_len": doc_len})
    return {"name": "long_context", "requests": reqs}


def multi_turn(rng):
    """Multi-turn chat: 60 conversations of 2 to 6 turns. Each turn's prompt
    is the conversation so far (earlier prompts and answers) plus a new user
    message; the next turn arrives some steps after this one could finish."""
    reqs, t = [], 0.0
    for c in range(60):
        t += rng.expovariate(0.1)
        arrival, so_far = t, 0
        for _ in range(rng.randrange(2, 7)):
            prompt = so_far + lognormal(rng, 120, 0.7, 8, 1500)
            output = lognormal(rng, 150, 0.6, 8, 800)
            reqs.append({"arrival": int(arrival), "prompt": prompt, "output": output, "conversation": f"c{c}"})
            so_far = prompt + output
            arrival += output + rng.randrange(20, 200)
    reqs.sort(key=lambda r: r["arrival"])  # turns of one conversation keep their order (strictly later)
    return {"name": "multi_turn", "requests": reqs}


def mixed_burst(rng):
    """Bursts of batch jobs (long prompts, long outputs) over a background of
    short chat turns: the mix of prefill-heavy and decode-heavy work shifts."""
    reqs = []
    for step in range(0, 3000, 1):
        if rng.random() < 0.4:
            reqs.append({"arrival": step, "prompt": lognormal(rng, 300, 0.6, 8, 2000),
                         "output": lognormal(rng, 100, 0.6, 4, 600), "prefix": None, "prefix_len": 0})
        if step % 700 == 0:
            for _ in range(24):
                reqs.append({"arrival": step, "prompt": lognormal(rng, 3000, 0.4, 500, 12000),
                             "output": lognormal(rng, 800, 0.4, 100, 2500), "prefix": "batchjob", "prefix_len": 256})
    return {"name": "mixed_burst", "requests": reqs}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for make in (chat, long_context, mixed_burst, multi_turn):
        doc = make(random.Random(make.__name__))
        doc["description"] = " ".join(make.__doc__.split())
        (OUT / f"{doc['name']}.json").write_text(json.dumps(doc, indent=0) + "\n")
        print(doc["name"], len(doc["requests"]), "requests")
