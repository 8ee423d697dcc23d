"""Import AgentMap CSV graphs as AgentFlow workflow specs.

AgentMap declares one agent graph per ``GraphName``; each CSV row is a node with its
agent type and its routes (``Edge``, or ``Success_Next``/``Failure_Next``, where
``A|B`` fans out in parallel and ``func:name`` calls a routing function).
:func:`import_agentmap` turns one graph into a workflow mapping for
:func:`agentflow_core.spec.parse_workflow`:

* a graph without parallel targets becomes an FSM: node = state, routes = transitions,
  ``func:name`` = the state's ``router``, a node without a next one ends the run in the
  generated final states ``__end__`` (success) or ``__failed__`` (failure);
* a graph with parallel targets becomes a DAG pipeline (an FSM runs one state at a
  time): routes become ``depends_on`` plus a ``condition`` on the source's status.

Everything that does not carry over faithfully (agent types AgentFlow lacks, prompts,
Context configuration, renamed nodes, ...) is listed in :attr:`ImportResult.report`;
nothing is dropped silently. A CSV that cannot be converted at all (missing columns,
unknown targets, a cycle in a parallel graph) raises
:class:`~agentflow_core.errors.ValidationFailed` naming rows and columns.

Pure: no I/O besides the text it is given.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow_core.errors import ValidationFailed

#: AgentMap's columns, in its documented order.
COLUMNS: tuple[str, ...] = (
    "GraphName",
    "Node",
    "Edge",
    "Context",
    "AgentType",
    "Success_Next",
    "Failure_Next",
    "Input_Fields",
    "Output_Field",
    "Prompt",
    "Description",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("GraphName", "Node")
ROUTE_COLUMNS: tuple[str, ...] = ("Edge", "Success_Next", "Failure_Next")

#: generated final states of an imported FSM
END_STATE = "__end__"
FAILED_STATE = "__failed__"

#: what a ``failure`` agent becomes: a ``fail`` agent that never stops failing, whatever
#: retries or re-runs the user adds later
FAIL_FOREVER = 1_000_000

#: AgentMap types that simply pass data on (``input`` is reported: it asks a human)
_ECHO_TYPES = frozenset({"default", "echo", "success", "input"})
#: AgentMap's LLM agent types and their aliases
_LLM_TYPES = frozenset({"openai", "gpt", "chatgpt", "claude", "anthropic", "gemini", "google", "llm"})
#: state fields AgentMap's runtime fills in itself
_RUNTIME_FIELDS = frozenset({"error", "last_action_success"})

_CEL_KEYWORDS = frozenset(
    {
        "false", "in", "null", "true", "as", "break", "const", "continue", "else", "for", "function",
        "if", "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
    }
)  # fmt: skip
#: names a state may not take: CEL keywords, the roots every expression can read
#: (a state named ``input`` would be unreadable as ``input``), and the generated finals
_RESERVED_STATES = _CEL_KEYWORDS | {"input", "outputs", "last", "steps", END_STATE, FAILED_STATE}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

PlannerKind = Literal["fsm", "dag"]


@dataclass(frozen=True, slots=True)
class ImportIssue:
    """One CSV value or construct that did not carry over faithfully.

    ``row`` counts like a spreadsheet does (the header is row 1); it is None for
    graph-wide issues.
    """

    row: int | None
    column: str | None
    value: str
    message: str

    def __str__(self) -> str:
        where = ", ".join(p for p in (f"row {self.row}" if self.row is not None else "", self.column or "") if p)
        shown = self.value if len(self.value) <= 60 else self.value[:57] + "..."
        # repr() keeps a multi-line cell on one line of output.
        value = f" {shown!r}" if self.value else ""
        return f"{where or 'graph'}{value}: {self.message}"


@dataclass(frozen=True, slots=True)
class ImportResult:
    #: a workflow mapping ready for :func:`agentflow_core.spec.parse_workflow`
    spec: dict[str, Any]
    #: every value or construct that was not mapped faithfully, in row order
    report: list[ImportIssue]
    #: the AgentMap graph that was imported
    graph: str
    planner_type: PlannerKind


# --- reading the CSV ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Row:
    number: int
    cells: dict[str, str]

    def get(self, column: str) -> str:
        return self.cells.get(column, "")


@dataclass(frozen=True, slots=True)
class _Route:
    column: str
    value: str
    targets: tuple[str, ...] = ()
    func: str | None = None


@dataclass(slots=True)
class _Node:
    name: str
    row: _Row
    success: _Route | None = None
    failure: _Route | None = None
    state: str = ""
    agent: str = ""


@dataclass(frozen=True, slots=True)
class _Edge:
    src: str
    dst: str
    kind: Literal["success", "failure"]
    route: _Route


@dataclass(slots=True)
class _Errors:
    found: list[tuple[int, dict[str, str]]] = field(default_factory=list)

    def add(self, row: int | None, column: str | None, msg: str) -> None:
        loc = ".".join(p for p in (f"row {row}" if row is not None else "", column or "") if p) or "csv"
        self.found.append((row or 0, {"loc": loc, "msg": msg}))

    def raise_if_any(self, summary: str) -> None:
        if self.found:
            # In file order, whichever check found them.
            details = [d for _, d in sorted(self.found, key=lambda item: item[0])]
            raise ValidationFailed(summary, details=details)


def _canonical(header: str) -> str:
    return header.strip().lstrip("\ufeff").lower().replace(" ", "_")


_BY_CANONICAL = {_canonical(c): c for c in COLUMNS}


def _read(csv_text: str, issues: list[ImportIssue], errors: _Errors) -> list[_Row]:
    """The data rows; header problems raise at once, row problems are collected in ``errors``."""
    # strict: an unbalanced quote is an error, not a silently merged cell.
    reader = csv.reader(io.StringIO(csv_text.lstrip("\ufeff"), newline=""), strict=True)
    records: list[list[str]] = []
    try:
        records.extend(reader)
    except csv.Error as exc:
        # Spreadsheet row of the broken record: the header is row 1.
        errors.add(len(records) + 1, None, f"not valid CSV: {exc}")
        errors.raise_if_any("the AgentMap CSV is malformed")
    # The header is the first non-blank row.
    first = next((i for i, record in enumerate(records) if any(cell.strip() for cell in record)), None)
    if first is None:
        raise ValidationFailed(
            "the AgentMap CSV is empty",
            details=[{"loc": "row 1", "msg": "the CSV is empty (expected a header row naming AgentMap's columns)"}],
        )
    header_row = first + 1
    header = records[first]
    columns: list[str | None] = []
    for cell in header:
        name = _BY_CANONICAL.get(_canonical(cell))
        if name is not None and name in columns:
            errors.add(header_row, name, "column appears twice in the header")
        elif name is None and cell.strip():
            issues.append(ImportIssue(header_row, cell.strip(), "", "not an AgentMap column; its values are ignored"))
        columns.append(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        errors.add(header_row, None, f"missing required column(s) {', '.join(missing)} (the first row is the header)")
    errors.raise_if_any("the AgentMap CSV is malformed")

    rows: list[_Row] = []
    for number, record in enumerate(records[first + 1 :], start=header_row + 1):
        if not any(cell.strip() for cell in record):
            continue  # blank line
        if any(cell.strip() for cell in record[len(columns) :]):
            # Kept (its first cells still define the node) so that routes to it are not
            # reported as unknown on top of this error.
            errors.add(number, None, f"{len(record)} values but the header has {len(columns)} columns")
        cells = {col: cell.strip() for col, cell in zip(columns, record, strict=False) if col is not None}
        empty = [col for col in REQUIRED_COLUMNS if not cells.get(col)]
        for col in empty:
            errors.add(number, col, "is empty")
        if not empty:
            rows.append(_Row(number, cells))
    return rows


def _select(rows: list[_Row], graph: str | None, errors: _Errors) -> tuple[str, list[_Row]]:
    graphs: dict[str, list[_Row]] = {}
    for row in rows:
        graphs.setdefault(row.get("GraphName"), []).append(row)
    names = ", ".join(graphs)
    if not graphs:
        errors.add(None, None, "no nodes: every data row is blank or malformed")
        errors.raise_if_any("the AgentMap CSV has no nodes")
    if graph is None:
        if len(graphs) > 1:
            errors.add(None, "graph", f"several graphs in the CSV, choose one of: {names}")
            errors.raise_if_any("the AgentMap CSV holds several graphs; choose one")
        graph = next(iter(graphs))
    if graph not in graphs:
        errors.add(None, "graph", f"no graph named '{graph}' (graphs: {names})")
        errors.raise_if_any(f"no graph '{graph}' in the AgentMap CSV")
    return graph, graphs[graph]


def _parse_route(row: _Row, column: str, nodes: dict[str, _Node], errors: _Errors) -> _Route | None:
    value = row.get(column)
    if not value:
        return None
    if value.startswith("func:"):
        name = value.removeprefix("func:").strip()
        if not name or "|" in name:
            errors.add(row.number, column, f"'{value}': a routing function is one 'func:name', alone in its cell")
            return None
        return _Route(column, value, func=name)
    targets = tuple(t.strip() for t in value.split("|"))
    if any(not t for t in targets):
        errors.add(row.number, column, f"'{value}': empty target in the '|' list")
        return None
    if any(t.startswith("func:") for t in targets):
        errors.add(row.number, column, f"'{value}': a routing function cannot be combined with other targets")
        return None
    unknown = [t for t in targets if t not in nodes]
    if unknown:
        listed = ", ".join(f"'{t}'" for t in unknown)
        errors.add(row.number, column, f"unknown node(s) {listed} (not a Node of graph '{row.get('GraphName')}')")
        return None
    return _Route(column, value, targets=tuple(dict.fromkeys(targets)))


# --- names ----------------------------------------------------------------------------------


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        suffix = f"_{n}"
        name, n = base[: 128 - len(suffix)] + suffix, n + 1
    taken.add(name)
    return name


def _state_name(node: str) -> str:
    # Identifiers only: expressions read a state's output as outputs.<state> (FSM) and a
    # step's status as steps.<step> (DAG); a hyphen or a space would need another syntax.
    name = re.sub(r"[^A-Za-z0-9_]", "_", node)
    if name[0].isdigit():
        name = "n" + name
    name = name[:128]
    if name in _RESERVED_STATES:
        name = name[:123] + "_node"
    return name


def _is_ident(name: str) -> bool:
    return _IDENT.fullmatch(name) is not None and name not in _CEL_KEYWORDS


def _read_field(root: str, name: str) -> str:
    """``root.name`` when it exists, else null (AgentMap reads a missing field as None)."""
    if _is_ident(name):
        return f"has({root}.{name}) ? {root}.{name} : null"
    quoted = json.dumps(name)
    return f"{quoted} in {root} ? {root}[{quoted}] : null"


# --- graph analysis -------------------------------------------------------------------------


def _reachable(start: str, successors: dict[str, list[str]]) -> set[str]:
    seen = {start}
    queue = deque([start])
    while queue:
        for nxt in successors.get(queue.popleft(), ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def _find_cycle(order: list[str], successors: dict[str, list[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a] following the edges, or None (iterative DFS)."""
    color: dict[str, int] = {}
    for root in order:
        if root in color:
            continue
        path: list[str] = [root]
        color[root] = 1
        stack = [iter(successors.get(root, ()))]
        while stack:
            advanced = False
            for nxt in stack[-1]:
                if color.get(nxt) == 1:
                    return [*path[path.index(nxt) :], nxt]
                if nxt not in color:
                    color[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(successors.get(nxt, ())))
                    advanced = True
                    break
            if not advanced:
                color[path.pop()] = 2
                stack.pop()
    return None


class _Importer:
    def __init__(self, graph: str, rows: list[_Row], issues: list[ImportIssue]) -> None:
        self.graph = graph
        self.rows = rows
        self.issues = issues
        self.nodes: dict[str, _Node] = {}
        self.entry = ""
        self.edges: list[_Edge] = []
        self.routers: dict[str, _Route] = {}
        self.kind: PlannerKind = "fsm"

    def issue(self, row: _Row | None, column: str | None, value: str, message: str) -> None:
        self.issues.append(ImportIssue(row.number if row else None, column, value, message))

    # --- structure ---

    def build_graph(self, errors: _Errors) -> None:
        for row in self.rows:
            name = row.get("Node")
            if name in self.nodes:
                first = self.nodes[name].row.number
                errors.add(row.number, "Node", f"duplicate node '{name}' (first defined on row {first})")
                continue
            self.nodes[name] = _Node(name, row)
        routes: dict[str, dict[str, _Route | None]] = {}
        for name, node in self.nodes.items():
            routes[name] = {col: _parse_route(node.row, col, self.nodes, errors) for col in ROUTE_COLUMNS}
        errors.raise_if_any(f"AgentMap graph '{self.graph}' cannot be imported")
        self.entry = next(iter(self.nodes))

        for name, node in self.nodes.items():
            edge, success, failure = (routes[name][c] for c in ROUTE_COLUMNS)
            if edge is not None and (success is not None or failure is not None):
                self.issue(
                    node.row,
                    "Edge",
                    edge.value,
                    "AgentMap rejects Edge together with Success_Next/Failure_Next; Success_Next/Failure_Next "
                    "were used and Edge only for the outcome they leave open",
                )
            node.success = success or edge
            node.failure = failure or edge
        self.kind = "dag" if any(self._parallel(n) for n in self.nodes.values()) else "fsm"

        for node in self.nodes.values():
            funcs = [r for r in (node.success, node.failure) if r is not None and r.func is not None]
            if funcs and self.kind == "dag":
                for route in dict.fromkeys(funcs):
                    self.issue(
                        node.row,
                        route.column,
                        route.value,
                        "cannot be mapped: the graph has parallel targets so it imports as a DAG pipeline, whose "
                        "dependencies are fixed; a routing function choosing the next node at run time has no "
                        "equivalent there, so this route was dropped",
                    )
            elif funcs:
                self.routers[node.name] = funcs[0]
                for other in funcs[1:]:
                    if other.func != funcs[0].func:
                        self.issue(
                            node.row,
                            other.column,
                            other.value,
                            f"a state has one router; '{funcs[0].func}' (from {funcs[0].column}) was used and "
                            "this one dropped",
                        )
            if node.success is not None:
                self.edges += [_Edge(node.name, t, "success", node.success) for t in node.success.targets]
            if node.failure is not None:
                self.edges += [_Edge(node.name, t, "failure", node.failure) for t in node.failure.targets]

    @staticmethod
    def _parallel(node: _Node) -> bool:
        return any(r is not None and len(r.targets) > 1 for r in (node.success, node.failure))

    def successors(self, *, success_only: bool = False, skip: str | None = None) -> dict[str, list[str]]:
        """Edges between nodes; a router may pick any node. ``skip``: leave out that
        node's success edges (to ask "can we get there without it succeeding?")."""
        out: dict[str, list[str]] = {name: [] for name in self.nodes}
        for e in self.edges:
            if success_only and e.kind != "success":
                continue
            if e.src == skip and e.kind == "success":
                continue
            out[e.src].append(e.dst)
        for name in self.routers:
            if name != skip:
                out[name].extend(self.nodes)
        return out

    def drop_unreachable(self) -> None:
        seen = _reachable(self.entry, self.successors())
        for name, node in list(self.nodes.items()):
            if name not in seen:
                self.issue(
                    node.row,
                    "Node",
                    name,
                    f"not reachable from the entry node '{self.entry}' (the graph's first row), so AgentMap never "
                    "runs it; dropped",
                )
                del self.nodes[name]
        self.edges = [e for e in self.edges if e.src in self.nodes and e.dst in self.nodes]

    def check_acyclic(self) -> None:
        cycle = _find_cycle(list(self.nodes), self.successors())
        if cycle is None:
            return
        parallel = next(n for n in self.nodes.values() if self._parallel(n))
        route = next(r for r in (parallel.success, parallel.failure) if r is not None and len(r.targets) > 1)
        row = self.nodes[cycle[0]].row.number
        raise ValidationFailed(
            f"AgentMap graph '{self.graph}' cannot be imported",
            details=[
                {
                    "loc": f"row {row}",
                    "msg": f"unmappable: the graph has parallel targets (row {parallel.row.number}, "
                    f"{route.column} '{route.value}') so it needs a DAG pipeline, which cannot loop, "
                    f"but it has the cycle {' -> '.join(cycle)}",
                }
            ],
        )

    def assign_names(self) -> str:
        states: set[str] = set()
        agents: set[str] = set()
        for name, node in self.nodes.items():
            base = _state_name(name)
            node.state = _unique(base, states)
            # Agent names must start with a letter or digit.
            node.agent = _unique(node.state.lstrip("_")[:128] or "agent", agents)
            if node.state != name or node.agent != name:
                if re.sub(r"[^A-Za-z0-9_]", "_", name) in _RESERVED_STATES:
                    why = f"'{name}' is a reserved name in AgentFlow"
                elif node.state != base:
                    why = f"'{base}' is taken by another node"
                elif node.state != name:
                    why = "state names must be identifiers (letters, digits, _) that expressions can read"
                else:
                    why = "agent names start with a letter or digit"
                self.issue(node.row, "Node", name, f"renamed: state '{node.state}', agent '{node.agent}' ({why})")
        workflow = re.sub(r"[^A-Za-z0-9_.-]", "_", self.graph).lstrip("_.-")[:128] or "agentmap"
        if workflow != self.graph:
            self.issue(
                None, "GraphName", self.graph, f"workflow named '{workflow}' (workflow names allow [A-Za-z0-9_.-])"
            )
        return workflow

    # --- agents and documentation ---

    def agent_spec(self, node: _Node) -> dict[str, Any]:
        raw = node.row.get("AgentType")
        kind = raw.lower() or "default"
        if kind in _ECHO_TYPES:
            if kind == "input":
                self.issue(
                    node.row,
                    "AgentType",
                    raw,
                    "AgentMap's input agent asks a person on the console; AgentFlow has no human tasks yet, so an "
                    "echo placeholder passes its input on (give the value in the run input)",
                )
            return {"type": "echo"}
        if kind == "failure":
            return {"type": "fail", "times": FAIL_FOREVER}
        if kind == "branching":
            self.issue(
                node.row,
                "AgentType",
                raw,
                "AgentMap's branching agent succeeds or fails depending on an input field (input, success, "
                "should_succeed, succeed or branch), steering to Success_Next or Failure_Next; the echo placeholder "
                f"always succeeds. To branch on data, give state '{node.state}' conditional_transitions (or "
                "condition with on_true/on_false), e.g. condition: 'last.success == true'",
            )
            return {"type": "echo"}
        if kind in _LLM_TYPES:
            self.issue(
                node.row,
                "AgentType",
                raw,
                f"AgentType '{raw}' has no AgentFlow equivalent yet (the LLM agent arrives with the worker-runtime "
                "issue); mapped to an echo placeholder",
            )
        else:
            self.issue(
                node.row,
                "AgentType",
                raw,
                f"AgentType '{raw}' has no AgentFlow equivalent yet; mapped to an echo placeholder",
            )
        return {"type": "echo"}

    def description(self, node: _Node) -> str | None:
        row = node.row
        described = row.get("Description")
        prompt = row.get("Prompt")
        context = row.get("Context")
        if prompt:
            registry = " (a reference to AgentMap's prompt registry)" if prompt.startswith("prompt:") else ""
            if described:
                self.issue(
                    row,
                    "Prompt",
                    prompt,
                    f"prompts drive LLM agents, which AgentFlow does not have yet{registry}; dropped (the state "
                    "keeps the row's Description)",
                )
            else:
                self.issue(
                    row,
                    "Prompt",
                    prompt,
                    f"prompts drive LLM agents, which AgentFlow does not have yet{registry}; the text is kept in "
                    "the state's description",
                )
                described = f"Prompt: {prompt}"
        if context:
            self.issue(
                row,
                "Context",
                context,
                "Context is agent configuration (memory, provider and model settings, or free text) that AgentFlow "
                "cannot interpret yet; dropped",
            )
        return described or None

    # --- data flow ---

    def input_mapping(self, node: _Node, producers: dict[str, list[str]]) -> dict[str, str] | None:
        row = node.row
        raw = row.get("Input_Fields")
        if not raw:
            return None
        fields = [f.strip() for f in raw.split("|")]
        if any(not f for f in fields):
            self.issue(row, "Input_Fields", raw, "empty field name in the '|' list; ignored")
        mapping: dict[str, str] = {}
        for name in dict.fromkeys(f for f in fields if f):
            mapping[name] = self.field_expression(node, name, producers.get(name, []))
        return mapping or None

    def field_expression(self, node: _Node, name: str, writers: list[str]) -> str:
        """Where a node's input field comes from.

        AgentMap keeps one state dict: a field holds the run input's value until a node
        writes it (Output_Field). AgentFlow keeps each node's output under its name, so a
        field written by exactly one node reads ``outputs.<state>``: unguarded when that
        node surely succeeded before (every path here passes its success), else guarded
        to null like AgentMap's missing field. Otherwise the field comes from the run input.
        """
        row = node.row
        if len(writers) == 1:
            writer = writers[0]
            state = self.nodes[writer].state
            if self.surely_succeeded_before(writer, node.name):
                return f"outputs.{state}"
            if self.can_run_before(writer, node.name):
                return _read_field("outputs", state)
            if self.kind == "dag":
                self.issue(
                    row,
                    "Input_Fields",
                    name,
                    f"written by '{writer}' (Output_Field), which does not run before this node in the DAG; "
                    "read from the run input instead",
                )
        elif len(writers) > 1:
            listed = ", ".join(f"'{w}'" for w in writers)
            self.issue(
                row,
                "Input_Fields",
                name,
                f"written by several nodes ({listed}); AgentFlow keeps each node's output separately, so which "
                f"write is meant is unclear: read from the run input (input.{name}) instead; edit the mapping",
            )
        elif name in _RUNTIME_FIELDS:
            self.issue(
                row,
                "Input_Fields",
                name,
                f"AgentMap fills '{name}' itself after a failure; AgentFlow does not put step errors into the "
                "data a mapping reads, so it is read from the run input (null unless given)",
            )
        return _read_field("input", name)

    def can_run_before(self, writer: str, reader: str) -> bool:
        return reader in _reachable_strict(writer, self.successors())

    def surely_succeeded_before(self, writer: str, reader: str) -> bool:
        if writer == reader or reader == self.entry:
            return False
        # Without the writer's success edges, can the reader still be reached?
        return reader not in _reachable(self.entry, self.successors(skip=writer))

    # --- specs ---

    def fsm(self, producers: dict[str, list[str]]) -> dict[str, Any]:
        states: dict[str, Any] = {}
        finals: dict[str, Any] = {}
        for node in self.nodes.values():
            st: dict[str, Any] = {"agent": node.agent}
            described = self.description(node)
            if described:
                st["description"] = described
            mapping = self.input_mapping(node, producers)
            if mapping:
                st["input"] = mapping
            router = self.routers.get(node.name)
            if router is not None:
                st["router"] = router.func
                # A plain Success_Next beside the function is only an argument to it in AgentMap.
                unused = node.success.value if node.success is not None and node.success.targets else ""
                self.issue(
                    node.row,
                    router.column,
                    router.value,
                    f"AgentMap calls routing function '{router.func}' after every outcome with (state, "
                    "success target, failure target); it becomes this state's router, which AgentFlow calls after "
                    "a success with (output, scope) and which returns a state name: port it and register it in "
                    "the 'agentflow.routing' entry-point group"
                    + (f"; Success_Next '{unused}' is not used, the router picks the next state" if unused else ""),
                )
            elif node.success is not None and node.success.targets:
                st["on_success"] = self.nodes[node.success.targets[0]].state
            else:
                st["on_success"] = END_STATE
                finals[END_STATE] = {"status": "succeeded"}
            if node.failure is not None and node.failure.targets:
                st["on_error"] = self.nodes[node.failure.targets[0]].state
            else:
                st["on_error"] = FAILED_STATE
                finals[FAILED_STATE] = {"status": "failed"}
            states[node.state] = st
        if not finals:
            self.issue(
                None, None, "", "no node ends the graph (every node has a next one); the run loops until max_steps"
            )
            finals[END_STATE] = {"status": "succeeded"}
        return {
            "type": "fsm",
            "initial_state": self.nodes[self.entry].state,
            "states": states,
            "final_states": {name: finals[name] for name in (END_STATE, FAILED_STATE) if name in finals},
        }

    def dag(self, producers: dict[str, list[str]]) -> dict[str, Any]:
        incoming: dict[str, list[_Edge]] = {name: [] for name in self.nodes}
        for e in self.edges:
            incoming[e.dst].append(e)
        steps: dict[str, Any] = {}
        for name, node in self.nodes.items():
            step: dict[str, Any] = {"agent": node.agent}
            described = self.description(node)
            if described:
                step["description"] = described
            edges = incoming[name]
            if edges:
                sources = list(dict.fromkeys(e.src for e in edges))
                step["depends_on"] = [self.nodes[s].state for s in sources]
                # The condition encodes which routes lead here (success, failure): it
                # decides whatever the dependencies' outcome.
                step["trigger"] = "all_done"
                step["condition"] = self.dag_condition(sources, edges)
            mapping = self.input_mapping(node, producers)
            if mapping:
                step["input"] = mapping
            steps[node.state] = step
        return {
            "type": "dag",
            "steps": self.final_last(steps),
            # AgentMap tolerates failures that have a route; only the final node decides.
            "success_policy": "final_node",
        }

    def dag_condition(self, sources: list[str], edges: list[_Edge]) -> str:
        # One clause per source, OR-ed: AgentMap (LangGraph) runs a node when any route
        # into it fires; the DAG waits for every dependency to finish first.
        clauses = []
        for src in sources:
            kinds = {e.kind for e in edges if e.src == src}
            ref = f"steps.{self.nodes[src].state}.status"
            if kinds == {"success", "failure"}:
                clauses.append(f'{ref} in ["succeeded", "failed"]')
            elif kinds == {"failure"}:
                clauses.append(f'{ref} == "failed"')
            else:
                clauses.append(f'{ref} == "succeeded"')
        return " || ".join(clauses)

    def final_last(self, steps: dict[str, Any]) -> dict[str, Any]:
        """Order steps so the DAG's final step (the last-declared step nothing depends on,
        whose status the run takes under ``final_node``) is the graph's happy-path end."""
        sinks = [n for n in self.nodes if not any(e.src == n for e in self.edges)]
        happy = _reachable(self.entry, self.successors(success_only=True))
        final = next((n for n in reversed(sinks) if n in happy), sinks[-1] if sinks else None)
        if final is None:
            return steps
        if len(sinks) > 1:
            others = ", ".join(f"'{s}'" for s in sinks if s != final)
            self.issue(
                None,
                None,
                "",
                f"several nodes end the graph ('{final}', {others}); with success_policy final_node the run's status "
                f"follows '{final}' only",
            )
        state = self.nodes[final].state
        return {**{k: v for k, v in steps.items() if k != state}, state: steps[state]}


def _reachable_strict(start: str, successors: dict[str, list[str]]) -> set[str]:
    """Nodes reachable from ``start`` through at least one edge (``start`` itself only on a cycle)."""
    seen: set[str] = set()
    queue = deque(successors.get(start, ()))
    while queue:
        node = queue.popleft()
        if node not in seen:
            seen.add(node)
            queue.extend(successors.get(node, ()))
    return seen


def _producers(nodes: Iterable[_Node]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node in nodes:
        out = node.row.get("Output_Field")
        if out:
            found.setdefault(out, []).append(node.name)
    return found


def import_agentmap(csv_text: str, graph: str | None = None) -> ImportResult:
    """Convert one graph of an AgentMap CSV into a workflow mapping plus a report.

    ``graph`` selects the graph; without it the CSV must hold exactly one. Raises
    ValidationFailed (details: ``{"loc": "row 4.Success_Next", "msg": ...}``) when the
    CSV cannot be converted.
    """
    issues: list[ImportIssue] = []
    errors = _Errors()
    rows = _read(csv_text, issues, errors)
    graph, selected = _select(rows, graph, errors)
    imp = _Importer(graph, selected, issues)
    imp.build_graph(errors)
    imp.drop_unreachable()
    if imp.kind == "dag":
        imp.check_acyclic()
    workflow = imp.assign_names()
    agents = {node.agent: imp.agent_spec(node) for node in imp.nodes.values()}
    producers = _producers(imp.nodes.values())
    planner = imp.dag(producers) if imp.kind == "dag" else imp.fsm(producers)
    spec: dict[str, Any] = {
        "name": workflow,
        "description": f"Imported from AgentMap graph '{graph}'",
        "agents": agents,
        "planner": planner,
    }
    order = {c: i for i, c in enumerate(COLUMNS)}
    report = sorted(issues, key=lambda i: (i.row or 0, order.get(i.column or "", len(order))))
    return ImportResult(spec=spec, report=report, graph=graph, planner_type=imp.kind)


__all__ = ["COLUMNS", "END_STATE", "FAILED_STATE", "ImportIssue", "ImportResult", "import_agentmap"]
