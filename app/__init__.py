"""The application layer: the `pointsman` command and what only it runs (local fleet, demo,
live view, sidecar-injecting webhook). It may import every other package; none imports it."""
