"""Random-weight models shared by the routed tests and their native references.

Importing this module does not enable anything: the routed tests run it in
their routed process, and `python tests/routed/tiny_models.py` prints the
same generations made with torch's native allocator, as JSON.
"""
from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

SMALL = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=32),
    "gemma3": lambda: Gemma3TextConfig(**{**SMALL, "num_hidden_layers": 4}, head_dim=32, sliding_window=16,
                                       layer_types=["sliding_attention", "full_attention"] * 2),
}
BATCH, PROMPT, NEW = 4, 48, 24


def make_model(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def prompts(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: sequence 0 starts with 6 pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (BATCH, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = 0, 0
    return ids, mask


def generate(name: str, cache=None) -> list[list[int]]:
    torch.set_num_threads(2)
    model = make_model(name)
    ids, mask = prompts()
    kw = {} if cache is None else {"past_key_values": cache(model.config)}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    return out[:, PROMPT:].tolist()


if __name__ == "__main__":
    print(json.dumps({name: generate(name) for name in sys.argv[1:] or CONFIGS}))
