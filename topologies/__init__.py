"""One file per paper setup: build(**params) -> Topology."""
