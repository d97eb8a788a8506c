"""Schemathesis hooks for tests/py/run.sh (loaded through SCHEMATHESIS_HOOKS).

They exclude nothing; they keep each generated request cheap enough that a
few hundred examples fit in a few minutes on two CPU cores. A valid request
asking for 30,000 tokens would take a quarter of an hour there, so:

- `max_tokens`, `max_completion_tokens` and `min_tokens` between 17 and 100,000 become
  16. Smaller, non-positive, huge (beyond any context, which the server must
  refuse at once) and non-integer values are sent as generated.
- a body with neither `max_tokens` nor `max_completion_tokens` (absent or null)
  gets `max_tokens: 16`: the default is the rest of the context (up to 16,384
  tokens), minutes per request here. test_openai_client.py covers the default.
- `n` / `best_of` between 3 and 1,000 become 2.
- a list prompt (a batch of prompts) longer than 4 items is cut to 4.
- a string `model` becomes the served model ($TANDEM_MODEL_ID, which run.sh sets),
  else nearly every generated request ends at "404 model not found" before any
  other field is looked at (schemathesis warned exactly that). Unknown models are
  tested in test_openai_client.py; non-string models still go out as generated.

Route specs (`PUT /admin/routes/{alias}`) get none of the rules above (they
have no tokens to bound); their string target and shadow `model`s become the
served model, so valid routes are created too, not only refused ones.

Everything else (types, unknown fields, strings, nulls, negative cases) reaches
the server unchanged.
"""

import os

import schemathesis

MODEL_ID = os.environ.get("TANDEM_MODEL_ID")

TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _route_spec(body):
    for t in body.get("targets") or []:
        if isinstance(t, dict) and MODEL_ID and isinstance(t.get("model"), str):
            t["model"] = MODEL_ID
    shadow = body.get("shadow")
    if isinstance(shadow, dict) and MODEL_ID and isinstance(shadow.get("model"), str):
        shadow["model"] = MODEL_ID
    return body


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    operation = getattr(context, "operation", None)
    if operation is not None and str(getattr(operation, "path", "")).startswith("/admin/routes"):
        return _route_spec(body)
    if MODEL_ID and isinstance(body.get("model"), str):
        body["model"] = MODEL_ID
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 16
    for k in TOKEN_FIELDS:
        v = body.get(k)
        if _int(v) and 16 < v <= 100_000:
            body[k] = 16
    for k in ("n", "best_of"):
        v = body.get(k)
        if _int(v) and 2 < v <= 1_000:
            body[k] = 2
    p = body.get("prompt")
    if isinstance(p, list) and len(p) > 4 and not all(_int(x) for x in p):
        body["prompt"] = p[:4]
    return body
