"""Load pre-trained ViT weights from the files people actually have into `VisionTransformer`.

Four formats (docs/design.md section 8), recognized by content, never by file name, since downloaded
checkpoints are often renamed (`pytorch_model.bin`, `ViT-B_16.npz`, `checkpoint.pth`, ...):

- "npz": the official Google ViT release (google-research/vision_transformer, used by VPT/VQT);
- "pth": timm / MAE / DeiT torch checkpoints, read with `torch.load(weights_only=True)`;
- "safetensors": one safetensors file (timm names, or HF names when it comes out of an HF folder);
- "hf": a Hugging Face ViT folder (config.json + model.safetensors).

Everything is renamed to timm's names (those of `VisionTransformer`) and checked strictly against
the model: a checkpoint loads only if it defines every backbone tensor with the right shape, since a
silently half-initialized backbone gives plausible but wrong features. Whatever a user can get wrong
(damaged file, wrong model size, unsafe pickle) is a `UserError` with a message, not a traceback.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from exporters.vit import VisionTransformer
from vqt_edge.arch import ViTArch
from vqt_edge.errors import UserError

FORMATS = ("npz", "pth", "safetensors", "hf")
_ACCEPTED = (
    "accepted: a Google ViT .npz, a timm/MAE torch checkpoint, a safetensors file, "
    "or a Hugging Face ViT folder (config.json + model.safetensors)"
)
# Tensors that checkpoints carry besides the backbone (classifier heads, MAE decoder, HF pooler):
# not an error, since the backbone is all VQT uses, but reported so that the user sees them.
_NOT_BACKBONE = re.compile(
    r"^(vit\.)?(head[./]|pre_logits|fc_norm\.|decoder|mask_token|embeddings\.mask_token|classifier\.|pooler\.)"
)


@dataclass
class LoadReport:
    """What `load_weights` did: the format found, how many tensors it copied, what it ignored."""

    format: str
    loaded: int
    unused: list[str] = field(default_factory=list)


def detect_format(path: Path) -> str:
    """ "npz", "pth", "safetensors" or "hf", from the file's content (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return "hf"
        raise UserError(f"{path}: a folder must hold config.json and model.safetensors (HF ViT); {_ACCEPTED}")
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    # safetensors: u64 little-endian header length, then a JSON object that fits in the file.
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if _is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception as e:  # BadZipFile, OSError, UnicodeDecodeError (member names), ...
            raise UserError(f"{path}: damaged zip archive ({type(e).__name__}: {e})") from None
        if any(n.split("/")[-1] == "data.pkl" and "/" in n for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    elif head[:1] == b"\x80":  # a legacy (pre-1.6, not zipped) torch file is a bare pickle
        return "pth"
    raise UserError(f"{path}: not a checkpoint in a recognized format (or damaged/truncated); {_ACCEPTED}")


def _is_zipfile(path: Path) -> bool:
    """zipfile.is_zipfile, except that a damaged end record (it raises BadZipFile for some) is
    "no" here: the caller then reports an unrecognized or damaged file."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001
        return False


def _torch_to_numpy(tensors: dict, path: Path) -> dict[str, np.ndarray]:
    """numpy copies; bfloat16 and other dtypes numpy lacks become float32 (exact for bf16/fp8)."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor; expected a state dict")
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()
        out[name] = t.detach().cpu().numpy()
    return out


def _read_pth(path: Path) -> dict[str, np.ndarray]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the callable a pickle tries to import; anything else
        # it rejects (unknown opcodes, ...) is a damaged file rather than code.
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if culprit is None:
            raise UserError(f"{path}: damaged torch checkpoint (the weights-only unpickler rejected it)") from None
        raise UserError(
            f"{path}: refused: the file contains executable pickle content ({culprit.group(1)}), not only "
            "tensors, and is not loaded for safety; re-save its state dict (or as safetensors)"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise UserError(f"{path}: cannot read the torch checkpoint ({type(e).__name__}: {e})") from None
    for wrapper in ("model", "state_dict", "model_state"):  # MAE/DeiT, Lightning/timm, others
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return _torch_to_numpy({k.removeprefix("module."): v for k, v in obj.items()}, path)  # DDP prefix


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    name = None
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                out[name] = npz[name]
        return out
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array: it would need pickle, i.e. code, to load
            raise UserError(f"{path}: array {name!r} is an object array and cannot be loaded without pickle") from None
        raise UserError(f"{path}: cannot read the .npz archive ({e})") from None
    except Exception as e:  # BadZipFile, truncated members, bad .npy headers, ...
        raise UserError(f"{path}: cannot read the .npz archive ({type(e).__name__}: {e})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:  # torch's side of the library, because numpy has no bfloat16 (common in HF checkpoints)
        return _torch_to_numpy(safetensors.torch.load_file(path), path)
    except UserError:
        raise
    except Exception as e:  # SafetensorError for truncated or inconsistent files
        raise UserError(f"{path}: cannot read the safetensors file ({type(e).__name__}: {e})") from None


def read_state_dict(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """The file's tensors under its own names, and the HF config when it is an HF folder."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "npz":
        return _read_npz(path), None
    if fmt == "pth":
        return _read_pth(path), None
    if fmt == "safetensors":
        return _read_safetensors(path), None
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'config.json'}: cannot read the HF config ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: not a JSON object")
    return _read_safetensors(path / "model.safetensors"), config


@dataclass(frozen=True)
class _Rule:
    """One timm tensor made from `src` tensors of another naming, and back (for the writers)."""

    timm: str
    src: tuple[str, ...]
    to_timm: Callable[..., np.ndarray] = lambda a: a
    from_timm: Callable[[np.ndarray], tuple[np.ndarray, ...]] = lambda w: (w,)


def _linear_t(timm: str, src: str) -> _Rule:  # Flax Dense kernels are [in, out], torch's [out, in]
    return _Rule(timm, (src,), lambda k: k.T, lambda w: (w.T,))


def _heads(kernel: np.ndarray, heads: int) -> np.ndarray:
    """Google kernels carry the head count, which the flat timm layout cannot show: check it here."""
    if kernel.ndim == 3 and kernel.shape[1] != heads:
        raise ValueError(f"{kernel.shape[1]} heads, the model has {heads}")
    return kernel


def _google_rules(arch: ViTArch) -> list[_Rule]:
    d, h = arch.dim, arch.heads
    rules = [
        _Rule("cls_token", ("cls",)),
        _Rule("pos_embed", ("Transformer/posembed_input/pos_embedding",)),
        _Rule(
            "patch_embed.proj.weight",
            ("embedding/kernel",),  # HWIO -> OIHW
            lambda k: k.transpose(3, 2, 0, 1),
            lambda w: (w.transpose(2, 3, 1, 0),),
        ),
        _Rule("patch_embed.proj.bias", ("embedding/bias",)),
        _Rule("norm.weight", ("Transformer/encoder_norm/scale",)),
        _Rule("norm.bias", ("Transformer/encoder_norm/bias",)),
    ]
    for i in range(arch.depth):
        g, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        att = g + "MultiHeadDotProductAttention_1/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            rules += [_Rule(f"{t}{norm}.weight", (f"{g}{ln}/scale",)), _Rule(f"{t}{norm}.bias", (f"{g}{ln}/bias",))]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            rules += [
                _linear_t(f"{t}mlp.{fc}.weight", f"{g}MlpBlock_3/{dense}/kernel"),
                _Rule(f"{t}mlp.{fc}.bias", (f"{g}MlpBlock_3/{dense}/bias",)),
            ]
        qkv = ("query", "key", "value")
        rules += [
            # kernels [D, H, dh] -> [D, D] -> transposed, stacked as rows [q; k; v]; biases [H, dh]
            _Rule(
                f"{t}attn.qkv.weight",
                tuple(f"{att}{n}/kernel" for n in qkv),
                lambda *ks: np.concatenate([_heads(k, h).reshape(k.shape[0], -1).T for k in ks]),
                lambda w: tuple(p.T.reshape(d, h, -1) for p in np.split(w, 3)),
            ),
            _Rule(
                f"{t}attn.qkv.bias",
                tuple(f"{att}{n}/bias" for n in qkv),
                lambda *bs: np.concatenate([b.reshape(-1) for b in bs]),
                lambda b: tuple(p.reshape(h, -1) for p in np.split(b, 3)),
            ),
            _Rule(
                f"{t}attn.proj.weight",
                (f"{att}out/kernel",),  # [H, dh, D] -> [D, D] -> transposed
                lambda k: k.reshape(-1, k.shape[-1]).T,
                lambda w: (w.T.reshape(h, -1, d),),
            ),
            _Rule(f"{t}attn.proj.bias", (f"{att}out/bias",)),
        ]
    return rules


def _hf_rules(arch: ViTArch, prefix: str = "") -> list[_Rule]:
    renames = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "norm": "layernorm",
    }
    for i in range(arch.depth):
        hf = f"encoder.layer.{i}."
        renames |= {
            f"blocks.{i}.norm1": hf + "layernorm_before",
            f"blocks.{i}.norm2": hf + "layernorm_after",
            f"blocks.{i}.attn.proj": hf + "attention.output.dense",
            f"blocks.{i}.mlp.fc1": hf + "intermediate.dense",
            f"blocks.{i}.mlp.fc2": hf + "output.dense",
        }
    rules = []
    for timm, hf in renames.items():
        suffixes = ("",) if timm in ("cls_token", "pos_embed") else (".weight", ".bias")
        rules += [_Rule(timm + s, (prefix + hf + s,)) for s in suffixes]
    for i in range(arch.depth):
        for s in (".weight", ".bias"):
            src = tuple(f"{prefix}encoder.layer.{i}.attention.attention.{n}{s}" for n in ("query", "key", "value"))
            rules.append(
                _Rule(f"blocks.{i}.attn.qkv{s}", src, lambda *ws: np.concatenate(ws), lambda w: tuple(np.split(w, 3)))
            )
    return rules


def _rules(tensors: dict, fmt: str, arch: ViTArch) -> list[_Rule]:
    """The naming is the format's, except that a bare safetensors/pth file may hold HF names."""
    hf_prefix = next((p for p in ("vit.", "") if p + "embeddings.cls_token" in tensors), None)
    if fmt == "npz":
        return _google_rules(arch)
    if fmt == "hf" or hf_prefix is not None:
        return _hf_rules(arch, hf_prefix or "")
    return []  # timm / MAE: already timm names


def to_timm(
    tensors: dict[str, np.ndarray], fmt: str, arch: ViTArch, hf_config: dict | None = None
) -> dict[str, np.ndarray]:
    """Rename/reshape to timm names; tensors no rule uses are passed on under their own names.

    `hf_config` is accepted for symmetry with `read_state_dict`; the layout only depends on `arch`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
    rest = dict(tensors)
    out = {}
    for rule in _rules(tensors, fmt, arch):
        if all(s in rest for s in rule.src):  # incomplete groups stay behind and are reported
            try:
                out[rule.timm] = rule.to_timm(*(rest[s] for s in rule.src))
            except (ValueError, IndexError, TypeError) as e:  # q/k/v of different sizes, a 0-d kernel, ...
                raise UserError(f"cannot convert {', '.join(rule.src)} to {rule.timm}: {e}") from None
            for s in rule.src:
                del rest[s]
    return out | rest


def arch_from_hf_config(config: dict) -> ViTArch:
    """The ViTArch of an HF `ViTConfig` (config.json); only exact-GELU ViTs match our backbone."""
    keys = {
        "depth": "num_hidden_layers",
        "dim": "hidden_size",
        "heads": "num_attention_heads",
        "mlp_dim": "intermediate_size",
        "patch": "patch_size",
        "image_size": "image_size",
    }
    missing = [hf for hf in keys.values() if hf not in config]
    if missing:
        raise UserError(f"HF config.json lacks {', '.join(missing)}")
    act = config.get("hidden_act", "gelu")
    if act != "gelu":  # HF's "gelu" is the exact erf GELU that the backbone computes
        raise UserError(f"HF config hidden_act is {act!r}; only 'gelu' (exact) matches this ViT")
    try:
        return ViTArch.from_dict(
            {ours: config[hf] for ours, hf in keys.items()}
            | {"channels": config.get("num_channels", 3), "eps": config.get("layer_norm_eps", 1e-12)}
        )
    except OverflowError as e:  # int(1e999): JSON reads huge numbers as inf
        raise UserError(f"HF config.json has a size out of range ({e})") from None


def load_weights(model: VisionTransformer, path: Path) -> LoadReport:
    """Load a checkpoint into `model` after checking names and shapes strictly (module docstring)."""
    path = Path(path)
    fmt = detect_format(path)
    tensors, config = read_state_dict(path)
    arch = model.arch
    if config is not None:  # the head count is invisible in HF shapes; eps (HF: 1e-12) is not worth failing on
        found = arch_from_hf_config(config).to_dict()
        diff = [f"{k} {v} (model {getattr(arch, k)})" for k, v in found.items() if k != "eps" and getattr(arch, k) != v]
        if diff:
            raise UserError(f"{path}: config.json describes a different ViT: {', '.join(diff)}")
    converted = to_timm(tensors, fmt, arch, config)
    expected = model.state_dict()
    origin = {r.timm: f"{r.timm} (from {', '.join(r.src)})" for r in _rules(tensors, fmt, arch)}
    # Shapes first: a checkpoint of another model size is the likeliest mistake, and its first
    # mismatching tensor says more than the long lists of missing or extra layers would.
    for name, want in expected.items():
        got = converted.get(name)
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise UserError(
                f"{path}: tensor {origin.get(name, name)} has shape {list(got.shape)}, "
                f"the model expects {list(want.shape)}"
            )
        if got is not None and not np.issubdtype(got.dtype, np.floating):
            raise UserError(f"{path}: tensor {origin.get(name, name)} has dtype {got.dtype}; weights must be float")
    missing = [origin.get(n, n) for n in expected if n not in converted]
    if missing:
        raise UserError(f"{path}: missing backbone tensors: {', '.join(missing)}")
    unknown = [n for n in converted if n not in expected and not _NOT_BACKBONE.match(n)]
    if unknown:
        raise UserError(f"{path}: unexpected tensors (not part of this ViT): {', '.join(unknown)}")
    state = {n: torch.from_numpy(np.array(converted[n], dtype=np.float32)) for n in expected}
    model.load_state_dict(state, strict=True)
    return LoadReport(fmt, len(state), sorted(n for n in converted if n not in expected))


def _from_timm(model: VisionTransformer, rules: list[_Rule]) -> dict[str, np.ndarray]:
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    out = {}
    for rule in rules:
        out |= {s: np.ascontiguousarray(a) for s, a in zip(rule.src, rule.from_timm(state[rule.timm]))}
    return out


def save_npz_google(model: VisionTransformer, path: Path) -> None:
    """Write the backbone as a Google ViT .npz (exactly `path`: numpy would otherwise add .npz)."""
    with open(path, "wb") as f:
        np.savez(f, **_from_timm(model, _google_rules(model.arch)))


def save_hf_folder(model: VisionTransformer, path: Path) -> None:
    """Write the backbone as an HF `ViTModel` folder: config.json + model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    a = model.arch
    config = {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": a.dim,
        "num_hidden_layers": a.depth,
        "num_attention_heads": a.heads,
        "intermediate_size": a.mlp_dim,
        "hidden_act": "gelu",
        "patch_size": a.patch,
        "image_size": a.image_size,
        "num_channels": a.channels,
        "layer_norm_eps": a.eps,
        "qkv_bias": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = _from_timm(model, _hf_rules(a))
    safetensors.numpy.save_file(
        tensors, path / "model.safetensors", metadata={"format": "pt"}
    )  # as transformers writes
