"""Checkpoint loading: every format round-trips bit-exactly, and bad files become UserErrors.

All checkpoints are real files written to tmp_path from a tiny random ViT; no weights are downloaded.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch

from exporters.loaders import (
    arch_from_hf_config,
    detect_format,
    load_weights,
    read_state_dict,
    save_hf_folder,
    save_npz_google,
    to_timm,
)
from exporters.vit import VisionTransformer
from vqt_edge.arch import ViTArch
from vqt_edge.errors import UserError

ARCH = ViTArch(depth=2, dim=32, heads=4, mlp_dim=64, patch=8, image_size=32)


@pytest.fixture(scope="module")
def model_a() -> VisionTransformer:
    m = VisionTransformer(ARCH).eval()
    m.reset_parameters(seed=1)
    with torch.no_grad():  # non-zero biases and norms too, so that every tensor's mapping counts
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return m


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def fresh(arch: ViTArch = ARCH) -> VisionTransformer:
    m = VisionTransformer(arch).eval()
    m.reset_parameters(seed=99)
    return m


def state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_outputs(a: VisionTransformer, b: VisionTransformer, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        for x, y in zip(a(pixels), b(pixels)):
            assert torch.equal(x, y)


def write(fmt: str, model: VisionTransformer, path) -> None:
    if fmt == "pth":
        torch.save(state(model), path)
    elif fmt == "pth-legacy":
        torch.save(state(model), path, _use_new_zipfile_serialization=False)
    elif fmt == "safetensors":
        safetensors.torch.save_file(state(model), path)
    elif fmt == "npz":
        save_npz_google(model, path)
    else:
        save_hf_folder(model, path)


# Honest names, then misleading ones: detection must go by content only.
@pytest.mark.parametrize(
    "fmt, name",
    [
        ("pth", "w.pth"),
        ("pth-legacy", "w.pth"),
        ("safetensors", "w.safetensors"),
        ("npz", "w.npz"),
        ("hf", "hf_model"),
        ("pth", "w.npz"),
        ("safetensors", "w.pth"),
        ("npz", "w.safetensors"),
        ("pth-legacy", "w.bin"),
        ("hf", "w.npz"),
    ],
)
def test_round_trip_is_exact(fmt, name, model_a, pixels, tmp_path):
    path = tmp_path / name
    write(fmt, model_a, path)
    assert detect_format(path) == fmt.removesuffix("-legacy")
    b = fresh()
    report = load_weights(b, path)
    assert report.format == fmt.removesuffix("-legacy")
    assert report.loaded == len(model_a.state_dict()) and report.unused == []
    assert_same_outputs(model_a, b, pixels)


def test_google_npz_layout(model_a, tmp_path):
    """The file really is in Google's layout, and q/k/v land in timm's row order [q; k; v]."""
    save_npz_google(model_a, tmp_path / "g.npz")
    raw, config = read_state_dict(tmp_path / "g.npz")
    assert config is None
    d, h = ARCH.dim, ARCH.heads
    att = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
    assert raw[att + "query/kernel"].shape == (d, h, d // h)
    assert raw[att + "out/kernel"].shape == (h, d // h, d)
    assert raw["embedding/kernel"].shape == (8, 8, 3, d)  # HWIO
    qkv = model_a.blocks[1].attn.qkv.weight.detach().numpy()
    for i, n in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(raw[att + f"{n}/kernel"].reshape(d, d).T, qkv[i * d : (i + 1) * d])
    assert not any(k.startswith("blocks.") for k in raw)


def test_hf_layout_and_config(model_a, tmp_path):
    save_hf_folder(model_a, tmp_path / "hf")
    raw, config = read_state_dict(tmp_path / "hf")
    assert arch_from_hf_config(config) == ARCH
    d = ARCH.dim
    qkv = model_a.blocks[0].attn.qkv.weight.detach().numpy()
    np.testing.assert_array_equal(raw["encoder.layer.0.attention.attention.value.weight"], qkv[2 * d :])
    assert set(to_timm(raw, "hf", ARCH, config)) == set(model_a.state_dict())


@pytest.mark.parametrize("fmt", ["npz", "hf"])
def test_swapped_key_value_changes_outputs(fmt, model_a, pixels, tmp_path):
    """The exact-output check is sensitive to the q/k/v order: swapping k and v is caught."""
    path = tmp_path / "x"
    write(fmt, model_a, path)
    file = path / "model.safetensors" if fmt == "hf" else path
    raw, _ = read_state_dict(file)
    k, v = (
        (
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel",
            "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel",
        )
        if fmt == "npz"
        else ("encoder.layer.0.attention.attention.key.weight", "encoder.layer.0.attention.attention.value.weight")
    )
    raw[k], raw[v] = raw[v], raw[k]
    if fmt == "npz":
        with open(path, "wb") as f:
            np.savez(f, **raw)
    else:
        safetensors.torch.save_file({n: torch.from_numpy(a) for n, a in raw.items()}, file)
    b = fresh()
    load_weights(b, path)
    with torch.no_grad():
        assert not torch.equal(model_a(pixels)[1], b(pixels)[1])


def test_hf_names_in_a_bare_safetensors_file(model_a, pixels, tmp_path):
    """Pointing at model.safetensors inside an HF folder (with ViTForImageClassification's `vit.`)."""
    save_hf_folder(model_a, tmp_path / "hf")
    raw, _ = read_state_dict(tmp_path / "hf")
    sd = {"vit." + n: torch.from_numpy(a) for n, a in raw.items()}
    sd["classifier.weight"] = torch.zeros(10, ARCH.dim)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    b = fresh()
    assert load_weights(b, tmp_path / "m.safetensors").unused == ["classifier.weight"]
    assert_same_outputs(model_a, b, pixels)


def test_mae_wrapper_with_decoder_and_head(model_a, pixels, tmp_path):
    sd = {"module." + k: v for k, v in state(model_a).items()}  # DDP prefix too
    sd |= {
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_embed.weight": torch.zeros(16, 32),
        "decoder_pred.bias": torch.zeros(3),
        "head.weight": torch.zeros(5, 32),
        "fc_norm.bias": torch.zeros(32),
    }
    torch.save({"model": sd, "epoch": 3}, tmp_path / "mae.pth")
    b = fresh()
    report = load_weights(b, tmp_path / "mae.pth")
    assert report.unused == ["decoder_embed.weight", "decoder_pred.bias", "fc_norm.bias", "head.weight", "mask_token"]
    assert_same_outputs(model_a, b, pixels)


def test_google_head_is_unused(model_a, tmp_path):
    save_npz_google(model_a, tmp_path / "g.npz")
    raw, _ = read_state_dict(tmp_path / "g.npz")
    with open(tmp_path / "g.npz", "wb") as f:
        np.savez(
            f, **raw, **{"head/kernel": np.zeros((32, 10), np.float32), "pre_logits/bias": np.zeros(32, np.float32)}
        )
    assert load_weights(fresh(), tmp_path / "g.npz").unused == ["head/kernel", "pre_logits/bias"]


def test_state_dict_wrapper(model_a, pixels, tmp_path):
    torch.save({"state_dict": state(model_a)}, tmp_path / "c.ckpt")
    b = fresh()
    load_weights(b, tmp_path / "c.ckpt")
    assert_same_outputs(model_a, b, pixels)


def test_wrong_shape_names_first_tensor(model_a, tmp_path):
    other = VisionTransformer(dataclasses.replace(ARCH, mlp_dim=48))
    torch.save(other.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"blocks\.0\.mlp\.fc1\.weight has shape \[48, 32\].*\[64, 32\]"):
        load_weights(fresh(), tmp_path / "w.pth")


def test_wrong_shape_google_names_source(model_a, tmp_path):
    save_npz_google(VisionTransformer(dataclasses.replace(ARCH, image_size=40)), tmp_path / "g.npz")
    with pytest.raises(
        UserError, match=r"pos_embed \(from Transformer/posembed_input/pos_embedding\) has shape \[1, 26, 32\]"
    ):
        load_weights(fresh(), tmp_path / "g.npz")


def test_google_head_count_mismatch(tmp_path):
    save_npz_google(VisionTransformer(dataclasses.replace(ARCH, heads=2)), tmp_path / "g.npz")
    with pytest.raises(UserError, match="2 heads, the model has 4"):
        load_weights(fresh(), tmp_path / "g.npz")


def test_hf_config_mismatch(model_a, pixels, tmp_path):
    save_hf_folder(model_a, tmp_path / "hf")
    with pytest.raises(UserError, match=r"different ViT: heads 4 \(model 2\)"):  # same shapes, other heads
        load_weights(fresh(dataclasses.replace(ARCH, heads=2)), tmp_path / "hf")
    b = fresh(dataclasses.replace(ARCH, eps=1e-12))  # HF's usual eps: not a reason to refuse
    load_weights(b, tmp_path / "hf")
    assert torch.equal(b.blocks[1].attn.qkv.weight, model_a.blocks[1].attn.qkv.weight)


def test_missing_tensors_all_listed(model_a, tmp_path):
    sd = state(model_a)
    del sd["blocks.0.attn.qkv.bias"], sd["norm.weight"]
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=r"missing backbone tensors: blocks\.0\.attn\.qkv\.bias, norm\.weight"):
        load_weights(fresh(), tmp_path / "m.safetensors")


def test_missing_google_tensor_names_its_source(model_a, tmp_path):
    save_npz_google(model_a, tmp_path / "g.npz")
    raw, _ = read_state_dict(tmp_path / "g.npz")
    del raw["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel"]
    with open(tmp_path / "g.npz", "wb") as f:
        np.savez(f, **raw)
    with pytest.raises(UserError, match=r"missing backbone tensors: blocks\.1\.attn\.qkv\.weight \(from .*key/kernel"):
        load_weights(fresh(), tmp_path / "g.npz")


def test_unexpected_tensor_listed(model_a, tmp_path):
    sd = state(model_a) | {"dist_token": torch.zeros(1, 1, 32), "blocks.2.norm1.weight": torch.ones(32)}
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(UserError, match=r"unexpected tensors.*dist_token, blocks\.2\.norm1\.weight"):
        load_weights(fresh(), tmp_path / "x.pth")


def test_integer_weight_refused(model_a, tmp_path):
    sd = state(model_a)
    sd["norm.bias"] = torch.zeros(32, dtype=torch.int32)
    safetensors.torch.save_file(sd, tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=r"norm\.bias has dtype int32; weights must be float"):
        load_weights(fresh(), tmp_path / "m.safetensors")


def test_bfloat16_loads(model_a, tmp_path):
    safetensors.torch.save_file({k: v.bfloat16() for k, v in state(model_a).items()}, tmp_path / "m.safetensors")
    b = fresh()
    load_weights(b, tmp_path / "m.safetensors")
    assert torch.equal(b.pos_embed, model_a.pos_embed.bfloat16().float())


@pytest.mark.parametrize("fmt", ["pth", "pth-legacy", "safetensors", "npz"])
def test_truncated_file(fmt, model_a, tmp_path):
    path = tmp_path / "w"
    write(fmt, model_a, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=str(path)):
        load_weights(fresh(), path)


def test_random_bytes_and_missing_path(tmp_path):
    (tmp_path / "r.pth").write_bytes(np.random.default_rng(0).bytes(4096).replace(b"\x80", b"\x00"))
    with pytest.raises(UserError, match="recognized format.*accepted"):
        load_weights(fresh(), tmp_path / "r.pth")
    (tmp_path / "p.bin").write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(4096))  # a "pickle"
    with pytest.raises(UserError, match="damaged torch checkpoint"):
        load_weights(fresh(), tmp_path / "p.bin")
    with pytest.raises(UserError, match="no such file"):
        detect_format(tmp_path / "nope.pth")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="config.json and model.safetensors"):
        detect_format(tmp_path / "d")


def test_zip_that_is_no_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(UserError, match="recognized format"):
        detect_format(tmp_path / "z.npz")


def test_npz_object_array_refused(tmp_path):
    np.savez(tmp_path / "o.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="'cls' is an object array"):
        read_state_dict(tmp_path / "o.npz")


class _Payload:
    """Pickles as a call that creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", [False, True])
def test_executable_pickle_refused(legacy, model_a, tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(control))))  # the payload is live: plain unpickling runs it
    assert control.exists()
    marker = tmp_path / "marker"
    torch.save(
        {"model": state(model_a) | {"x": _Payload(str(marker))}},
        tmp_path / "evil.pth",
        _use_new_zipfile_serialization=not legacy,
    )
    with pytest.raises(UserError, match=r"executable pickle content \(.*exec\)"):
        load_weights(fresh(), tmp_path / "evil.pth")
    assert not marker.exists()


def test_arch_from_hf_config_errors():
    config = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "patch_size": 8,
        "image_size": 32,
    }
    assert arch_from_hf_config(config) == dataclasses.replace(ARCH, eps=1e-12)  # HF's default eps
    with pytest.raises(UserError, match="hidden_act is 'gelu_new'"):
        arch_from_hf_config(config | {"hidden_act": "gelu_new"})
    with pytest.raises(UserError, match="lacks intermediate_size"):
        arch_from_hf_config({k: v for k, v in config.items() if k != "intermediate_size"})


def test_bad_config_json(model_a, tmp_path):
    save_hf_folder(model_a, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_weights(fresh(), tmp_path / "hf")
