"""``geo-route``: the one command line, with subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence

from geo_route import __version__
from geo_route.config import Settings, load_settings
from geo_route.errors import ConfigError, KeyBundleError


def add_site_file(parser: argparse.ArgumentParser, help: str = "the YAML site file") -> None:
    """Every command that reads the site file takes it as ``-c``/``--config``."""
    parser.add_argument("-c", "--config", required=True, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geo-route", description="Serve registry pulls from a secondary site.")
    parser.add_argument("--version", action="version", version=f"geo-route {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a site file (and load its keys); exit 0 when valid")
    add_site_file(check)
    check.set_defaults(handler=run_check_config)

    render = commands.add_parser("render-nginx", help="render the NGINX configuration from the site file")
    add_site_file(render)
    render.add_argument("-o", "--output", help="write here (atomically) instead of standard output")
    render.add_argument(
        "--part",
        choices=("full", "http", "server"),
        default="full",
        help="full nginx.conf (default), or the http{} / server{} include for an existing NGINX",
    )
    render.add_argument("--no-check", action="store_true", help="skip `nginx -t` on the written file")
    render.set_defaults(handler=run_render_nginx)

    registry_config = commands.add_parser(
        "registry-config", help="print the notification and token sections of a registry's configuration"
    )
    add_site_file(registry_config)
    registry_config.add_argument(
        "--dialect",
        choices=("distribution-2.8", "distribution-3", "gitlab"),
        help="the registry's dialect (default token.dialect): YAML for Distribution, gitlab.rb Ruby for GitLab",
    )
    registry_config.add_argument(
        "--for",
        dest="target",
        choices=("local", "primary"),
        default="local",
        help="this site's registry (default) or the primary's",
    )
    registry_config.add_argument(
        "--updater-url", help="where the registry reaches the updater (default http://<updater.bind>)"
    )
    registry_config.add_argument("--jwks-path", help="Distribution 3: the JWKS file's path on the registry's host")
    registry_config.set_defaults(handler=run_registry_config)

    jwks = commands.add_parser("jwks", help="write the JWKS file a Distribution 3 registry needs for libtrust kids")
    add_site_file(jwks)
    jwks.add_argument("-o", "--output", help="write here (atomically) instead of standard output")
    jwks.set_defaults(handler=run_jwks)

    client_config = commands.add_parser(
        "client-config", help="print the docker, containerd or podman configuration that points clients at the site"
    )
    add_site_file(client_config)
    client_config.add_argument("--for", dest="client", required=True, choices=("docker", "containerd", "podman"))
    client_config.add_argument(
        "--site-url", help="the site as clients reach it (default from nginx.server_name, listen, tls_certificate)"
    )
    client_config.add_argument("--registry", help="the primary's name clients use (default primary.url's host)")
    client_config.set_defaults(handler=run_client_config)

    units = commands.add_parser("systemd-units", help="print or write systemd units for the auth service and updater")
    add_site_file(units, "the YAML site file (its absolute path goes in ExecStart)")
    units.add_argument("--user", default="geo-route", help="User= and Group= of both services (default geo-route)")
    units.add_argument("--prefix", default="/opt/geo-route", help="the virtualenv geo-route is installed in")
    units.add_argument("-o", "--output", metavar="DIR", help="write the unit files here instead of standard output")
    units.set_defaults(handler=run_systemd_units)

    devstack = commands.add_parser("devstack", help="the development stack (every real component on loopback)")
    devstack_commands = devstack.add_subparsers(dest="devstack_command", required=True)
    up = devstack_commands.add_parser("up", help="start everything, write DIR/stack.json, leave it running")
    up.add_argument("--dir", required=True, help="directory for logs, data and stack.json")
    up.add_argument("--tag-policy", choices=("pinned", "primary"), default="pinned")
    up.add_argument("--nodes", type=int, default=1, help="auth services and NGINX (each with an updater) on one index")
    up.add_argument(
        "--redis", choices=("single", "sentinel", "cluster"), default="single", help="the index's Redis topology"
    )
    up.set_defaults(handler=run_devstack_up)
    down = devstack_commands.add_parser("down", help="stop exactly the processes DIR/stack.json names")
    down.add_argument("--dir", required=True)
    down.set_defaults(handler=run_devstack_down)

    demo = commands.add_parser("demo", help="push, pull, replicate, pull, move a tag, pull: show the routes")
    demo.add_argument("--dir", help="keep the stack's files here instead of a temporary directory")
    demo.set_defaults(handler=run_demo)

    updater = commands.add_parser("updater", help="run the index updater (registry notifications in) under gunicorn")
    add_site_file(updater)
    updater.set_defaults(handler=run_updater)

    reconcile = commands.add_parser("reconcile", help="repair the index from the registries (walk, HEAD, refresh pins)")
    add_site_file(reconcile)
    reconcile.add_argument(
        "--once",
        action="store_true",
        help="one full run at once, then exit (0 only if it was clean); without it, one cycle per "
        "updater.reconcile_interval, spread over it, until SIGTERM (as the updater does)",
    )
    reconcile.add_argument(
        "--verify",
        action="store_true",
        help="then read every local manifest and blob back and check its digest (a mismatch is quarantined)",
    )
    reconcile.add_argument(
        "--verify-rate",
        type=int,
        metavar="BYTES",
        help="bytes per second --verify reads at most (default updater.verify_bytes_per_second; 0: no limit)",
    )
    reconcile.set_defaults(handler=run_reconcile)

    status = commands.add_parser(
        "status", help="hit ratio, bytes saved, lag, pins, last runs, fallbacks, Redis: from NGINX and the index"
    )
    add_site_file(status)
    status.set_defaults(handler=run_status)

    serve = commands.add_parser("serve", help="run the auth_request service under gunicorn")
    add_site_file(serve)
    serve.add_argument("--bind", action="append", help="listen address host:port (repeatable; overrides server.bind)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (overrides server.workers)")
    serve.set_defaults(handler=run_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


def run_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_validated(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(
        f"{args.config}: ok (local {settings.local_registry.url}, primary {settings.primary.url}, "
        f"redis {settings.redis.display_url}, tag policy {settings.routing.tag_policy})"
    )
    for warning in config_warnings(settings):
        print(f"  warning: {warning}", file=sys.stderr)
    return 0


def config_warnings(settings: Settings) -> list[str]:
    """Valid settings that still leave part of the promise to chance."""
    warnings = []
    routing = settings.routing
    if routing.tag_policy == "pinned" and not settings.updater.signing_key:
        warnings.append("updater.signing_key is empty: the updater cannot resolve tags, so no tag is served locally")
    if routing.tag_policy == "pinned" and routing.max_tag_age == 0:
        warnings.append("routing.max_tag_age is 0: a tag whose notifications are lost may be served stale forever")
    if settings.updater.verify_bytes_per_second == 0:
        warnings.append(
            "updater.verify_bytes_per_second is 0: a corrupted local copy is served until a client refetches it"
        )
    elif not settings.updater.signing_key:
        warnings.append("updater.signing_key is empty: the updater cannot read local content back (no verification)")
    if settings.token.dialect == "distribution-3" and not settings.token.jwks:
        warnings.append(
            "token.dialect is distribution-3 but token.jwks is empty: give the site the JWKS file its registries"
            " trust (geo-route jwks), or it refuses tokens they accept (an aud list with a libtrust kid)"
        )
    warnings.extend(signing_certificate_warnings(settings))
    return warnings


def signing_certificate_warnings(settings: Settings) -> list[str]:
    """Minted tokens carry ``x5c`` only when the signing key's certificate is in the bundle."""
    from geo_route.updater.pull_tokens import SigningKeyError, load_signing_key, signing_certificate

    try:
        key = load_signing_key(settings.updater.signing_key)
    except SigningKeyError:
        return []  # empty: warned above; unusable: reconcile and the updater say so themselves
    try:
        signing_certificate(key, settings.token.rootcertbundle)
    except SigningKeyError as exc:
        return [str(exc)]
    except KeyBundleError:
        return []  # load_validated reports the bundle itself
    return []


def load_validated(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings plus the checks that need the filesystem (the certificate bundle), as one error."""
    from geo_route.trusted_keys import load_certificates, load_jwks

    settings = load_settings(path, environ)
    problems = []
    try:
        load_certificates(settings.token.rootcertbundle)
    except KeyBundleError as exc:
        problems.append(f"token.rootcertbundle: {exc}")
    try:
        if settings.token.jwks:
            load_jwks(settings.token.jwks)
    except KeyBundleError as exc:
        problems.append(f"token.jwks: {exc}")
    if problems:
        raise ConfigError(problems)
    return settings


def run_render_nginx(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.render import RenderError, check_with_nginx, nginx_binary, render_nginx_conf, write_atomically

    try:
        text = render_nginx_conf(load_settings(args.config), args.part)
        if args.output is None:
            sys.stdout.write(text)
            return 0
        output = Path(args.output)
        write_atomically(output, text)
        if args.part == "full" and not args.no_check and nginx_binary() is not None:
            check_with_nginx(output)
            print(f"{output}: written; nginx -t ok", file=sys.stderr)
        else:
            print(f"{output}: written (not checked with nginx -t)", file=sys.stderr)
    except (ConfigError, RenderError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def run_registry_config(args: argparse.Namespace) -> int:
    from geo_route.registry_config import render_registry_config

    try:
        settings = load_settings(args.config)
        text = render_registry_config(
            settings,
            args.dialect or settings.token.dialect,
            args.target,
            updater_url=args.updater_url,
            jwks_path=args.jwks_path,
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    sys.stdout.write(text)  # holds the updater's secret: what the operator pastes; never logged
    return 0


def run_jwks(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.registry_config import jwks_document, jwks_text
    from geo_route.render import write_atomically

    try:
        text = jwks_text(jwks_document(load_validated(args.config)))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        return 0
    write_atomically(Path(args.output), text)
    print(f"{args.output}: written", file=sys.stderr)
    return 0


def run_client_config(args: argparse.Namespace) -> int:
    from geo_route.client_config import primary_origin, render_client_config, site_origin

    try:
        settings = load_settings(args.config)
        snippet = render_client_config(
            args.client, site_origin(settings, args.site_url), primary_origin(settings, args.registry)
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"# {snippet.path}:", file=sys.stderr)
    for note in snippet.notes:
        print(f"# {note}", file=sys.stderr)
    sys.stdout.write(snippet.text)  # only the file's text: `> PATH` installs it
    return 0


def run_systemd_units(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.render import write_atomically
    from geo_route.systemd_units import UnitOptions, hidden_path_warnings, render_units

    try:
        options = UnitOptions(site_file=str(Path(args.config).resolve()), prefix=args.prefix, user=args.user)
        units = render_units(load_settings(args.config), options)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for warning in hidden_path_warnings(options):
        print(f"warning: {warning}", file=sys.stderr)
    for name, text in units.items():
        if args.output is None:
            sys.stdout.write(f"# ---- {name}\n{text}")
        else:
            write_atomically(Path(args.output) / name, text)
            print(f"{Path(args.output) / name}: written", file=sys.stderr)
    return 0


def run_devstack_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.devstack.stack import STACK_FILE, bring_up
    from geo_route.errors import GeoRouteError

    try:
        info = bring_up(Path(args.dir), tag_policy=args.tag_policy, nodes=args.nodes, redis=args.redis).info
    except (GeoRouteError, TimeoutError) as exc:
        print(f"devstack up failed: {exc}", file=sys.stderr)
        return 1
    print(f"secondary (use this URL): {info.secondary_url}")
    for node in info.nodes[1:]:
        print(f"  node {node.number}:                {node.secondary_url}  (site file {node.site_file})")
    print(f"primary registry:         {info.primary_url}")
    print(f"local registry:           {info.local_registry_url}")
    print(f"token realm:              {info.token_realm}  (user {info.username}, password in {STACK_FILE})")
    print(f"stack file:               {Path(info.directory) / STACK_FILE}")
    return 0


def run_devstack_down(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.devstack.stack import tear_down
    from geo_route.errors import GeoRouteError

    try:
        stopped = tear_down(Path(args.dir))
    except GeoRouteError as exc:
        print(f"devstack down failed: {exc}", file=sys.stderr)
        return 1
    for name, gone in stopped.items():
        print(f"{name}: {'stopped' if gone else 'STILL RUNNING'}")
    return 0 if all(stopped.values()) else 1


def run_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from geo_route.devstack.demo import run_demo as demo
    from geo_route.errors import GeoRouteError

    try:
        return 0 if demo(Path(args.dir) if args.dir else None) else 1
    except (GeoRouteError, TimeoutError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


def run_updater(args: argparse.Namespace) -> int:
    from geo_route.server import serve_updater

    try:
        settings = load_settings(args.config)
        problems = settings.updater.problems_for_serving()
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.updater.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve_updater(settings)
    return 0


def run_reconcile(args: argparse.Namespace) -> int:
    from geo_route.updater.reconcile import run_reconcile_command

    try:
        settings = load_settings(args.config)
        if not settings.updater.signing_key:
            raise ConfigError(["updater.signing_key: required to mint the pull tokens reconciliation uses"])
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.updater.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    verify_rate = settings.updater.verify_bytes_per_second if args.verify_rate is None else args.verify_rate
    return run_reconcile_command(settings, args.once, print, verify_rate=verify_rate if args.verify else None)


def run_status(args: argparse.Namespace) -> int:
    """Exit 0 when every part could be read, 1 when some could not (what could is still printed)."""
    from geo_route.status import format_status, gather_status
    from geo_route.updater.reconcile import open_store

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    store = open_store(settings)
    try:
        status = gather_status(settings, store)
    finally:
        store.close()
    sys.stdout.write(format_status(status))
    return 1 if status.problems else 0


def workers_override_problem(settings: Settings, rendered: Settings) -> str:
    """``serve --workers N`` against ``server.socket_per_worker``: NGINX's upstream, rendered from the
    site file, lists one socket per worker of ``server.workers``; a service with other workers would
    leave sockets NGINX uses unserved (decisions lost to timeouts) or workers NGINX never reaches."""
    if settings.worker_sockets == rendered.worker_sockets:
        return ""
    return (
        f"serve: --workers {settings.server.workers} changes the workers' own sockets NGINX's upstream lists"
        f" (server.socket_per_worker; the site file says server.workers: {rendered.server.workers}): set"
        " server.workers in the site file and render NGINX again, or set server.socket_per_worker: false"
    )


def run_serve(args: argparse.Namespace) -> int:
    import os

    from geo_route.server import serve

    environ = dict(os.environ)
    if args.bind:
        environ["GEO_ROUTE_SERVER__BIND"] = ",".join(args.bind)
    rendered_with = dict(environ)  # what render-nginx sees: the site file and the environment
    if args.workers is not None:
        environ["GEO_ROUTE_SERVER__WORKERS"] = str(args.workers)
    try:
        settings = load_validated(args.config, environ)
        problem = workers_override_problem(settings, load_settings(args.config, rendered_with))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if problem:
        print(problem, file=sys.stderr)
        return 1
    logging.basicConfig(
        level=settings.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(settings)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
