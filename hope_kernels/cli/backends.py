"""`hope-kernels backends`: which op backends this installation can run."""

from __future__ import annotations


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    import torch

    from hope_kernels.dispatch import backends, extension_error

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name, ok in backends().items():
        print(f"  {name:10s} {'yes' if ok else 'no'}")
    err = extension_error()
    if err:
        print(f"compiled extension: {err}")
    return 0
