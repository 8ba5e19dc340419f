#!/usr/bin/python3
"""Expand/contract through the proxy (issue 3): a `columns` rule keeps email_address =
lower(email) for every write form, reads switch to the new column under flags flipped at
runtime, shadow reads record mismatches, unsupported statements are refused faithfully,
flags persist across restarts."""

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import unittest
import urllib.request

import psycopg2

import pdtest
from pdtest import Proxy, RawClient

TABLE = "rt_users"
RULE = "users-email"


def direct(sql, args=()):
    return pdtest.direct_query(sql, args, dbname="app")


def inconsistent_rows():
    return direct("SELECT count(*) FROM %s WHERE email_address IS DISTINCT FROM lower(email)"
                  % TABLE)[0][0]


def reset_table():
    direct("DROP TABLE IF EXISTS %s; CREATE TABLE %s (id bigserial PRIMARY KEY, "
           "email text, email_address text, note text)" % (TABLE, TABLE))


def rule(**over):
    r = {"name": RULE, "database": "app", "kind": "columns", "table": "public." + TABLE,
         "key": ["id"], "columns": [{"old": "email", "new": "email_address",
                                     "up": "lower(email)", "down": "email_address"}],
         "writes": "dual", "reads": "old"}
    r.update(over)
    return r


class RulesProxy(Proxy):
    """A proxy with the users-email rule, a state file, an admin socket and a divergence
    log; the state directory may be reused to test restarts."""

    def __init__(self, state_dir=None, sample=1.0, rules=None, shadow_budget_ms=None, env=None,
                 **kw):
        self.state_dir = state_dir or pdtest.tmpdir("pdtest-state-")
        self.admin_socket = os.path.join(self.state_dir, "admin.sock")
        self.divergence_path = os.path.join(self.state_dir, "divergence.jsonl")
        self.metrics_port = pdtest.free_port()
        super().__init__(
            rules=rules if rules is not None else [rule()],
            state=os.path.join(self.state_dir, "state.json"),
            admin={"socket": self.admin_socket,
                   "metrics": "127.0.0.1:%d" % self.metrics_port},
            divergence=dict({"log": self.divergence_path, "shadow_sample": sample},
                            **({"shadow_budget_ms": shadow_budget_ms}
                               if shadow_budget_ms is not None else {})),
            # pgdual's own connections (catalog checks) use libpq's defaults when the
            # conninfo names no user, as documented.
            env=dict({"PGUSER": "postgres"}, **(env or {})), **kw)

    def ctl(self, *args, check=True):
        p = subprocess.run([os.path.join(pdtest.build_dir(), "pgdualctl"), "-s",
                            self.admin_socket] + list(args), capture_output=True, text=True,
                           timeout=60)
        if check and p.returncode != 0:
            raise AssertionError("pgdualctl %s failed (%d): %s%s"
                                 % (" ".join(args), p.returncode, p.stdout, p.stderr))
        return p

    def ctl_json(self, *args):
        return json.loads(self.ctl("--json", *args).stdout)

    def divergence(self):
        try:
            with open(self.divergence_path) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


class WriteFormsTest(unittest.TestCase):
    """Every write form keeps the new column in step, in the same statement."""

    @classmethod
    def setUpClass(cls):
        reset_table()
        cls.proxy = RulesProxy().start()
        cls.conn = pdtest.connect(cls.proxy.port)
        cls.conn.autocommit = True

    @classmethod
    def tearDownClass(cls):
        cls.conn.close()
        cls.proxy.stop()

    def run_sql(self, sql, args=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def assert_consistent(self):
        self.assertEqual(inconsistent_rows(), 0,
                         direct("SELECT id, email, email_address FROM %s WHERE email_address "
                                "IS DISTINCT FROM lower(email)" % TABLE))

    def test_insert_forms(self):
        self.run_sql("INSERT INTO rt_users (email) VALUES (%s)", ("One@Example.COM",))
        self.run_sql("INSERT INTO rt_users (email, note) VALUES ('A@X', 'a'), ('B@X', DEFAULT)")
        self.run_sql("INSERT INTO public.rt_users (email) SELECT 'Gen' || g || '@X' "
                     "FROM generate_series(1, 5) g")
        rows = self.run_sql('INSERT INTO "rt_users" AS u (email) VALUES (%s) '
                            "RETURNING id, email", ("Ret@X",))
        self.assertEqual(len(rows[0]), 2, "RETURNING must stay as the client wrote it")
        self.assertEqual(rows[0][1], "Ret@X")
        self.assert_consistent()
        self.assertEqual(direct("SELECT email_address FROM rt_users WHERE email = 'One@Example.COM'"),
                         [("one@example.com",)])

    def test_upsert_update_merge(self):
        self.run_sql("INSERT INTO rt_users (id, email) VALUES (1000, 'Up@X')")
        self.run_sql("INSERT INTO rt_users (id, email) VALUES (1000, 'UPSERTED@X') "
                     "ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email")
        self.assertEqual(direct("SELECT email_address FROM rt_users WHERE id = 1000"),
                         [("upserted@x",)])
        self.run_sql("UPDATE rt_users SET email = %s WHERE id = %s", ("Changed@X", 1000))
        self.run_sql("UPDATE rt_users u SET (email, note) = ('Tuple@X', 'n') WHERE u.id = 1000")
        self.run_sql("UPDATE rt_users u SET email = v.e FROM (VALUES (1000, 'From@X')) "
                     "AS v(id, e) WHERE u.id = v.id")
        self.assertEqual(direct("SELECT email_address FROM rt_users WHERE id = 1000"),
                         [("from@x",)])
        self.run_sql("MERGE INTO rt_users t USING (VALUES (1000, 'Merged@X'), (1001, 'New@X')) "
                     "AS s(id, e) ON t.id = s.id WHEN MATCHED THEN UPDATE SET email = s.e "
                     "WHEN NOT MATCHED THEN INSERT (id, email) VALUES (s.id, s.e)")
        self.run_sql("WITH w AS (UPDATE rt_users SET email = 'Cte@X' WHERE id = 1001 "
                     "RETURNING id) SELECT count(*) FROM w")
        self.run_sql("UPDATE rt_users SET email = 'Multi1@X' WHERE id = 1000; "
                     "SELECT 1; UPDATE rt_users SET email = 'Multi2@X' WHERE id = 1001")
        self.assert_consistent()
        self.assertEqual(direct("SELECT email_address FROM rt_users WHERE id IN (1000, 1001) "
                                "ORDER BY id"), [("multi1@x",), ("multi2@x",)])

    def test_large_rewritten_statement(self):
        # ~10 MB of VALUES, rewritten into a larger statement: written to the server in
        # many partial writes across the replacement.
        pad = "x" * 400
        rows = ", ".join("(%d, 'Big%d@X', '%s')" % (100000 + i, i, pad) for i in range(25000))
        self.run_sql("INSERT INTO rt_users (id, email, note) VALUES " + rows)
        self.assertEqual(direct("SELECT count(*), count(*) FILTER (WHERE email_address = "
                                "lower(email)), sum(length(note)) FROM rt_users WHERE id >= "
                                "100000"), [(25000, 25000, 25000 * 400)])
        self.run_sql("SELECT 1")  # the session goes on

    def test_setting_new_directly_fills_old(self):
        self.run_sql("INSERT INTO rt_users (id, email_address) VALUES (2000, 'direct@x')")
        self.assertEqual(direct("SELECT email FROM rt_users WHERE id = 2000"), [("direct@x",)])

    def test_prepared_and_extended_protocol(self):
        script = self.proxy.write_file("w.sql", "\\set id random(3000, 3999)\n"
                                       "INSERT INTO rt_users (id, email) VALUES (:id, 'P' || :id "
                                       "|| '@X.COM') ON CONFLICT (id) DO UPDATE SET email = "
                                       "EXCLUDED.email;\n"
                                       "UPDATE rt_users SET email = 'Q' || :id || '@X' "
                                       "WHERE id = :id;\n", mode=0o644)
        for mode in ("prepared", "extended"):
            out = pdtest.run_pgbench(self.proxy.port, ["-n", "-M", mode, "-c", "2", "-t", "100",
                                                       "-f", script]).stdout
            self.assertIn("number of failed transactions: 0", out)
        self.assert_consistent()
        self.assertGreater(direct("SELECT count(*) FROM rt_users WHERE id >= 3000")[0][0], 0)


class RefusalTest(unittest.TestCase):
    """What cannot be rewritten faithfully is refused, and the refusal behaves like an
    error of PostgreSQL's own (the transaction is aborted)."""

    @classmethod
    def setUpClass(cls):
        reset_table()
        cls.proxy = RulesProxy().start()

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_copy_in_refused_under_dual(self):
        conn = pdtest.connect(self.proxy.port)
        try:
            cur = conn.cursor()
            with self.assertRaises(psycopg2.Error) as cm:
                cur.copy_expert("COPY rt_users (email) FROM STDIN", _Lines(["X@Y"]))
            self.assertEqual(cm.exception.pgcode, "0A000")
            self.assertIn(RULE, str(cm.exception))
            # Inside a transaction: the refusal aborted it, as PostgreSQL's error would.
            with self.assertRaises(psycopg2.errors.InFailedSqlTransaction):
                cur.execute("SELECT 1")
            conn.rollback()
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchall(), [(1,)])
        finally:
            conn.close()
        self.assertEqual(direct("SELECT count(*) FROM rt_users WHERE email = 'X@Y'"), [(0,)])

    def test_copy_in_allowed_under_old(self):
        self.proxy.ctl("flag", RULE, "writes=old")
        try:
            conn = pdtest.connect(self.proxy.port)
            conn.cursor().copy_expert("COPY rt_users (email) FROM STDIN", _Lines(["Copy@Y"]))
            conn.commit()
            conn.close()
        finally:
            self.proxy.ctl("flag", RULE, "writes=dual")
        self.assertEqual(direct("SELECT count(*) FROM rt_users WHERE email = 'Copy@Y'"), [(1,)])

    def test_extended_protocol_refusal_keeps_the_batch_right(self):
        with RawClient(self.proxy.port) as c:
            c.startup("postgres", "app")
            batch = (parse_msg("", "SELECT 41 + 1") + bind_msg() + execute_msg()
                     + parse_msg("s2", "COPY rt_users FROM STDIN") + bind_msg("", "s2")
                     + execute_msg() + sync_msg())
            c.send(batch)
            kinds = []
            err = None
            while True:
                k, body = c.recv_msg()
                kinds.append(k)
                if k == "E":
                    err = pdtest.parse_fields(body)
                if k == "Z":
                    break
            # Exactly what PostgreSQL says for a batch whose second Parse fails.
            self.assertEqual(kinds, ["1", "2", "D", "C", "E", "Z"])
            self.assertEqual(err["C"], "0A000")
            self.assertIn(RULE, err["M"])
            rows, e = c.simple_query("SELECT 7")
            self.assertIsNone(e)
            self.assertEqual(rows, [[b"7"]])


class ReadsTest(unittest.TestCase):
    """reads=new serves the old column from the new one; shadow compares and records."""

    @classmethod
    def setUpClass(cls):
        reset_table()
        direct("INSERT INTO rt_users (id, email, email_address) VALUES "
               "(1, 'same@x', 'same@x'), (2, 'Old@X', 'diverged@x')")
        cls.proxy = RulesProxy(sample=1.0).start()

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def tearDown(self):
        self.proxy.ctl("flag", RULE, "reads=old")

    def select_email(self, id_):
        conn = pdtest.connect(self.proxy.port)
        try:
            cur = conn.cursor()
            cur.execute("SELECT email FROM rt_users WHERE id = %s", (id_,))
            name = cur.description[0].name
            return name, cur.fetchall()
        finally:
            conn.close()

    def test_reads_new_reads_the_new_column(self):
        self.assertEqual(self.select_email(2), ("email", [("Old@X",)]))
        self.proxy.ctl("flag", RULE, "reads=new")
        self.assertEqual(self.select_email(2), ("email", [("diverged@x",)]))
        self.proxy.ctl("flag", RULE, "reads=old")
        self.assertEqual(self.select_email(2), ("email", [("Old@X",)]))

    def test_shadow_records_mismatch_without_literals(self):
        self.proxy.ctl("flag", RULE, "reads=shadow")
        before = len(self.proxy.divergence())
        mismatched_before = self.proxy.ctl_json("status")["rule_counters"][RULE][
            "shadow_mismatched"]
        conn = pdtest.connect(self.proxy.port)
        conn.autocommit = True
        cur = conn.cursor()
        cur.execute("SELECT email FROM rt_users WHERE id IN (1, 2) AND note IS DISTINCT "
                    "FROM 'secret-literal-42' ORDER BY id")
        self.assertEqual(cur.fetchall(), [("same@x",), ("Old@X",)], "shadow returns old")
        cur.execute("SELECT email FROM rt_users WHERE id = 1")  # agrees: no event
        self.assertEqual(cur.fetchall(), [("same@x",)])
        cur.execute("SELECT 1")  # the proxy's own query ran in between; the session is fine
        conn.close()
        pdtest.wait_for(lambda: len(self.proxy.divergence()) > before, 5,
                        what="a divergence event")
        events = self.proxy.divergence()[before:]
        self.assertEqual(len(events), 1, events)
        ev = events[0]
        self.assertEqual(ev["rule"], RULE)
        self.assertEqual(ev["kind"], "shadow_read")
        self.assertNotIn("secret-literal-42", json.dumps(ev))
        self.assertNotIn("secret-literal-42", self.proxy.log())
        self.assertEqual(ev["old"]["rows"], ev["new"]["rows"])
        self.assertNotEqual(ev["old"]["hash"], ev["new"]["hash"])
        status = self.proxy.ctl_json("status")
        counters = status["rule_counters"][RULE]
        self.assertEqual(counters["shadow_mismatched"], mismatched_before + 1)
        self.assertGreaterEqual(counters["shadow_compared"], 2)
        div = self.proxy.ctl_json("divergence", RULE, "--limit", "1")
        self.assertEqual([e["statement"] for e in div["events"]], [ev["statement"]])
        self.assertEqual(div["counters"][0]["shadow_mismatched"], mismatched_before + 1)
        r = self.proxy.ctl("divergence", "--limit", "0", check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("invalid --limit", r.stderr)

    def test_shadow_prepared_statements(self):
        self.proxy.ctl("flag", RULE, "reads=shadow")
        before = len(self.proxy.divergence())
        script = self.proxy.write_file("r.sql", "SELECT email FROM rt_users WHERE id = 2;\n"
                                       "SELECT email FROM rt_users WHERE id = 1;\n", mode=0o644)
        for mode in ("prepared", "extended"):
            out = pdtest.run_pgbench(self.proxy.port, ["-n", "-M", mode, "-c", "1", "-t", "5",
                                                       "-f", script]).stdout
            self.assertIn("number of failed transactions: 0", out)
        events = self.proxy.divergence()[before:]
        # Only id 2 differs: 5 runs x 2 modes, each compared (sample 1.0, autocommit).
        self.assertEqual(len(events), 10, events)
        self.assertEqual({e["statement"] for e in events},
                         {"SELECT email FROM rt_users WHERE id = $1;"}, "normalized")
        counters = self.proxy.ctl_json("status")["rule_counters"][RULE]
        self.assertGreaterEqual(counters["shadow_compared"], 20)

    def test_shadow_leaves_the_unnamed_statement_alone(self):
        self.proxy.ctl("flag", RULE, "reads=shadow")
        before = len(self.proxy.divergence())
        with RawClient(self.proxy.port) as c:
            c.startup("postgres", "app")
            sel = "SELECT email FROM rt_users WHERE id = $1"
            c.send(parse_msg("", sel) + bind_msg_params(["2"]) + execute_msg() + sync_msg())
            self.assertEqual(read_batch(c), [["Old@X"]])
            # Bound again without a new Parse: still the client's own statement.
            c.send(bind_msg_params(["1"]) + execute_msg() + sync_msg())
            self.assertEqual(read_batch(c), [["same@x"]])
        pdtest.wait_for(lambda: len(self.proxy.divergence()) > before, 5,
                        what="the shadow event of the first execution")

    def test_gradual_rollout_is_sticky_and_monotonic(self):
        self.proxy.ctl("flag", RULE, "reads=new@50")
        conns = [pdtest.connect(self.proxy.port) for _ in range(40)]
        try:
            def reads_new(c):
                cur = c.cursor()
                cur.execute("SELECT email FROM rt_users WHERE id = 2")
                v = cur.fetchall()[0][0]
                c.rollback()
                return v == "diverged@x"
            first = [reads_new(c) for c in conns]
            self.assertEqual(first, [reads_new(c) for c in conns], "choice must be sticky")
            self.assertTrue(5 <= sum(first) <= 35, "about half should read new: %r" % first)
            self.proxy.ctl("flag", RULE, "reads=new@80")
            second = [reads_new(c) for c in conns]
            self.assertTrue(all(b for a, b in zip(first, second) if a),
                            "raising the share must only move sessions from old to new")
            self.assertGreaterEqual(sum(second), sum(first))
            self.proxy.ctl("flag", RULE, "reads=new@100")
            self.assertTrue(all(reads_new(c) for c in conns))
        finally:
            for c in conns:
                c.close()


class FlagsTest(unittest.TestCase):
    def test_flip_under_load_and_persist(self):
        reset_table()
        state_dir = pdtest.tmpdir("pdtest-state-")
        errors = []
        stop = threading.Event()

        def client(n):
            try:
                conn = pdtest.connect(p.port)
                conn.autocommit = True
                cur = conn.cursor()
                i = 0
                while not stop.is_set():
                    i += 1
                    cur.execute("INSERT INTO rt_users (email) VALUES (%s) RETURNING id",
                                ("C%d-%d@Load" % (n, i),))
                    rid = cur.fetchone()[0]
                    cur.execute("UPDATE rt_users SET email = upper(email) WHERE id = %s", (rid,))
                    cur.execute("SELECT email FROM rt_users WHERE id = %s", (rid,))
                    cur.fetchall()
                conn.close()
            except Exception as e:  # any client error fails the test
                errors.append(repr(e))

        with RulesProxy(state_dir=state_dir) as p:
            threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            flips = ["writes=dual-new", "reads=shadow", "reads=new", "reads=new@30",
                     "writes=dual", "reads=old", "reads=new", "writes=dual-new"]
            for f in flips:
                time.sleep(0.3)
                p.ctl("flag", RULE, f)
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(30)
            self.assertEqual(errors, [])
            self.assertEqual(inconsistent_rows(), 0)
            self.assertGreater(direct("SELECT count(*) FROM rt_users")[0][0], 16)
            rules = p.ctl_json("rules")["rules"]
            self.assertEqual((rules[0]["writes"], rules[0]["reads"]), ("dual-new", "new"))
        # A restart finds the flags where the operator left them, not the config's.
        with RulesProxy(state_dir=state_dir) as p:
            rules = p.ctl_json("rules")["rules"]
            self.assertEqual((rules[0]["writes"], rules[0]["reads"]), ("dual-new", "new"))
            state = json.load(open(os.path.join(state_dir, "state.json")))
            self.assertEqual(len(state["history"]), len(flips))
            self.assertTrue(state["history"][0]["by"].startswith("uid "))

    def test_admin_errors_leave_the_connection_usable(self):
        with RulesProxy() as p:
            r = p.ctl("flag", "no-such-rule", "reads=new", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("does not exist", r.stderr)
            r = p.ctl("flag", RULE, "reads=sometimes", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("invalid flag", r.stderr)
            # Reads must come from a side that is written.
            p.ctl("flag", RULE, "writes=old")
            r = p.ctl("flag", RULE, "reads=new@10", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("set writes=dual", r.stderr)
            r = p.ctl("flag", RULE, "writes=new", check=False)
            self.assertEqual(r.returncode, 1)
            self.assertIn("reads must be new", r.stderr)
            p.ctl("flag", RULE, "writes=new", "reads=new")
            rules = p.ctl_json("rules")["rules"]
            self.assertEqual((rules[0]["writes"], rules[0]["reads"]), ("new", "new"))
            s = socket.socket(socket.AF_UNIX)
            s.connect(p.admin_socket)
            s.sendall(b"bogus\nflag x\nstatus\n")
            replies = b""
            while replies.count(b"\n") < 3:
                replies += s.recv(65536)
            s.close()
            lines = [json.loads(l) for l in replies.splitlines()]
            self.assertEqual([l["ok"] for l in lines], [False, False, True])
            self.assertIn("unknown command", lines[0]["error"])
            self.assertEqual(os.stat(p.admin_socket).st_mode & 0o777, 0o600)


class CatalogTest(unittest.TestCase):
    def test_missing_new_column_refuses_rewrites_only(self):
        direct("DROP TABLE IF EXISTS rt_nonew; CREATE TABLE rt_nonew (id int primary key, "
               "email text)")
        bad = rule(name="bad-rule", table="public.rt_nonew")
        with RulesProxy(rules=[bad]) as p:
            info = p.ctl_json("rules")["rules"][0]
            self.assertIn('column "email_address"', info["error"])
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM rt_nonew")  # reads are unaffected
            with self.assertRaises(psycopg2.Error) as cm:
                cur.execute("INSERT INTO rt_nonew (id, email) VALUES (1, 'a')")
            self.assertEqual(cm.exception.pgcode, "55000")
            self.assertIn("bad-rule", str(cm.exception))
            conn.close()


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


class ReloadTest(unittest.TestCase):
    """A reload applies divergence.log by opening the new file; listen, state, admin.socket
    and admin.metrics are opened once at start, so changing them is a warning in the log
    and in the reload's reply (restart_needed), and the values in force are kept."""

    def mismatch(self, p):
        conn = pdtest.connect(p.port)
        conn.autocommit = True
        conn.cursor().execute("SELECT email FROM rt_users WHERE id = 2")
        conn.close()

    def test_reload_applies_divergence_log_and_names_restart_keys(self):
        reset_table()
        direct("INSERT INTO rt_users (id, email, email_address) VALUES (2, 'Old@X', 'x@x')")
        with RulesProxy(rules=[rule(reads="shadow")]) as p:
            first = p.divergence_path
            self.mismatch(p)
            pdtest.wait_for(lambda: len(p.divergence()) == 1, 5, what="an event in the log")
            # Every key of the kind changes at once; the rules stay as they are.
            second = os.path.join(p.state_dir, "divergence-2.jsonl")
            old_sock, old_metrics = p.admin_socket, p.metrics_port
            p.config["divergence"]["log"] = second
            p.config["listen"]["port"] = pdtest.free_port()
            p.config["state"] = os.path.join(p.state_dir, "state-2.json")
            p.config["admin"] = {"socket": os.path.join(p.state_dir, "admin-2.sock"),
                                 "metrics": "127.0.0.1:%d" % pdtest.free_port()}
            with open(p.config_path, "w") as f:
                f.write(pdtest.to_yaml(p.config))
            reply = p.ctl_json("reload")
            self.assertTrue(reply["ok"], reply)
            self.assertEqual(reply["restart_needed"],
                             ["listen", "state", "admin.socket", "admin.metrics"])
            self.assertIn("only after a restart", reply["warning"])
            self.assertRegex(p.log(), r"WARNING:  the config file changes listen, state, "
                             r"admin\.socket, admin\.metrics, which take effect only after a "
                             r"restart of pgdual")
            r = p.ctl("reload")  # the table of people says it as well
            self.assertIn("restart_needed", r.stdout)
            # SIGHUP reloads the same way: compared with what runs, so it warns again.
            p.proc.send_signal(signal.SIGHUP)
            pdtest.wait_for(lambda: p.log().count("which take effect only after a restart") == 3,
                            5, what="the warning of the SIGHUP reload")
            # What runs is what ran: the old socket, metrics port, listener and state.
            self.assertFalse(os.path.exists(os.path.join(p.state_dir, "admin-2.sock")))
            self.assertTrue(pdtest.port_open(p.port))
            body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % old_metrics,
                                          timeout=5).read().decode()
            self.assertIn("pgdual_sessions", body)
            p.ctl("flag", RULE, "reads=shadow")
            self.assertFalse(os.path.exists(os.path.join(p.state_dir, "state-2.json")))
            # The divergence log is the new file from now on: written and read there.
            self.mismatch(p)
            pdtest.wait_for(lambda: os.path.exists(second) and os.path.getsize(second) > 0,
                            5, what="an event in the new divergence log")
            with open(second) as f:
                events = [json.loads(line) for line in f if line.strip()]
            self.assertEqual([e["kind"] for e in events], ["shadow_read"])
            self.assertEqual(len(p.divergence()), 1, "the old file got the new event")
            div = p.ctl_json("divergence", RULE)
            self.assertEqual(len(div["events"]), 1, div)
            self.assertIn('divergence events now go to "%s"' % second, p.log())
            # Back to the values in force: nothing left to restart for.
            p.config["listen"]["port"] = p.port
            p.config["state"] = os.path.join(p.state_dir, "state.json")
            p.config["admin"] = {"socket": old_sock, "metrics": "127.0.0.1:%d" % old_metrics}
            with open(p.config_path, "w") as f:
                f.write(pdtest.to_yaml(p.config))
            reply = p.ctl_json("reload")
            self.assertNotIn("restart_needed", reply)
            # A divergence log that cannot be opened fails the reload, which changes nothing.
            p.config["divergence"]["log"] = "/nonexistent-dir/divergence.jsonl"
            with open(p.config_path, "w") as f:
                f.write(pdtest.to_yaml(p.config))
            r = p.ctl("--json", "reload", check=False)
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertIn("divergence log could not be opened", json.loads(r.stdout)["error"])
            self.assertIn('could not open divergence log "/nonexistent-dir/divergence.jsonl"',
                          p.log())
            self.mismatch(p)
            pdtest.wait_for(lambda: len(read_lines(second)) == 2, 5,
                            what="a second event in the new divergence log")


class CatalogRecheckTest(unittest.TestCase):
    """A rule in error because its database could not be reached for the catalog check is
    checked again every 5 s and served again once the check passes, without a reload; a
    rule in error for a missing column stays so (until fixed and reloaded)."""

    DB = "pdrecheck_%d" % os.getpid()

    def setUp(self):
        pdtest.fresh_databases(self.DB)
        pdtest.direct_query("CREATE TABLE rc_users (id bigserial PRIMARY KEY, email text, "
                            "email_address text); CREATE TABLE rc_nonew (id bigserial PRIMARY "
                            "KEY, email text)", dbname=self.DB)

    def tearDown(self):
        pdtest.direct_query("ALTER DATABASE %s ALLOW_CONNECTIONS true" % self.DB)
        pdtest.direct_query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % self.DB)

    def block(self, allow):
        pdtest.direct_query("ALTER DATABASE %s ALLOW_CONNECTIONS %s"
                            % (self.DB, "true" if allow else "false"))
        if not allow:
            pdtest.direct_query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = %s", (self.DB,))

    def errors(self, p):
        return {r["name"]: r.get("error") for r in p.ctl_json("rules")["rules"]}

    def test_unreachable_database_is_checked_again(self):
        dbs = pdtest.default_databases() + [{"name": "rc", "old": pdtest.pg_conninfo(self.DB)}]
        good = rule(name="rc-email", database="rc", table="public.rc_users")
        bad = rule(name="rc-nonew", database="rc", table="public.rc_nonew")
        with RulesProxy(rules=[good, bad], databases=dbs) as p:
            self.assertIsNone(self.errors(p)["rc-email"])
            self.assertIn('column "email_address"', self.errors(p)["rc-nonew"])
            self.block(False)
            p.ctl("reload")
            errors = self.errors(p)
            for name in ("rc-email", "rc-nonew"):
                self.assertIn('could not connect to database "rc" to check its table',
                              errors[name])
            # Still unreachable: checked again, still in error, nothing logged as fixed.
            time.sleep(6)
            self.assertIn("could not connect", self.errors(p)["rc-email"])
            self.assertNotIn("in force again", p.log())
            self.block(True)
            pdtest.wait_for(lambda: self.errors(p)["rc-email"] is None, 15,
                            what="the rule to be served again")
            self.assertIn('rule "rc-email": database "rc" can be reached again and its '
                          'catalog check passed: the rule is in force again', p.log())
            # The other rule's check now gets as far as its missing column: that is for the
            # operator to fix, and no longer checked again.
            errors = self.errors(p)
            self.assertIn('column "email_address"', errors["rc-nonew"])
            conn = pdtest.connect(p.port, dbname="rc")
            conn.autocommit = True
            cur = conn.cursor()
            cur.execute("INSERT INTO rc_users (email) VALUES ('Back@Again')")
            cur.execute("SELECT email_address FROM rc_users")
            self.assertEqual(cur.fetchall(), [("back@again",)])  # rewritten: writes=dual
            with self.assertRaises(psycopg2.Error) as cm:
                cur.execute("INSERT INTO rc_nonew (email) VALUES ('a')")
            self.assertEqual(cm.exception.pgcode, "55000")
            conn.close()
            n = p.log().count('checked again once database "rc" could be reached')
            self.assertEqual(n, 1, p.log_tail(30))
            time.sleep(6)
            self.assertEqual(p.log().count('checked again once database "rc" could be '
                                           'reached'), 1)


class ReprepareTest(unittest.TestCase):
    """A flag flip reaches statements prepared before it: they are prepared again, as the
    rules now decide, at their next Bind."""

    def test_prepared_statements_follow_flips(self):
        reset_table()
        direct("INSERT INTO rt_users (id, email, email_address) VALUES (2, 'Old@X', 'diverged@x')")
        with RulesProxy(rules=[rule(writes="old")]) as p, RawClient(p.port) as c:
            c.startup("postgres", "app")
            c.send(parse_msg("sel", "SELECT email FROM rt_users WHERE id = $1")
                   + parse_msg("ins", "INSERT INTO rt_users (id, email) VALUES ($1, $2)")
                   + parse_msg("", "SELECT count(*) FROM rt_users") + sync_msg())
            self.assertEqual(read_batch(c), [])

            def run(stmt, *args):
                c.send(bind_msg_params(list(args), stmt=stmt) + execute_msg() + sync_msg())
                return read_batch(c)

            self.assertEqual(run("sel", "2"), [["Old@X"]])
            self.assertEqual(run("ins", "10", "Before@X"), [])
            p.ctl("flag", RULE, "writes=dual")
            p.ctl("flag", RULE, "reads=new")
            self.assertEqual(run("sel", "2"), [["diverged@x"]], "prepared before the flip")
            self.assertEqual(run("ins", "11", "After@X"), [])
            self.assertEqual(direct("SELECT email_address FROM rt_users WHERE id IN (10, 11) "
                                    "ORDER BY id"), [(None,), ("after@x",)])
            # The unnamed statement, prepared under the old flags, is decided again too.
            self.assertEqual(run("", ), [["3"]])
            p.ctl("flag", RULE, "reads=old")
            self.assertEqual(run("sel", "2"), [["Old@X"]])
            # Pipelined batches across the flips keep their responses in order.
            c.send((bind_msg_params(["2"], stmt="sel") + execute_msg() + sync_msg()) * 3)
            self.assertEqual([read_batch(c) for _ in range(3)], [[["Old@X"]]] * 3)

    def test_pgbench_prepared_across_flips(self):
        reset_table()
        with RulesProxy(rules=[rule(writes="old")]) as p:
            script = p.write_file("w.sql", "\\set id random(1, 500)\n"
                                  "INSERT INTO rt_users (id, email) VALUES (:id, 'E' || :id || "
                                  "'@X') ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email;\n"
                                  "SELECT email FROM rt_users WHERE id = :id;\n", mode=0o644)
            bench = subprocess.Popen(pdtest.pgbench_argv(p.port, "app", "postgres", "-n", "-M",
                                                         "prepared", "-c", "4", "-T", "4", "-f",
                                                         script),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(1)
            p.ctl("flag", RULE, "writes=dual")
            time.sleep(0.5)
            direct("UPDATE rt_users SET email_address = lower(email)")  # catch up old rows
            p.ctl("flag", RULE, "reads=new")
            time.sleep(0.5)
            p.ctl("flag", RULE, "reads=shadow")
            out, _ = bench.communicate(timeout=60)
            self.assertEqual(bench.returncode, 0, out)
            self.assertIn("number of failed transactions: 0", out)
            self.assertEqual(inconsistent_rows(), 0)


class MetricsTest(unittest.TestCase):
    def test_rule_counters_exported(self):
        reset_table()
        with RulesProxy() as p:
            conn = pdtest.connect(p.port)
            conn.autocommit = True
            conn.cursor().execute("INSERT INTO rt_users (email) VALUES ('M@X')")
            conn.close()
            body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % p.metrics_port,
                                          timeout=5).read().decode()
            self.assertIn('pgdual_statements_total{rule="users-email",action="rewritten"} 1',
                          body)
            self.assertIn("pgdual_rewrite_cache_misses_total", body)
            # The INSERT's value is inlined in its text (psycopg2): its literal template was
            # rewritten once.
            self.assertRegex(body, r"(?m)^pgdual_rewrite_template_misses_total [1-9]")
            self.assertIn("pgdual_rewrite_template_hits_total", body)
            self.assertIn("pgdual_rewrite_template_unusable_total", body)


class _Lines:
    """A file-like object for copy_expert."""

    def __init__(self, lines):
        self.data = ("\n".join(lines) + "\n").encode()

    def read(self, n=-1):
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out

    def readline(self, n=-1):
        return self.read(n)


def parse_msg(name, sql):
    return pdtest.msg("P", pdtest.cstr(name) + pdtest.cstr(sql) + struct.pack("!h", 0))


def bind_msg(portal="", stmt=""):
    return pdtest.msg("B", pdtest.cstr(portal) + pdtest.cstr(stmt)
                      + struct.pack("!hhh", 0, 0, 0))


def execute_msg(portal=""):
    return pdtest.msg("E", pdtest.cstr(portal) + struct.pack("!i", 0))


def sync_msg():
    return pdtest.msg("S")


def bind_msg_params(values, portal="", stmt=""):
    body = pdtest.cstr(portal) + pdtest.cstr(stmt) + struct.pack("!hh", 0, len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v.encode()
    return pdtest.msg("B", body + struct.pack("!h", 0))


def read_batch(c):
    """Rows (as text) up to ReadyForQuery; fails on an ErrorResponse."""
    rows = []
    while True:
        k, body = c.recv_msg()
        if k == "E":
            raise AssertionError(pdtest.parse_fields(body))
        if k == "D":
            rows.append([v.decode() if v is not None else None
                         for v in pdtest.decode_datarow(body)])
        if k == "Z":
            return rows


if __name__ == "__main__":
    pdtest.main()
