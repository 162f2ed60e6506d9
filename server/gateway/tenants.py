"""API keys as named tenants: who a request is, what it may use, and how fast.

Keys come from `--api-keys` (a flat list; each key is named `key-<n>`) and/or `--api-key-file`, a YAML (or JSON)
mapping of names to keys, as a Kubernetes Secret mounts it:

    team-a: sk-a-secret                       # name: key
    team-b:
      key_sha256: 9f86d081884c7d65...         # or the key's SHA-256 hex, so the file holds no key
      requests_per_minute: 60                 # token buckets: a burst of one minute's allowance, refilled evenly
      tokens_per_minute: 20000                # prompt + generated tokens: the worst case reserved, the rest refunded
      max_sequences: 8                        # sequences (prompts x n) in flight at once
      models: [tiny-dsv2]                     # names (or aliases) this key may use; default: all
      priority: 10                            # default scheduling priority (vLLM: lower runs first)
      min_priority: 0                         # the most urgent priority its requests may ask for
    ops:
      key: sk-ops-secret
      admin: true                             # may load and unload LoRA adapters at run time (default false)

What a key has used of its limits is counted in server.gateway.ratelimits (in this process, or in Redis for
every process and replica); a Tenant only says what the limits are.

Keys are held and compared as SHA-256 digests, every key each time, in constant time. The name (never the key)
labels metrics and access logs, and salts the prefix cache (`cache_salt`), so tenants never share KV blocks.
Flat `--api-keys` keys are never admins.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.gateway.errors import APIError

_LIMIT_FIELDS = {"requests_per_minute", "tokens_per_minute", "max_sequences", "priority", "min_priority"}
_FIELDS = {"key", "key_sha256", "models", "admin", *_LIMIT_FIELDS}


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclass
class Tenant:
    name: str
    key_digest: bytes
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_sequences: int | None = None
    models: frozenset[str] | None = None
    priority: int = 0
    min_priority: int | None = None
    admin: bool = False  # may use the runtime LoRA API
    cache_salt: str = field(default="", repr=False)  # vLLM's cache_salt for this key's requests

    def __post_init__(self) -> None:
        self.cache_salt = hashlib.sha256(f"dsv2-serve key {self.name}".encode()).hexdigest()

    @property
    def rate_limited(self) -> bool:
        """Requests or tokens per minute: its responses carry the x-ratelimit-* headers."""
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def check_priority(self, asked: int | None) -> int:
        """The request's priority: its own, or the key's default; 400 if more urgent than the key may ask."""
        if asked is None:
            return self.priority
        if self.min_priority is not None and asked < self.min_priority:
            raise APIError(
                f"priority {asked} is more urgent than key {self.name!r} may ask for (at least {self.min_priority})",
                param="priority",
            )
        return asked

    def may_use(self, *names: str) -> bool:
        return self.models is None or any(n in self.models for n in names)


# The tenant of requests on a server without keys: no limits, priority 0.
ANONYMOUS = Tenant("anonymous", b"")


class Tenants:
    def __init__(self, tenants: list[Tenant]) -> None:
        self.tenants = tenants

    @property
    def enabled(self) -> bool:
        return bool(self.tenants)

    def named(self, name: str) -> Tenant | None:
        """The tenant called `name` (a batch's owner), or None."""
        return next((t for t in self.tenants if t.name == name), None)

    def authenticate(self, token: bytes) -> Tenant | None:
        """The tenant whose key `token` is; every key compared, each in constant time over equal-length digests."""
        if not token:
            return None
        offered = digest(token)
        found = None
        for tenant in self.tenants:
            if hmac.compare_digest(offered, tenant.key_digest):
                found = tenant
        return found


def load(api_keys: list[str], key_file: str | None) -> Tenants:
    """Tenants from the flat key list and the key file; ValueError naming the problem (the server refuses to
    start)."""
    tenants = [Tenant(f"key-{i + 1}", digest(k)) for i, k in enumerate(api_keys)]
    if key_file:
        tenants += _from_file(Path(key_file))
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(
            f"API key names must be unique: {sorted(n for n in set(names) if names.count(n) > 1)}"
        )
    digests = [t.key_digest for t in tenants]
    if len(set(digests)) != len(digests):
        raise ValueError("the same API key is given to two names")
    return Tenants(tenants)


def _from_file(path: Path) -> list[Tenant]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--api-key-file {path}: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--api-key-file {path}: expected a mapping of key names to keys")
    return [_tenant(str(name), spec, path) for name, spec in data.items()]


def _tenant(name: str, spec: Any, path: Path) -> Tenant:
    where = f"--api-key-file {path}: {name!r}"
    if isinstance(spec, str):
        spec = {"key": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a key or a mapping")
    unknown = set(spec) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    if ("key" in spec) == ("key_sha256" in spec):
        raise ValueError(f"{where}: give exactly one of key, key_sha256")
    if "key" in spec:
        if not isinstance(spec["key"], str) or not spec["key"]:
            raise ValueError(f"{where}: key must be a non-empty string")
        key_digest = digest(spec["key"])
    else:
        try:
            key_digest = bytes.fromhex(str(spec["key_sha256"]))
        except ValueError:
            key_digest = b""
        if len(key_digest) != 32:
            raise ValueError(f"{where}: key_sha256 must be 64 hex digits")
    limits = {}
    for name_ in _LIMIT_FIELDS & set(spec):
        value = spec[name_]
        positive = name_ in ("requests_per_minute", "tokens_per_minute", "max_sequences")
        if not isinstance(value, int) or isinstance(value, bool) or (positive and value < 1):
            raise ValueError(f"{where}: {name_} must be {'a positive' if positive else 'an'} integer")
        limits[name_] = value
    models = spec.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) for m in models)):
        raise ValueError(f"{where}: models must be a list of names")
    admin = spec.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"{where}: admin must be true or false, not {admin!r}")
    models_ = frozenset(models) if models is not None else None
    tenant = Tenant(name, key_digest, models=models_, admin=admin, **limits)
    if tenant.min_priority is not None and tenant.priority < tenant.min_priority:
        raise ValueError(f"{where}: priority {tenant.priority} is below its own min_priority")
    return tenant
