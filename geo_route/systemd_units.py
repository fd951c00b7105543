"""systemd units for the auth service and the updater (``geo-route systemd-units``); pure text.

Both run gunicorn in the foreground (``Type=exec``: no sd_notify). ``KillMode=mixed`` sends SIGTERM
to gunicorn's arbiter only, which stops its workers gracefully (gunicorn's 30 s); the updater's
workers then stop their loops and release the reconcile and verify leases (gunicorn kills a worker
still stopping after its graceful timeout; the loops' own joins are bounded by 80 s), and each
``TimeoutStopSec`` is longer than all of that, so systemd never cuts a graceful stop short (a lease a
killed worker could not release expires after ``updater.reconcile_lease``).

A ``unix:`` bind under ``/run`` (e.g. ``unix:/run/geo-route/auth.sock``, where NGINX connects) gets
its directory as a ``RuntimeDirectory``: ``/run`` is a tmpfs, so nothing else would create it at
boot. Mode 0750, owned by the unit's user and group: NGINX's workers, in that group, reach the
0660 socket. The directories outlive a restart (``RuntimeDirectoryPreserve=restart``), and a stop
too when both units' sockets share one (``yes``): stopping the updater must not delete the auth
service's socket (gunicorn replaces a stale socket file when it starts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import PurePosixPath

from geo_route.config import Settings

AUTH_UNIT = "geo-route-auth.service"
UPDATER_UNIT = "geo-route-updater.service"
GUNICORN_GRACEFUL_SECONDS = 30
UPDATER_STOP_SECONDS = 60 + 10 + 10  # reconcile, resolver and verify loop joins (updater/background.py)
LIMIT_NOFILE = 65536


@dataclass(frozen=True)
class UnitOptions:
    site_file: str  # absolute path of the site file on the host the units run on
    prefix: str = "/opt/geo-route"  # the virtual environment geo-route is installed in
    user: str = "geo-route"
    group: str = ""  # empty: the user's name


def render_units(settings: Settings, options: UnitOptions) -> dict[str, str]:
    """Unit file name → text, for the auth service and the updater."""
    shared = set(run_socket_dirs(settings.server.bind)) & set(run_socket_dirs(settings.updater.bind))
    return {
        AUTH_UNIT: render_unit(
            description="geo-route auth service (NGINX auth_request)",
            command="serve",
            binds=settings.server.bind,
            stop_seconds=GUNICORN_GRACEFUL_SECONDS + 15,
            options=options,
            shared_dirs=shared,
        ),
        UPDATER_UNIT: render_unit(
            description="geo-route index updater (registry notifications, tag resolution, reconcile, verify)",
            command="updater",
            binds=settings.updater.bind,
            stop_seconds=max(GUNICORN_GRACEFUL_SECONDS, UPDATER_STOP_SECONDS) + 15,
            options=options,
            shared_dirs=shared,
        ),
    }


def hidden_path_warnings(options: UnitOptions) -> list[str]:
    """Paths the units' sandbox hides from the service (PrivateTmp, ProtectHome)."""
    hidden = ("/tmp/", "/var/tmp/", "/home/", "/root/", "/run/user/")
    return [
        f"{name} {path} is hidden from the service by PrivateTmp=/ProtectHome=: move it (e.g. to /etc/geo-route)"
        for name, path in (("site file", options.site_file), ("prefix", options.prefix + "/"))
        if path.startswith(hidden)
    ]


def run_socket_dirs(binds: Sequence[str]) -> list[str]:
    """The directories of the ``unix:`` binds that lie under ``/run``, relative to it, in bind order:
    what ``RuntimeDirectory=`` must create (``/var/run`` is ``/run``; ``/run`` itself is not one)."""
    dirs: list[str] = []
    for bind in binds:
        if not bind.startswith("unix:"):
            continue
        parent = PurePosixPath(bind.removeprefix("unix:")).parent
        for run in ("/run", "/var/run"):
            if parent.is_relative_to(run) and parent != PurePosixPath(run):
                relative = str(parent.relative_to(run))
                if ".." not in relative.split("/") and relative not in dirs:
                    dirs.append(relative)
    return dirs


def render_unit(
    *,
    description: str,
    command: str,
    binds: Sequence[str],
    stop_seconds: int,
    options: UnitOptions,
    shared_dirs: Set[str] = frozenset(),
) -> str:
    runtime = f"geo-route-{'auth' if command == 'serve' else command}"
    runtime_dirs = [runtime, *(d for d in run_socket_dirs(binds) if d != runtime)]
    preserve = "yes" if shared_dirs & set(runtime_dirs) else "restart" if len(runtime_dirs) > 1 else "no"
    socket_dirs = {str(PurePosixPath(b.removeprefix("unix:")).parent) for b in binds if b.startswith("unix:")}
    writable = [f"/run/{runtime}", *sorted(socket_dirs - {f"/run/{runtime}"})]
    executable = str(PurePosixPath(options.prefix) / "bin" / "geo-route")
    capabilities = "CAP_NET_BIND_SERVICE" if any(_port(b) < 1024 for b in binds) else ""
    lines = [
        f"# {runtime}.service, written by geo-route systemd-units; restart it to apply a changed site file.",
        "[Unit]",
        f"Description={description}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={_quote(executable)} {command} -c {_quote(options.site_file)}",
        "Restart=on-failure",
        "RestartSec=2",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={stop_seconds}",
        f"User={options.user}",
        f"Group={options.group or options.user}",
        f"LimitNOFILE={LIMIT_NOFILE}",
        f"RuntimeDirectory={' '.join(_quote(d) for d in runtime_dirs)}",
        "RuntimeDirectoryMode=0750",
        f"RuntimeDirectoryPreserve={preserve}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        f"CapabilityBoundingSet={capabilities}",
        f"AmbientCapabilities={capabilities}",
        f"ReadWritePaths={' '.join(_quote(path) for path in writable)}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _port(bind: str) -> int:
    """A TCP bind's port; 65536 (no privilege needed) for a unix socket."""
    match = re.search(r":(\d{1,5})$", bind)
    return 65536 if bind.startswith("unix:") or match is None else int(match.group(1))


def _quote(word: str) -> str:
    """One word on a systemd command line: specifiers (%) and variables ($) escaped, quoted when it has blanks."""
    word = word.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\]", word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word
