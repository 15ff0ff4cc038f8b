"""Storage faults against a real relay: full disk, a database locked or refusing writes, retention.

The database lives on a small tmpfs mounted for the test (this machine runs as
root), so "disk full" is the kernel's ENOSPC, not a simulation. A mount that
fails fails the test: nothing here is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from relay.service import Relay

from support import (
    INGEST_PATH,
    free_port,
    lifecycle_bodies,
    make_config,
    relay_command,
    signed,
    wait_until,
)

DAY = 86400.0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("4m")`` mounts a fresh tmpfs of that size and returns its directory; unmounted at teardown.

    Request this fixture before ``relay_factory`` so that the relays are stopped
    (and their files closed) before the unmount.
    """
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.fail(
                f"could not mount a {size} tmpfs at {where} (these tests need root and mount(8)): "
                f"{done.stderr.strip() or done.returncode}"
            )
        mounts.append(where)
        return where

    yield mount
    failures = []
    for where in reversed(mounts):
        done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
            failures.append(f"{where}: {done.stderr.strip()}")
    assert not failures, f"umount failed (a file was still open?): {failures}"


def connect(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A second, independent connection to the relay's database (as an operator's sqlite3 would be)."""
    return contextlib.closing(sqlite3.connect(str(db), isolation_level=None, timeout=10))


def integrity(db: Path) -> str:
    with connect(db) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def stored_bodies(db: Path) -> dict[int, bytes]:
    with connect(db) as conn:
        return {int(i): bytes(b) for i, b in conn.execute("SELECT id, body FROM deliveries WHERE body IS NOT NULL")}


def body_of(n: int, pad: int) -> bytes:
    """A realistic prediction body, padded to roughly ``pad`` extra bytes, unique per ``n``."""
    doc = json.loads(lifecycle_bodies(f"pred{n:05d}")[0])
    doc["logs"] = os.urandom(pad // 2).hex()
    return json.dumps(doc).encode()


async def post(http: aiohttp.ClientSession, base: str, body: bytes) -> tuple[int, dict[str, object], str | None]:
    async with http.post(base + INGEST_PATH, data=body, headers=signed(body)) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.get("Retry-After")


async def health(http: aiohttp.ClientSession, base: str) -> int:
    async with http.get(base + "/healthz") as resp:
        await resp.read()
        return resp.status


async def both_healths(http: aiohttp.ClientSession, relay: Relay) -> tuple[int, int]:
    assert relay.bound is not None
    return await health(http, relay.bound.ingest_url), await health(http, relay.bound.admin_url)


# --- full disk ---------------------------------------------------------------------------------


async def test_full_disk_answers_503_keeps_acknowledged_rows_and_recovers_without_restart(tmpfs, relay_factory, http):
    disk = tmpfs("4m")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))  # freed later to give the relay room again
    db = disk / "relay.db"
    relay = await relay_factory(make_config(str(db), relay={"commit_timeout_seconds": 5}))
    base = relay.bound.ingest_url
    assert await both_healths(http, relay) == (200, 200)

    acknowledged: dict[int, bytes] = {}
    refusals = 0
    n = 0
    # Big bodies until the first refusal, then small ones: the disk must refuse those too.
    for n in range(2000):
        body = body_of(n, 8000 if refusals == 0 else 100)
        status, answer, retry_after = await post(http, base, body)
        assert status in (200, 503), (status, answer)
        if status == 200:
            delivery = int(answer["delivery"])  # type: ignore[call-overload]
            assert delivery not in acknowledged
            acknowledged[delivery] = body
        else:
            assert answer == {"error": "delivery could not be stored; retry later"}
            assert retry_after is not None
            refusals += 1
            if refusals >= 20:
                break
    assert refusals >= 20, f"the {disk} tmpfs never filled up after {n + 1} deliveries"
    assert len(acknowledged) > 50, "the disk filled before a meaningful number of deliveries"
    # /healthz commits a one-page heartbeat. A refused multi-page delivery leaves its partly
    # written WAL frames allocated, and a heartbeat or two may still fit in them; once that
    # slack is used, the health check fails and keeps failing while the disk stays full.

    async def unhealthy() -> bool:
        return await both_healths(http, relay) == (503, 503)

    await wait_until(unhealthy, timeout=15)
    assert await both_healths(http, relay) == (503, 503)
    status, _, _ = await post(http, base, body_of(99999, 100))
    assert status == 503

    # Everything acknowledged is there, byte for byte, in a sound database.
    rows = stored_bodies(db)
    missing = sorted(set(acknowledged) - set(rows))
    assert not missing, f"acknowledged with 200 but not stored: {missing[:10]}"
    assert all(rows[i] == body for i, body in acknowledged.items())
    assert integrity(db) == "ok"

    # Free space: the relay recovers by itself, no restart.
    filler.unlink()

    async def healthy() -> bool:
        return await both_healths(http, relay) == (200, 200)

    await wait_until(healthy, timeout=15)
    body = body_of(100000, 500)
    status, answer, _ = await post(http, base, body)
    assert status == 200, answer
    new_id = int(answer["delivery"])  # type: ignore[call-overload]
    assert new_id not in acknowledged
    assert (await relay.store.get_delivery(new_id)).body == body
    rows = stored_bodies(db)
    assert all(rows[i] == b for i, b in acknowledged.items())
    assert integrity(db) == "ok"


async def test_checkpoints_refused_by_a_full_disk_resume_when_space_returns(tmpfs, relay_factory, http, caplog):
    """The log is copied into the database file beside the commits (relay/checkpoint.py). A full disk
    refuses that copy too: the relay says so, and once there is space again the copy completes by
    itself, with no new delivery to prompt it, so the database file alone holds everything acknowledged."""
    caplog.set_level(logging.INFO, logger="relay.checkpoint")
    caplog.set_level(logging.INFO, logger="relay.indexer")
    disk = tmpfs("4m")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024))  # room, once freed, for the copy beside the log
    db = disk / "relay.db"
    relay = await relay_factory(make_config(str(db), relay={"commit_timeout_seconds": 5}))
    base = relay.bound.ingest_url
    acknowledged: set[int] = set()
    refusals = 0
    for n in range(2000):
        status, answer, _ = await post(http, base, body_of(n, 8000))
        if status == 200:
            acknowledged.add(int(answer["delivery"]))  # type: ignore[call-overload]
        else:
            refusals += 1
            if refusals >= 5:
                break
    assert refusals >= 5 and len(acknowledged) > 20

    def said(text: str, by: str = "relay.checkpoint") -> bool:
        return any(text in r.getMessage() for r in caplog.records if r.name == by)

    await wait_until(lambda: said("failed (retrying)"), timeout=10)
    # The indexer's commits, refused too, would otherwise prompt a checkpoint once space returns:
    # after this nothing commits, and only the checkpointer's own retry can finish the copy.
    await wait_until(lambda: said("full-text indexing paused", by="relay.indexer"), timeout=10)

    def in_file() -> set[int]:
        try:  # the database file itself, ignoring the log
            conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
            try:
                return {row[0] for row in conn.execute("SELECT id FROM deliveries")}
            finally:
                conn.close()
        except sqlite3.DatabaseError:  # a page caught mid-copy
            return set()

    assert not acknowledged <= in_file()  # the copy had not completed while the disk was full
    filler.unlink()
    await wait_until(lambda: acknowledged <= in_file(), timeout=15)
    assert said("succeed again")


# --- writes refused while running --------------------------------------------------------------


async def test_database_locked_past_the_deadline_answers_503_then_recovers(tmp_path, relay_factory, http):
    """Another process holds the write lock longer than commit_timeout_seconds (SPEC §3: 503, never 2xx)."""
    db = tmp_path / "relay.db"
    relay = await relay_factory(make_config(str(db), relay={"commit_timeout_seconds": 1}))
    base = relay.bound.ingest_url
    first_body = body_of(1, 100)
    status, first, _ = await post(http, base, first_body)
    assert status == 200

    locker = sqlite3.connect(str(db), isolation_level=None, timeout=10, check_same_thread=False)
    try:
        await asyncio.to_thread(locker.execute, "BEGIN IMMEDIATE")
        started = time.monotonic()
        status, answer, retry_after = await post(http, base, body_of(2, 100))
        assert (status, answer) == (503, {"error": "delivery could not be stored; retry later"})
        assert retry_after is not None
        assert time.monotonic() - started < 8, "the 503 should come after about commit_timeout_seconds"
        assert await both_healths(http, relay) == (503, 503)
    finally:
        await asyncio.to_thread(locker.execute, "ROLLBACK")
        locker.close()

    async def healthy() -> bool:
        return await both_healths(http, relay) == (200, 200)

    await wait_until(healthy, timeout=15)
    body = body_of(3, 100)
    status, answer, _ = await post(http, base, body)
    assert status == 200, answer
    assert (await relay.store.get_delivery(int(answer["delivery"]))).body == body  # type: ignore[call-overload]
    assert stored_bodies(db)[int(first["delivery"])] == first_body  # type: ignore[call-overload]
    assert integrity(db) == "ok"


def remount(where: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True, text=True)


def prlimit_fsize(pid: int, value: str) -> None:
    done = subprocess.run(["prlimit", f"--pid={pid}", f"--fsize={value}"], capture_output=True, text=True)
    assert done.returncode == 0, f"prlimit failed: {done.stderr}"


async def test_writes_refused_while_running_answer_503_then_recover(tmpfs, http, tmp_path):
    """The filesystem refuses every write of a running relay, then accepts them again.

    ``mount -o remount,ro`` cannot do this: Linux refuses to remount read-only
    (EBUSY) while any process holds a file open for writing there, which a
    running relay always does with its database; the test checks that too.
    Instead the relay runs as ``relay serve`` and its file-size limit is set to
    0 (prlimit), so the kernel fails every write(2) to its database, WAL
    included (EFBIG; Python ignores SIGXFSZ), as a read-only filesystem would.
    """
    disk = tmpfs("16m")
    db = disk / "relay.db"
    ingest_port, ui_port = free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[relay]\ndatabase = "{db}"\ningest_listen = "127.0.0.1:{ingest_port}"\n'
        f'ui_listen = "127.0.0.1:{ui_port}"\ncommit_timeout_seconds = 2\n\n'
        '[[sources]]\nname = "replicate"\npath = "/webhooks/replicate"\n'
        'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n'
    )
    base, admin = f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{ui_port}"
    proc = subprocess.Popen(
        relay_command("serve", "--config", str(config)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        async def up() -> bool:
            assert proc.poll() is None, "relay serve exited"
            try:
                return await health(http, base) == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, timeout=20)
        before = body_of(1, 2000)
        status, answer, _ = await post(http, base, before)
        assert status == 200

        busy = remount(disk, "ro")
        if busy.returncode == 0:  # a kernel that allows it: back to rw, the prlimit path below still runs
            assert remount(disk, "rw").returncode == 0
        else:
            assert "busy" in busy.stderr.lower(), busy.stderr

        prlimit_fsize(proc.pid, "0:unlimited")  # soft limit only: raising it back needs no privilege
        try:
            for n in range(5):
                status, refused, retry_after = await post(http, base, body_of(10 + n, 2000))
                assert (status, refused) == (503, {"error": "delivery could not be stored; retry later"})
                assert retry_after is not None
            assert (await health(http, base), await health(http, admin)) == (503, 503)
        finally:
            prlimit_fsize(proc.pid, "unlimited:unlimited")

        async def healthy() -> bool:
            return (await health(http, base), await health(http, admin)) == (200, 200)

        await wait_until(healthy, timeout=15)
        after = body_of(2, 2000)
        status, answer2, _ = await post(http, base, after)
        assert status == 200, answer2
        rows = stored_bodies(db)
        assert rows[int(answer["delivery"])] == before  # type: ignore[call-overload]
        assert rows[int(answer2["delivery"])] == after  # type: ignore[call-overload]
        assert integrity(db) == "ok"
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]


# --- retention ---------------------------------------------------------------------------------


async def test_prune_deletes_old_deliveries_with_outbox_and_attempts_and_returns_space(
    tmp_path, relay_factory, upstream_factory, http
):
    db = tmp_path / "relay.db"
    upstream = await upstream_factory()
    config = make_config(str(db), upstreams=[{"url": upstream.url}])
    old_count, new_count = 400, 6

    async def ingest_all(relay: Relay, bodies: list[bytes]) -> list[int]:
        ids = []
        for body in bodies:
            status, answer, _ = await post(http, relay.bound.ingest_url, body)
            assert status == 200, answer
            ids.append(int(answer["delivery"]))  # type: ignore[call-overload]
        return ids

    async def settled(relay: Relay, count: int) -> None:
        async def done() -> bool:
            return (await relay.store.outbox_states()).get("delivered", 0) == count

        try:
            await wait_until(done, timeout=30)
        except AssertionError:
            raise AssertionError(f"outbox {await relay.store.outbox_states()}, wanted {count} delivered") from None

        async def indexed() -> bool:
            return await relay.store.unindexed() == 0

        await wait_until(indexed, timeout=15)

    # One relay whose clock reads 40 days ago, then now. (A relay started with the real clock
    # would prune the old deliveries itself at start-up: relay/retention.py.)
    offset = [-40 * DAY]
    relay = await relay_factory(config, clock=lambda: time.time() + offset[0])
    old_bodies = [
        body_of(i, 6000).replace(b'"starting"', b'"starting", "tag": "oldword%d"' % i) for i in range(old_count)
    ]
    old_ids = []
    for body in old_bodies:
        headers = signed(body, timestamp=int(time.time() + offset[0]))
        async with http.post(relay.bound.ingest_url + INGEST_PATH, data=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 200, answer
            old_ids.append(int(answer["delivery"]))
    await settled(relay, old_count)

    offset[0] = 0.0
    new_bodies = [
        body_of(10000 + i, 200).replace(b'"starting"', b'"starting", "tag": "newword"') for i in range(new_count)
    ]
    new_ids = await ingest_all(relay, new_bodies)
    await settled(relay, old_count + new_count)
    assert len(upstream.received) == old_count + new_count
    await relay.stop()

    with connect(db) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL, set at creation
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == old_count + new_count
        hits = conn.execute("SELECT rowid FROM deliveries_fts WHERE deliveries_fts MATCH 'oldword7'").fetchall()
        assert hits == [(old_ids[7],)]
    size_before = db.stat().st_size

    done = subprocess.run(
        relay_command("prune", "--database", str(db), "--older-than", "30d"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"deleted {old_count} deliveries" in done.stdout

    with connect(db) as conn:
        remaining = conn.execute("SELECT id, body FROM deliveries ORDER BY id").fetchall()
        assert [r[0] for r in remaining] == new_ids
        assert [bytes(r[1]) for r in remaining] == new_bodies
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == new_count
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == new_count
        assert conn.execute("SELECT DISTINCT delivery_id FROM outbox ORDER BY 1").fetchall() == [(i,) for i in new_ids]
        assert conn.execute("SELECT DISTINCT delivery_id FROM attempts ORDER BY 1").fetchall() == [
            (i,) for i in new_ids
        ]
        for word in ("oldword7", "oldword0", f"oldword{old_count - 1}"):
            assert (
                conn.execute("SELECT rowid FROM deliveries_fts WHERE deliveries_fts MATCH ?", (word,)).fetchall() == []
            )
        newword = conn.execute("SELECT rowid FROM deliveries_fts WHERE deliveries_fts MATCH 'newword' ORDER BY 1")
        assert newword.fetchall() == [(i,) for i in new_ids]
        conn.execute("INSERT INTO deliveries_fts (deliveries_fts) VALUES ('integrity-check')")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        freelist = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    size_after = db.stat().st_size

    # The product's own search agrees: the pruned bodies are gone, the recent ones found.
    listed = subprocess.run(
        relay_command("list", "--database", str(db), "--search", "oldword7", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["deliveries"] == []
    listed = subprocess.run(
        relay_command("list", "--database", str(db), "--search", "newword", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sorted(d["id"] for d in json.loads(listed.stdout)["deliveries"]) == new_ids

    # Last: the space of the pruned rows went back to the disk (auto_vacuum = INCREMENTAL).
    assert freelist < 10, f"{freelist} free pages of {pages} were not returned to the disk"
    assert size_after < size_before / 4, (size_before, size_after)
