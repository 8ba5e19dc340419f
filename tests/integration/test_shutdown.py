#!/usr/bin/python3
"""Graceful restart and the service manager.

SIGTERM (smart shutdown): the listener closes at once (new connections are refused), GET
/ready answers 503, an idle session gets FATAL 57P01 at once, a session in a transaction
may COMMIT and then gets 57P01 (so do pipelined statements and an extended-protocol
batch waiting for its Sync), a statement still running after limits.shutdown_grace_ms
gets 57P01 (and is cancelled on the server), and pgdual exits 0.
pgdual waits (within the grace period) for async mirrors to apply what sessions that
ended left queued, so a restart leaves green no write behind.
SIGINT (fast shutdown): every session gets 57P01 at once, its transaction rolled back.
sd_notify: READY=1 once pgdual listens, RELOADING=1 then READY=1 around a SIGHUP reload,
STOPPING=1 at SIGTERM, on the datagram socket named by $NOTIFY_SOCKET."""

import http.client
import os
import select
import signal
import socket
import struct
import subprocess
import time
import unittest

import pdtest
from pdtest import HOST, Proxy, RawClient, connect, cstr, direct_query, msg, wait_for

GRACE_MS = 4000
TABLE = "pd_shutdown"
FATAL_57P01 = "terminating connection due to administrator command"


def http_get(port, path):
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def refused(port):
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def rows():
    return direct_query("SELECT id, who FROM %s ORDER BY id" % TABLE, dbname="app")


def close_all(proxy, *clients):
    """Closes clients (sockets, raw or psycopg2) and kills pgdual if a failing test left
    it running."""
    import psycopg2
    for c in clients:
        try:
            c.close()
        except psycopg2.Error:
            pass
    if proxy.proc is not None:
        proxy._kill()


def wait_fatal_sent(conn, timeout=5):
    """Waits until the server has written to a psycopg2 connection we are not reading."""
    r, _, _ = select.select([conn.fileno()], [], [], timeout)
    return bool(r)


class ShutdownTest(unittest.TestCase):
    def setUp(self):
        direct_query("DROP TABLE IF EXISTS %s; CREATE TABLE %s (id int PRIMARY KEY, who text)"
                     % (TABLE, TABLE), dbname="app")

    def assert_closed(self, conn):
        """The server ended the session: the next statement fails for want of a
        connection. (libpq does not show the FATAL that came while it was not reading, with
        PostgreSQL itself neither; raw clients and psql check the SQLSTATE and message.)"""
        import psycopg2
        with self.assertRaises(psycopg2.OperationalError) as cm:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        self.assertIn("server closed the connection", str(cm.exception))
        self.assertTrue(conn.closed)

    def test_sigterm_drains(self):
        mport = pdtest.free_port()
        p = Proxy(limits={"shutdown_grace_ms": GRACE_MS},
                  admin={"metrics": "%s:%d" % (HOST, mport)}).start()
        wait_for(lambda: pdtest.port_open(mport), 10, what="the metrics port")
        self.assertEqual(http_get(mport, "/ready"), (200, "ready\n"))

        idle_raw = RawClient(p.port).startup()
        idle_pg = connect(p.port)
        idle_pg.autocommit = True
        with idle_pg.cursor() as cur:
            cur.execute("SELECT 1")
        txn = connect(p.port)  # psycopg2 opens a transaction at the first statement
        with txn.cursor() as cur:
            cur.execute("INSERT INTO %s VALUES (1, 'before')" % TABLE)
        # An extended-protocol statement executed, its Sync not sent yet: the implicit
        # transaction is still open, so the session must wait for the Sync.
        unsynced = RawClient(p.port).startup()
        unsynced.send(msg("P", cstr("") + cstr("INSERT INTO %s VALUES (3, 'synced')" % TABLE)
                          + struct.pack("!H", 0))
                      + msg("B", cstr("") + cstr("") + struct.pack("!HHH", 0, 0, 0))
                      + msg("E", cstr("") + struct.pack("!I", 0)) + msg("H"))
        for kind in ("1", "2", "C"):
            unsynced.expect(kind)
        # Two statements sent in one go: both are answered before the session ends.
        piped = RawClient(p.port).startup(application_name="pd_shutdown_pipe")
        piped.send(pdtest.query_msg("SELECT pg_sleep(1)") + pdtest.query_msg("SELECT 42"))
        busy = subprocess.Popen(
            pdtest.psql_argv(p.port, "app", "postgres", "-c", "SELECT pg_sleep(60)",
                             application_name="pd_shutdown_busy"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            pdtest.wait_backend_busy("pd_shutdown_busy")
            pdtest.wait_backend_busy("pd_shutdown_pipe")

            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)

            # Idle sessions end at once with 57P01.
            err = idle_raw.read_error_then_close(timeout=5)
            self.assertIsNotNone(err, "no error before the close")
            self.assertEqual((err["S"], err["C"], err["M"]), ("FATAL", "57P01", FATAL_57P01))
            self.assertTrue(wait_fatal_sent(idle_pg), "the idle psycopg2 session heard nothing")
            self.assert_closed(idle_pg)

            self.assertEqual(piped.simple_query_results(2), [[[b""]], [[b"42"]]])
            err = piped.read_error_then_close(timeout=5)
            self.assertEqual((err["S"], err["C"]), ("FATAL", "57P01"))

            unsynced.send(msg("S"))
            unsynced.expect("Z")
            err = unsynced.read_error_then_close(timeout=5)
            self.assertEqual((err["S"], err["C"]), ("FATAL", "57P01"))

            # No new connections; the readiness probe says so while sessions drain.
            wait_for(lambda: refused(p.port), 5, what="the listener to close")
            self.assertEqual(http_get(mport, "/ready"), (503, "not ready\n"))

            # The open transaction goes on and commits; then its session ends.
            with txn.cursor() as cur:
                cur.execute("INSERT INTO %s VALUES (2, 'during')" % TABLE)
            txn.commit()
            self.assertLess(time.monotonic() - t0, GRACE_MS / 1000.0,
                            "the commit came after the grace period; the test proves nothing")
            self.assertEqual(rows(), [(1, "before"), (2, "during"), (3, "synced")])
            self.assertTrue(wait_fatal_sent(txn), "the committed session heard nothing")
            self.assert_closed(txn)
            self.assertEqual(http_get(mport, "/ready")[0], 503)

            # The statement still running when the grace period ends is ended with 57P01.
            _, stderr = busy.communicate(timeout=GRACE_MS / 1000.0 + 15)
            ended = time.monotonic() - t0
            self.assertNotEqual(busy.returncode, 0)
            self.assertIn("FATAL:  " + FATAL_57P01, stderr)
            self.assertGreater(ended, GRACE_MS / 1000.0 - 0.5, "ended before the grace period")

            # pgdual exits 0 once the last session is gone, within grace + margin.
            rc = p.wait_exit(GRACE_MS / 1000.0 + 10 - (time.monotonic() - t0))
            self.assertEqual(rc, 0)
            self.assertLess(time.monotonic() - t0, GRACE_MS / 1000.0 + 10)
            # The statement was cancelled on the server, not left to run on.
            wait_for(lambda: not direct_query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pd_shutdown_busy' "
                "AND state = 'active'"), 10, what="the running statement to be cancelled")
            log = p.log()
            self.assertIn("smart shutdown", log)
            self.assertIn("shutdown grace period of %d ms is over" % GRACE_MS, log)
        finally:
            if busy.poll() is None:
                busy.kill()
                busy.wait()
            close_all(p, idle_raw, unsynced, piped, idle_pg, txn)

    def test_sigint_ends_transactions_at_once(self):
        import psycopg2
        p = Proxy(limits={"shutdown_grace_ms": 60000}).start()
        raw = RawClient(p.port).startup()
        txn = connect(p.port)
        try:
            self.assertIsNone(raw.simple_query("BEGIN")[1])
            self.assertIsNone(raw.simple_query(
                "INSERT INTO %s VALUES (10, 'never committed')" % TABLE)[1])
            with txn.cursor() as cur:
                cur.execute("INSERT INTO %s VALUES (11, 'never committed')" % TABLE)
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGINT)
            err = raw.read_error_then_close(timeout=5)
            self.assertIsNotNone(err, "no error before the close")
            self.assertEqual((err["S"], err["C"], err["M"]), ("FATAL", "57P01", FATAL_57P01))
            self.assertEqual(p.wait_exit(10), 0)
            self.assertLess(time.monotonic() - t0, 10)
            with self.assertRaises(psycopg2.OperationalError):
                txn.commit()
            # PostgreSQL rolled both transactions back when their connections closed.
            wait_for(lambda: not direct_query(
                "SELECT 1 FROM pg_stat_activity WHERE datname = 'app' AND state IN "
                "('idle in transaction', 'idle in transaction (aborted)')"), 10,
                what="the backends to go away")
            self.assertEqual(rows(), [])
        finally:
            close_all(p, raw, txn)

    def test_graceful_stop_waits_for_the_mirror(self):
        import psycopg2
        for db in ("app", "app2"):
            direct_query("DROP TABLE IF EXISTS %s_m; CREATE TABLE %s_m (id int PRIMARY KEY, "
                         "note text)" % (TABLE, TABLE), dbname=db)
        div = os.path.join(pdtest.tmpdir(), "divergence.jsonl")
        rule = {"name": "m", "database": "app", "kind": "tables",
                "tables": ["public.%s_m" % TABLE], "writes": "dual", "reads": "old",
                "mirror": {"commit": "async", "on_failure": "record"}}
        p = Proxy(databases=[{"name": "app", "old": pdtest.pg_conninfo("app"),
                              "new": pdtest.pg_conninfo("app2")}],
                  rules=[rule], divergence={"log": div},
                  limits={"shutdown_grace_ms": 20000}, env={"PGUSER": "postgres"}).start()
        c = pdtest.cluster()
        locker = psycopg2.connect(host=c["host"], port=c["port"], dbname="app2", user="postgres")
        client = connect(p.port)
        client.autocommit = True
        try:
            # Green's table is locked: the mirrored INSERT queues behind the lock while
            # the client has its answer from blue (commit: async).
            with locker.cursor() as cur:
                cur.execute("LOCK TABLE %s_m IN ACCESS EXCLUSIVE MODE" % TABLE)
            with client.cursor() as cur:
                cur.execute("INSERT INTO %s_m VALUES (1, 'mirrored late')" % TABLE)
            wait_for(lambda: direct_query(
                "SELECT 1 FROM pg_stat_activity WHERE datname = 'app2' AND "
                "wait_event_type = 'Lock'"), 10, what="the mirror to wait for the lock")

            p.proc.send_signal(signal.SIGTERM)
            self.assertTrue(wait_fatal_sent(client), "the idle session heard nothing")
            # The last session is gone, and pgdual waits for its mirror.
            wait_for(lambda: "waiting for the mirrors" in p.log(), 10,
                     what="pgdual to wait for the mirror")
            self.assertTrue(pdtest.pid_alive(p.pid))
            locker.rollback()
            self.assertEqual(p.wait_exit(15), 0)
            self.assertEqual(direct_query("SELECT id, note FROM %s_m" % TABLE, dbname="app2"),
                             [(1, "mirrored late")])
            unapplied = []
            if os.path.exists(div):
                with open(div) as f:
                    unapplied = [line for line in f if "mirror_unapplied" in line]
            self.assertEqual(unapplied, [])
        finally:
            close_all(p, locker, client)

    def test_sd_notify(self):
        path = os.path.join(pdtest.tmpdir(), "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        p = Proxy(env={"NOTIFY_SOCKET": path})
        try:
            p.start()

            def expect(key, timeout=10):
                """Reads datagrams until one holds the line key; returns its fields."""
                deadline = time.monotonic() + timeout
                seen = []
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.fail("no %s from pgdual within %d s (got %r)" % (key, timeout, seen))
                    sock.settimeout(left)
                    try:
                        data = sock.recv(4096).decode()
                    except socket.timeout:
                        continue
                    seen.append(data)
                    fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
                    if key in data.splitlines():
                        return fields

            ready = expect("READY=1")
            self.assertTrue(pdtest.port_open(p.port), "READY=1 before pgdual listens")
            self.assertIn("accepting connections", ready.get("STATUS", ""))

            p.proc.send_signal(signal.SIGHUP)
            reloading = expect("RELOADING=1")
            self.assertGreater(int(reloading["MONOTONIC_USEC"]), 0)
            self.assertIn("configuration reloaded", expect("READY=1").get("STATUS", ""))

            p.proc.send_signal(signal.SIGTERM)
            self.assertIn("smart shutdown", expect("STOPPING=1").get("STATUS", ""))
            self.assertEqual(p.wait_exit(10), 0)
        finally:
            close_all(p, sock)


if __name__ == "__main__":
    pdtest.main()
