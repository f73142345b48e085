"""The Batch API's routes (`/v1/files`, `/v1/batches`): uploads kept in the store, batches run by the
BatchRunner (batches.py) through the server's engine queue."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse

from ..openai_api.protocol import BatchCreate, BatchList, FileDeleted, FileList
from ..openai_api.requests import RequestError, validation_error

FILE_PURPOSES = ("batch",)
FILES_LIMIT = 10000  # OpenAI's default and largest page of files (of batches: 20 and 100)


def add_batch_routes(app: FastAPI, state) -> None:
    """/v1/files and /v1/batches: uploads kept in the store, batches run by the BatchRunner."""
    store = state.store

    def file_or_404(file_id: str):
        file = store.get_file(file_id)
        if file is None:
            raise RequestError(404, f"No such File object: {file_id}", "file_id", "file_not_found")
        return file

    def batch_or_404(batch_id: str):
        batch = store.get_batch(batch_id)
        if batch is None:
            raise RequestError(404, f"No such Batch object: {batch_id}", "batch_id", "batch_not_found")
        return batch

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
        if purpose not in FILE_PURPOSES:
            raise RequestError(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}, got {purpose!r}",
                               "purpose", "invalid_value")
        added = await asyncio.to_thread(store.add_file, file.filename or "upload.jsonl", purpose, file.file)
        return added.model_dump()

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None, limit: int = FILES_LIMIT,
                         order: str = "desc"):
        if order not in ("asc", "desc"):
            raise RequestError(400, f"order must be asc or desc, got {order!r}", "order", "invalid_value")
        page = store.list_files(purpose, after, max(1, min(limit, FILES_LIMIT)), order == "desc")
        if page is None:
            raise RequestError(404, f"No such File object: {after}", "after", "file_not_found")
        files, more = page
        return FileList(data=files, first_id=files[0].id if files else None,
                        last_id=files[-1].id if files else None, has_more=more).model_dump()

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        return file_or_404(file_id).model_dump()

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        file_or_404(file_id)
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        file_or_404(file_id)
        store.delete_file(file_id)
        return FileDeleted(id=file_id).model_dump()

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            create = BatchCreate.model_validate(json.loads(await request.body()))
        except ValueError as e:
            if hasattr(e, "errors"):
                raise validation_error(e) from None
            raise RequestError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        file_or_404(create.input_file_id)
        batch = store.create_batch(create.input_file_id, create.endpoint, create.completion_window, create.metadata,
                                   state.batch_expiry_s)
        state.batches.submit(batch.id)
        return batch.model_dump()

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20):
        page = store.list_batches(after, max(1, min(limit, 100)))
        if page is None:
            raise RequestError(404, f"No such Batch object: {after}", "after", "batch_not_found")
        batches, more = page
        return BatchList(data=batches, first_id=batches[0].id if batches else None,
                         last_id=batches[-1].id if batches else None, has_more=more).model_dump()

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        return batch_or_404(batch_id).model_dump()

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        batch = batch_or_404(batch_id)
        moved = store.move(batch_id, "cancelling")
        if moved is not None:
            state.batches.cancel(batch_id)
        if moved is None and batch.status not in ("cancelling", "cancelled"):
            raise RequestError(400, f"batch {batch_id} is {batch.status}: it cannot be cancelled", None,
                               "invalid_state")
        return (moved or store.get_batch(batch_id)).model_dump()
