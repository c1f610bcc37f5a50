"""Every accepted soft prompt format reads back bit-exactly."""

import json
import zipfile

import numpy as np
import pytest
import torch

from kobold_desktop.softprompt import SoftPromptFormat, describe_softprompt, load_softprompt
from kobold_desktop.softprompt.errors import CorruptFileError

from .builders import (
    make_zip,
    mkultra_json,
    npy_bytes,
    random_tensor,
    softprompt_zip,
)


@pytest.mark.parametrize("compression", ["stored", "deflate", "bzip2", "lzma", "deflate64"])
def test_every_zip_compression_reads(tmp_path, compression):
    tensor = random_tensor(7, 24)
    path = make_zip(tmp_path / "sp.zip", npy_bytes(tensor.numpy()), {"name": "Sea"}, compression)
    softprompt = describe_softprompt(path)
    assert softprompt.compression == compression
    assert (softprompt.name, softprompt.n_tokens, softprompt.hidden_size) == ("Sea", 7, 24)
    _, loaded = load_softprompt(path)
    assert torch.equal(loaded, tensor)


def test_deflate64_needs_the_extra_codec(tmp_path):
    """The test file really is Deflate64: stdlib zipfile alone refuses method 9."""
    path = softprompt_zip(tmp_path / "d64.zip", compression="deflate64")
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("tensor.npy").compress_type == 9


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_format_versions(tmp_path, version):
    tensor = random_tensor(3, 8)
    path = make_zip(tmp_path / "v.zip", npy_bytes(tensor.numpy(), version=version))
    assert torch.equal(load_softprompt(path)[1], tensor)


def test_fortran_order(tmp_path):
    tensor = random_tensor(4, 6)
    array = np.asfortranarray(tensor.numpy())
    data = npy_bytes(array)
    assert b"'fortran_order': True" in data
    loaded = load_softprompt(make_zip(tmp_path / "f.zip", data))[1]
    assert torch.equal(loaded, tensor)
    assert loaded.is_contiguous()


@pytest.mark.parametrize(
    "dtype,name", [(torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")]
)
def test_float_dtypes_keep_their_bits(tmp_path, dtype, name):
    tensor = random_tensor(5, 16, dtype=dtype)
    path = softprompt_zip(tmp_path / "t.zip", tensor)
    assert describe_softprompt(path).dtype == name
    loaded = load_softprompt(path)[1]
    assert loaded.dtype == dtype
    assert torch.equal(loaded.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       tensor.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_bfloat16_v2_is_the_top_half_of_float32(tmp_path):
    values = torch.tensor([[1.0, -2.5, 3.140625, 0.0]])
    bits = (values.view(torch.int32) >> 16).to(torch.int16).numpy().astype("<i2").view("V2")
    assert bits.dtype.str == "|V2"
    loaded = load_softprompt(make_zip(tmp_path / "b.zip", npy_bytes(bits)))[1]
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.float(), values)


def test_float64_and_big_endian_are_converted(tmp_path):
    tensor = random_tensor(3, 4).double()
    path64 = make_zip(tmp_path / "f64.zip", npy_bytes(tensor.numpy()))
    sp, loaded = load_softprompt(path64)
    assert sp.dtype == "float64" and loaded.dtype == torch.float32
    assert torch.equal(loaded, tensor.float())

    big = tensor.float().numpy().astype(">f4")
    sp, loaded = load_softprompt(make_zip(tmp_path / "be.zip", npy_bytes(big)))
    assert sp.big_endian and loaded.dtype == torch.float32
    assert torch.equal(loaded, tensor.float())


def test_meta_fields_author_forms_and_unknown_keys(tmp_path):
    meta = {"name": "Poet", "author": ["Ann", "Bo"], "description": "Verse.", "supported": ["gpt2"], "uuid": "x1"}
    sp = describe_softprompt(softprompt_zip(tmp_path / "a.zip", meta=meta))
    assert sp.authors == ("Ann", "Bo") and sp.author == "Ann, Bo"
    assert sp.description == "Verse." and sp.supported == ("gpt2",)
    assert sp.meta["uuid"] == "x1"
    sp = describe_softprompt(softprompt_zip(tmp_path / "b.zip", meta={"author": "Cy"}))
    assert sp.authors == ("Cy",) and sp.name == "b"


def test_missing_or_broken_meta_is_tolerated(tmp_path):
    sp = describe_softprompt(softprompt_zip(tmp_path / "nometa.zip"))
    assert sp.name == "nometa" and sp.warnings == ()
    path = make_zip(tmp_path / "badmeta.zip", npy_bytes(random_tensor().numpy()), b"{not json")
    sp = describe_softprompt(path)
    assert sp.name == "badmeta" and "not valid JSON" in sp.warnings[0]


def test_describe_reads_headers_only(tmp_path):
    """Listing never decompresses the tensor: damage after the header goes unnoticed
    until the full load, which catches it."""
    tensor = random_tensor(64, 256)
    path = softprompt_zip(tmp_path / "big.zip", tensor, compression="stored")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("tensor.npy")
    end_of_data = info.header_offset + 30 + len("tensor.npy") + info.compress_size
    data[end_of_data - 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert describe_softprompt(path).n_tokens == 64
    with pytest.raises(CorruptFileError):
        load_softprompt(path)


def _peft_dir(tmp_path, tensor, peft_type="PROMPT_TUNING", weights="safetensors"):
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": tensor.shape[0],
        "token_dim": tensor.shape[1], "num_transformer_submodules": 1,
        "base_model_name_or_path": "org/tiny-model",
    }))
    if weights == "safetensors":
        save_file({"prompt_embeddings": tensor}, str(folder / "adapter_model.safetensors"))
    else:
        torch.save({"prompt_embeddings": tensor}, folder / "adapter_model.bin")
    return folder


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING"])
def test_peft_adapter_folders(tmp_path, weights, peft_type):
    tensor = random_tensor(6, 12)
    folder = _peft_dir(tmp_path, tensor, peft_type, weights)
    sp = describe_softprompt(folder)
    assert sp.format is SoftPromptFormat.PEFT
    assert (sp.n_tokens, sp.hidden_size, sp.supported) == (6, 12, ("org/tiny-model",))
    assert sp.compression == weights if weights == "bin" else sp.compression == "safetensors"
    assert torch.equal(load_softprompt(folder)[1], tensor)


def test_mkultra_json_is_read_without_unpickling_untrusted_code(tmp_path):
    tensor = random_tensor(4, 8)
    path = mkultra_json(tmp_path / "mk.json", tensor.unsqueeze(0), {"name": "Neuromancer", "description": "d"})
    sp, loaded = load_softprompt(path)
    assert sp.format is SoftPromptFormat.MKULTRA_JSON
    assert (sp.name, sp.n_tokens, sp.hidden_size) == ("Neuromancer", 4, 8)
    assert torch.equal(loaded, tensor)


def test_mkultra_parameter_tensor(tmp_path):
    tensor = torch.nn.Parameter(random_tensor(2, 8, dtype=torch.float16))
    loaded = load_softprompt(mkultra_json(tmp_path / "p.json", tensor))[1]
    assert loaded.dtype == torch.float16 and torch.equal(loaded, tensor.detach())
