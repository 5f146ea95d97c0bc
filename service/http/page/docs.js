// The API's description (docs.json) in Swagger UI, from this server's own files: no request leaves it (no validator).
"use strict";

window.addEventListener("load", () => {
  SwaggerUIBundle({ url: "docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null });
});
