"""Reports: strict JSON (NaN -> null), the markdown table (HOPE and the baseline first, privileged marked), a
valid PNG, atomic writes leave no temp files."""
import json
import math

import pytest

from hope_kernels.adapt import StreamLog
from hope_kernels.aba import summarize
from hope_kernels.report import atomic_write_json, jsonable, markdown_report, write_results

PH = ["A1"] * 3 + ["B"] * 3 + ["A2"] * 3


def _log(name, scale, seed):
    tf = [scale * (1 + 0.1 * seed + (1.0 if p == "B" else 0.0)) for p in PH]
    return StreamLog(strategy=name, phases=PH, tf=tf, rollout=[[e, 2 * e] for e in tf],
                     copy_tf=[3.0] * 9, copy_rollout=[[3.0, 4.0]] * 9,
                     heldout={p: {q: {"tf": 1.0, "rollout": 2.0} for q in ("A1", "B", "A2")} for p in ("A1", "B", "A2")})


def _results():
    cfg = {"baseline": "ac+layernorm", "metric_window": 2,
           "runs": [{"name": "hope", "model": "hope", "strategy": "hope", "label": "HOPE"},
                    {"name": "ac+layernorm", "model": "ac", "strategy": "layernorm", "label": "LN-TTA"},
                    {"name": "ac+replay", "model": "ac", "strategy": "replay"},
                    {"name": "oracle", "model": "ac", "strategy": "none", "train_phases": ["B"], "privileged": True}]}
    scales = {"hope": 0.8, "ac+layernorm": 1.0, "ac+replay": 0.9, "oracle": 0.5}
    logs = {n: {s: _log(n, k, s) for s in (0, 1, 2)} for n, k in scales.items()}
    return summarize(cfg, logs, ("A1", "B", "A2"))


def test_summary_values():
    r = _results()
    b = r["summary"]["tf"]["hope"]["B"]
    # B errors per seed: 0.8 * (2 + 0.1 s), s = 0, 1, 2 -> mean 0.8 * 2.1
    assert b["mean"] == pytest.approx(0.8 * 2.1) and b["n"] == 3
    d = r["paired"]["tf"]["hope"]["B"]
    assert d["mean"] == pytest.approx(-0.2 * 2.1) and d["half"] == pytest.approx(0.02 * 4.302653 / 3 ** 0.5, rel=1e-5)
    assert r["boundaries"] == [0, 3, 6] and r["oracle"] == "oracle"
    assert [x["privileged"] for x in r["runs"]] == [False, False, True, True]
    assert r["copy"]["tf"]["B"]["mean"] == 3.0


def test_write_results_files(tmp_path):
    r = _results()
    r["wall_seconds"] = 12.0
    paths = write_results(r, tmp_path)
    data = json.loads(paths["json"].read_text())          # strict JSON: NaN would not parse in other readers
    assert "NaN" not in paths["json"].read_text()
    assert data["summary"]["tf"]["hope"]["A1"]["n"] == 3
    md = paths["md"].read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    assert rows[1].startswith("| HOPE |") and rows[2].startswith("| LN-TTA |")
    assert "| ac+replay † |" in md and "| oracle † |" in md and "copy last latent" in md
    assert "Wall time: 12 s" in md
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aba.png", "results.json", "results.md"]


def test_jsonable_and_atomic(tmp_path):
    obj = {"a": math.nan, "b": (1, math.inf), 3: [1.5]}
    assert jsonable(obj) == {"a": None, "b": [1, None], "3": [1.5]}
    p = atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads(p.read_text()) == {"a": None, "b": [1, None], "3": [1.5]}
    with pytest.raises(ValueError, match="missing"):
        write_results({"runs": []}, tmp_path)
    assert markdown_report(_results()).startswith("# A-B-A")
