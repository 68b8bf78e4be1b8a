"""The page's IndexedDB (docs/browser.md): what it stores per photo, what storing costs, what a reload saves.

For one bundle, in headless Debian Chromium, one thread (?threads=1), each trial in a fresh context
(an empty IndexedDB): the frozen pass of a generated colour task without storage (?store=0) and with
it (every row written to IndexedDB); the bytes IndexedDB then uses per photo (navigator.storage.estimate,
minus an empty context's) next to the rows' payload (an on-disk profile, as a person's browser); then, in it, a run stopped by reloading
the tab, and the Resume (the stored rows read back) against the fresh frozen pass; and the same photos
chosen again (hashing + reading the rows). Wall seconds from the page's performance.now(), CPU seconds
of Chromium's renderer processes from /proc.

    nice -n 10 .venv/bin/python bench/web_resume_bench.py --bundle B --out bench/results/web_resume_vit_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.web_bench import cpu_seconds, renderers
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, make_task


def renderer_cpu() -> float:
    total = 0.0
    for pid in renderers():
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # a renderer that just exited
    return total


def ready(page) -> None:
    page.wait_for_function("window.vqtReady !== undefined", timeout=120_000)
    assert page.evaluate("window.vqtReady") is True, page.inner_text("#messages")


def train(page, data: Path, epochs: int, batch: int, wait: bool = True) -> tuple[dict, float]:
    page.set_input_files("#folder", str(data))
    page.fill("#epochs", str(epochs))
    page.fill("#batch", str(batch))
    c0 = renderer_cpu()
    page.click("#train")
    if not wait:
        return {}, 0.0
    page.wait_for_function("!window.vqt.state.busy", timeout=600_000)
    assert page.evaluate("window.vqt.state.report") is not None, page.inner_text("#messages")
    return page.evaluate("window.vqt.state.timings"), renderer_cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from vqt_edge import manifest as mf
    from vqt_edge.web.serve import serve_in_thread
    from vqt_edge.web.site import write_site

    manifest = mf.read_manifest(args.bundle)
    size = manifest.spec.arch.image_size
    photos = 3 * args.per_class
    result: dict = {"bundle": str(args.bundle), "model": manifest.model, "photos": photos, "threads": 1}
    result["load_before"] = os.getloadavg()
    trials: dict[str, list] = {k: [] for k in ("no_store_s", "store_s", "resume_load_s", "chosen_again_s", "usage")}
    cpu: dict[str, list] = {k: [] for k in ("no_store_s", "store_s", "chosen_again_s")}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        write_site(args.bundle, site)
        server, url = serve_in_thread(site)
        url += "?threads=1"
        data = make_task(Path(tmp) / "data", args.per_class, seed=1, size=max(32, size))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for _ in range(args.trials):
                page = browser.new_context().new_page()
                page.goto(url + "&store=0")
                ready(page)
                timings, c = train(page, data, 1, 32)
                trials["no_store_s"].append(timings["frozen_pass_s"])
                cpu["no_store_s"].append(c)
                page.context.close()

                # An on-disk profile, as a person's browser keeps IndexedDB (playwright's contexts keep it in memory).
                context = browser.browser_type.launch_persistent_context(
                    tempfile.mkdtemp(dir=tmp), executable_path=CHROMIUM, args=CHROMIUM_ARGS
                )
                page = context.pages[0] if context.pages else context.new_page()
                page.goto(url)
                ready(page)
                empty = page.evaluate("window.vqt.estimate()")["usage"]
                # A long run, stopped by a reload once its frozen pass is stored and a few steps are done.
                train(page, data, 50, 8, wait=False)
                page.wait_for_function("window.vqt.state.losses.length >= 3", timeout=600_000)
                stored = page.evaluate("window.vqt.state.timings")
                trials["store_s"].append(stored["frozen_pass_s"])
                trials["usage"].append(page.evaluate("window.vqt.estimate()")["usage"] - empty)
                page.reload()
                ready(page)
                page.click("#resume")
                page.wait_for_function("window.vqt.state.timings.resume_load_s !== undefined", timeout=600_000)
                trials["resume_load_s"].append(page.evaluate("window.vqt.state.timings.resume_load_s"))
                page.reload()  # stops the resumed run
                ready(page)
                timings, c = train(page, data, 1, 32)
                assert timings["cached_images"] == photos and timings["frozen_images"] == 0
                trials["chosen_again_s"].append(timings["frozen_pass_s"])
                cpu["chosen_again_s"].append(c)
                result["payload_bytes_per_photo"] = page.evaluate(
                    "Object.values(window.vqt.state.config.frozen_outputs).reduce((a, o) => "
                    "a + o.shape.reduce((x, y) => x * y, 1) * (o.cache_dtype === 'float16' ? 2 : 4), 0)"
                )
                page.context.close()
            browser.close()
        server.shutdown()
    med = {k: float(np.median(v)) for k, v in trials.items()}
    result["trials"] = trials
    result["renderer_cpu_s"] = cpu
    result["median"] = {
        "fresh_frozen_pass_no_store_s": med["no_store_s"],
        "fresh_frozen_pass_stored_s": med["store_s"],
        "resume_read_rows_s": med["resume_load_s"],
        "same_photos_chosen_again_s": med["chosen_again_s"],
        "idb_usage_bytes_per_photo": round(med["usage"] / photos),
        "resume_over_fresh": med["resume_load_s"] / med["store_s"],
        "storing_overhead": med["store_s"] / med["no_store_s"] - 1,
    }
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"], indent=1), result["load_before"], result["load_after"])


if __name__ == "__main__":
    main()
