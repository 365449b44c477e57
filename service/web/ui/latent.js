// The latent space: the code shown as bars, and the paths through it that the page decodes.

// Codes from a to b in `steps` steps (both ends included): straight, or along the great circle between
// them with their norms interpolated (spherical interpolation, as White 2016 "Sampling generative networks"
// recommends for Gaussian priors, whose mass lies near a sphere).
export function interpolate(a, b, steps, spherical) {
  const dot = a.reduce((s, v, i) => s + v * b[i], 0);
  const na = Math.hypot(...a);
  const nb = Math.hypot(...b);
  const cos = na > 0 && nb > 0 ? Math.min(1, Math.max(-1, dot / (na * nb))) : 1;
  const omega = Math.acos(cos);
  const out = [];
  for (let i = 0; i < steps; i++) {
    const t = i / (steps - 1);
    let wa = 1 - t;
    let wb = t;
    if (spherical && Math.sin(omega) > 1e-6) { // parallel codes: the straight line is the arc
      wa = Math.sin((1 - t) * omega) / Math.sin(omega);
      wb = Math.sin(t * omega) / Math.sin(omega);
    }
    out.push(a.map((v, j) => wa * v + wb * b[j]));
  }
  return out;
}

// Codes equal to `base` but for dimension `dim`, which goes from -range to +range in `steps` steps.
export function traverse(base, dim, range, steps) {
  const out = [];
  for (let i = 0; i < steps; i++) {
    const z = base.slice();
    z[dim] = -range + (2 * range * i) / (steps - 1);
    out.push(z);
  }
  return out;
}

function fmt(v) {
  return v.toFixed(2).replace("-", "\u2212");
}

// Bars of the posterior: mean ± standard deviation per dimension on a common axis, and z_K (flow models)
// as a dot. Each row keeps the exact numbers in data attributes (data-mean, data-std, data-zk).
export function showCode(container, mean, logVar, zK) {
  const std = logVar.map((v) => Math.exp(v / 2));
  let span = 3;
  mean.forEach((m, i) => { span = Math.max(span, Math.abs(m) + std[i], zK ? Math.abs(zK[i]) : 0); });
  span = Math.ceil(span);
  const pos = (v) => `${((v + span) / (2 * span)) * 100}%`;
  if (container.children.length !== mean.length) {
    container.replaceChildren(...mean.map((_, i) => {
      const row = document.createElement("div");
      row.className = "bar-row";
      row.setAttribute("role", "listitem");
      row.innerHTML = `<span class="bar-name">z${i + 1}</span><span class="bar-track"><span class="bar-zero"></span>`
        + `<span class="bar-std"></span><span class="bar-mean"></span><span class="bar-zk"></span></span>`
        + `<span class="bar-value"></span>`;
      return row;
    }));
  }
  container.dataset.span = String(span);
  mean.forEach((m, i) => {
    const row = container.children[i];
    const [, track, value] = row.children;
    const [zero, band, tick, dot] = track.children;
    zero.style.left = pos(0);
    band.style.left = pos(m - std[i]);
    band.style.width = `${(std[i] / span) * 100}%`;
    tick.style.left = pos(m);
    dot.hidden = !zK;
    if (zK) dot.style.left = pos(zK[i]);
    row.dataset.mean = String(m);
    row.dataset.std = String(std[i]);
    if (zK) row.dataset.zk = String(zK[i]);
    else delete row.dataset.zk;
    const text = `${fmt(m)} ± ${std[i].toFixed(2)}` + (zK ? `, z_K ${fmt(zK[i])}` : "");
    value.textContent = text;
    row.setAttribute("aria-label", `z${i + 1}: ${text}`);
  });
}
