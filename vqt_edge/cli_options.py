"""Options shared by several commands (one definition, so their help stays the same)."""

from __future__ import annotations

from typing import Callable

import click

ARCH_SIZES = (
    ("--depth", "number of layers"),
    ("--dim", "embedding dimension"),
    ("--heads", "attention heads"),
    ("--mlp-dim", "MLP hidden size"),
    ("--patch", "patch size"),
    ("--image-size", "input resolution"),
)


def arch_size_options(command: Callable) -> Callable:
    """--depth --dim --heads --mlp-dim --patch --image-size: override a preset, or define a model."""
    for flag, what in reversed(ARCH_SIZES):
        command = click.option(flag, type=int, help=f"Override/define: {what}.")(command)
    return command


KV_DTYPE_HELP = ("Rows of the K/V cache (--kv ram/disk): fp16, or int8 with a float32 scale per channel "
                 "(about half the bytes; docs/kv-cache.md).")


def kv_dtype_option(command: Callable, auto: bool = False) -> Callable:
    """--kv-dtype fp16|int8 (device_runner/kv_int8.py); `auto` (train, plan): the planner's choice."""
    if auto:
        return click.option("--kv-dtype", type=click.Choice(["auto", "fp16", "int8"]), default="auto", show_default=True,
                            help=KV_DTYPE_HELP + " auto: fp16 unless only int8 fits the memory and disk budgets.")(command)
    return click.option("--kv-dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
                        help=KV_DTYPE_HELP)(command)


def disk_budget_option(command: Callable) -> Callable:
    """--disk-budget (vqt_edge/disk_plan.py)."""
    return click.option("--disk-budget", help="Disk space the run folder may take, e.g. 20GB: chooses --kv and --kv-dtype "
                        "with the memory plan, exits 2 up front if nothing fits [default: the free space of its file "
                        "system, less 512 MiB or 5% of it].")(command)
