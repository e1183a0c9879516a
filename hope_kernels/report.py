"""A-B-A reports: results.json, results.md (comparison tables) and aba.png (error over the stream), each written
atomically (hope_kernels.io: temp file in the same folder + os.replace).

The results dict (built by `hope_kernels.aba.run_aba`, JSON-serialisable):
    runs        [{"name", "model", "strategy", "privileged", "label"}] in table order
    seeds       [int]; phases ["A1", "B", "A2"]; boundaries [index where each phase starts]
    baseline    name of the LN-TTA baseline run (paired differences are against it)
    summary     {metric: {run: {name: {"mean", "lo", "hi", "half", "n"}}}}, metric "tf" | "rollout"
    paired      {metric: {run: {name: CI of run - baseline, paired by seed}}}
    curves      {metric: {run: {"mean": [...], "lo": [...], "hi": [...]}}}   (per clip, across seeds)
    copy        {metric: {phase: CI}}   copy-last-latent baseline on the same clips
    per_seed    {run: {seed: {name: value}}}; wall_seconds; config
Optional (older files lack them; each part of the report is then skipped):
    pretrained  [{"name", "runs", "model", "phases", "source", "note",
                  "heldout": {phase: {"tf", "copy_last", "ratio"}}}]   held-out error of each pre-trained model
    tuning      {"seeds", "clips_per_phase", "metric", "criterion", "runs": {run: {"grid", "scores", "choice",
                "chosen_index"}}}   test-time options chosen on a validation stream
    comparisons {metric: [{"a", "b", "label", "diffs": {"B" | "A2" | "forgetting" | "speed_oracle": CI of a - b}}]}
    shift       {metric: {"frozen", "oracle", "frozen_B": CI, "oracle_B": CI, "ratio"}}
    rel_curves  {metric: {run: {"mean", "lo", "hi"}}}   per clip, error / copy-last error on the same clip
    headline    [run names] drawn in aba.png (every run goes to aba_all.png)
"""

from __future__ import annotations

import math
from pathlib import Path

from hope_kernels.io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["markdown_report", "verdict", "plot_stream", "write_results"]


# ----------------------------------------------------------------------------------------------- tables


def _fmt(ci, digits=4, integer=False) -> str:
    if not ci or ci.get("mean") is None or (isinstance(ci.get("mean"), float) and math.isnan(ci["mean"])):
        return "–"
    m, h = ci["mean"], ci.get("half")
    ms = f"{m:.1f}" if integer else f"{m:.{digits}f}"
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return ms
    return f"{ms} ± {h:.1f}" if integer else f"{ms} ± {h:.{digits}f}"


_COLUMNS = [
    ("A1", "A1"),
    ("B", "B"),
    ("A2", "A2"),
    ("speed_oracle", "speed→oracle (clips)"),
    ("speed_floor", "speed→floor (clips)"),
    ("forgetting", "forgetting"),
    ("gap_A1->B", "gap A1→B"),
    ("bwt", "BWT"),
    ("rollbacks", "rollbacks"),
]
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


# ---------------------------------------------------------------------------------------------- verdict

_METRIC_NAMES = {"tf": "Teacher-forcing L1 (one-step)", "rollout": "Rollout L1 (mean over horizons)"}
# (key in a comparison's diffs, name in the verdict, unit of a difference)
_VERDICT_ITEMS = [
    ("B", "B error", ""),
    ("A2", "A2 error", ""),
    ("forgetting", "forgetting", ""),
    ("speed_oracle", "clips in B to reach the oracle within 10%", " clips"),
]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _decimals(values, least: int) -> int | None:
    """Decimals that show the largest finite |value| with two significant digits, at least `least`; None (write
    in scientific notation) when that would take more than 6, e.g. float noise around a zero difference."""
    big = max((abs(v) for v in values if _finite(v)), default=0.0)
    if big == 0.0:
        return least
    d = max(least, 1 - math.floor(math.log10(big)))
    return d if d <= 6 else None


def _num(x: float, d: int | None, sign: str = "") -> str:
    """x with d decimals (None: scientific), sign "+" to always show it; a typographic minus."""
    return (f"{x:{sign}.{d}f}" if d is not None else f"{x:{sign}.1e}").replace("-", "−")


def _signed(x: float, d: int | None) -> str:
    return _num(x, d, "+")


def _labels(results: dict) -> dict[str, str]:
    return {r["name"]: r.get("label") or r["name"] for r in results.get("runs", [])}


def _diff_phrase(ci, a: str, b: str, unit: str, seeds: int) -> str:
    """One paired difference a - b (lower is better) in words: which run is better, or no detectable difference,
    or not measurable. a, b: labels; unit: "" (errors) or " clips"; seeds: fallback when ci has no "n"."""
    mean = (ci or {}).get("mean")
    if not _finite(mean):
        return "not measured"
    n = int(ci["n"]) if _finite(ci.get("n")) else seeds
    lo, hi, half = ci.get("lo"), ci.get("hi"), ci.get("half")
    if not (_finite(lo) and _finite(hi)) and _finite(half):
        lo, hi = mean - half, mean + half
    least = 1 if unit else 4
    if not (_finite(lo) and _finite(hi)):
        d = _decimals([mean], least)
        why = "one seed" if n <= 1 else f"no CI, {n} seeds"
        return f"not measurable ({why}; Δ {_signed(mean, d)})"
    d = _decimals([mean, lo, hi], least)
    ci_text = f"CI [{_signed(lo, d)}, {_signed(hi, d)}], {n} seed{'s' if n != 1 else ''}"
    if lo <= 0.0 <= hi:
        return f"no detectable difference at 95% (Δ {_signed(mean, d)}, {ci_text})"
    better = a if mean < 0 else b
    how = f"faster by {_num(abs(mean), d)}{unit}" if unit else f"lower by {_num(abs(mean), d)}"
    return f"{better} {how} (paired Δ {_signed(mean, d)}, 95% {ci_text})"


def _shift_phrase(shift: dict, labels: dict) -> str | None:
    """The frozen A1 model's B error over the oracle's, or None when the numbers are missing."""
    fb, ob = (shift.get("frozen_B") or {}).get("mean"), (shift.get("oracle_B") or {}).get("mean")
    ratio = shift.get("ratio")
    if not _finite(ratio) and _finite(fb) and _finite(ob) and ob > 0:
        ratio = fb / ob
    if not _finite(ratio):
        return None
    text = f"A1→B shift: the frozen A1 model's B error is {ratio:.2f}x the oracle's"
    if _finite(fb) and _finite(ob):
        d = _decimals([fb, ob], 4)
        text += f" ({_num(fb, d)} vs {_num(ob, d)})"
    who = [f"{k} = {labels.get(shift[k], shift[k])}" for k in ("frozen", "oracle") if shift.get(k)]
    if who:
        text += f" [{', '.join(who)}]"
    if abs(ratio - 1.0) < 0.1:
        # the same 10% tolerance as speed_oracle: within it, B is no harder than A1 for the A1 model
        text += "; the gap is under 10%, so B leaves little for test-time adaptation to recover"
    return text + "."


def verdict(results: dict, metric: str = "tf") -> str:
    """Markdown section (heading + bullets) stating, from results["comparisons"][metric] and results["shift"][metric]
    only, which run of each pair is better on B error, A2 error, forgetting and speed to the oracle, with paired
    differences and 95% CIs. "" when the results hold neither (older files)."""
    comps = (results.get("comparisons") or {}).get(metric) or []
    shift = (results.get("shift") or {}).get(metric)
    labels = _labels(results)
    seeds = len(results.get("seeds") or [])
    lines = []
    for comp in comps:
        a, b = comp.get("a"), comp.get("b")
        la, lb = labels.get(a, a), labels.get(b, b)
        diffs = comp.get("diffs") or {}
        parts = [
            f"{name}: {_diff_phrase(diffs[key], la, lb, unit, seeds)}"
            for key, name, unit in _VERDICT_ITEMS
            if key in diffs
        ]
        if parts:
            title = comp.get("label") or f"{la} vs {lb}"
            lines.append(f"- **{title}** (Δ = {la} − {lb}): " + "; ".join(parts) + ".")
    if shift:
        text = _shift_phrase(shift, labels)
        if text:
            lines.append(f"- {text}")
    if not lines:
        return ""
    name = _METRIC_NAMES.get(metric, metric)
    head = "## Verdict" if metric == "tf" else f"### Verdict: {name}"
    n_seeds = f"{seeds} seed{'s' if seeds != 1 else ''}"
    if metric != "tf":  # printed under its own table, shorter
        intro = f"{n_seeds}; Δ: per-seed paired difference (first run − second run), 95% Student-t CI."
    else:
        intro = (
            f"{name} on the reported stream, {n_seeds}. Δ is the per-seed paired difference (first run − "
            "second run) with its 95% Student-t CI; lower error, lower forgetting and fewer clips are better."
        )
    return "\n".join([head, "", intro, ""] + lines) + "\n"


# ------------------------------------------------------------------------------------ optional tables


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _options(opts) -> str:
    """{"lr": 0.001, "steps": 1} -> "lr=0.001, steps=1"; {} -> "defaults"."""
    if not isinstance(opts, dict):
        return "–" if opts is None else str(opts)
    return ", ".join(f"{k}={_value(v)}" for k, v in opts.items()) or "defaults"


def _pretrained_table(results: dict) -> list[str]:
    """Held-out teacher-forcing error of each pre-trained model, "error (ratio to copy-last)" per phase."""
    models = results.get("pretrained") or []
    if not models:
        return []
    labels = _labels(results)
    phases = list(results.get("phases") or ["A1", "B", "A2"])
    phases += [p for m in models for p in (m.get("heldout") or {}) if p not in phases]
    d = _decimals([(m.get("heldout") or {}).get(p, {}).get("tf") for m in models for p in phases], 4)

    def cell(h):
        tf = (h or {}).get("tf")
        if not _finite(tf):
            return "–"
        ratio, copy = h.get("ratio"), h.get("copy_last")
        if not _finite(ratio) and _finite(copy) and copy > 0:
            ratio = tf / copy
        return f"{_num(tf, d)} ({ratio:.2f}x)" if _finite(ratio) else _num(tf, d)

    notes = any(m.get("note") for m in models)
    head = ["model", "arch", "trained on", "source"] + phases + ["used by"] + (["note"] if notes else [])
    out = [
        "## Pre-trained models (held-out teacher-forcing L1)",
        "",
        "Error on held-out clips of each phase; in brackets its ratio to the copy-last-latent error on the same "
        "clips (below 1x = better than repeating the last latent).",
        "",
        _row(head),
        "|" + "---|" * len(head),
    ]
    for m in models:
        held = m.get("heldout") or {}
        cells = [
            m.get("name", "?"),
            m.get("model", "–"),
            " + ".join(m.get("phases") or []) or "–",
            m.get("source", "–"),
        ] + [cell(held.get(p)) for p in phases]
        cells.append(", ".join(labels.get(r, r) for r in m.get("runs") or []) or "–")
        if notes:
            cells.append(m.get("note") or "")
        out.append(_row(cells))
    return out


def _tuning_table(results: dict) -> list[str]:
    """Test-time options per run: the grid, its validation scores and the choice."""
    tuning = results.get("tuning") or {}
    runs = tuning.get("runs") or {}
    if not runs:
        return []
    labels = _labels(results)
    vseeds = list(tuning.get("seeds") or [])
    where = [f"seeds {', '.join(map(str, vseeds))}"] if vseeds else []
    if tuning.get("clips_per_phase") is not None:
        where.append(f"{tuning['clips_per_phase']} clips per phase")
    metric = tuning.get("metric")
    if metric:
        name = _METRIC_NAMES.get(metric, metric)
        where.append(f"metric: {name[:1].lower()}{name[1:]}")
    crit = f"; criterion: {tuning['criterion']}" if tuning.get("criterion") else ""
    text = (
        "Chosen per run on a validation stream"
        + (f" ({'; '.join(where)})" if where else "")
        + f", not on the reported stream{crit}. Scores are mean validation errors, one per grid entry in order "
        "(lower is better)."
    )
    overlap = sorted(set(map(str, vseeds)) & set(map(str, results.get("seeds") or [])))
    if overlap:
        text += f" Note: validation seeds {', '.join(overlap)} are also reported seeds."
    d = _decimals([s for r in runs.values() for s in r.get("scores") or []], 4)
    out = [
        "## Test-time hyperparameters (validation stream)",
        "",
        text,
        "",
        _row(["run", "grid", "validation scores", "chosen"]),
        "|---|---|---|---|",
    ]
    order = [r["name"] for r in results.get("runs", []) if r["name"] in runs] + [n for n in runs if n not in labels]
    for name in order:
        t = runs[name]
        grid, scores = list(t.get("grid") or []), list(t.get("scores") or [])
        k = t.get("chosen_index")
        if not isinstance(k, int) or not 0 <= k < len(grid):
            k = grid.index(t["choice"]) if t.get("choice") in grid else None
        chosen = _options(t.get("choice", grid[k] if k is not None else None))
        if k is not None and k < len(scores) and _finite(scores[k]):
            chosen += f" ({_num(scores[k], d)})"
        score_text = "; ".join(_num(s, d) if _finite(s) else "–" for s in scores) or "–"
        out.append(_row([labels.get(name, name), "; ".join(_options(g) for g in grid) or "–", score_text, chosen]))
    return out


def markdown_report(results: dict) -> str:
    """results.md: title, verdict (teacher forcing), pre-trained models and test-time hyperparameters (when the
    results hold them), then one table per error metric, HOPE and the LN-TTA baseline first."""
    seeds = results.get("seeds", [])
    out = ["# A-B-A test-time adaptation results", ""]
    top = verdict(results, "tf")
    if top:
        out += [top]
    for part in (_pretrained_table(results), _tuning_table(results)):
        if part:
            out += part + [""]
    out += [
        f"Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). Values: mean ± 95% CI half-width (Student t over "
        "seeds). Errors are L1 on layer-normalised latents, measured prequentially (each clip is scored before "
        "the model adapts on it). Speed: clips into B until the running error is within 10% of the oracle's B "
        "error / of the run's own B floor (n_B + 1 = never). Forgetting = A2 mean − A1 end. Δ columns: paired "
        f"by seed against {results.get('baseline')} (negative = lower error). † privileged (uses B training "
        "data or an A1 replay buffer)."
    ]
    for metric in results["summary"]:
        out += ["", f"## {_METRIC_NAMES.get(metric, metric)}", ""] + _table(results, metric)
        below = verdict(results, metric) if metric != "tf" else ""
        if below:
            out += ["", below.rstrip("\n")]
    left = _left_out(results)
    if left:
        out += [
            "",
            f"Clip scores that were NaN or Inf, left out of every mean above (the run's log names the clips): {left}.",
        ]
    if results.get("wall_seconds") is not None:
        out += ["", f"Wall time: {results['wall_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def _left_out(results: dict) -> str:
    """ "run (n clips; seeds s, t); ..." for every run with non-finite teacher-forcing scores, "" when none."""
    parts = []
    for name, by_seed in results.get("per_seed", {}).get("tf", {}).items():
        bad = {s: int(m.get("nonfinite", 0)) for s, m in by_seed.items() if m.get("nonfinite")}
        if bad:
            parts.append(f"{name} ({sum(bad.values())} clips; seeds {', '.join(map(str, bad))})")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------- plot


def _plot_plan(results: dict, which: str) -> tuple[bool, list[str]]:
    """(relative, run names) drawn by plot_stream. "headline": the headline runs in relative units when
    results has rel_curves and headline, else every run in absolute units; "all": every run, relative when
    rel_curves exist."""
    rel = bool(results.get("rel_curves"))
    everyone = [r["name"] for r in results.get("runs", [])]
    if which == "headline":
        head = list(results.get("headline") or [])
        return (True, head) if rel and head else (False, everyone)
    if which == "all":
        return rel, everyone
    raise ValueError(f"which must be 'headline' or 'all', got {which!r}")


def plot_stream(results: dict, path, which: str = "headline") -> Path:
    """Per-clip error over the stream (mean across seeds, 95% CI band), phases shaded, one panel per metric;
    written atomically to path (a PNG). which: "headline" (aba.png) or "all" (aba_all.png), see _plot_plan.
    In relative units (error / copy-last on the same clip) copy-last is the line at 1.0. Returns path."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relative, names = _plot_plan(results, which)
    curves_by_metric = results["rel_curves"] if relative else results["curves"]
    metrics = list(curves_by_metric)
    runs = {r["name"]: r for r in results.get("runs", [])}
    order = [r["name"] for r in results.get("runs", [])]
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    # a run keeps its colour in both figures
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(order + [n for n in names if n not in order])}
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    phases, bounds = results.get("phases", []), list(results.get("boundaries", []))
    shades = {"A1": "#dde7f5", "B": "#f7e1d7", "A2": "#dde7f5"}
    for ax, metric in zip(axes[:, 0], metrics):
        curves = curves_by_metric[metric] or {}
        n = max((len(c.get("mean") or []) for c in curves.values() if c), default=0)
        edges = bounds + [n]
        for k, p in enumerate(phases):
            if k + 1 < len(edges):
                ax.axvspan(edges[k] - 0.5, edges[k + 1] - 0.5, color=shades.get(p, "#eeeeee"), alpha=0.6, lw=0)
                ax.text(
                    (edges[k] + edges[k + 1] - 1) / 2,
                    1.0,
                    p,
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
        if relative:
            ax.axhline(1.0, color="black", ls=":", lw=1.2, label="copy last latent")
        for name in names:
            c = curves.get(name)
            if not c or not c.get("mean"):
                continue
            run = runs.get(name, {})
            x = list(range(len(c["mean"])))
            ax.plot(
                x,
                _nan(c["mean"]),
                "--" if run.get("privileged") else "-",
                lw=1.4,
                color=colour[name],
                label=run.get("label") or name,
            )
            if c.get("lo") and c.get("hi"):
                ax.fill_between(x, _nan(c["lo"]), _nan(c["hi"]), color=colour[name], alpha=0.15, lw=0)
        ax.set_xlabel("clip in stream")
        if relative:
            ax.set_ylabel("error / copy-last on the same clip")
            ax.set_title(_METRIC_NAMES.get(metric, metric), fontsize=9, loc="left", pad=14)  # above phase names
        else:
            ax.set_ylabel(f"{metric} L1")
        ax.set_xlim(-0.5, n - 0.5)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="best" if relative else "upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _nan(xs):
    return [math.nan if x is None else x for x in xs]


def write_results(results: dict, out_dir) -> dict[str, Path]:
    """Write results.json, results.md, aba.png (headline runs) and aba_all.png (every run) into out_dir; returns
    their paths under "json", "md", "png", "png_all"."""
    out = Path(out_dir)
    for key in ("runs", "summary", "curves"):
        if key not in results:
            raise ValueError(f"results dict is missing {key!r}")
    return {
        "json": atomic_write_json(out / "results.json", results),
        "md": atomic_write_text(out / "results.md", markdown_report(results)),
        "png": plot_stream(results, out / "aba.png", "headline"),
        "png_all": plot_stream(results, out / "aba_all.png", "all"),
    }
