"""The SQLite schema as an ordered list of migrations, tracked in ``PRAGMA user_version``.

Each entry upgrades from version N to N+1 and is applied in its own
transaction, so a database made by an older relay is brought forward at
start-up and never half-migrated.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: deliveries, their outbox rows per upstream, and every attempt made.
    """
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        received_at REAL NOT NULL,
        source TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB,
        size INTEGER NOT NULL,
        body_sha256 TEXT NOT NULL,
        body_format TEXT NOT NULL,
        peer TEXT,
        verdict TEXT NOT NULL,
        verdict_detail TEXT NOT NULL,
        webhook_id TEXT,
        prediction_id TEXT,
        status TEXT,
        model TEXT,
        version TEXT,
        kind TEXT,
        duplicate_of INTEGER
    );
    CREATE INDEX deliveries_webhook_id ON deliveries(webhook_id, body_sha256);
    CREATE INDEX deliveries_prediction ON deliveries(prediction_id, id);
    CREATE INDEX deliveries_received ON deliveries(received_at);
    CREATE INDEX deliveries_verdict ON deliveries(verdict, id);
    CREATE INDEX deliveries_source ON deliveries(source, id);
    CREATE INDEX deliveries_status ON deliveries(status, id);

    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
        upstream TEXT NOT NULL,
        state TEXT NOT NULL,
        order_key TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        updated_at REAL NOT NULL,
        note TEXT,
        UNIQUE (delivery_id, upstream)
    );
    CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'pending';
    CREATE INDEX outbox_order ON outbox(upstream, order_key, id) WHERE state = 'pending';
    CREATE INDEX outbox_state ON outbox(state, delivery_id);

    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
        upstream TEXT,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        started_at REAL NOT NULL,
        duration_ms REAL NOT NULL,
        status INTEGER,
        response_headers TEXT NOT NULL,
        response_body BLOB NOT NULL,
        response_truncated INTEGER NOT NULL,
        error TEXT,
        outcome TEXT NOT NULL,
        request_headers TEXT NOT NULL,
        request_body BLOB
    );
    CREATE INDEX attempts_delivery ON attempts(delivery_id, id);

    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: full-text search over bodies (external content: the text is not stored twice).
    """
    CREATE VIRTUAL TABLE deliveries_fts USING fts5(body, content='deliveries', content_rowid='id');
    CREATE TRIGGER deliveries_fts_insert AFTER INSERT ON deliveries WHEN new.body IS NOT NULL BEGIN
        INSERT INTO deliveries_fts (rowid, body) VALUES (new.id, CAST(new.body AS TEXT));
    END;
    CREATE TRIGGER deliveries_fts_delete AFTER DELETE ON deliveries WHEN old.body IS NOT NULL BEGIN
        INSERT INTO deliveries_fts (deliveries_fts, rowid, body) VALUES ('delete', old.id, CAST(old.body AS TEXT));
    END;
    INSERT INTO deliveries_fts (rowid, body) SELECT id, CAST(body AS TEXT) FROM deliveries WHERE body IS NOT NULL;
    """,
    # 3: index bodies off the ingest path (relay/indexer.py): tokenising in the insert trigger
    # was 40 % of a commit. meta.fts_indexed is the highest delivery id in the index.
    """
    DROP TRIGGER deliveries_fts_insert;
    DROP TRIGGER deliveries_fts_delete;
    INSERT OR REPLACE INTO meta (key, value) SELECT 'fts_indexed', COALESCE(MAX(id), 0) FROM deliveries;
    CREATE TRIGGER deliveries_fts_delete AFTER DELETE ON deliveries
    WHEN old.body IS NOT NULL
        AND old.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed')
    BEGIN
        INSERT INTO deliveries_fts (deliveries_fts, rowid, body) VALUES ('delete', old.id, CAST(old.body AS TEXT));
    END;
    """,
)

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    # FULL: a commit is on disk before ingest answers 200, even across power loss.
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)


def split_statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (with inner ';') whole."""
    import sqlite3

    statements: list[str] = []
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                statements.append(pending.strip())
            pending = ""
    return statements
