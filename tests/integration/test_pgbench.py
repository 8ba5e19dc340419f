#!/usr/bin/python3
"""pgbench through pgdual: initialisation (COPY), the tpcb-like and select-only scripts in
the simple, extended and prepared protocols, and a pipelined script; every transaction
must succeed."""

import os
import re
import unittest

import pdtest
from pdtest import Proxy, run_pgbench

DB = "app2"  # pgbench's tables live here, apart from the other tests' tables

PIPELINE_SCRIPT = r"""
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
\startpipeline
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
SELECT :aid::bigint + 1, 'x'::text, NULL::int;
END;
\endpipeline
"""


def parse(out, expected):
    """Checks pgbench's summary: every transaction processed, none failed."""
    m = re.search(r"number of transactions actually processed: (\d+)/(\d+)", out)
    if not m:
        raise AssertionError("no transaction count in pgbench output:\n" + out)
    done, planned = int(m.group(1)), int(m.group(2))
    f = re.search(r"number of failed transactions: (\d+)", out)
    failed = int(f.group(1)) if f else None
    return done, planned, failed


class PgbenchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.proxy = Proxy(log_level="info").start()
        cls.port = cls.proxy.port
        run_pgbench(cls.port, ["-i", "-s", "1", "-q"], dbname=DB)

    @classmethod
    def tearDownClass(cls):
        cls.proxy.stop()

    def bench(self, args, clients=4, threads=2, transactions=200):
        r = run_pgbench(self.port, ["-n", "-c", str(clients), "-j", str(threads), "-t",
                                    str(transactions)] + args, dbname=DB)
        done, planned, failed = parse(r.stdout, clients * transactions)
        self.assertEqual((done, planned), (clients * transactions, clients * transactions),
                         r.stdout + r.stderr)
        self.assertEqual(failed, 0, r.stdout + r.stderr)
        self.assertNotIn("error", r.stderr.lower(), r.stderr)
        return r

    def test_initialised_through_proxy(self):
        r = pdtest.run_psql(self.port, "SELECT count(*) FROM pgbench_accounts;"
                            "SELECT count(*) FROM pgbench_branches", dbname=DB)
        self.assertEqual(r.stdout.split(), ["100000", "1"])

    def test_tpcb_simple(self):
        self.bench(["-M", "simple"])

    def test_tpcb_extended(self):
        self.bench(["-M", "extended"])

    def test_tpcb_prepared(self):
        self.bench(["-M", "prepared"])

    def test_select_only_prepared(self):
        self.bench(["-S", "-M", "prepared"], clients=8, transactions=500)

    def test_pipeline(self):
        d = pdtest.tmpdir()
        script = os.path.join(d, "pipeline.sql")
        with open(script, "w") as f:
            f.write(PIPELINE_SCRIPT)
        for mode in ("extended", "prepared"):
            with self.subTest(mode=mode):
                self.bench(["-M", mode, "-f", script], clients=2, transactions=150)


if __name__ == "__main__":
    pdtest.main()
