"""The Python API: export, train, evaluate, predict and load an adapter from a script or notebook.

The CLI (`vqt_edge/cli/__init__.py`) is a thin layer of option parsing over these functions. Like the CLI,
this module is a front end: it is the one place besides the CLI that reaches into `exporters/`
(torch, for export only) and `device_runner/` (onnxruntime). Heavy imports happen inside the
functions, so `import vqt_edge.api` costs nothing.

Nothing here changes the calling process unless asked: progress goes to a callback (default: the
`vqt_edge` logger at INFO), torch stays importable after training (onnxruntime is imported with
torch hidden only for the duration of the import, docs/design.md section 7), and signal handlers
and lean malloc are set only with `train(..., process_wide=True)`, which the CLI passes.

    from vqt_edge import api
    api.export("bundle/", model="vit_fmnist", num_classes=5)
    summary = api.train("bundle/", "images/", "run1/", api.TrainConfig(epochs=10), test="test_images/")
    model = api.load_adapter("run1/")
    model.predict(["photo.jpg"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError

if TYPE_CHECKING:  # the real imports happen in the functions
    from device_runner.adapter import AdapterModel
    from vqt_edge.manifest import Manifest
    from vqt_edge.progress import OnProgress

__all__ = ["TrainConfig", "export", "train", "evaluate", "predict", "predictions", "load_adapter", "package"]

log = logging.getLogger("vqt_edge")
Progress = Callable[[str], None]
PathLike = str | os.PathLike[str]


def parse_query_layers(text: str, depth: int) -> list[int]:
    """'all', 'last:K' or a comma-separated list of 0-based layer indices (negative from the end)."""
    if text == "all":
        return list(range(depth))
    if text.startswith("last:"):
        k = int(text[5:]) if text[5:].isdigit() else 0
        if not 1 <= k <= depth:
            raise UserError(f"--query-layers {text}: K must be in [1, {depth}]")
        return list(range(depth - k, depth))
    try:
        layers = [int(x) % depth if -depth <= int(x) < depth else int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--query-layers: expected 'all', 'last:K' or indices like 0,5,11; got {text!r}") from None
    return sorted(layers)  # range and duplicates: checked once, by the adapter spec (vqt_edge/spec.py)


def export(
    out: PathLike,
    *,
    model: str | None = None,
    weights: PathLike | None = None,
    random_init: bool = False,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    method: str = "vqt",
    last_k: int | None = None,
    query_tokens: int = 1,
    query_layers: str | Sequence[int] = "all",
    feature_norm: str = "l2",
    dropout: float = 0.1,
    aggregate: str = "concat",
    h2t_target: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    sizes: dict[str, int | None] | None = None,
    progress: Progress | None = None,
    quantize: str = "none",
    int8_step: bool = True,
) -> Manifest:
    """Write a bundle to `out` (needs torch); the options are `vqt-edge export`'s. Returns its manifest.

    `weights`: a checkpoint file or folder, `hf-hub:ORG/NAME[@REVISION]`, or a timm model name such as
    `vit_base_patch16_224.augreg2_in21k_ft_in1k` (= hf-hub:timm/NAME): exporters/hub.py.
    `sizes` (depth, dim, heads, mlp_dim, patch, image_size) overrides a preset or defines a model.
    `query_layers`: 'all', 'last:K', '0,5,11' or a list of indices.
    """
    from exporters.command import run_export  # torch is imported only here
    from vqt_edge import manifest as mf

    out = Path(out)
    class_names = list(classes) if classes else None
    if class_names is not None:
        if num_classes is not None and num_classes != len(class_names):
            raise UserError(f"--num-classes {num_classes} but --classes names {len(class_names)}")
        num_classes = len(class_names)
    if num_classes is None:
        raise UserError("give --num-classes (or --classes)")
    if weights is not None and random_init:
        raise UserError("give either --weights or --random-init, not both")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose another --out")
    layers = query_layers if isinstance(query_layers, str) else ",".join(map(str, query_layers))
    root = logging.getLogger()
    level = root.level  # exporters/export.py lowers the root logger to WARNING (generate_artifacts is chatty)
    try:
        run_export(
            model_name=model,
            weights=weights if weights is None or isinstance(weights, str) else Path(weights),
            random_init=random_init,
            num_classes=num_classes,
            class_names=class_names,
            out=out,
            method=method,
            last_k=last_k,
            query_tokens=query_tokens,
            query_layers=layers,
            feature_norm=feature_norm,
            dropout=dropout,
            aggregate=aggregate,
            h2t_target=h2t_target,
            mean=list(mean) if mean is not None else None,
            std=list(std) if std is not None else None,
            seed=seed,
            sizes={k: (sizes or {}).get(k) for k in ("depth", "dim", "heads", "mlp_dim", "patch", "image_size")},
            parse_layers=parse_query_layers,
            log=progress or log.info,
            quantize=quantize,
            int8_step=int8_step,
        )
    finally:
        root.setLevel(level)
    return mf.read_manifest(out, verify=False)


def train(
    bundle: PathLike | None,
    data: PathLike | None,
    run: PathLike,
    config: TrainConfig | None = None,
    *,
    val: PathLike | None = None,
    test: PathLike | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    on_progress: OnProgress | None = None,
    process_wide: bool = False,
) -> dict:
    """Train (or with `resume`, continue) a run to its end and return its summary (summary.json).

    `progress` receives the run's messages (default: the `vqt_edge` logger at INFO); `on_progress`
    receives vqt_edge.progress.Progress events (task, done, total, info) during the frozen pass and
    every epoch (default: DEBUG records of the same logger). Nothing is drawn on the terminal.

    `config` holds `vqt-edge train`'s options (TrainConfig; its default kv="auto" lets the planner
    choose where K/V live, against memory_budget_mb or else the memory available); it is not changed
    (the plan goes into the summary). With `test`, the test set is evaluated in this process at the end and its
    accuracy recorded in the summary, as the CLI's --test does. Raises UserError on bad input,
    trainer.Interrupted when stopped by a signal (`process_wide` only), trainer.BudgetExceeded when
    the measured peak broke the memory budget (the summary is written first).
    `process_wide`: set lean malloc for the process (the memory model assumes it: pass it with a
    memory budget) and turn SIGINT/SIGTERM into checkpoint-and-stop during this call.
    """
    from device_runner.evaluate import FinishedRun
    from device_runner.evaluate import evaluate as run_evaluate
    from device_runner.trainer import enforce_budget
    from device_runner.trainer import train as run_training
    from vqt_edge.run_folder import RunFolder

    cfg = config if config is not None else TrainConfig()
    run = Path(run)
    if not resume and (bundle is None or data is None):
        raise UserError("give --bundle and --data (or --resume to continue a run)")
    echo = progress or log.info
    summary = run_training(
        Path(bundle) if bundle is not None else None,
        run,
        cfg,
        Path(data) if data is not None else None,
        Path(val) if val is not None else None,
        resume,
        echo=echo,
        with_test=test is not None,
        process_wide=process_wide,
        progress=on_progress,
    )
    if test is not None:
        # at the frozen-pass batch: what the memory plan counted (vqt_edge/memory.py), as fast per image as larger ones
        result = run_evaluate(FinishedRun.open(run, cfg.device), Path(test), summary["memory_plan"]["frozen_batch"])
        summary = RunFolder(run).update_summary({"test_accuracy": result["accuracy"], "test_images": result["images"]})
        echo(f"test accuracy {result['accuracy']:.4f} on {result['images']} images")
        enforce_budget(run, summary)  # the test pass ran in this process too
    return summary


def evaluate(run: PathLike, data: PathLike, batch_size: int = 32, device: str = "cpu") -> dict:
    """Accuracy (in [0,1]), per-class accuracy and confusion matrix of a finished run on labelled images."""
    from device_runner.evaluate import FinishedRun
    from device_runner.evaluate import evaluate as run_evaluate

    return run_evaluate(FinishedRun.open(Path(run), device), Path(data), batch_size)


def predict(
    run: PathLike | None,
    images: Sequence[PathLike],
    batch_size: int = 32,
    device: str = "cpu",
    *,
    model: PathLike | None = None,
) -> list[dict]:
    """One {path, label, logits} per image through the run's model.onnx (or, with `model` instead of a
    run, a model.onnx alone: it carries its classes and preprocessing); an unreadable image gives
    {path, error} instead (the CLI prints those as warnings and exits 2)."""
    return list(predictions(run, images, batch_size, device, model=model))


def predictions(
    run: PathLike | None,
    images: Sequence[PathLike],
    batch_size: int = 32,
    device: str = "cpu",
    *,
    model: PathLike | None = None,
) -> Iterator[dict]:
    """`predict`, one result at a time as batches finish: memory does not grow with the number of images."""
    from device_runner.evaluate import FinishedRun
    from device_runner.evaluate import predict as run_predict
    from device_runner.model_file import open_model

    if (run is None) == (model is None):
        raise UserError("give one of --run RUN or --model model.onnx")
    opened = open_model(Path(model), device) if model is not None else FinishedRun.open(Path(run), device)  # type: ignore[arg-type]
    return run_predict(opened, [Path(p) for p in images], batch_size)


def package(run: PathLike, format: str, out: PathLike) -> list[Path]:
    """Write a finished run's model for apps into the new folder `out`: "hf" (a folder optimum and
    transformers load) or "onnx" (model.onnx alone, self-describing); returns the files written."""
    from device_runner.package import package as write_package

    return write_package(Path(run), format, Path(out))


def load_adapter(
    run_or_dir: PathLike, bundle: PathLike | None = None, device: str = "cpu", threads: int | None = None
) -> AdapterModel:
    """The adapter in `run_or_dir` (a run folder, or adapter.safetensors + adapter_config.json)
    applied to `bundle`'s frozen graph (default: the bundle its run.json names). Its `predict`
    (paths or PIL images) and `logits` (pixels) give the run's model.onnx outputs."""
    from device_runner.adapter import AdapterModel

    return AdapterModel.open(Path(run_or_dir), Path(bundle) if bundle is not None else None, device, threads)
