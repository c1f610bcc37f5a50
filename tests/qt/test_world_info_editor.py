"""The World Info editor: where each entry goes, and where new ones go."""

from kobold_desktop.story import Story


def test_the_editor_places_entries_and_new_ones_where_asked(qtbot):
    from kobold_desktop.qt.editors import WorldInfoEditor

    editor = WorldInfoEditor()
    qtbot.addWidget(editor)
    editor.load(Story())
    editor.new_place.setValue(3)
    editor.add_entry()
    assert editor.entries[0].depth == 3 and editor.place.value() == 3
    editor.place.setValue(-1)
    story = Story()
    editor.apply(story)
    assert story.world_info[0].depth is None and story.world_info_new_depth == 3
