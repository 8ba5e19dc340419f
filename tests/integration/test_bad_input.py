#!/usr/bin/python3
"""Malformed client input: each case gets an ErrorResponse (08P01, or 0A000 for an
unsupported protocol version) and its connection closed by pgdual, while a second, healthy
session keeps running queries and never notices. Also the client limit (53300)."""

import os
import socket
import struct
import unittest

import pdtest
from pdtest import Closed, HealthySession, Proxy, RawClient, msg, startup_packet

SUFFIX = "bad_%d" % os.getpid()
GB = 1 << 30


class BadInputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy(limits={"max_message_size": 1 << 20,
                                  "startup_timeout_ms": 1500}).start()
        cls.port = cls.proxy.port
        cls.healthy = HealthySession(cls.port)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.healthy.close()
        finally:
            cls.proxy.stop()

    def tearDown(self):
        # After every case, the other session is still fine, and so is a new one.
        self.assertEqual(self.healthy.errors, [])
        before = self.healthy.count
        self.healthy.check()
        self.assertGreater(self.healthy.count, before)
        with RawClient(self.port) as c:
            c.startup("postgres", "app")
            self.assertEqual(c.simple_query("SELECT 'fresh'")[0], [[b"fresh"]])
        self.assertIsNone(self.proxy.proc.poll() if self.proxy.proc else None,
                          "pgdual died")

    def expect_error_and_close(self, c, code, timeout=5):
        try:
            err = c.read_error_then_close(timeout)
        except AssertionError as e:
            self.fail(str(e))
        self.assertIsNotNone(err, "connection closed without an ErrorResponse")
        self.assertEqual(err.get("C"), code, err)
        self.assertEqual(err.get("S"), "FATAL", err)
        return err

    def session(self, appname):
        c = RawClient(self.port)
        c.startup("postgres", "app", application_name=appname)
        return c

    def backend_gone(self, appname):
        pdtest.wait_for(lambda: not pdtest.direct_query(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (appname,)),
            5, what="the backend of %s to close" % appname)

    # --- before or during startup --------------------------------------------------------

    def test_garbage_at_startup(self):
        with RawClient(self.port) as c:
            c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            self.expect_error_and_close(c, "08P01")

    def test_random_bytes_at_startup(self):
        with RawClient(self.port) as c:
            body = bytes((i * 37 + 11) % 256 for i in range(60))
            c.send(struct.pack("!I", 64) + body)
            err = c.read_error_then_close(5)
            self.assertIsNotNone(err)
            self.assertIn(err.get("C"), ("08P01", "0A000"), err)

    def test_startup_length_below_8(self):
        for n in (0, 4, 7):
            with self.subTest(length=n), RawClient(self.port) as c:
                c.send(struct.pack("!I", n) + b"\0" * max(0, n - 4))
                self.expect_error_and_close(c, "08P01")

    def test_startup_length_above_10000(self):
        with RawClient(self.port) as c:
            # Only the header: the proxy must reject it without waiting for the body.
            c.send(struct.pack("!II", 20000, pdtest.PROTOCOL_3_0))
            self.expect_error_and_close(c, "08P01")

    def test_truncated_startup_then_close(self):
        c = RawClient(self.port)
        pkt = startup_packet("postgres", "app")
        c.send(pkt[:len(pkt) // 2])
        c.sock.shutdown(socket.SHUT_WR)
        # Nothing can be said to a client that has gone; the proxy just closes.
        self.assertTrue(c.wait_closed(5), "proxy kept a half-closed startup open")
        c.close()

    def test_truncated_startup_times_out(self):
        with RawClient(self.port) as c:
            pkt = startup_packet("postgres", "app")
            c.send(pkt[:len(pkt) - 3])
            # limits.startup_timeout_ms is 1.5 s.
            try:
                err = c.read_error_then_close(6)
            except AssertionError as e:
                self.fail("startup_timeout_ms not enforced: %s" % e)
            if err is not None:
                self.assertEqual(err.get("S"), "FATAL", err)

    def test_unsupported_protocol_version(self):
        for version in (2 << 16, 4 << 16, 1234):
            with self.subTest(version=version), RawClient(self.port) as c:
                c.send(startup_packet("postgres", "app", version=version))
                self.expect_error_and_close(c, "0A000")

    def test_startup_without_user(self):
        with RawClient(self.port) as c:
            c.send(startup_packet(None, "app"))
            err = c.read_error_then_close(5)
            self.assertIsNotNone(err)
            self.assertIn(err.get("C"), ("28000", "08P01"), err)

    def test_bogus_cancel_request(self):
        with RawClient(self.port) as c:
            c.send(struct.pack("!IIII", 16, pdtest.CANCEL_REQUEST, 12345, 67890))
            self.assertTrue(c.wait_closed(5))

    # --- after a normal startup ------------------------------------------------------------

    def test_unknown_message_type(self):
        appname = "pd_unknown_" + SUFFIX
        with self.session(appname) as c:
            c.send(msg("?", b"whatever"))
            self.expect_error_and_close(c, "08P01")
        self.backend_gone(appname)

    def test_message_length_below_4(self):
        for n in (0, 3):
            appname = "pd_short_%d_%s" % (n, SUFFIX)
            with self.subTest(length=n), self.session(appname) as c:
                c.send(b"Q" + struct.pack("!I", n))
                self.expect_error_and_close(c, "08P01")
            self.backend_gone(appname)

    def test_message_length_above_1gb(self):
        appname = "pd_huge_" + SUFFIX
        with self.session(appname) as c:
            c.send(b"Q" + struct.pack("!I", GB + 100) + b"SELECT ")
            self.expect_error_and_close(c, "08P01")
        self.backend_gone(appname)

    def test_message_above_configured_limit(self):
        appname = "pd_limit_" + SUFFIX
        with self.session(appname) as c:
            # A query just under limits.max_message_size (1 MB) passes ...
            q = b"SELECT length('" + b"x" * (1000 * 1000) + b"')\0"
            c.send(msg("Q", q))
            rows, err = self._drain(c)
            self.assertIsNone(err)
            self.assertEqual(rows, [[b"1000000"]])
            # ... one of 2 MB is refused as soon as its header is seen.
            c.send(b"Q" + struct.pack("!I", 2 << 20) + b"SELECT '" + b"y" * 65536)
            self.expect_error_and_close(c, "08P01")
        self.backend_gone(appname)

    def _drain(self, c):
        rows, err = [], None
        while True:
            k, body = c.recv_msg()
            if k == "D":
                rows.append(pdtest.decode_datarow(body))
            elif k == "E":
                err = pdtest.parse_fields(body)
            elif k == "Z":
                return rows, err

    def test_truncated_message_then_close(self):
        appname = "pd_trunc_" + SUFFIX
        c = self.session(appname)
        c.send(b"Q" + struct.pack("!I", 100) + b"SELECT 1")
        c.sock.shutdown(socket.SHUT_WR)
        try:
            c.wait_closed(5)
        finally:
            c.close()
        self.backend_gone(appname)

    def test_client_vanishes_mid_query(self):
        appname = "pd_vanish_" + SUFFIX
        c = self.session(appname)
        # A query that writes all the time: its backend learns at once that the proxy
        # closed the connection (a sleeping one would only notice when it ends).
        c.send(pdtest.query_msg("SELECT repeat('z', 1000) FROM generate_series(1, 10000000)"))
        c.recv_msg()  # the result has started
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        self.backend_gone(appname)


class MaxClientsTest(unittest.TestCase):
    def test_too_many_clients(self):
        with Proxy(limits={"max_clients": 2}) as p:
            a = RawClient(p.port)
            a.startup("postgres", "app")
            b = RawClient(p.port)
            b.startup("postgres", "app")
            try:
                with RawClient(p.port) as c:
                    try:
                        c.startup("postgres", "app")
                        self.fail("a third client was accepted with max_clients: 2")
                    except pdtest.ServerError as e:
                        self.assertEqual((e.fields.get("S"), e.fields.get("C")),
                                         ("FATAL", "53300"), e.fields)
                    except Closed:
                        self.fail("third client closed without FATAL 53300")
                # The first two are unaffected.
                self.assertEqual(a.simple_query("SELECT 1")[0], [[b"1"]])
                self.assertEqual(b.simple_query("SELECT 2")[0], [[b"2"]])
                b.send(msg("X"))
                b.wait_closed(5)
                b.close()

                # Once a slot is free, a new client gets in (the proxy notices the close
                # asynchronously, so poll).
                def try_login():
                    c = RawClient(p.port)
                    try:
                        c.startup("postgres", "app")
                        return c
                    except (pdtest.ServerError, Closed):
                        c.close()
                        return None
                c = pdtest.wait_for(try_login, 5, 0.1, "a free client slot")
                self.assertEqual(c.simple_query("SELECT 3")[0], [[b"3"]])
                c.close()
            finally:
                a.close()
                b.close()


if __name__ == "__main__":
    pdtest.main()
