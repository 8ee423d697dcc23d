"""Named secrets, looked up per tenant: agents and tools name them, never hold them.

Two sources, checked in order:

1. ``AGENTFLOW_SECRETS_DIR`` (a mounted Kubernetes Secret or a directory): the file
   ``<dir>/<tenant>/<NAME>`` for that tenant only, then ``<dir>/_shared/<NAME>``.
2. Environment variables ``AGENTFLOW_SECRET_<NAME>``: shared by every tenant (dev, or a
   single-tenant install).

A missing secret is a :class:`MissingSecret` naming it (never a KeyError), so the step
fails with a reason the user can act on.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from agentflow_worker.agents.base import AgentError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class MissingSecret(AgentError):
    pass


class SecretStore:
    def __init__(self, directory: str | Path | None = None, environ: dict[str, str] | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self.environ = os.environ if environ is None else environ

    def get(self, tenant: str, name: str) -> str:
        if not _NAME.match(name):
            raise MissingSecret(f"'{name}' is not a valid secret name")
        if self.directory is not None:
            for scope in (tenant, "_shared"):
                path = self.directory / scope / name
                if path.is_file():
                    return path.read_text().strip()
        value = self.environ.get(f"AGENTFLOW_SECRET_{name}")
        if value is None:
            raise MissingSecret(f"secret '{name}' is not configured for tenant '{tenant}' on this worker")
        return value
