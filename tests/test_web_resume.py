"""The page's IndexedDB (vqt_edge/web/assets/store.js): a reload mid-training resumes exactly.

Real pieces only, as tests/test_web.py: the site written by `vqt-edge web`, Debian's Chromium under
playwright, onnxruntime-web's WASM build, the browser's own IndexedDB (each playwright context has
its own, empty), a real `page.reload()` while the page trains, and a real quota (set through the
DevTools protocol's Storage.overrideQuotaForOrigin, so the browser itself raises QuotaExceededError).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CHROMIUM, CHROMIUM_ARGS, make_task
from tests.test_web import pytestmark  # noqa: F401  (the same skip rule)

EPOCHS, BATCH, PER_CLASS = 4, 8, 20  # 60 photos, 48 trained on: 6 steps per epoch, 24 in all
PARAMS = (
    "(() => { const p = window.vqt.state.params, out = {}; for (const [n, a] of Object.entries(p)) {"
    " const u = new Uint8Array(a.buffer, a.byteOffset, a.byteLength); let s = '';"
    " for (let i = 0; i < u.length; i += 32768) s += String.fromCharCode(...u.subarray(i, i + 32768));"
    " out[n] = btoa(s); } return out; })()"
)


def new_page(browser, url: str, profile: Path | None = None):
    """A page in a fresh context (its own, empty IndexedDB): incognito-like (storage in memory), or
    with `profile` a browser of its own on an on-disk profile, as a person's browser keeps IndexedDB."""
    if profile is None:
        page = browser.new_context().new_page()
    else:
        context = browser.browser_type.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = context.pages[0] if context.pages else context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    page.goto(url)
    wait_ready(page)
    return page


def wait_ready(page) -> None:
    page.wait_for_function("window.vqtReady !== undefined", timeout=60_000)
    assert page.evaluate("window.vqtReady") is True, page.inner_text("#messages")


def start_training(page, data) -> None:
    page.set_input_files("#folder", str(data))
    page.fill("#epochs", str(EPOCHS))
    page.fill("#batch", str(BATCH))
    page.click("#train")


def finish(page) -> dict[str, np.ndarray]:
    page.wait_for_function("!window.vqt.state.busy", timeout=120_000)
    assert page.evaluate("window.vqt.state.report") is not None, page.inner_text("#messages")
    return {n: np.frombuffer(base64.b64decode(s), np.float32) for n, s in page.evaluate(PARAMS).items()}


def assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for n in want:
        assert np.array_equal(got[n], want[n]), f"{n}: max difference {np.abs(got[n] - want[n]).max()}"


@pytest.fixture(scope="module")
def uninterrupted(browser, site_url, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict, int]:
    """The reference: a whole run without a stop, K/V in memory (and written to IndexedDB).
    Returns the photos, the trainables, the page's timings and the bytes IndexedDB then used."""
    data = make_task(tmp_path_factory.mktemp("web_resume") / "data", PER_CLASS, seed=7)
    a = new_page(browser, site_url)
    start_training(a, data)
    want = finish(a)
    fresh = a.evaluate("window.vqt.state.timings")
    assert fresh["frozen_images"] == 3 * PER_CLASS and fresh["cached_images"] == 0 and fresh["kv_in_memory"]
    usage = a.evaluate("window.vqt.estimate()")["usage"]
    assert a.is_hidden("#resume")  # a finished run leaves no checkpoint behind
    assert a.errors == []  # type: ignore[attr-defined]
    a.context.close()
    return data, want, fresh, usage


def test_reload_mid_training_resumes_to_the_same_adapter(browser, site_url, uninterrupted, tmp_path):
    data, want, fresh, usage = uninterrupted
    data = Path(shutil.copytree(data, tmp_path / "data"))  # one photo is changed below
    # B: on an on-disk profile, a checkpoint at every step; the tab is reloaded in epoch 2, then resumed.
    b = new_page(browser, site_url + "&checkpoint=0", profile=tmp_path / "profile")
    start_training(b, data)
    b.wait_for_function("(window.vqt.state.checkpoint?.step ?? 0) >= 8", timeout=60_000)
    b.reload()
    wait_ready(b)
    assert b.is_visible("#resume") and "Resume the stopped run (epoch 2/4" in b.inner_text("#resume")
    b.click("#resume")
    assert_identical(finish(b), want)
    resumed = b.evaluate("window.vqt.state.timings")
    disk_usage = b.evaluate("window.vqt.estimate()")["usage"]
    assert resumed["frozen_images"] == 0 and resumed["cached_images"] == 3 * PER_CLASS
    assert "resumed at epoch 2" in b.inner_text("#messages")
    # The same photos chosen again: no frozen pass, a new run from step 0 with the stored K/V.
    b.click("#clear")
    start_training(b, data)
    assert_identical(finish(b), want)
    again = b.evaluate("window.vqt.state.timings")
    assert again["frozen_images"] == 0 and again["cached_images"] == 3 * PER_CLASS
    assert "60 of 60 photos' frozen outputs were read from this browser's storage" in b.inner_text("#messages")
    # A changed photo is a new key: its frozen pass runs again, the others' rows are reused.
    photo = data / "red" / "000.png"
    pixels = np.asarray(Image.open(photo)).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(photo)
    b.click("#clear")
    start_training(b, data)
    finish(b)
    changed = b.evaluate("window.vqt.state.timings")
    assert changed["frozen_images"] == 1 and changed["cached_images"] == 3 * PER_CLASS - 1
    assert b.errors == []  # type: ignore[attr-defined]
    b.context.close()
    print(
        "web resume:",
        json.dumps(
            {
                "photos": 3 * PER_CLASS,
                "idb_usage_bytes_per_photo_in_memory_profile": round(usage / (3 * PER_CLASS)),
                "idb_usage_bytes_per_photo_on_disk_profile": round(disk_usage / (3 * PER_CLASS)),
                "fresh_frozen_pass_s": round(fresh["frozen_pass_s"], 3),
                "resume_load_s": round(resumed["resume_load_s"], 3),
                "cached_frozen_pass_s": round(again["frozen_pass_s"], 3),
            }
        ),
    )


def test_kv_above_the_memory_budget_and_a_full_quota(browser, site_url, uninterrupted):
    """?kvmem=0: every batch is read back from IndexedDB, same adapter. Then a quota too small for the
    frozen outputs: a clear message, the K/V fall back to memory, the run ends with the same adapter."""
    data, want, _, _ = uninterrupted
    c = new_page(browser, site_url + "&kvmem=0")
    start_training(c, data)
    assert_identical(finish(c), want)
    assert c.evaluate("window.vqt.state.timings.kv_in_memory") is False
    c.context.close()

    q = browser.new_context().new_page()
    q.errors = []  # type: ignore[attr-defined]
    q.on("pageerror", lambda e: q.errors.append(str(e)))  # type: ignore[attr-defined]
    origin = site_url.split("/?")[0]
    cdp = q.context.new_cdp_session(q)
    cdp.send("Storage.overrideQuotaForOrigin", {"origin": origin, "quotaSize": 3_000_000})  # about 19 photos' K/V
    q.goto(site_url + "&kvmem=0")
    wait_ready(q)
    start_training(q, data)
    assert_identical(finish(q), want)
    messages = q.inner_text("#messages")
    assert "storage for this page is full (QuotaExceededError)" in messages and "kept in memory only" in messages
    assert q.evaluate("window.vqt.state.timings.kv_in_memory") is True  # IndexedDB-backed, then moved to memory
    assert q.errors == []  # type: ignore[attr-defined]
    q.context.close()
