"""Fuzz targets for the daemon's trust boundaries (see fuzz/targets.py and `make fuzz`)."""
