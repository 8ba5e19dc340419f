/*
 * state.c — the runtime state document and its persistence: a file written atomically, or
 * the control schema `pgdual` in PostgreSQL (state.h).
 *
 * Every change is an edit of the document: the file store edits a copy and renames the
 * written copy over the file; the PostgreSQL store edits the stored document under its row
 * lock, so that instances sharing it never lose each other's changes. Either way the
 * document in memory is replaced only once the store has it.
 */
#include "rules/state.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define STATE_FORMAT 1

struct pd_state {
    pthread_mutex_t lock; /* doc, version */
    pthread_mutex_t io;   /* the store: the file, or conn */
    char *path;           /* file store; NULL: memory only (or postgres) */
    char *conninfo;       /* postgres store */
    PGconn *conn;         /* postgres store: NULL until (re)connected */
    json_t *doc;          /* {format, flags: {rule: {...}}, history: [...], checkpoints, verify} */
    int64_t version;      /* postgres store: the stored document's version */
};

__attribute__((format(printf, 1, 2))) static char *xasprintf(const char *fmt, ...);

static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *out = NULL;
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    return n < 0 ? NULL : out;
}

static json_t *empty_doc(void)
{
    return json_pack("{s:i, s:{}, s:[], s:{}, s:{}}", "format", STATE_FORMAT, "flags", "history",
                     "checkpoints", "verify");
}

/* Makes sure every section exists with the right type (older or hand-edited files). */
static bool doc_valid(json_t *doc)
{
    static const char *const objects[] = {"flags", "checkpoints", "verify"};
    if (!json_is_object(doc))
        return false;
    for (size_t i = 0; i < 3; i++) {
        json_t *v = json_object_get(doc, objects[i]);
        if (v == NULL)
            json_object_set_new(doc, objects[i], json_object());
        else if (!json_is_object(v))
            return false;
    }
    json_t *h = json_object_get(doc, "history");
    if (h == NULL)
        json_object_set_new(doc, "history", json_array());
    else if (!json_is_array(h))
        return false;
    return true;
}

static pd_state_t *state_new(void)
{
    pd_state_t *st = calloc(1, sizeof *st);
    if (st == NULL)
        return NULL;
    pthread_mutex_init(&st->lock, NULL);
    pthread_mutex_init(&st->io, NULL);
    return st;
}

pd_state_t *pd_state_open(const char *path, char **err)
{
    *err = NULL;
    pd_state_t *st = state_new();
    if (st == NULL)
        return NULL;
    if (path != NULL && (st->path = strdup(path)) == NULL) {
        pd_state_free(st);
        return NULL;
    }
    if (path != NULL && access(path, F_OK) == 0) {
        json_error_t jerr;
        st->doc = json_load_file(path, 0, &jerr);
        if (st->doc == NULL) {
            *err = xasprintf("could not read state file \"%s\": %s", path, jerr.text);
        } else if (!doc_valid(st->doc)) {
            *err = xasprintf("state file \"%s\" is not a pgdual state file (expected a "
                             "JSON object with flags, history, checkpoints)",
                             path);
        }
        if (*err != NULL) {
            pd_state_free(st);
            return NULL;
        }
    } else {
        st->doc = empty_doc();
    }
    return st;
}

void pd_state_free(pd_state_t *st)
{
    if (st == NULL)
        return;
    json_decref(st->doc);
    free(st->path);
    free(st->conninfo);
    PQfinish(st->conn);
    pthread_mutex_destroy(&st->lock);
    pthread_mutex_destroy(&st->io);
    free(st);
}

bool pd_state_shared(const pd_state_t *st)
{
    return st->conninfo != NULL;
}

int64_t pd_state_version(pd_state_t *st)
{
    pthread_mutex_lock(&st->lock);
    int64_t v = st->version;
    pthread_mutex_unlock(&st->lock);
    return v;
}

/* ---------------------------------------------------------------------------------------
 * The file store
 */

/*
 * Writes doc to a temporary file beside the state file, syncs it and renames it over the
 * state file, then syncs the directory: a crash leaves the old or the new document, never
 * a torn one.
 */
static int file_write(const char *path, json_t *doc, char **err)
{
    char *tmp = xasprintf("%s%s", path, ".tmp");
    char *dircopy = strdup(path);
    int rc = -1;
    if (tmp == NULL || dircopy == NULL)
        goto out;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        *err = xasprintf("could not write state file \"%s\": %s", tmp, strerror(errno));
        goto out;
    }
    int dumped = json_dumpfd(doc, fd, JSON_INDENT(2) | JSON_SORT_KEYS);
    int synced = dumped == 0 ? fsync(fd) : -1;
    int saved = errno;
    close(fd);
    if (dumped != 0 || synced != 0 || rename(tmp, path) != 0) {
        *err = xasprintf("could not write state file \"%s\": %s", path,
                         strerror(dumped != 0   ? EIO
                                  : synced != 0 ? saved
                                                : errno));
        unlink(tmp);
        goto out;
    }
    int dfd = open(dirname(dircopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    rc = 0;
out:
    free(tmp);
    free(dircopy);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The PostgreSQL store: schema pgdual, created and migrated here
 */

/* pg_advisory_xact_lock(PD_STATE_LOCK_CLASS, 1) serializes migrations of the schema. */
static const struct {
    const char *description;
    const char *sql;
} migrations[] = {
    {"state document, instances, fleet operations and their acknowledgements",
     "CREATE TABLE pgdual.state ("
     " id boolean PRIMARY KEY DEFAULT true CHECK (id),"
     " version bigint NOT NULL,"
     " doc jsonb NOT NULL,"
     " updated_at timestamptz NOT NULL DEFAULT now());"
     "INSERT INTO pgdual.state (version, doc) VALUES (0, "
     " '{\"format\": 1, \"flags\": {}, \"history\": [], \"checkpoints\": {}, \"verify\": {}}');"
     "CREATE TABLE pgdual.instances ("
     " id text PRIMARY KEY,"
     " host text NOT NULL,"
     " pid integer NOT NULL,"
     " listen text NOT NULL,"
     " version text NOT NULL,"
     " started_at timestamptz NOT NULL DEFAULT now(),"
     " heartbeat_at timestamptz NOT NULL DEFAULT now(),"
     " state_version bigint NOT NULL DEFAULT 0,"
     " sessions integer NOT NULL DEFAULT 0,"
     " mirror_queued bigint NOT NULL DEFAULT 0);"
     "CREATE TABLE pgdual.operations ("
     " id bigserial PRIMARY KEY,"
     " database text NOT NULL,"
     " operation text NOT NULL CHECK (operation IN ('switchover', 'rollback')),"
     " coordinator text NOT NULL,"
     " requested_by text NOT NULL,"
     " participants text[] NOT NULL,"
     " force boolean NOT NULL DEFAULT false,"
     " phase text NOT NULL CHECK (phase IN ('pause', 'flip', 'abort')),"
     " reason text,"
     " created_at timestamptz NOT NULL DEFAULT now(),"
     " deadline_at timestamptz NOT NULL,"
     " ended_at timestamptz);"
     "CREATE TABLE pgdual.acks ("
     " operation bigint NOT NULL REFERENCES pgdual.operations ON DELETE CASCADE,"
     " instance text NOT NULL,"
     " phase text NOT NULL,"
     " ok boolean NOT NULL,"
     " detail text,"
     " at timestamptz NOT NULL DEFAULT now(),"
     " PRIMARY KEY (operation, instance, phase));"},
};

int pd_state_schema_version(void)
{
    return (int)(sizeof migrations / sizeof migrations[0]);
}

/* The message of a failed result (or of the connection), on one line. */
static char *pq_error(PGconn *conn, PGresult *res, const char *what)
{
    const char *m = res != NULL ? PQresultErrorMessage(res) : "";
    if (m == NULL || *m == '\0')
        m = PQerrorMessage(conn);
    char *out = xasprintf("%s: %s", what, m && *m ? m : "no connection");
    if (out != NULL)
        out[strcspn(out, "\n")] = '\0';
    return out;
}

static bool exec_ok(PGconn *conn, const char *sql, const char *what, char **err)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType s = PQresultStatus(res);
    bool ok = s == PGRES_COMMAND_OK || s == PGRES_TUPLES_OK;
    if (!ok && err != NULL && *err == NULL)
        *err = pq_error(conn, res, what);
    PQclear(res);
    return ok;
}

static void no_notices(void *arg, const char *message)
{
    (void)arg;
    (void)message; /* "schema pgdual already exists, skipping" and the like */
}

PGconn *pd_state_connect(const char *conninfo, const char *application_name, char **err)
{
    /* After dbname, so they win over the conninfo's: a store that stops answering (a lost
       network) is given up after about 5 s rather than waited for. */
    const char *keys[] = {"dbname",
                          "application_name",
                          "connect_timeout",
                          "keepalives_idle",
                          "keepalives_interval",
                          "keepalives_count",
                          "tcp_user_timeout",
                          NULL};
    const char *vals[] = {conninfo, application_name, "5", "5", "2", "2", "5000", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(c) != CONNECTION_OK) {
        *err = pq_error(c, NULL, "could not connect to the state database");
        PQfinish(c);
        return NULL;
    }
    PQsetNoticeProcessor(c, no_notices, NULL);
    if (!exec_ok(c,
                 "SET statement_timeout = '5s'; SET lock_timeout = '5s'; "
                 "SET idle_in_transaction_session_timeout = '30s'",
                 "could not set up the state connection", err)) {
        PQfinish(c);
        return NULL;
    }
    return c;
}

/* Creates schema pgdual or brings it to this version's migrations, one transaction. */
static int migrate(PGconn *c, char **err)
{
    if (!exec_ok(c,
                 "BEGIN; SELECT pg_advisory_xact_lock(" PD_STATE_LOCK_CLASS_SQL ", 1); "
                 "CREATE SCHEMA IF NOT EXISTS pgdual; "
                 "CREATE TABLE IF NOT EXISTS pgdual.migrations (version integer PRIMARY KEY, "
                 "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
                 "could not create the control schema pgdual", err))
        goto fail;
    PGresult *res = PQexec(c, "SELECT coalesce(max(version), 0) FROM pgdual.migrations");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        *err = pq_error(c, res, "could not read the control schema's version");
        PQclear(res);
        goto fail;
    }
    int at = atoi(PQgetvalue(res, 0, 0)), want = pd_state_schema_version();
    PQclear(res);
    if (at > want) {
        *err = xasprintf("the control schema pgdual is at version %d, newer than this pgdual "
                         "knows (%d): upgrade pgdual",
                         at, want);
        goto fail;
    }
    for (int v = at + 1; v <= want; v++) {
        char num[16];
        snprintf(num, sizeof num, "%d", v);
        const char *params[2] = {num, migrations[v - 1].description};
        if (!exec_ok(c, migrations[v - 1].sql, "could not migrate the control schema", err))
            goto fail;
        res = PQexecParams(c,
                           "INSERT INTO pgdual.migrations (version, description) "
                           "VALUES ($1, $2)",
                           2, NULL, params, NULL, NULL, 0);
        bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        if (!ok)
            *err = pq_error(c, res, "could not record a migration of the control schema");
        PQclear(res);
        if (!ok)
            goto fail;
    }
    if (!exec_ok(c, "COMMIT", "could not commit the control schema", err))
        goto fail;
    return 0;
fail:
    PQclear(PQexec(c, "ROLLBACK"));
    return -1;
}

/* Parses a stored document; NULL with *err when it is not ours. */
static json_t *doc_parse(const char *text, char **err)
{
    json_error_t jerr;
    json_t *doc = json_loads(text, 0, &jerr);
    if (doc == NULL || !doc_valid(doc)) {
        json_decref(doc);
        *err = xasprintf("pgdual.state holds no pgdual state document%s%s", doc == NULL ? ": " : "",
                         doc == NULL ? jerr.text : "");
        return NULL;
    }
    return doc;
}

/* The connection, (re)made when there is none or it broke. Called with io held. */
static PGconn *store_conn(pd_state_t *st, char **err)
{
    if (st->conn != NULL && PQstatus(st->conn) != CONNECTION_OK) {
        PQfinish(st->conn);
        st->conn = NULL;
    }
    if (st->conn == NULL)
        st->conn = pd_state_connect(st->conninfo, "pgdual state", err);
    return st->conn;
}

/* Reads the stored document when it is newer than `than`: 1 (doc, version set), 0, -1. */
static int store_read(PGconn *c, int64_t than, json_t **doc, int64_t *version, char **err)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, than);
    const char *params[1] = {num};
    PGresult *res = PQexecParams(c,
                                 "SELECT version, doc::text FROM pgdual.state "
                                 "WHERE version > $1::bigint",
                                 1, NULL, params, NULL, NULL, 0);
    int rc = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        *err = pq_error(c, res, "could not read the state from pgdual.state");
    } else if (PQntuples(res) == 0) {
        rc = 0;
    } else if ((*doc = doc_parse(PQgetvalue(res, 0, 1), err)) != NULL) {
        *version = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        rc = 1;
    }
    PQclear(res);
    return rc;
}

static void install(pd_state_t *st, json_t *doc, int64_t version)
{
    pthread_mutex_lock(&st->lock);
    if (version >= st->version) {
        json_decref(st->doc);
        st->doc = doc;
        st->version = version;
    } else {
        json_decref(doc); /* a newer one came in meanwhile */
    }
    pthread_mutex_unlock(&st->lock);
}

pd_state_t *pd_state_open_postgres(const char *conninfo, char **err)
{
    *err = NULL;
    pd_state_t *st = state_new();
    if (st == NULL || (st->conninfo = strdup(conninfo)) == NULL) {
        pd_state_free(st);
        return NULL;
    }
    st->version = -1;
    json_t *doc = NULL;
    int64_t version = 0;
    if (store_conn(st, err) == NULL || migrate(st->conn, err) != 0 ||
        store_read(st->conn, -1, &doc, &version, err) != 1) {
        if (*err == NULL)
            *err = strdup("pgdual.state has no row: the control schema is damaged");
        pd_state_free(st);
        return NULL;
    }
    st->doc = doc;
    st->version = version;
    return st;
}

int pd_state_refresh(pd_state_t *st, char **err)
{
    *err = NULL;
    if (st->conninfo == NULL)
        return 0;
    pthread_mutex_lock(&st->io);
    json_t *doc = NULL;
    int64_t version = 0;
    int rc = store_conn(st, err) != NULL
                 ? store_read(st->conn, pd_state_version(st), &doc, &version, err)
                 : -1;
    pthread_mutex_unlock(&st->io);
    if (rc == 1)
        install(st, doc, version);
    return rc;
}

/*
 * One edit in one transaction: the stored document is locked, edited and written back
 * with the next version, and every instance is told (NOTIFY pgdual_state). The guard, when
 * given, runs first in the same transaction and must return a row.
 */
static int store_edit(pd_state_t *st, const char *guard, const char *guard_arg, pd_state_edit_fn fn,
                      void *arg, char **err)
{
    PGconn *c = store_conn(st, err);
    if (c == NULL)
        return -1;
    if (!exec_ok(c, "BEGIN", "could not begin a state change", err))
        return -1;
    PGresult *res = NULL;
    json_t *doc = NULL;
    int rc = -1;
    if (guard != NULL) {
        const char *params[1] = {guard_arg};
        res = PQexecParams(c, guard, 1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            *err = pq_error(c, res, "could not change the state");
            goto out;
        }
        if (PQntuples(res) == 0) {
            rc = 1;
            goto out;
        }
        PQclear(res);
    }
    res = PQexec(c, "SELECT doc::text FROM pgdual.state FOR UPDATE");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        *err = pq_error(c, res, "could not lock pgdual.state");
        goto out;
    }
    if ((doc = doc_parse(PQgetvalue(res, 0, 0), err)) == NULL)
        goto out;
    PQclear(res);
    res = NULL;
    if (fn(doc, arg) != 0) {
        *err = strdup("out of memory");
        goto out;
    }
    char *text = json_dumps(doc, JSON_COMPACT);
    if (text == NULL)
        goto out;
    const char *params[1] = {text};
    res = PQexecParams(c,
                       "WITH u AS (UPDATE pgdual.state SET version = version + 1, doc = $1::jsonb, "
                       "updated_at = now() RETURNING version) "
                       "SELECT version, pg_notify('pgdual_state', version::text) FROM u",
                       1, NULL, params, NULL, NULL, 0);
    free(text);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        *err = pq_error(c, res, "could not write pgdual.state");
        goto out;
    }
    int64_t version = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    if (!exec_ok(c, "COMMIT", "could not commit a state change", err))
        goto out;
    install(st, doc, version);
    doc = NULL;
    rc = 0;
out:
    PQclear(res);
    json_decref(doc);
    if (rc != 0)
        PQclear(PQexec(c, "ROLLBACK"));
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Edits
 */

int pd_state_edit(pd_state_t *st, const char *guard, const char *guard_arg, pd_state_edit_fn fn,
                  void *arg, char **err)
{
    *err = NULL;
    pthread_mutex_lock(&st->io);
    int rc;
    if (st->conninfo != NULL) {
        rc = store_edit(st, guard, guard_arg, fn, arg, err);
        /* A connection that broke since its last use gets one more try, on a new one. */
        if (rc < 0 && st->conn != NULL && PQstatus(st->conn) != CONNECTION_OK) {
            free(*err);
            *err = NULL;
            rc = store_edit(st, guard, guard_arg, fn, arg, err);
        }
    } else {
        pthread_mutex_lock(&st->lock);
        json_t *doc = json_deep_copy(st->doc);
        pthread_mutex_unlock(&st->lock);
        rc = doc == NULL || fn(doc, arg) != 0 ? -1
             : st->path != NULL               ? file_write(st->path, doc, err)
                                              : 0;
        if (rc == 0)
            install(st, doc, st->version);
        else
            json_decref(doc);
    }
    pthread_mutex_unlock(&st->io);
    if (rc < 0 && *err == NULL)
        *err = strdup("out of memory");
    return rc;
}

bool pd_state_flags(pd_state_t *st, const char *rule, pd_writes_t *writes, pd_reads_t *reads)
{
    pthread_mutex_lock(&st->lock);
    json_t *f = json_object_get(json_object_get(st->doc, "flags"), rule);
    const char *w = json_string_value(json_object_get(f, "writes"));
    const char *r = json_string_value(json_object_get(f, "reads"));
    bool ok = w != NULL && r != NULL && pd_writes_parse(w, writes) && pd_reads_parse(r, reads);
    pthread_mutex_unlock(&st->lock);
    return ok;
}

static void now_text(char *buf, size_t size)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

static void history_add(json_t *doc, json_t *entry)
{
    json_t *history = json_object_get(doc, "history");
    json_array_append_new(history, entry);
    while (json_array_size(history) > PD_STATE_HISTORY_MAX)
        json_array_remove(history, 0);
}

int pd_state_doc_set_flags(json_t *doc, const char *rule, pd_writes_t writes,
                           const pd_reads_t *reads, const char *who)
{
    char when[32], rtext[32];
    now_text(when, sizeof when);
    pd_reads_format(reads, rtext, sizeof rtext);
    who = who ? who : "unknown";
    json_t *entry = json_pack("{s:s, s:s, s:s, s:s}", "writes", pd_writes_name(writes), "reads",
                              rtext, "changed_at", when, "changed_by", who);
    json_t *event = json_pack("{s:s, s:s, s:s, s:s, s:s}", "time", when, "rule", rule, "writes",
                              pd_writes_name(writes), "reads", rtext, "by", who);
    if (entry == NULL || event == NULL) {
        json_decref(entry);
        json_decref(event);
        return -1;
    }
    json_object_set_new(json_object_get(doc, "flags"), rule, entry);
    history_add(doc, event);
    return 0;
}

int pd_state_doc_event(json_t *doc, const char *event, const char *who, json_t *fields)
{
    char when[32];
    now_text(when, sizeof when);
    json_t *entry =
        json_pack("{s:s, s:s, s:s}", "time", when, "event", event, "by", who ? who : "unknown");
    if (entry == NULL || (fields != NULL && json_object_update(entry, fields) != 0)) {
        json_decref(entry);
        return -1;
    }
    history_add(doc, entry);
    return 0;
}

struct flags_edit {
    const char *rule, *who;
    pd_writes_t writes;
    const pd_reads_t *reads;
};

static int flags_apply(json_t *doc, void *arg)
{
    const struct flags_edit *e = arg;
    return pd_state_doc_set_flags(doc, e->rule, e->writes, e->reads, e->who);
}

int pd_state_set_flags(pd_state_t *st, const char *rule, pd_writes_t writes,
                       const pd_reads_t *reads, const char *who, char **err)
{
    struct flags_edit e = {.rule = rule, .who = who, .writes = writes, .reads = reads};
    return pd_state_edit(st, NULL, NULL, flags_apply, &e, err);
}

struct prune_edit {
    const char *const *keep;
    unsigned n;
};

static int prune_apply(json_t *doc, void *arg)
{
    const struct prune_edit *e = arg;
    json_t *flags = json_object_get(doc, "flags");
    const char *key;
    json_t *value;
    void *tmp;
    json_object_foreach_safe(flags, tmp, key, value)
    {
        bool kept = false;
        for (unsigned i = 0; i < e->n && !kept; i++)
            kept = strcmp(e->keep[i], key) == 0;
        if (!kept)
            json_object_del(flags, key);
    }
    return 0;
}

void pd_state_prune(pd_state_t *st, const char *const *keep, unsigned n)
{
    /* A shared state also holds the rules of instances that run another config. */
    if (st->conninfo != NULL)
        return;
    struct prune_edit e = {.keep = keep, .n = n};
    char *err = NULL;
    pd_state_edit(st, NULL, NULL, prune_apply, &e, &err);
    free(err); /* kept in memory as it was; the next change retries */
}

struct set_edit {
    const char *section, *key;
    json_t *value;
};

static int set_apply(json_t *doc, void *arg)
{
    const struct set_edit *e = arg;
    json_t *obj = json_object_get(doc, e->section);
    if (e->value != NULL)
        return json_object_set(obj, e->key, e->value);
    json_object_del(obj, e->key);
    return 0;
}

static int set_in(pd_state_t *st, const char *section, const char *key, json_t *value, char **err)
{
    struct set_edit e = {.section = section, .key = key, .value = value};
    return pd_state_edit(st, NULL, NULL, set_apply, &e, err);
}

static json_t *get_in(pd_state_t *st, const char *section, const char *key)
{
    pthread_mutex_lock(&st->lock);
    /* A deep copy: the caller may read it while another thread changes the document. */
    json_t *v = json_deep_copy(json_object_get(json_object_get(st->doc, section), key));
    pthread_mutex_unlock(&st->lock);
    return v;
}

/*
 * Checkpoints change with every batch of a job: in the shared state they are written in
 * place (jsonb_set), without a new version or a notification, and read from the store.
 */
static int checkpoint_store(pd_state_t *st, const char *key, json_t *value, char **err)
{
    char *text = value != NULL ? json_dumps(value, JSON_COMPACT) : NULL;
    const char *params[2] = {key, text};
    int rc = -1;
    pthread_mutex_lock(&st->io);
    PGconn *c = store_conn(st, err);
    if (c != NULL && (value == NULL || text != NULL)) {
        PGresult *res = PQexecParams(c,
                                     "UPDATE pgdual.state SET doc = CASE WHEN $2::jsonb IS NULL "
                                     "THEN doc #- ARRAY['checkpoints', $1] "
                                     "ELSE jsonb_set(doc, ARRAY['checkpoints', $1], $2::jsonb) END",
                                     2, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) == PGRES_COMMAND_OK)
            rc = 0;
        else
            *err = pq_error(c, res, "could not write a checkpoint to pgdual.state");
        PQclear(res);
    }
    pthread_mutex_unlock(&st->io);
    free(text);
    return rc;
}

int pd_state_set_checkpoint(pd_state_t *st, const char *key, json_t *value, char **err)
{
    *err = NULL;
    if (st->conninfo == NULL)
        return set_in(st, "checkpoints", key, value, err);
    int rc = checkpoint_store(st, key, value, err);
    if (rc < 0 && *err == NULL)
        *err = strdup("out of memory");
    return rc;
}

json_t *pd_state_checkpoint(pd_state_t *st, const char *key)
{
    if (st->conninfo == NULL)
        return get_in(st, "checkpoints", key);
    const char *params[1] = {key};
    json_t *v = NULL;
    char *err = NULL;
    pthread_mutex_lock(&st->io);
    PGconn *c = store_conn(st, &err);
    if (c != NULL) {
        PGresult *res = PQexecParams(c, "SELECT (doc->'checkpoints'->$1)::text FROM pgdual.state",
                                     1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
            !PQgetisnull(res, 0, 0))
            v = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
        PQclear(res);
    }
    pthread_mutex_unlock(&st->io);
    free(err); /* unreadable: the job starts from the beginning */
    return v;
}

int pd_state_record_verify(pd_state_t *st, const char *rule, json_t *result, char **err)
{
    return set_in(st, "verify", rule, result, err);
}

json_t *pd_state_verify(pd_state_t *st, const char *rule)
{
    return get_in(st, "verify", rule);
}

struct event_edit {
    const char *event, *who;
    json_t *fields;
};

static int event_apply(json_t *doc, void *arg)
{
    const struct event_edit *e = arg;
    return pd_state_doc_event(doc, e->event, e->who, e->fields);
}

int pd_state_record_event(pd_state_t *st, const char *event, const char *who, json_t *fields,
                          char **err)
{
    struct event_edit e = {.event = event, .who = who, .fields = fields};
    int rc = pd_state_edit(st, NULL, NULL, event_apply, &e, err);
    json_decref(fields);
    return rc;
}

json_t *pd_state_history(pd_state_t *st)
{
    pthread_mutex_lock(&st->lock);
    json_t *h = json_deep_copy(json_object_get(st->doc, "history"));
    pthread_mutex_unlock(&st->lock);
    return h;
}
