/*
 * fleet.c — the fleet member: its thread, heartbeats, notifications, and switchover across
 * instances (fleet.h says how the protocol goes).
 *
 * Two sides talk through queues: the thread (blocking libpq on the control connection,
 * poll() on its socket and on a pipe the loop writes to) and the event loop (sessions,
 * pauses, the admin socket). The loop hands the thread requests; the thread hands the loop
 * events through a uv_async. Nothing on the loop waits for the control database except
 * changes of the state itself (rules/state.h).
 */
#include "admin/fleet.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "admin/cutover.h"
#include "proxy/log.h"
#include "proxy/mirror.h"
#include "proxy/seqsync.h"
#include "proxy/session.h"
#include "rules/state.h"

#define ACK_POLL_MS    100  /* the coordinator looks at the acknowledgements this often */
#define CONFIRM_MS     3000 /* after the flip: how long the coordinator waits for `flipped` */
#define CHECK_GRACE_MS 2000 /* a participant asks the control table this long after deadline */
#define RECONNECT_MS   1000
#define TEXT_MAX       512

typedef enum {
    REQ_BEGIN,
    REQ_ACK,
    REQ_FLIP,
    REQ_ABORT,
    REQ_CHECK,
    REQ_FORGET,
    REQ_WATCH
} req_kind_t;

typedef struct req {
    struct req *next;
    req_kind_t kind;
    int64_t op;
    bool ok, force;
    uint64_t timeout_ms;
    char database[64], operation[16], phase[16], who[96];
    char text[TEXT_MAX]; /* ack detail, abort reason, instance to forget */
    json_t *flip;        /* REQ_FLIP: {rules: [names], writes, reads, event fields} */
} req_t;

typedef enum { EV_STATE, EV_OP, EV_BEGUN, EV_ACKS, EV_FLIPPED, EV_DONE } ev_kind_t;

typedef struct ev {
    struct ev *next;
    ev_kind_t kind;
    int64_t op;
    bool ok, participant, force;
    int64_t deadline_in_ms;
    int acked, expected;
    char database[64], operation[16], phase[16];
    char text[TEXT_MAX]; /* error, nack detail, missing instances */
    json_t *participants;
} ev_t;

/* The loop's side of an operation this instance coordinates. */
typedef struct {
    bool active;
    int64_t op;
    pd_admin_req_t *req;
    bool rollback;
    char database[64], who[96];
    uint64_t started_ms, timeout_ms, drained_ms;
    json_t *checks, *participants, *rules;
    enum { C_BEGIN, C_WAIT, C_SEQ, C_FLIP, C_CONFIRM } step;
    uv_timer_t timer; /* deadline, then the confirmation wait */
    uv_work_t work;   /* sequences */
    char *from, *to;
    int seq_set;
    char seq_error[512];
    bool sequencing;
    json_t *reply;          /* C_CONFIRM: the reply, sent when every participant confirmed */
    char missing[TEXT_MAX]; /* the instances whose acknowledgement is not in yet */
    pd_watch_opts_t watch;  /* a switchover's --watch */
    pd_watch_t *auto_for;   /* the watch whose automatic rollback this is, or NULL */
} coord_t;

/* The loop's side of an operation this instance takes part in. */
typedef struct {
    bool active, acked;
    bool force, rollback; /* the operation's --force; a rollback (fewer local checks) */
    bool participant;     /* false: joined after it began; holds, never acknowledges */
    int64_t op;
    char database[64], operation[16];
    uint64_t deadline_ms; /* loop time */
    uv_timer_t tick;      /* drain, then the deadline check */
    bool held_unknown;    /* past the deadline and the control table could not say */
} part_t;

struct pd_fleet {
    pd_server_t *srv;
    char *conninfo;
    char id[160], host[128];
    pthread_t thread;
    bool thread_started;
    int wake[2];
    uv_async_t async;
    uv_timer_t beat; /* loop: snapshots for the heartbeat */

    pthread_mutex_t lock; /* everything below */
    bool stopping;
    req_t *reqs, **reqs_tail;
    ev_t *evs, **evs_tail;
    bool connected;
    char error[TEXT_MAX];
    uint64_t lost_since_ms; /* monotonic; 0 while connected */
    json_t *instances;      /* the last listing, heartbeat ages included */
    int sessions;
    long long queued;
    int64_t coord_op; /* the thread polls this operation's acknowledgements */
    char coord_phase[16];

    coord_t coord;
    part_t part;
    pd_admin_req_t *forget_req; /* one `fleet forget` at a time */
    bool free_pending;          /* closed while the sequence step ran: seq_done frees */
    int open_handles;           /* closing: fleet_closed frees f after the last */
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---------------------------------------------------------------------------------------
 * Queues
 */

static void post_req(pd_fleet_t *f, req_t *r)
{
    pthread_mutex_lock(&f->lock);
    *f->reqs_tail = r;
    f->reqs_tail = &r->next;
    pthread_mutex_unlock(&f->lock);
    char b = 1;
    ssize_t n = write(f->wake[1], &b, 1);
    (void)n; /* a full pipe already wakes the thread */
}

static req_t *req_new(req_kind_t kind, int64_t op)
{
    req_t *r = calloc(1, sizeof *r);
    if (r != NULL) {
        r->kind = kind;
        r->op = op;
    }
    return r;
}

static void post_ev(pd_fleet_t *f, ev_t *e)
{
    pthread_mutex_lock(&f->lock);
    *f->evs_tail = e;
    f->evs_tail = &e->next;
    pthread_mutex_unlock(&f->lock);
    uv_async_send(&f->async);
}

static ev_t *ev_new(ev_kind_t kind, int64_t op)
{
    ev_t *e = calloc(1, sizeof *e);
    if (e != NULL) {
        e->kind = kind;
        e->op = op;
    }
    return e;
}

/* ---------------------------------------------------------------------------------------
 * The thread
 */

typedef struct {
    pd_fleet_t *f;
    PGconn *conn;
    uint64_t next_beat, next_connect, next_ack_poll;
} member_t;

static void set_error(pd_fleet_t *f, const char *what, PGconn *c, PGresult *res)
{
    const char *m = res != NULL ? PQresultErrorMessage(res) : "";
    if ((m == NULL || *m == '\0') && c != NULL)
        m = PQerrorMessage(c);
    pthread_mutex_lock(&f->lock);
    snprintf(f->error, sizeof f->error, "%s: %s", what, m && *m ? m : "no connection");
    f->error[strcspn(f->error, "\n")] = '\0';
    pthread_mutex_unlock(&f->lock);
}

static void lose(member_t *m, const char *what, PGresult *res)
{
    pd_fleet_t *f = m->f;
    set_error(f, what, m->conn, res);
    if (m->conn != NULL && PQstatus(m->conn) != CONNECTION_OK) {
        PQfinish(m->conn);
        m->conn = NULL;
        pthread_mutex_lock(&f->lock);
        bool was = f->connected;
        f->connected = false;
        f->lost_since_ms = mono_ms();
        pthread_mutex_unlock(&f->lock);
        if (was)
            pd_log_warning(NULL,
                           "fleet: lost the control connection (%s); flags stay as they "
                           "are and cannot change until it is back",
                           f->error);
        m->next_connect = mono_ms() + RECONNECT_MS;
    }
}

/* Runs a query; NULL (logged, connection dropped when broken) unless it succeeded. */
static PGresult *query(member_t *m, const char *what, const char *sql, int n,
                       const char *const *params)
{
    if (m->conn == NULL)
        return NULL;
    PGresult *res = PQexecParams(m->conn, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType s = PQresultStatus(res);
    if (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK)
        return res;
    lose(m, what, res);
    PQclear(res);
    return NULL;
}

static void state_changed(member_t *m)
{
    char *err = NULL;
    int rc = pd_state_refresh(m->f->srv->state, &err);
    if (rc < 0) {
        set_error(m->f, err ? err : "could not read the state", NULL, NULL);
        pd_log_warning(NULL, "fleet: %s", err ? err : "could not read the state");
    } else if (rc == 1) {
        post_ev(m->f, ev_new(EV_STATE, 0));
    }
    free(err);
}

static void heartbeat(member_t *m)
{
    pd_fleet_t *f = m->f;
    PGresult *res;
    /* A notification lost (or sent while we were away) is caught here. */
    res = query(m, "could not read the state version", "SELECT version FROM pgdual.state", 0, NULL);
    if (res == NULL)
        return;
    bool behind = PQntuples(res) == 1 &&
                  strtoll(PQgetvalue(res, 0, 0), NULL, 10) > pd_state_version(f->srv->state);
    PQclear(res);
    if (behind)
        state_changed(m);
    char version[32], sessions[16], queued[32], pid[16];
    snprintf(version, sizeof version, "%" PRId64, pd_state_version(f->srv->state));
    pthread_mutex_lock(&f->lock);
    snprintf(sessions, sizeof sessions, "%d", f->sessions);
    snprintf(queued, sizeof queued, "%lld", f->queued);
    pthread_mutex_unlock(&f->lock);
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    char listen[300];
    snprintf(listen, sizeof listen, "%s:%u", f->srv->cfg->listen_host, f->srv->cfg->listen_port);
    const char *p[] = {f->id, f->host, pid, listen, PD_VERSION, version, sessions, queued};
    res = query(m, "could not write the heartbeat",
                "INSERT INTO pgdual.instances (id, host, pid, listen, version, "
                "state_version, sessions, mirror_queued) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET "
                "heartbeat_at = now(), state_version = $6, sessions = $7, "
                "mirror_queued = $8, pid = $3, host = $2, listen = $4, version = $5, "
                "started_at = CASE WHEN pgdual.instances.pid = $3::integer "
                "THEN pgdual.instances.started_at ELSE now() END",
                8, p);
    PQclear(res);
    if (res == NULL)
        return;
    res = query(m, "could not list the instances",
                "SELECT coalesce(json_agg(json_build_object('instance', id, 'host', host, "
                "'pid', pid, 'listen', listen, 'version', version, 'state_version', "
                "state_version, 'sessions', sessions, 'mirror_queued', mirror_queued, "
                "'heartbeat_age_ms', (extract(epoch FROM now() - heartbeat_at) * 1000)::bigint, "
                "'started_at', to_char(started_at AT TIME ZONE 'UTC', "
                "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')) ORDER BY id), '[]')::text "
                "FROM pgdual.instances",
                0, NULL);
    if (res == NULL)
        return;
    json_t *list = json_loads(PQgetvalue(res, 0, 0), 0, NULL);
    PQclear(res);
    if (json_is_array(list)) {
        pthread_mutex_lock(&f->lock);
        json_decref(f->instances);
        f->instances = list;
        f->error[0] = '\0';
        pthread_mutex_unlock(&f->lock);
    } else {
        json_decref(list);
    }
}

/* An operation's event, from a row of OP_SELECT ($1: this instance's id). */
#define OP_SELECT                                                                                  \
    "SELECT id, database, operation, phase, $1 = ANY (participants), "                             \
    "(extract(epoch FROM deadline_at - now()) * 1000)::bigint, coalesce(reason, ''), force "       \
    "FROM pgdual.operations "
#define OPS_PAUSING "WHERE phase = 'pause' AND now() < deadline_at"

static void op_event(const PGresult *res, int row, ev_t *e)
{
    *e = (ev_t){.kind = EV_OP, .op = strtoll(PQgetvalue(res, row, 0), NULL, 10)};
    snprintf(e->database, sizeof e->database, "%s", PQgetvalue(res, row, 1));
    snprintf(e->operation, sizeof e->operation, "%s", PQgetvalue(res, row, 2));
    snprintf(e->phase, sizeof e->phase, "%s", PQgetvalue(res, row, 3));
    e->participant = strcmp(PQgetvalue(res, row, 4), "t") == 0;
    e->deadline_in_ms = strtoll(PQgetvalue(res, row, 5), NULL, 10);
    snprintf(e->text, sizeof e->text, "%s", PQgetvalue(res, row, 6));
    e->force = strcmp(PQgetvalue(res, row, 7), "t") == 0;
}

/* Tells the loop about the operations of res (taken; NULL: none), after the state for a
   flip: the flags come with it, and must be in memory before the loop acts on it. */
static void post_ops(member_t *m, PGresult *res)
{
    for (int i = 0; res != NULL && i < PQntuples(res); i++) {
        ev_t *e = malloc(sizeof *e);
        if (e == NULL)
            break;
        op_event(res, i, e);
        if (strcmp(e->phase, "flip") == 0)
            state_changed(m);
        post_ev(m->f, e);
    }
    PQclear(res);
}

static bool connect_member(member_t *m)
{
    pd_fleet_t *f = m->f;
    char *err = NULL;
    m->conn = pd_state_connect(f->conninfo, "pgdual fleet", &err);
    if (m->conn == NULL) {
        pthread_mutex_lock(&f->lock);
        snprintf(f->error, sizeof f->error, "%s", err ? err : "out of memory");
        pthread_mutex_unlock(&f->lock);
        free(err);
        m->next_connect = mono_ms() + RECONNECT_MS;
        return false;
    }
    PGresult *res = query(m, "could not listen", "LISTEN pgdual_state", 0, NULL);
    if (res != NULL) {
        PQclear(res);
        res = query(m, "could not listen", "LISTEN pgdual_fleet", 0, NULL);
    }
    if (res == NULL) {
        /* query() drops the connection only when it broke */
        PQfinish(m->conn);
        m->conn = NULL;
        m->next_connect = mono_ms() + RECONNECT_MS;
        return false;
    }
    PQclear(res);
    pthread_mutex_lock(&f->lock);
    bool was_lost = f->lost_since_ms != 0;
    f->connected = true;
    f->lost_since_ms = 0;
    f->error[0] = '\0';
    pthread_mutex_unlock(&f->lock);
    if (was_lost)
        pd_log_info(NULL, "fleet: the control connection is back");
    state_changed(m); /* whatever changed while we were away */
    /* An operation in progress: paused with the others (fleet.h). */
    const char *p[] = {f->id};
    post_ops(m, query(m, "could not read the fleet operations", OP_SELECT OPS_PAUSING, 1, p));
    m->next_beat = 0;
    return true;
}

/* Reads an operation and tells the loop about it (after the state, for a flip). */
static void read_op(member_t *m, int64_t op)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, op);
    const char *p[] = {m->f->id, num};
    post_ops(m,
             query(m, "could not read a fleet operation", OP_SELECT "WHERE id = $2::bigint", 2, p));
}

/* The coordinator's view of the acknowledgements of one phase. */
static void poll_acks(member_t *m)
{
    pd_fleet_t *f = m->f;
    pthread_mutex_lock(&f->lock);
    int64_t op = f->coord_op;
    char phase[16];
    snprintf(phase, sizeof phase, "%s", f->coord_phase);
    pthread_mutex_unlock(&f->lock);
    if (op == 0)
        return;
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, op);
    const char *p[] = {num, phase};
    PGresult *res = query(m, "could not read the acknowledgements",
                          "SELECT i, a.ok, coalesce(a.detail, '') "
                          "FROM pgdual.operations o CROSS JOIN unnest(o.participants) AS i "
                          "LEFT JOIN pgdual.acks a ON a.operation = o.id AND a.instance = i "
                          "AND a.phase = $2 WHERE o.id = $1::bigint ORDER BY i",
                          2, p);
    if (res == NULL)
        return;
    ev_t *e = ev_new(EV_ACKS, op);
    if (e == NULL) {
        PQclear(res);
        return;
    }
    snprintf(e->phase, sizeof e->phase, "%s", phase);
    e->ok = true;
    e->expected = PQntuples(res);
    size_t used = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        const char *inst = PQgetvalue(res, i, 0);
        if (PQgetisnull(res, i, 1)) {
            used +=
                (size_t)snprintf(e->text + used, used < sizeof e->text ? sizeof e->text - used : 0,
                                 "%s%s", used ? ", " : "", inst);
            if (used >= sizeof e->text)
                used = sizeof e->text - 1;
        } else if (strcmp(PQgetvalue(res, i, 1), "t") == 0) {
            e->acked++;
        } else if (e->ok) {
            e->ok = false; /* the first refusal says why */
            snprintf(e->text, sizeof e->text, "instance %s: %s", inst, PQgetvalue(res, i, 2));
            used = sizeof e->text - 1;
        }
    }
    PQclear(res);
    post_ev(f, e);
}

static void run_begin(member_t *m, req_t *r)
{
    pd_fleet_t *f = m->f;
    ev_t *e = ev_new(EV_BEGUN, 0);
    if (e == NULL)
        return;
    char timeout[32];
    snprintf(timeout, sizeof timeout, "%llu", (unsigned long long)r->timeout_ms);
    char live[32];
    snprintf(live, sizeof live, "%d", PD_FLEET_LIVE_MS);
    PGresult *res = query(m, "could not begin the fleet operation", "BEGIN", 0, NULL);
    PQclear(res);
    if (res == NULL)
        goto failed;
    res = query(m, "could not take the fleet's lock",
                "SELECT pg_advisory_xact_lock(" PD_STATE_LOCK_CLASS_SQL ", 2)", 0, NULL);
    PQclear(res);
    if (res == NULL)
        goto failed;
    res = query(m, "could not read the fleet operations",
                "SELECT id, database, operation, coordinator FROM pgdual.operations "
                "WHERE phase = 'pause' AND now() < deadline_at + interval '2 seconds' LIMIT 1",
                0, NULL);
    if (res == NULL)
        goto failed;
    if (PQntuples(res) > 0) {
        snprintf(e->text, sizeof e->text,
                 "another fleet operation is in progress: %s of database \"%s\" (operation %s), "
                 "coordinated by instance %s",
                 PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 0),
                 PQgetvalue(res, 0, 3));
        PQclear(res);
        goto refused;
    }
    PQclear(res);
    const char *p[] = {r->database, r->operation,        f->id, r->who, timeout,
                       live,        r->force ? "t" : "f"};
    res = query(m, "could not record the fleet operation",
                "WITH ins AS (INSERT INTO pgdual.operations (database, operation, coordinator, "
                "requested_by, participants, phase, deadline_at, force) "
                "SELECT $1, $2, $3, $4, array_agg(id ORDER BY id), 'pause', "
                "now() + $5::bigint * interval '1 millisecond', $7::boolean "
                "FROM pgdual.instances "
                "WHERE heartbeat_at > now() - $6::bigint * interval '1 millisecond' OR id = $3 "
                "RETURNING id, participants) "
                "SELECT id, array_to_json(participants)::text, pg_notify('pgdual_fleet', "
                "'op:' || id) FROM ins",
                7, p);
    if (res == NULL)
        goto failed;
    e->op = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    e->participants = json_loads(PQgetvalue(res, 0, 1), 0, NULL);
    PQclear(res);
    res = query(m, "could not commit the fleet operation", "COMMIT", 0, NULL);
    PQclear(res);
    if (res == NULL) {
        e->op = 0;
        goto failed;
    }
    pthread_mutex_lock(&f->lock);
    f->coord_op = e->op;
    snprintf(f->coord_phase, sizeof f->coord_phase, "paused");
    pthread_mutex_unlock(&f->lock);
    e->ok = true;
    post_ev(f, e);
    return;
failed:
    pthread_mutex_lock(&f->lock);
    snprintf(e->text, sizeof e->text, "%s", f->error[0] ? f->error : "no control connection");
    pthread_mutex_unlock(&f->lock);
refused:
    if (m->conn != NULL)
        PQclear(PQexec(m->conn, "ROLLBACK"));
    post_ev(f, e);
}

static void run_ack(member_t *m, req_t *r)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, r->op);
    const char *p[] = {num, m->f->id, r->phase, r->ok ? "t" : "f", r->text};
    PGresult *res = query(m, "could not acknowledge",
                          "WITH a AS (INSERT INTO pgdual.acks (operation, instance, phase, ok, "
                          "detail) VALUES ($1::bigint, $2, $3, $4::boolean, nullif($5, '')) "
                          "ON CONFLICT DO NOTHING RETURNING operation) "
                          "SELECT pg_notify('pgdual_fleet', 'ack:' || operation) FROM a",
                          5, p);
    PQclear(res);
}

/* The edit of the state at the flip: every rule of the database, and the event. */
static int flip_apply(json_t *doc, void *arg)
{
    json_t *flip = arg;
    pd_writes_t writes;
    pd_reads_t reads;
    if (!pd_writes_parse(json_string_value(json_object_get(flip, "writes")), &writes) ||
        !pd_reads_parse(json_string_value(json_object_get(flip, "reads")), &reads))
        return -1;
    const char *who = json_string_value(json_object_get(flip, "by"));
    size_t i;
    json_t *rule;
    json_array_foreach(json_object_get(flip, "rules"), i, rule)
    {
        if (pd_state_doc_set_flags(doc, json_string_value(rule), writes, &reads, who) != 0)
            return -1;
    }
    if (json_is_true(json_object_get(flip, "watch_records")))
        return 0; /* the watch records its automatic rollback itself */
    return pd_state_doc_event(doc, json_string_value(json_object_get(flip, "operation")), who,
                              json_object_get(flip, "event"));
}

static void run_flip(member_t *m, req_t *r)
{
    pd_fleet_t *f = m->f;
    char num[32], *err = NULL;
    snprintf(num, sizeof num, "%" PRId64, r->op);
    int rc = pd_state_edit(
        f->srv->state,
        "WITH u AS (UPDATE pgdual.operations SET phase = 'flip', ended_at = now() "
        "WHERE id = $1::bigint AND phase = 'pause' AND now() < deadline_at RETURNING id) "
        "SELECT id, pg_notify('pgdual_fleet', 'op:' || id) FROM u",
        num, flip_apply, r->flip, &err);
    ev_t *e = ev_new(EV_FLIPPED, r->op);
    if (e != NULL) {
        e->ok = rc == 0;
        snprintf(e->text, sizeof e->text, "%s",
                 rc == 1  ? "its deadline passed before the flip could be recorded"
                 : rc < 0 ? (err ? err : "out of memory")
                          : "");
        if (rc == 0) {
            pthread_mutex_lock(&f->lock);
            snprintf(f->coord_phase, sizeof f->coord_phase, "flipped");
            pthread_mutex_unlock(&f->lock);
        }
        post_ev(f, e);
    }
    free(err);
}

static void run_abort(member_t *m, req_t *r)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, r->op);
    const char *p[] = {num, r->text};
    PGresult *res = query(m, "could not abort the fleet operation",
                          "WITH u AS (UPDATE pgdual.operations SET phase = 'abort', reason = $2, "
                          "ended_at = now() WHERE id = $1::bigint AND phase = 'pause' "
                          "RETURNING id) SELECT pg_notify('pgdual_fleet', 'op:' || id) FROM u",
                          2, p);
    PQclear(res);
    /* Not reachable: participants find it past its deadline and abort it themselves. */
}

/* A participant past the deadline: abort it when still pending, then say where it is. */
static void run_check(member_t *m, req_t *r)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRId64, r->op);
    const char *p[] = {num};
    PGresult *res = query(m, "could not check the fleet operation",
                          "WITH u AS (UPDATE pgdual.operations SET phase = 'abort', "
                          "reason = 'nobody completed it before its deadline', "
                          "ended_at = now() WHERE id = $1::bigint AND phase = 'pause' "
                          "AND now() > deadline_at RETURNING id) "
                          "SELECT pg_notify('pgdual_fleet', 'op:' || id) FROM u",
                          1, p);
    PQclear(res);
    if (res != NULL)
        read_op(m, r->op);
}

static void run_forget(member_t *m, req_t *r)
{
    ev_t *e = ev_new(EV_DONE, 0);
    const char *p[] = {r->text, m->f->id};
    PGresult *res = query(m, "could not forget the instance",
                          "DELETE FROM pgdual.instances WHERE id = $1 AND id <> $2", 2, p);
    if (res != NULL)
        heartbeat(m); /* the listing the reply's reader sees next is without it */
    if (e != NULL) {
        e->ok = res != NULL && strcmp(PQcmdTuples(res), "1") == 0;
        pthread_mutex_lock(&m->f->lock);
        snprintf(e->text, sizeof e->text, "%s",
                 res == NULL ? m->f->error
                 : e->ok     ? ""
                             : "no such instance (or it is this one)");
        pthread_mutex_unlock(&m->f->lock);
        post_ev(m->f, e);
    }
    PQclear(res);
}

static void handle_notifies(member_t *m)
{
    PGnotify *n;
    while (m->conn != NULL && (n = PQnotifies(m->conn)) != NULL) {
        if (strcmp(n->relname, "pgdual_state") == 0) {
            if (strtoll(n->extra, NULL, 10) > pd_state_version(m->f->srv->state))
                state_changed(m);
        } else if (strncmp(n->extra, "op:", 3) == 0) {
            read_op(m, strtoll(n->extra + 3, NULL, 10));
        } else if (strncmp(n->extra, "ack:", 4) == 0) {
            pthread_mutex_lock(&m->f->lock);
            bool mine = m->f->coord_op == strtoll(n->extra + 4, NULL, 10);
            pthread_mutex_unlock(&m->f->lock);
            if (mine)
                poll_acks(m);
        }
        PQfreemem(n);
    }
}

/* Requests wait while there is no connection (acknowledgements must arrive), except the
   coordinator's, which fail at once: the loop answers its client. */
static void run_requests(member_t *m)
{
    pd_fleet_t *f = m->f;
    for (;;) {
        pthread_mutex_lock(&f->lock);
        req_t *r = f->reqs;
        if (r != NULL && m->conn == NULL && (r->kind == REQ_ACK || r->kind == REQ_CHECK)) {
            pthread_mutex_unlock(&f->lock);
            return;
        }
        if (r != NULL && (f->reqs = r->next) == NULL)
            f->reqs_tail = &f->reqs;
        pthread_mutex_unlock(&f->lock);
        if (r == NULL)
            return;
        switch (r->kind) {
        case REQ_BEGIN:
            run_begin(m, r);
            break;
        case REQ_ACK:
            run_ack(m, r);
            break;
        case REQ_FLIP:
            run_flip(m, r);
            break;
        case REQ_ABORT:
            run_abort(m, r);
            break;
        case REQ_CHECK:
            run_check(m, r);
            break;
        case REQ_FORGET:
            run_forget(m, r);
            break;
        case REQ_WATCH:
            pthread_mutex_lock(&f->lock);
            f->coord_op = r->op;
            pthread_mutex_unlock(&f->lock);
            break;
        }
        json_decref(r->flip);
        free(r);
    }
}

static void *member_main(void *arg)
{
    member_t m = {.f = arg};
    pd_fleet_t *f = m.f;
    for (;;) {
        pthread_mutex_lock(&f->lock);
        bool stopping = f->stopping;
        bool coordinating = f->coord_op != 0;
        pthread_mutex_unlock(&f->lock);
        if (stopping) {
            run_requests(&m); /* an abort, acknowledgements: deliver them first */
            break;
        }
        uint64_t now = mono_ms();
        if (m.conn == NULL && now >= m.next_connect)
            connect_member(&m);
        run_requests(&m);
        if (m.conn != NULL && now >= m.next_beat) {
            heartbeat(&m);
            m.next_beat = now + PD_FLEET_HEARTBEAT_MS;
        }
        if (m.conn != NULL && coordinating && now >= m.next_ack_poll) {
            poll_acks(&m);
            m.next_ack_poll = now + ACK_POLL_MS;
        }
        /* Queries read whatever notifications arrived meanwhile into libpq's queue. */
        handle_notifies(&m);
        uint64_t until = m.conn == NULL ? m.next_connect : m.next_beat;
        if (coordinating && m.next_ack_poll < until)
            until = m.next_ack_poll;
        now = mono_ms();
        int timeout = until > now ? (int)(until - now) : 0;
        struct pollfd pfd[2] = {{.fd = f->wake[0], .events = POLLIN},
                                {.fd = m.conn ? PQsocket(m.conn) : -1, .events = POLLIN}};
        if (poll(pfd, 2, timeout) > 0) {
            if (pfd[0].revents & POLLIN) {
                char buf[64];
                while (read(f->wake[0], buf, sizeof buf) > 0) {
                }
            }
            if (m.conn != NULL && (pfd[1].revents & (POLLIN | POLLERR | POLLHUP))) {
                if (!PQconsumeInput(m.conn))
                    lose(&m, "the control connection failed", NULL);
                handle_notifies(&m);
            }
        }
    }
    if (m.conn != NULL) {
        const char *p[] = {f->id};
        PQclear(PQexecParams(m.conn, "DELETE FROM pgdual.instances WHERE id = $1", 1, NULL, p, NULL,
                             NULL, 0));
        PQfinish(m.conn);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * The loop: participant
 */

static void part_end(pd_fleet_t *f)
{
    part_t *p = &f->part;
    if (!p->active)
        return;
    uv_timer_stop(&p->tick);
    pd_server_resume(f->srv, p->database);
    p->active = false;
}

static void ack(pd_fleet_t *f, int64_t op, const char *phase, bool ok, const char *detail)
{
    req_t *r = req_new(REQ_ACK, op);
    if (r == NULL)
        return;
    r->ok = ok;
    snprintf(r->phase, sizeof r->phase, "%s", phase);
    snprintf(r->text, sizeof r->text, "%s", detail ? detail : "");
    post_req(f, r);
}

static void part_check(uv_timer_t *t)
{
    pd_fleet_t *f = t->data;
    req_t *r = req_new(REQ_CHECK, f->part.op);
    if (r != NULL)
        post_req(f, r);
    pthread_mutex_lock(&f->lock);
    bool connected = f->connected;
    pthread_mutex_unlock(&f->lock);
    if (!f->part.held_unknown && !connected) {
        f->part.held_unknown = true;
        pd_log_warning(NULL,
                       "fleet: %s of database \"%s\" (operation %" PRId64 ") passed its deadline "
                       "and the control database cannot say how it ended: the database stays "
                       "paused here until it can",
                       f->part.operation, f->part.database, f->part.op);
    }
    uv_timer_start(&f->part.tick, part_check, 1000, 0);
}

static void part_tick(uv_timer_t *t)
{
    pd_fleet_t *f = t->data;
    part_t *p = &f->part;
    uint64_t now = uv_now(f->srv->loop);
    if (pd_cutover_drained(f->srv, p->database)) {
        char why[TEXT_MAX] = "";
        bool ok =
            p->force || pd_cutover_local_ok(f->srv, p->database, p->rollback, why, sizeof why);
        ack(f, p->op, "paused", ok, ok ? NULL : why);
        p->acked = true;
        uint64_t wait =
            p->deadline_ms + CHECK_GRACE_MS > now ? p->deadline_ms + CHECK_GRACE_MS - now : 0;
        uv_timer_start(&p->tick, part_check, wait, 0);
        return;
    }
    if (now >= p->deadline_ms) {
        ack(f, p->op, "paused", false, "transactions in flight (or mirror writes) did not drain");
        p->acked = true;
        uv_timer_start(&p->tick, part_check, CHECK_GRACE_MS, 0);
    }
}

static void on_op(pd_fleet_t *f, ev_t *e)
{
    pd_server_t *srv = f->srv;
    part_t *p = &f->part;
    bool mine = p->active && p->op == e->op;
    if (strcmp(e->phase, "pause") == 0) {
        /* An instance that joined after the operation began is not waited for, but holds
           the database too: it must not write on the old side while the others flip. */
        if (mine || e->deadline_in_ms <= 0)
            return;
        if (p->active) /* an older operation never ended here: it is over now */
            part_end(f);
        *p = (part_t){.active = true, .op = e->op, .tick = p->tick};
        snprintf(p->database, sizeof p->database, "%s", e->database);
        snprintf(p->operation, sizeof p->operation, "%s", e->operation);
        p->force = e->force;
        p->participant = e->participant;
        p->rollback = strcmp(e->operation, "rollback") == 0;
        p->deadline_ms = uv_now(srv->loop) + (uint64_t)e->deadline_in_ms;
        if (pd_server_pause(srv, e->database) != 0) {
            p->active = false;
            if (e->participant)
                ack(f, e->op, "paused", false,
                    "the database is paused here already (pgdualctl pause "
                    "or a switchover of this instance)");
            return;
        }
        pd_log_info(NULL, "fleet: %s of database \"%s\" (operation %" PRId64 "): paused here%s",
                    e->operation, e->database, e->op,
                    e->participant ? "" : " (joined after it began: held until it ends)");
        if (e->participant) {
            uv_timer_start(&p->tick, part_tick, 0, 1);
        } else {
            p->acked = true;
            uv_timer_start(&p->tick, part_check, (uint64_t)e->deadline_in_ms + CHECK_GRACE_MS, 0);
        }
        return;
    }
    if (!mine)
        return;
    if (strcmp(e->phase, "flip") == 0) {
        pd_server_apply_state(srv);
        if (!(f->coord.active && f->coord.op == e->op)) /* the coordinator's moved already */
            pd_watch_flipped(srv, e->database, NULL, 0, NULL);
        pd_log_info(NULL,
                    "fleet: %s of database \"%s\" (operation %" PRId64 ") flipped; "
                    "resuming",
                    e->operation, e->database, e->op);
        bool participant = p->participant;
        part_end(f);
        if (participant)
            ack(f, e->op, "flipped", true, NULL);
    } else if (strcmp(e->phase, "abort") == 0) {
        pd_log_warning(NULL,
                       "fleet: %s of database \"%s\" (operation %" PRId64 ") aborted (%s); "
                       "resuming unchanged",
                       e->operation, e->database, e->op, e->text);
        part_end(f);
    }
}

/* ---------------------------------------------------------------------------------------
 * The loop: coordinator
 */

static const char *op_word(const coord_t *c)
{
    return c->rollback ? "rollback" : "switchover";
}

static void coord_reply(pd_fleet_t *f, json_t *r)
{
    coord_t *c = &f->coord;
    if (c->req != NULL)
        pd_admin_reply(c->req, r);
    else
        json_decref(r);
    c->req = NULL;
}

static void coord_end(pd_fleet_t *f)
{
    coord_t *c = &f->coord;
    uv_timer_stop(&c->timer);
    json_decref(c->checks);
    json_decref(c->participants);
    json_decref(c->rules);
    json_decref(c->reply);
    if (!c->sequencing) { /* else the worker still reads them: seq_done frees */
        free(c->from);
        free(c->to);
        c->from = c->to = NULL;
    }
    c->checks = c->participants = c->rules = c->reply = NULL;
    c->active = false;
    req_t *r = req_new(REQ_WATCH, 0); /* the thread stops polling acknowledgements */
    if (r != NULL)
        post_req(f, r);
}

static void coord_fail(pd_fleet_t *f, const char *why, const char *hint, bool abort_op)
{
    coord_t *c = &f->coord;
    uint64_t paused = uv_now(f->srv->loop) - c->started_ms;
    char msg[1024];
    snprintf(msg, sizeof msg,
             "%s of database \"%s\" across the fleet abandoned: %s; traffic "
             "resumes on %s, unchanged",
             op_word(c), c->database, why, c->rollback ? "new" : "old");
    pd_log_warning(NULL, "%s", msg);
    if (abort_op && c->op != 0) {
        req_t *r = req_new(REQ_ABORT, c->op);
        if (r != NULL) {
            snprintf(r->text, sizeof r->text, "%s", why);
            post_req(f, r);
        }
    }
    json_t *r = json_pack("{s:b, s:s, s:s, s:I}", "ok", 0, "error", msg, "hint", hint, "pause_ms",
                          (json_int_t)paused);
    if (c->op != 0)
        json_object_set_new(r, "fleet_operation", json_integer(c->op));
    if (c->participants != NULL)
        json_object_set(r, "instances", c->participants);
    if (c->checks != NULL)
        json_object_set(r, "checks", c->checks);
    pd_cutover_record(f->srv, c->database, c->who, "switchover_abandoned",
                      json_pack("{s:s, s:s, s:I, s:I}", "operation", op_word(c), "reason", why,
                                "pause_ms", (json_int_t)paused, "fleet_operation",
                                (json_int_t)c->op));
    coord_reply(f, r);
    pd_watch_t *w = c->auto_for;
    coord_end(f);
    if (w != NULL)
        pd_watch_rollback_done(w, why, NULL);
}

static void coord_deadline(uv_timer_t *t)
{
    pd_fleet_t *f = t->data;
    coord_t *c = &f->coord;
    if (c->step == C_CONFIRM) { /* flipped; some participant has not said so yet */
        json_t *r = c->reply;
        c->reply = NULL;
        coord_reply(f, r);
        coord_end(f);
        return;
    }
    if (c->step == C_SEQ || c->step == C_FLIP)
        return; /* the flip's guard decides: it fails past the deadline */
    char why[TEXT_MAX + 64];
    snprintf(why, sizeof why, "not every instance paused within %llu ms (no answer from: %s)",
             (unsigned long long)c->timeout_ms, c->missing[0] ? c->missing : "?");
    coord_fail(f, why,
               "An instance that did not answer may be down or have long transactions: "
               "pgdualctl fleet shows the instances; run it again (with a longer --timeout).",
               true);
}

static void fleet_free(pd_fleet_t *f);

static void seq_work(uv_work_t *w)
{
    coord_t *c = w->data;
    c->seq_set = pd_seqsync_once(c->from, c->to, c->seq_error, sizeof c->seq_error);
}

static void seq_done(uv_work_t *w, int status)
{
    pd_fleet_t *f = (pd_fleet_t *)((char *)w->data - offsetof(pd_fleet_t, coord));
    coord_t *c = &f->coord;
    c->sequencing = false;
    if (!c->active) {
        free(c->from);
        free(c->to);
        c->from = c->to = NULL;
        if (f->free_pending)
            fleet_free(f);
        return;
    }
    if (status != 0 || c->seq_error[0] != '\0') {
        coord_fail(f, status != 0 ? "the sequence step could not run" : c->seq_error,
                   "Check that both sides of the database are reachable with the conninfos of "
                   "the config, then run it again.",
                   true);
        return;
    }
    req_t *r = req_new(REQ_FLIP, c->op);
    if (r == NULL) {
        coord_fail(f, "out of memory", NULL, true);
        return;
    }
    uint64_t paused = uv_now(f->srv->loop) - c->started_ms;
    /* Copies: the thread must not share reference counts with the loop. */
    r->flip =
        json_pack("{s:o, s:s, s:s, s:s, s:s, s:{s:s, s:I, s:o, s:I, s:I, s:i}}", "rules",
                  json_deep_copy(c->rules), "writes", c->rollback ? "dual" : "dual-new", "reads",
                  c->rollback ? "old" : "new", "by", c->who, "operation", op_word(c), "event",
                  "database", c->database, "fleet_operation", (json_int_t)c->op, "instances",
                  json_deep_copy(c->participants), "pause_ms", (json_int_t)paused, "drain_ms",
                  (json_int_t)c->drained_ms, "sequences_set", c->seq_set);
    if (c->auto_for != NULL)
        json_object_set_new(r->flip, "watch_records", json_true());
    c->step = C_FLIP;
    post_req(f, r);
}

static void coord_drained(pd_fleet_t *f)
{
    coord_t *c = &f->coord;
    pd_server_t *srv = f->srv;
    c->drained_ms = uv_now(srv->loop) - c->started_ms;
    c->step = C_SEQ;
    c->seq_error[0] = '\0';
    c->seq_set = 0;
    c->work.data = c;
    int sides = pd_cutover_seq_sides(srv, c->database, c->rollback, &c->from, &c->to);
    if (sides == 0) {
        seq_done(&c->work, 0);
        return;
    }
    if (sides < 0 || uv_queue_work(srv->loop, &c->work, seq_work, seq_done) != 0) {
        coord_fail(f, "out of memory", NULL, true);
        return;
    }
    c->sequencing = true;
}

static void on_acks(pd_fleet_t *f, ev_t *e)
{
    coord_t *c = &f->coord;
    if (!c->active || e->op != c->op)
        return;
    if (c->step == C_WAIT && strcmp(e->phase, "paused") == 0) {
        snprintf(c->missing, sizeof c->missing, "%s", e->ok ? e->text : "");
        if (!e->ok) {
            coord_fail(f, e->text,
                       "The instance named refused: do what its reason says (on that "
                       "instance), or run it again with --force.",
                       true);
        } else if (e->acked == e->expected) {
            coord_drained(f);
        }
    } else if (c->step == C_CONFIRM && strcmp(e->phase, "flipped") == 0 &&
               e->acked == e->expected) {
        json_t *r = c->reply;
        c->reply = NULL;
        json_object_del(r, "unconfirmed");
        json_object_set_new(r, "confirmed_ms",
                            json_integer((json_int_t)(uv_now(f->srv->loop) - c->started_ms)));
        coord_reply(f, r);
        coord_end(f);
    } else if (c->step == C_CONFIRM) {
        json_object_set_new(c->reply, "unconfirmed", json_string(e->text));
    }
}

static void on_begun(pd_fleet_t *f, ev_t *e)
{
    coord_t *c = &f->coord;
    if (!c->active || c->step != C_BEGIN) {
        /* Given up on (its timeout) before it was recorded: nobody waits for it now. */
        req_t *r = e->ok && e->op != 0 ? req_new(REQ_ABORT, e->op) : NULL;
        if (r != NULL) {
            snprintf(r->text, sizeof r->text, "its coordinator gave up before it began");
            post_req(f, r);
        }
        return;
    }
    if (!e->ok) {
        coord_fail(f, e->text,
                   "Wait for the operation in progress to end (pgdualctl fleet), or check the "
                   "control database.",
                   false);
        return;
    }
    c->op = e->op;
    c->participants = json_incref(e->participants);
    c->step = C_WAIT;
    pd_log_info(NULL,
                "fleet: %s of database \"%s\" (operation %" PRId64 ") started by %s: "
                "%zu instances pausing",
                op_word(c), c->database, c->op, c->who, json_array_size(c->participants));
}

static void on_flipped(pd_fleet_t *f, ev_t *e)
{
    coord_t *c = &f->coord;
    if (!c->active || e->op != c->op || c->step != C_FLIP)
        return;
    if (!e->ok) {
        coord_fail(f, e->text, "Run it again (with a longer --timeout).", true);
        return;
    }
    pd_server_apply_state(f->srv);
    uint64_t paused = uv_now(f->srv->loop) - c->started_ms;
    json_t *rules = json_array();
    size_t i;
    json_t *name;
    json_array_foreach(c->rules, i, name)
    {
        json_array_append_new(rules, json_pack("{s:O, s:s, s:s}", "rule", name, "writes",
                                               c->rollback ? "dual" : "dual-new", "reads",
                                               c->rollback ? "old" : "new"));
    }
    c->reply =
        json_pack("{s:b, s:s, s:s, s:I, s:O, s:I, s:I, s:i, s:O, s:o, s:I}", "ok", 1, "database",
                  c->database, "operation", op_word(c), "fleet_operation", (json_int_t)c->op,
                  "instances", c->participants, "pause_ms", (json_int_t)paused, "drain_ms",
                  (json_int_t)c->drained_ms, "sequences_set", c->seq_set, "checks", c->checks,
                  "rules", rules, "state_version", (json_int_t)pd_state_version(f->srv->state));
    pd_log_info(NULL,
                "fleet: %s of database \"%s\" (operation %" PRId64 ") done by %s: paused "
                "%llu ms",
                op_word(c), c->database, c->op, c->who, (unsigned long long)paused);
    /* The traffic mark moves with every flip; a switchover --watch starts its watch here. */
    json_t *watch = pd_watch_flipped(f->srv, c->database, c->rollback ? NULL : &c->watch,
                                     c->timeout_ms, c->who);
    if (watch != NULL)
        json_object_set_new(c->reply, "watch", watch);
    if (c->auto_for != NULL) {
        pd_watch_t *w = c->auto_for;
        c->auto_for = NULL;
        pd_watch_rollback_done(w, NULL,
                               json_pack("{s:I, s:I, s:I, s:i}", "fleet_operation",
                                         (json_int_t)c->op, "pause_ms", (json_int_t)paused,
                                         "drain_ms", (json_int_t)c->drained_ms, "sequences_set",
                                         c->seq_set));
    }
    c->step = C_CONFIRM;
    uv_timer_start(&c->timer, coord_deadline, CONFIRM_MS, 0);
}

void pd_fleet_switchover(pd_server_t *srv, pd_admin_req_t *req, bool rollback, const char *database,
                         uint64_t timeout_ms, json_t *checks, const char *who, bool force,
                         const pd_watch_opts_t *watch, pd_watch_t *auto_for)
{
    pd_fleet_t *f = srv->fleet;
    coord_t *c = &f->coord;
    if (c->active) {
        json_decref(checks);
        if (auto_for != NULL)
            pd_watch_rollback_done(auto_for, "this instance coordinates a fleet operation already",
                                   NULL);
        if (req == NULL)
            return;
        pd_admin_reply(req, json_pack("{s:b, s:s, s:s}", "ok", 0, "error",
                                      "this instance coordinates a fleet operation already", "hint",
                                      "Wait for it to end (within its --timeout)."));
        return;
    }
    json_t *rules = json_array();
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (strcmp(srv->cfg->rules[i].database, database) == 0)
            json_array_append_new(rules, json_string(srv->cfg->rules[i].name));
    req_t *r = req_new(REQ_BEGIN, 0);
    if (r == NULL) {
        json_decref(checks);
        json_decref(rules);
        if (auto_for != NULL)
            pd_watch_rollback_done(auto_for, "out of memory", NULL);
        if (req != NULL)
            pd_admin_reply(req, json_pack("{s:b, s:s}", "ok", 0, "error", "out of memory"));
        return;
    }
    *c = (coord_t){.active = true,
                   .req = req,
                   .rollback = rollback,
                   .started_ms = uv_now(srv->loop),
                   .timeout_ms = timeout_ms,
                   .checks = checks,
                   .rules = rules,
                   .step = C_BEGIN,
                   .timer = c->timer,
                   .work = c->work};
    c->work.data = c;
    c->auto_for = auto_for;
    if (watch != NULL && !rollback)
        c->watch = *watch;
    else
        pd_watch_opts_init(&c->watch);
    snprintf(c->database, sizeof c->database, "%s", database);
    snprintf(c->who, sizeof c->who, "%s", who);
    snprintf(r->database, sizeof r->database, "%s", database);
    snprintf(r->operation, sizeof r->operation, "%s", op_word(c));
    snprintf(r->who, sizeof r->who, "%s", who);
    r->timeout_ms = timeout_ms;
    r->force = force;
    uv_timer_start(&c->timer, coord_deadline, timeout_ms, 0);
    post_req(f, r);
}

/* ---------------------------------------------------------------------------------------
 * The loop: events, status, commands
 */

static void on_async(uv_async_t *a)
{
    pd_fleet_t *f = a->data;
    pthread_mutex_lock(&f->lock);
    ev_t *list = f->evs;
    f->evs = NULL;
    f->evs_tail = &f->evs;
    pthread_mutex_unlock(&f->lock);
    while (list != NULL) {
        ev_t *e = list;
        list = e->next;
        switch (e->kind) {
        case EV_STATE:
            pd_server_apply_state(f->srv);
            break;
        case EV_OP:
            on_op(f, e);
            break;
        case EV_BEGUN:
            on_begun(f, e);
            break;
        case EV_ACKS:
            on_acks(f, e);
            break;
        case EV_FLIPPED:
            on_flipped(f, e);
            break;
        case EV_DONE:
            if (f->forget_req != NULL)
                pd_admin_reply(f->forget_req,
                               e->ok ? json_pack("{s:b}", "ok", 1)
                                     : json_pack("{s:b, s:s, s:s}", "ok", 0, "error", e->text,
                                                 "hint", "pgdualctl fleet lists the instances."));
            f->forget_req = NULL;
            break;
        }
        json_decref(e->participants);
        free(e);
    }
}

static void on_beat(uv_timer_t *t)
{
    pd_fleet_t *f = t->data;
    pd_mirror_totals_t mt = {0};
    pd_mirror_totals(f->srv, &mt);
    pthread_mutex_lock(&f->lock);
    f->sessions = (int)f->srv->nsessions;
    f->queued = (long long)mt.queued;
    pthread_mutex_unlock(&f->lock);
}

/*
 * At start, before the first client: a fleet operation in progress holds this instance's
 * database too (it joined too late to be a participant; fleet.h). Best effort: an
 * unreachable control database leaves it to the thread, which looks again on connecting.
 */
static void hold_for_operations(pd_fleet_t *f)
{
    char *err = NULL;
    PGconn *c = pd_state_connect(f->conninfo, "pgdual fleet", &err);
    free(err);
    if (c == NULL)
        return;
    const char *p[] = {f->id};
    PGresult *res = PQexecParams(c, OP_SELECT OPS_PAUSING, 1, NULL, p, NULL, NULL, 0);
    for (int i = 0; PQresultStatus(res) == PGRES_TUPLES_OK && i < PQntuples(res); i++) {
        ev_t e;
        op_event(res, i, &e);
        on_op(f, &e);
    }
    PQclear(res);
    PQfinish(c);
}

pd_fleet_t *pd_fleet_start(pd_server_t *srv, const char *conninfo)
{
    pd_fleet_t *f = calloc(1, sizeof *f);
    if (f == NULL || (f->conninfo = strdup(conninfo)) == NULL || pipe(f->wake) != 0) {
        pd_log_error(NULL, "fleet: out of resources");
        free(f ? f->conninfo : NULL);
        free(f);
        return NULL;
    }
    fcntl(f->wake[0], F_SETFL, O_NONBLOCK);
    fcntl(f->wake[1], F_SETFL, O_NONBLOCK);
    f->srv = srv;
    pthread_mutex_init(&f->lock, NULL);
    f->reqs_tail = &f->reqs;
    f->evs_tail = &f->evs;
    if (gethostname(f->host, sizeof f->host) != 0)
        snprintf(f->host, sizeof f->host, "unknown");
    f->host[sizeof f->host - 1] = '\0';
    snprintf(f->id, sizeof f->id, "%s:%u", f->host, srv->cfg->listen_port);
    uv_async_init(srv->loop, &f->async, on_async);
    f->async.data = f;
    uv_timer_init(srv->loop, &f->beat);
    f->beat.data = f;
    uv_timer_init(srv->loop, &f->coord.timer);
    f->coord.timer.data = f;
    uv_timer_init(srv->loop, &f->part.tick);
    f->part.tick.data = f;
    on_beat(&f->beat);
    uv_timer_start(&f->beat, on_beat, PD_FLEET_HEARTBEAT_MS / 2, PD_FLEET_HEARTBEAT_MS / 2);
    hold_for_operations(f);
    if (pthread_create(&f->thread, NULL, member_main, f) != 0) {
        pd_log_error(NULL, "fleet: could not start its thread");
        pd_fleet_stop(f);
        return NULL;
    }
    f->thread_started = true;
    pd_log_info(NULL, "fleet: this instance is %s; shared state version %" PRId64, f->id,
                pd_state_version(srv->state));
    for (unsigned i = 0; i < srv->cfg->rule_count; i++)
        if (srv->cfg->rules[i].kind == PD_RULE_TABLES)
            pd_log_warning(NULL,
                           "rule \"%s\": in a fleet, the mirror receives each instance's writes "
                           "of a row in order, but not always writes of one row made through "
                           "several instances at once: %s (pgdualctl verify RULE finds such "
                           "rows, --repair fixes them)",
                           srv->cfg->rules[i].name,
                           srv->cfg->rules[i].commit == PD_COMMIT_LOCKSTEP
                               ? "under lockstep they are ordered by the authoritative side's "
                                 "row locks, in explicit transactions and in autocommit batches "
                                 "(pgdual wraps those in a transaction of its own), but not in "
                                 "an autocommit batch pipelined behind another, nor COPY"
                               : "use mirror.commit lockstep for such writes");
    return f;
}

static void fleet_free(pd_fleet_t *f)
{
    pthread_mutex_lock(&f->lock);
    while (f->reqs != NULL) {
        req_t *r = f->reqs;
        f->reqs = r->next;
        json_decref(r->flip);
        free(r);
    }
    while (f->evs != NULL) {
        ev_t *e = f->evs;
        f->evs = e->next;
        json_decref(e->participants);
        free(e);
    }
    pthread_mutex_unlock(&f->lock);
    json_decref(f->instances);
    pthread_mutex_destroy(&f->lock);
    close(f->wake[0]);
    close(f->wake[1]);
    free(f->conninfo);
    free(f);
}

static void fleet_closed(uv_handle_t *h)
{
    pd_fleet_t *f = h->data;
    if (--f->open_handles > 0)
        return; /* the last one closed frees it */
    if (f->coord.sequencing)
        f->free_pending = true;
    else
        fleet_free(f);
}

void pd_fleet_stop(pd_fleet_t *f)
{
    if (f == NULL)
        return;
    if (f->coord.active) {
        coord_fail(f, "pgdual is shutting down", "Run it again on a running instance.", true);
    }
    part_end(f);
    if (f->thread_started) {
        /* Let the thread deliver what is queued (an abort, acknowledgements) first. */
        pthread_mutex_lock(&f->lock);
        f->stopping = true;
        pthread_mutex_unlock(&f->lock);
        char b = 1;
        ssize_t n = write(f->wake[1], &b, 1);
        (void)n;
        pthread_join(f->thread, NULL);
    }
    if (f->forget_req != NULL)
        pd_admin_reply(f->forget_req, json_pack("{s:b, s:s}", "ok", 0, "error", "shutting down"));
    f->forget_req = NULL;
    f->coord.timer.data = f->part.tick.data = f->beat.data = f;
    f->open_handles = 4;
    uv_close((uv_handle_t *)&f->coord.timer, fleet_closed);
    uv_close((uv_handle_t *)&f->part.tick, fleet_closed);
    uv_close((uv_handle_t *)&f->beat, fleet_closed);
    uv_close((uv_handle_t *)&f->async, fleet_closed);
}

/* A row of the listing whose heartbeat is recent enough. */
static bool instance_live(json_t *inst)
{
    return json_integer_value(json_object_get(inst, "heartbeat_age_ms")) < PD_FLEET_LIVE_MS;
}

bool pd_fleet_coordinating(const pd_fleet_t *f)
{
    return f->coord.active;
}

json_t *pd_fleet_status(pd_fleet_t *f)
{
    pthread_mutex_lock(&f->lock);
    json_t *s = json_pack("{s:s, s:s, s:I, s:i, s:b}", "backend", "postgres", "instance", f->id,
                          "version", (json_int_t)pd_state_version(f->srv->state), "schema_version",
                          pd_state_schema_version(), "connected", f->connected);
    if (f->error[0] != '\0')
        json_object_set_new(s, "error", json_string(f->error));
    if (f->lost_since_ms != 0)
        json_object_set_new(s, "lost_ms", json_integer((json_int_t)(mono_ms() - f->lost_since_ms)));
    json_object_set_new(s, "instances", json_integer((json_int_t)json_array_size(f->instances)));
    pthread_mutex_unlock(&f->lock);
    if (f->part.active)
        json_object_set_new(s, "held",
                            json_pack("{s:I, s:s, s:s, s:b}", "fleet_operation",
                                      (json_int_t)f->part.op, "database", f->part.database,
                                      "operation", f->part.operation, "outcome_unknown",
                                      f->part.held_unknown));
    return s;
}

void pd_fleet_numbers(pd_fleet_t *f, int *connected, long long *version, int *live)
{
    pthread_mutex_lock(&f->lock);
    *connected = f->connected;
    *live = 0;
    size_t i;
    json_t *inst;
    json_array_foreach(f->instances, i, inst)
    {
        *live += instance_live(inst);
    }
    pthread_mutex_unlock(&f->lock);
    *version = (long long)pd_state_version(f->srv->state);
}

bool pd_fleet_check(pd_fleet_t *f, json_t *checks)
{
    pthread_mutex_lock(&f->lock);
    bool connected = f->connected;
    json_t *stale = json_array();
    size_t i;
    json_t *inst;
    json_array_foreach(f->instances, i, inst)
    {
        if (!instance_live(inst))
            json_array_append(stale, json_object_get(inst, "instance"));
    }
    size_t n = json_array_size(f->instances);
    pthread_mutex_unlock(&f->lock);
    bool ok = connected && json_array_size(stale) == 0;
    const char *hint =
        !connected ? "This instance has lost its control connection (pgdualctl status shows why); "
                     "a switchover needs it."
                   : "An instance stopped heartbeating and may still serve clients on the side "
                     "it was on: bring it back or stop it, then pgdualctl fleet forget ID.";
    json_array_append_new(checks, json_pack("{s:s, s:b, s:{s:b, s:I, s:o}, s:s}", "check", "fleet",
                                            "ok", ok, "value", "connected", connected, "instances",
                                            (json_int_t)n, "stale", stale, "hint", hint));
    return ok;
}

void pd_cmd_fleet(pd_server_t *srv, pd_admin_req_t *req, int argc, char **argv)
{
    pd_fleet_t *f = srv->fleet;
    if (f == NULL) {
        pd_admin_reply(req, json_pack("{s:b, s:s, s:s}", "ok", 0, "error",
                                      "this instance keeps its state in a file, not in PostgreSQL: "
                                      "there is no fleet",
                                      "hint",
                                      "Set `state: postgres` in the config of every "
                                      "instance to run them as one fleet."));
        return;
    }
    if (argc == 1) {
        pthread_mutex_lock(&f->lock);
        json_t *list = f->instances != NULL ? json_deep_copy(f->instances) : json_array();
        pthread_mutex_unlock(&f->lock);
        size_t i;
        json_t *inst;
        json_array_foreach(list, i, inst)
        {
            json_object_set_new(inst, "live", json_boolean(instance_live(inst)));
            json_object_set_new(
                inst, "this",
                json_boolean(strcmp(json_string_value(json_object_get(inst, "instance")) ?: "",
                                    f->id) == 0));
        }
        json_t *r =
            json_pack("{s:b, s:o, s:o}", "ok", 1, "state", pd_fleet_status(f), "instances", list);
        pd_admin_reply(req, r);
        return;
    }
    if (argc != 3 || strcmp(argv[1], "forget") != 0) {
        pd_admin_reply(req, json_pack("{s:b, s:s, s:s}", "ok", 0, "error",
                                      "usage: fleet [forget INSTANCE]", "hint",
                                      "pgdualctl fleet lists the instances and their names."));
        return;
    }
    if (f->forget_req != NULL) {
        pd_admin_reply(
            req, json_pack("{s:b, s:s}", "ok", 0, "error", "a fleet forget is running; try again"));
        return;
    }
    req_t *r = req_new(REQ_FORGET, 0);
    if (r == NULL) {
        pd_admin_reply(req, json_pack("{s:b, s:s}", "ok", 0, "error", "out of memory"));
        return;
    }
    snprintf(r->text, sizeof r->text, "%s", argv[2]);
    f->forget_req = req;
    post_req(f, r);
}
