// A workflow's plan as SVG, laid out here (layered drawing, Sugiyama style), and a run's
// live state painted onto it.
//
// Input: GET /v1/workflows/{name}/graph → {nodes: [{id, label, shape, plan, key, step}],
// edges: [{src, dst, label, dashed}]}. Each plan (the workflow's, its fallback's, ...) is
// laid out on its own and placed left to right.

import { s } from "./dom.js";

const FONT = "12px system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', Helvetica, Arial, sans-serif";
const LINE_H = 15;
const PAD_X = 12;
const PAD_Y = 8;
const LAYER_GAP = 64;
const NODE_GAP = 30;
const PLAN_GAP = 70;
const MARGIN = 24;

let measureCtx = null;
function textWidth(text, font = FONT) {
  if (!measureCtx) measureCtx = document.createElement("canvas").getContext("2d");
  measureCtx.font = font;
  return measureCtx.measureText(text).width;
}

const MAX_LINE = 44;

/** The label's lines, long ones cut (the whole label is the node's tooltip). */
function lines(node) {
  return node.label.split("\n").map((l) => (l.length > MAX_LINE ? `${l.slice(0, MAX_LINE - 1)}…` : l));
}

function size(node) {
  if (node.dummy) return { w: 2, h: 2 };
  if (node.shape === "start") return { w: 18, h: 18 };
  const text = lines(node);
  const w = Math.max(...text.map((l) => textWidth(l))) + 2 * PAD_X;
  const h = text.length * LINE_H + 2 * PAD_Y;
  if (node.shape === "decision") return { w: w * 1.45 + 10, h: h * 1.5 + 6 };
  if (node.shape === "check") return { w: w + 24, h };
  return { w: Math.max(w, 64), h: Math.max(h, 32) };
}

// --- layout of one plan ------------------------------------------------------------------

function layoutPlan(nodes, edges) {
  const info = new Map(nodes.map((n) => [n.id, { node: n, ...size(n) }]));
  const out = new Map(nodes.map((n) => [n.id, []]));
  for (const e of edges) out.get(e.src).push(e);

  // 1. Depth-first from the start marker: edges back into the current path are cycles
  //    (an FSM's retry loops); they are reversed for layering and drawn on the side.
  const mark = new Map();
  const discovered = [];
  const back = new Set();
  const visit = (id) => {
    mark.set(id, 1);
    discovered.push(id);
    for (const e of out.get(id)) {
      if (e.src === e.dst) {
        back.add(e);
        continue;
      }
      const m = mark.get(e.dst);
      if (m === 1) back.add(e);
      else if (!m) visit(e.dst);
    }
    mark.set(id, 2);
  };
  const roots = [...nodes.filter((n) => n.shape === "start"), ...nodes.filter((n) => n.shape !== "start")];
  for (const r of roots) if (!mark.get(r.id)) visit(r.id);
  const rank = new Map(discovered.map((id, i) => [id, i]));

  // 2. Layers: longest path over the acyclic edges.
  const forward = [];
  for (const e of edges) {
    if (e.src === e.dst) continue;
    forward.push(back.has(e) ? { from: e.dst, to: e.src, edge: e } : { from: e.src, to: e.dst, edge: e });
  }
  const indeg = new Map(nodes.map((n) => [n.id, 0]));
  const succ = new Map(nodes.map((n) => [n.id, []]));
  for (const f of forward) {
    indeg.set(f.to, indeg.get(f.to) + 1);
    succ.get(f.from).push(f);
  }
  const layer = new Map(nodes.map((n) => [n.id, 0]));
  const queue = discovered.filter((id) => indeg.get(id) === 0);
  while (queue.length) {
    const id = queue.shift();
    for (const f of succ.get(id)) {
      layer.set(f.to, Math.max(layer.get(f.to), layer.get(id) + 1));
      indeg.set(f.to, indeg.get(f.to) - 1);
      if (indeg.get(f.to) === 0) queue.push(f.to);
    }
  }

  // 3. Long edges get a dummy node per layer crossed, so they take part in ordering
  //    and are routed around nodes rather than through them.
  const chains = new Map(); // edge -> [ids from its upper end to its lower end]
  const adjacent = []; // [upper id, lower id] pairs between consecutive layers
  let dummies = 0;
  for (const f of forward) {
    const chain = [f.from];
    for (let l = layer.get(f.from) + 1; l < layer.get(f.to); l++) {
      const id = `d${dummies++}`;
      info.set(id, { node: { id, dummy: true }, ...size({ dummy: true }) });
      layer.set(id, l);
      rank.set(id, rank.get(f.from) + 0.5);
      chain.push(id);
    }
    chain.push(f.to);
    for (let i = 0; i + 1 < chain.length; i++) adjacent.push([chain[i], chain[i + 1]]);
    chains.set(f.edge, chain);
  }
  const layers = [];
  for (const [id, l] of layer) (layers[l] ||= []).push(id);
  for (const ids of layers) ids?.sort((a, b) => rank.get(a) - rank.get(b));
  const up = new Map([...info.keys()].map((id) => [id, []]));
  const down = new Map([...info.keys()].map((id) => [id, []]));
  for (const [a, b] of adjacent) {
    down.get(a).push(b);
    up.get(b).push(a);
  }

  // 4. Order within layers: barycenter sweeps, down then up. A tree (a behavior tree)
  //    keeps its preorder instead: children stay in tick order, and nothing crosses.
  const pos = new Map();
  layers.forEach((ids) => ids?.forEach((id, i) => pos.set(id, i)));
  const isTree = [...up.values()].every((parents) => parents.length <= 1);
  for (let sweep = 0; sweep < (isTree ? 0 : 8); sweep++) {
    const downward = sweep % 2 === 0;
    const order = downward ? layers.keys() : [...layers.keys()].reverse();
    for (const l of order) {
      const ids = layers[l];
      if (!ids) continue;
      const bary = new Map();
      for (const id of ids) {
        const nb = (downward ? up : down).get(id);
        bary.set(id, nb.length ? nb.reduce((t, n) => t + pos.get(n), 0) / nb.length : pos.get(id));
      }
      ids.sort((a, b) => bary.get(a) - bary.get(b) || pos.get(a) - pos.get(b));
      ids.forEach((id, i) => pos.set(id, i));
    }
  }

  // 5. Coordinates: y by layer; x pulled toward neighbours, order and spacing kept.
  const x = new Map();
  const sep = (a, b) => info.get(a).w / 2 + info.get(b).w / 2 + (info.get(a).node.dummy || info.get(b).node.dummy ? 12 : NODE_GAP);
  for (const ids of layers) {
    let at = 0;
    ids?.forEach((id, i) => {
      if (i) at += sep(ids[i - 1], id);
      x.set(id, at);
    });
  }
  const place = (ids, want) => {
    const n = ids.length;
    const l2r = new Array(n);
    const r2l = new Array(n);
    for (let i = 0; i < n; i++) l2r[i] = i ? Math.max(want[i], l2r[i - 1] + sep(ids[i - 1], ids[i])) : want[i];
    for (let i = n - 1; i >= 0; i--) r2l[i] = i < n - 1 ? Math.min(want[i], r2l[i + 1] - sep(ids[i], ids[i + 1])) : want[i];
    ids.forEach((id, i) => x.set(id, (l2r[i] + r2l[i]) / 2));
  };
  for (let round = 0; round < 12; round++) {
    const downward = round % 2 === 0;
    const order = downward ? [...layers.keys()] : [...layers.keys()].reverse();
    for (const l of order) {
      const ids = layers[l];
      if (!ids) continue;
      const want = ids.map((id) => {
        const nb = [...(downward ? up : down).get(id), ...(round > 6 ? (downward ? down : up).get(id) : [])];
        return nb.length ? nb.reduce((t, n) => t + x.get(n), 0) / nb.length : x.get(id);
      });
      place(ids, want);
    }
  }
  const y = new Map();
  const layerH = layers.map((ids) => Math.max(0, ...(ids || []).map((id) => info.get(id).h)));
  let top = 0;
  layers.forEach((ids, l) => {
    ids?.forEach((id) => y.set(id, top + layerH[l] / 2));
    top += layerH[l] + LAYER_GAP;
  });
  let minX = Infinity;
  let maxX = -Infinity;
  for (const [id, cx] of x) {
    minX = Math.min(minX, cx - info.get(id).w / 2);
    maxX = Math.max(maxX, cx + info.get(id).w / 2);
  }
  // Back edges bulge out to the right: leave them room.
  const bulge = back.size ? 40 + 12 * back.size : 0;
  for (const [id, cx] of x) x.set(id, cx - minX);
  return {
    info,
    x,
    y,
    chains,
    back,
    width: maxX - minX + bulge,
    height: Math.max(0, top - LAYER_GAP),
  };
}

// --- drawing -----------------------------------------------------------------------------

function nodeShape(n, w, h) {
  const rect = (attrs) => s("rect", { x: -w / 2, y: -h / 2, width: w, height: h, ...attrs });
  const halo = (attrs) => s("rect", { class: "halo", x: -w / 2 - 4, y: -h / 2 - 4, width: w + 8, height: h + 8, ...attrs });
  switch (n.shape) {
    case "start":
      return [s("circle", { class: "halo", r: 13 }), s("circle", { r: 8 })];
    case "decision": {
      const pts = `0,${-h / 2} ${w / 2},0 0,${h / 2} ${-w / 2},0`;
      const haloPts = `0,${-h / 2 - 6} ${w / 2 + 8},0 0,${h / 2 + 6} ${-w / 2 - 8},0`;
      return [s("polygon", { class: "halo", points: haloPts }), s("polygon", { points: pts })];
    }
    case "check": {
      const k = 12;
      const pts = `${-w / 2 + k},${-h / 2} ${w / 2 - k},${-h / 2} ${w / 2},0 ${w / 2 - k},${h / 2} ${-w / 2 + k},${h / 2} ${-w / 2},0`;
      return [halo({ rx: 8 }), s("polygon", { points: pts })];
    }
    case "final":
    case "failed":
      return [
        halo({ rx: h / 2 + 4 }),
        rect({ rx: h / 2 }),
        s("rect", { class: "outer", x: -w / 2 + 3, y: -h / 2 + 3, width: w - 6, height: h - 6, rx: h / 2 - 3 }),
      ];
    case "planner":
      return [
        halo({ rx: 4 }),
        s("rect", { class: "back", x: -w / 2 + 5, y: -h / 2 - 5, width: w, height: h }),
        rect({}),
      ];
    case "control":
    case "decorator":
      return [halo({ rx: 4 }), rect({ rx: 2 })];
    default: // state, action
      return [halo({ rx: 12 }), rect({ rx: 8 })];
  }
}

function nodeText(n) {
  if (n.shape === "start") return null;
  const text = lines(n);
  const y0 = -((text.length - 1) * LINE_H) / 2;
  return s(
    "text",
    { "text-anchor": "middle", "dominant-baseline": "central" },
    text.map((line, i) => s("tspan", { x: 0, y: y0 + i * LINE_H, class: i ? "sub" : null }, line)),
  );
}

function curve(points) {
  let d = `M${points[0].x},${points[0].y}`;
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1];
    const b = points[i];
    const dy = (b.y - a.y) / 2;
    d += ` C${a.x},${a.y + dy} ${b.x},${b.y - dy} ${b.x},${b.y}`;
  }
  return d;
}

function edgeLabel(text, at) {
  if (!text) return null;
  const w = textWidth(text, "11px system-ui, sans-serif") + 8;
  return s(
    "g",
    { transform: `translate(${at.x},${at.y})` },
    s("rect", { x: -w / 2, y: -8, width: w, height: 16, rx: 3 }),
    s("text", { "text-anchor": "middle", "dominant-baseline": "central" }, text),
  );
}

/**
 * Lay out and draw `graph`. Returns {svg, nodes: Map(id -> <g>), edges: [{edge, el}]}.
 */
export function drawGraph(graph) {
  const plans = [...new Set(graph.nodes.map((n) => n.plan))].sort((a, b) => a - b);
  const planOf = new Map(graph.nodes.map((n) => [n.id, n.plan]));
  const pos = new Map(); // id -> {x, y, w, h}
  const layouts = [];
  let left = MARGIN;
  let height = 0;
  const boxes = [];
  const planLabels = new Map((graph.plans || []).map((p) => [p.plan, p.label]));
  for (const plan of plans) {
    const nodes = graph.nodes.filter((n) => n.plan === plan);
    const edges = graph.edges.filter((e) => planOf.get(e.src) === plan && planOf.get(e.dst) === plan);
    const lay = layoutPlan(nodes, edges);
    const top = MARGIN + (plan > 0 ? 26 : 0);
    for (const [id, cx] of lay.x) {
      const i = lay.info.get(id);
      pos.set(id, { x: left + cx, y: top + lay.y.get(id), w: i.w, h: i.h });
    }
    if (plan > 0) boxes.push({ plan, x: left - 14, y: MARGIN, w: lay.width + 28, h: lay.height + 26 + 14 });
    layouts.push(lay);
    left += lay.width + PLAN_GAP;
    height = Math.max(height, top + lay.height);
  }
  const width = left - PLAN_GAP + MARGIN;
  height += MARGIN;

  const root = s("svg", {
    class: "plan",
    xmlns: "http://www.w3.org/2000/svg",
    viewBox: `0 0 ${Math.ceil(width)} ${Math.ceil(height)}`,
    width: Math.ceil(width),
    height: Math.ceil(height),
    role: "img",
    "aria-label": `plan of ${graph.workflow || graph.title || "the workflow"}`,
  });
  const defs = s("defs", {});
  for (const [id, color] of [
    ["arrow", "#a9b1bc"],
    ["arrow-taken", "#2b59c3"],
  ]) {
    defs.appendChild(
      s(
        "marker",
        // In user units: the arrow keeps its size on thicker (highlighted) edges.
        { id, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse",
          orient: "auto-start-reverse" },
        s("path", { d: "M0,0 L10,5 L0,10 z", fill: color }),
      ),
    );
  }
  root.appendChild(defs);
  for (const b of boxes) {
    root.appendChild(s("rect", { class: "plan-box", x: b.x, y: b.y, width: b.w, height: b.h, rx: 10 }));
    root.appendChild(s("text", { class: "plan-label", x: b.x + 10, y: b.y + 16 }, planLabels.get(b.plan) || "fallback"));
  }

  const edgeEls = [];
  const edgeLayer = s("g", { class: "edges" });
  const labelLayer = s("g", { class: "edge-labels" });
  root.appendChild(edgeLayer);
  let backCount = 0;
  for (const e of graph.edges) {
    const a = pos.get(e.src);
    const b = pos.get(e.dst);
    if (!a || !b) continue;
    const lay = layouts[plans.indexOf(planOf.get(e.src))];
    let d;
    let at;
    if (planOf.get(e.src) !== planOf.get(e.dst)) {
      // Hand-over to a fallback plan: from the side of one plan to the other.
      const p = { x: a.x + a.w / 2, y: a.y };
      const q = { x: b.x - b.w / 2, y: b.y };
      const mx = (p.x + q.x) / 2;
      d = `M${p.x},${p.y} C${mx},${p.y} ${mx},${q.y} ${q.x},${q.y}`;
      at = { x: mx, y: (p.y + q.y) / 2 };
    } else if (e.src === e.dst) {
      const p = { x: a.x + a.w / 2, y: a.y };
      d = `M${p.x},${p.y - 6} C${p.x + 36},${p.y - 26} ${p.x + 36},${p.y + 26} ${p.x},${p.y + 6}`;
      at = { x: p.x + 34, y: p.y };
    } else if (lay.back.has(e)) {
      // A cycle (retry loop): out of the right side, up, into the target's right side.
      const off = 36 + 12 * backCount++;
      const p = { x: a.x + a.w / 2, y: a.y };
      const q = { x: b.x + b.w / 2, y: b.y };
      const ox = Math.max(p.x, q.x) + off;
      d = `M${p.x},${p.y} C${ox},${p.y} ${ox},${q.y} ${q.x},${q.y}`;
      at = { x: ox - off / 4, y: (p.y + q.y) / 2 };
    } else {
      const chain = lay.chains.get(e) || [e.src, e.dst];
      const points = chain.map((id) => ({ x: pos.get(id).x, y: pos.get(id).y }));
      points[0] = { x: a.x, y: a.y + a.h / 2 };
      points[points.length - 1] = { x: b.x, y: b.y - b.h / 2 };
      d = curve(points);
      // A long edge is labelled where it passes a layer (a dummy node), clear of the
      // labels of the short edges leaving the same node.
      const mid = Math.floor((points.length - 1) / 2);
      at = points.length > 2 ? points[mid] : { x: (points[0].x + points[1].x) / 2, y: (points[0].y + points[1].y) / 2 };
    }
    const path = s("path", { d, "marker-end": "url(#arrow)" });
    const g = s("g", { class: ["edge", e.dashed && "dashed"], "data-src": e.src, "data-dst": e.dst }, path);
    edgeLayer.appendChild(g);
    const label = edgeLabel(e.label, at);
    if (label) {
      label.setAttribute("class", "edge");
      labelLayer.appendChild(label);
    }
    edgeEls.push({ edge: e, el: g, path });
  }

  const nodeEls = new Map();
  const nodeLayer = s("g", { class: "nodes" });
  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const g = s(
      "g",
      {
        class: ["node", `shape-${n.shape}`],
        transform: `translate(${p.x},${p.y})`,
        "data-id": n.id,
        "data-key": n.key,
        "data-step": n.step,
        "data-shape": n.shape,
      },
      s("title", {}, n.label),
      nodeShape(n, p.w, p.h),
      nodeText(n),
    );
    nodeLayer.appendChild(g);
    nodeEls.set(n.id, g);
  }
  root.appendChild(nodeLayer);
  root.appendChild(labelLayer);
  return { svg: root, nodes: nodeEls, edges: edgeEls };
}

// --- the run's state on the drawing ------------------------------------------------------

const STATUS_CLASSES = [
  "st-pending", "st-ready", "st-queued", "st-running", "st-waiting", "st-succeeded", "st-failed",
  "st-timeout", "st-cancelled", "st-skipped", "st-current", "st-visited",
];

/** Unwrap a plan with a fallback: {phase, inner} nests the active plan's state. */
export function activePlan(plannerState) {
  let state = plannerState;
  let plan = 0;
  while (state && typeof state === "object" && "phase" in state && "inner" in state) {
    if (state.phase === "fallback") plan += 1;
    state = state.inner;
  }
  return { state: state && typeof state === "object" ? state : {}, plan };
}

/** The kind of planner state: read from its keys (see libs/agentflow_core/planners). */
export function stateKind(state) {
  if ("current" in state || "visits" in state) return "fsm";
  if ("active" in state && "inflight" in state) return "bt";
  if ("phase" in state && ("plan" in state || "plan_seq" in state)) return "llm";
  if ("steps" in state && "running" in state) return "dag";
  return "unknown";
}

/**
 * The LLM planner's accepted plan joins the drawing once it exists: its steps as a DAG
 * below the planner node. Returns a new graph (or the same one when nothing changes).
 */
export function withLlmPlan(graph, plannerState) {
  const { state, plan } = activePlan(plannerState);
  if (stateKind(state) !== "llm" || !state.plan || !Array.isArray(state.plan.steps)) return graph;
  const planner = graph.nodes.find((n) => n.plan === plan && n.shape === "planner");
  if (!planner) return graph;
  const nodes = [...graph.nodes];
  const edges = [...graph.edges];
  const ids = new Map();
  state.plan.steps.forEach((step, i) => {
    const id = `p${plan}s${i}`;
    ids.set(step.name, id);
    const label = step.agent && step.agent !== step.name ? `${step.name}\nagent: ${step.agent}` : step.name;
    nodes.push({ id, label, shape: "action", plan, key: step.name, step: step.name });
  });
  for (const step of state.plan.steps) {
    const deps = step.depends_on || [];
    if (!deps.length) edges.push({ src: planner.id, dst: ids.get(step.name), label: null, dashed: false });
    for (const dep of deps) if (ids.has(dep)) edges.push({ src: ids.get(dep), dst: ids.get(step.name), label: null, dashed: false });
  }
  return { ...graph, nodes, edges, llmPlanned: true };
}

/**
 * Paint the run onto a drawing. `extra` is what the event stream said that the run's
 * REST view does not keep (behavior-tree node statuses from planner.transition events).
 * Returns a one-line summary of the plan's progress.
 */
export function paintRun(drawing, graph, run, extra = {}) {
  const { state, plan } = activePlan(run.planner_state);
  const kind = stateKind(state);
  const classes = new Map(graph.nodes.map((n) => [n.id, new Set()]));
  const setStatus = (node, status) => {
    if (!node || !status) return;
    const set = classes.get(node.id);
    for (const c of [...set]) if (c !== "st-current" && c !== "st-visited") set.delete(c);
    set.add(`st-${status}`);
  };
  const add = (node, cls) => node && classes.get(node.id).add(cls);
  const active = graph.nodes.filter((n) => n.plan === plan);
  const byKey = new Map(active.filter((n) => n.key !== null && n.key !== undefined).map((n) => [String(n.key), n]));
  // Steps name their plan element; prefer the active plan's node, else an earlier plan's.
  const byStep = new Map();
  for (const n of graph.nodes) {
    if (n.step === null || n.step === undefined || n.plan > plan) continue;
    const seen = byStep.get(n.step);
    if (!seen || n.plan === plan || (seen.plan !== plan && n.plan > seen.plan)) byStep.set(n.step, n);
  }
  const start = active.find((n) => n.shape === "start");
  const steps = [...(run.steps || [])].sort((a, b) => a.seq - b.seq);
  const terminal = ["succeeded", "failed", "cancelled"].includes(run.status);
  if (run.status !== "pending" && start) add(start, "st-visited");
  for (const p of new Set(graph.nodes.map((n) => n.plan))) {
    if (p < plan) add(graph.nodes.find((n) => n.plan === p && n.shape === "start"), "st-visited");
  }
  for (const step of steps) setStatus(byStep.get(step.state), step.status);

  const taken = new Set();
  const edgeBetween = (a, b) => drawing.edges.find((x) => x.edge.src === a.id && x.edge.dst === b.id);
  let summary = "";
  if (kind === "fsm") {
    const path = [start, ...steps.filter((st) => st.state !== "__plan__").map((st) => byStep.get(st.state))];
    const current = state.current !== null && state.current !== undefined ? byKey.get(String(state.current)) : null;
    if (current && path[path.length - 1] !== current) path.push(current);
    for (let i = 0; i + 1 < path.length; i++) {
      if (path[i] && path[i + 1]) {
        const hit = edgeBetween(path[i], path[i + 1]);
        if (hit) taken.add(hit);
      }
    }
    if (current) {
      add(current, "st-current");
      const isFinal = current.shape === "final" || current.shape === "failed";
      if (isFinal && terminal) setStatus(current, run.status);
      summary = isFinal ? `final state: ${state.current}` : `current state: ${state.current}`;
    } else {
      summary = terminal ? "" : "starting";
    }
  } else if (kind === "bt") {
    for (const key of Object.keys(state.active || {})) setStatus(byKey.get(key), "running");
    for (const [id, status] of Object.entries(extra.btNodes || {})) {
      setStatus(byKey.get(String(id)) || byStep.get(String(id)), btStatus(status));
    }
    if (terminal) {
      const rootNode = start && drawing.edges.find((x) => x.edge.src === start.id);
      if (rootNode) setStatus(graph.nodes.find((n) => n.id === rootNode.edge.dst), run.status);
    }
    // The state keeps no status for finished control nodes; one whose subtree ran was
    // ticked, which is what lets the path down to the actions show.
    const children = new Map();
    for (const x of drawing.edges) {
      if (!children.has(x.edge.src)) children.set(x.edge.src, []);
      children.get(x.edge.src).push(x.edge.dst);
    }
    const ticked = (id) => {
      let any = [...classes.get(id)].some((c) => c !== "st-pending");
      for (const child of children.get(id) || []) any = ticked(child) || any;
      if (any && classes.get(id).size === 0) classes.get(id).add("st-visited");
      return any;
    };
    if (start) ticked(start.id);
    const running = Object.keys(state.active || {})
      .map((k) => byKey.get(k))
      .filter((n) => n && n.shape === "action")
      .map((n) => n.step);
    summary = running.length ? `running: ${running.join(", ")}` : terminal ? `tree ${run.status}` : "";
  } else if (kind === "dag" || kind === "llm") {
    const records = state.steps || {};
    const names = Object.keys(records);
    for (const name of names) setStatus(byKey.get(name), records[name].status);
    const finished = names.filter((n) => ["succeeded", "failed", "skipped"].includes(records[n].status)).length;
    if (kind === "llm") {
      const planner = active.find((n) => n.shape === "planner");
      if (state.phase === "planning") setStatus(planner, "running");
      else if (state.phase === "rejected") setStatus(planner, "failed");
      else if (state.plan) setStatus(planner, "succeeded");
      summary = state.phase === "executing" || names.length ? `plan: ${finished} of ${names.length} steps finished` : `phase: ${state.phase}`;
    } else {
      summary = `${finished} of ${names.length} steps finished`;
    }
  }
  if (plan > 0) summary = `fallback plan ${plan} · ${summary}`;
  // Edges into a node that ran, from one that finished (or the start): the path taken.
  if (kind !== "fsm") {
    for (const x of drawing.edges) {
      const dst = classes.get(x.edge.dst);
      const src = classes.get(x.edge.src);
      const ran = dst && [...dst].some((c) => !["st-pending", "st-ready", "st-skipped", "st-current"].includes(c));
      const from = src && [...src].some((c) => ["st-visited", "st-succeeded", "st-failed", "st-running"].includes(c));
      if (ran && from) taken.add(x);
    }
  }

  for (const [id, set] of classes) {
    const el = drawing.nodes.get(id);
    if (!el) continue;
    for (const c of STATUS_CLASSES) el.classList.toggle(c, set.has(c));
    const status = [...set].find((c) => c !== "st-current" && c !== "st-visited");
    el.dataset.status = status ? status.slice(3) : "";
  }
  for (const x of drawing.edges) {
    const on = taken.has(x);
    x.el.classList.toggle("taken", on);
    x.path.setAttribute("marker-end", on ? "url(#arrow-taken)" : "url(#arrow)");
  }
  return summary;
}

function btStatus(status) {
  const s = String(status).toLowerCase();
  if (s === "success") return "succeeded";
  if (s === "failure") return "failed";
  if (s === "idle") return "pending";
  return s;
}
