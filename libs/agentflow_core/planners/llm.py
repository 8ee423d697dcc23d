"""Guarded LLM planner: a model writes the plan, AgentFlow checks it, a DAG executes it.

The control plane does no network I/O, so the planning call is itself a step, run by a
worker: ``begin`` dispatches ``StepRequest(seq, state="__plan__", agent="__planner__")``
whose payload is a chat-completions request and whose inline agent is
:func:`planner_agent_spec`. The worker answers ``{"content": "<assistant text>",
"usage": {...}}``.

The answer must be one JSON object (a fenced ```json block is accepted) matching
:data:`PLAN_SCHEMA`, the user's extra ``schema`` if any, and the constraints: only the
allowed agents, at most ``max_steps`` steps, unique names, known dependencies, no
cycles. An invalid plan gets one repair attempt (the model sees its answer and the list
of problems); a second invalid answer, or a planning step that failed, ends the run as
failed with ``"fallback_wanted": true`` in the state so the supervising wrapper can
switch to ``fallback``. A valid plan runs as a DAG (:class:`DagPlanner`), whose state
keys sit beside this planner's.

State::

    {
      "seq": 3, "vars": {...},           # as every planner
      "phase": "planning" | "executing" | "rejected",
      "attempt": 1 | 2,                  # planning attempts so far (2: the repair)
      "plan_seq": 2 | null,              # seq of the planning step in flight
      "failure": str | null,             # why an earlier plan failed (adaptive replans)
      "plan": {...} | null,              # the accepted plan
      "errors": [str],                   # problems of the last rejected answer
      "fallback_wanted": bool,
      # once executing: the DAG's "steps", "running", "done" (see planners.dag)
    }
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from agentflow_core.canonical import canonicalize, canonicalize_portable
from agentflow_core.errors import CanonicalizationError
from agentflow_core.planners.base import Decision, RunOutcome, StepRequest, StepResult
from agentflow_core.planners.common import Checks, PlannerImpl
from agentflow_core.planners.dag import DagPlanner, cycle_text, find_cycles
from agentflow_core.planners.models import NODE_NAME, DagStep, LlmPlannerSpec

PLANNER_AGENT = "__planner__"
PLAN_STATE = "__plan__"
#: repair attempts after the first answer
REPAIRS = 1
#: problems listed per rejected answer (a model that got everything wrong gets the gist)
MAX_ERRORS = 20
#: the plan DAG's seq guard: a plan is finite (each step runs at most 1 + max_replans
#: times), so the real bound is the plan's size; this only satisfies DagPlannerSpec
_PLAN_SEQ_GUARD = 1_000_000
_CACHE_SIZE = 64

PLAN_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "AgentFlow plan",
    "type": "object",
    "required": ["steps"],
    "additionalProperties": False,
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "agent"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": NODE_NAME},
                    "agent": {"type": "string", "minLength": 1},
                    "depends_on": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "input": {},
                    "description": {"type": "string"},
                },
            },
        },
        "on_failure": {"enum": ["fail", "continue"]},
    },
}

SYSTEM_PROMPT = (
    "You are the planner of a multi-agent workflow. You do not do the work yourself: you write a plan "
    "that assigns each step to one of the available agents. Answer with a single JSON object and no other text."
)

DEFAULT_TEMPLATE = """\
Goal: {goal}

Run input (JSON): {input}

Available agents (use exactly these names in "agent"):
{agents}

Write a plan of at most {max_steps} steps. Each step runs one agent. "depends_on" lists the steps that must \
finish first; steps that do not depend on each other run in parallel. A step receives \
{"input": <its "input" value, or the run input if it has none>, "last": <the output of its dependencies>}. \
"on_failure": "continue" keeps the other steps running when one fails (the plan then succeeds if its last \
step does); the default, "fail", stops the run at the first failure.

Reply with one JSON object matching this JSON schema, and nothing else:
{schema}"""

_PLACEHOLDER = re.compile(
    r"\{\{\s*\.?(goal|input|agents|max_steps|schema|failure|state)\s*\}\}"
    r"|\{(goal|input|agents|max_steps|schema|failure|state)\}"
)
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n(.*?)```", re.S)
_MAX_CONTEXT_CHARS = 4000


def planner_agent_spec(pspec: LlmPlannerSpec) -> dict[str, Any]:
    """The inline definition of the ``__planner__`` agent that makes the planning call."""
    return {
        "type": "llm_plan",
        "queue": pspec.queue,
        "timeout_s": pspec.timeout_s,
        "config": {"model": pspec.model.model_dump(mode="json")},
    }


# --- a small JSON Schema (2020-12) validator ----------------------------------------------
#
# jsonschema is not a dependency; plans and user schemas are small, and an explicit
# validator gives messages written for the model that has to repair its answer.

_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "$defs",
        "definitions",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "format",
        "contentMediaType",
        "contentEncoding",
    }
)
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_SUBSCHEMA = frozenset({"additionalProperties", "propertyNames", "items", "contains", "not", "if", "then", "else"})
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_COUNTS = frozenset(
    {"minProperties", "maxProperties", "minItems", "maxItems", "minLength", "maxLength", "minContains", "maxContains"}
)
_NUMBERS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")
_KEYWORDS = (
    _ANNOTATIONS
    | _SCHEMA_MAPS
    | _SUBSCHEMA
    | _SCHEMA_LISTS
    | _COUNTS
    | _NUMBERS
    | {"type", "enum", "const", "required", "dependentRequired", "uniqueItems", "pattern", "$ref"}
)
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: validates a value against a subschema at a path: ``(schema, value, path) -> problems``
_Sub = Callable[[Any, Any, str], list[str]]
_MAX_DEPTH = 64


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    actual = _type_of(value)
    if name == "number":
        return actual in ("integer", "number")
    if name == "integer":
        return actual == "integer" or (actual == "number" and float(value).is_integer())
    return actual == name


def _json_equal(a: Any, b: Any) -> bool:
    # JSON equality: 1 == 1.0, but true != 1 (Python's == says otherwise).
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _resolve_ref(root: Any, ref: Any) -> Any:
    if not isinstance(ref, str):
        raise KeyError(ref)
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise KeyError(ref)
    node = root
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node[part]
        elif isinstance(node, list):
            node = node[int(part)]
        else:
            raise KeyError(ref)
    return node


def schema_problems(schema: Any, path: str = "schema", root: Any = None) -> list[str]:
    """Problems that make ``schema`` unusable with this validator (checked when compiling)."""
    root = schema if root is None else root
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, dict):
        return [f"{path}: a schema must be an object or a boolean, got {_type_of(schema)}"]
    problems: list[str] = []
    for key, value in schema.items():
        where = f"{path}.{key}"
        if key not in _KEYWORDS:
            problems.append(f"{where}: unsupported keyword (supported: {', '.join(sorted(_KEYWORDS - _ANNOTATIONS))})")
        elif key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                problems.append(f"{where}: must be an object of schemas")
                continue
            for name, sub in value.items():
                if key == "patternProperties":
                    try:
                        re.compile(name)
                    except re.error as exc:
                        problems.append(f"{where}: invalid pattern {name!r}: {exc}")
                problems.extend(schema_problems(sub, _at(where, name), root))
        elif key in _SUBSCHEMA:
            problems.extend(schema_problems(value, where, root))
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                problems.append(f"{where}: must be a non-empty array of schemas")
                continue
            for i, sub in enumerate(value):
                problems.extend(schema_problems(sub, f"{where}[{i}]", root))
        elif key in _COUNTS:
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                problems.append(f"{where}: must be a non-negative integer")
        elif key in _NUMBERS:
            if _type_of(value) not in ("integer", "number") or (key == "multipleOf" and value <= 0):
                problems.append(f"{where}: must be a number" + (" > 0" if key == "multipleOf" else ""))
        elif key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or any(n not in _TYPES for n in names):
                problems.append(f"{where}: must be one of {', '.join(_TYPES)} (or a list of them)")
        elif key == "enum":
            if not isinstance(value, list) or not value:
                problems.append(f"{where}: must be a non-empty array")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{where}: must be an array of property names")
        elif key == "dependentRequired":
            if not isinstance(value, dict) or not all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in value.values()
            ):
                problems.append(f"{where}: must map property names to arrays of property names")
        elif key == "uniqueItems":
            if not isinstance(value, bool):
                problems.append(f"{where}: must be true or false")
        elif key == "pattern":
            try:
                re.compile(value)
            except (re.error, TypeError) as exc:
                problems.append(f"{where}: invalid pattern {value!r}: {exc}")
        elif key == "$ref":
            try:
                _resolve_ref(root, value)
            except (KeyError, IndexError, ValueError, TypeError):
                problems.append(f"{where}: cannot resolve {value!r} (only local references like '#/$defs/x')")
    return problems


def validate_instance(schema: Any, instance: Any, root: Any = None, path: str = "$", depth: int = 0) -> list[str]:
    """Problems of ``instance`` against ``schema``, each ``"<path>: <problem>"``."""
    root = schema if root is None else root
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    if not isinstance(schema, dict):
        return []
    if depth > _MAX_DEPTH:
        return [f"{path}: schema nesting too deep (a $ref loop?)"]
    errors: list[str] = []

    def sub(s: Any, value: Any, where: str) -> list[str]:
        return validate_instance(s, value, root, where, depth + 1)

    if "$ref" in schema:
        try:
            target = _resolve_ref(root, schema["$ref"])
        except (KeyError, IndexError, ValueError, TypeError):
            return [f"{path}: schema reference {schema['$ref']!r} cannot be resolved"]
        errors.extend(sub(target, instance, path))

    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(instance, n) for n in names):
            # Nothing else is checked: the other problems would only repeat this one.
            return [*errors, f"{path}: expected {' or '.join(names)}, got {_type_of(instance)}"]
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: must be {_show(schema['const'])}, got {_show(instance)}")
    if "enum" in schema and not any(_json_equal(instance, v) for v in schema["enum"]):
        allowed = ", ".join(_show(v) for v in schema["enum"])
        errors.append(f"{path}: {_show(instance)} is not one of {allowed}")

    if isinstance(instance, dict):
        errors.extend(_validate_object(schema, instance, path, sub))
    elif isinstance(instance, list):
        errors.extend(_validate_array(schema, instance, path, sub))
    elif isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {_show(instance)} does not match the pattern {schema['pattern']}")
    elif _type_of(instance) in ("integer", "number"):
        errors.extend(_validate_number(schema, instance, path))

    for part in schema.get("allOf", []):
        errors.extend(sub(part, instance, path))
    if "anyOf" in schema:
        branches = [sub(part, instance, path) for part in schema["anyOf"]]
        if all(branches):
            errors.append(f"{path}: matches none of the anyOf alternatives (first: {branches[0][0]})")
    if "oneOf" in schema:
        branches = [sub(part, instance, path) for part in schema["oneOf"]]
        matched = sum(1 for b in branches if not b)
        if matched == 0:
            errors.append(f"{path}: matches none of the oneOf alternatives (first: {branches[0][0]})")
        elif matched > 1:
            errors.append(f"{path}: matches {matched} of the oneOf alternatives, exactly one is allowed")
    if "not" in schema and not sub(schema["not"], instance, path):
        errors.append(f"{path}: must not match the 'not' schema")
    if "if" in schema:
        branch = "then" if not sub(schema["if"], instance, path) else "else"
        if branch in schema:
            errors.extend(sub(schema[branch], instance, path))
    return errors


def _validate_number(schema: dict[str, Any], value: float, path: str) -> list[str]:
    errors: list[str] = []
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{path}: {_show(value)} is less than the minimum {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{path}: {_show(value)} is greater than the maximum {schema['maximum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{path}: {_show(value)} must be greater than {schema['exclusiveMinimum']}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        errors.append(f"{path}: {_show(value)} must be less than {schema['exclusiveMaximum']}")
    if "multipleOf" in schema:
        quotient = value / schema["multipleOf"]
        if not (math.isfinite(quotient) and abs(quotient - round(quotient)) < 1e-9):
            errors.append(f"{path}: {_show(value)} is not a multiple of {schema['multipleOf']}")
    return errors


def _validate_object(schema: dict[str, Any], value: dict[str, Any], path: str, sub: _Sub) -> list[str]:
    errors: list[str] = []
    properties: dict[str, Any] = schema.get("properties", {})
    patterns: dict[str, Any] = schema.get("patternProperties", {})
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{path}: missing required property '{name}'")
    for name, needs in schema.get("dependentRequired", {}).items():
        if name in value:
            errors.extend(
                f"{path}: '{need}' is required when '{name}' is present" for need in needs if need not in value
            )
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        errors.append(f"{path}: fewer than {schema['minProperties']} properties")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(f"{path}: more than {schema['maxProperties']} properties")
    for name, item in value.items():
        where = _at(path, name)
        if "propertyNames" in schema:
            errors.extend(sub(schema["propertyNames"], name, f"{where} (name)"))
        matched = False
        if name in properties:
            matched = True
            errors.extend(sub(properties[name], item, where))
        for pattern, pschema in patterns.items():
            if re.search(pattern, name):
                matched = True
                errors.extend(sub(pschema, item, where))
        if not matched and "additionalProperties" in schema:
            extra = schema["additionalProperties"]
            if extra is False:
                known = ", ".join(properties) if properties else "none"
                errors.append(f"{where}: unexpected property (allowed: {known})")
            else:
                errors.extend(sub(extra, item, where))
    return errors


def _validate_array(schema: dict[str, Any], value: list[Any], path: str, sub: _Sub) -> list[str]:
    errors: list[str] = []
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(f"{path}: fewer than {schema['minItems']} items")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(f"{path}: more than {schema['maxItems']} items")
    prefix: list[Any] = schema.get("prefixItems", [])
    for i, item in enumerate(value):
        if i < len(prefix):
            errors.extend(sub(prefix[i], item, f"{path}[{i}]"))
        elif "items" in schema:
            errors.extend(sub(schema["items"], item, f"{path}[{i}]"))
    if schema.get("uniqueItems"):
        for i, item in enumerate(value):
            first = next((j for j in range(i) if _json_equal(value[j], item)), None)
            if first is not None:
                errors.append(f"{path}[{i}]: duplicate of {path}[{first}]")
    if "contains" in schema:
        hits = sum(1 for item in value if not sub(schema["contains"], item, path))
        low = schema.get("minContains", 1)
        high = schema.get("maxContains")
        if hits < low or (high is not None and hits > high):
            errors.append(
                f"{path}: {hits} items match 'contains' (need at least {low}"
                + (f", at most {high})" if high is not None else ")")
            )
    return errors


# --- parsing and checking a plan ----------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_plan_text(content: str) -> tuple[Any, list[str]]:
    """The JSON value in an answer (bare, or in a ```json fenced block), or the problem."""
    text = content.strip()
    if not text:
        return None, ["$: the answer is empty; expected a JSON plan"]
    fenced = _FENCE.findall(text)
    problem = ""
    for candidate in [text, *fenced]:
        try:
            return json.loads(candidate, parse_constant=_no_constant), []
        except json.JSONDecodeError as exc:
            problem = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        except ValueError as exc:
            problem = str(exc)
        except RecursionError:
            problem = "nested too deeply"
    where = " (in the fenced block)" if fenced else ""
    return None, [f"$: the answer is not JSON{where}: {problem}"]


def validate_plan(
    plan: Any,
    *,
    agents: Sequence[str],
    max_steps: int,
    extra_schema: dict[str, Any] | None = None,
) -> list[str]:
    """Every problem of ``plan``: schema, the extra schema, then the constraints.

    The constraints are checked on whatever parts have the right shape, so one repair
    round can fix everything at once.
    """
    errors = validate_instance(PLAN_SCHEMA, plan)
    if extra_schema is not None:
        errors.extend(validate_instance(extra_schema, plan))
    raw_steps = plan.get("steps") if isinstance(plan, dict) else None
    if not isinstance(raw_steps, list):
        return _cap(errors)
    if len(raw_steps) > max_steps:
        errors.append(f"$.steps: {len(raw_steps)} steps, but at most {max_steps} are allowed (max_steps)")
    available = set(agents)
    first_at: dict[str, int] = {}
    for i, step in enumerate(raw_steps):
        if not isinstance(step, dict):
            continue
        name = step.get("name")
        if isinstance(name, str):
            if name.startswith("__"):
                errors.append(f"$.steps[{i}].name: names starting with '__' are reserved")
            if name in first_at:
                errors.append(f"$.steps[{i}].name: duplicate step name '{name}' (also $.steps[{first_at[name]}].name)")
            else:
                first_at[name] = i
        agent = step.get("agent")
        if isinstance(agent, str) and agent not in available:
            listed = ", ".join(agents) if agents else "none"
            errors.append(f"$.steps[{i}].agent: '{agent}' is not an available agent (available: {listed})")
    deps: dict[str, list[str]] = {}
    for i, step in enumerate(raw_steps):
        if not isinstance(step, dict):
            continue
        depends_on = step.get("depends_on", [])
        known: list[str] = []
        for j, dep in enumerate(depends_on if isinstance(depends_on, list) else []):
            if not isinstance(dep, str):
                continue
            if dep not in first_at:
                errors.append(f"$.steps[{i}].depends_on[{j}]: unknown step '{dep}'")
            else:
                known.append(dep)
        if isinstance(step.get("name"), str):
            deps.setdefault(step["name"], known)
    errors.extend(f"$.steps: {cycle_text(cycle)}" for cycle in find_cycles(list(first_at), deps))
    if not errors:
        try:
            canonicalize_portable(plan)
        except CanonicalizationError as exc:
            errors.append(f"$: {exc.message}")
    return _cap(errors)


def _cap(errors: list[str]) -> list[str]:
    if len(errors) <= MAX_ERRORS:
        return errors
    return [*errors[:MAX_ERRORS], f"... and {len(errors) - MAX_ERRORS} more problems"]


def _agent_line(name: str, spec: Any) -> str:
    def field(key: str) -> Any:
        if isinstance(spec, Mapping):
            found = spec.get(key)
            config = spec.get("config")
        else:
            found = getattr(spec, key, None)
            config = getattr(spec, "config", None)
        if found is None and isinstance(config, Mapping):
            found = config.get(key)
        return found

    line = f"- {name} (type: {field('type') or 'unknown'})"
    for key in ("description", "role"):
        value = field(key)
        if isinstance(value, str) and value.strip():
            line += f"; {key}: {value.strip()}"
    return line


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_CONTEXT_CHARS else text[:_MAX_CONTEXT_CHARS] + " ...(truncated)"


class LlmPlanner(PlannerImpl):
    """A plan written by a model at run time, checked, then executed as a DAG."""

    def __init__(self, pspec: LlmPlannerSpec, agents: Mapping[str, Any], checks: Checks, loc: str = "planner") -> None:
        self._pspec = pspec
        self._agents = agents
        if pspec.agents is None:
            self._allowed = [name for name in agents if not name.startswith("__")]
        else:
            self._allowed = list(dict.fromkeys(pspec.agents))
            for i, name in enumerate(pspec.agents):
                if name not in agents:
                    checks.add(f"{loc}.agents.{i}", f"unknown agent '{name}'")
        if not self._allowed:
            checks.add(f"{loc}.agents", "the planner needs at least one agent to plan with")
        if pspec.plan_schema is not None:
            for problem in schema_problems(pspec.plan_schema, f"{loc}.schema"):
                where, _, msg = problem.partition(": ")
                checks.add(where, msg)
        if pspec.output is not None:
            checks.mapping(f"{loc}.output", pspec.output)
        self._inline_agent = planner_agent_spec(pspec)
        self._dags: dict[bytes, DagPlanner] = {}
        self._lock = threading.Lock()

    # --- prompts -------------------------------------------------------------------------

    def prompt_schema(self) -> dict[str, Any]:
        """PLAN_SCHEMA narrowed to this planner's agents and step limit (what the model sees)."""
        step = PLAN_SCHEMA["properties"]["steps"]
        item = step["items"]
        narrowed_item = {**item, "properties": {**item["properties"], "agent": {"enum": self._allowed}}}
        narrowed_steps = {**step, "maxItems": self._pspec.max_steps, "items": narrowed_item}
        return {**PLAN_SCHEMA, "properties": {**PLAN_SCHEMA["properties"], "steps": narrowed_steps}}

    def messages(self, run_input: Any, variables: Mapping[str, Any], failure: str | None) -> list[dict[str, str]]:
        """The first planning request's messages (pure: a replay rebuilds the same text)."""
        pspec = self._pspec
        # Sorted keys: the run input may come back from the database with its keys reordered.
        input_json = json.dumps(run_input, sort_keys=True, ensure_ascii=False)
        goal = (
            run_input["goal"] if isinstance(run_input, dict) and isinstance(run_input.get("goal"), str) else input_json
        )
        schema_text = json.dumps(self.prompt_schema(), ensure_ascii=False)
        if pspec.plan_schema is not None:
            extra = json.dumps(pspec.plan_schema, ensure_ascii=False)
            schema_text += f"\n\nThe plan must also match this JSON schema:\n{extra}"
        outputs = variables.get("outputs") or {}
        values = {
            "goal": goal,
            "input": input_json,
            "agents": "\n".join(_agent_line(n, self._agents.get(n)) for n in self._allowed),
            "max_steps": str(pspec.max_steps),
            "schema": schema_text,
            "failure": failure or "",
            "state": _clip(json.dumps(outputs, sort_keys=True, ensure_ascii=False)),
        }
        template = pspec.template if pspec.template is not None else DEFAULT_TEMPLATE
        used: set[str] = set()

        def fill(match: re.Match[str]) -> str:
            key = match.group(1) or match.group(2)
            used.add(key)
            return values[key]

        # One pass: text filled in (the schema, the input) is never scanned again.
        user = _PLACEHOLDER.sub(fill, template)
        if failure and "failure" not in used:
            user += f"\n\nAn earlier plan for this run failed: {_clip(failure)}\nPlan around that failure."
            if outputs and "state" not in used:
                user += f"\nOutputs of the steps that already ran (JSON): {values['state']}"
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]

    def _request(self, seq: int, messages: list[dict[str, str]]) -> StepRequest:
        payload = {
            "messages": messages,
            "model": self._pspec.model.model_dump(mode="json"),
            "response_format": "json",
        }
        return StepRequest(seq, PLAN_STATE, PLANNER_AGENT, payload, inline_agent=self._inline_agent)

    # --- the plan's DAG ------------------------------------------------------------------

    def _dag(self, plan: dict[str, Any]) -> tuple[DagPlanner | None, list[str]]:
        key = canonicalize(plan)
        with self._lock:
            found = self._dags.get(key)
        if found is not None:
            return found, []
        pspec = self._pspec
        try:
            steps = {
                s["name"]: DagStep(
                    name=s["name"],
                    agent=s["agent"],
                    description=s.get("description"),
                    depends_on=list(s.get("depends_on", [])),
                )
                for s in plan["steps"]
            }
        except ValidationError as exc:
            return None, [f"$.steps: {err['msg']}" for err in exc.errors(include_url=False)]
        checks = Checks()
        dag = DagPlanner.from_plan(
            steps,
            self._agents,
            checks,
            inputs={s["name"]: s["input"] for s in plan["steps"] if "input" in s},
            max_concurrency=pspec.max_concurrency,
            max_steps=_PLAN_SEQ_GUARD,
            success_policy="final_node" if plan.get("on_failure") == "continue" else "all_nodes",
            on_failure=pspec.on_failure if pspec.on_failure.policy == "conservative" else None,
            output=pspec.output,
        )
        if checks.errors:
            return None, [f"{e['loc']}: {e['msg']}" for e in checks.errors]
        with self._lock:
            if key not in self._dags and len(self._dags) >= _CACHE_SIZE:
                del self._dags[next(iter(self._dags))]
            self._dags[key] = dag
        return dag, []

    def _plan_dag(self, state: Mapping[str, Any]) -> DagPlanner:
        dag, errors = self._dag(state["plan"])
        if dag is None:
            # The plan compiled when it was accepted, and compiling is deterministic.
            raise RuntimeError(f"accepted plan no longer compiles: {errors}")
        return dag

    # --- events --------------------------------------------------------------------------

    def begin(
        self,
        run_input: Any,
        now_ms: int,
        seq0: int,
        variables: dict[str, Any],
        failure: str | None,
    ) -> Decision:
        seq = seq0 + 1
        state: dict[str, Any] = {
            "seq": seq,
            "vars": variables,
            "phase": "planning",
            "attempt": 1,
            "plan_seq": seq,
            "failure": failure,
            "plan": None,
            "errors": [],
            "fallback_wanted": False,
        }
        return Decision(state=state, dispatch=[self._request(seq, self.messages(run_input, variables, failure))])

    def on_result(self, state: dict[str, Any], result: StepResult, run_input: Any, now_ms: int) -> Decision:
        phase = state.get("phase")
        if phase == "executing":
            return self._plan_dag(state).on_result(state, result, run_input, now_ms)
        if phase != "planning" or result.seq != state.get("plan_seq"):
            return Decision(state=state, ignored=True)
        if result.status != "succeeded":
            return self._reject(state, [f"the planning step {result.status}: {result.error or 'no error message'}"])

        output = result.output
        content = output.get("content") if isinstance(output, dict) else None
        if isinstance(content, str):
            plan, errors = parse_plan_text(content)
        else:
            plan, errors = None, ['$: the planning step returned no text (expected {"content": "<answer>"})']
            content = json.dumps(output, ensure_ascii=False)
        if not errors:
            errors = validate_plan(
                plan,
                agents=self._allowed,
                max_steps=self._pspec.max_steps,
                extra_schema=self._pspec.plan_schema,
            )
        dag: DagPlanner | None = None
        if not errors:
            dag, errors = self._dag(plan)
        if errors or dag is None:
            if int(state.get("attempt", 1)) > REPAIRS:
                return self._reject(state, errors)
            return self._repair(state, content, errors, run_input)

        started = dag.begin(run_input, now_ms, int(state["seq"]), state["vars"], None)
        new_state = {**state, **started.state, "phase": "executing", "plan_seq": None, "plan": plan, "errors": []}
        return Decision(
            state=new_state,
            dispatch=started.dispatch,
            outcome=started.outcome,
            cancel=started.cancel,
            wake_at_ms=started.wake_at_ms,
        )

    def on_timer(self, state: dict[str, Any], run_input: Any, now_ms: int) -> Decision:
        if state.get("phase") == "executing":
            return self._plan_dag(state).on_timer(state, run_input, now_ms)
        return Decision(state=state, ignored=True)

    def _repair(self, state: dict[str, Any], answer: str, errors: list[str], run_input: Any) -> Decision:
        seq = int(state["seq"]) + 1
        listing = "\n".join(f"- {e}" for e in errors)
        messages = [
            *self.messages(run_input, state["vars"], state.get("failure")),
            {"role": "assistant", "content": answer},
            {
                "role": "user",
                "content": f"Your plan was rejected:\n{listing}\n\n"
                "Reply with the corrected plan: one JSON object matching the schema, and nothing else.",
            },
        ]
        new_state = {
            **state,
            "seq": seq,
            "attempt": int(state.get("attempt", 1)) + 1,
            "plan_seq": seq,
            "errors": errors,
        }
        return Decision(state=new_state, dispatch=[self._request(seq, messages)])

    @staticmethod
    def _reject(state: dict[str, Any], errors: list[str]) -> Decision:
        new_state = {**state, "phase": "rejected", "plan_seq": None, "errors": errors, "fallback_wanted": True}
        return Decision(state=new_state, outcome=RunOutcome("failed", None, "LLM plan rejected: " + "; ".join(errors)))
