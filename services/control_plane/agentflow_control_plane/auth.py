"""Bearer-token authentication (JWT, HS256 or RS256) and role checks."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from agentflow_control_plane.settings import ControlPlaneSettings
from agentflow_core.errors import Forbidden, Unauthorized

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROLES = ("admin", "operator", "viewer")
WRITE_ROLES = frozenset({"admin", "operator"})


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    tenant: str
    roles: frozenset[str]

    def require_write(self) -> None:
        if not self.roles & WRITE_ROLES:
            raise Forbidden("this action needs the 'operator' or 'admin' role")


class TokenVerifier:
    #: Verified tokens are remembered until they expire: clients reuse a token for many
    #: requests, and signature checks were a tenth of the cost of a small request.
    CACHE_SIZE = 10_000

    def __init__(self, settings: ControlPlaneSettings) -> None:
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._keys: dict[str, str] = {}
        if settings.jwt_secret and "HS256" in settings.jwt_algorithms:
            self._keys["HS256"] = settings.jwt_secret
        if settings.jwt_public_key and "RS256" in settings.jwt_algorithms:
            self._keys["RS256"] = settings.jwt_public_key

    def verify(self, authorization: str | None) -> Principal:
        if authorization is not None:
            cached = self._cache.get(authorization)
            if cached is not None and cached[1] > time.time():
                return cached[0]
        principal, expires = self._verify(authorization)
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        assert authorization is not None
        self._cache[authorization] = (principal, expires)
        return principal

    def _verify(self, authorization: str | None) -> tuple[Principal, float]:
        if not authorization:
            raise Unauthorized("missing Authorization header (expected 'Bearer <token>')")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Authorization header must be 'Bearer <token>'")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed token: {exc}") from exc
        alg = header.get("alg")
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None or not isinstance(alg, str):
            # Covers alg "none" and algorithms this deployment does not accept.
            raise Unauthorized(f"token algorithm {alg!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"require": ["exp", "sub", "tenant"]},
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            raise Unauthorized("token claim 'tenant' must match [A-Za-z0-9_-]{1,64}")
        if tenant.startswith("_"):
            raise Unauthorized("tenant names starting with '_' are reserved (e.g. the '_system' audit chain)")
        roles = claims.get("roles", [])
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthorized("token claim 'roles' must be a list of strings")
        return Principal(str(claims["sub"]), tenant, frozenset(roles)), float(claims["exp"])


def issue_token(secret: str, *, tenant: str, roles: list[str], subject: str, ttl_s: int) -> str:
    """An HS256 token, as printed by ``agentflow token`` and ``agentflow up``."""
    if not TENANT_PATTERN.match(tenant):
        raise ValueError("tenant must match [A-Za-z0-9_-]{1,64}")
    if tenant.startswith("_"):
        raise ValueError("tenant names starting with '_' are reserved")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
    now = int(time.time())
    claims = {"sub": subject, "tenant": tenant, "roles": roles, "iat": now, "exp": now + ttl_s}
    return jwt.encode(claims, secret, algorithm="HS256")
