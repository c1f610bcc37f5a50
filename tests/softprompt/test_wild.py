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
    """`inspect` under a 900 MiB memory limit (torch and the app fit in it): the 1 GiB the
    header asks for is never allocated, so it answers with a message, not a MemoryError."""
    import resource

    path = wide_zip(tmp_path / "wide.zip")
    assert path.stat().st_size < 3 << 20

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (900 << 20, 900 << 20))

    result = subprocess.run([sys.executable, "-m", "kobold_desktop", "softprompt", "inspect", str(path)],
                            capture_output=True, text=True, timeout=300, preexec_fn=limit_memory,
                            env={**os.environ, "KOBOLD_DESKTOP_HOME": str(tmp_path / "home")})
    assert result.returncode == 2, result.stderr
    assert "hidden size of 268,435,456" in result.stderr and "Traceback" not in result.stderr


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


def zip_folder(folder, dest, macos=False):
    """Zip a folder the way a file manager does: the folder itself at the root."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder, folder.name + "/")
        for file in sorted(folder.rglob("*")):
            zf.write(file, f"{folder.name}/{file.relative_to(folder)}")
            if macos:
                zf.writestr(f"__MACOSX/{folder.name}/._{file.name}", b"\x00\x05\x16\x07 resource fork")
    return dest


@pytest.fixture
def peft_adapter(model_dirs, tmp_path):
    """A PEFT prompt-tuning adapter saved by PEFT, with the tokenizer files beside it."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    torch.manual_seed(5)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    folder = tmp_path / "my-adapter"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dirs["gpt2"]).save_pretrained(folder)
    return folder


def test_a_zipped_peft_adapter_lists_inspects_loads_imports_and_converts(peft_adapter, model_dirs, tmp_path):
    from kobold_desktop.cli import main
    from kobold_desktop.engine import Engine, SamplingSettings
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    zipped = zip_folder(peft_adapter, tmp_path / "my-adapter.zip", macos=True)
    described = describe_softprompt(zipped)
    assert described.format == SoftPromptFormat.PEFT and (described.n_tokens, described.hidden_size) == (6, 32)
    assert described.name == "my-adapter"
    _, from_zip = load_softprompt(zipped)
    _, from_folder = load_softprompt(peft_adapter)
    assert torch.equal(from_zip, from_folder)

    engine = Engine()
    engine.load(model_dirs["gpt2"])
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
    engine.set_softprompt(zipped)
    with_zip = engine.generate("The knight", greedy)
    engine.set_softprompt(peft_adapter)
    assert engine.generate("The knight", greedy).token_ids == with_zip.token_ids

    assert main(["softprompt", "inspect", str(zipped), "--json"]) == 0
    library = SoftPromptLibrary(tmp_path / "library", [])
    entry = library.import_path(zipped)
    assert entry.path.suffix == ".zip" and entry.path.read_bytes() == zipped.read_bytes()
    assert [e.softprompt.name for e in library.scan()] == ["my-adapter"]
    convert(zipped, tmp_path / "as-kobold.zip")
    assert torch.equal(load_softprompt(tmp_path / "as-kobold.zip")[1], from_folder)


def test_a_koboldai_softprompt_zipped_with_its_folder_reads(tmp_path):
    folder = tmp_path / "Sea"
    folder.mkdir()
    kobold_zip.write(tmp_path / "sea.zip", torch.randn(3, 32), Metadata(name="Sea"))
    with zipfile.ZipFile(tmp_path / "sea.zip") as zf:
        zf.extractall(folder)
    zipped = zip_folder(folder, tmp_path / "Sea-folder.zip")
    assert describe_softprompt(zipped).name == "Sea"
    assert torch.equal(load_softprompt(zipped)[1], load_softprompt(tmp_path / "sea.zip")[1])


def test_a_zip_with_several_softprompts_is_refused_naming_them(peft_adapter, tmp_path):
    from kobold_desktop.softprompt.errors import UnsupportedFormatError

    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("first", "second"):
            for file in peft_adapter.iterdir():
                zf.write(file, f"{name}/{file.name}")
    with pytest.raises(UnsupportedFormatError, match=r"holds 2 soft prompts \(first, second\)"):
        describe_softprompt(path)
