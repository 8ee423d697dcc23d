"""Custom agent types from installed packages: the ``agentflow.agents`` entry-point group.

A package declares::

    [project.entry-points."agentflow.agents"]
    sentiment = "my_agents.sentiment:SentimentAgent"

and the type ``sentiment`` becomes usable in workflows. The control plane reads only the
names (and the class's optional ``Config`` pydantic model, to validate settings at
registration); workers import and instantiate the classes. Install the package where both
run, as with Celery's task modules.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel

GROUP = "agentflow.agents"


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def plugin_types() -> frozenset[str]:
    return frozenset(_entry_points())


def load_plugin(type_name: str) -> Any:
    """The class (or factory) registered for ``type_name``; KeyError when none is."""
    return _entry_points()[type_name].load()


def plugin_config(type_name: str) -> type[BaseModel] | None:
    cls = load_plugin(type_name)
    config = getattr(cls, "Config", None)
    return config if isinstance(config, type) and issubclass(config, BaseModel) else None


def refresh() -> None:
    """Forget the cached entry points (after installing a plugin in a running process; tests)."""
    _entry_points.cache_clear()
