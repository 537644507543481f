"""The eight hotel-reservation services, written once against `rt.Runtime` (asyncio).

Each class is one DeathStarBench service with the same call graph:
  frontend.SearchHotels -> search.Nearby (-> geo.Nearby, rate.GetRates)
                        -> reservation.CheckAvailability -> profile.GetProfiles
  frontend.Recommend    -> recommendation.GetRecommendations -> profile.GetProfiles
  frontend.Login        -> user.CheckUser
  frontend.Reserve      -> user.CheckUser -> reservation.MakeReservation
A downstream error goes back to the caller with its status code and details (so an ACL
denial at the reservation service reaches the load generator as PERMISSION_DENIED).
"""
from __future__ import annotations

import hashlib
from typing import Any

import data
from rt import Runtime, error_code, error_details

CALL_TIMEOUT = 10.0


class Base:
    def __init__(self, rt: Runtime, stubs: dict[str, Any]) -> None:
        self.rt = rt
        self.m = rt.messages(self.name)  # type: ignore[attr-defined]
        self.stubs = stubs
        self.hotels = data.hotels()

    async def call(self, context: Any, method: Any, request: Any) -> Any:
        """A downstream call; its failure aborts this call with the same code."""
        try:
            return await method(request, timeout=CALL_TIMEOUT)
        except self.rt.RpcError as exc:
            await context.abort(self.rt.code(error_code(exc)), error_details(exc))

    async def invalid(self, context: Any, details: str) -> None:
        await context.abort(self.rt.code("INVALID_ARGUMENT"), details)


class Geo(Base):
    name = "geo"

    async def Nearby(self, request: Any, context: Any) -> Any:
        near = sorted((data.distance_km(request.lat, request.lon, h.lat, h.lon), int(h.id)) for h in self.hotels.values())
        ids = [str(i) for d, i in near if d <= data.MAX_SEARCH_RADIUS_KM][:data.MAX_SEARCH_RESULTS]
        return self.m.Result(hotelIds=ids)


class Rate(Base):
    name = "rate"

    async def GetRates(self, request: Any, context: Any) -> Any:
        try:
            n = len(data.nights(request.inDate, request.outDate))
        except ValueError as exc:
            return await self.invalid(context, str(exc))
        plans = []
        for hid in request.hotelIds:
            h = self.hotels.get(hid)
            if h is None:
                continue
            total = round(h.price * n, 2)
            plans.append(self.m.RatePlan(hotelId=hid, code=h.room_code, inDate=request.inDate, outDate=request.outDate,
                                         roomType=self.m.RoomType(bookableRate=h.price, totalRate=total,
                                                                  totalRateInclusive=round(total * 1.14, 2), code=h.room_code,
                                                                  currency="USD", roomDescription=f"{h.room_code} room")))
        plans.sort(key=lambda p: p.roomType.totalRate)
        return self.m.Result(ratePlans=plans)


class Profile(Base):
    name = "profile"

    async def GetProfiles(self, request: Any, context: Any) -> Any:
        m, out = self.m, []
        for hid in request.hotelIds:
            h = self.hotels.get(hid)
            if h is None:
                continue
            out.append(m.Hotel(id=h.id, name=h.name, phoneNumber=h.phone, description=h.description,
                               address=m.Address(streetNumber=h.street_number, streetName=h.street_name, city=h.city,
                                                 state=h.state, country=h.country, postalCode=h.postal_code,
                                                 lat=h.lat, lon=h.lon),
                               images=[m.Image(url=u, isDefault=k == 0) for k, u in enumerate(h.images)]))
        return m.Result(hotels=out)


class User(Base):
    name = "user"

    def __init__(self, rt: Runtime, stubs: dict[str, Any]) -> None:
        super().__init__(rt, stubs)
        self.users = data.users()

    async def CheckUser(self, request: Any, context: Any) -> Any:
        want = self.users.get(request.username)
        got = hashlib.sha256(request.password.encode()).hexdigest()
        return self.m.Result(correct=want is not None and want == got)


class Recommendation(Base):
    name = "recommendation"

    async def GetRecommendations(self, request: Any, context: Any) -> Any:
        hs = list(self.hotels.values())
        if request.require == "dis":
            d = {h.id: data.distance_km(request.lat, request.lon, h.lat, h.lon) for h in hs}
            best = min(d.values())
            ids = [h.id for h in hs if d[h.id] == best]
        elif request.require == "rate":
            best = max(h.rate for h in hs)
            ids = [h.id for h in hs if h.rate == best]
        elif request.require == "price":
            best = min(h.price for h in hs)
            ids = [h.id for h in hs if h.price == best]
        else:
            return await self.invalid(context, f"require must be 'dis', 'rate' or 'price', got {request.require!r}")
        return self.m.Result(HotelIds=ids)


class Reservation(Base):
    """Rooms booked per (hotel, night); CAPACITY rooms per hotel and night.

    `acl` (grpcio runs only): the content rule that mrpcd runs as an operator policy has no
    operator-side equivalent for grpcio (a sidecar does not read protobuf fields), so there
    the same rule is compiled into the service.
    """
    name = "reservation"

    def __init__(self, rt: Runtime, stubs: dict[str, Any], acl: dict | None = None) -> None:
        super().__init__(rt, stubs)
        self.booked: dict[tuple[str, str], int] = {}
        self.acl = acl

    def _free(self, hid: str, nights: list[str], rooms: int) -> bool:
        return hid in self.hotels and all(self.booked.get((hid, n), 0) + rooms <= data.CAPACITY for n in nights)

    async def _stay(self, request: Any, context: Any) -> list[str] | None:
        try:
            return data.nights(request.inDate, request.outDate)
        except ValueError as exc:
            await self.invalid(context, str(exc))
            return None

    async def CheckAvailability(self, request: Any, context: Any) -> Any:
        nights = await self._stay(request, context)
        rooms = max(1, request.roomNumber)
        return self.m.Result(hotelId=[h for h in request.hotelId if self._free(h, nights or [], rooms)])

    async def MakeReservation(self, request: Any, context: Any) -> Any:
        if self.acl is not None:
            if request.customerName in self.acl["blocked_customers"]:
                await context.abort(self.rt.code("PERMISSION_DENIED"), "customer is blocked")
            if request.roomNumber > self.acl["max_rooms"]:
                await context.abort(self.rt.code("PERMISSION_DENIED"), f"more than {self.acl['max_rooms']} rooms")
        nights = await self._stay(request, context)
        if request.roomNumber < 1:
            return await self.invalid(context, f"roomNumber must be >= 1, got {request.roomNumber}")
        hids = list(request.hotelId)
        if not all(self._free(h, nights or [], request.roomNumber) for h in hids) or not hids:
            return self.m.Result(hotelId=[])
        for h in hids:
            for n in nights or []:
                self.booked[(h, n)] = self.booked.get((h, n), 0) + request.roomNumber
        return self.m.Result(hotelId=hids)


class Search(Base):
    name = "search"

    async def Nearby(self, request: Any, context: Any) -> Any:
        geo = self.rt.messages("geo")
        rate = self.rt.messages("rate")
        near = await self.call(context, self.stubs["geo"].Nearby, geo.Request(lat=request.lat, lon=request.lon))
        rates = await self.call(context, self.stubs["rate"].GetRates,
                                rate.Request(hotelIds=list(near.hotelIds), inDate=request.inDate, outDate=request.outDate))
        return self.m.SearchResult(hotelIds=[p.hotelId for p in rates.ratePlans])


class Frontend(Base):
    name = "frontend"

    async def _hotels(self, context: Any, ids: list[str], locale: str = "en") -> Any:
        prof = self.rt.messages("profile")
        res = await self.call(context, self.stubs["profile"].GetProfiles, prof.Request(hotelIds=ids, locale=locale))
        return self.m.HotelsReply(hotels=[
            self.m.HotelInfo(id=h.id, name=h.name, phoneNumber=h.phoneNumber, lat=h.address.lat, lon=h.address.lon,
                             address=f"{h.address.streetNumber} {h.address.streetName}, {h.address.city}")
            for h in res.hotels])

    async def SearchHotels(self, request: Any, context: Any) -> Any:
        search, resv = self.rt.messages("search"), self.rt.messages("reservation")
        found = await self.call(context, self.stubs["search"].Nearby, search.NearbyRequest(
            lat=request.lat, lon=request.lon, inDate=request.inDate, outDate=request.outDate))
        avail = await self.call(context, self.stubs["reservation"].CheckAvailability, resv.Request(
            customerName="", hotelId=list(found.hotelIds), inDate=request.inDate, outDate=request.outDate, roomNumber=1))
        return await self._hotels(context, list(avail.hotelId), request.locale or "en")

    async def Recommend(self, request: Any, context: Any) -> Any:
        rec = self.rt.messages("recommendation")
        res = await self.call(context, self.stubs["recommendation"].GetRecommendations,
                              rec.Request(require=request.require, lat=request.lat, lon=request.lon))
        return await self._hotels(context, list(res.HotelIds))

    async def _login(self, context: Any, username: str, password: str) -> bool:
        user = self.rt.messages("user")
        res = await self.call(context, self.stubs["user"].CheckUser, user.Request(username=username, password=password))
        return bool(res.correct)

    async def Login(self, request: Any, context: Any) -> Any:
        ok = await self._login(context, request.username, request.password)
        return self.m.LoginReply(ok=ok, message="Login successfully!" if ok else "Failed. Please check your username and password.")

    async def Reserve(self, request: Any, context: Any) -> Any:
        if not await self._login(context, request.username, request.password):
            await context.abort(self.rt.code("UNAUTHENTICATED"), "Failed. Please check your username and password.")
        resv = self.rt.messages("reservation")
        res = await self.call(context, self.stubs["reservation"].MakeReservation, resv.Request(
            customerName=request.customerName, hotelId=[request.hotelId], inDate=request.inDate,
            outDate=request.outDate, roomNumber=request.number))
        ok = bool(res.hotelId)
        return self.m.ReserveReply(message="Reserve successfully!" if ok else "Failed. Already reserved.",
                                   hotelIds=list(res.hotelId))


CLASSES = {c.name: c for c in (Geo, Rate, Profile, User, Recommendation, Reservation, Search, Frontend)}
# Who calls whom: the targets a service needs.
DEPENDS = {"search": ("geo", "rate"), "frontend": ("search", "reservation", "profile", "recommendation", "user")}
