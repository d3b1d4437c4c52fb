"""OpenAI-shaped errors: every failure answers ``{"error": {"message", "type", "param", "code"}}``.

FastAPI's own errors (422 validation errors, 404 unknown path, 405 wrong method) are reshaped too; request
validation errors become 400s, as in the OpenAI API. Unexpected exceptions are answered by ``Guard`` (guard.py) with
a generic 500 and a request id: their text goes to the log, never to the client.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    """An error answer: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(err: RequestValidationError) -> APIError:
    """The first pydantic error of a request, as a 400 naming the offending top-level field."""
    first = err.errors()[0] if err.errors() else {}
    loc = [part for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(f"the request body is not valid JSON ({detail}): send a JSON object",
                           code="invalid_json")
    if not loc:
        return bad_request("the request body must be a JSON object with the request fields", code="invalid_body")
    path = ".".join(str(part) for part in loc)
    if kind == "missing":
        return bad_request(f"missing required field {path!r}", param=str(loc[0]), code="missing_field")
    return bad_request(f"invalid value for {path!r}: {first.get('msg', 'invalid')}", param=str(loc[0]),
                       code="invalid_type" if kind.endswith("_type") else "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        known = {404: (f"no such endpoint: {request.url.path}", "not_found"),
                 405: (f"{request.method} is not allowed on {request.url.path}", "method_not_allowed")}
        message, code = known.get(err.status_code, (str(err.detail), None))
        return APIError(err.status_code, message, code=code, headers=err.headers).response()
