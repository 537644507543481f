"""The in-memory dataset every hotel service serves: deterministic, generated, no database.

Why generated: DeathStarBench loads JSON files into MongoDB/memcached; here each service
builds the same table from a seed at start-up, so the mrpcd and grpcio deployments serve
identical data and a run needs nothing but Python. The shapes follow DeathStarBench:
80 hotels around San Francisco (hotel i at 37.7835 + i/500*3, -122.41 + i/500*4), a rate
plan per hotel and dates, 500 users "Cornell_<i>" whose password is str(i) ten times,
room capacity 200 per hotel and night.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from datetime import date, timedelta

N_HOTELS = 80
N_USERS = 501
CAPACITY = 200
SEED = 7
MAX_SEARCH_RADIUS_KM = 10.0
MAX_SEARCH_RESULTS = 5

STREETS = ["Market St", "Mission St", "Van Ness Ave", "Geary Blvd", "Lombard St", "Castro St", "Valencia St"]
NAMES = ["Clift", "Hyatt", "Nikko", "Marriott", "Westin", "Fairmont", "Omni", "Hilton", "Palace", "Ritz"]


@dataclass
class Hotel:
    id: str
    name: str
    phone: str
    description: str
    street_number: str
    street_name: str
    city: str
    state: str
    country: str
    postal_code: str
    lat: float
    lon: float
    images: list[str] = field(default_factory=list)
    rate: float = 0.0          # recommendation "rate": review score
    price: float = 0.0         # recommendation "price": base nightly price
    room_code: str = "RACK"

    @property
    def address(self) -> str:
        return f"{self.street_number} {self.street_name}, {self.city}, {self.state} {self.postal_code}"


def hotels(seed: int = SEED) -> dict[str, Hotel]:
    rnd = random.Random(seed)
    out: dict[str, Hotel] = {}
    for i in range(1, N_HOTELS + 1):
        hid = str(i)
        out[hid] = Hotel(
            id=hid,
            name=f"{rnd.choice(NAMES)} {i}",
            phone=f"(415) 555-{1000 + i:04d}",
            description=f"Hotel {i}: " + " ".join(rnd.choice(["quiet", "central", "modern", "historic", "cozy", "bright"]) for _ in range(8)),
            street_number=str(rnd.randint(1, 2000)),
            street_name=rnd.choice(STREETS),
            city="San Francisco", state="CA", country="United States",
            postal_code=f"941{rnd.randint(0, 99):02d}",
            lat=37.7835 + i / 500.0 * 3, lon=-122.41 + i / 500.0 * 4,
            images=[f"https://hotels.example/{i}/{k}.jpg" for k in range(2)],
            rate=round(rnd.uniform(2.0, 5.0), 1),
            price=round(rnd.uniform(90.0, 400.0), 2),
            room_code=rnd.choice(["RACK", "KNG", "QN", "DBL"]),
        )
    return out


def users() -> dict[str, str]:
    """username -> sha256(password) (DeathStarBench stores the hash too)."""
    return {f"Cornell_{i}": hashlib.sha256((str(i) * 10).encode()).hexdigest() for i in range(N_USERS)}


def password_of(i: int) -> str:
    return str(i) * 10


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 6371.0 * 2 * math.asin(math.sqrt(a))


def nights(in_date: str, out_date: str) -> list[str]:
    """The nights of a stay, 'YYYY-MM-DD' each; ValueError on a bad date or an empty stay."""
    start, end = date.fromisoformat(in_date), date.fromisoformat(out_date)
    if end <= start:
        raise ValueError(f"outDate {out_date} is not after inDate {in_date}")
    if (end - start).days > 31:
        raise ValueError(f"stay {in_date}..{out_date} is longer than 31 nights")
    return [(start + timedelta(days=d)).isoformat() for d in range((end - start).days)]
