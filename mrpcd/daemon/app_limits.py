"""Bounds on what one app may make the daemon hold through its control requests.

Why: the daemon is shared by every app on the host. A single control message is bounded
(control_proto.MAX_CONTROL_MESSAGE) and so is a single schema (marshal.schema's MAX_*),
but an app may send as many of them as it likes; what it registers stays in the daemon for
as long as the app is connected. Without a bound of its own, an app registering new
services in a loop grew the daemon without limit, and every registration recomputed what
the earlier ones had registered (40,000 services: 0.3 s per registration, a stall of
every app's datapath).
"""
from __future__ import annotations

from ..control_proto import ControlError
from ..marshal.schema import Schema, SchemaError

# Messages, enums and services of all of one app's schemas together (4 times what one
# schema may define).
MAX_APP_DEFINITIONS = 16384
# Their fields, enum values and methods together.
MAX_APP_MEMBERS = 1 << 18


def check_app_schema(schema: Schema) -> None:
    """Raise SchemaError if `schema` (an app's schemas merged) holds more than one app may."""
    definitions = len(schema.messages) + len(schema.enums) + len(schema.services)
    if definitions > MAX_APP_DEFINITIONS:
        raise SchemaError(f"this app's schemas would define {definitions} messages, enums and services; "
                          f"an app may register at most {MAX_APP_DEFINITIONS}")
    members = (sum(len(m.fields) for m in schema.messages.values()) + sum(len(e.values) for e in schema.enums.values())
               + sum(len(s.methods) for s in schema.services.values()))
    if members > MAX_APP_MEMBERS:
        raise SchemaError(f"this app's schemas would hold {members} fields, enum values and methods; "
                          f"an app may register at most {MAX_APP_MEMBERS}")

# Addresses one app may listen on: each is a socket of the daemon's, and an app binding new
# ones in a loop took all of the daemon's descriptors, which every other app needs too.
MAX_APP_LISTENERS = 256

# Bytes of control messages not yet complete that the connections of one uid may have in
# the daemon together: a message may be 4 MiB (a big schema), so room for 16 at once. A
# connection that would go past it is closed with an error.
CONTROL_BYTES_PER_UID = 64 << 20


class ControlBudget:
    """The bytes of unfinished control messages the daemon holds, per uid.

    Why per uid: control connections are bounded only by the daemon's descriptors, and each
    may hold almost a whole message while it waits for the rest; a local user sending the
    start of a 4 MiB message on thousands of connections would take the daemon's memory.
    Counting per uid (SO_PEERCRED, which a client cannot choose) leaves the other users'
    apps unaffected by one user's."""

    def __init__(self, limit: int = CONTROL_BYTES_PER_UID) -> None:
        self.limit = limit
        self.held: dict[int, int] = {}

    def update(self, uid: int, before: int, after: int) -> bool:
        """One connection of `uid` went from holding `before` to `after` bytes; False if
        the uid now holds more than the limit (the caller closes that connection, which
        then gives its bytes back with update(uid, after, 0))."""
        total = self.held.get(uid, 0) - before + after
        if total > 0:
            self.held[uid] = total
        else:
            self.held.pop(uid, None)
        return total <= self.limit


# -- descriptors per app and per uid (the daemon's `limits:` config) ------------------------
# Why per uid too: a per-app bound alone lets one local user open many apps (each control
# connection, shared memory and wake-ups are descriptors of the daemon's), many control
# connections that never say hello, or many peer connections from each app, and so take
# every descriptor the daemon has, which every other user's apps need too. The per-uid
# bounds do not hold for root and the admin group (the project's admins); the per-app ones
# hold for every app (a runaway loop is a bug whoever runs it). The defaults leave a uid at
# most ~6,000 of the 65,536 descriptors the systemd unit gives the daemon.
# Why daemon-wide totals too: many uids (a host's users, or containers mapping their own)
# multiply the per-uid bounds; `control_connections` and `apps` bound them over every uid.
# Root and the admin group are counted in the totals but never refused by them, so an
# operator can always get in with mrpcctl (and its own apps). The connections peers open to
# the apps' listeners belong to no local uid: they are bounded per listening address and
# over the daemon (inbound_limits.py). Together the totals' defaults keep what the daemon
# holds for them (4,096 control sockets, 2,048 apps at 3 more descriptors each, 16,384
# inbound connections) under half of the unit's 65,536 descriptors.
DEFAULT_LIMITS: dict[str, int] = {
    "control_connections_per_uid": 256,  # control sockets (apps and mrpcctl) of one uid
    "apps_per_uid": 128,  # apps (connections that said hello) of one uid
    "connections_per_app": 1024,  # peer connections an app opened with `connect`
    "connections_per_uid": 4096,  # ... all the apps of one uid together
    "listeners_per_app": MAX_APP_LISTENERS,  # addresses an app listens on (`bind`)
    "listeners_per_uid": 1024,  # ... all the apps of one uid together
    # Daemon-wide, every uid together (see below): control sockets, and apps.
    "control_connections": 4096,
    "apps": 2048,
    # Connections peers opened to the apps' listeners (inbound_limits.py): per listening
    # address, and over the whole daemon. A calling app opens one per channel (the bench's
    # 128 concurrent calls share one), so 4,096 on one address is 4 peer apps at their
    # connections_per_app each; the total is a quarter of the unit's descriptors.
    "inbound_connections_per_listener": 4096,
    "inbound_connections": 16384,
}
LIMIT_RANGE = (1, 1 << 20)
ALL_UIDS = "all local users together have"  # `whose` of a daemon-wide bound's error


def limit_exceeded(what: str, key: str, count: int, limit: int, uid: int | None = None, whose: str | None = None) -> ControlError:
    """The RESOURCE_EXHAUSTED error an app gets at a `limits:` bound: what, whose, how many
    (`whose`: ALL_UIDS for a daemon-wide bound)."""
    if whose is None:
        whose = f"uid {uid} has" if uid is not None else "this app has"
    return ControlError(f"{whose} {count} {what} in mrpcd: at most {limit} allowed (limits.{key} in mrpcd's config); "
                        "close some, or ask the operator to raise it", 8)
