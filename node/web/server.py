"""The admin page served by uvicorn in a thread of `idaics serve`."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time

import uvicorn

from node.config import Settings
from node.web.app import create_app
from node.web.view import NodeView

log = logging.getLogger(__name__)


def node_token(settings: Settings) -> str | None:
    """The configured token; with neither a token nor a user configured, one made for this
    node and kept in ``HOME/web-token`` (readable by its owner only), so the page is never open."""
    web = settings.web
    if web.token or (web.username and web.password):
        return web.token
    path = settings.home / "web-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    log.warning("no web token or user configured: the admin page's token is in %s", path)
    return path.read_text().strip()


class WebServer:
    def __init__(self, view: NodeView):
        web = view.settings.web
        self.token = node_token(view.settings)
        self.app = create_app(view, self.token)
        config = uvicorn.Config(
            self.app, host=web.host, port=web.port, log_level="warning", access_log=False
        )
        # run in a thread of its own, uvicorn leaves the signals alone (it takes them only in
        # the main thread): the node handles them
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="idaics-web", daemon=True)
        self.host, self.port = web.host, web.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> None:
        self.thread.start()
        t_end = time.monotonic() + 10
        while not self.server.started and time.monotonic() < t_end and self.thread.is_alive():
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError(f"the admin page could not listen on {self.host}:{self.port}")
        log.info("admin page on %s", self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
