"""``xcft demo``: an end-to-end run on synthetic coloured-shape data that finishes in minutes on a CPU."""
