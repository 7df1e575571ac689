"""Web views on the worker's port: liveness and readiness probes, stats."""

from __future__ import annotations

from faust.web import Request, Response, View

from app import app


@app.page("/healthz")
class Healthz(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "alive"})
