#!/usr/bin/python3
"""Operator jobs through pgdualctl: backfill of 1M rows interrupted (cancelled, then
pgdual killed) and resumed from its checkpoint until every row is filled; verify finding
exactly the rows corrupted in the database, --repair fixing them, composite keys; the
--json output, exit codes, argument errors and the progress lines of a followed job."""

import json
import os
import re
import subprocess
import time
import unittest

import pdtest
from pdtest import Proxy, direct_query, pg_conninfo

SUFFIX = "jobs_%d" % os.getpid()
BIG = "big_" + SUFFIX          # 1M rows, backfilled
SMALL = "small_" + SUFFIX      # 20000 rows, verified
COMP = "comp_" + SUFFIX        # composite key
BROKEN = "broken_" + SUFFIX    # an `up` expression that fails at run time
BIG_ROWS = 1000000
SMALL_ROWS = 20000
CORRUPTED = [1, 999, 1000, 1001, 12345, 19999, 20000]  # across verify chunk borders
MARKER = "CORRUPTED-VALUE-%d" % os.getpid()           # must never reach the log


def sql(text, args=()):
    return direct_query(text, args, dbname="app")


def rule(name, table, key=("id",), up="lower(email)", old="email", new="email_address"):
    return {"name": name, "database": "app", "kind": "columns", "table": "public." + table,
            "key": list(key), "columns": [{"old": old, "new": new, "up": up}],
            "writes": "dual", "reads": "old"}


class JobsTest(pdtest.CtlMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        for t in (BIG, SMALL, BROKEN):
            sql("DROP TABLE IF EXISTS %s" % t)
            sql("CREATE TABLE %s (id int PRIMARY KEY, email text, email_address text)" % t)
        sql("INSERT INTO %s SELECT g, 'User' || g || '@Example.ORG', NULL "
            "FROM generate_series(1, %d) g" % (BIG, BIG_ROWS))
        sql("INSERT INTO %s SELECT g, 'U' || g || '@X.org', 'u' || g || '@x.org' "
            "FROM generate_series(1, %d) g" % (SMALL, SMALL_ROWS))
        sql("INSERT INTO %s SELECT g, 'not a number ' || g, NULL FROM generate_series(1, 10) g"
            % BROKEN)
        sql("DROP TABLE IF EXISTS %s" % COMP)
        sql("CREATE TABLE %s (tenant int, code text, email text, email_address text, "
            "PRIMARY KEY (tenant, code))" % COMP)
        sql("INSERT INTO %s SELECT mod(g, 5), 'c' || g, 'E' || g, NULL "
            "FROM generate_series(1, 500) g" % COMP)
        cls.dir = pdtest.tmpdir("pdtest-jobs-")
        cls.sock = os.path.join(cls.dir, "admin.sock")
        cls.state = os.path.join(cls.dir, "state.json")
        dbs = pdtest.default_databases()
        # The jobs connect with the conninfo's user; name one (pgdual may run as root).
        dbs[0]["old"] = pg_conninfo("app", user="postgres")
        dbs.append({"name": "green", "old": pg_conninfo("app2", user="postgres"),
                    "new": pg_conninfo("app2", user="postgres")})
        rules = [rule("big", BIG), rule("small", SMALL), rule("comp", COMP, key=("tenant", "code")),
                 rule("broken", BROKEN, up="(email::int)::text"),
                 {"name": "moved", "database": "green", "kind": "tables",
                  "tables": ["public.whatever"], "writes": "old", "reads": "old"}]
        cls.proxy = Proxy(databases=dbs, admin={"socket": cls.sock}, state=cls.state,
                          rules=rules, stop_timeout=30).start()

    @classmethod
    def tearDownClass(cls):
        try:
            cls.proxy.stop()
        finally:
            for t in (BIG, SMALL, COMP, BROKEN):
                sql("DROP TABLE IF EXISTS %s" % t)

    # -----------------------------------------------------------------------------------

    def unfilled(self, table):
        return sql("SELECT count(*) FROM %s WHERE email_address IS DISTINCT FROM lower(email)"
                   % table)[0][0]

    # -----------------------------------------------------------------------------------

    def test_1_backfill_interrupted_and_resumed(self):
        # First run: cancelled through pgdualctl once some batches are done.
        start = self.ctl_json("backfill", "big", "--batch", "10000", "--detach")
        self.assertTrue(start["ok"])
        jid = start["job"]
        self.wait_job(jid, lambda j: j["rows_done"] >= 100000 or j["state"] != "running",
                      "the backfill to do 100000 rows")
        cancel = self.ctl_json("cancel", str(jid))
        self.assertEqual(cancel["state"], "cancelling")
        j = self.wait_job(jid, lambda j: j["state"] != "running", "the job to stop")
        self.assertEqual(j["state"], "cancelled", j)
        ck = self.state_doc()["checkpoints"]["backfill/big"]
        first_stop = ck["rows_done"]
        self.assertGreaterEqual(first_stop, 100000)
        self.assertLess(first_stop, BIG_ROWS)
        self.assertEqual(ck["last_key"], [str(first_stop)])  # ids 1..N: the N-th key is N
        self.assertEqual(self.unfilled(BIG), BIG_ROWS - first_stop)

        # Second run: pgdual is killed in the middle; the checkpoint survives in `state`.
        jid = self.ctl_json("backfill", "big", "--batch", "10000", "--detach")["job"]
        j = self.wait_job(jid, lambda j: j["rows_done"] >= first_stop + 100000
                          or j["state"] != "running", "the resumed backfill to progress")
        self.assertEqual(j["resumed_from"], first_stop)
        self.proxy.proc.kill()
        self.proxy.proc.wait()
        self.proxy.proc = None
        self.proxy._logf.close()
        second_stop = self.state_doc()["checkpoints"]["backfill/big"]["rows_done"]
        self.assertGreater(second_stop, first_stop)
        self.assertLess(second_stop, BIG_ROWS)
        self.proxy.start()

        # Third run, followed to the end (stderr is not a terminal: progress lines).
        r = self.ctl("--json", "backfill", "big", "--batch", "10000")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        final = json.loads(r.stdout)
        self.assertEqual(final["state"], "done")
        self.assertEqual(final["result"]["resumed_from"], second_stop)
        self.assertEqual(final["result"]["rows_done"], BIG_ROWS)
        # The batch in flight when pgdual died may have committed without its checkpoint:
        # it is scanned again and finds nothing left to update.
        self.assertLessEqual(final["result"]["rows_updated"], BIG_ROWS - second_stop)
        self.assertGreaterEqual(final["result"]["rows_updated"], BIG_ROWS - second_stop - 10000)
        self.assertRegex(r.stderr, r"backfill big: \d+% \(\d+/\d+ rows, \d+ rows/s, ETA ")
        self.assertEqual(self.unfilled(BIG), 0)
        self.assertNotIn("backfill/big", self.state_doc()["checkpoints"])

        # A backfill of a filled table changes nothing; for people: a summary.
        r = self.ctl("backfill", "big", "--batch", "50000")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('backfill of rule "big" done: %d rows' % BIG_ROWS, r.stdout)
        self.assertIn(", 0 updated", r.stdout)

    def test_2_verify_finds_and_repairs(self):
        sql("UPDATE %s SET email_address = %%s WHERE id = ANY(%%s)" % SMALL,
            (MARKER, CORRUPTED[:-1]))
        sql("UPDATE %s SET email_address = NULL WHERE id = %%s" % SMALL, (CORRUPTED[-1],))
        found = self.ctl_json("verify", "small", "--batch", "1000", expect_rc=1)
        self.assertEqual(found["state"], "done")
        res = found["result"]
        self.assertEqual(res["rows_checked"], SMALL_ROWS)
        self.assertEqual(res["divergent"], len(CORRUPTED))
        self.assertEqual([k["id"] for k in res["keys"]], [str(i) for i in CORRUPTED])
        self.assertFalse(res["ok"])
        recorded = self.state_doc()["verify"]["small"]
        self.assertEqual(recorded["divergent"], len(CORRUPTED))
        self.assertFalse(recorded["ok"])

        r = self.ctl("verify", "small", "--repair", "--batch", "1000")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("%d rows checked, %d divergent, %d repaired"
                      % (SMALL_ROWS, len(CORRUPTED), len(CORRUPTED)), r.stdout)
        self.assertIn("id=12345", r.stdout)
        self.assertEqual(self.unfilled(SMALL), 0)

        again = self.ctl_json("verify", "small")
        self.assertEqual(again["result"]["divergent"], 0)
        self.assertEqual(again["result"]["keys"], [])
        self.assertTrue(self.state_doc()["verify"]["small"]["ok"])
        self.assertNotIn(MARKER, self.proxy.log())  # values stay out of the log
        # `rules` shows the recorded outcome (without the keys) for cutover checks.
        shown = [r for r in self.ctl_json("rules")["rules"] if r["name"] == "small"][0]
        self.assertEqual(shown["last_verify"]["divergent"], 0)
        self.assertTrue(shown["last_verify"]["ok"])
        self.assertNotIn("keys", shown["last_verify"])

    def test_3_composite_key(self):
        done = self.ctl_json("backfill", "comp", "--batch", "7")
        self.assertEqual(done["result"]["rows_done"], 500)
        self.assertEqual(self.unfilled(COMP), 0)
        sql("UPDATE %s SET email_address = 'x' WHERE (tenant, code) IN ((3, 'c3'), (0, 'c500'))"
            % COMP)
        res = self.ctl_json("verify", "comp", "--batch", "13", expect_rc=1)["result"]
        self.assertEqual(res["divergent"], 2)
        self.assertEqual(res["keys"], [{"tenant": "0", "code": "c500"},
                                       {"tenant": "3", "code": "c3"}])
        self.ctl_json("verify", "comp", "--repair")
        self.assertEqual(self.unfilled(COMP), 0)

    def test_4_failed_job(self):
        before = self.state_doc()["verify"].get("broken")
        r = self.ctl("verify", "broken")
        self.assertEqual(r.returncode, 1)
        self.assertIn('verify of rule "broken"', r.stderr)
        self.assertIn("failed", r.stderr)
        self.assertIn("invalid input syntax for type integer", r.stderr)
        self.assertEqual(self.state_doc()["verify"].get("broken"), before)  # nothing recorded
        j = self.ctl_json("backfill", "broken", expect_rc=1)
        self.assertEqual(j["state"], "failed")
        self.assertIn("error", j)

    def test_5_errors_and_usage(self):
        cases = [
            (("verify", "nosuch"), 'rule "nosuch" does not exist', "pgdualctl rules"),
            (("backfill", "nosuch"), 'rule "nosuch" does not exist', "pgdualctl rules"),
            (("backfill", "big", "--batch", "0"), "--batch takes", None),
            (("backfill", "big", "--batch"), "--batch takes", None),
            (("backfill", "big", "--throttle", "x"), "--throttle takes", None),
            (("backfill", "big", "--bogus"), 'unknown option "--bogus"', None),
            (("verify", "big", "--throttle", "5"), 'unknown option "--throttle"', None),
            (("verify", "big", "small"), 'unexpected argument "small"', None),
            (("verify", "big", "--touched"), "verify --touched is for kind tables rules", None),
            (("jobs", "9999"), 'job "9999" does not exist', "pgdualctl jobs"),
            (("jobs", "x"), "not a job id", None),
            (("cancel", "9999"), 'job "9999" does not exist', None),
            (("cancel", "-1"), "not a job id", None),
            (("verify",), "usage: verify RULE", None),
        ]
        for args, error, hint in cases:
            with self.subTest(args=args):
                r = self.ctl(*args, json_out=True)
                self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
                reply = json.loads(r.stdout)
                self.assertFalse(reply["ok"])
                self.assertIn(error, reply["error"])
                if hint:
                    self.assertIn(hint, reply["hint"])
        r = self.ctl("verify", "nosuch")
        self.assertEqual(r.returncode, 1)
        self.assertIn('pgdualctl: rule "nosuch" does not exist', r.stderr)
        self.assertIn("HINT:  pgdualctl rules lists them.", r.stderr)
        # Connection and usage errors: exit 2.
        r = subprocess.run([os.path.join(pdtest.build_dir(), "pgdualctl"), "-s",
                            self.sock + ".missing", "verify", "small"], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 2)
        self.assertIn("could not connect to the admin socket", r.stderr)
        r = self.ctl()
        self.assertEqual(r.returncode, 2)

    def test_6_detach_list_and_one_at_a_time(self):
        start = self.ctl_json("backfill", "small", "--batch", "10", "--throttle", "1000",
                              "--detach")
        jid = start["job"]
        self.assertEqual((start["kind"], start["rule"]), ("backfill", "small"))
        again = self.ctl_json("backfill", "small", "--detach", expect_rc=1)
        self.assertIn("already running", again["error"])
        listed = self.ctl_json("jobs")["jobs"]
        self.assertEqual(listed[0]["id"], jid)
        self.assertEqual(listed[0]["state"], "running")
        # A verify of the same rule may run meanwhile.
        self.ctl_json("verify", "small")
        self.ctl_json("cancel", str(jid))
        j = self.wait_job(jid, lambda j: j["state"] != "running", "the cancel")
        self.assertEqual(j["state"], "cancelled")
        r = self.ctl("cancel", str(jid))
        self.assertEqual(r.returncode, 1)
        self.assertIn("is not running", r.stderr)
        # The cancelled backfill left a checkpoint; a following run finishes from it.
        done = self.ctl_json("backfill", "small", "--batch", "5000")
        self.assertGreater(done["result"]["resumed_from"], 0)
        self.assertEqual(done["result"]["rows_done"], SMALL_ROWS)

    def test_7_shutdown_with_a_running_job(self):
        import psycopg2
        c = pdtest.cluster()
        locker = psycopg2.connect(host=c["host"], port=c["port"], dbname="app", user="postgres")
        try:
            with locker.cursor() as cur:  # updates of the table wait for this transaction
                cur.execute("LOCK TABLE %s IN EXCLUSIVE MODE" % COMP)
            jid = self.ctl_json("backfill", "comp", "--detach")["job"]
            pdtest.wait_for(lambda: sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgdual backfill' "
                "AND wait_event_type = 'Lock'"), 20, what="the backfill to wait for the lock")
            self.assertEqual(self.job(jid)["state"], "running")
            # SIGTERM: the statement in flight is cancelled and pgdual exits at once (stop()
            # fails on a hang, a crash or a sanitizer report).
            t0 = time.monotonic()
            self.proxy.stop()
            self.assertLess(time.monotonic() - t0, 10)
        finally:
            locker.rollback()
            locker.close()
        self.proxy.start()
        self.assertEqual(self.ctl_json("jobs")["jobs"], [])
        self.ctl_json("backfill", "comp")


    def test_8_conninfo_without_user(self):
        # libpq's defaults fill in the user; here they name a role that does not exist.
        sock = os.path.join(self.dir, "nouser.sock")
        with Proxy(databases=[{"name": "app", "old": pg_conninfo("app")}],
                   admin={"socket": sock}, rules=[rule("small", SMALL)],
                   env={"PGUSER": "pd_no_such_role"}):
            r = subprocess.run([os.path.join(pdtest.build_dir(), "pgdualctl"), "-s", sock,
                                "verify", "small"], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn('could not connect to database "app"', r.stderr)
        self.assertIn('role "pd_no_such_role" does not exist', r.stderr)
        self.assertIn("HINT:  The database's old conninfo names no user", r.stderr)

if __name__ == "__main__":
    pdtest.main()
