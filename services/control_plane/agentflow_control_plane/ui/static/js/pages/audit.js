// Audit: the chain verified on demand (GET /v1/audit/verify) and its latest entries.

import { api } from "../api.js";
import { dateTime, h, kv, replace } from "../dom.js";

const LATEST = 50;

export function mount(main) {
  const status = h("div", { id: "audit-status" }, h("div", { class: "muted" }, "Verifying the chain…"));
  const entries = h("div", { id: "audit-entries" });
  const button = h("button", { id: "verify-again", onclick: () => load() }, "Verify again");
  let disposed = false;

  const fact = (label, value) => h("div", {}, h("dt", {}, label), h("dd", {}, value));

  const load = async () => {
    button.disabled = true;
    let result;
    try {
      result = await api("/v1/audit/verify");
    } catch (e) {
      replace(status, h("div", { class: "error-box" }, `Could not verify: ${e.message}`));
      button.disabled = false;
      return;
    }
    if (disposed) return;
    button.disabled = false;
    const anchor = result.anchor;
    replace(
      status,
      h("div", { class: "audit-status", "data-ok": String(result.ok) },
        h("div", { class: ["mark", result.ok ? "ok" : "broken"] }, result.ok ? "✓" : "✗"),
        h("div", {},
          h("h2", { id: "audit-verdict" }, result.ok ? "The audit chain verifies" : "The audit chain is broken"),
          h("div", { class: "muted small" }, `${result.length} entries recomputed in ${result.elapsed_s.toFixed(3)} s, ${new Date().toLocaleTimeString()}`))),
      result.problem ? h("div", { class: "error-box" }, `${result.problem}${result.first_bad_seq !== null ? ` (first bad entry: seq ${result.first_bad_seq})` : ""}`) : null,
      h("dl", { class: "facts" },
        fact("length", String(result.length)),
        fact("recorded length", String(result.recorded_length)),
        fact("pending (not yet sealed)", String(result.pending)),
        fact("head hash", h("span", { class: "hash" }, result.head_hash))),
      h("dl", { class: "facts" },
        anchor
          ? [fact("last external anchor", `seq ${anchor.seq} · ${dateTime(anchor.ts)}`),
             fact("anchor hash", h("span", { class: "hash" }, anchor.hash)),
             fact("anchor matches", anchor.matches === null ? "not reached (chain broken earlier)" : anchor.matches ? "yes" : "NO")]
          : fact("last external anchor", "none published yet")),
    );
    try {
      const after = Math.max(0, result.length - LATEST);
      const page = await api("/v1/audit", { query: { after, limit: LATEST } });
      if (disposed) return;
      const list = page.entries.slice().reverse();
      replace(entries, list.length
        ? h("table", {}, h("thead", {}, h("tr", {}, ["Seq", "Time", "Actor", "Action", "Resource", "Data", "Hash"].map((t) => h("th", {}, t)))),
            h("tbody", {}, list.map((e) => h("tr", {},
              h("td", { class: "num" }, String(e.seq)),
              h("td", { class: "nowrap small" }, dateTime(e.ts)),
              h("td", { class: "small mono" }, e.actor),
              h("td", { class: "mono small" }, e.action),
              h("td", { class: "mono small" }, e.resource),
              h("td", { class: "kv" }, kv(e.data)),
              h("td", { class: "mono small nowrap", title: e.hash }, `${e.hash.slice(7, 19)}…`)))))
        : h("div", { class: "empty" }, "No audit entries yet."));
    } catch (e) {
      replace(entries, h("div", { class: "error-box" }, e.message));
    }
  };

  replace(
    main,
    h("div", { class: "toolbar page-head" }, h("h1", {}, "Audit"), h("span", { class: "spacer" }), button),
    h("section", { class: "card" }, status),
    h("section", { class: "card" }, h("h2", {}, `Latest ${LATEST} entries`), entries),
  );
  load();
  return () => {
    disposed = true;
  };
}
