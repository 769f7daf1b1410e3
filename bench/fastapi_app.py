"""A minimal FastAPI app serving the `/courses` bytes Kurs served: the baseline of the bench."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Response

BODY = Path(os.environ["KURS_BENCH_COURSES_BODY"]).read_bytes()

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/api/v1/courses")
async def courses() -> Response:
    return Response(content=BODY, media_type="application/json; charset=utf-8")
