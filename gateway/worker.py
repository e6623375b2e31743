"""Building a worker's backends: one pool per replica, from the topology the settings declare."""

from __future__ import annotations

from collections.abc import Mapping

import httpcore

from gateway.backends_file import BackendSpec, load_backends
from gateway.balance import Backend, Replica
from gateway.config import Balance, Policy, Settings
from gateway.pool import Pool
from gateway.profiles import PROFILES, Profile
from gateway.target import Target, make_ssl_context
from gateway.topology import Topology, settings_backend


def declared_backends(settings: Settings) -> tuple[list[BackendSpec], dict[str, str], bool]:
    """The backends the settings declare, each one's key, and whether the one backend serves any
    model (settings without a backends file) rather than the models it lists."""
    if settings.gateway_routes:
        spec, keys = load_backends(settings.gateway_routes)
        return list(spec.backends), keys, False
    only = settings_backend(settings)
    return [only], {only.name: settings.backend_api_key}, True


def build_topology(
    specs: list[BackendSpec],
    keys: Mapping[str, str],
    any_model: bool,
    settings: Settings,
    network: httpcore.AsyncNetworkBackend,
) -> Topology:
    """The worker's backends, with a pool for each replica (opened lazily, closed at shutdown)."""
    backends = [build_backend(spec, keys.get(spec.name, ""), settings, network) for spec in specs]
    return Topology(backends, any_model=backends[0] if any_model else None, model_name=settings.model_name)


def build_backend(spec: BackendSpec, key: str, settings: Settings, network: httpcore.AsyncNetworkBackend) -> Backend:
    s = settings
    profile = PROFILES[spec.kind]
    replicas = []
    for i, url in enumerate(spec.urls):
        target = Target(url, profile, key)
        ssl_context = make_ssl_context(s, url)
        pool = Pool(
            target,
            size=s.gateway_pool_size,
            connect_timeout=s.gateway_connect_timeout,
            pool_timeout=s.gateway_pool_timeout,
            keepalive=s.gateway_keepalive,
            ssl_context=ssl_context,
            network=network,
        )
        replicas.append(Replica(target, pool, ssl_context, spec.weights[i] if spec.weights else 1))
    return Backend(
        spec.name,
        profile,
        spec.resolved_capabilities(),
        replicas,
        models=tuple(spec.models),
        aliases=spec.aliases,
        eject_after=s.gateway_eject_after,
        eject_seconds=s.gateway_eject_seconds,
        max_inflight=s.gateway_max_inflight,
        queue_size=s.gateway_queue_size,
        queue_timeout=s.gateway_queue_timeout,
        policy=resolve_policy(spec.balance or s.gateway_balance, profile),
    )


def resolve_policy(policy: Policy, profile: Profile) -> Balance:
    """``auto``: by prefix for a kind with a prefix cache (``Profile.prefix_cache``), else power of
    two choices; ``p2c`` and ``prefix`` as given. It matters only with several replicas."""
    if policy == "auto":
        return "prefix" if profile.prefix_cache else "p2c"
    return policy
