"""Names of streams, subjects and consumers for one installation prefix."""

from __future__ import annotations

from dataclasses import dataclass

from agentflow_bus.settings import stream_token


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str

    @property
    def steps_stream(self) -> str:
        return f"{stream_token(self.prefix)}_STEPS"

    @property
    def results_stream(self) -> str:
        return f"{stream_token(self.prefix)}_RESULTS"

    def step_subject(self, queue: str, tenant: str) -> str:
        return f"{self.prefix}.steps.{queue}.{tenant}"

    def step_filter(self, queue: str) -> str:
        return f"{self.prefix}.steps.{queue}.*"

    def result_subject(self, tenant: str) -> str:
        return f"{self.prefix}.results.{tenant}"

    @property
    def results_filter(self) -> str:
        return f"{self.prefix}.results.>"

    @property
    def cancel_subject(self) -> str:
        """Core NATS (not persisted): tells workers to stop a run's in-flight steps."""
        return f"{self.prefix}.control.cancel"

    @property
    def workers_bucket(self) -> str:
        """KV bucket of worker heartbeats (entries expire when a worker stops beating)."""
        return f"{stream_token(self.prefix)}_workers"

    @property
    def rate_limit_bucket(self) -> str:
        """KV bucket of tool rate-limit state (one GCRA value per tenant and tool)."""
        return f"{stream_token(self.prefix)}_ratelimits"

    def progress_subject(self, tenant: str, run: str) -> str:
        """Core NATS: step progress events (LLM token deltas); not persisted."""
        return f"{self.prefix}.progress.{tenant}.{run}"

    @property
    def audit_anchor_stream(self) -> str:
        """Audit chain heads, published on a schedule; created with deny-delete and deny-purge."""
        return f"{stream_token(self.prefix)}_AUDIT_ANCHORS"

    def audit_anchor_subject(self, tenant: str) -> str:
        return f"{self.prefix}.audit.anchor.{tenant}"

    @property
    def audit_anchor_filter(self) -> str:
        return f"{self.prefix}.audit.anchor.*"

    @staticmethod
    def step_consumer(queue: str) -> str:
        return f"steps_{queue}"

    results_consumer: str = "results"
