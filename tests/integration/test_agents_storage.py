"""Storage agents on the real filesystem: formats, atomic writes, caps and confinement."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agentflow_worker.agents.base import AgentError, StepContext
from agentflow_worker.agents.storage import STORAGE_AGENTS
from agentflow_worker.services import WorkerServices


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "workspace"


@pytest.fixture
def worker(root: Path) -> WorkerServices:
    return WorkerServices(workspace_root=root)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the workspace, with a file nobody may read or overwrite through it."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_text("top secret")
    return d


async def run(
    worker: WorkerServices, agent: str, config: dict[str, Any], data: Any = None, tenant: str = "acme"
) -> Any:
    ctx = StepContext(tenant, "run1", "s", 1, 1, 1, agent, config, {"input": data, "last": None}, [], worker)
    return await STORAGE_AGENTS[agent].run(ctx)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*.tmp"))


async def test_json_round_trip_in_a_private_tenant_root(worker: WorkerServices, root: Path) -> None:
    doc = {"a": [1, 2, {"b": None}], "name": "Zoë"}
    out = await run(worker, "json_writer", {"path": "reports/{input.day}/summary.json"}, {"day": "2024-05-01", **doc})
    assert out == {"path": "reports/2024-05-01/summary.json", "bytes": out["bytes"]}
    written = root / "acme" / "reports" / "2024-05-01" / "summary.json"
    assert out["bytes"] == written.stat().st_size > 0
    assert json.loads(written.read_text()) == {"day": "2024-05-01", **doc}
    assert stat.S_IMODE((root / "acme").stat().st_mode) == 0o700
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert await run(worker, "json_reader", {"path": "reports/2024-05-01/summary.json"}) == {"day": "2024-05-01", **doc}
    assert leftovers(root) == []


async def test_writer_data_setting_is_templated(worker: WorkerServices, root: Path) -> None:
    config = {"path": "out.json", "data": {"total": "{input.n}", "label": "n={input.n}"}}
    await run(worker, "json_writer", config, {"n": 4})
    assert json.loads((root / "acme" / "out.json").read_text()) == {"total": 4, "label": "n=4"}


async def test_csv_write_union_header_and_read_back(worker: WorkerServices, root: Path) -> None:
    rows = [{"id": 1, "name": "apple"}, {"id": 2, "ok": True, "meta": {"k": 1}}, {"name": None, "id": 3}]
    out = await run(worker, "csv_writer", {"path": "t.csv"}, rows)
    text = (root / "acme" / "t.csv").read_bytes().decode()
    assert text == 'id,name,ok,meta\r\n1,apple,,\r\n2,,true,"{""k"":1}"\r\n3,,,\r\n'
    assert out == {"path": "t.csv", "bytes": len(text)}
    read = await run(worker, "csv_reader", {"path": "t.csv"})
    assert read["row_count"] == 3 and read["truncated"] is False
    assert read["rows"][1] == {"id": "2", "name": "", "ok": "true", "meta": '{"k":1}'}


async def test_csv_append_keeps_the_header(worker: WorkerServices, root: Path) -> None:
    await run(worker, "csv_writer", {"path": "log.csv", "mode": "append"}, [{"a": 1, "b": 2}])
    await run(worker, "csv_writer", {"path": "log.csv", "mode": "append"}, [{"b": 4, "a": 3}, {"a": 5}])
    assert (root / "acme" / "log.csv").read_bytes().decode() == "a,b\r\n1,2\r\n3,4\r\n5,\r\n"
    with pytest.raises(AgentError, match=r"cannot append to 'log.csv': column\(s\) c are not in its header \(a, b\)"):
        await run(worker, "csv_writer", {"path": "log.csv", "mode": "append"}, [{"a": 6, "c": 7}])
    assert (root / "acme" / "log.csv").read_text().count("\n") == 4
    with pytest.raises(AgentError, match="csv_writer: row 1 is a int, not an object"):
        await run(worker, "csv_writer", {"path": "x.csv"}, [{"a": 1}, 2])


async def test_csv_reader_options(worker: WorkerServices, root: Path) -> None:
    tenant = root / "acme"
    await run(worker, "file_writer", {"path": "semi.csv"}, "a;b\n1;2\n3;4;extra\n5;6\n")
    out = await run(worker, "csv_reader", {"path": "semi.csv", "delimiter": ";", "max_rows": 2})
    assert out == {
        "rows": [{"a": "1", "b": "2"}, {"a": "3", "b": "4", "_extra": ["extra"]}],
        "row_count": 2,
        "truncated": True,
    }
    assert (tenant / "semi.csv").exists()


async def test_file_write_append_and_read(worker: WorkerServices, root: Path) -> None:
    assert await run(worker, "file_writer", {"path": "notes/a.txt"}, "one\n") == {"path": "notes/a.txt", "bytes": 4}
    await run(worker, "file_writer", {"path": "notes/a.txt", "mode": "append"}, "two\n")
    await run(worker, "file_writer", {"path": "notes/a.txt", "mode": "append", "data": {"k": 1}})
    assert await run(worker, "file_reader", {"path": "notes/a.txt"}) == 'one\ntwo\n{\n  "k": 1\n}'
    await run(worker, "file_writer", {"path": "notes/a.txt"}, "replaced")
    assert await run(worker, "file_reader", {"path": "./notes//a.txt"}) == "replaced"


async def test_json_append_is_refused(worker: WorkerServices) -> None:
    with pytest.raises(AgentError, match="json_writer: mode 'append' is not supported"):
        await run(worker, "json_writer", {"path": "x.json", "mode": "append"}, {"a": 1})


async def test_encodings(worker: WorkerServices, root: Path) -> None:
    await run(worker, "file_writer", {"path": "l1.txt", "encoding": "latin-1"}, "café")
    assert (root / "acme" / "l1.txt").read_bytes() == b"caf\xe9"
    assert await run(worker, "file_reader", {"path": "l1.txt", "encoding": "latin-1"}) == "café"
    with pytest.raises(AgentError, match=r"'l1.txt' is not valid utf-8 \(byte 3\)"):
        await run(worker, "file_reader", {"path": "l1.txt"})
    with pytest.raises(AgentError, match="encoding 'klingon' is not known"):
        await run(worker, "file_reader", {"path": "l1.txt", "encoding": "klingon"})
    with pytest.raises(AgentError, match=r"cannot write 'a.txt' as ascii"):
        await run(worker, "file_writer", {"path": "a.txt", "encoding": "ascii"}, "naïve")


async def test_missing_and_non_regular_files(worker: WorkerServices, root: Path) -> None:
    with pytest.raises(AgentError, match=r"'nope.json' does not exist in the workspace"):
        await run(worker, "json_reader", {"path": "nope.json"})
    with pytest.raises(AgentError, match=r"'no/such/file.txt' does not exist \(no directory 'no'\)"):
        await run(worker, "file_reader", {"path": "no/such/file.txt"})
    (root / "acme" / "adir").mkdir()
    with pytest.raises(AgentError, match="'adir' is not a regular file"):
        await run(worker, "file_reader", {"path": "adir"})
    with pytest.raises(AgentError, match="'adir' exists and is not a regular file"):
        await run(worker, "file_writer", {"path": "adir"}, "x")
    os.mkfifo(root / "acme" / "pipe")
    # a FIFO must be refused, not block the worker waiting for a writer
    with pytest.raises(AgentError, match="'pipe' is not a regular file"):
        await asyncio.wait_for(run(worker, "file_reader", {"path": "pipe"}), 5)
    await run(worker, "file_writer", {"path": "f.txt"}, "x")
    with pytest.raises(AgentError, match=r"'f.txt' in path 'f.txt/x' is not a directory"):
        await run(worker, "file_reader", {"path": "f.txt/x"})
    with pytest.raises(AgentError, match=r"json_reader: 'f.txt' is not valid JSON"):
        await run(worker, "json_reader", {"path": "f.txt"})


async def test_size_caps(worker: WorkerServices, root: Path) -> None:
    await run(worker, "file_writer", {"path": "big.txt"}, "x" * 100)
    with pytest.raises(AgentError, match=r"'big.txt' is 100 bytes, more than max_bytes=50"):
        await run(worker, "file_reader", {"path": "big.txt", "max_bytes": 50})
    with pytest.raises(AgentError, match=r"writing 'new.txt' would make it 100 bytes, more than max_bytes=99"):
        await run(worker, "file_writer", {"path": "new.txt", "max_bytes": 99}, "y" * 100)
    assert not (root / "acme" / "new.txt").exists()
    with pytest.raises(AgentError, match="would make it 101 bytes"):
        await run(worker, "file_writer", {"path": "big.txt", "mode": "append", "max_bytes": 100}, "z")
    assert (root / "acme" / "big.txt").read_text() == "x" * 100  # untouched
    assert leftovers(root) == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../outside/secret.txt", "contains '..'"),
        ("a/../../outside/secret.txt", "contains '..'"),
        ("a/..", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        ("x\0y", "NUL"),
        ("./", "names no file"),
        ("{input.p}", "contains '..'"),
    ],
)
async def test_escapes_by_path_are_refused(worker: WorkerServices, outside: Path, path: str, message: str) -> None:
    for agent in ("file_reader", "file_writer"):
        with pytest.raises(AgentError, match=message):
            await run(worker, agent, {"path": path}, {"p": "../outside/secret.txt"})
    assert (outside / "secret.txt").read_text() == "top secret"


async def test_planted_symlink_to_a_file_outside_is_refused(worker: WorkerServices, root: Path, outside: Path) -> None:
    tenant = root / "acme"
    tenant.mkdir(parents=True)
    os.symlink(outside / "secret.txt", tenant / "link.txt")
    with pytest.raises(AgentError, match=r"'link.txt' resolves outside the tenant's workspace"):
        await run(worker, "file_reader", {"path": "link.txt"})
    with pytest.raises(AgentError, match=r"'link.txt' resolves outside"):
        await run(worker, "file_writer", {"path": "link.txt"}, "pwned")
    assert (outside / "secret.txt").read_text() == "top secret"
    assert (tenant / "link.txt").is_symlink()


async def test_symlinked_directory_is_refused(worker: WorkerServices, root: Path, outside: Path) -> None:
    tenant = root / "acme"
    tenant.mkdir(parents=True)
    os.symlink(outside, tenant / "dir")
    with pytest.raises(AgentError, match=r"'dir/secret.txt' resolves outside"):
        await run(worker, "file_reader", {"path": "dir/secret.txt"})
    with pytest.raises(AgentError, match="resolves outside"):
        await run(worker, "file_writer", {"path": "dir/new.txt"}, "x")
    assert os.listdir(outside) == ["secret.txt"]


async def test_no_link_is_followed_even_inside_the_workspace(worker: WorkerServices, root: Path) -> None:
    # These pass the realpath check (they stay inside); the O_NOFOLLOW walk is what refuses
    # them, the same walk that stops a link swapped in after the check.
    await run(worker, "file_writer", {"path": "real/data.txt"}, "inside")
    tenant = root / "acme"
    os.symlink(tenant / "real", tenant / "alias")
    os.symlink(tenant / "real" / "data.txt", tenant / "data-link.txt")
    with pytest.raises(AgentError, match=r"'alias' in path 'alias/data.txt' is a symbolic link"):
        await run(worker, "file_reader", {"path": "alias/data.txt"})
    with pytest.raises(AgentError, match=r"'alias' in path 'alias/new.txt' is a symbolic link"):
        await run(worker, "file_writer", {"path": "alias/new.txt"}, "x")
    with pytest.raises(AgentError, match=r"'data-link.txt' is a symbolic link"):
        await run(worker, "file_reader", {"path": "data-link.txt"})
    with pytest.raises(AgentError, match=r"'data-link.txt' is a symbolic link"):
        await run(worker, "file_writer", {"path": "data-link.txt"}, "x")
    assert (tenant / "real" / "data.txt").read_text() == "inside"
    assert not (tenant / "real" / "new.txt").exists()


async def test_tenants_are_isolated(worker: WorkerServices, root: Path) -> None:
    await run(worker, "file_writer", {"path": "shared.txt"}, "acme's data", tenant="acme")
    with pytest.raises(AgentError, match=r"'shared.txt' does not exist"):
        await run(worker, "file_reader", {"path": "shared.txt"}, tenant="globex")
    with pytest.raises(AgentError, match=r"contains '..'"):
        await run(worker, "file_reader", {"path": "../acme/shared.txt"}, tenant="globex")
    await run(worker, "file_writer", {"path": "shared.txt"}, "globex's data", tenant="globex")
    assert (root / "acme" / "shared.txt").read_text() == "acme's data"
    assert (root / "globex" / "shared.txt").read_text() == "globex's data"
    with pytest.raises(AgentError, match=r"tenant '..' cannot name a workspace directory"):
        await run(worker, "file_reader", {"path": "x"}, tenant="..")


async def test_concurrent_appends_all_land(worker: WorkerServices, root: Path) -> None:
    lines = [f"line {i}\n" for i in range(20)]
    await asyncio.gather(*(run(worker, "file_writer", {"path": "log.txt", "mode": "append"}, s) for s in lines))
    assert sorted((root / "acme" / "log.txt").read_text().splitlines(keepends=True)) == sorted(lines)
    assert leftovers(root) == []


async def test_a_failed_write_leaves_the_old_file(worker: WorkerServices, root: Path) -> None:
    await run(worker, "json_writer", {"path": "state.json"}, {"v": 1})
    with pytest.raises(AgentError, match="not JSON-serialisable"):
        await run(worker, "json_writer", {"path": "state.json", "data": None}, {"bad": {1, 2}})
    assert json.loads((root / "acme" / "state.json").read_text()) == {"v": 1}
    assert leftovers(root) == []


async def test_bad_settings_name_the_field(worker: WorkerServices) -> None:
    with pytest.raises(AgentError, match="agent 'csv_reader' has invalid settings: delimiter"):
        await run(worker, "csv_reader", {"path": "x.csv", "delimiter": ";;"})
    with pytest.raises(AgentError, match="mode: Input should be 'write' or 'append'"):
        await run(worker, "file_writer", {"path": "x", "mode": "overwrite"})
