// The page: photos -> frozen pass (once, K/V kept in memory) -> the portable step graph + AdamW, as
// `vqt-edge train --backend portable` runs them (device_runner/trainer.py): same data order, dropout
// masks, held-out split and learning-rate schedule, drawn from numpy's generator re-implemented here.
import * as ort from "./ort/ort.wasm.min.mjs";
import { AdamW, lrAt, warmupSteps } from "./adamw.js";
import { Generator } from "./numpy_random.js";
import { preprocess, MAX_PIXELS } from "./preprocess.js";
import { parse, serialize } from "./safetensors.js";
import { Store, kvPrefix, runKey, sha256Hex, estimate } from "./store.js";

const IMAGE_EXTENSIONS = new Set([".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"]);
const FROZEN_BATCH = 16;
const MAX_CACHE_BYTES = 2 ** 31 - 1;  // one ArrayBuffer per frozen output; 2 GB is what every browser allows
const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
// Frozen outputs above this many bytes stay in IndexedDB and are read one batch at a time (?kvmem=BYTES).
const KV_MEMORY_BUDGET = Number(query.get("kvmem") ?? 2 ** 30);
// The training position is stored at each epoch's start and at most this often (?checkpoint=SECONDS).
const CHECKPOINT_S = Number(query.get("checkpoint") ?? 2);

ort.env.wasm.wasmPaths = new URL("./ort/", location.href).href;
// Threads need cross-origin isolation (`vqt-edge web --serve` sends the headers); ?threads=N overrides.
ort.env.wasm.numThreads = query.has("threads") ? Number(query.get("threads"))
  : (self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1);

const state = {
  config: null, frozen: null, step: null, init: null,
  classes: new Map(),  // class name -> [{file, path}]
  ignored: 0, busy: false, params: null, classNames: null, losses: [], valAcc: [],
  timings: {}, predictions: [],
  store: null, kvPrefix: null, runKey: null, checkpoint: null,  // IndexedDB (store.js), once load() opened it
};

// -- messages ---------------------------------------------------------------------------------------
function message(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = text;
  $("messages").appendChild(li);
  (kind === "error" ? console.error : console.log)(`[${kind}] ${text}`);
}

function clearMessages() {
  $("messages").replaceChildren();
}

const extension = (name) => { const i = name.lastIndexOf("."); return i < 0 ? "" : name.slice(i).toLowerCase(); };

// -- the model ---------------------------------------------------------------------------------------
async function fetchBytes(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function load() {
  state.config = await (await fetch("./site.json")).json();
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  let t0 = performance.now();
  state.frozen = await ort.InferenceSession.create(await fetchBytes("./bundle/frozen.onnx"), options);
  state.step = await ort.InferenceSession.create(await fetchBytes("./bundle/step.onnx"), options);
  state.timings.load_s = (performance.now() - t0) / 1000;
  const init = parse((await fetchBytes("./bundle/step_init.safetensors")).buffer);
  state.init = Object.fromEntries(Object.entries(init.tensors).map(([k, t]) => [k, t.data]));
  const c = state.config, d = c.defaults;
  $("model").textContent = c.model;
  $("engine").textContent = `onnxruntime-web ${c.ort_web}, WebAssembly, ${ort.env.wasm.numThreads} thread(s).`;
  $("epochs").value = d.epochs; $("batch").value = d.batch_size; $("lr").value = d.lr;
  $("val").value = d.val_split; $("seed").value = d.seed;
  drawPlot();
  state.kvPrefix = await kvPrefix(c);
  state.runKey = runKey(c);
  if (query.get("store") === "0") {  // a shared computer: nothing of the photos stays in the browser
    message("info", "?store=0: nothing is kept in this browser's storage; a reload starts again");
    return;
  }
  try {
    state.store = await Store.open();
    await offerResume();
  } catch (e) {
    storeFailed(e);
  }
}

/** Show the Resume button when this browser holds an unfinished run of this bundle. */
async function offerResume() {
  const run = state.store && await state.store.getRun(state.runKey);
  $("resume").hidden = !run;
  if (!run) return;
  const steps = Math.ceil(run.n / run.settings.batch);
  $("resume").textContent = `Resume the stopped run (epoch ${run.epoch + 1}/${run.settings.epochs}, step ${run.index + 1}/${steps}, `
    + `${run.rowKeys.length} photos, saved ${run.savedAt.replace("T", " ").slice(0, 19)} UTC)`;
}

function tensor(data, dims) {
  return new ort.Tensor("float32", data, dims);
}

/** One call of the step graph; `fetches` null: every output. */
async function runStep(params, feeds, fetches = null) {
  const all = {};
  for (const [n, shape] of Object.entries(state.config.trainable_shapes)) all[n] = tensor(params[n], shape);
  Object.assign(all, feeds);
  const out = fetches ? await state.step.run(all, fetches) : await state.step.run(all);
  return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, v.data]));
}

/** The frozen pass on a batch of preprocessed images: {name: Float32Array [B, ...shape]}. */
async function runFrozen(pixels) {
  const s = state.config.image_size, per = 3 * s * s;
  const batch = new Float32Array(pixels.length * per);
  pixels.forEach((p, i) => batch.set(p, i * per));
  const out = await state.frozen.run({ pixel_values: tensor(batch, [pixels.length, 3, s, s]) });
  return Object.fromEntries(Object.keys(state.config.frozen_outputs).map((n) => [n, out[n].data]));
}

const prod = (shape) => shape.reduce((a, b) => a * b, 1);

/** The K/V cache, row `index` per photo: in memory, one typed array per frozen output, fp16 where the
 *  Python cache keeps fp16 (spec.CACHE_DTYPES), so the step sees the same rounded values as `vqt-edge
 *  train`; or, above the page's memory budget, only in IndexedDB, read back one batch at a time.
 *  Either way each photo's row is written to IndexedDB (store.js) when there is one, so a reload resumes. */
class Cache {
  constructor(keys, inMemory) {
    const n = keys.length;
    this.keys = keys;  // IndexedDB key of each row
    this.sizes = {};
    this.types = {};
    this.arrays = null;
    this.store = null;  // IndexedDB, where rows not held in memory are read from
    for (const [name, { shape, cache_dtype }] of Object.entries(state.config.frozen_outputs)) {
      this.sizes[name] = prod(shape);
      if (cache_dtype === "float16" && !self.Float16Array) throw new Error("this browser has no Float16Array; use a current Chromium or Firefox");
      this.types[name] = cache_dtype === "float16" ? Float16Array : Float32Array;
    }
    if (inMemory) this.allocate(n);
  }

  static bytesPerImage() {
    return Object.values(state.config.frozen_outputs).reduce(
      (a, { shape, cache_dtype }) => a + prod(shape) * (cache_dtype === "float16" ? 2 : 4), 0);
  }

  allocate(n) {
    this.arrays = {};
    for (const [name, Type] of Object.entries(this.types)) {
      const bytes = n * this.sizes[name] * Type.BYTES_PER_ELEMENT;
      try {
        if (bytes > MAX_CACHE_BYTES) throw new RangeError();
        this.arrays[name] = new Type(n * this.sizes[name]);
      } catch (e) {
        this.arrays = null;
        if (!(e instanceof RangeError)) throw e;
        throw new Error(`the frozen outputs of ${n} photos need ${(bytes / 2 ** 30).toFixed(1)} GiB for "${name}" alone, more than this tab can hold: `
          + "use fewer photos, or export a bundle with fewer query layers (vqt-edge export --query-layers)");
      }
    }
  }

  /** Store photo k of a frozen batch's outputs as row `index`; returns the row as IndexedDB keeps it. */
  put(index, outputs, k) {
    const row = {};
    for (const [name, data] of Object.entries(outputs)) {
      const size = this.sizes[name], src = data.subarray(k * size, (k + 1) * size);
      if (this.arrays) {
        this.arrays[name].set(src, index * size);
        row[name] = this.arrays[name].slice(index * size, (index + 1) * size).buffer;
      } else {
        row[name] = new this.types[name](src).buffer;
      }
    }
    return row;
  }

  /** A row read back from IndexedDB, into memory. */
  load(index, row) {
    for (const [name, buffer] of Object.entries(row)) this.arrays[name].set(new this.types[name](buffer), index * this.sizes[name]);
  }

  /** fp32 feeds for these cache rows. */
  async gather(rows) {
    const stored = this.arrays ? null : await this.store.getRows(rows.map((r) => this.keys[r]));
    if (stored?.includes(undefined))
      throw new Error("the browser's storage no longer holds some photos' frozen outputs (deleted or evicted): choose the photos and Train again");
    const feeds = {};
    for (const [name, { shape }] of Object.entries(state.config.frozen_outputs)) {
      const size = this.sizes[name], out = new Float32Array(rows.length * size);
      if (stored) stored.forEach((row, i) => out.set(new this.types[name](row[name]), i * size));
      else rows.forEach((r, i) => out.set(this.arrays[name].subarray(r * size, (r + 1) * size), i * size));
      feeds[name] = tensor(out, [rows.length, ...shape]);
    }
    return feeds;
  }

  bytes() {
    return this.arrays ? Object.values(this.arrays).reduce((a, x) => a + x.byteLength, 0) : 0;
  }
}

/** Stop using IndexedDB for the rest of this page's life, saying why and what it means. */
function storeFailed(e) {
  state.store = null;
  if (state.storeFailed) return;  // said once
  state.storeFailed = true;
  message("warning", `${e.message}: the frozen outputs and the training position are kept in memory only, `
    + "so a reload of this page will run the frozen pass and the training again"
    + (e.quota ? " (free space for this site in the browser's settings, or use fewer photos)" : ""));
}

/** A cache for these row keys, filled from IndexedDB where it holds them: in memory when it fits the
 *  page's budget (?kvmem=BYTES; 1 GiB), else left in IndexedDB. Returns [cache, set of rows found]. */
async function openCache(keys) {
  const need = keys.length * Cache.bytesPerImage();
  let found = new Array(keys.length).fill(false);
  if (state.store) {
    try { found = await state.store.has(keys); } catch (e) { storeFailed(e); }
  }
  const cache = new Cache(keys, !state.store || need <= KV_MEMORY_BUDGET);
  cache.store = state.store;  // kept for reads even if a later write fails and the page stops writing
  if (!cache.arrays) message("info", `the frozen outputs of ${keys.length} photos (${(need / 2 ** 20).toFixed(0)} MiB) are above this page's `
    + `memory budget (${(KV_MEMORY_BUDGET / 2 ** 20).toFixed(0)} MiB): each batch is read from the browser's storage`);
  if (cache.arrays) {
    const rows = found.flatMap((f, i) => (f ? [i] : []));
    for (let s = 0; s < rows.length; s += 64) {
      const chunk = rows.slice(s, s + 64);
      (await state.store.getRows(chunk.map((i) => keys[i]))).forEach((row, j) => (row ? cache.load(chunk[j], row) : (found[chunk[j]] = false)));
    }
  }
  return [cache, new Set(found.flatMap((f, i) => (f ? [i] : [])))];
}

// -- the photos --------------------------------------------------------------------------------------
function addFile(cls, file, path) {
  if (!state.classes.has(cls)) state.classes.set(cls, []);
  if (file === null) return;  // an empty class folder (a dropped folder shows those)
  const base = path.split("/").pop();
  if (base.startsWith(".") || !IMAGE_EXTENSIONS.has(extension(base))) { state.ignored++; return; }
  state.classes.get(cls).push({ file, path });
}

function addFolderFiles(files) {
  let loose = 0;
  for (const file of files) {
    const parts = (file.webkitRelativePath || file.name).split("/");
    if (parts.length < 3 || parts.slice(1, -1).some((p) => p.startsWith("."))) { loose++; continue; }
    addFile(parts[1], file, parts.slice(1).join("/"));
  }
  if (loose) message("warning", `${loose} file(s) not inside a class sub-folder were ignored`);
  showClasses();
}

async function readEntry(entry, cls, prefix) {
  if (entry.isFile) {
    const file = await new Promise((ok, fail) => entry.file(ok, fail));
    addFile(cls, file, `${prefix}${entry.name}`);
    return;
  }
  if (entry.name.startsWith(".")) return;
  if (cls !== null) addFile(cls, null, "");
  const reader = entry.createReader();
  for (;;) {
    const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
    if (!batch.length) break;
    for (const child of batch) {
      await readEntry(child, cls ?? entry.name, cls === null ? `${entry.name}/` : `${prefix}${entry.name}/`);
    }
  }
}

async function dropData(event) {
  event.preventDefault();
  $("data-drop").classList.remove("over");
  const entries = [...event.dataTransfer.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  for (const root of entries) {
    if (!root.isDirectory) { message("warning", `${root.name}: drop a folder of class folders, or use "photos of one class"`); continue; }
    const reader = root.createReader();
    for (;;) {
      const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
      if (!batch.length) break;
      for (const child of batch) if (child.isDirectory && !child.name.startsWith(".")) await readEntry(child, null, "");
    }
  }
  showClasses();
}

function showClasses(updateStatus = true) {
  const rows = [...state.classes.keys()].sort().map((c) => `<tr><td>${escapeHtml(c)}</td><td>${state.classes.get(c).length} photo(s)</td></tr>`);
  $("classes").innerHTML = rows.length ? `<tr><th>class</th><th>photos</th></tr>${rows.join("")}` : "";
  if (state.ignored) $("classes").innerHTML += `<tr><td colspan="2" class="muted">${state.ignored} file(s) without an image extension ignored</td></tr>`;
  const problem = dataProblem();
  $("train").disabled = state.busy || problem !== null;
  if (updateStatus) $("status").textContent = problem ?? `${countPhotos()} photos in ${state.classes.size} classes: ready to train.`;
}

const countPhotos = () => [...state.classes.values()].reduce((a, l) => a + l.length, 0);

/** Why the photos cannot be trained on as they are, or null (vqt_edge's load_dataset rules). */
function dataProblem(classes = state.classes) {
  const n = state.config?.num_classes;
  if (!classes.size) return "Choose photos to start.";
  const empty = [...classes.keys()].sort().filter((c) => !classes.get(c).length);
  if (empty.length) return `class ${empty.map((c) => `"${c}"`).join(", ")} has no usable photos: add photos or remove the class`;
  if (classes.size < 2) return `training needs at least 2 classes, found ${classes.size}`;
  if (n && classes.size !== n) return `${classes.size} classes, but this model was exported for ${n} (export it again with --num-classes ${classes.size})`;
  const names = state.config?.class_names;
  if (names && JSON.stringify([...classes.keys()].sort()) !== JSON.stringify(names))
    return `classes ${JSON.stringify([...classes.keys()].sort())} differ from the model's ${JSON.stringify(names)}`;
  return null;
}

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// -- training ----------------------------------------------------------------------------------------
function settings() {
  const s = {
    epochs: Number($("epochs").value), batch: Number($("batch").value), lr: Number($("lr").value),
    val: Number($("val").value), seed: Number($("seed").value), weightDecay: state.config.defaults.weight_decay,
  };
  if (!(Number.isInteger(s.epochs) && s.epochs >= 1 && Number.isInteger(s.batch) && s.batch >= 1))
    throw new Error("epochs and batch must be whole numbers of at least 1");
  if (!(s.lr > 0)) throw new Error("lr must be positive");
  if (!(s.val >= 0 && s.val < 1)) throw new Error("held out must be in [0, 1)");
  if (!(Number.isInteger(s.seed) && s.seed >= 0)) throw new Error("seed must be a non-negative whole number");
  return s;
}

/** device_runner/data.split: per class c, default_rng([seed, c]).permutation of its members, the first n_val held out. */
function split(labels, classes, fraction, seed) {
  const held = new Set();
  for (let c = 0; c < classes; c++) {
    const members = labels.flatMap((l, i) => (l === c ? [i] : []));
    const nVal = Math.min(Math.floor(fraction * members.length + 0.5), members.length - 1);
    if (nVal > 0) new Generator([seed, c]).permutation(members.length).slice(0, nVal).forEach((k) => held.add(members[k]));
  }
  return held;
}

/** Dropout mask of one step, already scaled by 1 / (1 - p): trainer._keep_mask. */
function keepMask(b, rng) {
  const shape = state.config.query_keep_shape, p = state.config.dropout, n = b * prod(shape);
  const out = new Float32Array(n);
  if (rng === null || p === 0) return out.fill(1);
  const scale = Math.fround(1 / Math.fround(1 - p));
  for (let i = 0; i < n; i++) out[i] = rng.random() >= p ? scale : 0;
  return out;
}

function targets(labels, weight) {
  const k = state.config.num_classes, out = new Float32Array(labels.length * k);
  labels.forEach((l, i) => { out[i * k + l] = weight; });
  return out;
}

async function evaluate(cache, rows, batch) {
  const logits = [];
  for (let s = 0; s < rows.length; s += batch) {
    const r = rows.slice(s, s + batch);
    const feeds = await cache.gather(r);
    if (state.config.query_keep_shape) feeds.query_keep = tensor(keepMask(r.length, null), [r.length, ...state.config.query_keep_shape]);
    feeds.targets = tensor(new Float32Array(r.length * state.config.num_classes), [r.length, state.config.num_classes]);
    const out = await runStep(state.params, feeds, ["loss", "logits"]);
    logits.push(out.logits);
  }
  return logits;
}

function argmaxRows(chunks, k) {
  const out = [];
  for (const l of chunks) for (let i = 0; i < l.length / k; i++) {
    let best = 0;
    for (let j = 1; j < k; j++) if (l[i * k + j] > l[i * k + best]) best = j;
    out.push(best);
  }
  return out;
}

const tick = () => new Promise((ok) => setTimeout(ok, 0));

/** Train: the frozen pass for the photos IndexedDB does not hold yet, then a new run from step 0. */
async function train() {
  clearMessages();
  const s = settings();
  const cfg = state.config, k = cfg.num_classes;
  setBusy(true);
  resetRun();
  // Every photo, classes in sorted order and files sorted by path within each, as load_dataset lists them.
  const classNames = [...state.classes.keys()].sort();
  const listed = classNames.flatMap((c, label) =>
    [...state.classes.get(c)].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0)).map((x) => ({ ...x, label, cls: c })));
  // Each photo's key: the bundle's prefix and the sha256 of the file's bytes, as the Python disk cache.
  const t0 = performance.now();
  const keys = [];
  for (const x of listed) {
    try { keys.push(`${state.kvPrefix}/${await sha256Hex(await x.file.arrayBuffer())}`); } catch { keys.push(""); }  // "": unreadable
  }
  const [cache, cached] = await openCache(keys);
  state.timings.cached_images = cached.size;
  // Frozen pass once, for the photos not cached: decode, preprocess, run; unreadable photos are skipped with a message.
  const ok = [], written = new Set(cached);
  let pending = [], frozenImages = 0, frozenSeconds = 0;
  const flush = async () => {
    if (!pending.length) return;
    const t = performance.now();
    const out = await runFrozen(pending.map((p) => p.pixels));
    frozenSeconds += (performance.now() - t) / 1000;
    frozenImages += pending.length;
    const rows = pending.map((p, i) => [keys[p.index], cache.put(p.index, out, i)]);
    if (state.store) {
      try {
        await state.store.putRows(rows);
        pending.forEach((p) => written.add(p.index));
      } catch (e) {
        if (!cache.arrays) {  // rows were only in IndexedDB: bring those it holds into memory, then this batch
          cache.allocate(keys.length);
          for (const i of written) cache.load(i, (await cache.store.getRows([keys[i]]))[0]);
          pending.forEach((p, i) => cache.load(p.index, rows[i][1]));
        }
        storeFailed(e);
      }
    }
    pending = [];
  };
  for (let i = 0; i < listed.length; i++) {
    if (cached.has(i)) { ok.push(i); continue; }
    try {
      if (!keys[i]) throw new Error("the browser cannot read this file");
      const pixels = await preprocess(listed[i].file, cfg.image_size, cfg.mean, cfg.std);
      pending.push({ index: i, pixels });
      ok.push(i);
    } catch (e) {
      message("warning", `cannot read image ${listed[i].path}: ${e.message} (skipped)`);
    }
    if (pending.length === FROZEN_BATCH) await flush();
    progress((i + 1) / listed.length, `frozen pass: ${i + 1}/${listed.length} photos`);
    if (i % 4 === 3) await tick();
  }
  await flush();
  state.timings.frozen_images = frozenImages;
  state.timings.frozen_per_image_s = frozenSeconds / Math.max(1, frozenImages);
  state.timings.frozen_pass_s = (performance.now() - t0) / 1000;
  state.timings.cache_mib = cache.bytes() / 2 ** 20;
  state.timings.kv_in_memory = cache.arrays !== null;
  const usable = new Map(classNames.map((c) => [c, []]));
  for (const i of ok) usable.get(listed[i].cls).push(listed[i]);
  const problem = dataProblem(usable);
  if (problem) throw new Error(problem);
  if (cached.size) message("info", `${cached.size} of ${listed.length} photos' frozen outputs were read from this browser's storage (no frozen pass for them)`);
  // Held-out split over the usable photos, then rows: training photos first, in order, then held out.
  const labels = ok.map((i) => listed[i].label);
  const held = split(labels, k, s.val, s.seed);
  const trainIdx = ok.filter((_, j) => !held.has(j)), valIdx = ok.filter((_, j) => held.has(j));
  const rows = [...trainIdx, ...valIdx];
  const run = {
    settings: s, classNames, n: trainIdx.length, rows, rowLabels: rows.map((i) => listed[i].label),
    rowKeys: rows.map((i) => keys[i]), skipped: listed.length - ok.length,
    epoch: 0, index: 0, t: 0, params: null, expAvg: null, expAvgSq: null,
    losses: [], valAcc: [], lossSum: 0, correct: 0, seen: 0,
  };
  await fit(run, cache);
}

/** Resume: the stored run continues from its checkpoint; its frozen outputs come from IndexedDB, so
 *  neither the frozen pass nor the photos are needed (the browser cannot re-read them after a reload). */
async function resume() {
  clearMessages();
  setBusy(true);
  resetRun();
  const t0 = performance.now();
  const run = state.store && await state.store.getRun(state.runKey);
  if (!run) throw new Error("there is no stored run to resume");
  const unique = [...new Set(run.rowKeys)];
  const [cache, found] = await openCache(unique);
  if (found.size < unique.length)
    throw new Error(`${unique.length - found.size} photos' frozen outputs are no longer in this browser's storage: choose the photos and Train again`);
  const slot = new Map(unique.map((key, i) => [key, i]));
  run.rows = run.rowKeys.map((key) => slot.get(key));
  Object.assign(state.timings, { resume_load_s: (performance.now() - t0) / 1000, cached_images: found.size, frozen_images: 0,
    cache_mib: cache.bytes() / 2 ** 20, kv_in_memory: cache.arrays !== null });
  for (const [id, v] of [["epochs", run.settings.epochs], ["batch", run.settings.batch], ["lr", run.settings.lr], ["val", run.settings.val], ["seed", run.settings.seed]]) $(id).value = v;
  message("info", `resumed at epoch ${run.epoch + 1}, step ${run.index + 1}: ${unique.length} photos' frozen outputs read from this browser's storage in ${state.timings.resume_load_s.toFixed(2)} s`);
  await fit(run, cache);
}

function resetRun() {
  state.losses = []; state.valAcc = []; state.params = null; state.report = null; state.checkpoint = null;
  $("result").textContent = "";
  $("resume").hidden = true;
}

/** The stored run's checkpoint: where training stands, exactly (the generators are keyed by [seed,
 *  epoch(, step)], so the position is their state too). One per bundle: a new Train replaces it. */
async function saveCheckpoint(run, optimizer) {
  if (!state.store) return;
  const { rows, ...stored } = run;  // rows index this page's cache; rowKeys name them for any page
  try {
    await state.store.putRun(state.runKey, {
      ...stored, t: optimizer.t, params: state.params, expAvg: optimizer.expAvg, expAvgSq: optimizer.expAvgSq,
      losses: state.losses, valAcc: state.valAcc, savedAt: new Date().toISOString(),
    });
    state.checkpoint = { epoch: run.epoch, index: run.index, step: run.epoch * Math.ceil(run.n / run.settings.batch) + run.index };
  } catch (e) {
    storeFailed(e);
  }
}

/** The loop of Trainer.fit, from the run's position (0 for a new run). */
async function fit(run, cache) {
  const cfg = state.config, k = cfg.num_classes, s = run.settings, n = run.n;
  const { rows, rowLabels } = run, valRows = rows.slice(n), valLabels = rowLabels.slice(n);
  state.params = run.params ?? Object.fromEntries(Object.entries(state.init).map(([name, a]) => [name, new Float32Array(a)]));
  const optimizer = new AdamW(state.params, cfg.trainable_shapes);
  if (run.expAvg) Object.assign(optimizer, { expAvg: run.expAvg, expAvgSq: run.expAvgSq, t: run.t });
  state.losses = run.losses; state.valAcc = run.valAcc;
  const stepsPerEpoch = Math.ceil(n / s.batch), total = stepsPerEpoch * s.epochs;
  const warmup = warmupSteps(s.epochs, stepsPerEpoch);
  const stepTimes = [];
  let lastSave = -Infinity;
  drawPlot(total);
  for (; run.epoch < s.epochs; run.epoch++, run.index = 0, run.lossSum = run.correct = run.seen = 0) {
    const epoch = run.epoch, order = new Generator([s.seed, epoch]).permutation(n);
    for (; run.index < stepsPerEpoch; run.index++) {
      const index = run.index;
      if (index === 0 || performance.now() - lastSave >= CHECKPOINT_S * 1000) {
        await saveCheckpoint(run, optimizer);
        lastSave = performance.now();
      }
      const t = performance.now();
      const batchRows = order.slice(index * s.batch, (index + 1) * s.batch);
      const b = batchRows.length, labelsB = batchRows.map((r) => rowLabels[r]);
      const feeds = await cache.gather(batchRows.map((r) => rows[r]));
      if (cfg.query_keep_shape) feeds.query_keep = tensor(keepMask(b, new Generator([s.seed, epoch, index])), [b, ...cfg.query_keep_shape]);
      feeds.targets = tensor(targets(labelsB, Math.fround(1 / b)), [b, k]);
      const out = await runStep(state.params, feeds);
      const grads = Object.fromEntries(Object.keys(cfg.trainable_shapes).map((name) => [name, out[`grad.${name}`]]));
      const g = epoch * stepsPerEpoch + index;
      optimizer.step(grads, lrAt(g, total, warmup, s.lr), s.weightDecay);
      stepTimes.push((performance.now() - t) / 1000);
      const loss = out.loss[0];
      run.lossSum += loss * b; run.seen += b;
      run.correct += argmaxRows([out.logits], k).filter((p, i) => p === labelsB[i]).length;
      state.losses.push(loss);
      progress((g + 1) / total, `epoch ${epoch + 1}/${s.epochs}, step ${index + 1}/${stepsPerEpoch}: loss ${(run.lossSum / run.seen).toFixed(4)}, acc ${(run.correct / run.seen).toFixed(3)}`);
      drawPlot(total);
      await tick();
    }
    if (valRows.length) {
      const pred = argmaxRows(await evaluate(cache, valRows, s.batch), k);
      state.valAcc.push([(epoch + 1) * stepsPerEpoch, pred.filter((p, i) => p === valLabels[i]).length / valRows.length]);
      drawPlot(total);
    }
  }
  if (state.store) {
    try { await state.store.deleteRun(state.runKey); } catch (e) { storeFailed(e); }
  }
  state.timings.step_s = stepTimes;
  state.classNames = run.classNames;
  state.report = { train_images: n, val_images: valRows.length, skipped: run.skipped, final_loss: state.losses.at(-1),
                   val_acc: state.valAcc.length ? state.valAcc.at(-1)[1] : null, steps: total };
  const acc = state.report.val_acc;
  $("result").textContent = acc === null ? `trained on ${n} photos (none held out)`
    : `held-out accuracy ${(100 * acc).toFixed(1)}% (${valRows.length} photos), trained on ${n}`;
  $("status").textContent = `done: ${total} steps, ${(stepTimes.reduce((a, b) => a + b, 0) / Math.max(1, stepTimes.length)).toFixed(4)} s per step`;
  $("download-adapter").disabled = $("download-config").disabled = false;
}

function progress(fraction, text) {
  $("bar").value = fraction;
  $("status").textContent = text;
}

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["train", "resume", "forget", "folder", "class-files", "clear"]) $(id).disabled = busy;
  if (!busy) showClasses(false);
}

function drawPlot(total = 1) {
  const canvas = $("plot"), ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 34;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#999"; ctx.strokeRect(pad, 8, w - 2 * pad, h - pad);
  ctx.fillStyle = "#555"; ctx.font = "12px sans-serif";
  ctx.fillText("loss", 2, 16); ctx.fillText("held-out acc", w - 90, 16); ctx.fillText(`steps (${total})`, w / 2 - 30, h - 6);
  const x = (i) => pad + ((w - 2 * pad) * i) / Math.max(1, total);
  const maxLoss = Math.max(1e-9, ...state.losses);
  ctx.fillText(maxLoss.toFixed(2), 2, 28);
  ctx.strokeStyle = "#d9480f"; ctx.beginPath();
  state.losses.forEach((l, i) => { const y = 8 + (h - pad) * (1 - l / maxLoss); i ? ctx.lineTo(x(i + 1), y) : ctx.moveTo(x(i + 1), y); });
  ctx.stroke();
  ctx.fillStyle = "#1971c2";
  for (const [step, acc] of state.valAcc) {
    ctx.beginPath(); ctx.arc(x(step), 8 + (h - pad) * (1 - acc), 4, 0, 2 * Math.PI); ctx.fill();
  }
}

// -- results -----------------------------------------------------------------------------------------
function adapterBytes() {
  const tensors = Object.fromEntries(Object.entries(state.config.trainable_shapes).map(([n, shape]) => [n, { shape, data: state.params[n] }]));
  return serialize(tensors, state.config.adapter_metadata);
}

function adapterConfig() {
  return JSON.stringify({ ...state.config.adapter_config, class_names: state.classNames }, null, 2) + "\n";
}

function download(name, bytes, type) {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  const a = document.createElement("a");
  a.href = url; a.download = name;
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Logits of each photo with the trained adapter: frozen outputs in fp32, as model.onnx computes them. */
async function predictFiles(files) {
  if (!state.params) { message("error", "train first: there is no adapter to predict with yet"); return; }
  const cfg = state.config, k = cfg.num_classes, rows = [];
  for (const file of files) {
    try {
      const pixels = await preprocess(file, cfg.image_size, cfg.mean, cfg.std);
      const feeds = await runFrozen([pixels]);
      const all = Object.fromEntries(Object.entries(cfg.frozen_outputs).map(([n, { shape }]) => [n, tensor(feeds[n], [1, ...shape])]));
      if (cfg.query_keep_shape) all.query_keep = tensor(keepMask(1, null), [1, ...cfg.query_keep_shape]);
      all.targets = tensor(new Float32Array(k), [1, k]);
      const logits = Array.from((await runStep(state.params, all, ["loss", "logits"])).logits);
      const top = Math.max(...logits), e = logits.map((l) => Math.exp(l - top)), z = e.reduce((a, b) => a + b, 0);
      const best = logits.indexOf(top);
      const p = { name: file.name, label: state.classNames[best], probability: e[best] / z, logits };
      state.predictions.push(p);
      rows.push(`<tr><td>${escapeHtml(file.name)}</td><td><b>${escapeHtml(p.label)}</b></td><td>${(100 * p.probability).toFixed(1)}%</td></tr>`);
    } catch (e) {
      message("warning", `cannot read image ${file.name}: ${e.message}`);
    }
  }
  $("predictions").innerHTML += rows.join("");
}

// -- wiring ------------------------------------------------------------------------------------------
function guard(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      message("error", e.message || String(e));
      $("status").textContent = `stopped: ${e.message || e}`;
      await offerResume().catch(() => {});  // a stored run (this one's or an earlier one's) can still go on
    } finally {
      if (state.busy) setBusy(false);
    }
  };
}

function wire() {
  $("folder").addEventListener("change", (e) => { addFolderFiles(e.target.files); e.target.value = ""; });
  $("class-files").addEventListener("change", (e) => {
    const name = $("class-name").value.trim();
    if (!name) { message("error", "name the class first, then choose its photos"); e.target.value = ""; return; }
    for (const f of e.target.files) addFile(name, f, `${name}/${f.name}`);
    e.target.value = "";
    showClasses();
  });
  $("clear").addEventListener("click", () => { state.classes.clear(); state.ignored = 0; clearMessages(); showClasses(); });
  $("train").addEventListener("click", guard(train));
  $("resume").addEventListener("click", guard(resume));
  $("forget").addEventListener("click", guard(async () => {
    if (state.store) await state.store.clear();
    $("resume").hidden = true;
    message("info", "the frozen outputs and the training position stored by this page are deleted");
  }));
  $("download-adapter").addEventListener("click", () => download("adapter.safetensors", adapterBytes(), "application/octet-stream"));
  $("download-config").addEventListener("click", () => download("adapter_config.json", adapterConfig(), "application/json"));
  $("predict-files").addEventListener("change", guard(async (e) => { await predictFiles([...e.target.files]); e.target.value = ""; }));
  for (const [id, handler] of [["data-drop", guard(dropData)], ["predict-drop", guard((e) => { e.preventDefault(); $("predict-drop").classList.remove("over"); return predictFiles([...e.dataTransfer.files]); })]]) {
    $(id).addEventListener("dragover", (e) => { e.preventDefault(); $(id).classList.add("over"); });
    $(id).addEventListener("dragleave", () => $(id).classList.remove("over"));
    $(id).addEventListener("drop", handler);
  }
}

// Tests and benchmarks reach the page's pieces here (tests/test_web.py).
window.vqt = { ort, state, estimate, preprocess, AdamW, lrAt, warmupSteps, Generator, runStep, runFrozen, tensor, adapterBytes, adapterConfig, MAX_PIXELS };
wire();
load().then(() => { window.vqtReady = true; showClasses(); }, (e) => { message("error", `cannot load the model: ${e.message || e}`); window.vqtReady = "failed"; });
