"""The baseline: bare FastAPI on uvicorn (uvloop, httptools), nothing the template adds.

`/healthz` answers the same small JSON; `/notes?limit=N` runs the generated
service's query (one owner's notes by id, keyset pagination on the (owner, id)
index) on the same table through async SQLAlchemy with the same pool size, for the
owner NOTES_OWNER. No auth, no rate limits, no access log, no request ids: the
template's guarantees are exactly what the ratio prices. Run by bench/ with the
rendered project's interpreter, configured from the environment:
PORT, WORKERS, DATABASE_URL (postgresql+asyncpg://), DB_POOL_SIZE, DB_MAX_OVERFLOW,
DB_POOL_TIMEOUT, NOTES_OWNER.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import BigInteger, DateTime, String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

OWNER = os.environ.get("NOTES_OWNER", "bench")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    owner: Mapped[str] = mapped_column(String(255))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(String(5000))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NoteOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    body: str
    created_at: datetime
    updated_at: datetime


class NotePage(BaseModel):
    items: list[NoteOut]
    next_after: int | None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = create_async_engine(
        os.environ["DATABASE_URL"],
        pool_size=int(os.environ.get("DB_POOL_SIZE", "5")),
        max_overflow=int(os.environ.get("DB_MAX_OVERFLOW", "5")),
        pool_timeout=float(os.environ.get("DB_POOL_TIMEOUT", "5")),
    )
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "pass"})


@app.get("/notes")
async def list_notes(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    after: Annotated[int | None, Query(ge=0)] = None,
) -> NotePage:
    query = select(Note).where(Note.owner == OWNER).order_by(Note.id).limit(limit + 1)
    if after is not None:
        query = query.where(Note.id > after)
    async with request.app.state.sessions() as session:
        rows = list(await session.scalars(query))
    items = rows[:limit]
    return NotePage(
        items=[NoteOut.model_validate(note) for note in items],
        next_after=items[-1].id if len(rows) > limit else None,
    )


if __name__ == "__main__":
    uvicorn.run(
        "bare_app:app",
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ["PORT"]),
        workers=int(os.environ.get("WORKERS", "1")),
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
    )
