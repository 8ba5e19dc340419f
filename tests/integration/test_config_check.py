#!/usr/bin/python3
"""`pgdual -c FILE --check` over tests/config: every valid/*.yaml passes (exit 0), every
invalid/*.yaml fails (non-zero) with its errors positioned as FILE:LINE:COLUMN.

An invalid file may start with `# expect: LINE:COL: message` (or `# expect: message`
when no position is possible) lines; each must then appear in the output as
`FILE:LINE:COL: message` (or the message after `FILE:`). Files without such a line must
produce at least one FILE:LINE:COLUMN error. No output may contain a password that
appears in a file's conninfo."""

import glob
import os
import re
import subprocess
import unittest

import pdtest

CONFIG_DIR = os.path.join(pdtest.source_dir(), "tests", "config")


def check(path):
    r = subprocess.run([pdtest.pgdual_path(), "-c", path, "--check"], capture_output=True,
                       text=True, timeout=30, cwd=os.path.dirname(path))
    return r.returncode, r.stdout + r.stderr


def expectations(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    return [m.group(1).strip() for m in re.finditer(r"^#\s*expect:\s*(.+)$", text, re.M)]


def passwords(path):
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    return [p for p in re.findall(r"password=([^\s\"']+)", text) if len(p) >= 4]


class ConfigCheckTest(unittest.TestCase):
    def test_valid_files_pass(self):
        files = sorted(glob.glob(os.path.join(CONFIG_DIR, "valid", "*.yaml")))
        self.assertTrue(files, "no tests/config/valid/*.yaml: the valid set must not be empty")
        for path in files:
            with self.subTest(file=os.path.basename(path)):
                rc, out = check(path)
                self.assertEqual(rc, 0, "%s rejected:\n%s" % (path, out))
                for pw in passwords(path):
                    self.assertNotIn(pw, out, "a conninfo password was printed")

    def test_invalid_files_fail_with_positions(self):
        files = sorted(glob.glob(os.path.join(CONFIG_DIR, "invalid", "*.yaml")))
        if not files:
            self.skipTest("no tests/config/invalid/*.yaml yet")
        for path in files:
            with self.subTest(file=os.path.basename(path)):
                rc, out = check(path)
                self.assertNotEqual(rc, 0, "%s accepted" % path)
                self.assertGreater(rc, 0, "pgdual --check died of signal %d" % -rc)
                self.assertNotIn("AddressSanitizer", out)
                self.assertNotIn("runtime error:", out)
                exp = expectations(path)
                if not exp:
                    self.assertRegex(out, re.escape(path) + r":\d+:\d+: ",
                                     "no FILE:LINE:COLUMN error for %s:\n%s" % (path, out))
                for e in exp:
                    if re.match(r"\d+:\d+: ", e):
                        self.assertIn("%s:%s" % (path, e), out)
                    else:
                        self.assertIn(path + ":", out)
                        self.assertIn(e, out)
                for pw in passwords(path):
                    self.assertNotIn(pw, out, "a conninfo password was printed")

    def test_every_error_is_reported(self):
        # Several independent mistakes in one file: --check lists them all.
        d = pdtest.tmpdir()
        path = os.path.join(d, "many.yaml")
        with open(path, "w") as f:
            f.write("listen: { host: 127.0.0.1, port: 6432, colour: blue }\n"
                    "tls: { cert: a.crt, key: a.key, mode: sometimes }\n"
                    "databases:\n"
                    "  - { name: app, old: \"dbname=app\" }\n"
                    "  - { name: app, old: \"dbname=app2\" }\n")
        rc, out = check(path)
        self.assertNotEqual(rc, 0)
        self.assertRegex(out, re.escape(path) + r":1:\d+: .*colour")
        self.assertRegex(out, re.escape(path) + r":2:\d+: .*sometimes")
        self.assertRegex(out, re.escape(path) + r":5:\d+: .*app")

    def test_initial_flags_the_server_refuses(self):
        # Initial flags that the server refuses at start are --check errors too, at the
        # key at fault, naming the rule; and the server does refuse each of these files.
        db = {"name": "app", "old": pdtest.pg_conninfo("app"),
              "new": pdtest.pg_conninfo("app2")}
        columns = {"kind": "columns", "table": "public.users", "key": ["id"],
                   "columns": [{"old": "email", "new": "email_address"}]}
        # (rules, [(rule, key at fault, its value, the other key and value, why)])
        cases = [
            ([dict(name="orders", database="app", kind="tables", writes="old", reads="new")],
             [("orders", "reads", "new", "writes: old",
               "reads=new of a kind: tables rule needs new written")]),
            ([dict(name="orders", database="app", kind="tables", tables=["public.orders"],
                   writes="dual-new", reads="new")],
             [("orders", "writes", "dual-new", "reads: new",
               "so the rule must cover every table")]),
            ([dict(name="users-email", database="app", writes="new", reads="old", **columns)],
             [("users-email", "writes", "new", "reads: old",
               "writes=new leaves the old columns unwritten")]),
            ([dict(name="orders", database="app", kind="tables", writes="dual", reads="old"),
              dict(name="items", database="app", kind="tables", writes="dual-new",
                   reads="new")],
             [("orders", "writes", "dual", "reads: old",
               "the database's tables rules must flip together"),
              ("items", "writes", "dual-new", "reads: new",
               "the database's tables rules must flip together")]),
        ]
        for rules, expected in cases:
            with self.subTest(rules=[r["name"] for r in rules]):
                d = pdtest.tmpdir()
                path = os.path.join(d, "flags.yaml")
                with open(path, "w") as f:
                    f.write(pdtest.to_yaml({
                        "listen": {"host": pdtest.HOST, "port": pdtest.free_port()},
                        "databases": [db], "rules": rules}))
                with open(path) as f:
                    lines = f.read().splitlines()
                rc, out = check(path)
                self.assertEqual(rc, 1, out)
                for rule, key, value, other, why in expected:
                    m = re.search(re.escape(path) + r":(\d+):(\d+): rule \"%s\": %s: %s cannot "
                                  r"be served with %s: .*%s" % (rule, key, value, other,
                                                              re.escape(why)), out)
                    self.assertIsNotNone(m, out)
                    # The position is that of the key's value.
                    line = lines[int(m.group(1)) - 1]
                    self.assertEqual(line[:int(m.group(2)) - 1].strip(), key + ":", line)
                self.assertIn("HINT:", out)
                self.assertNotIn("is valid", out)
                # The server refuses the same file, for the same reason.
                r = subprocess.run([pdtest.pgdual_path(), "-c", path], capture_output=True,
                                   text=True, timeout=60, cwd=d)
                self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
                self.assertIn(expected[0][4], r.stderr)

        # Flags the server serves pass both.
        d = pdtest.tmpdir()
        path = os.path.join(d, "ok.yaml")
        with open(path, "w") as f:
            f.write(pdtest.to_yaml({
                "listen": {"host": pdtest.HOST, "port": pdtest.free_port()},
                "databases": [db],
                "rules": [dict(name="orders", database="app", kind="tables", writes="dual-new",
                               reads="new"),
                          dict(name="users-email", database="app", writes="new", reads="new",
                               **columns)]}))
        rc, out = check(path)
        self.assertEqual(rc, 0, out)

    def test_missing_file(self):
        rc, out = check(os.path.join(pdtest.tmpdir(), "does-not-exist.yaml"))
        self.assertNotEqual(rc, 0)
        self.assertIn("does-not-exist.yaml", out)


if __name__ == "__main__":
    pdtest.main()
