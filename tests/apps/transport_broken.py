"""A transport module that is not a transport: the upgrade must be refused, nothing changed."""


class PeerConnection:
    VERSION = "broken"
