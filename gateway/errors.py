"""The errors the gateway itself answers with, and their JSON form (CONTRACT §2).

    GatewayError (status, type, code, param)
    ├── BadRequest            400 invalid_request_error           (param = the field's path)
    │   └── MalformedRequest  400 invalid_request_error / malformed_request (not HTTP/1.1: `http_server.py`)
    ├── InvalidApiKey         401 invalid_request_error / invalid_api_key
    ├── Unauthorized          401 invalid_request_error / invalid_token     (admin API: bad JWT)
    ├── Forbidden             403 permission_error / insufficient_role      (admin API: role)
    ├── ModelNotFound         404 invalid_request_error / model_not_found
    ├── NotFound              404 invalid_request_error
    ├── MethodNotAllowed      405 invalid_request_error
    ├── Conflict              409 invalid_request_error                     (code names the conflict)
    ├── RequestTimeout        408 invalid_request_error / request_timeout   (head or body sent too slowly)
    ├── BodyTooLarge          413 invalid_request_error
    ├── UnsupportedMediaType  415 invalid_request_error
    ├── RateLimited           429 <requests|tokens|concurrency> / rate_limit_exceeded
    ├── HeadersTooLarge       431 invalid_request_error / request_header_fields_too_large
    ├── UpstreamError         502 upstream_error / upstream_unavailable
    ├── NoHealthyUpstream     503 upstream_error / no_healthy_upstream
    ├── Draining              503 upstream_error / draining
    ├── StoreUnavailable      503 server_error / store_unavailable
    ├── VerifierUnavailable   503 server_error / jwks_unavailable           (admin API: JWKS unreachable)
    └── UpstreamTimeout       504 upstream_error / upstream_timeout

Handlers raise these; one middleware (`app.py`) turns them into responses and counts them.
A request head that never completes or does not parse never reaches a handler: the connection's
protocol (`http_server.py`) answers those with the same JSON and closes the connection.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers) if headers else {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class MalformedRequest(BadRequest):
    """The request line or a header field is not valid HTTP/1.1."""

    code = "malformed_request"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(GatewayError):
    """The admin API's bearer token is missing, malformed or fails verification."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_token"


class Forbidden(GatewayError):
    """A valid admin token whose role does not allow this route."""

    status = 403
    type = "permission_error"
    code = "insufficient_role"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str, param: str | None = None):
        super().__init__(message, param=param)
        self.code = code


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, scope: str, headers: Mapping[str, str]):
        super().__init__(message, headers=headers)
        self.limit = limit
        self.scope = scope
        self.type = limit  # `requests`, `tokens` or `concurrency`, as OpenAI names them


class HeadersTooLarge(GatewayError):
    """A header field (or the request line) over `max_header_bytes`, or over `max_headers` fields."""

    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class NoHealthyUpstream(GatewayError):
    status = 503
    type = "upstream_error"
    code = "no_healthy_upstream"


class Draining(GatewayError):
    status = 503
    type = "upstream_error"
    code = "draining"


class StoreUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class VerifierUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "jwks_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
