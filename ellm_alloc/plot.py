"""plot_timeline: a stacked-area figure of a telemetry recording (matplotlib, Agg)."""
from __future__ import annotations

import re

__all__ = ["plot_timeline"]

_MAX_SERIES = 8


def _series(rec) -> tuple[list[str], dict[str, list[int]]]:
    """Bytes per owner per sample; with more than _MAX_SERIES owners, owners
    whose names differ only in trailing digits (hf.sliding0, hf.sliding6, ...)
    are summed into one series (hf.sliding*)."""
    names = rec.owner_names()
    group = {n: n for n in names}
    if len(names) > _MAX_SERIES:
        group = {n: re.sub(r"\d+$", "*", n) for n in names}
    order: list[str] = []
    for n in names:
        if group[n] not in order:
            order.append(group[n])
    data = {g: [0] * len(rec.samples) for g in order}
    for i, s in enumerate(rec.samples):
        for n, b in s["owners"].items():
            data[group[n]][i] += b
    data["free chunks"] = [s["free"] for s in rec.samples]
    order.append("free chunks")
    return order, data


def plot_timeline(rec, path=None, x: str = "sample", title: str | None = None):
    """Stacked areas of the bytes each owner holds (arena, each KV space or
    group of spaces) and the free chunks, over the samples of `rec` (a
    telemetry.Recorder). x: "sample" (index), "time" (s) or "step" (generate
    step; samples without a step are dropped). Step samples are marked on the
    x axis. A pynvml device view, when recorded, is drawn as a line (process
    usage). Returns the Figure; saves a PNG when `path` is given."""
    # A bare Figure (no pyplot): rendered by Agg when saved, whatever backend is
    # active, and never registered with pyplot's figure manager.
    from matplotlib.figure import Figure

    samples = rec.samples
    if x == "step":
        keep = [i for i, s in enumerate(samples) if s["step"] is not None]
    else:
        keep = list(range(len(samples)))
    order, data = _series(rec)
    xs = [samples[i]["time"] if x == "time" else samples[i]["step"] if x == "step" else i for i in keep]
    MiB = float(1 << 20)
    ys = [[data[k][i] / MiB for i in keep] for k in order]
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if xs:
        ax.stackplot(xs, *ys, labels=order, step="post", alpha=0.85)
        dev = [samples[i]["device"] for i in keep]
        if any(d and d.get("process_used") is not None for d in dev):
            ax.plot(xs, [(d or {}).get("process_used", 0) / MiB if d and d.get("process_used") is not None
                         else float("nan") for d in dev], color="black", lw=1, label="process (NVML)")
        if x == "sample":
            steps = [i for i in keep if samples[i]["label"] == "step"]
            if steps and len(steps) <= 400:
                ax.plot(steps, [0] * len(steps), "|", color="black", ms=6, label="generate step")
    ax.set_xlabel({"time": "time (s)", "step": "generate step", "sample": "sample (allocator events and steps)"}[x])
    ax.set_ylabel("MiB")
    ax.set_title(title or "ellm_alloc pool: bytes held by owner")
    ax.legend(loc="upper left", fontsize=8)
    ax.margins(x=0)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, format="png")
    return fig
