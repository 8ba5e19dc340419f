#!/usr/bin/python3
"""Operator jobs of `kind: tables` rules (blue/green: old database -> new database, with
renamed and transformed columns), through pgdualctl against two real databases:
backfill of 200k rows cancelled, killed with a lost checkpoint, resumed, and identical
through the mapping (sequences too), refused into non-empty tables; verify finding
exactly the rows changed, deleted and added on new (a serial key and a composite key),
--repair fixing them; a table without a key (counts only); verify while the application
writes both sides (the re-check drops rows in flight); --touched on a fresh process
(unknown -> full verify) and, through tests/integration/touched_verify.c, with touched
keys recorded the way the proxy's mirror records them; errors."""

import json
import os
import random
import subprocess
import threading
import time
import unittest

import pdtest
from pdtest import Proxy, direct_query, pg_conninfo

PID = os.getpid()
OLD = "tj_old_%d" % PID
NEW = "tj_new_%d" % PID
BIG_ROWS = 200000
CUSTOMERS = 20000
LINES = 5000
NOTES = 100
MARKER = "DIVERGENT-VALUE-%d" % PID  # must never reach the log

MAPPING = [{"old": "email", "new": "email_address", "up": "lower(email)",
            "down": "email_address"},
           {"old": "name", "new": "full_name"}]


def old(text, args=()):
    return direct_query(text, args, dbname=OLD)


def new(text, args=()):
    return direct_query(text, args, dbname=NEW)


def tables_rule(name, tables, columns=()):
    rule = {"name": name, "database": "shop", "kind": "tables", "tables": list(tables),
            "writes": "old", "reads": "old"}
    if columns:
        rule["columns"] = list(columns)
    return rule


# Each table's rows through the mapping, in key order, as one hash per side.
CUSTOMERS_OLD = ("SELECT md5(string_agg(ROW(id, lower(email), name, visits)::text, ',' "
                 "ORDER BY id)) FROM customers")
CUSTOMERS_NEW = ("SELECT md5(string_agg(ROW(id, email_address, full_name, visits)::text, ',' "
                 "ORDER BY id)) FROM customers")
LINES_BOTH = ("SELECT md5(string_agg(ROW(order_id, line_no, sku, qty)::text, ',' "
              "ORDER BY order_id, line_no)) FROM lines")


def create_schema():
    pdtest.fresh_databases(OLD, NEW)
    for run, email, name in ((old, "email", "name"), (new, "email_address", "full_name")):
        run("CREATE TABLE big (id bigserial PRIMARY KEY, %s text, %s text, visits int)"
            % (email, name))
        run("CREATE TABLE customers (id serial PRIMARY KEY, %s text, %s text, "
            "visits int NOT NULL DEFAULT 0)" % (email, name))
        run("CREATE TABLE lines (order_id int, line_no int, sku text, qty int, "
            "PRIMARY KEY (order_id, line_no))")
        run("CREATE TABLE notes (body text, n int)")
        run("CREATE TABLE ghost_ok (id int PRIMARY KEY)")
    old("CREATE TABLE ghost (id int PRIMARY KEY)")  # on old only
    old("INSERT INTO big (email, name, visits) SELECT 'User' || g || '@Example.ORG', "
        "'Name ' || g, mod(g, 7) FROM generate_series(1, %d) g" % BIG_ROWS)
    old("INSERT INTO customers (email, name, visits) SELECT 'C' || g || '@X.org', 'N' || g, 0 "
        "FROM generate_series(1, %d) g" % CUSTOMERS)
    new("INSERT INTO customers (email_address, full_name, visits) SELECT 'c' || g || '@x.org', "
        "'N' || g, 0 FROM generate_series(1, %d) g" % CUSTOMERS)
    for run in (old, new):
        run("INSERT INTO lines SELECT g / 10, mod(g, 10), 'sku' || g, mod(g, 5) "
            "FROM generate_series(0, %d) g" % (LINES - 1))
        run("INSERT INTO notes SELECT 'note ' || g, g FROM generate_series(1, %d) g" % NOTES)
    for run in (old, new):
        run("ANALYZE")


class TablesJobsTest(pdtest.CtlMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        create_schema()
        cls.dir = pdtest.tmpdir("pdtest-tjobs-")
        cls.sock = os.path.join(cls.dir, "admin.sock")
        cls.state = os.path.join(cls.dir, "state.json")
        dbs = [{"name": "shop", "old": pg_conninfo(OLD, user="postgres"),
                "new": pg_conninfo(NEW, user="postgres")},
               {"name": "app", "old": pg_conninfo("app", user="postgres")}]
        rules = [tables_rule("big-move", ["public.big"], MAPPING),
                 tables_rule("shop", ["public.customers", "public.lines"], MAPPING),
                 tables_rule("loose", ["public.notes"]),
                 tables_rule("ghost", ["public.ghost_ok", "public.ghost"]),
                 tables_rule("nosuch", ["public.no_such_table"]),
                 {"name": "cols", "database": "app", "kind": "columns",
                  "table": "public.tj_whatever", "key": ["id"],
                  "columns": [{"old": "a", "new": "b"}], "writes": "old", "reads": "old"}]
        cls.proxy = Proxy(databases=dbs, admin={"socket": cls.sock}, state=cls.state,
                          rules=rules, stop_timeout=30).start()

    @classmethod
    def tearDownClass(cls):
        pdtest.stop_and_drop(cls.proxy, OLD, NEW)

    # -----------------------------------------------------------------------------------

    def checkpoint(self, rule):
        return self.state_doc()["checkpoints"].get("backfill/" + rule)

    def assert_shop_identical(self):
        self.assertEqual(old(CUSTOMERS_OLD), new(CUSTOMERS_NEW))
        self.assertEqual(old(LINES_BOTH), new(LINES_BOTH))

    @staticmethod
    def divergent_keys(result):
        return {(table, k["kind"], tuple(sorted(k["key"].items())))
                for table, keys in result["keys"].items() for k in keys}

    @staticmethod
    def by_table(result):
        return {t["table"]: t for t in result["tables"]}

    # -----------------------------------------------------------------------------------

    def test_1_backfill_cancelled_killed_resumed(self):
        # First run: cancelled through pgdualctl after some batches.
        jid = self.ctl_json("backfill", "big-move", "--batch", "5000", "--throttle", "20",
                            "--detach")["job"]
        self.wait_job(jid, lambda j: j["rows_done"] >= 40000 or j["state"] != "running",
                      "the backfill to copy 40000 rows")
        self.assertEqual(self.ctl_json("cancel", str(jid))["state"], "cancelling")
        j = self.wait_job(jid, lambda j: j["state"] != "running", "the cancel")
        self.assertEqual(j["state"], "cancelled", j)
        self.assertIn("public.big: copying", j["phase"])
        ck = self.checkpoint("big-move")
        first = ck["rows_done"]
        self.assertTrue(40000 <= first < BIG_ROWS, ck)
        self.assertEqual(first % 5000, 0)
        self.assertEqual(ck["last_key"], [str(first)])  # ids 1..N: the N-th key is N
        self.assertEqual(ck["tables"], ["public.big"])
        self.assertEqual(new("SELECT count(*), max(id) FROM big")[0], (first, first))

        # Second run: pgdual is killed; then its checkpoint is set back one batch, as when
        # pgdual dies after a batch's COMMIT on new and before its checkpoint is written.
        jid = self.ctl_json("backfill", "big-move", "--batch", "5000", "--throttle", "50",
                            "--detach")["job"]
        j = self.wait_job(jid, lambda j: j["rows_done"] >= first + 30000
                          or j["state"] != "running", "the resumed backfill to progress")
        self.assertEqual(j["resumed_from"], first)
        self.proxy.proc.kill()
        self.proxy.proc.wait()
        self.proxy.proc = None
        self.proxy._logf.close()
        copied = new("SELECT count(*) FROM big")[0][0]
        self.assertTrue(first + 30000 <= copied < BIG_ROWS, copied)
        doc = self.state_doc()
        doc["checkpoints"]["backfill/big-move"].update(last_key=[str(copied - 5000)],
                                                       rows_done=copied - 5000)
        with open(self.state, "w") as f:
            json.dump(doc, f)
        self.proxy.start()

        # Third run, followed to the end: the batch past the checkpoint is not copied twice.
        r = self.ctl("--json", "backfill", "big-move", "--batch", "5000")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        final = json.loads(r.stdout)
        self.assertEqual(final["state"], "done")
        res = final["result"]
        self.assertEqual(res["resumed_from"], copied)
        self.assertEqual(res["rows_done"], BIG_ROWS)
        self.assertEqual(res["rows_copied"], BIG_ROWS - copied)
        self.assertEqual(res["tables"], [{"table": "public.big", "rows": BIG_ROWS - copied,
                                          "sequences": 1}])
        self.assertIn("5000 rows were copied after the last checkpoint", self.proxy.log())
        self.assertRegex(r.stderr, r"backfill big-move: \d+% \(\d+/\d+ rows, \d+ rows/s, "
                                   r"ETA [^;]*; public\.big: copying\)")
        self.assertIsNone(self.checkpoint("big-move"))
        mapped_old = ("SELECT md5(string_agg(ROW(id, lower(email), name, visits)::text, ',' "
                      "ORDER BY id)) FROM big")
        mapped_new = ("SELECT md5(string_agg(ROW(id, email_address, full_name, visits)::text, "
                      "',' ORDER BY id)) FROM big")
        self.assertEqual(old(mapped_old), new(mapped_new))
        # The sequence behind the serial key goes on where old's is.
        self.assertEqual(new("SELECT nextval('big_id_seq')")[0][0], BIG_ROWS + 1)
        res = self.ctl_json("verify", "big-move")["result"]
        self.assertEqual((res["rows_checked"], res["divergent"]), (BIG_ROWS, 0))

        # A fresh backfill into tables that have rows is refused, saying what to do.
        r = self.ctl("backfill", "big-move")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("backfill of rule \"big-move\" refused: 1 table on the new side already "
                      "has rows: public.big", r.stderr)
        self.assertIn("TRUNCATE", r.stderr)
        self.assertIn("pgdualctl verify big-move --repair", r.stderr)

    def test_2_verify_finds_and_repairs(self):
        self.assertEqual(self.ctl_json("verify", "shop")["result"]["divergent"], 0)
        new("UPDATE customers SET email_address = %s WHERE id IN (1, 1000, 1001)", (MARKER,))
        new("UPDATE customers SET visits = 5 WHERE id = 15000")
        new("DELETE FROM customers WHERE id IN (999, 20000)")
        new("INSERT INTO customers (id, email_address) VALUES (20001, %s), (0, NULL)",
            (MARKER,))
        new("UPDATE lines SET qty = 99 WHERE (order_id, line_no) = (3, 2)")
        new("DELETE FROM lines WHERE (order_id, line_no) = (499, 9)")
        new("INSERT INTO lines VALUES (500, 0, 'x', 1)")
        want = {("public.customers", "different", (("id", str(i)),)) for i in (1, 1000, 1001,
                                                                              15000)}
        want |= {("public.customers", "missing", (("id", str(i)),)) for i in (999, 20000)}
        want |= {("public.customers", "extra", (("id", str(i)),)) for i in (0, 20001)}
        want |= {("public.lines", "different", (("line_no", "2"), ("order_id", "3"))),
                 ("public.lines", "missing", (("line_no", "9"), ("order_id", "499"))),
                 ("public.lines", "extra", (("line_no", "0"), ("order_id", "500")))}

        found = self.ctl_json("verify", "shop", "--batch", "1000", expect_rc=1)
        res = found["result"]
        self.assertEqual(self.divergent_keys(res), want)
        self.assertEqual((res["divergent"], res["missing"], res["extra"], res["different"]),
                         (11, 3, 3, 5))
        self.assertEqual(res["rows_checked"], CUSTOMERS + 2 + LINES + 1)  # old's, and extras
        self.assertFalse(res["ok"])
        tables = self.by_table(res)
        self.assertEqual(tables["public.customers"]["key"], ["id"])
        self.assertEqual(tables["public.lines"]["key"], ["order_id", "line_no"])
        self.assertEqual((tables["public.lines"]["missing"], tables["public.lines"]["extra"],
                          tables["public.lines"]["different"]), (1, 1, 1))
        self.assertEqual(tables["public.customers"]["mode"], "full")
        recorded = self.state_doc()["verify"]["shop"]
        self.assertEqual((recorded["divergent"], recorded["ok"]), (11, False))
        shown = [r for r in self.ctl_json("rules")["rules"] if r["name"] == "shop"][0]
        self.assertEqual(shown["last_verify"]["divergent"], 11)
        self.assertNotIn("keys", shown["last_verify"])

        # For people: per-table counts and the keys by table; then the repair.
        r = self.ctl("verify", "shop", "--repair", "--batch", "700")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("11 divergent (3 missing on new, 3 extra on new, 5 different), "
                      "11 repaired", r.stdout)
        self.assertRegex(r.stdout, r"public\.lines +\| full +\| 5001 +\| 3 +\| 1 +\| 1 +\| 1 "
                                   r"+\| 3")
        self.assertRegex(r.stdout, r"missing +order_id=499 line_no=9")
        self.assertRegex(r.stdout, r"extra +id=20001")
        self.assert_shop_identical()
        again = self.ctl_json("verify", "shop")["result"]
        self.assertEqual((again["divergent"], again["keys"], again["ok"]), (0, {}, True))
        self.assertNotIn(MARKER, self.proxy.log())

    def test_3_table_without_key(self):
        res = self.ctl_json("verify", "loose")["result"]
        t = res["tables"][0]
        self.assertEqual((t["mode"], t["rows_old"], t["rows_new"], t["checksum_match"]),
                         ("checksum", NOTES, NOTES, True))
        self.assertIn("no key", t["note"])
        new("UPDATE notes SET body = 'changed' WHERE n = 7")
        try:
            r = self.ctl("verify", "loose", "--repair")
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("public.notes: 100 rows on old, 100 on new, checksums differ",
                          r.stdout)
            self.assertIn("rows cannot be listed or repaired", r.stdout)
            res = self.ctl_json("verify", "loose", expect_rc=1)["result"]
            self.assertEqual((res["divergent"], res["ok"]), (1, False))
            new("DELETE FROM notes WHERE n IN (1, 2)")
            t = self.ctl_json("verify", "loose", expect_rc=1)["result"]["tables"][0]
            self.assertEqual((t["rows_new"], t["divergent"], t["checksum_match"]),
                             (NOTES - 2, 2, False))
        finally:
            new("DELETE FROM notes")
            new("INSERT INTO notes SELECT 'note ' || g, g FROM generate_series(1, %d) g"
                % NOTES)
        self.assertTrue(self.ctl_json("verify", "loose")["result"]["ok"])

    def test_4_verify_while_the_application_writes(self):
        import psycopg2
        c = pdtest.cluster()
        conns = [psycopg2.connect(host=c["host"], port=c["port"], dbname=db, user="postgres")
                 for db in (OLD, NEW)]
        for conn in conns:
            conn.autocommit = True
        stop = threading.Event()
        rounds = [0]
        errors = []

        def writer():
            # Each round reaches old, then new 30 ms later, as a trailing mirror would.
            rnd = random.Random(PID)
            try:
                while not stop.is_set():
                    ids = rnd.sample(range(1, CUSTOMERS + 1), 50)
                    for conn in conns:
                        with conn.cursor() as cur:
                            cur.execute("UPDATE customers SET visits = visits + 1 "
                                        "WHERE id = ANY(%s)", (ids,))
                        time.sleep(0.03)
                    rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            pdtest.wait_for(lambda: rounds[0] >= 3, 10, what="the writer")
            res = self.ctl_json("verify", "shop", "--batch", "500")["result"]
        finally:
            stop.set()
            t.join(10)
            for conn in conns:
                conn.close()
        self.assertEqual(errors, [])
        self.assertEqual(res["divergent"], 0, res)
        self.assertTrue(res["ok"])
        self.assertGreater(res["in_flight"], 0)  # the re-check is what brought it to 0
        self.assertGreater(rounds[0], 3)
        self.assert_shop_identical()

    def test_5_touched_on_a_fresh_process(self):
        self.proxy.stop()
        self.proxy.start()
        # Nothing is known of the writes before this process started: a full verify.
        r = self.ctl("verify", "shop", "--touched", "--batch", "50")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("done: %d rows checked, 0 divergent" % (CUSTOMERS + LINES), r.stdout)
        for table in ("customers", "lines"):
            self.assertRegex(r.stdout, r"public\.%s +\| full " % table)
            self.assertIn("public.%s: touched keys unknown (no full verify since pgdual "
                          "started" % table, r.stdout)
        self.assertRegex(r.stderr, r"verify shop: \d+% .*public\.\w+: full; touched keys "
                                   r"unknown")
        # After it, the tables are known: nothing was written through pgdual since.
        res = self.ctl_json("verify", "shop", "--touched")["result"]
        self.assertTrue(res["touched"])
        self.assertEqual([(t["mode"], t["rows_checked"]) for t in res["tables"]],
                         [("touched", 0), ("touched", 0)])
        self.assertEqual(res["rows_checked"], 0)

    def test_6_touched_keys_recorded_like_the_mirror(self):
        driver = subprocess.Popen(
            [os.path.join(pdtest.build_dir(), "tests", "touched_verify"),
             self.proxy.config_path, "shop"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

        def say(line):
            driver.stdin.write(line + "\n")
            driver.stdin.flush()
            reply = json.loads(driver.stdout.readline())
            self.assertNotEqual(reply.get("ok"), False, reply)
            return reply.get("result")

        try:
            res = say("verify")  # full: the tables' touched keys are known from here on
            self.assertEqual(res["divergent"], 0)
            new("UPDATE customers SET full_name = 'x' WHERE id IN (17, 18)")
            new("UPDATE lines SET qty = -1 WHERE (order_id, line_no) = (1, 2)")
            say("touch public.customers 17")
            say("touch public.customers 5")
            say("touch public.lines 1,2")
            res = say("verify --touched")
            tables = self.by_table(res)
            self.assertEqual([(t["mode"], t["rows_checked"], t["divergent"])
                              for t in res["tables"]], [("touched", 2, 1), ("touched", 1, 1)])
            self.assertEqual(self.divergent_keys(res), {
                ("public.customers", "different", (("id", "17"),)),
                ("public.lines", "different", (("line_no", "2"), ("order_id", "1")))})
            self.assertNotIn("note", tables["public.customers"])
            # What stayed divergent is looked at again by the next --touched verify.
            res = say("verify --touched --repair")
            self.assertEqual((res["rows_checked"], res["divergent"], res["repaired"],
                              res["ok"]), (2, 2, 2, True))
            res = say("verify --touched")
            self.assertEqual((res["rows_checked"], res["divergent"]), (0, 0))
            # A write whose keys were not captured: that table is verified in full.
            say("unknown public.customers")
            res = say("verify --touched --repair")
            tables = self.by_table(res)
            self.assertEqual(tables["public.customers"]["mode"], "full")
            self.assertIn("touched keys unknown", tables["public.customers"]["note"])
            self.assertEqual(tables["public.lines"]["mode"], "touched")
            self.assertEqual(self.divergent_keys(res),
                             {("public.customers", "different", (("id", "18"),))})
            self.assertEqual(res["repaired"], 1)
        finally:
            driver.stdin.close()
            driver.wait(30)
        self.assertEqual(driver.returncode, 0, driver.stderr.read())
        self.assert_shop_identical()

    def test_7_repair_of_old_when_new_is_authoritative(self):
        # pgdual itself does not yet run tables rules beyond writes=old (no mirror), but the
        # jobs follow the rule's flag: under dual-new they set old right from new, through
        # `down`. Driven in-process, with a config whose rule says so.
        config = os.path.join(self.dir, "dual-new.yaml")
        rule = dict(tables_rule("shop", ["public.customers", "public.lines"], MAPPING),
                    writes="dual-new", reads="new")
        with open(config, "w") as f:
            f.write(pdtest.to_yaml({"databases": self.proxy.config["databases"],
                                    "rules": [rule]}))
        old("UPDATE customers SET email = 'SOMEONE@ELSE.ORG', visits = 9 WHERE id = 50")
        old("DELETE FROM customers WHERE id = 60")
        old("INSERT INTO customers (id, email, name) VALUES (30000, 'x', 'y')")
        old("DELETE FROM lines WHERE (order_id, line_no) = (7, 7)")
        r = subprocess.run([os.path.join(pdtest.build_dir(), "tests", "touched_verify"),
                            config, "shop"], input="verify --repair\nverify\n",
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        first, second = [json.loads(line)["result"] for line in r.stdout.splitlines()]
        self.assertEqual(first["writes"], "dual-new")
        self.assertEqual(self.divergent_keys(first), {
            ("public.customers", "different", (("id", "50"),)),
            ("public.customers", "extra", (("id", "60"),)),      # on new only
            ("public.customers", "missing", (("id", "30000"),)),  # on old only
            ("public.lines", "extra", (("line_no", "7"), ("order_id", "7")))})
        self.assertEqual((first["repaired"], second["divergent"]), (4, 0))
        # old now holds down(new): email_address as it is on new, full_name as name. (visits
        # is whatever new holds: test_4's writer bumps random rows.)
        self.assertEqual(old("SELECT email, name, visits FROM customers WHERE id IN (50, 60) "
                             "ORDER BY id"),
                         new("SELECT email_address, full_name, visits FROM customers "
                             "WHERE id IN (50, 60) ORDER BY id"))
        self.assertEqual([r[:2] for r in old("SELECT email, name FROM customers "
                                             "WHERE id IN (50, 60) ORDER BY id")],
                         [("c50@x.org", "N50"), ("c60@x.org", "N60")])
        self.assertEqual(old("SELECT count(*) FROM customers WHERE id = 30000"), [(0,)])
        self.assert_shop_identical()

    def test_8_errors(self):
        r = self.ctl("verify", "ghost")
        self.assertEqual(r.returncode, 1)
        self.assertIn("table public.ghost of rule \"ghost\" does not exist on the new side of "
                      "database \"shop\"", r.stderr)
        self.assertIn("HINT:  Create the table on the new side", r.stderr)
        r = self.ctl("backfill", "nosuch")
        self.assertEqual(r.returncode, 1)
        self.assertIn("table public.no_such_table of rule \"nosuch\" does not exist in "
                      "database \"shop\" (old side)", r.stderr)
        reply = self.ctl_json("verify", "cols", "--touched", expect_rc=1)
        self.assertIn("verify --touched is for kind tables rules", reply["error"])
        reply = self.ctl_json("backfill", "shop", "--touched", expect_rc=1)
        self.assertIn('unknown option "--touched"', reply["error"])


if __name__ == "__main__":
    pdtest.main()
