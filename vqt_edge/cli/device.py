"""`vqt-edge train | eval | predict`: the device commands, torch-free, each a call into vqt_edge/api.py."""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import click

from vqt_edge.cli.options import PATH, build_config, config_options, device_command
from vqt_edge.config import TrainConfig

TRAIN_FIELDS = [f.name for f in fields(TrainConfig) if f.metadata.get("cli", True)]


@click.command()
@click.option("--bundle", type=PATH, help="Bundle from `vqt-edge export` (not needed with --resume).")
@click.option(
    "--data",
    type=PATH,
    help="Training images: a folder with one sub-folder per class, or a list file of `path,label` lines.",
)
@click.option(
    "--run",
    "run_dir",
    type=PATH,
    required=True,
    help="Run folder: checkpoints, metrics, adapter and model.onnx go here.",
)
@click.option("--val", type=PATH, help="Validation images (same layouts as --data).")
@click.option("--test", type=PATH, help="Evaluate on these images at the end and record the accuracy.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in --run from its last checkpoint, with its saved settings."
)
@config_options(TrainConfig, TRAIN_FIELDS)
@device_command
def train(
    bundle: Path | None,
    data: Path | None,
    run_dir: Path,
    val: Path | None,
    test: Path | None,
    resume: bool,
    **options: object,
) -> None:
    """Adapt the bundle's ViT to your images with VQT (torch-free, resumable).

    A killed run continues with --resume and ends exactly where an uninterrupted run would.
    Ctrl-C finishes the current step, writes a checkpoint and exits.
    """
    from device_runner.trainer import BudgetExceeded, Interrupted
    from vqt_edge import api
    from vqt_edge.cli.bars import ClickBars

    cfg = build_config(TrainConfig, options)
    try:
        with ClickBars() as bars:  # the library reports progress events; the CLI draws them
            summary = api.train(
                bundle,
                data,
                run_dir,
                cfg,
                val=val,
                test=test,
                resume=resume,
                progress=click.echo,
                on_progress=bars,
                process_wide=True,
            )
    except Interrupted as e:
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C before the training loop (data scan, frozen K/V pass)
        click.echo("interrupted before training started; continue with --resume", err=True)
        sys.exit(130)
    except BudgetExceeded as e:
        click.echo(f"ERROR: MEMORY BUDGET EXCEEDED: {e}", err=True)
        sys.exit(3)
    click.echo(
        f"done in {summary['seconds']:.1f} s, peak memory {summary['peak_rss_mb']:.0f} MiB; "
        f"skipped {summary['skipped_images']} unreadable images; "
        f"wrote {run_dir}/adapter.safetensors, {run_dir}/model.onnx"
    )


@click.command("eval")
@click.option("--run", "run_dir", type=PATH, required=True, help="A finished run folder.")
@click.option("--data", type=PATH, required=True, help="Labelled images (folder per class, or list file).")
@config_options(TrainConfig, ["batch_size", "device"], batch_size={"help": "Images per batch."})
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (accuracy in [0,1], per class, confusion matrix)."
)
@device_command
def eval_cmd(run_dir: Path, data: Path, batch_size: int, device: str, as_json: bool) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a trained run."""
    from vqt_edge import api

    result = api.evaluate(run_dir, data, batch_size, device)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"accuracy {result['accuracy']:.4f} on {result['images']} images ({result['skipped_images']} skipped)")
    width = max(len(c) for c in result["classes"])
    for name, acc in result["per_class_accuracy"].items():
        click.echo(f"  {name:<{width}}  {'-' if acc is None else f'{acc:.4f}'}")
    click.echo("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(result["classes"], result["confusion_matrix"]):
        click.echo(f"  {name:<{width}}  " + " ".join(f"{v:5d}" for v in row))


@click.command()
@click.option("--run", "run_dir", type=PATH, help="A finished run folder.")
@click.option(
    "--model",
    "model_file",
    type=PATH,
    help="Instead of --run: a model.onnx alone (it carries its classes and preprocessing; docs/deploy.md).",
)
@click.argument("images", nargs=-1, required=True, type=PATH)
@click.option("--recursive", "-r", is_flag=True, help="A folder among IMAGE...: its sub-folders' images too.")
@config_options(TrainConfig, ["batch_size", "device"], batch_size={"help": "Images per batch."})
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: one {path, label, logits} per image.")
@device_command
def predict(
    run_dir: Path | None,
    model_file: Path | None,
    images: tuple[Path, ...],
    recursive: bool,
    batch_size: int,
    device: str,
    as_json: bool,
) -> None:
    """Predict the class of each IMAGE with a trained run (streams: memory does not grow with the count).

    A folder stands for the images in it, sorted by name (with --recursive, in its sub-folders too).
    """
    from device_runner.data import image_paths
    from vqt_edge import api

    paths = list(image_paths(images, recursive))
    results = api.predictions(run_dir, paths, batch_size, device, model=model_file)  # opened before any output
    failed = 0
    if as_json:
        click.echo("[", nl=False)
    for i, result in enumerate(results):
        if "error" in result:
            failed += 1
            click.echo(f"warning: {result['error']}", err=True)
            continue
        if as_json:
            click.echo(("," if i - failed else "") + json.dumps(result), nl=False)
        else:
            click.echo(f"{result['path']}\t{result['label']}")
    if as_json:
        click.echo("]")
    if failed:
        sys.exit(2)
