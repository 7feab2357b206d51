"""End-to-end check of the explorer in a real browser: `make ui-check` (not part of `make test`).

Starts a headless JupyterLab on this repository and a headless Chromium (Debian: `apt-get install -y
chromium`), opens notebooks/06_explorer.ipynb, runs all its cells, clicks "generate" with a real mouse
event, waits for the original and erased images, and saves a screenshot to outputs/ui_check/explorer.png.
The browser is driven over the Chrome DevTools protocol (websocket-client, which jupyter_server already
requires). JupyterLab's autosave is off and the notebook is checked unchanged afterwards, so it stays
committed without outputs. Without an erased toy model under outputs/<run_name>/, one is trained first
with `doco train --params params/toy_world.yaml` (about 2 minutes on a laptop CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64decode
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/06_explorer.ipynb"


class UICheckFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise UICheckFailed("Chromium was not found (tried $CHROMIUM, chromium, chromium-browser, google-chrome); on "
                        "Debian or Ubuntu: `apt-get install -y chromium`.")


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise UICheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")


def http_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except OSError:
        return None


class DevTools:
    """The few Chrome DevTools protocol calls this check needs, over one page's websocket."""

    def __init__(self, websocket_url: str):
        import websocket

        self.socket = websocket.create_connection(websocket_url, timeout=60, suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # skip events until our answer
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise UICheckFailed(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise UICheckFailed(f"page script failed: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


def ensure_erased_model(run_name: str) -> None:
    """The screenshot is only meaningful with a really erased model: train the toy one if there is none."""
    if any((REPO_ROOT / "outputs" / run_name).glob("*/unet/config.json")):
        return
    print(f"no erased model under outputs/{run_name}/: training one with `doco train --params "
          "params/toy_world.yaml` (about 2 minutes on a laptop CPU)", flush=True)
    subprocess.run([sys.executable, "-m", "doco_lib", "train", "--params", "params/toy_world.yaml", "--quiet"],
                   cwd=REPO_ROOT, check=True)


def write_lab_settings(directory: Path) -> None:
    """No autosave (the notebook must stay output-free), no news or update pop-ups over the screenshot."""
    settings = {"@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
                "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                    {"fetchNews": "false", "checkForUpdates": False}}
    for name, values in settings.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A child in its own process group, so that it and its children (kernel, renderers) stop together."""
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
                            start_new_session=True)


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


JS_BUTTON = "[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'generate')"
# The notebook's panel, found by path: a headless page has no focus, so JupyterLab has no "current" widget.
JS_PANEL = f"[...jupyterapp.shell.widgets('main')].find(w => w.context && w.context.path === '{NOTEBOOK}')"
JS_KERNEL_IDLE = (f"(() => {{ const p = window.jupyterapp && {JS_PANEL}; const k = p && p.sessionContext.session && "
                  "p.sessionContext.session.kernel; return !!k && k.status === 'idle'; })()")


def drive(devtools: DevTools, lab_url: str, screenshot: Path, timeout: float) -> str:
    """Open the notebook, run it, click generate, wait for the images; returns the explorer's status line."""
    devtools.call("Page.navigate", url=f"{lab_url}/lab/tree/{NOTEBOOK}")
    wait_until(lambda: devtools.evaluate(JS_KERNEL_IDLE), 120, "JupyterLab to open the notebook with an idle kernel")
    devtools.evaluate("jupyterapp.shell.collapseLeft(); jupyterapp.shell.collapseRight()")
    devtools.evaluate(f"jupyterapp.commands.execute('notebook:run-all-cells', {{widgetId: {JS_PANEL}.id}})",
                      await_promise=True)
    wait_until(lambda: devtools.evaluate(f"!!{JS_BUTTON}"), 120, "the explorer's widgets (a 'generate' button)")
    wait_until(lambda: devtools.evaluate(JS_KERNEL_IDLE), 120, "the notebook's cells to finish")
    box = devtools.evaluate(f"(() => {{ const b = {JS_BUTTON}; b.scrollIntoView({{block: 'center'}}); "
                            "const r = b.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
    time.sleep(0.5)
    devtools.click(*box)
    status = "(() => { const s = [...document.querySelectorAll('.widget-html-content')].map(e => e.innerText)" \
             ".find(t => /^(done in|error|cancelled)/.test(t)); return s || ''; })()"
    final = wait_until(lambda: devtools.evaluate(status), timeout, "the generated images ('done in' status)")
    if not final.startswith("done in"):
        raise UICheckFailed(f"the explorer reported: {final}")
    images = "document.querySelectorAll('img.widget-image[src^=\"blob:\"]').length"
    wait_until(lambda: devtools.evaluate(images) >= 4, 30, "at least two columns of images (final and x0)")
    # Bring the whole explorer into view: the top of the widget's output area.
    devtools.evaluate(f"{JS_BUTTON}.closest('.jp-OutputArea-output').scrollIntoView({{block: 'start'}})")
    time.sleep(1.0)
    devtools.screenshot(screenshot)
    return final


def check(screenshot: Path, timeout: float) -> int:
    """Start JupyterLab and Chromium, drive the explorer, stop both; logs go beside the screenshot."""
    logs = screenshot.parent
    logs.mkdir(parents=True, exist_ok=True)
    screenshot.with_name("failure.png").unlink(missing_ok=True)  # a failure's page, from an earlier run
    lab = browser = None
    with tempfile.TemporaryDirectory(prefix="doco_ui_check_") as tmp:
        tmp = Path(tmp)
        try:
            chromium = find_chromium()
            ensure_erased_model("toy_world")
            write_lab_settings(tmp / "settings")
            lab_port, devtools_port = free_port(), free_port()
            env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_PLATFORM_DIRS": "1"}
            lab = start([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                         f"--ServerApp.port={lab_port}", "--IdentityProvider.token=", "--ServerApp.password=",
                         f"--ServerApp.root_dir={REPO_ROOT}", "--LabApp.expose_app_in_browser=True",
                         f"--LabApp.user_settings_dir={tmp / 'settings'}",
                         f"--LabApp.workspaces_dir={tmp / 'workspaces'}"], logs / "jupyterlab.log", env)
            lab_url = f"http://127.0.0.1:{lab_port}"
            wait_until(lambda: http_json(f"{lab_url}/api/status"), 120, f"JupyterLab at {lab_url} (log: "
                       f"{logs / 'jupyterlab.log'})")
            browser = start([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
                             "--window-size=1500,1400", f"--remote-debugging-port={devtools_port}",
                             "--remote-allow-origins=*", f"--user-data-dir={tmp / 'chromium'}", "about:blank"],
                            logs / "chromium.log")
            pages = wait_until(lambda: [t for t in http_json(f"http://127.0.0.1:{devtools_port}/json/list") or []
                                        if t.get("type") == "page"], 60, "Chromium's DevTools endpoint")
            devtools = DevTools(pages[0]["webSocketDebuggerUrl"])
            started = time.perf_counter()
            try:
                status = drive(devtools, lab_url, screenshot, timeout)
            except UICheckFailed:
                devtools.screenshot(screenshot.with_name("failure.png"))
                print(f"ui-check: the page at failure: {screenshot.with_name('failure.png')}", file=sys.stderr)
                raise
            print(f"explorer: {status}; {time.perf_counter() - started:.0f} s in the browser")
            print(f"screenshot: {screenshot}")
        except (UICheckFailed, subprocess.CalledProcessError) as error:
            print(f"ui-check: error: {error}", file=sys.stderr)
            return 1
        finally:
            stop(browser)
            stop(lab)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "ui_check" / "explorer.png")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the images")
    args = parser.parse_args()
    try:
        import websocket  # noqa: F401  (checked before anything starts)
    except ImportError:
        print("ui-check: error: websocket-client is missing: pip install -e '.[ui]'", file=sys.stderr)
        return 2
    notebook = REPO_ROOT / NOTEBOOK
    committed = notebook.read_bytes()
    try:
        return check(args.out, args.timeout)
    finally:
        if notebook.read_bytes() != committed:  # JupyterLab saved it after all: put the committed version back
            notebook.write_bytes(committed)
            print(f"ui-check: warning: {NOTEBOOK} was modified during the check; restored", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
