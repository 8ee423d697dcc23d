"""NATS JetStream plumbing shared by the control plane and the workers.

Stream and subject naming, connecting with retries, idempotent stream/consumer setup, a
low-latency pull consumer and pipelined publishing. The engine logic lives in the
services; this package only moves bytes.
"""
