"""Files as people really share them: made on a GPU, zipped by hand, or made to hurt."""

import base64
import json
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

from kobold_desktop.softprompt import Metadata, SoftPromptFormat, convert, describe_softprompt, kobold_zip, load_softprompt
from kobold_desktop.softprompt.errors import BadShapeError, CorruptFileError
from kobold_desktop.softprompt.npy import encode


def mkultra_file(path, tensor, location="cuda:0"):
    """What mkultra wrote on a Colab GPU: pickle.dumps of a CUDA tensor, base64 in JSON.
    The pickle names the storage's device; we make it say `location` without a GPU."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        raw = pickle.dumps(tensor.unsqueeze(0))  # mkultra keeps the batch dimension
    finally:
        torch.serialization.location_tag = real
    assert location.encode() in raw
    path.write_text(json.dumps({"metadata": {"name": "Colab", "description": "made on a T4"},
                                "tensor": base64.b64encode(raw).decode()}))
    return path


def test_an_mkultra_file_made_on_a_gpu_reads_on_any_machine(tmp_path):
    tensor = torch.randn(5, 32)
    path = mkultra_file(tmp_path / "colab.json", tensor)
    softprompt, loaded = load_softprompt(path)
    assert softprompt.format == SoftPromptFormat.MKULTRA_JSON and softprompt.name == "Colab"
    assert loaded.device.type == "cpu" and torch.equal(loaded, tensor)
    convert(path, tmp_path / "colab.zip")  # and converts losslessly
    assert torch.equal(load_softprompt(tmp_path / "colab.zip")[1], tensor)


def test_a_damaged_mkultra_pickle_gets_our_message_not_torchs(tmp_path):
    path = mkultra_file(tmp_path / "cut.json", torch.randn(5, 32))
    document = json.loads(path.read_text())
    raw = base64.b64decode(document["tensor"])
    document["tensor"] = base64.b64encode(raw[: len(raw) - 60]).decode()
    path.write_text(json.dumps(document))
    with pytest.raises(CorruptFileError) as caught:
        load_softprompt(path)
    assert "map_location" not in str(caught.value) and "torch.load" not in str(caught.value)


def test_an_mkultra_pickle_declaring_a_huge_storage_is_refused_before_allocating(tmp_path, monkeypatch):
    """torch allocates a legacy storage's declared size before reading its bytes; a crafted
    file declaring 8 GB in a few hundred bytes must be refused from the declaration."""
    import collections

    captured = []

    class Capture(pickle.Unpickler):  # the storage's legacy save, as pickle.dumps(tensor) wrote it
        def find_class(self, module, name):
            if (module, name) == ("torch.storage", "_load_from_bytes"):
                return captured.append
            return lambda *args: None

    Capture(__import__("io").BytesIO(pickle.dumps(torch.randn(5, 32)))).load()
    inner = captured[0]
    count = b"K\xa0"  # BININT1 160: the element count in its persistent id
    assert inner.count(count) == 1
    crafted = inner.replace(count, b"J" + (2**31 - 1).to_bytes(4, "little"))  # 2**31 - 1 floats

    class Storage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (crafted,)

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (1, 5, 32), (160, 32, 1), False,
                                                     collections.OrderedDict())

    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"tensor": base64.b64encode(pickle.dumps(Tensor(), protocol=4)).decode()}))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on the crafted storage"))
    with pytest.raises(CorruptFileError, match="declares 8,589,934,588 bytes"):
        load_softprompt(path)


def wide_zip(path, hidden=2**28):
    """A 1 MB zip whose tensor.npy really is [1, 2**28] float32 zeros (1 GiB, deflated)."""
    import numpy as np

    head = encode(torch.zeros(1, 1))
    header_text = head[10: 10 + int.from_bytes(head[8:10], "little")].decode("latin1")
    new_header = header_text.replace("(1, 1)", f"(1, {hidden})").rstrip("\n").rstrip(" ")
    total = 10 + len(new_header) + 1
    new_header += " " * ((64 - total % 64) % 64) + "\n"
    prefix = head[:8] + len(new_header).to_bytes(2, "little") + new_header.encode("latin1")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("tensor.npy", "w", force_zip64=True) as out:
            out.write(prefix)
            chunk = np.zeros(1 << 20, dtype=np.uint8).tobytes()
            for _ in range(hidden * 4 // len(chunk)):
                out.write(chunk)
    return path


def test_a_header_declaring_a_huge_hidden_size_is_refused_from_the_header(tmp_path):
    with pytest.raises(BadShapeError, match="hidden size of 70,000"):
        describe_softprompt(wide_zip(tmp_path / "wide.zip", hidden=70_000))
    with pytest.raises(BadShapeError, match="hidden size of 70,000"):
        kobold_zip.write(tmp_path / "x.zip", torch.zeros(1, 70_000), Metadata())
    assert not (tmp_path / "x.zip").exists()


def test_a_tiny_zip_declaring_gigabytes_is_refused_without_taking_them(tmp_path):
    path = wide_zip(tmp_path / "wide.zip")
    assert path.stat().st_size < 3 << 20
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'kobold_desktop', 'softprompt', 'inspect', sys.argv[1]], "
            "capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "print(r.stderr, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KOBOLD_DESKTOP_HOME": str(tmp_path / "home")})
    returncode, peak_kib = map(int, result.stdout.split())
    assert returncode == 2, result.stderr
    assert "hidden size of 268,435,456" in result.stderr and "Traceback" not in result.stderr
    assert peak_kib < 900 * 1024  # far below the 1 GiB the header asks for


def test_a_softprompt_of_another_width_is_refused_before_its_data_is_read(model_dirs, tmp_path, monkeypatch):
    from kobold_desktop.engine import Engine
    from kobold_desktop.softprompt.errors import HiddenSizeMismatchError

    engine = Engine()
    engine.load(model_dirs["gpt2"])
    kobold_zip.write(tmp_path / "w.zip", torch.randn(4, 48), Metadata(name="w"))
    monkeypatch.setattr("kobold_desktop.softprompt.kobold_zip.load",
                        lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(HiddenSizeMismatchError, match="hidden size 48; this model has 32"):
        engine.set_softprompt(tmp_path / "w.zip")
    assert describe_softprompt(tmp_path / "w.zip").hidden_size == 48
