"""`vqt-edge tune`: the lr x weight-decay grid on one frozen pass (device_runner/tune.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vqt_edge.cli.options import build_config, config_options, device_command, parse_list
from vqt_edge.config import TrainConfig
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES
from vqt_edge.spec import CACHED_KV_MODES


@click.command()
@click.option(
    "--bundle", type=click.Path(path_type=Path), help="Bundle from `vqt-edge export` (not needed with --resume)."
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help="Training images (folder per class, or list file): split 80/20 per class to tune, all used for the final run.",
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="The final run folder (trained with the chosen lr/wd on all the data); the grid goes to RUN.tune/.",
)
@click.option(
    "--lrs", help="Comma-separated learning rates [default: the official 1, 0.5, 0.25, 0.1, 0.05 x batch size / 256]."
)
@click.option("--weight-decays", help="Comma-separated weight decays [default: the official 0.01, 0.001, 0.0001, 0].")
@config_options(
    TrainConfig,
    [
        "epochs",
        "batch_size",
        "micro_batch",
        "warmup_epochs",
        "seed",
        "kv",
        "device",
        "threads",
        "keep_fraction",
        "lasso",
        "kv_dtype",
    ],
    kv_dtype={
        "type": click.Choice(KV_DTYPES),
        "default": DEFAULT_KV_DTYPE,
        "help": "Rows of the one frozen pass's K/V cache: "
        "int8 with a float32 scale per channel, or fp16 (about twice the bytes; docs/kv-cache.md).",
    },
    kv={
        "type": click.Choice(CACHED_KV_MODES),
        "default": "ram",
        "help": "Keep the one frozen pass's K/V in RAM, or in a disk cache in RUN.tune/ (a resumed tune reuses it).",
    },
    seed={"help": "Seeds the 80/20 split, data order and dropout."},
    keep_fraction={"help": "Feature selection of every run, as in `train`."},
)
@click.option("--resume", is_flag=True, help="Continue a killed tune of --run with its saved settings.")
@device_command
def tune(
    bundle: Path | None,
    data: Path | None,
    run_dir: Path,
    lrs: str | None,
    weight_decays: str | None,
    resume: bool,
    **options: object,
) -> None:
    """Choose lr and weight decay on a seeded per-class 80/20 split, every configuration reading the
    K/V of one frozen pass, then retrain the best on all the data into --run (torch-free).

    Prints the grid as a table and writes it to RUN.tune/tune.json.
    """
    from device_runner.trainer import Interrupted
    from device_runner.tune import table, workspace
    from device_runner.tune import tune as run_tune
    from vqt_edge.cli.bars import ClickBars

    cfg = build_config(TrainConfig, options)
    try:
        with ClickBars() as bars:
            result = run_tune(
                bundle,
                data,
                run_dir,
                cfg,
                parse_list(lrs, float, "--lrs"),
                parse_list(weight_decays, float, "--weight-decays"),
                resume,
                echo=click.echo,
                process_wide=True,
                progress=bars,
            )
    except (Interrupted, KeyboardInterrupt) as e:
        click.echo(f"interrupted: {e or 'before training started'}; continue with --resume", err=True)
        sys.exit(130)
    click.echo(table(result))
    best = result["best"]
    click.echo(
        f"chosen: lr {best['lr']:g}, weight decay {best['weight_decay']:g} (val accuracy {best['val_acc']:.4f}); "
        f"frozen passes {result['frozen_passes']}; retrained on all {result['images']} images into {run_dir}; "
        f"grid in {workspace(run_dir) / 'tune.json'}"
    )
