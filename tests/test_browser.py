"""The admin page in headless Chromium while a phantom study goes through a real node."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from node.phantom.generate import SERIES_DIR
from tests.servers import NodeProcess, dcmtk, free_port, node_config, orthanc

TOKEN = "browser-test-token"


class Browser:
    """Headless Chromium driven over the DevTools protocol."""

    def __init__(self, workdir: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if exe is None:
            raise RuntimeError("Chromium is not installed (Debian package chromium; deploy/test.sh installs it)")
        port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--disable-extensions", f"--remote-debugging-port={port}",
             f"--user-data-dir={workdir / 'chromium-profile'}", "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not start")
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.next_id = 0
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def go(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float = 60):
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"not true within {timeout} s: {expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


ROWS = "JSON.stringify([...document.querySelectorAll('#jobs tbody tr')].map(r => [r.dataset.job, r.dataset.state]))"


def test_the_dashboard_shows_a_study_going_through_and_its_job_page(phantom, browser, tmp_path):
    home = tmp_path / "node"
    with orthanc(tmp_path / "orthanc") as pacs:
        dest = {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        web_port = free_port()
        cfg, values = node_config(home, destinations=[dest], default_destinations=["pacs"],
                                  web={"enabled": True, "port": web_port, "token": TOKEN})
        node = NodeProcess(cfg, home, values["receiver"]["port"], "IDAICS").start()
        try:
            base = f"http://127.0.0.1:{web_port}"
            browser.go(f"{base}/login?token={TOKEN}&next=/")
            browser.wait("document.querySelector('#refreshed') && document.querySelector('#refreshed').textContent")
            assert json.loads(browser.js(ROWS)) == []
            assert "up" in browser.wait("document.querySelector('#health .ok') && "
                                        "document.querySelector('#health').textContent")
            sender = subprocess.Popen([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "IDAICS", "-R", "127.0.0.1",
                                       str(node.port), "+sd", str(phantom.folder / SERIES_DIR)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seen: list[str] = []
            t_end = time.monotonic() + 240
            while time.monotonic() < t_end:
                rows = json.loads(browser.js(ROWS))
                if rows and (not seen or seen[-1] != rows[0][1]):
                    seen.append(rows[0][1])
                if rows and rows[0][1] in ("DONE", "FAILED", "SKIPPED"):
                    break
                time.sleep(0.3)
            assert sender.wait(60) == 0
            assert seen and seen[-1] == "DONE", seen
            assert len(seen) >= 2, f"the page did not show the job before it was done: {seen}"
            shots = [browser.screenshot(tmp_path / "dashboard.png")]

            browser.js("document.querySelector('#jobs tbody a').click()")
            browser.wait("document.querySelector('#job-state') && document.querySelector('#job-state').textContent"
                         " === 'DONE'")
            levels = browser.wait("document.querySelectorAll('#levels tbody tr').length")
            assert levels >= 4
            browser.wait("[...document.querySelectorAll('#previews img')].length > 0 && "
                         "[...document.querySelectorAll('#previews img')].every(i => i.complete && i.naturalWidth > 0)")
            deliveries = browser.js("document.querySelector('#deliveries tbody').textContent")
            assert "SENT" in deliveries and "pacs" in deliveries
            assert "seg.dcm" in browser.js("document.querySelector('#objects').textContent")
            assert not browser.js("document.querySelector('#retry').disabled")
            shots.append(browser.screenshot(tmp_path / "job.png"))
            for shot in shots:
                assert shot.stat().st_size > 20_000
            if os.environ.get("IDAICS_SCREENSHOT_DIR"):  # to refresh the README's pictures
                for shot in shots:
                    shutil.copy(shot, Path(os.environ["IDAICS_SCREENSHOT_DIR"]) / shot.name)
        finally:
            node.stop()
