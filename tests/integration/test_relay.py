#!/usr/bin/python3
"""Relay threads (limits.relay_threads, proxy/relay.c).

Sessions of a database without rules are spread over the main loop and the relay
threads once connected (`sessions` says which loop runs each, `status` how many each
has); they work there like anywhere: queries, transactions, a cancel, many at once. A
reload that gives their database rules brings them back to the main loop at their next
batch boundary, inside a transaction too, and the rules apply to what they send next.
With relay_threads: 0 every session stays on the main loop."""

import re
import subprocess
import threading
import time
import unittest

import psycopg2

import pdtest
from pdtest import connect, direct_query, wait_for
from test_rules import RulesProxy

TABLE = "pd_relay_users"


def direct(sql, args=()):
    return direct_query(sql, args, dbname="app")


class AdminProxy(RulesProxy):
    """test_rules' proxy (admin socket, state file), without rules at first."""

    def __init__(self, relay_threads, databases=None):
        super().__init__(rules=[], databases=databases,
                         limits={"relay_threads": relay_threads})

    def loops_of(self, conns):
        """The loop each connection's session runs on, by its backend key's pid."""
        by_id = {s["id"]: s["loop"] for s in self.ctl_json("sessions")["sessions"]}
        return [by_id[c.get_backend_pid()] for c in conns]

    def pass_through(self):
        return [l["pass_through"] for l in self.ctl_json("status")["relay_loops"]]

    def reload_with(self, rules):
        self.config["rules"] = rules
        with open(self.config_path, "w") as f:
            f.write(pdtest.to_yaml(self.config))
        reply = self.ctl_json("reload")
        assert reply["ok"], reply


def users_rule(database="app"):
    return {"name": "relay-email", "database": database, "kind": "columns",
            "table": "public." + TABLE, "key": ["id"],
            "columns": [{"old": "email", "new": "email_address", "up": "lower(email)",
                         "down": "email_address"}],
            "writes": "dual", "reads": "old"}


def autocommit(port, dbname="app"):
    c = connect(port, dbname)
    c.autocommit = True
    return c


def one(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0] if cur.description else None


class RelayThreadsTest(unittest.TestCase):

    def setUp(self):
        direct("DROP TABLE IF EXISTS %s; CREATE TABLE %s (id bigserial PRIMARY KEY, "
               "email text, email_address text)" % (TABLE, TABLE))

    def test_sessions_spread_over_the_loops_and_work_there(self):
        with AdminProxy(relay_threads=2) as p:
            conns = [autocommit(p.port) for _ in range(6)]
            # The least loaded loop, a relay thread's on a tie: 1, 2, 0, 1, 2, 0.
            self.assertEqual(sorted(p.loops_of(conns)), [0, 0, 1, 1, 2, 2])
            self.assertEqual(p.pass_through(), [2, 2, 2])
            # All of them at once, each many round trips.
            errors = []

            def work(i):
                try:
                    for n in range(200):
                        one(conns[i], "INSERT INTO %s (email) VALUES (%%s)" % TABLE,
                            ("u%d-%d" % (i, n),))
                    self.assertEqual(one(conns[i], "SELECT count(*) FROM %s WHERE email "
                                         "LIKE %%s" % TABLE, ("u%d-%%" % i,)), 200)
                except Exception as e:  # reported below, with the others
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            self.assertEqual(errors, [])
            self.assertEqual(direct("SELECT count(*) FROM %s" % TABLE)[0][0], 1200)
            # A transaction on a relay thread rolls back as it should.
            on_thread = conns[p.loops_of(conns).index(1)]
            on_thread.autocommit = False
            one(on_thread, "INSERT INTO %s (email) VALUES ('gone')" % TABLE)
            on_thread.rollback()
            self.assertEqual(direct("SELECT count(*) FROM %s WHERE email = 'gone'"
                                    % TABLE)[0][0], 0)
            # A cancel reaches the statement of a session on a relay thread.
            on_thread.autocommit = True
            timer = threading.Timer(0.5, on_thread.cancel)
            timer.start()
            with self.assertRaises(psycopg2.errors.QueryCanceled):
                one(on_thread, "SELECT pg_sleep(30)")
            timer.join()
            self.assertEqual(one(on_thread, "SELECT 1"), 1)
            for c in conns:
                c.close()
            wait_for(lambda: p.pass_through() == [0, 0, 0], 10,
                     what="the loops' counts back to 0")

    def test_reload_giving_rules_brings_sessions_back_to_the_main_loop(self):
        with AdminProxy(relay_threads=2) as p:
            idle = autocommit(p.port)
            in_txn = connect(p.port)
            self.assertEqual(p.loops_of([idle, in_txn]), [1, 2])
            # No rule yet: passed through as sent.
            one(idle, "INSERT INTO %s (id, email) VALUES (1, 'A@X')" % TABLE)
            one(in_txn, "INSERT INTO %s (id, email) VALUES (2, 'B@X')" % TABLE)
            p.reload_with([users_rule()])
            # Both have nothing in flight (in_txn is inside its transaction): back at once.
            wait_for(lambda: p.loops_of([idle, in_txn]) == [0, 0], 10,
                     what="both sessions back on the main loop")
            self.assertEqual(p.pass_through(), [0, 0, 0])
            self.assertEqual(p.log().count("back to the main loop"), 2, p.log_tail())
            # The rule applies to what they send next, in the transaction as well.
            one(idle, "INSERT INTO %s (id, email) VALUES (3, 'C@X')" % TABLE)
            one(in_txn, "INSERT INTO %s (id, email) VALUES (4, 'D@X')" % TABLE)
            in_txn.commit()
            self.assertEqual(direct("SELECT id, email_address FROM %s ORDER BY id" % TABLE),
                             [(1, None), (2, None), (3, "c@x"), (4, "d@x")])
            # A new session of the database stays on the main loop now.
            late = autocommit(p.port)
            self.assertEqual(p.loops_of([late]), [0])
            for c in (idle, in_txn, late):
                c.close()

    def test_a_session_whose_last_statement_was_copy_comes_back_at_once(self):
        """COPY's data and end were taken for the start of a batch not yet answered, so a
        session idle after a COPY stayed on its thread after the reload until it sent
        something more, which then passed through without the rules."""
        import io
        with AdminProxy(relay_threads=1) as p:
            c = autocommit(p.port)
            self.assertEqual(p.loops_of([c]), [1])
            with c.cursor() as cur:
                cur.copy_expert("COPY %s (id, email) FROM STDIN" % TABLE,
                                io.StringIO("7\tF@X\n"))
            p.reload_with([users_rule()])
            wait_for(lambda: p.loops_of([c]) == [0], 10, what="the session back")
            one(c, "INSERT INTO %s (id, email) VALUES (8, 'G@X')" % TABLE)
            self.assertEqual(direct("SELECT id, email_address FROM %s ORDER BY id" % TABLE),
                             [(7, None), (8, "g@x")])
            c.close()

    def test_a_session_busy_at_the_reload_comes_back_when_its_statement_ends(self):
        with AdminProxy(relay_threads=1) as p:
            busy = autocommit(p.port)
            self.assertEqual(p.loops_of([busy]), [1])
            done = []
            t = threading.Thread(target=lambda: done.append(one(
                busy, "SELECT count(*) FROM pg_sleep(1.5)")))
            t.start()
            wait_for(lambda: direct("SELECT count(*) FROM pg_stat_activity WHERE query LIKE "
                                    "'SELECT count(*) FROM pg_sleep%%' AND state = 'active'")
                     [0][0] == 1, 10, what="the statement running")
            p.reload_with([users_rule()])
            # Recalled, but its statement runs on: it stays until the answer is relayed.
            self.assertEqual(p.loops_of([busy]), [1])
            t.join(30)
            self.assertEqual(done, [1])
            wait_for(lambda: p.loops_of([busy]) == [0], 10, what="the session back")
            one(busy, "INSERT INTO %s (id, email) VALUES (5, 'E@X')" % TABLE)
            self.assertEqual(direct("SELECT email_address FROM %s WHERE id = 5" % TABLE),
                             [("e@x",)])
            busy.close()

    def test_sessions_come_and_go_under_load_without_a_failed_transaction(self):
        """pgbench's sessions move to the main loop and stay there while reloads give their
        database a rule, take it away and give it again, mid-traffic."""
        db = "pd_relaydb"
        pdtest.fresh_databases(db)
        try:
            direct_query("CREATE TABLE %s (id bigserial PRIMARY KEY, email text, "
                         "email_address text)" % TABLE, dbname=db)
            pdtest.run_pgbench(pdtest.cluster()["port"], ["-i", "-q", "-s", "1"], dbname=db)
            dbs = pdtest.default_databases() + [{"name": db, "old": pdtest.pg_conninfo(db)}]
            with AdminProxy(relay_threads=2, databases=dbs) as p:
                bench = subprocess.Popen(
                    pdtest.pgbench_argv(p.port, db, "postgres", "-n", "-c", "8", "-j", "2",
                                        "-T", "6", "-M", "extended"),
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                wait_for(lambda: sum(p.pass_through()[1:]) >= 4, 20,
                         what="pgbench's sessions on the relay threads")
                for rules in ([users_rule(db)], [], [users_rule(db)]):
                    time.sleep(1)
                    p.reload_with(rules)
                out, _ = bench.communicate(timeout=120)
                self.assertEqual(bench.returncode, 0, out)
                self.assertIn("number of failed transactions: 0 (0.000%)", out)
                self.assertGreaterEqual(p.log().count("back to the main loop"), 4, out)
                self.assertEqual(p.pass_through(), [0, 0, 0])
                c = autocommit(p.port, db)
                one(c, "INSERT INTO %s (email) VALUES ('Z@X')" % TABLE)
                c.close()
            self.assertEqual(direct_query("SELECT email_address FROM %s" % TABLE, dbname=db),
                             [("z@x",)])
        finally:
            direct_query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % db)

    def test_connection_churn_across_the_loops(self):
        """pgbench -C: a new session for every transaction, each handed to a loop, ended on
        it and freed on the main loop, eight at a time."""
        with AdminProxy(relay_threads=2) as p:
            script = p.write_file("churn.sql", "SELECT count(*) FROM pg_class;\n")
            r = pdtest.run_pgbench(p.port, ["-n", "-C", "-c", "8", "-j", "2", "-T", "3", "-f",
                                            script], dbname="app", check=False)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("number of failed transactions: 0 (0.000%)", r.stdout)
            done = int(re.search(r"number of transactions actually processed: (\d+)",
                                 r.stdout).group(1))
            self.assertGreater(done, 20, r.stdout)
            wait_for(lambda: p.pass_through() == [0, 0, 0], 10, what="every session freed")
            status = p.ctl_json("status")
            self.assertEqual(status["sessions"], 0, status)
            self.assertGreaterEqual(status["sessions_total"], done)

    def test_no_relay_threads_keeps_every_session_on_the_main_loop(self):
        with AdminProxy(relay_threads=0) as p:
            conns = [autocommit(p.port) for _ in range(3)]
            self.assertEqual(p.loops_of(conns), [0, 0, 0])
            self.assertEqual(p.pass_through(), [3])
            self.assertEqual([one(c, "SELECT 41 + 1") for c in conns], [42, 42, 42])
            for c in conns:
                c.close()


if __name__ == "__main__":
    unittest.main()
