#!/usr/bin/python3
"""Blue/green to a new schema: a `tables` rule without a table list that maps columns
(xl_users.email on old is email_address = lower(email) on new, name is renamed full_name)
goes through switchover. Under writes=dual-new the application keeps speaking old's
schema: its statements are translated for new (reads through `down` under the old names,
writes through `up`), old follows as the mirror with row images converted back through
`down`, and both keep holding the same rows under the mapping, with one client or eight,
async or lockstep. What cannot be translated faithfully is refused with 0A000 and the
session carries on; rollback returns to writes=dual with new following through `up`.
Concurrent clients' writes to one row reach old in the order new applied them.

Each class uses its own pair of databases, so that the all-tables rule covers only the
tables made here."""

import io
import os
import random
import threading
import time
import unittest

import psycopg2

import pdtest
from pdtest import Proxy, RawClient, direct_query, pg_conninfo
from test_rules import bind_msg_params, execute_msg, parse_msg, read_batch, sync_msg

PID = os.getpid()
RULE = "xl-to-green"

OLD_SCHEMA = """
CREATE TABLE xl_users (id serial PRIMARY KEY, email text, name text,
    created timestamptz DEFAULT now());
CREATE TABLE xl_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id int,
    amount numeric, note text);
"""
NEW_SCHEMA = """
CREATE TABLE xl_users (id serial PRIMARY KEY, email_address text, full_name text,
    created timestamptz DEFAULT now());
CREATE TABLE xl_orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id int,
    amount numeric, note text);
"""
COLUMNS = [{"old": "email", "new": "email_address", "up": "lower(email)",
            "down": "email_address"},
           {"old": "name", "new": "full_name"}]

# The same rows read on each side under the mapping: old's names on old, new's on new.
OLD_USERS = "SELECT id, email, name, created FROM xl_users ORDER BY id"
OLD_USERS_UP = "SELECT id, lower(email), name, created FROM xl_users ORDER BY id"
NEW_USERS = "SELECT id, email_address, full_name, created FROM xl_users ORDER BY id"
ORDERS = "SELECT id, user_id, amount, note FROM xl_orders ORDER BY id"
SEQS = ("SELECT sequencename, last_value FROM pg_sequences WHERE sequencename IN "
        "('xl_users_id_seq', 'xl_orders_id_seq') ORDER BY 1")


class Pair:
    """A pair of fresh databases (old, new) with the two schemas, and a proxy serving them
    as database `name` with the translating rule."""

    def __init__(self, name, commit):
        self.name = name
        self.old_db = "%s_old_%d" % (name, PID)
        self.new_db = "%s_new_%d" % (name, PID)
        pdtest.fresh_databases(self.old_db, self.new_db)
        direct_query(OLD_SCHEMA, dbname=self.old_db)
        direct_query(NEW_SCHEMA, dbname=self.new_db)
        self.dir = pdtest.tmpdir("pdtest-xlate-")
        self.sock = os.path.join(self.dir, "admin.sock")
        self.state = os.path.join(self.dir, "state.json")
        dbs = [{"name": name, "old": pg_conninfo(self.old_db, user="postgres"),
                "new": pg_conninfo(self.new_db, user="postgres")}]
        rule = {"name": RULE, "database": name, "kind": "tables", "columns": COLUMNS,
                "writes": "dual", "reads": "old",
                "mirror": {"commit": commit, "on_failure": "record"}}
        self.proxy = Proxy(databases=dbs, admin={"socket": self.sock}, state=self.state,
                           rules=[rule], env={"PGUSER": "postgres"}, stop_timeout=30,
                           divergence={"log": os.path.join(self.dir, "div.jsonl")}).start()

    def old(self, sql, args=()):
        return direct_query(sql, args, dbname=self.old_db)

    def new(self, sql, args=()):
        return direct_query(sql, args, dbname=self.new_db)

    def connect(self):
        conn = pdtest.connect(self.proxy.port, dbname=self.name)
        conn.autocommit = True
        return conn

    def divergence(self):
        try:
            with open(os.path.join(self.dir, "div.jsonl")) as f:
                return [line for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def close(self):
        pdtest.stop_and_drop(self.proxy, self.old_db, self.new_db)


class TranslateBase(pdtest.CtlMixin, unittest.TestCase):
    COMMIT = "async"
    NAME = "xl"

    @classmethod
    def setUpClass(cls):
        cls.pair = Pair(cls.NAME, cls.COMMIT)
        cls.sock, cls.state = cls.pair.sock, cls.pair.state

    @classmethod
    def tearDownClass(cls):
        cls.pair.close()

    def flags(self):
        r = [x for x in self.ctl_json("rules")["rules"] if x["name"] == RULE][0]
        return r["writes"], r["reads"]

    def counters(self):
        return self.ctl_json("status")["rule_counters"][RULE]

    def assert_no_divergence(self):
        st = self.counters()
        self.assertEqual([st[k] for k in ("mirror_diverged", "mirror_unapplied",
                                          "mirror_proxy_errors")], [0, 0, 0],
                         (st, self.pair.divergence()[-5:]))

    def verify_ok(self):
        res = self.ctl_json("verify", RULE)["result"]
        self.assertEqual(res["divergent"], 0, res)
        self.assertTrue(res["ok"], res)
        # No `tables` list: every table of the database is compared.
        self.assertEqual(sorted(t["table"] for t in res["tables"]),
                         ["public.xl_orders", "public.xl_users"], res)
        return res

    def mapped_diff(self, old_users=OLD_USERS):
        """None when old and new hold the same users (old_users on old against new's mapped
        columns) and the same orders; else what differs."""
        p = self.pair
        ou, nu, oo, no = p.old(old_users), p.new(NEW_USERS), p.old(ORDERS), p.new(ORDERS)
        if ou == nu and oo == no:
            return None
        return ("users only on old %r, only on new %r; orders only on old %r, only on new %r"
                % (sorted(set(ou) - set(nu))[:5], sorted(set(nu) - set(ou))[:5],
                   sorted(set(oo) - set(no))[:5], sorted(set(no) - set(oo))[:5]))

    def wait_mapped(self, what, old_users=OLD_USERS, timeout=20):
        """Waits until mapped_diff() finds nothing."""
        try:
            pdtest.wait_for(lambda: self.mapped_diff(old_users) is None, timeout,
                            interval=0.1, what=what)
        except AssertionError:
            raise AssertionError("%s: %s; divergence log %r" % (
                what, self.mapped_diff(old_users), self.pair.divergence()[-3:]))

    def switchover(self):
        """verify, then switchover of the database; returns switchover's reply."""
        pdtest.wait_for(lambda: self.ctl_json("status")["mirrors"]["queued"] == 0, 20,
                        what="the mirrors to catch up")
        self.verify_ok()
        r = self.ctl_json("switchover", self.NAME)
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["rules"], [{"rule": RULE, "writes": "dual-new", "reads": "new"}])
        self.assertEqual(self.flags(), ("dual-new", "new"))
        return r


class TranslateTest(TranslateBase):
    """One application session's statements, in order: dual, switchover, translated
    statements, refusals, rollback."""

    early = None  # a session opened at writes=dual (test_1), used after the switchover

    @classmethod
    def tearDownClass(cls):
        if cls.early is not None and not cls.early.closed:
            cls.early.close()
        super().tearDownClass()

    def run1(self, cur, sql, args=None):
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None

    def test_1_dual_then_switchover(self):
        p = self.pair
        # A session opened before the switchover and used after it (test_2).
        TranslateTest.early = p.connect()
        cur = self.early.cursor()
        cur.executemany("INSERT INTO xl_users (email, name) VALUES (%s, %s)",
                        [("dual%d@x.com" % i, "dual %d" % i) for i in range(1, 6)])
        cur.execute("INSERT INTO xl_users (email, name) VALUES ('Mixed@X.com', 'mixed') "
                    "RETURNING id, email")
        mid, memail = cur.fetchone()
        self.assertEqual(memail, "Mixed@X.com")  # old is authoritative: as written
        cur.execute("INSERT INTO xl_orders (user_id, amount, note) VALUES (1, 10, 'a'), "
                    "(2, 20, 'b')")
        # new gets up(email) under its own column names.
        pdtest.wait_for(lambda: p.new("SELECT email_address, full_name FROM xl_users WHERE "
                                      "id = %s", (mid,)) == [("mixed@x.com", "mixed")], 10,
                        what="the insert mirrored through up")
        # Lower-cased on old too, so that old = down(new) exactly from here on.
        cur.execute("UPDATE xl_users SET email = lower(email) WHERE id = %s", (mid,))
        self.wait_mapped("the writes at writes=dual mirrored")
        self.assertEqual(len(p.new(NEW_USERS)), 6)
        self.assertEqual(self.flags(), ("dual", "old"))
        self.switchover()
        # New takes over with its sequences at old's: its next keys collide with nothing.
        self.assertEqual(p.new(SEQS), p.old(SEQS))
        self.assertEqual([v for _, v in p.new(SEQS)], [2, 6])
        out = self.ctl("rules").stdout
        self.assertRegex(out, r"%s\s*\|\s*xl\s*\|\s*tables\s*\|\s*dual-new\s*\|\s*new\s" % RULE)
        events = [e["event"] for e in self.state_doc()["history"] if "event" in e]
        self.assertEqual(events[-1], "switchover")

    def test_2_translated_statements(self):
        p = self.pair
        self.assertEqual(self.flags(), ("dual-new", "new"))
        conn = p.connect()
        cur = conn.cursor()
        # INSERT with RETURNING of mapped columns: new's values read back under old's names.
        rows = self.run1(cur, "INSERT INTO xl_users (email, name) VALUES ('A@X.com', 'Ann') "
                              "RETURNING id, email, name")
        self.assertEqual([d.name for d in cur.description], ["id", "email", "name"])
        self.assertEqual(len(rows), 1)
        ann, email, name = rows[0]
        self.assertEqual((email, name), ("a@x.com", "Ann"))
        self.assertEqual(p.new("SELECT email_address, full_name FROM xl_users WHERE id = %s",
                               (ann,)), [("a@x.com", "Ann")])
        # Parameters (psycopg2 inlines them as literals).
        rows = self.run1(cur, "INSERT INTO xl_users (email, name) VALUES (%s, %s) "
                              "RETURNING email", ("Bee@X.com", "Bee"))
        self.assertEqual(rows, [("bee@x.com",)])
        # SELECT *: old's columns, in old's order, under old's names.
        rows = self.run1(cur, "SELECT * FROM xl_users ORDER BY id")
        self.assertEqual([d.name for d in cur.description], ["id", "email", "name", "created"])
        self.assertEqual(len(rows), 8)
        self.assertEqual(rows[-2][:3], (ann, "a@x.com", "Ann"))
        self.assertEqual(rows[-1][1:3], ("bee@x.com", "Bee"))
        # UPDATE of a mapped column, WHERE on a renamed one; then found by the new value.
        cur.execute("UPDATE xl_users SET email = 'B@Y.com' WHERE name = 'Ann'")
        self.assertEqual(cur.rowcount, 1)
        self.assertEqual(self.run1(cur, "SELECT id, email, name FROM xl_users WHERE email = "
                                        "%s", ("b@y.com",)), [(ann, "b@y.com", "Ann")])
        # Upsert: the conflict's EXCLUDED.email becomes EXCLUDED.email_address.
        cur.execute("INSERT INTO xl_users (id, email, name) VALUES (%s, 'Up@Sert.com', 'x') "
                    "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email", (ann,))
        self.assertEqual(cur.rowcount, 1)
        self.assertEqual(self.run1(cur, "SELECT email, name FROM xl_users WHERE id = %s",
                                   (ann,)), [("up@sert.com", "Ann")])
        cur.execute("INSERT INTO xl_users (id, email, name) VALUES (%s, 'No@Op', 'x') "
                    "ON CONFLICT (id) DO NOTHING", (ann,))
        self.assertEqual(cur.rowcount, 0)
        # A named prepared read (SQL PREPARE/EXECUTE): translated at PREPARE.
        # (the upsert above set Ann's email to up@sert.com)
        cur.execute("PREPARE xl_sel (text) AS SELECT id, email, name FROM xl_users "
                    "WHERE email = $1")
        self.assertEqual(self.run1(cur, "EXECUTE xl_sel ('up@sert.com')"),
                         [(ann, "up@sert.com", "Ann")])
        self.assertEqual([d.name for d in cur.description], ["id", "email", "name"])
        cur.execute("DEALLOCATE xl_sel")
        # The extended protocol (how drivers prepare writes): a named statement parsed
        # once, bound twice.
        with RawClient(p.proxy.port) as c:
            c.startup("postgres", self.NAME)
            c.send(parse_msg("ins", "INSERT INTO xl_users (email, name) VALUES ($1, $2) "
                                    "RETURNING email, name") + sync_msg())
            self.assertEqual(read_batch(c), [])
            for i in range(2):
                c.send(bind_msg_params(["Ext%d@X.com" % i, "ext"], stmt="ins") + execute_msg()
                       + sync_msg())
                self.assertEqual(read_batch(c), [["ext%d@x.com" % i, "ext"]])
            c.send(parse_msg("", "SELECT count(*) FROM xl_users WHERE email LIKE $1")
                   + bind_msg_params(["ext%"]) + execute_msg() + sync_msg())
            self.assertEqual(read_batch(c), [["2"]])
        # DELETE by a mapped column.
        cur.execute("DELETE FROM xl_users WHERE email = %s", ("bee@x.com",))
        self.assertEqual(cur.rowcount, 1)
        # The table without mapped columns: identity keys from new.
        oids = [self.run1(cur, "INSERT INTO xl_orders (user_id, amount, note) VALUES "
                               "(%s, %s, 'after') RETURNING id", (ann, i))[0][0]
                for i in range(3)]
        self.assertEqual(len(set(oids)), 3)
        cur.execute("UPDATE xl_orders SET amount = amount + 100 WHERE id = %s", (oids[0],))
        cur.execute("DELETE FROM xl_orders WHERE id = %s", (oids[1],))
        # A transaction committed and one rolled back.
        cur.execute("BEGIN")
        cur.execute("INSERT INTO xl_users (email, name) VALUES ('Tx@X.com', 'tx')")
        cur.execute("UPDATE xl_users SET name = 'tx2' WHERE email = 'tx@x.com'")
        cur.execute("COMMIT")
        cur.execute("BEGIN")
        cur.execute("INSERT INTO xl_users (email, name) VALUES ('Gone@X.com', 'gone')")
        cur.execute("ROLLBACK")
        self.assertEqual(self.run1(cur, "SELECT name FROM xl_users WHERE email LIKE 't%' OR "
                                        "email LIKE 'g%'"), [("tx2",)])
        # COPY TO: old's columns.
        buf = io.StringIO()
        cur.copy_expert("COPY xl_users TO STDOUT", buf)
        first = buf.getvalue().splitlines()[0].split("\t")
        self.assertEqual(first[:3], ["1", "dual1@x.com", "dual 1"])
        self.assertEqual(len(first), 4)
        # The session opened at writes=dual is translated too.
        ecur = self.early.cursor()
        self.assertEqual(self.run1(ecur, "INSERT INTO xl_users (email, name) VALUES "
                                         "('Early@X.com', 'early') RETURNING email"),
                         [("early@x.com",)])
        conn.close()
        self.assertEqual(p.new("SELECT count(*) FROM xl_users WHERE email_address = "
                               "'early@x.com'"), [(1,)])
        # Old follows new under the mapping (down), rows and identity keys alike.
        self.wait_mapped("old to follow new through down")
        self.assertEqual(p.old("SELECT email, name FROM xl_users WHERE id = %s", (ann,)),
                         [("up@sert.com", "Ann")])
        self.assert_no_divergence()
        self.assertGreater(self.counters()["mirrored"], 10)
        self.verify_ok()
        # old's sequences follow new's (rows reach old with their keys).
        pdtest.wait_for(lambda: p.old(SEQS) == p.new(SEQS), 10,
                        what="old's sequences at new's values (%r on new)" % (p.new(SEQS),))

    def test_2_whole_row_reference(self):
        """A whole-row reference reads old's columns too (or is refused): the application
        must not see new's column names."""
        conn = self.pair.connect()
        cur = conn.cursor()
        try:
            cur.execute("SELECT row_to_json(u) FROM xl_users u WHERE id = 1")
            keys = sorted(cur.fetchone()[0])
            self.assertEqual(keys, ["created", "email", "id", "name"])
        except psycopg2.Error as e:
            self.assertEqual(e.pgcode, "0A000", e.pgerror)
            self.assertIn(RULE, e.pgerror)
        conn.close()

    def test_3_refusals(self):
        p = self.pair
        conn = p.connect()
        cur = conn.cursor()
        refused = [
            # COPY into a mapped column, or into all columns (old's list).
            ("COPY xl_users (email, name) FROM STDIN", "x@y\tn\n"),
            ("COPY xl_users FROM STDIN", "900\tx@y\tn\t2026-01-01\n"),
            # EXCLUDED of a mapped column other than SET col = EXCLUDED.col.
            ("INSERT INTO xl_users (id, email, name) VALUES (1, 'Q@Q', 'q') "
             "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.email", None),
            ("INSERT INTO xl_users (id, email, name) VALUES (1, 'Q@Q', 'q') "
             "ON CONFLICT (id) DO UPDATE SET email = lower(EXCLUDED.email)", None),
            # SQL PREPARE of a write: its EXECUTE would name no table for the mirror.
            ("PREPARE xl_ins (text) AS INSERT INTO xl_users (email, name) VALUES ($1, 'p')",
             None),
            # A conflict target on a transformed column.
            ("INSERT INTO xl_users (id, email, name) VALUES (1, 'Q@Q', 'q') "
             "ON CONFLICT (email) DO NOTHING", None),
        ]
        before_old, before_new = p.old(OLD_USERS), p.new(NEW_USERS)
        for sql, data in refused:
            with self.subTest(sql=sql):
                with self.assertRaises(psycopg2.Error) as cm:
                    if data is None:
                        cur.execute(sql)
                    else:
                        cur.copy_expert(sql, io.StringIO(data))
                self.assertEqual(cm.exception.pgcode, "0A000", cm.exception.pgerror)
                self.assertIn(RULE, cm.exception.pgerror)
                # The session carries on.
                cur.execute("SELECT email FROM xl_users WHERE id = 1")
                self.assertEqual(cur.fetchall(), [("dual1@x.com",)])
        # Also inside a transaction: the transaction is aborted, the session is not.
        cur.execute("BEGIN")
        with self.assertRaises(psycopg2.Error) as cm:
            cur.execute(refused[2][0])
        self.assertEqual(cm.exception.pgcode, "0A000")
        cur.execute("ROLLBACK")
        cur.execute("SELECT count(*) FROM xl_users")
        self.assertEqual(cur.fetchone()[0], len(before_new))
        conn.close()
        self.assertEqual((p.old(OLD_USERS), p.new(NEW_USERS)), (before_old, before_new))
        self.assert_no_divergence()

    def test_4_rollback(self):
        p = self.pair
        conn = p.connect()  # opened at dual-new, used across the rollback
        cur = conn.cursor()
        cur.execute("INSERT INTO xl_users (email, name) VALUES ('Pre@X.com', 'pre')")
        pdtest.wait_for(lambda: self.ctl_json("status")["mirrors"]["queued"] == 0, 20,
                        what="the mirrors to catch up")
        r = self.ctl_json("rollback", self.NAME)
        self.assertTrue(r["ok"], r)
        self.assertEqual(self.flags(), ("dual", "old"))
        # Old is authoritative again: the client gets back what it wrote, new gets up().
        fresh = p.connect()
        for c in (cur, fresh.cursor()):
            c.execute("INSERT INTO xl_users (email, name) VALUES ('Back@X.com', 'back') "
                      "RETURNING id, email, name")
            bid, bemail, bname = c.fetchone()
            self.assertEqual((bemail, bname), ("Back@X.com", "back"))
            c.execute("UPDATE xl_users SET email = 'Again@X.com' WHERE id = %s", (bid,))
            c.execute("INSERT INTO xl_orders (user_id, amount) VALUES (%s, 1)", (bid,))
        fresh.close()
        self.assertEqual(p.old("SELECT count(*) FROM xl_users WHERE email = 'Again@X.com'"),
                         [(2,)])
        self.wait_mapped("new to follow old through up", old_users=OLD_USERS_UP)
        self.assertEqual(p.new("SELECT count(*) FROM xl_users WHERE email_address = "
                               "'again@x.com'"), [(2,)])
        cur.execute("SELECT * FROM xl_users WHERE email = 'Again@X.com'")
        self.assertEqual([d.name for d in cur.description], ["id", "email", "name", "created"])
        self.assertEqual(len(cur.fetchall()), 2)
        conn.close()
        self.assert_no_divergence()
        self.verify_ok()


class TranslateLoadTest(TranslateBase):
    """8 clients × 150 operations under writes=dual-new: inserts, updates of hot rows,
    deletes, transactions committed and rolled back; zero client errors, and old holds
    new's rows under the mapping afterwards."""

    NAME = "xlc"
    HOT = 10

    # A pair of databases per test: one test's divergence does not spill into the next.
    @classmethod
    def setUpClass(cls):
        pass

    @classmethod
    def tearDownClass(cls):
        pass

    def setUp(self):
        self.pair = Pair(self.NAME, self.COMMIT)
        self.sock, self.state = self.pair.sock, self.pair.state
        self.addCleanup(self.pair.close)

    def test_concurrent_clients(self):
        p = self.pair
        direct_query("INSERT INTO xl_users (email, name) SELECT 'hot' || g || '@x.com', "
                     "'hot ' || g FROM generate_series(1, %d) g" % self.HOT, dbname=p.old_db)
        direct_query("INSERT INTO xl_users (email_address, full_name) SELECT 'hot' || g || "
                     "'@x.com', 'hot ' || g FROM generate_series(1, %d) g" % self.HOT,
                     dbname=p.new_db)
        # The rows were copied at different moments: `created` differs; make it equal.
        direct_query("UPDATE xl_users SET created = '2026-01-01'", dbname=p.old_db)
        direct_query("UPDATE xl_users SET created = '2026-01-01'", dbname=p.new_db)
        self.switchover()
        errors, wrong = [], []

        def worker(seed):
            rnd = random.Random(seed)
            try:
                conn = pdtest.connect(p.proxy.port, dbname=self.NAME)
                cur = conn.cursor()
                mine = []
                for k in range(150):
                    op = rnd.random()
                    hot = rnd.randint(1, self.HOT)
                    autocommit = k % 2 == 0
                    conn.autocommit = autocommit
                    if op < 0.3:
                        cur.execute("INSERT INTO xl_users (email, name) VALUES (%s, %s) "
                                    "RETURNING id, email", ("W%d.%d@X.com" % (seed, k), "w"))
                        uid, email = cur.fetchone()
                        if email != "w%d.%d@x.com" % (seed, k):
                            wrong.append(email)
                        mine.append(uid)
                        cur.execute("INSERT INTO xl_orders (user_id, amount, note) VALUES "
                                    "(%s, %s, 'w')", (uid, rnd.randint(1, 99)))
                    elif op < 0.5:  # not commutative: the order of images matters
                        cur.execute("UPDATE xl_users SET email = %s, name = %s WHERE id = %s",
                                    ("Hot%d@X.com" % rnd.randint(1, 1000), "n%d" % seed, hot))
                    elif op < 0.6:
                        cur.execute("UPDATE xl_orders SET amount = amount + 1 WHERE id = "
                                    "(SELECT max(id) FROM xl_orders)")
                    elif op < 0.7 and mine:
                        cur.execute("DELETE FROM xl_users WHERE id = %s", (mine.pop(0),))
                    elif op < 0.8:
                        cur.execute("SELECT email FROM xl_users WHERE id = %s", (hot,))
                        email = cur.fetchone()[0]
                        if email != email.lower():
                            wrong.append(email)
                    elif op < 0.9:
                        cur.execute("INSERT INTO xl_users (id, email, name) VALUES (%s, %s, "
                                    "'u') ON CONFLICT (id) DO UPDATE SET email = "
                                    "EXCLUDED.email", (hot, "Ups%d@X.com" % seed))
                    else:  # a transaction rolled back
                        conn.autocommit = False
                        cur.execute("INSERT INTO xl_users (email, name) VALUES ('R@X', 'r')")
                        cur.execute("UPDATE xl_users SET name = 'rolled' WHERE id = %s", (hot,))
                        conn.rollback()
                        continue
                    if not autocommit:
                        conn.commit()
                conn.close()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        self.assertEqual(errors, [])
        self.assertEqual(wrong, [])
        self.assertEqual(p.new("SELECT count(*) FROM xl_users WHERE full_name = 'rolled'"),
                         [(0,)])
        if self.COMMIT == "lockstep":
            # The client heard each answer after old had applied it.
            self.assertIsNone(self.mapped_diff())
        self.wait_mapped("old to hold new's rows after the load")
        self.assertGreater(len(p.new(ORDERS)), 100)
        self.assert_no_divergence()
        self.verify_ok()
        print("\n%s: 8 clients x 150 operations in %.1f s" % (self.COMMIT, elapsed))

    def test_update_of_the_newest_row(self):
        """8 autocommit clients insert orders and increment the newest one: each UPDATE's
        image must reach old after the INSERT (or UPDATE) it follows on new."""
        p = self.pair
        self.switchover()
        before = len(p.new(ORDERS))

        def worker(seed):
            rnd = random.Random(seed)
            conn = pdtest.connect(p.proxy.port, dbname=self.NAME)
            conn.autocommit = True
            cur = conn.cursor()
            for _ in range(200):
                if rnd.random() < 0.3:
                    cur.execute("INSERT INTO xl_orders (user_id, amount) VALUES (0, 0)")
                else:
                    cur.execute("UPDATE xl_orders SET amount = amount + 1 WHERE id = "
                                "(SELECT max(id) FROM xl_orders)")
            conn.close()

        self.assertEqual(pdtest.run_clients(worker, 8, 120), [])
        self.assertGreater(len(p.new(ORDERS)), before + 300)
        if self.COMMIT == "lockstep":
            self.assertIsNone(self.mapped_diff())
        self.wait_mapped("old to hold new's orders after inserts and updates of the newest")
        self.assert_no_divergence()


class TranslateLoadLockstepTest(TranslateLoadTest):
    COMMIT = "lockstep"
    NAME = "xll"


if __name__ == "__main__":
    pdtest.main()
