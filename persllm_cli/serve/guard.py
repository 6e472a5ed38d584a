"""Without an API key, only requests addressed to this machine's loopback names are served.

A keyless server on 127.0.0.1 is reachable from any web page the user opens: the page cannot read
another origin's answers, unless its own host name is made to resolve to 127.0.0.1 (DNS rebinding);
then the browser calls this server with the attacker's name in the `Host` header. So, keyless, the
`Host` must be 127.0.0.1, localhost, [::1] or the bound address, with the port the request came in on;
anything else is a 421 in OpenAI's error shape. With a key the key guards every /v1 request instead
(a page cannot send it without knowing it), and any Host is served, as behind a proxy.
"""

from __future__ import annotations

from typing import Any

from persllm_cli.serve.answer import error_response

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def loopback_names(bound: str) -> frozenset[str]:
    """The Host names a keyless server bound to `bound` answers to (without the port)."""
    host = f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound
    return frozenset({*LOOPBACK_NAMES, host.lower()})


class HostGuard:
    """ASGI middleware: refuse a request whose Host is not one of `names` with the request's port
    (`names` None: every Host is served)."""

    def __init__(self, app: Any, names: frozenset[str] | None) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.names is None:
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1").strip().lower()
        port = (scope.get("server") or (None, None))[1]
        allowed = {f"{name}:{port}" for name in self.names}
        if port == 80:
            allowed |= self.names
        if host in allowed:
            return await self.app(scope, receive, send)
        shown = "".join(ch for ch in host[:80] if ch.isprintable()) or "none"
        message = (f"this server answers requests for 127.0.0.1:{port}, localhost:{port} or [::1]:{port} only, "
                   f"not Host {shown!r} (set PERSLLM_API_KEY to serve other names)")
        await error_response(421, message, code="misdirected_request")(scope, receive, send)
