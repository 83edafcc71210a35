"""layerfuse.cli."""
