"""Files built to break the loaders (issue 25's fuzzing run): each defect it found has a
test here that failed before the fix. Every one ends in our typed error, names the file,
costs little memory, and leaves nothing behind."""

import base64
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from kobold_desktop.softprompt import describe_softprompt, load_softprompt
from kobold_desktop.softprompt import errors as E
from kobold_desktop.softprompt.library import SoftPromptLibrary

from .builders import make_zip, npy_bytes, random_tensor, softprompt_zip


class _View:
    """Pickles as torch pickles a tensor: a storage and a view (offset, size, stride)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def mkultra_view(path, n_stored, offset, size, stride):
    storage = torch.arange(n_stored, dtype=torch.float32).untyped_storage()
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
    payload = base64.b64encode(pickle.dumps(_View(typed, offset, size, stride), protocol=4)).decode()
    path.write_text(json.dumps({"metadata": {"name": "view"}, "tensor": payload}))
    return path


def refused(path, error=E.SoftPromptError, match=""):
    for call in (describe_softprompt, load_softprompt):
        with pytest.raises(error, match=match) as info:
            call(path)
        assert path.name in str(info.value)


def test_an_mkultra_view_past_its_stored_data_is_refused_not_filled_with_memory(tmp_path):
    # 16 floats stored, a view of 8 x 4 = 32: torch's set_ would grow the storage with
    # whatever the process's memory held.
    refused(mkultra_view(tmp_path / "leak.json", 16, 0, (8, 4), (4, 1)), E.CorruptFileError, "past the data")
    refused(mkultra_view(tmp_path / "offset.json", 16, 10, (2, 4), (4, 1)), E.CorruptFileError, "past the data")
    _, tensor = load_softprompt(mkultra_view(tmp_path / "fine.json", 16, 0, (4, 4), (4, 1)))
    assert torch.equal(tensor, torch.arange(16.0).reshape(4, 4))


def test_a_zero_stride_cannot_turn_bytes_into_gigabytes(tmp_path):
    path = mkultra_view(tmp_path / "stride.json", 4, 0, (2047, 65536), (0, 0))
    assert path.stat().st_size < 1000
    refused(path, E.BadShapeError, "MiB of memory")


def test_a_tiny_zip_declaring_a_huge_float64_tensor_is_refused_from_its_header(tmp_path):
    header = npy_bytes(torch.zeros(1, 1, dtype=torch.float64).numpy())
    header = header.replace(b"(1, 1)", b"(2047, 65536)")  # an honest shape no soft prompt has
    path = make_zip(tmp_path / "big.zip", header, compression="deflate")
    refused(path, E.SoftPromptError, "MiB of memory")


@pytest.mark.parametrize("document", [
    '{"tensor": ' + "[" * 100000 + "]" * 100000 + "}",
    '{"tensor": "", "metadata": {"x": ' + "1" * 5000 + "}}",
    '{"tensor": 1e999}',
])
def test_mkultra_json_beyond_limits_is_our_error(tmp_path, document):
    path = tmp_path / "deep.json"
    path.write_text(document)
    refused(path, E.SoftPromptError)


@pytest.mark.parametrize("value", ["Infinity", "NaN", '"1"', "[1]", "1.5", "true"])
def test_num_transformer_submodules_must_be_a_whole_number(tmp_path, value):
    from kobold_desktop.softprompt import peft_dir
    from kobold_desktop.softprompt.types import Metadata

    folder = tmp_path / "adapter"
    peft_dir.write(folder, random_tensor(), Metadata(name="a"))
    config = (folder / "adapter_config.json").read_text().replace('"num_transformer_submodules": 1',
                                                                  f'"num_transformer_submodules": {value}')
    (folder / "adapter_config.json").write_text(config)
    refused(folder, E.SoftPromptError)


def test_meta_json_nested_too_deep_costs_only_the_metadata(tmp_path):
    path = make_zip(tmp_path / "meta.zip", npy_bytes(random_tensor().numpy()), b"[" * 50000 + b"]" * 50000)
    softprompt, _ = load_softprompt(path)
    assert softprompt.n_tokens == 5 and any("nests deeper" in w for w in softprompt.warnings)


def _damage(path, at, value):
    data = bytearray(path.read_bytes())
    data[at] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["crc", "method", "truncated", "version", "strong-encryption"])
def test_damaged_zip_members_are_our_error(tmp_path, damage):
    path = softprompt_zip(tmp_path / f"{damage}.zip", random_tensor(40, 64), compression="deflate")
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    if damage == "crc":
        struct.pack_into("<I", data, local + 14, 0xDEADBEEF)
        struct.pack_into("<I", data, central + 16, 0xDEADBEEF)
    elif damage == "method":
        struct.pack_into("<H", data, local + 8, 99)
        struct.pack_into("<H", data, central + 10, 99)
    elif damage == "truncated":
        del data[local + 30 + 10 + 200: central]
        data = data  # the central directory now points past the data
    elif damage == "version":
        struct.pack_into("<H", data, local + 4, 90)
        struct.pack_into("<H", data, central + 6, 90)
    else:
        for at, flags in ((local + 6, 0x41), (central + 8, 0x41)):
            struct.pack_into("<H", data, at, flags)
    path.write_bytes(bytes(data))
    with pytest.raises(E.SoftPromptError) as info:
        load_softprompt(path)
    assert path.name in str(info.value)


def test_a_damaged_adapter_bin_and_a_sparse_one_are_our_error(tmp_path):
    from kobold_desktop.softprompt import peft_dir
    from kobold_desktop.softprompt.types import Metadata

    folder = tmp_path / "adapter"
    peft_dir.write(folder, random_tensor(), Metadata(name="a"))
    (folder / "adapter_model.safetensors").unlink()
    buffer = io.BytesIO()
    torch.save({"prompt_embeddings": random_tensor()}, buffer)
    data = buffer.getvalue()
    for i, cut in enumerate((len(data) // 2, len(data) - 30, 100)):
        (folder / "adapter_model.bin").write_bytes(data[:cut])
        refused(folder, E.SoftPromptError)
    buffer = io.BytesIO()
    torch.save({"prompt_embeddings": random_tensor().to_sparse()}, buffer)
    (folder / "adapter_model.bin").write_bytes(buffer.getvalue())
    refused(folder, E.SoftPromptError, "sparse|strided|layout")


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and /dev/zero are POSIX")
def test_a_pipe_or_a_link_to_a_device_is_never_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.zip")
    (tmp_path / "zero.zip").symlink_to("/dev/zero")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    for name in ("pipe.zip", "zero.zip", "zero.json"):
        refused(tmp_path / name, E.UnsupportedFormatError, "not a regular file")


def hostile_library(folder):
    """A library folder: one good soft prompt beside a leaking view and JSON nested too deep."""
    folder.mkdir()
    softprompt_zip(folder / "good.zip")
    mkultra_view(folder / "leak.json", 16, 0, (8, 4), (4, 1))
    (folder / "deep.json").write_text('{"tensor": ' + "[" * 5000 + "]" * 5000 + "}")
    return folder


def test_one_bad_file_is_one_greyed_row_and_the_rest_list(tmp_path):
    folder = hostile_library(tmp_path / "softprompts")
    os.mkfifo(folder / "pipe.zip")
    entries = {e.path.name: e for e in SoftPromptLibrary(folder, []).scan()}
    assert entries["good.zip"].valid
    for name in ("leak.json", "deep.json", "pipe.zip"):
        assert not entries[name].valid and entries[name].error


def test_softprompt_list_and_inspect_print_no_traceback_for_hostile_files(tmp_path):
    folder = hostile_library(tmp_path / "softprompts")
    run = [sys.executable, "-m", "kobold_desktop", "softprompt"]
    listed = subprocess.run(run + ["list", "--dir", str(folder), "--json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    for name in ("leak.json", "deep.json"):
        done = subprocess.run(run + ["inspect", str(folder / name), "--json"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr and name in done.stderr


def test_writing_onto_a_full_disk_is_our_error_and_leaves_nothing(tmp_path, monkeypatch):
    from kobold_desktop.softprompt import convert
    from kobold_desktop.softprompt import kobold_zip

    source = softprompt_zip(tmp_path / "a.zip")
    real = zipfile.ZipFile.writestr

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full)
    with pytest.raises(E.SoftPromptError, match="No space left"):
        convert(source, tmp_path / "b.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]
    monkeypatch.setattr(zipfile.ZipFile, "writestr", real)
    assert kobold_zip is not None


def test_a_mixture_member_that_links_outside_the_folders_is_refused(tmp_path):
    from kobold_desktop.softprompt.mixture import MixtureError, read_mixture, resolve_members

    outside, library = tmp_path / "outside", tmp_path / "library"
    outside.mkdir()
    library.mkdir()
    softprompt_zip(outside / "secret.zip")
    softprompt_zip(library / "fine.zip")
    (library / "link.zip").symlink_to(outside / "secret.zip")
    (library / "mix.json").write_text(json.dumps({"name": "m", "members": [
        {"softprompt": "fine.zip", "weight": 1}, {"softprompt": "link.zip", "weight": 1}]}))
    mixture = read_mixture(library / "mix.json")
    with pytest.raises(MixtureError, match="link to .*outside the soft prompt folders"):
        resolve_members(mixture, [library])
    (library / "link.zip").unlink()
    (library / "link.zip").symlink_to(library / "fine.zip")  # a link within the folders is fine
    assert len(resolve_members(mixture, [library])) == 2


@pytest.mark.parametrize("weights", [[1e308, 1e308], [0, 0], [-1, 2], [float("inf"), 1]])
def test_mixture_weights_must_be_finite_and_sum_to_a_positive_finite_number(tmp_path, weights):
    from kobold_desktop.softprompt.mixture import MixtureError, read_mixture

    members = [{"softprompt": f"{i}.zip", "weight": w} for i, w in enumerate(weights)]
    (tmp_path / "mix.json").write_text(json.dumps({"name": "m", "members": members}).replace("Infinity", "1e999"))
    with pytest.raises(MixtureError):
        read_mixture(tmp_path / "mix.json")


def test_pickle_protocol_5_buffers_are_refused_before_unpickling(tmp_path):
    """The fuzz suite's 10,000-case run once made CPython free a bytearray still exported to
    a buffer inside the unpickler; torch never writes protocol 5's bytearrays and buffers."""
    storage = torch.arange(8.0).untyped_storage()
    buffer = io.BytesIO()
    torch.save(storage, buffer, _use_new_zipfile_serialization=False)

    class Bytes:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (bytearray(buffer.getvalue()),))

    class View:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Bytes(), 0, (2, 4), (4, 1), False, collections.OrderedDict()))

    payload = base64.b64encode(pickle.dumps(View(), protocol=5)).decode()
    (tmp_path / "p5.json").write_text(json.dumps({"tensor": payload}))
    refused(tmp_path / "p5.json", E.UnsafeFileError, "BYTEARRAY8")


@pytest.mark.parametrize("header", [
    {"prompt_embeddings": {"dtype": "F32", "shape": [5, 16], "data_offsets": [0, 10 ** 9]}},
    {"prompt_embeddings": {"dtype": "F32", "shape": [5, 16], "data_offsets": [320, 0]}},
    {"prompt_embeddings": {"dtype": "F32", "shape": [5, 16], "data_offsets": "x"}},
    {"prompt_embeddings": {"dtype": "F32", "shape": [5, 16], "data_offsets": [0, 320]}, "__metadata__": [1]},
    {"prompt_embeddings": {"dtype": "F32", "shape": [5, -16], "data_offsets": [0, 320]}},
])
def test_a_zipped_peft_adapter_with_a_damaged_safetensors_header_is_our_error(tmp_path, header):
    from kobold_desktop.softprompt import peft_dir
    from kobold_desktop.softprompt.types import Metadata

    peft_dir.write(tmp_path / "adapter", random_tensor(), Metadata(name="a"))
    raw = json.dumps(header).encode()
    data = len(raw).to_bytes(8, "little") + raw + bytes(320)
    with zipfile.ZipFile(tmp_path / "adapter.zip", "w") as zf:
        zf.write(tmp_path / "adapter" / "adapter_config.json", "adapter/adapter_config.json")
        zf.writestr("adapter/adapter_model.safetensors", data)
    with pytest.raises(E.SoftPromptError) as info:
        load_softprompt(tmp_path / "adapter.zip")
    assert "adapter.zip" in str(info.value)
