// Runs: the tenant's recent runs, filtered by status and workflow, kept current by the
// tenant event stream (run.* events).

import { api } from "../api.js";
import { ago, badge, dateTime, debounce, duration, between, h, liveIndicator, replace, shortId } from "../dom.js";
import { follow } from "../stream.js";

const STATUSES = ["pending", "running", "succeeded", "failed", "cancelled"];
const RANK = { pending: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };
const LIMIT = 100;

export function mount(main, { query, navigate }) {
  const status = query.get("status") || "";
  const workflow = query.get("workflow") || "";
  const indicator = liveIndicator();
  const rows = new Map(); // run id -> run summary
  const body = h("tbody", {});
  const empty = h("div", { class: "empty", hidden: true }, "No runs match.");
  const error = h("div", { class: "error-box", hidden: true });
  const knownWorkflows = h("datalist", { id: "workflows" });
  let loaded = false;
  const pending = [];

  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any status"),
    STATUSES.map((st) => h("option", { value: st, selected: st === status }, st)),
  );
  const workflowInput = h("input", {
    id: "filter-workflow",
    name: "workflow",
    list: "workflows",
    placeholder: "any workflow",
    value: workflow,
  });
  const apply = () => {
    const q = new URLSearchParams();
    if (statusSelect.value) q.set("status", statusSelect.value);
    if (workflowInput.value.trim()) q.set("workflow", workflowInput.value.trim());
    const qs = q.toString();
    navigate(qs ? `#/runs?${qs}` : "#/runs");
  };
  statusSelect.addEventListener("change", apply);

  const matches = (run) => (!status || run.status === status) && (!workflow || run.workflow === workflow);

  const render = () => {
    const list = [...rows.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1)).slice(0, LIMIT);
    replace(
      body,
      list.map((r) =>
        h(
          "tr",
          { "data-run": r.id, "data-status": r.status, class: matches(r) ? null : "muted" },
          h("td", {}, h("a", { href: `#/runs/${r.id}`, class: "mono", title: r.id }, shortId(r.id))),
          h("td", {}, h("a", { href: `#/runs?workflow=${encodeURIComponent(r.workflow)}` }, r.workflow),
            h("span", { class: "muted small" }, ` v${r.version}`)),
          h("td", { class: "status" }, badge(r.status)),
          h("td", { class: "nowrap", title: dateTime(r.created_at) }, dateTime(r.created_at), h("div", { class: "muted small" }, ago(r.created_at))),
          h("td", { class: "num" }, r.finished_at ? duration(between(r.created_at, r.finished_at)) : r.status === "running" ? "…" : "—"),
          h("td", { class: "small" }, r.error ? h("span", { class: "mono", title: r.error }, r.error.slice(0, 120)) : ""),
        ),
      ),
    );
    empty.hidden = list.length > 0;
    const names = new Set([...rows.values()].map((r) => r.workflow));
    if (workflow) names.add(workflow);
    replace(knownWorkflows, [...names].sort().map((n) => h("option", { value: n })));
  };

  const load = async () => {
    try {
      const list = await api("/v1/runs", { query: { status, workflow, limit: LIMIT } });
      rows.clear();
      for (const r of list) rows.set(r.id, r);
      error.hidden = true;
      loaded = true;
      for (const ev of pending.splice(0)) apply_event(ev);
      render();
    } catch (e) {
      error.hidden = false;
      replace(error, `Could not load runs: ${e.message}`);
    }
  };
  const reload = debounce(load, 300);

  // Status only moves forward (pending → running → an end); late or replayed events
  // never take a row back.
  const apply_event = (ev) => {
    const data = ev.data || {};
    let row = rows.get(ev.run_id);
    if (ev.type === "run.created") {
      if (row) return;
      row = { id: ev.run_id, workflow: ev.workflow || data.workflow, version: data.version, status: data.status || "pending",
        created_at: ev.ts, finished_at: null, error: null };
      if (!matches(row)) return;
      rows.set(row.id, row);
      return;
    }
    if (!row) return;
    const next = { "run.started": "running", "run.succeeded": "succeeded", "run.failed": "failed", "run.cancelled": "cancelled" }[ev.type];
    if (!next || RANK[next] < RANK[row.status] || (RANK[next] === 2 && RANK[row.status] === 2)) return;
    row.status = next;
    if (RANK[next] === 2) {
      row.finished_at = ev.ts;
      row.error = data.error || data.reason || null;
    }
  };

  const onEvent = (ev) => {
    if (!ev.type || !ev.type.startsWith("run.")) return;
    if (!loaded) {
      pending.push(ev);
      return;
    }
    apply_event(ev);
    render();
  };

  const follower = follow({
    path: "/v1/events",
    params: { type: "run.", workflow },
    indicator,
    onEvent,
    refresh: load,
    pollMs: 2000,
    onGap: reload,
  });
  load();

  replace(
    main,
    h("div", { class: "toolbar page-head" },
      h("h1", {}, "Runs"),
      h("span", { class: "spacer" }),
      indicator),
    h(
      "form",
      { class: "toolbar", onsubmit: (e) => { e.preventDefault(); apply(); } },
      h("label", {}, "Status", statusSelect),
      h("label", {}, "Workflow", workflowInput, knownWorkflows),
      h("button", { type: "submit" }, "Filter"),
      status || workflow ? h("a", { href: "#/runs", class: "small" }, "clear filters") : null,
    ),
    error,
    h(
      "div",
      { class: "card" },
      h(
        "table",
        { id: "runs-table" },
        h("thead", {}, h("tr", {}, ["Run", "Workflow", "Status", "Created", "Duration", "Error"].map((t) => h("th", { class: t === "Duration" ? "num" : null }, t)))),
        body,
      ),
      empty,
    ),
  );
  return () => {
    follower.stop();
    reload.cancel();
  };
}
