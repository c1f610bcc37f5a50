"""The soft prompt library: scan, refresh, import, rename, delete, remember."""

import os
import time

import pytest

from kobold_desktop.settings import Settings
from kobold_desktop.softprompt import errors as E
from kobold_desktop.softprompt import io as sp_io
from kobold_desktop.softprompt.library import SoftPromptLibrary, safe_stem

from .builders import mkultra_json, random_tensor, softprompt_zip


@pytest.fixture
def folders(tmp_path):
    user, bundled, outside = tmp_path / "user", tmp_path / "bundled", tmp_path / "outside"
    for folder in (user, bundled, outside):
        folder.mkdir()
    return user, bundled, outside


@pytest.fixture
def library(folders, tmp_path):
    user, bundled, _ = folders
    return SoftPromptLibrary(user, [bundled], settings=Settings(tmp_path / "settings.json"))


def test_scan_lists_both_folders_and_marks_bad_files(library, folders):
    user, bundled, _ = folders
    softprompt_zip(user / "mine.zip", meta={"name": "Mine"})
    softprompt_zip(bundled / "example.zip", meta={"name": "Example"})
    (user / "broken.zip").write_text("nope")
    (user / "notes.txt").write_text("ignored")
    entries = {e.file_name: e for e in library.scan()}
    assert set(entries) == {"mine.zip", "example.zip", "broken.zip"}
    assert entries["mine.zip"].writable and not entries["example.zip"].writable
    assert entries["example.zip"].name == "Example"
    assert not entries["broken.zip"].valid and "not a zip" in entries["broken.zip"].error.reason


def test_user_folder_is_created_on_first_use(tmp_path, isolated_home):
    library = SoftPromptLibrary(extra_folders=[])
    assert library.user_folder.is_dir()
    assert str(isolated_home) in str(library.user_folder)


def test_refresh_rereads_only_what_changed(library, folders, monkeypatch):
    user, _, _ = folders
    a = softprompt_zip(user / "a.zip")
    softprompt_zip(user / "b.zip")
    library.scan()
    calls = []
    real = sp_io.describe_softprompt
    monkeypatch.setattr("kobold_desktop.softprompt.library.describe_softprompt",
                        lambda p, limits: calls.append(p.name) or real(p, limits))
    library.refresh()
    assert calls == []
    a.unlink()
    softprompt_zip(a, random_tensor(9, 16))
    os.utime(a, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    softprompt_zip(user / "c.zip")
    entries = {e.file_name: e for e in library.refresh()}
    assert sorted(calls) == ["a.zip", "c.zip"]
    assert entries["a.zip"].softprompt.n_tokens == 9
    (user / "b.zip").unlink()
    assert "b.zip" not in {e.file_name for e in library.refresh()}


def test_import_copies_the_zip_without_extracting(library, folders):
    _, _, outside = folders
    src = softprompt_zip(outside / "Sea Shanties.zip", meta={"name": "Sea"})
    entry = library.import_path(src)
    assert entry.path == library.user_folder / "Sea Shanties.zip"
    assert entry.path.read_bytes() == src.read_bytes()
    assert [p.name for p in library.user_folder.iterdir()] == ["Sea Shanties.zip"]
    again = library.import_path(src)
    assert again.path.name == "Sea Shanties (2).zip"
    assert entry.path.read_bytes() == src.read_bytes()  # never overwritten


def test_import_peft_folder_and_mkultra(library, folders):
    _, _, outside = folders
    peft = sp_io.convert(softprompt_zip(outside / "x.zip", random_tensor(3, 8)), outside / "adapter")
    (outside / "adapter" / "optimizer.pt").write_bytes(b"junk we do not copy")
    entry = library.import_path(peft.path)
    assert entry.path.is_dir() and sorted(p.name for p in entry.path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    mk = library.import_path(mkultra_json(outside / "mk.json", random_tensor(2, 8)))
    assert mk.path.suffix == ".zip" and mk.softprompt.n_tokens == 2


def test_rejected_import_writes_nothing(library, folders):
    _, _, outside = folders
    bad = outside / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    nan = random_tensor(2, 4)
    nan[0, 0] = float("nan")
    imported, rejected = library.import_paths([bad, softprompt_zip(outside / "nan.zip", nan),
                                               softprompt_zip(outside / "ok.zip")])
    assert [e.file_name for e in imported] == ["ok.zip"]
    assert [type(e) for e in rejected] == [E.CorruptFileError, E.NonFiniteError]
    assert [p.name for p in library.user_folder.iterdir()] == ["ok.zip"]


@pytest.mark.parametrize("name,expected", [
    ("../../etc/passwd", "_._etc_passwd"), (".hidden", "hidden"), ("a/b\\c", "a_b_c"), ("C:evil", "C_evil"),
    ("bell\x07name\n", "bell_name_"), ("..", "softprompt"), ("CON", "CON_"), ("x.zip", "x"),
])
def test_safe_names(name, expected):
    assert safe_stem(name) == expected


def test_rename_stays_inside_the_folder(library, folders):
    user, _, _ = folders
    entry = library.import_path(softprompt_zip(folders[2] / "a.zip"))
    renamed = library.rename(entry, "../../escape")
    assert renamed.path.parent == user and not entry.path.exists()
    assert renamed.path.name == "_._escape.zip"
    other = library.import_path(softprompt_zip(folders[2] / "b.zip"))
    clash = library.rename(other, "_._escape")
    assert clash.path.name == "_._escape (2).zip"


def test_delete_and_bundled_protection(library, folders):
    user, bundled, _ = folders
    softprompt_zip(bundled / "example.zip")
    mine = library.import_path(softprompt_zip(folders[2] / "mine.zip"))
    example = library.find("example")
    with pytest.raises(E.SoftPromptError, match="bundled"):
        library.delete(example)
    with pytest.raises(E.SoftPromptError, match="bundled"):
        library.rename(example, "x")
    library.delete(mine)
    assert not mine.path.exists() and (bundled / "example.zip").exists()


def test_find_never_uses_a_name_as_a_path(library, folders, tmp_path):
    softprompt_zip(folders[0] / "a.zip", meta={"name": "Alpha"})
    assert library.find("alpha").file_name == "a.zip"
    assert library.find("A.ZIP").file_name == "a.zip"
    assert library.find(str(folders[0] / "a.zip")).file_name == "a.zip"
    softprompt_zip(tmp_path / "secret.zip")
    with pytest.raises(E.NotFoundError):
        library.find("../secret")


def test_selection_is_remembered_across_restarts(library, folders, tmp_path):
    entry = library.import_path(softprompt_zip(folders[2] / "pick.zip"))
    library.remember_selection(entry)
    again = SoftPromptLibrary(folders[0], [folders[1]], settings=Settings(tmp_path / "settings.json"))
    assert again.remembered_selection().path == entry.path
    renamed = again.rename(again.remembered_selection(), "picked")
    third = SoftPromptLibrary(folders[0], [folders[1]], settings=Settings(tmp_path / "settings.json"))
    assert third.remembered_selection().path == renamed.path
    third.delete(renamed)
    assert SoftPromptLibrary(folders[0], [], settings=Settings(tmp_path / "settings.json")).remembered_selection() is None


def test_damaged_settings_file_does_not_stop_the_app(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{broken")
    settings = Settings(path)
    assert settings.get("x") is None
    settings.set("x", 1)
    assert Settings(path).get("x") == 1 and (tmp_path / "settings.json.bad").exists()


def test_compatibility_against_a_model(library, folders):
    softprompt_zip(folders[0] / "small.zip", random_tensor(2, 16))
    softprompt_zip(folders[0] / "large.zip", random_tensor(2, 64))
    library.scan()
    assert library.find("small").compatibility(16).ok
    result = library.find("large").compatibility(16)
    assert not result.ok and result.reason == "made for a model with hidden size 64; this model has 16"
