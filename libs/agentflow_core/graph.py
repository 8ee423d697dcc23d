"""Diagrams of a workflow's plan: Mermaid flowcharts and Graphviz DOT.

Every planner type is drawn from its spec alone (nothing runs):

* FSM: a start marker, states (decision states as diamonds), final states, and the
  transitions labelled ``success``/``error``/``timeout``, the condition of each
  conditional transition, ``true``/``false``; a router is named in its state's box;
* behavior tree: the tree, each node showing its type and name/agent/check, children
  numbered in tick order, ``conditional_selector`` branches labelled with their
  expression;
* DAG: steps with their ``depends_on`` edges, conditions in the step's box;
* LLM: one planner node (the plan is made at run time).

A fallback plan is drawn in a box of its own, reached by a dashed edge from the plan it
takes over from. Both renderers share one intermediate drawing, so they always show the
same thing; node ids are generated (``n0``, ``n1``...), names only ever appear in escaped
labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow_core.expressions import ExpressionError, operator_condition_to_cel
from agentflow_core.planners.models import (
    BtNode,
    BtPlannerSpec,
    DagPlannerSpec,
    FsmPlannerSpec,
    FsmState,
    LlmPlannerSpec,
)
from agentflow_core.spec import WorkflowSpec

Shape = Literal["start", "state", "decision", "final", "failed", "control", "action", "check", "decorator", "planner"]
AnyPlanner = FsmPlannerSpec | BtPlannerSpec | DagPlannerSpec | LlmPlannerSpec


@dataclass(slots=True)
class _Node:
    id: str
    label: str
    shape: Shape
    #: how the planner's state names this node (FSM state, BT preorder index, DAG step)
    key: str | None = None
    #: the ``state`` its steps carry (FSM state, BT node name or path, DAG step)
    step: str | None = None


@dataclass(slots=True)
class _Edge:
    src: str
    dst: str
    label: str | None = None
    dashed: bool = False


@dataclass(slots=True)
class _Cluster:
    id: str
    label: str
    nodes: list[_Node] = field(default_factory=list)
    clusters: list[_Cluster] = field(default_factory=list)


class _Drawing:
    def __init__(self, title: str) -> None:
        self.title = title
        self.root = _Cluster("", title)
        self.edges: list[_Edge] = []
        self._count = 0
        self._bt_index = 0

    def node(self, cluster: _Cluster, label: str, shape: Shape, key: str | None = None) -> str:
        node_id = f"n{self._count}"
        self._count += 1
        cluster.nodes.append(_Node(node_id, label, shape, key, key))
        return node_id

    def cluster(self, parent: _Cluster, label: str) -> _Cluster:
        sub = _Cluster(f"c{self._count}", label)
        self._count += 1
        parent.clusters.append(sub)
        return sub

    def edge(self, src: str, dst: str, label: str | None = None, *, dashed: bool = False) -> None:
        self.edges.append(_Edge(src, dst, label, dashed))

    # --- plans ---

    def plan(self, planner: AnyPlanner, cluster: _Cluster) -> str:
        """Draw ``planner`` into ``cluster``; returns the id of its start marker."""
        start = self.node(cluster, "start", "start")
        # Where the dashed "fallback" edge leaves from: the plan as a whole (its start),
        # or for an LLM plan the planner node, whose failure to plan also hands over.
        anchor = start
        if isinstance(planner, FsmPlannerSpec):
            self._fsm(planner, cluster, start)
        elif isinstance(planner, BtPlannerSpec):
            self._bt_index = 0
            self._bt(planner.root, cluster, start)
        elif isinstance(planner, DagPlannerSpec):
            self._dag(planner, cluster, start)
        else:
            anchor = self.node(cluster, _llm_label(planner), "planner", "__plan__")  # its planning steps' state
            self.edge(start, anchor)
        fallback = planner.fallback
        if fallback is not None and not isinstance(fallback, str):
            sub = self.cluster(cluster, f"fallback ({_kind(fallback)})")
            self.edge(anchor, self.plan(fallback, sub), "on plan failure", dashed=True)
        return start

    def _fsm(self, fsm: FsmPlannerSpec, cluster: _Cluster, start: str) -> None:
        ids: dict[str, str] = {}
        for name, state in fsm.states.items():
            ids[name] = self.node(cluster, _state_label(name, state), _state_shape(state), name)
        for name, final in fsm.finals().items():
            label = name if final.status is None else f"{name}\n({final.status})"
            ids[name] = self.node(cluster, label, "failed" if final.status == "failed" else "final", name)

        def target(name: str) -> str:
            # Only a spec that failed validation names unknown states; draw them anyway.
            if name not in ids:
                ids[name] = self.node(cluster, f"{name}\n(unknown state)", "failed")
            return ids[name]

        self.edge(start, target(fsm.initial_state))
        for name, state in fsm.states.items():
            # One edge per target, labels joined: "success, error" reads better than two arrows.
            labels: dict[str, list[str]] = {}
            for tr in state.conditional_transitions:
                labels.setdefault(tr.target, []).append(tr.condition)
            for attr, text in (
                ("on_true", "true"),
                ("on_false", "false"),
                ("on_success", "success"),
                ("on_error", "error"),
                ("on_timeout", "timeout"),
            ):
                dst = getattr(state, attr)
                if dst is not None:
                    labels.setdefault(dst, []).append(text)
            for dst, texts in labels.items():
                self.edge(ids[name], target(dst), ", ".join(texts))

    def _bt(self, node: BtNode, cluster: _Cluster, parent: str, label: str | None = None, path: str = "root") -> None:
        # Edges are added parent first (preorder), so layouts keep the tree's order.
        # Keys are the planner's preorder indexes, steps its node names or paths (planners.bt).
        node_id = self.node(cluster, _bt_label(node), _bt_shape(node), str(self._bt_index))
        self._bt_index += 1
        cluster.nodes[-1].step = node.name or path
        self.edge(parent, node_id, label)
        for b, branch in enumerate(node.conditions or []):
            branch_label = "default" if branch.default else branch.expression
            self._bt(branch.child, cluster, node_id, branch_label, f"{path}/{b}")
        children = node.children or []
        for i, child in enumerate(children, start=1):
            # Order matters in a tree and layout engines may not keep it: number the edges.
            self._bt(child, cluster, node_id, str(i) if len(children) > 1 else None, f"{path}/{i - 1}")
        if node.child is not None:
            self._bt(node.child, cluster, node_id, path=f"{path}/0")

    def _dag(self, dag: DagPlannerSpec, cluster: _Cluster, start: str) -> None:
        ids = {name: self.node(cluster, _step_label(name, dag), "action", name) for name in dag.steps}
        for name, step in dag.steps.items():
            if not step.depends_on:
                self.edge(start, ids[name])
            for dep in step.depends_on:
                if dep not in ids:
                    ids[dep] = self.node(cluster, f"{dep}\n(unknown step)", "failed")
                self.edge(ids[dep], ids[name])


def _kind(planner: AnyPlanner) -> str:
    return {"fsm": "FSM", "behavior_tree": "behavior tree", "dag": "DAG", "llm": "LLM"}[planner.type]


def _condition_text(condition: str | dict[str, Any]) -> str:
    if isinstance(condition, str):
        return condition
    # The operator form reads best as the CEL it stands for.
    try:
        return operator_condition_to_cel(condition)
    except ExpressionError:
        return json.dumps(condition, separators=(",", ":"))


def _state_shape(state: FsmState) -> Shape:
    return "decision" if state.agent is None and state.condition is not None and state.router is None else "state"


def _state_label(name: str, state: FsmState) -> str:
    lines = [name]
    if state.agent is not None and state.agent != name:
        lines.append(f"agent: {state.agent}")
    if state.condition is not None:
        lines.append(state.condition if state.agent is None else f"then if {state.condition}")
    if state.router is not None:
        lines.append(f"router: {state.router.removeprefix('func:')}")
    if state.max_visits is not None:
        lines.append(f"max_visits: {state.max_visits}")
    return "\n".join(lines)


def _bt_shape(node: BtNode) -> Shape:
    if node.type == "action":
        return "action"
    if node.type == "condition":
        return "check"
    if node.child is not None or node.type in ("inverter", "force_success", "force_failure", "retry", "repeat"):
        return "decorator"
    return "control"


def _bt_label(node: BtNode) -> str:
    head: str = node.type
    if node.type == "retry" and node.max_attempts is not None:
        head += f" x{node.max_attempts}"
    elif node.type == "repeat" and node.times is not None:
        head += f" x{node.times}"
    elif node.type == "timeout" and node.seconds is not None:
        head += f" {node.seconds:g}s"
    elif node.type == "parallel":
        rules = [
            f"{key}: {value}"
            for key, value in (
                ("success_policy", node.success_policy),
                ("success_threshold", node.success_threshold),
                ("failure_threshold", node.failure_threshold),
            )
            if value is not None
        ]
        if rules:
            head += f" ({', '.join(rules)})"
    lines = [f"{head}: {node.name}" if node.name else head]
    if node.agent is not None and node.agent != node.name:
        lines.append(f"agent: {node.agent}")
    if node.check is not None:
        lines.append(node.check)
    return "\n".join(lines)


def _step_label(name: str, dag: DagPlannerSpec) -> str:
    step = dag.steps[name]
    lines = [name]
    if step.agent is not None and step.agent != name:
        lines.append(f"agent: {step.agent}")
    if step.condition is not None:
        lines.append(f"when {_condition_text(step.condition)}")
    return "\n".join(lines)


def _llm_label(llm: LlmPlannerSpec) -> str:
    lines = ["LLM planner", f"model: {llm.model.provider}/{llm.model.model}", f"max_steps: {llm.max_steps}"]
    if llm.agents is not None:
        lines.append(f"agents: {', '.join(llm.agents)}")
    return "\n".join(lines)


def _draw(spec: WorkflowSpec) -> _Drawing:
    drawing = _Drawing(spec.name)
    drawing.plan(spec.planner, drawing.root)
    return drawing


# --- Mermaid ------------------------------------------------------------------------------

_MERMAID_ENTITIES = {
    '"': "#quot;",
    "#": "#35;",
    "&": "#amp;",
    "<": "#lt;",
    ">": "#gt;",
    "|": "#124;",
    "`": "#96;",
    "\r": "",
    "\n": "<br>",
}

_MERMAID_SHAPES: dict[Shape, tuple[str, str]] = {
    "start": ("((", "))"),
    "state": ("(", ")"),
    "decision": ("{", "}"),
    "final": ("([", "])"),
    "failed": ("([", "])"),
    "control": ("[", "]"),
    "action": ("(", ")"),
    "check": ("{{", "}}"),
    "decorator": ("[[", "]]"),
    "planner": ("[[", "]]"),
}


def mermaid_text(text: str) -> str:
    """``text`` as a quoted Mermaid label: entity codes for the characters that would end
    or reinterpret it (quotes, ``#``, ``|``, HTML), ``<br>`` for line breaks."""
    return '"' + "".join(_MERMAID_ENTITIES.get(ch, ch) for ch in text) + '"'


def to_mermaid(spec: WorkflowSpec) -> str:
    """A Mermaid ``flowchart TD`` of the workflow's plan."""
    drawing = _draw(spec)
    lines = ["flowchart TD"]
    failed: list[str] = []

    def emit(cluster: _Cluster, indent: str) -> None:
        for node in cluster.nodes:
            left, right = _MERMAID_SHAPES[node.shape]
            lines.append(f"{indent}{node.id}{left}{mermaid_text(node.label)}{right}")
            if node.shape == "failed":
                failed.append(node.id)
        for sub in cluster.clusters:
            lines.append(f"{indent}subgraph {sub.id}[{mermaid_text(sub.label)}]")
            emit(sub, indent + "    ")
            lines.append(f"{indent}end")

    emit(drawing.root, "    ")
    for e in drawing.edges:
        arrow = "-.->" if e.dashed else "-->"
        label = f"|{mermaid_text(e.label)}|" if e.label else ""
        lines.append(f"    {e.src} {arrow}{label} {e.dst}")
    if failed:
        lines.append("    classDef failed stroke:#c62828,color:#c62828")
        lines.append(f"    class {','.join(failed)} failed")
    return "\n".join(lines) + "\n"


# --- Graphviz DOT -------------------------------------------------------------------------

_DOT_SHAPES: dict[Shape, str] = {
    "start": 'shape=circle, width=0.3, fixedsize=false, style=filled, fillcolor="#eeeeee"',
    "state": 'shape=box, style="rounded"',
    "decision": "shape=diamond",
    "final": "shape=doublecircle",
    "failed": 'shape=doublecircle, color="#c62828", fontcolor="#c62828"',
    "control": "shape=box",
    "action": 'shape=box, style="rounded"',
    "check": "shape=hexagon",
    "decorator": 'shape=box, style="dashed"',
    "planner": "shape=box3d",
}


def dot_text(text: str) -> str:
    """``text`` as a quoted DOT string: backslashes and quotes escaped, newlines as ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "\\n")
    return f'"{escaped}"'


def to_dot(spec: WorkflowSpec) -> str:
    """A Graphviz ``digraph`` of the workflow's plan."""
    drawing = _draw(spec)
    lines = [
        f"digraph {dot_text(drawing.title)} {{",
        '    graph [rankdir=TB, fontname="Helvetica"];',
        '    node [fontname="Helvetica"];',
        '    edge [fontname="Helvetica", fontsize=10];',
    ]

    def emit(cluster: _Cluster, indent: str) -> None:
        for node in cluster.nodes:
            lines.append(f"{indent}{node.id} [label={dot_text(node.label)}, {_DOT_SHAPES[node.shape]}];")
        for sub in cluster.clusters:
            # The "cluster_" prefix is what makes Graphviz draw a box around the subgraph.
            lines.append(f"{indent}subgraph cluster_{sub.id} {{")
            lines.append(f"{indent}    label={dot_text(sub.label)};")
            lines.append(f"{indent}    style=dashed;")
            emit(sub, indent + "    ")
            lines.append(f"{indent}}}")

    emit(drawing.root, "    ")
    for e in drawing.edges:
        attrs = []
        if e.label:
            attrs.append(f"label={dot_text(e.label)}")
        if e.dashed:
            attrs.append("style=dashed")
        suffix = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"    {e.src} -> {e.dst}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- JSON (the web dashboard lays it out itself) -------------------------------------------


def to_json_graph(spec: WorkflowSpec) -> dict[str, Any]:
    """The drawing as plain data: ``nodes`` (id, label, shape, plan, key, step), ``edges``
    (src, dst, label, dashed) and ``plans`` (the main plan is 0, its fallback 1, ...).

    ``key`` is how the planner's state names a node and ``step`` the ``state`` its steps
    carry, so a run's progress can be painted onto the drawing."""
    drawing = _draw(spec)
    nodes: list[dict[str, Any]] = []
    plans: list[dict[str, Any]] = []

    def emit(cluster: _Cluster) -> None:
        plan = len(plans)
        plans.append({"plan": plan, "label": cluster.label})
        for node in cluster.nodes:
            nodes.append(
                {"id": node.id, "label": node.label, "shape": node.shape, "plan": plan, "key": node.key,
                 "step": node.step}
            )  # fmt: skip
        for sub in cluster.clusters:
            emit(sub)

    emit(drawing.root)
    edges = [{"src": e.src, "dst": e.dst, "label": e.label, "dashed": e.dashed} for e in drawing.edges]
    return {"title": drawing.title, "planner": spec.planner.type, "plans": plans, "nodes": nodes, "edges": edges}


FORMATS = {"mermaid": to_mermaid, "dot": to_dot}

__all__ = ["FORMATS", "dot_text", "mermaid_text", "to_dot", "to_json_graph", "to_mermaid"]
