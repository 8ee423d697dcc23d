"""Where an LLM agent's ``system`` and ``prompt`` texts come from, and how they are filled.

A setting is either the template itself or a reference to one:

* ``prompt:NAME`` — an entry of the prompt registry, a YAML mapping ``name: text`` in
  the file named by ``AGENTFLOW_PROMPTS_FILE``;
* ``file:path`` — the whole file;
* ``yaml:path#key.sub`` — one string inside a YAML file.

Paths are relative to ``AGENTFLOW_PROMPTS_DIR`` (default: the working directory) and must
stay inside it: a workflow author chooses them, the worker's filesystem is not theirs to
read. A reference is the whole setting and has no spaces, so an ordinary prompt that
happens to begin with "prompt: ..." is still just a template.

The text is then filled from the step (``{input.field}``, ``{last.field}``, ``{field}``
for a top-level input key) by :mod:`agentflow_worker.agents.templating`. Files are read
once and cached until their modification time changes.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any

import yaml

from agentflow_worker.agents import templating
from agentflow_worker.agents.base import AgentError, StepContext

PROMPTS_FILE_ENV = "AGENTFLOW_PROMPTS_FILE"
PROMPTS_DIR_ENV = "AGENTFLOW_PROMPTS_DIR"

_REF = re.compile(r"^(?:prompt:(?P<name>[A-Za-z0-9_.\-/]+)|file:(?P<file>\S+)|yaml:(?P<yaml>[^\s#]+)#(?P<key>\S+))$")

_lock = threading.Lock()
# path -> (mtime_ns, size, parsed content)
_cache: dict[Path, tuple[int, int, Any]] = {}


class PromptError(AgentError):
    """A prompt reference or template that cannot be resolved; the message names it."""


def _load(path: Path, *, as_yaml: bool, what: str) -> Any:
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise PromptError(f"{what}: file '{path}' does not exist") from None
    except OSError as exc:
        raise PromptError(f"{what}: cannot read '{path}': {exc.strerror or exc}") from None
    if not path.is_file():
        raise PromptError(f"{what}: '{path}' is not a file")
    key = (stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _cache.get(path)
    if cached is not None and cached[:2] == key:
        return cached[2]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{what}: cannot read '{path}': {exc}") from None
    content: Any = text
    if as_yaml:
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PromptError(f"{what}: '{path}' is not valid YAML: {exc}") from None
    with _lock:
        _cache[path] = (key[0], key[1], content)
    return content


def prompts_dir() -> Path:
    return Path(os.environ.get(PROMPTS_DIR_ENV) or os.getcwd())


def _inside(relative: str, what: str) -> Path:
    """``relative`` under the prompts directory; refuses anything that would leave it."""
    base = prompts_dir().resolve()
    raw = Path(relative)
    if ".." in raw.parts:
        raise PromptError(f"{what}: path '{relative}' may not contain '..' (paths are relative to {PROMPTS_DIR_ENV})")
    candidate = (raw if raw.is_absolute() else base / raw).resolve()
    if not candidate.is_relative_to(base):
        raise PromptError(
            f"{what}: path '{relative}' is outside the prompts directory {base} (set {PROMPTS_DIR_ENV} to change it)"
        )
    return candidate


def _registry_entry(name: str, what: str) -> str:
    location = os.environ.get(PROMPTS_FILE_ENV)
    if not location:
        raise PromptError(
            f"{what}: 'prompt:{name}' needs a prompt registry, but {PROMPTS_FILE_ENV} is not set on the worker"
        )
    registry = _load(Path(location), as_yaml=True, what=f"{what} (prompt registry {PROMPTS_FILE_ENV})")
    if not isinstance(registry, dict):
        raise PromptError(f"{what}: the prompt registry '{location}' must be a YAML mapping of name to text")
    if name not in registry:
        known = ", ".join(sorted(str(k) for k in registry)[:20]) or "(none)"
        raise PromptError(f"{what}: unknown prompt '{name}' in the registry '{location}' (known: {known})")
    text = registry[name]
    if not isinstance(text, str):
        raise PromptError(f"{what}: prompt '{name}' in the registry '{location}' is not text")
    return text


def _yaml_entry(relative: str, key: str, what: str) -> str:
    value = _load(_inside(relative, what), as_yaml=True, what=what)
    walked: list[str] = []
    for segment in key.split("."):
        if isinstance(value, dict) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            where = ".".join(walked) or "(top level)"
            raise PromptError(f"{what}: '{relative}' has no key '{key}' ('{segment}' is missing under {where})")
        walked.append(segment)
    if not isinstance(value, str):
        raise PromptError(f"{what}: '{relative}#{key}' is not text")
    return value


def resolve_reference(setting: str, what: str = "prompt") -> str:
    """The template a setting stands for: the referenced text, or the setting itself.
    ``what`` names the setting in errors (``"agent 'x' system"``)."""
    match = _REF.match(setting.strip())
    if match is None:
        return setting
    if match["name"] is not None:
        return _registry_entry(match["name"], what)
    if match["file"] is not None:
        return str(_load(_inside(match["file"], what), as_yaml=False, what=what))
    return _yaml_entry(match["yaml"], match["key"], what)


def render_setting(setting: str, ctx: StepContext, what: str) -> str:
    """Resolve a ``system``/``prompt`` setting and fill its placeholders from the step."""
    template = resolve_reference(setting, what)
    try:
        return templating.render(template, templating.step_scope(ctx))
    except PromptError:
        raise
    except AgentError as exc:
        raise PromptError(f"{what}: {exc}") from None
