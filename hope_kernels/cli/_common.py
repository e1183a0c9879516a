"""Argument helpers the subcommands share: flags declared alike in several commands, comma-separated values,
the one-line summary of a dataset's phases."""

from __future__ import annotations

LATENT_DTYPES = ["float16", "bfloat16", "float32"]  # --latent-dtype of import and encode


def add_phase_and_out(parser) -> None:
    """--phase and --out of the commands that write one phase into a dataset folder (import, encode)."""
    parser.add_argument("--phase", required=True, help="A1, B or A2")
    parser.add_argument("--out", required=True, help="dataset folder")


def comma_list(text: str) -> list[str]:
    """ "a, b,,c" -> ["a", "b", "c"]."""
    return [s.strip() for s in text.split(",") if s.strip()]


def comma_ints(text: str, flag: str) -> list[int]:
    """ "0,1,2" -> [0, 1, 2]; anything else is a ValueError naming `flag`."""
    try:
        return [int(s) for s in comma_list(text)]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def phase_counts(info: dict) -> str:
    """ "A1 60, B 60, A2 60" from verify_dataset's summary."""
    return ", ".join(f"{p} {n}" for p, n in info["phases"].items())
