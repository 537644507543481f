"""A transport version whose hand_over() fails on its second connection, after it already
went quiet (its state is lost): the next upgrade must not leave that connection hanging."""
from mrpcd.transports._tcp import PeerConnection as _Current

_calls = [0]


class PeerConnection(_Current):
    VERSION = "flaky-test"

    def hand_over(self):
        _calls[0] += 1
        state = super().hand_over()
        if _calls[0] == 2:
            raise RuntimeError("flaky hand_over")
        return state
