"""`kobold-desktop generate`: the command-line contract."""

import json
import subprocess
import sys

import torch

from kobold_desktop.cli import main
from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.softprompt import Metadata, kobold_zip


def test_generate_json_equals_the_engine(model_dirs, capsys):
    model = str(model_dirs["gpt2"])
    prompt = "Once upon a time\n  "
    code = main(["generate", "--model", model, "--prompt", prompt, "--temperature", "0",
                 "--repetition-penalty", "1", "--max-new-tokens", "12", "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"text", "finish_reason", "prompt_tokens", "softprompt_tokens", "generated_tokens", "seconds",
                         "runs_on"}
    # The precision is chosen per CPU (bfloat16 with AMX) and changes the text: it is said.
    assert data["runs_on"]["backend"] == "transformers" and data["runs_on"]["device"] == "cpu"
    assert data["runs_on"]["precision"] in ("float32", "bfloat16")
    assert data["runs_on"]["why"].startswith(data["runs_on"]["precision"] + ": this CPU has")
    assert f"Running on cpu in {data['runs_on']['precision']}" in err
    engine = Engine()
    engine.load(model)
    expected = engine.generate(prompt, SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12))
    assert data["text"] == expected.text  # the prompt is used verbatim, trailing spaces too
    assert data["prompt_tokens"] == expected.prompt_tokens == len(engine.encode(prompt))


def test_generate_with_softprompts_and_prompt_file(model_dirs, tmp_path, capsys):
    kobold_zip.write(tmp_path / "a.zip", torch.randn(4, 32), Metadata(name="A", supported=["other-model"]))
    kobold_zip.write(tmp_path / "b.zip", torch.randn(3, 32), Metadata(name="B"))
    (tmp_path / "p.txt").write_text("The dragon\n", encoding="utf-8")
    code = main(["generate", "--model", str(model_dirs["gpt2"]), "--softprompt", str(tmp_path / "a.zip"),
                 "--softprompt", str(tmp_path / "b.zip"), "--prompt-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "5", "--seed", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["softprompt_tokens"] == 7
    assert "warning: made for other-model" in err


def test_generate_softprompt_by_library_name(model_dirs, isolated_home, capsys):
    from kobold_desktop.paths import user_softprompt_dir

    kobold_zip.write(user_softprompt_dir() / "sea.zip", torch.randn(6, 32), Metadata(name="Sea Shanties"))
    code = main(["generate", "--model", str(model_dirs["gpt2"]), "--softprompt", "sea shanties",
                 "--prompt", "x", "--max-new-tokens", "3", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["softprompt_tokens"] == 6


def test_generate_stop_sequence(model_dirs, capsys):
    base = ["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "The knight", "--temperature", "0",
            "--max-new-tokens", "30", "--json"]
    main(base)
    full = json.loads(capsys.readouterr().out)["text"]
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2)
                if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    main(base + ["--stop", stop])
    data = json.loads(capsys.readouterr().out)
    assert data["finish_reason"] == "stop" and stop not in data["text"]


def test_rejected_input_exits_2_with_one_line(model_dirs, tmp_path, capsys):
    kobold_zip.write(tmp_path / "wide.zip", torch.randn(2, 64), Metadata(name="wide"))
    code = main(["generate", "--model", str(model_dirs["gpt2"]), "--softprompt", str(tmp_path / "wide.zip"),
                 "--prompt", "x"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: wide.zip: made for a model with hidden size 64")
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert main(["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "x", "--temperature", "-1"]) == 2
    assert main(["generate", "--model", str(model_dirs["gpt2"]), "--softprompt", "no such thing", "--prompt", "x"]) == 2


def test_generate_streams_text_in_a_subprocess(model_dirs):
    result = subprocess.run(
        [sys.executable, "-m", "kobold_desktop", "generate", "--model", str(model_dirs["gpt2"]),
         "--prompt", "Once", "--max-new-tokens", "8", "--seed", "3"],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "tokens/s]" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stdout) > 1
