"""Shows the import API: your own V-JEPA 2 latents into the on-disk clip format, one phase at a time
(`data.importers.import_files` for files, `import_arrays` for tensors), checked with `data.verify_dataset`, then
the A1 -> B -> A2 stream built from it (`data.make_stream`). `hope-kernels import` imports one phase the same way.

    python examples/import_own_data.py --out data/mine \
        --phase A1 a1_latents.npy a1_actions.npy --phase B b_latents.npy b_actions.npy \
        --phase A2 a2_latents.npy a2_actions.npy
    python examples/import_own_data.py --out /tmp/demo --demo          # random arrays, to try it out

Latents (n, T, N, D) or (n, T, H, W, D); actions (n, T, A). Splits are assigned automatically (train | stream |
heldout; the stream gets 10% of each phase). Then: `hope-kernels aba --preset quick --out runs/mine --data data/mine`,
which takes 6 stream clips per phase, so each phase needs at least 60 clips.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--phase", nargs=3, action="append", metavar=("NAME", "LATENTS", "ACTIONS"), default=[])
    p.add_argument("--demo", action="store_true", help="import random arrays (n=20, T=8, 4x4 grid, D=16)")
    args = p.parse_args(argv)

    from hope_kernels.data import make_stream, verify_dataset
    from hope_kernels.data.importers import import_arrays, import_files

    if args.demo:
        g = torch.Generator().manual_seed(0)
        for k, phase in enumerate(("A1", "B", "A2")):
            z = torch.randn(20, 8, 16, 16, generator=g)
            a = torch.zeros(20, 8, 2)
            a[:, 1] = torch.randn(20, 2, generator=g)
            import_arrays(args.out, z, a, phase, append=k > 0)
    else:
        if not args.phase:
            p.error("give --phase NAME LATENTS ACTIONS at least once, or --demo")
        for k, (phase, lat, act) in enumerate(args.phase):
            import_files(args.out, lat, act, phase, append=k > 0)
    print(verify_dataset(args.out))
    stream = make_stream(args.out, phases=("A1", "B", "A2"), seed=0)
    print(
        f"stream: {len(stream.clips)} clips, held-out per phase: { {ph: len(c) for ph, c in stream.heldout.items()} }"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
