/*
 * jobs_tables.c — backfill and verify for `tables` rules (jobs.h). The rule's tables live
 * in the database's old side and are mirrored to its new side, where the rule's `columns`
 * may rename a column (old -> new) or transform it (`up` over old's columns gives new's,
 * `down` over new's gives old's). A mapping applies to each table of the rule that has
 * its old column on old and its new column on new.
 *
 * What is compared and copied: new's columns in new's catalog order, each taken on old
 * from the mapping that gives it (`up`, or the renamed old column) or from old's column
 * of the same name, cast to new's type when old knows that type; columns found on one
 * side only are left out (and named in the result). The key is the rule's `key` (old's
 * names; a renamed key column has its new name on new) or the table's primary key.
 *
 * Verify compares chunks of rows in key order by checksums computed in each database,
 *   count(*), md5(string_agg(md5(ROW(columns)::text), '' ORDER BY key)),
 * over the mapped expressions on old and the columns on new. A chunk that differs is
 * split at a median key until a piece is small enough to fetch keys and row hashes from
 * both sides and match them by key. Divergent keys are looked up again on both sides
 * after short pauses and dropped when they agree by then (the application writes
 * meanwhile); what remains is reported, repaired on request, and recorded as touched so
 * that the next `--touched` verify looks at it again. A table without a key is compared
 * whole (count and an order-free sum of row hashes): counts only.
 *
 * Backfill copies in key-ordered batches: the batch's last key is found on old, then
 *   COPY (SELECT mapped columns FROM t WHERE key > lo AND key <= hi ORDER BY key) TO STDOUT
 * on old streams into COPY t (columns) FROM STDIN on new, one transaction on new per
 * batch. COPY takes no parameters, so the bounds travel as parameters of set_config()
 * into settings pgdual.lo_N / pgdual.hi_N that the statement reads with current_setting()
 * cast to the key column's type: values never become SQL text.
 *
 * Both connections speak UTF8, UTC and ISO dates, so that a value's text is the same on
 * both sides and travels between them unchanged. Values go only into results and into
 * the other database, never into the log.
 */
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include "admin/jobs_internal.h"
#include "proxy/log.h"

#define FETCH_ROWS     1000  /* a differing range this small is matched row by row */
#define KEYS_PER_QUERY 1000  /* keys per by-key statement (rechecks, touched keys) */
#define REPAIR_BATCH   500   /* rows per repair transaction */
#define PENDING_MAX    10000 /* divergent keys held before they are re-checked */
#define RECHECKS       3
#define HASH_SIZE      33 /* md5 in hex, with its NUL */

/* The pauses before each re-check of divergent keys. */
static const unsigned recheck_ms[RECHECKS] = {100, 300, 1000};

static const char SESSION_SQL[] = "SET client_encoding = 'UTF8'; SET TimeZone = 'UTC'; "
                                  "SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; "
                                  "SET extra_float_digits = 1; SET bytea_output = 'hex'";

static const char TABLE_SQL[] =
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = pg_catalog.to_regclass($1) AND c.relkind IN ('r', 'p')";

/* A rule without `tables`: every ordinary table outside the system's and pgdual's own. */
static const char ALL_TABLES_SQL[] =
    "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND n.nspname NOT IN ('information_schema', 'pgdual') "
    "AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2";

static const char COLUMNS_SQL[] =
    "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), "
    "a.attgenerated <> '', a.attidentity = 'a', "
    "coalesce((SELECT k.n FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
    "WHERE k.attnum = a.attnum), 0) "
    "FROM pg_catalog.pg_attribute a "
    "LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary "
    "WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "ORDER BY a.attnum";

/* Which of the types named in $1 (a text[]) this database knows, in order. */
static const char TYPES_SQL[] = "SELECT pg_catalog.to_regtype(t) IS NOT NULL "
                                "FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(t, i) "
                                "ORDER BY i";

typedef enum { DIV_NONE, DIV_MISSING, DIV_EXTRA, DIV_DIFFERENT } divk_t;

static const char *const div_names[] = {[DIV_NONE] = "none",
                                        [DIV_MISSING] = "missing",
                                        [DIV_EXTRA] = "extra",
                                        [DIV_DIFFERENT] = "different"};

/* One column of a table on one side, from the catalog. */
typedef struct {
    char *name; /* unquoted */
    char *type; /* format_type() */
    bool generated, identity_always;
    int pkpos; /* position in the primary key, from 1; 0: not in it */
} column_t;

typedef struct {
    column_t *v;
    unsigned n;
} columns_t;

/* The columns of one side (the target) and the expressions over the other side's table
 * (the source) that give them. */
typedef struct {
    unsigned n;
    char **col;   /* quoted target columns */
    char **expr;  /* over the source table */
    bool *insert; /* may be written by INSERT and COPY (not generated) */
    bool *update; /* may be SET (not generated, not identity ALWAYS, not a key column) */
} proj_t;

/* What a job knows of one table of the rule. */
typedef struct {
    char *name;         /* "schema.table", as touched.h names tables */
    char *q;            /* "schema"."table", the same on both sides */
    unsigned nkey;      /* 0: the table has no key */
    char **key_name;    /* key columns as old names them, for results */
    char **key[2];      /* quoted key columns, per side */
    char **key_type[2]; /* their format_type() per side */
    proj_t proj[2];     /* [new]: new's columns from old's; [old]: old's columns from new's */
    char *hash[2];      /* md5(ROW(compared columns)::text): old's expressions, new's columns */
    json_t *one_side;   /* columns left out {"old": [...], "new": [...]}, or NULL */
    int64_t estimate;   /* rows on old */
    pd_touched_set_t *taken; /* verify: the touched keys taken at its start */
} table_t;

typedef struct {
    char **key; /* owned, nkey text values */
    divk_t kind;
    bool repaired;
} divkey_t;

/* One table's verify. */
typedef struct {
    int64_t checked, missing, extra, different, repaired;
    int64_t in_flight; /* differed at first, agreed when looked at again */
    json_t *keys;      /* the first PD_JOB_KEYS_LISTED: {"kind", "key": {column: text}} */
    divkey_t *pending; /* divergent, not yet re-checked */
    size_t npending, cap;
} tally_t;

typedef struct {
    run_t *r;
    table_t *t;
    unsigned nt;
    int64_t done; /* rows, for the progress */
} tjob_t;

/* A key range: (lo, hi], each bound nkey text values or NULL for open. */
typedef struct {
    char **lo, **hi;
} range_t;

/* ---------------------------------------------------------------------------------------
 * Small helpers
 */

static PGconn *conn_of(const tjob_t *tj, pd_job_side_t side)
{
    return side == PD_JOB_OLD ? tj->r->conn : tj->r->conn_new;
}

static pd_job_side_t other(pd_job_side_t side)
{
    return side == PD_JOB_OLD ? PD_JOB_NEW : PD_JOB_OLD;
}

/* A failed statement (res is cleared); -1, or 1 when the job was cancelled meanwhile. */
static int failed(tjob_t *tj, PGresult *res, const char *what, const table_t *tb)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s%s%s", what, tb ? " of table " : "", tb ? tb->name : "");
    int rc = pd__job_sql_fail(tj->r, res, buf);
    PQclear(res);
    return rc;
}

static PGresult *exec(PGconn *conn, const char *sql, unsigned n, const char *const *params)
{
    return PQexecParams(conn, sql, (int)n, NULL, params, NULL, NULL, 0);
}

/* Runs a statement that returns nothing; 0, or as failed(). */
static int command(tjob_t *tj, pd_job_side_t side, const char *sql, const char *what,
                   const table_t *tb)
{
    PGresult *res = PQexec(conn_of(tj, side), sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        return failed(tj, res, what, tb);
    PQclear(res);
    return 0;
}

static char *dupval(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : strdup(PQgetvalue(res, row, col));
}

/* The key of row `row` of res (text columns 0..n-1) as pointers into res. */
static void row_key(PGresult *res, int row, unsigned n, const char **out)
{
    for (unsigned i = 0; i < n; i++)
        out[i] = PQgetisnull(res, row, (int)i) ? NULL : PQgetvalue(res, row, (int)i);
}

/* A copy of n values (NULLs kept), or NULL when out of memory. */
static char **key_copy(const char *const *key, unsigned n)
{
    char **out = calloc(n + 1, sizeof *out);
    for (unsigned i = 0; out != NULL && i < n; i++) {
        if (key[i] != NULL && (out[i] = strdup(key[i])) == NULL) {
            pd__free_strv(out, n);
            return NULL;
        }
    }
    return out;
}

/* {"id": "5", ...}: a key for people (results only). */
static json_t *key_json(const table_t *tb, const char *const *key)
{
    json_t *k = json_object();
    for (unsigned i = 0; i < tb->nkey; i++)
        json_object_set_new(k, tb->key_name[i], key[i] ? json_string(key[i]) : json_null());
    return k;
}

/* A key found in a tree: the key, its length, and what it stands for. */
typedef struct {
    const char *const *key;
    unsigned n;
    size_t idx;
} kref_t;

static int kref_cmp(const void *a, const void *b)
{
    const kref_t *x = a, *y = b;
    return pd_touched_key_cmp(x->n, x->key, y->key);
}

static void kref_forget(void *node)
{
    (void)node; /* the refs live in an array */
}

/* The index of key in the tree, or -1. */
static ssize_t kref_find(void *const *tree, const char *const *key, unsigned n)
{
    kref_t probe = {.key = key, .n = n};
    void *found = tfind(&probe, tree, kref_cmp);
    return found ? (ssize_t)(*(kref_t **)found)->idx : -1;
}

/* The rows of a result by key (its first nk columns), for lookups with kref_find. */
typedef struct {
    const char **vals;
    kref_t *refs;
    void *tree;
} rowindex_t;

static int index_rows(tjob_t *tj, PGresult *res, unsigned nk, rowindex_t *ix)
{
    int n = PQntuples(res);
    *ix = (rowindex_t){.vals = calloc((size_t)n * nk + 1, sizeof *ix->vals),
                       .refs = calloc((size_t)n + 1, sizeof *ix->refs)};
    if (ix->vals == NULL || ix->refs == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    for (int j = 0; j < n; j++) {
        row_key(res, j, nk, &ix->vals[(size_t)j * nk]);
        ix->refs[j] = (kref_t){.key = &ix->vals[(size_t)j * nk], .n = nk, .idx = (size_t)j};
        if (tsearch(&ix->refs[j], &ix->tree, kref_cmp) == NULL)
            return pd__job_fail(tj->r, NULL, "out of memory");
    }
    return 0;
}

static void index_free(rowindex_t *ix)
{
    tdestroy(ix->tree, kref_forget);
    free(ix->vals);
    free(ix->refs);
}

/* ---------------------------------------------------------------------------------------
 * SQL text
 */

/* "a<suffix>, b<suffix>", the items whose mask is true (every item without a mask). */
static void put_list(FILE *f, char *const *items, unsigned n, const bool *mask, const char *suffix)
{
    bool first = true;
    for (unsigned i = 0; i < n; i++) {
        if (mask != NULL && !mask[i])
            continue;
        fprintf(f, "%s%s%s", first ? "" : ", ", items[i], suffix);
        first = false;
    }
}

/* "k1::text AS pgdual_k0, ...": named apart from the columns, so that an ORDER BY k1 of
 * the same statement sorts by the column and not by its text. */
static void put_key_texts(FILE *f, char *const *key, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%s%s::text AS pgdual_k%u", i ? ", " : "", key[i], i);
}

/* (k1, k2) IN (SELECT u.c0::type, ... FROM ROWS FROM (unnest($first::text[]), ...) AS
 * u(c0, ...)) */
static void put_in_keys(FILE *f, const table_t *tb, pd_job_side_t side, unsigned first)
{
    pd__put_keys(f, tb->key[side], tb->nkey, "");
    fputs(" IN (SELECT ", f);
    for (unsigned i = 0; i < tb->nkey; i++)
        fprintf(f, "%su.c%u::%s", i ? ", " : "", i, tb->key_type[side][i]);
    fputs(" FROM ROWS FROM (", f);
    for (unsigned i = 0; i < tb->nkey; i++)
        fprintf(f, "%spg_catalog.unnest($%u::text[])", i ? ", " : "", first + i);
    fputs(") AS u(", f);
    for (unsigned i = 0; i < tb->nkey; i++)
        fprintf(f, "%sc%u", i ? ", " : "", i);
    fputs("))", f);
}

/* SQL text (or a parameter's) being written into a memstream. */
typedef struct {
    FILE *f;
    char *buf;
    size_t len; /* the memstream writes here: it must live as long as f */
} sqltext_t;

/* Starts a text; NULL (the stream) when out of memory. */
static FILE *sql_begin(sqltext_t *q)
{
    q->buf = NULL;
    return q->f = open_memstream(&q->buf, &q->len);
}

/* The text written (malloc'd), or NULL when out of memory. */
static char *sql_end(sqltext_t *q)
{
    return pd__sql_done(q->f, &q->buf);
}

/* "SELECT k1::text AS pgdual_k0, ..., item, ... FROM t WHERE " */
static void put_select(FILE *f, const table_t *tb, pd_job_side_t side, char *const *items,
                       unsigned n)
{
    fputs("SELECT ", f);
    put_key_texts(f, tb->key[side], tb->nkey);
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%s%s AS pgdual_i%u", tb->nkey + i ? ", " : "", items[i], i);
    fprintf(f, " FROM %s WHERE ", tb->q);
}

/* SELECT count(*), md5(string_agg(hash, '' ORDER BY key)) FROM t WHERE range */
static char *sql_sum(const table_t *tb, pd_job_side_t side, const range_t *rg)
{
    sqltext_t q;
    if (sql_begin(&q) == NULL)
        return NULL;
    fprintf(q.f, "SELECT count(*), md5(string_agg(%s, '' ORDER BY ", tb->hash[side]);
    put_list(q.f, tb->key[side], tb->nkey, NULL, "");
    fprintf(q.f, ")) FROM %s WHERE ", tb->q);
    pd__put_range(q.f, tb->key[side], tb->nkey, rg->lo != NULL, rg->hi != NULL);
    return sql_end(&q);
}

/* SELECT key texts, items FROM t WHERE range ORDER BY key [DESC] tail */
static char *sql_rows(const table_t *tb, pd_job_side_t side, const range_t *rg, char *const *items,
                      unsigned n, bool desc, const char *tail)
{
    sqltext_t q;
    if (sql_begin(&q) == NULL)
        return NULL;
    put_select(q.f, tb, side, items, n);
    pd__put_range(q.f, tb->key[side], tb->nkey, rg->lo != NULL, rg->hi != NULL);
    if (tb->nkey > 0) {
        fputs(" ORDER BY ", q.f);
        put_list(q.f, tb->key[side], tb->nkey, NULL, desc ? " DESC" : "");
    }
    fputs(tail, q.f);
    return sql_end(&q);
}

/* SELECT key texts, items FROM t WHERE key IN (the keys in $1, ...) tail */
static char *sql_keyed(const table_t *tb, pd_job_side_t side, char *const *items, unsigned n,
                       const char *tail)
{
    sqltext_t q;
    if (sql_begin(&q) == NULL)
        return NULL;
    put_select(q.f, tb, side, items, n);
    put_in_keys(q.f, tb, side, 1);
    fputs(tail, q.f);
    return sql_end(&q);
}

/* ---------------------------------------------------------------------------------------
 * Parameters
 */

/* The range's bounds as parameters (lo's values, then hi's); returns how many. */
static unsigned range_params(const table_t *tb, const range_t *rg, const char **params)
{
    unsigned n = 0;
    for (unsigned i = 0; rg->lo != NULL && i < tb->nkey; i++)
        params[n++] = rg->lo[i];
    for (unsigned i = 0; rg->hi != NULL && i < tb->nkey; i++)
        params[n++] = rg->hi[i];
    return n;
}

/* A text[] literal of value `col` of n keys: {"a","b\"c",NULL}. A parameter's text. */
static char *array_literal(char **const *keys, size_t n, unsigned col)
{
    sqltext_t q;
    FILE *f = sql_begin(&q);
    if (f == NULL)
        return NULL;
    fputc('{', f);
    for (size_t i = 0; i < n; i++) {
        if (i > 0)
            fputc(',', f);
        const char *v = keys[i][col];
        if (v == NULL) {
            fputs("NULL", f);
            continue;
        }
        fputc('"', f);
        for (; *v; v++) {
            if (*v == '"' || *v == '\\')
                fputc('\\', f);
            fputc(*v, f);
        }
        fputc('"', f);
    }
    fputc('}', f);
    return sql_end(&q);
}

/* Runs sql with one text[] parameter per key column holding the n keys. */
static PGresult *exec_keys(PGconn *conn, const table_t *tb, const char *sql, char **const *keys,
                           size_t n)
{
    char *arrays[tb->nkey + 1];
    bool ok = true;
    for (unsigned i = 0; i < tb->nkey; i++)
        ok = (arrays[i] = array_literal(keys, n, i)) != NULL && ok;
    PGresult *res = ok ? exec(conn, sql, tb->nkey, (const char *const *)arrays) : NULL;
    for (unsigned i = 0; i < tb->nkey; i++)
        free(arrays[i]);
    return res;
}

/* ---------------------------------------------------------------------------------------
 * The rule's tables, from the catalogs of both sides
 */

static void columns_free(columns_t *c)
{
    for (unsigned i = 0; c->v != NULL && i < c->n; i++) {
        free(c->v[i].name);
        free(c->v[i].type);
    }
    free(c->v);
}

static const column_t *column(const columns_t *c, const char *name)
{
    for (unsigned i = 0; i < c->n; i++)
        if (strcmp(c->v[i].name, name) == 0)
            return &c->v[i];
    return NULL;
}

static int load_columns(tjob_t *tj, pd_job_side_t side, const table_t *tb, columns_t *out)
{
    const char *params[1] = {tb->q};
    PGresult *res = exec(conn_of(tj, side), COLUMNS_SQL, 1, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return failed(tj, res, "reading the columns", tb);
    int n = PQntuples(res);
    out->v = calloc((size_t)n + 1, sizeof *out->v);
    for (int i = 0; out->v != NULL && i < n; i++) {
        column_t *c = &out->v[out->n++];
        c->name = dupval(res, i, 0);
        c->type = dupval(res, i, 1);
        c->generated = strcmp(PQgetvalue(res, i, 2), "t") == 0;
        c->identity_always = strcmp(PQgetvalue(res, i, 3), "t") == 0;
        c->pkpos = atoi(PQgetvalue(res, i, 4));
        if (c->name == NULL || c->type == NULL) {
            PQclear(res);
            return pd__job_fail(tj->r, NULL, "out of memory");
        }
    }
    PQclear(res);
    if (out->v == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    if (n == 0 && side == PD_JOB_NEW)
        return pd__job_fail(tj->r,
                            "Create the table on the new side with the same schema and name "
                            "(pg_dump --schema-only of old is a start), then run the job again.",
                            "table %s of rule \"%s\" does not exist on the new side of database "
                            "\"%s\"",
                            tb->name, tj->r->job->rule.name, tj->r->job->rule.database);
    return 0;
}

/* The rule's mapping for a column named `name` on `side`, when it applies to the table:
 * its old column is on old and its new column on new. */
static const pd_column_map_t *mapping(const job_rule_t *rule, const columns_t *cols[2],
                                      pd_job_side_t side, const char *name)
{
    for (unsigned i = 0; i < rule->ncols; i++) {
        const pd_column_map_t *m = &rule->cols[i];
        if (strcmp(side == PD_JOB_OLD ? m->old : m->new, name) == 0 &&
            column(cols[PD_JOB_OLD], m->old) && column(cols[PD_JOB_NEW], m->new))
            return m;
    }
    return NULL;
}

/* Which of the target's column types the source side knows (so that they can be cast
 * there). */
static int types_known(tjob_t *tj, const table_t *tb, pd_job_side_t source, const columns_t *target,
                       bool *known)
{
    char **types[target->n + 1];
    for (unsigned i = 0; i < target->n; i++)
        types[i] = &target->v[i].type;
    char *array = array_literal(types, target->n, 0);
    if (array == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    const char *params[1] = {array};
    PGresult *res = exec(conn_of(tj, source), TYPES_SQL, 1, params);
    free(array);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != (int)target->n)
        return failed(tj, res, "looking up the column types", tb);
    for (unsigned i = 0; i < target->n; i++)
        known[i] = strcmp(PQgetvalue(res, (int)i, 0), "t") == 0;
    PQclear(res);
    return 0;
}

static bool is_key(const table_t *tb, pd_job_side_t side, const char *quoted)
{
    for (unsigned i = 0; i < tb->nkey; i++)
        if (strcmp(tb->key[side][i], quoted) == 0)
            return true;
    return false;
}

/*
 * The projection onto `target`'s columns from the other side: per target column the
 * mapping's expression (up to new, down to old) or the renamed column, else the source's
 * column of the same name, cast to the target's type where the source knows it (so that
 * both sides print a value alike). Target columns without a source are left out and named
 * in tb->one_side under the target's side (built for both targets, that names the columns
 * of each side that the other lacks).
 */
static int build_proj(tjob_t *tj, table_t *tb, const columns_t *cols[2], pd_job_side_t target)
{
    const job_rule_t *rule = &tj->r->job->rule;
    pd_job_side_t source = other(target);
    const columns_t *tc = cols[target], *sc = cols[source];
    proj_t *p = &tb->proj[target];
    bool known[tc->n + 1];
    int rc = types_known(tj, tb, source, tc, known);
    if (rc != 0)
        return rc;
    p->col = calloc(tc->n + 1, sizeof *p->col);
    p->expr = calloc(tc->n + 1, sizeof *p->expr);
    p->insert = calloc(tc->n + 1, sizeof *p->insert);
    p->update = calloc(tc->n + 1, sizeof *p->update);
    if (!p->col || !p->expr || !p->insert || !p->update)
        return pd__job_fail(tj->r, NULL, "out of memory");
    json_t *alone = json_array();
    for (unsigned i = 0; i < tc->n; i++) {
        const column_t *c = &tc->v[i];
        const pd_column_map_t *m = mapping(rule, cols, target, c->name);
        const char *e = m ? (target == PD_JOB_NEW ? m->up : m->down) : NULL;
        const char *from = m ? (target == PD_JOB_NEW ? m->old : m->new) : c->name;
        const column_t *s = column(sc, from);
        if (e == NULL && s == NULL) {
            json_array_append_new(alone, json_string(c->name));
            continue;
        }
        char *qfrom = pd__quote_ident(conn_of(tj, source), from);
        char *expr = e ? pd__strf("(%s)", e) : qfrom ? strdup(qfrom) : NULL;
        bool cast = known[i] && (e != NULL || strcmp(s->type, c->type) != 0);
        unsigned k = p->n++;
        p->col[k] = pd__quote_ident(conn_of(tj, target), c->name);
        p->expr[k] = cast && expr ? pd__strf("CAST(%s AS %s)", expr, c->type) : expr;
        if (cast)
            free(expr);
        free(qfrom);
        if (p->col[k] == NULL || p->expr[k] == NULL) {
            json_decref(alone);
            return pd__job_fail(tj->r, NULL, "out of memory");
        }
        p->insert[k] = !c->generated;
        p->update[k] = !c->generated && !c->identity_always && !is_key(tb, target, p->col[k]);
    }
    if (json_array_size(alone) > 0) {
        if (tb->one_side == NULL)
            tb->one_side = json_object();
        json_object_set_new(tb->one_side, target == PD_JOB_NEW ? "new" : "old", alone);
    } else {
        json_decref(alone);
    }
    return 0;
}

/* The key: the rule's, or the primary key on old; its names on new (a renamed key column
 * is followed, a transformed one refused); types on both sides. 0 columns: no key. */
static int resolve_key(tjob_t *tj, table_t *tb, const columns_t *cols[2])
{
    const job_rule_t *rule = &tj->r->job->rule;
    const columns_t *oc = cols[PD_JOB_OLD];
    unsigned n = rule->nkey;
    const char *names[oc->n + rule->nkey + 1];
    for (unsigned i = 0; i < rule->nkey; i++)
        names[i] = rule->key[i];
    for (int pos = 1; rule->nkey == 0; pos++) {
        unsigned before = n;
        for (unsigned i = 0; i < oc->n; i++)
            if (oc->v[i].pkpos == pos)
                names[n++] = oc->v[i].name;
        if (n == before)
            break; /* past the primary key's last column, or there is none */
    }
    tb->nkey = n;
    tb->key_name = calloc(n + 1, sizeof *tb->key_name);
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW; s++) {
        tb->key[s] = calloc(n + 1, sizeof *tb->key[s]);
        tb->key_type[s] = calloc(n + 1, sizeof *tb->key_type[s]);
        if (tb->key[s] == NULL || tb->key_type[s] == NULL || tb->key_name == NULL)
            return pd__job_fail(tj->r, NULL, "out of memory");
    }
    for (unsigned i = 0; i < n; i++) {
        const pd_column_map_t *m = mapping(rule, cols, PD_JOB_OLD, names[i]);
        const char *side_name[2] = {names[i], m ? m->new : names[i]};
        bool transformed = m != NULL && ((m->up != NULL && strcmp(m->up, m->old) != 0) ||
                                         (m->down != NULL && strcmp(m->down, m->new) != 0));
        if (transformed)
            return pd__job_fail(tj->r,
                                "Key values must be the same on both sides: map a key column by "
                                "renaming it only (no up/down), or name another key in the "
                                "rule's `key`.",
                                "key column \"%s\" of table %s is transformed by the rule's "
                                "up/down expressions",
                                names[i], tb->name);
        for (int s = PD_JOB_OLD; s <= PD_JOB_NEW; s++) {
            const column_t *c = column(cols[s], side_name[s]);
            if (c == NULL)
                return pd__job_fail(tj->r,
                                    "Fix the rule's `key`, or the table, and start the "
                                    "job again.",
                                    "key column \"%s\" of table %s does not exist on the %s side",
                                    side_name[s], tb->name, s == PD_JOB_OLD ? "old" : "new");
            tb->key[s][i] = pd__quote_ident(conn_of(tj, s), c->name);
            tb->key_type[s][i] = strdup(c->type);
            if (tb->key[s][i] == NULL || tb->key_type[s][i] == NULL)
                return pd__job_fail(tj->r, NULL, "out of memory");
        }
        if ((tb->key_name[i] = strdup(names[i])) == NULL)
            return pd__job_fail(tj->r, NULL, "out of memory");
    }
    return 0;
}

/* md5(ROW(compared columns)::text) per side: old's expressions, new's columns. */
static int build_hashes(tjob_t *tj, table_t *tb)
{
    const proj_t *p = &tb->proj[PD_JOB_NEW];
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW; s++) {
        sqltext_t q;
        if (sql_begin(&q) != NULL) {
            fputs("md5(ROW(", q.f);
            put_list(q.f, s == PD_JOB_OLD ? p->expr : p->col, p->n, NULL, "");
            fputs(")::text)", q.f);
            tb->hash[s] = sql_end(&q);
        }
        if (tb->hash[s] == NULL)
            return pd__job_fail(tj->r, NULL, "out of memory");
    }
    return 0;
}

/* "schema"."table" from a row of (nspname, relname). */
static char *quote_qualified(PGconn *conn, PGresult *res, int row)
{
    char *qs = pd__quote_ident(conn, PQgetvalue(res, row, 0));
    char *qt = pd__quote_ident(conn, PQgetvalue(res, row, 1));
    char *out = qs && qt ? pd__strf("%s.%s", qs, qt) : NULL;
    free(qs);
    free(qt);
    return out;
}

/* Names, columns, key and projections of one table ("schema.table" as the rule or the
 * catalog gives it). */
static int load_table(tjob_t *tj, table_t *tb, const char *given)
{
    const char *params[1] = {given};
    PGresult *res = exec(tj->r->conn, TABLE_SQL, 1, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return failed(tj, res, "looking up a table", NULL);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return pd__job_fail(tj->r,
                            "Names in the rule's `tables` are read like SQL names: schema.table, "
                            "with double quotes around mixed-case parts.",
                            "table %s of rule \"%s\" does not exist in database \"%s\" (old side)",
                            given, tj->r->job->rule.name, tj->r->job->rule.database);
    }
    tb->name = pd__strf("%s.%s", PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
    tb->q = quote_qualified(tj->r->conn, res, 0);
    PQclear(res);
    if (tb->name == NULL || tb->q == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    columns_t oc = {0}, nc = {0};
    const columns_t *cols[2] = {&oc, &nc};
    int rc = load_columns(tj, PD_JOB_OLD, tb, &oc);
    if (rc == 0)
        rc = load_columns(tj, PD_JOB_NEW, tb, &nc);
    if (rc == 0)
        rc = resolve_key(tj, tb, cols);
    if (rc == 0)
        rc = build_proj(tj, tb, cols, PD_JOB_NEW);
    if (rc == 0)
        rc = build_proj(tj, tb, cols, PD_JOB_OLD);
    if (rc == 0)
        rc = build_hashes(tj, tb);
    if (rc == 0)
        rc = pd__job_count_rows(tj->r, tj->r->conn, tb->q, &tb->estimate);
    columns_free(&oc);
    columns_free(&nc);
    return rc;
}

static void proj_free(proj_t *p)
{
    pd__free_strv(p->col, p->n);
    pd__free_strv(p->expr, p->n);
    free(p->insert);
    free(p->update);
}

static void table_free(table_t *tb)
{
    free(tb->name);
    free(tb->q);
    pd__free_strv(tb->key_name, tb->nkey);
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW; s++) {
        pd__free_strv(tb->key[s], tb->nkey);
        pd__free_strv(tb->key_type[s], tb->nkey);
        proj_free(&tb->proj[s]);
        free(tb->hash[s]);
    }
    json_decref(tb->one_side);
    pd_touched_set_free(tb->taken);
}

/* The rule's tables (or every table of old), loaded in the rule's order. */
static int load_tables(tjob_t *tj)
{
    const job_rule_t *rule = &tj->r->job->rule;
    PGresult *all = NULL;
    unsigned n = rule->ntables;
    if (n == 0) {
        all = PQexec(tj->r->conn, ALL_TABLES_SQL);
        if (PQresultStatus(all) != PGRES_TUPLES_OK)
            return failed(tj, all, "listing the tables of the old database", NULL);
        n = (unsigned)PQntuples(all);
    }
    tj->t = calloc(n + 1, sizeof *tj->t);
    int rc = tj->t ? 0 : pd__job_fail(tj->r, NULL, "out of memory");
    for (unsigned i = 0; rc == 0 && i < n; i++) {
        pd__job_set_phase(tj->r, "reading the catalogs (%u/%u tables)", i + 1, n);
        char *given = NULL;
        if (rule->ntables > 0) {
            given = strdup(rule->tables[i]);
        } else {
            given = quote_qualified(tj->r->conn, all, (int)i);
        }
        tj->nt++;
        rc = given ? load_table(tj, &tj->t[i], given) : pd__job_fail(tj->r, NULL, "out of memory");
        free(given);
    }
    PQclear(all);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Verify: ranges of rows
 */

typedef struct {
    int64_t count;
    char hash[HASH_SIZE];
} sum_t;

static bool sums_differ(const sum_t s[2])
{
    return s[0].count != s[1].count || strcmp(s[0].hash, s[1].hash) != 0;
}

static int range_sum(tjob_t *tj, const table_t *tb, pd_job_side_t side, const range_t *rg,
                     sum_t *out)
{
    const char *params[2 * tb->nkey + 1];
    unsigned np = range_params(tb, rg, params);
    char *sql = sql_sum(tb, side, rg);
    PGresult *res = sql ? exec(conn_of(tj, side), sql, np, params) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return failed(tj, res, "checksumming rows", tb);
    out->count = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    snprintf(out->hash, sizeof out->hash, "%s", PQgetvalue(res, 0, 1));
    PQclear(res);
    return 0;
}

static int range_sums(tjob_t *tj, const table_t *tb, const range_t *rg, sum_t s[2])
{
    int rc = range_sum(tj, tb, PD_JOB_OLD, rg, &s[PD_JOB_OLD]);
    return rc != 0 ? rc : range_sum(tj, tb, PD_JOB_NEW, rg, &s[PD_JOB_NEW]);
}

/* The key at `offset` in key order within a range on one side (a copy), or *key = NULL
 * when the range has fewer rows. */
static int range_nth(tjob_t *tj, const table_t *tb, pd_job_side_t side, const range_t *rg,
                     int64_t offset, char ***key)
{
    const char *params[2 * tb->nkey + 2];
    unsigned np = range_params(tb, rg, params);
    char off[24];
    snprintf(off, sizeof off, "%lld", (long long)offset);
    params[np++] = off;
    char tail[32];
    snprintf(tail, sizeof tail, " OFFSET $%u LIMIT 1", np);
    char *sql = sql_rows(tb, side, rg, NULL, 0, false, tail);
    PGresult *res = sql ? exec(conn_of(tj, side), sql, np, params) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return failed(tj, res, "reading the next keys", tb);
    *key = NULL;
    if (PQntuples(res) == 1) {
        const char *k[tb->nkey + 1];
        row_key(res, 0, tb->nkey, k);
        *key = key_copy(k, tb->nkey);
    }
    int n = PQntuples(res);
    PQclear(res);
    return n == 1 && *key == NULL ? pd__job_fail(tj->r, NULL, "out of memory") : 0;
}

/* ---------------------------------------------------------------------------------------
 * Verify: divergent keys
 */

static int pend(tjob_t *tj, tally_t *ty, const table_t *tb, const char *const *key, divk_t kind)
{
    if (ty->npending == ty->cap) {
        size_t cap = ty->cap ? ty->cap * 2 : 256;
        divkey_t *p = realloc(ty->pending, cap * sizeof *p);
        if (p == NULL)
            return pd__job_fail(tj->r, NULL, "out of memory");
        ty->pending = p;
        ty->cap = cap;
    }
    char **k = key_copy(key, tb->nkey);
    if (k == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    ty->pending[ty->npending++] = (divkey_t){.key = k, .kind = kind};
    return 0;
}

/* Matches the rows of both sides (key text..., hash) by key and holds what differs. */
static int match_rows(tjob_t *tj, const table_t *tb, tally_t *ty, PGresult *res[2])
{
    unsigned nk = tb->nkey;
    int n_old = PQntuples(res[PD_JOB_OLD]), n_new = PQntuples(res[PD_JOB_NEW]);
    bool *seen = calloc((size_t)n_new + 1, sizeof *seen);
    rowindex_t ix;
    int rc = index_rows(tj, res[PD_JOB_NEW], nk, &ix);
    if (rc == 0 && seen == NULL)
        rc = pd__job_fail(tj->r, NULL, "out of memory");
    const char *key[nk + 1];
    for (int i = 0; rc == 0 && i < n_old; i++) {
        row_key(res[PD_JOB_OLD], i, nk, key);
        ssize_t j = kref_find(&ix.tree, key, nk);
        if (j < 0) {
            rc = pend(tj, ty, tb, key, DIV_MISSING);
            continue;
        }
        seen[j] = true;
        if (strcmp(PQgetvalue(res[PD_JOB_OLD], i, (int)nk),
                   PQgetvalue(res[PD_JOB_NEW], (int)j, (int)nk)) != 0)
            rc = pend(tj, ty, tb, key, DIV_DIFFERENT);
    }
    for (int j = 0; rc == 0 && j < n_new; j++) {
        if (seen[j])
            continue;
        ty->checked++; /* a row of new only: checked, but not counted among old's */
        rc = pend(tj, ty, tb, &ix.vals[(size_t)j * nk], DIV_EXTRA);
    }
    index_free(&ix);
    free(seen);
    return rc;
}

/* Fetches a range's keys and row hashes on both sides and matches them. */
static int match_range(tjob_t *tj, const table_t *tb, tally_t *ty, const range_t *rg)
{
    const char *params[2 * tb->nkey + 1];
    unsigned np = range_params(tb, rg, params);
    PGresult *res[2] = {NULL, NULL};
    int rc = 0;
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW && rc == 0; s++) {
        char *sql = sql_rows(tb, (pd_job_side_t)s, rg, &tb->hash[s], 1, false, "");
        res[s] = sql ? exec(conn_of(tj, (pd_job_side_t)s), sql, np, params) : NULL;
        free(sql);
        if (PQresultStatus(res[s]) != PGRES_TUPLES_OK) {
            rc = failed(tj, res[s], "reading keys and row hashes", tb);
            res[s] = NULL;
        }
    }
    if (rc == 0)
        rc = match_rows(tj, tb, ty, res);
    PQclear(res[PD_JOB_OLD]);
    PQclear(res[PD_JOB_NEW]);
    return rc;
}

typedef struct {
    bool present[2];
    char hash[2][HASH_SIZE];
} seen_t;

static divk_t kind_of(const seen_t *s)
{
    if (!s->present[PD_JOB_OLD] && !s->present[PD_JOB_NEW])
        return DIV_NONE; /* deleted on both sides meanwhile */
    if (!s->present[PD_JOB_NEW])
        return DIV_MISSING;
    if (!s->present[PD_JOB_OLD])
        return DIV_EXTRA;
    return strcmp(s->hash[PD_JOB_OLD], s->hash[PD_JOB_NEW]) == 0 ? DIV_NONE : DIV_DIFFERENT;
}

/* Looks up to KEYS_PER_QUERY keys up on both sides; kinds[i]: how key i differs now. */
static int classify_some(tjob_t *tj, const table_t *tb, char **const *keys, size_t n, divk_t *kinds)
{
    unsigned nk = tb->nkey;
    kref_t *refs = calloc(n + 1, sizeof *refs);
    seen_t *seen = calloc(n + 1, sizeof *seen);
    void *tree = NULL;
    int rc = refs && seen ? 0 : pd__job_fail(tj->r, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        refs[i] = (kref_t){.key = (const char *const *)keys[i], .n = nk, .idx = i};
        if (tsearch(&refs[i], &tree, kref_cmp) == NULL)
            rc = pd__job_fail(tj->r, NULL, "out of memory");
    }
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW && rc == 0; s++) {
        char *sql = sql_keyed(tb, (pd_job_side_t)s, &tb->hash[s], 1, "");
        PGresult *res = sql ? exec_keys(conn_of(tj, (pd_job_side_t)s), tb, sql, keys, n) : NULL;
        free(sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            rc = failed(tj, res, "looking up rows by key", tb);
            break;
        }
        const char *key[nk + 1];
        for (int row = 0; row < PQntuples(res); row++) {
            row_key(res, row, nk, key);
            ssize_t i = kref_find(&tree, key, nk);
            if (i < 0)
                continue;
            seen[i].present[s] = true;
            snprintf(seen[i].hash[s], HASH_SIZE, "%s", PQgetvalue(res, row, (int)nk));
        }
        PQclear(res);
    }
    for (size_t i = 0; rc == 0 && i < n; i++)
        kinds[i] = kind_of(&seen[i]);
    tdestroy(tree, kref_forget);
    free(refs);
    free(seen);
    return rc;
}

static int classify(tjob_t *tj, const table_t *tb, char **const *keys, size_t n, divk_t *kinds)
{
    int rc = 0;
    for (size_t at = 0; rc == 0 && at < n; at += KEYS_PER_QUERY)
        rc = classify_some(tj, tb, keys + at, n - at < KEYS_PER_QUERY ? n - at : KEYS_PER_QUERY,
                           kinds + at);
    return rc;
}

/* Looks the held keys up again after a pause, a few times, and lets go of those that
 * agree by then (a write that had reached one side only). */
static int recheck(tjob_t *tj, const table_t *tb, tally_t *ty)
{
    for (unsigned a = 0; a < RECHECKS && ty->npending > 0; a++) {
        if (!pd__job_throttle(tj->r, recheck_ms[a]))
            return 1;
        size_t n = ty->npending;
        char ***keys = malloc(n * sizeof *keys);
        divk_t *kinds = malloc(n * sizeof *kinds);
        int rc = keys && kinds ? 0 : pd__job_fail(tj->r, NULL, "out of memory");
        for (size_t i = 0; rc == 0 && i < n; i++)
            keys[i] = ty->pending[i].key;
        if (rc == 0)
            rc = classify(tj, tb, keys, n, kinds);
        size_t kept = 0;
        for (size_t i = 0; rc == 0 && i < n; i++) {
            if (kinds[i] == DIV_NONE) {
                pd__free_strv(ty->pending[i].key, tb->nkey);
                continue;
            }
            ty->pending[i].kind = kinds[i];
            ty->pending[kept++] = ty->pending[i];
        }
        if (rc == 0) {
            ty->in_flight += (int64_t)(n - kept);
            ty->npending = kept;
        }
        free(keys);
        free(kinds);
        if (rc != 0)
            return rc;
        if (kept == n && a > 0)
            break; /* twice the same: these differ for good */
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Verify: repair from the authoritative side
 */

typedef struct {
    pd_job_side_t auth, target;
    char *fetch;  /* on auth: key::text, the target's columns computed there, FOR SHARE */
    char *update; /* on target: SET columns WHERE key; NULL when no column may be SET */
    char *insert; /* on target */
    char *del;    /* on target */
    int64_t failed;
    char *error; /* the first failure, PostgreSQL's message */
} repair_t;

static unsigned count_mask(const bool *mask, unsigned n)
{
    unsigned k = 0;
    for (unsigned i = 0; i < n; i++)
        k += mask[i];
    return k;
}

static int repair_sql(tjob_t *tj, const table_t *tb, repair_t *rp)
{
    const proj_t *p = &tb->proj[rp->target];
    unsigned nk = tb->nkey, nset = count_mask(p->update, p->n);
    sqltext_t q;
    FILE *f;
    rp->fetch = sql_keyed(tb, rp->auth, p->expr, p->n, " FOR SHARE");
    if (nset > 0 && (f = sql_begin(&q)) != NULL) {
        fprintf(f, "UPDATE %s SET ", tb->q);
        for (unsigned i = 0, k = 1; i < p->n; i++)
            if (p->update[i])
                fprintf(f, "%s%s = $%u", k > 1 ? ", " : "", p->col[i], k), k++;
        fputs(" WHERE ", f);
        pd__put_keys(f, tb->key[rp->target], nk, "");
        fputs(" = ", f);
        pd__put_params(f, nk, nset + 1);
        rp->update = sql_end(&q);
    }
    if ((f = sql_begin(&q)) != NULL) {
        fprintf(f, "INSERT INTO %s (", tb->q);
        put_list(f, p->col, p->n, p->insert, "");
        fputs(") OVERRIDING SYSTEM VALUE VALUES ", f);
        pd__put_params(f, count_mask(p->insert, p->n), 1);
        fputs(" ON CONFLICT DO NOTHING", f);
        rp->insert = sql_end(&q);
    }
    if ((f = sql_begin(&q)) != NULL) {
        fprintf(f, "DELETE FROM %s WHERE ", tb->q);
        pd__put_keys(f, tb->key[rp->target], nk, "");
        fputs(" = ", f);
        pd__put_params(f, nk, 1);
        rp->del = sql_end(&q);
    }
    if (!rp->fetch || (nset > 0 && !rp->update) || !rp->insert || !rp->del)
        return pd__job_fail(tj->r, NULL, "out of memory");
    return 0;
}

static const char *value(PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

/*
 * Sets one row of the target right: deleted when the authoritative side has no row with
 * the key (row < 0), else updated, or inserted when the target has none. *changed: rows
 * changed. A statement that fails is a failure of this row only (its savepoint is rolled
 * back and the first message kept); the job goes on with the others.
 */
static int repair_row(tjob_t *tj, const table_t *tb, repair_t *rp, PGresult *auth, int row,
                      char *const *key, int64_t *changed)
{
    PGconn *conn = conn_of(tj, rp->target);
    const proj_t *p = &tb->proj[rp->target];
    unsigned nk = tb->nkey, np = 0;
    const char *params[p->n + nk + 1];
    int rc = command(tj, rp->target, "SAVEPOINT pgdual_repair", "repairing a row", tb);
    if (rc != 0)
        return rc;
    PGresult *res = NULL;
    if (row < 0) {
        res = exec(conn, rp->del, nk, (const char *const *)key);
    } else {
        if (rp->update != NULL) {
            for (unsigned i = 0; i < p->n; i++)
                if (p->update[i])
                    params[np++] = value(auth, row, (int)(nk + i));
            for (unsigned i = 0; i < nk; i++)
                params[np++] = key[i];
            res = exec(conn, rp->update, np, params);
        }
        if (res == NULL ||
            (PQresultStatus(res) == PGRES_COMMAND_OK && strcmp(PQcmdTuples(res), "0") == 0)) {
            PQclear(res);
            np = 0;
            for (unsigned i = 0; i < p->n; i++)
                if (p->insert[i])
                    params[np++] = value(auth, row, (int)(nk + i));
            res = exec(conn, rp->insert, np, params);
        }
    }
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    *changed = ok ? strtoll(PQcmdTuples(res), NULL, 10) : 0;
    if (!ok && rp->failed++ == 0) {
        const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        rp->error = strdup(msg ? msg : PQerrorMessage(conn));
    }
    PQclear(res);
    if (!ok && pd__job_cancelled(tj->r))
        return 1;
    return command(tj, rp->target, ok ? "RELEASE pgdual_repair" : "ROLLBACK TO pgdual_repair",
                   "repairing a row", tb);
}

/* Repairs up to REPAIR_BATCH keys: the authoritative rows are read FOR SHARE (so that the
 * application's next write of them waits and then reaches the target after ours), the
 * target is changed in one transaction. */
static int repair_some(tjob_t *tj, const table_t *tb, repair_t *rp, divkey_t *d, size_t n,
                       int64_t *repaired)
{
    unsigned nk = tb->nkey;
    char **keys[n + 1];
    for (size_t i = 0; i < n; i++)
        keys[i] = d[i].key;
    int rc = command(tj, rp->auth, "BEGIN", "repairing rows", tb);
    if (rc != 0)
        return rc;
    PGresult *auth = exec_keys(conn_of(tj, rp->auth), tb, rp->fetch, keys, n);
    if (PQresultStatus(auth) != PGRES_TUPLES_OK) {
        PQclear(PQexec(conn_of(tj, rp->auth), "ROLLBACK"));
        return failed(tj, auth, "reading the authoritative rows", tb);
    }
    rowindex_t ix;
    rc = index_rows(tj, auth, nk, &ix);
    if (rc == 0)
        rc = command(tj, rp->target, "BEGIN", "repairing rows", tb);
    int64_t fixed = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        int64_t changed = 0;
        ssize_t j = kref_find(&ix.tree, (const char *const *)d[i].key, nk);
        rc = repair_row(tj, tb, rp, auth, (int)j, d[i].key, &changed);
        d[i].repaired = rc == 0 && changed > 0;
        fixed += d[i].repaired;
    }
    if (rc == 0)
        rc = command(tj, rp->target, "COMMIT", "committing repaired rows", tb);
    else
        PQclear(PQexec(conn_of(tj, rp->target), "ROLLBACK"));
    PQclear(PQexec(conn_of(tj, rp->auth), "ROLLBACK")); /* only read; releases the locks */
    index_free(&ix);
    PQclear(auth);
    if (rc == 0)
        *repaired += fixed;
    else
        for (size_t i = 0; i < n; i++)
            d[i].repaired = false;
    return rc;
}

/* The authoritative side: old under writes old|dual, new under dual-new|new. */
static pd_job_side_t authoritative(const tjob_t *tj)
{
    pd_writes_t w = tj->r->job->rule.writes;
    return w == PD_WRITES_DUAL_NEW || w == PD_WRITES_NEW ? PD_JOB_NEW : PD_JOB_OLD;
}

static int repair(tjob_t *tj, const table_t *tb, tally_t *ty, repair_t *rp)
{
    int rc = rp->fetch != NULL ? 0 : repair_sql(tj, tb, rp);
    for (size_t at = 0; rc == 0 && at < ty->npending; at += REPAIR_BATCH) {
        size_t n = ty->npending - at < REPAIR_BATCH ? ty->npending - at : REPAIR_BATCH;
        rc = repair_some(tj, tb, rp, ty->pending + at, n, &ty->repaired);
    }
    return rc;
}

static void repair_free(repair_t *rp)
{
    free(rp->fetch);
    free(rp->update);
    free(rp->insert);
    free(rp->del);
    free(rp->error);
}

/* ---------------------------------------------------------------------------------------
 * Verify: one table
 */

/* Re-checks the held keys, repairs them on request, counts and lists them, and records
 * the ones left divergent as touched, so that the next --touched verify sees them. */
static int settle(tjob_t *tj, const table_t *tb, tally_t *ty, repair_t *rp)
{
    int rc = recheck(tj, tb, ty);
    if (rc == 0 && tj->r->job->opt.repair && ty->npending > 0)
        rc = repair(tj, tb, ty, rp);
    if (rc != 0)
        return rc;
    const job_rule_t *rule = &tj->r->job->rule;
    for (size_t i = 0; i < ty->npending; i++) {
        divkey_t *d = &ty->pending[i];
        ty->missing += d->kind == DIV_MISSING;
        ty->extra += d->kind == DIV_EXTRA;
        ty->different += d->kind == DIV_DIFFERENT;
        if (json_array_size(ty->keys) < PD_JOB_KEYS_LISTED)
            json_array_append_new(ty->keys,
                                  json_pack("{s:s, s:o}", "kind", div_names[d->kind], "key",
                                            key_json(tb, (const char *const *)d->key)));
        if (!d->repaired)
            pd_touched_add(tj->r->job->jobs->touched, rule->name, tb->name, tb->nkey,
                           (const char *const *)d->key);
        pd__free_strv(d->key, tb->nkey);
    }
    ty->npending = 0;
    return 0;
}

static void progress(tjob_t *tj, int64_t rows)
{
    tj->done += rows;
    pd__job_set_progress(tj->r, tj->done);
}

/*
 * A range of old's chunk whose sums differ: matched row by row when it is small, else
 * split at the median key of its larger side, each half compared again. `depth` bounds
 * the splitting of a range that keeps growing under writes.
 */
static int narrow(tjob_t *tj, const table_t *tb, tally_t *ty, repair_t *rp, const range_t *rg,
                  const sum_t s[2], unsigned depth)
{
    pd_job_side_t side = s[PD_JOB_OLD].count >= s[PD_JOB_NEW].count ? PD_JOB_OLD : PD_JOB_NEW;
    int64_t rows = s[side].count;
    char **mid = NULL;
    int rc = 0;
    if (rows > FETCH_ROWS && depth < 40)
        rc = range_nth(tj, tb, side, rg, rows / 2 - 1, &mid);
    if (rc != 0)
        return rc;
    if (mid == NULL) {
        rc = match_range(tj, tb, ty, rg);
        return rc == 0 && ty->npending >= PENDING_MAX ? settle(tj, tb, ty, rp) : rc;
    }
    const range_t halves[2] = {{.lo = rg->lo, .hi = mid}, {.lo = mid, .hi = rg->hi}};
    for (int h = 0; h < 2 && rc == 0; h++) {
        sum_t hs[2];
        if ((rc = range_sums(tj, tb, &halves[h], hs)) == 0 && sums_differ(hs))
            rc = narrow(tj, tb, ty, rp, &halves[h], hs, depth + 1);
    }
    pd__free_strv(mid, tb->nkey);
    return rc;
}

/* Every row, in chunks of old's key order; the last chunk is open-ended on both sides,
 * so that rows of new past old's last key are seen too. */
static int verify_full(tjob_t *tj, const table_t *tb, tally_t *ty, repair_t *rp)
{
    const pd_job_options_t *opt = &tj->r->job->opt;
    unsigned chunk = opt->batch ? opt->batch : PD_JOB_DEFAULT_VERIFY_BATCH;
    char **lo = NULL, **hi = NULL;
    int rc = 0;
    do {
        if (pd__job_cancelled(tj->r)) {
            rc = 1;
            break;
        }
        if ((rc = range_nth(tj, tb, PD_JOB_OLD, &(range_t){.lo = lo}, chunk - 1, &hi)) != 0)
            break;
        range_t rg = {.lo = lo, .hi = hi};
        sum_t s[2];
        if ((rc = range_sums(tj, tb, &rg, s)) != 0)
            break;
        ty->checked += s[PD_JOB_OLD].count;
        if (sums_differ(s))
            rc = narrow(tj, tb, ty, rp, &rg, s, 0);
        progress(tj, s[PD_JOB_OLD].count);
        pd__free_strv(lo, tb->nkey);
        lo = hi;
    } while (rc == 0 && hi != NULL);
    pd__free_strv(lo, tb->nkey);
    return rc;
}

/* Only the keys written since the last verify, looked up on both sides. */
static int verify_touched(tjob_t *tj, const table_t *tb, tally_t *ty, repair_t *rp)
{
    size_t n = pd_touched_set_count(tb->taken);
    int rc = 0;
    for (size_t at = 0; rc == 0 && at < n; at += KEYS_PER_QUERY) {
        if (pd__job_cancelled(tj->r))
            return 1;
        size_t m = n - at < KEYS_PER_QUERY ? n - at : KEYS_PER_QUERY;
        char **keys[m];
        divk_t kinds[m];
        for (size_t i = 0; i < m; i++)
            keys[i] = (char **)pd_touched_set_key(tb->taken, at + i);
        rc = classify(tj, tb, keys, m, kinds);
        for (size_t i = 0; rc == 0 && i < m; i++)
            if (kinds[i] != DIV_NONE)
                rc = pend(tj, ty, tb, (const char *const *)keys[i], kinds[i]);
        ty->checked += (int64_t)m;
        progress(tj, (int64_t)m);
        if (rc == 0 && ty->npending >= PENDING_MAX)
            rc = settle(tj, tb, ty, rp);
    }
    return rc;
}

/* A table without a key: count and an order-free sum of 64 bits of each row's hash. */
static int verify_checksum(tjob_t *tj, const table_t *tb, json_t *out, tally_t *ty,
                           int64_t *divergent)
{
    int64_t rows[2];
    char sums[2][48];
    for (int s = PD_JOB_OLD; s <= PD_JOB_NEW; s++) {
        char *sql = pd__strf("SELECT count(*), coalesce(sum(('x' || substr(%s, 1, 16))::bit(64)"
                             "::bigint), 0) FROM %s",
                             tb->hash[s], tb->q);
        PGresult *res = sql ? PQexec(conn_of(tj, (pd_job_side_t)s), sql) : NULL;
        free(sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
            return failed(tj, res, "checksumming", tb);
        rows[s] = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        snprintf(sums[s], sizeof sums[s], "%s", PQgetvalue(res, 0, 1));
        PQclear(res);
    }
    bool match = rows[0] == rows[1] && strcmp(sums[0], sums[1]) == 0;
    int64_t diff = rows[0] > rows[1] ? rows[0] - rows[1] : rows[1] - rows[0];
    *divergent = match ? 0 : diff > 0 ? diff : 1;
    ty->checked = rows[PD_JOB_OLD];
    json_object_set_new(out, "rows_old", json_integer(rows[PD_JOB_OLD]));
    json_object_set_new(out, "rows_new", json_integer(rows[PD_JOB_NEW]));
    json_object_set_new(out, "checksum_match", json_boolean(match));
    if (!match)
        pd_touched_mark_unknown(tj->r->job->jobs->touched, tj->r->job->rule.name, tb->name);
    progress(tj, rows[PD_JOB_OLD]);
    return 0;
}

/* Whether a --touched verify may check only the table's touched keys. */
static bool by_touched_keys(const tjob_t *tj, const table_t *tb)
{
    const pd_touched_set_t *set = tb->taken;
    return tj->r->job->opt.touched && tb->nkey > 0 && set != NULL &&
           pd_touched_set_status(set) == PD_TOUCHED_KEYS &&
           (pd_touched_set_count(set) == 0 || pd_touched_set_nkey(set) == tb->nkey);
}

/* Why a --touched verify checks the whole table. */
static const char *full_reason(const tjob_t *tj, const table_t *tb)
{
    if (!tj->r->job->opt.touched)
        return NULL;
    if (tb->nkey == 0)
        return "no key: the table is compared whole";
    if (tb->taken == NULL || pd_touched_set_status(tb->taken) == PD_TOUCHED_UNKNOWN)
        return "touched keys unknown (no full verify since pgdual started, or a write whose "
               "keys were not captured): full verify";
    if (pd_touched_set_status(tb->taken) == PD_TOUCHED_OVERFLOW)
        return "touched keys overflowed (more written since the last verify than are kept): "
               "full verify";
    return "touched keys do not match the table's key columns: full verify";
}

typedef struct {
    int64_t checked, divergent, missing, extra, different, repaired, unkeyed, in_flight;
} totals_t;

static int sync_sequences(tjob_t *tj, const table_t *tb, int *set);

static int verify_table(tjob_t *tj, const table_t *tb, json_t *tables, json_t *keys, totals_t *sum)
{
    bool touched = by_touched_keys(tj, tb);
    const char *mode = tb->nkey == 0 ? "checksum" : touched ? "touched" : "full";
    const char *note = touched ? NULL : full_reason(tj, tb);
    if (tb->nkey == 0 && note == NULL)
        note = "no key (no primary key, and the rule names none): whole-table checksums "
               "compared, counts only; rows cannot be listed or repaired";
    pd__job_set_phase(tj->r, "%s: %s%s%s", tb->name, mode, note ? "; " : "", note ? note : "");
    json_t *out = json_pack("{s:s, s:s}", "table", tb->name, "mode", mode);
    tally_t ty = {.keys = json_array()};
    repair_t rp = {.auth = authoritative(tj), .target = other(authoritative(tj))};
    int64_t unkeyed = 0;
    int rc;
    if (tb->nkey == 0)
        rc = verify_checksum(tj, tb, out, &ty, &unkeyed);
    else
        rc = touched ? verify_touched(tj, tb, &ty, &rp) : verify_full(tj, tb, &ty, &rp);
    if (rc == 0)
        rc = settle(tj, tb, &ty, &rp);
    /* The mirror replays rows with their key values, which leaves new's sequences where
       they were: a repairing verify sets them to old's (old authoritative). */
    int seqs = 0;
    if (rc == 0 && tj->r->job->opt.repair && authoritative(tj) == PD_JOB_OLD)
        rc = sync_sequences(tj, tb, &seqs);
    if (rc == 0) {
        int64_t div = ty.missing + ty.extra + ty.different + unkeyed;
        if (tj->r->job->opt.repair)
            json_object_set_new(out, "sequences_set", json_integer(seqs));
        json_t *key = json_array();
        for (unsigned i = 0; i < tb->nkey; i++)
            json_array_append_new(key, json_string(tb->key_name[i]));
        json_object_set_new(out, "key", key);
        json_t *counts =
            json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "rows_checked", (json_int_t)ty.checked,
                      "divergent", (json_int_t)div, "missing", (json_int_t)ty.missing, "extra",
                      (json_int_t)ty.extra, "different", (json_int_t)ty.different, "repaired",
                      (json_int_t)ty.repaired, "in_flight", (json_int_t)ty.in_flight);
        json_object_update(out, counts);
        json_decref(counts);
        if (note != NULL)
            json_object_set_new(out, "note", json_string(note));
        if (tb->one_side != NULL)
            json_object_set(out, "not_compared", tb->one_side);
        if (rp.failed > 0) {
            json_object_set_new(out, "repair_failed", json_integer(rp.failed));
            json_object_set_new(out, "repair_error", json_string(rp.error ? rp.error : ""));
        }
        if (json_array_size(ty.keys) > 0)
            json_object_set(keys, tb->name, ty.keys);
        json_array_append(tables, out);
        *sum = (totals_t){sum->checked + ty.checked,     sum->divergent + div,
                          sum->missing + ty.missing,     sum->extra + ty.extra,
                          sum->different + ty.different, sum->repaired + ty.repaired,
                          sum->unkeyed + unkeyed,        sum->in_flight + ty.in_flight};
    }
    for (size_t i = 0; i < ty.npending; i++)
        pd__free_strv(ty.pending[i].key, tb->nkey);
    free(ty.pending);
    json_decref(ty.keys);
    json_decref(out);
    repair_free(&rp);
    return rc;
}

static json_t *verify_result(const tjob_t *tj, const totals_t *t, json_t *tables, json_t *keys)
{
    const job_t *j = tj->r->job;
    char when[32];
    pd__iso_time(time(NULL), when, sizeof when);
    bool ok =
        t->divergent == 0 || (j->opt.repair && t->unkeyed == 0 && t->repaired >= t->divergent);
    return json_pack("{s:s, s:s, s:b, s:b, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:O, s:O, s:b}",
                     "time", when, "writes", pd_writes_name(j->rule.writes), "repair",
                     j->opt.repair, "touched", j->opt.touched, "rows_checked",
                     (json_int_t)t->checked, "divergent", (json_int_t)t->divergent, "missing",
                     (json_int_t)t->missing, "extra", (json_int_t)t->extra, "different",
                     (json_int_t)t->different, "repaired", (json_int_t)t->repaired, "in_flight",
                     (json_int_t)t->in_flight, "tables", tables, "keys", keys, "ok", ok);
}

/*
 * Takes every table's touched keys first (writes from then on are recorded afresh), then
 * verifies table by table; a verify that does not finish gives the keys back.
 */
static int verify(tjob_t *tj)
{
    const job_t *j = tj->r->job;
    int64_t total = 0;
    for (unsigned i = 0; i < tj->nt; i++) {
        table_t *tb = &tj->t[i];
        tb->taken = pd_touched_take(j->jobs->touched, j->rule.name, tb->name);
        total += by_touched_keys(tj, tb) ? (int64_t)pd_touched_set_count(tb->taken) : tb->estimate;
    }
    pd__job_set_total(tj->r, total);
    json_t *tables = json_array(), *keys = json_object();
    totals_t sum = {0};
    int rc = tables && keys ? 0 : pd__job_fail(tj->r, NULL, "out of memory");
    for (unsigned i = 0; rc == 0 && i < tj->nt; i++)
        rc = verify_table(tj, &tj->t[i], tables, keys, &sum);
    if (rc == 0) {
        pd__job_set_phase(tj->r, "done");
        tj->r->result = verify_result(tj, &sum, tables, keys);
        rc = tj->r->result ? pd__job_record_verify(tj->r)
                           : pd__job_fail(tj->r, NULL, "out of memory");
    }
    json_decref(tables);
    json_decref(keys);
    for (unsigned i = 0; rc != 0 && i < tj->nt; i++) {
        pd_touched_restore(j->jobs->touched, j->rule.name, tj->t[i].name, tj->t[i].taken);
        tj->t[i].taken = NULL;
    }
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * Backfill
 */

/* The range's bounds into settings pgdual.lo_N / pgdual.hi_N of old's session. */
static int set_bounds(tjob_t *tj, const table_t *tb, const range_t *rg)
{
    if (rg->lo == NULL && rg->hi == NULL)
        return 0;
    const char *params[2 * tb->nkey + 1];
    unsigned np = range_params(tb, rg, params);
    sqltext_t q;
    if (sql_begin(&q) == NULL)
        return pd__job_fail(tj->r, NULL, "out of memory");
    fputs("SELECT ", q.f);
    for (unsigned i = 0; i < np; i++)
        fprintf(q.f, "%sset_config('pgdual.%s_%u', $%u, false)", i ? ", " : "",
                rg->lo != NULL && i < tb->nkey ? "lo" : "hi", i % tb->nkey, i + 1);
    char *sql = sql_end(&q);
    PGresult *res = sql ? exec(tj->r->conn, sql, np, params) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return failed(tj, res, "setting the batch's bounds", tb);
    PQclear(res);
    return 0;
}

/* "(k1, k2) > (current_setting('pgdual.lo_0')::type, ...)" */
static void put_bound(FILE *f, const table_t *tb, const char *op, const char *name)
{
    fputs(" AND ", f);
    pd__put_keys(f, tb->key[PD_JOB_OLD], tb->nkey, "");
    fprintf(f, " %s (", op);
    for (unsigned i = 0; i < tb->nkey; i++)
        fprintf(f, "%scurrent_setting('pgdual.%s_%u')::%s", i ? ", " : "", name, i,
                tb->key_type[PD_JOB_OLD][i]);
    fputc(')', f);
}

/* COPY (SELECT mapped columns FROM t WHERE range ORDER BY key) TO STDOUT, on old */
static char *sql_copy_out(const table_t *tb, const range_t *rg)
{
    const proj_t *p = &tb->proj[PD_JOB_NEW];
    sqltext_t q;
    FILE *f = sql_begin(&q);
    if (f == NULL)
        return NULL;
    fputs("COPY (SELECT ", f);
    for (unsigned i = 0, k = 0; i < p->n; i++) /* named apart, as for put_key_texts */
        if (p->insert[i])
            fprintf(f, "%s%s AS pgdual_c%u", k ? ", " : "", p->expr[i], k), k++;
    fprintf(f, " FROM %s WHERE TRUE", tb->q);
    if (rg->lo != NULL)
        put_bound(f, tb, ">", "lo");
    if (rg->hi != NULL)
        put_bound(f, tb, "<=", "hi");
    if (tb->nkey > 0) {
        fputs(" ORDER BY ", f);
        put_list(f, tb->key[PD_JOB_OLD], tb->nkey, NULL, "");
    }
    fputs(") TO STDOUT", f);
    return sql_end(&q);
}

/* COPY t (columns) FROM STDIN, on new */
static char *sql_copy_in(const table_t *tb)
{
    const proj_t *p = &tb->proj[PD_JOB_NEW];
    sqltext_t q;
    if (sql_begin(&q) == NULL)
        return NULL;
    fprintf(q.f, "COPY %s (", tb->q);
    put_list(q.f, p->col, p->n, p->insert, "");
    fputs(") FROM STDIN", q.f);
    return sql_end(&q);
}

/* The first result of the statement in progress; the rest are read and dropped, so that
 * the connection is ready for the next statement. */
static PGresult *result_of(PGconn *conn)
{
    PGresult *first = PQgetResult(conn), *more;
    while ((more = PQgetResult(conn)) != NULL)
        PQclear(more);
    return first;
}

/* Streams old's COPY OUT into new's COPY IN (both started); *rows: rows new took. */
static int stream(tjob_t *tj, const table_t *tb, int64_t *rows)
{
    PGconn *old = tj->r->conn, *new = tj->r->conn_new;
    bool put_ok = true;
    char *data;
    int len;
    while ((len = PQgetCopyData(old, &data, 0)) > 0) {
        put_ok = put_ok && PQputCopyData(new, data, len) == 1;
        PQfreemem(data);
    }
    PGresult *out = result_of(old);
    bool out_ok = len == -1 && PQresultStatus(out) == PGRES_COMMAND_OK;
    PQputCopyEnd(new, out_ok && put_ok ? NULL : "pgdual: the copy from the old side failed");
    PGresult *in = result_of(new);
    if (!out_ok) {
        PQclear(in);
        return failed(tj, out, "reading rows from old", tb);
    }
    PQclear(out);
    if (PQresultStatus(in) != PGRES_COMMAND_OK)
        return failed(tj, in, "writing rows to new", tb);
    *rows = strtoll(PQcmdTuples(in), NULL, 10);
    PQclear(in);
    return 0;
}

/* Copies one range of old into new in one transaction on new. */
static int copy_range(tjob_t *tj, const table_t *tb, const range_t *rg, int64_t *rows)
{
    int rc = set_bounds(tj, tb, rg);
    char *out = rc == 0 ? sql_copy_out(tb, rg) : NULL, *in = rc == 0 ? sql_copy_in(tb) : NULL;
    if (rc == 0 && (out == NULL || in == NULL))
        rc = pd__job_fail(tj->r, NULL, "out of memory");
    if (rc == 0)
        rc = command(tj, PD_JOB_NEW, "BEGIN", "starting a batch", tb);
    PGresult *res = NULL;
    if (rc == 0 && PQresultStatus(res = PQexec(tj->r->conn_new, in)) != PGRES_COPY_IN)
        rc = failed(tj, res, "starting COPY FROM STDIN on new", tb);
    else if (rc == 0) {
        PQclear(res);
        if (PQresultStatus(res = PQexec(tj->r->conn, out)) != PGRES_COPY_OUT) {
            PQputCopyEnd(tj->r->conn_new, "pgdual: COPY on the old side did not start");
            PQclear(result_of(tj->r->conn_new));
            rc = failed(tj, res, "starting COPY TO STDOUT on old", tb);
        } else {
            PQclear(res);
            rc = stream(tj, tb, rows);
        }
    }
    free(out);
    free(in);
    if (rc == 0)
        return command(tj, PD_JOB_NEW, "COMMIT", "committing a batch", tb);
    PQclear(PQexec(tj->r->conn_new, "ROLLBACK"));
    return rc;
}

static int save_checkpoint(tjob_t *tj, unsigned table, char *const *lo, int64_t done,
                           unsigned batch)
{
    char key[256];
    pd__job_checkpoint_key(tj->r->job, key, sizeof key);
    json_t *names = json_array(), *last = lo ? json_array() : json_null();
    for (unsigned i = 0; i < tj->nt; i++)
        json_array_append_new(names, json_string(tj->t[i].name));
    for (unsigned i = 0; lo != NULL && i < tj->t[table].nkey; i++)
        json_array_append_new(last, lo[i] ? json_string(lo[i]) : json_null());
    json_t *ck = json_pack("{s:o, s:i, s:o, s:I, s:i}", "tables", names, "table_index", (int)table,
                           "last_key", last, "rows_done", (json_int_t)done, "batch", (int)batch);
    char *err = NULL;
    int rc = ck ? pd_state_set_checkpoint(tj->r->job->jobs->state, key, ck, &err) : -1;
    json_decref(ck);
    if (rc != 0)
        pd__job_fail(tj->r,
                     "Make the state file's directory writable, then run the backfill again: "
                     "it resumes from the last checkpoint written.",
                     "could not record the backfill checkpoint: %s", err ? err : "out of memory");
    free(err);
    return rc;
}

/* Where an interrupted backfill of the same tables stopped: true with the table, the
 * last key copied in it (or NULL) and the rows done. */
typedef struct {
    unsigned table;
    char **lo;
    int64_t done;
    unsigned batch;
} resume_t;

static bool resume_point(tjob_t *tj, resume_t *at)
{
    char key[256];
    pd__job_checkpoint_key(tj->r->job, key, sizeof key);
    json_t *ck = pd_state_checkpoint(tj->r->job->jobs->state, key);
    json_t *names = json_object_get(ck, "tables"), *last = json_object_get(ck, "last_key");
    json_int_t table = json_integer_value(json_object_get(ck, "table_index"));
    bool same = json_array_size(names) == tj->nt && table >= 0 && table <= (json_int_t)tj->nt;
    for (unsigned i = 0; same && i < tj->nt; i++)
        same = json_is_string(json_array_get(names, i)) &&
               strcmp(json_string_value(json_array_get(names, i)), tj->t[i].name) == 0;
    unsigned nk = same && table < (json_int_t)tj->nt ? tj->t[table].nkey : 0;
    same = same && (json_is_null(last) || (nk > 0 && json_array_size(last) == nk));
    *at = (resume_t){.table = (unsigned)table,
                     .done = json_integer_value(json_object_get(ck, "rows_done")),
                     .batch = (unsigned)json_integer_value(json_object_get(ck, "batch"))};
    if (same && json_is_array(last)) {
        const char *vals[nk + 1];
        for (unsigned i = 0; i < nk; i++)
            vals[i] = json_string_value(json_array_get(last, i));
        same = (at->lo = key_copy(vals, nk)) != NULL;
    }
    json_decref(ck);
    return same;
}

/*
 * A batch committed on new whose checkpoint was not written (pgdual stopped in between)
 * is found at the resume: new then holds rows past the checkpoint's key, at most a batch
 * of them, and the copy goes on after them. More than that is something else writing to
 * new, which is refused.
 */
static int skip_committed(tjob_t *tj, const table_t *tb, resume_t *at, unsigned batch)
{
    range_t rg = {.lo = at->lo};
    char *count = "count(*) OVER ()";
    char *sql = sql_rows(tb, PD_JOB_NEW, &rg, &count, 1, true, " LIMIT 1");
    const char *params[tb->nkey + 1];
    unsigned np = range_params(tb, &rg, params);
    PGresult *res = sql ? exec(tj->r->conn_new, sql, np, params) : NULL;
    free(sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return failed(tj, res, "looking for rows copied after the checkpoint", tb);
    int64_t past = PQntuples(res) ? strtoll(PQgetvalue(res, 0, (int)tb->nkey), NULL, 10) : 0;
    unsigned most = batch > at->batch ? batch : at->batch;
    if (tb->nkey > 0 && past > most) {
        PQclear(res);
        return pd__job_fail(tj->r,
                            "A backfill copies into tables nothing else writes: keep the rule's "
                            "writes at old while it runs. Run pgdualctl verify with --repair to "
                            "set new right instead, or empty the table on new to copy it again.",
                            "table %s on the new side has %lld rows past the backfill's "
                            "checkpoint, more than one batch: something else writes to it",
                            tb->name, (long long)past);
    }
    if (past > 0) {
        const char *k[tb->nkey + 1];
        row_key(res, 0, tb->nkey, k);
        pd__free_strv(at->lo, tb->nkey);
        at->lo = tb->nkey ? key_copy(k, tb->nkey) : NULL;
        at->done += past;
        pd_log_info(tj->r->job->tag, "%s: %lld rows were copied after the last checkpoint",
                    tb->name, (long long)past);
    }
    PQclear(res);
    if (tb->nkey == 0 && past > 0)
        at->table++; /* a table without a key is copied in one transaction: it is done */
    return 0;
}

/* A fresh backfill copies into empty tables only. */
static int check_empty(tjob_t *tj)
{
    char *names = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&names, &len);
    unsigned full = 0;
    int rc = f ? 0 : pd__job_fail(tj->r, NULL, "out of memory");
    for (unsigned i = 0; rc == 0 && i < tj->nt; i++) {
        char *sql = pd__strf("SELECT EXISTS (SELECT 1 FROM %s)", tj->t[i].q);
        PGresult *res = sql ? PQexec(tj->r->conn_new, sql) : NULL;
        free(sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
            rc = failed(tj, res, "checking that the table is empty on new", &tj->t[i]);
            break;
        }
        if (strcmp(PQgetvalue(res, 0, 0), "t") == 0 && full++ < 5)
            fprintf(f, "%s%s", full > 1 ? ", " : "", tj->t[i].name);
        PQclear(res);
    }
    if (f != NULL && fclose(f) != 0 && rc == 0)
        rc = pd__job_fail(tj->r, NULL, "out of memory");
    if (rc == 0 && full > 0) {
        char hint[640];
        snprintf(hint, sizeof hint,
                 "A backfill copies into empty tables. Empty them on the new side (TRUNCATE) to "
                 "copy them again; or, when new was seeded another way (pg_dump, logical "
                 "replication), skip the backfill and run pgdualctl verify %s --repair.",
                 tj->r->job->rule.name);
        rc = pd__job_fail(tj->r, hint,
                          "backfill of rule \"%s\" refused: %u table%s on the new side already "
                          "%s rows: %s%s",
                          tj->r->job->rule.name, full, full > 1 ? "s" : "",
                          full > 1 ? "have" : "has", names, full > 5 ? ", ..." : "");
    }
    free(names);
    return rc;
}

/* Copies one table from `lo` on, batch by batch, checkpointing after each. */
static int copy_table(tjob_t *tj, unsigned index, char **lo, int64_t *rows)
{
    const table_t *tb = &tj->t[index];
    const pd_job_options_t *opt = &tj->r->job->opt;
    unsigned batch = opt->batch ? opt->batch : PD_JOB_DEFAULT_BATCH;
    char **hi = NULL;
    int rc = 0;
    do {
        if (pd__job_cancelled(tj->r)) {
            rc = 1;
            break;
        }
        if (tb->nkey > 0 &&
            (rc = range_nth(tj, tb, PD_JOB_OLD, &(range_t){.lo = lo}, batch - 1, &hi)) != 0)
            break;
        int64_t n = 0;
        if ((rc = copy_range(tj, tb, &(range_t){.lo = lo, .hi = hi}, &n)) != 0)
            break;
        *rows += n;
        progress(tj, n);
        pd__free_strv(lo, tb->nkey);
        lo = hi;
        if (hi != NULL && (rc = save_checkpoint(tj, index, hi, tj->done, batch)) == 0 &&
            !pd__job_throttle(tj->r, opt->throttle_ms))
            rc = 1;
    } while (rc == 0 && hi != NULL);
    pd__free_strv(lo, tb->nkey);
    return rc;
}

static const char SEQ_OLD_SQL[] =
    "SELECT a.attname, pg_catalog.pg_sequence_last_value(s::regclass)::text "
    "FROM pg_catalog.pg_attribute a, pg_catalog.pg_get_serial_sequence($1, a.attname) s "
    "WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped "
    "AND s IS NOT NULL ORDER BY a.attnum";

static const char SEQ_NEW_SQL[] = "SELECT pg_catalog.setval(s::regclass, $3::bigint) "
                                  "FROM pg_catalog.pg_get_serial_sequence($1, $2) s "
                                  "WHERE s IS NOT NULL";

/* Sets each sequence owned by a column of the table on new to old's value; *set: how
 * many. A column renamed by the rule has its sequence on new under the new name. */
static int sync_sequences(tjob_t *tj, const table_t *tb, int *set)
{
    const job_rule_t *rule = &tj->r->job->rule;
    const char *params[3] = {tb->q, NULL, NULL};
    PGresult *old = exec(tj->r->conn, SEQ_OLD_SQL, 1, params);
    if (PQresultStatus(old) != PGRES_TUPLES_OK)
        return failed(tj, old, "reading the sequences", tb);
    int rc = 0;
    *set = 0;
    for (int i = 0; rc == 0 && i < PQntuples(old); i++) {
        if (PQgetisnull(old, i, 1))
            continue; /* never used on old */
        params[1] = PQgetvalue(old, i, 0);
        for (unsigned m = 0; m < rule->ncols; m++)
            if (strcmp(rule->cols[m].old, params[1]) == 0 && rule->cols[m].up == NULL)
                params[1] = rule->cols[m].new;
        params[2] = PQgetvalue(old, i, 1);
        PGresult *res = exec(tj->r->conn_new, SEQ_NEW_SQL, 3, params);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            rc = failed(tj, res, "setting a sequence on new", tb);
            break;
        }
        *set += PQntuples(res);
        PQclear(res);
    }
    PQclear(old);
    return rc;
}

static int backfill(tjob_t *tj)
{
    job_t *j = tj->r->job;
    unsigned batch = j->opt.batch ? j->opt.batch : PD_JOB_DEFAULT_BATCH;
    int64_t total = 0;
    for (unsigned i = 0; i < tj->nt; i++)
        total += tj->t[i].estimate;
    pd__job_set_total(tj->r, total);
    resume_t at;
    bool resuming = resume_point(tj, &at);
    int rc = 0;
    if (!resuming) {
        at = (resume_t){0};
        pd__job_set_phase(tj->r, "checking that the tables on new are empty");
        rc = check_empty(tj);
    } else if (at.table < tj->nt) {
        pd_log_info(j->tag, "resuming after %lld rows, from the checkpoint", (long long)at.done);
        rc = skip_committed(tj, &tj->t[at.table], &at, batch);
    }
    tj->done = at.done;
    pthread_mutex_lock(&j->jobs->lock);
    j->rows_done = j->resumed_from = at.done;
    pthread_mutex_unlock(&j->jobs->lock);
    json_t *tables = json_array();
    int64_t copied = 0;
    for (unsigned i = 0; rc == 0 && i < tj->nt; i++) {
        const table_t *tb = &tj->t[i];
        int64_t rows = 0;
        int seqs = 0;
        if (i >= at.table) {
            pd__job_set_phase(tj->r, "%s: copying", tb->name);
            char **lo = i == at.table ? at.lo : NULL;
            at.lo = i == at.table ? NULL : at.lo;
            rc = copy_table(tj, i, lo, &rows);
            if (rc == 0)
                rc = save_checkpoint(tj, i + 1, NULL, tj->done, batch);
        }
        copied += rows;
        if (rc == 0)
            rc = sync_sequences(tj, tb, &seqs);
        json_array_append_new(tables, json_pack("{s:s, s:I, s:i}", "table", tb->name, "rows",
                                                (json_int_t)rows, "sequences", seqs));
    }
    pd__free_strv(at.lo, at.table < tj->nt ? tj->t[at.table].nkey : 0);
    if (rc == 0) {
        pd__job_clear_checkpoint(j);
        pd__job_set_phase(tj->r, "done");
        tj->r->result = json_pack("{s:I, s:I, s:I, s:O}", "rows_done", (json_int_t)tj->done,
                                  "rows_copied", (json_int_t)copied, "resumed_from",
                                  (json_int_t)j->resumed_from, "tables", tables);
    }
    json_decref(tables);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * The job
 */

int pd__tables_run(run_t *r)
{
    tjob_t tj = {.r = r};
    int rc = pd__job_connect(r, PD_JOB_OLD);
    if (rc == 0)
        rc = pd__job_connect(r, PD_JOB_NEW);
    if (rc == 0)
        rc = command(&tj, PD_JOB_OLD, SESSION_SQL, "setting up the session on old", NULL);
    if (rc == 0)
        rc = command(&tj, PD_JOB_NEW, SESSION_SQL, "setting up the session on new", NULL);
    if (rc == 0)
        rc = load_tables(&tj);
    if (rc == 0)
        rc = r->job->kind == JOB_BACKFILL ? backfill(&tj) : verify(&tj);
    for (unsigned i = 0; i < tj.nt; i++)
        table_free(&tj.t[i]);
    free(tj.t);
    return rc;
}
