/*
 * demo.c — `pgdual --demo`: two throwaway PostgreSQL clusters ("old" and "new") in a
 * fresh directory under /tmp, the sample schemas of the two migration stories of the
 * README, and a config file that proxies to them with a sample rule for each:
 *  - expand/contract in database `app` (old cluster only): users.email becomes
 *    users.email_address, rule users-email (kind columns);
 *  - blue/green in database `shop` (on both clusters, sample rows on old only): orders and
 *    order_items move to the new cluster, rule orders-to-green (kind tables, every table,
 *    so that `pgdualctl switchover shop` can make new authoritative).
 * Each story has a database of its own since switchover flips every rule of a database.
 *
 * PostgreSQL's programs run through posix_spawn with argv arrays (never a shell), as the
 * `postgres` user through runuser when we are root, since initdb refuses root. Their
 * output goes to a log file in the demo directory and is shown when something fails.
 * The schema is loaded with libpq. Everything this module starts it stops by PID, and
 * the directory is removed with nftw, also when start-up fails half-way.
 */
#include "proxy/demo.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libpq-fe.h>
#include <limits.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define DEMO_USER      "postgres"
#define DEMO_STOP_WAIT 10000 /* ms to wait for a fast shutdown before SIGKILL */
#define PORT_ATTEMPTS  5
#define MAX_ARGS       24

typedef struct {
    const char *name; /* "old" or "new" */
    char datadir[PATH_MAX];
    char logfile[PATH_MAX];
    int port;
    pid_t pid; /* the postmaster, 0 while not running */
} demo_cluster_t;

struct pd_demo {
    char dir[PATH_MAX]; /* the temporary directory; everything lives inside */
    char config[PATH_MAX];
    char bindir[PATH_MAX]; /* PostgreSQL's programs */
    char output[PATH_MAX]; /* where the programs we run write their output */
    int listen_port;
    bool as_postgres; /* run PostgreSQL's programs through runuser */
    const char *runuser;
    uid_t pg_uid;
    gid_t pg_gid;
    demo_cluster_t clusters[2];
};

/* Expand/contract: database `app` on the old cluster. */
static const char *const APP_SCHEMA_SQL = "CREATE TABLE users (\n"
                                          "    id bigserial PRIMARY KEY,\n"
                                          "    email text NOT NULL,\n"
                                          "    email_address text\n"
                                          ");\n";

static const char *const APP_ROWS_SQL =
    "INSERT INTO users (email) VALUES\n"
    "    ('Alice@Example.com'), ('bob@example.com'), ('Carol.Smith@Example.ORG'),\n"
    "    ('dave@example.net'), ('Eve.Adams@Example.com');\n";

/* Blue/green: database `shop` on both clusters, rows on old. */
static const char *const SHOP_SCHEMA_SQL = "CREATE TABLE orders (\n"
                                           "    id bigserial PRIMARY KEY,\n"
                                           "    user_id bigint,\n"
                                           "    total numeric(12,2),\n"
                                           "    created_at timestamptz DEFAULT now()\n"
                                           ");\n"
                                           "CREATE TABLE order_items (\n"
                                           "    order_id bigint,\n"
                                           "    line int,\n"
                                           "    sku text,\n"
                                           "    qty int,\n"
                                           "    PRIMARY KEY (order_id, line)\n"
                                           ");\n";

static const char *const SHOP_ROWS_SQL =
    "INSERT INTO orders (user_id, total, created_at) VALUES\n"
    "    (1, 42.50, now() - interval '3 days'), (1, 17.00, now() - interval '2 days'),\n"
    "    (2, 99.99, now() - interval '1 day'), (3, 5.25, now() - interval '5 hours'),\n"
    "    (5, 250.00, now());\n"
    "INSERT INTO order_items (order_id, line, sku, qty) VALUES\n"
    "    (1, 1, 'MUG-RED', 2), (1, 2, 'TEA-100', 1), (2, 1, 'PEN-BLUE', 10),\n"
    "    (3, 1, 'LAMP-DESK', 1), (4, 1, 'TEA-100', 3), (5, 1, 'CHAIR-OAK', 2),\n"
    "    (5, 2, 'DESK-OAK', 1);\n";

/*
 * Set by a SIGINT/SIGTERM/SIGHUP that arrives while the clusters are being created, so
 * that start-up stops at the next step and cleans up instead of dying half-way and
 * leaving running clusters behind. A signal handler can only reach a global.
 */
static volatile sig_atomic_t demo_interrupted;

static void on_interrupt(int sig)
{
    (void)sig;
    demo_interrupted = 1;
}

static const int demo_signals[] = {SIGINT, SIGTERM, SIGHUP};
#define N_DEMO_SIGNALS (sizeof demo_signals / sizeof demo_signals[0])

/* Installs handler for the demo's signals, saving the previous actions into saved. */
static void set_signals(void (*handler)(int), struct sigaction *saved)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    for (size_t i = 0; i < N_DEMO_SIGNALS; i++)
        sigaction(demo_signals[i], &sa, &saved[i]);
}

static void restore_signals(const struct sigaction *saved)
{
    for (size_t i = 0; i < N_DEMO_SIGNALS; i++)
        sigaction(demo_signals[i], &saved[i], NULL);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("pgdual demo: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static bool path_join(char *out, size_t size, const char *a, const char *b)
{
    int n = snprintf(out, size, "%s/%s", a, b);
    return n > 0 && (size_t)n < size;
}

static bool is_executable(const char *path)
{
    return access(path, X_OK) == 0;
}

/* Picks the newest /usr/lib/postgresql/N/bin holding initdb, unless PGDUAL_PG_BINDIR
   names the directory. */
static bool find_bindir(pd_demo_t *d)
{
    char probe[PATH_MAX];
    const char *env = getenv("PGDUAL_PG_BINDIR");
    if (env != NULL && *env != '\0') {
        if (path_join(probe, sizeof probe, env, "initdb") && is_executable(probe)) {
            snprintf(d->bindir, sizeof d->bindir, "%s", env);
            return true;
        }
        say("initdb not found in PGDUAL_PG_BINDIR=\"%s\": point it at PostgreSQL's bin "
            "directory, or unset it and run deploy/install-deps.sh",
            env);
        return false;
    }
    DIR *dir = opendir("/usr/lib/postgresql");
    long best = -1;
    if (dir != NULL) {
        struct dirent *e;
        while ((e = readdir(dir)) != NULL) {
            char *end;
            long v = strtol(e->d_name, &end, 10);
            if (end == e->d_name || *end != '\0' || v <= best)
                continue;
            char bin[PATH_MAX];
            int n = snprintf(bin, sizeof bin, "/usr/lib/postgresql/%ld/bin", v);
            if (n < 0 || (size_t)n >= sizeof bin)
                continue;
            if (path_join(probe, sizeof probe, bin, "initdb") && is_executable(probe)) {
                best = v;
                snprintf(d->bindir, sizeof d->bindir, "%s", bin);
            }
        }
        closedir(dir);
    }
    if (best < 0) {
        say("initdb not found (looked in /usr/lib/postgresql/*/bin): run "
            "deploy/install-deps.sh to install PostgreSQL, or set PGDUAL_PG_BINDIR to the "
            "directory holding initdb and pg_ctl");
        return false;
    }
    return true;
}

/* As root, PostgreSQL's programs run as `postgres` through runuser. */
static bool find_identity(pd_demo_t *d)
{
    if (geteuid() != 0) {
        d->as_postgres = false;
        return true;
    }
    struct passwd *pw = getpwnam(DEMO_USER);
    if (pw == NULL) {
        say("running as root, but there is no \"%s\" user to run PostgreSQL as (initdb "
            "refuses root): run deploy/install-deps.sh, which installs PostgreSQL and "
            "creates the user",
            DEMO_USER);
        return false;
    }
    static const char *const candidates[] = {"/usr/sbin/runuser", "/sbin/runuser",
                                             "/usr/bin/runuser", "/bin/runuser"};
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        if (is_executable(candidates[i])) {
            d->runuser = candidates[i];
            break;
        }
    }
    if (d->runuser == NULL) {
        say("running as root and runuser was not found: install util-linux "
            "(deploy/install-deps.sh does), or run pgdual --demo as a non-root user");
        return false;
    }
    d->as_postgres = true;
    d->pg_uid = pw->pw_uid;
    d->pg_gid = pw->pw_gid;
    return true;
}

/* Shows the last lines of the programs' output after a failure. */
static void show_output(const pd_demo_t *d)
{
    FILE *f = fopen(d->output, "re");
    if (f == NULL)
        return;
    char buf[4096];
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        if (size > (long)sizeof buf - 1)
            fseek(f, size - (long)sizeof buf + 1, SEEK_SET);
        else
            fseek(f, 0, SEEK_SET);
    }
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    if (n > 0)
        fprintf(stderr, "---- output ----\n%s%s---- end of output ----\n", buf,
                buf[n - 1] == '\n' ? "" : "\n");
}

/*
 * Runs a PostgreSQL program (bindir/prog) with args (NULL-terminated), as `postgres`
 * when we are root, from the demo directory, output appended to d->output. Returns
 * true if it exited with status 0.
 */
static bool run_pg(const pd_demo_t *d, const char *prog, const char *const *args)
{
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, d->bindir, prog))
        return false;
    const char *argv[MAX_ARGS];
    size_t n = 0;
    if (d->as_postgres) {
        argv[n++] = d->runuser;
        argv[n++] = "-u";
        argv[n++] = DEMO_USER;
        argv[n++] = "--";
    }
    argv[n++] = path;
    for (size_t i = 0; args[i] != NULL; i++) {
        if (n + 1 >= MAX_ARGS)
            return false;
        argv[n++] = args[i];
    }
    argv[n] = NULL;

    posix_spawn_file_actions_t fa;
    if (posix_spawn_file_actions_init(&fa) != 0)
        return false;
    int ok = posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    ok |= posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, d->output,
                                           O_WRONLY | O_CREAT | O_APPEND, 0644);
    ok |= posix_spawn_file_actions_adddup2(&fa, STDOUT_FILENO, STDERR_FILENO);
    /* A directory `postgres` can enter, so its programs never start somewhere they
       cannot read (such as /root). */
    ok |= posix_spawn_file_actions_addchdir_np(&fa, d->dir);
    pid_t pid;
    int err =
        ok == 0 ? posix_spawn(&pid, argv[0], &fa, NULL, (char *const *)argv, environ) : EINVAL;
    posix_spawn_file_actions_destroy(&fa);
    if (err != 0) {
        say("could not run %s: %s", argv[0], strerror(err));
        return false;
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            say("waiting for %s failed: %s", prog, strerror(errno));
            return false;
        }
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return true;
    if (WIFEXITED(status))
        say("%s failed with exit status %d", prog, WEXITSTATUS(status));
    else
        say("%s was killed by signal %d", prog, WIFSIGNALED(status) ? WTERMSIG(status) : 0);
    return false;
}

/* A TCP port on 127.0.0.1 that nothing listens on right now. */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
        getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* Appends the demo's settings to the cluster's postgresql.conf (later lines win). */
static bool write_settings(const pd_demo_t *d, const demo_cluster_t *c)
{
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, c->datadir, "postgresql.conf"))
        return false;
    FILE *f = fopen(path, "ae");
    if (f == NULL) {
        say("cannot open %s: %s", path, strerror(errno));
        return false;
    }
    fprintf(f,
            "\n# pgdual --demo: loopback only, throwaway data\n"
            "listen_addresses = '127.0.0.1'\n"
            "port = %d\n"
            "unix_socket_directories = '%s'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "shared_buffers = 32MB\n"
            "max_connections = 100\n"
            "wal_level = logical\n"
            "cluster_name = 'pgdual-demo-%s'\n",
            c->port, d->dir, c->name);
    return fclose(f) == 0;
}

static pid_t read_postmaster_pid(const demo_cluster_t *c)
{
    char path[PATH_MAX];
    if (!path_join(path, sizeof path, c->datadir, "postmaster.pid"))
        return 0;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    long pid = 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    return (pid_t)pid;
}

static bool create_cluster(pd_demo_t *d, demo_cluster_t *c)
{
    say("creating the \"%s\" cluster in %s (initdb)", c->name, c->datadir);
    const char *const initdb[] = {
        "-D",   c->datadir,   "-U",        "postgres",          "-A", "trust", "-E",
        "UTF8", "--locale=C", "--no-sync", "--no-instructions", NULL};
    if (!run_pg(d, "initdb", initdb)) {
        show_output(d);
        say("initdb failed for the \"%s\" cluster; its output is above", c->name);
        return false;
    }
    for (int attempt = 0; attempt < PORT_ATTEMPTS; attempt++) {
        c->port = free_port();
        if (c->port < 0 || !write_settings(d, c)) {
            say("cannot pick a port for the \"%s\" cluster: %s", c->name, strerror(errno));
            return false;
        }
        say("starting the \"%s\" cluster on 127.0.0.1:%d", c->name, c->port);
        const char *const start[] = {"start", "-D", c->datadir, "-l", c->logfile,
                                     "-w",    "-t", "60",       NULL};
        if (run_pg(d, "pg_ctl", start)) {
            c->pid = read_postmaster_pid(c);
            if (c->pid <= 0) {
                say("the \"%s\" cluster started but %s/postmaster.pid is unreadable", c->name,
                    c->datadir);
                return false;
            }
            return true;
        }
        /* pg_ctl may have failed to bind a port someone took meanwhile: try another. */
        c->pid = read_postmaster_pid(c);
        if (c->pid > 0)
            return false; /* running after all, but pg_ctl failed: give up, stop it */
    }
    show_output(d);
    FILE *f = fopen(c->logfile, "re");
    if (f != NULL) {
        char line[512];
        fprintf(stderr, "---- %s ----\n", c->logfile);
        while (fgets(line, sizeof line, f) != NULL)
            fputs(line, stderr);
        fclose(f);
    }
    say("could not start the \"%s\" cluster; its log is above", c->name);
    return false;
}

static bool exec_sql(PGconn *conn, const char *sql, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        say("%s failed: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return ok;
}

static PGconn *connect_to(const demo_cluster_t *c, const char *dbname)
{
    char conninfo[256];
    snprintf(conninfo, sizeof conninfo,
             "host=127.0.0.1 port=%d dbname=%s user=postgres connect_timeout=10 "
             "application_name=pgdual-demo",
             c->port, dbname);
    PGconn *conn = PQconnectdb(conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        say("cannot connect to the \"%s\" cluster: %s", c->name, PQerrorMessage(conn));
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

/* Creates database `dbname` on the cluster with the schema (and rows, if not NULL). */
static bool load_database(const demo_cluster_t *c, const char *dbname, const char *schema,
                          const char *rows)
{
    PGconn *conn = connect_to(c, "postgres");
    if (conn == NULL)
        return false;
    char sql[64];
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", dbname);
    bool ok = exec_sql(conn, sql, sql);
    PQfinish(conn);
    if (!ok)
        return false;
    conn = connect_to(c, dbname);
    if (conn == NULL)
        return false;
    say("loading the sample schema%s into \"%s\" on the \"%s\" cluster",
        rows != NULL ? " and rows" : "", dbname, c->name);
    ok = exec_sql(conn, schema, "loading the sample schema");
    if (ok && rows != NULL)
        ok = exec_sql(conn, rows, "loading the sample rows");
    PQfinish(conn);
    return ok;
}

/* Old: `app` and `shop` with rows; new: `shop`, empty (backfill or verify --repair fill it). */
static bool load_schema(const demo_cluster_t *c, bool old)
{
    if (old && !load_database(c, "app", APP_SCHEMA_SQL, APP_ROWS_SQL))
        return false;
    return load_database(c, "shop", SHOP_SCHEMA_SQL, old ? SHOP_ROWS_SQL : NULL);
}

static bool write_config(pd_demo_t *d)
{
    if (!path_join(d->config, sizeof d->config, d->dir, "pgdual.yaml"))
        return false;
    FILE *f = fopen(d->config, "we");
    if (f == NULL) {
        say("cannot write %s: %s", d->config, strerror(errno));
        return false;
    }
    const demo_cluster_t *o = &d->clusters[0], *n = &d->clusters[1];
    fprintf(f,
            "# Written by pgdual --demo; removed with %s when the demo stops.\n"
            "listen: { host: 127.0.0.1, port: %d }\n"
            "auth: { mode: trust }\n"
            "admin: { socket: \"%s/admin.sock\" }\n"
            "state: \"%s/state.json\"\n"
            "divergence: { log: \"%s/divergence.jsonl\" }\n"
            "databases:\n"
            "  # app: old and new columns in one database\n"
            "  - name: app\n"
            "    old: \"host=127.0.0.1 port=%d dbname=app user=postgres\"\n"
            "  # shop: moves from the old cluster to the new one\n"
            "  - name: shop\n"
            "    old: \"host=127.0.0.1 port=%d dbname=shop user=postgres\"\n"
            "    new: \"host=127.0.0.1 port=%d dbname=shop user=postgres\"\n"
            "rules:\n"
            "  # Expand/contract: users.email becomes users.email_address, lower-cased.\n"
            "  - name: users-email\n"
            "    database: app\n"
            "    kind: columns\n"
            "    table: public.users\n"
            "    key: [id]\n"
            "    columns:\n"
            "      - { old: email, new: email_address, up: \"lower(email)\", "
            "down: \"email_address\" }\n"
            "    writes: old\n"
            "    reads: old\n"
            "  # Blue/green: every table of shop (no `tables` list), so that switchover can\n"
            "  # make the new cluster authoritative for the whole database.\n"
            "  - name: orders-to-green\n"
            "    database: shop\n"
            "    kind: tables\n"
            "    writes: old\n"
            "    reads: old\n",
            d->dir, d->listen_port, d->dir, d->dir, d->dir, o->port, o->port, n->port);
    if (fclose(f) != 0) {
        say("cannot write %s: %s", d->config, strerror(errno));
        return false;
    }
    return true;
}

static pd_demo_t *demo_start(pd_demo_t *d);

pd_demo_t *pd_demo_start(int listen_port)
{
    pd_demo_t *d = calloc(1, sizeof *d);
    if (d == NULL) {
        say("out of memory");
        return NULL;
    }
    d->listen_port = listen_port;
    struct sigaction saved[N_DEMO_SIGNALS];
    demo_interrupted = 0;
    set_signals(on_interrupt, saved);
    d = demo_start(d);
    restore_signals(saved);
    return d;
}

/* True (after saying so) when a signal asked us to give up. */
static bool interrupted(void)
{
    if (demo_interrupted)
        say("interrupted");
    return demo_interrupted != 0;
}

static pd_demo_t *demo_start(pd_demo_t *d)
{
    d->clusters[0].name = "old";
    d->clusters[1].name = "new";
    if (!find_bindir(d) || !find_identity(d)) {
        free(d);
        return NULL;
    }
    snprintf(d->dir, sizeof d->dir, "/tmp/pgdual-demo-XXXXXX");
    if (mkdtemp(d->dir) == NULL) {
        say("cannot create a directory under /tmp: %s; check that /tmp exists and is "
            "writable",
            strerror(errno));
        free(d);
        return NULL;
    }
    /* The clusters' owner must be able to create their data directories in here. */
    if (d->as_postgres && chown(d->dir, d->pg_uid, d->pg_gid) != 0) {
        say("cannot hand %s to the postgres user: %s", d->dir, strerror(errno));
        pd_demo_stop(d);
        return NULL;
    }
    if (chmod(d->dir, 0755) != 0 ||
        !path_join(d->output, sizeof d->output, d->dir, "programs.log")) {
        say("cannot prepare %s: %s", d->dir, strerror(errno));
        pd_demo_stop(d);
        return NULL;
    }
    say("working in %s (removed when the demo stops)", d->dir);
    for (int i = 0; i < 2; i++) {
        demo_cluster_t *c = &d->clusters[i];
        char logname[32];
        snprintf(logname, sizeof logname, "%s.log", c->name);
        if (!path_join(c->datadir, sizeof c->datadir, d->dir, c->name) ||
            !path_join(c->logfile, sizeof c->logfile, d->dir, logname) || interrupted() ||
            !create_cluster(d, c) || interrupted() || !load_schema(c, i == 0)) {
            say("the demo could not start; cleaning up");
            pd_demo_stop(d);
            return NULL;
        }
    }
    if (interrupted() || !write_config(d)) {
        pd_demo_stop(d);
        return NULL;
    }
    return d;
}

const char *pd_demo_config_path(const pd_demo_t *demo)
{
    return demo->config;
}

/* pgdualctl as built next to this pgdual, or plain "pgdualctl" (from PATH). */
static void pgdualctl_path(char *out, size_t size)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash != NULL) {
            *slash = '\0';
            if (path_join(out, size, self, "pgdualctl") && is_executable(out))
                return;
        }
    }
    snprintf(out, size, "pgdualctl");
}

void pd_demo_print_banner(const pd_demo_t *demo)
{
    char ctl[PATH_MAX];
    pgdualctl_path(ctl, sizeof ctl);
    int p = demo->listen_port, o = demo->clusters[0].port, n = demo->clusters[1].port;
    bool from_path = strchr(ctl, '/') == NULL; /* else the one built next to pgdual */
    printf("\n"
           "pgdual demo is running: old (blue) and new (green) PostgreSQL clusters with sample\n"
           "schemas, and pgdual in front of them with a sample rule for each migration story.\n"
           "\n"
           "  Connect through pgdual:  psql \"host=127.0.0.1 port=%d dbname=app user=postgres\"\n"
           "                           psql \"host=127.0.0.1 port=%d dbname=shop user=postgres\"\n"
           "  Operator CLI:            %s -s %s/admin.sock status\n"
           "                           (export PGDUAL_ADMIN=%s/admin.sock to leave out -s)\n"
           "%s%s%s"
           "  Old cluster (blue):      psql \"host=127.0.0.1 port=%d dbname=shop user=postgres\"\n"
           "  New cluster (green):     psql \"host=127.0.0.1 port=%d dbname=shop user=postgres\"\n"
           "  Config:                  %s\n"
           "  Temp dir:                %s\n"
           "\n"
           "Expand/contract in database \"app\" (rule users-email: users.email becomes\n"
           "users.email_address, lower-cased), through pgdual:\n"
           "  SELECT * FROM users;\n"
           "  pgdualctl flag users-email writes=dual       writes now set both columns\n"
           "  pgdualctl backfill users-email               fill the new column of old rows\n"
           "  pgdualctl verify users-email                 0 divergent rows\n"
           "  pgdualctl flag users-email reads=shadow      then reads=new\n"
           "\n"
           "Blue/green in database \"shop\" (rule orders-to-green: every table moves from the\n"
           "old cluster to the new one), through pgdual:\n"
           "  SELECT * FROM orders JOIN order_items ON order_id = orders.id;\n"
           "  pgdualctl backfill orders-to-green           copy the tables to new\n"
           "  pgdualctl flag orders-to-green writes=dual   mirror every write to new\n"
           "  pgdualctl verify orders-to-green             0 divergent rows\n"
           "  pgdualctl switchover shop --dry-run          then switchover shop, rollback shop\n"
           "\n"
           "Press Ctrl-C to stop and clean up.\n",
           p, p, ctl, demo->dir, demo->dir,
           from_path ? "" : "                           (below, pgdualctl stands for ",
           from_path ? "" : ctl, from_path ? "" : ")\n", o, n, demo->config, demo->dir);
    fflush(stdout);
}

/* Alive and not a zombie (a postmaster is not our child: init may be slow to reap it). */
static bool pid_alive(pid_t pid)
{
    if (kill(pid, 0) != 0)
        return errno == EPERM;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return true; /* no /proc: trust kill() */
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')');
    return paren == NULL || paren[1] == '\0' || paren[2] != 'Z';
}

static bool wait_dead(pid_t pid, int ms)
{
    const struct timespec step = {.tv_sec = 0, .tv_nsec = 50 * 1000 * 1000};
    for (int waited = 0; waited < ms; waited += 50) {
        if (!pid_alive(pid))
            return true;
        nanosleep(&step, NULL);
    }
    return !pid_alive(pid);
}

static void stop_cluster(demo_cluster_t *c)
{
    if (c->pid <= 0) {
        /* pg_ctl may have started it and failed afterwards. */
        c->pid = c->datadir[0] ? read_postmaster_pid(c) : 0;
        if (c->pid <= 0)
            return;
    }
    say("stopping the \"%s\" cluster (pid %d)", c->name, (int)c->pid);
    /* SIGINT is PostgreSQL's fast shutdown. */
    if (kill(c->pid, SIGINT) == 0 && !wait_dead(c->pid, DEMO_STOP_WAIT)) {
        say("the \"%s\" cluster did not stop within %d s; killing it", c->name,
            DEMO_STOP_WAIT / 1000);
        kill(c->pid, SIGKILL);
        wait_dead(c->pid, 5000);
    }
    c->pid = 0;
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    int rc = (type == FTW_DP) ? rmdir(path) : unlink(path);
    if (rc != 0 && errno != ENOENT)
        say("cannot remove %s: %s", path, strerror(errno));
    return 0; /* keep going: remove as much as we can */
}

void pd_demo_stop(pd_demo_t *demo)
{
    if (demo == NULL)
        return;
    /* A second Ctrl-C must not cut the clean-up short; it takes a few seconds at most. */
    struct sigaction saved[N_DEMO_SIGNALS];
    set_signals(SIG_IGN, saved);
    for (int i = 0; i < 2; i++)
        stop_cluster(&demo->clusters[i]);
    if (demo->dir[0] != '\0') {
        nftw(demo->dir, remove_entry, 32, FTW_DEPTH | FTW_PHYS);
        say("removed %s", demo->dir);
    }
    free(demo);
    restore_signals(saved);
}
