"""Repeating problems are logged on the 1st, 2nd, 4th, 8th, … occurrence."""
from mrpcd.daemon.log_limits import worth_logging


def test_powers_of_two_only():
    assert [n for n in range(0, 70) if worth_logging(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert worth_logging(1 << 40) and not worth_logging((1 << 40) + 1)
    assert not worth_logging(-4)
