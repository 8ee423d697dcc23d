"""Settings of the storage agents (AgentMap's csv/json/file readers and writers)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Storage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: relative to the tenant's workspace; ``{input.field}`` placeholders allowed
    path: str = Field(min_length=1, max_length=4096)
    encoding: str = "utf-8"
    max_bytes: int = Field(50_000_000, ge=1, le=10_000_000_000)


class ReaderConfig(_Storage):
    pass


class WriterConfig(_Storage):
    mode: Literal["write", "append"] = "write"
    #: what to write; default: the step input
    data: Any = None


class JsonWriterConfig(WriterConfig):
    #: a JSON document has one top level: appending would make it invalid
    mode: Literal["write"] = "write"


class CsvReaderConfig(ReaderConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)
    max_rows: int = Field(100_000, ge=1)


class CsvWriterConfig(WriterConfig):
    delimiter: str = Field(",", min_length=1, max_length=1)


STORAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "csv_reader": CsvReaderConfig,
    "csv_writer": CsvWriterConfig,
    "json_reader": ReaderConfig,
    "json_writer": JsonWriterConfig,
    "file_reader": ReaderConfig,
    "file_writer": WriterConfig,
}
