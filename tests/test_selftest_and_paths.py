"""--self-test and portable mode."""

import sys

import pytest
import torch

from kobold_desktop import paths
from kobold_desktop.cli import main
from kobold_desktop.softprompt import Metadata, kobold_zip


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch, model_dirs):
    """A bundle root with a demo model (a tiny one), a bundled soft prompt for it and one made
    for another model (the bundle carries SmolLM2's too), which comes first by name."""
    import shutil

    root = tmp_path / "bundle"
    shutil.copytree(model_dirs["gpt2"], root / "assets" / "demo-model")
    (root / "softprompts").mkdir()
    kobold_zip.write(root / "softprompts" / "psalms.zip", torch.randn(6, 32), Metadata(name="Psalms"))
    kobold_zip.write(root / "softprompts" / "King James (SmolLM2).zip", torch.randn(5, 576), Metadata(name="King James"))
    monkeypatch.setattr(paths, "bundle_root", lambda: root)
    return root


def test_self_test_passes_and_says_what_it_checked(fake_bundle, capsys):
    assert main(["--self-test"]) == 0
    out = capsys.readouterr().out
    for check in ("demo model loads", "bundled soft prompts list", "generates without a soft prompt",
                  "loads a bundled soft prompt", "generates with it", "generates with a mixture of them",
                  "reads a Deflate64 soft prompt zip",
                  "reads an LZMA soft prompt zip", "window code starts offscreen"):
        assert f"[ok] {check}" in out
    assert "self-test: 10 passed, 0 failed" in out


def test_self_test_fails_without_a_demo_model(fake_bundle, capsys):
    import shutil

    shutil.rmtree(fake_bundle / "assets" / "demo-model")
    assert main(["--self-test"]) == 1
    assert "[FAIL] demo model loads" in capsys.readouterr().out


def test_portable_mode_keeps_user_files_beside_the_executable(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.HOME_ENV, raising=False)
    exe = tmp_path / "dist" / "kobold-desktop"
    exe.parent.mkdir()
    exe.write_text("")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "executable", str(exe))
    assert paths.portable_root() is None
    assert not str(paths.user_data_dir()).startswith(str(exe.parent))
    (exe.parent / "portable").write_text("")
    assert paths.user_data_dir() == exe.parent / "user-data" / "data"
    assert paths.user_config_dir() == exe.parent / "user-data" / "config"
    assert paths.user_softprompt_dir() == exe.parent / "user-data" / "data" / "softprompts"


def test_a_native_crash_in_a_check_is_a_failed_check_with_its_name(fake_bundle, monkeypatch, capsys):
    """A segfault (or an illegal instruction on an older CPU) inside llama.cpp used to end
    --self-test silently with exit 139: the check runs in a child process now."""
    from kobold_desktop import selftest

    monkeypatch.setattr(paths, "demo_gguf", lambda: fake_bundle / "assets" / "demo-model-q8_0.gguf")
    (fake_bundle / "assets" / "demo-model-q8_0.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(selftest, "child_command",
                        lambda name: [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
    assert main(["--self-test"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] llama.cpp generates from the demo GGUF with a soft prompt: RuntimeError: crashed in native " \
           "code (SIGSEGV)" in out
    assert "[ok] window code starts offscreen" in out  # the checks after it still ran
    assert "self-test: 10 passed, 1 failed" in out


def test_a_native_checks_own_error_comes_back_from_the_child(tmp_path):
    from kobold_desktop import selftest

    if paths.demo_gguf().is_file():
        pytest.skip("the demo GGUF is here (a bundle): the check would pass")
    with pytest.raises(RuntimeError, match="ModelError: .*demo-model-q8_0.gguf"):
        selftest.in_child("gguf")


def test_the_self_test_says_where_and_in_what_precision_the_model_runs(fake_bundle, capsys):
    assert main(["--self-test"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "demo model loads" in l)
    assert "on cpu in " in line and ("float32: this CPU has no AMX" in line or "bfloat16: this CPU has AMX" in line)


def test_the_gguf_check_uses_a_bundled_soft_prompt_that_fits_the_demo_model(tmp_path, monkeypatch, gguf_model):
    """The bundle's llama.cpp check (run in a child there; here in-process): the bundled
    folder also carries soft prompts for SmolLM2 (hidden size 576), first by name; it must
    take the demo model's own. It failed on the bundle before."""
    import shutil

    from kobold_desktop.selftest import _gguf_check

    root = tmp_path / "bundle"
    shutil.copytree(gguf_model["dir"], root / "assets" / "demo-model")
    shutil.copy(gguf_model["q8_0"], root / "assets" / "demo-model-q8_0.gguf")
    (root / "softprompts").mkdir()
    kobold_zip.write(root / "softprompts" / "King James (SmolLM2).zip", torch.randn(5, 576), Metadata(name="King James"))
    kobold_zip.write(root / "softprompts" / "psalms.zip", torch.randn(6, 64) * 0.3, Metadata(name="Psalms"))
    monkeypatch.setattr(paths, "bundle_root", lambda: root)
    detail = _gguf_check()
    assert "Psalms" in detail and "tokens as transformers in float32" in detail
