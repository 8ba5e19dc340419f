/*
 * jobs_internal.h — what the kinds of operator jobs share inside admin/: the registry's
 * structures and the helpers a job uses on its thread (errors, progress, connections,
 * quoting, pauses, recording a verify). jobs.c holds the registry and the jobs of
 * `columns` rules; jobs_tables.c the jobs of `tables` rules. Only admin/jobs*.c include
 * this.
 */
#ifndef PD_ADMIN_JOBS_INTERNAL_H
#define PD_ADMIN_JOBS_INTERNAL_H

#include <jansson.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <uv.h>

#include "admin/jobs.h"
#include "rules/touched.h"

#define PD_JOB_KEYS_LISTED          100     /* divergent keys a verify result lists */
#define PD_JOB_DEFAULT_BATCH        1000    /* backfill rows per batch */
#define PD_JOB_DEFAULT_VERIFY_BATCH 5000    /* verify rows per chunk (reads only) */
#define PD_JOB_EXACT_COUNT_BELOW    1000000 /* pg_class estimate under this: count(*) */

typedef enum { JOB_BACKFILL, JOB_VERIFY } job_kind_t;
typedef enum { JOB_RUNNING, JOB_DONE, JOB_FAILED, JOB_CANCELLED } job_state_t;
typedef enum { PD_JOB_OLD, PD_JOB_NEW } pd_job_side_t;

/* What a job needs of its rule, copied at start: the config may be reloaded meanwhile. */
typedef struct {
    char *name;
    char *database;
    pd_rule_kind_t kind;
    char *conninfo[2]; /* the database's old and new sides (new: NULL for columns rules) */
    char *table;       /* columns rules */
    char **tables;     /* tables rules: the rule's `tables`; none = every table */
    unsigned ntables;
    char **key;
    unsigned nkey;
    pd_column_map_t *cols;
    unsigned ncols;
    pd_writes_t writes;
} job_rule_t;

typedef struct job {
    pd_jobs_t *jobs;
    struct job *next; /* registry list, newest first */
    int id;
    job_kind_t kind;
    job_rule_t rule; /* owned; read only after start */
    pd_job_options_t opt;
    char tag[160]; /* log prefix: "[job 3 backfill users-email]" */
    uv_thread_t thread;
    atomic_bool cancel;
    /* The fields below are under jobs->lock. */
    PGcancel *pgcancel[2]; /* per side; owned by the thread; set while its connection is up */
    job_state_t state;
    int64_t rows_done, rows_total, resumed_from;
    uint64_t started_ns, finished_ns; /* uv_hrtime, for the rate */
    time_t started_at, finished_at;
    char *phase;    /* owned; what the job is at ("public.orders: full"), or NULL */
    char *error;    /* owned; failed jobs */
    char *hint;     /* owned; or NULL */
    json_t *result; /* owned; done jobs (and failed verifies that got that far) */
} job_t;

struct pd_jobs {
    pd_state_t *state;
    pd_touched_t *touched; /* owned */
    pthread_mutex_t lock;
    job_t *list; /* newest first */
    int next_id;
};

/* A job's working set on its thread: nothing here is shared. */
typedef struct {
    job_t *job;
    PGconn *conn;     /* the old side */
    PGconn *conn_new; /* the new side (tables rules) */
    char *error, *hint;
    json_t *result;
    /* The columns jobs' own (jobs.c). */
    char *table;     /* quoted "schema"."table" */
    char **key;      /* quoted key columns */
    char **old_cols; /* quoted */
    char **new_cols; /* quoted */
    char **up;       /* "(expr)" or a quoted old column */
    char **down;     /* "(expr)" or a quoted new column */
    char **lo;       /* last key done (text values), or NULL before the first batch */
} run_t;

/* printf into a new string (NULL when out of memory). */
char *pd__strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void pd__free_strv(char **v, unsigned n);
/* "2026-11-21T06:40:01Z" */
void pd__iso_time(time_t t, char *buf, size_t size);
/* A quoted identifier, malloc'd (NULL when out of memory). */
char *pd__quote_ident(PGconn *conn, const char *name);

bool pd__job_cancelled(const run_t *r);

/* Sets the job's error (the first one wins) with a hint (or NULL); returns -1. */
int pd__job_fail(run_t *r, const char *hint, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/*
 * A failed statement: the job's error carries PostgreSQL's message (it may quote values,
 * which is fine for the admin socket); the log gets only the SQLSTATE. Returns -1, or 1
 * when the job was cancelled meanwhile (pd_jobs_free cancels the statement in flight).
 */
int pd__job_sql_fail(run_t *r, PGresult *res, const char *what);

void pd__job_set_progress(run_t *r, int64_t done);
void pd__job_set_total(run_t *r, int64_t total);
/* What the job is at, shown by `jobs` and pgdualctl's progress ("public.orders: full"). */
void pd__job_set_phase(run_t *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Connects to the rule's database on a side (r->conn or r->conn_new); 0 or -1 (failed). */
int pd__job_connect(run_t *r, pd_job_side_t side);

/* Sleeps ms in slices; false when the job was cancelled meanwhile. */
bool pd__job_throttle(run_t *r, unsigned ms);

/* One bigint from a query with at most one text parameter; *rc as for sql_fail. */
int64_t pd__job_query_int(run_t *r, PGconn *conn, const char *sql, const char *param,
                          const char *what, int *rc);

/* The rows of a quoted table: the planner's estimate, or count(*) when it is small or was
 * never analyzed. 0, or -1/1 as for sql_fail. */
int pd__job_count_rows(run_t *r, PGconn *conn, const char *table, int64_t *rows);

/* SQL text (built with open_memstream): "(k1, k2)", each key followed by suffix;
 * "($first, $first+1, ...)" (n of them); the key range "TRUE [AND (k) > ($1, ..)]
 * [AND (k) <= ($n+1, ..)]"; and the end of a memstream: its text, or NULL when writing
 * failed. */
void pd__put_keys(FILE *f, char *const *key, unsigned n, const char *suffix);
void pd__put_params(FILE *f, unsigned n, unsigned first);
void pd__put_range(FILE *f, char *const *key, unsigned n, bool lo, bool hi);
char *pd__sql_done(FILE *f, char **buf);

/* "backfill/RULE": where a backfill keeps its checkpoint in the state; clearing it once the
 * backfill is done (a failure to is logged: the next run finds nothing left to do). */
void pd__job_checkpoint_key(const job_t *j, char *buf, size_t size);
void pd__job_clear_checkpoint(const job_t *j);

/* Records r->result as the rule's last verify; 0 or -1 (failed). */
int pd__job_record_verify(run_t *r);

/* The jobs of tables rules (jobs_tables.c): connects, runs, fills r->result. 0 done,
 * 1 cancelled, -1 failed (r->error says why). */
int pd__tables_run(run_t *r);

#endif /* PD_ADMIN_JOBS_INTERNAL_H */
