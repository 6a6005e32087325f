"""Which arm answers a request: the candidate takes a share `split` of conversations, sticky per client.

A request is keyed by its `user` field (an OpenAI client's end-user id or conversation id), else by the API
key it came with, else by the client's address. The key is hashed with the deployment's name, so one key
always reaches the same arm of one deployment, and the share of keys on the candidate is `split`.
"""

from __future__ import annotations

import hashlib


def sticky_key(user: object, api_key: str | None, client: str | None) -> str:
    if isinstance(user, str) and user:
        return "user:" + user
    if api_key:
        return "key:" + api_key
    return "client:" + (client or "")


def position(deployment: str, key: str) -> float:
    """Where `key` falls in [0, 1) for `deployment`: uniform over keys, fixed for each."""
    digest = hashlib.sha256(f"{deployment}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm(deployment: str, key: str, split: float, has_candidate: bool) -> str:
    """`candidate` for a share `split` of keys when there is a candidate, else `model`."""
    return "candidate" if has_candidate and position(deployment, key) < split else "model"
