"""Calibration: artifacts the adapters read (CETT threshold files, Sparse Expansion experts).

Light at import time: the CLI imports the command modules of this package to build its parser.
"""

from __future__ import annotations

import argparse


def calibrate_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of `sparse-ffn calibrate` (created by whichever command module comes first)."""
    parser = subparsers.choices.get("calibrate")
    if parser is None:
        parser = subparsers.add_parser("calibrate", help="calibrate sparsity artifacts (thresholds, experts)")
        return parser.add_subparsers(dest="calibrate_command", required=True)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
