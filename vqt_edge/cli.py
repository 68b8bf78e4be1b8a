"""`vqt-edge`: export on a workstation; train, eval and predict on the device.

Bad input exits with code 2 and a one-line message (no traceback). The device commands make torch
unimportable before anything else loads, so they run exactly as they would without it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from vqt_edge.cli_options import arch_size_options, disk_budget_option, kv_dtype_option
from vqt_edge.errors import UserError
from vqt_edge.head2toe import DEFAULT_TARGET as H2T_DEFAULT_TARGET
from vqt_edge.manifest import QUANTIZE_MODES
from vqt_edge.spec import AGGREGATES, BACKENDS, FEATURE_NORMS, KV_MODES, METHODS

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:
            from vqt_edge.fileio import DISK_FULL

            if e.errno not in DISK_FULL:
                raise
            click.echo(f"error: disk full while writing {e.filename or 'a file'} ({os.strerror(e.errno)}); "
                       "the last checkpoint is intact: free space and continue with --resume", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vqt-edge")
def cli() -> None:
    """Visual Query Tuning for pre-trained ViTs, trained on the device.

    \b
    Workstation:  vqt-edge export --model vit_b16 --weights CKPT --num-classes 10 --out BUNDLE
    Device:       vqt-edge train --bundle BUNDLE --data DIR --run RUN
                  vqt-edge eval --run RUN --data TEST_DIR
                  vqt-edge predict --run RUN IMAGE_OR_FOLDER...
    """
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)


def _floats(text: str | None, what: str, n: int = 3) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values *= n
    if len(values) != n:
        raise UserError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return values


@cli.command()
@click.option("--model", "model_name", help="Preset: vit_ti16, vit_s16, vit_b16, vit_l16, vit_fmnist. Omit to give every size below.")
@click.option("--weights", metavar="CKPT|hf-hub:ORG/NAME",
              help="Checkpoint: Google .npz, timm/MAE .pth or .safetensors, or a Hugging Face ViT folder (detected by content); "
                   "or a named one: hf-hub:ORG/NAME[@REV], or a timm model name (vit_base_patch16_224.augreg_in21k = "
                   "hf-hub:timm/...), from the Hugging Face cache (downloaded there when online).")
@click.option("--random-init", is_flag=True, help="No checkpoint: random weights (tests, memory and speed measurements).")
@click.option("--num-classes", type=int, help="Classes of the task the device will learn.")
@click.option("--classes", help="Comma-separated class names (optional; sets --num-classes).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write (must not exist or be empty).")
@click.option("--method", type=click.Choice(METHODS), default="vqt", show_default=True,
              help="What the device trains: VQT, or a baseline (linear probe, VPT-Deep, AdaptFormer, partial fine-tuning, "
                   "Head2Toe) or VQT on top of one (docs/design.md section 5).")
@click.option("--last-k", type=int, help="Layers adapted by vpt, adaptformer, finetune and vqt+*: the last K [default: all].")
@click.option("--query-tokens", type=int, default=1, show_default=True, help="T: query tokens per layer (VPT: prompt tokens per layer).")
@click.option("--query-layers", default="all", show_default=True, help="'all', 'last:K', or 0-based indices like 0,5,11.")
@click.option("--feature-norm", type=click.Choice(FEATURE_NORMS), default="l2", show_default=True,
              help="Normalize each feature group (CLS, each layer's query outputs; head2toe: each tap) before the head.")
@click.option("--aggregate", type=click.Choice(AGGREGATES), default="concat", show_default=True,
              help="How a layer's T query outputs enter the head: all T*D values, their mean, or a sum with learned "
                   "per-layer weights (wsum_weights [Lq,T], initialized to ones).")
@click.option("--h2t-target", type=int, help=f"head2toe: pooled size of each token tap [default: {H2T_DEFAULT_TARGET}].")
@click.option("--dropout", type=float, default=0.1, show_default=True, help="Dropout on the query tokens during training.")
@click.option("--mean", help="Input normalization mean (one or three numbers). Default: the weights' own, else 0.5.")
@click.option("--std", help="Input normalization std (one or three numbers). Default: the weights' own, else 0.5.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the query-token and head initialization.")
@click.option("--quantize", type=click.Choice(QUANTIZE_MODES), default="none", show_default=True,
              help="int8: frozen.onnx and the head's frozen weight MatMuls dynamically quantized (8-bit weights, "
                   "8-bit activations per call); int4: the same MatMuls with 4-bit weights (MatMulNBits, weight-only). "
                   "The patch embedding stays fp32. Training uses the dequantized weights, so it matches model.onnx; "
                   "the portable step graph holds them quantized (less training memory with --backend portable). "
                   "Measured on vit_fmnist, three tasks (README): no mode's mean accuracy drops by more than 0.5 points "
                   "(largest: int4 on digits, -0.4).")
@arch_size_options
def export(model_name, weights, random_init, num_classes, classes, out, method, last_k, query_tokens, query_layers, feature_norm,
           aggregate, h2t_target, dropout, mean, std, seed, quantize, depth, dim, heads, mlp_dim, patch, image_size) -> None:
    """Split a ViT checkpoint into a bundle the device trains on (needs torch).

    Writes frozen.onnx (pixel_values -> cls, keys, values for VQT; the input of layer L-k for the
    methods that adapt the last k layers; Head2Toe's pooled taps of every layer, one `features`
    tensor, for head2toe), the onnxruntime-training artifacts of the trainable part
    and head under train/, and manifest.json with the sha256 of every file.
    `--model vit_fmnist` without --weights uses the backbone shipped with vqt-edge.
    """
    from vqt_edge import api

    api.export(
        out, model=model_name, weights=weights, random_init=random_init, num_classes=num_classes,
        classes=[c.strip() for c in classes.split(",")] if classes else None, method=method, last_k=last_k,
        query_tokens=query_tokens, query_layers=query_layers, feature_norm=feature_norm, dropout=dropout,
        aggregate=aggregate, h2t_target=h2t_target,
        mean=_floats(mean, "--mean"), std=_floats(std, "--std"), seed=seed,
        sizes=dict(depth=depth, dim=dim, heads=heads, mlp_dim=mlp_dim, patch=patch, image_size=image_size), progress=click.echo,
        quantize=quantize,
    )


@cli.command()
@click.option("--bundle", type=click.Path(path_type=Path), help="Bundle from `vqt-edge export` (not needed with --resume).")
@click.option("--data", type=click.Path(path_type=Path), help="Training images: a folder with one sub-folder per class, or a list file of `path,label` lines.")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="Run folder: checkpoints, metrics, adapter and model.onnx go here.")
@click.option("--val", type=click.Path(path_type=Path), help="Validation images (same layouts as --data).")
@click.option("--val-split", type=float, default=0.0, show_default=True, help="Hold out this fraction of --data for validation (seeded, per class).")
@click.option("--test", type=click.Path(path_type=Path), help="Evaluate on these images at the end and record the accuracy.")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--micro-batch", type=int, help="Run each batch in micro-batches of this size (gradient accumulation, less memory).")
@click.option("--lr", type=float, default=1e-2, show_default=True, help="Peak learning rate (AdamW, warm-up then cosine).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="Decoupled weight decay on query tokens and head weight.")
@click.option("--warmup-epochs", type=float, help="Linear warm-up length [default: 10% of --epochs].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds data order, dropout and --val-split.")
@click.option("--kv", type=click.Choice(KV_MODES),
              help="K/V of the frozen backbone: computed once and kept in RAM, cached on disk (fp16, in the run folder), or recomputed "
              "every step [default: RAM if the cache fits in the available memory (or --memory-budget), else disk].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="Threads for the frozen pass and training [default: all cores].")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Also checkpoint every N steps (0: at the end of every epoch only).")
@click.option("--resume", is_flag=True, help="Continue the run in --run from its last checkpoint, with its saved settings.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]), default="auto", show_default=True,
              help="Training step: portable (any onnxruntime) or ort-training (the onnxruntime-training build); "
              "auto: the faster one (README, 'Backends') where it can run here, else the other.")
@click.option("--memory-budget", help="Peak memory (RSS) the run must stay within, e.g. 600MB: chooses --kv and --micro-batch "
              "(yours are kept if they fit), exits 2 up front if nothing fits and 3 if the measured peak exceeds it.")
@click.option("--keep-fraction", type=float, default=1.0, show_default=True,
              help="After training, keep this fraction of the head's input features (group-lasso selection, paper B.2); 1: off.")
@click.option("--lasso", type=float, default=1e-4, show_default=True, help="Group-lasso penalty of --keep-fraction's selection.")
@functools.partial(kv_dtype_option, auto=True)
@disk_budget_option
def train(bundle, data, run_dir, val, val_split, test, epochs, batch_size, micro_batch, lr, weight_decay, warmup_epochs,
          seed, kv, device, threads, checkpoint_every, resume, backend, memory_budget, keep_fraction, lasso, kv_dtype, disk_budget) -> None:
    """Adapt the bundle's ViT to your images with VQT (torch-free, resumable).

    A killed run continues with --resume and ends exactly where an uninterrupted run would.
    Ctrl-C finishes the current step, writes a checkpoint and exits.
    """
    from device_runner import ort

    ort.block_torch()
    from device_runner.trainer import BudgetExceeded, Interrupted, TrainConfig
    from vqt_edge import api
    from vqt_edge.memory import parse_size_mb
    from vqt_edge.progress import ClickBars

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, seed=seed, kv=kv or "auto", device=device, threads=threads,
                      val_split=val_split, checkpoint_every=checkpoint_every, keep_fraction=keep_fraction, lasso=lasso,
                      backend=backend, kv_dtype=kv_dtype)
    if memory_budget is not None:
        cfg.memory_budget_mb = parse_size_mb(memory_budget)  # an explicit --kv is kept if it fits
    if disk_budget is not None:
        cfg.disk_budget_mb = parse_size_mb(disk_budget)
    try:
        with ClickBars() as bars:  # the library reports progress events; the CLI draws them
            summary = api.train(bundle, data, run_dir, cfg, val=val, test=test, resume=resume, progress=click.echo,
                                on_progress=bars, process_wide=True)
    except Interrupted as e:
        click.echo(f"interrupted: {e}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C before the training loop (data scan, frozen K/V pass)
        click.echo("interrupted before training started; continue with --resume", err=True)
        sys.exit(130)
    except BudgetExceeded as e:
        click.echo(f"ERROR: MEMORY BUDGET EXCEEDED: {e}", err=True)
        sys.exit(3)
    click.echo(f"done in {summary['seconds']:.1f} s, peak memory {summary['peak_rss_mb']:.0f} MiB; "
               f"skipped {summary['skipped_images']} unreadable images; wrote {run_dir}/adapter.safetensors, {run_dir}/model.onnx")


@cli.command("eval")
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A finished run folder.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Labelled images (folder per class, or list file).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (accuracy in [0,1], per class, confusion matrix).")
def eval_cmd(run_dir, data, batch_size, device, as_json) -> None:
    """Accuracy, per-class accuracy and confusion matrix of a trained run."""
    from device_runner import ort

    ort.block_torch()
    from device_runner.evaluate import FinishedRun, evaluate
    from vqt_edge.memory import lean_malloc

    lean_malloc()  # freed batches go back to the OS: ViT-B/16 at batch 32 peaked at 1982 MiB without it (memory.py MODEL_WORK)
    result = evaluate(FinishedRun.open(run_dir, device), data, batch_size)
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


@cli.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True, help="A finished run folder.")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--recursive", "-r", is_flag=True, help="A folder among IMAGE...: its sub-folders' images too.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list: one {path, label, logits} per image.")
def predict(run_dir, images, recursive, batch_size, device, as_json) -> None:
    """Predict the class of each IMAGE with a trained run (streams: memory does not grow with the count).

    A folder stands for the images in it, sorted by name (with --recursive, in its sub-folders too).
    """
    from device_runner import ort

    ort.block_torch()
    from device_runner.data import image_paths
    from device_runner.evaluate import FinishedRun, predict as run_predict
    from vqt_edge.memory import lean_malloc

    lean_malloc()  # as eval

    images = image_paths(images, recursive)
    run = FinishedRun.open(run_dir, device)
    failed = 0
    if as_json:
        click.echo("[", nl=False)
    for i, result in enumerate(run_predict(run, list(images), batch_size)):
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


def _register_extra_commands() -> None:
    """`plan` and `sweep` live in vqt_edge/budget_cli.py (memory budgets and method sweeps), `tune` in
    vqt_edge/tune_cli.py, `fleet` in vqt_edge/fleet/commands.py (federated adaptation, docs/design.md
    section 12)."""
    from vqt_edge.budget_cli import plan, sweep
    from vqt_edge.fleet.commands import fleet
    from vqt_edge.tune_cli import tune

    cli.add_command(plan)
    cli.add_command(sweep)
    cli.add_command(tune)
    cli.add_command(fleet)


_register_extra_commands()


def main() -> None:
    cli(prog_name="vqt-edge")


if __name__ == "__main__":
    main()
