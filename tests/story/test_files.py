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


# -- files from the wild ------------------------------------------------------------------

from kobold_desktop.story.files import read_story, read_world_info  # noqa: E402


def ours(tmp_path, **changes):
    save_story(sample(), tmp_path / "ok.json")
    data = json.loads((tmp_path / "ok.json").read_text())
    data.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"version": "one"}, "its version is \"one\", not a number"),
    ({"version": None}, "its version is null"),
    ({"prompt": None}, "'prompt' is null, not text"),
    ({"memory": 7}, "'memory' is 7, not text"),
    ({"actions": [{"text": None, "source": "user"}]}, "'actions\\[0\\].text' is null"),
    ({"actions": [{"text": "x", "source": "robot"}]}, "'actions\\[0\\].source' is \"robot\""),
    ({"actions": "text"}, "'actions' is not a list"),
    ({"world_info": [{"keys": "rain", "content": "x"}]}, "'world_info\\[0\\].keys' is not a list"),
    ({"authors_note_depth": -2}, "'authors_note_depth' is -2"),
])
def test_a_damaged_story_is_refused_naming_the_field(tmp_path, changes, message):
    with pytest.raises(StoryFileError, match=message):
        read_story(ours(tmp_path, **changes))


def united_story(folder):
    """A KoboldAI United save: a folder with story.json, shaped as its settings.to_json writes it."""
    folder.mkdir()
    data = {
        "file_version": 2, "story_name": "The Keep", "prompt": "The keep stood on the hill.",
        "memory": "A grim tale.", "authornote": "Rain.", "authornotetemplate": "[Note: <|>]", "andepth": 2,
        "gamestarted": True, "sampler_order": [6, 0, 1, 2, 3, 4, 5],
        "actions": {"action_count": 1, "actions": {
            "1": {"Selected Text": " The gate fell.", "Options": [], "Selected Text Length": 4, "Probabilities": [],
                  "Time": 1700000000, "Original Text": " The gate fell."},
            "0": {"Selected Text": " A knight rode up.", "Options": [{"text": " A crow cawed.", "Pinned": False}],
                  "Selected Text Length": 5, "Probabilities": [], "Time": 1700000000}}},
        "worldinfo_v2": {"folders": {"root": [0]}, "entries": {"0": {
            "uid": 0, "title": "The keep", "key": ["keep", "castle"], "keysecondary": [], "folder": "root",
            "constant": False, "manual_text": "", "content": "The keep is old.", "comment": "", "token_length": 5,
            "selective": False, "used_in_game": False, "type": "wi"}}},
        # Values United could not put in JSON are pickled: never to be opened.
        "biases": "base64:gASVIAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAVlY2hvIJSFlFKULg==\n",
    }
    (folder / "story.json").write_text(json.dumps(data, indent="\t"))
    return folder


def test_a_koboldai_united_story_imports_and_its_pickles_are_skipped(tmp_path):
    folder = united_story(tmp_path / "The Keep")
    for path in (folder, folder / "story.json"):
        read = read_story(path)
        assert not read.ours
        story = read.story
        assert story.title == "The Keep" and story.prompt == "The keep stood on the hill."
        assert [a.text for a in story.actions] == [" A knight rode up.", " The gate fell."]
        assert (story.memory, story.authors_note, story.authors_note_template, story.authors_note_depth) == (
            "A grim tale.", "Rain.", "[Note: <|>]", 2)
        assert story.world_info == [WorldInfoEntry(["keep", "castle"], "The keep is old.", comment="The keep")]
        assert len(read.notices) == 1 and "biases" in read.notices[0] and "never opened" in read.notices[0]


def test_world_info_from_sillytavern_koboldai_lite_and_united(tmp_path):
    tavern = {"entries": {
        "0": {"uid": 0, "key": ["dragon", "wyrm"], "keysecondary": [], "comment": "Dragons",
              "content": "Dragons hoard gold.", "constant": False, "vectorized": False, "selective": True,
              "selectiveLogic": 0, "addMemo": True, "order": 100, "position": 0, "disable": False,
              "excludeRecursion": False, "probability": 100, "useProbability": True, "depth": 4, "group": ""},
        "1": {"uid": 1, "key": ["old"], "content": "Switched off.", "disable": True},
        "2": {"uid": 2, "key": [], "comment": "Setting", "content": "It is winter.", "constant": True}}}
    (tmp_path / "tavern.json").write_text(json.dumps(tavern))
    assert read_world_info(tmp_path / "tavern.json") == [
        WorldInfoEntry(["dragon", "wyrm"], "Dragons hoard gold.", comment="Dragons"),
        WorldInfoEntry([], "It is winter.", constant=True, comment="Setting")]

    lite = [{"key": "castle, keep", "keysecondary": "", "keyanti": "", "content": "The castle is cold.",
             "comment": "", "folder": None, "selective": False, "constant": False, "probability": "100",
             "wigroup": "", "widisabled": False},
            {"key": "ghost", "content": "Gone.", "widisabled": True}]
    (tmp_path / "lite.json").write_text(json.dumps(lite))
    assert read_world_info(tmp_path / "lite.json") == [WorldInfoEntry(["castle", "keep"], "The castle is cold.")]

    united = json.loads((united_story(tmp_path / "u") / "story.json").read_text())["worldinfo_v2"]
    (tmp_path / "united-wi.json").write_text(json.dumps(united))
    assert read_world_info(tmp_path / "united-wi.json")[0].keys == ["keep", "castle"]

    (tmp_path / "story.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(StoryFileError, match="not a World Info file"):
        read_world_info(tmp_path / "story.json")


def test_a_koboldai_story_whose_worldinfo_is_not_a_list_still_opens(tmp_path):
    from kobold_desktop.story.files import read_story

    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"gamestarted": True, "prompt": "Once", "actions": [" upon"], "worldinfo": 5}))
    story = read_story(path).story
    assert story.prompt == "Once" and story.world_info == []


def test_a_lone_surrogate_in_a_story_file_opens_and_saves_as_a_replacement_character(tmp_path):
    from kobold_desktop.story.files import read_story, save_story

    path = tmp_path / "half.json"
    path.write_text('{"gamestarted": true, "prompt": "Once \\ud800 upon", "actions": [" a \\udfff time"]}')
    story = read_story(path).story
    save_story(story, tmp_path / "saved.json")  # used to fail: a lone surrogate cannot be UTF-8
    again = read_story(tmp_path / "saved.json").story
    assert again.prompt == "Once \ufffd upon" and again.actions[0].text == " a \ufffd time"
