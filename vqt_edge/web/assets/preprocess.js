// vqt_edge/preprocess.py in the page: decode, composite transparency over white, squash to SxS with
// pillow's bicubic resampling (its exact fixed-point algorithm, libImaging/Resample.c), then
// (x / 255 - mean) / std as float32 [3, S, S]. The decoders differ (the browser's vs pillow's), the
// resize does not: a PNG gives the same pixels as Python; a JPEG within a few levels (docs/browser.md).

const PRECISION_BITS = 32 - 8 - 2;
/** Images with more pixels are refused before decoding, as vqt_edge/preprocess.MAX_PIXELS. */
export const MAX_PIXELS = 100_000_000;

function bicubic(x) {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** Resample.c precompute_coeffs + normalize_coeffs_8bpc: per output pixel, [first, count] and int weights. */
function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = 2 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v) {
  if (v >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / 2 ** PRECISION_BITS);
}

/** Pillow's Image.resize(size, BICUBIC) of an RGB image (rgb: Uint8Array of width*height*3). */
export function resizeBicubic(rgb, width, height, outW, outH) {
  let src = rgb, w = width, h = height;
  if (outW !== w) {
    const { bounds, kk, ksize } = coefficients(w, outW);
    const vert = outH !== h ? coefficients(h, outH) : null;
    // Only the rows the vertical pass reads (Resample.c: ybox_first..ybox_last).
    const first = vert ? vert.bounds[0] : 0;
    const last = vert ? vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1] : h;
    const out = new Uint8Array(outW * (last - first) * 3);
    for (let y = first; y < last; y++) {
      for (let xx = 0; xx < outW; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k = xx * ksize;
        let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        for (let x = 0; x < xmax; x++) {
          const i = (y * w + x + xmin) * 3, c = kk[k + x];
          s0 += src[i] * c; s1 += src[i + 1] * c; s2 += src[i + 2] * c;
        }
        const o = ((y - first) * outW + xx) * 3;
        out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
      }
    }
    src = out; w = outW; h = last - first;
    if (vert) for (let i = 0; i < outH; i++) vert.bounds[i * 2] -= first;
    if (vert) return verticalPass(src, w, vert, outH);
    return src;
  }
  if (outH !== h) return verticalPass(src, w, coefficients(h, outH), outH);
  return src;
}

function verticalPass(src, w, { bounds, kk, ksize }, outH) {
  const out = new Uint8Array(w * outH * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], k = yy * ksize;
    for (let xx = 0; xx < w; xx++) {
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let y = 0; y < ymax; y++) {
        const i = ((y + ymin) * w + xx) * 3, c = kk[k + y];
        s0 += src[i] * c; s1 += src[i + 1] * c; s2 += src[i + 2] * c;
      }
      const o = (yy * w + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/** float32 [3, S, S] exactly as preprocess.preprocess computes it: x * (1 / (255 * std)) - mean / std. */
export function normalize(rgb, size, mean, std) {
  const f = Math.fround;
  const out = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    const scale = f(1 / f(255 * f(std[c])));
    const shift = f(f(mean[c]) / f(std[c]));
    for (let i = 0; i < size * size; i++) out[c * size * size + i] = f(f(rgb[i * 3 + c] * scale) - shift);
  }
  return out;
}

/** A File/Blob -> {rgb, width, height}: EXIF orientation applied, transparency over white. Throws
 *  Error with a one-line reason for files that are not images or are too large. */
export async function decode(blob) {
  const url = URL.createObjectURL(blob);
  const img = new Image();
  try {
    // The load event comes with the header's size; pixels are decoded when drawn, after the size check.
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("not an image the browser can decode"));
      img.src = url;
    });
  } finally {
    URL.revokeObjectURL(url);
  }
  const width = img.naturalWidth, height = img.naturalHeight;
  if (!width || !height) throw new Error("not an image the browser can decode");
  if (width * height > MAX_PIXELS)
    throw new Error(`${width}x${height} pixels is above the limit of ${MAX_PIXELS.toLocaleString("en")}`);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true, colorSpace: "srgb" });
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, width, height);
  // Unpremultiplied, without colour management: the file's own values, as pillow reads them.
  const bitmap = await createImageBitmap(blob, { premultiplyAlpha: "none", colorSpaceConversion: "none" });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    rgb[j] = rgba[i]; rgb[j + 1] = rgba[i + 1]; rgb[j + 2] = rgba[i + 2];
  }
  return { rgb, width, height };
}

/** decode + resize + normalize: the model's input for one image. */
export async function preprocess(blob, size, mean, std) {
  const { rgb, width, height } = await decode(blob);
  return normalize(resizeBicubic(rgb, width, height, size, size), size, mean, std);
}
