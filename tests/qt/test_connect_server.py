"""Model ▸ Connect to server…: the window writes with our own server on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import torch

from kobold_desktop.engine import Engine
from kobold_desktop.qt._qt import Qt
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.server.http import KoboldServer
from kobold_desktop.server.service import Service
from kobold_desktop.softprompt import Metadata, kobold_zip

from ..helpers import FLOAT32
from .test_window import generate, run_job


@pytest.fixture(scope="module")
def our_server(model_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    for name, n in (("sea", 4), ("forest", 9)):
        torch.manual_seed(n)
        kobold_zip.write(folder / f"{name}.zip", torch.randn(n, 32), Metadata(name=name))
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    config = ServeConfig(prompt_adapters={"sea": str(folder / "sea.zip"), "forest": str(folder / "forest.zip")},
                         max_prompt_adapter_token=32)
    server = KoboldServer(Service(engine, config), "127.0.0.1", 0).start()
    yield server, engine, folder
    server.stop()


def rows(window):
    panel = window.softprompt_panel
    return [panel.list.item(i).text().splitlines()[0] for i in range(panel.list.count())]


def test_the_window_writes_with_our_server(qtbot, bare_window, our_server):
    server, engine, folder = our_server
    window = bare_window
    window.sampler_panel.max_new_tokens.setValue(12)
    window.sampler_panel.temperature.setValue(0)
    url = f"http://127.0.0.1:{server.port}"
    run_job(qtbot, window, lambda: window.connect_server(url))
    assert window.model_status is not None and window.model_status.remote
    label = window.model_label.text()
    assert f"127.0.0.1:{server.port}" in label and "gpt2" in label and "context 256" in label
    assert rows(window) == ["[None]", "sea (4 tokens)", "forest (9 tokens)"]
    assert not window.softprompt_panel.folder_button.isVisible()

    # Choose a soft prompt (one of the server's models) and Load: the light goes green.
    panel = window.softprompt_panel
    panel.list.setCurrentRow(2)
    run_job(qtbot, window, lambda: qtbot.mouseClick(panel.load_button, Qt.LeftButton))
    assert window.softprompt_status.name == "forest" and window.status_light.is_green
    assert panel.list.item(2).font().bold()

    # Memory, World Info and the story go to the server; the text streams back.
    window.memory_editor.memory.setPlainText("The hero is brave.")
    window.world_info_editor.add_entry()
    qtbot.keyClicks(window.world_info_editor.keys, "dragon")
    window.world_info_editor.content.setPlainText("Dragons hoard gold.")
    sent, chunks = [], []
    remote = window.worker.remote
    real_stream = remote.stream

    def recording(ids, settings, cancel=None):
        sent.append((list(ids), settings))
        yield from real_stream(ids, settings, cancel)

    remote.stream = recording
    window.worker.chunk.connect(chunks.append)
    qtbot.keyClicks(window.input, "The dragon flew over the knight")
    result = generate(qtbot, window, lambda: qtbot.mouseClick(window.submit_button, Qt.LeftButton))
    ids, settings = sent[0]
    text = engine.loaded.tokenizer.decode(ids)
    assert text.startswith("The hero is brave.\nDragons hoard gold.\n") and text.endswith("over the knight")
    want = engine.generate(ids, settings, softprompt=engine.prepare_softprompts([folder / "forest.zip"]))
    assert result.text == want.text and len(chunks) > 1
    assert window.view.toPlainText() == "The dragon flew over the knight" + want.text

    # Disconnect (Model ▸ Unload): the library comes back.
    run_job(qtbot, window, window.unload_model)
    assert window.model_status is None and window.model_label.text() == "No model loaded"
    assert window.softprompt_panel.server is None and window.softprompt_panel.folder_button.isVisible()


def test_a_server_that_is_not_there_is_a_message(qtbot, bare_window):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_job(qtbot, bare_window, lambda: bare_window.connect_server(f"http://127.0.0.1:{port}"))
    assert bare_window.model_status is None
    assert any(f"127.0.0.1:{port}" in text for _title, text in bare_window.notices)
