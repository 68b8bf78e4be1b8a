"""`vqt-edge export`: build the backbone, load its weights, write the bundle, report what it wrote."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import click

from exporters import hub
from exporters.export import export_bundle
from exporters.loaders import arch_from_hf_config, detect_format, load_weights
from exporters.vit import VisionTransformer
from vqt_edge.arch import resolve_arch
from vqt_edge.errors import UserError
from vqt_edge.memory import peak_rss_mb
from vqt_edge.spec import AdapterSpec

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "vqt_edge" / "pretrained"


def shipped_weights(model_name: str | None) -> tuple[Path, dict] | None:
    """The checkpoint vqt-edge ships for this preset, with its metadata (mean, std, ...), if any."""
    if model_name is None:
        return None
    meta = PRETRAINED_DIR / f"{model_name}.json"
    ckpt = PRETRAINED_DIR / f"{model_name}.safetensors"
    if not (meta.is_file() and ckpt.is_file()):
        return None
    return ckpt, json.loads(meta.read_text())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run_export(
    *,
    model_name: str | None,
    weights: str | Path | None,
    random_init: bool,
    num_classes: int,
    class_names: list[str] | None,
    out: Path,
    query_tokens: int,
    query_layers: str,
    feature_norm: str,
    dropout: float,
    mean: list[float] | None,
    std: list[float] | None,
    seed: int,
    sizes: dict,
    parse_layers: Callable[[str, int], list[int]],
    method: str = "vqt",
    last_k: int | None = None,
    aggregate: str = "concat",
    h2t_target: int | None = None,
    quantize: str = "none",
    int8_step: bool = True,
    log: Callable[[str], None] = click.echo,
) -> None:
    t0 = time.perf_counter()
    meta: dict = {}
    origin = None
    if isinstance(weights, str) and hub.repo_of(weights) is not None:  # hf-hub:ORG/NAME or a timm name
        found = hub.resolve(weights)
        weights, origin = found.path, found.source
        meta = {k: v for k, v in (("mean", found.mean), ("std", found.std)) if v is not None}
        if model_name is None and found.model is not None and not any(sizes.values()):
            model_name = found.model
        log(f"{origin}: {weights}")
    elif weights is not None:
        weights = Path(weights)
        origin = str(weights)
    if weights is None and not random_init:
        shipped = shipped_weights(model_name)
        if shipped is None:
            raise UserError(
                "give --weights CKPT, or --random-init for random weights"
                + (f" (vqt-edge ships no weights for {model_name})" if model_name else "")
            )
        weights, meta = shipped
        origin = str(weights)
        log(f"using the {model_name} backbone shipped with vqt-edge ({weights.name})")
    if model_name is None and weights is not None and detect_format(weights) == "hf" and not any(sizes.values()):
        arch = arch_from_hf_config(json.loads((weights / "config.json").read_text()))
        model_name = "hf"
    else:
        if model_name is None and not all(sizes.values()):
            raise UserError("give --model, or all of --depth --dim --heads --mlp-dim --patch --image-size")
        arch = resolve_arch(model_name, **sizes)
    spec = AdapterSpec.create(
        arch,
        method,
        num_classes,
        query_layers=None if query_layers == "all" else parse_layers(query_layers, arch.depth),
        last_k=last_k,
        h2t_target=h2t_target,
        query_tokens=query_tokens,
        aggregate=aggregate,
        feature_norm=feature_norm,
        dropout=dropout,
    )
    log(
        f"model {model_name or 'custom'}: depth {arch.depth}, dim {arch.dim}, heads {arch.heads}, "
        f"mlp {arch.mlp_dim}, patch {arch.patch}, image {arch.image_size}"
    )
    log(
        f"method {method}"
        + (f", last {spec.last_k} of {arch.depth} layers adapted" if spec.last_k else "")
        + (f", {aggregate} of each layer's query outputs" if aggregate != "concat" else "")
    )
    backbone = VisionTransformer(arch)
    if weights is not None:
        report = load_weights(backbone, weights)
        log(f"loaded {report.loaded} tensors from {weights} ({report.format})")
        if report.unused:
            log(f"not part of the backbone, not used: {', '.join(report.unused)}")
        source = {"source": origin, "format": report.format}
    else:
        backbone.reset_parameters(seed)
        source = {"source": "random-init", "seed": seed}
    mean = mean or meta.get("mean") or [0.5] * arch.channels
    std = std or meta.get("std") or [0.5] * arch.channels
    manifest = export_bundle(
        backbone,
        out,
        spec,
        model_name=model_name or "custom",
        mean=mean,
        std=std,
        class_names=class_names,
        weights=source,
        seed=seed,
        quantize=quantize,
        int8_step=int8_step,
        log=log,
    )
    log(f"backbone parameters: {sum(p.numel() for p in backbone.parameters()):,}")
    log("files:")
    for name in sorted(manifest.files) + ["manifest.json"]:
        log(f"  {out / name}  {_human((out / name).stat().st_size)}")
    log(f"export took {time.perf_counter() - t0:.1f} s, peak memory {peak_rss_mb():.0f} MiB")
