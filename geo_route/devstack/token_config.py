"""The development token service's configuration: one JSON file (it holds passwords: mode 0600).

```json
{"issuer": "geo-route-devstack", "service": "container_registry",
 "private_key": "/tmp/…/token-signing.key", "bind": "127.0.0.1:5001",
 "users": {"alice": {"password": "…", "access": {"group/*": ["pull", "push"]}}}}
```
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geo_route.devstack.keys import write_private
from geo_route.devstack.token_scopes import Rules
from geo_route.errors import DevstackError

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class TokenUser:
    password: str
    access: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenServiceConfig:
    issuer: str
    service: str
    private_key: str
    bind: str
    users: dict[str, TokenUser] = field(default_factory=dict)
    container: bool = False  # inside a container (docker/compose.yaml) it may listen on the container's address

    def __post_init__(self) -> None:
        if not self.container:
            require_loopback(self.bind)

    @property
    def port(self) -> int:
        return int(self.bind.rsplit(":", 1)[1])

    @property
    def host(self) -> str:
        return self.bind.rsplit(":", 1)[0].strip("[]")

    def user_table(self) -> dict[str, tuple[str, Rules]]:
        return {name: (user.password, user.access) for name, user in self.users.items()}

    def to_json(self) -> dict[str, Any]:
        users = {name: {"password": u.password, "access": u.access} for name, u in self.users.items()}
        return {
            "issuer": self.issuer,
            "service": self.service,
            "private_key": self.private_key,
            "bind": self.bind,
            "users": users,
        }

    def write(self, path: Path) -> Path:
        write_private(path, json.dumps(self.to_json(), indent=2).encode())
        return path


def require_loopback(bind: str) -> None:
    """The development stack listens on loopback only."""
    host, separator, port = bind.rpartition(":")
    host = host.strip("[]")
    if not separator or not port.isdigit():
        raise DevstackError(f"bind {bind!r} is not host:port")
    if host in LOOPBACK_NAMES:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise DevstackError(f"bind {bind!r}: the development stack listens on loopback addresses only")


def parse_config(data: dict[str, Any]) -> TokenServiceConfig:
    try:
        users = {
            str(name): TokenUser(
                str(entry["password"]), {str(k): [str(a) for a in v] for k, v in entry["access"].items()}
            )
            for name, entry in data.get("users", {}).items()
        }
        return TokenServiceConfig(
            issuer=str(data["issuer"]),
            service=str(data["service"]),
            private_key=str(data["private_key"]),
            bind=str(data["bind"]),
            users=users,
            container=bool(data.get("container", False)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise DevstackError(f"token service config is malformed: {type(exc).__name__} {exc}") from None


def read_config(path: str | Path) -> TokenServiceConfig:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DevstackError(f"cannot read token service config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DevstackError(f"token service config {path}: the top level must be an object")
    return parse_config(data)
