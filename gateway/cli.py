"""``gateway serve | sim | demo``.

Every ``serve`` flag is derived from a settings field and has the same name as its environment
variable (``--port`` is ``GATEWAY_PORT``, ``--backend-kind`` is ``BACKEND_KIND``); a flag wins over
the environment, which wins over ``.env``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.config import ENV_NAMES, ConfigError, Settings, accepted, load_settings


def flag_for(env_name: str) -> str:
    """``GATEWAY_PORT`` -> ``--port``; ``BACKEND_KIND`` -> ``--backend-kind``."""
    name = env_name.lower()
    name = name.removeprefix("gateway_")
    return "--" + name.replace("_", "-")


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for env_name in ENV_NAMES:
        parser.add_argument(
            flag_for(env_name),
            dest=env_name,
            metavar="VALUE",
            default=None,
            help=f"{accepted(env_name)} [env {env_name}]",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """``.env``, then the environment, then the flags: a flag also replaces a bad or missing
    environment value, since the merged strings are checked once."""
    return load_settings(overrides={k: v for k, v in vars(args).items() if k in ENV_NAMES and v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway for inference backends.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the gateway in front of the configured backend (Granian)")
    _add_settings_flags(serve)

    from gateway.sim.cli import add_arguments as add_sim_arguments

    sim = sub.add_parser("sim", help="run the simulated inference backend (no GPU needed)")
    add_sim_arguments(sim)

    demo = sub.add_parser("demo", help="the simulator with the gateway in front of it, with a streaming example")
    demo.add_argument("--port", type=int, default=4000, help="the gateway's port (default 4000)")
    demo.add_argument("--sim-port", type=int, default=0, help="the simulator's port (default: a free one)")
    demo.add_argument("--once", action="store_true", help="stop after the example instead of waiting for Ctrl-C")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            settings = settings_from_args(args)
            return _serve(settings)
        if args.command == "sim":
            from gateway.sim.cli import run as run_sim

            return run_sim(args)
        if args.command == "demo":
            from gateway.demo import run_demo

            return run_demo(args.port, args.sim_port, args.once)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


def _serve(settings: Settings) -> int:
    import os

    from gateway import tracing
    from gateway.server import serve

    tracing.check(os.environ)  # traces asked for but impossible (say the extra missing): exit 2 here
    keys = settings.client_keys
    if settings.gateway_keys_file:
        from gateway.limits import load_keys

        load_keys(settings.gateway_keys_file)  # a bad file stops here, with exit 2
    if settings.gateway_routes:
        from gateway.backends_file import load_backends

        spec, _ = load_backends(settings.gateway_routes)  # a bad file stops here, with exit 2
        where = ", ".join(
            f"{b.name} ({b.kind}, {len(b.urls)} replica{'s' if len(b.urls) != 1 else ''})" for b in spec.backends
        )
    else:
        urls = settings.base_urls
        where = f"{settings.profile.display_name} at {', '.join(urls)}"
    print(
        f"gateway: serving http://{settings.gateway_host}:{settings.gateway_port} -> {where} "
        f"({settings.gateway_workers} worker{'s' if settings.gateway_workers != 1 else ''})",
        file=sys.stderr,
        flush=True,
    )
    if not keys and not settings.gateway_keys_file:
        print("gateway: warning: API_KEYS is empty, client auth is OFF", file=sys.stderr, flush=True)
    return serve(settings)
