// The page's IndexedDB: each photo's frozen outputs (K/V) and the checkpoint of the run in progress,
// so a reload (or a closed tab) skips the frozen pass and continues training where it stopped.
// K/V are keyed as the Python disk cache keys them (device_runner/features.py): the frozen graph's
// sha256 and output names, plus the preprocessing (size, mean/std), plus the photo's own sha256,
// so a changed photo or another bundle never gets stale rows. Storage failures (quota, private
// windows without IndexedDB) raise StoreError; the page then keeps everything in memory only.

const DB_NAME = "vqt-edge";
const DB_VERSION = 1;
//: Bump when the page's decoding or resizing changes: cached rows of the old code are then not reused.
export const PREPROCESS_VERSION = 1;

export class StoreError extends Error {
  constructor(message, quota) {
    super(message);
    this.quota = quota;
  }
}

const isQuota = (e) => e && (e.name === "QuotaExceededError" || /quota/i.test(e.message || ""));

function wrap(e, what) {
  if (e instanceof StoreError) return e;
  return isQuota(e)
    ? new StoreError(`the browser's storage for this page is full (QuotaExceededError) while ${what}`, true)
    : new StoreError(`the browser's storage failed while ${what}: ${e?.message || e?.name || e}`, false);
}

export async function sha256Hex(bytes) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The key prefix of a bundle's K/V rows: what the frozen pass's output depends on besides the photo. */
export async function kvPrefix(config) {
  const id = [config.bundle_sha256.frozen, Object.keys(config.frozen_outputs).join(","), config.image_size,
    config.mean.join(","), config.std.join(","), PREPROCESS_VERSION].join("|");
  return (await sha256Hex(new TextEncoder().encode(id))).slice(0, 16);
}

/** What a checkpoint depends on besides the photos and settings: the frozen graph, step graph, initial trainables. */
export const runKey = (config) => [config.bundle_sha256.frozen, config.bundle_sha256.step, config.bundle_sha256.step_init].join("|");

const done = (request) => new Promise((ok, fail) => { request.onsuccess = () => ok(request.result); request.onerror = () => fail(request.error); });
const finished = (tx) => new Promise((ok, fail) => {
  tx.oncomplete = () => ok();
  tx.onerror = () => fail(tx.error);
  tx.onabort = () => fail(tx.error || new DOMException("transaction aborted", "AbortError"));
});

export class Store {
  static async open() {
    if (!self.indexedDB) throw new StoreError("this browser gives the page no IndexedDB", false);
    try {
      const request = indexedDB.open(DB_NAME, DB_VERSION);
      request.onupgradeneeded = () => {
        request.result.createObjectStore("kv");
        request.result.createObjectStore("runs");
      };
      const db = await done(request);
      navigator.storage?.persist?.().catch(() => {});  // ask the browser not to evict the rows under storage pressure
      return new Store(db);
    } catch (e) {
      throw wrap(e, "opening IndexedDB");
    }
  }

  constructor(db) {
    this.db = db;
  }

  /** Which of these keys hold a row. */
  async has(keys) {
    try {
      const tx = this.db.transaction("kv", "readonly"), store = tx.objectStore("kv");
      const found = await Promise.all(keys.map((k) => done(store.getKey(k))));
      return found.map((k) => k !== undefined);
    } catch (e) {
      throw wrap(e, "looking up cached frozen outputs");
    }
  }

  /** Rows {name: ArrayBuffer} for these keys (undefined where missing), in one transaction. */
  async getRows(keys) {
    try {
      const tx = this.db.transaction("kv", "readonly"), store = tx.objectStore("kv");
      return await Promise.all(keys.map((k) => done(store.get(k))));
    } catch (e) {
      throw wrap(e, "reading cached frozen outputs");
    }
  }

  /** Write rows {key: {name: ArrayBuffer}} in one transaction. */
  async putRows(rows) {
    try {
      const tx = this.db.transaction("kv", "readwrite"), store = tx.objectStore("kv");
      for (const [k, row] of rows) store.put(row, k);
      await finished(tx);
    } catch (e) {
      throw wrap(e, "storing the frozen outputs");
    }
  }

  async getRun(key) {
    try {
      return await done(this.db.transaction("runs", "readonly").objectStore("runs").get(key));
    } catch (e) {
      throw wrap(e, "reading the training checkpoint");
    }
  }

  async putRun(key, checkpoint) {
    try {
      const tx = this.db.transaction("runs", "readwrite");
      tx.objectStore("runs").put(checkpoint, key);
      await finished(tx);
    } catch (e) {
      throw wrap(e, "storing the training checkpoint");
    }
  }

  async deleteRun(key) {
    try {
      const tx = this.db.transaction("runs", "readwrite");
      tx.objectStore("runs").delete(key);
      await finished(tx);
    } catch (e) {
      throw wrap(e, "deleting the training checkpoint");
    }
  }

  /** Forget every stored row and checkpoint of this page. */
  async clear() {
    try {
      const tx = this.db.transaction(["kv", "runs"], "readwrite");
      tx.objectStore("kv").clear();
      tx.objectStore("runs").clear();
      await finished(tx);
    } catch (e) {
      throw wrap(e, "clearing stored data");
    }
  }
}

/** The origin's usage and quota in bytes, where the browser tells (navigator.storage.estimate). */
export async function estimate() {
  try {
    return await navigator.storage.estimate();
  } catch {
    return null;
  }
}
