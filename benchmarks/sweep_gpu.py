"""Time each Triton kernel family under several launch configurations at the benchmark shapes, in one call, so
that one GPU session can decide the settings the launchers pick (they are chosen today from ptxas' register
report alone: benchmarks/compile_sm90.py).

    python benchmarks/sweep_gpu.py [--only dgd,titans,l1,rope] [--md sweep.md] [--json sweep.json]
        (on a GPU the table and rows go by default to benchmarks/results/<date>-<gpu>-sweep.{md,json}, and
        are copied to $OUT when it is set, as on a lent device machine)
    TRITON_INTERPRET=1 python benchmarks/sweep_gpu.py --smoke      # tiny shapes on the CPU (CI checks the script)

Per family and configuration: the launchers' forward and backward timed separately (GPU: CUDA events via
triton.testing.do_bench, median; CPU: one host-timed call), the first configuration of each family being the
current default. Before timing, every configuration's outputs are compared with the default's (relative
error ||x - ref|| / ||ref||, worst over all outputs): a configuration that computes something else is
reported, never ranked. Inputs are random (never zeros). Nothing here changes a default: the table is for the
person who does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _time_ms(fn) -> float:
    if HAS_CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # interpreter: compile-free, one call is the measurement
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _worst(outs, refs) -> float:
    return max(_rel(a, b) for a, b in zip(outs, refs))


def _gen(seed: int):
    return torch.Generator(device=DEVICE).manual_seed(seed)


# ------------------------------------------------------------------------------------------- families
# Each family: name -> (shapes, configs, make(shape) -> inputs, fwd(inputs, C, cfg) -> outs, bwd(inputs, C,
# fwd_outs, cfg) -> outs[, nbytes(inputs) -> (fwd bytes, bwd bytes)]). configs[0] is the launchers' default.


def _memory_inputs(shape, seed=0):
    B, H, L, dk, dv = shape
    g = _gen(seed)
    r = lambda *s: torch.randn(*s, device=DEVICE, generator=g)  # noqa: E731
    u = lambda *s: torch.rand(*s, device=DEVICE, generator=g)  # noqa: E731
    q = torch.nn.functional.normalize(r(B, H, L, dk), dim=-1)
    k = torch.nn.functional.normalize(r(B, H, L, dk), dim=-1)
    return dict(
        q=q,
        k=k,
        v=r(B, H, L, dv),
        u=[u(B, H, L) for _ in range(3)],
        M0=0.1 * r(B, H, dk, dv),
        S0=0.1 * r(B, H, dk, dv),
        do=r(B, H, L, dv),
        dM=r(B, H, dk, dv),
        dS=r(B, H, dk, dv),
    )


def dgd_family(smoke: bool):
    from hope_kernels.ops.dgd.triton import dgd_bwd_triton, dgd_fwd_triton

    shapes = (
        {"tiny C=4": ((1, 2, 13, 8, 40), 4)}
        if smoke
        else {"clip C=16": ((4, 16, 8 * 258, 64, 64), 16), "hope_step C=258": ((4, 80, 258, 64, 64), 258)}
    )

    def make(shape):
        x = _memory_inputs(shape[0])
        x["alpha"], x["eta"] = 0.9 + 0.1 * x["u"][0], 0.5 * x["u"][1]
        return x

    def fwd(x, C, cfg):  # cfg: (value block, where T is solved)
        return dgd_fwd_triton(x["q"], x["k"], x["v"], x["alpha"], x["eta"], x["M0"], C, *cfg)

    def bwd(x, C, out, cfg):
        return dgd_bwd_triton(x["q"], x["k"], x["v"], x["alpha"], x["eta"], out[2], x["do"], x["dM"], C, *cfg)

    configs = [
        (f"{'all columns' if vb == 0 else f'value_block={vb}'} T {ts}", (vb, ts))
        for ts in ("inline", "precompute")
        for vb in (16, 32, 0)
    ]
    return shapes, configs, make, fwd, bwd


def titans_family(smoke: bool):
    from hope_kernels.ops.titans.triton import titans_linear_bwd_triton, titans_linear_fwd_triton

    shapes = {"tiny C=4": ((1, 2, 13, 8, 40), 4)} if smoke else {"clip C=16": ((4, 16, 8 * 258, 64, 64), 16)}

    def make(shape):
        x = _memory_inputs(shape[0])
        x["gates"] = [0.1 * x["u"][0], 0.9 * x["u"][1], 0.1 * x["u"][2]]
        return x

    def fwd(x, C, vb):
        return titans_linear_fwd_triton(x["q"], x["k"], x["v"], *x["gates"], x["M0"], x["S0"], C, vb)

    def bwd(x, C, out, vb):
        return titans_linear_bwd_triton(
            x["q"], x["k"], x["v"], *x["gates"], out[1], out[2], x["do"], x["dM"], x["dS"], C, vb
        )

    return shapes, [("value_block=16", 16), ("value_block=32", 32), ("all columns", 0)], make, fwd, bwd


def l1_family(smoke: bool):
    from hope_kernels.ops.l1_loss.triton import l1_per_step_backward_triton, l1_per_step_triton

    shape = (1, 2, 3, 40) if smoke else (4, 8, 256, 1024)
    shapes = {f"{tuple(shape)} {str(dt)[6:]}": (shape, dt) for dt in (torch.float32, torch.bfloat16)}
    configs = [("default", (None, None))] + [
        (f"rows={r} warps={w} {red}", ((r, w), red))
        for red in ("torch_sum", "last_program")
        for r in (1, 2, 4, 8)
        for w in (2, 4, 8)
    ]

    def make(shape):
        (B, T, N, D), dt = shape
        g = _gen(0)
        return dict(
            p=torch.randn(B, T, N, D, device=DEVICE, generator=g).to(dt),
            t=torch.randn(B, T, N, D, device=DEVICE, generator=g).to(dt),
            coef=torch.rand(T, device=DEVICE, generator=g),
        )

    def fwd(x, _, cfg):  # cfg: (launch, forward reduce mode)
        return (l1_per_step_triton(x["p"], x["t"], True, 1e-6, cfg[0], cfg[1]),)

    def bwd(x, _, out, cfg):
        return (l1_per_step_backward_triton(x["p"], x["t"], x["coef"], True, 1e-6, cfg[0]),)

    def nbytes(x):  # fwd reads pred and target; bwd reads both and writes the gradient
        n = x["p"].numel() * x["p"].element_size()
        return 2 * n, 3 * n

    return shapes, configs, make, fwd, bwd, nbytes


def rope_family(smoke: bool):
    from hope_kernels.ops.rope_attention.reference import rope_freqs
    from hope_kernels.ops.rope_attention.triton import rope_attention_bwd_triton, rope_attention_fwd_triton

    d, BH = (32, (1, 2)) if smoke else (64, (4, 16))
    side = 3 if smoke else 16
    shapes = {f"T={T} {side}x{side}+2 d={d} bf16": (T, side, d, BH) for T in ((2,) if smoke else (8, 64))}
    configs = [("default (the launcher's choice for the shape)", None)] + [
        (f"BM={c[0]} BN={c[1]} warps={c[2]} stages={c[3]}", c)
        for c in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2))
    ]

    def make(shape):
        T, side, d, (B, H) = shape
        rows = [
            r for t in range(T) for r in [(t, 0, 0), (t, 0, 0)] + [(t, h, w) for h in range(side) for w in range(side)]
        ]
        pos = torch.tensor(rows, device=DEVICE)
        L = pos.shape[0]
        g = _gen(0)
        r = lambda: torch.randn(B, H, L, d, device=DEVICE, generator=g).to(torch.bfloat16)  # noqa: E731
        return dict(q=r(), k=r(), v=r(), do=r(), pos=pos, w=rope_freqs(d, None), scale=d**-0.5)

    def fwd(x, _, cfg):
        return rope_attention_fwd_triton(x["q"], x["k"], x["v"], x["pos"], x["w"], 0, x["scale"], cfg)

    def bwd(x, _, out, cfg):
        return rope_attention_bwd_triton(
            x["do"], x["q"], x["k"], x["v"], out[0], out[1], x["pos"], x["w"], 0, x["scale"], cfg
        )

    return shapes, configs, make, fwd, bwd


FAMILIES = {"dgd": dgd_family, "titans": titans_family, "l1": l1_family, "rope": rope_family}


def sweep(family: str, smoke: bool) -> list[dict]:
    shapes, configs, make, fwd, bwd, *rest = FAMILIES[family](smoke)
    nbytes = rest[0] if rest else None
    rows = []
    for shape_name, shape in shapes.items():
        x = make(shape)
        C = shape[1] if family in ("dgd", "titans") else None
        ref_f = ref_b = None
        for i, (label, cfg) in enumerate(configs):
            row = dict(family=family, shape=shape_name, config=label, default=i == 0, launch=cfg)
            try:
                out = fwd(x, C, cfg)
                grads = bwd(x, C, out, cfg)
                if ref_f is None:
                    ref_f, ref_b = [t.detach().clone() for t in out], [t.detach().clone() for t in grads]
                row["rel_err_vs_default"] = max(_worst(out, ref_f), _worst(grads, ref_b))
                row["fwd_ms"] = _time_ms(lambda: fwd(x, C, cfg))
                row["bwd_ms"] = _time_ms(lambda: bwd(x, C, out, cfg))
                if nbytes is not None:  # do_bench clears the L2 cache before each call: DRAM traffic
                    fb, bb = nbytes(x)
                    row["fwd_gbps"], row["bwd_gbps"] = fb / row["fwd_ms"] / 1e6, bb / row["bwd_ms"] / 1e6
            except Exception as e:  # report it, go on with the next
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    if "error" in r:
        return f"| {r['family']} | {r['shape']} | {r['config']} | - | - | - | {r['error']} |"
    ok = r["rel_err_vs_default"] < 1e-3
    gbps = f" ({r['fwd_gbps']:.0f} GB/s)" if "fwd_gbps" in r else ""
    bgbps = f" ({r['bwd_gbps']:.0f} GB/s)" if "bwd_gbps" in r else ""
    return (
        f"| {r['family']} | {r['shape']} | {r['config']} | {r['fwd_ms']:.4f}{gbps} | {r['bwd_ms']:.4f}{bgbps} | "
        f"{r['rel_err_vs_default']:.1e} | {'' if ok else 'DIFFERS from the default'} |"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated families: dgd, titans, l1, rope")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a check of the script, not a measurement)")
    ap.add_argument("--md", default="", help="also write the table as markdown to this file")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file")
    ap.add_argument(
        "--rope-env",
        default="",
        help="write HOPE_ROPE_CONFIG / HOPE_ROPE_BWD_CONFIG lines of the "
        "fastest rope configuration per pass at the longest shape to this file (none: the default)",
    )
    args = ap.parse_args(argv)
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("sweep_gpu.py: no GPU; on the CPU run it with TRITON_INTERPRET=1 --smoke")
    families = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        sys.exit(f"sweep_gpu.py: unknown families {unknown}; choose from {list(FAMILIES)}")
    device = torch.cuda.get_device_name(0) if HAS_CUDA else "cpu (interpreter)"
    import triton

    head = (
        f"Launch-configuration sweep on {device}, torch {torch.__version__}, triton {triton.__version__}"
        f"{' (smoke: tiny shapes, not a measurement)' if args.smoke else ''}\n\n"
        "| family | shape | config | fwd ms | bwd ms | rel err vs default | |\n|---|---|---|---|---|---|---|"
    )
    print(head, flush=True)
    rows = [r for f in families for r in sweep(f, args.smoke)]
    outputs = [(args.md, "md"), (args.json, "json")]
    if HAS_CUDA and not args.smoke and not (args.md or args.json):
        gpu = device.replace("NVIDIA ", "").replace(" ", "-")
        base = os.path.join(
            os.path.dirname(os.path.abspath(__file__)),
            "results",
            f"{time.strftime('%Y-%m-%d', time.gmtime())}-{gpu}-sweep",
        )
        outputs = [(base + ".md", "md"), (base + ".json", "json")]
        if os.environ.get("OUT"):
            outputs += [(os.path.join(os.environ["OUT"], os.path.basename(p)), kind) for p, kind in outputs]
    texts = {"md": head + "\n" + "\n".join(_line(r) for r in rows) + "\n", "json": json.dumps(rows, indent=1)}
    for path, kind in outputs:
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(texts[kind])
            os.replace(tmp, path)
    if args.rope_env:
        _write_rope_env(rows, args.rope_env)
    return 1 if any("error" in r and r["default"] for r in rows) else 0


def _write_rope_env(rows: list, path: str) -> None:
    """Lines `NAME=BM,BN,warps,stages` of the fastest rope configuration per pass at the last (longest) shape,
    among those that agree with the default; nothing for a pass whose default is fastest."""
    rope = [r for r in rows if r["family"] == "rope" and "error" not in r and r["rel_err_vs_default"] < 1e-3]
    lines = []
    if rope:
        last = [r for r in rope if r["shape"] == rope[-1]["shape"]]
        for name, key in (("HOPE_ROPE_CONFIG", "fwd_ms"), ("HOPE_ROPE_BWD_CONFIG", "bwd_ms")):
            best = min(last, key=lambda r: r[key])
            if best["launch"] is not None:
                lines.append(f"{name}={','.join(map(str, best['launch']))}")
            print(f"fastest rope {key[:3]}: {best['config']} ({best[key]:.3f} ms)", flush=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
