// safetensors in the page: read the bundle's initial trainables (train/step_init.safetensors), write
// the trained adapter as device_runner/deploy.save_adapter does (float32 tensors sorted by name, the
// header's keys sorted, padded with spaces to 8 bytes).

const DTYPES = { F32: Float32Array, I64: BigInt64Array, F16: Uint16Array };

/** ArrayBuffer -> {tensors: {name: {dtype, shape, data}}, metadata}. */
export function parse(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < 8) throw new Error("not a safetensors file (too short)");
  const size = Number(view.getBigUint64(0, true));
  if (size > buffer.byteLength - 8) throw new Error("not a safetensors file (header past the end)");
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, size)));
  const start = 8 + size;
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const Type = DTYPES[info.dtype];
    if (!Type) throw new Error(`tensor ${name}: unsupported dtype ${info.dtype}`);
    const [a, b] = info.data_offsets;
    const bytes = buffer.slice(start + a, start + b);  // copied: aligned for the typed array
    tensors[name] = { dtype: info.dtype, shape: info.shape, data: new Type(bytes) };
  }
  return { tensors, metadata: header.__metadata__ || {} };
}

function sortedJson(value) {
  if (Array.isArray(value)) return `[${value.map(sortedJson).join(",")}]`;
  if (value && typeof value === "object")
    return `{${Object.keys(value).sort().map((k) => `${JSON.stringify(k)}:${sortedJson(value[k])}`).join(",")}}`;
  return JSON.stringify(value);
}

/** {name: {shape, data: Float32Array}} + string metadata -> Uint8Array of a safetensors file. */
export function serialize(tensors, metadata) {
  const names = Object.keys(tensors).sort();
  const header = { __metadata__: metadata };
  let offset = 0;
  for (const n of names) {
    const bytes = tensors[n].data.byteLength;
    header[n] = { dtype: "F32", shape: tensors[n].shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let text = sortedJson(header);
  text += " ".repeat((8 - (new TextEncoder().encode(text).length % 8)) % 8);
  const head = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + head.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  let at = 8 + head.length;
  for (const n of names) {
    const d = tensors[n].data;
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), at);
    at += d.byteLength;
  }
  return out;
}
