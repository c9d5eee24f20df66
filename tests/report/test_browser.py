"""The HTML report in a real browser: headless Chromium driven over the DevTools protocol.

The page must load with no console error and no network request besides the
file itself, show the verdict and the key numbers as text, and print. A
screenshot and a PDF go to the test's tmp_path for a person to look at (pytest
keeps the last runs' folders under its base temp directory).

The test never installs anything: `make setup` (and .ci/run) install Chromium.
It is found as $CHROMIUM or on PATH; where it is missing the test fails under
CI=true (a browser check that silently skips would let a broken report
through) and skips, saying why, on a developer's machine.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def chromium_binary() -> str:
    """Chromium's path: ``$CHROMIUM`` (a path or a name on PATH), else ``chromium`` or ``chromium-browser``."""
    wanted = os.environ.get("CHROMIUM")
    for name in [wanted] if wanted else ["chromium", "chromium-browser"]:
        if found := shutil.which(name):
            return found
    reason = f"CHROMIUM={wanted!r} is not an executable" if wanted else "chromium is not on PATH"
    reason += " (install it with `make setup`, or `apt-get install -y chromium`)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: the browser check must run in CI")
    pytest.skip(reason)


#: Puts the two pipe ends on fds 3 and 4, where Chromium looks for them, then becomes Chromium. (A shell
#: cannot: dash refuses fds above 9; preexec_fn is unsafe with threads.) Both ends move above fd 9 first,
#: so putting one on fd 3 cannot overwrite the other.
TRAMPOLINE = """
import fcntl, os, sys
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]]
os.dup2(high[0], 3)
os.dup2(high[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """A headless Chromium on the DevTools pipe (fd 3 in, fd 4 out; messages end with NUL)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe",
            "about:blank",
        ]  # fmt: skip
        self.log = profile.parent / f"{profile.name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", TRAMPOLINE, str(to_browser_r), str(from_browser_w), *args],
                pass_fds=(to_browser_r, from_browser_w),
                stdout=log,
                stderr=log,
            )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Call ``method`` and return its result; events that arrive meanwhile are kept in ``events``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if "dbus" not in line]
            raise RuntimeError(f"chromium exited ({self.proc.poll()}): {' | '.join(lines[-5:])}") from None
        deadline = time.monotonic() + 60
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        """The first event ``method`` (already received or still to come)."""
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless Chromium for the module, its profile (user-data-dir) and log in a temp folder."""
    b = Browser(chromium_binary(), tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield b
    finally:
        b.close()


OVERFLOW_JS = """
Array.from(document.querySelectorAll('table, pre, svg, section, article, header'))
  .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
  .map(e => e.tagName + (e.id ? '#' + e.id : '') + ' ' + Math.round(e.getBoundingClientRect().right))
"""


def load_page(browser: Browser, page: Path) -> dict[str, Any]:
    """Open ``page`` in a fresh tab; return its text, requests, console errors, screenshot and PDF."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.events.clear()
    for domain in ("Page", "Runtime", "Network", "Log"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 900, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)  # fmt: skip
    browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")
    text = browser.send(
        "Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True}, session=session
    )["result"]["value"]
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    pdf = browser.send("Page.printToPDF", {"printBackground": True, "preferCSSPageSize": True}, session=session)
    # A4 minus the page margins is about 700 CSS pixels wide: nothing may stick out of it in print.
    browser.send("Emulation.setEmulatedMedia", {"media": "print"}, session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 700, "height": 1000, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)  # fmt: skip
    overflow = browser.send("Runtime.evaluate", {"expression": OVERFLOW_JS, "returnByValue": True}, session=session)
    events = [e for e in browser.events if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"].get("type") in ("error", "assert", "warning")]  # fmt: skip
    errors += [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"].get("level") in ("error", "warning")]  # fmt: skip
    return {
        "text": text, "requests": requests, "errors": errors,
        "png": base64.b64decode(shot["data"]), "pdf": base64.b64decode(pdf["data"]),
        "print_overflow": overflow["result"]["value"],
    }  # fmt: skip


def test_report_renders_offline_in_chromium(browser: Browser, gr_reports: dict[str, Path], tmp_path: Path) -> None:
    html = gr_reports["html"]
    data = json.loads(gr_reports["json"].read_text())
    seen = load_page(browser, html)
    assert seen["requests"] == [html.as_uri()], "the report must load nothing but itself"
    assert seen["errors"] == []
    text = seen["text"]
    assert "Verdict: watermark found" in text
    assert data["suspect"]["sha256"] in text
    gr = next(f for f in data["findings"] if f["scheme"] == "greedy-residuals")
    assert gr["summary"] in text
    assert f"{gr['metrics']['best_k']}/{gr['metrics']['bits']}" in text  # the bar chart's label
    assert f"{gr['metrics']['best_rate']:.2%}" in text
    assert data["command"] in text
    assert gr_reports["case_id"] in text
    (tmp_path / "report.png").write_bytes(seen["png"])
    (tmp_path / "report.pdf").write_bytes(seen["pdf"])
    assert seen["png"].startswith(b"\x89PNG") and len(seen["png"]) > 20_000
    assert seen["pdf"].startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page[^s]", seen["pdf"])) >= 2
    assert seen["print_overflow"] == [], "in print, these elements stick out of an A4 page"


def test_summary_renders_offline_in_chromium(browser: Browser, batch_run: dict[str, Any], tmp_path: Path) -> None:
    page = batch_run["out"] / "summary.html"
    seen = load_page(browser, page)
    assert seen["requests"] == [page.as_uri()]
    assert seen["errors"] == []
    assert seen["print_overflow"] == []
    assert "3 suspects: 1 watermark found, 1 could not be audited, 1 watermark not found" in seen["text"]
    assert batch_run["broken"].name in seen["text"]
    (tmp_path / "summary.png").write_bytes(seen["png"])


def test_hufunet_and_restore_pictures_render(
    browser: Browser,
    hufunet_owner: Any,
    tmp_path: Path,
    run_cli: Callable[..., Any],
    plugin: Callable[..., Any],
    aligner: Any,
) -> None:
    from auditor import hookimpl

    class Plugin:
        @hookimpl
        def register_restorers(self, register: Any) -> None:
            register(aligner)

    page = tmp_path / "report.html"
    model, bundle = hufunet_owner.model_file, hufunet_owner.out / "owner_bundle.json"
    with plugin(Plugin(), "test-aligner"):
        code, _, stderr = run_cli("audit", model, "--bundle", bundle, "--reference", model, "--out", page)
    assert code == 0, stderr
    data = json.loads((tmp_path / "report.json").read_text())
    seen = load_page(browser, page)
    assert seen["requests"] == [page.as_uri()]
    assert seen["errors"] == []
    assert seen["print_overflow"] == []
    hufunet = next(f for f in data["findings"] if f["scheme"] == "hufunet")
    assert f"Acc_combined {hufunet['metrics']['acc_combined']:.2%}" in seen["text"]
    assert "8 suspect channels, 6 moved, 0 dropped; 8 reference channels" in seen["text"]
    (tmp_path / "report_hufunet_restore.png").write_bytes(seen["png"])


def test_the_example_plugin_is_shown_in_its_own_words_and_picture(
    browser: Browser, gr_owner: Any, tmp_path: Path, run_cli: Callable[..., Any], plugin: Callable[..., Any]
) -> None:
    """The third-party example (examples/auditor-example-detector) gets the report quality of a built-in:
    its explanation, its metric labels in its order, its figure, drawn in a real browser."""
    import importlib.util

    source = Path(__file__).resolve().parents[2] / "examples" / "auditor-example-detector" / "auditor_example_detector"
    spec = importlib.util.spec_from_file_location("auditor_example_detector", source / "__init__.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    page = tmp_path / "report.html"
    with plugin(example, "example_detector"):
        code, _, stderr = run_cli("audit", gr_owner.files["safetensors"], "--out", page,
                                  "--option", "example-non-finite.min_count=1")  # fmt: skip
    assert code == 3, stderr  # bundle-free checks never decide the verdict
    seen = load_page(browser, page)
    assert seen["requests"] == [page.as_uri()]
    assert seen["errors"] == []
    assert seen["print_overflow"] == []
    text = seen["text"]
    assert example.NonFiniteWeights.explanation in text
    numbers = text[text.index("non-finite weights") :]
    assert numbers.index("non-finite weights") < numbers.index("weights read") < numbers.index("tensors with")
    assert "Share of finite weights in each tensor" in text and "all finite" in text  # the figure and its mark
    assert "example-non-finite.min_count=1" in text  # the reproducible command
    (tmp_path / "report_example_plugin.png").write_bytes(seen["png"])
