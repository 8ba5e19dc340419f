#!/usr/bin/python3
"""Verified cutover (issue 5) of a blue/green database (issue 4's writes=dual-new): pause and
resume, the switchover guardrails, switchover and rollback under a steady load of 16
clients with zero errors and identical databases at the end, sessions that stay connected
across the flips (prepared statements included), sequences that do not collide, and a
long transaction that makes a switchover time out and leaves traffic on old."""

import os
import subprocess
import threading
import time
import unittest


import pdtest
from pdtest import Proxy, direct_query, pg_conninfo

PID = os.getpid()
OLD = "sw_old_%d" % PID
NEW = "sw_new_%d" % PID
DB = "shop"
RULE = "shop-to-green"
ACCOUNTS = 50

SCHEMA = """
CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL
    DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, account int NOT NULL,
    amount numeric NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
INSERT INTO accounts (owner, updated_at) SELECT 'owner ' || g, '2026-01-01' FROM generate_series(1, %d) g;
""" % ACCOUNTS


def old(sql, args=()):
    return direct_query(sql, args, dbname=OLD)


def new(sql, args=()):
    return direct_query(sql, args, dbname=NEW)


def table_md5(run, table):
    return run("SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')), count(*) "
               "FROM %s t" % table)[0]


def sequences(run):
    return run("SELECT sequencename, last_value FROM pg_sequences ORDER BY 1")


class Load:
    """n client threads writing and reading through pgdual, each in its own session for
    the whole run; counts operations and errors and keeps the slowest operation."""

    def __init__(self, port, n):
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.errors, self.ops, self.max_ms = [], 0, 0.0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def run(self, i):
        try:
            conn = pdtest.connect(self.port, dbname=DB)
        except Exception as e:  # noqa: BLE001 - reported by the test
            with self.lock:
                self.errors.append("connect: %r" % e)
            return
        conn.autocommit = True
        cur = conn.cursor()
        k = 0
        while not self.stop.is_set():
            k += 1
            acct = (i * 7 + k) % ACCOUNTS + 1
            t0 = time.monotonic()
            try:
                if k % 4 == 0:  # a transaction: an event and the balance it moves
                    cur.execute("BEGIN")
                    cur.execute("INSERT INTO events (account, amount) VALUES (%s, %s) "
                                "RETURNING id", (acct, k % 10))
                    cur.fetchone()
                    cur.execute("UPDATE accounts SET balance = balance + %s, "
                                "updated_at = now() WHERE id = %s", (k % 10, acct))
                    cur.execute("COMMIT")
                elif k % 4 == 1:  # hot rows, in autocommit
                    cur.execute("UPDATE accounts SET balance = balance - 1 WHERE id = %s",
                                (k % 5 + 1,))
                elif k % 4 == 2:
                    cur.execute("SELECT sum(balance), count(*) FROM accounts")
                    cur.fetchall()
                else:  # serial key from the authoritative side's sequence
                    cur.execute("INSERT INTO accounts (owner) VALUES (%s)", ("c%d" % i,))
            except Exception as e:  # noqa: BLE001 - reported by the test
                with self.lock:
                    self.errors.append(repr(e))
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: BLE001
                    pass
            ms = (time.monotonic() - t0) * 1000
            with self.lock:
                self.ops += 1
                self.max_ms = max(self.max_ms, ms)
            # A steady load, not a saturating one: the async mirror keeps up with it.
            time.sleep(0.003)
        conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)


class SwitchoverTest(pdtest.CtlMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        pdtest.fresh_databases(OLD, NEW)
        for db in (OLD, NEW):
            direct_query(SCHEMA, dbname=db)
        # pgbench's tables too (identical: pgbench -i's data is deterministic).
        c = pdtest.cluster()
        for db in (OLD, NEW):
            subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", c["host"], "-p",
                            str(c["port"]), "-U", "postgres", db], check=True,
                           capture_output=True, timeout=120)
        cls.dir = pdtest.tmpdir("pdtest-switch-")
        cls.sock = os.path.join(cls.dir, "admin.sock")
        cls.state = os.path.join(cls.dir, "state.json")
        dbs = [{"name": DB, "old": pg_conninfo(OLD, user="postgres"),
                "new": pg_conninfo(NEW, user="postgres")}]
        rule = {"name": RULE, "database": DB, "kind": "tables", "writes": "dual",
                "reads": "old", "mirror": {"commit": "async", "on_failure": "record"}}
        cls.proxy = Proxy(databases=dbs, admin={"socket": cls.sock}, state=cls.state,
                          rules=[rule], divergence={"log": os.path.join(cls.dir, "div.jsonl")},
                          stop_timeout=30).start()

    @classmethod
    def tearDownClass(cls):
        pdtest.stop_and_drop(cls.proxy, OLD, NEW)

    def connect(self):
        conn = pdtest.connect(self.proxy.port, dbname=DB)
        conn.autocommit = True
        return conn

    def flags(self):
        r = self.ctl_json("rules")["rules"][0]
        return r["writes"], r["reads"]

    def assert_identical(self):
        def same():
            return all(table_md5(old, t) == table_md5(new, t)
                       for t in ("accounts", "events", "pgbench_accounts",
                                 "pgbench_branches", "pgbench_tellers", "pgbench_history"))
        pdtest.wait_for(same, 20, interval=0.2, what="old and new identical")

    def verify_ok(self):
        res = self.ctl_json("verify", RULE)["result"]
        self.assertEqual(res["divergent"], 0, res)
        self.assertTrue(res["ok"])

    # -----------------------------------------------------------------------------------

    def test_1_guardrails(self):
        # Never verified: refused, the failing check named, with what to run.
        r = self.ctl("switchover", DB)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn('switchover of database "shop" refused: check "%s: verify passed '
                      'within 3600 s" failed' % RULE, r.stderr)
        self.assertIn("HINT:  Run pgdualctl verify %s" % RULE, r.stderr)
        # --dry-run lists every guardrail, changes nothing.
        dry = self.ctl_json("switchover", DB, "--dry-run")
        self.assertTrue(dry["dry_run"])
        self.assertTrue(dry["would_refuse"])
        checks = {c["check"]: c["ok"] for c in dry["checks"]}
        self.assertEqual(checks, {
            "%s: writes=dual" % RULE: True,
            "%s: can be served at writes=dual-new" % RULE: True,
            "%s: verify passed within 3600 s" % RULE: False,
            "%s: no divergence since that verify" % RULE: False,
            "mirrors connected and caught up": True})
        self.assertEqual(len(dry["plan"]), 5)
        self.assertEqual(self.flags(), ("dual", "old"))
        # The authoritative side does not change through `flag`.
        r = self.ctl("flag", RULE, "writes=dual-new", "reads=new")
        self.assertEqual(r.returncode, 1)
        self.assertIn("needs its sessions paused and drained first", r.stderr)
        # rollback needs the rule at dual-new.
        r = self.ctl_json("rollback", DB, expect_rc=1)
        self.assertIn('check "%s: writes=dual-new" failed' % RULE, r["error"])
        # After a passing verify: a divergence recorded later fails its own check.
        self.verify_ok()
        self.assertFalse(self.ctl_json("switchover", DB, "--dry-run")["would_refuse"])
        time.sleep(1.1)  # the divergence must be later than the verify (seconds)
        new("INSERT INTO accounts (id, owner) VALUES (100000, 'only on new')")
        conn = self.connect()
        conn.cursor().execute("INSERT INTO accounts (id, owner) VALUES (100000, 'via pgdual')")
        conn.close()  # applied on old, a unique violation on new: divergence
        pdtest.wait_for(lambda: self.ctl_json("status")["rule_counters"][RULE]
                        ["mirror_diverged"] == 1, 10, what="the divergence")
        r = self.ctl_json("switchover", DB, expect_rc=1)
        self.assertIn('check "%s: no divergence since that verify" failed' % RULE, r["error"])
        # --force goes through failing checks: proven by a dry run's would_refuse only,
        # the real --force flip is exercised with a passing state below.
        self.assertFalse(self.ctl_json("switchover", DB, "--dry-run", "--force")["would_refuse"])
        time.sleep(1.1)  # a verify in the divergence's second would not count
        res = self.ctl_json("verify", RULE, "--repair")["result"]
        self.assertEqual(res["repaired"], 1, res)
        self.assertEqual(new("SELECT owner FROM accounts WHERE id = 100000"), [("via pgdual",)])
        self.assertFalse(self.ctl_json("switchover", DB, "--dry-run")["would_refuse"])
        # Bad arguments.
        r = self.ctl_json("switchover", "nosuch", expect_rc=1)
        self.assertIn('database "nosuch" does not exist', r["error"])
        r = self.ctl_json("switchover", DB, "--timeout", "0", expect_rc=1)
        self.assertIn("--timeout takes milliseconds", r["error"])

    def test_2_pause_and_resume(self):
        a, b = self.connect(), self.connect()
        # A transaction in flight: pause reports it at its timeout and ends.
        a.cursor().execute("BEGIN")
        a.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
        r = self.ctl_json("pause", DB, "--timeout", "300", expect_rc=1)
        self.assertIn('database "shop" did not go quiet within 300 ms; the pause ended',
                      r["error"])
        self.assertEqual(len(r["busy"]), 1)
        self.assertEqual(r["busy"][0]["transaction"], "T")
        a.cursor().execute("COMMIT")  # the pause ended: nothing waits
        # Quiet: the pause holds new statements until resume.
        r = self.ctl_json("pause", DB, "--timeout", "20000")
        self.assertTrue(r["quiet"])
        r2 = self.ctl_json("pause", DB, expect_rc=1)
        self.assertIn('database "shop" is paused already (pause', r2["error"])
        done = threading.Event()

        def held():
            b.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 4")
            done.set()
        t = threading.Thread(target=held, daemon=True)
        t.start()
        time.sleep(0.4)
        self.assertFalse(done.is_set(), "a statement ran while the database was paused")
        r = self.ctl_json("resume", DB)
        self.assertGreaterEqual(r["paused_ms"], 400)
        self.assertTrue(done.wait(5), "the held statement did not run after resume")
        t.join(5)
        r = self.ctl_json("resume", DB, expect_rc=1)
        self.assertEqual(r["error"], 'database "shop" is not paused')
        # A pause whose admin client goes away ends with it.
        p = subprocess.Popen([os.path.join(pdtest.build_dir(), "pgdualctl"), "-s", self.sock,
                              "pause", DB, "--timeout", "20000"], stdout=subprocess.PIPE)
        a.cursor().execute("BEGIN")  # keeps the pause from going quiet
        time.sleep(0.05)
        p.kill()
        p.wait()
        a.cursor().execute("COMMIT")
        pdtest.wait_for(lambda: self.ctl("resume", DB).returncode == 1, 5,
                        what="the pause to end with its client")
        b.cursor().execute("SELECT 1")
        events = [e.get("event") for e in self.state_doc()["history"] if "event" in e]
        self.assertIn("pause", events)
        self.assertIn("resume", events)
        a.close()
        b.close()
        self.assert_identical()

    def flip_under_load(self, verb):
        """switchover/rollback as an operator runs it under load: refused while the mirrors
        trail by more than the bound (a busy machine), so tried again until they catch up;
        any other refusal fails the test."""
        deadline = time.monotonic() + 30
        while True:
            r = self.ctl_json(verb, DB, expect_rc=None)
            if r.get("ok", True) or time.monotonic() > deadline:
                break
            failed = [c for c in r.get("checks", []) if not c["ok"]]
            self.assertEqual([c["check"] for c in failed], ["mirrors connected and caught up"],
                             r)
            self.assertEqual(failed[0]["value"]["detached"], 0, r)
            time.sleep(0.2)
        self.assertNotIn("error", r)
        return r

    def test_3_switchover_and_rollback_under_load(self):
        self.verify_ok()
        before = self.ctl_json("status")["rule_counters"][RULE]
        c = pdtest.cluster()
        load = Load(self.proxy.port, 14).start()
        # Two more clients with prepared statements (extended protocol) across the flips.
        bench = subprocess.Popen(
            ["pgbench", "-n", "-M", "prepared", "-c", "2", "-j", "1", "-T", "8", "-h",
             c["host"], "-p", str(self.proxy.port), "-U", "postgres", DB],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stalls = []
        try:
            time.sleep(1.0)
            r = self.flip_under_load("switchover")
            stalls.append(r["pause_ms"])
            self.assertEqual(r["rules"], [{"rule": RULE, "writes": "dual-new", "reads": "new"}])
            self.assertEqual(self.flags(), ("dual-new", "new"))
            time.sleep(1.5)
            # Writes now land on new first: rows old has not got yet come from new.
            r = self.flip_under_load("rollback")
            stalls.append(r["pause_ms"])
            self.assertEqual(self.flags(), ("dual", "old"))
            time.sleep(1.5)
            r = self.flip_under_load("switchover")
            stalls.append(r["pause_ms"])
            self.assertGreaterEqual(r["sequences_set"], 0)
            time.sleep(1.5)
        finally:
            load.finish()
            out = bench.communicate(timeout=60)[0]
        self.assertEqual(load.errors, [])
        self.assertGreater(load.ops, 500)
        self.assertEqual(bench.returncode, 0, out)
        self.assertIn("number of failed transactions: 0", out)
        print("\nswitchover/rollback/switchover under 16 clients: %d operations, 0 errors, "
              "pauses %s ms, slowest client operation %.1f ms" % (load.ops, stalls, load.max_ms))
        self.assertEqual(self.flags(), ("dual-new", "new"))
        # new is authoritative: a fresh session writes there and old follows.
        conn = self.connect()
        cur = conn.cursor()
        cur.execute("INSERT INTO accounts (owner) VALUES ('after') RETURNING id")
        aid = cur.fetchone()[0]
        conn.close()
        self.assertEqual(new("SELECT owner FROM accounts WHERE id = %s", (aid,)), [("after",)])
        self.assert_identical()
        counters = self.ctl_json("status")["rule_counters"][RULE]
        self.assertEqual([counters[k] - before[k] for k in ("mirror_diverged",
                          "mirror_unapplied", "mirror_proxy_errors")], [0, 0, 0], counters)
        self.assertGreater(counters["mirrored"] - before["mirrored"], 1000)
        # The sequences on the side that follows are never behind the authoritative one's.
        self.flip_under_load("rollback")
        for (name, v_new), (name2, v_old) in zip(sequences(new), sequences(old)):
            self.assertEqual(name, name2)
            self.assertGreaterEqual(v_old, v_new, name)
        events = [e["event"] for e in self.state_doc()["history"] if "event" in e]
        self.assertEqual(events[-4:], ["switchover", "rollback", "switchover", "rollback"])

    def mirrors_idle(self):
        pdtest.wait_for(lambda: self.ctl_json("status")["mirrors"]["queued"] == 0, 30,
                        what="the mirrors to catch up")

    def test_4_long_transaction_makes_switchover_time_out(self):
        self.mirrors_idle()
        self.verify_ok()
        self.assertEqual(self.flags(), ("dual", "old"))
        a, b = self.connect(), self.connect()
        a.cursor().execute("BEGIN")
        a.cursor().execute("UPDATE accounts SET balance = balance + 5 WHERE id = 5")
        r = self.ctl_json("switchover", DB, "--timeout", "400", expect_rc=1)
        self.assertIn("switchover of database \"shop\" abandoned: transactions in flight did "
                      "not drain within 400 ms; traffic resumes on old, unchanged", r["error"])
        self.assertEqual(len(r["busy"]), 1)
        self.assertGreaterEqual(r["pause_ms"], 400)
        self.assertEqual(self.flags(), ("dual", "old"))
        b.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 6")
        a.cursor().execute("COMMIT")
        self.assertEqual(old("SELECT balance FROM accounts WHERE id = 5"),
                         new("SELECT balance FROM accounts WHERE id = 5"))
        a.close()
        b.close()
        self.assert_identical()
        events = [e["event"] for e in self.state_doc()["history"] if "event" in e]
        self.assertEqual(events[-1], "switchover_abandoned")


class RollbackFromNewTest(pdtest.CtlMixin, unittest.TestCase):
    """A rollback refused because a rule is at writes=new says how to come back: old was
    not written at all, so only verify --repair brings it up to date (no mirror to wait
    for)."""

    def test_hint_from_writes_new(self):
        direct_query("DROP TABLE IF EXISTS sw_users; CREATE TABLE sw_users (id bigserial "
                     "PRIMARY KEY, email text, email_address text)", dbname="app")
        d = pdtest.tmpdir("pdtest-switch-")
        self.sock = os.path.join(d, "admin.sock")
        self.state = os.path.join(d, "state.json")
        rule = {"name": "users-email", "database": "app", "kind": "columns",
                "table": "public.sw_users", "key": ["id"],
                "columns": [{"old": "email", "new": "email_address"}],
                "writes": "new", "reads": "new"}
        with Proxy(admin={"socket": self.sock}, state=self.state, rules=[rule],
                   env={"PGUSER": "postgres"}):
            dry = self.ctl_json("rollback", "app", "--dry-run")
            self.assertTrue(dry["would_refuse"])
            check = [c for c in dry["checks"] if c["check"] == "users-email: writes=dual-new"]
            self.assertEqual(len(check), 1, dry)
            self.assertFalse(check[0]["ok"])
            self.assertEqual(check[0]["value"], "new")
            hint = check[0]["hint"]
            self.assertIn("pgdualctl flag users-email writes=dual-new", hint)
            self.assertIn("pgdualctl verify users-email --repair", hint)
            self.assertNotIn("catch up", hint)
            r = self.ctl("rollback", "app")
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("HINT:  " + hint, r.stderr)
        direct_query("DROP TABLE sw_users", dbname="app")


if __name__ == "__main__":
    pdtest.main()
