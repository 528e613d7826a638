"""Errors as OpenAI sends them: a status and `{"error": {"message", "type", "param", "code"}}`.

Raised where a problem is found (plan, voices, service); app.py turns every one into that JSON, so a client
sees the same shape for a bad field, an unknown route, a full queue or a server fault.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def queue_full(message: str, retry_after: int) -> ApiError:
    # OpenAI's 429 type; Retry-After says when to come back instead of letting the queue grow.
    return ApiError(429, message, type="rate_limit_exceeded", code="queue_full",
                    headers={"Retry-After": str(retry_after)})


def unavailable(message: str, retry_after: int, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after)})
