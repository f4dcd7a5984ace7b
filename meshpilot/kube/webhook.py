"""The mutating admission webhook: ``POST /inject`` takes an AdmissionReview v1 for a Pod and
answers with a JSONPatch adding the sidecar (kube/inject.py), over HTTPS as the API server requires."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from pathlib import Path

from aiohttp import web

from meshpilot.frontdoor import HttpLimits, raise_fd_limit, start_front_door
from meshpilot.kube.inject import InjectConfig, admission_response

__all__ = ["build_app", "serve"]

log = logging.getLogger("meshpilot.kube")


def build_app(cfg: InjectConfig) -> web.Application:
    async def inject(request: web.Request) -> web.Response:
        status, body = admission_response(await request.read(), cfg)
        if status != 200:
            log.warning("event=admission_rejected reason=%s", body.get("error"))
        return web.json_response(body, status=status)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/inject", inject)
    app.router.add_get("/healthz", healthz)
    return app


def serve(host: str, port: int, cert: str, key: str, cfg: InjectConfig, ready_file: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        print(f"meshpilot webhook: cannot load --cert/--key: {exc}")
        return 2

    async def main() -> None:
        raise_fd_limit()
        runner, bound = await start_front_door(build_app(cfg), host, port, HttpLimits(), ssl_context=ctx)
        log.info("event=webhook_ready port=%d", bound)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "port": bound}))
            tmp.replace(ready_file)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
