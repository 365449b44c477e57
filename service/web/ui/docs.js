// Swagger UI at /docs, from the service's own copy (no CDN). FastAPI's page starts it with an inline script,
// which the Content-Security-Policy forbids: this file does the same. Requests carry the API key that the
// page at / keeps in this tab (sessionStorage), so the schema loads when the service has a key.
/* global SwaggerUIBundle */
const KEY_NAME = "latentserve.apiKey";

function apiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME) || "";
  } catch {
    return "";
  }
}

window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // the default sends the schema to a public validator
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  requestInterceptor: (request) => {
    const key = apiKey();
    if (key && !request.headers["X-API-Key"]) request.headers["X-API-Key"] = key;
    return request;
  },
});
