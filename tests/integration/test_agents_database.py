"""The database agent against the machine's real Postgres, in a database made for this module."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.database import DATABASE_AGENTS, check_statement, close_pools
from agentflow_worker.secrets import SecretStore
from agentflow_worker.services import WorkerServices
from tests.support.services import Services, _asyncpg_dsn, _with_database

AGENT = DATABASE_AGENTS["database"]
DUPLICATE = (
    'duplicate key value violates unique constraint "items_pkey" (Key (id)=(10) already exists.) [SQLSTATE 23505]'
)

SCHEMA = """
CREATE TABLE items (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(12, 2),
    created timestamptz,
    uid uuid,
    data bytea,
    doc jsonb,
    wait interval
);
CREATE SEQUENCE s;
CREATE FUNCTION add_item(n text) RETURNS int LANGUAGE sql VOLATILE AS
    $$ INSERT INTO items (id, name) VALUES (999, n) RETURNING id $$;
INSERT INTO items VALUES
    (1, 'apple', 0.10, '2024-05-01T12:30:00+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff', '{"k": [1, 2]}',
     '90 seconds'),
    (2, 'pear', 12345678.99, NULL, NULL, NULL, NULL, NULL),
    (3, 'fig', NULL, NULL, NULL, NULL, NULL, NULL);
"""


@pytest.fixture(scope="module")
async def dsn(services: Services) -> AsyncIterator[str]:
    name = f"agentflow_agents_db_{secrets.token_hex(4)}"
    admin = _asyncpg_dsn(services.admin_database_url)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = _asyncpg_dsn(_with_database(services.admin_database_url, name))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    yield url
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def worker(dsn: str) -> AsyncIterator[WorkerServices]:
    svc = WorkerServices(secrets=SecretStore(environ={"AGENTFLOW_SECRET_DB_REPORTS": dsn}), databases={"main": dsn})
    yield svc
    await close_pools(svc)


def step(worker: WorkerServices, config: dict[str, Any], data: Any = None) -> StepContext:
    return StepContext("acme", "run1", "q", 1, 1, 1, "query", config, {"input": data, "last": None}, [], worker)


async def query(worker: WorkerServices, sql: str, *params: Any, data: Any = None, **extra: Any) -> Any:
    config = {"connection": "main", "query": sql, "params": list(params), **extra}
    return await AGENT.run(step(worker, config, data))


async def scalar(dsn: str, sql: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def test_select_with_templated_params(worker: WorkerServices) -> None:
    out = await query(
        worker,
        "SELECT id, name FROM items WHERE name = $1 OR id = $2 ORDER BY id",
        "{input.name}",
        "{input.id}",
        data={"name": "pear", "id": 3},
    )
    assert out == {"rows": [{"id": 2, "name": "pear"}, {"id": 3, "name": "fig"}], "row_count": 2, "truncated": False}


async def test_values_are_made_json_safe(worker: WorkerServices) -> None:
    out = await query(worker, "SELECT * FROM items WHERE id IN (1, 2) ORDER BY id")
    first, second = out["rows"]
    assert first == {
        "id": 1,
        "name": "apple",
        "price": "0.10",  # Decimal as an exact string
        "created": "2024-05-01T12:30:00+00:00",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "data": base64.b64encode(b"\x00\xff").decode(),
        "doc": {"k": [1, 2]},
        "wait": 90.0,
    }
    assert second["price"] == "12345678.99"
    out = await query(worker, "SELECT 'NaN'::float8 AS f, ARRAY[1.5, 2]::numeric[] AS a, '10.0.0.0/8'::cidr AS net")
    assert out["rows"] == [{"f": "nan", "a": ["1.5", "2"], "net": "10.0.0.0/8"}]


async def test_jsonb_params_and_typed_params(worker: WorkerServices) -> None:
    out = await query(
        worker,
        "SELECT $1::jsonb -> 'a' AS a, $2::int + 1 AS n",
        "{input.doc}",
        "{input.n}",
        data={"doc": {"a": [1, "x"]}, "n": 41},
    )
    assert out["rows"] == [{"a": [1, "x"], "n": 42}]


async def test_injection_through_a_param_stays_data(worker: WorkerServices, dsn: str) -> None:
    for hostile in ("x' OR '1'='1", "'; DROP TABLE items; --", "1; DELETE FROM items"):
        out = await query(worker, "SELECT id FROM items WHERE name = $1", "{input.q}", data={"q": hostile})
        assert out["rows"] == []
    assert await scalar(dsn, "SELECT count(*) FROM items") == 3


async def test_multiple_statements_are_refused(worker: WorkerServices, dsn: str) -> None:
    for sql in ("SELECT 1; DROP TABLE items", "SELECT 1;\n-- comment\nDELETE FROM items;"):
        with pytest.raises(AgentError, match="more than one statement"):
            await query(worker, sql)
    with pytest.raises(AgentError, match="more than one statement"):
        await query(worker, "INSERT INTO items (id, name) VALUES (50, 'x'); DELETE FROM items", read_only=False)
    assert await scalar(dsn, "SELECT count(*) FROM items") == 3
    # semicolons inside literals, comments and a trailing one are fine
    out = await query(worker, "SELECT ';' AS a, $$;$$ AS b /* ; */ ; -- ;")
    assert out["rows"] == [{"a": ";", "b": ";"}]


async def test_escape_strings_are_lexed_like_postgres(worker: WorkerServices) -> None:
    out = await query(worker, r"SELECT E'a\';b' AS x")
    assert out["rows"] == [{"x": "a';b"}]


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM items",
        "update items set name = 'x'",
        "WITH gone AS (DELETE FROM items RETURNING *) SELECT * FROM gone",
        "SELECT * INTO TEMP copy FROM items",
        "SELECT * FROM items FOR UPDATE",
        "EXPLAIN ANALYZE DELETE FROM items",
        "EXPLAIN (ANALYZE, COSTS off) SELECT 1",
        "/* SELECT */ TRUNCATE items",
        "COPY items TO STDOUT",
        "SET statement_timeout = 0",
        "CALL something()",
    ],
)
async def test_writes_are_refused_by_the_allowlist(worker: WorkerServices, dsn: str, sql: str) -> None:
    with pytest.raises(AgentError, match="read_only: true"):
        await query(worker, sql)
    assert await scalar(dsn, "SELECT count(*) FROM items") == 3


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  -- leading comment\n/* nested /* block */ comment */ select 1",
        "(SELECT 1) UNION (SELECT 2)",
        "WITH a AS (SELECT 1) SELECT * FROM a",
        "VALUES (1), (2)",
        "SHOW search_path",
        "EXPLAIN SELECT * FROM items",
        'SELECT \'DELETE FROM items\' AS text, "update" FROM (SELECT 1 AS "update") t',
        "SELECT deleted_at FROM (SELECT 1 AS deleted_at) t",
    ],
)
def test_statement_allowlist_accepts_reads(sql: str) -> None:
    assert check_statement(sql, read_only=True) in {"SELECT", "WITH", "VALUES", "SHOW", "EXPLAIN"}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("", "empty"),
        ("-- only a comment", "empty"),
        ("SELECT 'open", "unterminated string literal"),
        ('SELECT "open', "unterminated quoted identifier"),
        ("SELECT $tag$ open", r"unterminated \$tag\$ string"),
        ("SELECT 1 /* open", "unterminated /"),
    ],
)
def test_statement_lexer_errors(sql: str, message: str) -> None:
    with pytest.raises(AgentError, match=message):
        check_statement(sql, read_only=True)


async def test_writes_through_functions_are_refused_by_the_read_only_transaction(
    worker: WorkerServices, dsn: str
) -> None:
    # both pass the text check; Postgres itself refuses them
    with pytest.raises(AgentError, match=r"tried to write in a read-only transaction .*nextval"):
        await query(worker, "SELECT nextval('s')")
    with pytest.raises(AgentError, match=r"tried to write in a read-only transaction .*INSERT"):
        await query(worker, "SELECT add_item($1)", "sneaky")
    assert await scalar(dsn, "SELECT count(*) FROM items WHERE id = 999") == 0
    assert await scalar(dsn, "SELECT last_value FROM s") == 1
    assert await scalar(dsn, "SELECT is_called FROM s") is False


async def test_read_only_false_can_write(worker: WorkerServices, dsn: str) -> None:
    out = await query(
        worker,
        "INSERT INTO items (id, name) VALUES ($1, $2), ($1 + 1, $2) RETURNING id",
        "{input.id}",
        "kiwi",
        data={"id": 10},
        read_only=False,
    )
    assert out == {"rows": [{"id": 10}, {"id": 11}], "row_count": 2, "truncated": False}
    out = await query(worker, "UPDATE items SET price = $1 WHERE name = 'kiwi'", 3, read_only=False)
    assert out["affected"] == 2 and out["command"] == "UPDATE 2" and out["rows"] == []
    # a failing write leaves nothing behind
    with pytest.raises(
        AgentError,
        match=re.escape(DUPLICATE) + "$",
    ):
        await query(worker, "INSERT INTO items (id, name) VALUES (20, 'a'), (10, 'dup')", read_only=False)
    assert await scalar(dsn, "SELECT count(*) FROM items WHERE id = 20") == 0
    out = await query(worker, "DELETE FROM items WHERE name = 'kiwi'", read_only=False)
    assert out["affected"] == 2
    assert await scalar(dsn, "SELECT count(*) FROM items") == 3


async def test_max_rows_truncates(worker: WorkerServices) -> None:
    out = await query(worker, "SELECT g FROM generate_series(1, 50) g", max_rows=10)
    assert out["row_count"] == 10 and out["truncated"] is True
    assert [r["g"] for r in out["rows"]] == list(range(1, 11))
    out = await query(worker, "SELECT g FROM generate_series(1, 50) g", max_rows=50)
    assert out["row_count"] == 50 and out["truncated"] is False


async def test_statement_timeout(worker: WorkerServices) -> None:
    started = time.monotonic()
    with pytest.raises(AgentError, match=r"ran longer than timeout_s=0\.5 and was cancelled"):
        await query(worker, "SELECT pg_sleep(5)", timeout_s=0.5)
    assert time.monotonic() - started < 3
    # the pooled connection is still usable afterwards
    assert (await query(worker, "SELECT 1 AS one"))["rows"] == [{"one": 1}]


async def test_connection_names_and_dsn_from_secret(worker: WorkerServices) -> None:
    with pytest.raises(AgentError) as info:
        await AGENT.run(step(worker, {"connection": "nope", "query": "SELECT 1"}))
    assert str(info.value) == (
        "database: connection 'nope' is not configured on this worker "
        "(no databases entry 'nope' and no secret 'DB_NOPE' for tenant 'acme')"
    )
    out = await AGENT.run(step(worker, {"connection": "reports", "query": "SELECT current_database() AS db"}))
    assert out["rows"][0]["db"].startswith("agentflow_agents_db_")


async def test_unreachable_database_is_a_clear_error() -> None:
    svc = WorkerServices(databases={"gone": "postgresql://postgres:hunter2@127.0.0.1:1/x"})
    try:
        with pytest.raises(AgentError) as info:
            await AGENT.run(step(svc, {"connection": "gone", "query": "SELECT 1", "timeout_s": 2}))
        assert "database 'gone'" in str(info.value)
        assert "hunter2" not in str(info.value)
    finally:
        await close_pools(svc)


async def test_parameter_mistakes_are_named(worker: WorkerServices) -> None:
    with pytest.raises(AgentError, match=r"has 2 placeholder\(s\) \(\$1..\$2\) but params has 1 value"):
        await query(worker, "SELECT $1::int + $2::int", 1)
    with pytest.raises(AgentError, match="bad parameter: invalid input for query argument \\$1"):
        await query(worker, "SELECT $1::int", "{input.n}", data={"n": "abc"})
    with pytest.raises(AgentError, match=r"template placeholder \{input.missing\}"):
        await query(worker, "SELECT $1::int", "{input.missing}", data={"n": 1})
    with pytest.raises(AgentError, match="connection: String should match pattern"):
        await AGENT.run(step(worker, {"connection": "bad name", "query": "SELECT 1"}))
    with pytest.raises(AgentError, match='relation "nothing" does not exist'):
        await query(worker, "SELECT * FROM nothing")


async def test_steps_share_a_pool_concurrently(worker: WorkerServices) -> None:
    outs = await asyncio.gather(*(query(worker, "SELECT $1::int AS n, pg_sleep(0.1)", i) for i in range(8)))
    assert sorted(o["rows"][0]["n"] for o in outs) == list(range(8))
    pools = worker.shared["database.pools"]
    assert len(pools) == 1  # one pool per DSN: "main" and "reports" (from the secret) name the same one
