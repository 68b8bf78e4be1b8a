"""The browser page (`vqt-edge web`, docs/browser.md) in headless Chromium from Debian's packages.

Real pieces only: the site written by the command, served by `vqt-edge web --serve`'s server, the
system Chromium driven by playwright (never a downloaded browser), onnxruntime-web's WASM build on
the bundle's graphs, and the Python side it must agree with (PortableBackend, Trainer, model.onnx).
Without Chromium, playwright or `npm ci`'s files these tests skip, unless VQT_EDGE_REQUIRE_WEB=1
(`make test` sets it after building those pieces), where they fail.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from tests.conftest import CHROMIUM, make_task, run_cli


def _missing() -> str | None:
    from vqt_edge.web import site

    if not Path(CHROMIUM).is_file():
        return f"no {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "no playwright (pip install playwright)"
    try:
        site.ort_dist()
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None


pytestmark = pytest.mark.skipif(
    _missing() is not None and os.environ.get("VQT_EDGE_REQUIRE_WEB") != "1", reason=f"browser tests: {_missing()}"
)


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()


FROM_B64 = "const f32 = (s) => new Float32Array(Uint8Array.from(atob(s), (c) => c.charCodeAt(0)).buffer);"
TO_B64 = (
    "const b64 = (a) => { const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = ''; "
    "for (let i = 0; i < u.length; i += 32768) s += String.fromCharCode(...u.subarray(i, i + 32768)); return btoa(s); };"
)


def unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), np.float32)


def open_page(browser, url, downloads: bool = False):
    page = browser.new_page(accept_downloads=downloads)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.vqtReady !== undefined", timeout=60_000)
    assert page.evaluate("window.vqtReady") is True, page.inner_text("#messages")
    page.errors = errors  # type: ignore[attr-defined]
    return page


@pytest.fixture(scope="module")
def page(browser, site_url):
    p = open_page(browser, site_url)
    yield p
    p.close()


# -- 1: the optimizer, the schedule and the generator equal numpy's --------------------------------------
def test_js_adamw_schedule_and_generator_equal_numpy(page, fmnist_bundle, tmp_path):
    from device_runner.backends import PortableBackend
    from vqt_edge import manifest as mf
    from vqt_edge.optim import lr_at

    shapes = mf.read_manifest(fmnist_bundle).spec.trainable_shapes
    rng = np.random.default_rng(5)
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    grads = [
        {n: (rng.normal(size=s) * 10.0 ** rng.integers(-4, 1)).astype(np.float32) for n, s in shapes.items()}
        for _ in range(20)
    ]
    total, warmup, base, wd = 20, 2, 1e-2, 1e-4
    # The real update: PortableBackend.step on the same gradients (set where forward() accumulates them);
    # parameters and moments read back from the checkpoint it writes.
    ref = PortableBackend(fmnist_bundle, mf.read_manifest(fmnist_bundle), "cpu", 1, None)
    ref.set_parameters(params)
    for i in range(total):
        ref.grads = {n: g.copy() for n, g in grads[i].items()}
        ref.step(lr_at(i, total, warmup, base), wd)
    ref.save(tmp_path / "checkpoint.safetensors", {"epoch": 0, "step": total})
    saved = load_file(str(tmp_path / "checkpoint.safetensors"))
    out = page.evaluate(
        f"""([params, grads, shapes, total, warmup, base, wd]) => {{ {FROM_B64} {TO_B64}
        const v = window.vqt, p = Object.fromEntries(Object.entries(params).map(([n, s]) => [n, f32(s)]));
        const opt = new v.AdamW(p, shapes), lrs = [];
        for (let i = 0; i < total; i++) {{
          lrs.push(v.lrAt(i, total, warmup, base));
          opt.step(Object.fromEntries(Object.entries(grads[i]).map(([n, s]) => [n, f32(s)])), lrs[i], wd);
        }}
        const enc = (o) => Object.fromEntries(Object.entries(o).map(([n, a]) => [n, b64(a)]));
        return {{params: enc(p), m: enc(opt.expAvg), v: enc(opt.expAvgSq), lrs,
                 warm: [[30, 4, null], [7, 3, null], [5, 5, 0.5], [10, 5, 0.3]].map(([e, s, w]) => v.warmupSteps(e, s, w)),
                 random: Array.from(new v.Generator([0, 1, 2]).randomArray(1000)),
                 perm: new v.Generator([3, 4]).permutation(97)}};
        }}""",
        [
            {n: b64(p) for n, p in params.items()},
            [{n: b64(g) for n, g in s.items()} for s in grads],
            {n: list(s) for n, s in shapes.items()},
            total,
            warmup,
            base,
            wd,
        ],
    )
    assert out["lrs"] == pytest.approx([lr_at(i, total, warmup, base) for i in range(total)], rel=1e-12)
    assert out["warm"] == [round(w * s) for w, s in [(3.0, 4), (0.7, 3), (0.5, 5), (0.3, 5)]]
    for n in shapes:
        for got, want in (
            (out["params"][n], saved[f"param/{n}"]),
            (out["m"][n], saved[f"exp_avg/{n}"]),
            (out["v"][n], saved[f"exp_avg_sq/{n}"]),
        ):
            want = want.ravel()
            np.testing.assert_allclose(unb64(got), want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
        assert not np.array_equal(saved[f"param/{n}"], params[n])  # it moved: the comparison can fail
    assert np.array_equal(out["random"], np.random.default_rng([0, 1, 2]).random(1000))  # dropout masks
    assert out["perm"] == np.random.default_rng([3, 4]).permutation(97).tolist()  # data order, held-out split


# -- 2: the step graph on onnxruntime-web gives the Python step's numbers --------------------------------
def test_step_graph_in_the_page_equals_python(page, fmnist_bundle):
    from device_runner.backends import PortableBackend
    from vqt_edge import manifest as mf

    m = mf.read_manifest(fmnist_bundle)
    spec, b = m.spec, 4
    rng = np.random.default_rng(0)
    feeds = {
        name: rng.normal(size=(b, *shape)).astype(np.float32) for name, (shape, _) in spec.frozen_output_specs.items()
    }
    feeds["query_keep"] = ((rng.random((b, *spec.query_keep_shape)) >= 0.1) / np.float32(0.9)).astype(np.float32)
    feeds["targets"] = np.eye(spec.num_classes, dtype=np.float32)[rng.integers(0, spec.num_classes, b)] / np.float32(b)
    backend = PortableBackend(fmnist_bundle, m, "cpu", 1, None)
    params = {n: p + rng.normal(scale=0.02, size=p.shape).astype(np.float32) for n, p in backend.parameters().items()}
    backend.set_parameters(params)
    loss, logits = backend.forward(feeds)
    out = page.evaluate(
        f"""async ([params, feeds, shapes]) => {{ {FROM_B64} {TO_B64}
        const v = window.vqt, p = Object.fromEntries(Object.entries(params).map(([n, s]) => [n, f32(s)]));
        const t = Object.fromEntries(Object.entries(feeds).map(([n, s]) => [n, v.tensor(f32(s), shapes[n])]));
        const out = await v.runStep(p, t);
        return Object.fromEntries(Object.entries(out).map(([n, a]) => [n, b64(a)]));
        }}""",
        [
            {n: b64(p) for n, p in params.items()},
            {n: b64(a) for n, a in feeds.items()},
            {n: list(a.shape) for n, a in feeds.items()},
        ],
    )
    want = {"loss": np.float32(loss).reshape(1), "logits": logits, **{f"grad.{n}": g for n, g in backend.grads.items()}}
    assert set(out) == set(want)
    for name, w in want.items():
        got, w = unb64(out[name]), np.asarray(w, np.float32).ravel()
        err = float(np.abs(got - w).max() / max(np.abs(w).max(), 1e-12))
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


# -- preprocessing: the page's pixels against pillow's -----------------------------------------------------
def test_page_preprocessing_matches_pillow(page, fmnist_bundle, tmp_path):
    """The browser decodes the same pixels as pillow (PNG, transparency over white, and this JPEG), and
    the port of pillow's bicubic resize (horizontal pass first) gives the same bytes. Pillow 13 takes
    the vertical pass first for some sizes (40x30 -> 28x28 here): a few pixels then differ by some levels."""
    from vqt_edge import manifest as mf
    from vqt_edge.preprocess import load_rgb, preprocess

    m = mf.read_manifest(fmnist_bundle)
    rng = np.random.default_rng(3)
    images = {
        "down.png": (97, 130),
        "up.png": (11, 17),
        "same.png": (28, 28),
        "wide.png": (28, 90),
        "photo.jpg": (120, 160),
    }
    for name, (h, w) in images.items():
        smooth = np.asarray(
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        )
        noisy = np.clip(smooth.astype(int) + rng.integers(-40, 40, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(tmp_path / name, quality=90)
    Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "alpha.png")
    names = [*images, "alpha.png"]
    got = page.evaluate(
        f"""async (files) => {{ {FROM_B64} {TO_B64}
        const cfg = window.vqt.state.config, out = {{}};
        for (const [name, data] of Object.entries(files)) {{
          const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
          out[name] = b64(await window.vqt.preprocess(new Blob([bytes]), cfg.image_size, cfg.mean, cfg.std));
        }}
        return out;
        }}""",
        {n: base64.b64encode((tmp_path / n).read_bytes()).decode() for n in names},
    )
    levels, mean = {}, {}
    for name in names:
        want = preprocess(load_rgb(tmp_path / name), m.spec.arch.image_size, m.mean, m.std).ravel()
        diff = np.abs(unb64(got[name]) - want) * m.std[0] * 255
        levels[name], mean[name] = round(float(diff.max()), 3), round(float(diff.mean()), 4)
    print("page vs pillow, 8-bit levels: max", json.dumps(levels), "mean", json.dumps(mean))
    assert all(levels[n] < 1e-3 for n in names if n != "alpha.png"), levels
    assert levels["alpha.png"] <= 12 and mean["alpha.png"] < 0.5, (levels, mean)


# -- 3: a whole run in the page; its download, imported, predicts as the page did --------------------------
def test_whole_run_in_the_page_download_import_predict(browser, site_url, fmnist_bundle, tmp_path):
    data = make_task(tmp_path / "train", 40, seed=1)
    test = make_task(tmp_path / "test", 3, seed=2)
    page = open_page(browser, site_url, downloads=True)
    page.set_input_files("#folder", str(data))
    assert "120 photos in 3 classes" in page.inner_text("#status")
    page.fill("#epochs", "3")
    page.click("#train")
    page.wait_for_function("!window.vqt.state.busy", timeout=120_000)
    report = page.evaluate("window.vqt.state.report")
    assert report is not None, page.inner_text("#messages")
    assert report["val_acc"] >= 0.9 and report["val_images"] == 24, report
    assert "held-out accuracy" in page.inner_text("#result")
    for button, name in (("#download-adapter", "adapter.safetensors"), ("#download-config", "adapter_config.json")):
        with page.expect_download() as download:
            page.click(button)
        assert download.value.suggested_filename == name
        download.value.save_as(tmp_path / "dl" / name)
    # The same run in Python (same data order, dropout masks, split and schedule): the same adapter.
    py_run = tmp_path / "py_run"
    result = run_cli(
        "train",
        "--bundle",
        fmnist_bundle,
        "--data",
        data,
        "--run",
        py_run,
        "--epochs",
        3,
        "--val-split",
        0.2,
        "--backend",
        "portable",
        "--kv",
        "ram",
        "--kv-dtype",
        "fp16",  # the page keeps fp16 K/V
    )
    assert result.returncode == 0, result.stderr
    page_adapter, py_adapter = (
        load_file(str(tmp_path / "dl" / "adapter.safetensors")),
        load_file(str(py_run / "adapter.safetensors")),
    )
    assert set(page_adapter) == set(py_adapter)
    for n in py_adapter:
        np.testing.assert_allclose(page_adapter[n], py_adapter[n], atol=2e-4 * float(np.abs(py_adapter[n]).max()))
    # Import the download, then predict the same photos in Python and in the page.
    run = tmp_path / "imported"
    result = run_cli(
        "import-adapter", "--bundle", fmnist_bundle, "--adapter", tmp_path / "dl" / "adapter.safetensors", "--run", run
    )
    assert result.returncode == 0, result.stderr
    photos = sorted(test.rglob("*.png"))
    page.set_input_files("#predict-files", [str(p) for p in photos])
    page.wait_for_function(f"window.vqt.state.predictions.length === {len(photos)}", timeout=60_000)
    in_page = page.evaluate("window.vqt.state.predictions")
    result = run_cli("predict", "--run", run, "--json", *photos)
    assert result.returncode == 0, result.stderr
    in_python = json.loads(result.stdout)
    assert [p["label"] for p in in_page] == [p["label"] for p in in_python]
    from device_runner.evaluate import FinishedRun
    from vqt_edge.preprocess import load_batch

    finished = FinishedRun.open(run)
    logits = finished.logits(load_batch(photos, 28, finished.manifest.mean, finished.manifest.std))
    np.testing.assert_allclose(np.array([p["logits"] for p in in_page]), logits, atol=1e-4, rtol=0)
    assert sum(p["label"] == photo.parent.name for p, photo in zip(in_page, photos)) >= 8
    # An adapter config of another frozen graph is refused, and no run is left behind.
    config = json.loads((tmp_path / "dl" / "adapter_config.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**config, "frozen_sha256": "0" * 64}))
    result = run_cli(
        "import-adapter",
        "--bundle",
        fmnist_bundle,
        "--adapter",
        tmp_path / "dl" / "adapter.safetensors",
        "--config",
        tmp_path / "other.json",
        "--run",
        tmp_path / "refused",
    )
    assert result.returncode == 2 and "another frozen graph" in result.stderr and not (tmp_path / "refused").exists()
    assert page.errors == []  # type: ignore[attr-defined]
    page.close()


# -- 4: bad files get a clear message; the page keeps working ---------------------------------------------
def _huge_png(path: Path, side: int = 10_001) -> None:
    """A grey PNG above the 100 MP limit, written row by row (a few hundred KB on disk)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )


def test_bad_files_get_a_clear_message_and_nothing_breaks(browser, site_url, tmp_path):
    data = make_task(tmp_path / "data", 4, seed=4)
    (data / "blue" / "bad.png").write_bytes(b"this is not an image")
    _huge_png(data / "red" / "huge.png")
    (data / "red" / "notes.txt").write_text("ignored: not an image extension")
    for f in (data / "green").iterdir():
        f.unlink()
    (data / "green" / "readme.txt").write_text("no photos here")
    page = open_page(browser, site_url)
    page.set_input_files("#folder", str(data))
    assert 'class "green" has no usable photos' in page.inner_text("#status")
    assert page.is_disabled("#train")
    # A class whose only photo cannot be read: found after the frozen pass, training stops with the reason.
    (data / "green" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    page.click("#clear")
    page.set_input_files("#folder", str(data))
    page.fill("#epochs", "1")
    page.click("#train")
    page.wait_for_function("!window.vqt.state.busy", timeout=60_000)
    messages = page.inner_text("#messages")
    assert "cannot read image blue/bad.png: not an image the browser can decode (skipped)" in messages
    assert "cannot read image red/huge.png: 10001x10001 pixels is above the limit of 100,000,000 (skipped)" in messages
    assert 'class "green" has no usable photos' in messages and page.evaluate("window.vqt.state.report") is None
    # Fixed: it trains, skipping the bad files, and predicting a bad file is a message, not a crash.
    shutil.copy(data / "blue" / "000.png", data / "green" / "000.png")
    page.click("#clear")
    page.set_input_files("#folder", str(data))
    assert page.is_enabled("#train")
    page.click("#train")
    page.wait_for_function("!window.vqt.state.busy", timeout=60_000)
    report = page.evaluate("window.vqt.state.report")
    assert report is not None and report["skipped"] == 3, page.inner_text("#messages")
    page.set_input_files("#predict-files", [str(data / "blue" / "bad.png"), str(data / "blue" / "000.png")])
    page.wait_for_function("window.vqt.state.predictions.length === 1", timeout=30_000)
    assert "cannot read image bad.png: not an image the browser can decode" in page.inner_text("#messages")
    assert page.errors == []  # type: ignore[attr-defined]
    page.close()


def test_serve_sends_wasm_and_isolation_headers(site_url):
    import urllib.request

    base = site_url.split("?")[0]
    with urllib.request.urlopen(base + "ort/ort-wasm-simd-threaded.wasm") as r:
        assert r.headers["Content-Type"] == "application/wasm"
        assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
    with urllib.request.urlopen(base + "ort/ort.wasm.min.mjs") as r:
        assert r.headers["Content-Type"] == "text/javascript"
