"""layerfuse.integrations."""
