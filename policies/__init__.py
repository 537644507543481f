"""Policy engines: hot-swappable modules on a datapath."""
