"""The topology: which backends there are and which models each serves; the routing stage.

There is one request path. A backends file (``GATEWAY_ROUTES``) declares the backends and their
models; settings without one become, at load time, a topology of one backend that serves any
model (``BACKEND_*``). The difference between the two is data, never a mode:

- a model the table names goes to its backend (an alias is rewritten to its model);
- any other model, or none, goes to the backend that serves any model when there is one, and is
  otherwise a 404 ``model_not_found`` (none: a 400, unless ``MODEL_NAME`` fills it in);
- a capability is checked as early as the backend is known: before the body is read when only
  one backend could take the request, after the model is read otherwise; never skipped.
"""

from __future__ import annotations

import orjson

from gateway import errors
from gateway.backends_file import BackendSpec
from gateway.balance import Backend
from gateway.config import Settings
from gateway.profiles import Support
from gateway.routes import Route


def settings_backend(settings: Settings) -> BackendSpec:
    """The one backend that settings without a backends file describe (named after its kind)."""
    kind = settings.profile.kind
    return BackendSpec(
        name=kind,
        kind=kind,
        urls=list(settings.base_urls),
        capabilities=settings.backend_capabilities,
        balance=settings.gateway_balance,
    )


class Topology:
    """A worker's backends, its model table, and the routing decisions made from them."""

    __slots__ = ("backends", "by_model", "any_model", "answers_models", "model_name", "by_prefix", "_only")

    def __init__(self, backends: list[Backend], *, any_model: Backend | None, model_name: str = "") -> None:
        self.backends = backends
        #: Served model or alias -> (its backend, the model name to send).
        self.by_model: dict[str, tuple[Backend, str]] = {}
        for backend in backends:
            for model in backend.models:
                self.by_model[model] = (backend, model)
            for alias, model in backend.aliases.items():
                self.by_model[alias] = (backend, model)
        #: The backend that takes models the table does not name (settings without a backends file).
        self.any_model = any_model
        #: Whether ``GET /v1/models`` is the gateway's to answer (from the table); otherwise the
        #: one backend that serves any model answers it.
        self.answers_models = any_model is None
        #: ``MODEL_NAME``: filled into requests that name no model.
        self.model_name = model_name
        #: Whether any backend balances by prefix: the routing stage then reads the prompt too.
        self.by_prefix = any(b.affinity is not None for b in backends)
        self._only = backends[0] if len(backends) == 1 else None

    @property
    def first(self) -> Backend:
        """Where requests that carry no model to route by go (other ``/v1`` paths)."""
        return self.backends[0]

    @property
    def replicas(self) -> int:
        return sum(len(b.replicas) for b in self.backends)

    def known_before_body(self, route: Route) -> Backend | None:
        """The backend a request on ``route`` goes to, when it is known before the body is read,
        with the route's capability checked (501 when the backend lacks it)."""
        backend = self._only if route.json_body else self.backends[0]
        if backend is not None:
            check_capability(backend, route.capability)
        return backend

    def route_model(self, model: str | None) -> tuple[Backend, str | None]:
        """The backend for a request's ``model``, and the model name to send (None: as it is)."""
        name = model or self.model_name
        if name:
            found = self.by_model.get(name)
            if found is not None:
                return found
            if self.any_model is None:
                raise errors.model_not_found(name)
            return self.any_model, name
        if self.any_model is None:
            raise errors.missing_model()
        return self.any_model, None

    def model_list(self) -> bytes:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": backend.name}
            for name, (backend, _) in self.by_model.items()
        ]
        return orjson.dumps({"object": "list", "data": data})

    def known_models(self) -> set[str]:
        names = set(self.by_model)
        if self.model_name:
            names.add(self.model_name)
        return names


def upstream_path(backend: Backend, route: Route) -> bytes:
    """The backend kind's own spelling of a route whose path differs between engines
    (``Profile.paths``, else the route's default), relative to the server root; 501 when the kind
    does not serve it (TGI's detokenize)."""
    path = backend.profile.path_for(route)
    if path is None:
        raise errors.not_supported(backend.profile.display_name, route.name)
    return path.encode()


def check_capability(backend: Backend, capability: str | None) -> None:
    """The capability stage: 501 when the backend's kind does not support ``capability``."""
    if capability is not None and backend.capabilities[capability] is Support.UNSUPPORTED:
        raise errors.not_supported(backend.profile.display_name, capability)
