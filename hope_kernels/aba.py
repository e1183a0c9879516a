"""The A-B-A main job (docs/design.md#test-time-adaptation): data -> pre-trained predictors -> every strategy over
the stream for every seed -> metrics -> results.json / results.md / aba.png.

    results = run_aba(load_config("quick", out="runs/quick"))

Layout of `out`:
    data/                         simulated dataset (unless config["data"]["dir"] points elsewhere)
    checkpoints/<key>/            one pre-training run per (model, overrides, training phases[, seed]), only
                                  when no shipped weights match (hope_kernels.pretrained): the job says so
    checkpoints/<key>.json        marker written after training: {"checkpoint": path relative to checkpoints/}
    heldout/<key>.json            held-out errors of each pre-trained model (every held-out clip of each phase)
    tuning/<run>/p<i>-seed<k>.json  validation-stream logs of grid point i (config["tuning"])
    runs/<run>/seed<k>.json       one StreamLog per (run, seed), written atomically; a restart skips the ones
                                  whose stored fingerprint matches the current config
    results.json, results.md, aba.png (headline runs), aba_all.png (every run)

Fair tuning (config["tuning"]): each run whose strategy has a grid in tuning["grids"] is run on validation
streams (tuning["seeds"], drawn from the last tuning["reserve"] stream clips of every phase, which the reported
streams never use) once per grid point; the point with the lowest mean validation error is the run's options for
the reported seeds. Every strategy's grid has the same number of points.

Each entry of config["runs"]: {"name", "model": "ac" | "hope", "strategy" (adapt.STRATEGIES), "overrides"
(build_predictor overrides, e.g. {"memory_rule": "titans"}), "train_phases" (default ["A1"]), "options"
(adapt_stream options over config["adapt"]), "pretrain" (training fields of this run's pre-training over
config["pretrain"], e.g. {"lr": 1.0e-3}), "privileged", "label"}. The reference points `oracle` (trained on
B) and `joint` (trained on A1 + B) are runs with train_phases ["B"] / ["A1", "B"] and strategy "none".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from hope_kernels import pretrained
from hope_kernels.adapt import PRIVILEGED, STRATEGIES, AdaptOptions, StreamLog, adapt_stream
from hope_kernels.config import (
    KINDS,
    REQUIRED,
    Config,
    TrainConfig,
    at_least,
    is_int,
    key_path,
    non_negative,
    one_of,
    read_config_or_shipped,
    setting,
    shipped_dir,
)
from hope_kernels.data.format import KNOWN_PHASES
from hope_kernels.io import FolderLock, atomic_write_json, remove_temp_files
from hope_kernels.metrics import aggregate, mean_ci, paired_difference, phase_means, run_metrics
from hope_kernels.report import markdown_report, write_results

__all__ = [
    "AbaConfig",
    "Hooks",
    "Results",
    "run_aba",
    "load_config",
    "validate_config",
    "select_runs",
    "CONFIG_DIR",
    "METRICS",
]

CONFIG_DIR = shipped_dir()  # hope_kernels/configs (package data): the presets aba_<name>.yaml
METRICS = ("tf", "rollout")
_PAIRED = ("A1", "B", "A2", "forgetting", "speed_oracle", "speed_floor")
_COMPARED = ("B", "A2", "forgetting", "speed_oracle")


# ------------------------------------------------------------------------------------------ config


def load_config(preset_or_path: str, **overrides: Any) -> dict:
    """Read the shipped preset hope_kernels/configs/aba_<preset>.yaml (a name: no suffix, no folder part) or a
    YAML/JSON file path, apply top-level overrides and check the result (validate_config). An unknown preset name
    raises FileNotFoundError listing the shipped presets."""
    cfg = read_config_or_shipped(preset_or_path, prefix="aba_", what="A-B-A preset")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(cfg)


def _phases(v) -> str | None:
    ok = v and all(p in KNOWN_PHASES for p in v)
    return None if ok else f"must be a non-empty list of phases from {list(KNOWN_PHASES)}"


def _counts(v) -> str | None:
    ok = v >= 0 if is_int(v) else all(n >= 0 for n in v.values())
    return None if ok else "must be a non-negative int (or phase -> int)"


def _seeds(v) -> str | None:
    return None if all(s >= 0 for s in v) else "must be non-negative ints"


def _non_empty(v) -> str | None:
    return None if v else "must not be empty"


def _train_fields(*sections: str):
    """A check: the mapping's keys are TrainConfig fields or one of `sections`."""

    def check(v) -> str | None:
        unknown = sorted(set(v) - set(TrainConfig.field_names()) - set(sections))
        return f"has keys that are not training config fields: {unknown}" if unknown else None

    return check


def _pretrain(v) -> str | None:
    """The config's pretrain: training fields, per_seed, and an "ac" / "hope" section of training fields each."""
    bad = [k for k in KINDS if k in v and not (isinstance(v[k], dict) and _train_fields()(v[k]) is None)]
    if bad:
        return f"has {bad[0]!r}, which is not a mapping of training config fields"
    return _train_fields("per_seed", *KINDS)(v)


@dataclasses.dataclass
class AbaData(Config):
    """Where the dataset comes from: simulated (`preset`, `seed`) into OUT/data or `dir`, or an imported one."""

    WHAT: ClassVar[str] = "A-B-A data"
    preset: str | None = None  # None: the config's preset
    seed: int = setting(0, non_negative)
    dir: str | None = None
    imported: bool = False


@dataclasses.dataclass
class AbaStream(Config):
    WHAT: ClassVar[str] = "A-B-A stream"
    phases: list[str] | None = setting(None, _phases)  # None: A1, B, A2
    clips_per_phase: int | dict[str, int] | None = setting(None, _counts)
    heldout_per_phase: int | None = setting(None, non_negative)


@dataclasses.dataclass
class AbaRun(Config):
    """One entry of `runs` (module docstring)."""

    WHAT: ClassVar[str] = "A-B-A run"
    name: str
    model: str = setting(REQUIRED, one_of(*KINDS))
    strategy: str = setting(REQUIRED, one_of(*STRATEGIES))
    overrides: dict | None = None  # build_predictor overrides
    train_phases: list[str] | None = setting(None, _phases)
    options: AdaptOptions | None = None  # over config["adapt"]
    pretrain: dict | None = setting(None, _train_fields())  # training fields over the config's pretrain
    privileged: bool | None = None
    label: str | None = None


@dataclasses.dataclass
class AbaTuning(Config):
    """Fair tuning (module docstring); `grids`: strategy -> the same number of option sets for each."""

    WHAT: ClassVar[str] = "A-B-A tuning"
    seeds: list[int] = setting(REQUIRED, _non_empty, _seeds)
    reserve: int = setting(REQUIRED, at_least(1))
    clips_per_phase: int = setting(REQUIRED, at_least(1))
    grids: dict[str, list[AdaptOptions]] = setting(REQUIRED, _non_empty)
    metric: str = "tf"

    def check(self, path: str) -> None:
        if self.clips_per_phase > self.reserve:
            raise ValueError(
                f"{key_path(path, 'clips_per_phase')} {self.clips_per_phase} exceeds "
                f"{key_path(path, 'reserve')} {self.reserve}: validation streams draw only from the "
                f"reserved clips"
            )
        for strat, grid in self.grids.items():
            if strat not in STRATEGIES:
                raise ValueError(f"{key_path(path, 'grids')}: {strat!r} is not a strategy ({STRATEGIES})")
            if not grid:
                raise ValueError(f"{key_path(path, 'grids')}.{strat} must be a non-empty list of option mappings")
        if len({len(g) for g in self.grids.values()}) > 1:  # the same budget for every strategy
            raise ValueError(
                f"{key_path(path, 'grids')} must give every strategy the same number of points, got "
                f"{ {k: len(v) for k, v in self.grids.items()} }"
            )


@dataclasses.dataclass
class AbaConfig(Config):
    """The A-B-A job (hope_kernels/configs/aba_quick.yaml shows every section). `compile`: torch.compile the
    predictors in training and adaptation."""

    WHAT: ClassVar[str] = "A-B-A config"
    seeds: list[int] = setting(REQUIRED, _non_empty, _seeds)  # the reported streams (and per-seed pre-trainings)
    stream: AbaStream
    runs: list[AbaRun] = setting(REQUIRED, _non_empty)
    preset: str | None = None
    data: AbaData | None = None
    device: str | None = None  # None: cpu
    threads: int | None = setting(None, non_negative)
    workers: int | None = setting(None, at_least(1))
    model_preset: str | None = None
    pretrain: dict | None = setting(None, _pretrain)
    adapt: AdaptOptions | None = None  # adapt_stream defaults of every run
    tuning: AbaTuning | None = None
    fisher_clips: int | None = setting(None, non_negative)
    replay_clips: int | None = setting(None, non_negative)
    baseline: str | None = None
    oracle_run: str | None = None
    frozen_run: str | None = None
    comparisons: list[list[str]] | None = None
    headline: list[str] | None = None
    metric_window: int | None = setting(None, non_negative)
    speed_tolerance: float | None = None
    progress: bool | None = None
    out: str | os.PathLike | None = None
    compile: bool = False

    def check(self, path: str) -> None:
        names = set()
        for r in self.runs:
            if r.name in names:
                raise ValueError(f"{key_path(path, 'runs')}: run name {r.name!r} appears twice")
            names.add(r.name)
        for key in ("baseline", "oracle_run", "frozen_run"):
            v = getattr(self, key)
            if v and v not in names:
                raise ValueError(f"{key_path(path, key)} {v!r} is not a run name ({sorted(names)})")
        bad = [n for n in self.headline or [] if n not in names]
        if bad:
            raise ValueError(f"{key_path(path, 'headline')} names {bad}, which are not runs ({sorted(names)})")
        for i, pair in enumerate(self.comparisons or []):
            if not (len(pair) == 2 and all(n in names for n in pair)):
                raise ValueError(
                    f"{key_path(key_path(path, 'comparisons'), i)} must be a [run, run] pair of run names, got {pair!r}"
                )


def validate_config(cfg: dict) -> dict:
    """Check `cfg` against AbaConfig: unknown keys, types and values; errors name the key path
    (aba.runs[3].options.lr). Returns `cfg` itself: the job, its fingerprints and results.json use the mapping as
    given."""
    AbaConfig.from_dict(cfg, "aba")
    return cfg


def select_runs(cfg: dict, names) -> dict:
    """A copy of `cfg` with only the runs named (config order), and its references to other runs (baseline,
    oracle_run, frozen_run, headline, comparisons) dropped."""
    keep = set(names)
    unknown = sorted(keep - {r["name"] for r in cfg["runs"]})
    if unknown:
        raise ValueError(f"unknown run name(s) {unknown}; the config has {[r['name'] for r in cfg['runs']]}")
    cfg = copy.deepcopy(cfg)
    cfg["runs"] = [r for r in cfg["runs"] if r["name"] in keep]
    for key in ("baseline", "oracle_run", "frozen_run"):
        if cfg.get(key) and cfg[key] not in keep:
            cfg[key] = None
    if cfg.get("headline"):
        cfg["headline"] = [n for n in cfg["headline"] if n in keep]
    if cfg.get("comparisons"):
        cfg["comparisons"] = [c for c in cfg["comparisons"] if set(c) <= keep]
    return cfg


# ------------------------------------------------------------------------------------------- hooks


def _default_ensure_dataset(path, preset, seed):
    from hope_kernels.data import ensure_dataset

    return ensure_dataset(path, preset=preset, seed=seed)


def _default_verify_dataset(path):
    from hope_kernels.data import verify_dataset

    return verify_dataset(path)


def _default_make_stream(path, phases, clips_per_phase, seed, part="report", reserve=0):
    from hope_kernels.data import make_stream

    return make_stream(path, phases=phases, clips_per_phase=clips_per_phase, seed=seed, part=part, reserve=reserve)


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
    make_stream(path, phases, clips_per_phase, seed, part="report" | "validation", reserve=0) -> Stream (the
    last `reserve` stream clips of each phase form the validation part); train_clips(path, phase, n, seed) -> [clip];
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


_data_id = pretrained.data_id


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_code_id = pretrained.code_id


_TRAIN_CODE = pretrained.TRAIN_CODE
_ADAPT_CODE = ("adapt.py",)


def _ckpt_key(cfg: dict, run: dict, seed: int, data_id: str) -> tuple[str, dict]:
    spec = {**pretrained.spec_for(cfg, run, seed), "data": data_id, "code": _code_id(*_TRAIN_CODE)}
    key = f"{run['model']}-{'+'.join(spec['phases'])}-{_fingerprint(spec)}-s{spec['seed']}"
    return key, spec


def _truncate_heldout(stream, n):
    if n is None or not getattr(stream, "heldout", None):
        return stream
    held = {p: list(c)[: int(n)] for p, c in stream.heldout.items()}
    try:
        stream.heldout = held
        return stream
    except (AttributeError, dataclasses.FrozenInstanceError):
        return dataclasses.replace(stream, heldout=held)


class _Models:
    """Pre-trained models: the shipped weights when their spec and dataset match, else trained once per checkpoint
    key and reused (in memory and on disk). `info[key]` records where each came from and why."""

    def __init__(self, cfg, data_path, data_id, out, hooks, progress, say):
        self.cfg, self.data_path, self.data_id, self.hooks, self.progress = cfg, data_path, data_id, hooks, progress
        self.dir = out / "checkpoints"
        self.say = say
        self.cache: dict[str, torch.nn.Module] = {}
        self.info: dict[str, dict] = {}

    def source(self, run, seed) -> tuple[str, str]:
        """("shipped" | "checkpoint", path) of the run's model, training it first when needed."""
        key, spec = _ckpt_key(self.cfg, run, seed, self.data_id)
        if key in self.info:
            if run["name"] not in self.info[key]["runs"]:
                self.info[key]["runs"].append(run["name"])
            return self.info[key]["source"], self.info[key]["path"]
        core = pretrained.spec_for(self.cfg, run, seed)
        name = pretrained.spec_name(core)
        marker = self.dir / f"{key}.json"
        info = _read_json(marker)
        shipped, why = (None, "")
        if self.cfg.get("preset"):
            shipped, why = pretrained.find_shipped(self.cfg["preset"], core, self.data_id)
        if shipped:
            src = {
                "source": "shipped",
                "path": shipped["path"],
                "note": f"shipped weights ({shipped.get('dtype')}, {shipped.get('steps')} steps)",
            }
            self.say(f"{name}: {src['note']} from {shipped['path']}", note=False)
        elif info and _fingerprint(info.get("spec")) == _fingerprint(spec) and self._marked(info).is_file():
            src = {
                "source": "checkpoint",
                "path": str(self._marked(info)),
                "note": f"trained earlier in this folder ({why})" if why else "trained earlier in this folder",
            }
        else:
            steps = core["train"].get("steps")
            self.say(f"{name}: {why or 'no shipped weights'}; pre-training it here ({steps} steps)")
            res = self.hooks.train(
                {
                    **pretrained.train_config(
                        core, self.data_path, self.dir / key, self.cfg.get("device", "cpu"), self.progress
                    ),
                    "overwrite": True,
                    "compile": self.cfg.get("compile", False),
                }
            )
            # relative to the markers' folder, so a copied output folder uses its own checkpoints
            atomic_write_json(marker, {"checkpoint": os.path.relpath(res.checkpoint, self.dir), "spec": spec})
            self.cache[key] = res.model.to(self.cfg.get("device", "cpu"))
            src = {"source": "trained", "path": str(res.checkpoint), "note": f"pre-trained by this job ({why})"}
        self.info[key] = {"name": name, "model": run["model"], "phases": core["phases"], "runs": [run["name"]], **src}
        return src["source"], src["path"]

    def _marked(self, info: dict) -> Path:
        """The checkpoint a marker names (relative to the markers' folder; older markers hold absolute paths)."""
        return self.dir / info.get("checkpoint", "")

    def get(self, run, seed) -> torch.nn.Module:
        key, _ = _ckpt_key(self.cfg, run, seed, self.data_id)
        kind, path = self.source(run, seed)
        if key not in self.cache:
            model = pretrained.load_weights(path) if kind == "shipped" else self.hooks.load_checkpoint(path)[0]
            self.cache[key] = model.to(self.cfg.get("device", "cpu"))
        return copy.deepcopy(self.cache[key])


def _load_model(kind: str, path: str, device: str):
    if kind == "shipped":
        return pretrained.load_weights(path, device)
    from hope_kernels.train import load_checkpoint

    return load_checkpoint(path)[0].to(device)


def _stream(hooks, data_path, phases, sc, seed, part, tuning):
    """The reported stream of `seed` (part "report") or a validation stream (part "validation")."""
    reserve = int(tuning["reserve"]) if tuning else 0
    if part == "validation":
        st = hooks.make_stream(data_path, phases, tuning["clips_per_phase"], seed, part="validation", reserve=reserve)
        return _truncate_heldout(st, 0)  # tuning scores the stream only
    if reserve:
        st = hooks.make_stream(data_path, phases, sc.get("clips_per_phase"), seed, part="report", reserve=reserve)
    else:
        st = hooks.make_stream(data_path, phases, sc.get("clips_per_phase"), seed)
    return _truncate_heldout(st, sc.get("heldout_per_phase"))


def _job_worker(job: dict) -> dict:
    """One stream run in a worker process (default hooks only): load the model and the stream, adapt, write the
    log file. Returns the log as a dict."""
    torch.set_num_threads(int(job["threads"] or 1))
    hooks = Hooks()
    model = _load_model(*job["model"], job["device"])
    stream = _stream(hooks, job["data_path"], job["phases"], job["sc"], job["stream_seed"], job["part"], job["tuning"])
    return _adapt_and_write(model, stream, job, hooks)


def _adapt_and_write(model, stream, job: dict, hooks) -> dict:
    run, options, seed = job["run"], dict(job["options"]), job["stream_seed"]  # the stream's seed drives it all
    if run["strategy"] == "ewc" and "fisher_clips" not in options:
        options["fisher_clips"] = hooks.train_clips(job["data_path"], "A1", job["n_extra"], seed)
    if run["strategy"] == "replay" and "replay_clips" not in options:
        options["replay_clips"] = hooks.train_clips(job["data_path"], "A1", job["n_extra"], seed)
    options.setdefault("compile", job["compile"])
    torch.manual_seed(seed)
    log = adapt_stream(
        model, stream, run["strategy"], seed=seed, progress=job["progress"], desc=f"{run['name']} s{seed}", **options
    )
    d = log.to_dict()
    atomic_write_json(
        job["path"],
        {"run": run, "seed": job["stream_seed"], "part": job["part"], "fingerprint": job["fingerprint"], "log": d},
    )
    return d


# ---------------------------------------------------------------------------------------------- main


def run_aba(
    config: dict,
    hooks: Hooks | None = None,
    out: str | Path | None = None,
    progress: bool | None = None,
    source: str | None = None,
) -> Results:
    """Run the whole A-B-A experiment described by `config` (see hope_kernels/configs/aba_quick.yaml) into `out`
    (default config["out"]). Resumable: finished (run, seed) logs are kept and skipped. With config["workers"]
    > 1 (and the default hooks) the stream runs go to that many processes of `threads` threads each. `source`
    (where the config came from) is said first, once the output folder is ours."""
    cfg = validate_config(copy.deepcopy(config))
    custom_hooks = hooks is not None
    hooks = hooks or Hooks()
    # before simulating data: `cuda` without CUDA would otherwise fail only at the first model
    from hope_kernels.train import resolve_device

    cfg["device"] = str(resolve_device(cfg.get("device", "cpu")))
    # absolute, so checkpoint markers and fingerprints do not depend on the working directory
    out = Path(out or cfg.get("out") or "runs/aba").resolve()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out} is a file, not a folder")
    # one writer per folder (the lock creates it); temp files a killed run left are removed once the lock is ours
    with FolderLock(out, "aba --out"):
        remove_temp_files(out, recursive=True)
        return _run_locked(cfg, hooks, custom_hooks, out, progress, source)


def _run_locked(
    cfg: dict, hooks: Hooks, custom_hooks: bool, out: Path, progress: bool | None, source: str | None
) -> Results:
    progress = cfg.get("progress", True) if progress is None else progress
    if cfg.get("threads"):
        # tiny models on a shared CPU: more intra-op threads than cores only add contention
        torch.set_num_threads(int(cfg["threads"]))
    t0 = time.perf_counter()
    notes: list[str] = []

    def say(msg: str, note: bool = True) -> None:
        """Tell the user (stderr); `note`: also keep it in results.json's notes."""
        if note:
            notes.append(msg)
        print(f"hope-kernels aba: {msg}", file=sys.stderr, flush=True)

    if source:
        say(source, note=False)
    data_cfg = cfg.get("data", {}) or {}
    if data_cfg.get("dir") and data_cfg.get("imported", False):
        data_path = Path(data_cfg["dir"])
        if not (data_path / "manifest.json").is_file():
            raise FileNotFoundError(f"--data {data_path}: no manifest.json there (import a dataset first)")
        hooks.verify_dataset(data_path)  # sha256 of every shard: ~1 s per GB
    else:
        data_path = Path(
            hooks.ensure_dataset(
                Path(data_cfg.get("dir") or out / "data"),
                data_cfg.get("preset", cfg.get("preset", "quick")),
                int(data_cfg.get("seed", 0)),
            )
        )
    data_path = data_path.resolve()
    data_id = _data_id(data_path)
    sc = cfg["stream"]
    phases = tuple(sc.get("phases", ("A1", "B", "A2")))
    models = _Models(cfg, data_path, data_id, out, hooks, progress, say)
    runs, seeds = cfg["runs"], [int(s) for s in cfg["seeds"]]
    adapt_defaults = cfg.get("adapt", {}) or {}
    tuning = cfg.get("tuning")
    workers = 1 if custom_hooks else int(cfg.get("workers") or 1)

    def job_for(run, seed, options, part, stream_seed, path):
        """seed: whose pre-trained model (per_seed pre-training); stream_seed: the stream and its randomness."""
        n_extra = {"ewc": cfg.get("fisher_clips", 8), "replay": cfg.get("replay_clips", 16)}.get(run["strategy"])
        # the reserve decides which clips the reported streams draw from, clips_per_phase the validation streams
        pool = {"reserve": tuning["reserve"], "val_clips": tuning["clips_per_phase"]} if tuning else None
        fp = _fingerprint(
            {
                "run": run,
                "options": options,
                "stream": sc,
                "data": data_id,
                "extra": n_extra,
                "part": part,
                "pool": pool,
                "ckpt": _ckpt_key(cfg, run, seed, data_id)[0],
                "code": _code_id(*_ADAPT_CODE),
            }
        )
        return {
            "run": run,
            "seed": seed,
            "stream_seed": stream_seed,
            "options": options,
            "part": part,
            "n_extra": n_extra,
            "path": str(path),
            "fingerprint": fp,
            "data_path": str(data_path),
            "phases": phases,
            "sc": sc,
            "tuning": tuning,
            "threads": cfg.get("threads") or 1,
            "device": cfg["device"],
            "progress": progress and workers == 1,
            "compile": cfg.get("compile", False),
        }

    def execute(jobs: list[dict], desc: str) -> list[dict]:
        """Logs (dicts) of `jobs`, in order: stored ones whose fingerprint matches, the rest run here or in the
        worker processes."""
        logs: list = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            stored = _read_json(Path(job["path"]))
            if stored and stored.get("fingerprint") == job["fingerprint"]:
                logs[i] = stored["log"]
            else:
                todo.append(i)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=desc, unit="run")
        if workers > 1 and len(todo) > 1:
            for i in todo:  # train or find every model first, in this process
                jobs[i]["model"] = models.source(jobs[i]["run"], jobs[i]["seed"])
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                for i, d in zip(todo, pool.map(_job_worker, [jobs[i] for i in todo])):
                    logs[i] = d
                    if bar:
                        bar.update(1)
        else:
            streams: dict[tuple, Any] = {}
            for i in todo:
                job = jobs[i]
                if bar:
                    bar.set_postfix_str(f"seed {job['stream_seed']} {job['run']['name']}")
                key = (job["part"], job["stream_seed"])
                if key not in streams:
                    streams[key] = _stream(hooks, data_path, phases, sc, job["stream_seed"], job["part"], tuning)
                logs[i] = _adapt_and_write(models.get(job["run"], job["seed"]), streams[key], job, hooks)
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        return logs

    # 1. fair tuning on validation streams: the same grid size for every strategy, the reported seeds unused
    chosen: dict[str, dict] = {}
    tuning_out = None
    if tuning:
        grids = tuning["grids"]
        tuned = [r for r in runs if r["strategy"] in grids]
        vjobs, index = [], []
        for r in tuned:
            for gi, point in enumerate(grids[r["strategy"]]):
                options = {**adapt_defaults, **(r.get("options") or {}), **point}
                for vs in tuning["seeds"]:
                    path = out / "tuning" / _safe(r["name"]) / f"p{gi}-seed{vs}.json"
                    vjobs.append(job_for(r, seeds[0], options, "validation", int(vs), path))
                    index.append((r["name"], gi))
        vlogs = execute(vjobs, "tuning")
        metric = tuning.get("metric", "tf")
        scores: dict[str, dict[int, list]] = {}
        for (name, gi), d in zip(index, vlogs):
            errs = StreamLog.from_dict(d).errors(metric)
            scores.setdefault(name, {}).setdefault(gi, []).append(sum(errs) / len(errs))
        tuning_out = {
            "seeds": tuning["seeds"],
            "reserve": tuning["reserve"],
            "clips_per_phase": tuning["clips_per_phase"],
            "metric": metric,
            "criterion": f"mean prequential {metric} L1 over every clip of the validation streams "
            f"(A1, B and A2 alike), averaged over the validation seeds",
            "runs": {},
        }
        for r in tuned:
            grid = grids[r["strategy"]]
            means = [sum(scores[r["name"]][gi]) / len(scores[r["name"]][gi]) for gi in range(len(grid))]
            best = min(range(len(grid)), key=lambda gi: (means[gi], gi))
            chosen[r["name"]] = grid[best]
            tuning_out["runs"][r["name"]] = {"grid": grid, "scores": means, "choice": grid[best], "chosen_index": best}

    # 2. the reported streams
    jobs = []
    for seed in seeds:
        for run in runs:
            options = {**adapt_defaults, **(run.get("options") or {}), **chosen.get(run["name"], {})}
            jobs.append(
                job_for(run, seed, options, "report", seed, out / "runs" / _safe(run["name"]) / f"seed{seed}.json")
            )
    done = execute(jobs, "A-B-A")
    logs: dict[str, dict[int, StreamLog]] = {r["name"]: {} for r in runs}
    for job, d in zip(jobs, done):
        logs[job["run"]["name"]][job["seed"]] = StreamLog.from_dict(d)

    # 3. the pre-trained models' held-out errors (every held-out clip of each phase)
    held = None
    pre = []
    for seed in seeds:
        for run in runs:
            key = _ckpt_key(cfg, run, seed, data_id)[0]
            source = models.source(run, seed)
            info = models.info[key]
            if "heldout" in info:
                continue
            # stored beside the checkpoint markers, so a finished job's restart loads no model
            path, fp = out / "heldout" / f"{key}.json", _fingerprint({"weights": source[1], "key": key})
            stored = _read_json(path)
            if stored and stored.get("fingerprint") == fp:
                info["heldout"] = stored["heldout"]
            else:
                held = held or _full_heldout(hooks, data_path, phases, tuning)
                info["heldout"] = pretrained.heldout_errors(models.get(run, seed), held)
                atomic_write_json(path, {"fingerprint": fp, "heldout": info["heldout"]})
            pre.append(info)
    data = summarize(cfg, logs, phases)
    data["pretrained"] = [{k: v for k, v in i.items() if k != "path"} for i in pre]
    if tuning_out:
        data["tuning"] = tuning_out
    data["notes"] = notes
    data["wall_seconds"] = time.perf_counter() - t0
    data["config"] = cfg
    data["data_path"] = str(data_path)
    data["data_id"] = data_id
    paths = write_results(data, out)
    return Results(data=data, paths=paths)


def _full_heldout(hooks, data_path, phases, tuning) -> dict:
    """Every held-out clip of each phase (the stream's held-out set before heldout_per_phase truncates it)."""
    st = (
        hooks.make_stream(data_path, phases, 0, 0)
        if not tuning
        else hooks.make_stream(data_path, phases, 0, 0, part="report", reserve=int(tuning["reserve"]))
    )
    return {p: list(c) for p, c in (getattr(st, "heldout", None) or {}).items()}


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
    names = [r["name"] for r in runs]
    labels = {r["name"]: r.get("label", r["name"]) for r in runs}
    frozen = cfg.get("frozen_run") or ("ac+none" if "ac+none" in names else None)
    pairs = [tuple(p) for p in cfg.get("comparisons") or []]
    if not pairs and base and "hope" in names:
        pairs = [("hope", base)] + [("hope", n) for n in ("hope+none", "hope[no-carry]") if n in names]
    headline = cfg.get("headline") or [n for n in ("hope", base, frozen, oracle) if n]
    data = {
        "runs": [
            {
                "name": r["name"],
                "model": r["model"],
                "strategy": r["strategy"],
                "privileged": bool(r.get("privileged", r["strategy"] in PRIVILEGED or r["name"] in PRIVILEGED)),
                "label": r.get("label", r["name"]),
            }
            for r in runs
        ],
        "seeds": seeds,
        "phases": list(phases),
        "boundaries": boundaries,
        "baseline": base,
        "oracle": oracle,
        "summary": {},
        "paired": {},
        "curves": {},
        "copy": {},
        "per_seed": {},
        "rel_curves": {},
        "comparisons": {},
        "shift": {},
        "headline": list(dict.fromkeys(headline)),
    }
    for metric in METRICS:
        per_seed = {}
        for r in runs:
            name = r["name"]
            per_seed[name] = {}
            for seed, log in logs[name].items():
                ob = None
                if oracle and seed in logs.get(oracle, {}):
                    ol = logs[oracle][seed]
                    ob = phase_means(ol.errors(metric), ol.phases).get("B")
                per_seed[name][seed] = run_metrics(
                    log, oracle_b=ob, metric=metric, window=window, tol=tol, order=phases
                )
        data["summary"][metric] = {n: aggregate(v) for n, v in per_seed.items()}
        if base:
            data["paired"][metric] = {
                n: {
                    k: paired_difference(
                        {s: m[k] for s, m in v.items() if k in m},
                        {s: m[k] for s, m in per_seed[base].items() if k in m},
                    )
                    for k in _PAIRED
                }
                for n, v in per_seed.items()
            }
        curves = {}
        for r in runs:
            ls = list(logs[r["name"]].values())
            n = min(len(lg.tf) for lg in ls)
            cis = [mean_ci([lg.errors(metric)[i] for lg in ls]) for i in range(n)]
            curves[r["name"]] = {k: [c[k] for c in cis] for k in ("mean", "lo", "hi")}
        data["curves"][metric] = curves
        data["copy"][metric] = {
            p: mean_ci([run_metrics(lg, metric=metric, window=window)[f"copy_{p}"] for lg in first.values()])
            for p in phases
        }
        data["per_seed"][metric] = per_seed
        data["rel_curves"][metric] = _relative_curves(runs, logs, metric)
        data["comparisons"][metric] = [
            {
                "a": a,
                "b": b,
                "label": f"{labels[a]} vs {labels[b]}",
                "diffs": {
                    k: paired_difference(
                        {s: m[k] for s, m in per_seed[a].items() if k in m},
                        {s: m[k] for s, m in per_seed[b].items() if k in m},
                    )
                    for k in _COMPARED
                },
            }
            for a, b in pairs
        ]
        if frozen and oracle:
            fb = data["summary"][metric][frozen].get("B")
            ob = data["summary"][metric][oracle].get("B")
            data["shift"][metric] = {
                "frozen": frozen,
                "oracle": oracle,
                "frozen_B": fb,
                "oracle_B": ob,
                "ratio": fb["mean"] / ob["mean"] if fb and ob and ob["mean"] else None,
            }
    return data


def _relative_curves(runs, logs, metric: str) -> dict:
    """Per clip, error / copy-last error on the same clip: mean and CI across seeds."""
    copy = "copy_rollout" if metric.startswith("rollout") else "copy_tf"
    out = {}
    for r in runs:
        ls = list(logs[r["name"]].values())
        n = min(len(lg.tf) for lg in ls)
        rel = [[e / c if c else math.nan for e, c in zip(lg.errors(metric), lg.errors(copy))] for lg in ls]
        cis = [mean_ci([x[i] for x in rel]) for i in range(n)]
        out[r["name"]] = {k: [c[k] for c in cis] for k in ("mean", "lo", "hi")}
    return out
