#!/usr/bin/python3
"""psql through pgdual: queries, \\copy both ways, LISTEN/NOTIFY across sessions, errors
inside a transaction, startup parameters passed on, ParameterStatus and BackendKeyData."""

import os
import subprocess
import unittest

import pdtest
from pdtest import Proxy, RawClient, run_psql

SUFFIX = "psql_%d" % os.getpid()


class PsqlTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy().start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def psql(self, sql=None, **kw):
        return run_psql(self.port, sql, **kw)

    def test_queries(self):
        r = self.psql("SELECT 1 + 1; SELECT 'a' || 'b', NULL IS NULL")
        self.assertEqual(r.stdout.splitlines(), ["2", "ab|t"])
        t = "t_q_" + SUFFIX
        r = self.psql("CREATE TABLE %s (id int primary key, v text);"
                      "INSERT INTO %s SELECT g, md5(g::text) FROM generate_series(1, 1000) g;"
                      "SELECT count(*), sum(id), min(v) FROM %s;"
                      "DROP TABLE %s" % (t, t, t, t))
        self.assertEqual(r.stdout.splitlines()[-1],
                         "1000|500500|%s" % self._direct("SELECT min(md5(g::text)) FROM "
                                                         "generate_series(1, 1000) g"))

    def _direct(self, sql, dbname="app"):
        c = pdtest.cluster()
        return run_psql(c["port"], sql, dbname=dbname).stdout.strip()

    def test_notice(self):
        r = self.psql("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        self.assertIn("NOTICE:  hello from plpgsql", r.stderr)

    def test_copy_in_and_out(self):
        t = "t_copy_" + SUFFIX
        d = pdtest.tmpdir()
        src = os.path.join(d, "in.csv")
        rows = ["%d,\"text, with comma %d\",%s" % (i, i, "" if i % 7 == 0 else str(i * 1.5))
                for i in range(1, 20001)]
        with open(src, "w") as f:
            f.write("\n".join(rows) + "\n")
        out = os.path.join(d, "out.csv")
        self.psql("CREATE TABLE %s (id int, t text, x numeric)" % t)
        try:
            self.psql(None, args=["-c", "\\copy %s FROM '%s' WITH (FORMAT csv)" % (t, src)])
            self.assertEqual(self.psql("SELECT count(*), sum(id) FROM %s" % t).stdout.strip(),
                             "20000|200010000")
            self.psql(None, args=["-c", "\\copy (SELECT * FROM %s ORDER BY id) TO '%s' "
                                  "WITH (FORMAT csv)" % (t, out)])
            with open(out) as f:
                self.assertEqual(f.read().splitlines(), rows)
            # COPY FROM STDIN fed by psql's own stdin, and COPY TO STDOUT.
            r = self.psql(None, args=["-c", "\\copy %s FROM STDIN" % t],
                          input="100000\tfrom stdin\t\\N\n100001\tsecond\t2.5\n")
            r = self.psql("COPY (SELECT id, t, x FROM %s WHERE id >= 100000 ORDER BY id) "
                          "TO STDOUT" % t)
            self.assertEqual(r.stdout, "100000\tfrom stdin\t\\N\n100001\tsecond\t2.5\n")
            # A COPY that fails part-way reports the error and leaves the session usable.
            r = run_psql(self.port, None, check=False,
                         args=["-c", "\\copy %s FROM STDIN" % t, "-c", "SELECT 42"],
                         input="1\tok\t1\nnot-a-number\tbad\t1\n")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("invalid input syntax for type integer", r.stderr)
        finally:
            self.psql("DROP TABLE IF EXISTS %s" % t)

    def test_listen_notify_across_sessions(self):
        chan = "chan_" + SUFFIX
        appname = "pd_listener_" + SUFFIX
        listener = subprocess.Popen(
            pdtest.psql_argv(self.port, "app", "postgres", application_name=appname),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            listener.stdin.write("LISTEN %s;\n" % chan)
            listener.stdin.flush()
            # The LISTEN is in place once the listener's backend is idle after it.
            pdtest.wait_for(lambda: self._direct(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s' "
                "AND state = 'idle' AND query ILIKE 'LISTEN%%'" % appname,
                dbname="postgres") == "1", 10, what="the listener's LISTEN")
            self.psql("NOTIFY %s, 'payload one'; SELECT pg_notify('%s', 'payload two')"
                      % (chan, chan))
            listener.stdin.write("SELECT 1;\n")
            out, err = listener.communicate(timeout=20)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
        self.assertEqual(listener.returncode, 0, err)
        self.assertIn('Asynchronous notification "%s" with payload "payload one" received'
                      % chan, out)
        self.assertIn('Asynchronous notification "%s" with payload "payload two" received'
                      % chan, out)

    def test_error_mid_transaction_then_rollback(self):
        t = "t_tx_" + SUFFIX
        self.psql("CREATE TABLE %s (id int)" % t)
        try:
            script = ("BEGIN;\n"
                      "INSERT INTO %s VALUES (1);\n"
                      "SELECT 1 / 0;\n"
                      "SELECT 2;\n"
                      "ROLLBACK;\n"
                      "SELECT 'count=' || count(*) FROM %s;\n" % (t, t))
            r = run_psql(self.port, None, args=["-v", "ON_ERROR_STOP=0"], input=script,
                         check=False)
            self.assertIn("division by zero", r.stderr)
            self.assertIn("current transaction is aborted", r.stderr)
            self.assertEqual(r.stdout.strip(), "count=0")
            # Errors outside a transaction, then more work on the same session.
            r = run_psql(self.port, None, args=["-v", "ON_ERROR_STOP=0"], check=False,
                         input="SELECT * FROM no_such_table_%s;\nSELECT 'alive';\n" % SUFFIX)
            self.assertIn("does not exist", r.stderr)
            self.assertEqual(r.stdout.strip(), "alive")
        finally:
            self.psql("DROP TABLE %s" % t)

    def test_startup_parameters_reach_the_backend(self):
        schema = "s_" + SUFFIX
        self.psql("CREATE SCHEMA IF NOT EXISTS %s" % schema)
        try:
            r = self.psql("SHOW search_path; SELECT current_setting('application_name');"
                          "SHOW work_mem; SELECT current_user, current_database()",
                          user="alice", dbname="app2", application_name="pd_app_" + SUFFIX,
                          options="-c search_path=%s,public -c work_mem=7MB" % schema)
            self.assertEqual(r.stdout.splitlines(),
                             ["%s,public" % schema, "pd_app_" + SUFFIX, "7MB", "alice|app2"])
        finally:
            self.psql("DROP SCHEMA %s" % schema)

    def test_parameter_status_and_backend_key(self):
        with RawClient(self.port) as c:
            c.startup("postgres", "app", application_name="pd_raw")
            for name in ("server_version", "client_encoding", "server_encoding", "DateStyle",
                         "TimeZone", "integer_datetimes", "standard_conforming_strings",
                         "session_authorization", "application_name", "is_superuser"):
                self.assertIn(name, c.params)
            self.assertEqual(c.params["application_name"], "pd_raw")
            self.assertEqual(c.params["session_authorization"], "postgres")
            rows, err = c.simple_query("SELECT pg_backend_pid(), current_setting("
                                       "'server_version')")
            self.assertIsNone(err)
            self.assertIsNotNone(c.backend_key, "no BackendKeyData")
            backend_pid = int(rows[0][0])
            self.assertNotEqual(c.backend_key[0], backend_pid,
                                "the client sees the backend's own key; the proxy must "
                                "issue its own")
            self.assertEqual(c.params["server_version"], rows[0][1].decode())
            # Same parameters as PostgreSQL itself reports.
            with RawClient(pdtest.cluster()["port"]) as d:
                d.startup("postgres", "app", application_name="pd_raw")
                self.assertEqual(c.params, d.params)

    def test_terminate_closes_backend(self):
        appname = "pd_term_" + SUFFIX
        with RawClient(self.port) as c:
            c.startup("postgres", "app", application_name=appname)
            rows, _ = c.simple_query("SELECT 1")
            self.assertEqual(rows, [[b"1"]])
            c.send(pdtest.msg("X"))
            self.assertTrue(c.wait_closed(5), "proxy did not close after Terminate")
        pdtest.wait_for(lambda: self._direct(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '%s'" % appname,
            dbname="postgres") == "0", 5, what="the backend to go away after Terminate")


if __name__ == "__main__":
    pdtest.main()
