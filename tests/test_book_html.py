"""The built book: a -W -n build from the committed notebooks, then every page in headless Chromium.

The build is what `make html` runs (warnings are errors, every cross-reference must resolve),
into a temporary folder. The browser (Debian's ``chromium``, or a Chrome already installed;
nothing downloads one) opens each page with every host name unresolvable, so a page that needs
the network fails: it must render, typeset all of its maths with the bundled MathJax, load every
image (each with alt text) and show no error output. Chromium is driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``), no port and no extra package.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

PAGE_REPORT = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const images = [...document.images];
  await Promise.all(images.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const mathjax = document.querySelector('script[src*="mathjax"]');
  return {
    title: document.title,
    mathjax_src: mathjax ? mathjax.src : null,
    math: document.querySelectorAll('span.math, div.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    math_errors: document.querySelectorAll('mjx-merror').length,
    images: images.map(i => ({src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0,
                              alt: i.getAttribute('alt') || ''})),
    error_outputs: document.querySelectorAll('.output.traceback, .output.error, .output.stderr').length,
    raw_tables: [...document.querySelectorAll('.cell_output')].filter(e => /\\|\\s*(---|\u2014)\\s*\\|/.test(e.textContent)).length,
    output_tables: document.querySelectorAll('.cell_output table').length,
    unresolved_glue: [...document.querySelectorAll('.pasted-text, .pasted-inline')].filter(e => !e.textContent.trim()).length,
    text_length: document.body.innerText.length,
    code_blocks: document.querySelectorAll('pre').length,
    cut_code: [...document.querySelectorAll('pre')].filter(p => p.scrollWidth > p.clientWidth + 1)
                .map(p => p.textContent.split('\\n').reduce((a, b) => (b.length > a.length ? b : a), '').slice(0, 80)),
  };
})()"""


def _browser() -> str | None:
    return next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """The book built from the working tree with warnings as errors (as `make html`)."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    if not jupyter_book.exists():
        pytest.skip("jupyter-book is not installed in this environment (requirements.txt)")
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run([str(jupyter_book), "build", "--path-output", str(out), "--warningiserror", "--nitpick",
                             "--keep-going", str(REPO)], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"book build failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return out / "_build" / "html"


def test_build_has_every_chapter_and_bundled_mathjax(html):
    pages = {p.stem for p in (html / "book").glob("*.html")}
    assert {"intro", "01_data", "04_anchors", "05_pseudo_labels", "07_stages", "10_paper_vs_code", "api"} <= pages
    assert (html / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert "cdn.jsdelivr" not in (html / "book" / "05_pseudo_labels.html").read_text()


class DevTools:
    """A headless browser driven over the DevTools protocol on fds 3 (commands) and 4 (replies)."""

    def __init__(self, browser: str, profile: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def wire_pipes():
            commands, replies = os.dup(commands_read), os.dup(replies_write)
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        self.process = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--allow-file-access-from-files", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=wire_pipes)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(f"{method}: no reply in {timeout} s")

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read())
        raise TimeoutError(f"no {method} in {timeout} s")

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def report(self, url: str) -> dict:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired")
        result = self.send("Runtime.evaluate", {"expression": PAGE_REPORT, "awaitPromise": True, "returnByValue": True},
                           session=session, timeout=120)
        self.send("Target.closeTarget", {"targetId": target})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{url}: {result['exceptionDetails']}")
        return result["result"]["value"]

    def close(self) -> None:
        os.close(self._commands)
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self._replies)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = _browser()
    if executable is None:
        pytest.skip("no headless Chromium: install Debian's `chromium` package (make test does so in CI as root)")
    tools = DevTools(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield tools
    tools.close()


def test_every_page_renders_offline_with_maths_images_and_no_errors(html, browser):
    pages = sorted((html / "book").glob("*.html"))
    reports = {page.stem: browser.report(page.as_uri()) for page in pages}
    problems = []
    for name, r in reports.items():
        if r["text_length"] < 200:
            problems.append(f"{name}: almost no text ({r['text_length']} characters)")
        if r["math"] and (r["typeset"] < r["math"] or r["math_errors"]):
            problems.append(f"{name}: {r['math']} maths elements, {r['typeset']} typeset, {r['math_errors']} errors")
        if r["math"] and "_static/mathjax/" not in (r["mathjax_src"] or ""):
            problems.append(f"{name}: MathJax not served from the book ({r['mathjax_src']})")
        problems += [f"{name}: image {i['src']} did not load" for i in r["images"] if not i["loaded"]]
        problems += [f"{name}: image {i['src']} has no alt text" for i in r["images"] if not i["alt"].strip()]
        if r["error_outputs"]:
            problems.append(f"{name}: {r['error_outputs']} error or stderr outputs")
        if r["raw_tables"]:
            problems.append(f"{name}: {r['raw_tables']} cell outputs show a Markdown table as raw text")
        if r["unresolved_glue"]:
            problems.append(f"{name}: {r['unresolved_glue']} empty glued values")
        problems += [f"{name}: a code line runs past the column and is cut: {line!r}" for line in r["cut_code"]]
    assert not problems, "\n".join(problems)
    assert sum(r["typeset"] for r in reports.values()) > 10, "no page typeset any maths"
    assert sum(len(r["images"]) for r in reports.values()) > 10, "the chapters show almost no figures"
    assert reports["08_results"]["output_tables"] >= 6, "the results chapter renders too few tables"
