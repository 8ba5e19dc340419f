/*
 * jobs.c — the registry of the operator jobs of jobs.h, the helpers every job shares
 * (jobs_internal.h), and backfill and verify for `columns` rules. The jobs of `tables`
 * rules are in jobs_tables.c; the job thread dispatches on the rule's kind.
 *
 * Each job runs on a thread of its own with its own libpq connections, so the event loop
 * never waits for it. The loop thread starts, reads and cancels jobs through the
 * registry; a job's progress, state and result live under the registry's mutex;
 * cancellation is a flag the job checks between batches.
 *
 * Both columns jobs walk the table in key order with row comparisons, `(k1, k2) > ($1,
 * $2)`, so that composite keys work and every step is an index range scan; keys travel as
 * text and are cast back by PostgreSQL. Values read from the database go only into a
 * job's result (which only the admin socket shows), never into the log.
 */
#include "admin/jobs.h"

#include <libpq-fe.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/jobs_internal.h"
#include "proxy/log.h"

#define FINISHED_KEPT  50 /* finished jobs listed by `jobs` */
#define SLEEP_SLICE_MS 50 /* throttle sleeps in slices, to notice cancels */

static const char *const kind_names[] = {[JOB_BACKFILL] = "backfill", [JOB_VERIFY] = "verify"};
static const char *const state_names[] = {[JOB_RUNNING] = "running",
                                          [JOB_DONE] = "done",
                                          [JOB_FAILED] = "failed",
                                          [JOB_CANCELLED] = "cancelled"};
static const char *const side_names[] = {[PD_JOB_OLD] = "old", [PD_JOB_NEW] = "new"};

/* ---------------------------------------------------------------------------------------
 * Helpers every job uses (jobs_internal.h)
 */

char *pd__strf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *out = NULL;
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    return n < 0 ? NULL : out;
}

static char *xstrdup(const char *s)
{
    return s != NULL ? strdup(s) : NULL;
}

void pd__free_strv(char **v, unsigned n)
{
    if (v == NULL)
        return;
    for (unsigned i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

void pd__iso_time(time_t t, char *buf, size_t size)
{
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

bool pd__job_cancelled(const run_t *r)
{
    return atomic_load(&r->job->cancel);
}

int pd__job_fail(run_t *r, const char *hint, const char *fmt, ...)
{
    if (r->error != NULL)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&r->error, fmt, ap) < 0)
        r->error = NULL;
    va_end(ap);
    r->hint = xstrdup(hint);
    return -1;
}

int pd__job_sql_fail(run_t *r, PGresult *res, const char *what)
{
    if (pd__job_cancelled(r))
        return 1;
    const char *msg = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    const char *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    pd_log_warning(r->job->tag, "%s failed (SQLSTATE %s); pgdualctl jobs %d shows why", what,
                   state ? state : "none", r->job->id);
    if (msg == NULL)
        msg = res ? PQresultErrorMessage(res) : "out of memory";
    return pd__job_fail(r,
                        hint ? hint
                             : "Check the rule's tables, key and column expressions against the "
                               "database (pgdualctl rules), then start the job again.",
                        "%s failed: %s", what, msg);
}

void pd__job_set_progress(run_t *r, int64_t done)
{
    pthread_mutex_lock(&r->job->jobs->lock);
    r->job->rows_done = done;
    pthread_mutex_unlock(&r->job->jobs->lock);
}

void pd__job_set_total(run_t *r, int64_t total)
{
    pthread_mutex_lock(&r->job->jobs->lock);
    r->job->rows_total = total;
    pthread_mutex_unlock(&r->job->jobs->lock);
}

void pd__job_set_phase(run_t *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *phase = NULL;
    if (vasprintf(&phase, fmt, ap) < 0)
        phase = NULL;
    va_end(ap);
    pthread_mutex_lock(&r->job->jobs->lock);
    free(r->job->phase);
    r->job->phase = phase;
    pthread_mutex_unlock(&r->job->jobs->lock);
}

/* ---------------------------------------------------------------------------------------
 * The rule copied into a job
 */

static void rule_free(job_rule_t *r)
{
    free(r->name);
    free(r->database);
    free(r->conninfo[PD_JOB_OLD]);
    free(r->conninfo[PD_JOB_NEW]);
    free(r->table);
    pd__free_strv(r->tables, r->ntables);
    pd__free_strv(r->key, r->nkey);
    for (unsigned i = 0; r->cols != NULL && i < r->ncols; i++) {
        free(r->cols[i].old);
        free(r->cols[i].new);
        free(r->cols[i].up);
        free(r->cols[i].down);
    }
    free(r->cols);
}

static char **strv_copy(char *const *v, unsigned n)
{
    char **out = calloc(n + 1, sizeof *out);
    for (unsigned i = 0; out != NULL && i < n; i++) {
        if ((out[i] = strdup(v[i])) == NULL) {
            pd__free_strv(out, n);
            return NULL;
        }
    }
    return out;
}

static int rule_copy(job_rule_t *dst, const pd_rule_cfg_t *src, const pd_database_cfg_t *db,
                     pd_writes_t writes)
{
    *dst = (job_rule_t){.kind = src->kind,
                        .nkey = src->key_count,
                        .ntables = src->table_count,
                        .ncols = src->column_count,
                        .writes = writes};
    dst->name = xstrdup(src->name);
    dst->database = xstrdup(src->database);
    dst->conninfo[PD_JOB_OLD] = xstrdup(db->old);
    dst->conninfo[PD_JOB_NEW] = xstrdup(db->new);
    dst->table = xstrdup(src->table);
    dst->tables = strv_copy(src->tables, src->table_count);
    dst->key = strv_copy(src->key, src->key_count);
    dst->cols = calloc(src->column_count + 1, sizeof *dst->cols);
    bool ok = dst->name && dst->database && dst->conninfo[PD_JOB_OLD] &&
              (dst->conninfo[PD_JOB_NEW] || !db->new) && (dst->table || !src->table) &&
              dst->tables && dst->key && dst->cols;
    for (unsigned i = 0; ok && i < src->column_count; i++) {
        const pd_column_map_t *c = &src->columns[i];
        pd_column_map_t *d = &dst->cols[i];
        d->old = xstrdup(c->old);
        d->new = xstrdup(c->new);
        d->up = xstrdup(c->up);
        d->down = xstrdup(c->down);
        ok = d->old && d->new && (d->up || !c->up) && (d->down || !c->down);
    }
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------
 * Connecting and quoting
 */

static bool conninfo_has_user(const char *conninfo)
{
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    bool has = false;
    for (PQconninfoOption *o = opts; o != NULL && o->keyword != NULL; o++)
        if (strcmp(o->keyword, "user") == 0 && o->val != NULL && o->val[0] != '\0')
            has = true;
    PQconninfoFree(opts);
    return has;
}

int pd__job_connect(run_t *r, pd_job_side_t side)
{
    const job_rule_t *rule = &r->job->rule;
    const char *conninfo = rule->conninfo[side], *name = side_names[side];
    PGconn **conn = side == PD_JOB_OLD ? &r->conn : &r->conn_new;
    /* Parameters before dbname are defaults the conninfo may override; after it, not. */
    const char *const keys[] = {"connect_timeout", "dbname", "fallback_application_name", NULL};
    char app[64];
    snprintf(app, sizeof app, "pgdual %s", kind_names[r->job->kind]);
    const char *const vals[] = {"10", conninfo, app, NULL};
    *conn = PQconnectdbParams(keys, vals, 1);
    if (*conn != NULL && PQstatus(*conn) == CONNECTION_OK) {
        PGcancel *c = PQgetCancel(*conn);
        pthread_mutex_lock(&r->job->jobs->lock);
        r->job->pgcancel[side] = c;
        pthread_mutex_unlock(&r->job->jobs->lock);
        return 0;
    }
    char *msg = xstrdup(*conn ? PQerrorMessage(*conn) : "out of memory");
    size_t n = msg ? strlen(msg) : 0;
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = '\0';
    pd_log_warning(r->job->tag, "could not connect to database \"%s\" (%s side): %s",
                   rule->database, name, msg ? msg : "");
    char hint[400];
    if (conninfo_has_user(conninfo))
        snprintf(hint, sizeof hint,
                 "Check that the database's %s conninfo in the config reaches PostgreSQL with "
                 "these credentials (.pgpass or PGPASSFILE for a password).",
                 name);
    else
        snprintf(hint, sizeof hint,
                 "The database's %s conninfo names no user, so libpq used its defaults (the "
                 "user running pgdual); name a user in the conninfo (user=...) with a password "
                 "in .pgpass or PGPASSFILE.",
                 name);
    pd__job_fail(r, hint, "could not connect to database \"%s\" (%s side): %s", rule->database,
                 name, msg ? msg : "");
    free(msg);
    return -1;
}

char *pd__quote_ident(PGconn *conn, const char *name)
{
    char *q = PQescapeIdentifier(conn, name, strlen(name));
    if (q == NULL)
        return NULL;
    char *out = strdup(q); /* so that everything is released with free() */
    PQfreemem(q);
    return out;
}

static char *quote_ident(run_t *r, const char *name)
{
    return pd__quote_ident(r->conn, name);
}

/* "schema.table" -> "schema"."table"; a name without a dot stays one identifier. */
static char *quote_table(run_t *r, const char *table)
{
    const char *dot = strchr(table, '.');
    if (dot == NULL)
        return quote_ident(r, table);
    char *schema = strndup(table, (size_t)(dot - table));
    char *qs = schema ? quote_ident(r, schema) : NULL;
    char *qt = quote_ident(r, dot + 1);
    char *out = qs && qt ? pd__strf("%s.%s", qs, qt) : NULL;
    free(schema);
    free(qs);
    free(qt);
    return out;
}

static char **quote_all(run_t *r, char *const *names, unsigned n)
{
    char **out = calloc(n + 1, sizeof *out);
    for (unsigned i = 0; out != NULL && i < n; i++) {
        if ((out[i] = quote_ident(r, names[i])) == NULL) {
            pd__free_strv(out, n);
            return NULL;
        }
    }
    return out;
}

/* up/down: the expression in parentheses, or the other side's column when it is NULL. */
static char **exprs(const pd_column_map_t *cols, unsigned n, bool up, char **copies)
{
    char **out = calloc(n + 1, sizeof *out);
    for (unsigned i = 0; out != NULL && i < n; i++) {
        const char *e = up ? cols[i].up : cols[i].down;
        if ((out[i] = e ? pd__strf("(%s)", e) : strdup(copies[i])) == NULL) {
            pd__free_strv(out, n);
            return NULL;
        }
    }
    return out;
}

static int run_quote(run_t *r)
{
    const job_rule_t *rule = &r->job->rule;
    char **olds = calloc(rule->ncols + 1, sizeof *olds);
    char **news = calloc(rule->ncols + 1, sizeof *news);
    for (unsigned i = 0; olds && news && i < rule->ncols; i++) {
        olds[i] = rule->cols[i].old;
        news[i] = rule->cols[i].new;
    }
    r->table = quote_table(r, rule->table);
    r->key = quote_all(r, rule->key, rule->nkey);
    r->old_cols = olds && news ? quote_all(r, olds, rule->ncols) : NULL;
    r->new_cols = olds && news ? quote_all(r, news, rule->ncols) : NULL;
    free(olds);
    free(news);
    if (r->old_cols && r->new_cols) {
        r->up = exprs(rule->cols, rule->ncols, true, r->old_cols);
        r->down = exprs(rule->cols, rule->ncols, false, r->new_cols);
    }
    if (!r->table || !r->key || !r->up || !r->down)
        return pd__job_fail(r, NULL, "out of memory while preparing the job's statements");
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * SQL text
 */

void pd__put_keys(FILE *f, char *const *key, unsigned n, const char *suffix)
{
    fputc('(', f);
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%s%s%s", i ? ", " : "", key[i], suffix);
    fputc(')', f);
}

void pd__put_params(FILE *f, unsigned nkey, unsigned first)
{
    fputc('(', f);
    for (unsigned i = 0; i < nkey; i++)
        fprintf(f, "%s$%u", i ? ", " : "", first + i);
    fputc(')', f);
}

void pd__put_range(FILE *f, char *const *key, unsigned n, bool lo, bool hi)
{
    fputs("TRUE", f);
    if (lo) {
        fputs(" AND ", f);
        pd__put_keys(f, key, n, "");
        fputs(" > ", f);
        pd__put_params(f, n, 1);
    }
    if (hi) {
        fputs(" AND ", f);
        pd__put_keys(f, key, n, "");
        fputs(" <= ", f);
        pd__put_params(f, n, lo ? n + 1 : 1);
    }
}

/* Writes "(a IS DISTINCT FROM b OR ...)" over the column pairs. */
static void put_distinct(FILE *f, char **a, char **b, unsigned n)
{
    fputc('(', f);
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%s%s IS DISTINCT FROM %s", i ? " OR " : "", a[i], b[i]);
    fputc(')', f);
}

/* The divergence test of verify: new vs up(old), and old vs down(new) under dual-new. */
static void put_divergent(FILE *f, run_t *r)
{
    unsigned n = r->job->rule.ncols;
    put_distinct(f, r->new_cols, r->up, n);
    if (r->job->rule.writes == PD_WRITES_DUAL_NEW) {
        fputs(" OR ", f);
        put_distinct(f, r->old_cols, r->down, n);
    }
}

char *pd__sql_done(FILE *f, char **buf)
{
    if (fclose(f) != 0) {
        free(*buf);
        return NULL;
    }
    return *buf;
}

/*
 * The last key of the next `limit` rows after lo, with their count:
 *   SELECT k::text AS pgdual_t0, ..., pgdual_n FROM (SELECT k, row_number() OVER (ORDER
 *   BY k) AS pgdual_n FROM T WHERE k > lo ORDER BY k LIMIT n) s ORDER BY pgdual_n DESC
 *   LIMIT 1
 */
static char *sql_batch_end(run_t *r, unsigned limit)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return NULL;
    fputs("SELECT ", f);
    for (unsigned i = 0; i < r->job->rule.nkey; i++)
        fprintf(f, "%s::text AS pgdual_t%u, ", r->key[i], i);
    fputs("pgdual_n FROM (SELECT ", f);
    for (unsigned i = 0; i < r->job->rule.nkey; i++)
        fprintf(f, "%s, ", r->key[i]);
    fputs("row_number() OVER (ORDER BY ", f);
    pd__put_keys(f, r->key, r->job->rule.nkey, "");
    fprintf(f, ") AS pgdual_n FROM %s WHERE ", r->table);
    pd__put_range(f, r->key, r->job->rule.nkey, r->lo != NULL, false);
    fputs(" ORDER BY ", f);
    pd__put_keys(f, r->key, r->job->rule.nkey, "");
    fprintf(f, " LIMIT %u) s ORDER BY pgdual_n DESC LIMIT 1", limit);
    return pd__sql_done(f, &buf);
}

/* UPDATE T SET dst = src, ... WHERE lo < k <= hi AND (dst IS DISTINCT FROM src OR ...) */
static char *sql_update(run_t *r, char **dst, char **src)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return NULL;
    unsigned n = r->job->rule.ncols;
    fprintf(f, "UPDATE %s SET ", r->table);
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%s%s = %s", i ? ", " : "", dst[i], src[i]);
    fputs(" WHERE ", f);
    pd__put_range(f, r->key, r->job->rule.nkey, r->lo != NULL, true);
    fputs(" AND ", f);
    put_distinct(f, dst, src, n);
    return pd__sql_done(f, &buf);
}

/*
 * One verify chunk: the rows that diverge plus the chunk's last row, each with its key as
 * text, whether it diverges, its position and the chunk's row count.
 */
static char *sql_verify_chunk(run_t *r, unsigned limit)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return NULL;
    unsigned nkey = r->job->rule.nkey;
    fputs("SELECT * FROM (SELECT ", f);
    for (unsigned i = 0; i < nkey; i++)
        fprintf(f, "%s::text AS pgdual_t%u, ", r->key[i], i);
    fputs("pgdual_bad, row_number() OVER (ORDER BY ", f);
    pd__put_keys(f, r->key, r->job->rule.nkey, "");
    fputs(") AS pgdual_n, count(*) OVER () AS pgdual_count FROM (SELECT ", f);
    for (unsigned i = 0; i < nkey; i++)
        fprintf(f, "%s, ", r->key[i]);
    fputc('(', f);
    put_divergent(f, r);
    fprintf(f, ") AS pgdual_bad FROM %s WHERE ", r->table);
    pd__put_range(f, r->key, r->job->rule.nkey, r->lo != NULL, false);
    fputs(" ORDER BY ", f);
    pd__put_keys(f, r->key, r->job->rule.nkey, "");
    fprintf(f, " LIMIT %u) s) c WHERE pgdual_bad OR pgdual_n = pgdual_count ORDER BY pgdual_n",
            limit);
    return pd__sql_done(f, &buf);
}

/* Runs sql with the key range lo (when set) and hi (when given) as text parameters. */
static PGresult *exec_range(run_t *r, const char *sql, char *const *hi)
{
    unsigned nkey = r->job->rule.nkey, n = 0;
    const char *params[2 * nkey + 1];
    for (unsigned i = 0; r->lo != NULL && i < nkey; i++)
        params[n++] = r->lo[i];
    for (unsigned i = 0; hi != NULL && i < nkey; i++)
        params[n++] = hi[i];
    return PQexecParams(r->conn, sql, (int)n, NULL, params, NULL, NULL, 0);
}

/* The key of row `row` of res (text columns 0..nkey-1), copied. */
static char **key_of(run_t *r, PGresult *res, int row)
{
    unsigned nkey = r->job->rule.nkey;
    char **k = calloc(nkey + 1, sizeof *k);
    for (unsigned i = 0; k != NULL && i < nkey; i++) {
        if ((k[i] = strdup(PQgetvalue(res, row, (int)i))) == NULL) {
            pd__free_strv(k, nkey);
            return NULL;
        }
    }
    return k;
}

static void set_lo(run_t *r, char **key)
{
    pd__free_strv(r->lo, r->job->rule.nkey);
    r->lo = key;
}

/* ---------------------------------------------------------------------------------------
 * Rows in the table
 */

int64_t pd__job_query_int(run_t *r, PGconn *conn, const char *sql, const char *param,
                          const char *what, int *rc)
{
    const char *params[1] = {param};
    PGresult *res = PQexecParams(conn, sql, param ? 1 : 0, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        *rc = pd__job_sql_fail(r, res, what);
        PQclear(res);
        return 0;
    }
    int64_t v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    *rc = 0;
    return v;
}

int pd__job_count_rows(run_t *r, PGconn *conn, const char *table, int64_t *rows)
{
    int rc;
    int64_t n = pd__job_query_int(r, conn,
                                  "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass",
                                  table, "reading the row estimate of the table", &rc);
    if (rc == 0 && n < PD_JOB_EXACT_COUNT_BELOW) {
        char *sql = pd__strf("SELECT count(*) FROM %s", table);
        if (sql == NULL)
            return pd__job_fail(r, NULL, "out of memory");
        n = pd__job_query_int(r, conn, sql, NULL, "counting the rows of the table", &rc);
        free(sql);
    }
    *rows = n;
    return rc;
}

/* rows_total of a columns job. */
static int run_estimate(run_t *r)
{
    int64_t n;
    int rc = pd__job_count_rows(r, r->conn, r->table, &n);
    if (rc == 0)
        pd__job_set_total(r, n);
    return rc;
}

bool pd__job_throttle(run_t *r, unsigned ms)
{
    while (ms > 0 && !pd__job_cancelled(r)) {
        unsigned slice = ms < SLEEP_SLICE_MS ? ms : SLEEP_SLICE_MS;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)slice * 1000000L};
        nanosleep(&ts, NULL);
        ms -= slice;
    }
    return !pd__job_cancelled(r);
}

/* ---------------------------------------------------------------------------------------
 * Backfill
 */

void pd__job_checkpoint_key(const job_t *j, char *buf, size_t size)
{
    snprintf(buf, size, "backfill/%s", j->rule.name);
}

void pd__job_clear_checkpoint(const job_t *j)
{
    char key[256], *err = NULL;
    pd__job_checkpoint_key(j, key, sizeof key);
    if (pd_state_set_checkpoint(j->jobs->state, key, NULL, &err) != 0) {
        pd_log_warning(j->tag, "could not clear the checkpoint: %s", err ? err : "");
        free(err);
    }
}

/*
 * Picks up where an interrupted backfill of the rule stopped; returns the rows it did. A
 * checkpoint of another table or key (the rule was changed since) is ignored.
 */
static int64_t resume(run_t *r)
{
    char key[256];
    pd__job_checkpoint_key(r->job, key, sizeof key);
    json_t *ck = pd_state_checkpoint(r->job->jobs->state, key);
    const char *table = json_string_value(json_object_get(ck, "table"));
    json_t *last = json_object_get(ck, "last_key");
    if (table == NULL || strcmp(table, r->job->rule.table) != 0)
        last = NULL;
    unsigned nkey = r->job->rule.nkey;
    int64_t done = json_integer_value(json_object_get(ck, "rows_done"));
    char **lo = json_array_size(last) == nkey ? calloc(nkey + 1, sizeof *lo) : NULL;
    for (unsigned i = 0; lo != NULL && i < nkey; i++) {
        const char *v = json_string_value(json_array_get(last, i));
        if (v == NULL || (lo[i] = strdup(v)) == NULL) {
            pd__free_strv(lo, nkey);
            lo = NULL;
        }
    }
    json_decref(ck);
    if (lo == NULL)
        return 0;
    set_lo(r, lo);
    pd_log_info(r->job->tag, "resuming after %lld rows, from the checkpoint", (long long)done);
    return done > 0 ? done : 0;
}

static int save_checkpoint(run_t *r, int64_t done)
{
    char key[256];
    pd__job_checkpoint_key(r->job, key, sizeof key);
    json_t *last = json_array();
    for (unsigned i = 0; i < r->job->rule.nkey; i++)
        json_array_append_new(last, json_string(r->lo[i]));
    json_t *ck = json_pack("{s:s, s:o, s:I}", "table", r->job->rule.table, "last_key", last,
                           "rows_done", (json_int_t)done);
    char *err = NULL;
    int rc = ck ? pd_state_set_checkpoint(r->job->jobs->state, key, ck, &err) : -1;
    json_decref(ck);
    if (rc != 0)
        pd__job_fail(r,
                     "Make the state file's directory writable, then run the backfill again: it "
                     "resumes from the last checkpoint written.",
                     "could not record the backfill checkpoint: %s", err ? err : "out of memory");
    free(err);
    return rc;
}

/*
 * One batch: finds the last key of the next `batch` rows, then sets new = up(old) in that
 * key range where they differ. *rows is the batch's row count (0 at the end of the
 * table), *updated the rows changed.
 */
static int backfill_batch(run_t *r, unsigned batch, int64_t *rows, int64_t *updated)
{
    char *sql = sql_batch_end(r, batch);
    PGresult *res = sql ? exec_range(r, sql, NULL) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        int rc = pd__job_sql_fail(r, res, "reading the next batch of keys");
        PQclear(res);
        return rc;
    }
    *rows = PQntuples(res) == 1 ? strtoll(PQgetvalue(res, 0, (int)r->job->rule.nkey), NULL, 10) : 0;
    char **hi = *rows > 0 ? key_of(r, res, 0) : NULL;
    PQclear(res);
    if (*rows == 0)
        return 0;
    if (hi == NULL)
        return pd__job_fail(r, NULL, "out of memory");
    sql = sql_update(r, r->new_cols, r->up);
    res = sql ? exec_range(r, sql, hi) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = pd__job_sql_fail(r, res, "updating a batch");
        PQclear(res);
        pd__free_strv(hi, r->job->rule.nkey);
        return rc;
    }
    *updated = strtoll(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    set_lo(r, hi);
    return 0;
}

static int run_backfill(run_t *r)
{
    job_t *j = r->job;
    unsigned batch = j->opt.batch ? j->opt.batch : PD_JOB_DEFAULT_BATCH;
    int64_t done = resume(r), updated = 0;
    pthread_mutex_lock(&j->jobs->lock);
    j->rows_done = j->resumed_from = done;
    pthread_mutex_unlock(&j->jobs->lock);
    for (;;) {
        if (pd__job_cancelled(r))
            return 1;
        int64_t rows = 0, changed = 0;
        int rc = backfill_batch(r, batch, &rows, &changed);
        if (rc != 0)
            return rc;
        if (rows == 0)
            break;
        done += rows;
        updated += changed;
        pd__job_set_progress(r, done);
        if (save_checkpoint(r, done) != 0)
            return -1;
        if (rows < batch)
            break;
        if (!pd__job_throttle(r, j->opt.throttle_ms))
            return 1;
    }
    pd__job_clear_checkpoint(j);
    r->result = json_pack("{s:I, s:I, s:I}", "rows_done", (json_int_t)done, "rows_updated",
                          (json_int_t)updated, "resumed_from", (json_int_t)j->resumed_from);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Verify
 */

typedef struct {
    int64_t checked, divergent, repaired;
    json_t *keys; /* the first PD_JOB_KEYS_LISTED divergent keys, as {column: text} */
} verify_t;

static json_t *key_json(run_t *r, PGresult *res, int row)
{
    json_t *k = json_object();
    for (unsigned i = 0; i < r->job->rule.nkey; i++)
        json_object_set_new(k, r->job->rule.key[i], json_string(PQgetvalue(res, row, (int)i)));
    return k;
}

/* Sets the divergent rows of the chunk ending at hi right, from the authoritative side. */
static int repair_chunk(run_t *r, char *const *hi, verify_t *v)
{
    bool new_is_truth =
        r->job->rule.writes == PD_WRITES_DUAL_NEW || r->job->rule.writes == PD_WRITES_NEW;
    char *sql =
        new_is_truth ? sql_update(r, r->old_cols, r->down) : sql_update(r, r->new_cols, r->up);
    PGresult *res = sql ? exec_range(r, sql, hi) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        int rc = pd__job_sql_fail(r, res, "repairing divergent rows");
        PQclear(res);
        return rc;
    }
    v->repaired += strtoll(PQcmdTuples(res), NULL, 10);
    PQclear(res);
    return 0;
}

/* One chunk of `limit` rows after lo; *rows is its size (0 at the end of the table). */
static int verify_chunk(run_t *r, unsigned limit, verify_t *v, int64_t *rows)
{
    unsigned nkey = r->job->rule.nkey;
    char *sql = sql_verify_chunk(r, limit);
    PGresult *res = sql ? exec_range(r, sql, NULL) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        int rc = pd__job_sql_fail(r, res, "checking a chunk of rows");
        PQclear(res);
        return rc;
    }
    int n = PQntuples(res);
    *rows = n > 0 ? strtoll(PQgetvalue(res, n - 1, (int)nkey + 2), NULL, 10) : 0;
    int64_t bad = 0;
    for (int i = 0; i < n; i++) {
        if (strcmp(PQgetvalue(res, i, (int)nkey), "t") != 0)
            continue;
        bad++;
        if (json_array_size(v->keys) < PD_JOB_KEYS_LISTED)
            json_array_append_new(v->keys, key_json(r, res, i));
    }
    char **hi = n > 0 ? key_of(r, res, n - 1) : NULL;
    PQclear(res);
    if (n > 0 && hi == NULL)
        return pd__job_fail(r, NULL, "out of memory");
    v->checked += *rows;
    v->divergent += bad;
    int rc = bad > 0 && r->job->opt.repair ? repair_chunk(r, hi, v) : 0;
    if (hi != NULL)
        set_lo(r, hi);
    return rc;
}

static json_t *verify_result(run_t *r, const verify_t *v)
{
    char when[32];
    pd__iso_time(time(NULL), when, sizeof when);
    bool ok = v->divergent == 0 || (r->job->opt.repair && v->repaired >= v->divergent);
    return json_pack("{s:s, s:s, s:I, s:I, s:I, s:O, s:b, s:b}", "time", when, "writes",
                     pd_writes_name(r->job->rule.writes), "rows_checked", (json_int_t)v->checked,
                     "divergent", (json_int_t)v->divergent, "repaired", (json_int_t)v->repaired,
                     "keys", v->keys, "repair", r->job->opt.repair, "ok", ok);
}

static int run_verify(run_t *r)
{
    job_t *j = r->job;
    unsigned limit = j->opt.batch ? j->opt.batch : PD_JOB_DEFAULT_VERIFY_BATCH;
    verify_t v = {.keys = json_array()};
    int rc = 0;
    for (;;) {
        if (pd__job_cancelled(r)) {
            rc = 1;
            break;
        }
        int64_t rows = 0;
        if ((rc = verify_chunk(r, limit, &v, &rows)) != 0 || rows < limit)
            break;
        pd__job_set_progress(r, v.checked);
    }
    pd__job_set_progress(r, v.checked);
    if (rc == 0) {
        r->result = verify_result(r, &v);
        rc = pd__job_record_verify(r);
    }
    json_decref(v.keys);
    return rc;
}

int pd__job_record_verify(run_t *r)
{
    char *err = NULL;
    if (pd_state_record_verify(r->job->jobs->state, r->job->rule.name, r->result, &err) == 0)
        return 0;
    pd__job_fail(r, "Make the state file's directory writable and run verify again.",
                 "could not record the verify result: %s", err ? err : "out of memory");
    free(err);
    return -1;
}

/* ---------------------------------------------------------------------------------------
 * The job thread
 */

/* The connection can no longer be cancelled from outside; called before it closes. */
static void forget_cancel(run_t *r)
{
    pthread_mutex_lock(&r->job->jobs->lock);
    for (int side = PD_JOB_OLD; side <= PD_JOB_NEW; side++) {
        PQfreeCancel(r->job->pgcancel[side]);
        r->job->pgcancel[side] = NULL;
    }
    pthread_mutex_unlock(&r->job->jobs->lock);
}

static void run_free(run_t *r)
{
    unsigned nk = r->job->rule.nkey, nc = r->job->rule.ncols;
    if (r->conn != NULL)
        PQfinish(r->conn);
    if (r->conn_new != NULL)
        PQfinish(r->conn_new);
    free(r->table);
    pd__free_strv(r->key, nk);
    pd__free_strv(r->old_cols, nc);
    pd__free_strv(r->new_cols, nc);
    pd__free_strv(r->up, nc);
    pd__free_strv(r->down, nc);
    pd__free_strv(r->lo, nk);
    free(r->error);
    free(r->hint);
    json_decref(r->result);
}

/* Publishes the outcome: the last thing the thread does with the registry. */
static void publish(run_t *r, int rc)
{
    job_t *j = r->job;
    job_state_t st = rc == 0 ? JOB_DONE : rc > 0 ? JOB_CANCELLED : JOB_FAILED;
    if (st == JOB_FAILED && r->error == NULL)
        pd__job_fail(r, NULL, "the job failed (out of memory)");
    pthread_mutex_lock(&j->jobs->lock);
    j->finished_ns = uv_hrtime();
    j->finished_at = time(NULL);
    j->error = st == JOB_FAILED ? r->error : NULL;
    j->hint = st == JOB_FAILED ? r->hint : NULL;
    j->result = st == JOB_DONE ? r->result : NULL;
    if (st == JOB_FAILED)
        r->error = r->hint = NULL;
    if (st == JOB_DONE)
        r->result = NULL;
    int64_t done = j->rows_done;
    j->state = st;
    pthread_mutex_unlock(&j->jobs->lock);
    pd_log_info(j->tag, "%s after %lld rows", state_names[st], (long long)done);
}

static void job_main(void *arg)
{
    run_t r = {.job = arg};
    int rc;
    if (r.job->rule.kind == PD_RULE_TABLES)
        rc = pd__tables_run(&r);
    else if ((rc = pd__job_connect(&r, PD_JOB_OLD)) == 0 && (rc = run_quote(&r)) == 0 &&
             (rc = run_estimate(&r)) == 0)
        rc = r.job->kind == JOB_BACKFILL ? run_backfill(&r) : run_verify(&r);
    forget_cancel(&r);
    publish(&r, rc);
    run_free(&r);
}

/* ---------------------------------------------------------------------------------------
 * The registry
 */

pd_jobs_t *pd_jobs_new(pd_state_t *state)
{
    pd_jobs_t *jobs = calloc(1, sizeof *jobs);
    if (jobs == NULL)
        return NULL;
    jobs->state = state;
    jobs->next_id = 1;
    if ((jobs->touched = pd_touched_new(PD_TOUCHED_DEFAULT_MAX)) == NULL) {
        free(jobs);
        return NULL;
    }
    pthread_mutex_init(&jobs->lock, NULL);
    return jobs;
}

pd_touched_t *pd_jobs_touched(pd_jobs_t *jobs)
{
    return jobs->touched;
}

static void job_free(job_t *j)
{
    rule_free(&j->rule);
    free(j->phase);
    free(j->error);
    free(j->hint);
    json_decref(j->result);
    free(j);
}

void pd_jobs_free(pd_jobs_t *jobs)
{
    if (jobs == NULL)
        return;
    /* Shutting down: the statements in flight are cancelled too (a batch may be waiting
     * for a lock), which PQcancel does with a short blocking connection: the loop has
     * ended by now. */
    pthread_mutex_lock(&jobs->lock);
    for (job_t *j = jobs->list; j != NULL; j = j->next) {
        atomic_store(&j->cancel, true);
        char buf[256];
        for (int side = PD_JOB_OLD; side <= PD_JOB_NEW; side++)
            if (j->pgcancel[side] != NULL && !PQcancel(j->pgcancel[side], buf, sizeof buf))
                pd_log_warning(j->tag, "could not cancel the statement in flight (%s side): %s",
                               side_names[side], buf);
    }
    job_t *list = jobs->list;
    jobs->list = NULL;
    pthread_mutex_unlock(&jobs->lock);
    for (job_t *next; list != NULL; list = next) {
        next = list->next;
        uv_thread_join(&list->thread);
        job_free(list);
    }
    pthread_mutex_destroy(&jobs->lock);
    pd_touched_free(jobs->touched);
    free(jobs);
}

/* Keeps the newest FINISHED_KEPT finished jobs; joins and frees older ones. */
static void prune(pd_jobs_t *jobs)
{
    job_t *gone = NULL;
    unsigned finished = 0;
    pthread_mutex_lock(&jobs->lock);
    for (job_t **p = &jobs->list; *p != NULL;) {
        job_t *j = *p;
        if (j->state != JOB_RUNNING && ++finished > FINISHED_KEPT) {
            *p = j->next;
            j->next = gone;
            gone = j;
            continue;
        }
        p = &j->next;
    }
    pthread_mutex_unlock(&jobs->lock);
    for (job_t *next; gone != NULL; gone = next) {
        next = gone->next;
        uv_thread_join(&gone->thread);
        job_free(gone);
    }
}

/* Why a job cannot start for this rule (malloc'd), or NULL. */
static char *refusal(const char *kind, const pd_config_t *cfg, const pd_rule_cfg_t *rule,
                     pd_writes_t writes, const pd_job_options_t *opt)
{
    bool tables = rule->kind == PD_RULE_TABLES;
    const pd_database_cfg_t *db = pd_config_database(cfg, rule->database);
    if (db == NULL)
        return pd__strf("rule \"%s\" names database \"%s\", which is not in the config", rule->name,
                        rule->database);
    if (tables && db->new == NULL)
        return pd__strf("rule \"%s\" is kind tables, but database \"%s\" has no \"new\" "
                        "conninfo to compare with or copy to",
                        rule->name, rule->database);
    if (opt != NULL && opt->touched && !tables)
        return pd__strf("verify --touched is for kind tables rules; rule \"%s\" is kind columns, "
                        "whose writes set both columns in one statement: run verify %s",
                        rule->name, rule->name);
    if (strcmp(kind, "backfill") == 0 && (writes == PD_WRITES_DUAL_NEW || writes == PD_WRITES_NEW))
        return pd__strf("backfill of rule \"%s\" would overwrite the new %s, which are "
                        "authoritative under writes=%s; use verify --repair to set the old %s "
                        "from the new ones, or flag writes=dual first",
                        rule->name, tables ? "tables" : "columns", pd_writes_name(writes),
                        tables ? "tables" : "columns");
    return NULL;
}

static job_t *job_new(job_kind_t kind, const pd_config_t *cfg, const pd_rule_cfg_t *rule,
                      pd_writes_t writes, const pd_job_options_t *opt)
{
    job_t *j = calloc(1, sizeof *j);
    if (j == NULL)
        return NULL;
    const pd_database_cfg_t *db = pd_config_database(cfg, rule->database);
    if (rule_copy(&j->rule, rule, db, writes) != 0) {
        job_free(j);
        return NULL;
    }
    j->kind = kind;
    j->opt = opt ? *opt : (pd_job_options_t){0};
    atomic_init(&j->cancel, false);
    j->state = JOB_RUNNING;
    j->started_ns = uv_hrtime();
    j->started_at = time(NULL);
    return j;
}

static bool running_for(pd_jobs_t *jobs, job_kind_t kind, const char *rule)
{
    for (job_t *j = jobs->list; j != NULL; j = j->next)
        if (j->state == JOB_RUNNING && j->kind == kind && strcmp(j->rule.name, rule) == 0)
            return true;
    return false;
}

int pd_jobs_start(pd_jobs_t *jobs, const char *kind, const pd_config_t *cfg,
                  const pd_rule_cfg_t *rule, pd_writes_t writes, const pd_job_options_t *opt,
                  char **err)
{
    *err = NULL;
    bool known = strcmp(kind, "backfill") == 0 || strcmp(kind, "verify") == 0;
    if (!known || (*err = refusal(kind, cfg, rule, writes, opt)) != NULL) {
        if (*err == NULL)
            *err = pd__strf("unknown job kind \"%s\"", kind);
        return -1;
    }
    job_kind_t k = strcmp(kind, "backfill") == 0 ? JOB_BACKFILL : JOB_VERIFY;
    job_t *j = job_new(k, cfg, rule, writes, opt);
    if (j == NULL) {
        *err = pd__strf("out of memory starting the %s job", kind);
        return -1;
    }
    j->jobs = jobs;
    pthread_mutex_lock(&jobs->lock);
    if (running_for(jobs, k, rule->name)) {
        pthread_mutex_unlock(&jobs->lock);
        *err = pd__strf("a %s of rule \"%s\" is already running; follow it with pgdualctl jobs, or "
                        "stop it with pgdualctl cancel ID",
                        kind, rule->name);
        job_free(j);
        return -1;
    }
    j->id = jobs->next_id++;
    snprintf(j->tag, sizeof j->tag, "[job %d %s %s]", j->id, kind, rule->name);
    pd_log_info(j->tag, "starting");
    int rc = uv_thread_create(&j->thread, job_main, j);
    if (rc == 0) {
        j->next = jobs->list;
        jobs->list = j;
    }
    pthread_mutex_unlock(&jobs->lock);
    if (rc != 0) {
        *err = pd__strf("could not start a thread for the %s job: %s", kind, uv_strerror(rc));
        job_free(j);
        return -1;
    }
    prune(jobs);
    return j->id;
}

/* ---------------------------------------------------------------------------------------
 * Reading jobs
 */

static void set_time(json_t *obj, const char *name, time_t t)
{
    char buf[32];
    pd__iso_time(t, buf, sizeof buf);
    json_object_set_new(obj, name, t ? json_string(buf) : json_null());
}

/* Rows per second since the start (of this run: resumed rows do not count), and the time
 * left at that rate. Called with the lock held. */
static void set_rate(json_t *obj, const job_t *j)
{
    uint64_t end = j->state == JOB_RUNNING ? uv_hrtime() : j->finished_ns;
    double secs = (double)(end - j->started_ns) / 1e9;
    double rate = secs > 0 ? (double)(j->rows_done - j->resumed_from) / secs : 0;
    json_object_set_new(obj, "rows_per_s", json_integer((json_int_t)(rate + 0.5)));
    json_t *eta = json_null();
    if (j->state != JOB_RUNNING)
        eta = json_integer(0);
    else if (rate > 0)
        eta = json_integer(j->rows_total > j->rows_done
                               ? (json_int_t)((double)(j->rows_total - j->rows_done) / rate + 0.5)
                               : 0);
    json_object_set_new(obj, "eta_s", eta);
    json_object_set_new(obj, "elapsed_ms", json_integer((json_int_t)(secs * 1000)));
}

/* Called with the lock held. */
static json_t *job_json(const job_t *j)
{
    json_t *o =
        json_pack("{s:i, s:s, s:s, s:s, s:I, s:I}", "id", j->id, "kind", kind_names[j->kind],
                  "rule", j->rule.name, "state", state_names[j->state], "rows_done",
                  (json_int_t)j->rows_done, "rows_total", (json_int_t)j->rows_total);
    if (o == NULL)
        return NULL;
    set_rate(o, j);
    set_time(o, "started_at", j->started_at);
    set_time(o, "finished_at", j->finished_at);
    if (j->kind == JOB_BACKFILL) {
        json_object_set_new(o, "resumed_from", json_integer(j->resumed_from));
        json_object_set_new(o, "batch",
                            json_integer(j->opt.batch ? j->opt.batch : PD_JOB_DEFAULT_BATCH));
        json_object_set_new(o, "throttle_ms", json_integer(j->opt.throttle_ms));
    } else {
        json_object_set_new(o, "repair", json_boolean(j->opt.repair));
        json_object_set_new(o, "touched", json_boolean(j->opt.touched));
    }
    if (j->phase != NULL)
        json_object_set_new(o, "phase", json_string(j->phase));
    if (j->error != NULL)
        json_object_set_new(o, "error", json_string(j->error));
    if (j->hint != NULL)
        json_object_set_new(o, "hint", json_string(j->hint));
    if (j->result != NULL)
        json_object_set_new(o, "result", json_deep_copy(j->result));
    return o;
}

json_t *pd_jobs_get(pd_jobs_t *jobs, int id)
{
    json_t *o = NULL;
    pthread_mutex_lock(&jobs->lock);
    for (job_t *j = jobs->list; j != NULL && o == NULL; j = j->next)
        if (j->id == id)
            o = job_json(j);
    pthread_mutex_unlock(&jobs->lock);
    return o;
}

json_t *pd_jobs_list(pd_jobs_t *jobs)
{
    json_t *list = json_array();
    pthread_mutex_lock(&jobs->lock);
    for (int pass = 0; pass < 2; pass++)
        for (job_t *j = jobs->list; j != NULL; j = j->next)
            if ((j->state == JOB_RUNNING) == (pass == 0))
                json_array_append_new(list, job_json(j));
    pthread_mutex_unlock(&jobs->lock);
    return list;
}

int pd_jobs_cancel(pd_jobs_t *jobs, int id)
{
    int rc = -1;
    pthread_mutex_lock(&jobs->lock);
    for (job_t *j = jobs->list; j != NULL; j = j->next) {
        if (j->id == id && j->state == JOB_RUNNING) {
            atomic_store(&j->cancel, true);
            rc = 0;
        }
    }
    pthread_mutex_unlock(&jobs->lock);
    if (rc == 0)
        pd_log_info(NULL, "[job %d] cancel requested", id);
    return rc;
}
