/*
 * seqsync.c — sequences kept in step while writes are mirrored (see seqsync.h).
 *
 * One entry per database, made at its first round. A round runs on a libuv worker thread
 * with the entry's two connections, which only that thread touches while the round is in
 * flight (busy); the loop thread reads the conninfos and flags and starts rounds.
 */
#include "proxy/seqsync.h"

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "proxy/log.h"
#include "proxy/mirror.h"
#include "proxy/server.h"

typedef struct pd_seqdb {
    struct pd_seqdb *next;
    struct pd_seqsync *owner;
    uv_work_t work;
    char *name;
    char *old_ci, *new_ci; /* the conninfos the connections were opened with */
    PGconn *old, *new;     /* the worker's while busy */
    bool busy;
    bool new_auth; /* this round's direction: new's sequences are the truth */
    int set;       /* the round's outcome: sequences set, or -1 */
    char err[256];
    /* on the loop */
    uint64_t total_set, rounds, last_ms;
    char last_error[256];
} pd_seqdb_t;

struct pd_seqsync {
    pd_server_t *srv;
    uv_timer_t timer;
    pd_seqdb_t *dbs;
    unsigned busy;
    bool stopping, timer_closed;
};

int pd_seqsync_round(PGconn *from, PGconn *to, char *err, size_t errlen)
{
    static const char list_sql[] =
        "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), "
        "coalesce(last_value, 0) FROM pg_catalog.pg_sequences WHERE increment_by > 0 "
        "ORDER BY 1";
    PGresult *src = PQexec(from, list_sql), *dst = PQexec(to, list_sql);
    int set = -1;
    if (PQresultStatus(src) != PGRES_TUPLES_OK || PQresultStatus(dst) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "could not list sequences: %s",
                 PQresultErrorMessage(PQresultStatus(src) != PGRES_TUPLES_OK ? src : dst));
        goto out;
    }
    /* Both lists are ordered by name: walk them together. */
    set = 0;
    int j = 0, nd = PQntuples(dst);
    for (int i = 0; i < PQntuples(src); i++) {
        const char *name = PQgetvalue(src, i, 0);
        while (j < nd && strcmp(PQgetvalue(dst, j, 0), name) < 0)
            j++;
        if (j == nd || strcmp(PQgetvalue(dst, j, 0), name) != 0)
            continue; /* not on the other side: nothing to collide with */
        long long want = strtoll(PQgetvalue(src, i, 1), NULL, 10);
        if (want <= strtoll(PQgetvalue(dst, j, 1), NULL, 10))
            continue;
        const char *params[2] = {name, PQgetvalue(src, i, 1)};
        PGresult *res = PQexecParams(to, "SELECT pg_catalog.setval($1::regclass, $2::bigint)", 2,
                                     NULL, params, NULL, NULL, 0);
        bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
        if (!ok)
            snprintf(err, errlen, "could not set sequence %s: %s", name, PQresultErrorMessage(res));
        PQclear(res);
        if (!ok) {
            set = -1;
            break;
        }
        set++;
    }
out:
    err[strcspn(err, "\n")] = '\0';
    PQclear(src);
    PQclear(dst);
    return set;
}

/* A connection that gives up after 5 s: a round must not hold a worker thread long. */
static PGconn *connect_side(const char *conninfo, char *err, size_t errlen)
{
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {conninfo, "5", "pgdual sequences", NULL};
    PGconn *c = PQconnectdbParams(keys, vals, 1);
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(err, errlen, "could not connect to set sequences: %s", PQerrorMessage(c));
        err[strcspn(err, "\n")] = '\0';
        PQfinish(c);
        return NULL;
    }
    return c;
}

int pd_seqsync_once(const char *from, const char *to, char *err, size_t errlen)
{
    PGconn *f = connect_side(from, err, errlen);
    PGconn *t = f != NULL ? connect_side(to, err, errlen) : NULL;
    int set = t != NULL ? pd_seqsync_round(f, t, err, errlen) : -1;
    PQfinish(f);
    PQfinish(t);
    return set;
}

static void round_work(uv_work_t *w)
{
    pd_seqdb_t *e = w->data;
    e->err[0] = '\0';
    e->set = -1;
    for (int side = 0; side < 2; side++) {
        PGconn **c = side == 0 ? &e->old : &e->new;
        if (*c != NULL && PQstatus(*c) != CONNECTION_OK) {
            PQfinish(*c);
            *c = NULL;
        }
        if (*c == NULL &&
            (*c = connect_side(side == 0 ? e->old_ci : e->new_ci, e->err, sizeof e->err)) == NULL)
            return;
    }
    e->set = e->new_auth ? pd_seqsync_round(e->new, e->old, e->err, sizeof e->err)
                         : pd_seqsync_round(e->old, e->new, e->err, sizeof e->err);
}

static void close_conns(pd_seqdb_t *e)
{
    PQfinish(e->old);
    PQfinish(e->new);
    e->old = e->new = NULL;
}

static void entry_free(pd_seqdb_t *e)
{
    close_conns(e);
    free(e->name);
    free(e->old_ci);
    free(e->new_ci);
    free(e);
}

static void owner_free_if_done(struct pd_seqsync *ss)
{
    if (!ss->stopping || !ss->timer_closed || ss->busy > 0)
        return;
    pd_seqdb_t *next;
    for (pd_seqdb_t *e = ss->dbs; e != NULL; e = next) {
        next = e->next;
        entry_free(e);
    }
    free(ss);
}

static void round_done(uv_work_t *w, int status)
{
    pd_seqdb_t *e = w->data;
    struct pd_seqsync *ss = e->owner;
    e->busy = false;
    ss->busy--;
    if (ss->stopping) {
        owner_free_if_done(ss);
        return;
    }
    e->rounds++;
    e->last_ms = uv_now(ss->srv->loop);
    if (status == 0 && e->set >= 0) {
        e->total_set += (uint64_t)e->set;
        if (e->last_error[0] != '\0')
            pd_log_info(NULL, "sequences of database \"%s\" are kept in step again", e->name);
        e->last_error[0] = '\0';
        return;
    }
    const char *why = status != 0 ? "the round could not run" : e->err;
    if (strcmp(e->last_error, why) != 0)
        pd_log_warning(NULL,
                       "sequences of database \"%s\" not kept in step: %s; retrying every "
                       "second (switchover and rollback set them again while paused)",
                       e->name, why);
    snprintf(e->last_error, sizeof e->last_error, "%s", why);
    close_conns(e); /* reconnect next round */
}

/* The database's entry, made at its first round; NULL when out of memory. */
static pd_seqdb_t *entry_for(struct pd_seqsync *ss, const char *name)
{
    pd_seqdb_t *e = ss->dbs;
    while (e != NULL && strcmp(e->name, name) != 0)
        e = e->next;
    if (e != NULL)
        return e;
    if ((e = calloc(1, sizeof *e)) == NULL || (e->name = strdup(name)) == NULL) {
        free(e);
        return NULL;
    }
    e->owner = ss;
    e->work.data = e;
    e->next = ss->dbs;
    ss->dbs = e;
    return e;
}

/* A reload may have moved either side: the next round opens new connections. */
static int follow_conninfo(pd_seqdb_t *e, const pd_database_cfg_t *db)
{
    if (e->old_ci != NULL && strcmp(e->old_ci, db->old) == 0 && strcmp(e->new_ci, db->new) == 0)
        return 0;
    close_conns(e);
    free(e->old_ci);
    free(e->new_ci);
    e->old_ci = strdup(db->old);
    e->new_ci = strdup(db->new);
    return e->old_ci != NULL && e->new_ci != NULL ? 0 : -1;
}

static void on_tick(uv_timer_t *t)
{
    struct pd_seqsync *ss = t->data;
    pd_server_t *srv = ss->srv;
    for (unsigned i = 0; i < srv->cfg->database_count; i++) {
        const pd_database_cfg_t *db = &srv->cfg->databases[i];
        if (db->new == NULL || !pd_mirror_db_active(srv, db->name))
            continue;
        pd_seqdb_t *e = entry_for(ss, db->name);
        if (e != NULL && e->busy)
            continue;
        if (e == NULL || follow_conninfo(e, db) != 0) {
            pd_log_warning(NULL, "sequences of database \"%s\" not kept in step: out of memory",
                           db->name);
            continue;
        }
        e->new_auth = pd_server_new_authoritative(srv, db->name);
        if (uv_queue_work(srv->loop, &e->work, round_work, round_done) == 0) {
            e->busy = true;
            ss->busy++;
        }
    }
}

int pd_seqsync_start(pd_server_t *srv)
{
    struct pd_seqsync *ss = calloc(1, sizeof *ss);
    if (ss == NULL)
        return -1;
    ss->srv = srv;
    uv_timer_init(srv->loop, &ss->timer);
    ss->timer.data = ss;
    uv_timer_start(&ss->timer, on_tick, PD_SEQSYNC_INTERVAL_MS, PD_SEQSYNC_INTERVAL_MS);
    srv->seqsync = ss;
    return 0;
}

static void timer_closed(uv_handle_t *h)
{
    struct pd_seqsync *ss = h->data;
    ss->timer_closed = true;
    owner_free_if_done(ss);
}

void pd_seqsync_stop(pd_server_t *srv)
{
    struct pd_seqsync *ss = srv->seqsync;
    if (ss == NULL)
        return;
    srv->seqsync = NULL;
    ss->stopping = true;
    uv_close((uv_handle_t *)&ss->timer, timer_closed);
}

json_t *pd_seqsync_status(const pd_server_t *srv)
{
    json_t *r = json_object();
    if (srv->seqsync == NULL)
        return r;
    uint64_t now = uv_now(srv->loop);
    for (const pd_seqdb_t *e = srv->seqsync->dbs; e != NULL; e = e->next) {
        json_t *o = json_pack("{s:I, s:I}", "sequences_set", (json_int_t)e->total_set, "rounds",
                              (json_int_t)e->rounds);
        if (e->rounds > 0)
            json_object_set_new(o, "last_round_ms_ago",
                                json_integer((json_int_t)(now - e->last_ms)));
        if (e->last_error[0] != '\0')
            json_object_set_new(o, "error", json_string(e->last_error));
        json_object_set_new(r, e->name, o);
    }
    return r;
}

uint64_t pd_seqsync_total(const pd_server_t *srv)
{
    uint64_t n = 0;
    if (srv->seqsync != NULL)
        for (const pd_seqdb_t *e = srv->seqsync->dbs; e != NULL; e = e->next)
            n += e->total_set;
    return n;
}
