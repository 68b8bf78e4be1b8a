"""`vqt-edge tune`: the lr x weight-decay grid on one frozen pass (device_runner/tune.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vqt_edge.cli_options import kv_dtype_option
from vqt_edge.errors import UserError
from vqt_edge.spec import CACHED_KV_MODES


def _numbers(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


@click.command()
@click.option("--bundle", type=click.Path(path_type=Path), help="Bundle from `vqt-edge export` (not needed with --resume).")
@click.option("--data", type=click.Path(path_type=Path), help="Training images (folder per class, or list file): split 80/20 per class to tune, all used for the final run.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="The final run folder (trained with the chosen lr/wd on all the data); the grid goes to RUN.tune/.")
@click.option("--lrs", help="Comma-separated learning rates [default: the official 1, 0.5, 0.25, 0.1, 0.05 x batch size / 256].")
@click.option("--weight-decays", help="Comma-separated weight decays [default: the official 0.01, 0.001, 0.0001, 0].")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--micro-batch", type=int, help="Run each batch in micro-batches of this size (gradient accumulation, less memory).")
@click.option("--warmup-epochs", type=float, help="Linear warm-up length [default: 10% of --epochs].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the 80/20 split, data order and dropout.")
@click.option("--kv", type=click.Choice(CACHED_KV_MODES), default="ram", show_default=True,
              help="Keep the one frozen pass's K/V in RAM, or in a disk cache in RUN.tune/ (a resumed tune reuses it).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="Threads for the frozen pass and training [default: all cores].")
@click.option("--keep-fraction", type=float, default=1.0, show_default=True, help="Feature selection of every run, as in `train`.")
@click.option("--lasso", type=float, default=1e-4, show_default=True, help="Group-lasso penalty of --keep-fraction.")
@click.option("--resume", is_flag=True, help="Continue a killed tune of --run with its saved settings.")
@kv_dtype_option
def tune(bundle, data, run_dir, lrs, weight_decays, epochs, batch_size, micro_batch, warmup_epochs, seed, kv, device, threads,
         keep_fraction, lasso, resume, kv_dtype) -> None:
    """Choose lr and weight decay on a seeded per-class 80/20 split, every configuration reading the
    K/V of one frozen pass, then retrain the best on all the data into --run (torch-free).

    Prints the grid as a table and writes it to RUN.tune/tune.json.
    """
    from device_runner import ort

    ort.block_torch()
    from device_runner.trainer import Interrupted, TrainConfig
    from device_runner.tune import table, tune as run_tune, workspace
    from vqt_edge.progress import ClickBars

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, micro_batch=micro_batch, warmup_epochs=warmup_epochs, seed=seed,
                      kv=kv, device=device, threads=threads, keep_fraction=keep_fraction, lasso=lasso,
                      kv_dtype=kv_dtype)
    try:
        with ClickBars() as bars:
            result = run_tune(bundle, data, run_dir, cfg, _numbers(lrs, "--lrs"), _numbers(weight_decays, "--weight-decays"),
                              resume, echo=click.echo, process_wide=True, progress=bars)
    except (Interrupted, KeyboardInterrupt) as e:
        click.echo(f"interrupted: {e or 'before training started'}; continue with --resume", err=True)
        sys.exit(130)
    click.echo(table(result))
    best = result["best"]
    click.echo(f"chosen: lr {best['lr']:g}, weight decay {best['weight_decay']:g} (val accuracy {best['val_acc']:.4f}); "
               f"frozen passes {result['frozen_passes']}; retrained on all {result['images']} images into {run_dir}; "
               f"grid in {workspace(run_dir) / 'tune.json'}")
