"""The issues' speed targets, checked against the rows of one benchmark run (benchmarks/conftest.py's JSON).

    python benchmarks/targets.py ROWS.json        # prints the Markdown table; exit 0 whatever the verdicts

Each target compares two rows of the same group, so both were measured in the same run on the same device: their
times, or their peak memory (`field="peak_mib"`).
A target is listed when its suite left rows for that device in the run, and says "not measured" when one of
its two rows is missing (a suite stopped at its time limit, a backend not built). summarize.py appends this
table to every results .md; `hope-kernels bench` prints it after a CPU run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

L1_SHAPE = "(4, 8, 256, 1024)"


@dataclass(frozen=True)
class Target:
    issue: int
    what: str
    device: str  # "cuda" or "cpu"
    group: str  # a row group's exact name, or its prefix when it ends with " (" (the shape follows)
    backend: str
    baseline: str
    bound: float  # ratio baseline / backend (of `field`) must reach this (strictly exceed it when `ahead`)
    ahead: bool = False
    percent: bool = False  # print the ratio as % (the L1 kernels against a same-size copy)
    field: str = "ms"  # the row value compared: "ms" (time) or "peak_mib" (peak memory)


def _l1_kernel_targets() -> list[Target]:
    out = []
    for stage in ("fwd", "bwd"):
        for dtype in ("bfloat16", "float32"):
            for backend in ("triton", "cuda") + (("triton last_program",) if stage == "fwd" else ()):
                out.append(
                    Target(
                        3,
                        f"L1 {stage} kernel {dtype}, % of a same-size copy",
                        "cuda",
                        f"l1 kernel {stage} {L1_SHAPE} {dtype}",
                        backend,
                        "copy",
                        0.8,
                        percent=True,
                    )
                )
    return out


def _l1_cpu_targets() -> list[Target]:
    group = f"l1 fwd+bwd {L1_SHAPE} float32"
    return [
        Target(22, "L1 fwd+bwd float32, CPU, % of a same-size copy", "cpu", group, "cpu", "copy", 0.5, percent=True),
        Target(22, "L1 fwd+bwd float32, CPU", "cpu", group, "cpu", "torch.compile", 1.0, ahead=True),
    ]


def _build_targets() -> list[Target]:
    return [
        Target(
            22,
            f"build {kind} {preset}, against the official model",
            "cpu",
            f"build {kind} {preset}",
            "ours",
            "official",
            1.0,
        )
        for kind in ("ac", "hope")
        for preset in ("tiny", "small", "vjepa2-ac")
    ]


def _memory_targets(issue: int, op: str) -> list[Target]:
    gpu = f"{op} clip ("
    out = []
    for backend in ("triton",) + (("triton precompute_t",) if op == "dgd" else ()):
        out += [
            Target(issue, f"{op} fwd+bwd, clip", "cuda", gpu, backend, "token_loop", 10.0),
            Target(issue, f"{op} fwd+bwd, clip", "cuda", gpu, backend, "eager_chunked", 2.0),
            Target(issue, f"{op} fwd+bwd, clip", "cuda", gpu, backend, "compiled_chunked", 1.0, ahead=True),
        ]
    return out + [Target(issue, f"{op} fwd+bwd, CPU", "cpu", f"{op} cpu_small (", "cpu", "eager_chunked", 2.0)]


def _peer_predictor_targets() -> list[Target]:
    """Issue 22: our AC predictor against the official V-JEPA 2 code (benchmarks/test_bench_predictor_peer.py)."""
    out = []
    for what, group, bound in (
        ("AC tiny fwd+bwd", "predictor ac tiny fwd+bwd", 1.5),
        ("AC tiny TF + rollout fwd+bwd", "predictor ac tiny tf+rollout fwd+bwd", 1.5),
    ):
        out += [
            Target(22, f"{what}, time", "cpu", group, "ours", "official", bound),
            Target(22, f"{what}, peak memory", "cpu", group, "ours", "official", 1.0, field="peak_mib"),
        ]
    return out + [
        Target(22, "AC real size fwd, time", "cpu", "predictor ac vjepa2-ac fwd B=1", "ours", "official", 1.2)
    ]


def _titans_cpu_targets() -> list[Target]:
    """Issue 22, "Titans on CPU", at titans-pytorch NeuralMemory's configuration (B 2, 4 heads, head dim 64,
    L 2064, MLP hidden 64; benchmarks/test_bench_titans.py, test_titans_cpu_peer). The linear memory's fused C++
    loop against "explicit", the same chunked algorithm as ATen calls (what the C++ path ran before)."""
    out = []
    for C in (16, 64):
        out += [
            Target(
                22,
                f"titans linear fwd+bwd C={C}, CPU, fused C++ vs ATen chain",
                "cpu",
                f"titans nm_C{C} (",
                "cpu",
                "explicit",
                3.0,
            ),
            Target(
                22,
                f"titans MLP fwd+bwd C={C}, CPU, vs NeuralMemory",
                "cpu",
                f"titans nm_C{C}_mlp (",
                "cpu",
                "neural_memory",
                2.0,
            ),
            Target(
                22,
                f"titans MLP fwd+bwd C={C}, CPU, NeuralMemory's peak memory / ours",
                "cpu",
                f"titans nm_C{C}_mlp (",
                "cpu",
                "neural_memory",
                2.0,
                field="peak_mib",
            ),
        ]
    return out


TARGETS: list[Target] = (
    _l1_kernel_targets()
    + _l1_cpu_targets()
    + _build_targets()
    + [Target(3, "L1 fwd+bwd float32, CPU", "cpu", f"l1 fwd+bwd {L1_SHAPE} float32", "cpu", "eager", 2.0)]
    + _memory_targets(7, "dgd")
    + _memory_targets(8, "titans")
    + _peer_predictor_targets()
    + _titans_cpu_targets()
)


def _matches(target: Target, row: dict, suffix: str = "fwd_bwd") -> bool:
    if row.get("device") != target.device:
        return False
    g = row["group"]
    if target.group.endswith(" ("):  # memory suites: "<op> <shape name> (<shape>) C=<c> <mode>"
        return g.startswith(target.group) and g.endswith(" " + suffix)
    return g == target.group


def _suite_ran(target: Target, rows: list[dict]) -> bool:
    prefix = target.group.split(" ")[0] + " "
    return any(r.get("device") == target.device and r["group"].startswith(prefix) for r in rows)


def evaluate(rows: list[dict]) -> list[dict]:
    """One verdict per target whose suite ran on the target's device: what, backend, baseline, ratio (None when
    a row is missing), bound, status ("met", "NOT met", "not measured: no <backend> row"). A peak-memory target
    needs both rows' peak_mib (a row without one counts as missing)."""
    out = []
    for t in TARGETS:
        if not _suite_ran(t, rows):
            continue
        ms = {}
        for r in rows:
            if _matches(t, r) and r["backend"] in (t.backend, t.baseline) and r.get(t.field) is not None:
                ms[r["backend"]] = r[t.field]  # a later row (a rerun in the same file) replaces an earlier one
        missing = [b for b in (t.backend, t.baseline) if b not in ms]
        ratio = None if missing else ms[t.baseline] / ms[t.backend] if ms[t.backend] > 0 else float("inf")
        if missing:
            status = f"not measured: no {' / '.join(missing)} {'row' if t.field == 'ms' else 'peak memory'}"
        else:
            status = "met" if (ratio > t.bound if t.ahead else ratio >= t.bound) else "NOT met"
        out.append(
            dict(
                issue=t.issue,
                what=t.what,
                backend=t.backend,
                baseline=t.baseline,
                ratio=ratio,
                bound=t.bound,
                ahead=t.ahead,
                percent=t.percent,
                status=status,
            )
        )
    return out


def _fmt(v: float, percent: bool) -> str:
    return f"{100 * v:.0f}%" if percent else f"{v:.2f}x"


def markdown(rows: list[dict]) -> list[str]:
    verdicts = evaluate(rows)
    if not verdicts:
        return []
    lines = [
        "## Targets of the open issues (ratios of two rows of this run)",
        "",
        "| issue | target | path | against | measured | needed | verdict |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for v in verdicts:
        need = ("> " if v["ahead"] else ">= ") + _fmt(v["bound"], v["percent"])
        got = "-" if v["ratio"] is None else _fmt(v["ratio"], v["percent"])
        lines.append(
            f"| {v['issue']} | {v['what']} | {v['backend']} | {v['baseline']} | {got} | {need} | {v['status']} |"
        )
    return lines


def load_rows(path: str) -> list[dict]:
    """The rows of HOPE_BENCH_JSON; a clear error for a missing or corrupt file."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark rows {path!r} do not exist (written by HOPE_BENCH_JSON=...)") from None
    except ValueError as e:
        raise ValueError(f"benchmark rows {path!r} are not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and {"group", "backend", "ms"} <= r.keys() for r in rows
    ):
        raise ValueError(f"benchmark rows {path!r}: expected a list of rows with group, backend and ms")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        lines = markdown(load_rows(argv[0]))
    except (OSError, ValueError) as e:
        print(f"targets.py: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines) if lines else "no row of this run belongs to a target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
