"""`vqt-edge plan` (what fits a memory budget) and `vqt-edge sweep` (memory/accuracy over methods and k).

Registered on the main CLI by vqt_edge/cli/__init__.py. Neither command imports torch: `plan` runs on the
device, and `sweep` runs every export and every training run in its own process.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from vqt_edge.cli.options import arch_size_options, config_options, device_command, parse_list
from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError


def _count_images(data: Path) -> int:
    from device_runner.data import load_dataset

    return len(load_dataset(data))


@click.command()
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle from `vqt-edge export`.")
@click.option(
    "--memory-budget", required=True, help="Peak memory the training run must stay within, e.g. 600MB or 1.5GB."
)
@click.option("--images", type=int, help="Training + validation images [default: counted in --data, else 1000].")
@click.option(
    "--data", type=click.Path(path_type=Path), help="Count the images of this data set (same layouts as train --data)."
)
@config_options(
    TrainConfig,
    ["batch_size", "kv", "micro_batch", "backend"],
    kv={"help": "Keep this K/V mode (default: the planner chooses)."},
    micro_batch={"help": "Keep this micro-batch (default: the planner chooses)."},
    backend={
        "help": "Training backend; auto: the default where a plan of it fits, else the other one (as train does)."
    },
)
@config_options(TrainConfig, ["kv_dtype", "disk_budget_mb"])
@click.option("--test", "with_test", is_flag=True, help="The run will also evaluate a --test set in the same process.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@device_command
def plan(
    bundle,
    memory_budget,
    images,
    data,
    batch_size,
    kv,
    micro_batch,
    backend,
    kv_dtype,
    disk_budget_mb,
    with_test,
    as_json,
) -> None:
    """The configuration `train --memory-budget` would choose, and its predicted peak.

    Prefers the default backend, then K/V in RAM over a disk cache over recomputing them every
    step, then the largest micro-batch and frozen-pass batch; fp16 K/V before int8. Also prints the
    disk the run folder will take (K/V cache, checkpoints, outputs) against --disk-budget (default:
    the free space here, less a margin). Exits 2, naming what would fit, when nothing fits.
    """
    from device_runner import backends
    from vqt_edge import manifest as mf
    from vqt_edge.memory import BundleFootprint, NoPlan, parse_size_mb
    from vqt_edge.memory.disk import default_disk_budget, plan_run

    budget = parse_size_mb(memory_budget)
    if batch_size < 1 or (micro_batch is not None and not 1 <= micro_batch <= batch_size):
        raise UserError("--batch-size must be >= 1 and --micro-batch between 1 and --batch-size")
    if images is None:
        images = _count_images(data) if data is not None else 1000
    if images < 1:
        raise UserError("--images must be at least 1")
    fp = BundleFootprint.from_bundle(bundle)
    choices = backends.candidates(backend, mf.read_manifest(bundle, verify=False))
    disk = parse_size_mb(disk_budget_mb) if disk_budget_mb is not None else default_disk_budget(Path.cwd())
    try:
        run_plan = plan_run(
            fp,
            images=images,
            batch_size=batch_size,
            micro_batch=micro_batch,
            kv=kv or "auto",
            kv_dtype=kv_dtype or "auto",
            memory_budget=budget,
            available=None,
            disk_budget=disk,
            test=with_test,
            backends=choices,
        )
        chosen = run_plan.plan
    except NoPlan as e:
        if as_json:
            click.echo(
                json.dumps(
                    {"fits": False, "budget_mb": budget, "smallest_budget_mb": e.needs_mb, "best": e.best.to_dict()}
                )
            )
        raise
    if as_json:
        click.echo(json.dumps({"fits": True, "budget_mb": budget, **chosen.to_dict(), **run_plan.to_dict()}))
        return
    click.echo(f"{images} images, batch {batch_size}, budget {budget:.0f} MiB")
    click.echo(
        f"plan: --backend {chosen.backend} --kv {chosen.kv} --micro-batch {chosen.micro_batch} --kv-dtype {run_plan.kv_dtype} "
        f"(frozen pass {chosen.frozen_batch} images at a time)"
    )
    click.echo(
        f"predicted peak {chosen.peak_mb:.0f} MiB (fits with a {100 * (budget / chosen.peak_mb - 1):.0f}% margin; "
        f"needs {chosen.needs_mb:.0f} MiB)"
    )
    for name, mb in chosen.phases.items():
        click.echo(f"  {name:<7} {mb + 0:8.0f} MiB above the runtime baseline")
    click.echo(run_plan.describe_disk())


@click.command()
@click.option("--model", "model_name", help="Preset (vit_ti16, vit_s16, vit_b16, ...); or give every size below.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), help="Checkpoint for export.")
@click.option("--random-init", is_flag=True, help="Random weights (memory and speed measurements).")
@click.option(
    "--methods",
    default="vqt,vpt,adaptformer,finetune",
    show_default=True,
    help="Comma-separated methods that `vqt-edge export --method` supports.",
)
@click.option(
    "--last-k",
    default="1,2,4,8,12",
    show_default=True,
    help="Comma-separated k: adapted last layers (vpt, adaptformer, finetune, vqt+*), query layers last:k (vqt).",
)
@config_options(TrainConfig, ["batch_size"])
@click.option("--query-tokens", type=int, default=1, show_default=True, help="T for VQT and VPT.")
@click.option(
    "--data", type=click.Path(exists=True, path_type=Path), help="Training images (folder per class or list file)."
)
@click.option("--test", type=click.Path(exists=True, path_type=Path), help="Test images: the accuracy the plot shows.")
@click.option(
    "--val-split",
    type=float,
    default=0.0,
    show_default=True,
    help="Without --test: report accuracy on this held-out fraction.",
)
@click.option("--steps", type=int, help="Memory-only: N training steps on generated random images (no --data).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs per run (with --data).")
@click.option("--lr", type=float, help="Learning rate for every run [default: train's].")
@config_options(
    TrainConfig,
    ["kv", "micro_batch", "kv_dtype"],
    kv={"help": "Passed to every training run [default: each run chooses from the available memory, as train does]."},
    micro_batch={"help": "Passed to every training run."},
    kv_dtype={"help": "Passed to every training run [default: each run chooses, as train does]."},
)
@click.option("--num-classes", type=int, help="[default: the classes of --data; 2 with --steps].")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for results.csv, results.json, the plot and the runs.",
)
@click.option("--keep-bundles", is_flag=True, help="Keep every exported bundle (ViT-B/16: about 0.9 GB each).")
@arch_size_options
def sweep(
    model_name,
    weights,
    random_init,
    methods,
    last_k,
    batch_size,
    query_tokens,
    data,
    test,
    val_split,
    steps,
    epochs,
    lr,
    kv,
    micro_batch,
    kv_dtype,
    num_classes,
    out,
    keep_bundles,
    depth,
    dim,
    heads,
    mlp_dim,
    patch,
    image_size,
) -> None:
    """Export and train every (method, k); tabulate peak memory, speed and accuracy; plot them.

    \b
    Each configuration is exported and trained in its own process (peaks do not mix), the peak
    being the training process's own VmHWM. Writes OUT/results.csv, OUT/results.json and
    OUT/accuracy_vs_memory.png (x: peak memory, y: accuracy, one line per method over k; with
    --steps, which measures memory only, y is k).
    """
    from vqt_edge.sweep import SweepConfig, run_sweep

    if weights is not None and random_init:
        raise UserError("give either --weights or --random-init, not both")
    if (data is None) == (steps is None):
        raise UserError("give --data DIR (accuracy) or --steps N (memory only, random images), not both")
    cfg = SweepConfig(
        model_name=model_name,
        weights=weights,
        random_init=random_init,
        methods=parse_list(methods, str, "--methods"),
        last_k=parse_list(last_k, int, "--last-k"),
        batch_size=batch_size,
        query_tokens=query_tokens,
        data=data,
        test=test,
        val_split=val_split,
        steps=steps,
        epochs=epochs,
        lr=lr,
        kv=kv,
        micro_batch=micro_batch,
        kv_dtype=None if kv_dtype in (None, "auto") else kv_dtype,
        num_classes=num_classes,
        out=out,
        keep_bundles=keep_bundles,
        sizes={
            k: v
            for k, v in dict(
                depth=depth, dim=dim, heads=heads, mlp_dim=mlp_dim, patch=patch, image_size=image_size
            ).items()
            if v is not None
        },
    )
    run_sweep(cfg, click.echo)
