// Costs by workflow, agent and model for a period (GET /v1/costs), and the budgets.

import { api } from "../api.js";
import { dateTime, h, int, replace, usd } from "../dom.js";

const PERIODS = [["today", "Today (UTC)"], ["7d", "Last 7 days"], ["month", "This month (UTC)"]];
const GROUPS = [["workflow", "By workflow"], ["agent", "By agent"], ["model", "By model"]];

export function mount(main, { query, navigate }) {
  const period = PERIODS.some(([p]) => p === query.get("period")) ? query.get("period") : "today";
  const total = h("div", { id: "costs-total" });
  const panels = new Map(GROUPS.map(([g]) => [g, h("div", { id: `costs-by-${g}` }, h("div", { class: "muted small" }, "Loading…"))]));
  const budgets = h("div", { id: "budgets" });
  const error = h("div", { class: "error-box", hidden: true });
  let disposed = false;

  const select = h("select", { id: "period", onchange: (e) => navigate(`#/costs?period=${e.target.value}`) },
    PERIODS.map(([p, label]) => h("option", { value: p, selected: p === period }, label)));

  const groupTable = (data) => {
    if (!data.groups.length) return h("div", { class: "empty" }, "Nothing spent in this period.");
    const max = Math.max(...data.groups.map((g) => Number(g.cost_usd)), 0);
    return h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, data.group_by), h("th", { class: "num" }, "Cost"), h("th", { class: "num" }, "Tokens in / out"), h("th", { class: "num", title: "LLM calls + tool calls" }, "Calls"))),
      h("tbody", {}, data.groups.map((g) => {
        const bar = h("div", {});
        bar.style.width = `${max ? (Number(g.cost_usd) / max) * 100 : 0}%`;
        return h("tr", { "data-key": g.key },
          h("td", { class: "mono small" }, g.key),
          h("td", { class: "num nowrap", title: `$${g.cost_usd}` }, usd(g.cost_usd), h("div", { class: "meter" }, bar)),
          h("td", { class: "num small nowrap" }, `${int(g.prompt_tokens)} / ${int(g.completion_tokens)}`),
          h("td", { class: "num small nowrap", title: "LLM calls + tool calls" }, `${int(g.llm_calls)} + ${int(g.tool_calls)}`));
      })));
  };

  const load = async () => {
    try {
      const results = await Promise.all(GROUPS.map(([g]) => api("/v1/costs", { query: { period, group_by: g } })));
      if (disposed) return;
      const t = results[0].total;
      replace(total, h("div", { class: "stats" },
        h("div", {}, h("span", { class: "label" }, "spent"), h("span", { class: "big", id: "total-cost", title: `$${t.cost_usd}` }, usd(t.cost_usd))),
        h("div", {}, h("span", { class: "label" }, "tokens in"), h("span", { class: "big" }, int(t.prompt_tokens))),
        h("div", {}, h("span", { class: "label" }, "tokens out"), h("span", { class: "big" }, int(t.completion_tokens))),
        h("div", {}, h("span", { class: "label" }, "LLM calls"), h("span", { class: "big" }, int(t.llm_calls))),
        h("div", {}, h("span", { class: "label" }, "tool calls"), h("span", { class: "big" }, int(t.tool_calls)))),
        h("div", { class: "muted small" }, `${dateTime(results[0].from)} → ${dateTime(results[0].to)}`));
      GROUPS.forEach(([g], i) => replace(panels.get(g), groupTable(results[i])));
      error.hidden = true;
    } catch (e) {
      error.hidden = false;
      replace(error, `Could not load costs: ${e.message}`);
    }
    try {
      const list = await api("/v1/budgets");
      if (disposed) return;
      replace(budgets, list.length
        ? h("table", {}, h("thead", {}, h("tr", {}, ["Budget", "Scope", "Window", "Limit", "Spent", "Reserved", "Remaining", "Used", "Enforcement"].map((x) => h("th", {}, x)))),
            h("tbody", {}, list.map((b) => {
              const cur = b.current;
              const limit = b.limit_usd !== null ? Number(b.limit_usd) : null;
              const spent = cur ? Number(cur.spent_usd) : 0;
              const bar = h("div", {});
              bar.style.width = `${limit ? Math.min(100, (spent / limit) * 100) : 0}%`;
              return h("tr", { "data-budget": b.name },
                h("td", { class: "mono" }, b.name),
                h("td", {}, `${b.scope}${b.target ? ` ${b.target}` : ""}`),
                h("td", { class: "small" }, cur ? cur.window : b.period),
                h("td", { class: "num" }, [limit !== null ? usd(b.limit_usd) : null, b.limit_tokens !== null ? `${int(b.limit_tokens)} tok` : null].filter(Boolean).join(" · ")),
                h("td", { class: "num" }, cur ? usd(cur.spent_usd) : "per run"),
                h("td", { class: "num" }, cur ? usd(cur.reserved_usd) : "—"),
                h("td", { class: "num" }, cur && cur.remaining_usd !== null ? usd(cur.remaining_usd) : cur && cur.remaining_tokens !== null ? `${int(cur.remaining_tokens)} tok` : "—"),
                h("td", {}, h("div", { class: ["meter", limit && spent >= limit && "full"] }, bar)),
                h("td", {}, b.enforcement));
            })))
        : h("div", { class: "muted small" }, "No budgets. Set one with PUT /v1/budgets/{name}."));
    } catch (e) {
      replace(budgets, h("div", { class: "error-box" }, e.message));
    }
  };

  replace(
    main,
    h("div", { class: "toolbar page-head" }, h("h1", {}, "Costs"), h("span", { class: "spacer" }), h("label", {}, "Period", select)),
    error,
    h("section", { class: "card" }, total),
    h("div", { class: "grid3" }, GROUPS.map(([g, label]) => h("section", { class: "card" }, h("h2", {}, label), panels.get(g)))),
    h("section", { class: "card" }, h("h2", {}, "Budgets"), budgets),
  );
  load();
  return () => {
    disposed = true;
  };
}
