// ReDoc at /redoc, from the service's own copy (no CDN, no web fonts). The schema is fetched here, with the
// API key that the page at / keeps in this tab (sessionStorage), and handed to ReDoc as an object.
/* global Redoc */
const KEY_NAME = "latentserve.apiKey";

// ReDoc's side menu shows a logo it loads from its vendor's host: on an air-gapped host a failed request,
// and under this page's Content-Security-Policy a violation either way. An image from another host gets an
// empty data: URL instead, which fails to decode, and ReDoc then hides the logo itself (its onError).
function sameOriginImage(value) {
  const text = String(value);
  return text.startsWith("data:") || new URL(text, document.baseURI).origin === window.location.origin
    ? text : "data:,";
}
const setAttribute = Element.prototype.setAttribute;
Element.prototype.setAttribute = function setAttributeSameOrigin(name, value) {
  const img = this instanceof HTMLImageElement && name.toLowerCase() === "src";
  return setAttribute.call(this, name, img ? sameOriginImage(value) : value);
};
const src = Object.getOwnPropertyDescriptor(HTMLImageElement.prototype, "src");
Object.defineProperty(HTMLImageElement.prototype, "src", {
  ...src,
  set(value) { src.set.call(this, sameOriginImage(value)); },
});

async function start() {
  const headers = { Accept: "application/json" };
  try {
    const key = sessionStorage.getItem(KEY_NAME);
    if (key) headers["X-API-Key"] = key;
  } catch {
    // storage disabled: no key
  }
  const response = await fetch(new URL("openapi.json", document.baseURI), { headers });
  if (!response.ok) {
    const problem = await response.json().catch(() => null);
    const box = document.getElementById("redoc-error");
    box.textContent = `The API schema could not be loaded: ${problem?.detail || response.status}. `
      + "Enter the API key on the service's page (/) first.";
    box.hidden = false;
    return;
  }
  Redoc.init(await response.json(), { hideDownloadButton: false }, document.getElementById("redoc"));
}

start();
