"""Named checkpoints, the way timm and peft users type them: `--weights hf-hub:ORG/NAME`.

Resolved with huggingface_hub (docs/design.md section 8): on a connected workstation it downloads
into the Hugging Face cache; offline (HF_HUB_OFFLINE=1, or no network) it uses that cache and
nothing else. The files it returns are read by exporters/loaders.py like any local checkpoint.

Accepted names:
- `hf-hub:ORG/NAME[@REVISION]`: any Hugging Face repository holding a ViT, either a timm one
  (config.json with `architecture` and `pretrained_cfg`, weights in model.safetensors under timm
  names) or a transformers one (config.json with model_type "vit" + model.safetensors);
- a timm model name with its pretrained tag, e.g. `vit_base_patch16_224.augreg2_in21k_ft_in1k`:
  timm publishes each under the repository `timm/NAME`, so it means `hf-hub:timm/NAME`.
A path that exists always wins over a name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from vqt_edge.errors import UserError

PREFIX = "hf-hub:"
#: timm's ViT names: architecture, then optionally `.pretrained_tag` (lower case, digits, underscores).
_TIMM_NAME = re.compile(r"^vit_[a-z0-9_]+(\.[a-z0-9_]+)?$")
#: timm architectures whose sizes are a preset of vqt_edge/arch.py (so `--model` may be left out).
TIMM_PRESETS = {
    "vit_tiny_patch16_224": "vit_ti16",
    "vit_small_patch16_224": "vit_s16",
    "vit_base_patch16_224": "vit_b16",
    "vit_large_patch16_224": "vit_l16",
}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm repositories hold one of these
#: A missing `vit_b16.npz` is a mistyped file, not the timm tag "npz": these suffixes are never tags.
_FILE_SUFFIXES = {".npz", ".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar"}


@dataclass(frozen=True)
class HubCheckpoint:
    """A checkpoint found through the hub: where it lies in the cache and what it is."""

    path: Path  # a weights file (timm) or a folder with config.json + model.safetensors (transformers)
    source: str  # hf-hub:ORG/NAME@COMMIT, recorded in the bundle's manifest
    model: str | None = None  # the preset the timm architecture names, if any
    mean: list[float] | None = None  # the weights' own input normalization (timm's pretrained_cfg)
    std: list[float] | None = None


def repo_of(weights: str) -> tuple[str, str | None] | None:
    """(repository, revision) that `weights` names, or None when it names no hub checkpoint."""
    if weights.startswith(PREFIX):
        repo, _, revision = weights[len(PREFIX) :].partition("@")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise UserError(f"--weights {weights}: expected hf-hub:ORG/NAME[@REVISION]")
        return repo, revision or None
    if _TIMM_NAME.match(weights) and Path(weights).suffix not in _FILE_SUFFIXES and not Path(weights).exists():
        return f"timm/{weights}", None
    return None


def resolve(weights: str) -> HubCheckpoint:
    """Download (or find in the cache) the files of the checkpoint `weights` names."""
    named = repo_of(weights)
    if named is None:
        raise UserError(f"--weights {weights}: not a hub name (hf-hub:ORG/NAME or a timm model name)")
    repo, revision = named
    config_path = _download(weights, repo, "config.json", revision)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{weights}: its config.json is not readable JSON ({e})") from None
    commit = config_path.parent.name  # the cache keeps files under snapshots/COMMIT/
    source = f"{PREFIX}{repo}@{commit}"
    if isinstance(config, dict) and "architecture" in config:  # timm
        cfg = config.get("pretrained_cfg") or {}
        for name in _WEIGHT_FILES[:-1]:
            try:
                path = _download(weights, repo, name, commit, missing_ok=True)
                break
            except FileNotFoundError:
                continue
        else:  # the last one, with the error that says why it is missing
            path = _download(weights, repo, _WEIGHT_FILES[-1], commit)
        return HubCheckpoint(
            path, source, TIMM_PRESETS.get(config["architecture"]), _floats(cfg.get("mean")), _floats(cfg.get("std"))
        )
    if isinstance(config, dict) and config.get("model_type") == "vit":  # transformers: the folder is the checkpoint
        _download(weights, repo, "model.safetensors", commit)
        return HubCheckpoint(config_path.parent, source)
    raise UserError(
        f"{weights}: {repo} is neither a timm model (config.json with 'architecture') nor a "
        "Hugging Face ViT (model_type 'vit')"
    )


def _floats(value) -> list[float] | None:
    ok = isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value)
    return [float(v) for v in value] if ok else None


def _download(weights: str, repo: str, filename: str, revision: str | None, missing_ok: bool = False) -> Path:
    """One file of the repository, from the cache or the hub; every failure is a one-line UserError
    (or FileNotFoundError with `missing_ok`, when the repository or the offline cache lacks the file)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise UserError(f"--weights {weights} needs huggingface_hub: pip install 'vqt-edge[export]'") from None
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision))
    except errors.LocalEntryNotFoundError:  # offline, or no connection, and not in the cache
        if missing_ok:
            raise FileNotFoundError(filename) from None
        where = f"the local Hugging Face cache ({constants.HF_HUB_CACHE})"
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise UserError(
            f"--weights {weights}: {repo}/{filename} is not in {where} and {why}; on a connected "
            f"machine run the same export (or `hf download {repo}`) and copy that cache here"
        ) from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise UserError(
            f"--weights {weights}: repository {repo} not found or not accessible ({type(e).__name__})"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"--weights {weights}: {repo} has no revision {revision!r}") from None
    except errors.EntryNotFoundError:
        if missing_ok:
            raise FileNotFoundError(filename) from None
        raise UserError(f"--weights {weights}: {repo} has no {filename}") from None
    except errors.HFValidationError as e:
        raise UserError(f"--weights {weights}: {str(e).splitlines()[0]}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise UserError(
            f"--weights {weights}: download of {repo}/{filename} failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
