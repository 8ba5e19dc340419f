#!/usr/bin/python3
"""Blue/green mirroring (issue 4): a `tables` rule at writes=dual keeps database app2
(new) identical to app (old) while clients talk to pgdual only — verbatim replays, row
images for serial/identity keys and now()/gen_random_uuid() defaults, transaction control
and savepoints, failed statements and rolled-back transactions, simple and extended
protocol, concurrent clients; and a mirror that cannot be reached never fails a client
but records every write it missed."""

import json
import os
import random
import struct
import threading
import time
import unittest
import urllib.request

import psycopg2

import pdtest
import pgcluster
from pdtest import RawClient
from test_rules import (RulesProxy, bind_msg, bind_msg_params, execute_msg, parse_msg, read_batch,
                        sync_msg)

RULE = "orders-to-green"
TABLES = ("mt_orders", "mt_items", "mt_counters", "mt_log")

SCHEMA = """
DROP TABLE IF EXISTS mt_orders, mt_items, mt_counters, mt_log;
CREATE TABLE mt_orders (id serial PRIMARY KEY, total numeric NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    token uuid NOT NULL DEFAULT gen_random_uuid(), note text);
CREATE TABLE mt_items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id int NOT NULL, qty int NOT NULL, doubled int GENERATED ALWAYS AS (qty * 2) STORED);
CREATE TABLE mt_counters (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0,
    touched timestamptz);
CREATE TABLE mt_log (at timestamptz DEFAULT clock_timestamp(), msg text);
INSERT INTO mt_counters (id) SELECT g FROM generate_series(1, 5) g;
"""


def reset_schema():
    for db in ("app", "app2"):
        pdtest.direct_query(SCHEMA, dbname=db)


def table_md5(db, table):
    return pdtest.direct_query(
        "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) "
        "FROM %s t" % table, dbname=db)[0]


def tables_match():
    return all(table_md5("app", t) == table_md5("app2", t) for t in TABLES)


def tables_rule(**over):
    r = {"name": RULE, "database": "app", "kind": "tables",
         "tables": ["public." + t for t in TABLES], "writes": "dual", "reads": "old",
         "mirror": {"commit": "async", "on_failure": "record"}}
    r.update(over)
    return r


def databases(new=None):
    return [{"name": "app", "old": pdtest.pg_conninfo("app"),
             "new": new or pdtest.pg_conninfo("app2")}]


def wait_match(proxy, what):
    def ok():
        return tables_match()
    try:
        pdtest.wait_for(ok, 20, interval=0.2, what=what)
    except AssertionError:
        diffs = [(t, table_md5("app", t), table_md5("app2", t)) for t in TABLES]
        raise AssertionError("%s: tables differ: %r\ndivergence: %r\nlog:\n%s"
                             % (what, diffs, proxy.divergence()[-10:], proxy.log_tail(40)))


def counters(proxy):
    return proxy.ctl_json("status")["rule_counters"][RULE]


def read_kinds(c):
    """The kinds of the messages up to ReadyForQuery; fails on an ErrorResponse."""
    kinds = []
    while not kinds or kinds[-1] != "Z":
        k, body = c.recv_msg()
        if k == "E":
            raise AssertionError(pdtest.parse_fields(body))
        kinds.append(k)
    return kinds


def read_error(c):
    """The fields of a batch's ErrorResponse, read up to its ReadyForQuery."""
    err = None
    while True:
        k, body = c.recv_msg()
        if k == "E" and err is None:
            err = pdtest.parse_fields(body)
        if k == "Z":
            if err is None:
                raise AssertionError("the batch did not fail")
            return err


class MirrorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        reset_schema()
        cls.proxy = RulesProxy(rules=[tables_rule()], databases=databases()).start()

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def setUp(self):
        # Each test starts from identical, empty tables on both sides.
        for db in ("app", "app2"):
            pdtest.direct_query("TRUNCATE %s RESTART IDENTITY; INSERT INTO mt_counters (id) "
                                "SELECT g FROM generate_series(1, 5) g" % ", ".join(TABLES),
                                dbname=db)

    def connect(self):
        conn = pdtest.connect(self.proxy.port)
        conn.autocommit = True
        return conn

    def test_write_forms_keep_new_identical(self):
        conn = self.connect()
        cur = conn.cursor()
        # Row images: serial id, now() and gen_random_uuid() defaults.
        cur.execute("INSERT INTO mt_orders (total, note) VALUES (10, 'a'), (20, 'b')")
        self.assertEqual(cur.rowcount, 2)
        self.assertIsNone(cur.description)  # the proxy's RETURNING is not seen
        # The client's own RETURNING keeps exactly its columns.
        cur.execute("INSERT INTO mt_orders (total) VALUES (30) RETURNING id, total")
        self.assertEqual([d.name for d in cur.description], ["id", "total"])
        oid = cur.fetchone()[0]
        # Identity (ALWAYS) and a generated column.
        cur.execute("INSERT INTO mt_items (order_id, qty) VALUES (%s, 3), (%s, 4)", (oid, oid))
        # Verbatim: deterministic update and delete; an UPDATE with now() is an image.
        cur.execute("UPDATE mt_orders SET total = total + 1 WHERE id = %s", (oid,))
        cur.execute("UPDATE mt_orders SET created_at = now() WHERE note = 'a'")
        cur.execute("DELETE FROM mt_items WHERE qty = 3")
        # A transaction with a savepoint rolled back, and one rolled back whole.
        cur.execute("BEGIN")
        cur.execute("INSERT INTO mt_orders (total, note) VALUES (40, 'kept')")
        cur.execute("SAVEPOINT s1")
        cur.execute("INSERT INTO mt_orders (total, note) VALUES (41, 'undone')")
        cur.execute("ROLLBACK TO SAVEPOINT s1")
        cur.execute("COMMIT")
        cur.execute("BEGIN")
        cur.execute("DELETE FROM mt_orders")
        cur.execute("ROLLBACK")
        # A failed statement in a transaction: COMMIT becomes ROLLBACK on both sides.
        cur.execute("BEGIN")
        cur.execute("INSERT INTO mt_orders (id, total) VALUES (900001, 1)")
        with self.assertRaises(psycopg2.Error):
            cur.execute("INSERT INTO mt_orders (id, total) VALUES (900001, 2)")
        cur.execute("COMMIT")
        # An autocommit multi-row write that fails leaves nothing on either side.
        with self.assertRaises(psycopg2.Error):
            cur.execute("UPDATE mt_orders SET note = 'x'; INSERT INTO mt_orders (id, total) "
                        "VALUES (%s, 1)", (oid,))
        # Several writes in one query string: row images cannot be told apart, so it is
        # refused (and nothing is applied on either side).
        with self.assertRaises(psycopg2.Error) as cm:
            cur.execute("UPDATE mt_counters SET n = n + 1 WHERE id = 1; "
                        "UPDATE mt_counters SET n = n + 2 WHERE id = 2")
        self.assertEqual(cm.exception.pgcode, "0A000")
        # Writes to a table without a key replay verbatim, several in one string too.
        cur.execute("INSERT INTO mt_log (at, msg) VALUES ('2026-01-02', 'a'); "
                    "INSERT INTO mt_log (at, msg) VALUES ('2026-01-03', 'b')")
        # A session setting kept in step: timestamps written as text mean the same.
        cur.execute("SET timezone = 'Asia/Tokyo'")
        cur.execute("INSERT INTO mt_log (at, msg) VALUES ('2026-01-01 09:00', 'tz')")
        # Not a rule table on new: writes to other tables are not mirrored.
        pdtest.direct_query("CREATE TABLE IF NOT EXISTS mt_other (x int)", dbname="app")
        cur.execute("INSERT INTO mt_other VALUES (1)")
        conn.close()
        wait_match(self.proxy, "every write form mirrored")
        self.assertEqual(table_md5("app", "mt_orders")[1], 4)
        mirrors = self.proxy.ctl_json("status")["mirrors"]
        self.assertEqual((mirrors["queued"], mirrors["detached"]), (0, 0), mirrors)
        body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.proxy.metrics_port,
                                      timeout=5).read().decode()
        self.assertIn("pgdual_mirror_queued_statements 0", body)
        st = counters(self.proxy)
        self.assertEqual(st["mirror_diverged"], 0, self.proxy.divergence())
        self.assertEqual(st["mirror_unapplied"], 0)
        self.assertEqual(st["mirror_proxy_errors"], 0)
        self.assertGreater(st["mirrored"], 10)
        # The session's tag ends in "mirror": the line says what happened to it once.
        self.assertRegex(self.proxy.log(),
                         r"\[S-\d+ app/postgres@[^]]+\] mirror connected \(backend pid \d+\)")
        self.assertNotIn("mirror mirror", self.proxy.log())

    def test_extended_protocol_images_and_describe(self):
        with RawClient(self.proxy.port) as c:
            c.startup("postgres", "app")
            ins = "INSERT INTO mt_orders (total, note) VALUES ($1, $2)"
            ret = "INSERT INTO mt_orders (total) VALUES ($1) RETURNING total"
            describe = pdtest.msg("D", b"S" + pdtest.cstr("ins"))
            c.send(parse_msg("ins", ins) + parse_msg("ret", ret) + describe
                   + pdtest.msg("D", b"S" + pdtest.cstr("ret")) + sync_msg())
            kinds = []
            fields = None
            while True:
                k, body = c.recv_msg()
                kinds.append(k)
                if k == "T":
                    fields = struct.unpack_from("!h", body)[0]
                if k == "Z":
                    break
            # ins has no RETURNING of its own: NoData; ret shows its one column.
            self.assertEqual(kinds, ["1", "1", "t", "n", "t", "T", "Z"])
            self.assertEqual(fields, 1)
            for i in range(20):
                c.send(bind_msg_params([str(i), "ext%d" % i], stmt="ins") + execute_msg()
                       + sync_msg())
                self.assertEqual(read_batch(c), [])
            c.send(bind_msg_params(["77"], stmt="ret") + execute_msg() + sync_msg())
            self.assertEqual(read_batch(c), [["77"]])
            # Named portals are replayed too, each by its own name.
            c.send(bind_msg_params(["5", "p1"], portal="p1", stmt="ins")
                   + bind_msg_params(["88"], portal="p2", stmt="ret")
                   + execute_msg("p2") + execute_msg("p1") + sync_msg())
            self.assertEqual(read_batch(c), [["88"]])
        wait_match(self.proxy, "extended-protocol inserts mirrored")
        self.assertEqual(counters(self.proxy)["mirror_proxy_errors"], 0)

    def test_pipelined_writes_ordered_or_refused(self):
        """Extended-protocol batches sent ahead of answers: a write that starts a batch
        waits until the batches before it are answered and is then wrapped (autocommit) or
        not (in a transaction); an autocommit write further into a batch, or a COMMIT in
        the batch of a write, would commit before pgdual reads the write's answer and is
        refused with 0A000; the session goes on."""
        def batch(c):
            """(rows, error fields or None, transaction status) up to ReadyForQuery."""
            rows, err = [], None
            while True:
                k, body = c.recv_msg()
                if k == "E":
                    err = pdtest.parse_fields(body)
                elif k == "D":
                    n = struct.unpack_from("!h", body)[0]
                    at, row = 2, []
                    for _ in range(n):
                        ln = struct.unpack_from("!i", body, at)[0]
                        at += 4
                        row.append(None if ln < 0 else body[at:at + ln].decode())
                        at += max(ln, 0)
                    rows.append(row)
                elif k == "Z":
                    return rows, err, body.decode()

        def run(stmt, params=()):
            return bind_msg_params(list(params), stmt=stmt) + execute_msg()

        def old_notes():
            return sorted(r[0] for r in pdtest.direct_query(
                "SELECT note FROM mt_orders WHERE note LIKE 'pipe%%'", dbname="app"))

        with RawClient(self.proxy.port) as c:
            c.startup("postgres", "app")
            c.send(parse_msg("ins", "INSERT INTO mt_orders (total, note) VALUES (1, $1)")
                   + parse_msg("sel", "SELECT count(*) FROM mt_orders WHERE note = 'none'")
                   + parse_msg("begin", "BEGIN") + parse_msg("commit", "COMMIT")
                   + parse_msg("rollback", "ROLLBACK") + sync_msg())
            self.assertEqual(batch(c), ([], None, "I"))
            # A read, then an autocommit write, pipelined: both go through.
            c.send(run("sel") + sync_msg() + run("ins", ["pipe1"]) + sync_msg())
            self.assertEqual(batch(c), ([["0"]], None, "I"))
            self.assertEqual(batch(c), ([], None, "I"))
            # An autocommit write after a read in one batch: refused, nothing written.
            c.send(run("sel") + run("ins", ["pipe-refused"]) + sync_msg())
            rows, err, status = batch(c)
            self.assertEqual((rows, status), ([["0"]], "I"))
            self.assertEqual(err["C"], "0A000", err)
            self.assertIn("not the first statement before Sync", err["M"])
            self.assertIn("Send Sync before the write", err["H"])
            # Inside a transaction a write may follow anything in its batch; the BEGIN may
            # be in the same batch, or in one still unanswered.
            c.send(run("begin") + run("sel") + run("ins", ["pipe2"]) + sync_msg())
            self.assertEqual(batch(c), ([["0"]], None, "T"))
            c.send(run("commit") + sync_msg())
            self.assertEqual(batch(c), ([], None, "I"))
            c.send(run("begin") + sync_msg() + run("sel") + run("ins", ["pipe3"]) + sync_msg()
                   + run("commit") + sync_msg())
            self.assertEqual(batch(c), ([], None, "T"))
            self.assertEqual(batch(c), ([["0"]], None, "T"))
            self.assertEqual(batch(c), ([], None, "I"))
            # A COMMIT in the batch of a write: refused; the transaction is rolled back.
            c.send(run("begin") + run("ins", ["pipe-uncommitted"]) + run("commit") + sync_msg())
            rows, err, status = batch(c)
            self.assertEqual(status, "E")
            self.assertEqual(err["C"], "0A000", err)
            self.assertIn("Send Sync before the COMMIT", err["H"])
            c.send(run("rollback") + sync_msg())
            self.assertEqual(batch(c), ([], None, "I"))
            # The session goes on.
            c.send(run("ins", ["pipe4"]) + sync_msg())
            self.assertEqual(batch(c), ([], None, "I"))
        self.assertEqual(old_notes(), ["pipe1", "pipe2", "pipe3", "pipe4"])
        wait_match(self.proxy, "pipelined writes mirrored")
        self.assertEqual(counters(self.proxy)["mirror_proxy_errors"], 0)

    def test_pgbench_prepared(self):
        """pgbench in each query mode: hot rows updated from 4 sessions (row images
        applied in the order the authoritative side wrote them), inserts with defaults."""
        script = pdtest.tmpdir() + "/mirror.sql"
        with open(script, "w") as f:
            f.write("\\set c random(1, 5)\n"
                    "BEGIN;\n"
                    "INSERT INTO mt_orders (total, note) VALUES (:c, 'pgbench');\n"
                    "UPDATE mt_counters SET n = n + 1, touched = now() WHERE id = :c;\n"
                    "UPDATE mt_orders SET created_at = now() WHERE id = :c;\n"
                    "INSERT INTO mt_log (msg) VALUES ('pgbench');\n"
                    "END;\n")
        for mode in ("prepared", "extended", "simple"):
            r = pdtest.run_pgbench(self.proxy.port, ["-n", "-M", mode, "-c", "4", "-j", "2",
                                                     "-t", "100", "-f", script])
            self.assertIn("number of failed transactions: 0", r.stdout)
        wait_match(self.proxy, "pgbench transactions mirrored")
        self.assertEqual(counters(self.proxy)["mirror_proxy_errors"], 0)

    def test_sixteen_concurrent_clients(self):
        """16 clients, 10k transactions: inserts with serial/identity keys and
        now()/gen_random_uuid() defaults, commutative updates of hot rows, deletes,
        rollbacks; afterwards every table is identical on old and new."""
        errors = []

        def worker(seed):
            rnd = random.Random(seed)
            try:
                conn = pdtest.connect(self.proxy.port)
                cur = conn.cursor()
                for _ in range(625):
                    op = rnd.random()
                    if op < 0.4:
                        cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'w') "
                                    "RETURNING id", (rnd.randint(1, 100),))
                        oid = cur.fetchone()[0]
                        cur.execute("INSERT INTO mt_items (order_id, qty) VALUES (%s, %s)",
                                    (oid, rnd.randint(1, 9)))
                    elif op < 0.6:
                        cur.execute("UPDATE mt_counters SET n = n + %s WHERE id = %s",
                                    (rnd.randint(1, 3), rnd.randint(1, 5)))
                    elif op < 0.7:  # not commutative: order matters
                        cur.execute("UPDATE mt_counters SET n = %s, touched = now() "
                                    "WHERE id = %s", (rnd.randint(1, 1000), rnd.randint(1, 5)))
                    elif op < 0.8:
                        cur.execute("DELETE FROM mt_items WHERE id = (SELECT min(id) FROM "
                                    "mt_items WHERE qty = %s)", (rnd.randint(1, 9),))
                    elif op < 0.9:
                        cur.execute("INSERT INTO mt_log (msg) VALUES ('w')")
                    else:
                        cur.execute("INSERT INTO mt_orders (total) VALUES (1)")
                        conn.rollback()
                        continue
                    conn.commit()
                conn.close()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        self.assertEqual(errors, [])
        wait_match(self.proxy, "16 clients' transactions mirrored")
        # Rows arrive on new with their keys (row images), so new's sequences only move
        # because pgdual keeps them in step, once a second, even past rolled-back nextvals.
        seqs = ("SELECT sequencename, last_value FROM pg_sequences "
                "WHERE sequencename IN ('mt_orders_id_seq', 'mt_items_id_seq') ORDER BY 1")
        old_seqs = pdtest.direct_query(seqs, dbname="app")
        self.assertEqual(len(old_seqs), 2)
        self.assertGreater(old_seqs[0][1], 1000)
        pdtest.wait_for(lambda: pdtest.direct_query(seqs, dbname="app2") == old_seqs, 10,
                        what="new's sequences at old's values")
        status = self.proxy.ctl_json("status")
        self.assertGreaterEqual(status["sequences"]["app"]["sequences_set"], 1, status)
        self.assertNotIn("error", status["sequences"]["app"], status)
        st = counters(self.proxy)
        self.assertEqual(st["mirror_proxy_errors"], 0)
        self.assertEqual(st["mirror_unapplied"], 0)

    def test_autocommit_writes_of_the_newest_row(self):
        """Autocommit clients insert orders and update or delete the newest one, which
        another client has often only just inserted: an autocommit row is visible to
        others before its own answer is read, yet each image must reach new after the
        write it follows on old. Through psycopg2 (simple protocol) and pgbench -M
        prepared (extended)."""
        before = dict(counters(self.proxy))

        def worker(seed):
            rnd = random.Random(seed)
            conn = self.connect()
            cur = conn.cursor()
            for _ in range(250):
                op = rnd.random()
                if op < 0.35:
                    cur.execute("INSERT INTO mt_orders (total) VALUES (0)")
                elif op < 0.9:
                    cur.execute("UPDATE mt_orders SET total = total + 1, note = %s WHERE "
                                "id = (SELECT max(id) FROM mt_orders)", (str(seed),))
                else:
                    cur.execute("DELETE FROM mt_orders WHERE id = "
                                "(SELECT max(id) FROM mt_orders)")
            conn.close()

        self.assertEqual(pdtest.run_clients(worker, 8, 120), [])
        script = os.path.join(self.proxy.dir, "newest.sql")
        with open(script, "w") as f:
            f.write("INSERT INTO mt_orders (total) VALUES (0);\n"
                    "UPDATE mt_orders SET total = total + 1 WHERE id = "
                    "(SELECT max(id) FROM mt_orders);\n"
                    "UPDATE mt_orders SET total = total * 2 WHERE id = "
                    "(SELECT max(id) FROM mt_orders);\n")
        pdtest.run_pgbench(self.proxy.port, ["-n", "-M", "prepared", "-c", "8", "-t", "100",
                                             "-f", script])
        self.assertGreater(table_md5("app", "mt_orders")[1], 500)
        wait_match(self.proxy, "autocommit writes of the newest row mirrored")
        after = counters(self.proxy)
        for k in ("mirror_diverged", "mirror_unapplied", "mirror_proxy_errors"):
            self.assertEqual(after[k], before[k], (k, self.proxy.divergence()[-5:]))


class MirrorLockstepTest(MirrorTest):
    """The same workloads under commit: lockstep: the client hears ReadyForQuery once the
    mirror applied the batch, and COMMIT goes to the mirror first."""

    @classmethod
    def setUpClass(cls):
        reset_schema()
        cls.proxy = RulesProxy(rules=[tables_rule(mirror={"commit": "lockstep",
                                                          "on_failure": "record"})],
                               databases=databases()).start()

    def test_client_hears_after_the_mirror(self):
        """No wait for the tables to match: under lockstep they already do once the client
        has its answer."""
        conn = self.connect()
        cur = conn.cursor()
        for i in range(20):
            cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'ls')", (i,))
            self.assertEqual(table_md5("app", "mt_orders"), table_md5("app2", "mt_orders"))
        conn.autocommit = False
        cur.execute("UPDATE mt_counters SET n = n + 5 WHERE id = 3")
        conn.commit()
        self.assertEqual(table_md5("app", "mt_counters"), table_md5("app2", "mt_counters"))
        conn.close()


class MirrorDivergenceEventTest(unittest.TestCase):
    """What a divergence event says. A proxy per test: the other classes expect an empty
    divergence log."""

    def setUp(self):
        reset_schema()
        self.proxy = RulesProxy(rules=[tables_rule()], databases=databases()).start()
        self.addCleanup(self.proxy.stop)

    def event(self, pred):
        for e in self.proxy.divergence():
            if pred(e):
                return e
        return None

    def test_returning_rows_compared(self):
        """A write replayed verbatim (mt_log has no key) is compared by the rows its
        RETURNING gives on each side, not only by its command tag."""
        for db, at in (("app", "2020-01-01"), ("app2", "2021-01-01")):
            pdtest.direct_query("INSERT INTO mt_log VALUES (%s, 'r1')", (at,), dbname=db)
        conn = pdtest.connect(self.proxy.port)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("UPDATE mt_log SET msg = 'r2' WHERE msg = 'r1' RETURNING at, msg")
        self.assertEqual(len(cur.fetchall()), 1)
        # Rows that agree are no event.
        cur.execute("UPDATE mt_log SET msg = 'r3' WHERE msg = 'r2' RETURNING msg")
        conn.close()

        def differs(e):
            return e["kind"] == "write_outcome" and "RETURNING at, msg" in e["statement"]
        pdtest.wait_for(lambda: self.event(differs) is not None, 10,
                        what="the RETURNING difference recorded")
        e = self.event(differs)
        self.assertEqual((e["old"]["tag"], e["new"]["tag"]), ("UPDATE 1", "UPDATE 1"), e)
        self.assertEqual((e["old"]["rows"], e["new"]["rows"]), (1, 1), e)
        self.assertNotEqual(e["old"]["hash"], e["new"]["hash"], e)
        pdtest.wait_for(lambda: pdtest.direct_query("SELECT msg FROM mt_log", dbname="app2")
                        == [("r3",)], 10, what="the second update on new")
        self.assertEqual(len(self.proxy.divergence()), 1, self.proxy.divergence())

    def test_divergence_names_the_row(self):
        """A row image new could not apply is logged with the row's key (and no value of
        the statement)."""
        conn = pdtest.connect(self.proxy.port)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("INSERT INTO mt_orders (total, note) VALUES (5, 'keyed') RETURNING id")
        oid = cur.fetchone()[0]
        wait_match(self.proxy, "the row on new")
        pdtest.direct_query("DELETE FROM mt_orders WHERE id = %s", (oid,), dbname="app2")
        cur.execute("UPDATE mt_orders SET total = 6, note = 'secret-note' WHERE id = %s", (oid,))
        conn.close()

        def keyed(e):
            return e["kind"] == "write_outcome" and e["key"] == {"id": str(oid)}
        pdtest.wait_for(lambda: self.event(keyed) is not None, 10,
                        what="the divergence with its key")
        e = self.event(keyed)
        self.assertEqual(e["new"]["tag"], "0 of 1 rows applied", e)
        self.assertEqual(e["statement"],
                         "UPDATE mt_orders SET total = $1, note = $2 WHERE id = $3")


class MirrorDownTest(unittest.TestCase):
    def test_unreachable_new_never_fails_clients_and_records(self):
        reset_schema()
        dead = "host=127.0.0.1 port=%d dbname=app2 connect_timeout=2" % pdtest.free_port()
        with RulesProxy(rules=[tables_rule()], databases=databases(dead)) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            for i in range(5):
                cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'down')", (i,))
            cur.execute("UPDATE mt_counters SET n = n + 1 WHERE id = 1")
            conn.close()
            self.assertEqual(pdtest.direct_query("SELECT count(*) FROM mt_orders",
                                                 dbname="app")[0][0], 5)
            pdtest.wait_for(lambda: counters(p)["mirror_unapplied"] >= 6, 10,
                            what="the missed writes to be recorded")
            events = [e for e in p.divergence() if e["kind"] == "mirror_unapplied"]
            self.assertEqual(len(events), 6)
            for e in events:
                self.assertEqual(e["rule"], RULE)
                self.assertNotIn("down", e["statement"])  # literals never reach the log
            # The session's tag ends in "mirror": the line says what happened to it once.
            self.assertRegex(p.log(), r"\[S-\d+ app/postgres@[^]]+\] mirror detached: ")
            self.assertNotIn("mirror mirror", p.log())
        self.assertEqual(pdtest.direct_query("SELECT count(*) FROM mt_orders",
                                             dbname="app2")[0][0], 0)


class MirrorKilledTest(unittest.TestCase):
    """The new server is killed (pg_ctl stop -m immediate) under load."""

    def setUp(self):
        self.dir = pdtest.tmpdir("pdtest-green-")
        self.assertEqual(pgcluster.start(self.dir), 0)
        self.addCleanup(pgcluster.stop, self.dir)
        with open(pgcluster.info_path(self.dir)) as f:
            self.green = json.load(f)
        pdtest.direct_query(SCHEMA, dbname="app")
        self.green_query(SCHEMA)

    def green_query(self, sql):
        conn = psycopg2.connect(host=self.green["host"], port=self.green["port"],
                                dbname="app2", user="postgres")
        conn.autocommit = True
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def pg_ctl(self, *args):
        r = pgcluster.run(pgcluster.as_postgres(
            [os.path.join(pgcluster.BINDIR, "pg_ctl"), "-D", self.green["datadir"]]
            + list(args)))
        self.assertEqual(r.returncode, 0, r.stdout)

    def kill_under_load(self, worker, n, before):
        """Runs worker(seed, stop) in n threads, kills the new server after `before`
        seconds, lets them run 1.5 s more, then stops them."""
        stop = threading.Event()
        threads = [threading.Thread(target=worker, args=(i, stop)) for i in range(n)]
        for t in threads:
            t.start()
        time.sleep(before)
        self.pg_ctl("stop", "-m", "immediate")
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(60)

    def test_record_keeps_clients_whole(self):
        new = "host=%s port=%d dbname=app2" % (self.green["host"], self.green["port"])
        with RulesProxy(rules=[tables_rule()], databases=databases(new)) as p:
            errors, committed = [], []

            def worker(seed, stop):
                rnd = random.Random(seed)
                try:
                    conn = pdtest.connect(p.port)
                    cur = conn.cursor()
                    while not stop.is_set():
                        cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'k') "
                                    "RETURNING id", (rnd.randint(1, 9),))
                        oid = cur.fetchone()[0]
                        cur.execute("UPDATE mt_counters SET n = n + 1 WHERE id = %s",
                                    (rnd.randint(1, 5),))
                        conn.commit()
                        committed.append(oid)
                    conn.close()
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(repr(e))

            self.kill_under_load(worker, 8, 1.5)
            self.assertEqual(errors, [])
            self.assertGreater(len(committed), 50)
            # Old holds every write a client was told committed.
            got = {r[0] for r in pdtest.direct_query("SELECT id FROM mt_orders", dbname="app")}
            self.assertTrue(set(committed) <= got)
            pdtest.wait_for(lambda: counters(p)["mirror_unapplied"] > 0, 10,
                            what="the missed writes to be recorded")
            kinds = {e["kind"] for e in p.divergence()}
            self.assertIn("mirror_unapplied", kinds)
            self.assertEqual(counters(p)["mirror_proxy_errors"], 0)
            # Green comes back: new sessions mirror again.
            self.pg_ctl("start", "-w", "-t", "60", "-l", self.green["logfile"])
            before = self.green_query("SELECT count(*) FROM mt_orders")[0][0]
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            conn.cursor().execute("INSERT INTO mt_orders (total, note) VALUES (1, 'back')")
            conn.close()
            pdtest.wait_for(lambda: self.green_query("SELECT count(*) FROM mt_orders")[0][0]
                            == before + 1, 10, what="a write mirrored after the restart")
            # verify --repair brings new back in step; a second verify finds nothing.
            r = p.ctl("--json", "verify", RULE, "--repair", check=False)
            res = json.loads(r.stdout)["result"]
            self.assertGreater(res["divergent"], 0, res)
            self.assertEqual(res["repaired"], res["divergent"], res)
            self.assertEqual(p.ctl_json("verify", RULE)["result"]["divergent"], 0)
            # ... and set new's sequences to old's: rows were replayed with their keys.
            seq = "SELECT pg_sequence_last_value('mt_orders_id_seq')"
            self.assertEqual(pdtest.direct_query(seq, dbname="app")[0][0],
                             self.green_query(seq)[0][0])
            for t in TABLES:
                self.assertEqual(table_md5("app", t),
                                 tuple(self.green_query(
                                     "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY "
                                     "t::text), '')), count(*) FROM %s t" % t)[0]), t)


class MirrorFailTest(MirrorKilledTest):
    """on_failure: fail under lockstep: with the new server killed, clients get a clear
    error, and old holds no write a client was told failed."""

    def test_record_keeps_clients_whole(self):
        pass  # the record variant runs in MirrorKilledTest

    def test_fail_refuses_and_old_keeps_nothing_refused(self):
        new = "host=%s port=%d dbname=app2" % (self.green["host"], self.green["port"])
        rule = tables_rule(mirror={"commit": "lockstep", "on_failure": "fail"})
        with RulesProxy(rules=[rule], databases=databases(new)) as p:
            committed, failed, other = [], [], []
            stop = threading.Event()

            def worker(seed):
                rnd = random.Random(seed)
                conn = pdtest.connect(p.port)
                cur = conn.cursor()
                while not stop.is_set():
                    oid = None
                    try:
                        cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'f') "
                                    "RETURNING id", (rnd.randint(1, 9),))
                        oid = cur.fetchone()[0]
                        conn.commit()
                        committed.append(oid)
                    except psycopg2.Error as e:
                        conn.rollback()
                        if e.pgcode == "55000" and "on_failure: fail" in e.pgerror:
                            if oid is not None:
                                failed.append(oid)
                        else:
                            other.append("%s at %s" % (repr(e), "commit" if oid is not None else "insert"))
                conn.close()

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            # One transaction straddles the kill for certain: its INSERT is applied on
            # both sides before, its COMMIT comes after (the workers' timing varies).
            straddler = pdtest.connect(p.port)
            scur = straddler.cursor()
            scur.execute("INSERT INTO mt_orders (total, note) VALUES (1, 's') RETURNING id")
            sid = scur.fetchone()[0]
            self.pg_ctl("stop", "-m", "immediate")
            with self.assertRaises(psycopg2.Error) as cm:
                straddler.commit()
            self.assertEqual(cm.exception.pgcode, "55000", cm.exception.pgerror)
            self.assertIn("on_failure: fail", cm.exception.pgerror)
            failed.append(sid)
            straddler.close()
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(60)
            self.assertEqual(other[:3], [], "\n".join(other[:3]))
            self.assertGreater(len(committed), 10)
            self.assertGreater(len(failed), 0, "no COMMIT was refused")
            on_old = {r[0] for r in pdtest.direct_query("SELECT id FROM mt_orders",
                                                        dbname="app")}
            self.assertTrue(set(committed) <= on_old)
            self.assertEqual(set(failed) & on_old, set(), "old kept writes clients were "
                             "told failed")

    def test_fail_autocommit_writes(self):
        """The same for autocommit writes: the one new did not apply is rolled back on old
        and its client hears 55000 (pgdual runs it in a transaction of its own)."""
        new = "host=%s port=%d dbname=app2" % (self.green["host"], self.green["port"])
        rule = tables_rule(mirror={"commit": "lockstep", "on_failure": "fail"})
        # What new acknowledged survives the kill (the test clusters run without it).
        self.green_query("ALTER DATABASE app2 SET synchronous_commit = on")
        with RulesProxy(rules=[rule], databases=databases(new)) as p:
            committed, failed, other = [], [], []

            def worker(seed, stop):
                conn = pdtest.connect(p.port)
                conn.autocommit = True
                cur = conn.cursor()
                i = 0
                while not stop.is_set():
                    note = "a%d-%d" % (seed, i)
                    i += 1
                    try:
                        cur.execute("INSERT INTO mt_orders (total, note) VALUES (1, %s)",
                                    (note,))
                        committed.append(note)
                    except psycopg2.Error as e:
                        if e.pgcode == "55000" and "on_failure: fail" in e.pgerror:
                            failed.append(note)
                        else:
                            other.append(repr(e))
                conn.close()

            self.kill_under_load(worker, 4, 1.0)
            self.assertEqual(other[:3], [], "\n".join(other[:3]))
            self.assertGreater(len(committed), 10)
            self.assertGreater(len(failed), 0, "no write was refused")
            on_old = {r[0] for r in pdtest.direct_query(
                "SELECT note FROM mt_orders WHERE note LIKE 'a%%'", dbname="app")}
            self.assertTrue(set(committed) <= on_old)
            self.assertEqual(set(failed) & on_old, set(), "old kept writes clients were "
                             "told failed")
            # ... and new has every write a client was told committed (none was committed
            # on old alone and reported as done).
            self.pg_ctl("start", "-w", "-t", "60", "-l", self.green["logfile"])
            on_new = {r[0] for r in self.green_query(
                "SELECT note FROM mt_orders WHERE note LIKE 'a%'")}
            self.assertEqual(sorted(set(committed) - on_new), [])


class MirrorMappingTest(unittest.TestCase):
    """A column renamed and transformed on new: email on old is email_address =
    lower(email) on new; row images carry old's values and new computes `up` on them."""

    def test_renamed_transformed_column(self):
        pdtest.direct_query("DROP TABLE IF EXISTS mt_people; CREATE TABLE mt_people "
                            "(id serial PRIMARY KEY, email text, name text)", dbname="app")
        pdtest.direct_query("DROP TABLE IF EXISTS mt_people; CREATE TABLE mt_people "
                            "(id serial PRIMARY KEY, email_address text, name text)",
                            dbname="app2")
        rule = tables_rule(tables=["public.mt_people"], columns=[
            {"old": "email", "new": "email_address", "up": "lower(email)",
             "down": "email_address"}])
        with RulesProxy(rules=[rule], databases=databases()) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.executemany("INSERT INTO mt_people (email, name) VALUES (%s, %s)",
                            [("A@X.org", "a"), ("B@Y.org", "b"), ("C@Z.org", "c")])
            cur.execute("UPDATE mt_people SET email = 'New@X.org' WHERE name = 'a'")
            cur.execute("UPDATE mt_people SET name = 'bee' WHERE email = 'B@Y.org'")
            cur.execute("DELETE FROM mt_people WHERE name = 'c'")
            cur.execute("INSERT INTO mt_people (id, email, name) VALUES (2, 'Up@Sert', 'u') "
                        "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email")
            conn.close()

            def same():
                old = pdtest.direct_query("SELECT id, lower(email), name FROM mt_people "
                                          "ORDER BY id", dbname="app")
                new = pdtest.direct_query("SELECT id, email_address, name FROM mt_people "
                                          "ORDER BY id", dbname="app2")
                return old == new
            pdtest.wait_for(same, 10, what="new to hold lower(email) in email_address")
            self.assertEqual(pdtest.direct_query(
                "SELECT email_address FROM mt_people ORDER BY id", dbname="app2"),
                [("new@x.org",), ("up@sert",)])
            st = counters(p)
            self.assertEqual((st["mirror_diverged"], st["mirror_proxy_errors"]), (0, 0),
                             p.divergence())


class MirrorTouchedTest(unittest.TestCase):
    """The keys the mirror saw written feed `verify --touched`."""

    def test_verify_touched_checks_the_mirrored_keys(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            for i in range(3):
                cur.execute("INSERT INTO mt_orders (total) VALUES (%s)", (i,))
            wait_match(p, "the first rows mirrored")
            self.assertEqual(p.ctl_json("verify", RULE)["result"]["divergent"], 0)
            cur.execute("UPDATE mt_orders SET total = 99 WHERE id = 2")
            cur.execute("INSERT INTO mt_orders (total) VALUES (4)")
            conn.close()
            wait_match(p, "the touched rows mirrored")
            # Corrupt one touched row and one untouched row directly on new.
            pdtest.direct_query("UPDATE mt_orders SET total = -1 WHERE id IN (1, 2)",
                                dbname="app2")
            r = p.ctl("--json", "verify", RULE, "--touched", check=False)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            res = json.loads(r.stdout)["result"]
            orders = [t for t in res["tables"] if t["table"] == "public.mt_orders"][0]
            self.assertEqual((orders["mode"], orders["rows_checked"], orders["divergent"]),
                             ("touched", 2, 1), orders)
            # The untouched corruption is still there for a full verify to find.
            full = json.loads(p.ctl("--json", "verify", RULE, check=False).stdout)["result"]
            self.assertEqual(full["divergent"], 2)


class MirrorAATest(unittest.TestCase):
    """reads=aa: shadow reads compared against old itself, to measure the noise floor
    before anything is migrated; differences are counted apart and are not divergence."""

    def test_aa_noise_floor_then_dual(self):
        reset_schema()
        # new differs from old: an A/A read that went to new would differ every time.
        pdtest.direct_query("INSERT INTO mt_orders (total, note) VALUES (7, 'only-new')",
                            dbname="app2")
        with RulesProxy(rules=[tables_rule(writes="old", reads="aa")], databases=databases(),
                        sample=1.0) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.executemany("INSERT INTO mt_orders (total, note) VALUES (%s, 'n')",
                            [(i,) for i in range(5)])
            for _ in range(20):
                cur.execute("SELECT id, total, note FROM mt_orders WHERE total >= %s", (2,))
                self.assertEqual(len(cur.fetchall()), 3)
            pdtest.wait_for(lambda: counters(p)["aa_compared"] >= 20, 10,
                            what="20 A/A comparisons")
            st = counters(p)
            self.assertEqual((st["aa_mismatched"], st["shadow_compared"], st["mirrored"]),
                             (0, 0, 0), (st, p.divergence()))
            # Writes stayed on old only: nothing of them reached new.
            self.assertEqual(pdtest.direct_query("SELECT count(*) FROM mt_orders",
                                                 dbname="app2")[0][0], 1)
            # Noise: a table that changes between the two runs of a read differs A/A.
            p.ctl("verify", RULE, check=False)  # (new differs: only its time matters here)
            time.sleep(1.1)  # the report's times are in whole seconds
            stop = threading.Event()

            def writer():
                c = pdtest.cluster()
                w = psycopg2.connect(host=c["host"], port=c["port"], dbname="app",
                                     user="postgres")
                w.autocommit = True
                while not stop.is_set():
                    w.cursor().execute("INSERT INTO mt_log (msg) VALUES ('tick')")
                w.close()
            t = threading.Thread(target=writer)
            t.start()
            try:
                def noisy():
                    cur.execute("SELECT count(*) FROM mt_log")
                    return counters(p)["aa_mismatched"] >= 1
                pdtest.wait_for(noisy, 20, interval=0.01, what="an A/A difference")
            finally:
                stop.set()
                t.join(10)
            st = counters(p)
            self.assertEqual(st["shadow_mismatched"], 0, st)
            kinds = {e["kind"] for e in p.divergence()}
            self.assertEqual(kinds, {"aa_read"}, p.divergence())
            rep = json.loads(p.ctl("--json", "report", "app", check=False).stdout)["report"]
            self.assertEqual(rep["rules"][0]["divergence_since_verify"], 0, rep["rules"][0])
            metrics = urllib.request.urlopen(
                "http://127.0.0.1:%d/metrics" % p.metrics_port, timeout=10).read().decode()
            self.assertRegex(metrics, r'pgdual_aa_reads_total\{rule="%s",outcome="differed"\} '
                                      r'[1-9]' % RULE)
            # A/A only while writes are not mirrored; the flag says what to do instead.
            r = p.ctl("flag", RULE, "writes=dual", check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("reads=aa compares old against old", r.stdout + r.stderr)
            # On to dual: the same session's second connection now goes to new, so its
            # writes are applied once on each side (not twice on old).
            p.ctl("flag", RULE, "reads=old")
            for db in ("app", "app2"):  # the writer above wrote mt_log on old directly
                pdtest.direct_query("TRUNCATE mt_orders, mt_log RESTART IDENTITY", dbname=db)
            p.ctl("flag", RULE, "writes=dual")
            p.ctl("flag", RULE, "reads=shadow")
            cur.execute("INSERT INTO mt_orders (total, note) VALUES (42, 'after')")
            wait_match(p, "the write after A/A mirrored to new")
            self.assertEqual(pdtest.direct_query(
                "SELECT count(*) FROM mt_orders WHERE total = 42", dbname="app")[0][0], 1)
            cur.execute("SELECT total FROM mt_orders")
            pdtest.wait_for(lambda: counters(p)["shadow_compared"] >= 1, 10,
                            what="a shadow comparison against new")
            self.assertEqual(counters(p)["shadow_mismatched"], 0, p.divergence())
            conn.close()


class MirrorShadowTest(unittest.TestCase):
    """reads=shadow of a tables rule: reads of its tables run on new too and are compared;
    the client gets old's result."""

    def test_shadow_reads_compare_and_record(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule(reads="shadow")], databases=databases(),
                        sample=1.0) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.executemany("INSERT INTO mt_orders (total, note) VALUES (%s, %s)",
                            [(i, "n%d" % i) for i in range(10)])
            wait_match(p, "rows mirrored")
            cur.execute("SELECT id, total, note FROM mt_orders WHERE total >= %s", (3,))
            self.assertEqual(len(cur.fetchall()), 7)
            pdtest.wait_for(lambda: counters(p)["shadow_compared"] >= 1, 10,
                            what="a shadow comparison")
            self.assertEqual(counters(p)["shadow_mismatched"], 0, p.divergence())
            # new differs: the next read is answered from old and recorded.
            pdtest.direct_query("UPDATE mt_orders SET note = 'secret-x' WHERE total = 5",
                                dbname="app2")
            cur.execute("SELECT id, total, note FROM mt_orders WHERE total >= %s", (3,))
            self.assertNotIn("secret-x", [r[2] for r in cur.fetchall()])
            pdtest.wait_for(lambda: counters(p)["shadow_mismatched"] == 1, 10,
                            what="the mismatch to be recorded")
            ev = [e for e in p.divergence() if e["kind"] == "shadow_read"][-1]
            self.assertEqual(ev["rule"], RULE)
            self.assertNotIn("3", ev["statement"].replace("$", ""))  # no literal values
            self.assertEqual(ev["old"]["rows"], ev["new"]["rows"])
            # Extended protocol, text results: compared too.
            with RawClient(p.port) as c:
                c.startup("postgres", "app")
                c.send(parse_msg("", "SELECT count(*) FROM mt_orders WHERE total < $1")
                       + bind_msg_params(["100"]) + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["10"]])
            pdtest.wait_for(lambda: counters(p)["shadow_compared"] >= 3, 10,
                            what="the extended-protocol comparison")
            conn.close()


class MirrorShadowBudgetTest(unittest.TestCase):
    def test_slow_shadow_read_cancelled_and_skipped(self):
        """A shadow read that runs past divergence.shadow_budget_ms on new is cancelled and
        counted as skipped, neither compared nor a divergence, and the writes queued
        behind it are mirrored."""
        reset_schema()
        with RulesProxy(rules=[tables_rule(reads="shadow")], databases=databases(),
                        sample=1.0, shadow_budget_ms=100) as p:
            for db in ("app", "app2"):
                pdtest.direct_query("INSERT INTO mt_orders (id, total, created_at, token) "
                                    "SELECT g, g, '2020-01-01', md5(g::text)::uuid FROM "
                                    "generate_series(1001, 1200) g", dbname=db)
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            before = counters(p)
            # 8 million joined rows: a second or more on either side.
            cur.execute("SELECT count(*) FROM mt_orders a, mt_orders b, mt_orders c "
                        "WHERE a.total + b.total > c.total")
            self.assertEqual(len(cur.fetchall()), 1)
            cur.execute("INSERT INTO mt_orders (total, note) VALUES (1, 'after')")
            conn.close()
            pdtest.wait_for(lambda: counters(p)["shadow_skipped"] > before["shadow_skipped"],
                            20, what="the slow shadow read skipped")
            wait_match(p, "the write after the slow read mirrored")
            after = counters(p)
            self.assertEqual(after["shadow_compared"], before["shadow_compared"], after)
            self.assertEqual(after["shadow_mismatched"], 0, p.divergence())
            self.assertEqual(after["mirror_diverged"], 0, p.divergence())
            self.assertEqual(p.divergence(), [])

    def test_lockstep_skips_shadow_reads_in_transactions(self):
        """Under lockstep a shadow read inside a transaction (which could not be cancelled)
        is skipped; outside one it is compared; under async both are compared."""
        for commit in ("lockstep", "async"):
            reset_schema()
            rule = tables_rule(reads="shadow", mirror={"commit": commit,
                                                       "on_failure": "record"})
            with RulesProxy(rules=[rule], databases=databases(), sample=1.0) as p:
                conn = pdtest.connect(p.port)
                cur = conn.cursor()
                before = counters(p)
                cur.execute("SELECT count(*) FROM mt_orders")  # in psycopg2's transaction
                cur.execute("INSERT INTO mt_orders (total) VALUES (1)")
                conn.commit()
                conn.autocommit = True
                cur.execute("SELECT count(*) FROM mt_orders")
                conn.close()
                in_txn = 0 if commit == "lockstep" else 1
                pdtest.wait_for(lambda: counters(p)["shadow_compared"]
                                == before["shadow_compared"] + 1 + in_txn, 10,
                                what="the shadow comparisons (%s)" % commit)
                after = counters(p)
                self.assertEqual(after["shadow_skipped"] - before["shadow_skipped"],
                                 1 - in_txn, (commit, after))
                self.assertEqual(after["shadow_mismatched"], 0, p.divergence())
                wait_match(p, "the insert mirrored (%s)" % commit)


class MirrorReadsNewTest(unittest.TestCase):
    """reads=new of a tables rule at writes=dual: reads of the rule's tables outside
    transactions are served by new, after the session's own writes are applied there;
    everything else runs on old, the authoritative side."""

    def test_reads_served_by_new(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            p.ctl("flag", RULE, "reads=new@50")  # a share of sessions: accepted at dual
            rules = {x["name"]: x for x in p.ctl_json("rules")["rules"]}
            self.assertEqual((rules[RULE]["writes"], rules[RULE]["reads"]), ("dual", "new@50"))
            p.ctl("flag", RULE, "reads=new")
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            # Read-your-writes: each read follows the session's own write on new.
            for i in range(20):
                cur.execute("INSERT INTO mt_orders (total, note) VALUES (%s, 'rn') "
                            "RETURNING id", (i,))
                oid = cur.fetchone()[0]
                cur.execute("SELECT total FROM mt_orders WHERE id = %s", (oid,))
                self.assertEqual(cur.fetchall(), [(i,)])
            # Served by new: a value only new has shows.
            pdtest.direct_query("UPDATE mt_orders SET note = 'only-new' WHERE id = %s",
                                (oid,), dbname="app2")
            cur.execute("SELECT note FROM mt_orders WHERE id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("only-new",)])
            # A read that touches another table stays on old; so does one in a transaction.
            cur.execute("SELECT o.note FROM mt_orders o JOIN pg_namespace n "
                        "ON n.nspname = 'public' WHERE o.id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("rn",)])
            conn.autocommit = False
            cur.execute("SELECT note FROM mt_orders WHERE id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("rn",)])
            conn.commit()
            conn.autocommit = True
            # Writes go to old (and are mirrored), between reads on new.
            cur.execute("UPDATE mt_orders SET note = 'both' WHERE id = %s", (oid,))
            cur.execute("SELECT note FROM mt_orders WHERE id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("both",)])
            self.assertEqual(pdtest.direct_query("SELECT note FROM mt_orders WHERE id = %s",
                                                 (oid,), dbname="app"), [("both",)])
            # Extended protocol: a read-only batch runs on new; a write in a batch that
            # started with such a read is refused, and the session goes on.
            with RawClient(p.port) as c:
                c.startup("postgres", "app")
                c.send(parse_msg("r", "SELECT count(*) FROM mt_orders WHERE note = $1")
                       + bind_msg_params(["both"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["1"]])
                c.send(bind_msg_params(["both"], stmt="r") + execute_msg()
                       + parse_msg("", "INSERT INTO mt_orders (total) VALUES (1)")
                       + bind_msg() + execute_msg() + sync_msg())
                err = None
                while True:
                    k, body = c.recv_msg()
                    if k == "E":
                        err = pdtest.parse_fields(body)
                    if k == "Z":
                        break
                self.assertEqual(err["C"], "0A000", err)
                self.assertIn("Send Sync after the reads", err["H"])
                c.send(bind_msg_params(["both"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["1"]])
            # pgbench, prepared statements, reads and writes from several sessions.
            script = os.path.join(p.dir, "rn.sql")
            with open(script, "w") as f:
                f.write("\\set t random(1, 100)\n"
                        "INSERT INTO mt_orders (total, note) VALUES (:t, 'pgb');\n"
                        "SELECT count(*) FROM mt_orders WHERE total = :t;\n")
            pdtest.run_pgbench(p.port, ["-n", "-M", "prepared", "-c", "4", "-t", "50",
                                        "-f", script])
            # reads=old: old again.
            p.ctl("flag", RULE, "reads=old")
            cur.execute("SELECT note FROM mt_orders WHERE id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("both",)])
            pdtest.direct_query("UPDATE mt_orders SET note = 'old-only' WHERE id = %s", (oid,),
                                dbname="app")
            cur.execute("SELECT note FROM mt_orders WHERE id = %s", (oid,))
            self.assertEqual(cur.fetchall(), [("old-only",)])
            pdtest.direct_query("UPDATE mt_orders SET note = 'both' WHERE id = %s", (oid,),
                                dbname="app")
            conn.close()
            self.assertEqual(counters(p)["mirror_proxy_errors"], 0)
            self.assertEqual(counters(p)["mirror_unapplied"], 0)


    def test_statements_follow_the_swaps(self):
        """A statement prepared on one side, then closed, prepared again or used while
        the session reads new: each swap leaves the client's statements as it left them
        (a Close sent on one side reaches the other; a name the client freed can be
        used again)."""
        reset_schema()
        close = lambda name: pdtest.msg("C", b"S" + pdtest.cstr(name))
        read_new = pdtest.query_msg("SELECT count(*) FROM mt_orders")
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            p.ctl("flag", RULE, "reads=new")
            with RawClient(p.port) as c:
                c.startup("postgres", "app")
                c.send(parse_msg("s", "SELECT 1") + sync_msg())  # on old
                self.assertEqual(read_batch(c), [])
                c.send(read_new)  # on new
                self.assertEqual(read_batch(c), [["0"]])
                c.send(close("s") + sync_msg())  # freed while on new
                self.assertEqual(read_batch(c), [])
                c.send(parse_msg("s", "SELECT 2") + bind_msg(stmt="s") + execute_msg()
                       + sync_msg())  # the name again, on old
                self.assertEqual(read_batch(c), [["2"]])
                c.send(read_new)
                self.assertEqual(read_batch(c), [["0"]])
                c.send(bind_msg(stmt="s") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["2"]])
                # A rule read prepared on new, used after a write on old, and again.
                c.send(parse_msg("r", "SELECT count(*) FROM mt_orders WHERE total > $1")
                       + bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["0"]])
                c.send(pdtest.query_msg("INSERT INTO mt_orders (total) VALUES (5)"))
                self.assertEqual(read_batch(c), [])
                for _ in range(3):
                    c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                    self.assertEqual(read_batch(c), [["1"]])
                    c.send(pdtest.query_msg("SELECT 1"))
                    self.assertEqual(read_batch(c), [["1"]])
                # Held on both sides (bound in a transaction on old), freed by SQL on old:
                # prepared again by name on new.
                for drop in ("DEALLOCATE r", "DEALLOCATE ALL", "DISCARD ALL"):
                    c.send(pdtest.query_msg("BEGIN"))
                    read_batch(c)
                    c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                    self.assertEqual(read_batch(c), [["1"]])
                    c.send(pdtest.query_msg("COMMIT"))
                    read_batch(c)
                    c.send(pdtest.query_msg(drop))
                    self.assertEqual(read_batch(c), [], drop)
                    c.send(parse_msg("r", "SELECT count(*) FROM mt_orders WHERE total > $1")
                           + bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                    self.assertEqual(read_batch(c), [["1"]], drop)
                # A name deallocated by SQL is gone, as PostgreSQL says (26000), on either
                # side. First r is held on new only (prepared there last): the DEALLOCATE
                # (on old) finds it, as pgdual prepares it on old first.
                r_again = (parse_msg("r", "SELECT count(*) FROM mt_orders WHERE total > $1")
                           + bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                c.send(parse_msg("q", "SELECT 3") + parse_msg("n", "SELECT count(*) FROM "
                       "mt_orders WHERE total > $1") + sync_msg())
                read_batch(c)
                c.send(pdtest.query_msg("DEALLOCATE r"))
                self.assertEqual(read_batch(c), [])
                c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())  # old
                self.assertEqual(read_error(c)["C"], "26000")
                c.send(bind_msg(stmt="q") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["3"]])
                # Then held on both sides; after the DEALLOCATE on old, a Bind on new.
                c.send(r_again)
                self.assertEqual(read_batch(c), [["1"]])  # on new
                c.send(pdtest.query_msg("BEGIN"))
                read_batch(c)
                c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["1"]])  # on old
                c.send(pdtest.query_msg("COMMIT"))
                read_batch(c)
                c.send(pdtest.query_msg("DEALLOCATE r"))
                self.assertEqual(read_batch(c), [])
                c.send(bind_msg_params(["0"], stmt="n") + execute_msg()
                       + bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_error(c)["C"], "26000")  # the batch ran on new
                c.send(r_again)
                self.assertEqual(read_batch(c), [["1"]])
                # Dropped by a text pgdual does not read (any name may be gone): on the side
                # that ran it, the server says which.
                c.send(pdtest.query_msg("BEGIN"))
                read_batch(c)
                c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["1"]])  # on old: held on both sides now
                c.send(pdtest.query_msg("COMMIT"))
                read_batch(c)
                c.send(pdtest.query_msg("SELECT 4; DEALLOCATE r"))
                self.assertEqual(read_batch(c), [["4"]])
                c.send(pdtest.query_msg("BEGIN"))
                read_batch(c)
                c.send(bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_error(c)["C"], "26000")
                c.send(bind_msg(stmt="q") + execute_msg() + sync_msg())
                self.assertEqual(read_error(c)["C"], "25P02")
                c.send(pdtest.query_msg("ROLLBACK"))
                read_batch(c)
                c.send(bind_msg(stmt="q") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["3"]])
                c.send(parse_msg("r", "SELECT count(*) FROM mt_orders WHERE total > $1")
                       + bind_msg_params(["0"], stmt="r") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["1"]])
                # Described on a side that never prepared it, first in its batch.
                c.send(parse_msg("w", "SELECT note FROM mt_orders WHERE total = $1")
                       + sync_msg())
                read_batch(c)
                c.send(pdtest.query_msg("SELECT 1"))  # on old
                read_batch(c)
                for _ in range(2):
                    c.send(pdtest.msg("D", b"S" + pdtest.cstr("w")) + sync_msg())
                    self.assertEqual(read_kinds(c), ["t", "T", "Z"])
                    c.send(read_new)
                    read_batch(c)
                # Further into a batch on new, where it was never prepared: prepared there
                # first.
                c.send(parse_msg("v", "SELECT 7") + sync_msg())  # on old
                read_batch(c)
                c.send(bind_msg_params(["0"], stmt="r") + execute_msg()
                       + pdtest.msg("D", b"S" + pdtest.cstr("v")) + sync_msg())
                self.assertEqual(read_kinds(c), ["2", "D", "C", "t", "T", "Z"])
                c.send(bind_msg(stmt="v") + execute_msg() + sync_msg())
                self.assertEqual(read_batch(c), [["7"]])
            self.assertEqual(counters(p)["mirror_proxy_errors"], 0)


    def test_listening_session_reads_new_and_hears_old_once(self):
        """A session that LISTENs reads from new at reads=new like any other. While it is
        on new, old's notifications come on its connection to old, the mirror's for the
        time being: they are heard, once each; a NOTIFY sent to new (not
        authoritative) is not heard."""
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            p.ctl("flag", RULE, "reads=new")
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("LISTEN pd_reads_new")
            pdtest.direct_query("UPDATE mt_counters SET n = 42 WHERE id = 1", dbname="app2")

            def read_on_new():
                cur.execute("SELECT n FROM mt_counters WHERE id = 1")
                self.assertEqual(cur.fetchall(), [(42,)])  # new's row: served by new

            read_on_new()
            # Idle on new: old's notification comes through the mirror's connection.
            pdtest.direct_query("NOTIFY pd_reads_new, 'old idle'", dbname="app")
            pdtest.wait_for(lambda: conn.poll() or conn.notifies, 5, what="the notification")
            pdtest.direct_query("NOTIFY pd_reads_new, 'new'", dbname="app2")
            read_on_new()  # new delivered its own before this answer: it was dropped
            pdtest.direct_query("NOTIFY pd_reads_new, 'old again'", dbname="app")
            read_on_new()
            pdtest.wait_for(lambda: conn.poll() or len(conn.notifies) >= 2, 5,
                            what="the second notification")
            # A round trip on old (the session swaps back), then on new again: a duplicate
            # from either connection would have come by now.
            cur.execute("SELECT 1")
            read_on_new()
            conn.poll()
            self.assertEqual([n.payload for n in conn.notifies], ["old idle", "old again"])
            self.assertEqual(counters(p)["mirror_proxy_errors"], 0)
            conn.close()


class MirrorReadsNewSwitchoverTest(unittest.TestCase):
    def whole_database_proxy(self, name, *more_rules, env=None):
        """A proxy with database `name` (`name`_old, `name`_new, each with table
        `name`_t) under a tables rule `name` over every table, at writes=dual."""
        pdtest.fresh_databases(name + "_old", name + "_new")
        for db in (name + "_old", name + "_new"):
            pdtest.direct_query("CREATE TABLE %s_t (id int PRIMARY KEY, note text); "
                                "INSERT INTO %s_t VALUES (1, 'start')" % (name, name), dbname=db)
        rule = {"name": name, "database": name, "kind": "tables", "writes": "dual",
                "reads": "old", "mirror": {"commit": "async", "on_failure": "record"}}
        dbs = [{"name": name, "old": pdtest.pg_conninfo(name + "_old"),
                "new": pdtest.pg_conninfo(name + "_new")}] + databases()
        p = RulesProxy(rules=[rule, *more_rules], databases=dbs, env=env).start()
        self.addCleanup(pdtest.stop_and_drop, p, name + "_old", name + "_new")
        return p

    def test_listen_follows_the_switchover(self):
        """LISTEN is kept in step on the mirror's connection, and a session hears the
        notifications of the authoritative side on whichever connection they come: one
        that only waits for notifications (it never changes sides) hears a NOTIFY sent
        through pgdual after the switchover (on new); a trigger's notification is heard
        once, though the write runs on both sides; old's are not heard after the flip."""
        p = self.whole_database_proxy("rq")
        for db in ("rq_old", "rq_new"):
            pdtest.direct_query(
                "CREATE FUNCTION rq_notify() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_notify('rq_channel', 'trigger ' || NEW.note); RETURN NEW; END $$; "
                "CREATE TRIGGER rq_notify AFTER UPDATE ON rq_t FOR EACH ROW "
                "EXECUTE FUNCTION rq_notify()", dbname=db)
        listener = pdtest.connect(p.port, dbname="rq")
        listener.autocommit = True
        listener.cursor().execute("LISTEN rq_channel")
        notifier = pdtest.connect(p.port, dbname="rq")
        notifier.autocommit = True
        ncur = notifier.cursor()

        def heard(expected, on_new=None):
            """Waits for the expected payloads; then (after the mirror applied the
            update `on_new`, when given) for a duplicate that does not come."""
            pdtest.wait_for(lambda: listener.poll() or len(listener.notifies) >= len(expected),
                            10, what="notifications %r" % (expected,))
            if on_new is not None:
                pdtest.wait_for(lambda: pdtest.direct_query("SELECT note FROM rq_t",
                                                            dbname="rq_new") == [(on_new,)],
                                10, what="new to apply the update")
            time.sleep(0.3)
            listener.poll()
            self.assertEqual([x.payload for x in listener.notifies], expected)

        ncur.execute("NOTIFY rq_channel, 'before'")
        heard(["before"])
        ncur.execute("UPDATE rq_t SET note = 't1' WHERE id = 1")  # the trigger fires on both
        heard(["before", "trigger t1"], on_new="t1")
        r = p.ctl("switchover", "rq", "--force", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        ncur.execute("NOTIFY rq_channel, 'after'")  # the notifier is on new now
        heard(["before", "trigger t1", "after"])
        ncur.execute("UPDATE rq_t SET note = 't2' WHERE id = 1")
        pdtest.wait_for(lambda: pdtest.direct_query("SELECT note FROM rq_t", dbname="rq_old")
                        == [("t2",)], 10, what="old to apply the update as the mirror")
        heard(["before", "trigger t1", "after", "trigger t2"])
        listener.cursor().execute("SELECT 1")  # the listener changes sides too
        pdtest.direct_query("NOTIFY rq_channel, 'sent to old'", dbname="rq_old")
        ncur.execute("NOTIFY rq_channel, 'on new'")
        heard(["before", "trigger t1", "after", "trigger t2", "on new"])
        listener.cursor().execute("UNLISTEN rq_channel")
        ncur.execute("NOTIFY rq_channel, 'unheard'")
        time.sleep(0.3)
        listener.cursor().execute("SELECT 1")
        self.assertEqual(len(listener.notifies), 5)
        listener.close()
        notifier.close()
        self.assertEqual(p.ctl_json("status")["rule_counters"]["rq"]["mirror_proxy_errors"], 0)

    def test_notifications_a_client_does_not_read_are_bounded(self):
        """A client that LISTENs and does not read: what comes on its mirror connection
        (here 40 MB sent to new after the switchover, the session still on old) is passed
        on up to a bound, past which it is dropped, not kept: pgdual's memory stays
        flat."""
        # Under AddressSanitizer freed memory stays resident in its quarantine: none here.
        p = self.whole_database_proxy(
            "rl", env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:quarantine_size_mb=0"})
        conn = pdtest.connect(p.port, dbname="rl")
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("LISTEN rl_channel")
        cur.execute("UPDATE rl_t SET note = 'mirrored' WHERE id = 1")
        pdtest.wait_for(lambda: pdtest.direct_query("SELECT note FROM rl_t", dbname="rl_new")
                        == [("mirrored",)], 10, what="the mirror to apply the update")
        r = p.ctl("switchover", "rl", "--force", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        before = pdtest.rss_kb(p.proc.pid)
        for _ in range(4):  # 40 MB of notifications on new, the authoritative side now
            pdtest.direct_query("SELECT pg_notify('rl_channel', g || repeat('x', 1000)) "
                                "FROM generate_series(1, 10000) g", dbname="rl_new")
        time.sleep(1)
        grown = pdtest.rss_kb(p.proc.pid) - before
        cur.execute("SELECT 1")
        self.assertEqual(cur.fetchall(), [(1,)])
        conn.poll()
        self.assertLess(grown, 24 * 1024, "pgdual kept the notifications: +%d kB" % grown)
        self.assertGreater(len(conn.notifies), 0)
        self.assertTrue(conn.notifies[0].payload.startswith("1x"), conn.notifies[0].payload)
        conn.close()

    def test_reading_session_goes_on_at_switchover(self):
        """A session reading new (reads=new at writes=dual) when the database switches
        over goes on there with new authoritative; and --force cannot switch over a rule
        whose flags after the flip this version does not serve."""
        listed = {"name": "rn-listed", "database": "app", "kind": "tables", "writes": "dual",
                  "reads": "old", "tables": ["public.mt_orders"],
                  "mirror": {"commit": "async", "on_failure": "record"}}
        p = self.whole_database_proxy("rn", listed)
        r = p.ctl("switchover", "app", "--force", check=False)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn("so the rule must cover every table", r.stdout + r.stderr)
        p.ctl("flag", "rn", "reads=new")
        conn = pdtest.connect(p.port, dbname="rn")
        conn.autocommit = True
        cur = conn.cursor()
        pdtest.direct_query("UPDATE rn_t SET note = 'new' WHERE id = 1", dbname="rn_new")
        cur.execute("SELECT note FROM rn_t WHERE id = 1")
        self.assertEqual(cur.fetchall(), [("new",)])  # reading new now
        r = p.ctl("switchover", "rn", "--force", check=False)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        cur.execute("UPDATE rn_t SET note = 'after' WHERE id = 1")
        self.assertEqual(pdtest.direct_query("SELECT note FROM rn_t", dbname="rn_new"),
                         [("after",)])
        cur.execute("SELECT note FROM rn_t WHERE id = 1")
        self.assertEqual(cur.fetchall(), [("after",)])
        pdtest.wait_for(lambda: pdtest.direct_query("SELECT note FROM rn_t", dbname="rn_old")
                        == [("after",)], 10, what="old to follow as the mirror")
        conn.close()
        self.assertEqual(p.ctl_json("status")["rule_counters"]["rn"]["mirror_proxy_errors"], 0)


    def test_statement_freed_between_switchover_and_rollback(self):
        """A statement prepared on old, freed by the client after the switchover (on new),
        can be prepared again by its name after the rollback (on old, which held it all
        along), and one the client kept needs no new Parse from the client."""
        p = self.whole_database_proxy("rs")
        close = lambda name: pdtest.msg("C", b"S" + pdtest.cstr(name))
        with RawClient(p.port) as c:
            c.startup("postgres", "rs")
            c.send(parse_msg("s", "SELECT note FROM rs_t WHERE id = 1")
                   + parse_msg("k", "SELECT count(*) FROM rs_t") + sync_msg())
            read_batch(c)
            c.send(pdtest.query_msg("UPDATE rs_t SET note = 'mirrored' WHERE id = 1"))
            read_batch(c)
            for step in ("switchover", "rollback"):
                r = p.ctl(step, "rs", "--force", check=False) if step == "switchover" \
                    else p.ctl(step, "rs", check=False)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
                if step == "switchover":
                    c.send(close("s") + sync_msg())  # on new
                    self.assertEqual(read_batch(c), [])
            c.send(parse_msg("s", "SELECT id FROM rs_t") + bind_msg(stmt="s") + execute_msg()
                   + sync_msg())
            self.assertEqual(read_batch(c), [["1"]])
            c.send(bind_msg(stmt="k") + execute_msg() + sync_msg())
            self.assertEqual(read_batch(c), [["1"]])
        self.assertEqual(p.ctl_json("status")["rule_counters"]["rs"]["mirror_proxy_errors"], 0)


class MirrorClientGoneTest(unittest.TestCase):
    """A client that sends a write and vanishes: whatever old committed is on new, or
    recorded as not applied (never silently missing)."""

    def test_vanishing_clients_leave_nothing_silent(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            for i in range(30):
                c = RawClient(p.port)
                c.startup("postgres", "app")
                c.send(pdtest.msg("Q", pdtest.cstr(
                    "INSERT INTO mt_orders (id, total, note) VALUES (%d, 1, 'gone')" % (i + 1))))
                c.close()
            time.sleep(1.0)
            on_old = {r[0] for r in pdtest.direct_query("SELECT id FROM mt_orders",
                                                        dbname="app")}
            def settled():
                on_new = {r[0] for r in pdtest.direct_query("SELECT id FROM mt_orders",
                                                            dbname="app2")}
                recorded = len([e for e in p.divergence() if e["kind"] == "mirror_unapplied"])
                return len(on_old - on_new) <= recorded
            pdtest.wait_for(settled, 10, what="every write old kept to be on new or recorded")


class MirrorCopyTest(unittest.TestCase):
    """COPY FROM STDIN into a rule table: the client's data replayed verbatim on new."""

    def test_copy_from_stdin_mirrored_or_refused(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            rows = "".join("%d\t%d\t2026-01-01 00:00:%02d+00\t%s\tnote %d\n"
                           % (i, i * 10, i % 60, "00000000-0000-0000-0000-%012d" % i, i)
                           for i in range(1, 2001))
            import io
            cur.copy_expert("COPY mt_orders (id, total, created_at, token, note) FROM STDIN",
                            io.StringIO(rows))
            self.assertEqual(cur.rowcount, 2000)
            cur.copy_expert("COPY mt_log (at, msg) FROM STDIN WITH (FORMAT csv)",
                            io.StringIO("2026-01-01 10:00:00+00,a\n2026-01-02 10:00:00+00,b\n"))
            # A default that differs between servers cannot be replayed: refused.
            with self.assertRaises(psycopg2.Error) as cm:
                cur.copy_expert("COPY mt_orders (total) FROM STDIN", io.StringIO("5\n"))
            self.assertEqual(cm.exception.pgcode, "0A000")
            conn.close()
            wait_match(p, "COPY data mirrored")
            self.assertEqual(table_md5("app2", "mt_orders")[1], 2000)
            st = counters(p)
            self.assertEqual((st["mirror_diverged"], st["mirror_proxy_errors"]), (0, 0),
                             p.divergence())


class MirrorShadowNormalizeTest(unittest.TestCase):
    """Shadow comparisons tolerate what legitimately differs between servers: float text
    past 15 significant digits and fractional seconds past milliseconds; not more."""

    def test_last_digit_and_precision(self):
        for db in ("app", "app2"):
            pdtest.direct_query("DROP TABLE IF EXISTS mt_measure; CREATE TABLE mt_measure "
                                "(id int PRIMARY KEY, v float8, at timestamptz)", dbname=db)
        rule = tables_rule(tables=["public.mt_measure"], reads="shadow")
        with RulesProxy(rules=[rule], databases=databases(), sample=1.0) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("INSERT INTO mt_measure VALUES (1, 0.3, '2026-01-01 10:00:00.123456+00')")

            def read_and_count():
                before = counters(p)["shadow_compared"]
                cur.execute("SELECT v, at FROM mt_measure")
                pdtest.wait_for(lambda: counters(p)["shadow_compared"] > before, 10,
                                what="a shadow comparison")
                return counters(p)["shadow_mismatched"]

            self.assertEqual(read_and_count(), 0)
            # One ulp and a microsecond apart on new: the same to a comparison.
            pdtest.direct_query("UPDATE mt_measure SET v = 0.1::float8 + 0.2::float8, "
                                "at = at + interval '1 microsecond'", dbname="app2")
            self.assertEqual(read_and_count(), 0, p.divergence())
            # A real difference is still one.
            pdtest.direct_query("UPDATE mt_measure SET v = 0.31", dbname="app2")
            self.assertEqual(read_and_count(), 1)
            pdtest.direct_query("UPDATE mt_measure SET v = 0.1::float8 + 0.2::float8, "
                                "at = at + interval '5 milliseconds'", dbname="app2")
            self.assertEqual(read_and_count(), 2)
            conn.close()


class MirrorRefusalTest(unittest.TestCase):
    def test_what_cannot_be_replayed_is_refused(self):
        reset_schema()
        with RulesProxy(rules=[tables_rule()], databases=databases()) as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            with self.assertRaises(psycopg2.Error) as cm:
                cur.execute("UPDATE mt_orders SET id = id + 1, created_at = now()")
            self.assertEqual(cm.exception.pgcode, "0A000")
            self.assertIn(RULE, cm.exception.pgerror)
            with self.assertRaises(psycopg2.Error) as cm:
                cur.execute("PREPARE TRANSACTION 'x'")
            self.assertEqual(cm.exception.pgcode, "0A000")
            conn.close()

    def test_dual_new_refusals(self):
        # New authoritative means sessions talk to new only: a rule listing some tables
        # (the others would not be on new) cannot be flipped there; one mapping columns
        # can (its statements are translated for new: test_translate.py).
        with RulesProxy(rules=[tables_rule(writes="old")], databases=databases()) as p:
            r = p.ctl("flag", RULE, "writes=dual-new", "reads=new", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("the rule must cover every table: omit `tables` from the rule",
                          r.stderr)
            r = p.ctl("flag", RULE, "reads=new", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("reads=new of a kind: tables rule needs new written", r.stderr)
        mapped = tables_rule(writes="old", tables=None,
                             columns=[{"old": "note", "new": "remark"}])
        del mapped["tables"]
        with RulesProxy(rules=[mapped], databases=databases()) as p:
            r = p.ctl("switchover", "app", "--force", check=False)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            rules = {x["name"]: x for x in p.ctl_json("rules")["rules"]}
            self.assertEqual((rules[RULE]["writes"], rules[RULE]["reads"]), ("dual-new", "new"))


if __name__ == "__main__":
    unittest.main()
