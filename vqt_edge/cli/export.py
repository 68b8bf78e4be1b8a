"""`vqt-edge export`: a checkpoint -> a bundle the device trains on (the workstation side, needs torch)."""

from __future__ import annotations

from pathlib import Path

import click

from vqt_edge.cli.options import arch_size_options, parse_list
from vqt_edge.head2toe import DEFAULT_TARGET as H2T_DEFAULT_TARGET
from vqt_edge.manifest import QUANTIZE_MODES
from vqt_edge.spec import AGGREGATES, FEATURE_NORMS, METHODS


@click.command()
@click.option(
    "--model",
    "model_name",
    help="Preset: vit_ti16, vit_s16, vit_b16, vit_l16, vit_fmnist. Omit to give every size below.",
)
@click.option(
    "--weights",
    metavar="CKPT|hf-hub:ORG/NAME",
    help="Checkpoint: Google .npz, timm/MAE .pth or .safetensors, or a Hugging Face ViT folder (detected by content); "
    "or a named one: hf-hub:ORG/NAME[@REV], or a timm model name (vit_base_patch16_224.augreg_in21k = "
    "hf-hub:timm/...), from the Hugging Face cache (downloaded there when online).",
)
@click.option(
    "--random-init", is_flag=True, help="No checkpoint: random weights (tests, memory and speed measurements)."
)
@click.option("--num-classes", type=int, help="Classes of the task the device will learn.")
@click.option("--classes", help="Comma-separated class names (optional; sets --num-classes).")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write (must not exist or be empty)."
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="vqt",
    show_default=True,
    help="What the device trains: VQT, or a baseline (linear probe, VPT-Deep, AdaptFormer, partial fine-tuning, "
    "Head2Toe) or VQT on top of one (docs/design.md section 5).",
)
@click.option(
    "--last-k", type=int, help="Layers adapted by vpt, adaptformer, finetune and vqt+*: the last K [default: all]."
)
@click.option(
    "--query-tokens",
    type=int,
    default=1,
    show_default=True,
    help="T: query tokens per layer (VPT: prompt tokens per layer).",
)
@click.option(
    "--query-layers", default="all", show_default=True, help="'all', 'last:K', or 0-based indices like 0,5,11."
)
@click.option(
    "--feature-norm",
    type=click.Choice(FEATURE_NORMS),
    default="l2",
    show_default=True,
    help="Normalize each feature group (CLS, each layer's query outputs; head2toe: each tap) before the head.",
)
@click.option(
    "--aggregate",
    type=click.Choice(AGGREGATES),
    default="concat",
    show_default=True,
    help="How a layer's T query outputs enter the head: all T*D values, their mean, or a sum with learned "
    "per-layer weights (wsum_weights [Lq,T], initialized to ones).",
)
@click.option(
    "--h2t-target", type=int, help=f"head2toe: pooled size of each token tap [default: {H2T_DEFAULT_TARGET}]."
)
@click.option(
    "--dropout", type=float, default=0.1, show_default=True, help="Dropout on the query tokens during training."
)
@click.option("--mean", help="Input normalization mean (one or three numbers). Default: the weights' own, else 0.5.")
@click.option("--std", help="Input normalization std (one or three numbers). Default: the weights' own, else 0.5.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the query-token and head initialization."
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZE_MODES),
    default="none",
    show_default=True,
    help="int8: frozen.onnx and the head's frozen weight MatMuls dynamically quantized (8-bit weights, "
    "8-bit activations per call); int4: the same MatMuls with 4-bit weights (MatMulNBits, weight-only). "
    "The patch embedding stays fp32. Training uses the dequantized weights, so it matches model.onnx; "
    "the portable step graph holds them quantized (less training memory with --backend portable). "
    "Measured on vit_fmnist, three tasks (docs/quantization.md): no mode's mean accuracy drops by more than 0.5 points "
    "(largest: int4 on digits, -0.4).",
)
@click.option(
    "--int8-step/--no-int8-step",
    default=True,
    show_default=True,
    help="vqt: also write train/step_int8.onnx, the training step fed the int8 K/V cache (the default cache) "
    "as it is, one head widened at a time: on vit_b16 a 0.7x step and 310 MiB less training memory than the "
    "fp32 feed, for 286 MB more bundle. --no-int8-step: the runner dequantizes int8 caches into the fp32 feed.",
)
@arch_size_options
def export(
    model_name,
    weights,
    random_init,
    num_classes,
    classes,
    out,
    method,
    last_k,
    query_tokens,
    query_layers,
    feature_norm,
    aggregate,
    h2t_target,
    dropout,
    mean,
    std,
    seed,
    quantize,
    int8_step,
    depth,
    dim,
    heads,
    mlp_dim,
    patch,
    image_size,
) -> None:
    """Split a ViT checkpoint into a bundle the device trains on (needs torch).

    Writes frozen.onnx (pixel_values -> cls, keys, values for VQT; the input of layer L-k for the
    methods that adapt the last k layers; Head2Toe's pooled taps of every layer, one `features`
    tensor, for head2toe), the onnxruntime-training artifacts of the trainable part
    and head under train/, and manifest.json with the sha256 of every file.
    `--model vit_fmnist` without --weights uses the backbone shipped with vqt-edge.
    """
    from vqt_edge import api

    api.export(
        out,
        model=model_name,
        weights=weights,
        random_init=random_init,
        num_classes=num_classes,
        classes=parse_list(classes, str, "--classes"),
        method=method,
        last_k=last_k,
        query_tokens=query_tokens,
        query_layers=query_layers,
        feature_norm=feature_norm,
        dropout=dropout,
        aggregate=aggregate,
        h2t_target=h2t_target,
        mean=parse_list(mean, float, "--mean", n=3),
        std=parse_list(std, float, "--std", n=3),
        seed=seed,
        sizes=dict(depth=depth, dim=dim, heads=heads, mlp_dim=mlp_dim, patch=patch, image_size=image_size),
        progress=click.echo,
        quantize=quantize,
        int8_step=int8_step,
    )
