// Workers and their queues (GET /v1/workers), re-read every few seconds: workers send
// heartbeats, not events.

import { api } from "../api.js";
import { ago, badge, dateTime, h, int, replace } from "../dom.js";

const REFRESH_MS = 3000;

export function mount(main) {
  const queues = h("div", { id: "queues" });
  const table = h("div", { id: "workers" });
  const updated = h("span", { class: "muted small", id: "workers-updated" });
  const error = h("div", { class: "error-box", hidden: true });
  let timer = null;
  let disposed = false;

  const meter = (used, capacity) => {
    const ratio = capacity ? Math.min(1, used / capacity) : 0;
    const bar = h("div", {});
    bar.style.width = `${(ratio * 100).toFixed(1)}%`;
    return h("div", { class: ["meter", ratio >= 1 && "full"], title: `${used} of ${capacity}` }, bar);
  };

  const load = async () => {
    let workers;
    try {
      workers = await api("/v1/workers");
      error.hidden = true;
    } catch (e) {
      error.hidden = false;
      replace(error, `Could not load workers: ${e.message}`);
      return;
    } finally {
      if (!disposed) timer = setTimeout(load, REFRESH_MS);
    }
    if (disposed) return;
    workers.sort((a, b) => Number(b.alive) - Number(a.alive) || a.id.localeCompare(b.id));
    const byQueue = new Map();
    for (const w of workers) {
      for (const q of w.queues) {
        const e = byQueue.get(q) || { queue: q, workers: 0, alive: 0, capacity: 0, inFlight: 0 };
        e.workers += 1;
        if (w.alive) {
          e.alive += 1;
          e.capacity += w.concurrency;
          e.inFlight += w.in_flight;
        }
        byQueue.set(q, e);
      }
    }
    replace(
      queues,
      byQueue.size
        ? h("table", {}, h("thead", {}, h("tr", {}, ["Queue", "Workers alive", "In flight", "Capacity", "Load"].map((t) => h("th", { class: t === "Queue" || t === "Load" ? null : "num" }, t)))),
            h("tbody", {}, [...byQueue.values()].sort((a, b) => a.queue.localeCompare(b.queue)).map((q) =>
              h("tr", { "data-queue": q.queue },
                h("td", {}, h("span", { class: "chip queue" }, q.queue)),
                h("td", { class: "num" }, `${q.alive} of ${q.workers}`),
                h("td", { class: "num" }, int(q.inFlight)),
                h("td", { class: "num" }, int(q.capacity)),
                h("td", {}, meter(q.inFlight, q.capacity))))))
        : h("div", { class: "empty" }, "No queue has a worker."),
    );
    replace(
      table,
      workers.length
        ? h("table", {}, h("thead", {}, h("tr", {}, ["Worker", "State", "Queues", "In flight", "Concurrency", "Version", "Agent types", "Started", "Last heartbeat"].map((t) => h("th", { class: ["In flight", "Concurrency"].includes(t) ? "num" : null }, t)))),
            h("tbody", {}, workers.map((w) =>
              h("tr", { "data-worker": w.id, "data-alive": String(w.alive) },
                h("td", { class: "mono" }, w.id),
                h("td", {}, badge(w.alive ? "alive" : "dead", w.alive ? "alive" : "silent")),
                h("td", {}, h("div", { class: "chips" }, w.queues.map((q) => h("span", { class: "chip queue" }, q)))),
                h("td", { class: "num" }, h("div", {}, int(w.in_flight)), meter(w.in_flight, w.concurrency)),
                h("td", { class: "num" }, int(w.concurrency)),
                h("td", { class: "mono small" }, w.version),
                h("td", {}, h("div", { class: "chips" }, w.agent_types.map((t) => h("span", { class: "chip" }, t)))),
                h("td", { class: "nowrap small" }, dateTime(w.started_at)),
                h("td", { class: "nowrap small", title: dateTime(w.last_seen) }, ago(w.last_seen))))))
        : h("div", { class: "empty" }, "No worker has sent a heartbeat recently."),
    );
    replace(updated, `updated ${new Date().toLocaleTimeString()}`);
  };

  replace(
    main,
    h("div", { class: "toolbar page-head" }, h("h1", {}, "Workers"), h("span", { class: "spacer" }), updated),
    error,
    h("section", { class: "card" }, h("h2", {}, "Queues"), queues),
    h("section", { class: "card" }, h("h2", {}, "Workers"), table),
  );
  load();
  return () => {
    disposed = true;
    clearTimeout(timer);
  };
}
