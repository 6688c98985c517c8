"""Memory figures in the shape of torch.cuda.memory_stats(), plus the pool's ledger."""
from __future__ import annotations

from collections import OrderedDict

from .config import human


def torch_style(raw: dict[str, int], owners: list[dict], host: dict | None = None) -> "OrderedDict[str, int]":
    """torch.cuda.memory_stats()-style keys from the arena's and pool's counters.

    allocated: live blocks (rounded to 512 B); active: live plus blocks cached
    for reuse on their stream; reserved: chunks mapped by the torch arena.
    host: the pool's host tier (Pool.host_tier()), as ellm.host.* keys; None
    leaves them out.
    """
    out: OrderedDict[str, int] = OrderedDict()
    for key, cur, peak in (
        ("allocated_bytes", "allocated_bytes", "allocated_peak"),
        ("active_bytes", "active_bytes", "active_peak"),
        ("reserved_bytes", "reserved_bytes", "reserved_peak"),
    ):
        out[f"{key}.all.current"] = raw[cur]
        out[f"{key}.all.peak"] = raw[peak]
    out["inactive_split_bytes.all.current"] = raw["cached_bytes"]
    out["num_alloc_retries"] = raw["cache_flushes"]
    out["num_ooms"] = raw["ooms"]
    out["num_device_alloc"] = raw["chunk_maps"]
    out["num_device_free"] = raw["chunk_unmaps"]
    for k in ("num_allocs", "num_frees", "fast_allocs", "live_blocks", "invalid_frees", "chunk_moves",
              "chunk_bytes", "budget_bytes", "created_chunks", "free_chunks", "chunk_creates",
              "reclaim_calls", "failed_acquires", "va_bytes"):
        out[f"ellm.{k}"] = raw[k]
    for o in owners:
        if not o["active"]:
            continue
        name = o["name"]
        out[f"ellm.chunks.{name}"] = o["held_chunks"]
        out[f"ellm.chunks.{name}.peak"] = o["peak_chunks"]
        out[f"ellm.chunks.{name}.received"] = o["received"]
        out[f"ellm.chunks.{name}.given"] = o["given"]
    out["ellm.chunks.free"] = raw["free_chunks"]
    # Ballooning: chunks that moved between the torch arena and the KV cache.
    arena = next((o for o in owners if o["name"] == "arena"), None)
    if arena is not None:
        out["ellm.balloon.kv_to_arena_chunks"] = arena["received"]
        out["ellm.balloon.arena_to_kv_chunks"] = arena["given"]
    if host is not None:
        out.update(_host_keys(host))
    return out


def host_chunks_by_owner(host: dict) -> dict[str, int]:
    """Host-tier chunks per owner name (each KV space), active owners only.
    Spaces may share a name (ElasticCache's full layers: "hf.full"): summed."""
    held: dict[str, int] = {}
    for o in host["owners"]:
        if o["active"]:
            held[o["name"]] = held.get(o["name"], 0) + o["held_chunks"]
    return held


def _host_keys(host: dict) -> "OrderedDict[str, int]":
    """The host tier's ledger (KV pages swapped out of the device): budget 0
    is off; created = free + every owner's chunks; pinned_bytes: the host
    slabs it allocated (pinned on a GPU), at least the created chunks and at
    most the budget; held_bytes: KV swapped out (or being swapped) now."""
    out: OrderedDict[str, int] = OrderedDict()
    for k in ("budget_bytes", "chunk_bytes", "created_chunks", "free_chunks", "slabs", "pinned_bytes",
              "failed_acquires"):
        out[f"ellm.host.{k}"] = host[k]
    held = host_chunks_by_owner(host)
    out["ellm.host.held_bytes"] = sum(held.values()) * host["chunk_bytes"]
    for name, chunks in held.items():
        out[f"ellm.host.chunks.{name}"] = chunks
    out["ellm.host.chunks.free"] = host["free_chunks"]
    return out


def format_summary(raw: dict[str, int], owners: list[dict], where: str, host: dict | None = None) -> str:
    """memory_summary()'s text; `host` (Pool.host_tier()) adds the host tier's line."""
    chunk = raw["chunk_bytes"]
    lines = [
        f"ellm_alloc pool {where}: budget {human(raw['budget_bytes'])} in {human(chunk)} chunks",
        f"  {'':22}{'current':>14}{'peak':>14}",
        f"  {'allocated':22}{human(raw['allocated_bytes']):>14}{human(raw['allocated_peak']):>14}",
        f"  {'active (incl. cached)':22}{human(raw['active_bytes']):>14}{human(raw['active_peak']):>14}",
        f"  {'mapped by arena':22}{human(raw['reserved_bytes']):>14}{human(raw['reserved_peak']):>14}",
        f"  chunks: {raw['created_chunks']} created, {raw['free_chunks']} free; by owner: "
        + ", ".join(f"{o['name']}={o['held_chunks']}" for o in owners if o["active"]),
        f"  allocs {raw['num_allocs']} (fast path {raw['fast_allocs']}), frees {raw['num_frees']}, "
        f"maps {raw['chunk_maps']}, unmaps {raw['chunk_unmaps']}, moves {raw['chunk_moves']}, "
        f"cache flushes {raw['cache_flushes']}, OOMs {raw['ooms']}, invalid frees {raw['invalid_frees']}",
    ]
    if host is not None:
        lines.append(_host_line(host))
    return "\n".join(lines)


def _host_line(host: dict) -> str:
    # Shown even when off, so that a reader of the summary learns the tier exists.
    if not host["budget_bytes"]:
        return "  host tier: off (cpu_budget 0)"
    held = host_chunks_by_owner(host)
    return (f"  host tier: budget {human(host['budget_bytes'])}, pinned {human(host['pinned_bytes'])}; "
            f"chunks: {host['created_chunks']} created, {host['free_chunks']} free; "
            f"swapped out {human(sum(held.values()) * host['chunk_bytes'])}, by owner: "
            + ", ".join(f"{name}={chunks}" for name, chunks in held.items()))
