"""generate() under CPU routing gives the tokens torch's native allocator gives."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import in_pool
from tiny_models import BATCH, CONFIGS, NEW, PROMPT, generate, make_model

from ellm_alloc.hf import ElasticCache


@pytest.fixture(scope="module")
def native_tokens() -> dict:
    """The same generations in a process without ellm_alloc (torch's own allocator)."""
    script = Path(__file__).with_name("tiny_models.py")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_tokens_identical_to_native(routed_pool, native_tokens, name):
    assert in_pool(routed_pool, next(make_model(name).parameters()))  # weights are pool memory
    assert generate(name) == native_tokens[name]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_elastic_cache_on_the_routed_pool_gives_the_same_tokens(routed_pool, native_tokens, name):
    caches = []

    def make_cache(config):
        caches.append(ElasticCache(config, max_batch_size=BATCH, max_cache_len=PROMPT + NEW))
        return caches[-1]

    assert generate(name, cache=make_cache) == native_tokens[name]
    assert caches[0].pool.handle == routed_pool.handle  # the cache drew on the enabled pool
    assert caches[0].mapped_bytes() > 0
    kv_owners = [o for o in routed_pool.owners() if o["active"] and o["name"].startswith("hf.")]
    assert sum(o["held_chunks"] for o in kv_owners) * routed_pool.stats()["chunk_bytes"] == caches[0].mapped_bytes()
    caches[0].close()
