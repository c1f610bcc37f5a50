import http.client
import json

import pytest
import torch

from kobold_desktop.engine import Engine

from ..helpers import FLOAT32
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.server.http import KoboldServer
from kobold_desktop.server.service import Service
from kobold_desktop.softprompt import Metadata, kobold_zip


@pytest.fixture(scope="module")
def server_engine(model_dirs):
    engine = Engine()
    engine.load(model_dirs["gpt2"], FLOAT32)
    return engine


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for name, n in (("sea", 4), ("forest", 9)):
        torch.manual_seed(n)
        kobold_zip.write(folder / f"{name}.zip", torch.randn(n, 32), Metadata(name=name))
        paths[name] = folder / f"{name}.zip"
    kobold_zip.write(folder / "wide.zip", torch.randn(3, 64), Metadata(name="wide"))
    kobold_zip.write(folder / "long.zip", torch.randn(40, 32), Metadata(name="long"))
    paths["wide"], paths["long"] = folder / "wide.zip", folder / "long.zip"
    return paths


def start_server(engine, config):
    service = Service(engine, config)
    return KoboldServer(service, "127.0.0.1", 0).start()


@pytest.fixture
def server(server_engine, adapter_files):
    config = ServeConfig(prompt_adapters={"sea": str(adapter_files["sea"]), "forest": str(adapter_files["forest"])},
                         max_prompt_adapter_token=32, max_prompt_adapters=3)
    srv = start_server(server_engine, config)
    yield srv
    srv.stop()


class Client:
    def __init__(self, server, key=None):
        self.host, self.port = server.host, server.port
        self.key = key

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.key:
            hdrs["Authorization"] = f"Bearer {self.key}"
        conn.request(method, path, body=data, headers=hdrs)
        return conn.getresponse()

    def call(self, method, path, body=None, headers=None):
        response = self.raw(method, path, body, headers)
        payload = response.read()
        return response.status, json.loads(payload) if payload else None

    def stream(self, path, body):
        response = self.raw("POST", path, body)
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for line in response.read().decode().split("\n\n"):
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events


@pytest.fixture
def client(server):
    return Client(server)
