#!/usr/bin/python3
"""Starts and stops the throwaway PostgreSQL cluster shared by the integration tests.

    pgcluster.py start DIR     initdb + start; writes DIR/cluster.json
    pgcluster.py stop DIR      fast shutdown, kill if needed, remove the data

ctest runs these as the setup and cleanup fixtures of every integration test. DIR lives
in the build tree, which the `postgres` user may not be able to reach, so it only holds
cluster.json; the data directory and the Unix socket live in a fresh temporary directory
under /tmp owned by `postgres`. initdb refuses to run as root, so when we are root every
PostgreSQL binary runs as `postgres` through `runuser`.

The cluster listens on 127.0.0.1 only, at a free high port. Every role may connect
without a password except `pwuser`, which needs SCRAM-SHA-256 (password 'pwsecret'), so
that backend password authentication through a conninfo can be tested.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

BINDIR = os.environ.get("PD_PG_BINDIR", "/usr/lib/postgresql/15/bin")
HOST = "127.0.0.1"
PG_USER = "postgres"
PWUSER = "pwuser"
PWUSER_PASSWORD = "pwsecret"


def log(msg):
    print("pgcluster: " + msg, file=sys.stderr, flush=True)


def as_postgres(argv):
    """argv to run a PostgreSQL binary as `postgres` (directly when we are not root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--"] + argv
    return argv


def run(argv, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("text", True)
    # Run from / so that runuser'd binaries never start in a directory they cannot read.
    kw.setdefault("cwd", "/")
    return subprocess.run(argv, **kw)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def read_postmaster_pid(datadir):
    try:
        with open(os.path.join(datadir, "postmaster.pid")) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def info_path(d):
    return os.path.join(d, "cluster.json")


def stop_cluster(info):
    """Stops the cluster described by info (fast shutdown, then SIGKILL) and removes it."""
    datadir = info.get("datadir")
    pid = info.get("pid")
    if datadir and os.path.isdir(datadir):
        r = run(as_postgres([os.path.join(BINDIR, "pg_ctl"), "stop", "-D", datadir,
                             "-m", "fast", "-w", "-t", "30"]))
        if r.returncode != 0 and "No such file" not in r.stdout \
                and "is not running" not in r.stdout and "PID file" not in r.stdout:
            log("pg_ctl stop: " + r.stdout.strip())
        pid = pid or read_postmaster_pid(datadir)
    if pid and pid_alive(pid) and _is_postgres(pid):
        log("postmaster %d still alive after pg_ctl stop; killing it" % pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_dead(pid, 10)
    tmp = info.get("tmpdir")
    if tmp and tmp.startswith("/tmp/") and os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def _is_postgres(pid):
    """Guards against killing an unrelated process that reused a stale PID."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def stop(d):
    p = info_path(d)
    if not os.path.exists(p):
        log("no cluster recorded in %s; nothing to stop" % p)
        return 0
    try:
        with open(p) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        log("cannot read %s (%s); removing it" % (p, e))
        os.unlink(p)
        return 0
    stop_cluster(info)
    os.unlink(p)
    log("stopped cluster on port %s" % info.get("port"))
    return 0


def write_conf(datadir, tmpdir, port):
    conf = {
        "listen_addresses": "'%s'" % HOST,
        "port": str(port),
        "unix_socket_directories": "'%s'" % tmpdir,
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "300",
        "shared_buffers": "64MB",
        "password_encryption": "'scram-sha-256'",
        "logging_collector": "off",
        "log_min_messages": "warning",
        "max_wal_size": "1GB",
    }
    with open(os.path.join(datadir, "postgresql.auto.conf"), "w") as f:
        f.write("# written by pgcluster.py\n")
        for k, v in conf.items():
            f.write("%s = %s\n" % (k, v))
    with open(os.path.join(datadir, "pg_hba.conf"), "w") as f:
        f.write("# written by pgcluster.py: trust everyone on loopback except pwuser\n")
        f.write("local all %s scram-sha-256\n" % PWUSER)
        f.write("host  all %s 127.0.0.1/32 scram-sha-256\n" % PWUSER)
        f.write("local all all trust\n")
        f.write("host  all all 127.0.0.1/32 trust\n")
        f.write("local replication all trust\n")
        f.write("host  replication all 127.0.0.1/32 trust\n")


def psql(port, sql, db="postgres"):
    r = run(["/usr/bin/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p",
             str(port), "-U", PG_USER, "-d", db, "-c", sql],
            env=dict(os.environ, PGCONNECT_TIMEOUT="10"))
    if r.returncode != 0:
        raise RuntimeError("psql %r failed: %s" % (sql, r.stdout.strip()))
    return r.stdout


def start(d):
    os.makedirs(d, exist_ok=True)
    if os.path.exists(info_path(d)):
        log("stopping leftovers of a previous run listed in " + info_path(d))
        stop(d)

    pw = pwd.getpwnam(PG_USER)
    tmpdir = tempfile.mkdtemp(prefix="pdtest-pg-", dir="/tmp")
    info = {"host": HOST, "tmpdir": tmpdir, "sockdir": tmpdir,
            "datadir": os.path.join(tmpdir, "data"), "bindir": BINDIR}
    try:
        if os.geteuid() == 0:
            os.chown(tmpdir, pw.pw_uid, pw.pw_gid)
        os.chmod(tmpdir, 0o755)
        r = run(as_postgres([os.path.join(BINDIR, "initdb"), "-D", info["datadir"], "-U",
                             PG_USER, "-E", "UTF8", "--locale=C", "--auth=trust",
                             "--no-sync", "--no-instructions"]))
        if r.returncode != 0:
            raise RuntimeError("initdb failed:\n" + r.stdout)

        logfile = os.path.join(tmpdir, "postgres.log")
        for attempt in range(8):
            port = free_port()
            write_conf(info["datadir"], tmpdir, port)
            r = run(as_postgres([os.path.join(BINDIR, "pg_ctl"), "start", "-D",
                                 info["datadir"], "-l", logfile, "-w", "-t", "60"]))
            if r.returncode == 0:
                break
            text = r.stdout + _tail(logfile)
            if "could not bind" in text or "Address already in use" in text:
                log("port %d taken, retrying with another one" % port)
                continue
            raise RuntimeError("pg_ctl start failed:\n" + text)
        else:
            raise RuntimeError("could not find a free port for PostgreSQL")
        info["port"] = port
        info["pid"] = read_postmaster_pid(info["datadir"])
        info["logfile"] = logfile
        # Record the cluster before anything else can fail, so that stop finds it.
        with open(info_path(d), "w") as f:
            json.dump(info, f, indent=2)

        psql(port, "CREATE ROLE alice LOGIN")
        psql(port, "CREATE ROLE %s LOGIN PASSWORD '%s'" % (PWUSER, PWUSER_PASSWORD))
        psql(port, "CREATE DATABASE app")
        psql(port, "CREATE DATABASE app2")
        for db in ("app", "app2"):
            psql(port, "GRANT ALL ON SCHEMA public TO PUBLIC", db=db)
    except Exception as e:
        log("start failed: %s" % e)
        stop_cluster(info)
        if os.path.exists(info_path(d)):
            os.unlink(info_path(d))
        return 1
    log("PostgreSQL running on %s:%d (pid %s, data %s)" %
        (HOST, info["port"], info["pid"], info["datadir"]))
    return 0


def _tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop"):
        print("usage: pgcluster.py start|stop DIR", file=sys.stderr)
        return 2
    d = os.path.abspath(argv[2])
    return start(d) if argv[1] == "start" else stop(d)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
