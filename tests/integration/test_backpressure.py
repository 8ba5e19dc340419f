#!/usr/bin/python3
"""Backpressure: a client that reads a 1 GB result slowly makes pgdual stop reading from
its backend, so the proxy's memory stays bounded (RSS < 64 MB) and the whole result still
arrives."""

import os
import struct
import threading
import time
import unittest

import pdtest
from pdtest import Proxy, RawClient

ROWS = 1000000
WIDTH = 1000
RSS_LIMIT_KB = 64 * 1024
APPNAME = "pd_backpressure_%d" % os.getpid()


class RssSampler(threading.Thread):
    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            v = pdtest.rss_kb(self.pid)
            if v is not None:
                self.samples.append(v)
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(5)
        return max(self.samples) if self.samples else None


class BackpressureTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy(log_level="info").start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def backend_wait_event(self):
        rows = pdtest.direct_query("SELECT coalesce(wait_event, '-') FROM pg_stat_activity "
                                   "WHERE application_name = %s", (APPNAME,))
        return rows[0][0] if rows else None

    def test_slow_reader_of_1gb(self):
        sampler = None
        if not pdtest.DIRECT:
            sampler = RssSampler(self.proxy.pid)
            sampler.start()
        c = RawClient(self.port, timeout=30, rcvbuf=64 * 1024)
        try:
            c.startup("postgres", "app", application_name=APPNAME)
            c.send(pdtest.query_msg("SELECT repeat('x', %d) FROM generate_series(1, %d)"
                                    % (WIDTH, ROWS)))
            # Phase 1: read nothing. The backend must end up blocked writing to its socket
            # (ClientWrite) because the proxy stopped reading from it.
            pdtest.wait_for(lambda: self.backend_wait_event() == "ClientWrite", 15, 0.1,
                            "the backend to block on ClientWrite while the client is not "
                            "reading")
            time.sleep(1.0)  # hold the stall a little while RSS is sampled
            # Phase 2: small reads with short sleeps, for about 3 s.
            counter = RowCounter()
            t_end = time.monotonic() + 3
            while time.monotonic() < t_end:
                counter.feed(c.sock.recv(8192))
                time.sleep(0.002)
            # Phase 3: read the rest as fast as we can (bounded time).
            c.sock.settimeout(60)
            deadline = time.monotonic() + 90
            while not counter.done:
                if time.monotonic() > deadline:
                    self.fail("result not complete after 90 s (%d rows)" % counter.rows)
                data = c.sock.recv(1 << 20)
                if not data:
                    self.fail("connection closed after %d rows" % counter.rows)
                counter.feed(data)
            self.assertIsNone(counter.error)
            self.assertEqual(counter.bad_rows, 0)
            self.assertEqual(counter.rows, ROWS)
            self.assertEqual(counter.tag, b"SELECT %d" % ROWS)
            rows, err = c.simple_query("SELECT 'after'")
            self.assertEqual(rows, [[b"after"]])
        finally:
            c.close()
            peak = sampler.stop() if sampler else None
        if sampler:
            print("pgdual peak RSS %d kB over %d samples" % (peak, len(sampler.samples)))
            self.assertLess(peak, RSS_LIMIT_KB, "pgdual RSS reached %d kB" % peak)


class RowCounter:
    """Parses a stream of backend messages, counting DataRows without keeping them."""

    def __init__(self):
        self.buf = bytearray()
        self.rows = 0
        self.bad_rows = 0
        self.done = False
        self.error = None
        self.tag = None
        self.row_len = 4 + 2 + 4 + WIDTH

    def feed(self, data):
        if not data:
            raise AssertionError("connection closed after %d rows" % self.rows)
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        unpack = struct.unpack_from
        while pos + 5 <= n:
            (ln,) = unpack("!I", buf, pos + 1)
            if pos + 1 + ln > n:
                break
            kind = buf[pos]
            if kind == 0x44:  # 'D'
                self.rows += 1
                if ln != self.row_len:
                    self.bad_rows += 1
            elif kind == 0x43:  # 'C'
                self.tag = bytes(buf[pos + 5:pos + ln]).rstrip(b"\0")
            elif kind == 0x45:  # 'E'
                self.error = pdtest.parse_fields(bytes(buf[pos + 5:pos + 1 + ln]))
            elif kind == 0x5A:  # 'Z'
                self.done = True
            pos += 1 + ln
        del buf[:pos]


if __name__ == "__main__":
    pdtest.main()
