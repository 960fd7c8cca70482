"""``from capsule.http import get, post, ...``: HTTP from tasks (see capsule.sdk.http)."""

from capsule.sdk.http import (
    ConnectionFailed,
    Headers,
    HostNotAllowed,
    HttpError,
    HttpTimeout,
    InvalidRequest,
    Response,
    ResponseTooLarge,
    delete,
    get,
    head,
    patch,
    post,
    put,
    request,
)

__all__ = [
    "ConnectionFailed",
    "Headers",
    "HostNotAllowed",
    "HttpError",
    "HttpTimeout",
    "InvalidRequest",
    "Response",
    "ResponseTooLarge",
    "delete",
    "get",
    "head",
    "patch",
    "post",
    "put",
    "request",
]
