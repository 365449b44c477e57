// Images from the API (H x W or H x W x 3 intensities in [0, 1]) drawn into canvases pixel for pixel, laid
// out as the service lays out its PNG grids (service/images.py `png_grid`: a 1-pixel gray border), with the
// service's 8-bit rounding, so that a grid here has the very pixels of the service's PNG.

// np.round(np.float32(v) * 255): the product in float32, then rounding half to even (numpy's rule).
export function toByte(v) {
  const c = v > 1 ? 1 : v >= 0 ? v : 0; // np.clip(np.nan_to_num(v), 0, 1): NaN fails both tests -> 0
  const f = Math.fround(Math.fround(c) * 255);
  const r = Math.round(f);
  return r - f === 0.5 && r % 2 === 1 ? r - 1 : r;
}

const GRAY = toByte(0.5); // the separators' gray

// (rows, cols) of the service's grid for n images: ceil(sqrt(n)) columns.
export function gridLayout(n) {
  if (n <= 1) return [1, 1];
  const cols = Math.floor(Math.sqrt(n - 1)) + 1;
  return [Math.ceil(n / cols), cols];
}

// Draw `images` into `canvas`: one image alone, else `cols` per row (default: the service's grid) with a
// `pad`-pixel gray border. The canvas gets one pixel per image pixel; CSS scales it up.
export function paint(canvas, images, { cols, pad = 1 } = {}) {
  const n = images.length;
  const H = images[0].length;
  const W = images[0][0].length;
  const single = n === 1;
  if (cols === undefined) cols = gridLayout(n)[1];
  const rows = single ? 1 : Math.ceil(n / cols);
  const width = single ? W : cols * (W + pad) + pad;
  const height = single ? H : rows * (H + pad) + pad;
  canvas.width = width;
  canvas.height = height;
  const data = new ImageData(width, height);
  const px = data.data;
  if (!single) {
    for (let i = 0; i < px.length; i += 4) {
      px[i] = px[i + 1] = px[i + 2] = GRAY;
      px[i + 3] = 255;
    }
  }
  images.forEach((image, k) => {
    const top = single ? 0 : pad + Math.floor(k / cols) * (H + pad);
    const left = single ? 0 : pad + (k % cols) * (W + pad);
    for (let r = 0; r < H; r++) {
      const row = image[r];
      let o = ((top + r) * width + left) * 4;
      for (let c = 0; c < W; c++, o += 4) {
        const v = row[c];
        if (typeof v === "number") {
          px[o] = px[o + 1] = px[o + 2] = toByte(v);
        } else { // [R, G, B]
          px[o] = toByte(v[0]);
          px[o + 1] = toByte(v[1]);
          px[o + 2] = toByte(v[2]);
        }
        px[o + 3] = 255;
      }
    }
  });
  canvas.getContext("2d").putImageData(data, 0, 0);
  canvas.dataset.images = String(n);
}

// One row of images (interpolations, traversals).
export function paintStrip(canvas, images) {
  paint(canvas, images, { cols: images.length });
}

export function blank(canvas) {
  canvas.width = 1;
  canvas.height = 1;
  canvas.dataset.images = "0";
}
