"""The errors of a classification request beyond a bad image (core.errors), raised by the inference core and the
HTTP layers alike; service/http/answers.py maps each to its HTTP status."""

from core.errors import UserError


class BadRequest(UserError):
    """A request the service cannot use: a bad option, a missing field, too many images (HTTP 400)."""


class UnsupportedMedia(UserError):
    """A body of a kind the route does not take, e.g. JSON on /classify (HTTP 415)."""


class Overloaded(Exception):
    """Shed: the request would wait, or has waited, longer than max_latency_ms for its model call (HTTP 503)."""


class TooManyRequests(Exception):
    """More requests in flight than max_concurrency (HTTP 429)."""


class BodyTooLarge(Exception):
    """A request body over max_body_bytes (HTTP 413)."""


class TimedOut(Exception):
    """No answer within timeout_s (HTTP 504)."""


class SlowRequest(Exception):
    """A request body that did not arrive within body_timeout_s (HTTP 408)."""


class ShuttingDown(Exception):
    """A request that arrived while the worker drains (HTTP 503, Connection: close)."""


class Unauthorized(Exception):
    """A request without a valid API key, where keys are required (HTTP 401, WWW-Authenticate: Bearer)."""


class NotFound(Exception):
    """An unknown model or model version on a route that names one in its path (HTTP 404)."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing is sent, and its images are not computed.
    `stage`: where the request was, for /metrics (reading its body, or waiting for its answer)."""

    def __init__(self, stage: str = "waiting") -> None:
        super().__init__(stage)
        self.stage = stage
