"""The one guarded HTTP request of the backend: everything it fetches from a URL it did not write itself.

- Where a request goes is decided from the URL exactly as the client connects: urllib3's ``parse_url``, and
  the connection is made by urllib3 to the address this module resolved and checked. Ambiguous authorities
  (``\\``, userinfo ``user@``, control characters) and schemes other than http(s) are refused outright.
- Server-side request forgery guard: the host is resolved once; every address must be public (not loopback,
  private, link-local such as the cloud metadata 169.254.169.254, CGNAT, multicast, reserved, unspecified; an
  IPv4 address inside IPv6 is checked as IPv4), unless the origin is trusted (Label Studio) or listed in
  ``allow_private`` (host names and CIDR networks). The connection goes to the checked address, so DNS
  rebinding cannot swap it. Every redirect hop is checked again.
- Credentials: ``credentials`` = (origin, headers) are sent only while every hop so far is at that origin:
  never after a redirect elsewhere, never to that origin reached through a redirect from another one.
- One deadline for the whole request (connect, headers, body, redirects), kept by a watchdog that shuts the
  socket, so a server dripping bytes cannot hold a fetch past it; and a cap on the body size.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.util import parse_url

WEB_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK_BYTES = 64 * 1024
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class RequestError(Exception):
    """The request was refused or failed; the message names the cause."""


class Refused(RequestError):
    """The URL or the address it leads to is not allowed."""


class TimedOut(RequestError):
    pass


class TooLarge(RequestError):
    pass


class Unreachable(RequestError):
    pass


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str          # lower case; IPv6 without brackets
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        return Target.parse(url).origin


@dataclass(frozen=True)
class Target:
    origin: Origin
    path: str          # path and query, as sent on the request line
    host_header: str
    url: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """Raises Refused for anything the client could read two ways."""
        if "\\" in url or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise Refused(f"refused {url!r}: a backslash or control character makes its host ambiguous")
        try:
            parts = parse_url(url.strip())
        except ValueError as error:
            raise Refused(f"refused {url!r}: malformed ({error})") from None
        scheme = (parts.scheme or "").lower()
        if scheme not in WEB_SCHEMES:
            raise Refused(f"refused {url!r}: only http(s) URLs are fetched")
        if parts.auth is not None:
            raise Refused(f"refused {url!r}: user names or passwords in URLs (user@host) are not accepted")
        if not parts.host:
            raise Refused(f"refused {url!r}: no host")
        host = parts.host.lower().strip("[]")
        port = parts.port or DEFAULT_PORTS[scheme]
        netloc = parts.host.lower() + ("" if port == DEFAULT_PORTS[scheme] else f":{port}")
        return cls(Origin(scheme, host, port), parts.request_uri, netloc, f"{scheme}://{netloc}{parts.request_uri}")


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    origin: Origin     # the last hop's
    authorized: bool   # whether the credentials went with this (last) hop


def non_public_kind(address: str) -> str | None:
    """What kind of non-public address this is ("loopback", "private", ...), None when it is public."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and (ip.ipv4_mapped or ip.sixtofour):
        ip = ip.ipv4_mapped or ip.sixtofour
    for kind in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


class Guard:
    """Which hosts may be reached: public addresses, plus ``trusted`` origins and ``allow_private`` entries
    (host names, IP addresses, CIDR networks such as ``10.0.0.0/8``)."""

    def __init__(self, allow_private: Iterable[str] = (), trusted: Iterable[Origin] = ()):
        self.names: set[str] = set()
        self.networks: list = []
        for entry in (e.strip().lower() for e in allow_private):
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.names.add(entry)
        self.trusted = set(trusted)

    def address(self, origin: Origin) -> str:
        """The one address to connect to, resolved once and checked. Raises Refused / Unreachable."""
        try:
            infos = socket.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise Unreachable(f"cannot resolve {origin.host} ({error})") from None
        addresses = [info[4][0] for info in infos]
        if origin in self.trusted or origin.host in self.names:
            return addresses[0]
        for address in addresses:
            kind = non_public_kind(address)
            ip = ipaddress.ip_address(address.split("%")[0])
            if kind and not any(ip in network for network in self.networks if network.version == ip.version):
                raise Refused(f"{origin.host} is a {kind} address ({address}): refused to prevent server-side "
                              "request forgery; list it in ALLOW_PRIVATE_HOSTS if images really live there")
        return addresses[0]


def request(url: str, guard: Guard, *, timeout: float, max_bytes: int, method: str = "GET",
            body: bytes | None = None, headers: Mapping[str, str] | None = None,
            credentials: tuple[Origin, Mapping[str, str]] | None = None,
            max_redirects: int = MAX_REDIRECTS) -> Answer:
    """One request, redirects followed by hand (0 = none); see the module docstring. A redirect answer is
    returned as is once ``max_redirects`` is 0; more redirects than that raise Refused."""
    deadline = time.monotonic() + timeout
    authorized = credentials is not None
    for _hop in range(max_redirects + 1):
        target = Target.parse(url)
        authorized = authorized and target.origin == credentials[0]
        sent = {**(headers or {}), **(credentials[1] if authorized else {})}
        answer = _one(target, guard, method, body, sent, deadline, timeout, max_bytes, authorized)
        if answer.status not in REDIRECTS or "location" not in answer.headers or max_redirects == 0:
            return answer
        url = urljoin(target.url, answer.headers["location"].strip())
        if answer.status == 303 or (answer.status in (301, 302) and method == "POST"):
            method, body = "GET", None
    raise Refused(f"more than {max_redirects} redirects")


def _one(target: Target, guard: Guard, method: str, body: bytes | None, headers: dict, deadline: float,
         timeout: float, max_bytes: int, authorized: bool) -> Answer:
    origin = target.origin
    address = guard.address(origin)
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimedOut(f"timed out after {timeout:g} s")
    if origin.scheme == "https":
        conn = urllib3.connection.HTTPSConnection(address, origin.port, timeout=left, server_hostname=origin.host,
                                                  assert_hostname=origin.host, cert_reqs="CERT_REQUIRED",
                                                  ca_certs=_ca_certs())
    else:
        conn = urllib3.connection.HTTPConnection(address, origin.port, timeout=left)
    sockets = [conn]   # the watchdog's target: the socket itself once connected (a response may outlive conn.sock)
    watchdog = threading.Timer(left, _shut, (sockets,))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        sockets.append(conn.sock)
        conn.request(method, target.path, body=body, headers={"Host": target.host_header, **headers},
                     preload_content=False)
        response = conn.getresponse()
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise TooLarge(f"larger than the limit of {max_bytes} bytes")
        data = bytearray()
        if response.status not in REDIRECTS:
            while chunk := response.read1(CHUNK_BYTES):
                data += chunk
                if len(data) > max_bytes:
                    raise TooLarge(f"larger than the limit of {max_bytes} bytes")
            if time.monotonic() >= deadline:   # the watchdog shut the socket: what came is not the whole body
                raise TimedOut(f"timed out after {timeout:g} s")
        return Answer(response.status, {k.lower(): v for k, v in response.headers.items()}, bytes(data),
                      origin, authorized)
    except (OSError, urllib3.exceptions.HTTPError, ValueError) as error:
        timed_out = isinstance(error, (TimeoutError, urllib3.exceptions.TimeoutError)) and not isinstance(
            error, urllib3.exceptions.NewConnectionError)   # which subclasses ConnectTimeoutError, for history
        if timed_out or time.monotonic() >= deadline:
            raise TimedOut(f"timed out after {timeout:g} s") from None
        where = f"{origin.host}:{origin.port}"
        raise Unreachable(f"the connection to {where} broke ({_reason(error)})" if len(sockets) > 1
                          else f"cannot reach {where} ({_reason(error)})") from None
    finally:
        watchdog.cancel()
        conn.close()


def _shut(sockets: list) -> None:
    """The deadline passed: shut the socket so that whatever read is blocked on it returns at once."""
    sock = sockets[-1] if len(sockets) > 1 else getattr(sockets[0], "sock", None)
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)   # the plain socket's, also under TLS
        except OSError:
            pass


def _reason(error: BaseException) -> str:
    """The operating system's words ("Connection refused") where there are some, else the error's."""
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "strerror", None):
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(error) or type(error).__name__


def _ca_certs() -> str | None:
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()
