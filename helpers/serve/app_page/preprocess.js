// The same preprocessing as helpers/predict.py::process_image, on decoded pixels.
//
// The browser's canvas scaling is not PIL's, so the resize is PIL's own separable
// resampling (libImaging/Resample.c): normalised filter coefficients in 22-bit fixed point,
// a horizontal pass then a vertical pass, each rounded and clipped to 8 bits. Each output
// pixel depends on its own row and column only, so just the centre crop is computed (about
// half the pixels of the full resize), with the same values as resizing then cropping.

const PRECISION_BITS = 22;

function bicubic(x) {
  const a = -0.5;
  x = Math.abs(x);
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

function bilinear(x) {
  x = Math.abs(x);
  return x < 1 ? 1 - x : 0;
}

const FILTERS = { bicubic: [bicubic, 2], bilinear: [bilinear, 1] };

// Which input pixels feed output pixels first..first+count-1 of a resize from inSize to
// outSize, and with which fixed-point weights.
function coefficients(inSize, outSize, interpolation, first = 0, count = outSize) {
  const [filter, baseSupport] = FILTERS[interpolation];
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1); // downscaling widens the filter
  const support = baseSupport * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(count * 2);
  const weights = new Int32Array(count * ksize);
  const w = new Float64Array(ksize);
  for (let i = 0; i < count; i++) {
    const center = (first + i + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let sum = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter((x + xmin - center + 0.5) / filterScale);
      sum += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = sum !== 0 ? w[x] / sum : w[x];
      weights[i * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS)
                                                : 0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[i * 2] = xmin;
    bounds[i * 2 + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function clip8(sum) {
  const v = sum >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// Resize interleaved 8-bit pixels (`channels` per pixel, the first 3 used) to outWidth x
// outHeight as PIL does, and return the window `crop` ({left, top, width, height}, the
// whole image by default) of the result as RGB.
export function resample(pixels, width, height, channels, outWidth, outHeight,
                         interpolation = "bicubic", crop = null) {
  const { left, top, width: cw, height: ch } = crop ||
    { left: 0, top: 0, width: outWidth, height: outHeight };
  const half = 1 << (PRECISION_BITS - 1);
  // The input rows the window needs: all of those its vertical filters read.
  const vert = outHeight === height ? null
    : coefficients(height, outHeight, interpolation, top, ch);
  const first = vert ? vert.bounds[0] : top;
  const last = vert ? vert.bounds[ch * 2 - 2] + vert.bounds[ch * 2 - 1] : top + ch;
  // Horizontal pass on those rows and the window's columns: src, cw pixels a row.
  let src, stride;
  if (outWidth !== width) {
    const { bounds, weights, ksize } = coefficients(width, outWidth, interpolation, left, cw);
    src = new Uint8Array(cw * (last - first) * 3);
    stride = 3;
    for (let y = first; y < last; y++) {
      const row = y * width * channels;
      let o = (y - first) * cw * 3;
      for (let xx = 0; xx < cw; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k = xx * ksize;
        let r = half, g = half, b = half;
        let p = row + xmin * channels;
        for (let x = 0; x < xmax; x++, p += channels) {
          const c = weights[k + x];
          r += pixels[p] * c;
          g += pixels[p + 1] * c;
          b += pixels[p + 2] * c;
        }
        src[o++] = clip8(r);
        src[o++] = clip8(g);
        src[o++] = clip8(b);
      }
    }
  } else { // no horizontal pass: the window's columns of those rows as they are
    src = new Uint8Array(cw * (last - first) * 3);
    stride = 3;
    for (let y = first; y < last; y++) {
      for (let x = 0; x < cw; x++) {
        const p = (y * width + x + left) * channels, o = ((y - first) * cw + x) * 3;
        src[o] = pixels[p];
        src[o + 1] = pixels[p + 1];
        src[o + 2] = pixels[p + 2];
      }
    }
  }
  if (!vert) return src; // no vertical pass: rows top..top+ch are the window
  const out = new Uint8Array(cw * ch * 3);
  const { bounds, weights, ksize } = vert;
  const rowBytes = cw * stride;
  let o = 0;
  for (let yy = 0; yy < ch; yy++) {
    const ymin = bounds[yy * 2] - first, ymax = bounds[yy * 2 + 1], k = yy * ksize;
    for (let xx = 0; xx < cw; xx++) {
      let r = half, g = half, b = half;
      let p = ymin * rowBytes + xx * stride;
      for (let y = 0; y < ymax; y++, p += rowBytes) {
        const c = weights[k + y];
        r += src[p] * c;
        g += src[p + 1] * c;
        b += src[p + 2] * c;
      }
      out[o++] = clip8(r);
      out[o++] = clip8(g);
      out[o++] = clip8(b);
    }
  }
  return out;
}

// Python's round(): halves go to the even neighbour.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// process_image: shorter side to resize_size, centre crop, /255, (x - mean) / std, CHW float32.
export function preprocess(pixels, width, height, channels, meta) {
  const size = meta.input_size, resize = meta.resize_size;
  const [short, long] = width <= height ? [width, height] : [height, width];
  const newLong = Math.trunc(resize * long / short); // torchvision's rounding
  const [w, h] = width <= height ? [resize, newLong] : [newLong, resize];
  const left = roundHalfEven((w - size) / 2), top = roundHalfEven((h - size) / 2);
  const rgb = resample(pixels, width, height, channels, w, h, meta.interpolation,
                       { left, top, width: size, height: size });
  // float32 at every step, as numpy computes it, tabulated for the 256 levels
  const f = Math.fround;
  const table = new Float32Array(3 * 256);
  for (let c = 0; c < 3; c++) {
    const mean = f(meta.mean[c]), std = f(meta.std[c]);
    for (let v = 0; v < 256; v++) table[c * 256 + v] = f(f(f(v / 255) - mean) / std);
  }
  const plane = size * size;
  const out = new Float32Array(3 * plane);
  for (let i = 0, p = 0; i < plane; i++, p += 3) {
    out[i] = table[rgb[p]];
    out[plane + i] = table[256 + rgb[p + 1]];
    out[2 * plane + i] = table[512 + rgb[p + 2]];
  }
  return out;
}
