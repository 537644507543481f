"""The mrpcd daemon: control plane, per-app datapaths, transports."""
