#!/usr/bin/python3
"""`pgdual --demo -p PORT`: two throwaway clusters with the sample schemas come up, the
banner says how to connect, psql works through the proxy, both README stories can be
walked on the demo as the banner says (expand/contract in database app, blue/green in
database shop, up to a switchover dry run that would not refuse), and Ctrl-C (SIGINT)
stops the clusters and removes their directory."""

import json

import glob
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
import unittest

import pdtest

START_TIMEOUT = 120  # two initdb runs on a slow, shared machine


def read_lines(stream, q):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


class DemoTest(unittest.TestCase):
    def setUp(self):
        if pdtest.DIRECT:
            self.skipTest("needs pgdual")
        self.port = pdtest.free_port()
        self.errlog = os.path.join(pdtest.tmpdir(), "demo.err")
        self.errf = open(self.errlog, "w")
        self.proc = subprocess.Popen([pdtest.pgdual_path(), "--demo", "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.errf, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=read_lines, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        self.demo_dir = None
        self.pids = []

    def tearDown(self):
        # Whatever happened, leave no cluster and no directory behind.
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids + self.find_pids():
            if pdtest.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.demo_dir and self.demo_dir.startswith("/tmp/pgdual-demo-"):
            shutil.rmtree(self.demo_dir, ignore_errors=True)
        self.errf.close()
        if self.proc.stdout:
            self.proc.stdout.close()

    def err(self):
        with open(self.errlog, errors="replace") as f:
            return f.read()

    def find_pids(self):
        pids = []
        if self.demo_dir:
            for p in glob.glob(os.path.join(self.demo_dir, "*", "postmaster.pid")):
                try:
                    with open(p) as f:
                        pids.append(int(f.readline()))
                except (OSError, ValueError):
                    pass
        return pids

    def wait_banner(self):
        text = ""
        deadline = time.monotonic() + START_TIMEOUT
        while "Press Ctrl-C" not in text:
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail("no banner within %d s; stdout:\n%s\nstderr:\n%s"
                          % (START_TIMEOUT, text, self.err()))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(10)
                self.fail("pgdual --demo exited (status %s) before the banner; stdout:\n%s\n"
                          "stderr:\n%s" % (self.proc.returncode, text, self.err()))
            text += line
        return text

    def test_demo(self):
        banner = self.wait_banner()
        m = re.search(r"(/tmp/pgdual-demo-[A-Za-z0-9_]+)", banner)
        self.assertIsNotNone(m, "the banner does not name the temp dir:\n" + banner)
        self.demo_dir = m.group(1)
        self.assertIn('psql "host=127.0.0.1 port=%d dbname=app user=postgres"' % self.port,
                      banner)
        self.assertRegex(banner, r"pgdualctl -s %s/admin\.sock status" % re.escape(self.demo_dir))
        self.assertTrue(os.path.isdir(self.demo_dir))
        self.pids = self.find_pids()
        self.assertEqual(len(self.pids), 2, "expected two postmasters in " + self.demo_dir)
        for pid in self.pids:
            self.assertTrue(pdtest.pid_alive(pid))

        pdtest.wait_for(lambda: pdtest.port_open(self.port), 10, what="the demo proxy")
        self.assertIn('psql "host=127.0.0.1 port=%d dbname=shop user=postgres"' % self.port,
                      banner)
        r = pdtest.run_psql(self.port, "SELECT count(*), count(DISTINCT lower(email)) FROM "
                            "users", dbname="app", user="postgres")
        self.assertGreater(int(r.stdout.split("|")[0]), 0)
        r = pdtest.run_psql(self.port, "SELECT column_name FROM information_schema.columns "
                            "WHERE table_name = 'users' ORDER BY ordinal_position")
        self.assertEqual(r.stdout.split(), ["id", "email", "email_address"])
        r = pdtest.run_psql(self.port, "SELECT count(*) FROM orders JOIN order_items ON "
                            "order_id = orders.id", dbname="shop")
        self.assertGreater(int(r.stdout), 0)

        # The new cluster has shop's schema, empty.
        new_port = int(re.search(r"New cluster.*port=(\d+) dbname=shop", banner).group(1))
        r = pdtest.run_psql(new_port, "SELECT count(*) FROM orders; SELECT count(*) FROM "
                            "order_items", dbname="shop")
        self.assertEqual(r.stdout.split(), ["0", "0"])

        # The config written for the demo passes --check.
        cfg = os.path.join(self.demo_dir, "pgdual.yaml")
        r = subprocess.run([pdtest.pgdual_path(), "-c", cfg, "--check"], capture_output=True,
                           text=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

        # Both stories as the banner tells them, with pgdualctl through PGDUAL_ADMIN.
        self.assertIn("export PGDUAL_ADMIN=%s/admin.sock" % self.demo_dir, banner)
        env = dict(os.environ, PGDUAL_ADMIN=os.path.join(self.demo_dir, "admin.sock"))

        def ctl(*args):
            r = subprocess.run([os.path.join(pdtest.build_dir(), "pgdualctl"), "--json"]
                               + list(args), capture_output=True, text=True, timeout=120,
                               env=env)
            self.assertEqual(r.returncode, 0, "pgdualctl %s: %s%s"
                             % (" ".join(args), r.stdout, r.stderr))
            return json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else {}

        for story, db, rule, steps in (
                ("expand/contract", "app", "users-email",
                 [("flag", "users-email", "writes=dual"), ("backfill", "users-email")]),
                ("blue/green", "shop", "orders-to-green",
                 [("backfill", "orders-to-green"), ("flag", "orders-to-green", "writes=dual")])):
            with self.subTest(story=story):
                for step in steps:
                    self.assertIn("pgdualctl " + " ".join(step), banner)
                    ctl(*step)
                self.assertIn("pgdualctl verify %s" % rule, banner)
                res = ctl("verify", rule)
                self.assertEqual(res.get("result", {}).get("divergent"), 0, res)
                # Every guardrail passes (a columns database is switched the same way).
                dry = ctl("switchover", db, "--dry-run")
                self.assertFalse(dry["would_refuse"],
                                 [c for c in dry["checks"] if not c["ok"]])
        self.assertIn("pgdualctl switchover shop --dry-run", banner)
        self.assertIn("then switchover shop, rollback shop", banner)
        self.assertTrue(ctl("switchover", "shop")["ok"])
        self.assertTrue(ctl("rollback", "shop")["ok"])
        # Written through pgdual at writes=dual: both columns, and both clusters.
        r = pdtest.run_psql(self.port, "INSERT INTO users (email) VALUES ('New@Example.com') "
                            "RETURNING email_address", dbname="app")
        self.assertEqual(r.stdout.split(), ["new@example.com"])
        pdtest.run_psql(self.port, "INSERT INTO orders (user_id, total) VALUES (2, 1.00)",
                        dbname="shop")
        pdtest.wait_for(lambda: pdtest.run_psql(new_port, "SELECT count(*) FROM orders",
                                                dbname="shop").stdout.split() == ["6"],
                        10, what="the order mirrored to the new cluster")

        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.fail("pgdual --demo did not exit within 30 s of SIGINT:\n" + self.err())
        self.assertEqual(rc, 0, self.err())
        for pid in self.pids:
            self.assertFalse(pdtest.pid_alive(pid), "postmaster %d still running" % pid)
        self.assertFalse(os.path.exists(self.demo_dir), "%s not removed" % self.demo_dir)
        for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
            self.assertNotIn(marker, self.err())


if __name__ == "__main__":
    pdtest.main()
