"""A-B-A reports: results.json, results.md (comparison tables) and aba.png (error over the stream), each written
atomically (temp file in the same folder + os.replace).

The results dict (built by `hope_kernels.aba.run_aba`, JSON-serialisable):
    runs        [{"name", "model", "strategy", "privileged", "label"}] in table order
    seeds       [int]; phases ["A1", "B", "A2"]; boundaries [index where each phase starts]
    baseline    name of the LN-TTA baseline run (paired differences are against it)
    summary     {metric: {run: {name: {"mean", "lo", "hi", "half", "n"}}}}, metric "tf" | "rollout"
    paired      {metric: {run: {name: CI of run - baseline, paired by seed}}}
    curves      {metric: {run: {"mean": [...], "lo": [...], "hi": [...]}}}   (per clip, across seeds)
    copy        {metric: {phase: CI}}   copy-last-latent baseline on the same clips
    per_seed    {run: {seed: {name: value}}}; wall_seconds; config
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from hope_kernels.io import atomic_write_bytes

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_write_json", "markdown_report", "plot_stream",
           "write_results", "jsonable"]


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(obj):
    """Replace NaN/Inf by None and tuples by lists, keys to str, so the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):       # numpy / torch scalars
        return jsonable(obj.item())
    return obj


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


# ----------------------------------------------------------------------------------------------- tables

def _fmt(ci, digits=3, integer=False) -> str:
    if not ci or ci.get("mean") is None or (isinstance(ci.get("mean"), float) and math.isnan(ci["mean"])):
        return "–"
    m, h = ci["mean"], ci.get("half")
    ms = f"{m:.1f}" if integer else f"{m:.{digits}f}"
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return ms
    return f"{ms} ± {h:.1f}" if integer else f"{ms} ± {h:.{digits}f}"


_COLUMNS = [("A1", "A1"), ("B", "B"), ("A2", "A2"), ("speed_oracle", "speed→oracle (clips)"),
            ("speed_floor", "speed→floor (clips)"), ("forgetting", "forgetting"), ("gap_A1->B", "gap A1→B"),
            ("bwt", "BWT"), ("rollbacks", "rollbacks")]
_INT = {"speed_oracle", "speed_floor", "rollbacks"}


def _table(results: dict, metric: str) -> list[str]:
    summ = results["summary"][metric]
    paired = results.get("paired", {}).get(metric, {})
    base = results.get("baseline")
    head = ["strategy"] + [c for _, c in _COLUMNS] + [f"Δ B vs {base}", f"Δ A2 vs {base}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in results["runs"]:
        name = run["name"]
        if name not in summ:
            continue
        s = summ[name]
        label = run.get("label") or name
        if run.get("privileged"):
            label += " †"
        cells = [label] + [_fmt(s.get(k), integer=k in _INT) for k, _ in _COLUMNS]
        p = paired.get(name, {})
        cells += ["–" if name == base else _fmt(p.get("B")), "–" if name == base else _fmt(p.get("A2"))]
        lines.append("| " + " | ".join(cells) + " |")
    copy = results.get("copy", {}).get(metric)
    if copy:
        cells = ["copy last latent (scale)"] + [_fmt(copy.get(p)) for p in ("A1", "B", "A2")]
        cells += ["–"] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(results: dict) -> str:
    """results.md: one table per error metric, HOPE and the LN-TTA baseline first."""
    seeds = results.get("seeds", [])
    out = ["# A-B-A test-time adaptation results", "",
           f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). Values: mean ± 95% CI half-width (Student t over "
           "seeds). Errors are L1 on layer-normalised latents, measured prequentially (each clip is scored before "
           "the model adapts on it). Speed: clips into B until the running error is within 10% of the oracle's B "
           "error / of the run's own B floor (n_B + 1 = never). Forgetting = A2 mean − A1 end. Δ columns: paired "
           f"by seed against {results.get('baseline')} (negative = lower error). † privileged (uses B training "
           "data or an A1 replay buffer)."]
    names = {"tf": "Teacher-forcing L1 (one-step)", "rollout": "Rollout L1 (mean over horizons)"}
    for metric in results["summary"]:
        out += ["", f"## {names.get(metric, metric)}", ""] + _table(results, metric)
    if results.get("wall_seconds") is not None:
        out += ["", f"Wall time: {results['wall_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- plot

def plot_stream(results: dict, path) -> Path:
    """aba.png: per-clip error (mean across seeds, CI band) for every run, phases shaded; one panel per metric."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(results["curves"])
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    phases, bounds = results.get("phases", []), list(results.get("boundaries", []))
    shades = {"A1": "#dde7f5", "B": "#f7e1d7", "A2": "#dde7f5"}
    for ax, metric in zip(axes[:, 0], metrics):
        curves = results["curves"][metric]
        n = max((len(c["mean"]) for c in curves.values()), default=0)
        edges = bounds + [n]
        for k, p in enumerate(phases):
            if k + 1 < len(edges):
                ax.axvspan(edges[k] - 0.5, edges[k + 1] - 0.5, color=shades.get(p, "#eeeeee"), alpha=0.6, lw=0)
                ax.text((edges[k] + edges[k + 1] - 1) / 2, 1.0, p, transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=9)
        for run in results["runs"]:
            c = curves.get(run["name"])
            if not c:
                continue
            x = list(range(len(c["mean"])))
            style = "--" if run.get("privileged") else "-"
            (line,) = ax.plot(x, _nan(c["mean"]), style, lw=1.4, label=run.get("label") or run["name"])
            ax.fill_between(x, _nan(c["lo"]), _nan(c["hi"]), color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("clip in stream")
        ax.set_ylabel(f"{metric} L1")
        ax.set_xlim(-0.5, n - 0.5)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _nan(xs):
    return [math.nan if x is None else x for x in xs]


def write_results(results: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md and aba.png into out_dir; returns their paths."""
    out = Path(out_dir)
    for key in ("runs", "summary", "curves"):
        if key not in results:
            raise ValueError(f"results dict is missing {key!r}")
    return {"json": atomic_write_json(out / "results.json", results),
            "md": atomic_write_text(out / "results.md", markdown_report(results)),
            "png": plot_stream(results, out / "aba.png")}
