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


class Forbidden(Exception):
    """A valid key without the right to the route, e.g. a plain key on the model-control routes (HTTP 403)."""


class Conflict(Exception):
    """A change that collides with one under way, e.g. a second load of a model while one runs (HTTP 409)."""


class LoadFailed(Exception):
    """A model version that cannot be loaded: `status` 422 where the version itself cannot serve (a corrupt or
    changed file, a contract or architecture mismatch, a failing int8 self-check), 507 where this host lacks the
    memory, 500 for anything else."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client disconnected before its answer was ready: nothing is sent, and its images are not computed.
    `stage`: where the request was, for /metrics (reading its body, or waiting for its answer)."""

    STAGES = ("reading", "waiting")

    def __init__(self, stage: str = "waiting") -> None:
        super().__init__(stage)
        self.stage = stage
