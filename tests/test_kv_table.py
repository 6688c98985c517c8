"""Table-driven rules of the per-type managers (single_type.py / manager.py):
prefix-hit lengths for full / sliding / chunked / Mamba groups and their mixes,
eviction order, and which blocks each kind drops as a request advances."""
from __future__ import annotations

import pytest

from ellm_alloc.kv import ChunkedLocalSpec, FullAttentionSpec, KVCacheManager, MambaSpec, ModelKVSpec, SlidingWindowSpec

BS = 4
F = FullAttentionSpec(1, 8, "float32")
SPECS = {
    "full": F,
    "sliding": SlidingWindowSpec(1, 8, "float32", window=8),
    "sliding6": SlidingWindowSpec(1, 8, "float32", window=6),
    "chunked": ChunkedLocalSpec(1, 8, "float32", chunk_size=8),
    "mamba": MambaSpec(dtype="float32", conv_shape=(2, 8), ssm_shape=(2, 8)),
}
T = list(range(100, 160))


def make(pool, kinds: str, checkpoint: int = BS) -> KVCacheManager:
    """checkpoint: tokens between saved Mamba states (BS: at every block boundary)."""
    model = ModelKVSpec(kinds, tuple(SPECS[k] for k in kinds.split("+")))
    return KVCacheManager(model, pool, block_size=BS, max_cached_fraction=float("inf"),
                          state_checkpoint_tokens=checkpoint)


def run(mgr, rid, tokens, mode):
    """Computes `tokens` for a new request: all at once ('prompt') or one decode step at a time."""
    if mode == "prompt":
        hit = mgr.add_request(rid, tokens)
        assert mgr.allocate_slots(rid, len(tokens) - hit)
    else:
        mgr.add_request(rid, tokens[:1])
        assert mgr.allocate_slots(rid, 1)
        for t in tokens[1:]:
            assert mgr.allocate_slots(rid, 1, new_token_ids=[t])
    mgr.check()


def query(q):
    kind, n, *rest = q
    if kind == "same":
        return T[:n]
    return T[:rest[0]] + [0] * (n - rest[0])  # diverges at token rest[0]


# (model, how the seed was computed, seed length, query, extra keys, expected hit tokens)
HIT_ROWS = [
    # Full attention: the leading run of cached full blocks; one token always left to compute.
    ("full", "prompt", 17, ("same", 17), (), 16),
    ("full", "prompt", 17, ("same", 16), (), 12),
    ("full", "prompt", 17, ("same", 30), (), 16),
    ("full", "prompt", 17, ("diverge", 17, 9), (), 8),
    ("full", "prompt", 17, ("diverge", 17, 3), (), 0),
    ("full", "decode", 17, ("same", 17), (), 16),
    ("full", "prompt", 17, ("same", 17), ("img", 7), 0),
    # Sliding window 8: the cached blocks covering the window that ends at the hit.
    ("sliding", "prompt", 17, ("same", 17), (), 16),
    ("sliding", "prompt", 17, ("same", 13), (), 0),  # blocks 0-1 never existed
    ("sliding", "decode", 17, ("same", 13), (), 12),  # out-of-window blocks stayed cached
    ("sliding", "prompt", 17, ("diverge", 17, 13), (), 0),
    ("sliding", "decode", 17, ("diverge", 17, 13), (), 12),
    ("sliding", "prompt", 25, ("same", 25), (), 24),
    # Chunked local, chunk 8: the blocks of the chunk the hit ends in.
    ("chunked", "prompt", 17, ("same", 17), (), 0),
    ("chunked", "decode", 17, ("same", 17), (), 16),
    ("chunked", "decode", 17, ("diverge", 17, 13), (), 12),
    ("chunked", "prompt", 24, ("same", 25), (), 24),
    ("chunked", "prompt", 24, ("same", 23), (), 20),
    # Mamba, a state saved at every block boundary: the state at the end of
    # the hit's last block. A one-shot prefill saves only its final state
    # (block 4 here, not yet full), so nothing hits; token-by-token decoding
    # saved a state at every boundary.
    ("mamba", "prompt", 17, ("same", 17), (), 0),
    ("mamba", "prompt", 16, ("same", 17), (), 16),
    ("mamba", "prompt", 16, ("same", 30), (), 16),
    ("mamba", "prompt", 17, ("same", 13), (), 0),
    ("mamba", "decode", 17, ("same", 17), (), 16),
    ("mamba", "decode", 17, ("same", 13), (), 12),
    # Mixed: the longest hit valid for every group.
    ("full+sliding+mamba", "prompt", 17, ("same", 17), (), 0),
    ("full+sliding+mamba", "prompt", 16, ("same", 17), (), 16),
    ("full+sliding+mamba", "prompt", 17, ("same", 13), (), 0),
    ("full+sliding+mamba", "decode", 17, ("same", 13), (), 12),
    ("full+chunked", "prompt", 24, ("same", 23), (), 20),
    ("full+chunked", "prompt", 24, ("same", 17), (), 0),
    ("full", "prompt", 24, ("same", 17), (), 16),
    ("full+mamba", "decode", 21, ("diverge", 21, 10), (), 8),
]


@pytest.mark.parametrize("kinds,mode,seed_len,q,extra,expected", HIT_ROWS)
def test_prefix_hit_length(pool, kinds, mode, seed_len, q, extra, expected):
    mgr = make(pool, kinds)
    run(mgr, "seed", T[:seed_len], mode)
    mgr.free("seed")
    hit = mgr.add_request("q", query(q), extra_keys=extra)
    assert hit == expected
    mgr.check()
    # The hit is usable: the rest of the prompt allocates and the request frees cleanly.
    assert mgr.allocate_slots("q", len(query(q)) - hit)
    mgr.check()
    mgr.close()


def test_prefix_hit_without_prefix_caching(pool):
    model = ModelKVSpec("f", (F,))
    mgr = KVCacheManager(model, pool, block_size=BS, enable_prefix_caching=False, max_cached_fraction=float("inf"))
    run(mgr, "seed", T[:17], "prompt")
    mgr.free("seed")
    assert mgr.add_request("q", T[:17]) == 0
    mgr.close()


# (model, seed layout, expected eviction order as (request, block index))
def _cached_order(mgr, tables, n):
    """Evicts one block at a time; returns which (request, index) disappeared each time."""
    bp = mgr.pools[0]
    where = {b: (rid, i) for rid, bt in tables.items() for i, b in enumerate(bt) if b is not None}
    order = []
    for _ in range(n):
        before = set(bp.block_hash)
        assert mgr.evict(1) == 1
        gone = before - set(bp.block_hash)
        assert len(gone) == 1
        order.append(where[gone.pop()])
        mgr.check()
    assert mgr.evict(1) == 0
    return order


def test_eviction_order_full_tail_before_prefix(pool):
    mgr = make(pool, "full")
    mgr.add_request("a", T[:8])  # 2 prompt blocks
    assert mgr.allocate_slots("a", 8)
    for t in T[8:16]:  # 2 decode (tail) blocks
        assert mgr.allocate_slots("a", 1, new_token_ids=[t])
    tables = {"a": mgr.block_table("a", 0)}
    mgr.free("a")
    # Tail blocks first (released tail first, so block 3 is the older entry), then the prompt prefix.
    assert _cached_order(mgr, tables, 4) == [("a", 3), ("a", 2), ("a", 1), ("a", 0)]
    mgr.close()


def test_eviction_order_sliding_out_of_window_first(pool):
    mgr = make(pool, "sliding")
    run(mgr, "a", T[:16], "decode")
    run(mgr, "b", T[20:36], "decode")
    tables = {"a": mgr.block_table("a", 0), "b": mgr.block_table("b", 0)}
    full_tables: dict = {}
    assert tables["a"][:2] == [None, None]  # window 8 at 16 tokens: blocks 2, 3
    mgr.free("a")
    mgr.free("b")
    # Recover which ids the out-of-window blocks had: they are cached under the request's hashes.
    from ellm_alloc.kv.manager import chain_hashes
    for rid, toks in (("a", T[:16]), ("b", T[20:36])):
        hs = chain_hashes(toks, BS)
        full_tables[rid] = [mgr.pools[0].lookup(h) for h in hs]
        assert full_tables[rid][2:] == tables[rid][2:]
    # Out-of-window blocks (a's, then b's: LRU), then the freed tails (a before b).
    assert _cached_order(mgr, full_tables, 8) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 3), ("a", 2), ("b", 3), ("b", 2)]
    mgr.close()


def test_eviction_lru_across_requests(pool):
    mgr = make(pool, "full")
    for rid, lo in (("a", 0), ("b", 20)):
        run(mgr, rid, T[lo:lo + 8] + [1], "prompt")
    tables = {rid: mgr.block_table(rid, 0) for rid in ("a", "b")}
    mgr.free("b")
    mgr.free("a")
    # All prompt blocks: b was released first, so b's go first.
    assert _cached_order(mgr, tables, 4) == [("b", 1), ("b", 0), ("a", 1), ("a", 0)]
    mgr.close()


def test_eviction_makes_room_before_failing(make_pool):
    p = make_pool("4MiB")
    mgr = make(p, "full")
    per_page = mgr.pools[0].ratio
    run(mgr, "a", [5] * (per_page * BS * 2), "prompt")  # fills both chunks
    mgr.free("a")
    assert mgr.usage()["groups"][0]["cached_blocks"] == 2 * per_page
    assert mgr.add_request("b", [6] * 8) == 0
    assert mgr.can_allocate("b", 8)
    assert mgr.allocate_slots("b", 8)
    g = mgr.usage()["groups"][0]
    assert g["evictions"] == 2 and g["cached_blocks"] == 2 * per_page - 2
    mgr.close()


# (model, tokens, positions of the block table that stay allocated)
WINDOW_ROWS = [
    ("full", 9, [0, 1, 2]),
    ("sliding", 8, [0, 1]),
    ("sliding", 9, [0, 1, 2]),
    ("sliding", 12, [1, 2]),
    ("sliding", 13, [1, 2, 3]),
    ("sliding", 16, [2, 3]),
    ("sliding6", 9, [0, 1, 2]),
    ("sliding6", 10, [1, 2]),
    ("chunked", 8, [0, 1]),
    ("chunked", 9, [2]),
    ("chunked", 16, [2, 3]),
    ("chunked", 17, [4]),
    # Mamba: only the current state block.
    ("mamba", 1, [0]),
    ("mamba", 4, [0]),
    ("mamba", 5, [1]),
    ("mamba", 9, [2]),
    ("mamba", 16, [3]),
]


@pytest.mark.parametrize("mode", ["prompt", "decode"])
@pytest.mark.parametrize("kind,n,kept", WINDOW_ROWS)
def test_out_of_window_blocks_are_released(pool, kind, n, kept, mode):
    mgr = make(pool, kind)
    run(mgr, "a", T[:n], mode)
    bt = mgr.block_table("a", 0)
    assert [i for i, b in enumerate(bt) if b is not None] == kept
    assert len(bt) == -(-n // BS)
    g = mgr.usage()["groups"][0]
    assert g["live_blocks"] == len(kept)
    mgr.close()


@pytest.mark.parametrize("kind,n", [("sliding6", 23), ("sliding6", 22), ("sliding", 23), ("chunked", 23),
                                    ("mamba", 23), ("full", 23)])
def test_fork_child_keeps_its_window(pool, kind, n):
    """A forked child continues from the parent's length: it holds every block
    its window needs, sharing full blocks and owning copies of the rest."""
    mgr = make(pool, kind)
    run(mgr, "p", T[:n], "prompt")
    mgr.fork("p", "c")
    assert mgr.requests["c"].num_tokens == n
    bt, pt = mgr.block_table("c", 0), mgr.block_table("p", 0)
    spec = SPECS[kind]
    if spec.token_based:
        need = range(spec.first_needed_token(n) // BS, -(-n // BS))
    else:
        need = [(n - 1) // BS]
    missing = [i for i in need if i >= len(bt) or bt[i] is None]
    assert not missing, f"child at {n} tokens lacks blocks {missing} of its window; table {bt}"
    full = n // BS
    assert bt[:full] == pt[:full]
    assert all(bt[i] != pt[i] for i in range(full, len(bt)) if bt[i] is not None)
    mgr.check()
    mgr.close()


@pytest.mark.parametrize("caching, moves", [(True, True), (False, False)])
def test_mamba_state_moves_only_to_leave_a_cache_entry(pool, caching, moves):
    """Crossing into a new block, the state is copied to a fresh block only
    when the old one stays behind as a prefix-cache entry; otherwise the same
    block moves up the table, with its bytes, and nothing is mapped or copied."""
    model = ModelKVSpec("m", (SPECS["mamba"],))
    mgr = KVCacheManager(model, pool, block_size=BS, enable_prefix_caching=caching,
                         max_cached_fraction=float("inf"), state_checkpoint_tokens=BS)  # every boundary
    mgr.add_request("a", T[:3])
    mgr.allocate_slots("a", 3)
    (states,) = mgr.layer_tensors(0)
    first = mgr.block_table("a", 0)[0]
    states[first, :8] = 7
    seen = {first}
    for n in range(4, 14):  # crosses into blocks 1, 2 and 3
        mgr.allocate_slots("a", 1, [T[n - 1]])
        bt = mgr.block_table("a", 0)
        cur = bt[(n - 1) // BS]
        assert [i for i, b in enumerate(bt) if b is not None] == [(n - 1) // BS]
        assert bool((states[cur, :8] == 7).all()), "the state did not follow the request"
        seen.add(cur)
        mgr.check()
    assert (len(seen) == 4) == moves and (len(seen) == 1) == (not moves)
    assert mgr.usage()["groups"][0]["cached_blocks"] == (3 if caching else 0)
    mgr.close()


def test_mamba_state_shared_by_a_fork_is_copied_even_without_caching(pool):
    """At an exact block boundary a fork shares the parent's state block; the
    next step must give each its own copy, cache or no cache."""
    model = ModelKVSpec("m", (SPECS["mamba"],))
    mgr = KVCacheManager(model, pool, block_size=BS, enable_prefix_caching=False)
    mgr.add_request("p", T[:8])
    mgr.allocate_slots("p", 8)
    mgr.fork("p", "c")
    assert mgr.block_table("p", 0) == mgr.block_table("c", 0)  # block 1, shared
    mgr.allocate_slots("p", 1, [1])
    mgr.allocate_slots("c", 1, [2])
    bp, bc = mgr.block_table("p", 0)[2], mgr.block_table("c", 0)[2]
    assert bp is not None and bc is not None and bp != bc
    mgr.check()
    mgr.close()


# ---- Mamba checkpoints ------------------------------------------------------------------

# (checkpoint tokens, how the seed was computed, seed length, query, expected hit)
# Saved: the first boundary at or after the prompt (the seed's prompt is its
# first token in "decode" mode, so boundary 4) and every `checkpoint` tokens.
CHECKPOINT_ROWS = [
    (16, "decode", 17, ("same", 17), 16),  # boundaries 4 and 16 saved
    (16, "decode", 17, ("same", 13), 4),  # 8 and 12 were updated in place
    (8, "decode", 17, ("same", 13), 8),
    (8, "decode", 17, ("same", 17), 16),
    (16, "prompt", 16, ("same", 17), 16),  # the prompt's end is a boundary
    (16, "prompt", 10, ("same", 17), 0),  # its first boundary (12) was never reached
    (16, "decode", 17, ("diverge", 17, 10), 4),
]


@pytest.mark.parametrize("checkpoint,mode,seed_len,q,expected", CHECKPOINT_ROWS)
@pytest.mark.parametrize("kinds", ["mamba", "full+mamba"])
def test_mamba_hits_land_on_checkpoints(pool, kinds, checkpoint, mode, seed_len, q, expected):
    mgr = make(pool, kinds, checkpoint)
    run(mgr, "seed", T[:seed_len], mode)
    mgr.free("seed")
    assert mgr.add_request("q", query(q)) == expected
    assert mgr.allocate_slots("q", len(query(q)) - expected)
    mgr.check()
    mgr.close()


def chat_turns(mgr, turns: list[tuple[int, int]]) -> list[int]:
    """A conversation: turn k's prompt is everything before it plus prompt_k
    new tokens, prefilled in one pass after its hit, then out_k tokens
    decoded one by one. Returns each turn's hit."""
    tokens: list[int] = []
    hits = []
    for k, (new, out) in enumerate(turns):
        tokens += [1000 * (k + 1) + i for i in range(new)]
        rid = f"turn{k}"
        hit = mgr.add_request(rid, tokens)
        hits.append(hit)
        assert mgr.allocate_slots(rid, len(tokens) - hit)
        for i in range(out):
            tokens.append(7 * k + i)
            assert mgr.allocate_slots(rid, 1, new_token_ids=[tokens[-1]])
        mgr.check()
        mgr.free(rid)
    return hits


# (checkpoint, [(new prompt tokens, output tokens) per turn], expected hit of each turn)
# BS = 4. Turn k+1 extends turn k's prompt and output, so it hits the first
# boundary after turn k's prompt (saved there) or a later checkpoint that
# turn k's output crossed, never a boundary updated in place.
MULTI_TURN_ROWS = [
    (64, [(10, 6), (5, 6), (3, 2)], [0, 12, 24]),  # prompts end at 10 and 21: states saved at 12 and 24
    (8, [(10, 12), (5, 6)], [0, 16]),  # turn 0 saved 12 and 16 (checkpoint); turn 1 prompt 27 > 16
    (64, [(8, 1), (4, 1)], [0, 8]),  # the prompt ends on a boundary: the state there is saved
    (64, [(10, 1), (4, 1)], [0, 0]),  # 1 output token never reaches boundary 12
]


@pytest.mark.parametrize("checkpoint,turns,expected", MULTI_TURN_ROWS)
@pytest.mark.parametrize("kinds", ["mamba", "full+mamba"])
def test_multi_turn_hits_land_on_the_previous_turn(pool, kinds, checkpoint, turns, expected):
    mgr = make(pool, kinds, checkpoint)
    assert chat_turns(mgr, turns) == expected
    mgr.close()


def test_steady_decode_moves_states_in_place(pool):
    """Between checkpoints a decode step maps nothing, unmaps nothing and
    copies no state; crossing a checkpoint copies one state."""
    mgr = make(pool, "full+mamba", checkpoint=16)
    mamba = next(i for i, g in enumerate(mgr.layout.groups) if g.kind == "mamba")
    state_bytes = mgr.layout.groups[mamba].small_page_bytes
    mgr.add_request("r", T[:13])
    assert mgr.allocate_slots("r", 13)  # boundary 16 is the prompt's checkpoint
    before = mgr.usage()["groups"][mamba]
    for t in T[13:16]:  # tokens 14..16: no boundary crossed
        assert mgr.allocate_slots("r", 1, new_token_ids=[t])
    assert mgr.allocate_slots("r", 1, new_token_ids=[T[16]])  # 17th token: crosses 16, a checkpoint
    crossed = mgr.usage()["groups"][mamba]
    assert crossed["state_bytes_copied"] - before["state_bytes_copied"] == state_bytes
    for t in T[17:31]:  # boundaries 20, 24, 28 are not checkpoints
        assert mgr.allocate_slots("r", 1, new_token_ids=[t])
        now = mgr.usage()["groups"][mamba]
        assert (now["maps"], now["unmaps"], now["state_bytes_copied"]) == \
            (crossed["maps"], crossed["unmaps"], crossed["state_bytes_copied"])
    mgr.check()
    mgr.close()


def test_checkpoint_tokens_must_be_a_multiple_of_the_block_size(pool):
    for bad in (0, -4, 6, 4.0, True, "8"):
        with pytest.raises(ValueError, match="state_checkpoint_tokens must be a positive multiple of block_size=4"):
            make(pool, "mamba", bad)
