"""The demo workflow ``agentflow up --demo`` registers and runs."""

HELLO_WORKFLOW = """\
name: hello
description: Greets, naps, and finishes. The run's output is the last step's output.
agents:
  greet: {type: echo}
  nap:   {type: sleep, ms: 50, timeout_s: 5, retry: {max_attempts: 3, backoff_ms: 100}}
planner:
  type: fsm
  initial_state: greet
  states:
    greet: {agent: greet, on_success: nap, on_error: failed}
    nap:   {agent: nap, on_success: done, on_error: failed}
  final_states: [done, failed]
"""
