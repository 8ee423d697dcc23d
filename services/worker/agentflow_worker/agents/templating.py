"""Filling ``{input.field}`` placeholders from a step: URLs, headers, SQL parameters, prompts.

The grammar (``agentflow_core.templating``, shared with the preflight cost model) is
deliberately small and strict, like :meth:`str.format`:

* ``{path}`` where ``path`` is dot-separated segments of ``[A-Za-z0-9_-]``: the first
  segment names a key of the scope (``input``, ``last``, or a top-level key of the input,
  AgentMap style); the others walk dict keys and list indices (``{input.items.0}``).
* ``{{`` and ``}}`` are literal braces. Any other brace is an error naming its position,
  so a JSON example pasted into a prompt fails loudly instead of rendering half-filled.

Strings are inserted as they are; every other value as JSON (``true``, ``null``,
``{"a": 1}``), so what a template produces does not depend on Python's ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from agentflow_core.templating import TemplateSyntaxError, parse_template, placeholder_text, value_text
from agentflow_worker.agents.base import AgentError

if TYPE_CHECKING:
    from agentflow_worker.agents.base import StepContext


@dataclass(frozen=True, slots=True)
class _Field:
    path: tuple[str, ...]

    @property
    def text(self) -> str:
        return placeholder_text(self.path)


_Part = str | _Field


@lru_cache(maxsize=1024)
def _parse(template: str) -> tuple[_Part, ...]:
    try:
        parts = parse_template(template)
    except TemplateSyntaxError as exc:
        raise AgentError(str(exc)) from None
    return tuple(p if isinstance(p, str) else _Field(p) for p in parts)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _lookup(field: _Field, scope: dict[str, Any]) -> Any:
    head = field.path[0]
    if head not in scope:
        keys = ", ".join(sorted(str(k) for k in scope)) or "(none)"
        raise AgentError(f"template placeholder {field.text}: no field '{head}'; available top-level keys: {keys}")
    value = scope[head]
    for depth, segment in enumerate(field.path[1:], start=1):
        where = ".".join(field.path[:depth])
        if isinstance(value, dict):
            if segment not in value:
                keys = ", ".join(sorted(str(k) for k in value)) or "(none)"
                raise AgentError(
                    f"template placeholder {field.text}: '{where}' has no field '{segment}'; its keys: {keys}"
                )
            value = value[segment]
        elif isinstance(value, list):
            if not segment.isdigit():
                raise AgentError(f"template placeholder {field.text}: '{where}' is a list; '{segment}' is not an index")
            index = int(segment)
            if index >= len(value):
                raise AgentError(
                    f"template placeholder {field.text}: index {index} is out of range ('{where}' has "
                    f"{len(value)} items)"
                )
            value = value[index]
        else:
            raise AgentError(
                f"template placeholder {field.text}: '{where}' is {_kind(value)}, which has no field '{segment}'"
            )
    return value


def render(template: str, scope: dict[str, Any], *, url_quote: bool = False) -> str:
    """Fill every placeholder of ``template`` from ``scope``.

    ``url_quote=True`` percent-encodes each substituted value (``/`` and ``?`` included),
    so a value can never change which host, path or query a URL template points at.
    """
    out: list[str] = []
    for part in _parse(template):
        if isinstance(part, str):
            out.append(part)
            continue
        text = value_text(_lookup(part, scope))
        out.append(quote(text, safe="") if url_quote else text)
    return "".join(out)


def render_value(obj: Any, scope: dict[str, Any]) -> Any:
    """Render every string inside ``obj`` (dicts and lists walked; keys left alone).

    A string that is exactly one placeholder becomes the value itself, keeping its JSON
    type: ``"{input.count}"`` gives ``3``, not ``"3"``.
    """
    if isinstance(obj, str):
        parts = _parse(obj)
        if len(parts) == 1 and isinstance(parts[0], _Field):
            return _lookup(parts[0], scope)
        return render(obj, scope)
    if isinstance(obj, dict):
        return {k: render_value(v, scope) for k, v in obj.items()}
    if isinstance(obj, list):
        return [render_value(v, scope) for v in obj]
    return obj


def placeholders(template: str) -> list[str]:
    """The placeholders of ``template`` as written (``["{input.a}", ...]``); raises on bad braces."""
    return [p.text for p in _parse(template) if isinstance(p, _Field)]


def step_scope(ctx: StepContext) -> dict[str, Any]:
    """What a step's templates see: ``input``, ``last`` and the input's top-level keys.

    ``input`` and ``last`` win over input keys of the same name, so ``{input.x}`` always
    means the step input whatever fields it carries.
    """
    data = ctx.input
    scope: dict[str, Any] = dict(data) if isinstance(data, dict) else {}
    scope["input"] = data
    scope["last"] = ctx.last
    return scope
