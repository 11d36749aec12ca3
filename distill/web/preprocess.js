// Image preprocessing for the browser page: a port of distill/preprocess.py that reproduces its pixels.
//
// Pillow's resampling is reimplemented here (src/libImaging/Resample.c: separable two-pass convolution,
// horizontal first, antialiased support, 22-bit fixed-point coefficients, uint8 between the passes), as
// are Image.reduce (Reduce.c), the alpha composite of Image.paste (paste_mask_L's DIV255 blend) and the
// float32 normalisation, so that from the same decoded RGBA pixels the page feeds the model exactly the
// numbers distill.edge does (tests/test_web_page.py checks this bit for bit on random images against Pillow, in node).
//
// What can still differ is decoding, which the browser does (decodeImage): JPEG IDCT/upsampling details,
// 16-bit PNGs (the browser hands over 8 bits), colour profiles (ignored on both sides: colorSpaceConversion
// "none"), and partly transparent pixels, which a 2D canvas stores premultiplied (up to ~1 level after the
// composite). tests/test_web_page.py measures the end result as embedding cosine against distill.edge.
//
// Pure functions on typed arrays, no DOM, except decodeImage: usable from node for the tests.

export const RESIZE_MODES = ["shortest", "squash"];
export const INTERPOLATIONS = ["bicubic", "bilinear", "nearest", "lanczos"];
const REDUCE_MODES = ["RGB", "RGBA", "L", "LA", "CMYK"];
const PRECISION_BITS = 32 - 8 - 2;
const FIXED_RGB = { high_bit_depth: "rescale_range", palette: "composite", alpha: "composite", other_modes: "pil_convert" };
const OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD = [0.26862954, 0.26130258, 0.27577711];

/** A complete copy of a preprocess.json spec (defaults as distill.preprocess.check_spec); throws on what this port cannot follow. */
export function checkSpec(spec) {
  let size = spec.size;
  if (Array.isArray(size)) {
    if (!(size.length === 1 || size.length === 2) || new Set(size).size !== 1) throw new Error(`preprocess size ${size} is not square`);
    size = size[0];
  }
  if (!Number.isInteger(size) || size < 1) throw new Error(`preprocess size ${size} must be a positive integer`);
  const out = { size, mean: spec.mean ?? OPENAI_MEAN, std: spec.std ?? OPENAI_STD,
    interpolation: spec.interpolation ?? "bicubic", resize_mode: spec.resize_mode ?? "shortest" };
  for (const k of ["mean", "std"]) {
    if (!Array.isArray(out[k]) || out[k].length !== 3) throw new Error(`preprocess ${k} must be three numbers`);
  }
  if (!INTERPOLATIONS.includes(out.interpolation)) throw new Error(`preprocess interpolation ${out.interpolation} is not supported`);
  if (!RESIZE_MODES.includes(out.resize_mode)) throw new Error(`preprocess resize_mode ${out.resize_mode} is not supported`);
  const rgb = { max_side: 4096, reduce_modes: REDUCE_MODES, background: [255, 255, 255], ...FIXED_RGB, ...(spec.rgb ?? {}) };
  for (const [k, want] of Object.entries(FIXED_RGB)) {
    if (rgb[k] !== want) throw new Error(`preprocess rgb.${k}=${rgb[k]} is not implemented (only ${want})`);
  }
  out.rgb = rgb;
  return out;
}

// ------------------------------------------------------------------------------ header sniffing

/**
 * What Pillow would open a file as, from its first bytes: {format, mode, trnsKey}. mode is Pillow's
 * mode for PNG and JPEG (it decides the 16-bit rescale, the huge-image reduction and which
 * transparency counts); null when unknown (then the decoded alpha decides between RGB and RGBA).
 */
export function sniff(bytes) {
  const b = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const u32 = (o) => ((b[o] << 24) | (b[o + 1] << 16) | (b[o + 2] << 8) | b[o + 3]) >>> 0;
  if (b.length > 33 && b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) {
    const depth = b[24], type = b[25];
    let trnsKey = null, hasTrns = false;
    for (let o = 8; o + 8 <= b.length;) {  // walk the chunks up to IDAT for tRNS
      const len = u32(o), name = String.fromCharCode(b[o + 4], b[o + 5], b[o + 6], b[o + 7]);
      if (name === "IDAT" || name === "IEND") break;
      if (name === "tRNS") {
        hasTrns = true;
        const d = b.subarray(o + 8, o + 8 + len), to8 = (hi, lo) => (depth === 16 ? hi : ((hi << 8) | lo) * (255 / ((1 << depth) - 1)));
        if (type === 0 && d.length >= 2) { const g = Math.round(to8(d[0], d[1])); trnsKey = [g, g, g]; }
        if (type === 2 && d.length >= 6) trnsKey = [0, 2, 4].map((i) => Math.round(to8(d[i], d[i + 1])));
      }
      o += 12 + len;
    }
    const mode = { 0: depth === 16 ? "I;16" : depth === 1 ? "1" : "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA" }[type] ?? null;
    // Pillow ignores a tRNS colour key on L/RGB images (to_rgb only composites P's); the browser applies it
    return { format: "PNG", mode, depth, trnsKey: (type === 0 || type === 2) && hasTrns ? trnsKey : null };
  }
  if (b.length > 3 && b[0] === 0xff && b[1] === 0xd8) {
    let mode = "RGB";
    for (let o = 2; o + 9 < b.length;) {  // the SOF marker's component count: 1 gray, 3 YCbCr, 4 CMYK
      if (b[o] !== 0xff) { o++; continue; }
      const m = b[o + 1];
      if (m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc) {
        mode = { 1: "L", 3: "RGB", 4: "CMYK" }[b[o + 9]] ?? "RGB";
        break;
      }
      if (m === 0xd8 || m === 0x01 || (m >= 0xd0 && m <= 0xd7)) { o += 2; continue; }
      o += 2 + ((b[o + 2] << 8) | b[o + 3]);
    }
    return { format: "JPEG", mode, trnsKey: null };
  }
  if (b.length > 6 && b[0] === 0x47 && b[1] === 0x49 && b[2] === 0x46) return { format: "GIF", mode: "P", trnsKey: null };
  return { format: null, mode: null, trnsKey: null };
}

/**
 * Where a JPEG's EXIF orientation value sits, {offset, littleEndian} of its 2 bytes, when it is not 1; else null.
 * Browsers rotate by it even with imageOrientation "none"; Pillow does not, so the page resets it to 1.
 */
export function exifOrientationOffset(bytes) {
  const b = bytes;
  if (!(b[0] === 0xff && b[1] === 0xd8)) return null;
  for (let o = 2; o + 4 <= b.length && b[o] === 0xff;) {
    const m = b[o + 1], len = (b[o + 2] << 8) | b[o + 3];
    if (m === 0xda || m === 0xd9) break;  // image data: no more metadata segments
    const t = o + 10;  // TIFF header after "Exif\0\0"
    if (m === 0xe1 && String.fromCharCode(...b.subarray(o + 4, o + 8)) === "Exif" && t + 8 <= b.length) {
      const le = b[t] === 0x49;
      const u16 = (p) => (le ? b[p] | (b[p + 1] << 8) : (b[p] << 8) | b[p + 1]);
      const u32 = (p) => (le ? (b[p] | (b[p + 1] << 8) | (b[p + 2] << 16) | (b[p + 3] << 24)) >>> 0
        : ((b[p] << 24) | (b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3]) >>> 0);
      const ifd = t + u32(t + 4);
      if (ifd + 2 > b.length) return null;
      for (let i = 0, n = u16(ifd); i < n && ifd + 2 + 12 * (i + 1) <= b.length; i++) {
        const e = ifd + 2 + 12 * i;
        if (u16(e) === 0x0112) return u16(e + 8) === 1 ? null : { offset: e + 8, littleEndian: le };
      }
      return null;
    }
    o += 2 + len;
  }
  return null;
}

// ------------------------------------------------------------------------------ any image -> RGB

const div255 = (a) => { const t = a + 128; return ((t >> 8) + t) >> 8; };  // Pillow's DIV255 / MULDIV255 rounding

function hasAlpha(rgba) {
  for (let i = 3; i < rgba.length; i += 4) if (rgba[i] !== 255) return true;
  return false;
}

/** Pillow's Image.reduce(factor) of an RGBA buffer (box average, partial last row/column; Reduce.c rounding). */
export function reduce(rgba, w, h, factor) {
  const ow = Math.ceil(w / factor), oh = Math.ceil(h / factor);
  const out = new Uint8ClampedArray(ow * oh * 4);
  const mult = (n) => Math.trunc(Math.fround(4294967296 / Math.fround(256 * n)));  // division_UINT32(n, 8)
  for (let y = 0; y < oh; y++) {
    const y0 = y * factor, y1 = Math.min(h, y0 + factor);
    for (let x = 0; x < ow; x++) {
      const x0 = x * factor, x1 = Math.min(w, x0 + factor), n = (y1 - y0) * (x1 - x0), m = mult(n);
      for (let c = 0; c < 4; c++) {
        let ss = Math.trunc(n / 2);
        for (let yy = y0; yy < y1; yy++) for (let xx = x0; xx < x1; xx++) ss += rgba[(yy * w + xx) * 4 + c];
        out[(y * ow + x) * 4 + c] = Math.floor((ss * m) / 16777216);
      }
    }
  }
  return out;
}

function premultiply(rgba) {  // Pillow's RGBA -> RGBa
  const out = new Uint8ClampedArray(rgba);
  for (let i = 0; i < out.length; i += 4) {
    const a = out[i + 3];
    if (a !== 255) for (let c = 0; c < 3; c++) out[i + c] = div255(out[i + c] * a);
  }
  return out;
}

function unpremultiply(rgba) {  // Pillow's RGBa -> RGBA
  const out = new Uint8ClampedArray(rgba);
  for (let i = 0; i < out.length; i += 4) {
    const a = out[i + 3];
    if (a !== 255 && a !== 0) for (let c = 0; c < 3; c++) out[i + c] = Math.min(255, Math.trunc((255 * out[i + c]) / a));
  }
  return out;
}

/**
 * Decoded RGBA pixels -> 8-bit RGB (Uint8Array, 3 per pixel) by the spec's rgb rules, as
 * distill.preprocess.rgb_image + to_rgb do: huge-image reduction, 16-bit gray range rescale,
 * transparency composited on the background with Pillow's blend. info: sniff()'s result.
 */
export function toRgb(rgba, w, h, rules, info = {}) {
  let mode = info.mode;
  if (info.trnsKey) {  // undo the browser's colour-key transparency, which Pillow does not apply to L/RGB
    rgba = new Uint8ClampedArray(rgba);
    for (let i = 0; i < rgba.length; i += 4) {
      if (rgba[i + 3] === 0) { rgba[i] = info.trnsKey[0]; rgba[i + 1] = info.trnsKey[1]; rgba[i + 2] = info.trnsKey[2]; }
      rgba[i + 3] = 255;
    }
  }
  if (mode == null) mode = hasAlpha(rgba) ? "RGBA" : "RGB";
  const maxSide = rules.max_side;
  if (info.format === "JPEG" && Math.min(Math.floor(w / maxSide), Math.floor(h / maxSide)) >= 2) {
    // Pillow's draft(): decode at 1/2, 1/4 or 1/8 scale; approximated by a box reduction (the browser decodes at full size)
    const scale = Math.min(Math.floor(w / maxSide), Math.floor(h / maxSide));
    const s = [8, 4, 2, 1].find((f) => scale >= f);
    rgba = reduce(rgba, w, h, s);
    [w, h] = [Math.ceil(w / s), Math.ceil(h / s)];
  }
  if (Math.max(w, h) > maxSide && rules.reduce_modes.includes(mode)) {
    const f = Math.ceil(Math.max(w, h) / maxSide);
    rgba = mode === "RGBA" || mode === "LA" ? unpremultiply(reduce(premultiply(rgba), w, h, f)) : reduce(rgba, w, h, f);
    [w, h] = [Math.ceil(w / f), Math.ceil(h / f)];
  }
  const rgb = new Uint8Array(w * h * 3);
  if (mode === "I;16") {  // range rescale, on the 8 bits the browser decoded (Pillow has all 16)
    let lo = 255, hi = 0;
    for (let i = 0; i < rgba.length; i += 4) { lo = Math.min(lo, rgba[i]); hi = Math.max(hi, rgba[i]); }
    for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
      const v = hi > lo ? Math.round(((rgba[i] - lo) / (hi - lo)) * 255) : 0;
      rgb[j] = rgb[j + 1] = rgb[j + 2] = v;
    }
    return { rgb, width: w, height: h };
  }
  const bg = rules.background;
  for (let i = 0, j = 0; i < rgba.length; i += 4, j += 3) {
    const a = rgba[i + 3];
    for (let c = 0; c < 3; c++) {
      // paste(img, mask=alpha) onto the background: DIV255(bg * (255 - a) + c * a); only images with
      // transparency Pillow honours have alpha < 255 here (a colour key was undone above, JPEGs are opaque)
      rgb[j + c] = a !== 255 ? div255(bg[c] * (255 - a) + rgba[i + c] * a) : rgba[i + c];
    }
  }
  return { rgb, width: w, height: h };
}

// ------------------------------------------------------------------------------ resampling (Pillow)

const FILTERS = {
  bilinear: [1.0, (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; }],
  bicubic: [2.0, (x) => {
    const a = -0.5;
    x = Math.abs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
  }],
  lanczos: [3.0, (x) => {
    const sinc = (v) => { if (v === 0.0) return 1.0; v *= Math.PI; return Math.sin(v) / v; };
    return -3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0;
  }],
};

/** Resample.c's precompute_coeffs + normalize_coeffs_8bpc: per output pixel its first input, count and int coefficients. */
function coefficients(inSize, outSize, filter) {
  const [support0, fn] = FILTERS[filter];
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = support0 * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) { w[x] = fn((x + xmin - center + 0.5) * ss); ww += w[x]; }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0.0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

const clip8 = (ss) => { const v = Math.floor(ss / (1 << PRECISION_BITS)); return v < 0 ? 0 : v > 255 ? 255 : v; };

function nearest(rgb, w, h, ow, oh) {  // Geometry.c's ImagingScaleAffine (Pillow's NEAREST resize)
  const out = new Uint8Array(ow * oh * 3), a0 = w / ow, a4 = h / oh;
  const xin = new Int32Array(ow);
  let xo = a0 * 0.5;
  for (let x = 0; x < ow; x++) { xin[x] = xo < 0 ? -1 : Math.trunc(xo); xo += a0; }
  let yo = a4 * 0.5;
  for (let y = 0; y < oh; y++) {
    const yi = yo < 0 ? -1 : Math.trunc(yo);
    yo += a4;
    for (let x = 0; x < ow; x++) for (let c = 0; c < 3; c++) out[(y * ow + x) * 3 + c] = rgb[(yi * w + xin[x]) * 3 + c];
  }
  return out;
}

function horizontalPass(src, sw, rows, rowOffset, ow, hor) {
  const out = new Uint8Array(ow * rows * 3);
  for (let y = 0; y < rows; y++) {
    const row = (y + rowOffset) * sw * 3;
    for (let xx = 0; xx < ow; xx++) {
      const xmin = hor.bounds[xx * 2], xmax = hor.bounds[xx * 2 + 1], k0 = xx * hor.ksize;
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let x = 0; x < xmax; x++) {
        const k = hor.kk[k0 + x], p = row + (x + xmin) * 3;
        s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
      }
      const o = (y * ow + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

function verticalPass(src, sw, oh, rowOffset, vert) {
  const out = new Uint8Array(sw * oh * 3);
  for (let yy = 0; yy < oh; yy++) {
    const ymin = vert.bounds[yy * 2] - rowOffset, ymax = vert.bounds[yy * 2 + 1], k0 = yy * vert.ksize;
    for (let xx = 0; xx < sw; xx++) {
      let s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
      for (let y = 0; y < ymax; y++) {
        const k = vert.kk[k0 + y], p = ((y + ymin) * sw + xx) * 3;
        s0 += src[p] * k; s1 += src[p + 1] * k; s2 += src[p + 2] * k;
      }
      const o = (yy * sw + xx) * 3;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
    }
  }
  return out;
}

/**
 * Pillow's Image.resize((ow, oh), filter) of an 8-bit RGB buffer (3 per pixel), bit for bit, with
 * Pillow 13's pass order (the vertical pass goes first when the height shrinks more than twice as
 * much as the width; older Pillow always went horizontal first, which can move a pixel by 1 level).
 */
export function resize(rgb, w, h, ow, oh, filter = "bicubic") {
  if (ow === w && oh === h) return new Uint8Array(rgb);
  if (filter === "nearest") return nearest(rgb, w, h, ow, oh);
  const needH = ow !== w, needV = oh !== h;
  const horizontalFirst = !(h - oh > 0 && h - oh > (w - ow) * 2);
  const vert = needV || needH ? coefficients(h, oh, filter) : null;
  const hor = needH ? coefficients(w, ow, filter) : null;
  if (horizontalFirst) {
    let src = rgb, sw = w, rowOffset = 0;
    if (needH) {  // only the rows the vertical pass will read, rounded to uint8 in between
      const yFirst = vert.bounds[0], yLast = vert.bounds[oh * 2 - 2] + vert.bounds[oh * 2 - 1];
      src = horizontalPass(rgb, w, yLast - yFirst, yFirst, ow, hor);
      sw = ow; rowOffset = yFirst;
    }
    return needV ? verticalPass(src, sw, oh, rowOffset, vert) : src;
  }
  const tmp = needV ? verticalPass(rgb, w, oh, 0, vert) : rgb;
  return needH ? horizontalPass(tmp, w, oh, 0, ow, hor) : tmp;
}

const roundHalfEven = (x) => { const r = Math.round(x); return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r; };

/** RGB -> S x S RGB by resize_mode and interpolation (distill.preprocess.resize_crop). */
export function resizeCrop(rgb, w, h, spec) {
  const size = spec.size;
  if (spec.resize_mode === "squash") return resize(rgb, w, h, size, size, spec.interpolation);
  // torchvision Resize(int): the short side becomes S, the long side int(S * long / short)
  const [nw, nh] = w <= h ? [size, Math.trunc((size * h) / w)] : [Math.trunc((size * w) / h), size];
  const r = resize(rgb, w, h, nw, nh, spec.interpolation);
  // torchvision CenterCrop: offsets int(round(d / 2)), Python's round (half to even)
  const left = roundHalfEven((nw - size) / 2.0), top = roundHalfEven((nh - size) / 2.0);
  const out = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    const sy = y + top;
    for (let x = 0; x < size; x++) {
      const sx = x + left, o = (y * size + x) * 3;
      if (sy < 0 || sy >= nh || sx < 0 || sx >= nw) continue;  // PIL's crop pads outside with zeros
      const p = (sy * nw + sx) * 3;
      out[o] = r[p]; out[o + 1] = r[p + 1]; out[o + 2] = r[p + 2];
    }
  }
  return out;
}

/** S x S RGB -> (3, S, S) float32, (x / 255 - mean) / std in float32 as numpy computes it. */
export function normalize(rgb, size, mean, std) {
  const out = new Float32Array(3 * size * size), n = size * size;
  for (let c = 0; c < 3; c++) {
    const m = Math.fround(mean[c]), s = Math.fround(std[c]);
    for (let i = 0; i < n; i++) out[c * n + i] = Math.fround(Math.fround(Math.fround(rgb[i * 3 + c] / 255) - m) / s);
  }
  return out;
}

/** Decoded RGBA (w x h) -> the model's "pixels" input (Float32Array, 3 x S x S). spec: checkSpec()'s output. */
export function preprocessRgba(rgba, w, h, spec, info = {}) {
  const { rgb, width, height } = toRgb(rgba, w, h, spec.rgb, info);
  return normalize(resizeCrop(rgb, width, height, spec), spec.size, spec.mean, spec.std);
}

// ------------------------------------------------------------------------------ browser decoding

/**
 * A File/Blob -> {rgba, width, height, info}: decoded by the browser without colour management,
 * without a JPEG's EXIF rotation (Pillow applies neither) and without premultiplying. Rejects on
 * undecodable data.
 */
export async function decodeImage(blob) {
  const head = new Uint8Array(await blob.slice(0, 65536).arrayBuffer());
  if (blob.size === 0) throw new Error("empty file (0 bytes)");
  const info = sniff(head);
  const at = exifOrientationOffset(head);
  if (at) {  // orientation 1 ("as stored") in a copy, so that the browser does not rotate either
    const patched = head.slice();
    patched[at.offset] = at.littleEndian ? 1 : 0;
    patched[at.offset + 1] = at.littleEndian ? 0 : 1;
    blob = new Blob([patched, blob.slice(head.length)], { type: blob.type });
  }
  // "from-image" with the EXIF orientation reset above: "none" is deprecated and Chrome rotates by EXIF with it too
  const bitmap = await createImageBitmap(blob, { premultiplyAlpha: "none", colorSpaceConversion: "none", imageOrientation: "from-image" });
  try {
    const { width, height } = bitmap;
    const canvas = new OffscreenCanvas(width, height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    return { rgba: ctx.getImageData(0, 0, width, height).data, width, height, info };
  } finally {
    bitmap.close();
  }
}
