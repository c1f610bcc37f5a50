"""Saving and opening stories; importing KoboldAI-Client stories."""

import json
import os

import pytest

from kobold_desktop.story import Action, Story, WorldInfoEntry
from kobold_desktop.story.files import StoryFileError, load_story, save_story


def sample():
    return Story(title="Tale", prompt="Once.", actions=[Action(" I go.", "user"), Action(" It rains.", "model")],
                 memory="M", authors_note="dark", world_info=[WorldInfoEntry(["rain"], "Rain is rare.")])


def test_save_and_open_round_trip(tmp_path):
    save_story(sample(), tmp_path / "tale.json")
    assert load_story(tmp_path / "tale.json") == sample()


def test_failed_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "tale.json"
    save_story(sample(), path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    changed = sample()
    changed.prompt = "Changed."
    with pytest.raises(StoryFileError, match="No space left on device; the previous save is intact"):
        save_story(changed, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tale.json"]


def test_import_koboldai_client_story(tmp_path):
    kobold = {
        "gamestarted": True, "prompt": "You are a knight.", "memory": "Sir Bors.",
        "authorsnote": "grim", "anotetemplate": "[Note: <|>]",
        "actions": [" You draw your sword.", " The dragon wakes."], "actions_metadata": {},
        "worldinfo": [{"key": "dragon, wyrm", "keysecondary": "", "content": "Dragons hoard gold.",
                       "comment": "", "folder": None, "selective": False, "constant": False}],
    }
    (tmp_path / "knight.json").write_text(json.dumps(kobold))
    story = load_story(tmp_path / "knight.json")
    assert story.prompt == "You are a knight." and story.memory == "Sir Bors."
    assert [a.text for a in story.actions] == [" You draw your sword.", " The dragon wakes."]
    assert story.authors_note == "grim" and story.authors_note_template == "[Note: <|>]"
    assert story.world_info[0].keys == ["dragon", "wyrm"] and story.title == "knight"


@pytest.mark.parametrize("content,match", [("{broken", "not readable JSON"), ('{"a": 1}', "neither"),
                                           ("[1, 2]", "not a story file")])
def test_bad_story_files(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(StoryFileError, match=match):
        load_story(tmp_path / "bad.json")
