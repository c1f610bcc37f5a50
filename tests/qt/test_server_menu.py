"""Starting the local API server from the window; it shares the model with the window."""

import http.client
import json
import threading

import torch
from PySide6.QtCore import Qt

from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.softprompt import Metadata, kobold_zip

from .test_window import generate


def call(url, method, path, body=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def serve(qtbot, window):
    """Start the server from the window and wait until it runs (it starts off the GUI thread)."""
    assert window.start_server(port=0)
    assert window.server_label.text() == "Server: starting…"
    qtbot.waitUntil(lambda: window.server_control.state != "starting", timeout=120_000)
    return window.server_control.url


def stop(qtbot, window):
    window.stop_server()
    qtbot.waitUntil(lambda: window.server_control.state == "stopped", timeout=60_000)


def test_server_menu_serves_library_softprompts(qtbot, window):
    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(4, 32), Metadata(name="Sea"))
    kobold_zip.write(user_softprompt_dir() / "wide.zip", torch.randn(4, 64), Metadata(name="Wide"))
    url = serve(qtbot, window)
    assert url and window.server_label.text() == f"Server: {url}" and not window.server_label.isHidden()
    assert "OpenAI API" in window.notices[-1][1]
    status, models = call(url, "GET", "/v1/models")
    assert [m["id"] for m in models["data"]] == ["gpt2", "Sea"]  # Wide does not fit the model

    replies = {}

    def ask():
        replies["server"] = call(url, "POST", "/v1/completions", {"model": "Sea", "prompt": "Once", "max_tokens": 30})

    thread = threading.Thread(target=ask)
    window.sampler_panel.max_new_tokens.setValue(30)
    qtbot.keyClicks(window.input, "The dragon")
    thread.start()
    result = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    thread.join(timeout=120)
    assert result.generated_tokens > 0 and replies["server"][0] == 200  # both finished, taking turns

    stop(qtbot, window)
    assert window.server is None and window.server_label.isHidden()
    assert window.server_start_action.isEnabled()


def test_server_needs_a_model(bare_window):
    assert bare_window.start_server(port=0) is False
    assert "Load a model" in bare_window.notices[-1][1]


def test_the_label_says_running_as_soon_as_the_state_does(bare_window):
    """The server's start returns before its job finishes: the window must say "running"
    then, not a moment later (a test that read the label in between failed now and then)."""
    class Started:
        url = "http://127.0.0.1:1"

    control = bare_window.server_control
    control.state = "starting"
    control._on_returned("start", (Started(), ["model"]))
    assert bare_window.server_label.text() == "Server: http://127.0.0.1:1"
    control.state, control.server = "stopped", None
    bare_window.update_server_state()
