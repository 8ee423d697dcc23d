from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agentflow_control_plane.auth import TokenVerifier, issue_token
from agentflow_control_plane.settings import DEV_JWT_SECRET, ControlPlaneSettings
from agentflow_core.errors import ConfigurationError, Forbidden, Unauthorized

SECRET = "s" * 40


def _verifier(**kwargs: object) -> TokenVerifier:
    return TokenVerifier(ControlPlaneSettings(jwt_secret=SECRET, **kwargs))  # type: ignore[arg-type]


def test_valid_token_yields_principal() -> None:
    token = issue_token(SECRET, tenant="acme", roles=["viewer"], subject="u1", ttl_s=60)
    principal = _verifier().verify(f"Bearer {token}")
    assert (principal.tenant, principal.subject, principal.roles) == (
        "acme",
        "u1",
        frozenset({"viewer"}),
    )
    with pytest.raises(Forbidden):
        principal.require_write()


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (None, "missing"),
        ("Basic abc", "Bearer"),
        ("Bearer not-a-jwt", "malformed"),
        (
            f"Bearer {jwt.encode({'sub': 'x', 'tenant': 't', 'exp': 9999999999}, 'wrong' * 10)}",
            "invalid",
        ),
        (
            f"Bearer {jwt.encode({'sub': 'x', 'tenant': 't', 'exp': int(time.time()) - 60}, SECRET)}",
            "expired",
        ),
        (
            f"Bearer {jwt.encode({'sub': 'x', 'tenant': 't', 'exp': 9999999999}, None, algorithm='none')}",
            "'none'",
        ),
        (f"Bearer {jwt.encode({'sub': 'x', 'exp': 9999999999}, SECRET)}", "tenant"),
        (
            f"Bearer {jwt.encode({'sub': 'x', 'tenant': 'a b', 'exp': 9999999999}, SECRET)}",
            "tenant",
        ),
    ],
)
def test_bad_tokens_are_refused(header: str | None, fragment: str) -> None:
    with pytest.raises(Unauthorized) as info:
        _verifier().verify(header)
    assert fragment in info.value.message


def test_rs256_with_public_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    token = jwt.encode({"sub": "svc", "tenant": "t1", "roles": ["operator"], "exp": 9999999999}, key, "RS256")
    principal = _verifier(jwt_public_key=public).verify(f"Bearer {token}")
    assert principal.tenant == "t1"
    # The same RSA token is refused when no public key is configured.
    with pytest.raises(Unauthorized):
        _verifier().verify(f"Bearer {token}")


def test_settings_refuse_default_or_short_secrets_outside_dev_mode() -> None:
    for secret in ("", DEV_JWT_SECRET, "short"):
        with pytest.raises(ConfigurationError):
            ControlPlaneSettings(jwt_secret=secret, dev_mode=False)
    assert ControlPlaneSettings(dev_mode=True).jwt_secret == DEV_JWT_SECRET
    with pytest.raises(ConfigurationError):
        ControlPlaneSettings(jwt_secret=SECRET, fault_inject="exit_after_commit")
