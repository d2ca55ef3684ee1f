"""The `--help` layout of the benchmark scripts."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` shows the script's docstring as written and every flag's default."""
