"""`make lab` end to end, headless: the JupyterLab server it starts lists the chapters, offers the course kernel, and
that kernel runs a chapter's setup lines.

The server is started as the Makefile's `lab` target starts it (`jupyter lab notebooks`, with `--allow-root` when run
as root, as in a container), plus what a test needs: no browser, a free local port, a known token and a temporary
runtime directory. Everything goes through the server's REST API and the kernel websocket, as the browser's would.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (the `notebooks` extra: pip install -e '.[notebooks]')")
import websocket  # websocket-client, a dependency of jupyter_server

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "python3"  # what `make setup` installs with `ipykernel install --sys-prefix --name python3`
KERNEL_DISPLAY_NAME = "Python 3 (pda-course)"
# the first lines of every chapter: its parameters cell (as papermill would inject them for the tests) and the settings
SETUP = 'setting = "smoke"\noverrides = {}\nimport sys\nfrom course_lib import settings\n' \
        'cfg = settings.get(setting, overrides)\nprint(cfg.name, sys.prefix)'
START_TIMEOUT = 60
STOP_TIMEOUT = 20


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    def __init__(self, tmp_path):
        self.token = uuid.uuid4().hex
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "lab.log"
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={NOTEBOOKS}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # as the Makefile's LAB_FLAGS
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def request(self, method, path, body=None, timeout=10):
        req = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"},
                                     data=None if body is None else json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read()
            return r.status, json.loads(text) if text else None

    def wait_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the lab server exited with code {self.proc.returncode} before answering:\n{self.log()}")
            try:
                status, _ = self.request("GET", "/api/status", timeout=2)
                if status == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        pytest.fail(f"the lab server did not answer /api/status within {START_TIMEOUT} s:\n{self.log()}")

    def close(self):
        if self.proc.poll() is None:  # only when the test failed before its clean shutdown
            self.proc.terminate()  # SIGTERM: the server shuts its kernels down too
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def lab(tmp_path):
    server = Lab(tmp_path)
    try:
        yield server
    finally:
        server.close()


def execute(lab, kernel_id, code, timeout=30):
    """Runs `code` on the kernel over its websocket; returns (execute_reply content, stdout, error tracebacks)."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}",
        header=[f"Authorization: token {lab.token}"], timeout=timeout)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                       "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True},
        }))
        reply, idle, stdout, errors = None, False, [], []
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            if time.monotonic() > deadline:
                pytest.fail(f"no complete answer to execute_request in {timeout} s; stdout {stdout!r}, errors {errors}")
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if msg["channel"] == "shell" and kind == "execute_reply":
                reply = content
            elif kind == "stream" and content["name"] == "stdout":
                stdout.append(content["text"])
            elif kind == "error":
                errors.append(re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content["traceback"])))  # no colours
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return reply, "".join(stdout), errors
    finally:
        ws.close()


def test_lab_serves_chapters_and_runs_course_kernel(lab):
    lab.wait_ready()

    _, listing = lab.request("GET", "/api/contents")  # the server's root: notebooks/, as `make lab` opens it
    listed = {item["name"] for item in listing["content"] if item["type"] == "notebook"}
    chapters = {p.name for p in NOTEBOOKS.glob("*.ipynb")}
    assert chapters, "no chapters in notebooks/"
    assert chapters <= listed, f"chapters missing from the lab's listing: {sorted(chapters - listed)}"

    _, specs = lab.request("GET", "/api/kernelspecs")
    offered = {name: spec["spec"]["display_name"] for name, spec in specs["kernelspecs"].items()}
    assert offered.get(KERNEL_NAME) == KERNEL_DISPLAY_NAME, \
        f"the lab offers {offered}, not the course kernel {KERNEL_NAME!r} ({KERNEL_DISPLAY_NAME!r}); run `make setup`"

    _, kernel = lab.request("POST", "/api/kernels", {"name": KERNEL_NAME}, timeout=30)
    reply, stdout, errors = execute(lab, kernel["id"], SETUP)
    assert reply["status"] == "ok", f"the chapter setup failed in the kernel:\n" + "\n".join(errors)
    assert stdout.split() == ["smoke", sys.prefix], f"unexpected output {stdout!r} (kernel not in this environment?)"

    status, _ = lab.request("DELETE", f"/api/kernels/{kernel['id']}", timeout=20)
    assert status == 204
    status, _ = lab.request("POST", "/api/shutdown")
    assert status == 200
    try:
        code = lab.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the lab server still runs {STOP_TIMEOUT} s after /api/shutdown:\n{lab.log()}")
    assert code == 0, f"the lab server exited with code {code}:\n{lab.log()}"
