"""API faults: the 4xx answers and Firecracker's wording for them.

Every refused request becomes an ``ApiError`` carrying an HTTP status and the
one-line ``fault_message`` Firecracker would send (its ``RequestError`` and
``VmmActionError`` texts), so clients matching on messages keep working.
"""

from __future__ import annotations

from http import HTTPStatus

from ember.errors import EmberError

NOT_AFTER_START = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_START = "The requested operation is not supported before starting the microVM."
EMPTY_ID = "The ID cannot be empty."
INVALID_ID = "API Resource IDs can only contain alphanumeric characters and underscores."
ID_MISMATCH = "The id from the path does not match the id from the body!"
EMPTY_PUT = "Empty PUT request."
EMPTY_PATCH = "Empty PATCH request."
GET_WITH_BODY = "GET request cannot have a body."
NO_KERNEL = "Cannot start microvm without kernel configuration."
ROOT_EXISTS = "A root block device already exists!"
METRICS_REINIT = "Reinitialization of metrics not allowed."


class ApiError(EmberError):
    """A request the API refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


def invalid_path(method: str, path: str) -> ApiError:
    """Firecracker's answer to an unknown method and path pair."""
    return ApiError(f"Invalid request method and/or path: {method} {path.strip('/')}.")


def not_supported(feature: str) -> ApiError:
    """A Firecracker feature Ember does not implement yet."""
    return ApiError(f"The requested operation is not supported: Ember does not implement {feature} yet.")


def bad_json(detail: str) -> ApiError:
    """A body that is not the JSON the endpoint expects."""
    return ApiError(f"An error occurred when deserializing the json body of a request: {detail}.")
