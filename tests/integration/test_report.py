#!/usr/bin/python3
"""The cutover readiness report (`pgdualctl report DB [--html FILE]`, issue 5): a tables
rule whose name is hostile HTML, divergence produced through the proxy (mirrored writes
whose outcomes differ, a shadow read that differs), a verify, flag flips; the report's
JSON holds exactly the counts, flags, history, verify result and checks expected, only
of its own database; the text summary and the HTML page (one self-contained file with
an SVG chart) show them with every piece of user text escaped and no literal value."""

import datetime
import json
import os
import re
import time
import unittest

import pdtest
from pdtest import direct_query, pg_conninfo
from test_rules import RulesProxy

PID = os.getpid()
OLD = "rp_old_%d" % PID
NEW = "rp_new_%d" % PID
# Rule names may hold anything but spaces, quotes and backslashes: HTML is fair game.
RULE = "rp<script>alert('x')</script>&amp;"
OTHER_RULE = "rp-other"
SECRET = "SECRET-VALUE-%d" % PID  # a literal that must reach no report
ALIAS = "<img src=x onerror=alert(1)>"
ROWS = 5

SEEDED_HISTORY = [
    {"time": "2024-01-01T00:00:00Z", "event": "pause", "by": "uid 0 pid 1", "database": "shop",
     "drained": 3},
    {"time": "2024-01-01T00:00:01Z", "event": "pause", "by": "uid 0 pid 1",
     "database": "other"},
    {"time": "2024-01-01T00:00:02Z", "rule": OTHER_RULE, "writes": "dual", "reads": "old",
     "by": "uid 0 pid 1"},
]


def html_escape(s):
    """What pgdual's page must make of user text."""
    for c, e in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&#39;")):
        s = s.replace(c, e)
    return s


def old(sql, args=()):
    return direct_query(sql, args, dbname=OLD)


def new(sql, args=()):
    return direct_query(sql, args, dbname=NEW)


def create_schema():
    pdtest.fresh_databases(OLD, NEW)
    for db in (OLD, NEW):
        direct_query("CREATE TABLE orders (id int PRIMARY KEY, note text); "
                     "INSERT INTO orders SELECT g, 'n' || g FROM generate_series(1, %d) g"
                     % ROWS, dbname=db)


def epoch_ms(text):
    """pgdual's UTC times, with or without milliseconds."""
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if "." in text else "%Y-%m-%dT%H:%M:%SZ"
    t = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc)
    return int(round(t.timestamp() * 1000))


class ReportTest(pdtest.CtlMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        create_schema()
        cls.dir = pdtest.tmpdir("pdtest-report-")
        with open(os.path.join(cls.dir, "state.json"), "w") as f:
            json.dump({"format": 1, "flags": {}, "history": SEEDED_HISTORY, "checkpoints": {},
                       "verify": {}}, f)
        dbs = [{"name": "shop", "old": pg_conninfo(OLD, user="postgres"),
                "new": pg_conninfo(NEW, user="postgres")},
               {"name": "other", "old": pg_conninfo(OLD, user="postgres")}]
        rules = [{"name": RULE, "database": "shop", "kind": "tables",
                  "tables": ["public.orders"], "writes": "dual", "reads": "old"},
                 {"name": OTHER_RULE, "database": "other", "kind": "columns",
                  "table": "public.orders", "key": ["id"],
                  "columns": [{"old": "note", "new": "id"}], "writes": "old", "reads": "old"}]
        # Admin socket, state and divergence log (every shadow read compared) in cls.dir.
        cls.proxy = RulesProxy(state_dir=cls.dir, rules=rules, databases=dbs).start()
        cls.sock = cls.proxy.admin_socket

    @classmethod
    def tearDownClass(cls):
        pdtest.stop_and_drop(cls.proxy, OLD, NEW)

    # -----------------------------------------------------------------------------------

    def report(self):
        r = self.ctl_json("report", "shop")
        self.assertTrue(r["ok"])
        self.assertNotIn(SECRET, json.dumps(r))
        return r["report"]

    def wait_logged(self, n):
        return pdtest.wait_for(lambda: (lambda e: e if len(e) == n else None)(
            self.proxy.divergence()),
                               20, what="%d divergence events in the log" % n)

    def through_proxy(self, *statements):
        conn = pdtest.connect(self.proxy.port, dbname="shop")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
        finally:
            conn.close()
        # The session's mirror drains and closes on its own: wait for it to be gone.
        pdtest.wait_for(lambda: self.ctl_json("status")["mirrors"]["open"] == 0, 20,
                        what="the mirror connections to close")

    def check(self, rep, name):
        found = [c for c in rep["ready"]["checks"] if c["name"] == name]
        self.assertEqual(len(found), 1, rep["ready"])
        return found[0]

    def assert_series_match_log(self, div, events):
        """Counts per bucket are those of the log's events, bucketed from start by
        bucket_s, per rule and kind."""
        start, width = epoch_ms(div["start"]), div["bucket_s"] * 1000
        expected = {}
        for ev in events:
            counts = expected.setdefault((ev["rule"], ev["kind"]), [0] * div["buckets"])
            counts[(epoch_ms(ev["time"]) - start) // width] += 1
        got = {(s["rule"], s["kind"]): s["counts"] for s in div["series"]}
        self.assertEqual(got, expected)
        self.assertEqual(epoch_ms(div["end"]) - start, div["buckets"] * width)

    # -----------------------------------------------------------------------------------

    def test_1_unknown_database(self):
        r = self.ctl("--json", "report", "nosuch")
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(json.loads(r.stdout),
                         {"ok": False, "error": 'database "nosuch" does not exist',
                          "hint": "pgdualctl status lists the databases; DB is the name "
                                  "clients connect to."})
        r = self.ctl("report", "nosuch")
        self.assertEqual(r.returncode, 1)
        self.assertIn('pgdualctl: database "nosuch" does not exist\nHINT:  ', r.stderr)
        r = self.ctl("report")
        self.assertEqual(r.returncode, 1)
        self.assertIn("usage: report DB", r.stderr)
        r = self.ctl("report", "shop", "--html")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--html needs a file name", r.stderr)

    def test_2_fresh(self):
        rep = self.report()
        self.assertEqual(rep["database"], "shop")
        self.assertTrue(rep["has_new"])
        self.assertEqual([r["name"] for r in rep["rules"]], [RULE])  # not other's rule
        rule = rep["rules"][0]
        self.assertEqual((rule["kind"], rule["writes"], rule["reads"]), ("tables", "dual", "old"))
        self.assertIsNone(rule["last_verify"])
        self.assertEqual(set(rule["counters"].values()), {0})
        self.assertEqual(rule["divergence_since_verify"], 0)
        self.assertEqual(rep["history"], SEEDED_HISTORY[:1])
        div = rep["divergence"]
        self.assertEqual((div["events"], div["buckets"], div["series"], div["recent"]),
                         (0, 0, [], []))
        self.assertEqual((div["logged"], div["window_cut"]), (True, False))
        self.assertFalse(rep["ready"]["ok"])
        self.assertEqual(self.check(rep, "verify_ok"),
                         {"name": "verify_ok", "pass": False, "value": RULE + ": never verified",
                          "title": "the last verify of every rule found no divergence left"})
        self.assertTrue(self.check(rep, "writes")["pass"])

    def test_3_evidence(self):
        # Row 5 is missing on new: the mirrored UPDATEs apply to no row there.
        new("DELETE FROM orders WHERE id = 5")
        update = "UPDATE orders SET note = '%s' WHERE id = 5" % SECRET
        self.through_proxy(update, update)
        self.wait_logged(2)
        r = self.ctl_json("flag", RULE, "reads=shadow")
        self.assertEqual((r["writes"], r["reads"]), ("dual", "shadow"))
        # 5 rows on old, 4 on new: the shadow read differs.
        self.through_proxy("SELECT count(*) AS \"%s\" FROM orders WHERE note <> '%s-not'"
                           % (ALIAS, SECRET))
        events = self.wait_logged(3)
        self.assertEqual([e["kind"] for e in events],
                         ["write_outcome", "write_outcome", "shadow_read"])

        # Set new right, and verify in a later second than the last event's.
        new("INSERT INTO orders VALUES (5, %s)", (SECRET,))
        last = epoch_ms(events[-1]["time"]) // 1000
        pdtest.wait_for(lambda: int(time.time()) > last, 5, what="the next second")
        result = self.ctl_json("verify", RULE)["result"]
        self.assertTrue(result["ok"])
        self.assertEqual((result["rows_checked"], result["divergent"]), (ROWS, 0))

        rep = self.report()
        rule = rep["rules"][0]
        self.assertEqual((rule["writes"], rule["reads"]), ("dual", "shadow"))
        self.assertEqual(rule["counters"], {
            "passed": 1, "rewritten": 2, "refused": 0, "shadow_compared": 1,
            "shadow_mismatched": 1, "shadow_skipped": 0, "aa_compared": 0,
            "aa_mismatched": 0, "mirrored": 2, "mirror_diverged": 2,
            "mirror_unapplied": 0, "mirror_proxy_errors": 0})
        verify = rule["last_verify"]
        self.assertNotIn("keys", verify)
        self.assertEqual((verify["ok"], verify["rows_checked"], verify["divergent"],
                          verify["writes"]), (True, ROWS, 0, "dual"))
        self.assertEqual(rule["divergence_since_verify"], 0)

        self.assertEqual(rep["mirrors"], {"open": 0, "connecting": 0, "detached": 0,
                                          "queued": 0, "scope": "database"})
        history = rep["history"]
        self.assertEqual(len(history), 2, history)
        self.assertEqual(history[0], SEEDED_HISTORY[0])
        self.assertEqual({k: history[1][k] for k in ("rule", "writes", "reads")},
                         {"rule": RULE, "writes": "dual", "reads": "shadow"})
        self.assertTrue(history[1]["by"].startswith("uid "), history[1])

        div = rep["divergence"]
        self.assertEqual(div["events"], 3)
        self.assertEqual([(s["rule"], s["kind"], s["total"]) for s in div["series"]],
                         [(RULE, "shadow_read", 1), (RULE, "write_outcome", 2)])
        self.assert_series_match_log(div, events)
        self.assertEqual([(e["rule"], e["kind"], e["statement"]) for e in div["recent"]],
                         [(RULE, "write_outcome", "UPDATE orders SET note = $1 WHERE id = $2")] * 2
                         + [(RULE, "shadow_read", "SELECT count(*) AS \"%s\" FROM orders "
                             "WHERE note <> $1" % ALIAS)])

        self.assertTrue(rep["ready"]["ok"], rep["ready"])
        values = {c["name"]: c["value"] for c in rep["ready"]["checks"]}
        self.assertEqual(values, {
            "writes": RULE + ": dual",
            "mirrors_connected": "0 open, 0 connecting, 0 detached",
            "mirrors_caught_up": "0 statements queued (at most 2000)",
            "verify_ok": "%s: ok at %s" % (RULE, verify["time"]),
            "no_divergence_since_verify": "%s: 0 since %s" % (RULE, verify["time"])})
        type(self).verify_time = verify["time"]

        r = self.ctl("report", "shop")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('Cutover readiness of database "shop": READY', r.stdout)
        self.assertNotIn(SECRET, r.stdout)

    def test_4_divergence_after_verify_and_a_flag_flip(self):
        new("DELETE FROM orders WHERE id = 5")
        self.through_proxy("UPDATE orders SET note = '%s' WHERE id = 5" % SECRET)
        self.wait_logged(4)
        rep = self.report()
        self.assertFalse(rep["ready"]["ok"])
        self.assertEqual(self.check(rep, "no_divergence_since_verify")["value"],
                         "%s: 1 since %s" % (RULE, self.verify_time))
        self.assertFalse(self.check(rep, "no_divergence_since_verify")["pass"])
        self.assertTrue(self.check(rep, "verify_ok")["pass"])
        self.assertEqual(rep["rules"][0]["divergence_since_verify"], 1)
        self.assertEqual(rep["divergence"]["series"][1]["total"], 3)

        self.ctl_json("flag", RULE, "writes=old", "reads=old")
        rep = self.report()
        self.assertEqual(self.check(rep, "writes"),
                         {"name": "writes", "title": "every rule at writes=dual", "pass": False,
                          "value": RULE + ": old"})
        self.assertEqual([(h.get("rule"), h.get("writes"), h.get("reads"), h.get("event"))
                          for h in rep["history"]],
                         [(None, None, None, "pause"), (RULE, "dual", "shadow", None),
                          (RULE, "old", "old", None)])

        r = self.ctl("report", "shop")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn('Cutover readiness of database "shop": NOT READY', r.stdout)
        self.assertRegex(r.stdout, r"\n  FAIL  writes +%s: old\n" % re.escape(RULE))
        self.assertRegex(r.stdout, r"\n  ok    verify_ok ")
        self.assertIn("\nhistory (newest 3 of 3):\n", r.stdout)
        self.assertEqual(r.stdout.count("| flags of %s |" % RULE), 2, r.stdout)
        self.assertRegex(r.stdout,
                         r'\| pause +\| uid 0 pid 1 +\| \{"database":"shop","drained":3\}')

    def test_5_html(self):
        path = os.path.join(self.dir, "report.html")
        r = self.ctl("--json", "report", "shop", "--html", path)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["report"]["database"], "shop")
        with open(path, encoding="utf-8") as f:
            page = f.read()
        self.assertTrue(page.startswith("<!DOCTYPE html>"))
        self.assertIn("<svg", page)
        # One bar (a <rect> with its <title>) per bucket and series with events.
        series = json.loads(r.stdout)["report"]["divergence"]["series"]
        self.assertEqual(page.count("<rect"), sum(1 for s in series for n in s["counts"] if n))
        self.assertEqual(page.count("<title>" + html_escape(RULE) + " / write_outcome: "),
                         sum(1 for n in series[1]["counts"] if n))
        self.assertIn("Not ready for cutover", page)
        # User text only escaped; no literal value, no script, nothing fetched from elsewhere.
        self.assertNotIn(RULE, page)
        self.assertGreaterEqual(page.count(html_escape(RULE)), 8)
        self.assertIn(html_escape('AS "%s" FROM orders' % ALIAS), page)
        self.assertNotIn("<img", page)
        self.assertNotIn("<script", page)
        self.assertNotIn(SECRET, page)
        self.assertEqual(page.count("http"), 1)  # the SVG namespace
        self.assertFalse(os.path.exists(path + ".tmp"))

        r = self.ctl("report", "shop", "--html", os.path.join(self.dir, "no", "such.html"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("could not write the HTML report", r.stderr)


if __name__ == "__main__":
    pdtest.main()
