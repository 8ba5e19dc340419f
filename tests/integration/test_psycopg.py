#!/usr/bin/python3
"""python3-psycopg2 through pgdual: parameters of many types, a named (server-side)
cursor, COPY through copy_expert, bytea and large text round-trips, binary parameters and
results, and query cancellation."""

import datetime
import decimal
import hashlib
import io
import os
import struct
import threading
import time
import unittest
import uuid

import psycopg2
import psycopg2.errors
import psycopg2.extras

import pdtest
from pdtest import Proxy, RawClient, cstr, msg

SUFFIX = "pg2_%d" % os.getpid()


class PsycopgTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy().start()
        cls.port = cls.proxy.port

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def setUp(self):
        self.conn = pdtest.connect(self.port)

    def tearDown(self):
        self.conn.close()

    def test_parameters_of_many_types(self):
        tz = datetime.timezone(datetime.timedelta(hours=2))
        values = [
            0, -1, 2**31 - 1, -(2**63), 2**63 - 1, 3.25,
            decimal.Decimal("12345678901234567890.0123456789"), "", "plain",
            "ünïcödé ✓ 日本語 🐘", "quote ' and backslash \\ and NUL-free\ttab\nnewline",
            True, False, None, datetime.date(1999, 12, 31),
            datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=tz),
            datetime.time(12, 34, 56), datetime.timedelta(days=3, seconds=7),
            [1, 2, 3], ["a", None, "c"],
        ]
        cur = self.conn.cursor()
        for v in values:
            with self.subTest(value=v):
                cur.execute("SELECT %s", (v,))
                got = cur.fetchone()[0]
                self.assertEqual(got, v)  # aware datetimes compare by instant
        cur.execute("SELECT %s::float8, %s::float4", (-1.5e300, 0.5))
        self.assertEqual(cur.fetchone(), (-1.5e300, 0.5))
        u = uuid.uuid4()
        psycopg2.extras.register_uuid()
        cur.execute("SELECT %s::uuid, %s::jsonb", (u, psycopg2.extras.Json({"k": [1, "two"]})))
        self.assertEqual(cur.fetchone(), (u, {"k": [1, "two"]}))
        cur.execute("SELECT %(a)s + %(b)s, %(a)s::text || %(c)s", {"a": 40, "b": 2, "c": "x"})
        self.assertEqual(cur.fetchone(), (42, "40x"))

    def test_named_cursor_50k_rows(self):
        self.conn.autocommit = False
        cur = self.conn.cursor(name="pd_named_cursor")
        cur.itersize = 2000
        cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 50000) g ORDER BY g")
        n = total = 0
        last = 0
        for g, h in cur:
            n += 1
            total += g
            self.assertEqual(g, last + 1)
            last = g
            if g % 9973 == 0:
                self.assertEqual(h, hashlib.md5(str(g).encode()).hexdigest())
        cur.close()
        self.conn.commit()
        self.assertEqual((n, total), (50000, 50000 * 50001 // 2))

    def test_copy_expert_in_and_out(self):
        t = "t_copy_" + SUFFIX
        cur = self.conn.cursor()
        cur.execute("CREATE TABLE %s (id int, t text, b bytea)" % t)
        self.conn.commit()
        try:
            lines = ["%d\trow %d with tab\\there\t\\\\x%02x" % (i, i, i % 256)
                     for i in range(50000)]
            data = "\n".join(lines) + "\n"
            cur.copy_expert("COPY %s FROM STDIN" % t, io.StringIO(data))
            self.conn.commit()
            out = io.StringIO()
            cur.copy_expert("COPY (SELECT * FROM %s ORDER BY id) TO STDOUT" % t, out)
            self.assertEqual(out.getvalue(), data)
            # CSV with header, both ways.
            out = io.StringIO()
            cur.copy_expert("COPY (SELECT id, t FROM %s WHERE id < 100 ORDER BY id) TO STDOUT "
                            "WITH (FORMAT csv, HEADER)" % t, out)
            self.assertTrue(out.getvalue().startswith("id,t\n0,row 0 with tab\there\n"))
            # A failing COPY FROM leaves the connection usable after rollback.
            with self.assertRaises(psycopg2.errors.InvalidTextRepresentation):
                cur.copy_expert("COPY %s FROM STDIN" % t, io.StringIO("x\ty\t\\N\n"))
            self.conn.rollback()
            cur.execute("SELECT count(*) FROM %s" % t)
            self.assertEqual(cur.fetchone()[0], 50000)
        finally:
            self.conn.rollback()
            cur.execute("DROP TABLE %s" % t)
            self.conn.commit()

    def test_bytea_all_byte_values(self):
        data = bytes(range(256)) * 3
        cur = self.conn.cursor()
        cur.execute("SELECT %s::bytea, length(%s::bytea)",
                    (psycopg2.Binary(data), psycopg2.Binary(data)))
        got, n = cur.fetchone()
        self.assertEqual(bytes(got), data)
        self.assertEqual(n, 768)
        cur.execute("SELECT decode(string_agg(lpad(to_hex(g), 2, '0'), ''), 'hex') "
                    "FROM generate_series(0, 255) g")
        self.assertEqual(bytes(cur.fetchone()[0]), bytes(range(256)))

    def test_text_5mb_round_trip(self):
        chunk = "".join(chr(0x20 + (i * 7) % 90) for i in range(1000)) + "é"
        text = (chunk * (5 * 1024 * 1024 // len(chunk) + 1))[:5 * 1024 * 1024]
        cur = self.conn.cursor()
        cur.execute("SELECT %s, md5(%s), length(%s)", (text, text, text))
        got, md5, n = cur.fetchone()
        self.assertEqual(n, len(text))
        self.assertEqual(md5, hashlib.md5(text.encode()).hexdigest())
        self.assertEqual(got, text)

    def test_copy_binary_out(self):
        out = io.BytesIO()
        self.conn.cursor().copy_expert(
            "COPY (SELECT g::int4, decode('00ff', 'hex') FROM generate_series(1, 3) g) "
            "TO STDOUT WITH (FORMAT binary)", out)
        b = out.getvalue()
        self.assertTrue(b.startswith(b"PGCOPY\n\xff\r\n\0"), b[:20])
        # header (11 + 4 + 4) then per row: int16 ncols, int32 len, int4, int32 len, 2 bytes
        pos = 19
        for g in (1, 2, 3):
            ncols, l1, v, l2 = struct.unpack_from("!hiii", b, pos)
            self.assertEqual((ncols, l1, v, l2), (2, 4, g, 2))
            self.assertEqual(b[pos + 14:pos + 16], b"\x00\xff")
            pos += 16
        self.assertEqual(b[pos:], b"\xff\xff")

    def test_binary_parameters_and_results_extended_protocol(self):
        blob = bytes(range(256))
        with RawClient(self.port) as c:
            c.startup("postgres", "app")
            # Parse: unnamed statement, two parameters typed int4 (23) and bytea (17).
            c.send(msg("P", cstr("") + cstr("SELECT $1::int4 * 2, $2::bytea, "
                                           "length($2::bytea)")
                       + struct.pack("!hII", 2, 23, 17)))
            # Bind: both parameters binary, all results binary.
            bind = (cstr("") + cstr("") + struct.pack("!hhh", 2, 1, 1) + struct.pack("!h", 2)
                    + struct.pack("!ii", 4, 21) + struct.pack("!i", len(blob)) + blob
                    + struct.pack("!hh", 1, 1))
            c.send(msg("B", bind) + msg("D", b"P\0") + msg("E", cstr("") + b"\0\0\0\0")
                   + msg("S"))
            kinds, row = [], None
            while True:
                k, body = c.recv_msg()
                kinds.append(k)
                if k == "D":
                    row = pdtest.decode_datarow(body)
                if k == "E":
                    self.fail("error: %r" % pdtest.parse_fields(body))
                if k == "Z":
                    break
            self.assertEqual(kinds, ["1", "2", "T", "D", "C", "Z"])
            self.assertEqual(struct.unpack("!i", row[0])[0], 42)
            self.assertEqual(row[1], blob)
            self.assertEqual(struct.unpack("!i", row[2])[0], 256)

    def _cancel_when_busy(self, conn, appname, stamp):
        def fire():
            pdtest.wait_backend_busy(appname)
            stamp.append(time.monotonic())
            conn.cancel()
        t = threading.Thread(target=fire, daemon=True)
        t.start()
        return t

    def test_cancel(self):
        self.conn.close()
        appname = "pd_cancel_" + SUFFIX
        self.conn = pdtest.connect(self.port, application_name=appname)
        self.conn.autocommit = True
        other = pdtest.connect(self.port)
        other.autocommit = True
        other_result = []

        def other_sleep():
            try:
                with other.cursor() as oc:
                    oc.execute("SELECT pg_sleep(1.5), 'other done'")
                    other_result.append(oc.fetchone()[1])
            except Exception as e:  # noqa: BLE001
                other_result.append(e)

        try:
            ot = threading.Thread(target=other_sleep, daemon=True)
            ot.start()
            for attempt in range(2):
                stamp = []
                t = self._cancel_when_busy(self.conn, appname, stamp)
                cur = self.conn.cursor()
                with self.assertRaises(psycopg2.errors.QueryCanceled) as cm:
                    cur.execute("SELECT pg_sleep(30)")
                took = time.monotonic() - stamp[0]
                t.join()
                self.assertEqual(cm.exception.pgcode, "57014")
                self.assertLess(took, 2.0, "cancel took %.2f s" % took)
                cur.execute("SELECT 'still usable'")
                self.assertEqual(cur.fetchone()[0], "still usable")
            # Inside a transaction: the transaction is aborted, ROLLBACK recovers.
            self.conn.autocommit = False
            stamp = []
            t = self._cancel_when_busy(self.conn, appname, stamp)
            cur = self.conn.cursor()
            cur.execute("SELECT 1")
            with self.assertRaises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(30)")
            t.join()
            self.conn.rollback()
            cur.execute("SELECT 2")
            self.assertEqual(cur.fetchone()[0], 2)
            self.conn.rollback()
            ot.join(10)
            # The cancels reached our backend only; the other session finished its sleep.
            self.assertEqual(other_result, ["other done"])
        finally:
            other.close()


if __name__ == "__main__":
    pdtest.main()
