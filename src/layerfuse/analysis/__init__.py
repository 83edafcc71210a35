"""layerfuse.analysis."""
