// The service's public API, same-origin, with the API key of this tab (sessionStorage) when one is set.
// Every error answer is RFC 9457 problem+json: an ApiError carries its status, title and detail.

const KEY_NAME = "latentserve.apiKey";

export class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail);
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

export function getApiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME) || "";
  } catch {
    return ""; // storage disabled: the page works without a key
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_NAME, key);
    else sessionStorage.removeItem(KEY_NAME);
  } catch {
    // storage disabled: nothing to keep
  }
}

// Relative to the page, so that a service behind a path prefix works as it is.
function url(path, params) {
  const u = new URL(path, document.baseURI);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null) u.searchParams.set(k, String(v));
  }
  return u;
}

async function call(path, { method = "GET", params, json, form, signal } = {}) {
  const headers = { Accept: "application/json" };
  const key = getApiKey();
  if (key) headers["X-API-Key"] = key;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form; // the browser writes the multipart boundary
  }
  let response;
  try {
    response = await fetch(url(path, params), { method, headers, body, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "Network error", `the service could not be reached (${e.message})`);
  }
  if (!response.ok) {
    let problem = null;
    try {
      problem = await response.json();
    } catch {
      // not JSON: say what the status says
    }
    throw new ApiError(response.status, problem?.title || response.statusText || "Error",
      problem?.detail || `HTTP ${response.status}`);
  }
  return response.json();
}

export const api = {
  models: (signal) => call("models", { signal }),

  // The pixels the model sees for one image file (or a drawing as PNG): H x W (x 3), binarized for
  // Bernoulli models as /log-likelihood evaluates them.
  preprocess(model, blob, name, invert, signal) {
    const form = new FormData();
    form.append("images", blob, name);
    return call("preprocess", { method: "POST", params: { model, invert }, form, signal });
  },

  encode: (model, x, signal) => call("encode", { method: "POST", params: { model }, json: { images: [x] }, signal }),

  logLikelihood: (model, x, samples, seed, signal) =>
    call("log-likelihood", { method: "POST", params: { model, samples, seed }, json: { images: [x] }, signal }),

  decode: (model, z, signal) => call("decode", { method: "POST", params: { model, format: "json" }, json: { z }, signal }),

  sample: (model, n, seed, temperature, signal) =>
    call("sample", { params: { model, n, seed, temperature, format: "json" }, signal }),
};
