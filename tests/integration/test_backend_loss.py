#!/usr/bin/python3
"""Backend loss: the proxy's backend connections go through a small TCP forwarder that the
test can cut. A client whose backend vanishes gets a FATAL promptly instead of hanging,
other clients carry on, and new sessions work once the backend is reachable again."""

import os
import socket
import threading
import time
import unittest

import psycopg2

import pdtest
from pdtest import Closed, Proxy, RawClient

SUFFIX = "loss_%d" % os.getpid()


class Forwarder:
    """Accepts on 127.0.0.1:port and relays each connection to the real cluster."""

    def __init__(self, target_port):
        self.target = (pdtest.HOST, target_port)
        self.port = pdtest.free_port()
        self.pairs = []
        self.lock = threading.Lock()
        self.listener = None
        self.thread = None
        self.stopping = threading.Event()

    def start(self):
        self.stopping.clear()
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((pdtest.HOST, self.port))
        ls.listen(64)
        ls.settimeout(0.1)
        self.listener = ls
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()
        return self

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                a, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            a.settimeout(None)
            try:
                b = socket.create_connection(self.target, timeout=5)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            with self.lock:
                self.pairs.append((a, b))
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop_accepting(self):
        self.stopping.set()
        if self.listener:
            self.listener.close()
            self.listener = None
        if self.thread:
            self.thread.join(5)

    def kill_connections(self):
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        return len(pairs)

    def close(self):
        self.stop_accepting()
        self.kill_connections()


class BackendLossTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fwd = Forwarder(pdtest.cluster()["port"]).start()
        dbs = [
            {"name": "app", "old": "host=127.0.0.1 port=%d dbname=app connect_timeout=3"
             % cls.fwd.port},
            {"name": "direct", "old": pdtest.pg_conninfo("app")},
        ]
        cls.proxy = Proxy(databases=dbs).start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        try:
            cls.fwd.close()
        finally:
            cls.proxy.stop()

    def setUp(self):
        if self.fwd.listener is None:
            self.fwd.start()
        # A session on the other database, not behind the forwarder: never disturbed.
        self.bystander = RawClient(self.port)
        self.bystander.startup("postgres", "direct")

    def tearDown(self):
        try:
            self.assertEqual(self.bystander.simple_query("SELECT 'bystander'")[0],
                             [[b"bystander"]])
        finally:
            self.bystander.close()

    def assert_fatal_08_or_57(self, err):
        self.assertIsNotNone(err, "connection closed without an ErrorResponse")
        self.assertEqual(err.get("S"), "FATAL", err)
        self.assertIn(err.get("C", "")[:2], ("08", "57"), err)

    def new_session_works(self):
        with RawClient(self.port) as c:
            c.startup("postgres", "app")
            self.assertEqual(c.simple_query("SELECT 'back'")[0], [[b"back"]])

    def test_loss_while_idle(self):
        c = RawClient(self.port)
        try:
            c.startup("postgres", "app")
            self.assertEqual(c.simple_query("SELECT 1")[0], [[b"1"]])
            self.assertGreaterEqual(self.fwd.kill_connections(), 1)
            t0 = time.monotonic()
            try:
                c.send(pdtest.query_msg("SELECT 2"))
            except OSError:
                pass  # the proxy may already have sent its FATAL and closed
            err = c.read_error_then_close(5)
            self.assertLess(time.monotonic() - t0, 5)
            self.assert_fatal_08_or_57(err)
        finally:
            c.close()
        self.new_session_works()

    def test_loss_mid_query(self):
        c = RawClient(self.port)
        try:
            appname = "pd_midquery_" + SUFFIX
            c.startup("postgres", "app", application_name=appname)
            c.send(pdtest.query_msg("SELECT pg_sleep(20)"))
            pdtest.wait_backend_busy(appname)
            self.assertGreaterEqual(self.fwd.kill_connections(), 1)
            t0 = time.monotonic()
            err = c.read_error_then_close(5)
            self.assertLess(time.monotonic() - t0, 5)
            self.assert_fatal_08_or_57(err)
        finally:
            c.close()
        self.new_session_works()

    def test_loss_mid_result_psycopg(self):
        appname = "pd_midresult_" + SUFFIX
        conn = pdtest.connect(self.port, application_name=appname)
        conn.autocommit = True
        try:
            stamp = []

            def kill_when_busy():
                pdtest.wait_backend_busy(appname)
                stamp.append(time.monotonic())
                self.fwd.kill_connections()
            killer = threading.Thread(target=kill_when_busy, daemon=True)
            killer.start()
            with self.assertRaises(psycopg2.OperationalError):
                conn.cursor().execute("SELECT pg_sleep(20)")
            self.assertLess(time.monotonic() - stamp[0], 5)
            killer.join()
        finally:
            conn.close()
        self.new_session_works()

    def test_backend_unreachable_then_back(self):
        self.fwd.stop_accepting()
        self.fwd.kill_connections()
        with RawClient(self.port, timeout=10) as c:
            t0 = time.monotonic()
            try:
                c.startup("postgres", "app")
                self.fail("startup succeeded with the backend unreachable")
            except pdtest.ServerError as e:
                self.assertEqual(e.fields.get("S"), "FATAL", e.fields)
                self.assertEqual(e.fields.get("C", "")[:2], "08", e.fields)
            except Closed:
                self.fail("connection closed without a FATAL while the backend was down")
            self.assertLess(time.monotonic() - t0, 5)
        self.fwd.start()
        self.new_session_works()


if __name__ == "__main__":
    pdtest.main()
