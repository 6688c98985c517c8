"""plot_timeline: a stacked-area figure of a telemetry recording (matplotlib, Agg)."""
from __future__ import annotations

import re

__all__ = ["plot_timeline"]

_MAX_SERIES = 8
FREE = "free chunks"
MiB = float(1 << 20)


def _groups(rec) -> dict[str, str]:
    """Each owner's series: its own name; with more than _MAX_SERIES owners,
    owners whose names differ only in trailing digits (hf.sliding0,
    hf.sliding6, ...) share one (hf.sliding*). Decided once for both tiers,
    so that a KV space has the same series in the device and host panels."""
    names = list(dict.fromkeys(rec.owner_names() + rec.owner_names(host=True)))
    if len(names) <= _MAX_SERIES:
        return {n: n for n in names}
    return {n: re.sub(r"\d+$", "*", n) for n in names}


def _series(rec, host: bool = False) -> tuple[list[str], dict[str, list[int]]]:
    """Bytes per series per sample, in the device pool or (host) the host
    tier: the owners' series, then the free chunks."""
    group = _groups(rec)
    ledgers = [s["host"] if host else s for s in rec.samples]
    order = list(dict.fromkeys(group[n] for n in rec.owner_names(host=host)))
    data = {g: [0] * len(ledgers) for g in order}
    for i, led in enumerate(ledgers):
        for n, b in led["owners"].items():
            data[group[n]][i] += b
    data[FREE] = [led["free"] for led in ledgers]
    return order + [FREE], data


def _stack(ax, xs, keep, order, data, colors, prefix: str = "") -> None:
    ys = [[data[k][i] / MiB for i in keep] for k in order]
    ax.stackplot(xs, *ys, labels=[prefix + k for k in order], colors=[colors[k] for k in order],
                 step="post", alpha=0.85)


def _frame(ax, ylabel: str, title: str, **title_style) -> None:
    ax.set_ylabel(ylabel)
    ax.set_title(title, **title_style)
    ax.legend(loc="upper left", fontsize=8)
    ax.margins(x=0)


def plot_timeline(rec, path=None, x: str = "sample", title: str | None = None):
    """Stacked areas of the bytes each owner holds (arena, each KV space or
    group of spaces) and the free chunks, over the samples of `rec` (a
    telemetry.Recorder). x: "sample" (index), "time" (s) or "step" (generate
    step; samples without a step are dropped). Step samples are marked on the
    x axis. A pynvml device view, when recorded, is drawn as a line (process
    usage). When the host tier was on, a second panel below stacks the KV
    bytes swapped out to it by owner ("host: <owner>", in the owner's colour
    above) and its free chunks. Returns the Figure; saves a PNG when `path`
    is given."""
    # A bare Figure (no pyplot): rendered by Agg when saved, whatever backend is
    # active, and never registered with pyplot's figure manager.
    from matplotlib.figure import Figure

    samples = rec.samples
    if x == "step":
        keep = [i for i, s in enumerate(samples) if s["step"] is not None]
    else:
        keep = list(range(len(samples)))
    order, data = _series(rec)
    host_order, host_data = _series(rec, host=True) if rec.host_tier_used() else ([], {})
    # One colour per series in both panels: a KV space keeps its colour on the host.
    colors = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys(order + host_order))}
    xs = [samples[i]["time"] if x == "time" else samples[i]["step"] if x == "step" else i for i in keep]
    fig = Figure(figsize=(8, 6.6 if host_order else 4.2), dpi=100)
    if host_order:
        ax, host_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, host_ax = fig.add_subplot(1, 1, 1), None
    if xs:
        _stack(ax, xs, keep, order, data, colors)
        dev = [samples[i]["device"] for i in keep]
        if any(d and d.get("process_used") is not None for d in dev):
            ax.plot(xs, [(d or {}).get("process_used", 0) / MiB if d and d.get("process_used") is not None
                         else float("nan") for d in dev], color="black", lw=1, label="process (NVML)")
        if x == "sample":
            steps = [i for i in keep if samples[i]["label"] == "step"]
            if steps and len(steps) <= 400:
                ax.plot(steps, [0] * len(steps), "|", color="black", ms=6, label="generate step")
        if host_ax is not None:
            _stack(host_ax, xs, keep, host_order, host_data, colors, prefix="host: ")
    _frame(ax, "MiB", title or "ellm_alloc pool: bytes held by owner")
    if host_ax is not None:
        _frame(host_ax, "MiB on the host", "host tier: KV swapped out of the device, by owner", fontsize=10)
    (host_ax if host_ax is not None else ax).set_xlabel(
        {"time": "time (s)", "step": "generate step", "sample": "sample (allocator events and steps)"}[x])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig
