"""Who may talk to this daemon over TCP: mutual TLS settings and the peer allow-list.

Config (``mrpcd/default_config.yaml``)::

    tls:                       # null: plain TCP
      cert: /etc/mrpcd/node.pem    # this daemon's certificate chain (PEM), used in both roles
      key: /etc/mrpcd/node.key     # its private key (PEM)
      ca: /etc/mrpcd/ca.pem        # the CA(s) that sign every peer daemon's certificate
      require_client_cert: true    # a connecting daemon must present a certificate from `ca`
    peers:
      allow: ["10.0.0.0/8", "::1"]  # null: any address; else only these (CIDR or single address)

The parsers here run when the config is loaded, so a missing certificate file or a bad CIDR
refuses the daemon's start with the reason, instead of failing the first connection. The
SSL contexts are built once here and shared by every connection.

Peer identity: a daemon dials an address, and the certificate it gets back must name that
address (subjectAltName IP or DNS entry; ``ssl.CERT_REQUIRED`` + ``check_hostname``): any
certificate from the CA is not enough to impersonate another peer.
"""
from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..keypath import KeyPathError

__all__ = ["AllowList", "PeerPolicy", "TlsConfig", "parse_peers", "parse_tls", "describe_tls_error"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AllowList:
    """A list of CIDR networks; ``permits(address)`` says whether a peer address is in one.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, what a dual-stack listener reports for
    IPv4 peers) are checked as the IPv4 address they carry.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        nets: list[IPNetwork] = []
        for i, entry in enumerate(entries):  # (KeyPathError: path (i,) is the entry)
            if not isinstance(entry, str):
                raise KeyPathError(f"allow-list entry {entry!r} must be a string (an address or CIDR network)", (i,))
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as exc:
                raise KeyPathError(f"allow-list entry {entry!r} is not an IP address or CIDR network: {exc}", (i,)) from None
        self.networks: tuple[IPNetwork, ...] = tuple(nets)

    def permits(self, address: str) -> bool:
        """True if ``address`` (an IP address string, optionally with a %scope) is allowed."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False  # not an address at all (a name was never resolved): refuse
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __eq__(self, other: object) -> bool:  # a SIGHUP reload compares the old and new config
        return isinstance(other, AllowList) and self.networks == other.networks

    def __hash__(self) -> int:
        return hash(self.networks)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "(empty)"

    def __repr__(self) -> str:
        return f"AllowList([{str(self)}])"


@dataclass(frozen=True)
class PeerPolicy:
    """The ``peers`` config section: ``allow`` is None when every address may connect."""

    allow: AllowList | None = None


@dataclass(frozen=True)
class TlsConfig:
    """The ``tls`` config section with its two SSL contexts built and ready."""

    cert: str
    key: str
    ca: str
    require_client_cert: bool
    server_context: ssl.SSLContext = field(repr=False, compare=False)
    client_context: ssl.SSLContext = field(repr=False, compare=False)


def _readable_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise KeyPathError(f"tls.{key} must be the path of a PEM file", (key,))
    if not os.path.isfile(value):
        raise KeyPathError(f"tls.{key}: {value} does not exist or is not a file", (key,))
    if not os.access(value, os.R_OK):
        raise KeyPathError(f"tls.{key}: {value} is not readable by this user", (key,))
    return value


def parse_tls(value: Any) -> TlsConfig | None:
    """Validate the ``tls`` section and build the contexts; ValueError says what is wrong
    (a KeyPathError, with the key, when it is about one key)."""
    if value is None:
        return None
    if isinstance(value, TlsConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be null or a mapping with cert, key, ca and require_client_cert")
    unknown = sorted(map(str, set(value) - {"cert", "key", "ca", "require_client_cert"}))
    if unknown:
        raise KeyPathError(f"unknown key(s) {', '.join(unknown)} (known: cert, key, ca, require_client_cert)", (unknown[0],))
    missing = [k for k in ("cert", "key", "ca") if k not in value]
    if missing:
        raise ValueError(f"missing {', '.join('tls.' + k for k in missing)}")
    cert, key, ca = (_readable_file(k, value[k]) for k in ("cert", "key", "ca"))
    require = value.get("require_client_cert", True)
    if not isinstance(require, bool):
        raise KeyPathError("tls.require_client_cert must be true or false", ("require_client_cert",))
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.load_cert_chain(cert, key)
        server.load_verify_locations(cafile=ca)
        server.verify_mode = ssl.CERT_REQUIRED if require else ssl.CERT_OPTIONAL
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        client.load_cert_chain(cert, key)
        client.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ValueError(f"cannot use cert {cert} / key {key} / ca {ca}: {describe_tls_error(exc)}") from None
    except OSError as exc:
        raise ValueError(f"cannot read the TLS files: {exc}") from None
    return TlsConfig(cert, key, ca, require, server, client)


def parse_peers(value: Any) -> PeerPolicy:
    """Validate the ``peers`` section: ``{allow: null | [CIDR, ...]}``."""
    if value is None:
        return PeerPolicy()
    if isinstance(value, PeerPolicy):
        return value
    if not isinstance(value, dict):
        raise ValueError("must be a mapping like {allow: [\"10.0.0.0/8\", \"::1\"]}")
    unknown = sorted(map(str, set(value) - {"allow"}))
    if unknown:
        raise KeyPathError(f"unknown key(s) {', '.join(unknown)} (known: allow)", (unknown[0],))
    allow = value.get("allow")
    if allow is None:
        return PeerPolicy()
    if not isinstance(allow, list):
        raise KeyPathError("peers.allow must be null (any peer) or a list of addresses / CIDR networks", ("allow",))
    try:
        return PeerPolicy(AllowList(allow))
    except KeyPathError as exc:
        raise exc.under("allow") from None


def describe_tls_error(exc: BaseException) -> str:
    """An SSL error in words: OpenSSL's reason and verify message, without the errno noise."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = exc.verify_message or exc.reason or str(exc)
        return f"certificate verify failed: {msg}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        text = str(exc)
        if reason and reason.lower() not in text.lower():
            return f"{reason}: {text}"
        return text.split("] ", 1)[-1] if "] " in text else text
    return str(exc) or type(exc).__name__
