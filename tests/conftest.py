from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import Api, Cluster
from tests.support.services import Services, TestEnv


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    found = Services.discover()
    yield found
    found.close()


@pytest.fixture
def make_env(services: Services) -> Iterator[object]:
    """Factory for extra isolated installations (fresh database + NATS prefix)."""
    created: list[TestEnv] = []

    def factory() -> TestEnv:
        env = TestEnv.create(services)
        created.append(env)
        return env

    yield factory
    for env in created:
        env.destroy()


@pytest.fixture(scope="session")
def shared_env(services: Services) -> Iterator[TestEnv]:
    env = TestEnv.create(services)
    yield env
    env.destroy()


@pytest.fixture(scope="session")
def cluster(shared_env: TestEnv) -> Iterator[tuple[Cluster, str]]:
    """One control plane and two workers shared by the API and engine tests."""
    c = Cluster(shared_env)
    try:
        _, url = c.control_plane()
        c.worker(name="shared-1", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        c.worker(name="shared-2", AGENTFLOW_WORKER_STARTED_NOTICE_MS="0")
        yield c, url
    finally:
        c.close()


@pytest.fixture
def api(cluster: tuple[Cluster, str], shared_env: TestEnv, request: pytest.FixtureRequest) -> Api:
    """A client for a tenant of its own, so tests never see each other's data."""
    import re

    tenant = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:48] + "-" + __import__("secrets").token_hex(3)
    return Api(cluster[1], shared_env, tenant)
