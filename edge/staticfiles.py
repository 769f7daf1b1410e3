"""WhiteNoise without a thread hop per request on the ASGI path.

WhiteNoise 6's middleware is sync-only, so under ASGI Django wrapped it for every request:
sync_to_async into a fresh per-request thread, then async_to_sync back to the event loop for the
rest of the chain (py-spy on `GET /api/v1/items/1`: 72 % of samples waited on that hand-over).
This subclass is async-capable: a path outside WhiteNoise's prefix (every API request) goes
straight on in the event loop; one under it is given to WhiteNoise's own `__call__` in a thread,
which answers the file or hands back a marker, and then the request goes on in the loop too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware

from edge._whitenoise_compat import served_prefix

# What WhiteNoise's `__call__` returns, from the thread, for a path that is not a static file:
# calling the async rest of the chain from there would hop back to the loop and wait for it.
NOT_A_FILE = HttpResponse(status=404)


def _not_a_file(request: HttpRequest) -> HttpResponse:
    return NOT_A_FILE


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):  # type: ignore[misc]  # whitenoise is untyped
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any], **kwargs: Any) -> None:
        self._async = iscoroutinefunction(get_response)
        self._next: Any = get_response
        super().__init__(_not_a_file if self._async else get_response, **kwargs)
        self._prefix = served_prefix(self)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self._async:
            return self._acall(request)
        response: HttpResponseBase = super().__call__(request)
        return response

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        if not request.path_info.startswith(self._prefix):
            response: HttpResponseBase = await self._next(request)
            return response
        response = await sync_to_async(super().__call__)(request)
        if response is NOT_A_FILE:
            response = await self._next(request)
            return response
        if isinstance(response, StreamingHttpResponse) and not response.is_async:
            # A file body iterated synchronously makes Django warn on stderr for every static
            # file (a non-JSON line in production logs) and read it whole: read it in a thread.
            content = response.streaming_content
            if isinstance(content, Iterator):  # always, when not `is_async`
                response.streaming_content = _chunks_in_a_thread(content)
        return response


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


async def _chunks_in_a_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    read = sync_to_async(_next_chunk, thread_sensitive=False)
    while (chunk := await read(chunks)) is not None:
        yield chunk
