#!/usr/bin/python3
"""Messages of 100 MB and more through pgdual, both ways: a single DataRow, a simple
Query carrying a 100 MB literal, and a Bind carrying a 100 MB binary parameter."""

import hashlib
import struct
import unittest

import pdtest
from pdtest import Proxy, RawClient, cstr, msg

MB = 1024 * 1024


class LargeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy(log_level="info").start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def test_100mb_datarow(self):
        conn = pdtest.connect(self.port)
        try:
            cur = conn.cursor()
            # A 101-byte pattern repeated: a 106 MB value whose bytes vary, with a period
            # that does not line up with any buffer size.
            cur.execute("SELECT v, md5(v), length(v) FROM (SELECT repeat(md5('a') || "
                        "md5('b') || md5('c') || 'wxyz1', 1100000) AS v) s")
            v, md5, n = cur.fetchone()
            self.assertEqual(n, 101 * 1100000)
            self.assertEqual(len(v), n)
            self.assertEqual(hashlib.md5(v.encode()).hexdigest(), md5)
            del v
            cur.execute("SELECT 'after'")
            self.assertEqual(cur.fetchone()[0], "after")
        finally:
            conn.close()

    def test_100mb_query_parameter(self):
        block = bytes(range(32, 127)) * 1000
        text = (block * (101 * MB // len(block) + 1))[:101 * MB].decode()
        expect = hashlib.md5(text.encode()).hexdigest()
        conn = pdtest.connect(self.port)
        try:
            cur = conn.cursor()
            # Stored uncompressed: compressing 100 MB would only slow the test down.
            cur.execute("CREATE TEMP TABLE big (v text)")
            cur.execute("ALTER TABLE big ALTER v SET STORAGE EXTERNAL")
            cur.execute("INSERT INTO big VALUES (%s)", (text,))
            cur.execute("SELECT length(v), md5(v) FROM big")
            self.assertEqual(cur.fetchone(), (len(text), expect))
            conn.commit()
        finally:
            conn.close()

    def test_100mb_binary_bind(self):
        blob = bytes((i * 131 + (i >> 8)) & 0xFF for i in range(MB)) * 100 + b"tail"
        expect = hashlib.md5(blob).hexdigest()
        with RawClient(self.port, timeout=60) as c:
            c.startup("postgres", "app")
            c.send(msg("P", cstr("") + cstr("SELECT length($1), md5($1), $1")
                       + struct.pack("!hI", 1, 17)))
            c.send(msg("B", cstr("") + cstr("") + struct.pack("!hh", 1, 1)
                       + struct.pack("!hi", 1, len(blob)) + blob
                       + struct.pack("!hhhh", 3, 0, 0, 1)))
            c.send(msg("E", cstr("") + b"\0\0\0\0") + msg("S"))
            row = None
            while True:
                k, body = c.recv_msg()
                if k == "E":
                    self.fail("error: %r" % pdtest.parse_fields(body))
                if k == "D":
                    row = pdtest.decode_datarow(body)
                if k == "Z":
                    break
            self.assertEqual(int(row[0]), len(blob))
            self.assertEqual(row[1].decode(), expect)
            self.assertEqual(len(row[2]), len(blob))
            self.assertEqual(hashlib.md5(row[2]).hexdigest(), expect)


if __name__ == "__main__":
    pdtest.main()
