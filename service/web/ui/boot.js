// Asks for GET /models the moment the page starts to load, while its modules are still on their way
// (main.js would ask only once all of them have arrived and run): main.js takes this answer.
"use strict";
window.latentserveModels = (() => {
  const headers = { Accept: "application/json" };
  try {
    const key = sessionStorage.getItem("latentserve.apiKey");
    if (key) headers["X-API-Key"] = key;
  } catch {
    // storage disabled: no key
  }
  return fetch(new URL("models", document.baseURI), { headers }).catch(() => null);
})();
