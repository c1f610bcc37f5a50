"""Learning a mixture's weights (EM), ranking soft prompts, training a mixture."""

import contextlib
import json
import math

import pytest
import torch

from kobold_desktop.cli import main
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.softprompt.mixture import read_mixture
from kobold_desktop.tuning import TuningConfig, held_out_loss, make_blocks
from kobold_desktop.tuning.mixture import fit_weights, mixture_loss, rank_softprompts, train_mixture

from .conftest import PATTERN

OTHER = " the sea was calm and grey"


def test_em_converges_to_the_member_that_explains_the_text():
    torch.manual_seed(0)
    # Member 1 gives every block 5 nats more log-likelihood than the others.
    logliks = torch.randn(40, 3) - 100
    logliks[:, 1] += 5
    weights = fit_weights(logliks)
    assert weights[1] > 0.999 and math.isclose(float(weights.sum()), 1.0)


def test_em_finds_the_share_of_each_kind_of_block():
    # 30 blocks that member 0 explains (by 20 nats), 10 that member 1 does: weights 3/4, 1/4.
    logliks = torch.zeros(40, 2)
    logliks[:30, 1] = -20
    logliks[30:, 0] = -20
    weights = fit_weights(logliks)
    assert weights.tolist() == pytest.approx([0.75, 0.25], abs=1e-6)
    # the mixture's loss by hand: each block's probability is (about) its member's weight
    expected = -(30 * math.log(0.75) + 10 * math.log(0.25)) / 40 / 10
    assert mixture_loss(logliks, weights, 10) == pytest.approx(expected, rel=1e-6)


def test_one_em_step_by_hand():
    logliks = torch.tensor([[math.log(0.2), math.log(0.6)], [math.log(0.5), math.log(0.1)]], dtype=torch.float64)
    # from (1/2, 1/2): shares of block 1 are (0.25, 0.75), of block 2 (5/6, 1/6)
    weights = fit_weights(logliks, iterations=1)
    assert weights.tolist() == pytest.approx([(0.25 + 5 / 6) / 2, (0.75 + 1 / 6) / 2])


@pytest.fixture
def two_softprompts(tune_engine, tmp_path):
    torch.manual_seed(3)
    paths = []
    for name in ("A", "B"):
        path = tmp_path / f"{name}.zip"
        kobold_zip.write(path, torch.randn(5, tune_engine.hidden_size) * 0.5, Metadata(name=name))
        paths.append(path)
    return paths


def test_rank_losses_equal_the_trainers_held_out_loss(tune_engine, two_softprompts):
    loaded = tune_engine.loaded
    blocks = make_blocks((PATTERN + OTHER) * 80, loaded.tokenizer, 32, 0.25, 1)
    prepared = [tune_engine.prepare_softprompts([p]) for p in two_softprompts]
    ranking = rank_softprompts(loaded.model, blocks, [(p.name, f, p.tensor) for p, f in zip(prepared, two_softprompts)])
    by_name = {s.name: s for s in ranking.softprompts}
    for p in prepared:  # the trainer computes the same loss through transformers' own `labels`
        assert by_name[p.name].loss == pytest.approx(
            held_out_loss(loaded.model, p.tensor, blocks.held_out, 4, contextlib.nullcontext), rel=1e-4)
    assert ranking.none_loss == pytest.approx(
        held_out_loss(loaded.model, None, blocks.held_out, 4, contextlib.nullcontext), rel=1e-4)
    assert [s.loss for s in ranking.softprompts] == sorted(s.loss for s in ranking.softprompts)
    assert sum(s.weight for s in ranking.softprompts) == pytest.approx(1.0)
    # the learned mixture is never worse than its best member by more than the weight's cost
    best = ranking.softprompts[0]
    assert ranking.mixture_loss <= best.loss - math.log(best.weight) / 31 + 1e-9


def test_rank_command_json_and_mixture_file(tune_model_dir, two_softprompts, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text((PATTERN + OTHER) * 80)
    out = tmp_path / "mix.json"
    code = main(["softprompt", "rank", "--model", str(tune_model_dir), "--data", str(data), "--block-size", "32",
                 *map(str, two_softprompts), "--json", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(stdout)
    assert set(result) == {"none_loss", "softprompts", "mixture_loss"}
    assert {s["name"] for s in result["softprompts"]} == {"A", "B"}
    assert all(set(s) == {"name", "path", "loss", "weight"} for s in result["softprompts"])
    mixture = read_mixture(out)
    assert mixture.mode == "bayes"
    assert {m.softprompt: m.weight for m in mixture.members} == pytest.approx(
        {s["path"].rsplit("/", 1)[-1]: s["weight"] for s in result["softprompts"]}, abs=1e-6)
    entry = SoftPromptLibrary(tmp_path, []).find("mix.json")
    assert entry.is_mixture and all(m is not None for m in entry.members)
    # the text output names the best one first; an existing --out is refused
    assert main(["softprompt", "rank", "--model", str(tune_model_dir), "--data", str(data), "--block-size", "32",
                 *map(str, two_softprompts), "--out", str(out)]) == 2


def test_a_trained_mixture_specialises(tune_engine):
    """Two kinds of text; each member ends up owning one kind, and the mixture beats both."""
    loaded = tune_engine.loaded
    ids_a = loaded.tokenizer(PATTERN * 4, add_special_tokens=False)["input_ids"][:16]
    ids_b = loaded.tokenizer(OTHER * 4, add_special_tokens=False)["input_ids"][:16]
    train = torch.tensor([ids_a] * 24 + [ids_b] * 24)
    held = torch.tensor([ids_a] * 4 + [ids_b] * 4)
    from kobold_desktop.tuning.data import Blocks

    config = TuningConfig(n_tokens=4, steps=60, lr=0.1, batch_size=8, block_len=16, eval_every=10, seed=5,
                          init="random")
    result = train_mixture(loaded.model, loaded.tokenizer, Blocks(train, held), config, 2)
    owner = result.shares.argmax(dim=1)
    assert len(set(owner[:24].tolist())) == 1 and len(set(owner[24:].tolist())) == 1
    assert owner[0] != owner[-1]  # each kind has its own member
    assert result.weights == pytest.approx([0.5, 0.5], abs=0.05)
    assert result.mixture_held_out_loss < min(result.held_out_losses)


def test_tune_mixture_command_writes_members_and_mixture(tune_model_dir, tmp_path, capsys):
    data = tmp_path / "t.txt"
    data.write_text((PATTERN * 8 + OTHER * 8) * 40)
    code = main(["tune", "--model", str(tune_model_dir), "--data", str(data), "--tokens", "4", "--steps", "6",
                 "--block-size", "16", "--mixture", "2", "--out", str(tmp_path / "Style.zip")])
    out, err = capsys.readouterr()
    assert code == 0, err
    mixture = read_mixture(tmp_path / "Style.json")
    assert [m.softprompt for m in mixture.members] == ["Style-1.zip", "Style-2.zip"]
    assert sum(m.weight for m in mixture.members) == pytest.approx(1.0, abs=1e-5)
    assert "held-out loss: mixture" in err
    code = main(["generate", "--model", str(tune_model_dir), "--mixture", str(tmp_path / "Style.json"),
                 "--prompt", "the", "--max-new-tokens", "4", "--json"])
    assert code == 0
    assert set(json.loads(capsys.readouterr().out)["mixture_weights"]) == {"Style 1", "Style 2"}
    assert main(["tune", "--model", str(tune_model_dir), "--data", str(data), "--mixture", "2",
                 "--out", str(tmp_path / "Style.zip")]) == 2  # never overwrites
