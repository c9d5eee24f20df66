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

from auditor.report.text import TIMES


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
  .map(e => e.tagName + (e.id ? '#' + e.id : '') + ' in ' + (e.closest('section, header')?.id || 'body') + ' '
            + Math.round(e.getBoundingClientRect().right))
"""
#: The first screen a reader sees without scrolling: 1280 x 800 CSS pixels.
SCREEN = {"width": 1280, "height": 800}
#: The text a reader sees on the first screen: every text node with a box whose top is above the fold
#: (text in a closed <details> has no box, so it does not count).
FIRST_SCREEN_JS = """
(() => {
  const seen = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.textContent.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const boxes = Array.from(range.getClientRects()).filter(b => b.width > 0 && b.height > 0);
    if (boxes.some(b => b.top < FOLD && b.bottom > 0)) seen.push(node.textContent);
  }
  return seen.join(' ').replace(/\\s+/g, ' ');
})()
""".replace("FOLD", str(SCREEN["height"]))
DETAILS_JS = "Array.from(document.querySelectorAll('details')).map(d => ({id: d.id, open: d.open}))"


def _evaluate(browser: Browser, session: str, expression: str) -> Any:
    reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
    return reply["result"].get("value")


def load_page(browser: Browser, page: Path) -> dict[str, Any]:
    """Open ``page`` in a fresh 1280 x 800 tab. Return the first screen (its text, a PNG of it, the page's
    <details> and whether each is open, all as loaded), then, with every <details> opened, the page's text,
    requests, console errors, full screenshot and PDF, and what sticks out of an A4 page in print."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.events.clear()
    for domain in ("Page", "Runtime", "Network", "Log"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {**SCREEN, "deviceScaleFactor": 1, "mobile": False},
                 session=session)  # fmt: skip
    browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")
    first_text = _evaluate(browser, session, FIRST_SCREEN_JS)
    details = _evaluate(browser, session, DETAILS_JS)
    clip = {"x": 0, "y": 0, **SCREEN, "scale": 1}
    first = browser.send("Page.captureScreenshot", {"format": "png", "clip": clip}, session=session)
    _evaluate(browser, session, "document.querySelectorAll('details').forEach(d => { d.open = true; })")
    text = _evaluate(browser, session, "document.body.innerText")
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    pdf = browser.send("Page.printToPDF", {"printBackground": True, "preferCSSPageSize": True}, session=session)
    # A4 minus the page margins is about 700 CSS pixels wide: nothing may stick out of it in print.
    browser.send("Emulation.setEmulatedMedia", {"media": "print"}, session=session)
    browser.send("Emulation.setDeviceMetricsOverride", {"width": 700, "height": 1000, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)  # fmt: skip
    overflow = _evaluate(browser, session, OVERFLOW_JS)
    events = [e for e in browser.events if e.get("sessionId") == session]
    browser.send("Target.closeTarget", {"targetId": target})
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    errors = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    errors += [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"].get("type") in ("error", "assert", "warning")]  # fmt: skip
    errors += [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
               and e["params"]["entry"].get("level") in ("error", "warning")]  # fmt: skip
    return {
        "first_screen": first_text, "first_png": base64.b64decode(first["data"]), "details": details,
        "text": text, "requests": requests, "errors": errors,
        "png": base64.b64decode(shot["data"]), "pdf": base64.b64decode(pdf["data"]), "print_overflow": overflow,
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
    hufunet = _assert_first_screen(seen, data, "HufuNet")
    assert "holding the secret bundle is the claim" in seen["first_screen"]
    assert "the suspect after restore" in seen["first_screen"]
    assert hufunet["metrics"]["binomial_p"] is None  # below the smallest float: its log10 is the number
    assert f"{TIMES}10^-3" in seen["first_screen"]
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


#: `AUDITOR_UPDATE_SCREENSHOTS=1 pytest tests/report/test_browser.py` also writes the first screens that
#: docs/report.md shows into docs/images/ (each under 200 KB); a plain run writes them to the test's tmp_path.
DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
APPENDIX = {"appendix-restore", "appendix-loading", "appendix-tool"}


def _keep_first_screen(png: bytes, name: str, tmp_path: Path) -> None:
    assert png.startswith(b"\x89PNG")
    (tmp_path / name).write_bytes(png)
    if os.environ.get("AUDITOR_UPDATE_SCREENSHOTS") == "1":
        assert len(png) < 200_000, f"{name} is {len(png):,} bytes: docs images stay under 200 KB"
        DOCS_IMAGES.mkdir(exist_ok=True)
        (DOCS_IMAGES / name).write_bytes(png)


def _assert_first_screen(seen: dict[str, Any], data: dict[str, Any], title: str) -> dict[str, Any]:
    """The first 1280 x 800 screen holds the verdict, whose watermark, the scheme, the strength, the null and
    the limits, and the appendix is collapsed; returns the deciding finding."""
    from auditor.report.text import VERDICT_WORDS, power_of_ten

    first = seen["first_screen"]
    finding = next(f for f in data["findings"] if f["scheme"] and f["verdict"] == data["verdict"])
    screen = finding["first_screen"]
    assert f"Verdict: {VERDICT_WORDS[data['verdict']]}" in first
    assert screen["owner"] in first, "the owner identity, in full"
    assert f"{title} (detector {finding['detector']}" in first
    assert "How strong" in first and screen["statistic"] in first
    assert power_of_ten(screen["log10_p"]) in first and f"log10 {screen['log10_p']:.2f}, exact" in first
    assert "Under which null" in first and screen["null_hypothesis"] in first
    assert "What it does not prove" in first and screen["not_proven"] in first
    assert {d["id"] for d in seen["details"]} >= APPENDIX
    assert [d for d in seen["details"] if d["open"]] == [], "the appendix starts collapsed"
    return finding


def test_first_screen_of_a_found_report(browser: Browser, gr_reports: dict[str, Any], tmp_path: Path) -> None:
    data = json.loads(gr_reports["json"].read_text())
    seen = load_page(browser, gr_reports["html"])
    finding = _assert_first_screen(seen, data, "Greedy Residuals")
    statement = data["bundles"][0]["identity"]["message"]
    assert f"“{statement}”" in seen["first_screen"], "the signed statement, not cut"
    assert "its signature verifies under the ed25519 key" in seen["first_screen"]
    assert finding["first_screen"]["log10_p"] < -60 and f"{TIMES}10^-" in seen["first_screen"]
    assert "Findings at a glance" not in seen["first_screen"]  # the first screen is the claim alone
    _keep_first_screen(seen["first_png"], "report_found.png", tmp_path)


def test_first_screen_of_a_not_found_report(
    browser: Browser, gr_owner: Any, clean_model: Callable[..., Path], run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    suspect = clean_model(tmp_path / "independent.safetensors")
    code, _, stderr = run_cli("audit", suspect, "--bundle", gr_owner.out / "owner_bundle.json", "--out", page)
    assert code == 1, stderr
    data = json.loads((tmp_path / "report.json").read_text())
    seen = load_page(browser, page)
    assert seen["errors"] == [] and seen["requests"] == [page.as_uri()]
    _assert_first_screen(seen, data, "Greedy Residuals")
    assert "Whose watermark was looked for" in seen["first_screen"]
    assert data["bundles"][0]["identity"]["message"] in seen["first_screen"]
    assert "no evidence against chance" in seen["first_screen"]
    assert not re.search(r"probability 1\b(?![/.])", seen["text"]), "a p-value of 1 is said in words"
    _keep_first_screen(seen["first_png"], "report_not_found.png", tmp_path)
