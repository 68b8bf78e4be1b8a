"""`vqt-edge package`: a trained run's model for apps (device_runner/package.py; docs/deploy.md)."""

from __future__ import annotations

from pathlib import Path

import click

from vqt_edge.model_metadata import PACKAGE_FORMATS as FORMATS


@click.command("package")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A finished run folder.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="hf",
    show_default=True,
    help="hf: a folder optimum's ORTModelForImageClassification and transformers' pipeline load; "
    "onnx: model.onnx alone, carrying its classes and preprocessing as metadata.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write (new or empty).")
def package_cmd(run_dir: Path, fmt: str, out: Path) -> None:
    """Package a trained run's model for apps: a Hugging Face folder or a self-describing model.onnx."""
    from vqt_edge import api

    for path in api.package(run_dir, fmt, out):
        click.echo(f"wrote {path}")
