"""`kobold-desktop softprompt list|inspect|import|convert` and the exit-code contract."""

import json
import subprocess
import sys

import pytest

from kobold_desktop.cli import main

from .helpers import tiny_gpt2
from .softprompt.builders import random_tensor, softprompt_zip


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json(tmp_path, capsys):
    path = softprompt_zip(tmp_path / "sp.zip", random_tensor(6, 16), meta={"name": "Sea", "author": "Me"})
    code, out, err = run(capsys, "softprompt", "inspect", str(path), "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert {k: data[k] for k in ("name", "n_tokens", "hidden_size", "dtype", "format", "compression")} == {
        "name": "Sea", "n_tokens": 6, "hidden_size": 16, "dtype": "float32",
        "format": "koboldai-zip", "compression": "lzma"}


def test_inspect_rejects_with_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.zip"
    path.write_text("not a zip")
    code, out, err = run(capsys, "softprompt", "inspect", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: bad.zip: is not a zip file")
    code, out, err = run(capsys, "softprompt", "inspect", str(path), "--json")
    assert code == 2 and json.loads(out)["error"]["type"] == "CorruptFileError"


def test_inspect_against_a_model(tmp_path, capsys):
    tiny_gpt2(tmp_path / "model", hidden=32)
    wrong = softprompt_zip(tmp_path / "wrong.zip", random_tensor(2, 64))
    code, _, err = run(capsys, "softprompt", "inspect", str(wrong), "--model", str(tmp_path / "model"))
    assert code == 2 and "made for a model with hidden size 64; this model has 32" in err
    right = softprompt_zip(tmp_path / "right.zip", random_tensor(2, 32))
    code, out, _ = run(capsys, "softprompt", "inspect", str(right), "--model", str(tmp_path / "model"), "--json")
    assert code == 0 and json.loads(out)["model"]["hidden_size"] == 32


def test_list_json_with_model(tmp_path, capsys):
    folder = tmp_path / "sps"
    folder.mkdir()
    softprompt_zip(folder / "fits.zip", random_tensor(2, 32))
    softprompt_zip(folder / "big.zip", random_tensor(2, 64))
    (folder / "junk.zip").write_text("x")
    tiny_gpt2(tmp_path / "model", hidden=32)
    code, out, _ = run(capsys, "softprompt", "list", "--dir", str(folder), "--model", str(tmp_path / "model"), "--json")
    assert code == 0
    rows = {r["file"]: r for r in json.loads(out)["softprompts"]}
    assert rows["fits.zip"]["compatible"] and not rows["big.zip"]["compatible"]
    assert not rows["junk.zip"]["valid"] and "not a zip" in rows["junk.zip"]["error"]


def test_list_defaults_to_the_user_folder(capsys, isolated_home):
    code, out, _ = run(capsys, "softprompt", "list", "--json")
    folders = json.loads(out)["folders"]
    assert code == 0 and folders[0].startswith(str(isolated_home))


def test_import_and_convert(tmp_path, capsys):
    target = tmp_path / "lib"
    target.mkdir()
    good = softprompt_zip(tmp_path / "good.zip")
    bad = tmp_path / "bad.zip"
    bad.write_text("x")
    code, out, err = run(capsys, "softprompt", "import", str(good), str(bad), "--dir", str(target))
    assert code == 2 and "imported" in out and "rejected bad.zip" in err
    assert [p.name for p in target.iterdir()] == ["good.zip"]
    code, out, _ = run(capsys, "softprompt", "convert", str(good), str(tmp_path / "adapter"))
    assert code == 0 and (tmp_path / "adapter" / "adapter_config.json").exists()
    code, _, err = run(capsys, "softprompt", "convert", str(good), str(tmp_path / "adapter"))
    assert code == 2 and "already exists" in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["softprompt", "frobnicate"])
    assert info.value.code == 2


def test_module_entry_point(tmp_path):
    path = softprompt_zip(tmp_path / "sp.zip")
    result = subprocess.run([sys.executable, "-m", "kobold_desktop", "softprompt", "inspect", str(path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_tokens"] == 5
