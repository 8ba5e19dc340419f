#!/usr/bin/python3
"""TLS termination, client authentication (trust and SCRAM-SHA-256 against a users file),
backend credentials, and the startup requests pgdual must decline or refuse."""

import os
import shutil
import struct
import threading
import time
import unittest

import psycopg2
import psycopg2.errors

import pdtest
from pdtest import Proxy, RawClient, ServerError, run_psql

EXAMPLES = os.path.join(pdtest.source_dir(), "deploy", "examples")

PASSWORDS = {
    "alice": "alice-plain-Secr3t",      # plain-text entry
    "postgres": "postgres-scram-S3cret",  # SCRAM verifier entry
    "pwuser": "pwsecret",               # plain text, also valid on the backend
}
BACKEND_BAD_PASSWORD = "wrong-backend-Secr3t"


def tls_proxy(mode, **kw):
    p = Proxy(tls={"cert": "server.crt", "key": "server.key", "mode": mode}, **kw)
    for name in ("server.crt", "server.key"):
        shutil.copy(os.path.join(EXAMPLES, name), os.path.join(p.dir, name))
        os.chmod(os.path.join(p.dir, name), 0o600)
    return p


def conninfo_ssl(port, **kw):
    return dict(kw, sslrootcert=os.path.join(EXAMPLES, "server.crt"))


class TlsAllowTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = tls_proxy("allow").start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_psql_sslmode_require(self):
        r = run_psql(self.port, None, args=["-c", "\\conninfo", "-c", "SELECT 'over tls'"],
                     sslmode="require")
        self.assertIn("SSL connection (protocol: TLS", r.stdout)
        self.assertIn("over tls", r.stdout)

    def test_psql_verify_full(self):
        r = run_psql(self.port, "SELECT 1", sslmode="verify-full",
                     sslrootcert=os.path.join(EXAMPLES, "server.crt"))
        self.assertEqual(r.stdout.strip(), "1")

    def test_psycopg_tls_large_and_copy(self):
        conn = pdtest.connect(self.port, sslmode="require")
        try:
            self.assertTrue(conn.info.ssl_in_use)
            cur = conn.cursor()
            text = "0123456789abcdef" * (6 * 1024 * 1024 // 16)
            cur.execute("SELECT md5(%s), length(%s), %s", (text, text, text))
            md5, n, back = cur.fetchone()
            self.assertEqual(n, len(text))
            self.assertEqual(back, text)
            cur.execute("SELECT count(*), sum(g) FROM generate_series(1, 200000) g")
            self.assertEqual(cur.fetchone(), (200000, 200000 * 200001 // 2))
        finally:
            conn.close()

    def test_plaintext_allowed(self):
        conn = pdtest.connect(self.port, sslmode="disable")
        try:
            self.assertFalse(conn.info.ssl_in_use)
            cur = conn.cursor()
            cur.execute("SELECT 'plain'")
            self.assertEqual(cur.fetchone()[0], "plain")
        finally:
            conn.close()

    def test_cancel_over_tls(self):
        appname = "pd_tls_cancel_%d" % os.getpid()
        conn = pdtest.connect(self.port, sslmode="require", application_name=appname)
        conn.autocommit = True
        try:
            stamp = []

            def fire():
                pdtest.wait_backend_busy(appname)
                stamp.append(time.monotonic())
                conn.cancel()
            t = threading.Thread(target=fire, daemon=True)
            t.start()
            with self.assertRaises(psycopg2.errors.QueryCanceled):
                conn.cursor().execute("SELECT pg_sleep(30)")
            self.assertLess(time.monotonic() - stamp[0], 2.0)
            t.join()
            cur = conn.cursor()
            cur.execute("SELECT 1")
            self.assertEqual(cur.fetchone()[0], 1)
        finally:
            conn.close()

    def test_gssenc_request_declined(self):
        with RawClient(self.port) as c:
            c.send(struct.pack("!II", 8, pdtest.GSSENC_REQUEST))
            self.assertEqual(c.recv_exact(1), b"N")
            c.startup("postgres", "app")
            rows, err = c.simple_query("SELECT 'after gssenc'")
            self.assertIsNone(err)
            self.assertEqual(rows, [[b"after gssenc"]])

    def test_unknown_database_trust(self):
        with RawClient(self.port) as c:
            with self.assertRaises(ServerError) as cm:
                c.startup("postgres", "no_such_db")
            f = cm.exception.fields
            self.assertEqual((f.get("S"), f.get("C")), ("FATAL", "3D000"), f)
            self.assertIn('"no_such_db"', f.get("M", ""))
            self.assertTrue(c.wait_closed(5))


class TlsRequireTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = tls_proxy("require").start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_plaintext_refused(self):
        r = run_psql(self.port, "SELECT 1", sslmode="disable", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("FATAL", r.stderr)
        with RawClient(self.port) as c:
            with self.assertRaises(ServerError) as cm:
                c.startup("postgres", "app")
            self.assertEqual(cm.exception.fields.get("S"), "FATAL")
            self.assertTrue(c.wait_closed(5))

    def test_tls_accepted(self):
        r = run_psql(self.port, "SELECT 'ok'", sslmode="require")
        self.assertEqual(r.stdout.strip(), "ok")

    def test_gssenc_declined_then_ssl(self):
        # libpq's own fallback: GSSENCRequest declined, then TLS on the same socket.
        r = run_psql(self.port, "SELECT 'ok'", sslmode="require", gssencmode="prefer")
        self.assertEqual(r.stdout.strip(), "ok")


class ScramTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        dbs = [
            {"name": "app", "old": pdtest.pg_conninfo("app")},
            # Backend credentials in the conninfo: the backend session runs as pwuser.
            {"name": "app2", "old": pdtest.pg_conninfo("app2", user="pwuser",
                                                       password=PASSWORDS["pwuser"])},
            {"name": "badpw", "old": pdtest.pg_conninfo("app", user="pwuser",
                                                        password=BACKEND_BAD_PASSWORD)},
        ]
        cls.proxy = Proxy(databases=dbs, auth={"mode": "scram", "users_file": "users.txt"})
        cls.verifier = pdtest.scram_verifier(PASSWORDS["postgres"])
        cls.proxy.write_file("users.txt", (
            "; users for test_tls_auth\n"
            "\"alice\" \"%s\"\n"
            "\"postgres\" \"%s\"\n"
            "\"pwuser\" \"%s\"\n" % (PASSWORDS["alice"], cls.verifier, PASSWORDS["pwuser"])))
        cls.proxy.start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()
        log = cls.proxy.log()
        secrets = list(PASSWORDS.values()) + [BACKEND_BAD_PASSWORD] + \
            cls.verifier.split("$")[1:]
        for s in secrets:
            if s and s in log:
                raise AssertionError("a secret appears in the pgdual log")

    def raw_login(self, user, password, database="app"):
        c = RawClient(self.port)
        try:
            c.startup(user, database, password=password)
        except BaseException:
            c.close()
            raise
        return c

    def test_plaintext_entry(self):
        with self.raw_login("alice", PASSWORDS["alice"]) as c:
            self.assertEqual(c.simple_query("SELECT current_user")[0], [[b"alice"]])

    def test_verifier_entry(self):
        with self.raw_login("postgres", PASSWORDS["postgres"]) as c:
            self.assertEqual(c.simple_query("SELECT current_user")[0], [[b"postgres"]])

    def test_psql_and_psycopg(self):
        r = run_psql(self.port, "SELECT current_user", user="alice",
                     env={"PGPASSWORD": PASSWORDS["alice"]})
        self.assertEqual(r.stdout.strip(), "alice")
        conn = pdtest.connect(self.port, user="postgres", password=PASSWORDS["postgres"])
        try:
            cur = conn.cursor()
            cur.execute("SELECT current_user")
            self.assertEqual(cur.fetchone()[0], "postgres")
        finally:
            conn.close()

    def test_client_password_passed_to_backend(self):
        # pwuser's backend role needs SCRAM; its users_file entry is plain text, so the
        # proxy can log in to the backend with it.
        with self.raw_login("pwuser", PASSWORDS["pwuser"]) as c:
            self.assertEqual(c.simple_query("SELECT current_user")[0], [[b"pwuser"]])

    def test_conninfo_credentials(self):
        with self.raw_login("postgres", PASSWORDS["postgres"], database="app2") as c:
            self.assertEqual(c.simple_query("SELECT current_user, current_database()")[0],
                             [[b"pwuser", b"app2"]])

    def test_wrong_password(self):
        for user in ("alice", "postgres", "no_such_user"):
            with self.subTest(user=user):
                with RawClient(self.port) as c:
                    with self.assertRaises(ServerError) as cm:
                        c.startup(user, "app", password="not-the-password")
                    f = cm.exception.fields
                    self.assertEqual((f.get("S"), f.get("C")), ("FATAL", "28P01"), f)
                    self.assertEqual(f.get("M"),
                                     'password authentication failed for user "%s"' % user)
                    self.assertTrue(c.wait_closed(5))
        r = run_psql(self.port, "SELECT 1", user="alice", check=False,
                     env={"PGPASSWORD": "not-the-password"})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn('password authentication failed for user "alice"', r.stderr)

    def test_unknown_database(self):
        with RawClient(self.port) as c:
            with self.assertRaises(ServerError) as cm:
                c.startup("alice", "no_such_db", password=PASSWORDS["alice"])
            f = cm.exception.fields
            self.assertEqual((f.get("S"), f.get("C")), ("FATAL", "3D000"), f)
            self.assertEqual(f.get("M"), 'database "no_such_db" does not exist')

    def test_backend_rejects_credentials(self):
        with RawClient(self.port) as c:
            with self.assertRaises(ServerError) as cm:
                c.startup("postgres", "badpw", password=PASSWORDS["postgres"])
            f = cm.exception.fields
            self.assertEqual(f.get("S"), "FATAL", f)
            text = repr(f)
            self.assertNotIn(BACKEND_BAD_PASSWORD, text)
            self.assertTrue(c.wait_closed(5))

    def test_ssl_request_declined_without_tls(self):
        with RawClient(self.port) as c:
            c.send(struct.pack("!II", 8, pdtest.SSL_REQUEST))
            self.assertEqual(c.recv_exact(1), b"N")
            c.startup("alice", "app", password=PASSWORDS["alice"])
            self.assertEqual(c.simple_query("SELECT 1")[0], [[b"1"]])
        r = run_psql(self.port, "SELECT 1", user="alice", sslmode="require", check=False,
                     env={"PGPASSWORD": PASSWORDS["alice"]})
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("server does not support SSL", r.stderr)


if __name__ == "__main__":
    pdtest.main()
