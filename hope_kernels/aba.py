"""The A-B-A main job (DESIGN 6): data -> pre-trained predictors -> every strategy over the stream for every seed
-> metrics -> results.json / results.md / aba.png.

    results = run_aba(load_config("quick", out="runs/quick"))

Layout of `out`:
    data/                         simulated dataset (unless config["data"]["dir"] points elsewhere)
    checkpoints/<key>/            one pre-training run per (model, overrides, training phases[, seed]);
    checkpoints/<key>.json        marker written after training: {"checkpoint": path}; reused on restart
    runs/<run>/seed<k>.json       one StreamLog per (run, seed), written atomically; a restart skips the ones
                                  whose stored fingerprint matches the current config
    results.json, results.md, aba.png

Each entry of config["runs"]: {"name", "model": "ac" | "hope", "strategy" (adapt.STRATEGIES), "overrides"
(build_predictor overrides, e.g. {"memory_rule": "titans"}), "train_phases" (default ["A1"]), "options"
(adapt_stream options over config["adapt"]), "privileged", "label"}. The reference points `oracle` (trained on
B) and `joint` (trained on A1 + B) are runs with train_phases ["B"] / ["A1", "B"] and strategy "none".
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hope_kernels.adapt import PRIVILEGED, STRATEGIES, StreamLog, adapt_stream
from hope_kernels.config import is_int, read_config_file
from hope_kernels.data.format import KNOWN_PHASES
from hope_kernels.metrics import aggregate, mean_ci, paired_difference, run_metrics
from hope_kernels.report import atomic_write_json, markdown_report, write_results

__all__ = ["Hooks", "Results", "run_aba", "load_config", "CONFIG_DIR", "METRICS"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METRICS = ("tf", "rollout")
_PAIRED = ("A1", "B", "A2", "forgetting", "speed_oracle", "speed_floor")
_TOP_KEYS = ("preset", "data", "seeds", "device", "threads", "model_preset", "stream", "pretrain", "adapt",
             "fisher_clips", "replay_clips", "baseline", "oracle_run", "runs", "metric_window", "speed_tolerance",
             "progress", "out")
_RUN_KEYS = ("name", "model", "strategy", "overrides", "train_phases", "options", "privileged", "label")
_STREAM_KEYS = ("phases", "clips_per_phase", "heldout_per_phase")


# ------------------------------------------------------------------------------------------ config

def load_config(preset_or_path: str, **overrides: Any) -> dict:
    """Read configs/aba_<preset>.yaml (or a YAML/JSON file path) and apply top-level overrides."""
    p = Path(preset_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"aba_{preset_or_path}.yaml"
    if not p.is_file():
        known = sorted(x.stem[4:] for x in CONFIG_DIR.glob("aba_*.yaml"))
        raise FileNotFoundError(f"no A-B-A config at {p} (presets: {known})")
    cfg = read_config_file(p)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(cfg)


def _is_count(v) -> bool:
    return is_int(v) and v >= 0


def _check_keys(d, known, where: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {d!r}")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(known)})")


def _check_phases(phases, where: str) -> None:
    if not isinstance(phases, (list, tuple)) or not phases or any(p not in KNOWN_PHASES for p in phases):
        raise ValueError(f"{where} must be a non-empty list of phases from {list(KNOWN_PHASES)}, got {phases!r}")


def validate_config(cfg: dict) -> dict:
    """Check keys and values; errors name the key. Returns cfg."""
    _check_keys(cfg, _TOP_KEYS, "A-B-A config")
    for key in ("seeds", "runs", "stream"):
        if key not in cfg:
            raise ValueError(f"A-B-A config is missing {key!r}")
    if not isinstance(cfg["seeds"], list) or not cfg["seeds"]:
        raise ValueError(f"A-B-A config needs at least one seed (seeds: a list of ints), got {cfg['seeds']!r}")
    if not all(_is_count(s) for s in cfg["seeds"]):
        raise ValueError(f"seeds must be non-negative ints, got {cfg['seeds']!r}")
    sc = cfg["stream"]
    _check_keys(sc, _STREAM_KEYS, "stream")
    if "phases" in sc:
        _check_phases(sc["phases"], "stream.phases")
    cpp = sc.get("clips_per_phase")
    if not (cpp is None or _is_count(cpp) or isinstance(cpp, dict) and all(_is_count(v) for v in cpp.values())):
        raise ValueError(f"stream.clips_per_phase must be a non-negative int (or phase -> int), got {cpp!r}")
    for key in ("heldout_per_phase", "fisher_clips", "replay_clips", "metric_window", "threads"):
        v = sc.get(key) if key == "heldout_per_phase" else cfg.get(key)
        if v is not None and not _is_count(v):
            raise ValueError(f"{key} must be a non-negative int, got {v!r}")
    for key in ("pretrain", "adapt", "data"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ValueError(f"{key} must be a mapping, got {cfg[key]!r}")
    if not isinstance(cfg["runs"], list) or not cfg["runs"]:
        raise ValueError(f"runs must be a non-empty list of runs, got {cfg['runs']!r}")
    names = set()
    for r in cfg["runs"]:
        _check_keys(r, _RUN_KEYS, f"run {r.get('name') if isinstance(r, dict) else r!r}")
        for key in ("name", "model", "strategy"):
            if key not in r:
                raise ValueError(f"run {r} is missing {key!r}")
        if r.get("train_phases") is not None:
            _check_phases(r["train_phases"], f"run {r['name']!r}: train_phases")
        for key in ("options", "overrides"):
            if r.get(key) is not None and not isinstance(r[key], dict):
                raise ValueError(f"run {r['name']!r}: {key} must be a mapping, got {r[key]!r}")
        if r["strategy"] not in STRATEGIES:
            raise ValueError(f"run {r['name']!r}: strategy must be one of {STRATEGIES}, got {r['strategy']!r}")
        if r["model"] not in ("ac", "hope"):
            raise ValueError(f"run {r['name']!r}: model must be 'ac' or 'hope', got {r['model']!r}")
        if r["name"] in names:
            raise ValueError(f"run name {r['name']!r} appears twice")
        names.add(r["name"])
    if cfg.get("baseline") and cfg["baseline"] not in names:
        raise ValueError(f"baseline {cfg['baseline']!r} is not a run name ({sorted(names)})")
    return cfg


# ------------------------------------------------------------------------------------------- hooks

def _default_ensure_dataset(path, preset, seed):
    from hope_kernels.data import ensure_dataset
    return ensure_dataset(path, preset=preset, seed=seed)


def _default_verify_dataset(path):
    from hope_kernels.data import verify_dataset
    return verify_dataset(path)


def _default_make_stream(path, phases, clips_per_phase, seed):
    from hope_kernels.data import make_stream
    return make_stream(path, phases=phases, clips_per_phase=clips_per_phase, seed=seed)


def _default_train_clips(path, phase, n, seed):
    from hope_kernels.data import ClipDataset
    ds = ClipDataset(path, phase=phase, split="train")
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    return [ds[i] for i in idx[:n]]


def _default_train(config):
    from hope_kernels.train import train
    return train(config)


def _default_load_checkpoint(path):
    from hope_kernels.train import load_checkpoint
    return load_checkpoint(path)


@dataclasses.dataclass
class Hooks:
    """The pieces run_aba calls (swap them in tests): ensure_dataset(dir, preset, seed) -> Path;
    make_stream(path, phases, clips_per_phase, seed) -> Stream; train_clips(path, phase, n, seed) -> [clip];
    train(config) -> obj with .model and .checkpoint; load_checkpoint(path) -> (model, state);
    verify_dataset(path) checks an imported dataset's shards against its manifest."""
    ensure_dataset: Callable = _default_ensure_dataset
    verify_dataset: Callable = _default_verify_dataset
    make_stream: Callable = _default_make_stream
    train_clips: Callable = _default_train_clips
    train: Callable = _default_train
    load_checkpoint: Callable = _default_load_checkpoint


@dataclasses.dataclass
class Results:
    """What run_aba returns: `data` (the results dict written to results.json, see hope_kernels.report) and
    `paths` of the written files."""
    data: dict
    paths: dict

    @property
    def summary(self) -> dict:
        return self.data["summary"]

    def table(self) -> str:
        return markdown_report(self.data)


# ------------------------------------------------------------------------------------------ helpers

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_id(path: Path) -> str:
    """The dataset's identity: a hash of its manifest, which records every shard's sha256."""
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _code_id(*modules: str) -> str:
    """A hash of these modules' source files (hope_kernels-relative, a folder: every .py in it): the code that
    decides what a stored checkpoint or run log holds, so a changed model or adaptation rule is not reused.
    Cached: the code this process runs is the code it imported (every job's key used to re-read the files)."""
    root = Path(__file__).resolve().parent
    files = sorted(f for m in modules for f in ((root / m).glob("*.py") if (root / m).is_dir() else [root / m]))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


_TRAIN_CODE = ("models", "train.py", "config.py")
_ADAPT_CODE = ("adapt.py",)


def _ckpt_key(cfg: dict, run: dict, seed: int, data_id: str) -> tuple[str, dict]:
    pre = cfg.get("pretrain", {})
    phases = list(run.get("train_phases") or ["A1"])
    spec = {"model": run["model"], "preset": cfg.get("model_preset", "tiny"), "overrides": run.get("overrides") or {},
            "phases": phases, "pretrain": pre, "seed": seed if pre.get("per_seed") else 0, "data": data_id,
            "code": _code_id(*_TRAIN_CODE)}
    key = f"{run['model']}-{'+'.join(phases)}-{_fingerprint(spec)}-s{spec['seed']}"
    return key, spec


def _truncate_heldout(stream, n):
    if n is None or not getattr(stream, "heldout", None):
        return stream
    held = {p: list(c)[:int(n)] for p, c in stream.heldout.items()}
    try:
        stream.heldout = held
        return stream
    except (AttributeError, dataclasses.FrozenInstanceError):
        return dataclasses.replace(stream, heldout=held)


class _Models:
    """Pre-trained models, trained once per checkpoint key and reused (in memory and on disk)."""

    def __init__(self, cfg, data_path, data_id, out, hooks, progress):
        self.cfg, self.data_path, self.data_id, self.hooks, self.progress = cfg, data_path, data_id, hooks, progress
        self.dir = out / "checkpoints"
        self.cache: dict[str, torch.nn.Module] = {}

    def get(self, run, seed) -> torch.nn.Module:
        key, spec = _ckpt_key(self.cfg, run, seed, self.data_id)
        if key not in self.cache:
            marker = self.dir / f"{key}.json"
            info = _read_json(marker)
            if (info and _fingerprint(info.get("spec")) == _fingerprint(spec)
                    and Path(info.get("checkpoint", "")).exists()):
                model = self.hooks.load_checkpoint(info["checkpoint"])[0]
            else:
                pre = dict(self.cfg.get("pretrain", {}))
                pre.pop("per_seed", None)
                tc = {"model": spec["model"], "preset": spec["preset"], "overrides": spec["overrides"],
                      "data": str(self.data_path), "phases": spec["phases"], "split": "train", "seed": spec["seed"],
                      "device": self.cfg.get("device", "cpu"), "out": str(self.dir / key),
                      "progress": self.progress, "overwrite": True, **pre}
                res = self.hooks.train(tc)
                model = res.model
                atomic_write_json(marker, {"checkpoint": str(res.checkpoint), "spec": spec})
            self.cache[key] = model.to(self.cfg.get("device", "cpu"))
        return copy.deepcopy(self.cache[key])


# ---------------------------------------------------------------------------------------------- main

def run_aba(config: dict, hooks: Hooks | None = None, out: str | Path | None = None,
            progress: bool | None = None) -> Results:
    """Run the whole A-B-A experiment described by `config` (see configs/aba_quick.yaml) into `out`
    (default config["out"]). Resumable: finished (run, seed) logs are kept and skipped."""
    cfg = validate_config(copy.deepcopy(config))
    hooks = hooks or Hooks()
    # before simulating data: `cuda` without CUDA would otherwise fail only at the first model
    from hope_kernels.train import resolve_device
    cfg["device"] = str(resolve_device(cfg.get("device", "cpu")))
    # absolute, so checkpoint markers and fingerprints do not depend on the working directory
    out = Path(out or cfg.get("out") or "runs/aba").resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    progress = cfg.get("progress", True) if progress is None else progress
    if cfg.get("threads"):
        # tiny models on a shared CPU: more intra-op threads than cores only add contention
        torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()

    data_cfg = cfg.get("data", {}) or {}
    if data_cfg.get("dir") and data_cfg.get("imported", False):
        data_path = Path(data_cfg["dir"])
        if not (data_path / "manifest.json").is_file():
            raise FileNotFoundError(f"--data {data_path}: no manifest.json there (import a dataset first)")
        hooks.verify_dataset(data_path)  # sha256 of every shard: ~1 s per GB
    else:
        data_path = Path(hooks.ensure_dataset(Path(data_cfg.get("dir") or out / "data"),
                                              data_cfg.get("preset", cfg.get("preset", "quick")),
                                              int(data_cfg.get("seed", 0))))
    data_path = data_path.resolve()
    data_id = _data_id(data_path)
    sc = cfg["stream"]
    phases = tuple(sc.get("phases", ("A1", "B", "A2")))
    models = _Models(cfg, data_path, data_id, out, hooks, progress)
    runs, seeds = cfg["runs"], [int(s) for s in cfg["seeds"]]
    adapt_defaults = cfg.get("adapt", {}) or {}

    jobs = [(seed, run) for seed in seeds for run in runs]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="A-B-A", unit="run")
    logs: dict[str, dict[int, StreamLog]] = {r["name"]: {} for r in runs}
    streams: dict[int, Any] = {}
    extra: dict[tuple, list] = {}
    for seed, run in jobs:
        options = {**adapt_defaults, **(run.get("options") or {})}
        # the number of A1 clips drawn below for ewc / replay reaches adapt_stream too
        n_extra = {"ewc": cfg.get("fisher_clips", 8), "replay": cfg.get("replay_clips", 16)}.get(run["strategy"])
        fp = _fingerprint({"run": run, "options": options, "stream": sc, "data": data_id, "extra": n_extra,
                           "ckpt": _ckpt_key(cfg, run, seed, data_id)[0], "code": _code_id(*_ADAPT_CODE)})
        path = out / "runs" / _safe(run["name"]) / f"seed{seed}.json"
        stored = _read_json(path)
        if stored and stored.get("fingerprint") == fp:
            logs[run["name"]][seed] = StreamLog.from_dict(stored["log"])
        else:
            if bar:
                bar.set_postfix_str(f"seed {seed} {run['name']}")
            if seed not in streams:
                streams[seed] = _truncate_heldout(hooks.make_stream(data_path, phases, sc.get("clips_per_phase"), seed),
                                                  sc.get("heldout_per_phase"))
            model = models.get(run, seed)
            if run["strategy"] == "ewc" and "fisher_clips" not in options:
                key = ("A1", int(cfg.get("fisher_clips", 8)), seed)
                extra.setdefault(key, hooks.train_clips(data_path, "A1", key[1], seed))
                options["fisher_clips"] = extra[key]
            if run["strategy"] == "replay" and "replay_clips" not in options:
                key = ("A1", int(cfg.get("replay_clips", 16)), seed)
                extra.setdefault(key, hooks.train_clips(data_path, "A1", key[1], seed))
                options["replay_clips"] = extra[key]
            torch.manual_seed(seed)
            log = adapt_stream(model, streams[seed], run["strategy"], seed=seed, progress=progress,
                               desc=f"{run['name']} s{seed}", **options)
            atomic_write_json(path, {"run": run, "seed": seed, "fingerprint": fp, "log": log.to_dict()})
            logs[run["name"]][seed] = log
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    data = summarize(cfg, logs, phases)
    data["wall_seconds"] = time.perf_counter() - t0
    data["config"] = cfg
    data["data_path"] = str(data_path)
    data["data_id"] = data_id
    paths = write_results(data, out)
    return Results(data=data, paths=paths)


def summarize(cfg: dict, logs: dict[str, dict[int, StreamLog]], phases) -> dict:
    """Metrics across seeds from the per-(run, seed) logs (see hope_kernels.report for the layout)."""
    runs = cfg["runs"]
    window = int(cfg.get("metric_window", 3))
    tol = float(cfg.get("speed_tolerance", 0.1))
    base = cfg.get("baseline")
    oracle = next((r["name"] for r in runs if r.get("train_phases") == ["B"] and r["strategy"] == "none"), None)
    oracle = cfg.get("oracle_run", oracle)
    seeds = sorted({s for v in logs.values() for s in v})
    first = next(iter(logs.values()))
    any_log = next(iter(first.values()))
    boundaries = [i for i, p in enumerate(any_log.phases) if i == 0 or any_log.phases[i - 1] != p]
    data = {"runs": [{"name": r["name"], "model": r["model"], "strategy": r["strategy"],
                      "privileged": bool(r.get("privileged", r["strategy"] in PRIVILEGED or r["name"] in PRIVILEGED)),
                      "label": r.get("label", r["name"])} for r in runs],
            "seeds": seeds, "phases": list(phases), "boundaries": boundaries, "baseline": base,
            "oracle": oracle, "summary": {}, "paired": {}, "curves": {}, "copy": {}, "per_seed": {}}
    for metric in METRICS:
        per_seed = {}
        for r in runs:
            name = r["name"]
            per_seed[name] = {}
            for seed, log in logs[name].items():
                ob = None
                if oracle and seed in logs.get(oracle, {}):
                    ol = logs[oracle][seed]
                    eb = [e for e, p in zip(ol.errors(metric), ol.phases) if p == "B"]
                    ob = sum(eb) / len(eb) if eb else None
                per_seed[name][seed] = run_metrics(log, oracle_b=ob, metric=metric, window=window, tol=tol,
                                                   order=phases)
        data["summary"][metric] = {n: aggregate(v) for n, v in per_seed.items()}
        if base:
            data["paired"][metric] = {
                n: {k: paired_difference({s: m[k] for s, m in v.items() if k in m},
                                         {s: m[k] for s, m in per_seed[base].items() if k in m})
                    for k in _PAIRED}
                for n, v in per_seed.items()}
        curves = {}
        for r in runs:
            ls = list(logs[r["name"]].values())
            n = min(len(lg.tf) for lg in ls)
            cis = [mean_ci([lg.errors(metric)[i] for lg in ls]) for i in range(n)]
            curves[r["name"]] = {k: [c[k] for c in cis] for k in ("mean", "lo", "hi")}
        data["curves"][metric] = curves
        data["copy"][metric] = {p: mean_ci([run_metrics(lg, metric=metric, window=window)[f"copy_{p}"]
                                            for lg in first.values()]) for p in phases}
        data["per_seed"][metric] = per_seed
    return data
