// Sign in: the operator pastes a token; it is kept in this tab's sessionStorage only.

import { ApiError, api, clearToken, setToken } from "../api.js";
import { h, replace } from "../dom.js";

export function mount(main, { reason, onSignedIn }) {
  const input = h("textarea", {
    id: "token",
    rows: 5,
    placeholder: "eyJhbGciOi…",
    autocomplete: "off",
    spellcheck: "false",
    "aria-label": "API token",
  });
  const message = h("div", { id: "signin-error", class: reason ? "notice" : null }, reason || "");
  const submit = h("button", { class: "primary", type: "submit", id: "signin-button" }, "Sign in");
  const form = h(
    "form",
    {
      class: "card signin",
      onsubmit: async (event) => {
        event.preventDefault();
        const token = input.value.trim().replace(/^Bearer\s+/i, "");
        if (!token) {
          replace(message, "Paste a token first.");
          message.className = "error-box";
          return;
        }
        submit.disabled = true;
        setToken(token);
        try {
          // Any read proves the token: the server checks signature, expiry and tenant.
          await api("/v1/runs", { query: { limit: 1 } });
          onSignedIn();
        } catch (error) {
          clearToken();
          replace(message, error instanceof ApiError ? `Refused (${error.status}): ${error.message}` : String(error));
          message.className = "error-box";
          submit.disabled = false;
        }
      },
    },
    h("h1", {}, "Sign in to AgentFlow"),
    h("p", {}, "Paste an API token. It stays in this browser tab only (session storage) and is sent to this control plane with every request."),
    message,
    input,
    h("div", { class: "toolbar", style: null }, submit),
    h("p", { class: "small" }, "A read-only token for an operator's screen:"),
    h("pre", { class: "small" }, "agentflow token --tenant <tenant> --role viewer --ttl 28800"),
  );
  replace(main, form);
  input.focus();
  return () => {};
}
