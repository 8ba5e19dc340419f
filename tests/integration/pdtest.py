"""pdtest — the small library every integration test uses.

The environment comes from ctest (tests/CMakeLists.txt):
    PD_PGDIR       directory holding cluster.json, written by pgcluster.py start
    PD_BUILD_DIR   the build directory (holds pgdual)
    PD_SOURCE_DIR  the repository

What is here:
    cluster()            the running PostgreSQL cluster (port, host, ...)
    free_port()          a free TCP port on 127.0.0.1
    Proxy                a pgdual process with a config of our making (context manager)
    psql_argv / run_psql, pgbench_argv / run_pgbench
    connect()            a psycopg2 connection
    rss_kb(pid)          resident set size of a process
    RawClient            a protocol client on a bare socket, for malformed input and for
                         reading slowly
    CtlMixin             pgdualctl helpers for a TestCase with an admin socket and a state
    main()               unittest.main that exits non-zero on failure and shows the logs
                         of the proxies started when something failed

Tests run with /usr/bin/python3 so that Debian's python3-psycopg2 is importable.
"""

import atexit
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HOST = "127.0.0.1"
PG_BINDIR = "/usr/lib/postgresql/15/bin"

_tmpdirs = []
# PD_TEST_DIRECT=1 points every Proxy at the real cluster instead of starting pgdual, to
# check a test itself against PostgreSQL (proxy-specific assertions then fail).
DIRECT = bool(os.environ.get("PD_TEST_DIRECT"))
_proxies = []


def _cleanup_tmpdirs():
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup_tmpdirs)


def tmpdir(prefix="pdtest-"):
    """A temporary directory removed when the test process exits."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    _tmpdirs.append(d)
    return d


# ---------------------------------------------------------------------------------------
# Environment


def source_dir():
    return os.environ.get("PD_SOURCE_DIR") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", ".."))


def build_dir():
    d = os.environ.get("PD_BUILD_DIR")
    if not d:
        raise unittest.SkipTest("PD_BUILD_DIR is not set (run the tests through ctest)")
    return d


def pgdual_path():
    return os.path.join(build_dir(), "pgdual")


_cluster = None


def cluster():
    """The cluster started by pgcluster.py: a dict with host, port, datadir, pid, ..."""
    global _cluster
    if _cluster is None:
        pgdir = os.environ.get("PD_PGDIR")
        if not pgdir:
            raise RuntimeError("PD_PGDIR is not set (run the tests through ctest, which "
                               "starts the cluster with tests/integration/pgcluster.py)")
        with open(os.path.join(pgdir, "cluster.json")) as f:
            _cluster = json.load(f)
    return _cluster


def pg_conninfo(dbname="app", user=None, **extra):
    """libpq conninfo of the real cluster (what a proxy's database entry points at)."""
    c = cluster()
    parts = ["host=%s" % c["host"], "port=%d" % c["port"], "dbname=%s" % dbname]
    if user:
        parts.append("user=%s" % user)
    for k, v in extra.items():
        parts.append("%s=%s" % (k, v))
    return " ".join(parts)


def direct_query(sql, args=(), dbname="postgres"):
    """Runs one query on the real cluster (as postgres) and returns all rows."""
    import psycopg2
    c = cluster()
    conn = psycopg2.connect(host=c["host"], port=c["port"], dbname=dbname, user="postgres",
                            connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def fresh_databases(*names):
    """Drops each database (if there) and creates it empty on the real cluster."""
    for db in names:
        direct_query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % db)
        direct_query("CREATE DATABASE %s" % db)


def stop_and_drop(proxy, *names):
    """Stops the proxy, then drops the databases, also when stopping failed."""
    try:
        proxy.stop()
    finally:
        for db in names:
            direct_query("DROP DATABASE IF EXISTS %s WITH (FORCE)" % db)


def wait_backend_busy(appname, timeout=10):
    """Waits until the backend of the session named appname is running a query (so that
    a cancel or a cut connection hits the query, not the gap before it)."""
    wait_for(lambda: direct_query(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
        (appname,)), timeout, what="the backend of %s to be busy" % appname)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_clients(worker, n, timeout=300):
    """Runs worker(seed) for seeds 0..n-1 in threads; returns the repr of each exception
    they raised (empty when all went well)."""
    errors = []

    def run(seed):
        try:
            worker(seed)
        except Exception as e:  # noqa: BLE001 - returned to the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def wait_for(pred, timeout, interval=0.05, what="condition"):
    """Polls pred() until it returns something true; returns it, or raises on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def port_open(port, host=HOST):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss_kb(pid):
    """VmRSS of a process in kB (None if it is gone)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------
# YAML: just enough of an emitter for our configs (no PyYAML dependency).


def _yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def _yaml_lines(v, indent):
    pad = " " * indent
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, (dict, list)) and x:
                out.append("%s%s:" % (pad, k))
                out.extend(_yaml_lines(x, indent + 2))
            elif isinstance(x, (dict, list)):
                out.append("%s%s: %s" % (pad, k, "{}" if isinstance(x, dict) else "[]"))
            else:
                out.append("%s%s: %s" % (pad, k, _yaml_scalar(x)))
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, (dict, list)) and x:
                sub = _yaml_lines(x, indent + 2)
                out.append("%s- %s" % (pad, sub[0].lstrip()))
                out.extend(sub[1:])
            else:
                out.append("%s- %s" % (pad, _yaml_scalar(x)))
    else:
        out.append(pad + _yaml_scalar(v))
    return out


def to_yaml(v):
    return "\n".join(_yaml_lines(v, 0)) + "\n"


# ---------------------------------------------------------------------------------------
# The proxy


def redact(text):
    """Hides conninfo passwords in text that is about to be printed."""
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s\"]+)", r"\1***", text)


class ProxyError(AssertionError):
    pass


def default_databases():
    """app, app2 and postgres on the test cluster; no user in the conninfo, so the
    backend connection uses the client's user."""
    return [{"name": db, "old": pg_conninfo(db)} for db in ("app", "app2", "postgres")]


class Proxy:
    """A running pgdual with a config written from the arguments.

        with Proxy() as p:
            conn = connect(p.port)

    `config` entries override or extend the generated config (e.g. tls, auth, limits).
    On exit the proxy gets SIGTERM; the test fails if it does not exit within
    `stop_timeout`, if it died of a signal or exited non-zero, or if its log shows an
    AddressSanitizer or UBSan report.
    """

    def __init__(self, databases=None, log_level="debug", limits=None, stop_timeout=15,
                 env=None, **config):
        self.dir = tmpdir("pdtest-proxy-")
        self.port = free_port()
        self.config = {"listen": {"host": HOST, "port": self.port}}
        self.config["databases"] = databases if databases is not None else default_databases()
        if limits:
            self.config["limits"] = limits
        self.config["log"] = {"level": log_level}
        self.config.update(config)
        self.config_path = os.path.join(self.dir, "pgdual.yaml")
        self.log_path = os.path.join(self.dir, "pgdual.log")
        self.stop_timeout = stop_timeout
        self.env = env
        self.proc = None
        self._logf = None

    # Files that configs refer to (users files, certificates) go next to the config.
    def write_file(self, name, text, mode=0o600):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.log().splitlines()[-n:])

    def start(self, timeout=10):
        with open(self.config_path, "w") as f:
            f.write(to_yaml(self.config))
        if DIRECT:
            # Development aid: run the test against PostgreSQL itself.
            self.port = cluster()["port"]
            return self
        self._logf = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1")
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen([pgdual_path(), "-c", self.config_path],
                                     stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        _proxies.append(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ProxyError("pgdual exited with status %s during start-up; config:\n%s"
                                 "\nlog:\n%s" % (self.proc.returncode,
                                                 redact(to_yaml(self.config)),
                                                 self.log_tail()))
            if port_open(self.port):
                return self
            if time.monotonic() >= deadline:
                self._kill()
                raise ProxyError("pgdual did not accept connections on port %d within %d s;"
                                 " log:\n%s" % (self.port, timeout, self.log_tail()))
            time.sleep(0.05)

    def _kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def sanitizer_report(self):
        text = self.log()
        for marker in ("AddressSanitizer", "LeakSanitizer", "ThreadSanitizer", "runtime error:"):
            i = text.find(marker)
            if i >= 0:
                return text[max(0, i - 2000):i + 6000]
        return None

    def stop(self):
        """SIGTERM, wait, kill if needed; raises ProxyError on any sign of trouble."""
        if self.proc is None:
            return
        problems = []
        if self.proc.poll() is not None:
            problems.append("pgdual had already exited (status %s) before the test ended"
                            % self.proc.returncode)
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                problems.append("pgdual did not exit within %d s of SIGTERM; killed"
                                % self.stop_timeout)
                self._kill()
        rc = self.proc.returncode
        if rc is not None and rc < 0 and not problems:
            problems.append("pgdual died of signal %d" % -rc)
        elif rc not in (0, None) and not problems and rc != -signal.SIGKILL:
            problems.append("pgdual exited with status %d after SIGTERM" % rc)
        self._finish(problems)

    def wait_exit(self, timeout):
        """Waits for pgdual to exit by itself (after a signal the test sent) and returns
        its exit status (negative: the signal that killed it). Raises ProxyError if it is
        still running after timeout seconds (it is then killed) or if its log shows a
        sanitizer report; the exit status itself is for the test to judge."""
        problems = []
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            problems.append("pgdual did not exit within %.1f s; killed" % timeout)
            self._kill()
        rc = self.proc.returncode
        self._finish(problems)
        return rc

    def _finish(self, problems):
        """The process has ended: closes its log and raises ProxyError on problems or a
        sanitizer report."""
        if self._logf:
            self._logf.close()
            self._logf = None
        report = self.sanitizer_report()
        if report:
            problems.append("sanitizer report in the pgdual log:\n" + report)
        self.proc = None
        if problems:
            raise ProxyError("\n".join(problems) + "\nlog tail:\n" + self.log_tail())

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stop()
        except ProxyError:
            if exc_type is None:
                raise
            # Do not hide the test's own failure; show ours alongside.
            print("pgdual problem while handling a failing test:\n%s"
                  % sys.exc_info()[1], file=sys.stderr)
        return False


# ---------------------------------------------------------------------------------------
# Clients


def _bin(name):
    p = os.path.join(PG_BINDIR, name)
    return p if os.path.exists(p) else "/usr/bin/" + name


def ci_quote(v):
    """A conninfo value, quoted when needed."""
    v = str(v)
    if v and not any(c in v for c in " '\\"):
        return v
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(port, dbname="app", user="postgres", **extra):
    parts = ["host=%s" % HOST, "port=%d" % port, "dbname=%s" % ci_quote(dbname),
             "user=%s" % ci_quote(user), "connect_timeout=10"]
    for k, v in extra.items():
        parts.append("%s=%s" % (k, ci_quote(v)))
    return " ".join(parts)


def psql_argv(port, dbname="app", user="postgres", *args, **extra):
    return [_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
            conninfo(port, dbname, user, **extra)] + list(args)


def run_psql(port, sql=None, dbname="app", user="postgres", args=(), input=None,
             env=None, timeout=60, check=True, **extra):
    """Runs psql (-At) against port; returns the CompletedProcess (text)."""
    argv = psql_argv(port, dbname, user, "-At", *args, **extra)
    if sql is not None:
        argv += ["-c", sql]
    e = dict(os.environ)
    e.pop("PGPASSWORD", None)
    if env:
        e.update(env)
    r = subprocess.run(argv, input=input, capture_output=True, text=True, env=e,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError("psql failed (status %d): %s%s"
                             % (r.returncode, r.stdout, r.stderr))
    return r


def pgbench_argv(port, dbname="app", user="postgres", *args):
    return [_bin("pgbench"), "-h", HOST, "-p", str(port), "-U", user] + list(args) + [dbname]


def run_pgbench(port, args, dbname="app", user="postgres", timeout=300, check=True):
    r = subprocess.run(pgbench_argv(port, dbname, user, *args), capture_output=True,
                       text=True, timeout=timeout,
                       env=dict(os.environ, PGCONNECT_TIMEOUT="10"))
    if check and r.returncode != 0:
        raise AssertionError("pgbench %s failed (status %d):\n%s%s"
                             % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def connect(port, dbname="app", user="postgres", **kw):
    import psycopg2
    kw.setdefault("connect_timeout", 10)
    return psycopg2.connect(host=HOST, port=port, dbname=dbname, user=user, **kw)


# ---------------------------------------------------------------------------------------
# A protocol client on a bare socket


PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


def msg(kind, body=b""):
    """A frontend/backend message: type byte, int32 length (self-inclusive), body."""
    if isinstance(kind, str):
        kind = kind.encode()
    return kind + struct.pack("!I", len(body) + 4) + body


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def startup_packet(user="postgres", database="app", version=PROTOCOL_3_0, **params):
    body = struct.pack("!I", version)
    pairs = {"user": user, "database": database}
    pairs.update(params)
    for k, v in pairs.items():
        if v is not None:
            body += cstr(k) + cstr(v)
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def query_msg(sql):
    return msg("Q", cstr(sql))


def parse_fields(body):
    """Fields of an ErrorResponse/NoticeResponse: {'S': 'ERROR', 'C': '08P01', ...}."""
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


class Closed(Exception):
    pass


class ServerError(AssertionError):
    """An ErrorResponse where none was expected; .fields has its fields."""

    def __init__(self, fields):
        super().__init__("server error: %r" % (fields,))
        self.fields = fields


def _hmac(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


def scram_verifier(password, salt=None, iterations=4096):
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (ASCII passwords only: no
    SASLprep)."""
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    server = _hmac(salted, b"Server Key")
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return "SCRAM-SHA-256$%d:%s$%s:%s" % (iterations, b64(salt), b64(stored), b64(server))


class ScramClient:
    """The client side of SCRAM-SHA-256 (RFC 5802/7677), without channel binding."""

    def __init__(self, password):
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18))
        self.first_bare = b"n=,r=" + self.nonce

    def client_first(self):
        return b"n,," + self.first_bare

    def client_final(self, server_first):
        attrs = dict(p.split(b"=", 1) for p in server_first.split(b","))
        if not attrs[b"r"].startswith(self.nonce):
            raise AssertionError("server nonce does not extend ours")
        salt = base64.b64decode(attrs[b"s"])
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, int(attrs[b"i"]))
        client_key = _hmac(salted, b"Client Key")
        stored = hashlib.sha256(client_key).digest()
        without_proof = b"c=biws,r=" + attrs[b"r"]
        self.auth_message = self.first_bare + b"," + server_first + b"," + without_proof
        sig = _hmac(stored, self.auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, sig))
        self.server_key = _hmac(salted, b"Server Key")
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server(self, server_final):
        expected = b"v=" + base64.b64encode(_hmac(self.server_key, self.auth_message))
        if server_final != expected:
            raise AssertionError("bad SCRAM server signature %r" % server_final)


class RawClient:
    """A client that speaks the protocol by hand.

    recv_msg() returns (type, body) with type a one-character str; Closed is raised when
    the peer closes. Reads are buffered internally in `bufsize`-byte reads.
    """

    def __init__(self, port, host=HOST, timeout=10, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.buf = bytearray()
        self.params = {}
        self.backend_key = None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
        return False

    def settimeout(self, t):
        self.sock.settimeout(t)

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, n=65536):
        try:
            data = self.sock.recv(n)
        except ConnectionResetError:
            data = b""
        if not data:
            raise Closed("connection closed by the peer")
        self.buf += data

    def recv_exact(self, n):
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def recv_msg(self):
        while len(self.buf) < 5:
            self._fill()
        kind = chr(self.buf[0])
        (length,) = struct.unpack_from("!I", self.buf, 1)
        if length < 4:
            raise AssertionError("server sent a message with length %d" % length)
        while len(self.buf) < 1 + length:
            self._fill(max(65536, 1 + length - len(self.buf)))
        body = bytes(self.buf[5:1 + length])
        del self.buf[:1 + length]
        return kind, body

    def expect(self, *kinds):
        """Reads messages, skipping NoticeResponse/ParameterStatus, until one of kinds."""
        while True:
            k, body = self.recv_msg()
            if k in kinds:
                return k, body
            if k == "E":
                raise AssertionError("unexpected error: %r" % parse_fields(body))
            if k not in ("N", "S", "A"):
                raise AssertionError("unexpected message %r while waiting for %r" % (k, kinds))

    def startup(self, user="postgres", database="app", password=None, **params):
        """Startup (trust, cleartext or SCRAM-SHA-256 when password is given); returns
        after ReadyForQuery. Records ParameterStatus and BackendKeyData. An
        ErrorResponse raises ServerError."""
        self.send(startup_packet(user, database, **params))
        return self.finish_startup(password)

    def finish_startup(self, password=None):
        scram = None
        while True:
            k, body = self.recv_msg()
            if k == "R":
                (code,) = struct.unpack_from("!I", body)
                if code == 0:
                    continue
                if password is None:
                    raise AssertionError("server asked for authentication %d" % code)
                if code == 3:  # AuthenticationCleartextPassword
                    self.send(msg("p", cstr(password)))
                elif code == 10:  # AuthenticationSASL
                    mechs = [m for m in body[4:].split(b"\0") if m]
                    if b"SCRAM-SHA-256" not in mechs:
                        raise AssertionError("no SCRAM-SHA-256 among %r" % mechs)
                    scram = ScramClient(password)
                    first = scram.client_first()
                    self.send(msg("p", cstr("SCRAM-SHA-256") + struct.pack("!i", len(first))
                                  + first))
                elif code == 11:  # AuthenticationSASLContinue
                    self.send(msg("p", scram.client_final(body[4:])))
                elif code == 12:  # AuthenticationSASLFinal
                    scram.verify_server(body[4:])
                else:
                    raise AssertionError("unsupported authentication request %d" % code)
            elif k == "S":
                name, value = body.split(b"\0")[:2]
                self.params[name.decode()] = value.decode()
            elif k == "K":
                self.backend_key = struct.unpack("!II", body)
            elif k == "E":
                raise ServerError(parse_fields(body))
            elif k == "Z":
                return self

    def simple_query(self, sql):
        """Runs a simple query; returns (rows, error_fields) with rows as lists of
        bytes/None."""
        self.send(query_msg(sql))
        rows, err = [], None
        while True:
            k, body = self.recv_msg()
            if k == "D":
                rows.append(decode_datarow(body))
            elif k == "E":
                err = parse_fields(body)
            elif k == "Z":
                return rows, err

    def simple_query_results(self, n):
        """Reads the answers to n simple queries sent earlier: a list of row lists, one
        per ReadyForQuery; an ErrorResponse raises ServerError."""
        results, rows = [], []
        while len(results) < n:
            k, body = self.recv_msg()
            if k == "D":
                rows.append(decode_datarow(body))
            elif k == "E":
                raise ServerError(parse_fields(body))
            elif k == "Z":
                results.append(rows)
                rows = []
        return results

    def read_error_then_close(self, timeout=5):
        """Reads until an ErrorResponse and then end of stream. Returns the error fields;
        raises AssertionError if the server does not close within timeout."""
        self.sock.settimeout(timeout)
        err = None
        deadline = time.monotonic() + timeout
        try:
            while True:
                if time.monotonic() > deadline:
                    raise AssertionError("connection not closed within %s s" % timeout)
                k, body = self.recv_msg()
                if k == "E" and err is None:
                    err = parse_fields(body)
        except Closed:
            return err
        except socket.timeout:
            raise AssertionError("connection not closed within %s s (error so far: %r)"
                                 % (timeout, err))

    def wait_closed(self, timeout=5):
        """True if the server closes the connection within timeout (discarding data)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (socket.timeout, BlockingIOError):
            return False
        except OSError:
            return True
        return False


def decode_datarow(body):
    (n,) = struct.unpack_from("!H", body)
    pos, cols = 2, []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if ln < 0:
            cols.append(None)
        else:
            cols.append(body[pos:pos + ln])
            pos += ln
    return cols


# ---------------------------------------------------------------------------------------
# A second session that keeps working while another one misbehaves


class HealthySession:
    """A psycopg2 session that runs a query on demand and in a background loop, to show
    that one client's trouble does not disturb another."""

    def __init__(self, port, dbname="app", user="postgres"):
        self.conn = connect(port, dbname, user)
        self.conn.autocommit = True
        self.errors = []
        self.count = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - recorded and reported by the test
                self.errors.append(repr(e))
                return
            self._stop.wait(0.02)

    def check(self):
        with self._lock:
            with self.conn.cursor() as cur:
                cur.execute("SELECT %s::int + 1", (self.count,))
                v = cur.fetchone()[0]
                if v != self.count + 1:
                    raise AssertionError("healthy session got %r" % v)
                self.count += 1

    def close(self):
        self._stop.set()
        self._thread.join(10)
        self.conn.close()
        if self.errors:
            raise AssertionError("the healthy session failed: %s" % self.errors)


# ---------------------------------------------------------------------------------------
# pgdualctl


class CtlMixin:
    """pgdualctl for a TestCase whose class sets `sock` (pgdual's admin socket) and `state`
    (its state file)."""

    def ctl(self, *args, json_out=False, timeout=120):
        argv = [os.path.join(build_dir(), "pgdualctl"), "-s", self.sock]
        if json_out:
            argv.append("--json")
        return subprocess.run(argv + list(args), capture_output=True, text=True,
                              timeout=timeout)

    def ctl_json(self, *args, expect_rc=0):
        r = self.ctl(*args, json_out=True)
        if expect_rc is not None:
            self.assertEqual(r.returncode, expect_rc, "pgdualctl %s: rc %d\n%s%s"
                             % (" ".join(args), r.returncode, r.stdout, r.stderr))
        return json.loads(r.stdout)

    def job(self, job_id):
        return self.ctl_json("jobs", str(job_id))["job"]

    def wait_job(self, job_id, pred, what, timeout=120):
        """Polls the job until pred(job) holds; returns the job."""
        return wait_for(lambda: (lambda j: j if pred(j) else None)(self.job(job_id)),
                        timeout, interval=0.05, what=what)

    def state_doc(self):
        with open(self.state) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------


def main():
    """unittest.main, printing the logs of the proxies started when something failed."""
    prog = unittest.main(exit=False, verbosity=2)
    ok = prog.result.wasSuccessful()
    if not ok:
        for p in _proxies:
            print("\n===== pgdual log %s (last 80 lines) =====\n%s"
                  % (p.log_path, p.log_tail(80)), file=sys.stderr)
        for p in _proxies:
            if p.proc is not None:
                p._kill()
    if not prog.result.testsRun:
        print("no tests ran", file=sys.stderr)
        ok = False
    sys.exit(0 if ok else 1)
