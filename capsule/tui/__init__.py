"""The terminal UI: the live actor tree of a run (``capsule run --tui``), or of
a journaled run, followed as another process writes it or browsed once it
ended (``capsule tui``)."""
