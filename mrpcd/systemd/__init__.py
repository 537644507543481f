"""The systemd unit shipped with mrpcd (`mrpcd --print-unit`)."""
