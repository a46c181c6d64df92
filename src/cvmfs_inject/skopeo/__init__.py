"""skopeo behind one wrapper: the only place that spawns it."""
