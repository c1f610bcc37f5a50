"""Writing KoboldAI zips and PEFT folders, and converting between them without loss."""

import json
import zipfile

import pytest
import torch

from kobold_desktop.softprompt import Metadata, SoftPromptFormat, convert, describe_softprompt, load_softprompt
from kobold_desktop.softprompt import kobold_zip
from kobold_desktop.softprompt.errors import DestinationExistsError

from ..helpers import tiny_gpt2
from .builders import mkultra_json, random_tensor, softprompt_zip


def bits(tensor):
    return tensor.view({torch.float32: torch.int32}.get(tensor.dtype, torch.int16))


def test_zip_is_written_like_koboldai_tuners(tmp_path):
    tensor = random_tensor(4, 8)
    path = tmp_path / "out.zip"
    kobold_zip.write(path, tensor, Metadata(name="Out", authors=("Me",), description="d", supported=("gpt2",)))
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("tensor.npy").compress_type == zipfile.ZIP_LZMA
        assert zf.getinfo("meta.json").compress_type == zipfile.ZIP_STORED
        meta = json.loads(zf.read("meta.json"))
    assert meta == {"name": "Out", "author": "Me", "description": "d", "supported": ["gpt2"]}
    sp, loaded = load_softprompt(path)
    assert torch.equal(loaded, tensor)


def test_writing_never_overwrites(tmp_path):
    path = softprompt_zip(tmp_path / "keep.zip")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        kobold_zip.write(path, random_tensor(2, 2))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.zip"]  # no temp file left


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zip_to_peft_to_zip_is_bit_exact(tmp_path, dtype):
    tensor = random_tensor(9, 32, dtype=dtype)
    meta = {"name": "Round", "author": ["A", "B"], "description": "trip", "supported": ["gpt2"], "extra": 7}
    src = softprompt_zip(tmp_path / "src.zip", tensor, meta=meta)
    peft = convert(src, tmp_path / "adapter")
    assert peft.format is SoftPromptFormat.PEFT and peft.dtype == describe_softprompt(src).dtype
    back = convert(tmp_path / "adapter", tmp_path / "back.zip")
    for path in (tmp_path / "adapter", tmp_path / "back.zip"):
        loaded = load_softprompt(path)[1]
        assert loaded.dtype == dtype and torch.equal(bits(loaded), bits(tensor))
    assert (back.name, back.authors, back.description, back.supported) == ("Round", ("A", "B"), "trip", ("gpt2",))
    assert back.meta["extra"] == 7


def test_mkultra_converts_to_zip(tmp_path):
    tensor = random_tensor(3, 8)
    src = mkultra_json(tmp_path / "mk.json", tensor.unsqueeze(0), {"name": "Gibson", "description": "cyber"})
    out = convert(src, tmp_path / "gibson.zip")
    assert out.format is SoftPromptFormat.KOBOLDAI_ZIP and out.name == "Gibson"
    assert torch.equal(load_softprompt(out.path)[1], tensor)


def test_convert_refuses_existing_destination(tmp_path):
    src = softprompt_zip(tmp_path / "a.zip")
    dst = softprompt_zip(tmp_path / "b.zip", random_tensor(2, 16))
    before = dst.read_bytes()
    with pytest.raises(DestinationExistsError):
        convert(src, dst)
    assert dst.read_bytes() == before


def test_written_peft_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = tiny_gpt2(hidden=32)
    tensor = random_tensor(5, 32)
    src = softprompt_zip(tmp_path / "sp.zip", tensor)
    convert(src, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    assert torch.equal(embedding.detach(), tensor)
