"""Reports: strict JSON (NaN -> null), the markdown table (HOPE and the baseline first, privileged marked), the
verdict's wording, the optional pre-trained / tuning tables (skipped when absent), both PNGs valid, atomic writes
leave no temp files."""

import copy
import functools
import json
import math

import pytest

from hope_kernels.aba import summarize
from hope_kernels.adapt import StreamLog
from hope_kernels.io import atomic_write_json, jsonable
from hope_kernels.report import _plot_plan, markdown_report, plot_stream, verdict, write_results

PH = ["A1"] * 3 + ["B"] * 3 + ["A2"] * 3


def _log(name, scale, seed):
    tf = [scale * (1 + 0.1 * seed + (1.0 if p == "B" else 0.0)) for p in PH]
    return StreamLog(
        strategy=name,
        phases=PH,
        tf=tf,
        rollout=[[e, 2 * e] for e in tf],
        copy_tf=[3.0] * 9,
        copy_rollout=[[3.0, 4.0]] * 9,
        heldout={p: {q: {"tf": 1.0, "rollout": 2.0} for q in ("A1", "B", "A2")} for p in ("A1", "B", "A2")},
    )


def _results():
    return copy.deepcopy(_summary())


@functools.lru_cache(maxsize=1)
def _summary():
    cfg = {
        "baseline": "ac+layernorm",
        "metric_window": 2,
        "runs": [
            {"name": "hope", "model": "hope", "strategy": "hope", "label": "HOPE"},
            {"name": "ac+layernorm", "model": "ac", "strategy": "layernorm", "label": "LN-TTA"},
            {"name": "ac+replay", "model": "ac", "strategy": "replay"},
            {"name": "oracle", "model": "ac", "strategy": "none", "train_phases": ["B"], "privileged": True},
        ],
    }
    scales = {"hope": 0.8, "ac+layernorm": 1.0, "ac+replay": 0.9, "oracle": 0.5}
    logs = {n: {s: _log(n, k, s) for s in (0, 1, 2)} for n, k in scales.items()}
    return summarize(cfg, logs, ("A1", "B", "A2"))


def test_summary_values():
    r = _results()
    b = r["summary"]["tf"]["hope"]["B"]
    # B errors per seed: 0.8 * (2 + 0.1 s), s = 0, 1, 2 -> mean 0.8 * 2.1
    assert b["mean"] == pytest.approx(0.8 * 2.1) and b["n"] == 3
    d = r["paired"]["tf"]["hope"]["B"]
    assert d["mean"] == pytest.approx(-0.2 * 2.1) and d["half"] == pytest.approx(0.02 * 4.302653 / 3**0.5, rel=1e-5)
    assert r["boundaries"] == [0, 3, 6] and r["oracle"] == "oracle"
    assert [x["privileged"] for x in r["runs"]] == [False, False, True, True]
    assert r["copy"]["tf"]["B"]["mean"] == 3.0


def test_write_results_files(tmp_path):
    r = _old()  # an older results dict: the fallback figures, no optional sections
    r["wall_seconds"] = 12.0
    paths = write_results(r, tmp_path)
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN would not parse in other readers
    assert "NaN" not in paths["json"].read_text()
    assert data["summary"]["tf"]["hope"]["A1"]["n"] == 3
    md = paths["md"].read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    assert rows[1].startswith("| HOPE |") and rows[2].startswith("| LN-TTA |")
    assert "| ac+replay † |" in md and "| oracle † |" in md and "copy last latent" in md
    assert "Wall time: 12 s" in md
    for key in ("png", "png_all"):
        png = paths[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert paths["png_all"].name == "aba_all.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aba.png", "aba_all.png", "results.json", "results.md"]
    assert "## Verdict" not in md and "## Pre-trained" not in md and "## Test-time" not in md


def test_jsonable_and_atomic(tmp_path):
    obj = {"a": math.nan, "b": (1, math.inf), 3: [1.5]}
    assert jsonable(obj) == {"a": None, "b": [1, None], "3": [1.5]}
    p = atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads(p.read_text()) == {"a": None, "b": [1, None], "3": [1.5]}
    with pytest.raises(ValueError, match="missing"):
        write_results({"runs": []}, tmp_path)
    assert markdown_report(_results()).startswith("# A-B-A")


# ------------------------------------------------------------------ verdict, optional tables, two figures

_OPTIONAL = ("pretrained", "tuning", "comparisons", "shift", "rel_curves", "headline")


def _old():
    """_results() as an older engine wrote it: none of the optional keys."""
    return {k: v for k, v in _results().items() if k not in _OPTIONAL}


def _ci(mean, half, n=3):
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half, "n": n}


def _full():
    """_results() plus the optional keys: one comparison per verdict case, shift, pre-trained, tuning, rel curves."""
    r = _results()
    one_seed = {"mean": 0.01, "lo": math.nan, "hi": math.nan, "half": math.nan, "n": 1}
    r["comparisons"] = {
        "tf": [
            {
                "a": "hope",
                "b": "ac+layernorm",
                "label": "HOPE vs LN-TTA",
                "diffs": {
                    "B": _ci(-0.0012, 0.0008),
                    "A2": _ci(0.0003, 0.0008),
                    "forgetting": _ci(0.0025, 0.001),
                    "speed_oracle": _ci(-2.0, 1.5),
                },
            },
            {"a": "hope", "b": "ac+replay", "diffs": {"B": one_seed}},
        ],
        "rollout": [{"a": "hope", "b": "ac+layernorm", "diffs": {"A2": _ci(0.004, 0.001)}}],
    }
    r["shift"] = {
        "tf": {
            "frozen": "ac+replay",
            "oracle": "oracle",
            "frozen_B": _ci(0.0308, 0.001),
            "oracle_B": _ci(0.0211, 0.001),
            "ratio": 0.0308 / 0.0211,
        }
    }
    r["pretrained"] = [
        {
            "name": "ac-A1",
            "runs": ["ac+layernorm", "ac+replay"],
            "model": "ac",
            "phases": ["A1"],
            "source": "shipped",
            "note": "",
            "heldout": {
                "A1": {"tf": 0.0072, "copy_last": 0.0133, "ratio": 0.54},
                "B": {"tf": 0.03, "copy_last": 0.025, "ratio": 1.2},
                "A2": {"tf": 0.008, "copy_last": 0.016},
            },
        }
    ]  # ratio computed
    r["tuning"] = {
        "seeds": [100, 101],
        "clips_per_phase": 4,
        "metric": "tf",
        "criterion": "lowest mean",
        "runs": {
            "hope": {
                "grid": [{"lr": 0.001, "steps": 1}, {"lr": 0.01, "steps": 1}],
                "scores": [0.0123, 0.0119],
                "choice": {"lr": 0.01, "steps": 1},
                "chosen_index": 1,
            }
        },
    }
    r["rel_curves"] = {
        m: {n: {"mean": [0.5] * 8 + [None], "lo": [0.4] * 9, "hi": [0.6] * 9} for n in r["curves"][m]}
        for m in r["curves"]
    }
    r["headline"] = ["hope", "ac+layernorm", "oracle"]
    return r


def test_verdict_wording():
    v = verdict(_full())
    assert v.startswith("## Verdict\n") and "Teacher-forcing L1 (one-step) on the reported stream, 3 seeds" in v
    assert "**HOPE vs LN-TTA** (Δ = HOPE − LN-TTA)" in v
    # better, no detectable difference, worse (LN-TTA better), speed in clips, one seed
    assert "B error: HOPE lower by 0.0012 (paired Δ −0.0012, 95% CI [−0.0020, −0.0004], 3 seeds)" in v
    assert "A2 error: no detectable difference at 95% (Δ +0.0003, CI [−0.0005, +0.0011], 3 seeds)" in v
    assert "forgetting: LN-TTA lower by 0.0025 (paired Δ +0.0025, 95% CI [+0.0015, +0.0035], 3 seeds)" in v
    assert (
        "clips in B to reach the oracle within 10%: HOPE faster by 2.0 clips (paired Δ −2.0, 95% CI [−3.5, "
        "−0.5], 3 seeds)"
    ) in v
    assert "**HOPE vs ac+replay** (Δ = HOPE − ac+replay): B error: not measurable (one seed; Δ +0.0100)." in v
    assert "A1→B shift: the frozen A1 model's B error is 1.46x the oracle's (0.0308 vs 0.0211" in v
    assert "little for test-time adaptation" not in v
    # a CI ending exactly at 0 is not a difference; JSON's None (NaN) counts as one seed; a small shift is flagged
    r = _full()
    r["comparisons"]["tf"] = [
        {"a": "hope", "b": "oracle", "diffs": {"B": _ci(-0.001, 0.001), "A2": {"mean": 0.002, "half": None, "n": 1}}}
    ]
    r["shift"]["tf"] = {"frozen_B": _ci(0.0210, 0.001), "oracle_B": _ci(0.0200, 0.001)}
    v = verdict(r)
    assert "B error: no detectable difference at 95% (Δ −0.0010, CI [−0.0020, +0.0000], 3 seeds)" in v
    assert "A2 error: not measurable (one seed; Δ +0.0020)" in v
    assert "B error is 1.05x the oracle's (0.0210 vs 0.0200); the gap is under 10%" in v
    assert verdict(r, "rollout").startswith("### Verdict: Rollout L1")
    assert verdict(_old()) == "" and verdict(_full(), "missing") == ""
    # float noise around a zero difference is written in scientific notation, not as 0.00000000
    r["comparisons"]["tf"] = [{"a": "hope", "b": "oracle", "diffs": {"B": _ci(7.4e-17, 1.6e-16)}}]
    assert "no detectable difference at 95% (Δ +7.4e−17, CI [−8.6e−17, +2.3e−16], 3 seeds)" in verdict(r)


def test_markdown_optional_tables():
    md = markdown_report(_full())
    heads = [l for l in md.splitlines() if l.startswith("## ")]
    assert heads == [
        "## Verdict",
        "## Pre-trained models (held-out teacher-forcing L1)",
        "## Test-time hyperparameters (validation stream)",
        "## Teacher-forcing L1 (one-step)",
        "## Rollout L1 (mean over horizons)",
    ]
    assert md.splitlines()[2] == "## Verdict"  # right after the title line
    assert "| ac-A1 | ac | A1 | shipped | 0.0072 (0.54x) | 0.0300 (1.20x) | 0.0080 (0.50x) | LN-TTA, ac+replay |" in md
    assert "| HOPE | lr=0.001, steps=1; lr=0.01, steps=1 | 0.0123; 0.0119 | lr=0.01, steps=1 (0.0119) |" in md
    assert "seeds 100, 101; 4 clips per phase" in md and "criterion: lowest mean" in md
    rollout = md.split("## Rollout L1")[1]
    assert "### Verdict: Rollout L1" in rollout and "A2 error: LN-TTA lower by 0.0040" in rollout
    # parts whose keys are missing or empty are skipped
    r = _full()
    del r["pretrained"], r["comparisons"]["tf"], r["shift"]
    r["tuning"] = {"seeds": [0], "runs": {}}
    md = markdown_report(r)
    assert "\n## Verdict" not in md and "## Pre-trained" not in md and "## Test-time" not in md
    assert "### Verdict: Rollout L1" in md


def test_plot_plan_and_both_pngs(tmp_path):
    everyone = ["hope", "ac+layernorm", "ac+replay", "oracle"]
    assert _plot_plan(_full(), "headline") == (True, ["hope", "ac+layernorm", "oracle"])
    assert _plot_plan(_full(), "all") == (True, everyone)
    assert _plot_plan(_old(), "headline") == (False, everyone) == _plot_plan(_old(), "all")
    with pytest.raises(ValueError, match="which"):
        _plot_plan(_old(), "some")
    # the relative headline figure (test_write_results_files draws both absolute ones)
    png = plot_stream(_full(), tmp_path / "aba.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["aba.png"]
    # the JSON round trip (NaN -> null) still reports
    md = markdown_report(json.loads(atomic_write_json(tmp_path / "r.json", _full()).read_text()))
    assert "B error: not measurable (one seed; Δ +0.0100)" in md
