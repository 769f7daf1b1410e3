"""WhiteNoise without a thread hop per request on the ASGI path.

WhiteNoise 6's middleware is sync-only, so under ASGI Django wrapped it for every request:
sync_to_async into a fresh per-request thread, then async_to_sync back to the event loop for the
rest of the chain (py-spy on `GET /api/v1/items/1`: 72 % of samples waited on that hand-over).
This subclass is async-capable: a path that is not a static file (every API request) goes
straight on in the event loop; only a static file is looked up and opened in a thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any], **kwargs: Any) -> None:
        super().__init__(get_response, **kwargs)
        self._async = iscoroutinefunction(get_response)
        if self._async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self._async:
            return self._acall(request)
        return super().__call__(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info
        if self.autorefresh:
            # DEBUG: files are looked up on disk at each request; only under the static prefix.
            found = path.startswith(self.static_prefix)
            static_file = await sync_to_async(self.find_file)(path) if found else None
        else:
            static_file = self.files.get(path)
        if static_file is None:
            return await self.get_response(request)  # type: ignore[no-any-return,misc]
        response = await sync_to_async(self.serve)(static_file, request)
        if response.streaming and not response.is_async:
            # A file body iterated synchronously makes Django warn on stderr for every static
            # file (a non-JSON line in production logs) and read it whole: read it in a thread.
            response.streaming_content = _chunks_in_a_thread(response.streaming_content)
        return response


async def _chunks_in_a_thread(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    iterator = iter(chunks)
    read = sync_to_async(next, thread_sensitive=False)
    while (chunk := await read(iterator, None)) is not None:
        yield chunk
