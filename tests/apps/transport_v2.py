"""A "new version" of the TCP transport for the live-upgrade test: same mechanics, new VERSION."""
from mrpcd.transports._tcp import PeerConnection as _Current


class PeerConnection(_Current):
    VERSION = "2-test"
