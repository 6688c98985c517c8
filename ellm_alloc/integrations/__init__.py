"""Integrations with the outside world: torch's allocator hook (and later HF caches)."""
