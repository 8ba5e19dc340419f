#!/usr/bin/python3
"""The metrics endpoint: GET /metrics answers 200 with the Prometheus text format (0.0.4),
HEAD the same headers without a body, GET /ready 200 while pgdual accepts connections,
other paths 404, other methods 405, garbage 400,
oversized requests 431; slow, idle or broken clients are timed out and never hold up
the proxy or other scrapes."""

import http.client
import re
import socket
import time
import unittest

import pdtest
from pdtest import HOST, Proxy, run_psql

SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9][0-9.e+-]*$")
COMMENT = re.compile(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$")


class MetricsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.mport = pdtest.free_port()
        cls.proxy = Proxy(admin={"metrics": "%s:%d" % (HOST, cls.mport)}).start()
        pdtest.wait_for(lambda: pdtest.port_open(cls.mport), 10, what="the metrics port")

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def request(self, method, path):
        conn = http.client.HTTPConnection(HOST, self.mport, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def raw(self, data, timeout=10):
        """Sends data on a bare socket and returns everything until the server closes."""
        with socket.create_connection((HOST, self.mport), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
            return out

    def test_metrics(self):
        run_psql(self.proxy.port, "SELECT 1")  # at least one session counted
        status, headers, body = self.request("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"),
                        headers)
        self.assertEqual(int(headers["Content-Length"]), len(body))
        self.assertEqual(headers["Connection"], "close")
        text = body.decode()
        self.assertTrue(text.endswith("\n"))
        for line in text.splitlines():
            self.assertTrue(SAMPLE.match(line) or COMMENT.match(line), "bad line %r" % line)
        self.assertIn("\npgdual_up 1\n", "\n" + text)
        total = re.search(r"^pgdual_sessions_total (\d+)$", text, re.M)
        self.assertIsNotNone(total, text)
        self.assertGreaterEqual(int(total.group(1)), 1)
        # Requests and client errors per database (what switchover --watch compares).
        req = re.search(r'^pgdual_client_requests_total\{database="app"\} (\d+)$', text, re.M)
        self.assertIsNotNone(req, text)
        self.assertGreaterEqual(int(req.group(1)), 1)
        errs = re.search(r'^pgdual_client_errors_total\{database="app"\} (\d+)$', text, re.M)
        self.assertIsNotNone(errs, text)
        r = run_psql(self.proxy.port, "SELECT 1/0", check=False)
        self.assertNotEqual(r.returncode, 0)
        after = self.request("GET", "/metrics")[2].decode()
        errs2 = re.search(r'^pgdual_client_errors_total\{database="app"\} (\d+)$', after, re.M)
        self.assertEqual(int(errs2.group(1)), int(errs.group(1)) + 1)
        # Pass-through sessions per loop: once psql's have ended, an open one goes to the
        # relay thread (a tie goes to a relay thread).
        def loops():
            text = self.request("GET", "/metrics")[2].decode()
            return dict(re.findall(r'^pgdual_relay_sessions\{loop="(\d+)"\} (\d+)$', text,
                                   re.M))
        pdtest.wait_for(lambda: loops() == {"0": "0", "1": "0"}, 10, what="psql's sessions gone")
        held = pdtest.connect(self.proxy.port)
        try:
            self.assertEqual(loops(), {"0": "0", "1": "1"})
        finally:
            held.close()
        # The numbers are rendered at each request.
        run_psql(self.proxy.port, "SELECT 1")
        text = self.request("GET", "/metrics?x=1")[2].decode()
        again = re.search(r"^pgdual_sessions_total (\d+)$", text, re.M)
        self.assertGreater(int(again.group(1)), int(total.group(1)))

    def test_head(self):
        status, headers, body = self.request("HEAD", "/metrics")
        self.assertEqual(status, 200)
        self.assertGreater(int(headers["Content-Length"]), 0)
        self.assertEqual(body, b"")

    def test_ready(self):
        # 200 while pgdual accepts connections (503 while it drains: test_shutdown).
        status, _, body = self.request("GET", "/ready")
        self.assertEqual((status, body), (200, b"ready\n"))
        status, headers, body = self.request("HEAD", "/ready?probe=1")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(int(headers["Content-Length"]), len(b"ready\n"))
        self.assertEqual(self.request("GET", "/readyz")[0], 404)

    def test_other_paths_and_methods(self):
        for path in ("/", "/metricsx", "/metrics/x", "/favicon.ico"):
            with self.subTest(path=path):
                self.assertEqual(self.request("GET", path)[0], 404)
        status, headers, _ = self.request("POST", "/metrics")
        self.assertEqual(status, 405)
        self.assertEqual(headers["Allow"], "GET, HEAD")

    def test_bad_requests(self):
        self.assertTrue(self.raw(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.raw(b"GET /metrics SPDY/9\r\n\r\n").startswith(b"HTTP/1.1 400 "))
        # Bare LF line ends are accepted.
        self.assertTrue(self.raw(b"GET /metrics HTTP/1.0\n\n").startswith(b"HTTP/1.1 200 "))
        big = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 9000
        self.assertTrue(self.raw(big).startswith(b"HTTP/1.1 431 "))
        # A client that connects and leaves at once costs nothing.
        for _ in range(20):
            socket.create_connection((HOST, self.mport), timeout=5).close()
        self.assertEqual(self.request("GET", "/metrics")[0], 200)

    def test_slow_clients_do_not_block(self):
        slow = []
        for _ in range(20):
            s = socket.create_connection((HOST, self.mport), timeout=10)
            s.sendall(b"GET /metr")  # and nothing more
            slow.append(s)
        idle = socket.create_connection((HOST, self.mport), timeout=10)  # sends nothing
        try:
            t0 = time.monotonic()
            self.assertEqual(self.request("GET", "/metrics")[0], 200)
            self.assertEqual(run_psql(self.proxy.port, "SELECT 41 + 1").stdout.strip(), "42")
            self.assertLess(time.monotonic() - t0, 3)
            # Each slow connection is answered 408 and closed after the 5 s timeout.
            for s in slow + [idle]:
                s.settimeout(10)
                data = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
            self.assertLess(time.monotonic() - t0, 9)
        finally:
            for s in slow + [idle]:
                s.close()

    def test_z_shutdown_with_open_connections(self):
        idle = socket.create_connection((HOST, self.mport), timeout=10)
        slow = socket.create_connection((HOST, self.mport), timeout=10)
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        try:
            time.sleep(0.2)
            self.proxy.stop()  # fails on a hang, a crash or a sanitizer report
            self.assertEqual(idle.recv(4096), b"")
        finally:
            idle.close()
            slow.close()
            self.proxy.start()
            pdtest.wait_for(lambda: pdtest.port_open(self.mport), 10, what="the metrics port")


if __name__ == "__main__":
    pdtest.main()
