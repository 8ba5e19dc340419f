#!/usr/bin/python3
"""Rollback triggers (issue 5): `switchover DB --watch DURATION --max-divergence N
--max-error-rate R` keeps watching after the flip and rolls back on its own when new passes
a threshold within the window (a divergence provoked behind pgdual's back; client errors
that appear only on new), records why, and status and report show it; a quiet window
passes; an operator's rollback ends a watch; bad arguments are refused with what to do.
Also: switchover and rollback flip a `kind: columns` rule, and the columns stay in step
through every phase."""

import os
import time
import unittest

import pdtest
from pdtest import Proxy, direct_query, pg_conninfo

PID = os.getpid()
OLD = "wt_old_%d" % PID
NEW = "wt_new_%d" % PID
COLS = "wt_cols_%d" % PID
DB = "shop"
RULE = "shop-to-green"
COLS_RULE = "cols-email"

SCHEMA = """
CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL
    DEFAULT 0);
INSERT INTO accounts (owner) SELECT 'owner ' || g FROM generate_series(1, 20) g;
"""


def old(sql, args=()):
    return direct_query(sql, args, dbname=OLD)


def new(sql, args=()):
    return direct_query(sql, args, dbname=NEW)


def cols(sql, args=()):
    return direct_query(sql, args, dbname=COLS)


class WatchTest(pdtest.CtlMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        pdtest.fresh_databases(OLD, NEW, COLS)
        for db in (OLD, NEW):
            direct_query(SCHEMA, dbname=db)
        cols("CREATE TABLE users (id bigserial PRIMARY KEY, email text, email_address text)")
        cls.dir = pdtest.tmpdir("pdtest-watch-")
        cls.sock = os.path.join(cls.dir, "admin.sock")
        cls.state = os.path.join(cls.dir, "state.json")
        dbs = [{"name": DB, "old": pg_conninfo(OLD, user="postgres"),
                "new": pg_conninfo(NEW, user="postgres")},
               {"name": COLS, "old": pg_conninfo(COLS, user="postgres")}]
        rules = [{"name": RULE, "database": DB, "kind": "tables", "writes": "dual",
                  "reads": "old", "mirror": {"commit": "async", "on_failure": "record"}},
                 {"name": COLS_RULE, "database": COLS, "kind": "columns",
                  "table": "public.users", "key": ["id"],
                  "columns": [{"old": "email", "new": "email_address", "up": "lower(email)",
                               "down": "email_address"}],
                  "writes": "dual", "reads": "old"}]
        cls.proxy = Proxy(databases=dbs, admin={"socket": cls.sock}, state=cls.state,
                          rules=rules, divergence={"log": os.path.join(cls.dir, "div.jsonl")},
                          stop_timeout=30).start()

    @classmethod
    def tearDownClass(cls):
        pdtest.stop_and_drop(cls.proxy, OLD, NEW, COLS)

    # -----------------------------------------------------------------------------------

    def connect(self, dbname=DB):
        conn = pdtest.connect(self.proxy.port, dbname=dbname)
        conn.autocommit = True
        return conn

    def flags(self, rule=RULE):
        r = [r for r in self.ctl_json("rules")["rules"] if r["name"] == rule][0]
        return r["writes"], r["reads"]

    def events(self):
        return [e for e in self.state_doc()["history"] if "event" in e]

    def verified(self, repair=False):
        """A passing verify of the shop rule, newer than any divergence: what switchover
        asks for."""
        time.sleep(1.1)  # verify times are seconds: later than the last divergence
        if repair:
            self.ctl_json("verify", RULE, "--repair")
        res = self.ctl_json("verify", RULE)["result"]
        self.assertTrue(res["ok"], res)
        self.assertFalse(self.ctl_json("switchover", DB, "--dry-run")["would_refuse"])

    def mirrors_idle(self):
        pdtest.wait_for(lambda: self.ctl_json("status")["mirrors"]["queued"] == 0, 30,
                        what="the mirrors to catch up")

    def watch_of(self, db=DB):
        return [w for w in self.ctl_json("status")["watches"] if w["database"] == db]

    def requests(self, n, conn=None):
        c = conn or self.connect()
        cur = c.cursor()
        for i in range(n):
            cur.execute("SELECT %s::int", (i,))
            cur.fetchall()
        if conn is None:
            c.close()

    def wait_rolled_back(self, timeout=15):
        pdtest.wait_for(lambda: self.flags() == ("dual", "old"), timeout,
                        what="the automatic rollback")

    # -----------------------------------------------------------------------------------

    def test_1_divergence_rolls_back(self):
        self.mirrors_idle()
        self.verified()
        r = self.ctl_json("switchover", DB, "--watch", "30s", "--max-divergence", "0")
        self.assertEqual(self.flags(), ("dual-new", "new"))
        w = r["watch"]
        self.assertEqual((w["window_s"], w["max_divergence"], w["max_error_rate"]),
                         (30, 0, None))
        active = self.watch_of()
        self.assertEqual(len(active), 1)
        self.assertEqual(active[0]["state"], "watching")
        self.assertEqual(active[0]["divergence"], 0)
        # Behind pgdual's back old gets the row first: the mirrored insert fails there
        # while new (authoritative now) took it, a divergence.
        old("INSERT INTO accounts (id, owner) VALUES (100001, 'only on old')")
        conn = self.connect()
        conn.cursor().execute("INSERT INTO accounts (id, owner) VALUES (100001, 'via pgdual')")
        conn.close()
        self.wait_rolled_back()
        status = self.ctl_json("status")
        self.assertEqual(status["watches"], [])
        last = [a for a in status["auto_rollbacks"] if a["database"] == DB]
        self.assertEqual(len(last), 1, status["auto_rollbacks"])
        self.assertEqual((last[0]["threshold"], last[0]["observed"], last[0]["limit"]),
                         ("max_divergence", 1, 0))
        self.assertEqual(last[0]["reason"], "1 divergence events since the switch, more "
                                            "than --max-divergence 0")
        ev = self.events()
        self.assertEqual([e["event"] for e in ev[-2:]], ["switchover", "auto_rollback"])
        self.assertEqual(ev[-2]["watch"]["max_divergence"], 0)
        auto = ev[-1]
        self.assertTrue(auto["by"].startswith("pgdual watch (switchover by uid "), auto)
        self.assertEqual((auto["database"], auto["divergence"], auto["attempts"]), (DB, 1, 1))
        self.assertIn("pause_ms", auto)
        log = self.proxy.log()
        self.assertIn('switchover watch of database "shop": 1 divergence events since the '
                      'switch, more than --max-divergence 0; rolling back to old', log)
        self.assertIn('database "shop" rolled back automatically to old', log)
        self.assertNotIn("via pgdual", log)
        self.assertNotIn("only on old", log)
        # Sessions talk to old again: a new write lands there first.
        conn = self.connect()
        conn.cursor().execute("UPDATE accounts SET balance = 7 WHERE id = 2")
        conn.close()
        self.assertEqual(old("SELECT balance FROM accounts WHERE id = 2"), [(7,)])
        # The report shows the watch's events too.
        rep = self.ctl_json("report", DB)["report"]
        self.assertEqual(rep["watch"]["active"], [])
        self.assertEqual([e["event"] for e in rep["watch"]["events"]][-2:],
                         ["switchover", "auto_rollback"])
        text = self.ctl("report", DB).stdout
        self.assertIn("rollback watch: none running", text)
        self.assertIn("auto_rollback", text)
        html = os.path.join(self.dir, "report.html")
        self.ctl("report", DB, "--html", html)
        with open(html) as f:
            page = f.read()
        self.assertIn("Rollback watch", page)
        self.assertIn("auto_rollback", page)
        # Old is right (it is authoritative again): new is set back from it.
        self.mirrors_idle()
        self.verified(repair=True)
        self.assertEqual(new("SELECT owner FROM accounts WHERE id = 100001"),
                         [("only on old",)])

    def test_2_error_rate_rolls_back(self):
        self.mirrors_idle()
        self.verified()
        # Before the switch: requests without errors, the rate to compare with.
        conn = self.connect()
        self.requests(150, conn)
        # The application still reads a table the new schema no longer has.
        old("CREATE TABLE legacy_notes (id int)")
        try:
            r = self.ctl_json("switchover", DB, "--watch", "60s", "--max-error-rate", "20%")
            w = r["watch"]
            self.assertEqual((w["max_error_rate"], w["max_divergence"]), (0.2, None))
            self.assertGreaterEqual(w["before"]["requests"], 150)
            self.assertEqual((w["before"]["errors"], w["rate_before"]), (0, 0))
            cur = conn.cursor()
            errors = 0
            for i in range(300):
                try:
                    cur.execute("SELECT count(*) FROM legacy_notes" if i % 2 else "SELECT 1")
                    cur.fetchall()
                except Exception:  # noqa: BLE001 - counted: the point of the test
                    errors += 1
            self.assertGreaterEqual(errors, 50)
            self.wait_rolled_back()
            # Back on old the same read works.
            cur.execute("SELECT count(*) FROM legacy_notes")
            self.assertEqual(cur.fetchall(), [(0,)])
        finally:
            conn.close()
            old("DROP TABLE IF EXISTS legacy_notes")
        last = [a for a in self.ctl_json("status")["auto_rollbacks"] if a["database"] == DB]
        self.assertEqual(last[0]["threshold"], "max_error_rate")
        self.assertGreater(last[0]["observed"], 0.2)
        self.assertAlmostEqual(last[0]["limit"], 0.2)
        self.assertRegex(last[0]["reason"], r"^client error rate 0\.\d+ since the switch "
                         r"\(\d+ errors in \d+ requests\), above the rate before it "
                         r"\(0\.0000\) plus --max-error-rate 0\.2$")
        auto = self.events()[-1]
        self.assertEqual(auto["event"], "auto_rollback")
        self.assertGreaterEqual(auto["requests"], 100)
        self.assertEqual(auto["divergence"], 0)

    def test_3_quiet_window_passes(self):
        self.mirrors_idle()
        self.verified()
        self.ctl_json("switchover", DB, "--watch", "2s", "--max-divergence", "0",
                      "--max-error-rate", "0.5")
        self.assertEqual(len(self.watch_of()), 1)
        self.requests(20)
        pdtest.wait_for(lambda: self.watch_of() == [], 10, what="the watch to end")
        self.assertEqual(self.flags(), ("dual-new", "new"))
        ev = self.events()[-1]
        self.assertEqual(ev["event"], "watch_passed")
        self.assertEqual((ev["database"], ev["divergence"], ev["window_s"]), (DB, 0, 2))
        self.assertGreaterEqual(ev["requests"], 20)
        self.assertIn('switchover watch of database "shop" passed', self.proxy.log())
        self.ctl_json("rollback", DB)
        self.assertEqual(self.flags(), ("dual", "old"))

    def test_4_operator_rollback_ends_the_watch(self):
        self.mirrors_idle()
        self.verified()
        self.ctl_json("switchover", DB, "--watch", "1h", "--max-divergence", "3")
        w = self.watch_of()[0]
        self.assertEqual((w["state"], w["max_divergence"], w["max_error_rate"]),
                         ("watching", 3, None))
        self.assertGreater(w["remaining_s"], 3500)
        self.assertIsNone(w["reason"])
        human = self.ctl("status").stdout
        self.assertIn("watches:", human)
        self.assertIn("watching", human)
        text = self.ctl("report", DB).stdout
        self.assertIn("rollback watch: watching until", text)
        self.ctl_json("rollback", DB)
        self.assertEqual(self.watch_of(), [])
        ev = self.events()
        self.assertEqual([e["event"] for e in ev[-2:]], ["watch_ended", "rollback"])
        self.assertEqual(ev[-2]["reason"], "an operator's rollback")
        self.assertTrue(ev[-2]["by"].startswith("uid "))

    def test_5_bad_arguments(self):
        cases = [
            (("switchover", DB, "--max-divergence", "0"),
             "--max-divergence and --max-error-rate are thresholds of a watch: give --watch "
             "DURATION too", "--watch 10m"),
            (("switchover", DB, "--watch", "10m"), "--watch needs a threshold to watch",
             "Add --max-divergence N, --max-error-rate R, or both."),
            (("switchover", DB, "--watch", "10x", "--max-divergence", "0"),
             '--watch takes a duration such as 90s, 10m or 1h (plain numbers are seconds), '
             'from 1 s to 7 days; not "10x"', "--watch DURATION"),
            (("switchover", DB, "--watch", "0", "--max-divergence", "0"),
             'not "0"', None),
            (("switchover", DB, "--watch", "8d", "--max-divergence", "0"), 'not "8d"', None),
            (("switchover", DB, "--watch", "1m", "--max-divergence", "-1"),
             '--max-divergence takes a whole number of divergence events, 0 or more; not '
             '"-1"', None),
            (("switchover", DB, "--watch", "1m", "--max-error-rate", "2"),
             '--max-error-rate takes errors per request from 0 to 1, such as 0.05 or 5%; '
             'not "2"', None),
            (("switchover", DB, "--watch", "1m", "--max-error-rate", "lots"), 'not "lots"',
             None),
            (("switchover", DB, "--max-divergence", "1", "--watch"),
             'missing value of option "--watch"', None),
            (("rollback", DB, "--watch", "1m", "--max-divergence", "0"),
             'unknown option "--watch"', "Usage: rollback DB"),
        ]
        for args, error, hint in cases:
            r = self.ctl_json(*args, expect_rc=1)
            self.assertIn(error, r["error"], args)
            if hint is not None:
                self.assertIn(hint, r["hint"], args)
        # People see the message and the hint.
        r = self.ctl("switchover", DB, "--watch", "10m")
        self.assertEqual(r.returncode, 1)
        self.assertIn("pgdualctl: --watch needs a threshold to watch\nHINT:  Add", r.stderr)
        self.assertEqual(self.flags(), ("dual", "old"))
        self.assertEqual(self.watch_of(), [])
        # A dry run shows the watch in its plan; the help names the flags.
        dry = self.ctl_json("switchover", DB, "--dry-run", "--watch", "90s",
                            "--max-error-rate", "0.05")
        self.assertEqual(dry["plan"][-1], "watch for 90 s after the flip: roll back on an "
                         "error rate above the rate before plus 0.05 (after 100 requests)")
        helptext = self.ctl("--help").stdout
        for flag in ("--watch DURATION", "--max-divergence N", "--max-error-rate R"):
            self.assertIn(flag, helptext)

    def test_6_columns_rule_switchover_and_rollback(self):
        conn = self.connect(COLS)
        cur = conn.cursor()

        def in_step():
            # Rows written through the old column: new = up(old); through the new one:
            # old = down(new). With these rules and values both hold for every row.
            bad = cols("SELECT id, email, email_address FROM users WHERE email_address IS "
                       "DISTINCT FROM lower(email) OR email IS DISTINCT FROM email_address")
            self.assertEqual(bad, [])

        def write(phase):
            cur.execute("INSERT INTO users (email) VALUES (%s) RETURNING id",
                        ("%s@old.example" % phase,))
            via_old = cur.fetchone()[0]
            cur.execute("INSERT INTO users (email_address) VALUES (%s) RETURNING id",
                        ("%s@new.example" % phase,))
            via_new = cur.fetchone()[0]
            cur.execute("UPDATE users SET email_address = %s WHERE id = %s",
                        ("%s-upd@new.example" % phase, via_old))
            cur.execute("UPDATE users SET email = %s WHERE id = %s",
                        ("%s-upd@old.example" % phase, via_new))
            self.assertEqual(cols("SELECT email, email_address FROM users WHERE id IN (%s, %s) "
                                  "ORDER BY id", (via_old, via_new)),
                             [("%s-upd@new.example" % phase,) * 2,
                              ("%s-upd@old.example" % phase,) * 2])
            in_step()

        write("dual")
        res = self.ctl_json("verify", COLS_RULE)["result"]
        self.assertTrue(res["ok"], res)
        r = self.ctl_json("switchover", COLS)
        self.assertEqual(r["rules"], [{"rule": COLS_RULE, "writes": "dual-new", "reads": "new"}])
        self.assertEqual(self.flags(COLS_RULE), ("dual-new", "new"))
        self.assertEqual(self.flags(RULE), ("dual", "old"))  # other databases stay
        write("dualnew")
        # Reads come from the new column now (through `down`): a row whose columns are made
        # to differ behind pgdual's back shows which one is read.
        cur.execute("INSERT INTO users (email) VALUES ('probe@x') RETURNING id")
        probe = cur.fetchone()[0]
        cols("UPDATE users SET email_address = 'probe-new@x' WHERE id = %s", (probe,))
        cur.execute("SELECT email FROM users WHERE id = %s", (probe,))
        self.assertEqual(cur.fetchall(), [("probe-new@x",)])
        r = self.ctl_json("rollback", COLS)
        self.assertEqual(r["rules"], [{"rule": COLS_RULE, "writes": "dual", "reads": "old"}])
        self.assertEqual(self.flags(COLS_RULE), ("dual", "old"))
        cur.execute("SELECT email FROM users WHERE id = %s", (probe,))
        self.assertEqual(cur.fetchall(), [("probe@x",)])
        cur.execute("DELETE FROM users WHERE id = %s", (probe,))
        write("back")
        conn.close()
        res = self.ctl_json("verify", COLS_RULE)["result"]
        self.assertTrue(res["ok"], res)
        self.assertEqual(cols("SELECT count(*) FROM users")[0][0], 6)
        events = [e["event"] for e in self.events() if e.get("database") == COLS]
        self.assertEqual(events, ["switchover", "rollback"])

    def test_7_rollback_retried_until_it_drains(self):
        self.mirrors_idle()
        self.verified()
        self.ctl_json("switchover", DB, "--watch", "60s", "--max-divergence", "0",
                      "--timeout", "300")
        # A transaction left open keeps the rollback from draining within 300 ms.
        a = self.connect()
        a.cursor().execute("BEGIN")
        a.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
        old("INSERT INTO accounts (id, owner) VALUES (100002, 'only on old')")
        b = self.connect()
        b.cursor().execute("INSERT INTO accounts (id, owner) VALUES (100002, 'via pgdual')")
        w = pdtest.wait_for(lambda: [w for w in self.watch_of() if w["attempts"] >= 1 and
                                     w["state"] == "rollback pending"], 10,
                            what="a failed rollback attempt")[0]
        self.assertIn("transactions in flight did not drain within 300 ms",
                      w["last_failure"])
        self.assertEqual(w["reason"], "1 divergence events since the switch, more than "
                                      "--max-divergence 0")
        self.assertEqual(self.flags(), ("dual-new", "new"))
        # No pause is kept meanwhile: the other session goes on.
        b.cursor().execute("UPDATE accounts SET balance = balance + 1 WHERE id = 4")
        names = [e["event"] for e in self.events()]
        self.assertIn("auto_rollback_failed", names)
        self.assertIn("switchover_abandoned", names)
        a.cursor().execute("COMMIT")
        self.wait_rolled_back(timeout=20)
        auto = self.events()[-1]
        self.assertEqual(auto["event"], "auto_rollback")
        self.assertGreaterEqual(auto["attempts"], 2)
        self.assertIn('automatic rollback of database "shop" (attempt 1) did not happen: '
                      'transactions in flight did not drain within 300 ms; trying again in 1 s',
                      self.proxy.log())
        a.close()
        b.close()
        self.mirrors_idle()
        self.verified(repair=True)

    def test_8_shutdown_ends_a_watch(self):
        self.verified()
        self.ctl_json("switchover", DB, "--watch", "1h", "--max-divergence", "0")
        self.assertEqual(len(self.watch_of()), 1)
        self.proxy.stop()  # raises on a sanitizer report (a leaked watch, say)
        ev = self.events()[-1]
        self.assertEqual((ev["event"], ev["reason"], ev["by"]),
                         ("watch_ended", "pgdual is stopping", "pgdual"))
        # A restart keeps the flags (state) but not the watch (it lived in the process).
        self.proxy.start()
        self.assertEqual(self.flags(), ("dual-new", "new"))
        self.assertEqual(self.watch_of(), [])
        self.ctl_json("rollback", DB)


if __name__ == "__main__":
    pdtest.main()
