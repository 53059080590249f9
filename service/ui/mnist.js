// A drawing -> a 28x28 MNIST-style image, the way the MNIST digits were made: white on black,
// the bounding box scaled (aspect kept, area-averaged) so its longer side is 20 pixels, then
// placed in the 28x28 field so that its centre of mass falls on pixel (14, 14), rounded to a
// whole pixel (LeCun et al., "The MNIST database of handwritten digits").

export const SIZE = 28;
export const BOX = 20;

// (n, m) weights that average a line of m source pixels into n output pixels by overlap:
// output pixel j covers source [j * m / n, (j + 1) * m / n).
function areaWeights(n, m) {
  const w = Array.from({ length: n }, () => new Float64Array(m));
  const step = m / n;
  for (let j = 0; j < n; j++) {
    const lo = j * step, hi = (j + 1) * step;
    for (let k = Math.floor(lo); k < Math.min(m, Math.ceil(hi)); k++) {
      w[j][k] = (Math.min(hi, k + 1) - Math.max(lo, k)) / step;
    }
  }
  return w;
}

// intensity: Float64Array of width * height values in [0, 1] (row-major, 1 = ink).
// Returns an array of 28 rows of 28 values in [0, 1], or null when nothing is drawn.
export function toMnist(intensity, width, height) {
  let top = height, bottom = -1, left = width, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (intensity[y * width + x] > 0) {
        if (y < top) top = y;
        if (y > bottom) bottom = y;
        if (x < left) left = x;
        if (x > right) right = x;
      }
    }
  }
  if (bottom < 0) return null;
  const h = bottom - top + 1, w = right - left + 1;
  const scale = BOX / Math.max(h, w);
  const oh = Math.max(1, Math.round(h * scale)), ow = Math.max(1, Math.round(w * scale));
  const wy = areaWeights(oh, h), wx = areaWeights(ow, w);
  // (h, w) crop -> (oh, w) rows averaged -> (oh, ow) columns averaged.
  const rows = Array.from({ length: oh }, () => new Float64Array(w));
  for (let j = 0; j < oh; j++) {
    for (let k = 0; k < h; k++) {
      const a = wy[j][k];
      if (a === 0) continue;
      const src = (top + k) * width + left;
      for (let x = 0; x < w; x++) rows[j][x] += a * intensity[src + x];
    }
  }
  const box = Array.from({ length: oh }, () => new Float64Array(ow));
  for (let j = 0; j < oh; j++) {
    for (let i = 0; i < ow; i++) {
      let v = 0;
      for (let x = 0; x < w; x++) v += wx[i][x] * rows[j][x];
      box[j][i] = v;
    }
  }
  // Centre of mass of the box, in its own pixel coordinates.
  let mass = 0, my = 0, mx = 0;
  for (let j = 0; j < oh; j++) {
    for (let i = 0; i < ow; i++) {
      mass += box[j][i];
      my += j * box[j][i];
      mx += i * box[j][i];
    }
  }
  const dy = Math.round(SIZE / 2 - my / mass), dx = Math.round(SIZE / 2 - mx / mass);
  const out = Array.from({ length: SIZE }, () => new Array(SIZE).fill(0));
  for (let j = 0; j < oh; j++) {
    for (let i = 0; i < ow; i++) {
      const y = j + dy, x = i + dx;
      if (y >= 0 && y < SIZE && x >= 0 && x < SIZE) out[y][x] = Math.min(1, box[j][i]);
    }
  }
  return out;
}

// The red channel of a canvas drawn white on black, as intensities in [0, 1].
export function canvasIntensity(canvas) {
  const { width, height } = canvas;
  const rgba = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  const out = new Float64Array(width * height);
  for (let p = 0; p < out.length; p++) out[p] = rgba[4 * p] / 255;
  return out;
}
