// One run: summary, the plan with the live state, the step timeline, the event log, the
// envelopes with their hashes, tool calls, input and output.
//
// The run's event stream drives it: events go to the log at once, and each one that
// changes the run makes the page re-read GET /v1/runs/{id} (the authoritative state).

import { ApiError, api } from "../api.js";
import {
  badge, between, dateTime, debounce, duration, h, int, json, kv, liveIndicator, replace, shortId, time, usd,
} from "../dom.js";
import { drawGraph, paintRun, withLlmPlan } from "../graph.js";
import { verifyEnvelope } from "../jcs.js";
import { follow } from "../stream.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export function mount(main, { match }) {
  const runId = match[1].toLowerCase();
  const indicator = liveIndicator();
  const el = {
    head: h("div", { class: "card", id: "run-head" }, h("div", { class: "muted" }, "Loading run…")),
    planSummary: h("div", { class: "plan-summary", id: "plan-summary" }),
    graph: h("div", { class: "graph-box", id: "graph" }, h("div", { class: "empty" }, "Loading the plan…")),
    timeline: h("div", { id: "timeline" }),
    log: h("tbody", {}),
    logBox: null,
    logNote: h("div", { class: "muted small", id: "events-note" }),
    envelopes: h("div", { id: "envelopes" }),
    toolCalls: h("div", { id: "tool-calls" }),
    io: h("div", { id: "io" }),
  };
  el.logBox = h("div", { class: "log", id: "events" }, h("table", {}, h("thead", {}, h("tr", {},
    h("th", { class: "num" }, "cursor"), h("th", {}, "time"), h("th", {}, "type"), h("th", {}, "step"), h("th", {}, "data"))), el.log));

  let run = null;
  let graph = null; // as served, and with the LLM plan once there is one
  let drawnGraph = null;
  let drawing = null;
  let disposed = false;
  const btNodes = {};
  const events = [];
  let envelopes = [];
  let loadedEnvelopesFor = "";
  let follower = null;
  let ticker = null;

  replace(
    main,
    el.head,
    h("div", { class: "grid2 run" },
      h("section", { class: "card" }, h("h2", {}, "Plan"), el.planSummary, el.graph, legend()),
      h("section", { class: "card" }, h("h2", {}, "Timeline"), el.timeline)),
    h("section", { class: "card" }, h("h2", {}, "Events", indicator), el.logNote, el.logBox),
    h("section", { class: "card" }, h("h2", {}, "Envelopes"), h("p", { class: "muted small" },
      "Every step and result exactly as exchanged. The hash is sha256 over the RFC 8785 form of the envelope without its hash; this page recomputes it."), el.envelopes),
    h("section", { class: "card" }, h("h2", {}, "Tool calls"), el.toolCalls),
    h("section", { class: "card" }, h("h2", {}, "Input and output"), el.io),
  );

  const loadRun = async () => {
    try {
      const fresh = await api(`/v1/runs/${runId}`);
      if (disposed) return;
      run = fresh;
      if (!graph) {
        try {
          graph = await api(`/v1/workflows/${encodeURIComponent(run.workflow)}/graph`, { query: { version: run.version } });
        } catch (error) {
          replace(el.graph, h("div", { class: "empty" }, `No drawing of the plan: ${error.message}`));
        }
      }
      render();
      // Envelopes and tool calls change when steps do; skip the reads otherwise.
      const signature = run.status + run.steps.map((st) => `${st.id}:${st.status}:${st.attempts}:${st.result_hash}`).join(",");
      if (signature !== loadedEnvelopesFor) {
        loadedEnvelopesFor = signature;
        loadEnvelopes();
        loadToolCalls();
      }
      if (TERMINAL.has(run.status) && follower?.polling) follower.stop();
    } catch (error) {
      if (disposed) return;
      if (error instanceof ApiError && error.status === 404) {
        follower?.stop();
        replace(el.head, h("h1", {}, "Run not found"), h("p", { class: "muted" },
          `No run ${runId} in this tenant. Runs of other tenants are not shown.`));
        return;
      }
      replace(el.head, h("div", { class: "error-box" }, `Could not load the run: ${error.message}`));
    }
  };
  const refresh = debounce(loadRun, 120);

  const render = () => {
    renderHead();
    renderGraph();
    renderTimeline();
    replace(el.io, h("div", { class: "grid2" },
      h("div", {}, h("h3", {}, "Input"), h("pre", { class: "json" }, json(run.input))),
      h("div", {}, h("h3", {}, "Output"), h("pre", { class: "json", id: "run-output" }, run.output === null ? "—" : json(run.output)))));
  };

  const renderHead = () => {
    const cancel = !TERMINAL.has(run.status)
      ? h("button", { class: "danger", id: "cancel-run", onclick: async (e) => {
          if (!confirm("Cancel this run? Steps in flight are told to stop.")) return;
          e.target.disabled = true;
          try {
            run = await api(`/v1/runs/${runId}/cancel`, { method: "POST" });
            render();
          } catch (error) {
            alert(`Could not cancel: ${error.message}`);
            e.target.disabled = false;
          }
        } }, "Cancel run")
      : null;
    const fact = (label, ...value) => h("div", {}, h("dt", {}, label), h("dd", {}, ...value));
    replace(
      el.head,
      h("div", { class: "run-head" },
        h("h1", {}, "Run ", h("span", { class: "mono", title: run.id }, shortId(run.id))),
        h("span", { id: "run-status" }, badge(run.status)),
        h("span", { class: "spacer", style: null }),
        cancel),
      h("dl", { class: "facts" },
        fact("workflow", h("a", { href: `#/runs?workflow=${encodeURIComponent(run.workflow)}` }, run.workflow), ` v${run.version}`),
        fact("run id", h("span", { class: "mono small" }, run.id)),
        fact("created", dateTime(run.created_at)),
        fact("finished", dateTime(run.finished_at)),
        fact("duration", h("span", { id: "run-duration" }, duration(between(run.created_at, run.finished_at)))),
        fact("steps", String(run.steps.length)),
        fact("tokens", `${int(run.usage.prompt_tokens)} in · ${int(run.usage.completion_tokens)} out`),
        fact("cost", h("span", { id: "run-cost" }, usd(run.usage.cost_usd))),
        run.estimate ? fact("estimated", usd(run.estimate.expected_cost_usd), h("span", { class: "muted small" }, ` (worst ${usd(run.estimate.worst_cost_usd)})`)) : null),
      run.error ? h("div", { class: "error-box", id: "run-error" }, run.error) : null,
      run.budgets && run.budgets.length
        ? h("div", { class: "small muted" }, "Budgets: ", run.budgets.map((b) =>
            `${b.name} (${b.scope}${b.target ? ` ${b.target}` : ""}, ${b.period}): ${b.remaining_usd !== null ? `${usd(b.remaining_usd)} left` : `${int(b.remaining_tokens)} tokens left`}`).join(" · "))
        : null,
    );
  };

  const renderGraph = () => {
    if (!graph) return;
    const wanted = withLlmPlan(graph, run.planner_state);
    // Drawn once; again only when an LLM planner's plan arrives and adds its steps.
    if (!drawing || (wanted.llmPlanned && !drawnGraph.llmPlanned)) {
      drawnGraph = wanted;
      drawing = drawGraph(wanted);
      replace(el.graph, drawing.svg);
    }
    const summary = paintRun(drawing, drawnGraph, run, { btNodes });
    replace(el.planSummary, summary);
  };

  const renderTimeline = () => {
    const steps = [...run.steps].sort((a, b) => a.seq - b.seq);
    if (!steps.length) {
      replace(el.timeline, h("div", { class: "empty" }, run.status === "pending" ? "No step dispatched yet." : "No steps."));
      return;
    }
    const t0 = new Date(run.created_at).getTime();
    const end = run.finished_at ? new Date(run.finished_at).getTime() : Date.now();
    const span = Math.max(1, end - t0);
    const pct = (iso) => (iso ? Math.min(100, Math.max(0, ((new Date(iso).getTime() - t0) / span) * 100)) : null);
    const results = new Map(); // step id -> [result envelopes]
    for (const e of envelopes) {
      if (e.kind !== "result" && e.kind !== "rejected") continue;
      if (!results.has(e.step)) results.set(e.step, []);
      results.get(e.step).push(e);
    }
    const rows = [];
    for (const st of steps) {
      const started = pct(st.started_at);
      const finished = st.finished_at ? pct(st.finished_at) : st.started_at ? 100 : null;
      const queued = pct(st.queued_at);
      const attempts = results.get(st.id) || [];
      const cost = attempts.reduce((t, e) => t + Number((e.envelope && e.envelope.usage && e.envelope.usage.cost_usd) || 0), 0);
      rows.push(
        h("tr", { class: "step", "data-step": st.state, "data-status": st.status },
          h("td", { class: "num muted" }, String(st.seq)),
          h("td", {}, h("strong", {}, st.state), st.agent !== st.state ? h("div", { class: "muted small" }, st.agent) : null),
          h("td", {}, badge(st.status)),
          h("td", { class: "nowrap small", title: `attempt ${st.attempt} of at most ${st.max_attempts}; picked up ${st.attempts} time(s)` }, `${st.attempt}/${st.max_attempts}`),
          h("td", { class: "small mono nowrap" }, st.worker || "—"),
          h("td", { class: "bar-cell" }, h("div", { class: "bar-track", title: `queued ${time(st.queued_at)} · started ${time(st.started_at)} · finished ${time(st.finished_at)}` },
            queued !== null && started !== null ? h("div", { class: "bar-wait", style: null, "data-left": queued, "data-width": started - queued }) : null,
            started !== null ? h("div", { class: `bar-run ${st.status}`, "data-left": started, "data-width": Math.max(0, finished - started) }) : null)),
          h("td", { class: "num nowrap" }, duration(st.duration_ms ?? (st.started_at && !st.finished_at ? between(st.started_at) : null))),
          h("td", { class: "num" }, attempts.some((e) => e.envelope && e.envelope.usage) ? usd(cost) : "—"),
        ),
      );
      // Each attempt's outcome, when there was more than one or it failed.
      if (attempts.length > 1 || (attempts.length === 1 && attempts[0].envelope?.status !== "succeeded")) {
        for (const e of attempts) {
          const body = e.envelope || {};
          const ms = body.finished_us && body.started_us ? (body.finished_us - body.started_us) / 1000 : null;
          rows.push(h("tr", { class: "attempt" },
            h("td", { colspan: 3 }, `attempt ${e.attempt}${body.delivery > 1 ? ` (delivery ${body.delivery})` : ""}: `, badge(e.kind === "rejected" ? "rejected" : body.status || "?")),
            h("td", { colspan: 2, class: "mono" }, body.worker || ""),
            h("td", { class: "mono" }, body.error || ""),
            h("td", { class: "num" }, duration(ms)),
            h("td", { class: "num" }, body.usage ? usd(body.usage.cost_usd) : "")));
        }
      }
    }
    const table = h("table", { class: "timeline" },
      h("thead", {}, h("tr", {}, ["#", "Step", "Status", "Attempt", "Worker", "Timeline", "Duration", "Cost"].map((t) =>
        h("th", { class: ["#", "Duration", "Cost"].includes(t) ? "num" : null }, t)))),
      h("tbody", {}, rows));
    // Inline styles are not allowed by the page's CSP in markup; set them through the CSSOM.
    for (const bar of table.querySelectorAll("[data-left]")) {
      bar.style.left = `${bar.dataset.left}%`;
      bar.style.width = `${bar.dataset.width}%`;
    }
    replace(el.timeline, table, h("div", { class: "muted small" }, `0 = run created (${time(run.created_at)}); bar: queued (thin) then running, over ${duration(span)}`));
  };

  const loadEnvelopes = async () => {
    try {
      envelopes = await api(`/v1/runs/${runId}/envelopes`);
    } catch (error) {
      replace(el.envelopes, h("div", { class: "error-box" }, error.message));
      return;
    }
    if (disposed) return;
    renderTimeline();
    const seqOf = new Map(run.steps.map((st) => [st.id, st]));
    const rows = envelopes.map((e) => {
      const st = seqOf.get(e.step);
      const mark = h("span", { class: "muted small" }, "…");
      verifyEnvelope(e.raw).then((ok) => {
        if (ok === null) replace(mark, "not checked (needs https)");
        else {
          mark.className = ok ? "verified" : "mismatch";
          replace(mark, ok ? "✓ verified" : "✗ does not match");
        }
      }, () => replace(mark, "not checked"));
      return h("tr", { class: "envelope", "data-kind": e.kind },
        h("td", { class: "nowrap" }, st ? `#${st.seq} ${st.state}` : shortId(e.step)),
        h("td", { class: "num" }, String(e.attempt)),
        h("td", {}, badge(e.kind === "rejected" ? "rejected" : e.kind === "result" ? (e.envelope?.status || "result") : "queued", e.kind)),
        h("td", {}, h("div", { class: "hash" }, e.hash), mark,
          h("details", { class: "raw" }, h("summary", {}, "envelope"), h("pre", { class: "json" }, json(e.envelope ?? e.raw)))),
        h("td", { class: "nowrap small" }, time(e.created_at)));
    });
    replace(el.envelopes, rows.length
      ? h("table", {}, h("thead", {}, h("tr", {}, ["Step", "Attempt", "Kind", "Hash", "Stored"].map((t) => h("th", { class: t === "Attempt" ? "num" : null }, t)))), h("tbody", {}, rows))
      : h("div", { class: "empty" }, "No envelopes yet."));
  };

  const loadToolCalls = async () => {
    let calls;
    try {
      calls = await api(`/v1/runs/${runId}/tool-calls`);
    } catch (error) {
      replace(el.toolCalls, h("div", { class: "error-box" }, error.message));
      return;
    }
    if (disposed) return;
    const stepOf = new Map(run.steps.map((st) => [st.id, st]));
    replace(el.toolCalls, calls.length
      ? h("table", {}, h("thead", {}, h("tr", {}, ["Step", "Attempt", "Tool", "Outcome", "Duration", "Cost", "Input hash", "Output hash"].map((t) => h("th", {}, t)))),
          h("tbody", {}, calls.map((c) => h("tr", {},
            h("td", {}, stepOf.get(c.step) ? `#${stepOf.get(c.step).seq} ${stepOf.get(c.step).state}` : shortId(c.step)),
            h("td", { class: "num" }, String(c.attempt)),
            h("td", { class: "mono" }, c.tool),
            h("td", {}, badge(c.outcome === "ok" ? "succeeded" : "failed", c.outcome), c.error ? h("div", { class: "small mono" }, c.error) : null),
            h("td", { class: "num" }, duration(c.duration_ms)),
            h("td", { class: "num" }, usd(c.cost_usd)),
            h("td", { class: "hash" }, c.input_hash || "—"),
            h("td", { class: "hash" }, c.output_hash || "—")))))
      : h("div", { class: "muted small" }, "No tool calls."));
  };

  const appendEvent = (ev) => {
    events.push(ev);
    const stick = el.logBox.scrollTop + el.logBox.clientHeight >= el.logBox.scrollHeight - 8;
    const family = ev.type.startsWith("run.") ? "run" : "";
    const outcome = ev.type.endsWith(".failed") ? "failed" : ev.type.endsWith(".succeeded") ? "succeeded" : "";
    const data = { ...(ev.data || {}) };
    const name = data.name;
    delete data.name;
    el.log.appendChild(h("tr", { "data-type": ev.type, "data-cursor": ev.cursor },
      h("td", { class: "num muted" }, String(ev.cursor)),
      h("td", { class: "nowrap small" }, time(ev.ts)),
      h("td", {}, h("span", { class: ["etype", family, outcome] }, ev.type)),
      h("td", { class: "small" }, name || ""),
      h("td", { class: "kv" }, kv(data))));
    if (stick) el.logBox.scrollTop = el.logBox.scrollHeight;
  };

  const onEvent = (ev) => {
    if (ev.run_id && ev.run_id !== runId) return;
    appendEvent(ev);
    if (ev.type === "planner.transition" && ev.data && ev.data.nodes && typeof ev.data.nodes === "object") {
      Object.assign(btNodes, ev.data.nodes);
    }
    refresh();
  };

  loadRun().then(() => {
    if (disposed || !run) return;
    follower = follow({
      path: `/v1/runs/${runId}/events`,
      indicator,
      onEvent,
      refresh: loadRun,
      pollMs: 1000,
      onGap: () => {
        replace(el.log);
        events.length = 0;
        loadRun();
      },
      onEnd: () => loadRun(),
    });
    // The polling fallback has no log to show: say where the events would be.
    setTimeout(() => {
      if (follower && follower.polling) {
        replace(el.logNote, "This control plane has no event stream (GET /v1/runs/{id}/events); the page re-reads the run every second instead.");
      }
    }, 1500);
    // Running bars and durations grow with the clock.
    ticker = setInterval(() => {
      if (run && !TERMINAL.has(run.status)) {
        renderTimeline();
        const d = document.getElementById("run-duration");
        if (d) d.textContent = duration(between(run.created_at, run.finished_at));
      }
    }, 1000);
  });

  return () => {
    disposed = true;
    follower?.stop();
    refresh.cancel();
    clearInterval(ticker);
  };
}

function legend() {
  return h("div", { class: "legend" },
    h("span", { class: "l-current" }, "current state"),
    h("span", { class: "l-running" }, "running"),
    h("span", { class: "l-succeeded" }, "succeeded"),
    h("span", { class: "l-failed" }, "failed"),
    h("span", { class: "l-skipped" }, "skipped"),
    h("span", {}, "not reached"));
}
