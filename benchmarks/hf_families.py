"""Writes benchmarks/results/hf_families.json: the family sweep's table.

    .venv/bin/python benchmarks/hf_families.py [--out PATH] [TYPE ...]

Every causal-LM model type of the installed transformers (or the ones named),
built offline from a tiny config, generating with DynamicCache and with
ElasticCache (see ellm_alloc/hf/families.py for the outcomes).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import pathlib
import sys
import time

from ellm_alloc.hf.families import OUTCOMES, model_types, run_family


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "hf_families.json"))
    ap.add_argument("types", nargs="*", help="model types (default: all)")
    args = ap.parse_args(argv)
    import torch
    import transformers

    t0 = time.perf_counter()
    rows = []
    for m in args.types or model_types():
        r = run_family(m)
        rows.append(r.to_dict())
        print(f"{r.outcome:15s} {r.seconds:6.2f}s {m:28s} {r.reason[:120]}", flush=True)
    counts = collections.Counter(r["outcome"] for r in rows)
    runs = sum(counts[o] for o in ("equal", "refused", "failed"))
    doc = {
        "what": "greedy generate(), batch 2 with left padding, DynamicCache vs ElasticCache, tiny random-weight "
                "models built offline from each causal-LM model type's default config, shrunk",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/hf_families.py" + ("" if not args.types else " " + " ".join(args.types)),
        "seconds": round(time.perf_counter() - t0, 1),
        "counts": {o: counts[o] for o in OUTCOMES},
        "equal_share_where_dynamic_runs": round(counts["equal"] / runs, 4) if runs else None,
        "families": rows,
    }
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{dict(counts)} in {doc['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
