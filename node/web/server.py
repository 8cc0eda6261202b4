"""The admin page served by uvicorn in a thread of `idaics serve`."""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from node.web.app import NodeView, create_app

if TYPE_CHECKING:
    from node.service import Node

log = logging.getLogger(__name__)


def node_token(node: Node) -> str | None:
    """The configured token; with neither a token nor a user configured, one made for this
    node and kept in ``HOME/web-token`` (readable by its owner only), so the page is never open."""
    web = node.settings.web
    if web.token or (web.username and web.password):
        return web.token
    path = node.settings.home / "web-token"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    log.warning("no web token or user configured: the admin page's token is in %s", path)
    return path.read_text().strip()


class WebServer:
    def __init__(self, node: Node):
        web = node.settings.web
        self.token = node_token(node)
        view = NodeView(node.settings, node.sessions, receiver_listening=lambda: node.receiver.listening,
                        local_workers=node.workers_alive)
        self.app = create_app(view, self.token)
        config = uvicorn.Config(self.app, host=web.host, port=web.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # the node handles signals
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
