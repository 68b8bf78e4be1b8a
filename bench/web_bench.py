"""The page (`vqt-edge web`) against the Python portable backend on the same machine, one thread each.

For one bundle: the frozen pass per image (batch 16) and one training step (batch 32: the step graph's
forward+backward and AdamW) on identical feeds, timed in the page (onnxruntime-web WASM, 1 thread,
headless Debian Chromium) and in Python (onnxruntime, PortableBackend, --threads 1); wall seconds from
performance.now() / perf_counter, and CPU seconds of the tab's renderer process (/proc) / this process.
Then a whole run in the page on a generated colour task: held-out accuracy, the renderer's peak RSS
(VmHWM), the downloaded files' sizes, and a screenshot.

    .venv/bin/python bench/web_bench.py --bundle B --out bench/results/web_vit_fmnist.json [--screenshot docs/browser.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import CHROMIUM, CHROMIUM_ARGS, make_task

WARMUP, REPEAT = 3, 10


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def renderers() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"chromium" in cmd and b"--type=renderer" in cmd:
                out.append(int(p.name))
    return out


def feeds(manifest, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    spec = manifest.spec
    f = {n: rng.normal(size=(batch, *shape)).astype(np.float32) for n, (shape, _) in spec.frozen_output_specs.items()}
    if spec.query_keep_shape:
        f["query_keep"] = np.ones((batch, *spec.query_keep_shape), np.float32)
    f["targets"] = np.eye(spec.num_classes, dtype=np.float32)[rng.integers(0, spec.num_classes, batch)] / np.float32(
        batch
    )
    return f


def python_side(bundle: Path, manifest, pixels: np.ndarray, feed: dict) -> dict:
    from device_runner.backends import PortableBackend
    from device_runner.features import FrozenBackbone

    backbone = FrozenBackbone(bundle, manifest, "cpu", 1)
    walls, cpus = [], []
    for i in range(WARMUP + REPEAT):
        w, c = time.perf_counter(), time.process_time()
        backbone(pixels)
        if i >= WARMUP:
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    backbone.close()
    backend = PortableBackend(bundle, manifest, "cpu", 1, None)
    swalls, scpus = [], []
    for i in range(WARMUP + REPEAT):
        w, c = time.perf_counter(), time.process_time()
        backend.forward(feed)
        backend.step(1e-3, 1e-4)
        if i >= WARMUP:
            swalls.append(time.perf_counter() - w)
            scpus.append(time.process_time() - c)
    n = len(pixels)
    return {
        "frozen_per_image_wall_s": float(np.median(walls)) / n,
        "frozen_per_image_cpu_s": float(np.median(cpus)) / n,
        "step_wall_s": float(np.median(swalls)),
        "step_cpu_s": float(np.median(scpus)),
    }


# The page makes its own random inputs of the same shapes: moving tens of MB through the driver
# would dominate (the timings do not depend on the values).
RANDOM = "const rand = (n) => Float32Array.from({ length: n }, () => Math.random() * 2 - 1);"
PAGE_FROZEN = """async ([shape, runs]) => { RANDOM
  const v = window.vqt, px = rand(shape.reduce((a, b) => a * b, 1)), walls = [];
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    await v.state.frozen.run({ pixel_values: v.tensor(px, shape) });
    walls.push((performance.now() - t) / 1000);
  }
  return walls;
}""".replace("RANDOM", RANDOM)

PAGE_STEP = """async ([shapes, runs]) => { RANDOM
  const v = window.vqt, walls = [];
  const params = Object.fromEntries(Object.entries(v.state.init).map(([k, a]) => [k, new Float32Array(a)]));
  const opt = new v.AdamW(params, v.state.config.trainable_shapes);
  const arrays = Object.fromEntries(Object.entries(shapes).map(([k, s]) => [k, rand(s.reduce((a, b) => a * b, 1))]));
  const b = shapes.targets[0], k = shapes.targets[1];
  arrays.targets.fill(0);
  for (let r = 0; r < b; r++) arrays.targets[r * k + (r % k)] = 1 / b;
  if (arrays.query_keep) arrays.query_keep.fill(1);
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    const out = await v.runStep(params, Object.fromEntries(Object.entries(arrays).map(([k, a]) => [k, v.tensor(a, shapes[k])])));
    opt.step(Object.fromEntries(Object.keys(params).map((k) => [k, out['grad.' + k]])), 1e-3, 1e-4);
    walls.push((performance.now() - t) / 1000);
  }
  return walls;
}""".replace("RANDOM", RANDOM)


def page_side(page, tab: int, pixels: np.ndarray, feed: dict) -> dict:
    """Median wall per call (performance.now()) and the renderer's CPU seconds per call, after WARMUP calls."""
    shapes = {k: list(v.shape) for k, v in feed.items()}
    page.evaluate(PAGE_FROZEN, [list(pixels.shape), WARMUP])
    c0 = cpu_seconds(tab)
    frozen = page.evaluate(PAGE_FROZEN, [list(pixels.shape), REPEAT])
    frozen_cpu = (cpu_seconds(tab) - c0) / REPEAT
    page.evaluate(PAGE_STEP, [shapes, WARMUP])
    c0 = cpu_seconds(tab)
    steps = page.evaluate(PAGE_STEP, [shapes, REPEAT])
    step_cpu = (cpu_seconds(tab) - c0) / REPEAT
    n = len(pixels)
    return {
        "frozen_per_image_wall_s": float(np.median(frozen)) / n,
        "frozen_per_image_cpu_s": frozen_cpu / n,
        "step_wall_s": float(np.median(steps)),
        "step_cpu_s": step_cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from vqt_edge import manifest as mf
    from vqt_edge.web.serve import serve_in_thread
    from vqt_edge.web.site import write_site

    manifest = mf.read_manifest(args.bundle)
    size = manifest.spec.arch.image_size
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(16, 3, size, size)).astype(np.float32)
    feed = feeds(manifest, 32, rng)
    result: dict = {
        "bundle": str(args.bundle),
        "model": manifest.model,
        "threads": 1,
        "frozen_batch": 16,
        "step_batch": 32,
        "load_before": os.getloadavg(),
    }
    result["python"] = python_side(args.bundle, manifest, pixels, feed)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        sizes = write_site(args.bundle, site)
        result["site_mib"] = round(sum(sizes.values()) / 2**20, 2)
        server, url = serve_in_thread(site)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(accept_downloads=True, viewport={"width": 1100, "height": 900})
            page.goto(url + "?threads=1")
            page.wait_for_function("window.vqtReady !== undefined", timeout=120_000)
            assert page.evaluate("window.vqtReady") is True, page.inner_text("#messages")
            tab = max(renderers(), key=cpu_seconds)
            result["page"] = page_side(page, tab, pixels, feed)
            result["page_over_python_cpu"] = {
                k: result["page"][k] / result["python"][k] for k in ("frozen_per_image_cpu_s", "step_cpu_s")
            }
            # A whole run, as a person would: the folder, train, predict, download.
            data = make_task(Path(tmp) / "train", args.per_class, seed=1, size=max(32, size))
            test = make_task(Path(tmp) / "test", 2, seed=2, size=max(32, size))
            page.set_input_files("#folder", str(data))
            page.fill("#epochs", str(args.epochs))
            t, c0 = time.perf_counter(), cpu_seconds(tab)
            page.click("#train")
            page.wait_for_function("!window.vqt.state.busy", timeout=600_000)
            run_wall, run_cpu = time.perf_counter() - t, cpu_seconds(tab) - c0
            report = page.evaluate("window.vqt.state.report")
            timings = page.evaluate("window.vqt.state.timings")
            photos = sorted(test.rglob("*.png"))
            page.set_input_files("#predict-files", [str(x) for x in photos])
            page.wait_for_function(f"window.vqt.state.predictions.length === {len(photos)}", timeout=120_000)
            files = {}
            for button in ("#download-adapter", "#download-config"):
                with page.expect_download() as d:
                    page.click(button)
                target = Path(tmp) / d.value.suggested_filename
                d.value.save_as(target)
                files[target.name] = target.stat().st_size
            steps = timings["step_s"]
            result["page_run"] = {
                "report": report,
                "wall_s": run_wall,
                "renderer_cpu_s": run_cpu,
                "load_s": timings["load_s"],
                "frozen_per_image_wall_s": timings["frozen_per_image_s"],
                "frozen_pass_s": timings["frozen_pass_s"],
                "kv_cache_mib": timings["cache_mib"],
                "step_wall_s_median": float(np.median(steps)),
                "steps": len(steps),
                "renderer_peak_rss_mib": peak_rss_mib(tab),
                "downloads_bytes": files,
            }
            if args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            browser.close()
        server.shutdown()
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
