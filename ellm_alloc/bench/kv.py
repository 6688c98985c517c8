"""`bench kv`: a request workload through the KV manager and two baselines.

The same workload (arrival step, prompt length, output length, optional
shared-prefix id) runs through a continuous-batching loop three times, each
on a fresh host pool with the same budget:

  ellm         two-level pages, elastic (only chunks under used blocks mapped)
  max-page     every group padded to the largest page (single page size),
               elastic the same way
  static       two-level pages, but a fixed share of the budget per group,
               held whether used or not (a static per-type partition)
  ellm+swap    ellm, with a host tier as large as the budget: a preempted
               request's KV is swapped to host memory and swapped back in
               before new requests are admitted, instead of being dropped
               and recomputed (a preemption recomputes only when the host
               tier is full). A swapped request comes back, earliest
               arrival first, once the pool has its chunks plus one chunk
               per running request: without that margin it would be the
               next step's victim again, and swaps would ping-pong

Recurrent states (Mamba / linear-attention layers) are updated out of place
by default, as a serving engine's state-index kernels do: a request crossing
a state checkpoint reads its state from the checkpoint's block and writes it
to a fresh one, so nothing is copied. --state-update copy models kernels that
update a state in place (transformers' models): the state is copied into the
fresh block, and those bytes are counted.

Figures per allocator: KV utilisation (bytes the live tokens need / bytes
held for KV) averaged over steps and at the step of peak need; the peak
number of concurrent requests; the prefix-cache hit rate (cached prompt
tokens / prompt tokens, over admissions); preemptions, the tokens they made
recompute (KV that was dropped: prompt and output so far), and for
ellm+swap the swaps and bytes moved each way.

Workload JSON:
  {"name": str, "requests": [{"arrival": int, "prompt": int, "output": int,
    "prefix": str | null, "prefix_len": int}]}
`prefix`/`prefix_len`: the first prefix_len prompt tokens are shared by every
request naming the same prefix. `conversation` (instead of a prefix): the
requests naming the same conversation are its turns, in file order; a turn's
prompt is the previous turn's prompt and output followed by new tokens (its
`prompt` counts them all, so it must exceed the previous turn's length). For models with cross-attention layers each
request also carries its own image id, which is part of its block hashes.
"""
from __future__ import annotations

import bisect
import heapq
import json
import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..config import human
from ..pool import Pool

WORKLOADS = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads"


@dataclass
class WorkItem:
    index: int
    arrival: int
    prompt: list[int]
    output: list[int]
    extra_keys: tuple


# Limits on a workload file: beyond them it is a mistake, not a workload (and
# making its token ids would exhaust memory).
MAX_REQUEST_TOKENS = 1 << 22  # 4M tokens of prompt or of output per request
MAX_WORKLOAD_TOKENS = 1 << 24  # 16M tokens, 15x the largest shipped workload; ~0.6 GB of token ids
MAX_ARRIVAL = 1 << 30


def _field(path, i: int, r: dict, key: str, lo: int, hi: int, default=None) -> int:
    """An integer field of request i within [lo, hi], with an error naming the field and the limit."""
    if key not in r:
        if default is not None:
            return default
        raise ValueError(f"{path}: request {i} needs integer 'arrival', 'prompt' and 'output': {r}")
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{path}: request {i}: '{key}' must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{path}: request {i}: '{key}' must be between {lo} and {hi}, got {v}")
    return v


def _checked_requests(path, doc) -> list[tuple[int, int, int, str | None, int, str | None]]:
    """Every request's (arrival, prompt, output, prefix, prefix_len, conversation), checked field by
    field and in total before a single token id is made, so a workload too large is refused at once."""
    if not isinstance(doc, dict) or not isinstance(doc.get("requests"), list) or not doc["requests"]:
        raise ValueError(f"{path}: expected {{'name': ..., 'requests': [...]}} with at least one request")
    out = []
    total = 0
    turn_end: dict[str, int] = {}  # conversation -> tokens of its last turn so far
    for i, r in enumerate(doc["requests"]):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: request {i} must be a JSON object, got {r!r}")
        arrival = _field(path, i, r, "arrival", 0, MAX_ARRIVAL)
        plen = _field(path, i, r, "prompt", 1, MAX_REQUEST_TOKENS)
        olen = _field(path, i, r, "output", 1, MAX_REQUEST_TOKENS)
        total += plen + olen
        if total > MAX_WORKLOAD_TOKENS:
            raise ValueError(f"{path}: the requests up to {i} hold more than {MAX_WORKLOAD_TOKENS} tokens in all")
        prefix = r.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise ValueError(f"{path}: request {i}: 'prefix' must be a string name or null, got {prefix!r}")
        plen_shared = 0
        if prefix is not None:
            plen_shared = min(_field(path, i, r, "prefix_len", 0, MAX_REQUEST_TOKENS, default=0), plen - 1)
        conversation = r.get("conversation")
        if conversation is not None:
            if not isinstance(conversation, str) or prefix is not None:
                raise ValueError(f"{path}: request {i}: 'conversation' must be a string name, and a turn "
                                 f"takes no 'prefix', got {r!r}")
            before = turn_end.get(conversation, 0)
            if plen <= before:
                raise ValueError(f"{path}: request {i}: a turn of conversation {conversation!r} needs a prompt "
                                 f"longer than the previous turn's {before} tokens, got {plen}")
            turn_end[conversation] = plen + olen
        out.append((arrival, plen, olen, prefix, plen_shared, conversation))
    return out


def load_workload(path: str | Path, vocab: int = 32000) -> tuple[str, list[WorkItem]]:
    """Reads a workload JSON and makes its token ids (deterministic)."""
    with open(path) as f:
        doc = json.load(f)
    requests = _checked_requests(path, doc)
    name = doc.get("name", Path(path).stem)
    if not isinstance(name, str):
        raise ValueError(f"{path}: 'name' must be a string, got {name!r}")
    items = []
    prefixes: dict[str, list[int]] = {}
    conversations: dict[str, list[int]] = {}  # tokens of the last turn so far
    for i, (arrival, plen, olen, prefix, plen_shared, conversation) in enumerate(requests):
        rng = random.Random(i * 7919 + 1)
        shared: list[int] = []
        if prefix is not None:
            if prefix not in prefixes:
                prng = random.Random(f"prefix:{prefix}")
                prefixes[prefix] = [prng.randrange(vocab) for _ in range(max(plen_shared, 1))]
            shared = prefixes[prefix][:plen_shared]
            if len(shared) < plen_shared:  # a longer use of the same prefix extends it
                prng = random.Random(f"prefix:{prefix}:{len(prefixes[prefix])}")
                prefixes[prefix] += [prng.randrange(vocab) for _ in range(plen_shared - len(shared))]
                shared = prefixes[prefix][:plen_shared]
        if conversation is not None:
            shared = conversations.get(conversation, [])
        prompt = shared + [rng.randrange(vocab) for _ in range(plen - len(shared))]
        output = [rng.randrange(vocab) for _ in range(olen)]
        if conversation is not None:
            conversations[conversation] = prompt + output
        items.append(WorkItem(i, arrival, prompt, output, (f"image{i}",)))
    return name, sorted(items, key=lambda w: (w.arrival, w.index))


def static_shares(model, items: list[WorkItem]) -> dict[int, float]:
    """A static split sized for the workload's mean request: each group gets
    the share of bytes a mean-length request needs in it."""
    from ..kv.layout import plan_layout

    mean_len = sum(len(w.prompt) + len(w.output) for w in items) // len(items)
    layout = plan_layout(model, 16, 2 << 20)
    need = {g.group_id: g.spec.live_bytes(mean_len) * len(g.layers) for g in layout.groups}
    total = sum(need.values()) or 1
    return {gid: n / total for gid, n in need.items()}


DEFAULT_BUDGET = 16 << 30


def default_budget(model, items: list[WorkItem], block_size: int = 16) -> int:
    """16 GiB, or twice what the workload's longest request needs alone when
    that is more (a model without GQA, such as Phi-3-mini, needs 17 GiB for
    one 45K-token document), rounded up to a GiB. Every allocator gets the
    same budget; an explicit --budget is taken as given."""
    from ..kv.layout import plan_layout

    longest = max(len(w.prompt) + len(w.output) for w in items)
    layout = plan_layout(model, block_size, 2 << 20)
    need = sum(g.spec.live_bytes(longest) * len(g.layers) + g.large_page_bytes for g in layout.groups)
    gib = 1 << 30
    return max(DEFAULT_BUDGET, -(-2 * need // gib) * gib)


ALLOCATORS = ("ellm", "ellm+swap", "max-page", "static")


#: The engine the bench models updates recurrent states out of place (see the top).
DEFAULT_STATE_UPDATE = "out_of_place"


def run_one(model, items: list[WorkItem], budget: int, mode: str, block_size: int = 16,
            progress: bool = False, state_checkpoint_tokens: int | None = None,
            max_cached_fraction: float | None = None, state_update: str = DEFAULT_STATE_UPDATE) -> dict:
    from ..errors import OutOfMemoryError
    from ..kv.manager import KVCacheManager

    swap = mode == "ellm+swap"
    pool = Pool("cpu", budget=budget, cpu_budget=budget if swap else 0)
    kwargs = {}
    if mode == "max-page":
        kwargs.update(uniform_pages=True, compact=False)
    elif mode == "static":
        kwargs.update(static_shares=static_shares(model, items), compact=False)
    if max_cached_fraction is not None:
        kwargs["max_cached_fraction"] = max_cached_fraction
    mgr = KVCacheManager(model, pool, block_size=block_size, name=f"kv.{mode}",
                         state_checkpoint_tokens=state_checkpoint_tokens, state_update=state_update, **kwargs)
    # Each request brings its own image: that changes the KV of every layer
    # after a cross-attention layer, so only such models hash it in.
    per_request_keys = any(s.kind == "cross" for s in model.layers)
    waiting = deque(items)
    running: dict[str, list] = {}  # rid -> [item, generated]
    swapped: list[tuple[int, str, list]] = []  # preempted to the host tier: (arrival index, rid, entry), a heap
    order: list[str] = []  # by arrival: the last one is preempted first
    step = 0
    util_sum = util_steps = 0.0
    peak_held = peak_need = peak_util = 0.0
    hit_tokens = prompt_tokens = 0
    peak_running = preemptions = recomputed = swap_outs = swap_ins = 0
    bytes_out = 0
    t0 = time.perf_counter()

    def preempt(victim: str) -> None:
        nonlocal preemptions, recomputed, swap_outs, bytes_out
        vw, vgen = running.pop(victim)
        preemptions += 1
        if swap:
            try:
                bytes_out += mgr.swap_out(victim)
            except OutOfMemoryError:
                pass  # the host tier is full: recompute after all
            else:
                mgr.wait_swap(victim)  # nothing to overlap here: its chunks go back now
                swap_outs += 1
                heapq.heappush(swapped, (vw.index, victim, [vw, vgen]))
                return
        recomputed += mgr.requests[victim].num_tokens  # dropped KV, computed again on readmission
        mgr.free(victim)
        waiting.appendleft(vw)

    while waiting or running or swapped:
        # Swapped-out requests come back first, earliest arrival first, while
        # they fit with a margin of a chunk per running request (see the top;
        # with nothing running, no margin: nobody else competes for room).
        while swapped and mgr.can_swap_in(swapped[0][1], margin_chunks=len(running) + 1 if running else 0):
            _, rid, entry = heapq.heappop(swapped)
            mgr.swap_in(rid)
            swap_ins += 1
            running[rid] = entry
            bisect.insort(order, rid, key=lambda r: running[r][0].index)
        if swapped and not running:
            raise RuntimeError(f"{swapped[0][1]} cannot be swapped back in with nothing else running")
        # Admit arrived requests in order while they fit (head-of-line blocking, as FIFO schedulers do).
        while waiting and waiting[0].arrival <= step and not swapped:
            w = waiting[0]
            rid = f"r{w.index}"
            hit = mgr.add_request(rid, w.prompt, w.extra_keys if per_request_keys else ())
            if not mgr.allocate_slots(rid, len(w.prompt) - hit):
                mgr.free(rid)
                if not running:
                    raise ValueError(f"request {w.index} ({len(w.prompt)} prompt tokens) does not fit "
                                     f"the budget of {budget} bytes even alone")
                break
            waiting.popleft()
            hit_tokens += hit
            prompt_tokens += len(w.prompt)
            running[rid] = [w, 0]
            bisect.insort(order, rid, key=lambda r: running[r][0].index)
        # One decode step: every running request produces one token.
        for rid in list(running):
            if rid not in running:
                continue
            w, gen = running[rid]
            while not mgr.allocate_slots(rid, 1, [w.output[gen]]):
                victim = order.pop()  # preempt the newest: swapped out, or started over later
                preempt(victim)
                if victim == rid:
                    break
            if rid not in running:
                continue
            running[rid][1] += 1
            if running[rid][1] == len(w.output):
                mgr.free(rid)
                del running[rid]
                order.remove(rid)
        held = mgr.mapped_bytes()
        peak_held = max(peak_held, held)
        if running and held:
            need = mgr.live_bytes_needed()
            util_sum += need / held
            util_steps += 1
            if need >= peak_need:
                peak_need, peak_util = need, need / held
        peak_running = max(peak_running, len(running))
        step += 1
        if progress and step % 200 == 0:
            print(f"\r  {mode:>8}: step {step}, running {len(running)}, waiting {len(waiting)}",
                  end="", file=sys.stderr, flush=True)
        if step > 10_000_000:
            raise RuntimeError("workload does not finish")
    if progress:
        print("\r" + " " * 60 + "\r", end="", file=sys.stderr, flush=True)
    usage = mgr.usage()
    mgr.close()
    pool.validate()
    pool.close()
    return {
        "allocator": mode,
        "utilisation_time_avg": util_sum / util_steps if util_steps else 0.0,
        "utilisation_at_peak": peak_util,
        "peak_held_bytes": int(peak_held),
        "peak_concurrent_requests": peak_running,
        "prefix_hit_rate": hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        "preemptions": preemptions,
        "recomputed_tokens": recomputed,
        "swap_outs": swap_outs,
        "swap_ins": swap_ins,
        "swapped_out_bytes": bytes_out,
        "steps": step,
        "large_page_bytes_per_group": [g["large_page_bytes"] for g in usage["groups"]],
        "padding_bytes_per_group": [g["padding_bytes"] for g in usage["groups"]],
        # The costs of keeping recurrent states and packing pages: bytes
        # copied at checkpoints, bytes compaction copied, and every chunk
        # map / unmap of the run (all groups).
        "state_bytes_copied": usage["state_bytes_copied"],
        "compaction_bytes_copied": usage["bytes_moved_by_compaction"],
        "out_of_place_updates": usage["out_of_place_updates"],
        "maps": usage["maps"],
        "unmaps": usage["unmaps"],
        "state_checkpoint_tokens": mgr.state_checkpoint_tokens,
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def run(model, workload_path: str | Path, budget: int | None = None, block_size: int = 16,
        progress: bool = True, state_checkpoint_tokens: int | None = None,
        max_cached_fraction: float | None = None, allocators: tuple[str, ...] = ALLOCATORS,
        state_update: str = DEFAULT_STATE_UPDATE) -> dict:
    """`budget` None: default_budget() for this model and workload."""
    name, items = load_workload(workload_path)
    budget_source = "given"
    if budget is None:
        budget = default_budget(model, items, block_size)
        budget_source = "default" if budget == DEFAULT_BUDGET else "default, raised for the longest request"
    results = []
    # One torch thread: the only tensor work here is copying blocks of a few
    # hundred KiB to a few MiB, which threads do not speed up, and on a busy
    # machine waiting threads would make the wall times noise.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in allocators:
            try:
                results.append(run_one(model, items, budget, mode, block_size, progress, state_checkpoint_tokens,
                                       max_cached_fraction, state_update))
            except ValueError as e:  # some request of the workload does not fit the budget at all
                results.append({"allocator": mode, "error": str(e)})
    finally:
        torch.set_num_threads(threads)
    return {
        "model": model.name,
        "workload": name,
        "requests": len(items),
        "budget_bytes": budget,
        "budget_source": budget_source,
        "block_size": block_size,
        "max_cached_fraction": max_cached_fraction,
        "state_update": state_update,
        "results": results,
    }


def print_report(r: dict) -> None:
    print(f"model {r['model']}, workload {r['workload']} ({r['requests']} requests), "
          f"budget {r['budget_bytes'] / 2**30:.1f} GiB ({r.get('budget_source', 'given')}), "
          f"block {r['block_size']} tokens, state update {r['state_update'].replace('_', '-')}")
    print(f"  {'allocator':>9} {'util avg':>9} {'util@peak':>9} {'peak reqs':>9} {'hit rate':>8} "
          f"{'preempt':>7} {'recomputed':>10} {'swapped':>9} {'steps':>6} {'copied':>9} {'compacted':>9} {'maps':>8} "
          f"{'unmaps':>8} {'wall s':>7}")
    for x in r["results"]:
        if "error" in x:
            print(f"  {x['allocator']:>9} cannot serve this workload: {x['error']}")
            continue
        print(f"  {x['allocator']:>9} {x['utilisation_time_avg']:9.3f} {x['utilisation_at_peak']:9.3f} "
              f"{x['peak_concurrent_requests']:9d} {x['prefix_hit_rate']:8.3f} {x['preemptions']:7d} "
              f"{x['recomputed_tokens']:10d} {human(x['swapped_out_bytes']):>9} "
              f"{x['steps']:6d} {human(x['state_bytes_copied']):>9} {human(x['compaction_bytes_copied']):>9} "
              f"{x['maps']:8d} {x['unmaps']:8d} "
              f"{x['wall_s']:7.1f}")
