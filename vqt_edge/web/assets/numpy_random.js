// numpy's default_rng in JavaScript: SeedSequence -> PCG64, Generator.random and Generator.permutation,
// bit for bit. The page draws the same data order, dropout masks and held-out split as
// device_runner/trainer.py (default_rng([seed, epoch]), default_rng([seed, epoch, step]), default_rng([seed, c])).

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n;

const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715, XSHIFT = 16, POOL = 4;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** The uint32 words of numpy's entropy for a list of non-negative integers (each as its 32-bit words). */
function entropyWords(seed) {
  const words = [];
  for (const value of seed) {
    let n = BigInt(value);
    if (n < 0n) throw new Error("seeds must be non-negative");
    if (n === 0n) words.push(0);
    while (n > 0n) { words.push(Number(n & M32)); n >>= 32n; }
  }
  return words;
}

/** numpy.random.SeedSequence(entropy).generate_state(nWords) as uint32 words. */
export function seedSequenceState(seed, nWords) {
  const entropy = entropyWords(Array.isArray(seed) ? seed : [seed]);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> XSHIFT)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> XSHIFT)) >>> 0;
  };
  const pool = new Array(POOL);
  for (let i = 0; i < POOL; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let src = 0; src < POOL; src++)
    for (let dst = 0; dst < POOL; dst++)
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  for (let src = POOL; src < entropy.length; src++)
    for (let dst = 0; dst < POOL; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  const out = new Array(nWords);
  let h = INIT_B;
  for (let i = 0; i < nWords; i++) {
    let v = (pool[i % POOL] ^ h) >>> 0;
    h = mul32(h, MULT_B);
    v = mul32(v, h);
    out[i] = (v ^ (v >>> XSHIFT)) >>> 0;
  }
  return out;
}

/** numpy.random.default_rng(seed): PCG64 (XSL-RR 128/64) seeded through SeedSequence. */
export class Generator {
  constructor(seed) {
    const w = seedSequenceState(seed, 8).map(BigInt);
    const u64 = (i) => w[2 * i] | (w[2 * i + 1] << 32n); // generate_state(4, uint64): little-endian word pairs
    const initState = (u64(0) << 64n) | u64(1);
    const initSeq = (u64(2) << 64n) | u64(3);
    this.inc = ((initSeq << 1n) | 1n) & M128;
    this.state = 0n;
    this.#step();
    this.state = (this.state + initState) & M128;
    this.#step();
    this.hasUint32 = false;
    this.uinteger = 0;
  }

  #step() {
    this.state = (this.state * PCG_MULT + this.inc) & M128;
  }

  nextUint64() {
    this.#step();
    const s = this.state;
    const x = ((s >> 64n) ^ s) & M64;
    const rot = s >> 122n;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & M64;
  }

  nextUint32() {
    if (this.hasUint32) { this.hasUint32 = false; return this.uinteger; }
    const next = this.nextUint64();
    this.hasUint32 = true;
    this.uinteger = Number(next >> 32n);
    return Number(next & M32);
  }

  /** Generator.random(): a double in [0, 1) from the top 53 bits. */
  random() {
    return Number(this.nextUint64() >> 11n) / 9007199254740992;
  }

  /** Generator.random(size): `n` doubles in C order. */
  randomArray(n) {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = this.random();
    return out;
  }

  /** numpy's random_interval(max) for max < 2**32: masked rejection sampling on 32-bit draws. */
  #interval(max) {
    if (max === 0) return 0;
    let mask = max;
    for (const shift of [1, 2, 4, 8, 16]) mask |= mask >>> shift;
    let value;
    while ((value = (this.nextUint32() & mask) >>> 0) > max);
    return value;
  }

  /** Generator.permutation(n): Fisher-Yates from the end, as Generator.shuffle. */
  permutation(n) {
    const a = Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i >= 1; i--) {
      const j = this.#interval(i);
      const t = a[i]; a[i] = a[j]; a[j] = t;
    }
    return a;
  }
}
