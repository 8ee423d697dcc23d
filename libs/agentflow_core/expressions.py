"""Expressions in workflow specs: CEL conditions and mappings, JSONPath extraction.

Every expression is compiled once, when the workflow is registered; a compile error is a
:class:`ExpressionError` carrying the position, reported by the spec validator as a 422
naming the node and the expression. Evaluation is pure (no clock, no I/O) and fails with
:class:`EvaluationError` (a missing field, a wrong type), which planners route to the
node's error path instead of crashing.

Name resolution (highest precedence first), for a root name ``x`` in a CEL expression:

1. the reserved names ``input`` (the run's input), ``outputs`` (outputs by state/node
   name), ``last`` (the most recent output), and planner-specific extras such as
   ``steps`` in a DAG;
2. a state/node name: that node's output;
3. an agent name: the most recent output of that agent;
4. a top-level field of ``last`` when ``last`` is a mapping (``risk_score < 0.7``).

Numbers from run data are CEL doubles (JSON has one number type): write ``x * 2.0`` and
``x + 1.0``; comparisons with int literals (``x > 1``) work either way.

A string starting with ``$`` (``$.input.user.id``, ``$.outputs.fetch.items[0]``) is a
JSONPath over the document ``{"input", "outputs", "last", <extras>}``; one match gives the
value, several give a list, none is an evaluation error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cel
import jsonpath

RESERVED = ("input", "outputs", "last")

_POSITION = re.compile(r"<input>:(\d+):(\d+): (.*?)(?:\n|$)")
_UNDEFINED = re.compile(r"Undefined variable or function: '([^']+)'")
_OUTPUT_REF = re.compile(r"\boutputs\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*[\"']([^\"']+)[\"']\s*\])")


class ExpressionError(ValueError):
    """An expression that does not compile. ``position`` is ``line:column`` when known."""

    def __init__(self, source: str, message: str, position: str | None = None) -> None:
        self.source = source
        self.message = message
        self.position = position
        where = f" at {position}" if position else ""
        super().__init__(f"invalid expression {source!r}{where}: {message}")


class EvaluationError(ValueError):
    """An expression that compiled but could not be evaluated against this run's data."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message
        super().__init__(f"expression {source!r} failed: {message}")


@dataclass(slots=True)
class Scope:
    """The data an expression sees. Root names are resolved lazily, by precedence.

    Converting a value into CEL costs time proportional to its size, so only the names
    an expression actually references are resolved and handed to CEL.
    """

    input: Any
    outputs: Mapping[str, Any]
    last: Any = None
    #: agent name -> name of the node that produced its most recent output
    agent_latest: Mapping[str, str] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)
    # CEL variables converted so far for this scope. A scope stands for one snapshot of
    # the run's data (planners build a new one when it changes), so every expression
    # evaluated against it can share them: converting a value into CEL costs far more
    # than evaluating.
    cel_context: Any = field(default=None, repr=False, compare=False)
    cel_bound: set[str] = field(default_factory=set, repr=False, compare=False)

    def resolve(self, name: str) -> tuple[bool, Any]:
        if name == "input":
            return True, self.input
        if name == "outputs":
            return True, self.outputs
        if name == "last":
            return True, self.last
        if name in self.extras:
            return True, self.extras[name]
        if name in self.outputs:
            return True, self.outputs[name]
        node = self.agent_latest.get(name)
        if node is not None and node in self.outputs:
            return True, self.outputs[node]
        if isinstance(self.last, dict) and name in self.last:
            return True, self.last[name]
        return False, None

    def document(self) -> dict[str, Any]:
        return {"input": self.input, "outputs": dict(self.outputs), "last": self.last, **self.extras}


def _as_cel(value: Any) -> Any:
    """JSON numbers become CEL doubles, as CEL treats JSON (``google.protobuf.Value``).

    JSON does not keep ints and doubles apart (``5.0`` is sent as ``5``), and CEL refuses
    mixed arithmetic (``5 * 0.9``), so typing numbers by how they happen to print would
    make an expression fail on some data and not on other.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, dict):
        return {k: _as_cel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_cel(v) for v in value]
    return value


def _json_safe(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if isinstance(value, list):
        return all(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v) for k, v in value.items())
    return False


class Expression:
    """A compiled CEL expression or JSONPath query."""

    __slots__ = ("_evaluate", "_fields", "kind", "source", "variables")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError(str(source), "an expression must be a non-empty string")
        self.source = source
        self._evaluate: Callable[[Scope], Any]
        if source.lstrip().startswith("$"):
            self.kind = "jsonpath"
            try:
                path = jsonpath.compile(source.strip())
            except jsonpath.JSONPathError as exc:
                raise ExpressionError(source, str(exc)) from exc
            self.variables: tuple[str, ...] = ()
            self._evaluate = lambda scope: self._run_jsonpath(path, scope)
        else:
            self.kind = "cel"
            try:
                program = cel.compile(source)
            except ValueError as exc:
                text = str(exc)
                match = _POSITION.search(text)
                if match:
                    raise ExpressionError(source, match.group(3), f"{match.group(1)}:{match.group(2)}") from exc
                raise ExpressionError(source, text) from exc
            self.variables = tuple(program.variables())
            fast = _flatten(source, self.variables)
            if fast is not None:
                flat_source, self._fields = fast
                try:
                    program = cel.compile(flat_source)
                except ValueError:
                    self._fields = {}
            else:
                self._fields = {}
            self._evaluate = lambda scope: self._run_cel(program, scope)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def output_refs(self) -> set[str]:
        """Node names read through ``outputs.NAME`` / ``outputs["NAME"]`` (static)."""
        return {a or b for a, b in _OUTPUT_REF.findall(self.source)}

    def names(self) -> set[str]:
        """Root names and ``outputs.NAME`` references: what the expression reads."""
        refs = set(self.variables) | self.output_refs()
        if self.kind == "jsonpath":
            refs |= set(re.findall(r"\$\.outputs\.([A-Za-z_][A-Za-z0-9_]*)", self.source))
        return refs

    def _run_cel(self, program: Any, scope: Scope) -> Any:
        context = scope.cel_context
        if context is None:
            context = scope.cel_context = cel.Context()
        bound = scope.cel_bound
        fields = self._fields
        for name in self.variables:
            flat = fields.get(name)
            if flat is None:
                if name in bound:
                    continue
                bound.add(name)
                found, value = scope.resolve(name)
                if found:
                    context.add_variable(name, _as_cel(value))
                continue
            resolved: tuple[bool, Any] | None = None
            for field_name, var in flat:
                if var in bound:
                    continue
                bound.add(var)
                if resolved is None:
                    resolved = scope.resolve(name)
                found, value = resolved
                # Only the fields the expression reads, as flat variables: converting a
                # map into CEL costs per entry, a scalar almost nothing.
                if found and isinstance(value, dict) and field_name in value:
                    context.add_variable(var, _as_cel(value[field_name]))
        try:
            value = program.execute(context)
        except KeyError as exc:
            raise EvaluationError(self.source, f"no such field {exc}") from exc
        except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
            text = str(exc).split("\n", 1)[0]
            undefined = _UNDEFINED.search(text)
            if undefined:
                name = undefined.group(1)
                if name.startswith(_FLAT):
                    root, _, field = name[len(_FLAT) :].partition("__")
                    found, value = scope.resolve(root)
                    text = (
                        f"no such field '{field}' in '{root}'"
                        if found
                        else f"unknown name '{root}' (not input/outputs/last, a node, an agent,"
                        " or a field of the last output)"
                    )
                else:
                    text = (
                        f"unknown name '{name}' (not input/outputs/last, a node, an agent,"
                        " or a field of the last output)"
                    )
            raise EvaluationError(self.source, text) from exc
        if not _json_safe(value):
            raise EvaluationError(self.source, f"result of type {type(value).__name__} is not JSON data")
        return value

    def _run_jsonpath(self, path: Any, scope: Scope) -> Any:
        try:
            matches = path.findall(scope.document())
        except jsonpath.JSONPathError as exc:
            raise EvaluationError(self.source, str(exc)) from exc
        if not matches:
            raise EvaluationError(self.source, "no match")
        return matches[0] if len(matches) == 1 else list(matches)

    def evaluate(self, scope: Scope) -> Any:
        return self._evaluate(scope)

    def test(self, scope: Scope) -> bool:
        """Evaluate as a condition: the result must be a boolean."""
        value = self._evaluate(scope)
        if value is True or value is False:
            return value
        raise EvaluationError(self.source, f"a condition must be true or false, got {json.dumps(value)[:80]}")


_FLAT = "_af__"
_TOKENS = re.compile(
    r"""(?P<str>[rRbB]*(?:'{3}.*?'{3}|"{3}.*?"{3}|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"))"""
    r"|(?P<sel>(?<![\w.])(?P<root>[A-Za-z_][A-Za-z0-9_]*)\s*\.\s*(?P<field>[A-Za-z_][A-Za-z0-9_]*)(?![\w\s]*\())",
    re.DOTALL,
)
_MACRO_VARS = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")


def _flatten(source: str, variables: tuple[str, ...]) -> tuple[str, dict[str, list[tuple[str, str]]]] | None:
    """Rewrite ``root.field`` selections into flat variables (``_af__root__field``).

    Only when every use of a root is such a selection, outside string literals, and the
    expression has no ``has()`` (which needs a real selection) and the root is not a
    comprehension variable. Returns the new source and ``{root: [(field, flat_name)]}``,
    or None when nothing can be flattened.
    """
    if "has(" in source.replace(" ", "") or _FLAT in source:
        return None
    bound = set(_MACRO_VARS.findall(source))
    candidates = {v for v in variables if v not in bound}
    if not candidates:
        return None
    # Roots also used bare (``size(items)``, ``input[...]``) keep their whole value.
    code = _TOKENS.sub(lambda m: '""' if m.group("str") else m.group(0), source)
    for root in list(candidates):
        uses = len(re.findall(rf"(?<![\w.]){re.escape(root)}(?!\w)", code))
        selections = len(re.findall(rf"(?<![\w.]){re.escape(root)}\s*\.\s*[A-Za-z_]\w*(?![\w\s]*\()", code))
        if uses != selections:
            candidates.discard(root)
    if not candidates:
        return None
    fields: dict[str, list[tuple[str, str]]] = {}

    def replace(m: re.Match[str]) -> str:
        if m.group("str") or m.group("root") not in candidates:
            return m.group(0)
        root, field = m.group("root"), m.group("field")
        var = f"{_FLAT}{root}__{field}"
        if (field, var) not in fields.setdefault(root, []):
            fields[root].append((field, var))
        return var

    return _TOKENS.sub(replace, source), fields


class CompiledMapping:
    """A compiled ``input`` / ``output`` mapping: a single expression, or a (nested)
    mapping/list whose string leaves are expressions and whose other leaves are literals."""

    __slots__ = ("_root",)

    def __init__(self, spec: Any) -> None:
        self._root = self._compile(spec)

    @classmethod
    def _compile(cls, spec: Any) -> Any:
        if isinstance(spec, str):
            return Expression(spec)
        if isinstance(spec, dict):
            return {str(k): cls._compile(v) for k, v in spec.items()}
        if isinstance(spec, list):
            return [cls._compile(v) for v in spec]
        return spec

    def expressions(self) -> list[Expression]:
        found: list[Expression] = []

        def walk(node: Any) -> None:
            if isinstance(node, Expression):
                found.append(node)
            elif isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self._root)
        return found

    def evaluate(self, scope: Scope) -> Any:
        def run(node: Any) -> Any:
            if isinstance(node, Expression):
                return node.evaluate(scope)
            if isinstance(node, dict):
                return {k: run(v) for k, v in node.items()}
            if isinstance(node, list):
                return [run(v) for v in node]
            return node

        return run(self._root)


# --- the seed's operator form (TAgent pipelines) --------------------------------------

_OPERATORS = ("equals", "not_equals", "contains", "greater_than", "less_than", "exists", "not_exists", "and", "or")


def _ref_to_cel(value: Any, refs_root: str) -> str:
    """``$step.result.x`` -> ``steps.step.result.x``; literals -> CEL literals."""
    if isinstance(value, str) and value.startswith("$"):
        path = value[1:]
        parts = path.split(".")
        if not path or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", p) for p in parts):
            raise ExpressionError(value, "a reference must look like $step.result.field")
        head, rest = parts[0], parts[1:]
        text = f'{refs_root}["{head}"]' if "-" in head else f"{refs_root}.{head}"
        for part in rest:
            text += f'["{part}"]' if "-" in part else f".{part}"
        return text
    # JSON literals are CEL literals (strings, numbers, booleans via true/false, null, lists, maps).
    return json.dumps(value)


def operator_condition_to_cel(cond: Any, refs_root: str = "steps") -> str:
    """Translate ``{operator: equals, left: "$a.result", right: 1}`` (and friends) to CEL."""
    if not isinstance(cond, dict):
        raise ExpressionError(str(cond), "an operator condition must be a mapping with an 'operator'")
    op = cond.get("operator")
    if op not in _OPERATORS:
        raise ExpressionError(json.dumps(cond), f"unknown operator {op!r} (known: {', '.join(_OPERATORS)})")

    def arg(name: str) -> Any:
        if name not in cond:
            raise ExpressionError(json.dumps(cond), f"operator '{op}' needs '{name}'")
        return cond[name]

    if op in ("and", "or"):
        parts = arg("conditions")
        if not isinstance(parts, list) or not parts:
            raise ExpressionError(json.dumps(cond), f"operator '{op}' needs a non-empty list 'conditions'")
        joiner = " && " if op == "and" else " || "
        return "(" + joiner.join(operator_condition_to_cel(p, refs_root) for p in parts) + ")"
    if op in ("exists", "not_exists"):
        key = arg("key")
        if not (isinstance(key, str) and key.startswith("$")):
            raise ExpressionError(str(key), "'key' must be a $reference")
        # has() on a missing parent, or on a list or string, is an error in CEL: every
        # level is guarded, so "does not exist" is false, never an error.
        segments = key[1:].split(".")
        guards = [f'("{segments[0]}" in {refs_root})']
        for i in range(1, len(segments)):
            parent = _ref_to_cel("$" + ".".join(segments[:i]), refs_root)
            child = _ref_to_cel("$" + ".".join(segments[: i + 1]), refs_root)
            guards.append(f"type({parent}) == map && has({child})")
        test = " && ".join(guards)
        return f"({test})" if op == "exists" else f"!({test})"
    if op == "contains":
        container = _ref_to_cel(arg("container"), refs_root)
        item = _ref_to_cel(arg("item"), refs_root)
        # Substring for strings, membership for lists, key membership for maps.
        return f"(type({container}) == string ? {container}.contains(string({item})) : {item} in {container})"
    left = _ref_to_cel(arg("left"), refs_root)
    right = _ref_to_cel(arg("right"), refs_root)
    symbol = {"equals": "==", "not_equals": "!=", "greater_than": ">", "less_than": "<"}[op]
    return f"({left} {symbol} {right})"
