"""Everything that imports Qt: the window, its widgets, and the model worker thread."""
