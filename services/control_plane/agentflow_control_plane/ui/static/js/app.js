// The dashboard shell: sign-in, navigation (hash routes), one page mounted at a time.

import { claims, clearToken, getToken, onSignedOut, setToken } from "./api.js";
import { h, replace } from "./dom.js";
import * as audit from "./pages/audit.js";
import * as costs from "./pages/costs.js";
import * as run from "./pages/run.js";
import * as runs from "./pages/runs.js";
import * as signin from "./pages/signin.js";
import * as workers from "./pages/workers.js";

const main = document.getElementById("main");
let dispose = null;
let signinReason = "";

const ROUTES = [
  [/^#?\/?$/, runs, "runs"],
  [/^#\/runs$/, runs, "runs"],
  [/^#\/runs\/([0-9a-fA-F-]{36})$/, run, "runs"],
  [/^#\/workers$/, workers, "workers"],
  [/^#\/costs$/, costs, "costs"],
  [/^#\/audit$/, audit, "audit"],
];

/** "#/runs?status=running" -> ["#/runs", URLSearchParams] */
function parseHash() {
  const hash = location.hash || "#/runs";
  const q = hash.indexOf("?");
  return q < 0 ? [hash, new URLSearchParams()] : [hash.slice(0, q), new URLSearchParams(hash.slice(q + 1))];
}

function renderWho() {
  const who = document.getElementById("who");
  const c = claims();
  if (!getToken()) {
    replace(who);
    return;
  }
  const roles = c && Array.isArray(c.roles) ? c.roles.join(", ") : "";
  const expires = c && c.exp ? new Date(c.exp * 1000) : null;
  replace(
    who,
    h("span", { id: "tenant", title: expires ? `token expires ${expires.toLocaleString()}` : "" },
      "tenant ", h("strong", {}, (c && c.tenant) || "?"), roles ? ` · ${roles}` : ""),
    h("button", { id: "signout", onclick: () => { clearToken(); signinReason = "Signed out."; route(); } }, "Sign out"),
  );
}

function route() {
  if (dispose) {
    try {
      dispose();
    } catch (error) {
      console.error(error);
    }
    dispose = null;
  }
  renderWho();
  const [path, query] = parseHash();
  const nav = document.getElementById("nav");
  if (!getToken()) {
    nav.hidden = true;
    dispose = signin.mount(main, { reason: signinReason, onSignedIn: () => { signinReason = ""; route(); } });
    return;
  }
  nav.hidden = false;
  for (const [pattern, page, section] of ROUTES) {
    const m = path.match(pattern);
    if (!m) continue;
    for (const a of nav.querySelectorAll("a")) a.classList.toggle("active", a.dataset.page === section);
    replace(main);
    dispose = page.mount(main, { match: m, query, navigate });
    return;
  }
  replace(main, h("div", { class: "empty" }, "No such page. ", h("a", { href: "#/runs" }, "Runs")));
}

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

// A token handed over in the fragment (#token=...) never reaches a server (fragments are
// not sent); it is stored for this tab and removed from the address bar at once.
if (location.hash.startsWith("#token=")) {
  setToken(decodeURIComponent(location.hash.slice("#token=".length)));
  history.replaceState(null, "", `${location.pathname}#/runs`);
}

onSignedOut((reason) => {
  signinReason = reason;
  route();
});
window.addEventListener("hashchange", route);
route();
