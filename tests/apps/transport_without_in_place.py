"""A transport version from before in-place receive, for the live-upgrade test: it has no
set_in_place / evict_in_place (hidden here), yet adopts the same FrameDecoder."""
from mrpcd.transports._tcp import PeerConnection as _Current


class PeerConnection(_Current):
    VERSION = "0-no-in-place"
    set_in_place = None
    evict_in_place = None
