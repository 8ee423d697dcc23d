"""The ``{input.field}`` template grammar, shared by the worker (which fills templates) and
the preflight cost model (which fills what it can before a run).

* ``{path}`` where ``path`` is dot-separated segments of ``[A-Za-z0-9_-]``;
* ``{{`` and ``}}`` are literal braces; any other brace is an error naming its position.

Strings are inserted as they are; every other value as compact JSON.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

_SEGMENT = r"[A-Za-z0-9_-]+"
_PLACEHOLDER = re.compile(rf"\{{({_SEGMENT}(?:\.{_SEGMENT})*)\}}")

#: literal text, or the path of a placeholder
TemplatePart = str | tuple[str, ...]


class TemplateSyntaxError(ValueError):
    pass


@lru_cache(maxsize=1024)
def parse_template(template: str) -> tuple[TemplatePart, ...]:
    """Literal text and placeholder paths, in order; raises :class:`TemplateSyntaxError`."""
    parts: list[TemplatePart] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if ch == "{":
            if template.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            match = _PLACEHOLDER.match(template, i)
            if match is None:
                raise TemplateSyntaxError(
                    f"template: '{{' at position {i} does not start a placeholder like {{input.field}} "
                    f"(near {template[i : i + 30]!r}); write '{{{{' for a literal brace"
                )
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(tuple(match.group(1).split(".")))
            i = match.end()
        elif ch == "}":
            if template.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateSyntaxError(f"template: unmatched '}}' at position {i}; write '}}}}' for a literal brace")
        else:
            nxt = min((p for p in (template.find("{", i), template.find("}", i)) if p != -1), default=n)
            literal.append(template[i:nxt])
            i = nxt
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def placeholder_text(path: tuple[str, ...]) -> str:
    """A placeholder as written: ``("input", "a")`` -> ``{input.a}``."""
    return "{" + ".".join(path) + "}"


def value_text(value: Any) -> str:
    """What a filled placeholder inserts: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
