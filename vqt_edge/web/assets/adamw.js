// The optimizer and the schedule of vqt_edge/optim.py (AdamW.step, lr_at; PortableBackend uses both),
// in float32 as numpy computes them. Every float32 operation is a
// double operation rounded with Math.fround: for +, -, *, / and sqrt of float32 operands that
// rounding twice gives the correctly rounded float32 result, so the page follows numpy bit for bit.

const f = Math.fround;
export const BETA1 = f(0.9), BETA2 = f(0.999), EPS = f(1e-6);

/** Linear warm-up, then cosine decay to 0 (trainer.lr_at). */
export function lrAt(step, total, warmup, base) {
  if (step < warmup) return (base * (step + 1)) / warmup;
  const progress = (step - warmup) / Math.max(1, total - warmup);
  return 0.5 * base * (1 + Math.cos(Math.PI * Math.min(1, progress)));
}

/** Warm-up steps as the trainer counts them: round(warmup_epochs * steps_per_epoch), 10% of the epochs by default. */
export function warmupSteps(epochs, stepsPerEpoch, warmupEpochs = null) {
  const w = warmupEpochs ?? 0.1 * epochs;
  return roundHalfEven(w * stepsPerEpoch);
}

/** Python's round(): halves to even. */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** AdamW of ORT's CPU kernel (adam_mode 1) after the runner's decoupled weight decay on tensors of 2+ dimensions. */
export class AdamW {
  /** params: {name: Float32Array}; shapes: {name: [dims]}. The arrays are updated in place. */
  constructor(params, shapes) {
    this.params = params;
    this.shapes = shapes;
    this.expAvg = {};
    this.expAvgSq = {};
    for (const [n, p] of Object.entries(params)) {
      this.expAvg[n] = new Float32Array(p.length);
      this.expAvgSq[n] = new Float32Array(p.length);
    }
    this.t = 0;
  }

  step(grads, lr, weightDecay) {
    if (weightDecay) {
      const keep = f(1 - lr * weightDecay);
      for (const [n, p] of Object.entries(this.params)) {
        if (this.shapes[n].length >= 2) for (let i = 0; i < p.length; i++) p[i] = f(p[i] * keep);
      }
    }
    const t = this.t + 1;
    const alphaCorrection = f(1 - f(Math.pow(BETA1, t)));
    const betaCorrection = f(1 - f(Math.pow(BETA2, t)));
    const lrCorrected = f(f(lr) * f(f(Math.sqrt(betaCorrection)) / alphaCorrection));
    const a1 = f(1 - BETA1), a2 = f(1 - BETA2);
    for (const [n, p] of Object.entries(this.params)) {
      const g = grads[n], m = this.expAvg[n], v = this.expAvgSq[n];
      for (let i = 0; i < p.length; i++) {
        const mi = f(f(BETA1 * m[i]) + f(a1 * g[i]));
        const vi = f(f(BETA2 * v[i]) + f(f(a2 * g[i]) * g[i]));
        p[i] = f(p[i] - f(f(lrCorrected * mi) / f(f(Math.sqrt(vi)) + EPS)));
        m[i] = mi;
        v[i] = vi;
      }
    }
    this.t = t;
  }
}
