#!/usr/bin/python3
"""Many instances, one truth (issue 6): three pgdual instances sharing `state: postgres`.
The control schema is created and versioned; a flag flipped through one instance is in
force on all three within a second; a switchover through one instance under load on all
three pauses and flips every instance, with zero client errors, and a rollback through
another brings them all back; an instance killed mid-switchover makes it abort cleanly,
with traffic staying on old; and an instance that loses the control database keeps its
flags and refuses to change them (fail closed) until it is back."""

import os
import signal
import subprocess
import threading
import time
import unittest

import pdtest
from pdtest import Proxy, direct_query, pg_conninfo

PID = os.getpid()
OLD = "fl_old_%d" % PID
NEW = "fl_new_%d" % PID
CTL = "fl_ctl_%d" % PID
DB = "shop"
RULE = "shop-to-green"
ACCOUNTS = 40

SCHEMA = """
CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL
    DEFAULT 0);
INSERT INTO accounts (owner) SELECT 'owner ' || g FROM generate_series(1, %d) g;
""" % ACCOUNTS


def old(sql, args=()):
    return direct_query(sql, args, dbname=OLD)


def new(sql, args=()):
    return direct_query(sql, args, dbname=NEW)


def accounts_md5(run):
    return run("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) "
               "FROM accounts t")[0]


class Load:
    """n clients per port writing and reading through pgdual, each in one session for the
    whole run; counts operations and errors. hot_rows: every client only decrements one of
    that many rows, in autocommit."""

    def __init__(self, ports, n, hot_rows=0):
        self.hot_rows = hot_rows
        self.stop = threading.Event()
        self.errors, self.ops = [], 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(p, i), daemon=True)
                        for p in ports for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def run(self, port, i):
        try:
            conn = pdtest.connect(port, dbname=DB)
        except Exception as e:  # noqa: BLE001 - reported by the test
            with self.lock:
                self.errors.append("connect: %r" % e)
            return
        conn.autocommit = True
        cur = conn.cursor()
        k = 0
        while not self.stop.is_set():
            k += 1
            try:
                if self.hot_rows:  # autocommit, through every instance at once
                    cur.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s",
                                ((i + k) % self.hot_rows + 1,))
                elif k % 3 == 0:
                    cur.execute("BEGIN")
                    cur.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s",
                                ((i * 7 + k) % ACCOUNTS + 1,))
                    cur.execute("INSERT INTO accounts (owner) VALUES (%s)", ("p%d" % port,))
                    cur.execute("COMMIT")
                elif k % 3 == 1:  # hot rows, written through every instance at once
                    cur.execute("BEGIN")
                    cur.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s",
                                (k % 5 + 1,))
                    cur.execute("COMMIT")
                else:
                    cur.execute("SELECT sum(balance), count(*) FROM accounts")
                    cur.fetchall()
            except Exception as e:  # noqa: BLE001 - reported by the test
                with self.lock:
                    self.errors.append(repr(e))
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: BLE001
                    pass
            with self.lock:
                self.ops += 1
            time.sleep(0 if self.hot_rows else 0.005)
        conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)


class Instance(pdtest.CtlMixin):
    """pgdualctl bound to one instance's admin socket."""

    def __init__(self, test, proxy, sock):
        self.test, self.proxy, self.sock = test, proxy, sock

    def assertEqual(self, first, second, msg=None):  # what CtlMixin.ctl_json asserts with
        if first != second:
            raise AssertionError(msg or "%r != %r" % (first, second))

    def flags(self):
        r = self.ctl_json("rules")["rules"][0]
        return r["writes"], r["reads"]

    def state(self):
        return self.ctl_json("status")["state"]


def start_instance(name, state, directory):
    sock = os.path.join(directory, "%s.sock" % name)
    dbs = [{"name": DB, "old": pg_conninfo(OLD, user="postgres"),
            "new": pg_conninfo(NEW, user="postgres")}]
    # lockstep: rows written through different instances at once are ordered on the
    # mirror by the authoritative side's row locks (the mirror commits first; autocommit
    # batches are wrapped in a transaction of pgdual's own). async orders them within one
    # instance only.
    rule = {"name": RULE, "database": DB, "kind": "tables", "writes": "dual", "reads": "old",
            "mirror": {"commit": "lockstep", "on_failure": "record"}}
    proxy = Proxy(databases=dbs, admin={"socket": sock}, state=state, rules=[rule],
                  divergence={"log": os.path.join(directory, "%s-div.jsonl" % name)},
                  stop_timeout=30).start()
    return proxy, sock


class FleetTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        pdtest.fresh_databases(OLD, NEW)
        for db in (OLD, NEW):
            direct_query(SCHEMA, dbname=db)
        cls.dir = pdtest.tmpdir("pdtest-fleet-")
        cls.proxies = []
        cls.members = []
        for name in ("a", "b", "c"):
            proxy, sock = start_instance(name, "postgres", cls.dir)
            cls.proxies.append(proxy)
            cls.members.append(Instance(cls, proxy, sock))
        cls.a, cls.b, cls.c = cls.members

    @classmethod
    def tearDownClass(cls):
        try:
            for p in cls.proxies:
                if p.proc is not None:
                    p.stop()
        finally:
            for db in (OLD, NEW):
                direct_query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % db)

    def live(self):
        return [m for m in self.members if m.proxy.proc is not None]

    def wait_fleet(self, n):
        pdtest.wait_for(lambda: len([i for i in self.a.ctl_json("fleet")["instances"]
                                     if i["live"]]) == n, 10, interval=0.1,
                        what="%d live instances" % n)

    def assert_identical(self):
        try:
            pdtest.wait_for(lambda: accounts_md5(old) == accounts_md5(new), 20, interval=0.2,
                            what="old and new identical")
        except AssertionError:
            rows = lambda run: set(run("SELECT id, owner, balance::text FROM accounts"))
            o, n = rows(old), rows(new)
            raise AssertionError("old and new differ: only on old %r; only on new %r; "
                                 "divergence seen by the instances: %r"
                                 % (sorted(o - n)[:10], sorted(n - o)[:10],
                                    [m.ctl_json("divergence") for m in self.members]))

    # -----------------------------------------------------------------------------------

    def test_0_autocommit_hot_rows_through_every_instance(self):
        # Autocommit writes of the same rows through all three instances at once: under
        # lockstep each is wrapped in a transaction of pgdual's own on old, committed
        # there only after new applied it, so new applies them in old's order.
        self.wait_fleet(3)
        load = Load([p.port for p in self.proxies], 12, hot_rows=2).start()
        try:
            time.sleep(5.0)
        finally:
            load.finish()
        self.assertEqual(load.errors, [])
        self.assertGreater(load.ops, 100)
        self.assert_identical()

    def test_0a_autocommit_hot_rows_prepared(self):
        # The same with the extended protocol (pgbench -M prepared: Bind, Execute, Sync).
        self.wait_fleet(3)
        script = os.path.join(self.dir, "hot.sql")
        with open(script, "w") as f:
            f.write("\\set id random(1, 2)\n"
                    "UPDATE accounts SET balance = balance - 1 WHERE id = :id;\n")
        runs = [subprocess.Popen(pdtest.pgbench_argv(p.port, DB, "postgres", "-n", "-M",
                                                     "prepared", "-c", "16", "-T", "5",
                                                     "-f", script),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=dict(os.environ, PGCONNECT_TIMEOUT="10"))
                for p in self.proxies]
        for r in runs:
            out = r.communicate(timeout=60)[0]
            self.assertEqual(r.returncode, 0, out)
            self.assertNotIn("error", out.lower(), out)
        self.assert_identical()

    def test_0b_wrapped_autocommit_errors(self):
        # A statement that fails inside pgdual's wrap: the client sees its error and an idle
        # session, and new applies nothing.
        conn = pdtest.connect(self.a.proxy.port, dbname=DB)
        conn.autocommit = True
        cur = conn.cursor()
        before = accounts_md5(new)
        with self.assertRaises(Exception) as cm:
            cur.execute("UPDATE accounts SET balance = balance / 0 WHERE id = 7")
        self.assertEqual(cm.exception.pgcode, "22012")
        self.assertEqual(conn.info.transaction_status, 0)  # idle
        cur.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 7")
        self.assertEqual(cur.rowcount, 1)
        self.assertEqual(conn.info.transaction_status, 0)
        self.assert_identical()
        self.assertNotEqual(accounts_md5(new), before)
        # pgdual's COMMIT fails on old (a deferred check there only) after new committed:
        # the client gets that error before its idle ReadyForQuery, and it is recorded.
        old("""CREATE FUNCTION no_big() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.balance > 1000000 THEN RAISE EXCEPTION 'too big'; END IF;
               RETURN NEW; END $$;
               CREATE CONSTRAINT TRIGGER no_big AFTER UPDATE ON accounts
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_big()""")
        try:
            with self.assertRaises(Exception) as cm:
                cur.execute("UPDATE accounts SET balance = 2000000 WHERE id = 8")
            self.assertIn("too big", str(cm.exception))
            self.assertEqual(conn.info.transaction_status, 0)
            cur.execute("SELECT balance FROM accounts WHERE id = 8")
            self.assertNotEqual(float(cur.fetchone()[0]), 2000000)
            pdtest.wait_for(lambda: any(c["mirror_diverged"] > 0 for c in
                                        self.a.ctl_json("divergence")["counters"]), 10,
                            interval=0.1, what="the failed COMMIT recorded")
        finally:
            old("DROP TRIGGER no_big ON accounts; DROP FUNCTION no_big()")
            conn.close()
        # The client leaves while pgdual's transaction waits for new (a lock held on new
        # behind pgdual's back): its write still commits on both once new applied it.
        import psycopg2
        locker = psycopg2.connect(pg_conninfo(NEW, user="postgres"))
        try:
            locker.cursor().execute("SELECT 1 FROM accounts WHERE id = 9 FOR UPDATE")
            c = pdtest.RawClient(self.a.proxy.port)
            c.startup("postgres", DB)
            c.send(pdtest.query_msg("UPDATE accounts SET balance = 99 WHERE id = 9"))
            pdtest.wait_for(lambda: direct_query(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type "
                "= 'Lock'", (NEW,))[0][0] > 0, 10, interval=0.05, what="new waits on the lock")
            c.close()
            time.sleep(0.2)
        finally:
            locker.rollback()
            locker.close()
        pdtest.wait_for(lambda: old("SELECT balance FROM accounts WHERE id = 9")[0][0] == 99,
                        10, interval=0.1, what="old committed it")
        self.assertEqual(new("SELECT balance FROM accounts WHERE id = 9")[0][0], 99)
        time.sleep(1.1)  # the verify must be later than the divergence (seconds)
        self.assertTrue(self.a.ctl_json("verify", RULE, "--repair")["result"]["ok"])
        self.assert_identical()

    def test_1_schema_and_fleet(self):
        rows = old("SELECT version, description FROM pgdual.migrations ORDER BY version")
        self.assertEqual([r[0] for r in rows], [1], rows)
        self.assertEqual(old("SELECT count(*) FROM pgdual.state")[0][0], 1)
        self.wait_fleet(3)
        fleet = self.a.ctl_json("fleet")
        self.assertEqual(len(fleet["instances"]), 3, fleet)
        self.assertEqual(sum(1 for i in fleet["instances"] if i["this"]), 1)
        ports = sorted(int(i["listen"].rsplit(":", 1)[1]) for i in fleet["instances"])
        self.assertEqual(ports, sorted(p.port for p in self.proxies))
        for m in self.members:
            st = m.state()
            self.assertEqual(st["backend"], "postgres")
            self.assertTrue(st["connected"], st)
            self.assertEqual(st["schema_version"], 1)
        # The people's form lists them as a table.
        r = self.a.ctl("fleet")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("instances:", r.stdout)
        self.assertIn("(3 rows)", r.stdout)
        # A bad argument is an error reply; the connection is not the problem.
        r = self.a.ctl_json("fleet", "sideways", expect_rc=1)
        self.assertIn("usage: fleet [forget INSTANCE]", r["error"])

    def test_2_flag_reaches_every_instance_within_a_second(self):
        for m in self.members:
            self.assertEqual(m.flags(), ("dual", "old"))
        version = self.a.state()["version"]
        self.b.ctl_json("flag", RULE, "reads=shadow")
        t0 = time.monotonic()
        for m in (self.a, self.c):
            pdtest.wait_for(lambda m=m: m.flags() == ("dual", "shadow"), 1.0, interval=0.02,
                            what="the flag on every instance within 1 s")
        took = time.monotonic() - t0
        self.assertLess(took, 1.0)
        for m in self.members:
            self.assertEqual(m.state()["version"], version + 1)
        # The change and who made it are in the shared history.
        doc = old("SELECT doc FROM pgdual.state")[0][0]
        self.assertEqual(doc["flags"][RULE]["reads"], "shadow")
        self.assertEqual(doc["history"][-1]["rule"], RULE)
        self.b.ctl_json("flag", RULE, "reads=old")
        for m in self.members:
            pdtest.wait_for(lambda m=m: m.flags() == ("dual", "old"), 1.0, interval=0.02,
                            what="reads=old everywhere")

    def test_3_switchover_and_rollback_under_load_on_all_three(self):
        self.wait_fleet(3)
        load = Load([p.port for p in self.proxies], 3).start()
        try:
            time.sleep(1.0)
            res = self.a.ctl_json("verify", RULE)["result"]
            self.assertTrue(res["ok"], res)
            sw = self.a.ctl_json("switchover", DB, "--timeout", "10000")
            self.assertEqual(sorted(sw["instances"]), sorted(
                i["instance"] for i in self.a.ctl_json("fleet")["instances"]))
            self.assertEqual(len(sw["instances"]), 3)
            self.assertIn("confirmed_ms", sw)  # every instance said it flipped
            for m in self.members:
                self.assertEqual(m.flags(), ("dual-new", "new"))
            time.sleep(1.0)
            # The way back, coordinated by another instance.
            rb = self.b.ctl_json("rollback", DB, "--timeout", "10000")
            self.assertEqual(len(rb["instances"]), 3)
            for m in self.members:
                self.assertEqual(m.flags(), ("dual", "old"))
            time.sleep(1.0)
        finally:
            load.finish()
        self.assertEqual(load.errors, [])
        self.assertGreater(load.ops, 100)
        self.assert_identical()
        ops = old("SELECT operation, phase, cardinality(participants) FROM pgdual.operations "
                  "ORDER BY id")
        self.assertEqual(ops[-2:], [("switchover", "flip", 3), ("rollback", "flip", 3)])
        events = [h.get("event") for h in old("SELECT doc FROM pgdual.state")[0][0]["history"]]
        self.assertIn("switchover", events)
        self.assertIn("rollback", events)

    def test_4_instance_killed_mid_switchover_aborts_it(self):
        self.wait_fleet(3)
        res = self.a.ctl_json("verify", RULE)["result"]
        self.assertTrue(res["ok"], res)
        c_id = [i["instance"] for i in self.c.ctl_json("fleet")["instances"] if i["this"]][0]
        # A transaction open through c: c cannot drain, so the switchover waits for it.
        held = pdtest.connect(self.c.proxy.port, dbname=DB)
        held.cursor().execute("UPDATE accounts SET balance = balance WHERE id = 1")
        out = {}

        def run():
            out["r"] = self.a.ctl_json("switchover", DB, "--timeout", "4000", expect_rc=None)

        t = threading.Thread(target=run)
        t.start()
        # c has the operation (paused here); then it dies.
        pdtest.wait_for(lambda: "paused here" in self.c.proxy.log(), 5, what="c paused")
        os.kill(self.c.proxy.pid, signal.SIGKILL)
        self.c.proxy.wait_exit(10)
        held.close()
        t.join(30)
        r = out["r"]
        self.assertFalse(r["ok"], r)
        self.assertIn("across the fleet abandoned: not every instance paused", r["error"])
        self.assertIn(c_id, r["error"])
        self.assertIn("traffic resumes on old, unchanged", r["error"])
        for m in (self.a, self.b):
            self.assertEqual(m.flags(), ("dual", "old"))
            conn = pdtest.connect(m.proxy.port, dbname=DB)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
            conn.close()
        self.assertEqual(old("SELECT phase FROM pgdual.operations ORDER BY id DESC LIMIT 1"),
                         [("abort",)])
        # c is stale now: a switchover is refused until it is back or forgotten.
        pdtest.wait_for(lambda: any(not i["live"] for i in self.a.ctl_json("fleet")["instances"]),
                        10, interval=0.2, what="c stale")
        dry = self.a.ctl_json("switchover", DB, "--dry-run")
        fleet = [ch for ch in dry["checks"] if ch["check"] == "fleet"][0]
        self.assertFalse(fleet["ok"])
        self.assertEqual(fleet["value"]["stale"], [c_id])
        self.assertIn("pgdualctl fleet forget", fleet["hint"])
        self.a.ctl_json("fleet", "forget", c_id)
        self.assertEqual(len(self.a.ctl_json("fleet")["instances"]), 2)
        r = self.a.ctl_json("fleet", "forget", "nobody:1", expect_rc=1)
        self.assertIn("no such instance", r["error"])


    def test_5_coordinator_killed_mid_switchover(self):
        # A fourth instance coordinates, and dies while the others are paused: they find
        # the operation past its deadline, abort it themselves and resume on old.
        d_proxy, d_sock = start_instance("d", "postgres", self.dir)
        self.proxies.append(d_proxy)
        d = Instance(self, d_proxy, d_sock)
        self.wait_fleet(3)  # a, b, d
        res = d.ctl_json("verify", RULE)["result"]
        self.assertTrue(res["ok"], res)
        held = pdtest.connect(self.b.proxy.port, dbname=DB)  # b cannot drain: d waits
        held.cursor().execute("UPDATE accounts SET balance = balance WHERE id = 1")
        log_mark = len(self.a.proxy.log())
        ctl = d.ctl("switchover", DB, "--timeout", "3000")  # noqa: F841 - see below
        self.assertNotEqual(ctl.returncode, 0)  # b never answered: d gave up and aborted
        # Again, and this time d dies while a is paused.
        t = threading.Thread(target=lambda: d.ctl("switchover", DB, "--timeout", "3000"))
        t.start()
        pdtest.wait_for(lambda: self.a.proxy.log().count("paused here", log_mark) >= 2, 5,
                        interval=0.05, what="a paused for the second operation")
        os.kill(d_proxy.pid, signal.SIGKILL)
        d_proxy.wait_exit(10)
        t.join(30)
        held.rollback()
        held.close()
        t0 = time.monotonic()
        conn = pdtest.connect(self.a.proxy.port, dbname=DB)
        conn.autocommit = True
        conn.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
        waited = time.monotonic() - t0
        conn.close()
        self.assertLess(waited, 10)  # deadline (3 s) + 2 s grace, then resumed
        pdtest.wait_for(lambda: "aborted (nobody completed it before its deadline)"
                        in self.a.proxy.log()[log_mark:], 10, interval=0.1,
                        what="a logs the abort")
        for m in (self.a, self.b):
            self.assertEqual(m.flags(), ("dual", "old"))
        self.assertEqual(old("SELECT phase, reason FROM pgdual.operations ORDER BY id DESC "
                             "LIMIT 1"), [("abort", "nobody completed it before its deadline")])
        d_id = [i["instance"] for i in self.a.ctl_json("fleet")["instances"]
                if i["listen"].endswith(":%d" % d_proxy.port)][0]
        self.a.ctl_json("fleet", "forget", d_id)


    def test_6_watch_rolls_the_fleet_back(self):
        # switchover --watch through a: a divergence a sees rolls every instance back.
        self.wait_fleet(2)  # a, b
        self.assertTrue(self.a.ctl_json("verify", RULE)["result"]["ok"])
        r = self.a.ctl_json("switchover", DB, "--watch", "30s", "--max-divergence", "0")
        self.assertEqual(r["watch"]["max_divergence"], 0)
        for m in (self.a, self.b):
            self.assertEqual(m.flags(), ("dual-new", "new"))
        # Behind pgdual's back old gets the row first: the mirrored insert fails there.
        old("INSERT INTO accounts (id, owner) VALUES (100001, 'only on old')")
        conn = pdtest.connect(self.a.proxy.port, dbname=DB)
        conn.autocommit = True
        conn.cursor().execute("INSERT INTO accounts (id, owner) VALUES (100001, 'via a')")
        conn.close()
        for m in (self.a, self.b):
            pdtest.wait_for(lambda m=m: m.flags() == ("dual", "old"), 15, interval=0.1,
                            what="every instance rolled back")
        self.assertIn('database "shop" rolled back automatically to old', self.a.proxy.log())
        pdtest.wait_for(lambda: [h.get("event") for h in old(
            "SELECT doc FROM pgdual.state")[0][0]["history"]][-1] == "auto_rollback", 5,
            interval=0.1, what="auto_rollback in the shared history")
        ops = old("SELECT operation, phase FROM pgdual.operations ORDER BY id DESC LIMIT 2")
        self.assertEqual(ops, [("rollback", "flip"), ("switchover", "flip")])
        self.a.ctl_json("verify", RULE, "--repair")


    def test_7_divergence_seen_by_another_instance_refuses(self):
        # b saw a divergence after the last verify; a, which coordinates, did not: b says
        # no when asked to pause, and the switchover is refused unless --force.
        time.sleep(1.1)  # the verify must be later than earlier divergence (seconds)
        self.assertTrue(self.a.ctl_json("verify", RULE)["result"]["ok"])
        time.sleep(1.1)  # the divergence must be later than the verify (seconds)
        new("INSERT INTO accounts (id, owner) VALUES (100002, 'only on new')")
        conn = pdtest.connect(self.b.proxy.port, dbname=DB)
        conn.autocommit = True
        conn.cursor().execute("INSERT INTO accounts (id, owner) VALUES (100002, 'via b')")
        conn.close()
        b_id = [i["instance"] for i in self.b.ctl_json("fleet")["instances"] if i["this"]][0]
        pdtest.wait_for(lambda: self.b.ctl_json("divergence")["counters"][0]["mirror_diverged"]
                        > 0, 10, interval=0.1, what="b counts the divergence")
        checks = self.a.ctl_json("switchover", DB, "--dry-run")["checks"]
        self.assertTrue(all(c["ok"] for c in checks), checks)  # a knows of nothing
        r = self.a.ctl_json("switchover", DB, expect_rc=1)
        self.assertIn("instance %s: rule \"%s\" saw divergence here since its last verify"
                      % (b_id, RULE), r["error"])
        self.assertIn("--force", r["hint"])
        for m in (self.a, self.b):
            self.assertEqual(m.flags(), ("dual", "old"))
        r = self.a.ctl_json("switchover", DB, "--force")
        for m in (self.a, self.b):
            self.assertEqual(m.flags(), ("dual-new", "new"))
        self.a.ctl_json("rollback", DB)
        self.a.ctl_json("verify", RULE, "--repair")


    def test_8_instance_started_during_a_switchover_holds(self):
        # e starts while a switchover waits for b: e is not waited for, but holds its
        # clients until the flip, then serves them on new.
        time.sleep(1.1)
        self.assertTrue(self.a.ctl_json("verify", RULE)["result"]["ok"])
        held = pdtest.connect(self.b.proxy.port, dbname=DB)
        held.cursor().execute("UPDATE accounts SET balance = balance WHERE id = 1")
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "r", self.a.ctl_json("switchover", DB, "--timeout", "15000", expect_rc=None)))
        t.start()
        pdtest.wait_for(lambda: old("SELECT count(*) FROM pgdual.operations WHERE phase = "
                                    "'pause'")[0][0] == 1, 5, interval=0.05,
                        what="the operation in progress")
        e_proxy, e_sock = start_instance("e", "postgres", self.dir)
        self.proxies.append(e_proxy)
        e = Instance(self, e_proxy, e_sock)
        pdtest.wait_for(lambda: "joined after it began: held until it ends" in e_proxy.log(),
                        5, interval=0.05, what="e holds")
        served = {}

        def client():
            conn = pdtest.connect(e_proxy.port, dbname=DB)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM accounts")
            served["at"] = time.monotonic()
            conn.close()

        c = threading.Thread(target=client)
        c.start()
        time.sleep(0.5)
        self.assertNotIn("at", served)  # held
        released = time.monotonic()
        held.rollback()
        held.close()
        t.join(30)
        c.join(30)
        self.assertTrue(out["r"]["ok"], out["r"])
        self.assertNotIn(e_proxy.port, [int(i.rsplit(":", 1)[1]) for i in out["r"]["instances"]])
        self.assertGreaterEqual(served["at"], released)
        self.assertEqual(e.flags(), ("dual-new", "new"))
        self.a.ctl_json("rollback", DB)
        for m in (self.a, self.b, e):
            pdtest.wait_for(lambda m=m: m.flags() == ("dual", "old"), 5, interval=0.1,
                            what="rolled back everywhere")


class ControlLostTest(pdtest.CtlMixin, unittest.TestCase):
    """`state: { postgres: CONNINFO }` in a database of its own; that database becomes
    unreachable: the instance keeps serving with its flags and refuses to change them."""

    @classmethod
    def setUpClass(cls):
        pdtest.fresh_databases(OLD + "x", NEW + "x", CTL)
        for db in (OLD + "x", NEW + "x"):
            direct_query(SCHEMA, dbname=db)
        cls.dir = pdtest.tmpdir("pdtest-fleet-lost-")
        cls.sock = os.path.join(cls.dir, "admin.sock")
        cls.metrics_port = pdtest.free_port()
        dbs = [{"name": DB, "old": pg_conninfo(OLD + "x", user="postgres"),
                "new": pg_conninfo(NEW + "x", user="postgres")}]
        rule = {"name": RULE, "database": DB, "kind": "tables", "writes": "dual",
                "reads": "old"}
        cls.proxy = Proxy(databases=dbs, admin={"socket": cls.sock,
                                                "metrics": "127.0.0.1:%d" % cls.metrics_port},
                          state={"postgres": pg_conninfo(CTL, user="postgres")},
                          rules=[rule]).start()

    @classmethod
    def tearDownClass(cls):
        direct_query("ALTER DATABASE %s ALLOW_CONNECTIONS true" % CTL)
        pdtest.stop_and_drop(cls.proxy, OLD + "x", NEW + "x", CTL)

    def metric(self, name):
        import urllib.request
        text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                      timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        self.fail("metric %s missing:\n%s" % (name, text))

    def test_fail_closed(self):
        self.assertEqual(direct_query("SELECT count(*) FROM pgdual.state", dbname=CTL)[0][0], 1)
        self.assertEqual(old_x("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgdual'"),
                         [(0,)])
        # The fleet thread connects (and LISTENs) after the start: wait for it.
        pdtest.wait_for(lambda: self.ctl_json("status")["state"]["connected"], 10,
                        interval=0.1, what="the control connection")
        self.assertEqual(self.metric("pgdual_state_connected"), 1)
        self.ctl_json("flag", RULE, "reads=shadow")
        # The control database goes away.
        direct_query("ALTER DATABASE %s ALLOW_CONNECTIONS false" % CTL)
        direct_query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s", (CTL,))
        pdtest.wait_for(lambda: not self.ctl_json("status")["state"]["connected"], 10,
                        interval=0.1, what="connected false")
        st = self.ctl_json("status")["state"]
        self.assertIn("error", st)
        self.assertGreaterEqual(st["lost_ms"], 0)
        self.assertEqual(self.metric("pgdual_state_connected"), 0)
        # Flags stay; changing them is refused; so is a switchover.
        self.assertEqual(self.ctl_json("rules")["rules"][0]["reads"], "shadow")
        r = self.ctl_json("flag", RULE, "reads=old", expect_rc=1)
        self.assertIn("state", r["error"])
        self.assertEqual(self.ctl_json("rules")["rules"][0]["reads"], "shadow")
        dry = self.ctl_json("switchover", DB, "--dry-run")
        fleet = [ch for ch in dry["checks"] if ch["check"] == "fleet"][0]
        self.assertFalse(fleet["ok"])
        self.assertFalse(fleet["value"]["connected"])
        r = self.ctl_json("switchover", DB, "--force", expect_rc=1)
        self.assertFalse(r["ok"])
        # Clients are served all along.
        conn = pdtest.connect(self.proxy.port, dbname=DB)
        conn.autocommit = True
        conn.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
        conn.close()
        # Back: connected again, and changes go through.
        direct_query("ALTER DATABASE %s ALLOW_CONNECTIONS true" % CTL)
        pdtest.wait_for(lambda: self.ctl_json("status")["state"]["connected"], 10,
                        interval=0.1, what="connected again")
        self.assertEqual(self.metric("pgdual_state_connected"), 1)
        self.ctl_json("flag", RULE, "reads=old")
        self.assertEqual(self.ctl_json("rules")["rules"][0]["reads"], "old")


    def test_flag_is_saved_off_the_event_loop(self):
        # The state's backend stops answering (SIGSTOP): a flag change waits for it, and
        # clients are served meanwhile.
        self.ctl_json("flag", RULE, "reads=old")  # the state connection exists
        pid = direct_query("SELECT pid FROM pg_stat_activity WHERE datname = %s AND "
                           "application_name = 'pgdual state'", (CTL,))[0][0]
        os.kill(pid, signal.SIGSTOP)
        out = {}
        try:
            t = threading.Thread(target=lambda: out.setdefault(
                "r", self.ctl_json("flag", RULE, "reads=shadow", expect_rc=None)))
            t.start()
            time.sleep(0.5)
            self.assertTrue(t.is_alive())  # waiting for the store
            t0 = time.monotonic()
            conn = pdtest.connect(self.proxy.port, dbname=DB)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM accounts")
            self.assertEqual(cur.fetchone()[0], 40)
            conn.close()
            self.assertLess(time.monotonic() - t0, 2.0)
            self.assertEqual(self.ctl_json("rules")["rules"][0]["reads"], "old")
        finally:
            os.kill(pid, signal.SIGCONT)
        t.join(30)
        self.assertTrue(out["r"]["ok"], out["r"])
        self.assertEqual(self.ctl_json("rules")["rules"][0]["reads"], "shadow")
        self.ctl_json("flag", RULE, "reads=old")


    def test_no_start_without_the_control_database(self):
        # Its flags may be stale: an instance does not start on the config's initial ones.
        dbs = [{"name": DB, "old": pg_conninfo(OLD + "x", user="postgres"),
                "new": pg_conninfo(NEW + "x", user="postgres")}]
        p = Proxy(databases=dbs, state={"postgres": pg_conninfo(CTL + "_missing",
                                                                user="postgres")},
                  rules=[{"name": RULE, "database": DB, "kind": "tables", "writes": "dual",
                          "reads": "old"}])
        with self.assertRaises(pdtest.ProxyError) as cm:
            p.start()
        self.assertIn("exited with status 1", str(cm.exception))
        self.assertIn("could not connect to the state database", p.log())
        self.assertIn("HINT:", p.log())


def old_x(sql):
    return direct_query(sql, dbname=OLD + "x")


if __name__ == "__main__":
    pdtest.main()
