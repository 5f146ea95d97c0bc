"""Optional API keys: with CIFAR10_API_KEYS_FILE set, every route but the probes (and the page's and the API
docs' static files) wants `Authorization: Bearer <key>`.

The file holds one key per line; `#` starts a comment; a line `KEY metrics` gives a key that opens /metrics
only (for a Prometheus scraper), and `KEY admin` one that also opens the model-control routes (/v2/repository/...,
403 for any other key). A Kubernetes Secret mounted as a file works the same. The file is the truth
at every request: each request that needs a key looks at it (one stat, ~1 us) and it is read again when it
changed, so keys rotate without a restart and every worker holds the keys the file holds. A file that is
deleted, unreadable, malformed or empty while the server runs accepts no key (401 everywhere) until it holds
keys again, and the log says so once: refusing is the safe side of a lost file. Keys are compared with
hmac.compare_digest, every one of them, and never written to a log.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import UserError
from service.errors import Forbidden, Unauthorized
from service.http.access import RECORD
from service.http.answers import error_answer, send_answer
from service.http.context import header
from service.log import say

# Answered without a key: the probes, and files that hold no data (the page, the API's description).
OPEN_PATHS = frozenset({"/livez", "/readyz", "/v2/health/live", "/v2/health/ready", "/", "/docs", "/docs.json"})
OPEN_PREFIXES = ("/page/", "/static_content/")
METRICS = "/metrics"
ADMIN_PREFIX = "/v2/repository"
ROLES = ("metrics", "admin")


@dataclass(frozen=True)
class KeySet:
    everything: tuple[bytes, ...]
    metrics_only: tuple[bytes, ...]
    admin: tuple[bytes, ...] = ()  # also in `everything`


EMPTY = KeySet((), ())  # what a file that cannot be used holds


def parse(text: str) -> KeySet:
    everything, metrics, admin = [], [], []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1] not in ROLES):
            raise ValueError("a line holds a key, optionally followed by the word metrics or admin")
        key = words[0].encode()
        role = words[1] if len(words) == 2 else ""
        (metrics if role == "metrics" else everything).append(key)
        if role == "admin":
            admin.append(key)
    return KeySet(tuple(everything), tuple(metrics), tuple(admin))


class ApiKeys:
    """The keys `path` holds, read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.keys = self._read()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"CIFAR10_API_KEYS_FILE={path}: {exc}; one key per line, # for comments") from None
        if not self.keys.everything and not self.keys.metrics_only:
            raise UserError(f"CIFAR10_API_KEYS_FILE={path} holds no key; put one key per line in it")
        self.stamp = self._stamp()

    def refusal(self, path: str, authorization: bytes) -> Unauthorized | Forbidden | None:
        """Why a request for `path` with this Authorization header may not proceed; None where it may."""
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        self._refresh()
        scheme, _, given = authorization.partition(b" ")
        keys = self.keys
        if scheme.lower() != b"bearer" or not given or not _known(given, keys.everything + keys.metrics_only):
            return Unauthorized("a missing or wrong API key; send the header Authorization: Bearer <key>")
        if path.startswith(ADMIN_PREFIX) and not _known(given, keys.admin):
            return Forbidden("this key may not change the models; use a key marked admin in the keys file")
        if path != METRICS and not _known(given, keys.everything):
            return Forbidden("this key opens /metrics only")
        return None

    def _refresh(self) -> None:
        stamp = self._stamp()
        if stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            keys = self._read()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            keys, problem = EMPTY, f"cannot be read ({exc})"
        else:
            problem = "holds no key" if not keys.everything and not keys.metrics_only else ""
        self.keys = keys
        if problem:
            say(f"cifar10: CIFAR10_API_KEYS_FILE={self.path} {problem}: every key is refused until it holds keys")
        else:
            say(
                f"cifar10: API keys read again from {self.path}: {len(keys.everything)} keys ({len(keys.admin)} "
                f"admin), {len(keys.metrics_only)} for /metrics only"
            )

    def _read(self) -> KeySet:
        return parse(self.path.read_text())

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self.path.stat()  # a Kubernetes Secret update swaps a symlink: the target's times change
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_ino, stat.st_size


def _known(given: bytes, keys: tuple[bytes, ...]) -> bool:
    # Every key compared, in constant time each: neither which key nor how far a guess got shows in the timing.
    return any([hmac.compare_digest(given.strip(), key) for key in keys])


class KeyCheck:
    """The layer that answers 401 to a request without a valid key, 403 to a key without the right to the route."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.keys.refusal(scope["path"], header(scope, b"authorization"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await send_answer(send, error_answer(refusal, scope[RECORD].request_id))
