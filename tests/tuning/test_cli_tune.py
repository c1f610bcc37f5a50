"""`kobold-desktop tune`."""

import zipfile
import json

from kobold_desktop.cli import main
from kobold_desktop.paths import user_softprompt_dir
from kobold_desktop.softprompt import describe_softprompt
from kobold_desktop.softprompt.library import SoftPromptLibrary

from .conftest import PATTERN


def test_tune_writes_zip_and_peft_and_reports_losses(tune_model_dir, tmp_path, capsys):
    data = tmp_path / "pattern.txt"
    data.write_text(PATTERN * 600)
    code = main(["tune", "--model", str(tune_model_dir), "--data", str(data), "--tokens", "8", "--steps", "60",
                 "--lr", "0.1", "--block-size", "32", "--out", str(tmp_path / "dk.zip"), "--peft-out",
                 str(tmp_path / "dk-peft"), "--name", "Dragon Knight", "--author", "Me", "--description", "d"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "60/60" in err and "tok/s" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("held-out loss: ") and "with the soft prompt" in last and "without" in last
    sp = describe_softprompt(tmp_path / "dk.zip")
    assert (sp.name, sp.n_tokens, sp.authors, sp.description) == ("Dragon Knight", 8, ("Me",), "d")
    assert sp.supported == (tune_model_dir.name,)
    with zipfile.ZipFile(tmp_path / "dk.zip") as zf:
        assert json.loads(zf.read("meta.json"))["supported"] == [tune_model_dir.name]
    assert describe_softprompt(tmp_path / "dk-peft").n_tokens == 8


def test_bare_name_lands_in_the_library(tune_model_dir, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text(PATTERN * 300)
    assert main(["tune", "--model", str(tune_model_dir), "--data", str(data), "--steps", "3", "--tokens", "4",
                 "--block-size", "16", "--out", "mine"]) == 0
    assert (user_softprompt_dir() / "mine.zip").exists()
    assert SoftPromptLibrary(extra_folders=[]).find("mine").softprompt.n_tokens == 4
    assert main(["tune", "--model", str(tune_model_dir), "--data", str(data), "--out", "mine"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_tune_rejects_bad_input(tune_model_dir, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("tiny")
    assert main(["tune", "--model", str(tune_model_dir), "--data", str(tmp_path / "short.txt"),
                 "--out", str(tmp_path / "x.zip")]) == 2
    assert "at least" in capsys.readouterr().err
    assert main(["tune", "--model", str(tune_model_dir), "--data", str(tmp_path / "short.txt"), "--tokens", "0",
                 "--out", str(tmp_path / "y.zip")]) == 2
    assert not (tmp_path / "x.zip").exists() and not (tmp_path / "y.zip").exists()
