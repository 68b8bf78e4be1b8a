"""onnxruntime-web's WebGPU execution provider against its WASM one on a bundle, in headless Chromium.

A probe, not the page: the page uses WASM only (docs/browser.md). Headless Debian Chromium on a
machine without a GPU exposes WebGPU only through SwiftShader (Vulkan emulated on the CPU), so on
such a machine this measures that emulation, not a GPU. Same random feeds to both: the frozen pass
(batch 16) and the step graph (batch 32), medians of 10 after 3, wall seconds, and the largest
difference of every output relative to its largest value. One WASM thread.

    nice -n 10 .venv/bin/python bench/web_webgpu_probe.py --bundle B --out bench/results/web_webgpu_vit_fmnist.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import CHROMIUM, CHROMIUM_ARGS

PROBE = r"""
import * as ort from "./ort/ort.webgpu.bundle.min.mjs";
ort.env.wasm.numThreads = 1;
ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
const cfg = await (await fetch("./site.json")).json();
const bytes = async (p) => new Uint8Array(await (await fetch(p)).arrayBuffer());
const frozenBytes = await bytes("./bundle/frozen.onnx"), stepBytes = await bytes("./bundle/step.onnx");
const prod = (s) => s.reduce((a, b) => a * b, 1);
let seed = 1; const rnd = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 - 0.5; };
const fill = (n) => Float32Array.from({ length: n }, rnd);
const S = cfg.image_size;
const pixels = new ort.Tensor("float32", fill(16 * 3 * S * S), [16, 3, S, S]);
const stepFeeds = {};
for (const [n, s] of Object.entries(cfg.trainable_shapes)) stepFeeds[n] = new ort.Tensor("float32", fill(prod(s)).map((x) => x * 0.04), s);
for (const [n, { shape }] of Object.entries(cfg.frozen_outputs)) stepFeeds[n] = new ort.Tensor("float32", fill(32 * prod(shape)), [32, ...shape]);
if (cfg.query_keep_shape) stepFeeds.query_keep = new ort.Tensor("float32", new Float32Array(32 * prod(cfg.query_keep_shape)).fill(1), [32, ...cfg.query_keep_shape]);
const t = new Float32Array(32 * cfg.num_classes); for (let i = 0; i < 32; i++) t[i * cfg.num_classes + (i % cfg.num_classes)] = 1 / 32;
stepFeeds.targets = new ort.Tensor("float32", t, [32, cfg.num_classes]);
const out = {};
for (const ep of ["wasm", "webgpu"]) {
  try {
    const o = { executionProviders: [ep], graphOptimizationLevel: "all" };
    const fz = await ort.InferenceSession.create(frozenBytes, o), st = await ort.InferenceSession.create(stepBytes, o);
    const time = async (sess, feeds, reps) => { let r; for (let i = 0; i < 3; i++) r = await sess.run(feeds);
      const ts = []; for (let i = 0; i < reps; i++) { const a = performance.now(); r = await sess.run(feeds); ts.push(performance.now() - a); }
      ts.sort((a, b) => a - b); return [ts[ts.length >> 1] / 1000, Object.fromEntries(Object.entries(r).map(([k, v]) => [k, Array.from(v.data)]))]; };
    const [fs, fo] = await time(fz, { pixel_values: pixels }, 10);
    const [ss, so] = await time(st, stepFeeds, 10);
    out[ep] = { frozen_batch16_s: fs, step_batch32_s: ss, fo, so };
  } catch (e) { out[ep] = { error: String(e) }; }
}
const diff = {};
if (out.wasm.fo && out.webgpu.fo) for (const k of ["fo", "so"]) for (const [n, a] of Object.entries(out.wasm[k])) {
  const b = out.webgpu[k][n]; let m = 0, mx = 0; for (let i = 0; i < a.length; i++) { m = Math.max(m, Math.abs(a[i] - b[i])); mx = Math.max(mx, Math.abs(a[i])); }
  diff[n] = m / Math.max(mx, 1e-12);
}
for (const ep of Object.keys(out)) { delete out[ep].fo; delete out[ep].so; }
const a = await navigator.gpu?.requestAdapter();
window.result = { out, max_rel_diff: diff, adapter: a ? JSON.stringify({ vendor: a.info?.vendor, arch: a.info?.architecture, desc: a.info?.description }) : null };
"""
ORT_EXTRA = ("ort.webgpu.bundle.min.mjs", "ort-wasm-simd-threaded.jsep.wasm", "ort-wasm-simd-threaded.jsep.mjs",
             "ort-wasm-simd-threaded.asyncify.wasm", "ort-wasm-simd-threaded.asyncify.mjs")  # fmt: skip
WEBGPU_ARGS = ["--enable-unsafe-webgpu", "--enable-unsafe-swiftshader", "--use-webgpu-adapter=swiftshader"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from vqt_edge.web.serve import serve_in_thread
    from vqt_edge.web.site import ort_dist, write_site

    result: dict = {"bundle": str(args.bundle), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        write_site(args.bundle, site)
        for name in ORT_EXTRA:
            shutil.copyfile(ort_dist() / name, site / "ort" / name)
        (site / "probe.mjs").write_text(PROBE)
        (site / "probe.html").write_text('<!doctype html><script type="module" src="./probe.mjs"></script>')
        server, url = serve_in_thread(site)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=[a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + WEBGPU_ARGS
            )
            page = browser.new_page()
            page.goto(url + "probe.html")
            page.wait_for_function("window.result !== undefined", timeout=600_000)
            result.update(page.evaluate("window.result"))
            browser.close()
        server.shutdown()
    result["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
