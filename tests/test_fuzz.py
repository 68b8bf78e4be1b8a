"""Issue 6, fuzzing: everything that parses untrusted input raises only UserError.

Covered here: the bundle manifest (arbitrary JSON values and arbitrary bytes), list files (exact
round trip of awkward names; files that are not regular files), images (EXIF orientation on 8- and
16-bit images, headers that claim huge sizes in every common format, mutated bytes of real files)
and the checkpoint loaders (mutated bytes of a real small checkpoint of every format).
tests/test_data.py and tests/test_preprocess.py hold the earlier properties (list-file parser on
arbitrary text, every pillow mode and size); they are not repeated here.

Anything but UserError escaping is a crash with a traceback on the user's screen: a bug. Budgets
are modest (CI has 2 cores); regressions found by fuzzing are pinned with @example.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from device_runner import data
from exporters.loaders import load_weights, read_state_dict, save_hf_folder, save_npz_google
from exporters.vit import VisionTransformer
from vqt_edge import manifest as mf
from vqt_edge import preprocess as pp
from vqt_edge.arch import ViTArch
from vqt_edge.errors import UserError
from vqt_edge.spec import AdapterSpec


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- the manifest ----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
HEX = "ab" * 32


def valid_manifest() -> dict:
    """A manifest as the exporter writes it (the file hashes are placeholders)."""
    arch = ViTArch(depth=3, dim=32, heads=4, mlp_dim=64, patch=8, image_size=32)
    m = mf.Manifest(
        model="tiny",
        spec=AdapterSpec.create(arch, "vqt", 3, query_tokens=2),
        mean=[0.5] * 3,
        std=[0.5] * 3,
        class_names=["a", "b", "c"],
        files=dict.fromkeys(mf.REQUIRED_FILES, HEX),
    )
    d = json.loads(m.to_json())
    assert d["trainable_shapes"] == {"query_tokens": [3, 2, 32], "head.weight": [3, 7 * 32], "head.bias": [3]}
    return d


def check_parsed(m: mf.Manifest) -> None:
    """What the rest of vqt-edge relies on once a manifest has been accepted."""
    assert isinstance(m.spec.arch, ViTArch) and type(m.spec.num_classes) is int and m.spec.num_classes >= 2
    assert m.spec.query_layers and all(type(i) is int and 0 <= i < m.spec.arch.depth for i in m.spec.query_layers)
    assert all(np.isfinite(m.mean)) and all(s > 0 and np.isfinite(s) for s in m.std)
    assert 0 <= m.spec.dropout < 1
    assert m.class_names is None or (
        len(m.class_names) == m.spec.num_classes and all(isinstance(c, str) for c in m.class_names)
    )
    assert all(not mf.bad_file_name(n) for n in m.files)


def parse(d) -> None:
    try:
        m = mf.Manifest.from_dict(d)
    except UserError:
        return
    check_parsed(m)


def test_valid_manifest_parses():
    check_parsed(mf.Manifest.from_dict(valid_manifest()))


@fuzz(100)
@given(
    d=st.dictionaries(st.sampled_from(sorted(valid_manifest())) | st.text(max_size=6), JSON, max_size=8),
    fmt=st.booleans(),
)
def test_manifest_from_arbitrary_dict(d, fmt):
    if fmt:
        d["format"] = mf.FORMAT
    parse(d)


# One field replaced by any JSON value, or deleted: the realistic damage (a hand edit, a bad merge).
FIELD_EDITS = st.lists(
    st.tuples(
        st.sampled_from(
            sorted(valid_manifest())
            + ["arch." + k for k in valid_manifest()["arch"]]
            + ["files.name", "files.digest", "class_names.0", "query_layers.0"]
        ),
        st.none() | JSON,
    ),
    min_size=1,
    max_size=3,
)


@fuzz(200)
@given(edits=FIELD_EDITS)
@example(edits=[("class_names", 3)])  # len() of an int
@example(edits=[("arch", ["depth", "dim", "heads", "mlp_dim", "patch", "image_size"])])  # .items() of a list
@example(edits=[("arch.depth", float("inf"))])  # int(inf): OverflowError
@example(edits=[("arch.image_size", 10**30)])
@example(edits=[("std", [float("nan")] * 3)])  # passes "s <= 0"
@example(edits=[("dropout", 1.0)])  # 1/(1-p)
@example(edits=[("num_classes", True)])  # bool is an int
@example(edits=[("files.name", "a\x00b")])  # Path.resolve: ValueError
@example(edits=[("files.name", "../x")])
@example(edits=[("files.name", "/etc/passwd")])
@example(edits=[("files.digest", 7)])
@example(edits=[("trainable_shapes", [1, 2])])
@example(edits=[("frozen_outputs", "cls")])
@example(edits=[("files", []), ("files.name", None)])  # found by CI: edits inside a replaced "files"
@example(edits=[("files", None), ("files.digest", None)])
def test_manifest_with_edited_fields(edits):
    d = valid_manifest()
    for key, value in edits:
        target, _, sub = key.partition(".")
        if sub in ("name", "digest") and not isinstance(d.get("files"), dict):
            continue  # an earlier edit replaced or deleted "files": nothing left to edit inside it
        if sub == "name":
            d["files"][value if isinstance(value, str) else str(value)] = HEX
        elif sub == "digest":
            d["files"][mf.FROZEN] = value
        elif sub == "0" and isinstance(d.get(target), list) and d[target]:
            d[target][0] = value
        elif sub:
            if isinstance(d.get(target), dict):
                d[target][sub] = value
        elif value is None:
            d.pop(target, None)
        else:
            d[target] = value
    parse(d)


def _read_bytes(folder: Path, content: bytes) -> None:
    (folder / mf.MANIFEST).write_bytes(content)
    try:
        mf.read_manifest(folder, verify=True)
    except UserError:
        pass
    else:
        raise AssertionError("a bundle without its files verified")


@fuzz(100)
@given(content=st.binary(max_size=600))
@example(content=b"[" * 100_000)  # RecursionError inside json
@example(content=b'{"format": "vqt-edge/1", "arch": ' * 5000)
@example(content=b"\xef\xbb\xbf{}")  # a BOM
@example(content=b"NaN")
def test_read_manifest_arbitrary_bytes(tmp_path_factory, content):
    folder = tmp_path_factory.getbasetemp() / "fuzz_manifest_bytes"
    folder.mkdir(exist_ok=True)
    _read_bytes(folder, content)


@fuzz(100)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(0, 10**6),
)
def test_read_manifest_mutated_bytes(tmp_path_factory, flips, cut):
    folder = tmp_path_factory.getbasetemp() / "fuzz_manifest_mutated"
    folder.mkdir(exist_ok=True)
    content = bytearray(json.dumps(valid_manifest(), indent=2).encode())
    for pos, value in flips:
        content[pos % len(content)] = value
    _read_bytes(folder, bytes(content[:cut] if cut is not None else content))


# -- list files ------------------------------------------------------------------------------------

# Names a user may well have: commas, quotes, '#', spaces inside, non-ASCII. Not: '/', NUL, line
# breaks, or spaces at either end (the parser strips fields, as spreadsheets pad them).
NAME = st.text(alphabet=st.sampled_from(list("abcXYZ019 ,\"'#;=é中-_.") + ["\u00a0"]), min_size=1, max_size=12).filter(
    lambda s: s == s.strip() and s not in (".", "..")
)


@fuzz(30)
@given(rows=st.lists(st.tuples(NAME, NAME), min_size=1, max_size=6, unique_by=lambda r: r[0]))
def test_list_file_round_trips_awkward_names(tmp_path_factory, rows):
    """Whatever csv.writer (quoting every field, as spreadsheets may) writes is read back exactly."""
    folder = tmp_path_factory.mktemp("list")
    for name, _ in rows:
        Image.new("RGB", (2, 2)).save(folder / f"{name}.png")
    buffer = io.StringIO()
    csv.writer(buffer, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows([(f"{n}.png", label) for n, label in rows])
    (folder / "list.csv").write_text(buffer.getvalue(), encoding="utf-8")
    labels = sorted({label for _, label in rows})
    try:
        ds = data.load_dataset(folder / "list.csv")
    except UserError as e:
        assert len(labels) < 2 and "at least 2 classes" in str(e)
        return
    assert ds.classes == labels
    assert ds.samples == [(folder / f"{n}.png", labels.index(label)) for n, label in rows]


def test_list_file_that_is_not_a_regular_file(tmp_path):
    """/dev/zero would be read until memory runs out, a FIFO without a writer blocks forever."""
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    for path in (Path("/dev/zero"), fifo):
        with pytest.raises(UserError, match="not a regular file|neither a folder nor a regular file"):
            data.load_dataset(path)
    with pytest.raises(pp.UnreadableImage, match="not a regular file"):
        pp.load_rgb(fifo)


# -- images ----------------------------------------------------------------------------------------

ORIENT = {  # EXIF orientation -> what the displayed image is, as numpy on the stored pixels [H, W]
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


@fuzz(50)
@given(
    orientation=st.sampled_from([*ORIENT, 0, 9, 255, 65535]),
    deep=st.booleans(),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_exif_orientation_on_8_and_16_bit_images(tmp_path_factory, orientation, deep, width, height, seed):
    """Every orientation is applied exactly (lossless PNG), on 8-bit RGB and 16-bit grayscale;
    unknown values leave the image as stored."""
    rng = np.random.default_rng(seed)
    if deep:
        stored = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        want = np.repeat(np.rint(stored / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    else:
        stored = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        want = stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path_factory.getbasetemp() / f"orient_{deep}.png"
    Image.fromarray(stored).save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.mode == ("I;16" if deep else "RGB") and raw.getexif().get(0x0112) == orientation
    got = np.asarray(pp.load_rgb(path))
    np.testing.assert_array_equal(got, ORIENT.get(orientation, ORIENT[1])(want))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _header(fmt: str, w: int, h: int) -> bytes:
    """A few bytes that claim a w x h image (no pixel data worth the name)."""
    if fmt == "png":
        return (
            b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + _chunk(b"IEND", b"")
        )
    if fmt == "png16":
        return (
            b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)) + _chunk(b"IEND", b"")
        )
    if fmt == "gif":
        return (
            b"GIF89a"
            + struct.pack("<HHBBB", w, h, 0, 0, 0)
            + b","
            + struct.pack("<HHHHB", 0, 0, w, h, 0)
            + b"\x02\x02\x4c\x01\x00;"
        )
    if fmt == "bmp":
        info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 2835, 2835, 0, 0)
        return b"BM" + struct.pack("<IHHI", 14 + len(info) + 64, 0, 0, 14 + len(info)) + info + b"\0" * 64
    if fmt == "ppm":
        return f"P6\n{w} {h}\n255\n".encode() + b"\0" * 64
    if fmt == "jpeg":
        sof = struct.pack(">BHHB", 8, h, w, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
        return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"
    if fmt == "tiff":
        entries = [
            (256, 4, 1, w),
            (257, 4, 1, h),
            (258, 3, 1, 8),
            (259, 3, 1, 1),
            (262, 3, 1, 1),
            (273, 4, 1, 8),
            (277, 3, 1, 1),
            (278, 4, 1, h),
            (279, 4, 1, w * h if w * h < 2**32 else 2**32 - 1),
        ]
        ifd = (
            struct.pack("<H", len(entries))
            + b"".join(
                struct.pack("<HHII", tag, kind, 1, value)
                if kind == 4
                else struct.pack("<HHIHH", tag, kind, 1, value, 0)
                for tag, kind, _, value in entries
            )
            + b"\0\0\0\0"
        )
        return b"II*\x00" + struct.pack("<I", 8) + ifd
    raise ValueError(fmt)


HEADER_FORMATS = ["png", "png16", "gif", "bmp", "ppm", "jpeg", "tiff"]
DIM_LIMIT = {"gif": 65535, "jpeg": 65535}  # 16-bit size fields


@fuzz(50)
@given(fmt=st.sampled_from(HEADER_FORMATS), w=st.integers(1, 2**31 - 1), h=st.integers(1, 2**31 - 1))
@example(fmt="png16", w=60_000, h=60_000)
@example(fmt="gif", w=65535, h=65535)
@example(fmt="jpeg", w=65535, h=1600)
@example(fmt="tiff", w=10_001, h=10_000)
@example(fmt="bmp", w=2**31 - 1, h=2**31 - 1)
def test_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path_factory, fmt, w, h):
    limit = DIM_LIMIT.get(fmt, 2**31 - 1)
    w, h = min(w, limit), min(h, limit)
    if w * h <= pp.MAX_PIXELS:
        h = min(limit, pp.MAX_PIXELS // w + 1)
        if w * h <= pp.MAX_PIXELS:
            w = limit
    path = tmp_path_factory.getbasetemp() / f"huge.{fmt}"
    path.write_bytes(_header(fmt, w, h))
    with pytest.raises(pp.UnreadableImage) as err:  # ImageTooLarge, or pillow refusing the header itself
        pp.load_rgb(path)
    assert str(path) in str(err.value)
    try:  # our cap is what refused it, whenever pillow can read the header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                size = img.size
    except Image.DecompressionBombError:
        size = (w, h)  # pillow read the claimed size and refused it
    except Exception:  # noqa: BLE001 - pillow cannot even parse this header: any UnreadableImage will do
        size = None
    if size == (w, h):
        assert isinstance(err.value, pp.ImageTooLarge), err.value


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """A real bomb: 6000x6000 black pixels in a 35 KB PNG (108 MiB once decoded to RGB). With the
    cap lowered below its size, reading it must not move this process's peak memory."""
    Image.new("L", (6000, 6000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    monkeypatch.setattr(pp, "MAX_PIXELS", 20_000_000)
    before = _vm_hwm_mib()
    with pytest.raises(pp.ImageTooLarge, match="6000x6000"):
        pp.load_rgb(tmp_path / "bomb.png")
    assert _vm_hwm_mib() - before < 5


def _real_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    out = {}
    for fmt, img, kw in [
        ("PNG", rgb, {}),
        ("JPEG", rgb, {"quality": 90}),
        ("GIF", rgb.convert("P"), {}),
        ("BMP", rgb, {}),
        ("TIFF", rgb, {}),
        ("WEBP", rgb, {}),
        ("PNG", Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)), {}),
    ]:
        buffer = io.BytesIO()
        img.save(buffer, fmt, **kw)
        out[f"{fmt}-{img.mode}"] = buffer.getvalue()
    return out


REAL_IMAGES = _real_images()
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), st.integers(0, 2**20), st.integers(0, 255)
    ),
    min_size=1,
    max_size=4,
)


def mutate(content: bytes, ops) -> bytes:
    """Bit flips, byte sets, insertions, deletions and truncation; positions favour the header."""
    b = bytearray(content)
    for op, pos, value in ops:
        if not b:
            break
        i = pos % min(len(b), 512) if pos % 2 else pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (value % 8)
        elif op == "set":
            b[i] = value
        elif op == "insert":
            b[i:i] = bytes([value]) * (1 + value % 7)
        elif op == "delete":
            del b[i : i + 1 + value % 7]
        else:
            del b[i:]
    return bytes(b)


@fuzz(120)
@given(kind=st.sampled_from(sorted(REAL_IMAGES)), ops=MUTATIONS)
def test_mutated_images_raise_only_unreadable_image(tmp_path_factory, kind, ops):
    path = tmp_path_factory.getbasetemp() / "mutated_image"
    path.write_bytes(mutate(REAL_IMAGES[kind], ops))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pp, "MAX_PIXELS", 1_000_000)  # a mutated size field must not make CI decode 100 MP
        try:
            img = pp.load_rgb(path)
        except pp.UnreadableImage as e:
            assert str(path) in str(e)
            return
    assert img.mode == "RGB" and img.width * img.height <= 1_000_000
    out = pp.preprocess(img, 8, (0.5,) * 3, (0.5,) * 3)
    assert np.isfinite(out).all()


# -- checkpoint loaders ----------------------------------------------------------------------------

SMALL = ViTArch(depth=1, dim=8, heads=2, mlp_dim=16, patch=8, image_size=16)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, bytes]:
    """Real checkpoints of every format from one small ViT, as bytes."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = VisionTransformer(SMALL)
    model.reset_parameters(seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, folder / "zip.pth")
    torch.save({"model": state}, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(state, folder / "timm.safetensors")
    save_npz_google(model, folder / "google.npz")
    save_hf_folder(model, folder / "hf")
    out = {name: (folder / name).read_bytes() for name in ("zip.pth", "legacy.pth", "timm.safetensors", "google.npz")}
    out["hf/model.safetensors"] = (folder / "hf" / "model.safetensors").read_bytes()
    out["hf/config.json"] = (folder / "hf" / "config.json").read_bytes()
    for name in out:  # all of them load as they are
        if not name.startswith("hf/"):
            load_weights(VisionTransformer(SMALL), folder / name)
    load_weights(VisionTransformer(SMALL), folder / "hf")
    return out


@fuzz(200)
@given(
    name=st.sampled_from(
        ["zip.pth", "legacy.pth", "timm.safetensors", "google.npz", "hf/model.safetensors", "hf/config.json"]
    ),
    ops=MUTATIONS,
)
def test_mutated_checkpoints_raise_only_user_error(tmp_path_factory, checkpoints, name, ops):
    base = tmp_path_factory.getbasetemp() / "mutated_checkpoint"
    shutil.rmtree(base, ignore_errors=True)
    if name.startswith("hf/"):
        (base / "hf").mkdir(parents=True)
        for other in ("model.safetensors", "config.json"):
            (base / "hf" / other).write_bytes(checkpoints["hf/" + other])
        target = base / "hf"
    else:
        base.mkdir()
        target = base / "weights"
    (base / name if name.startswith("hf/") else target).write_bytes(mutate(checkpoints[name], ops))
    for load in (lambda: read_state_dict(target), lambda: load_weights(VisionTransformer(SMALL), target)):
        try:
            load()
        except UserError as e:
            assert str(e)


def test_zip_end_record_of_a_multi_disk_archive(tmp_path, checkpoints):
    """zipfile.is_zipfile itself raises BadZipFile for this one (found by the fuzzer above)."""
    locator = b"PK\x06\x07" + struct.pack("<IQI", 1, 0, 2)  # zip64 locator: disk 1 of 2
    (tmp_path / "w.pth").write_bytes(checkpoints["zip.pth"] + locator + b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(UserError, match="not a checkpoint in a recognized format"):
        read_state_dict(tmp_path / "w.pth")


def test_zip_member_name_that_is_not_utf8(tmp_path, checkpoints):
    """A zip whose member name flag says UTF-8 but whose bytes are not: zipfile raises UnicodeDecodeError."""
    content = bytearray(checkpoints["zip.pth"])
    central = content.rfind(b"PK\x01\x02")
    name_at = central + 46
    content[central + 9] |= 0x08  # general purpose flag bit 11 (0x0800): names are UTF-8
    content[name_at] = 0xFF
    (tmp_path / "w.pth").write_bytes(bytes(content))
    with pytest.raises(UserError, match="damaged zip archive|not a checkpoint"):
        read_state_dict(tmp_path / "w.pth")


def test_zero_dimensional_kernel_and_overflowing_hf_config(tmp_path, checkpoints):
    raw = dict(np.load(io.BytesIO(checkpoints["google.npz"])))
    raw["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"] = np.float32(1.0)  # shape ()
    with open(tmp_path / "g.npz", "wb") as f:
        np.savez(f, **raw)
    with pytest.raises(UserError, match="cannot convert"):
        load_weights(VisionTransformer(SMALL), tmp_path / "g.npz")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(checkpoints["hf/model.safetensors"])
    config = json.loads(checkpoints["hf/config.json"])
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps(config).replace(f'"hidden_size": {SMALL.dim}', '"hidden_size": 1e999')
    )
    with pytest.raises(UserError, match="out of range"):
        load_weights(VisionTransformer(SMALL), tmp_path / "hf")
