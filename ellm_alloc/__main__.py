"""python -m ellm_alloc top [--once] [--interval S] [--duration S] [--no-demo]

`top`: a live terminal view of a pool's ledger by owner (the torch arena,
each KV space, free chunks, budget not yet created), refreshed every
--interval seconds, plus, on a GPU machine with NVML, the device's memory and
this process's share.

A pool lives inside the process that uses it; another process cannot read it.
So `top` shows the pool of its own process, and decides as follows:

* ellm_alloc enabled here (only possible when this module is driven from a
  script that called enable(), see `run_top`): that pool.
* otherwise (the usual case, and always on CPU): a host-pool demo. A
  background thread runs a decode-like workload on a 256 MiB host pool:
  sequences of a Llama-3-8B-shaped contiguous KV cache (8 KV heads x 128,
  bf16, 4 layers) grow token by token and are released, while the arena
  serves activation-sized blocks. A banner says it is a demo.
  `--no-demo` instead prints a message saying there is no pool to show and
  exits with status 0.

`--once` prints one frame (after the demo has run a few steps) and exits;
without it, frames refresh until Ctrl-C or --duration seconds.
To watch a real workload, call `ellm_alloc.__main__.run_top(pool)` from a
thread of that workload's process.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

BANNER = ("no ellm_alloc pool in this process (enable() is not called here; a pool cannot be read "
          "from another process):\nshowing a host-pool demo workload.")


def _demo_workload(pool, stop: threading.Event, steps: int | None = None, delay: float = 0.01):
    """Sequences grow and are released in a ContiguousKV; the arena serves
    activations. With `steps`, returns the ContiguousKV still mapped."""
    from .kv.contiguous import ContiguousKV
    from .kv.spec import FullAttentionSpec, ModelKVSpec

    spec = ModelKVSpec("llama3-8b-shaped", tuple(FullAttentionSpec(8, 128, "bfloat16") for _ in range(4)))
    kv = ContiguousKV(spec, pool, max_batch=4, max_seq_len=4096, name="kv.demo")
    lengths = [0, 300, 700, 1100]
    target = [900, 1500, 1200, 2000]
    n = 0
    try:
        while not stop.is_set() and (steps is None or n < steps):
            acts = [pool.malloc(s) for s in (3 << 20, 1 << 20, 6 << 20)]
            for seq in range(4):
                lengths[seq] += 16
                if lengths[seq] > target[seq]:
                    lengths[seq] = 0
                kv.ensure(seq, lengths[seq])
            for p in acts:
                pool.free(p)
            n += 1
            time.sleep(delay)
    finally:
        if steps is None:
            kv.close()
    return kv


def run_top(pool=None, *, once: bool = False, interval: float = 0.5, duration: float | None = None,
            title: str = "", out=sys.stdout) -> None:
    """Prints frames of `pool` (default: the enabled CUDA pool) until Ctrl-C / duration."""
    from .telemetry import _Nvml, render_frame

    nvml = _Nvml(pool.device if pool is not None and pool.backend == "cuda" else 0)
    t0 = time.monotonic()
    while True:
        frame = render_frame(pool, title, device=nvml.view())
        stamp = time.strftime("%H:%M:%S")
        if once:
            print(f"ellm_alloc top  {stamp}\n{frame}", file=out, flush=True)
            return
        print(f"\x1b[H\x1b[2Jellm_alloc top  {stamp}  (Ctrl-C to quit)\n{frame}", file=out, flush=True)
        if duration is not None and time.monotonic() - t0 >= duration:
            return
        time.sleep(interval)


def top(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ellm_alloc top", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--once", action="store_true", help="print one frame and exit")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between frames (default 0.5)")
    ap.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    ap.add_argument("--no-demo", action="store_true",
                    help="without a pool in this process, exit with a message instead of running the demo")
    args = ap.parse_args(argv)
    from .integrations.torch_allocator import device_pool, enabled

    if enabled():
        run_top(device_pool(), once=args.once, interval=args.interval, duration=args.duration)
        return 0
    if args.no_demo:
        print("ellm_alloc top: no ellm_alloc pool in this process (enable() not called; a pool cannot be "
              "read from another process). Nothing to show; run without --no-demo for a host-pool demo.")
        return 0
    from .pool import Pool

    pool = Pool("cpu", budget="256MiB")
    stop = threading.Event()
    if args.once:
        kv = _demo_workload(pool, stop, steps=40, delay=0.0)
        run_top(pool, once=True, title=BANNER)
        kv.close()
        pool.close()
        return 0
    worker = threading.Thread(target=_demo_workload, args=(pool, stop), daemon=True)
    worker.start()
    try:
        run_top(pool, interval=args.interval, duration=args.duration, title=BANNER)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        worker.join()
        pool.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m ellm_alloc top [--once] [--interval S] [--duration S] [--no-demo]\n\n"
              + (__doc__ or ""))
        return 0 if argv else 2
    if argv[0] != "top":
        print(f"unknown command {argv[0]!r}; commands: top", file=sys.stderr)
        return 2
    return top(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
