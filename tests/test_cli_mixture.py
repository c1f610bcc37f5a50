"""The command line's mixtures: generate --mixture/--mix, softprompt blend, list."""

import json

import pytest
import torch

from kobold_desktop.cli import main
from kobold_desktop.softprompt import Metadata, kobold_zip, load_softprompt
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture

GREEDY = ["--temperature", "0", "--max-new-tokens", "10", "--json"]


@pytest.fixture
def zips(tmp_path):
    torch.manual_seed(1)
    made = {}
    for name, n, hidden in (("A", 4, 32), ("B", 4, 32), ("Short", 2, 32), ("Wide", 4, 48)):
        made[name] = tmp_path / f"{name}.zip"
        kobold_zip.write(made[name], torch.randn(n, hidden), Metadata(name=name))
    return made


def run_json(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def test_mix_of_one_equals_the_softprompt(model_dirs, zips, capsys):
    model = ["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "The knight", *GREEDY]
    single, _ = run_json(capsys, model + ["--softprompt", str(zips["A"])])
    mixed, err = run_json(capsys, model + ["--mix", f"{zips['A']}=1"])
    assert mixed["text"] == single["text"] and mixed["mixture_weights"] == {"A": 1.0}
    assert "Mixture: A 100%" in err


def test_mixture_file_with_members_beside_it(model_dirs, zips, tmp_path, capsys):
    write_mixture(tmp_path / "mix.json", Mixture("Two", "fixed", (MixtureMember("A.zip", 3), MixtureMember("Short.zip", 1))))
    data, err = run_json(capsys, ["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "The knight",
                                  "--mixture", str(tmp_path / "mix.json"), *GREEDY])
    assert data["mixture_weights"] == {"A": 0.75, "Short": 0.25}  # fixed: the weights never move
    assert data["softprompt_tokens"] == 4  # the longest member
    assert "Mixture: A 75% + Short 25% (fixed)" in err
    # a mixture file given as --softprompt is used as a mixture
    again, _ = run_json(capsys, ["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "The knight",
                                 "--softprompt", str(tmp_path / "mix.json"), *GREEDY])
    assert again["text"] == data["text"]
    # --mix-mode overrides the file's mode: bayes weights move with the text
    moved, _ = run_json(capsys, ["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "The knight",
                                 "--mixture", str(tmp_path / "mix.json"), "--mix-mode", "bayes", *GREEDY])
    assert moved["mixture_weights"] != {"A": 0.75, "Short": 0.25}


@pytest.mark.parametrize("argv, message", [
    (["--mix", "A.zip"], "write it as SOFTPROMPT=WEIGHT"),
    (["--mix", "{A}=x"], "write it as SOFTPROMPT=WEIGHT"),
    (["--mix", "{A}=-1"], "weight must be a number of 0 or more"),
    (["--mix", "{A}=1", "--softprompt", "{B}"], "use one or the other"),
    (["--mix", "{A}=1", "--mix", "{Wide}=1"], "member 'Wide.zip' cannot be used: made for a model with hidden size 48"),
    (["--mix-mode", "fixed"], "--mix-mode goes with --mixture or --mix"),
])
def test_bad_mixtures_exit_2_with_a_reason(model_dirs, zips, capsys, argv, message):
    argv = [a.format(**{k: str(v) for k, v in zips.items()}) for a in argv]
    code = main(["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "x", "--max-new-tokens", "2", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_member_exits_2(model_dirs, zips, tmp_path, capsys):
    write_mixture(tmp_path / "m.json", Mixture("M", "bayes", (MixtureMember("A.zip", 1), MixtureMember("Gone.zip", 1))))
    code = main(["generate", "--model", str(model_dirs["gpt2"]), "--prompt", "x", "--mixture", str(tmp_path / "m.json")])
    assert code == 2 and "member 'Gone.zip' is missing" in capsys.readouterr().err


def test_blend_writes_the_weighted_average(zips, tmp_path, capsys):
    out = tmp_path / "C.zip"
    assert main(["softprompt", "blend", str(zips["A"]), str(zips["B"]), "--weights", "0.75,0.25", "--out", str(out)]) == 0
    _, a = load_softprompt(zips["A"])
    _, b = load_softprompt(zips["B"])
    softprompt, c = load_softprompt(out)
    assert torch.allclose(c, 0.75 * a + 0.25 * b, atol=1e-6)
    assert softprompt.name == "C" and "A 75% + B 25%" in softprompt.description
    assert main(["softprompt", "blend", str(zips["A"]), str(zips["B"]), "--out", str(out)]) == 2  # never overwrites


@pytest.mark.parametrize("other, message", [("Short", "only soft prompts of the same length"),
                                            ("Wide", "are for different models")])
def test_blend_refuses_mismatched_members(zips, tmp_path, capsys, other, message):
    code = main(["softprompt", "blend", str(zips["A"]), str(zips[other]), "--out", str(tmp_path / "C.zip")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "C.zip").exists()


def test_list_shows_mixtures_with_their_members(zips, tmp_path, capsys, model_dirs):
    write_mixture(tmp_path / "ok.json", Mixture("Good mix", "bayes", (MixtureMember("A.zip", 7), MixtureMember("B.zip", 3))))
    write_mixture(tmp_path / "gone.json", Mixture("Gone mix", "fixed", (MixtureMember("A.zip", 1), MixtureMember("X.zip", 1))))
    write_mixture(tmp_path / "wide.json", Mixture("Wide mix", "fixed", (MixtureMember("A.zip", 1), MixtureMember("Wide.zip", 1))))
    data, _ = run_json(capsys, ["softprompt", "list", "--dir", str(tmp_path), "--model", str(model_dirs["gpt2"]), "--json"])
    rows = {r["name"]: r for r in data["softprompts"]}
    assert rows["Good mix"]["format"] == "mixture" and rows["Good mix"]["compatible"]
    assert [m["weight"] for m in rows["Good mix"]["members"]] == pytest.approx([0.7, 0.3])
    assert not rows["Gone mix"]["compatible"] and "member 'X.zip' is missing" in rows["Gone mix"]["reason"]
    assert not rows["Wide mix"]["compatible"] and "member 'Wide.zip'" in rows["Wide mix"]["reason"]
    assert main(["softprompt", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Good mix  [ok.json]  bayes Mixture: A 70% + B 30%" in out
    assert "missing: X.zip" in out
