// The page: wires the controls to the API. Every figure shown comes from the service; the page only lays
// it out. Timings go to the User Timing API (performance.measure), where bench/web.py reads them:
//   latentserve:interactive      navigation start -> models listed and the pad ready
//   latentserve:stroke-result    end of a stroke -> its reconstruction, code and bound on screen
//   latentserve:sample-grid      "Draw samples" -> the grid on screen

import { ApiError, api, getApiKey, setApiKey } from "./api.js";
import { drawSamples, endFromInput, endFromSample, runInterpolation, runTraverse, showEnd } from "./explore.js";
import { showCode } from "./latent.js";
import { Pad } from "./pad.js";
import { blank, paint } from "./render.js";
import { $, state } from "./state.js";

const LN2 = Math.log(2);
const LIVE_DELAY_MS = 120; // while a stroke goes on, at most one update per this many ms of drawing

// ---------------------------------------------------------------------------------------------------
// Errors and the API key
// ---------------------------------------------------------------------------------------------------

function showError(e) {
  if (e?.name === "AbortError") return;
  const box = $("error");
  if (e instanceof ApiError) {
    box.textContent = `${e.title} (${e.status || "no answer"}): ${e.detail}`;
    if (e.status === 401) {
      $("key-box").open = true;
      $("api-key").focus();
    }
  } else {
    box.textContent = `Error: ${e?.message || e}`;
    console.warn(e);
  }
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Run an action, showing its error; an action superseded by a newer one (AbortError) is silent.
async function guarded(action) {
  try {
    await action();
  } catch (e) {
    showError(e);
  }
}

function setupKey() {
  $("api-key").value = getApiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setApiKey($("api-key").value.trim());
    clearError();
    guarded(loadModels);
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("api-key").value = "";
  });
}

// ---------------------------------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------------------------------

function describe(m) {
  const f = m.metrics || {};
  const parts = [`${m.kind}`, `latent size ${m.latent_dim}`, `${m.image_shape.join("×")}${m.channels === 3 ? " RGB" : ""}`,
    `${m.likelihood} likelihood`];
  if (m.flows) parts.push(`${m.flows} ${m.flow_type || ""} planar flows`);
  if (typeof f.test_log_likelihood === "number") {
    const what = f.log_likelihood_exact ? "exact test log-likelihood" : `test NLL (IW bound, S = ${f.importance_samples})`;
    const value = f.log_likelihood_exact ? f.test_log_likelihood : -f.test_log_likelihood;
    parts.push(`${what} ${value.toFixed(2)} nats`);
  }
  if (typeof f.test_elbo === "number") parts.push(`test ELBO ${f.test_elbo.toFixed(2)} nats`);
  if (typeof f.bits_per_dim === "number") parts.push(`${f.bits_per_dim.toFixed(4)} bits/dim`);
  return parts.join(" · ");
}

async function loadModels() {
  const answer = await api.models();
  state.models = answer.models;
  const select = $("model");
  select.replaceChildren(...answer.models.map((m) => {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.kind}, d = ${m.latent_dim})`;
    return o;
  }));
  if (!answer.models.length) {
    $("model-info").textContent = "No model is loaded.";
    return;
  }
  const keep = state.model && answer.models.some((m) => m.name === state.model.name);
  select.value = keep ? state.model.name : answer.default_model || answer.models[0].name;
  select.disabled = false;
  useModel(select.value, true);
  if (!performance.getEntriesByName("latentserve:interactive").length) { // the first load, not a new key
    performance.measure("latentserve:interactive", { start: 0, end: performance.now() });
  }
  document.body.dataset.ready = "true";
  await drawSamples();
}

function useModel(name, first = false) {
  const m = state.models.find((e) => e.name === name);
  state.model = m;
  $("model-info").textContent = describe(m);
  const [H, W] = m.image_shape;
  if (first || pad.H !== H || pad.W !== W) pad.setShape(H, W);
  $("samples").disabled = $("bound-seed").disabled = m.kind === "ppca";
  $("traverse-dim").replaceChildren(...Array.from({ length: m.latent_dim }, (_, i) => {
    const o = document.createElement("option");
    o.value = String(i);
    o.textContent = `z${i + 1}`;
    return o;
  }));
  state.ends = { a: null, b: null };
  state.dimChosen = false;
  showEnd("a");
  showEnd("b");
  blank($("interp-strip"));
  state.code = null;
  state.x = null;
  if (!first) {
    guarded(drawSamples);
    if (state.file || !pad.isEmpty()) evaluate(true);
  }
}

// ---------------------------------------------------------------------------------------------------
// Input -> what the model sees -> reconstruction, code and bound
// ---------------------------------------------------------------------------------------------------

let running = null; // AbortController of the evaluation in flight
let pending = false; // a live update waits for the one in flight
let liveTimer = 0;

// body[data-busy]: "1" while an evaluation runs or waits, "0" once the last one is on screen (for tests).
function markBusy() {
  document.body.dataset.busy = running || pending || liveTimer ? "1" : "0";
}

function onPadChange(final) {
  state.file = null;
  if (final) {
    clearTimeout(liveTimer);
    liveTimer = 0;
    evaluate(true, performance.now());
  } else if (!liveTimer) {
    liveTimer = setTimeout(() => { liveTimer = 0; evaluate(false); }, LIVE_DELAY_MS);
    markBusy();
  }
}

// final: supersede any evaluation in flight (end of a stroke, a new file, a new model); otherwise (a live
// update while drawing) wait for it. `since`: when the stroke ended, for the latency measure.
async function evaluate(final, since) {
  if (running && !final) {
    pending = true;
    markBusy();
    return;
  }
  running?.abort();
  const control = new AbortController();
  running = control;
  pending = false;
  markBusy();
  const { signal } = control;
  const m = state.model;
  try {
    if (!state.file && pad.isEmpty()) {
      showEmpty();
      return;
    }
    const blob = state.file || await pad.toBlob();
    const name = state.file ? state.file.name : "drawing.png";
    const invert = state.file ? $("invert").checked : false;
    const pre = await api.preprocess(m.name, blob, name, invert, signal);
    const x = pre.results[0].x;
    state.x = x;
    paint($("seen"), [x]);
    const r = pre.results[0];
    $("seen-caption").textContent = `What ${m.name} sees: ${m.image_shape.join("×")}`
      + (r.resized ? `, resized from ${r.original_shape.join("×")}` : "") + (pre.inverted ? ", inverted" : "")
      + (pre.binarized ? ", binarized (intensity ≥ 0.5 → 1)" : "");
    const ppca = m.kind === "ppca";
    const samples = ppca ? undefined : Number($("samples").value);
    const seed = ppca ? undefined : Number($("bound-seed").value) || 0;
    const coded = api.encode(m.name, x, signal).then(async (enc) => {
      const e = enc.results[0];
      const z = e.z_k || e.mean;
      const dec = await api.decode(m.name, [z], signal);
      return { e, z, image: dec.images[0] };
    });
    const [{ e, z, image }, ll] = await Promise.all([coded, api.logLikelihood(m.name, x, samples, seed, signal)]);
    if (signal.aborted) return;
    state.code = z;
    paint($("recon"), [image]);
    $("recon-caption").textContent = e.z_k ? "Reconstruction: decoded z_K, the posterior mean through the flows."
      : "Reconstruction: the decoded posterior mean.";
    showCode($("code"), e.mean, e.log_var, e.z_k);
    if (!state.dimChosen) { // the dimension the posterior is surest of (least variance): the input sets it most
      $("traverse-dim").value = String(e.log_var.indexOf(Math.min(...e.log_var)));
    }
    showBound(ll, m);
    clearError();
    if (since !== undefined) {
      await new Promise((resolve) => requestAnimationFrame(resolve)); // the frame that shows it
      performance.measure("latentserve:stroke-result", { start: since, end: performance.now() });
    }
    if ($("traverse-base").value === "input") await runTraverse(signal);
    document.body.dataset.evaluated = String(Number(document.body.dataset.evaluated || 0) + 1);
  } catch (e) {
    showError(e);
  } finally {
    if (running === control) {
      running = null;
      if (pending) evaluate(false);
      markBusy();
    }
  }
}

function showEmpty() {
  state.x = state.code = null;
  blank($("seen"));
  blank($("recon"));
  $("seen-caption").textContent = "The image the model sees appears here.";
  $("bound-rows").replaceChildren();
  $("bound-note").textContent = "";
  $("code").replaceChildren();
}

function showBound(ll, m) {
  const r = ll.results[0];
  const D = m.data_dim;
  // bits/dim is affine in the log-likelihood with slope -1 / (D ln 2) (service/app.py `_bits_per_dim`):
  // the ELBO's follows from the service's figure for the bound.
  const bpd = (v) => (r.bits_per_dim === null ? null : r.bits_per_dim + (r.log_likelihood - v) / (D * LN2));
  const rows = ll.kind === "ppca" ? [["exact log-likelihood log p(x)", r.log_likelihood, "ll"]]
    : [["ELBO", r.elbo, "elbo"], [`importance-weighted bound (S = ${ll.samples})`, r.iw_bound, "iw"]];
  $("bound-rows").replaceChildren(...rows.map(([label, v, key]) => {
    const tr = document.createElement("tr");
    tr.dataset.figure = key;
    tr.dataset.nats = String(v);
    const b = bpd(v);
    if (b !== null) tr.dataset.bpd = String(b);
    for (const [i, text] of [label, v.toFixed(2), b === null ? "—" : b.toFixed(4)].entries()) {
      const cell = document.createElement(i ? "td" : "th");
      if (!i) cell.scope = "row";
      cell.textContent = text;
      tr.append(cell);
    }
    return tr;
  }));
  $("bound-note").textContent = [ll.binarized ? `Evaluated binarized: ${ll.binarization}.` : "",
    ll.bits_per_dim_note ? `bits/dim: ${ll.bits_per_dim_note}.` : "bits/dim: none for non-binary input to a "
      + "Bernoulli model.", ll.seed !== null ? `Seed ${ll.seed}.` : ""].filter(Boolean).join(" ");
}

async function useFile(file) {
  if (!file) return;
  state.file = file;
  try {
    pad.show(await createImageBitmap(file));
  } catch {
    pad.show(null); // the browser cannot show it; the service says what is wrong with it
  }
  await evaluate(true);
}

// ---------------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------------

const pad = new Pad($("pad"), $("pad-cursor"), onPadChange);

function wire() {
  setupKey();
  $("model").addEventListener("change", (e) => useModel(e.target.value));
  const brush = $("brush");
  brush.addEventListener("input", () => {
    pad.brush = Number(brush.value);
    $("brush-value").textContent = `${brush.value} px`;
  });
  $("undo").addEventListener("click", () => pad.undo());
  $("clear").addEventListener("click", () => { state.file = null; pad.clear(); });
  $("file").addEventListener("change", (e) => guarded(() => useFile(e.target.files[0])));
  $("invert").addEventListener("change", () => { if (state.file) evaluate(true); });
  const wrap = $("pad-wrap");
  wrap.addEventListener("dragover", (e) => { e.preventDefault(); wrap.classList.add("drop"); });
  wrap.addEventListener("dragleave", () => wrap.classList.remove("drop"));
  wrap.addEventListener("drop", (e) => {
    e.preventDefault();
    wrap.classList.remove("drop");
    guarded(() => useFile(e.dataTransfer.files[0]));
  });
  for (const id of ["samples", "bound-seed"]) $(id).addEventListener("change", () => evaluate(true));
  $("sample-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(drawSamples); });
  $("sample-random").addEventListener("click", () => {
    $("sample-seed").value = String(Math.floor(Math.random() * 2 ** 31));
    guarded(drawSamples);
  });
  const temperature = $("temperature");
  temperature.addEventListener("input", () => { $("temperature-value").textContent = Number(temperature.value).toFixed(2); });
  $("a-input").addEventListener("click", () => guarded(() => endFromInput("a")));
  $("b-input").addEventListener("click", () => guarded(() => endFromInput("b")));
  $("a-sample").addEventListener("click", () => guarded(() => endFromSample("a")));
  $("b-sample").addEventListener("click", () => guarded(() => endFromSample("b")));
  $("interp-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(runInterpolation); });
  $("traverse-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(() => runTraverse()); });
  $("traverse-dim").addEventListener("change", () => { state.dimChosen = true; });
  for (const id of ["traverse-dim", "traverse-base"]) $(id).addEventListener("change", () => guarded(() => runTraverse()));
}

wire();
guarded(loadModels);
