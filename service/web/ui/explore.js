// Exploration: a grid of samples, an interpolation strip between two codes, a traversal of one dimension.

import { api } from "./api.js";
import { interpolate, traverse } from "./latent.js";
import { blank, paint, paintStrip } from "./render.js";
import { $, state, turn } from "./state.js";

export async function drawSamples() {
  const start = performance.now();
  const m = state.model;
  const current = turn("samples");
  const answer = await api.sample(m.name, Number($("sample-n").value), Number($("sample-seed").value) || 0,
    Number($("temperature").value));
  if (state.model !== m || !current()) return;
  state.samples = answer;
  paint($("sample-grid"), answer.images);
  $("sample-pick").max = String(answer.images.length);
  await new Promise((resolve) => requestAnimationFrame(resolve));
  performance.measure("latentserve:sample-grid", { start, end: performance.now() });
  if (!state.ends.a && !state.ends.b && answer.images.length > 1) {
    setEnd("a", answer.z[0], answer.images[0], "sample 1");
    setEnd("b", answer.z[1], answer.images[1], "sample 2");
    await runInterpolation();
  }
  if ($("traverse-base").value === "zero" || !state.code) await runTraverse();
}

function setEnd(which, z, image, label) {
  state.ends[which] = { z, image, label };
  showEnd(which);
}

export function showEnd(which) {
  const end = state.ends[which];
  const canvas = $(`end-${which}`);
  if (end) paint(canvas, [end.image]);
  else blank(canvas);
  $(`end-${which}-caption`).textContent = `${which.toUpperCase()}: ${end ? end.label : "none"}`;
}

export async function endFromInput(which) {
  if (!state.code) throw new Error("draw or upload an input first");
  const dec = await api.decode(state.model.name, [state.code]);
  setEnd(which, state.code, dec.images[0], "the current input's code");
  await runInterpolation();
}

export async function endFromSample(which) {
  const k = Number($("sample-pick").value);
  const s = state.samples;
  if (!s || !(k >= 1 && k <= s.images.length)) throw new Error(`pick a sample between 1 and ${s ? s.images.length : 0}`);
  setEnd(which, s.z[k - 1], s.images[k - 1], `sample ${k}`);
  await runInterpolation();
}

export async function runInterpolation() {
  const { a, b } = state.ends;
  if (!a || !b) throw new Error("set both ends A and B first");
  const steps = Math.round(Number($("interp-steps").value));
  if (!(steps >= 2 && steps <= 32)) throw new Error("steps must be between 2 and 32");
  const spherical = document.querySelector("input[name=path]:checked").value === "spherical";
  const m = state.model;
  const current = turn("interpolation");
  const dec = await api.decode(m.name, interpolate(a.z, b.z, steps, spherical));
  if (state.model === m && current()) paintStrip($("interp-strip"), dec.images);
}

export async function runTraverse(signal) {
  const m = state.model;
  const dim = Number($("traverse-dim").value) || 0;
  const range = Number($("traverse-range").value);
  const steps = Math.round(Number($("traverse-steps").value));
  if (!(range > 0 && range <= 10)) throw new Error("the range must be in (0, 10]");
  if (!(steps >= 2 && steps <= 32)) throw new Error("steps must be between 2 and 32");
  const fromInput = $("traverse-base").value === "input" && state.code;
  const base = fromInput ? state.code : new Array(m.latent_dim).fill(0);
  const current = turn("traversal");
  const dec = await api.decode(m.name, traverse(base, dim, range, steps), signal);
  if (state.model !== m || !current()) return;
  paintStrip($("traverse-strip"), dec.images);
  $("traverse-caption").textContent = `z${dim + 1} from −${range} to +${range} in ${steps} steps, the other `
    + `dimensions at ${fromInput ? "the current input's code" : "0"}.`;
}
