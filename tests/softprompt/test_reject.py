"""Every bad file is refused with a typed error and a message a user can act on."""

import zipfile

import numpy as np
import pytest
import torch

from kobold_desktop.softprompt import (
    Limits,
    check_compatibility,
    describe_softprompt,
    load_softprompt,
    require_compatible,
)
from kobold_desktop.softprompt import errors as E

from .builders import (
    make_zip,
    malicious_mkultra_json,
    npy_bytes,
    random_tensor,
    set_declared_size,
    softprompt_zip,
)


def refused(path, error, match, limits=Limits(), full=False):
    """Refused by describe (cheap) and by load (full), unless only the full load can tell."""
    before = sorted(p.name for p in path.parent.iterdir())
    calls = [load_softprompt] if full else [describe_softprompt, load_softprompt]
    for call in calls:
        with pytest.raises(error, match=match) as info:
            call(path, limits)
        assert path.name in str(info.value)  # the message names the file
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written


def test_not_a_zip(tmp_path):
    path = tmp_path / "notes.zip"
    path.write_text("just some text")
    refused(path, E.CorruptFileError, "not a zip file")


def test_truncated_zip(tmp_path):
    path = softprompt_zip(tmp_path / "cut.zip", random_tensor(32, 64), meta={"name": "x"})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(path, E.CorruptFileError, "truncated")


def test_no_tensor(tmp_path):
    path = make_zip(tmp_path / "empty.zip", None, {"name": "x"})
    refused(path, E.MissingTensorError, "has no tensor.npy \\(KoboldAI\\) or adapter_config.json \\(PEFT\\)")


def test_tensor_two_folders_deep_gets_a_hint(tmp_path):
    """One folder (a folder zipped by a file manager) is read: tests/softprompt/test_wild.py."""
    path = make_zip(tmp_path / "nested.zip", npy_bytes(random_tensor().numpy()), tensor_name="a/sp/tensor.npy")
    refused(path, E.MissingTensorError, "more than one folder deep")


def test_pickled_object_array(tmp_path):
    array = np.empty((2, 2), dtype=object)
    array[:] = [[1.0, 2.0], [3.0, 4.0]]
    path = make_zip(tmp_path / "pickle.zip", npy_bytes(array, allow_pickle=True))
    refused(path, E.UnsafeFileError, "pickled Python objects")


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_not_two_dimensional(tmp_path, shape):
    path = make_zip(tmp_path / "shape.zip", npy_bytes(np.zeros(shape, np.float32)))
    refused(path, E.BadShapeError, "must be 2-D")


def test_zero_tokens(tmp_path):
    path = make_zip(tmp_path / "zero.zip", npy_bytes(np.zeros((0, 16), np.float32)))
    refused(path, E.BadShapeError, "zero tokens")


@pytest.mark.parametrize("dtype,match", [("<i4", "integers"), ("<u2", "integers"), ("<c8", "complex")])
def test_integer_and_complex(tmp_path, dtype, match):
    path = make_zip(tmp_path / "dtype.zip", npy_bytes(np.zeros((2, 4), dtype)))
    refused(path, E.BadDtypeError, match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinity_anywhere(tmp_path, bad):
    tensor = random_tensor(6, 8)
    tensor[4, 7] = bad
    path = softprompt_zip(tmp_path / "nan.zip", tensor)
    assert describe_softprompt(path).n_tokens == 6  # only the full read can tell
    refused(path, E.NonFiniteError, "first in token row 4", full=True)


def test_more_tokens_than_the_limit(tmp_path):
    path = softprompt_zip(tmp_path / "long.zip", random_tensor(2049, 4))
    refused(path, E.TooManyTokensError, "2,049 tokens; the limit is 2,048")
    short = softprompt_zip(tmp_path / "short.zip", random_tensor(40, 4))
    refused(short, E.TooManyTokensError, "limit is 32", limits=Limits(max_tokens=32))
    assert describe_softprompt(short).n_tokens == 40  # default limit accepts it


def test_declared_size_far_beyond_the_shape(tmp_path):
    path = softprompt_zip(tmp_path / "bomb.zip", random_tensor(2, 8), compression="deflate")
    set_declared_size(path, "tensor.npy", 4_000_000_000)
    refused(path, E.ZipBombError, "zip bomb")


def test_actual_size_far_beyond_the_shape(tmp_path):
    padded = npy_bytes(random_tensor(2, 8).numpy()) + bytes(20_000_000)
    path = make_zip(tmp_path / "bomb2.zip", padded, compression="deflate")
    assert path.stat().st_size < 100_000  # 20 MB of zeros squeeze into a small zip
    refused(path, E.ZipBombError, "zip bomb")


def test_lying_small_declared_size_is_caught_on_full_read(tmp_path):
    tensor_bytes = npy_bytes(random_tensor(2, 8).numpy())
    path = make_zip(tmp_path / "liar.zip", tensor_bytes + bytes(50_000_000), compression="deflate")
    set_declared_size(path, "tensor.npy", len(tensor_bytes))
    refused(path, (E.CorruptFileError, E.ZipBombError), "damaged|zip bomb", full=True)


def test_meta_json_bomb(tmp_path):
    path = make_zip(tmp_path / "meta.zip", npy_bytes(random_tensor().numpy()), b" " * (2 << 20))
    refused(path, E.ZipBombError, "meta.json")


def test_encrypted_member(tmp_path):
    path = softprompt_zip(tmp_path / "enc.zip", compression="stored")
    data = bytearray(path.read_bytes())
    data[6] |= 0x1  # general purpose flag: encrypted (local header)
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x1
    path.write_bytes(bytes(data))
    refused(path, E.UnsupportedFormatError, "encrypted")


def test_unknown_file_type(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    refused(path, E.UnsupportedFormatError, "not a soft prompt")


def test_lora_adapter_is_not_a_softprompt(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(E.UnsupportedFormatError, match="PEFT LORA, not a prompt-tuning"):
        describe_softprompt(folder)


def test_peft_bin_with_pickled_code_is_refused(tmp_path):
    folder = tmp_path / "evilpeft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    marker = tmp_path / "pwned"
    from .builders import Exploit

    torch.save({"prompt_embeddings": Exploit(marker)}, folder / "adapter_model.bin")
    with pytest.raises(E.UnsafeFileError):
        load_softprompt(folder)
    assert not marker.exists()


def test_mkultra_with_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = malicious_mkultra_json(tmp_path / "evil.json", marker)
    with pytest.raises(E.UnsafeFileError, match="Path.touch|pathlib"):
        load_softprompt(path)
    assert not marker.exists()


def test_hidden_size_mismatch_message(tmp_path):
    sp = describe_softprompt(softprompt_zip(tmp_path / "big.zip", random_tensor(3, 4096)))
    with pytest.raises(E.HiddenSizeMismatchError) as info:
        require_compatible(sp, 768, "gpt2")
    assert "made for a model with hidden size 4096; this model has 768" in str(info.value)
    assert not check_compatibility(sp, 768).ok
    assert check_compatibility(sp, 4096).ok


def test_supported_list_only_warns(tmp_path):
    sp = describe_softprompt(
        softprompt_zip(tmp_path / "neo.zip", random_tensor(2, 16), meta={"supported": ["EleutherAI/gpt-neo-2.7B"]})
    )
    warnings = require_compatible(sp, 16, "gpt2")
    assert len(warnings) == 1 and "made for EleutherAI/gpt-neo-2.7B, not gpt2" in warnings[0]
    assert require_compatible(sp, 16, "gpt-neo-2.7B") == ()  # same model under a local folder name


def test_damaged_lzma_header_is_caught_when_listing(tmp_path):
    path = softprompt_zip(tmp_path / "lz.zip", random_tensor(8, 32), compression="lzma")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("tensor.npy")
    start = info.header_offset + 30 + len("tensor.npy") + 9  # past the LZMA properties
    for i in range(start, start + 16):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))
    refused(path, E.CorruptFileError, "damaged|magic|header")
