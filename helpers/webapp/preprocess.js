// The same preprocessing as helpers/predict.py::process_image, on decoded pixels.
//
// The browser's canvas scaling is not PIL's, so the resize is PIL's own separable
// resampling (libImaging/Resample.c): normalised filter coefficients in 22-bit fixed point,
// a horizontal pass then a vertical pass, each rounded and clipped to 8 bits.

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

// Which input pixels feed each output pixel, and with which fixed-point weights.
function coefficients(inSize, outSize, interpolation) {
  const [filter, baseSupport] = FILTERS[interpolation];
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1); // downscaling widens the filter
  const support = baseSupport * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let sum = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter((x + xmin - center + 0.5) / filterScale);
      sum += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = sum !== 0 ? w[x] / sum : w[x];
      weights[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS)
                                                 : 0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, weights, ksize };
}

function clip8(sum) {
  const v = sum >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// Resize interleaved 8-bit pixels (`channels` per pixel, the first 3 used) to RGB.
export function resample(pixels, width, height, channels, outWidth, outHeight,
                         interpolation = "bicubic") {
  const half = 1 << (PRECISION_BITS - 1);
  let src = pixels, srcWidth = width, stride = channels, rows = height, rowOffset = 0;
  const vert = coefficients(height, outHeight, interpolation);
  if (outWidth !== width) {
    // Only the rows the vertical pass reads, as PIL does.
    const first = vert.bounds[0];
    const last = vert.bounds[outHeight * 2 - 2] + vert.bounds[outHeight * 2 - 1];
    const { bounds, weights, ksize } = coefficients(width, outWidth, interpolation);
    const tmp = new Uint8Array(outWidth * (last - first) * 3);
    for (let y = first; y < last; y++) {
      const row = y * width * channels;
      for (let xx = 0; xx < outWidth; xx++) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], k = xx * ksize;
        let r = half, g = half, b = half;
        for (let x = 0; x < xmax; x++) {
          const p = row + (x + xmin) * channels, c = weights[k + x];
          r += pixels[p] * c;
          g += pixels[p + 1] * c;
          b += pixels[p + 2] * c;
        }
        const o = ((y - first) * outWidth + xx) * 3;
        tmp[o] = clip8(r);
        tmp[o + 1] = clip8(g);
        tmp[o + 2] = clip8(b);
      }
    }
    src = tmp; srcWidth = outWidth; stride = 3; rows = last - first; rowOffset = first;
  }
  const out = new Uint8Array(outWidth * outHeight * 3);
  if (outHeight === height) { // no vertical pass: copy the first 3 channels
    for (let i = 0; i < outWidth * outHeight; i++) {
      out[i * 3] = src[i * stride];
      out[i * 3 + 1] = src[i * stride + 1];
      out[i * 3 + 2] = src[i * stride + 2];
    }
    return out;
  }
  const { bounds, weights, ksize } = vert;
  for (let yy = 0; yy < outHeight; yy++) {
    const ymin = bounds[yy * 2] - rowOffset, ymax = bounds[yy * 2 + 1], k = yy * ksize;
    for (let xx = 0; xx < outWidth; xx++) {
      let r = half, g = half, b = half;
      for (let y = 0; y < ymax; y++) {
        const p = ((y + ymin) * srcWidth + xx) * stride, c = weights[k + y];
        r += src[p] * c;
        g += src[p + 1] * c;
        b += src[p + 2] * c;
      }
      const o = (yy * outWidth + xx) * 3;
      out[o] = clip8(r);
      out[o + 1] = clip8(g);
      out[o + 2] = clip8(b);
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
  const rgb = resample(pixels, width, height, channels, w, h, meta.interpolation);
  const left = roundHalfEven((w - size) / 2), top = roundHalfEven((h - size) / 2);
  const f = Math.fround;
  const mean = meta.mean.map(f), std = meta.std.map(f);
  const out = new Float32Array(3 * size * size);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const p = ((y + top) * w + x + left) * 3;
      for (let c = 0; c < 3; c++) {
        // float32 at every step, as numpy computes it
        out[c * size * size + y * size + x] = f(f(f(rgb[p + c] / 255) - mean[c]) / std[c]);
      }
    }
  }
  return out;
}
