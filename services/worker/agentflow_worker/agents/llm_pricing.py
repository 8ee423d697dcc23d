"""What an LLM call costs, and the one place litellm gets imported.

Prices come from, in order:

1. the worker's price table (``WorkerServices.llm_prices``), keyed by the model as
   configured (``my-llama``) or with its provider (``openai/my-llama``): an operator's
   entry wins, since it may reflect negotiated or on-prem prices;
2. litellm's bundled price map (``LITELLM_LOCAL_MODEL_COST_MAP``: never fetched from the
   network), for the models it knows;
3. nothing: cost 0 with ``price_source="unknown"``, and a warning once per model, so a
   budget is not silently fooled forever.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

log = logging.getLogger("agentflow.llm")

_lock = threading.Lock()
_litellm: Any = None
_warned_unknown: set[str] = set()


def litellm_module() -> Any:
    """litellm, imported on first use: the import takes seconds and a worker that never
    runs an LLM step should not pay for it (nor for its memory)."""
    global _litellm
    if _litellm is not None:
        return _litellm
    with _lock:
        if _litellm is None:
            # Without this litellm fetches its price map from GitHub at import time.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            # Tokenizers of some models live on the Hugging Face hub; never reach for them.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import litellm as module

            litellm: Any = module
            litellm.telemetry = False
            litellm.suppress_debug_info = True
            litellm.set_verbose = False
            # token_counter would otherwise try to download llama/cohere tokenizers from the
            # hub; the bundled tiktoken encodings are close enough for a budget estimate.
            litellm.disable_hf_tokenizer_download = True
            logging.getLogger("LiteLLM").setLevel(logging.WARNING)
            _litellm = litellm
    return _litellm


def litellm_if_loaded() -> Any:
    """litellm if it was imported already, else None (without importing it)."""
    return _litellm


def _table_entry(route: str, configured_model: str, table: dict[str, dict[str, float]]) -> dict[str, float] | None:
    for key in (configured_model, route):
        entry = table.get(key)
        if entry is not None:
            return entry
    return None


def cost_of(
    route: str, configured_model: str, prompt_tokens: int, completion_tokens: int, table: dict[str, dict[str, float]]
) -> tuple[float, str]:
    """(dollars, price source) of ``prompt_tokens`` in and ``completion_tokens`` out on
    ``route`` (litellm's ``provider/model``); ``configured_model`` is the ``model``
    setting alone, the other key the price table may use. No warning: for estimates."""
    entry = _table_entry(route, configured_model, table)
    if entry is not None:
        cost = (
            prompt_tokens * float(entry.get("input_per_million", 0.0))
            + completion_tokens * float(entry.get("output_per_million", 0.0))
        ) / 1e6
        return cost, "config"
    litellm = litellm_module()
    try:
        # The actual token counts, not a unit price: some models are priced in tiers.
        prompt, completion = litellm.cost_per_token(
            model=route, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:
        # litellm raises (BadRequestError / "model isn't mapped") for models it has no price for.
        return 0.0, "unknown"
    return float(prompt) + float(completion), "litellm"


def call_cost(
    route: str, configured_model: str, prompt_tokens: int, completion_tokens: int, table: dict[str, dict[str, float]]
) -> tuple[float, str]:
    """(dollars, price source) of one finished call; warns once per model without a price."""
    cost, source = cost_of(route, configured_model, prompt_tokens, completion_tokens, table)
    if source == "unknown" and route not in _warned_unknown:
        _warned_unknown.add(route)
        log.warning(
            "no price known for model %s: its calls are recorded at $0 (add it to the worker's llm_prices: "
            "{'%s': {'input_per_million': ..., 'output_per_million': ...}})",
            route,
            configured_model,
        )
    return cost, source


def count_prompt_tokens(route: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Tokens the messages will take, as litellm counts them (offline: bundled tiktoken
    encodings, no hub downloads); ``len(json) / 4`` if its counter fails on them."""
    litellm = litellm_module()
    try:
        return int(litellm.token_counter(model=route, messages=messages, tools=tools or None))
    except Exception:
        log.debug("token_counter failed for %s; estimating from length", route, exc_info=True)
        return len(json.dumps({"messages": messages, "tools": tools or []}, default=str)) // 4 + 1


def count_text_tokens(route: str, text: str) -> int:
    litellm = litellm_module()
    try:
        return int(litellm.token_counter(model=route, text=text))
    except Exception:
        return len(text) // 4 + (1 if text else 0)
