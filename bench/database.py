"""A throwaway PostgreSQL database, and the notes the benchmark reads.

The benchmark's principal owns a page-and-more of notes; the rows of OTHER
principals grow to each data size with one INSERT ... SELECT over generate_series.
After every growth step the principal's notes are written again, so they always
hold the highest ids: a plan that walked the primary key and filtered by owner
would read every other row first. Only the (owner, id) index keeps the list flat.
"""

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

ADMIN_URL = os.environ.get(
    "PRODREADY_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
OWN_NOTES = 100  # more than one page of 10, so next_after is set
OTHER_OWNERS = 1000
LIST_QUERY = "SELECT * FROM notes WHERE owner = %s ORDER BY id LIMIT 11"


@contextmanager
def temporary_database() -> Iterator[str]:
    """Create a fresh database; yield its psycopg URL; drop it, connections and all."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield re.sub(r"/[^/?]*(\?|$)", rf"/{name}\1", ADMIN_URL, count=1)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def asyncpg_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+asyncpg://", 1)


def grow(url: str, owner: str, other_rows: int) -> None:
    """Bring the rows of other principals up to `other_rows`, then rewrite `owner`'s notes."""
    with psycopg.connect(url, autocommit=True) as conn:
        have = conn.execute("SELECT count(*) FROM notes WHERE owner <> %s", (owner,)).fetchone()[0]
        if other_rows > have:
            conn.execute(
                "INSERT INTO notes (owner, title, body)"
                " SELECT 'other-' || (g %% %s::int), 'note ' || g, repeat('lorem ipsum ', 8)"
                " FROM generate_series(%s::bigint, %s::bigint) AS g",
                (OTHER_OWNERS, have + 1, other_rows),
            )
        conn.execute("DELETE FROM notes WHERE owner = %s", (owner,))
        conn.execute(
            "INSERT INTO notes (owner, title, body)"
            " SELECT %s, 'my note ' || g, repeat('dolor sit amet ', 8)"
            " FROM generate_series(1, %s::int) AS g",
            (owner, OWN_NOTES),
        )
        conn.execute("ANALYZE notes")


def explain(url: str, owner: str) -> dict:
    """How PostgreSQL runs the list query: the index it uses, rows it reads, its time."""
    with psycopg.connect(url) as conn:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + LIST_QUERY, (owner,)
        ).fetchone()[0][0]
    nodes = list(_nodes(plan["Plan"]))
    return {
        "index": next((n["Index Name"] for n in nodes if "Index Name" in n), None),
        "node_types": [n["Node Type"] for n in nodes],
        "rows_examined": sum(
            n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)
            for n in nodes
            if "Relation Name" in n
        ),
        "shared_buffers": sum(
            n.get("Shared Hit Blocks", 0) + n.get("Shared Read Blocks", 0)
            for n in nodes
            if "Relation Name" in n
        ),
        "execution_ms": plan["Execution Time"],
    }


def _nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def count_rows(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM notes").fetchone()[0]


def server_version() -> str:
    with psycopg.connect(ADMIN_URL) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]
