"""The admin page in headless Chromium while a phantom study goes through a real node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from node.phantom.generate import SERIES_DIR
from tests.browser import Browser
from tests.servers import NodeProcess, dcmtk, free_port, node_config, orthanc

TOKEN = "browser-test-token"


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
        cfg, values = node_config(
            home,
            destinations=[dest],
            default_destinations=["pacs"],
            web={"enabled": True, "port": web_port, "token": TOKEN},
        )
        node = NodeProcess(cfg, home, values["receiver"]["port"], "IDAICS").start()
        try:
            base = f"http://127.0.0.1:{web_port}"
            browser.go(f"{base}/login?token={TOKEN}&next=/")
            browser.wait(
                "document.querySelector('#refreshed') && document.querySelector('#refreshed').textContent"
            )
            assert json.loads(browser.js(ROWS)) == []
            assert "up" in browser.wait(
                "document.querySelector('#health .ok') && "
                "document.querySelector('#health').textContent"
            )
            sender = subprocess.Popen(
                [
                    dcmtk("storescu"),
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "IDAICS",
                    "-R",
                    "127.0.0.1",
                    str(node.port),
                    "+sd",
                    str(phantom.folder / SERIES_DIR),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
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
            browser.wait(
                "document.querySelector('#job-state') && document.querySelector('#job-state').textContent"
                " === 'DONE'"
            )
            levels = browser.wait("document.querySelectorAll('#levels tbody tr').length")
            assert levels >= 4
            browser.wait(
                "[...document.querySelectorAll('#previews img')].length > 0 && "
                "[...document.querySelectorAll('#previews img')].every(i => i.complete && i.naturalWidth > 0)"
            )
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
