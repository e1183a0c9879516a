"""Clip datasets: the on-disk format (format.py), the researcher's importer (importers.py) and the embedded
A1 / B / A2 physics dataset (physics.py + simulate.py). See docs/data.md."""

from hope_kernels.data.format import (
    KNOWN_PHASES,
    SPLITS,
    ClipDataset,
    DatasetWriter,
    Stream,
    make_stream,
    read_manifest,
    verify_dataset,
)
from hope_kernels.data.simulate import PRESETS, ensure_dataset, simulate_dataset

__all__ = [
    "ClipDataset",
    "DatasetWriter",
    "KNOWN_PHASES",
    "PRESETS",
    "SPLITS",
    "Stream",
    "ensure_dataset",
    "make_stream",
    "read_manifest",
    "simulate_dataset",
    "verify_dataset",
]
