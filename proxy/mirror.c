/*
 * mirror.c — replaying a session's mirrored statements on the rule's other database
 * (mirror.h says what and when). Two halves:
 *
 *  - the session's side, on the event loop, inside the relay: what each client message
 *    will be answered with (expectations), the authoritative outcome of each mirrored
 *    statement and its row images, and the release of a batch's statements to the mirror
 *    at its ReadyForQuery;
 *  - the mirror connection: libpq in non-blocking mode on a uv_poll, one statement in
 *    flight at a time (a session's statements apply in its order), outcomes compared as
 *    they come back.
 */
#include "proxy/mirror.h"

#include <libpq-fe.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "admin/jobs.h"
#include "proxy/backend.h"
#include "proxy/cancel.h"
#include "proxy/compare.h"
#include "proxy/log.h"
#include "proxy/route.h"
#include "proxy/server.h"
#include "proxy/session.h"
#include "rules/catalog.h"
#include "rules/touched.h"

static uint32_t get32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* A value's length in wire form (-1: NULL). */
static int32_t wire_len(const uint8_t *p)
{
    return (int32_t)get32be(p);
}

#define QUEUE_MAX_OPS   10000               /* statements a mirror may trail by */
#define QUEUE_MAX_BYTES (64u * 1024 * 1024) /* bytes of statements and rows it may hold */

typedef struct key_node key_node_t;

struct pd_mirror_op {
    pd_mirror_op_t *next;
    pd_mirror_t *m;     /* the mirror it was queued on (gated ops) */
    key_node_t **nodes; /* its places in the rows' queues (gated ops), owned */
    unsigned nnodes;
    uint32_t seq;       /* the session's batch */
    pd_sql_result_t *r; /* the plan, referenced */
    int rule;
    char *sql;       /* what the mirror runs */
    char *stmt;      /* the client's statement, for the divergence log (normalized there) */
    bool simple;     /* a Query's text: simple protocol (may hold several statements) */
    bool synthetic;  /* BEGIN/COMMIT put around an implicit transaction */
    bool waited;     /* commit: lockstep: the session waits until it is applied */
    bool too_big;    /* COPY: more data than a mirror may hold: not replayed, recorded */
    size_t copy_at;  /* COPY: data (in `sets`) already handed to libpq */
    bool copy_ended; /* COPY: PQputCopyEnd done */
    bool applied;    /* it was applied on the mirror as on the authoritative side */
    /* Parameter sets, each in Bind's wire form: nparams x (int32 len, -1 NULL; bytes). */
    pd_buf_t sets;
    unsigned nsets, nparams;
    int *formats; /* per parameter */
    Oid *types;   /* per parameter; 0 = let the server infer */
    /* The authoritative outcome. */
    bool auth_done, auth_error;
    char auth_tag[64];
    char auth_sqlstate[6];
    /* reads=shadow (`sums`), and the rows a verbatim write returns (`rows`: RETURNING,
       compared when both sides answer in text): both results summed (rows, multiset
       hash, tag). */
    pd_result_sum_t auth_sum, mirror_sum;
    bool sums, rows;
    uint64_t deadline;   /* a shadow read: the loop time (ms) it is cancelled at, 0: none */
    bool timed_out;      /* ...and it was cancelled */
    uint32_t *col_types; /* the authoritative result's column types (RowDescription) */
    unsigned ncols;
    /* The mirror's. */
    size_t set_at; /* offset of the next set in `sets` */
    unsigned sets_sent;
    uint64_t mirror_rows;
    int miss_set; /* row images: the first set that did not touch exactly one row, or -1 */
    char mirror_tag[64];
    char mirror_sqlstate[6];
};

typedef enum { M_CONNECTING, M_READY, M_DEAD } mirror_state_t;

struct pd_mirror {
    pd_server_t *srv;
    pd_mirror_t *prev, *next; /* srv->mirrors */
    pd_session_t *session;    /* NULL once the session ended */
    char tag[200];
    char database[64]; /* the session's */
    pd_backend_t backend;
    uv_poll_t *poll; /* after connect; freed by its close callback */
    int poll_events;
    mirror_state_t state;
    pd_mirror_op_t *head, *tail; /* head is in flight when `busy` */
    unsigned queued;
    size_t queued_bytes;
    bool busy;
    bool in_txn;     /* a transaction the mirror opened is open */
    bool txn_failed; /* ...and a statement in it failed on the mirror */
    bool closing;    /* the session ended: close when the queue is empty */
    bool copying;    /* the head op's COPY data is being sent */
    bool cancelling; /* a cancel of its shadow read is on its way: nothing is sent meanwhile */
    bool orphan;     /* freed while cancelling: the cancel's end frees it */
    bool aa;         /* reads=aa: connected to the authoritative side itself, for A/A reads only */
    unsigned serial; /* which of the server's mirrors this is (pd_mirror_serial) */
    key_node_t **held_nodes; /* rows written in the open transaction: released at its end */
    unsigned nheld, held_cap;
};

/* ---------------------------------------------------------------------------------------
 * Row order across sessions
 *
 * Each session's mirror trails on its own connection, so two sessions' writes to one row
 * could reach the mirror in the other order than they reached the authoritative side.
 * A row image therefore waits until every image of the same rows released before it by
 * another session has been applied and its transaction has ended on the mirror (a row
 * inserted and not yet committed is invisible rather than locked, so waiting for the
 * statement alone would not do). Release order is the order in which the
 * authoritative side answered, which for conflicting writes is the order it applied
 * them. Rows are named by table and key values (wire form).
 */
struct key_node {
    key_node_t *prev, *next; /* the row's queue, oldest first */
    struct key_entry *entry;
    pd_mirror_t *m; /* whose image */
};

typedef struct key_entry {
    struct key_entry *chain;
    uint64_t hash;
    key_node_t *head, *tail;
    size_t len;
    uint8_t key[];
} key_entry_t;

struct pd_mirror_keys {
    key_entry_t **buckets;
    size_t nbuckets; /* a power of two */
    size_t count;
    bool pumping, again;
};

static uint64_t fnv(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

static bool keys_grow(struct pd_mirror_keys *k)
{
    if (k->count < k->nbuckets)
        return true;
    size_t n = k->nbuckets ? k->nbuckets * 2 : 256;
    key_entry_t **b = calloc(n, sizeof *b);
    if (b == NULL)
        return false;
    for (size_t i = 0; i < k->nbuckets; i++)
        while (k->buckets[i] != NULL) {
            key_entry_t *e = k->buckets[i];
            k->buckets[i] = e->chain;
            e->chain = b[e->hash & (n - 1)];
            b[e->hash & (n - 1)] = e;
        }
    free(k->buckets);
    k->buckets = b;
    k->nbuckets = n;
    return true;
}

/* Appends op to the queue of the row named by key[0..len). */
static bool key_join(struct pd_mirror_keys *k, pd_mirror_op_t *op, const uint8_t *key, size_t len,
                     unsigned slot)
{
    if (!keys_grow(k))
        return false;
    uint64_t h = fnv(key, len);
    key_entry_t **pp = &k->buckets[h & (k->nbuckets - 1)];
    key_entry_t *e = *pp;
    while (e != NULL && (e->hash != h || e->len != len || memcmp(e->key, key, len) != 0))
        e = e->chain;
    if (e == NULL) {
        if ((e = calloc(1, sizeof *e + len)) == NULL)
            return false;
        e->hash = h;
        e->len = len;
        memcpy(e->key, key, len);
        e->chain = *pp;
        *pp = e;
        k->count++;
    }
    key_node_t *n = calloc(1, sizeof *n);
    if (n == NULL)
        return false;
    n->entry = e;
    n->m = op->m;
    n->prev = e->tail;
    if (e->tail != NULL)
        e->tail->next = n;
    else
        e->head = n;
    e->tail = n;
    op->nodes[slot] = n;
    return true;
}

static void key_leave(struct pd_mirror_keys *k, key_node_t *n)
{
    key_entry_t *e = n->entry;
    if (n->prev != NULL)
        n->prev->next = n->next;
    else
        e->head = n->next;
    if (n->next != NULL)
        n->next->prev = n->prev;
    else
        e->tail = n->prev;
    free(n);
    if (e->head != NULL)
        return;
    key_entry_t **pp = &k->buckets[e->hash & (k->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->chain;
    *pp = e->chain;
    free(e);
    k->count--;
}

/* May op be applied now: is it first in each of its rows' queues but for ops of its own
   session (which its queue orders anyway)? */
static bool runnable(const pd_mirror_op_t *op)
{
    for (unsigned i = 0; i < op->nnodes; i++)
        for (const key_node_t *n = op->nodes[i]->entry->head; n != op->nodes[i]; n = n->next)
            if (n->m != op->m)
                return false;
    return true;
}

/* Rows an op applied: released now, or at the end of the mirror's open transaction. */
static bool rows_applied(pd_mirror_t *m, pd_mirror_op_t *op)
{
    if (op->nnodes == 0)
        return false;
    if (m->in_txn) {
        if (m->nheld + op->nnodes > m->held_cap) {
            unsigned cap = (m->nheld + op->nnodes) * 2;
            key_node_t **g = realloc(m->held_nodes, cap * sizeof *g);
            if (g == NULL)
                return false; /* they leave with the op: ordering weakens, nothing breaks */
            m->held_nodes = g;
            m->held_cap = cap;
        }
        memcpy(m->held_nodes + m->nheld, op->nodes, op->nnodes * sizeof *op->nodes);
        m->nheld += op->nnodes;
        op->nnodes = 0;
        return false;
    }
    return true;
}

static bool release_held(pd_mirror_t *m)
{
    if (m->nheld == 0)
        return false;
    for (unsigned i = 0; i < m->nheld; i++)
        key_leave(m->srv->mirror_keys, m->held_nodes[i]);
    m->nheld = 0;
    return true;
}

/* ---------------------------------------------------------------------------------------
 * Ops
 */

static void lockstep_settled(pd_mirror_op_t *op);

static void op_free(pd_mirror_op_t *op)
{
    if (op == NULL)
        return;
    if (op->waited)
        lockstep_settled(op);
    for (unsigned i = 0; i < op->nnodes; i++)
        if (op->nodes[i] != NULL)
            key_leave(op->m->srv->mirror_keys, op->nodes[i]);
    free(op->nodes);
    if (op->sums || op->rows) {
        pd_result_sum_free(&op->auth_sum);
        pd_result_sum_free(&op->mirror_sum);
    }
    free(op->col_types);
    pd_sql_result_release(op->r);
    free(op->sql);
    free(op->stmt);
    pd_buf_free(&op->sets);
    free(op->formats);
    free(op->types);
    free(op);
}

static pd_mirror_op_t *op_new(const pd_sql_result_t *r, const char *sql, const char *stmt,
                              uint32_t seq)
{
    pd_mirror_op_t *op = calloc(1, sizeof *op);
    if (op == NULL)
        return NULL;
    pd_buf_init(&op->sets);
    op->seq = seq;
    op->miss_set = -1;
    op->rule = r != NULL ? r->mirror_rule : -1;
    op->sql = strdup(sql);
    op->stmt = strdup(stmt);
    if (r != NULL) {
        op->r = (pd_sql_result_t *)r;
        op->r->refs++;
    }
    if (r != NULL && (r->mirror == PD_MIRROR_SHADOW || r->mirror == PD_MIRROR_WRITE)) {
        /* Row order is not compared: collations and plans may order differently. */
        bool ok = pd_result_sum_init(&op->auth_sum, false);
        if (!ok || !pd_result_sum_init(&op->mirror_sum, false)) {
            if (ok)
                pd_result_sum_free(&op->auth_sum);
            op_free(op);
            return NULL;
        }
        op->sums = r->mirror == PD_MIRROR_SHADOW;
        op->rows = !op->sums;
    }
    if (op->sql == NULL || op->stmt == NULL) {
        op_free(op);
        return NULL;
    }
    return op;
}

static size_t op_bytes(const pd_mirror_op_t *op)
{
    return sizeof *op + strlen(op->sql) + strlen(op->stmt) + op->sets.len;
}

static const char *rule_name(const pd_server_t *srv, int rule)
{
    return rule >= 0 && (unsigned)rule < srv->cfg->rule_count ? srv->cfg->rules[rule].name : "?";
}

static pd_rule_stats_t *rule_stats(pd_server_t *srv, int rule)
{
    return rule >= 0 && (unsigned)rule < srv->stats_count ? &srv->stats[rule] : NULL;
}

/* The key of row image `set` of op as {column: text}, or NULL when it is not known (values
   in binary form, catalog facts gone). */
static json_t *image_key(const pd_server_t *srv, const pd_mirror_op_t *op, unsigned set)
{
    const pd_sql_result_t *r = op->r;
    if (r == NULL || r->mirror != PD_MIRROR_IMAGE || r->image_nkey == 0 || set >= op->nsets ||
        (op->nparams > 0 && op->formats[0] != 0) || srv->facts == NULL || op->rule < 0 ||
        (unsigned)op->rule >= srv->cfg->rule_count)
        return NULL;
    const pd_table_facts_t *f = &srv->facts[op->rule].table;
    char name[256];
    for (; f != NULL; f = f->next)
        if (f->schema != NULL && f->name != NULL && f->nkey == r->image_nkey &&
            snprintf(name, sizeof name, "%s.%s", f->schema, f->name) < (int)sizeof name &&
            strcmp(name, r->image_table) == 0)
            break;
    if (f == NULL)
        return NULL;
    const uint8_t *p = op->sets.data;
    const char *col[op->nparams + 1];
    for (unsigned i = 0; i <= set; i++)
        for (unsigned c = 0; c < op->nparams; c++) {
            int32_t len = wire_len(p);
            col[c] = len < 0 ? NULL : (const char *)p + 4; /* NUL-terminated: set_add */
            p += 4 + (len < 0 ? 0 : (size_t)len + 1);
        }
    json_t *key = json_object();
    for (unsigned k = 0; key != NULL && k < r->image_nkey; k++) {
        const char *v = col[r->image_key[k]];
        if (json_object_set_new(key, f->columns[f->key[k]],
                                v != NULL ? json_string(v) : json_null()) != 0) {
            json_decref(key);
            key = NULL;
        }
    }
    return key;
}

/* A divergence event for op: `kind` says which. */
static void record(pd_server_t *srv, const pd_mirror_op_t *op, const char *kind)
{
    if (op->sums) {
        /* A shadow read that never ran on the mirror is a comparison skipped. */
        pd_rule_stats_t *st = rule_stats(srv, op->rule);
        if (st != NULL)
            st->shadow_skipped++;
        return;
    }
    pd_result_sum_t a = {0}, m = {0};
    if (op->rows) {
        a = op->auth_sum; /* rows and hash; the row state stays the op's */
        m = op->mirror_sum;
    }
    snprintf(a.tag, sizeof a.tag, "%s", op->auth_tag);
    snprintf(a.sqlstate, sizeof a.sqlstate, "%s", op->auth_sqlstate);
    snprintf(m.tag, sizeof m.tag, "%s", op->mirror_tag);
    snprintf(m.sqlstate, sizeof m.sqlstate, "%s", op->mirror_sqlstate);
    bool new_auth = op->rule >= 0 && (unsigned)op->rule < srv->cfg->rule_count &&
                    srv->flags[op->rule].writes == PD_WRITES_DUAL_NEW;
    /* The row concerned, when one is: the image that missed, or a single one unapplied. */
    int set = op->miss_set >= 0 ? op->miss_set : op->nsets == 1 ? 0 : -1;
    pd_divergence_record(srv->divergence, rule_name(srv, op->rule), kind, op->stmt,
                         new_auth ? &m : &a, new_auth ? &a : &m,
                         set >= 0 ? image_key(srv, op, (unsigned)set) : NULL);
    pd_rule_stats_t *st = rule_stats(srv, op->rule);
    if (st == NULL)
        return;
    st->divergence_at = (int64_t)time(NULL);
    if (strcmp(kind, "mirror_unapplied") == 0)
        st->mirror_unapplied++;
    else if (strcmp(kind, "mirror_proxy_error") == 0)
        st->mirror_proxy_errors++;
    else
        st->mirror_diverged++;
}

/* ---------------------------------------------------------------------------------------
 * The mirror connection
 */

static void mirror_pump(pd_mirror_t *m);
static void pump_blocked(pd_server_t *srv);

static void poll_closed(uv_handle_t *h)
{
    free(h);
}

static void mirror_dealloc(pd_mirror_t *m)
{
    free(m->held_nodes);
    free(m);
}

static void mirror_free(pd_mirror_t *m)
{
    if (m->prev != NULL)
        m->prev->next = m->next;
    else if (m->srv->mirrors == m)
        m->srv->mirrors = m->next;
    if (m->next != NULL)
        m->next->prev = m->prev;
    if (m->cancelling) {
        m->orphan = true; /* freed when the cancel is done (shadow_cancel_done) */
        return;
    }
    mirror_dealloc(m);
}

/* ---------------------------------------------------------------------------------------
 * The time budget of shadow reads: one longer than divergence.shadow_budget_ms is
 * cancelled (PQcancel, blocking, on a worker thread) and counted as skipped, so that it
 * does not hold up the writes queued behind it. Nothing is sent on that connection until
 * the cancel request has been delivered: then the signal reaches the backend before any
 * later statement could, and a read that ended meanwhile leaves the cancel to hit an idle
 * backend, which ignores it. Only reads outside a transaction get a budget (a cancel
 * would abort the transaction).
 */
static void shadow_cancel_done(void *arg)
{
    pd_mirror_t *m = arg;
    m->cancelling = false; /* failed, the read just ran its course */
    if (m->orphan) {
        mirror_dealloc(m);
        return;
    }
    mirror_pump(m);
}

static void on_shadow_tick(uv_timer_t *t)
{
    pd_server_t *srv = t->data;
    uint64_t now = uv_now(srv->loop);
    bool pending = false;
    for (pd_mirror_t *m = srv->mirrors; m != NULL; m = m->next) {
        pd_mirror_op_t *op = m->head;
        if (!m->busy || op == NULL || op->deadline == 0 || op->timed_out)
            continue;
        if (now < op->deadline || m->cancelling) {
            pending = true;
            continue;
        }
        if (pd_cancel_dispatch_then(srv->loop, m->backend.conn, m->tag, shadow_cancel_done, m) !=
            0) {
            pending = true; /* tried again at the next tick */
            continue;
        }
        op->timed_out = true;
        m->cancelling = true;
    }
    if (!pending)
        uv_timer_stop(t);
}

/* The head op, a shadow read, is sent: its budget starts. */
static void shadow_budget(pd_mirror_t *m, pd_mirror_op_t *op)
{
    if (!op->sums || m->in_txn || m->srv->cfg->shadow_budget_ms == 0)
        return;
    op->deadline = uv_now(m->srv->loop) + m->srv->cfg->shadow_budget_ms;
    uv_timer_t *t = &m->srv->shadow_timer;
    if (!uv_is_active((uv_handle_t *)t)) {
        uint64_t tick = m->srv->cfg->shadow_budget_ms < 100 ? m->srv->cfg->shadow_budget_ms : 100;
        uv_timer_start(t, on_shadow_tick, tick, tick);
    }
}

/* Ends the connection; every op not applied is recorded. Frees m when the session is gone. */
static void mirror_die(pd_mirror_t *m, const char *why)
{
    if (m->state != M_DEAD && why != NULL)
        pd_log_warning(m->tag, "detached: %s", why);
    m->state = M_DEAD;
    if (m->poll != NULL) {
        uv_close((uv_handle_t *)m->poll, poll_closed);
        m->poll = NULL;
    }
    pd_backend_close(&m->backend);
    release_held(m);
    while (m->head != NULL) {
        pd_mirror_op_t *op = m->head;
        m->head = op->next;
        if (!op->synthetic)
            record(m->srv, op, "mirror_unapplied");
        op_free(op);
    }
    m->tail = NULL;
    m->queued = 0;
    m->queued_bytes = 0;
    m->busy = false;
    pd_server_t *srv = m->srv;
    if (m->session == NULL)
        mirror_free(m);
    else if (m->session->gate_held)
        pd_session_wake(m->session);
    pump_blocked(srv);
}

static void on_poll(uv_poll_t *h, int status, int events);

static void restart_poll(pd_mirror_t *m, int events)
{
    if (m->poll == NULL)
        return;
    m->poll_events = events;
    uv_poll_start(m->poll, events, on_poll);
}

/* Sends the head op's next statement. False when the connection broke. */
static bool send_head(pd_mirror_t *m)
{
    pd_mirror_op_t *op = m->head;
    int ok;
    if (op->simple || op->nparams == 0) {
        ok = PQsendQuery(m->backend.conn, op->sql);
    } else {
        const char *values[op->nparams + 1];
        int lengths[op->nparams + 1];
        const uint8_t *p = op->sets.data + op->set_at;
        for (unsigned i = 0; i < op->nparams; i++) {
            int32_t len = wire_len(p);
            p += 4;
            values[i] = len < 0 ? NULL : (const char *)p;
            lengths[i] = len < 0 ? 0 : len;
            p += len < 0 ? 0 : (size_t)len + 1;
        }
        op->set_at = (size_t)(p - op->sets.data);
        /* Text values are NUL-terminated in place: see set_add. */
        ok = PQsendQueryParams(m->backend.conn, op->sql, (int)op->nparams, op->types, values,
                               lengths, op->formats, 0);
    }
    op->sets_sent++;
    if (!ok)
        return false;
    m->busy = true;
    if (op->sets_sent == 1)
        shadow_budget(m, op);
    int f = PQflush(m->backend.conn);
    if (f < 0)
        return false;
    restart_poll(m, UV_READABLE | (f > 0 ? UV_WRITABLE : 0));
    return true;
}

static void copy_state(char *dst, size_t size, const char *src)
{
    snprintf(dst, size, "%s", src != NULL ? src : "");
}

/* Errors the proxy itself causes on the mirror (statements it never prepared there,
   protocol misuse) are counted apart from data divergence. */
static bool proxy_caused(const char *sqlstate)
{
    return strcmp(sqlstate, "26000") == 0 || strcmp(sqlstate, "08P01") == 0 ||
           strcmp(sqlstate, "34000") == 0 || strcmp(sqlstate, "42P05") == 0 ||
           strcmp(sqlstate, "XX000") == 0;
}

/* The head op's statements are all answered: compare, and move on. */
/* reads=shadow: the two results are compared (row count, multiset hash, tag, error). */
static void finish_shadow(pd_mirror_t *m, pd_mirror_op_t *op, pd_rule_stats_t *st)
{
    pd_result_sum_t *a = &op->auth_sum, *b = &op->mirror_sum;
    copy_state(a->tag, sizeof a->tag, op->auth_tag);
    copy_state(a->sqlstate, sizeof a->sqlstate, op->auth_sqlstate);
    copy_state(b->tag, sizeof b->tag, op->mirror_tag);
    copy_state(b->sqlstate, sizeof b->sqlstate, op->mirror_sqlstate);
    if (op->timed_out && strcmp(op->mirror_sqlstate, "57014") == 0) {
        if (st != NULL)
            st->shadow_skipped++; /* past its time budget: cancelled, not compared */
        return;
    }
    if (st != NULL)
        (*(m->aa ? &st->aa_compared : &st->shadow_compared))++;
    if (pd_result_equal(a, b))
        return;
    /* An A/A difference is noise by definition (nothing was migrated): it is counted and
       logged apart, and does not count against a cutover. */
    if (st != NULL && m->aa)
        st->aa_mismatched++;
    if (st != NULL && !m->aa) {
        st->shadow_mismatched++;
        st->divergence_at = (int64_t)time(NULL);
    }
    pd_log_info(m->tag, "%s read differs for rule \"%s\"", m->aa ? "A/A" : "shadow",
                rule_name(m->srv, op->rule));
    pd_divergence_record(m->srv->divergence, rule_name(m->srv, op->rule),
                         m->aa ? "aa_read" : "shadow_read", op->stmt, a, b, NULL);
}

static bool finish_head(pd_mirror_t *m)
{
    pd_mirror_op_t *op = m->head;
    bool released = rows_applied(m, op);
    if (!m->in_txn)
        released = release_held(m) || released;
    m->head = op->next;
    if (m->head == NULL)
        m->tail = NULL;
    m->queued--;
    m->queued_bytes -= op_bytes(op);
    m->busy = false;
    pd_rule_stats_t *st = rule_stats(m->srv, op->rule);
    if (op->sums) {
        finish_shadow(m, op, st);
        op_free(op);
        return released;
    }
    if (st != NULL && !op->synthetic)
        st->mirrored++;
    if (op->mirror_sqlstate[0] != '\0') {
        if (m->in_txn)
            m->txn_failed = true;
        if (!op->synthetic)
            record(m->srv, op,
                   proxy_caused(op->mirror_sqlstate) ? "mirror_proxy_error" : "mirror_error");
    } else if (op->r != NULL && op->r->mirror == PD_MIRROR_IMAGE) {
        /* Each image row must have touched exactly one row. */
        if (op->mirror_rows != op->nsets) {
            snprintf(op->mirror_tag, sizeof op->mirror_tag, "%llu of %u rows applied",
                     (unsigned long long)op->mirror_rows, op->nsets);
            record(m->srv, op, "write_outcome");
        }
    } else if (!op->synthetic && op->r != NULL &&
               (op->r->mirror == PD_MIRROR_WRITE || op->r->mirror == PD_MIRROR_COPY) &&
               (strcmp(op->auth_tag, op->mirror_tag) != 0 ||
                (op->rows && (op->auth_sum.rows != op->mirror_sum.rows ||
                              op->auth_sum.hash != op->mirror_sum.hash)))) {
        record(m->srv, op, "write_outcome");
    } else {
        op->applied = true;
    }
    if (op->r != NULL && op->r->mirror == PD_MIRROR_IMAGE && op->mirror_rows == op->nsets &&
        op->mirror_sqlstate[0] == '\0')
        op->applied = true;
    op_free(op);
    return released;
}

#define OID_FLOAT4      700
#define OID_FLOAT8      701
#define OID_TIME        1083
#define OID_TIMESTAMP   1114
#define OID_TIMESTAMPTZ 1184
#define OID_TIMETZ      1266

/*
 * Feeds one text value of a row to a summary (int32 length, bytes, as in a DataRow),
 * normalized for what legitimately differs between two servers: float text past 15
 * (float8) or 6 (float4) significant digits, and fractional seconds past milliseconds.
 */
static void feed_value(pd_result_sum_t *sum, uint32_t type, const char *v, int32_t len)
{
    char norm[64];
    if (len >= 0 && (size_t)len < sizeof norm && (type == OID_FLOAT4 || type == OID_FLOAT8)) {
        char text[64];
        memcpy(text, v, (size_t)len);
        text[len] = '\0';
        char *end = NULL;
        double d = strtod(text, &end);
        if (end != NULL && *end == '\0') {
            len = snprintf(norm, sizeof norm, "%.*g", type == OID_FLOAT4 ? 6 : 15, d);
            v = norm;
        }
    } else if (len >= 0 && (size_t)len < sizeof norm &&
               (type == OID_TIME || type == OID_TIMESTAMP || type == OID_TIMESTAMPTZ ||
                type == OID_TIMETZ)) {
        const char *dot = memchr(v, '.', (size_t)len);
        if (dot != NULL) {
            size_t head = (size_t)(dot - v) + 1, digits = 0;
            while (head + digits < (size_t)len && v[head + digits] >= '0' &&
                   v[head + digits] <= '9')
                digits++;
            size_t keep = digits < 3 ? digits : 3;
            memcpy(norm, v, head + keep);
            memcpy(norm + head + keep, v + head + digits, (size_t)len - head - digits);
            len = (int32_t)((size_t)len - (digits - keep));
            v = norm;
        }
    }
    uint8_t h[4] = {(uint8_t)((uint32_t)len >> 24), (uint8_t)((uint32_t)len >> 16),
                    (uint8_t)((uint32_t)len >> 8), (uint8_t)len};
    pd_result_row_feed(sum, h, 4);
    if (len > 0)
        pd_result_row_feed(sum, v, (size_t)len);
}

static void feed_row_head(pd_result_sum_t *sum, unsigned ncols)
{
    uint8_t h[2] = {(uint8_t)(ncols >> 8), (uint8_t)ncols};
    pd_result_row_begin(sum);
    pd_result_row_feed(sum, h, 2);
}

/* The mirror's rows, fed as the authoritative side's DataRows were (text; normalized
   when the authoritative side's column types were known, so that both are alike). */
static void sum_rows(pd_mirror_op_t *op, const PGresult *res)
{
    int nf = PQnfields(res);
    bool typed = op->ncols == (unsigned)nf;
    for (int row = 0; row < PQntuples(res); row++) {
        feed_row_head(&op->mirror_sum, (unsigned)nf);
        for (int f = 0; f < nf; f++)
            feed_value(&op->mirror_sum, typed ? PQftype(res, f) : 0, PQgetvalue(res, row, f),
                       PQgetisnull(res, row, f) ? -1 : PQgetlength(res, row, f));
        pd_result_row_end(&op->mirror_sum);
    }
}

/* The authoritative side's DataRow, normalized with the types of its RowDescription. */
static void sum_data_row(pd_mirror_op_t *op, const uint8_t *body, size_t n)
{
    pd_be_data_row_t row;
    const char *err = NULL;
    if (pd_be_data_row_decode(body, n, &row, &err) != PD_DECODE_OK) {
        pd_result_row_begin(&op->auth_sum);
        pd_result_row_feed(&op->auth_sum, body, n); /* differs from any mirror row */
        pd_result_row_end(&op->auth_sum);
        return;
    }
    feed_row_head(&op->auth_sum, row.ncolumns);
    const uint8_t *p = row.columns;
    for (unsigned i = 0; i < row.ncolumns; i++) {
        int32_t len = wire_len(p);
        p += 4;
        uint32_t type = op->ncols == row.ncolumns ? op->col_types[i] : 0;
        feed_value(&op->auth_sum, type, (const char *)p, len);
        p += len < 0 ? 0 : (size_t)len;
    }
    pd_result_row_end(&op->auth_sum);
}

/* The column types of a shadow read's RowDescription, for normalizing its rows. */
static void note_types(pd_mirror_op_t *op, const uint8_t *body, size_t n)
{
    pd_be_row_description_t d;
    const char *err = NULL;
    if (pd_be_row_description_decode(body, n, &d, &err) != PD_DECODE_OK)
        return;
    uint32_t *types = calloc((size_t)d.nfields + 1, sizeof *types);
    if (types == NULL)
        return;
    const uint8_t *p = d.fields;
    for (unsigned i = 0; i < d.nfields; i++) {
        p += strlen((const char *)p) + 1 + 4 + 2; /* name, table oid, attnum */
        types[i] = get32be(p);
        p += 4 + 2 + 4 + 2; /* type oid, typlen, typmod, format */
    }
    free(op->col_types);
    op->col_types = types;
    op->ncols = d.nfields;
}

/* Hands the head op's COPY data to libpq, as far as the socket takes it; then ends it. */
static void copy_feed(pd_mirror_t *m)
{
    pd_mirror_op_t *op = m->head;
    PGconn *conn = m->backend.conn;
    while (op->copy_at < op->sets.len) {
        size_t n = op->sets.len - op->copy_at;
        int rc = PQputCopyData(conn, (const char *)op->sets.data + op->copy_at,
                               (int)(n < 65536 ? n : 65536));
        if (rc < 0) {
            mirror_die(m, PQerrorMessage(conn));
            return;
        }
        if (rc == 0) {
            restart_poll(m, UV_READABLE | UV_WRITABLE); /* resumed when writable */
            return;
        }
        op->copy_at += n < 65536 ? n : 65536;
    }
    if (!op->copy_ended) {
        int rc = PQputCopyEnd(conn, NULL);
        if (rc < 0) {
            mirror_die(m, PQerrorMessage(conn));
            return;
        }
        if (rc == 0) {
            restart_poll(m, UV_READABLE | UV_WRITABLE);
            return;
        }
        op->copy_ended = true;
    }
    int f = PQflush(conn);
    if (f < 0) {
        mirror_die(m, PQerrorMessage(conn));
        return;
    }
    m->copying = false;
    restart_poll(m, UV_READABLE | (f > 0 ? UV_WRITABLE : 0));
}

static void read_results(pd_mirror_t *m)
{
    if (!PQconsumeInput(m->backend.conn)) {
        mirror_die(m, PQerrorMessage(m->backend.conn));
        return;
    }
    /* The session's LISTENs are kept in step here: what NOTIFY sends on this side while
       it is the authoritative one (after a switchover the session may still be on the
       other) goes to the client. An A/A connection is on the session's own side, which
       notifies the session itself. */
    PGnotify *note;
    while ((note = PQnotifies(m->backend.conn)) != NULL) {
        if (m->session != NULL && !m->aa && pd_session_hears_mirror(m->session))
            pd_session_notify(m->session, (uint32_t)note->be_pid, note->relname, note->extra);
        PQfreemem(note);
    }
    while (m->busy && !PQisBusy(m->backend.conn)) {
        PGresult *res = PQgetResult(m->backend.conn);
        pd_mirror_op_t *op = m->head;
        if (res == NULL) {
            /* One statement (or query string) answered. */
            if (op->sets_sent < (op->nsets > 0 ? op->nsets : 1) && op->mirror_sqlstate[0] == '\0') {
                if (!send_head(m)) {
                    mirror_die(m, PQerrorMessage(m->backend.conn));
                    return;
                }
                continue;
            }
            pd_server_t *srv = m->srv;
            bool gated = finish_head(m);
            mirror_pump(m); /* may free m */
            if (gated)
                pump_blocked(srv);
            return;
        }
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_FATAL_ERROR || st == PGRES_NONFATAL_ERROR) {
            if (op->mirror_sqlstate[0] == '\0')
                copy_state(op->mirror_sqlstate, sizeof op->mirror_sqlstate,
                           PQresultErrorField(res, PG_DIAG_SQLSTATE));
            if (op->miss_set < 0 && op->nsets > 0)
                op->miss_set = (int)op->sets_sent - 1;
        } else if (st == PGRES_COPY_IN && op->r != NULL && op->r->mirror == PD_MIRROR_COPY) {
            PQclear(res);
            m->copying = true;
            copy_feed(m); /* may die */
            return;
        } else if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            PQclear(res);
            mirror_die(m, "the mirror started a COPY the proxy cannot feed");
            return;
        } else {
            if ((op->sums || op->rows) && st == PGRES_TUPLES_OK)
                sum_rows(op, res);
            copy_state(op->mirror_tag, sizeof op->mirror_tag, PQcmdStatus(res));
            const char *tuples = PQcmdTuples(res);
            uint64_t n = tuples != NULL && tuples[0] != '\0' ? strtoull(tuples, NULL, 10) : 0;
            op->mirror_rows += n;
            if (n != 1 && op->miss_set < 0 && op->nsets > 0 && op->r != NULL &&
                op->r->mirror == PD_MIRROR_IMAGE)
                op->miss_set = (int)op->sets_sent - 1;
        }
        PQclear(res);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    pd_mirror_t *m = h->data;
    if (status < 0) {
        mirror_die(m, uv_strerror(status));
        return;
    }
    if ((events & UV_WRITABLE) && m->copying) {
        copy_feed(m);
        if (m->state == M_DEAD || m->copying)
            return;
    } else if (events & UV_WRITABLE) {
        int f = PQflush(m->backend.conn);
        if (f < 0) {
            mirror_die(m, PQerrorMessage(m->backend.conn));
            return;
        }
        restart_poll(m, UV_READABLE | (f > 0 ? UV_WRITABLE : 0));
    }
    if (events & UV_READABLE)
        read_results(m);
}

/* After ops left the rows' queues: mirrors whose next op waited may go on. */
static void pump_blocked(pd_server_t *srv)
{
    struct pd_mirror_keys *k = srv->mirror_keys;
    if (k == NULL)
        return;
    if (k->pumping) {
        k->again = true;
        return;
    }
    k->pumping = true;
    do {
        k->again = false;
        pd_mirror_t *next;
        for (pd_mirror_t *m = srv->mirrors; m != NULL; m = next) {
            next = m->next;
            if (m->state == M_READY && !m->busy && m->head != NULL && m->head->nnodes > 0)
                mirror_pump(m);
        }
    } while (k->again);
    k->pumping = false;
}

/* Sends the next op when nothing is in flight; closes a drained mirror of a gone session. */
static void mirror_pump(pd_mirror_t *m)
{
    if (m->state != M_READY || m->busy || m->cancelling)
        return;
    while (m->head != NULL) {
        pd_mirror_op_t *op = m->head;
        if (!runnable(op))
            return; /* another session's image of the same row goes first */
        /* Inside a transaction that failed on the mirror nothing applies until its end. */
        bool ends_txn = op->r != NULL && op->r->mirror == PD_MIRROR_TXN && op->r->txn == PD_TXN_END;
        if (m->txn_failed && !ends_txn && !(op->synthetic && strcmp(op->sql, "COMMIT") == 0)) {
            m->head = op->next;
            if (m->head == NULL)
                m->tail = NULL;
            m->queued--;
            m->queued_bytes -= op_bytes(op);
            if (!op->synthetic)
                record(m->srv, op, "mirror_unapplied");
            op_free(op);
            continue;
        }
        if ((ends_txn || (op->synthetic && strcmp(op->sql, "COMMIT") == 0)) && m->txn_failed) {
            free(op->sql);
            op->sql = strdup("ROLLBACK");
            if (op->sql == NULL) {
                mirror_die(m, "out of memory");
                return;
            }
        }
        if (ends_txn || (op->synthetic && strcmp(op->sql, "BEGIN") != 0)) {
            m->in_txn = false;
            m->txn_failed = false;
        } else if ((op->r != NULL && op->r->mirror == PD_MIRROR_TXN &&
                    op->r->txn == PD_TXN_BEGIN) ||
                   (op->synthetic && strcmp(op->sql, "BEGIN") == 0)) {
            m->in_txn = true;
        }
        if (!send_head(m))
            mirror_die(m, PQerrorMessage(m->backend.conn));
        return;
    }
    if (m->closing) {
        m->session = NULL;
        mirror_die(m, NULL);
        return;
    }
    /* Caught up: a session waiting to change sides may go on. */
    if (m->session != NULL && m->session->gate_held)
        pd_session_wake(m->session);
}

static void on_connected(pd_backend_t *b, void *owner, const char *err, const char *sqlstate)
{
    pd_mirror_t *m = owner;
    (void)b;
    (void)sqlstate;
    if (err != NULL) {
        mirror_die(m, err);
        return;
    }
    if (PQsetnonblocking(m->backend.conn, 1) != 0) {
        mirror_die(m, "could not make the mirror connection non-blocking");
        return;
    }
    m->poll = malloc(sizeof *m->poll);
    if (m->poll == NULL ||
        uv_poll_init_socket(m->srv->loop, m->poll, PQsocket(m->backend.conn)) != 0) {
        free(m->poll);
        m->poll = NULL;
        mirror_die(m, "could not watch the mirror socket");
        return;
    }
    m->poll->data = m;
    m->state = M_READY;
    pd_log_info(m->tag, "connected (backend pid %d)", PQbackendPID(m->backend.conn));
    restart_poll(m, UV_READABLE);
    mirror_pump(m);
}

static bool writes_mirrored(pd_writes_t w)
{
    return w == PD_WRITES_DUAL || w == PD_WRITES_DUAL_NEW;
}

static bool flags_mirror_writes(const pd_rule_flags_t *f)
{
    return writes_mirrored(f->writes);
}

static bool flags_aa(const pd_rule_flags_t *f)
{
    return f->reads.mode == PD_READS_AA;
}

/* Does some tables rule of the database have flags for which pred holds? */
static bool any_tables_rule(const pd_server_t *srv, const char *database,
                            bool (*pred)(const pd_rule_flags_t *))
{
    for (unsigned i = 0; i < srv->cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &srv->cfg->rules[i];
        if (r->kind == PD_RULE_TABLES && strcmp(r->database, database) == 0 && pred(&srv->flags[i]))
            return true;
    }
    return false;
}

bool pd_mirror_db_active(const pd_server_t *srv, const char *database)
{
    return any_tables_rule(srv, database, flags_mirror_writes);
}

bool pd_mirror_db_aa(const pd_server_t *srv, const char *database)
{
    return any_tables_rule(srv, database, flags_aa);
}

/* Should a session's second connection be an A/A one (to its own side)? The flag checks
   allow reads=aa only while no rule of the database mirrors writes. */
static bool wants_aa(const pd_server_t *srv, const char *database)
{
    return !pd_mirror_db_active(srv, database) && pd_mirror_db_aa(srv, database);
}

static pd_mirror_t *mirror_open(pd_session_t *s)
{
    const pd_database_cfg_t *db = pd_config_database(s->srv->cfg, s->database);
    static unsigned serials;
    pd_mirror_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return NULL;
    m->serial = ++serials;
    m->srv = s->srv;
    m->session = s;
    snprintf(m->tag, sizeof m->tag, "%.180s mirror", s->tag);
    snprintf(m->database, sizeof m->database, "%s", s->database);
    m->next = s->srv->mirrors;
    if (m->next != NULL)
        m->next->prev = m;
    s->srv->mirrors = m;
    const pd_auth_entry_t *entry = pd_server_auth_entry(s->srv, s->user);
    pd_backend_params_t params = {
        .user = s->user,
        .password = entry != NULL && !entry->user->is_scram ? entry->user->secret : NULL,
        .nparams = s->nparams,
        .names = (const char *const *)s->names,
        .values = (const char *const *)s->values,
    };
    char err[512];
    /* The mirror is the side the session does not talk to; for A/A reads, the same side. */
    m->aa = wants_aa(s->srv, s->database);
    const char *target = db == NULL ? NULL : (pd_session_on_new(s) != m->aa) ? db->old : db->new;
    if (target == NULL || pd_backend_connect(&m->backend, s->srv->loop, target, &params,
                                             on_connected, m, err, sizeof err) != 0) {
        m->state = M_DEAD;
        pd_log_warning(m->tag, "detached: %s",
                       target == NULL ? "the database has no new side" : err);
    }
    return m;
}

/* Puts an image op in the queues of the rows it writes. False when out of memory. */
static bool gate(pd_mirror_t *m, pd_mirror_op_t *op)
{
    const pd_sql_result_t *r = op->r;
    if (r == NULL || r->mirror != PD_MIRROR_IMAGE || r->image_nkey == 0 || op->nsets == 0)
        return true;
    if (m->srv->mirror_keys == NULL &&
        (m->srv->mirror_keys = calloc(1, sizeof *m->srv->mirror_keys)) == NULL)
        return false;
    op->nodes = calloc(op->nsets, sizeof *op->nodes);
    if (op->nodes == NULL)
        return false;
    op->nnodes = op->nsets;
    pd_buf_t key;
    pd_buf_init(&key);
    const uint8_t *p = op->sets.data;
    bool ok = true;
    for (unsigned set = 0; set < op->nsets && ok; set++) {
        const uint8_t *col[op->nparams + 1];
        for (unsigned i = 0; i < op->nparams; i++) {
            col[i] = p;
            int32_t len = wire_len(p);
            p += 4 + (len < 0 ? 0 : (size_t)len + 1);
        }
        pd_buf_reset(&key);
        pd_buf_put_str(&key, r->image_table);
        for (unsigned k = 0; k < r->image_nkey; k++) {
            const uint8_t *c = col[r->image_key[k]];
            int32_t len = wire_len(c);
            pd_buf_put(&key, c, 4 + (len < 0 ? 0 : (size_t)len));
        }
        ok = pd_buf_ok(&key) && key_join(m->srv->mirror_keys, op, key.data, key.len, set);
    }
    pd_buf_free(&key);
    return ok;
}

/* Queues an op; past the bound the mirror is detached (everything recorded). */
static void mirror_push(pd_mirror_t *m, pd_mirror_op_t *op)
{
    if (m->state == M_DEAD) {
        if (!op->synthetic)
            record(m->srv, op, "mirror_unapplied");
        op_free(op);
        return;
    }
    if (m->queued + 1 > QUEUE_MAX_OPS || m->queued_bytes + op_bytes(op) > QUEUE_MAX_BYTES) {
        if (m->tail != NULL)
            m->tail->next = op;
        else
            m->head = op;
        m->tail = op;
        m->busy = false;
        mirror_die(m, "its queue is full (the new database is too slow or stuck)");
        return;
    }
    op->m = m;
    if (!gate(m, op)) {
        record(m->srv, op, "mirror_unapplied");
        op_free(op);
        mirror_die(m, "out of memory");
        return;
    }
    if (m->tail != NULL)
        m->tail->next = op;
    else
        m->head = op;
    m->tail = op;
    m->queued++;
    m->queued_bytes += op_bytes(op);
    mirror_pump(m);
}

/* ---------------------------------------------------------------------------------------
 * The session's side
 */

static bool expect_push(pd_session_mirror_t *sm, pd_expect_t e)
{
    if (sm->exp_count == sm->exp_cap) {
        unsigned cap = sm->exp_cap ? sm->exp_cap * 2 : 16;
        if (cap > 1u << 20)
            return false;
        pd_expect_t *ring = malloc(cap * sizeof *ring);
        if (ring == NULL)
            return false;
        for (unsigned i = 0; i < sm->exp_count; i++)
            ring[i] = sm->expects[(sm->exp_head + i) % sm->exp_cap];
        free(sm->expects);
        sm->expects = ring;
        sm->exp_cap = cap;
        sm->exp_head = 0;
    }
    sm->expects[(sm->exp_head + sm->exp_count) % sm->exp_cap] = e;
    sm->exp_count++;
    return true;
}

static pd_expect_t *expect_front(pd_session_mirror_t *sm, uint32_t seq)
{
    if (sm->exp_count == 0 || sm->expects[sm->exp_head].seq != seq)
        return NULL;
    return &sm->expects[sm->exp_head];
}

static void expect_pop(pd_session_mirror_t *sm)
{
    sm->exp_head = (sm->exp_head + 1) % sm->exp_cap;
    sm->exp_count--;
}

static void hold(pd_session_mirror_t *sm, pd_mirror_op_t *op)
{
    if (sm->held_tail != NULL)
        sm->held_tail->next = op;
    else
        sm->held = op;
    sm->held_tail = op;
}

static pd_expect_t image_expect(const pd_sql_result_t *r, uint8_t kind, uint32_t seq)
{
    pd_expect_t e = {.seq = seq, .kind = kind, .client_rows = true};
    if (r != NULL && r->mirror == PD_MIRROR_IMAGE) {
        e.image = true;
        e.strip = r->image_cols;
        e.client_rows = r->client_cols >= 0;
    }
    return e;
}

/* reads=shadow: a sampled share of the reads that have a shadow plan is compared. */
static bool sample(pd_session_t *s, const pd_sql_result_t *r)
{
    if (r->mirror != PD_MIRROR_SHADOW)
        return true;
    double p = s->srv->cfg->shadow_sample;
    if (p >= 1.0 || (double)random() / ((double)RAND_MAX + 1.0) < p)
        return true;
    pd_rule_stats_t *st = rule_stats(s->srv, r->mirror_rule);
    if (st != NULL)
        st->shadow_skipped++;
    return false;
}

bool pd_mirror_on_query(pd_session_t *s, const pd_sql_result_t *r, const char *sent,
                        const char *original, uint32_t seq)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_expect_t e = image_expect(r, 'Q', seq);
    bool committed = r->mirror == PD_MIRROR_TXN && r->txn == PD_TXN_END && sm->skip_end;
    if (committed)
        sm->skip_end = false; /* the mirror committed first (lockstep) */
    if (r->mirror != PD_MIRROR_NONE && r->action != PD_SQL_REFUSE && !committed && sample(s, r)) {
        const char *sql = r->mirror == PD_MIRROR_IMAGE ? r->image_sql
                          : r->mirror_original         ? original
                                                       : sent;
        pd_mirror_op_t *op = op_new(r, sql, original, seq);
        if (op == NULL)
            return false;
        op->simple = r->mirror != PD_MIRROR_IMAGE;
        if (r->mirror == PD_MIRROR_IMAGE) {
            op->nparams = r->image_cols;
            op->formats = calloc(op->nparams + 1, sizeof *op->formats);
            op->types = calloc(op->nparams + 1, sizeof *op->types);
            if (op->formats == NULL || op->types == NULL) {
                op_free(op);
                return false;
            }
            memcpy(op->types, r->image_types, op->nparams * sizeof *op->types);
        }
        e.op = op;
        e.shadow = op->sums || op->rows;
        if (r->mirror == PD_MIRROR_COPY)
            sm->copy_op = op; /* the client's CopyData is kept for it */
        hold(sm, op);
    }
    return expect_push(sm, e);
}

bool pd_mirror_bind_needs_whole(const pd_sql_result_t *r)
{
    return r != NULL && r->mirror != PD_MIRROR_NONE && r->action != PD_SQL_REFUSE;
}

/*
 * Appends ncols values in wire form (int32 len, -1 NULL; bytes) to a parameter set, each
 * non-NULL value followed by a NUL so that libpq can take text values in place. Returns
 * the end of the values read, or NULL when out of memory.
 */
static const uint8_t *set_add(pd_buf_t *set, const uint8_t *p, unsigned ncols)
{
    for (unsigned i = 0; i < ncols; i++) {
        int32_t len = wire_len(p);
        pd_buf_put(set, p, 4);
        p += 4;
        if (len >= 0) {
            pd_buf_put(set, p, (size_t)len);
            pd_buf_put_u8(set, 0);
            p += len;
        }
    }
    return pd_buf_ok(set) ? p : NULL;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* The Bind's result formats extended with text for the image columns, when the client
   gave one per column (PostgreSQL wants as many as the statement returns). */
static bool extend_formats(const pd_fe_bind_t *b, const uint8_t *body, unsigned extra,
                           uint8_t **out, size_t *out_len)
{
    static const uint8_t text[2] = {0, 0};
    size_t head = (size_t)(b->result_formats - body) - 2; /* up to the formats' count */
    pd_buf_t m;
    pd_buf_init(&m);
    size_t start = pd_buf_begin_msg(&m, PD_FE_BIND);
    pd_buf_put(&m, body, head);
    pd_buf_put_u16(&m, (uint16_t)(b->nresult_formats + extra));
    pd_buf_put(&m, b->result_formats, 2u * b->nresult_formats);
    for (unsigned i = 0; i < extra; i++)
        pd_buf_put(&m, text, 2);
    pd_buf_end_msg(&m, start);
    if (!pd_buf_ok(&m)) {
        pd_buf_free(&m);
        return false;
    }
    *out = m.data; /* the caller owns it now */
    *out_len = m.len;
    return true;
}

/* A bound portal: its statement's plan (for Describe P and Execute) and its replay. */
typedef struct pd_portal {
    struct pd_portal *next;
    char *name;
    pd_sql_result_t *plan; /* referenced, or NULL */
    pd_mirror_op_t *op;    /* taken by the portal's first Execute */
} pd_portal_t;

#define PORTALS_KEPT 64 /* named portals a client leaves open: the oldest are forgotten */

static void portal_free(pd_portal_t *p)
{
    free(p->name);
    pd_sql_result_release(p->plan);
    op_free(p->op);
    free(p);
}

static pd_portal_t *portal_find(pd_session_mirror_t *sm, const char *name)
{
    for (pd_portal_t *p = sm->portals; p != NULL; p = p->next)
        if (strcmp(p->name, name) == 0)
            return p;
    return NULL;
}

/* The portal `name` bound anew to plan r (NULL when out of memory). */
static pd_portal_t *portal_bind(pd_session_mirror_t *sm, const char *name, const pd_sql_result_t *r)
{
    pd_portal_t **pp = &sm->portals, *last = NULL;
    unsigned n = 0;
    while (*pp != NULL) {
        if (strcmp((*pp)->name, name) == 0) {
            pd_portal_t *old = *pp;
            *pp = old->next;
            portal_free(old);
            sm->nportals--;
            continue;
        }
        last = *pp;
        pp = &(*pp)->next;
        n++;
    }
    if (n >= PORTALS_KEPT && last != NULL) { /* forget the oldest (at the tail) */
        pd_portal_t **q = &sm->portals;
        while (*q != last)
            q = &(*q)->next;
        *q = NULL;
        portal_free(last);
        sm->nportals--;
    }
    pd_portal_t *p = calloc(1, sizeof *p);
    if (p == NULL || (p->name = strdup(name)) == NULL) {
        free(p);
        return NULL;
    }
    if (r != NULL) {
        p->plan = (pd_sql_result_t *)r;
        p->plan->refs++;
    }
    p->next = sm->portals;
    sm->portals = p;
    sm->nportals++;
    return p;
}

bool pd_mirror_on_bind(pd_session_t *s, const pd_sql_result_t *r, const char *stmt_sql,
                       const char *sent, const uint32_t *types, uint16_t ntypes,
                       const uint8_t *body, size_t n, uint8_t **rewritten, size_t *rewritten_len)
{
    pd_session_mirror_t *sm = &s->mir;
    *rewritten = NULL;
    pd_fe_bind_t b;
    const char *err = NULL;
    if (memchr(body, 0, n) == NULL)
        return true; /* malformed: the server says so */
    pd_portal_t *portal = portal_bind(sm, (const char *)body, r);
    if (portal == NULL)
        return false;
    if (!pd_mirror_bind_needs_whole(r))
        return true;
    if (pd_fe_bind_decode(body, n, &b, &err) != PD_DECODE_OK)
        return true; /* the server reports the malformed Bind; nothing to replay */
    if (r->mirror == PD_MIRROR_SHADOW) {
        /* Compared as text only, and only a sampled share. */
        for (unsigned i = 0; i < b.nresult_formats; i++)
            if (get16(b.result_formats + 2 * i) != 0)
                return true;
        if (!sample(s, r))
            return true;
    }
    sm->image_format = b.nresult_formats == 1 ? (int)get16(b.result_formats) : 0;
    if (r->mirror == PD_MIRROR_IMAGE && b.nresult_formats > 1 &&
        !extend_formats(&b, body, r->image_cols, rewritten, rewritten_len))
        return false;
    bool image = r->mirror == PD_MIRROR_IMAGE;
    pd_mirror_op_t *op = op_new(r,
                                image                ? r->image_sql
                                : r->mirror_original ? stmt_sql
                                                     : sent,
                                stmt_sql, 0);
    if (op == NULL)
        return false;
    for (unsigned i = 0; op->rows && i < b.nresult_formats; i++)
        if (get16(b.result_formats + 2 * i) != 0) {
            /* Rows in binary form are not compared (the mirror's come as text). */
            pd_result_sum_free(&op->auth_sum);
            pd_result_sum_free(&op->mirror_sum);
            op->rows = false;
        }
    op->nparams = image ? r->image_cols : b.nparams;
    op->formats = calloc(op->nparams + 1, sizeof *op->formats);
    op->types = calloc(op->nparams + 1, sizeof *op->types);
    if (op->formats == NULL || op->types == NULL) {
        op_free(op);
        return false;
    }
    if (image) {
        memcpy(op->types, r->image_types, op->nparams * sizeof *op->types);
        for (unsigned i = 0; i < op->nparams; i++)
            op->formats[i] = sm->image_format;
    } else {
        for (unsigned i = 0; i < op->nparams; i++) {
            op->types[i] = i < ntypes ? types[i] : 0;
            op->formats[i] = b.nformats == 0   ? 0
                             : b.nformats == 1 ? get16(b.formats)
                                               : get16(b.formats + 2 * (i < b.nformats ? i : 0));
        }
        /* One parameter set, as the client sent it. */
        op->nsets = 1;
        if (set_add(&op->sets, b.params, b.nparams) == NULL) {
            op_free(op);
            return false;
        }
    }
    portal->op = op;
    return true;
}

bool pd_mirror_on_execute(pd_session_t *s, const uint8_t *body, size_t n, uint32_t seq)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_portal_t *portal = memchr(body, 0, n) != NULL ? portal_find(sm, (const char *)body) : NULL;
    pd_expect_t e = image_expect(portal != NULL ? portal->plan : NULL, 'E', seq);
    if (portal != NULL && portal->op != NULL && portal->plan != NULL &&
        portal->plan->mirror == PD_MIRROR_TXN && portal->plan->txn == PD_TXN_END && sm->skip_end) {
        sm->skip_end = false; /* the mirror committed first (lockstep) */
        op_free(portal->op);
        portal->op = NULL;
    }
    if (portal != NULL && portal->op != NULL) {
        pd_mirror_op_t *op = portal->op;
        portal->op = NULL;
        e.shadow = op->sums || op->rows;
        op->seq = seq;
        e.op = op;
        if (op->r != NULL && op->r->mirror == PD_MIRROR_COPY)
            sm->copy_op = op;
        hold(sm, op);
    }
    return expect_push(sm, e);
}

bool pd_mirror_on_describe(pd_session_t *s, uint8_t kind, const char *name,
                           const pd_sql_result_t *r, uint32_t seq)
{
    pd_session_mirror_t *sm = &s->mir;
    const pd_portal_t *portal = kind == 'P' ? portal_find(sm, name) : NULL;
    const pd_sql_result_t *plan = kind == 'S' ? r : portal != NULL ? portal->plan : NULL;
    return expect_push(sm, image_expect(plan, 'D', seq));
}

bool pd_mirror_wants(const pd_session_t *s, uint8_t type)
{
    const pd_session_mirror_t *sm = &s->mir;
    if (sm->exp_count == 0)
        return false;
    switch (type) {
    case PD_BE_ROW_DESCRIPTION:
    case PD_BE_NO_DATA:
    case PD_BE_COMMAND_COMPLETE:
    case PD_BE_ERROR:
    case PD_BE_EMPTY_QUERY:
    case PD_BE_PORTAL_SUSPENDED:
        return true;
    case PD_BE_DATA_ROW:
        return sm->expects[sm->exp_head].image || sm->expects[sm->exp_head].shadow;
    default:
        return false;
    }
}

/* A whole message of the type with the body, malloc'd (pd_buf's framing); NULL when out
   of memory. */
static uint8_t *message(uint8_t type, const uint8_t *body, size_t n, size_t *len)
{
    pd_buf_t b;
    pd_buf_init(&b);
    size_t start = pd_buf_begin_msg(&b, type);
    pd_buf_put(&b, body, n);
    pd_buf_end_msg(&b, start);
    if (!pd_buf_ok(&b)) {
        pd_buf_free(&b);
        return NULL;
    }
    *len = b.len;
    return b.data; /* the caller owns it now */
}

/* A RowDescription without its last `strip` fields. */
static int strip_description(const uint8_t *body, size_t n, unsigned strip, uint8_t **out,
                             size_t *out_len)
{
    pd_be_row_description_t d;
    const char *err = NULL;
    if (pd_be_row_description_decode(body, n, &d, &err) != PD_DECODE_OK || d.nfields < strip)
        return 0; /* not ours to judge: pass it on */
    const uint8_t *p = d.fields;
    for (unsigned i = 0; i + strip < d.nfields; i++)
        p += strlen((const char *)p) + 1 + 18;
    size_t keep = (size_t)(p - body);
    uint8_t *msg = message(PD_BE_ROW_DESCRIPTION, body, keep, out_len);
    if (msg == NULL)
        return -1;
    uint16_t count = (uint16_t)(d.nfields - strip);
    msg[5] = (uint8_t)(count >> 8);
    msg[6] = (uint8_t)count;
    *out = msg;
    return 2;
}

/* Keeps the last `strip` columns of a DataRow as a parameter set of op; *out is the row
   without them (or nothing when the client has no rows of its own). */
static int take_image(pd_mirror_op_t *op, const pd_expect_t *e, const uint8_t *body, size_t n,
                      uint8_t **out, size_t *out_len)
{
    pd_be_data_row_t row;
    const char *err = NULL;
    if (pd_be_data_row_decode(body, n, &row, &err) != PD_DECODE_OK || row.ncolumns < e->strip)
        return 0;
    const uint8_t *p = row.columns;
    const uint8_t *cut = NULL;
    for (unsigned i = 0; i < row.ncolumns; i++) {
        if (i + e->strip == row.ncolumns)
            cut = p;
        int32_t len = wire_len(p);
        p += 4 + (len < 0 ? 0 : (size_t)len);
    }
    if (cut == NULL)
        cut = p;
    if (op != NULL) {
        op->nsets++;
        if (set_add(&op->sets, cut, e->strip) == NULL)
            return -1;
    }
    if (!e->client_rows)
        return 1;
    uint8_t *msg = message(PD_BE_DATA_ROW, body, (size_t)(cut - body), out_len);
    if (msg == NULL)
        return -1;
    uint16_t count = (uint16_t)(row.ncolumns - e->strip);
    msg[5] = (uint8_t)(count >> 8);
    msg[6] = (uint8_t)count;
    *out = msg;
    return 2;
}

static void note_outcome(pd_mirror_op_t *op, uint8_t type, const uint8_t *body, size_t n)
{
    const char *err = NULL;
    if (op == NULL)
        return;
    if (type == PD_BE_COMMAND_COMPLETE) {
        const char *tag = NULL;
        if (pd_be_command_complete_decode(body, n, &tag, &err) == PD_DECODE_OK)
            copy_state(op->auth_tag, sizeof op->auth_tag, tag);
    } else if (type == PD_BE_ERROR) {
        pd_be_error_t e;
        op->auth_error = true;
        if (pd_be_error_decode(body, n, &e, &err) == PD_DECODE_OK)
            copy_state(op->auth_sqlstate, sizeof op->auth_sqlstate, e.sqlstate);
    }
}

int pd_mirror_on_server(pd_session_t *s, uint32_t seq, uint8_t type, const uint8_t *body, size_t n,
                        uint8_t **out, size_t *out_len)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_expect_t *e = expect_front(sm, seq);
    if (e == NULL)
        return 0;
    switch (type) {
    case PD_BE_ROW_DESCRIPTION: {
        if (e->shadow && e->op != NULL)
            note_types(e->op, body, n);
        if (!e->image) {
            if (e->kind == 'D')
                expect_pop(sm);
            return 0;
        }
        int rc;
        if (e->client_rows)
            rc = strip_description(body, n, e->strip, out, out_len);
        else if (e->kind == 'D')
            rc = (*out = message(PD_BE_NO_DATA, NULL, 0, out_len)) != NULL ? 2 : -1;
        else
            rc = 1;
        if (e->kind == 'D')
            expect_pop(sm);
        return rc;
    }
    case PD_BE_NO_DATA:
        if (e->kind == 'D')
            expect_pop(sm);
        return 0;
    case PD_BE_DATA_ROW:
        if (e->shadow && e->op != NULL) {
            sum_data_row(e->op, body, n);
            return 0;
        }
        return e->image && e->kind != 'D' ? take_image(e->op, e, body, n, out, out_len) : 0;
    case PD_BE_COMMAND_COMPLETE:
    case PD_BE_EMPTY_QUERY:
    case PD_BE_PORTAL_SUSPENDED:
    case PD_BE_ERROR:
        note_outcome(e->op, type, body, n);
        if (e->op != NULL && type != PD_BE_ERROR)
            e->op->auth_done = true;
        if (e->kind != 'Q')
            expect_pop(sm);
        return 0;
    default:
        return 0;
    }
}

/* Takes the held ops of batch seq, in order. */
static pd_mirror_op_t *take_held(pd_session_mirror_t *sm, uint32_t seq)
{
    pd_mirror_op_t *first = NULL, **link = &first;
    while (sm->held != NULL && sm->held->seq == seq) {
        pd_mirror_op_t *op = sm->held;
        sm->held = op->next;
        op->next = NULL;
        *link = op;
        link = &op->next;
    }
    if (sm->held == NULL)
        sm->held_tail = NULL;
    return first;
}

static bool is_write(const pd_mirror_op_t *op)
{
    return op->r != NULL && (op->r->mirror == PD_MIRROR_WRITE || op->r->mirror == PD_MIRROR_IMAGE ||
                             op->r->mirror == PD_MIRROR_COPY);
}

static pd_mirror_op_t *synthetic(const char *sql, const pd_mirror_op_t *like)
{
    pd_mirror_op_t *op = op_new(NULL, sql, sql, like->seq);
    if (op != NULL) {
        op->synthetic = true;
        op->simple = true;
        op->rule = like->rule;
    }
    return op;
}

/* commit and on_failure concern mirrored writes; an A/A connection has none. */
static bool rule_lockstep(const pd_server_t *srv, int rule)
{
    return rule >= 0 && (unsigned)rule < srv->cfg->rule_count &&
           srv->cfg->rules[rule].commit == PD_COMMIT_LOCKSTEP &&
           writes_mirrored(srv->flags[rule].writes);
}

static bool rule_fails(const pd_server_t *srv, int rule)
{
    return rule >= 0 && (unsigned)rule < srv->cfg->rule_count &&
           srv->cfg->rules[rule].on_failure == PD_ON_FAILURE_FAIL &&
           writes_mirrored(srv->flags[rule].writes);
}

/* A lockstep op the session waits for is applied, failed or dropped. */
static void lockstep_settled(pd_mirror_op_t *op)
{
    op->waited = false;
    pd_session_t *s = op->m != NULL ? op->m->session : NULL;
    if (s == NULL)
        return;
    pd_session_mirror_t *sm = &s->mir;
    if (!op->applied && rule_fails(s->srv, op->rule))
        sm->poisoned = true;
    if (sm->waiting > 0 && --sm->waiting == 0)
        pd_session_wake(s);
}

/* Queues op; under lockstep the session waits for it. */
#define SHADOW_MAX_LAG 64 /* statements a mirror may trail by and still take a shadow read */

static void push_release(pd_session_t *s, pd_mirror_t *m, pd_mirror_op_t *op)
{
    if (op->sums) {
        /* Off the client's critical path, within a budget: a mirror that trails is not
           given more to do; the comparison is counted as skipped. */
        if (m->state == M_DEAD || m->queued >= SHADOW_MAX_LAG) {
            pd_rule_stats_t *st = rule_stats(s->srv, op->rule);
            if (st != NULL)
                st->shadow_skipped++;
            op_free(op);
            return;
        }
        mirror_push(m, op);
        return;
    }
    if (rule_lockstep(s->srv, op->rule)) {
        op->waited = true;
        op->m = m; /* so that a drop in mirror_push still finds the session */
        s->mir.waiting++;
    }
    mirror_push(m, op);
}

static void release_batch(pd_session_t *s, uint32_t seq, uint8_t status_before, uint8_t status);

/* The keys a write applied on the authoritative side touched, for `verify --touched`: the
   key values of its row images when they came as text; else its tables are unknown. */
static void note_touched(pd_session_t *s, const pd_mirror_op_t *op)
{
    const pd_sql_result_t *r = op->r;
    pd_touched_t *t = s->srv->jobs != NULL ? pd_jobs_touched(s->srv->jobs) : NULL;
    if (t == NULL || r == NULL || op->rule < 0 || (unsigned)op->rule >= s->srv->cfg->rule_count)
        return;
    const char *rule = s->srv->cfg->rules[op->rule].name;
    if (r->mirror != PD_MIRROR_IMAGE) {
        if (r->mirror == PD_MIRROR_WRITE || r->mirror == PD_MIRROR_COPY) {
            /* Which rows a verbatim write touched is not known: its tables are unknown. */
            for (const pd_table_facts_t *f = &s->srv->facts[op->rule].table; f != NULL;
                 f = f->next) {
                char name[256];
                if (f->schema != NULL && f->name != NULL &&
                    snprintf(name, sizeof name, "%s.%s", f->schema, f->name) < (int)sizeof name)
                    pd_touched_mark_unknown(t, rule, name);
            }
        }
        return;
    }
    if (r->image_nkey == 0)
        return; /* a table without a key is verified whole anyway */
    if (op->nparams > 0 && op->formats[0] != 0) {
        pd_touched_mark_unknown(t, rule, r->image_table);
        return;
    }
    const uint8_t *p = op->sets.data;
    for (unsigned set = 0; set < op->nsets; set++) {
        const char *col[op->nparams + 1];
        for (unsigned i = 0; i < op->nparams; i++) {
            int32_t len = wire_len(p);
            col[i] = len < 0 ? NULL : (const char *)p + 4; /* NUL-terminated: set_add */
            p += 4 + (len < 0 ? 0 : (size_t)len + 1);
        }
        const char *key[r->image_nkey + 1];
        for (unsigned k = 0; k < r->image_nkey; k++)
            key[k] = col[r->image_key[k]];
        pd_touched_add(t, rule, r->image_table, r->image_nkey, key);
    }
}

bool pd_mirror_before_ready(pd_session_t *s, uint32_t seq, uint8_t status_before, uint8_t status)
{
    release_batch(s, seq, status_before, status);
    return s->mir.waiting > 0;
}

static void release_batch(pd_session_t *s, uint32_t seq, uint8_t status_before, uint8_t status)
{
    pd_session_mirror_t *sm = &s->mir;
    if (status_before == 'I')
        sm->poisoned = false; /* a new transaction */
    /* Expectations the server skipped (after an error) end with their batch. */
    while (sm->exp_count > 0 && sm->expects[sm->exp_head].seq == seq)
        expect_pop(sm);
    pd_mirror_op_t *ops = take_held(sm, seq);
    if (ops == NULL)
        return;
    /* What the authoritative side applied: in an implicit transaction (autocommit batch
       without transaction control) that failed, nothing. */
    bool failed = false, txn_control = false;
    unsigned writes = 0;
    for (pd_mirror_op_t *op = ops; op != NULL; op = op->next) {
        failed = failed || op->auth_error;
        txn_control = txn_control || (op->r != NULL && op->r->mirror == PD_MIRROR_TXN);
        writes += is_write(op);
    }
    bool implicit = status_before == 'I' && status == 'I' && !txn_control;
    if (sm->mirror == NULL) {
        sm->mirror = mirror_open(s);
        if (sm->mirror == NULL) {
            while (ops != NULL) {
                pd_mirror_op_t *next = ops->next;
                record(s->srv, ops, "mirror_unapplied");
                op_free(ops);
                ops = next;
            }
            return;
        }
    }
    pd_mirror_t *m = sm->mirror;
    bool wrap = implicit && writes > 1 && !failed;
    if (wrap) {
        pd_mirror_op_t *begin = synthetic("BEGIN", ops);
        if (begin != NULL)
            push_release(s, m, begin);
    }
    pd_mirror_op_t *last = NULL;
    while (ops != NULL) {
        pd_mirror_op_t *op = ops;
        ops = op->next;
        op->next = NULL;
        last = op;
        bool applied = op->auth_done && !op->auth_error && !(implicit && failed);
        bool txn_end = op->r != NULL && op->r->mirror == PD_MIRROR_TXN && op->r->txn == PD_TXN_END;
        if (txn_end && strncmp(op->auth_tag, "ROLLBACK", 8) == 0) {
            /* COMMIT of a failed transaction: the authoritative side rolled back. */
            free(op->sql);
            op->sql = strdup("ROLLBACK");
            applied = op->sql != NULL;
        }
        if (applied)
            note_touched(s, op);
        if (applied && op->too_big) {
            record(s->srv, op, "mirror_unapplied");
            op_free(op);
            continue;
        }
        /* Row images of a statement that touched no row: nothing to apply. */
        bool empty = op->r != NULL && op->r->mirror == PD_MIRROR_IMAGE && op->nsets == 0;
        if (!applied || empty) {
            op_free(op);
            continue;
        }
        /* A shadow read in a transaction has no time budget (its cancel would abort the
           mirror's transaction): under lockstep the session's next write would wait
           behind it, so it is skipped. */
        if (op->sums && !(status_before == 'I' && status == 'I') &&
            rule_lockstep(s->srv, op->rule)) {
            pd_rule_stats_t *st = rule_stats(s->srv, op->rule);
            if (st != NULL)
                st->shadow_skipped++;
            op_free(op);
            continue;
        }
        push_release(s, m, op);
    }
    if (wrap && last != NULL) {
        pd_mirror_op_t *commit = synthetic("COMMIT", last);
        if (commit != NULL)
            push_release(s, m, commit);
    }
}

void pd_mirror_on_copy(pd_session_t *s, uint8_t type, const uint8_t *body, size_t n)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_mirror_op_t *op = sm->copy_op;
    if (op == NULL)
        return;
    if (type != PD_FE_COPY_DATA) {
        sm->copy_op = NULL; /* CopyDone or CopyFail: the data is complete */
        return;
    }
    if (op->too_big)
        return;
    if (op->sets.len + n > QUEUE_MAX_BYTES) {
        op->too_big = true;
        pd_buf_free(&op->sets);
        pd_buf_init(&op->sets);
        return;
    }
    pd_buf_put(&op->sets, body, n);
    if (!pd_buf_ok(&op->sets)) {
        op->too_big = true;
        pd_buf_free(&op->sets);
        pd_buf_init(&op->sets);
    }
}

const pd_sql_result_t *pd_mirror_portal_plan(pd_session_t *s, const char *name)
{
    const pd_portal_t *p = portal_find(&s->mir, name);
    return p != NULL ? p->plan : NULL;
}

int pd_mirror_commit_first(pd_session_t *s, const pd_sql_result_t *r, const char *sql)
{
    pd_session_mirror_t *sm = &s->mir;
    if (r == NULL || r->mirror != PD_MIRROR_TXN || r->txn != PD_TXN_END || !r->txn_commit ||
        !rule_lockstep(s->srv, r->mirror_rule))
        return 0;
    bool fail = rule_fails(s->srv, r->mirror_rule);
    if (sm->commit_done) {
        sm->commit_done = false;
        if (sm->poisoned && fail)
            return 2;
        sm->skip_end = true; /* its replay is done */
        return 0;
    }
    if (sm->poisoned && fail)
        return 2;
    if (s->txn_status == 'E')
        return 0; /* the authoritative side rolls back: so does the mirror, after it */
    pd_mirror_t *m = sm->mirror;
    if (m == NULL || (m->state != M_DEAD && !m->in_txn))
        return 0; /* nothing of this transaction on the mirror */
    if (m->state == M_DEAD)
        return fail ? 2 : 0;
    if (s->batch_count > 0) {
        /* Statements sent before it are unanswered (a pipelining client): their replays
           go first, or the mirror would commit ahead of them (a BEGIN among them would
           then leave it in a transaction of its own). It waits until they are answered. */
        s->idle_wait = true;
        return 1;
    }
    pd_mirror_op_t *op = op_new(r, sql, sql, 0);
    if (op == NULL)
        return -1;
    op->simple = true;
    sm->commit_wait = true;
    push_release(s, m, op);
    return 1;
}

bool pd_mirror_wraps(const pd_session_t *s, const pd_sql_result_t *r)
{
    /* COPY is not wrapped: its data follows the Query while the client is held. */
    if (r == NULL || r->action == PD_SQL_REFUSE ||
        (r->mirror != PD_MIRROR_WRITE && r->mirror != PD_MIRROR_IMAGE))
        return false;
    /* Row images with keys: queued on their rows before the authoritative commit. */
    if (r->mirror == PD_MIRROR_IMAGE && r->image_nkey > 0)
        return true;
    /* Lockstep: row locks held until the mirror committed (order across instances, and
       for writes replayed verbatim, which no row queue orders). */
    return rule_lockstep(s->srv, r->mirror_rule);
}

void pd_mirror_wrap_failed(pd_session_t *s, int rule, const char *stmt, const uint8_t *body,
                           size_t n)
{
    pd_mirror_op_t *op = op_new(NULL, "COMMIT", stmt != NULL ? stmt : "COMMIT", 0);
    if (op == NULL)
        return;
    op->rule = rule;
    pd_be_error_t e;
    const char *err = NULL;
    if (body == NULL)
        copy_state(op->auth_tag, sizeof op->auth_tag, "ROLLBACK");
    else if (pd_be_error_decode(body, n, &e, &err) == PD_DECODE_OK)
        copy_state(op->auth_sqlstate, sizeof op->auth_sqlstate, e.sqlstate);
    copy_state(op->mirror_tag, sizeof op->mirror_tag, "COMMIT");
    pd_log_warning(s->tag, body == NULL
                               ? "the session ended before pgdual's COMMIT of an autocommit "
                                 "write the mirror was given; recorded as divergence"
                               : "the authoritative side refused pgdual's COMMIT of an "
                                 "autocommit write the mirror had committed; recorded as "
                                 "divergence");
    record(s->srv, op, "write_outcome");
    op_free(op);
}

/* The session's mirror failed a write of this transaction, or is gone. */
static bool mirror_failed(const pd_session_t *s)
{
    return s->mir.poisoned || (s->mir.mirror != NULL && s->mir.mirror->state == M_DEAD);
}

bool pd_mirror_refuses(pd_session_t *s, const pd_sql_result_t *r)
{
    if (r == NULL || (r->mirror != PD_MIRROR_WRITE && r->mirror != PD_MIRROR_IMAGE) ||
        !rule_fails(s->srv, r->mirror_rule))
        return false;
    return mirror_failed(s);
}

bool pd_mirror_refuses_wrap(pd_session_t *s, int rule)
{
    return rule >= 0 && rule_lockstep(s->srv, rule) && rule_fails(s->srv, rule) && mirror_failed(s);
}

/* A refusal of rule's, with hint and a message. */
__attribute__((format(printf, 5, 6))) static pd_sql_result_t *
refusal(pd_session_t *s, int rule, const char *sqlstate, const char *hint, const char *fmt, ...)
{
    pd_sql_result_t *f = calloc(1, sizeof *f);
    if (f == NULL)
        return NULL;
    f->refs = 1;
    f->action = PD_SQL_REFUSE;
    f->rule = rule;
    f->mirror_rule = -1;
    f->sqlstate = sqlstate;
    va_list ap;
    va_start(ap, fmt);
    if (vasprintf(&f->message, fmt, ap) < 0)
        f->message = NULL;
    va_end(ap);
    f->hint = strdup(hint);
    if (f->message == NULL || f->hint == NULL) {
        pd_sql_result_release(f);
        return NULL;
    }
    return f;
}

pd_sql_result_t *pd_mirror_refusal(pd_session_t *s, int rule)
{
    return refusal(s, rule, "55000", /* object_not_in_prerequisite_state */
                   "Roll back, check the new database (pgdualctl status, divergence), and "
                   "retry; or set mirror.on_failure: record to keep writing to old alone.",
                   "pgdual: the new database of rule \"%s\" did not apply this transaction's "
                   "writes and the rule has mirror.on_failure: fail, so nothing of it is "
                   "committed",
                   rule_name(s->srv, rule));
}

pd_sql_result_t *pd_mirror_read_refusal(pd_session_t *s, int rule)
{
    return refusal(s, rule, "0A000", /* feature_not_supported */
                   "Send Sync after the reads, before the write or call.",
                   "pgdual: this batch started with a read that rule \"%s\" serves from the "
                   "new database (reads=new), and the statement is not one: it would run there",
                   rule_name(s->srv, rule));
}

pd_sql_result_t *pd_mirror_order_refusal(pd_session_t *s, int rule, const pd_sql_result_t *plan)
{
    bool commit = plan->mirror == PD_MIRROR_TXN;
    return refusal(s, rule, "0A000", /* feature_not_supported */
                   commit ? "Send Sync before the COMMIT."
                          : "Send Sync before the write, or run the batch in a transaction "
                            "(BEGIN ... Sync ... COMMIT).",
                   commit ? "pgdual: a COMMIT in the same pipeline segment (before Sync) as a "
                            "write to a table of rule \"%s\" would commit it before pgdual "
                            "could order it for the mirror"
                          : "pgdual: an autocommit write to a table of rule \"%s\" that is not "
                            "the first statement before Sync would commit before pgdual could "
                            "order it for the mirror",
                   rule_name(s->srv, rule));
}

/* ---------------------------------------------------------------------------------------
 * Changing sides (switchover, rollback)
 */

int pd_mirror_swap_ready(pd_session_t *s)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_mirror_t *m = sm->mirror;
    if (m != NULL && m->state == M_DEAD) {
        /* What it missed is recorded; a fresh connection takes its place. */
        m->session = NULL;
        mirror_free(m);
        sm->mirror = m = NULL;
    }
    if (m == NULL) {
        if ((sm->mirror = m = mirror_open(s)) == NULL)
            return -1;
        return m->state == M_DEAD ? -1 : 1;
    }
    if (m->state != M_READY || m->busy || m->head != NULL || m->in_txn || m->nheld > 0)
        return 1;
    return 0;
}

unsigned pd_mirror_serial(const pd_session_t *s)
{
    const pd_mirror_t *m = s->mir.mirror;
    return m != NULL && m->state != M_DEAD ? m->serial : 0;
}

void pd_mirror_swap(pd_session_t *s, PGconn **conn)
{
    pd_session_mirror_t *sm = &s->mir;
    pd_mirror_t *m = sm->mirror;
    uv_close((uv_handle_t *)m->poll, poll_closed);
    m->poll = NULL;
    PGconn *mine = m->backend.conn;
    m->backend.conn = *conn;
    *conn = mine;
    while (sm->portals != NULL) {
        pd_portal_t *p = sm->portals;
        sm->portals = p->next;
        portal_free(p);
    }
    sm->nportals = 0;
    /* The session relayed raw on it since connect: libpq saw nothing of that, and the
       connection is idle between transactions, as libpq last knew it. */
    m->poll = malloc(sizeof *m->poll);
    if (PQsetnonblocking(m->backend.conn, 1) != 0 || m->poll == NULL ||
        uv_poll_init_socket(m->srv->loop, m->poll, PQsocket(m->backend.conn)) != 0) {
        free(m->poll);
        m->poll = NULL;
        mirror_die(m, "could not take over the session's connection as the mirror");
        return; /* the session goes on; its mirror is detached */
    }
    m->poll->data = m;
    restart_poll(m, UV_READABLE);
    pd_log_debug(m->tag, "now on the %s side (backend pid %d)",
                 pd_session_on_new(s) ? "new" : "old", PQbackendPID(m->backend.conn));
}

bool pd_mirror_follow_flags(pd_session_t *s)
{
    pd_mirror_t *m = s->mir.mirror;
    bool want_aa = wants_aa(s->srv, s->database);
    if (m == NULL || m->aa == want_aa)
        return true;
    if (s->txn_status != 'I' && s->txn_status != 0)
        return false;
    pd_log_info(s->tag, "second connection let go: the flags now want it on %s",
                want_aa ? "the same database (A/A)" : "the other database");
    pd_mirror_session_end(s);
    return true;
}

void pd_mirror_session_end(pd_session_t *s)
{
    pd_session_mirror_t *sm = &s->mir;
    while (sm->held != NULL) {
        pd_mirror_op_t *op = sm->held;
        sm->held = op->next;
        /* The session ended before its batch's ReadyForQuery: a write may have committed
           on the authoritative side (autocommit) without the mirror seeing it. Recorded,
           and its keys noted, so that verify --touched --repair settles it either way. */
        if (is_write(op)) {
            record(s->srv, op, "mirror_unapplied");
            note_touched(s, op);
            pd_touched_t *t = s->srv->jobs != NULL ? pd_jobs_touched(s->srv->jobs) : NULL;
            if (t != NULL && op->r->mirror == PD_MIRROR_IMAGE && op->nsets == 0 &&
                op->r->image_table != NULL)
                pd_touched_mark_unknown(t, rule_name(s->srv, op->rule), op->r->image_table);
        }
        op_free(op);
    }
    sm->held_tail = NULL;
    sm->copy_op = NULL;
    while (sm->portals != NULL) {
        pd_portal_t *p = sm->portals;
        sm->portals = p->next;
        portal_free(p);
    }
    sm->nportals = 0;
    free(sm->expects);
    sm->expects = NULL;
    sm->exp_cap = sm->exp_count = sm->exp_head = 0;
    pd_mirror_t *m = sm->mirror;
    sm->mirror = NULL;
    if (m == NULL)
        return;
    m->closing = true;
    if (m->state == M_DEAD) {
        m->session = NULL;
        mirror_free(m);
        return;
    }
    m->session = NULL;
    if (m->state == M_READY && !m->busy && m->head == NULL)
        mirror_die(m, NULL);
}

void pd_mirror_totals(const pd_server_t *srv, pd_mirror_totals_t *out)
{
    pd_mirror_db_totals(srv, NULL, out);
}

void pd_mirror_db_totals(const pd_server_t *srv, const char *database, pd_mirror_totals_t *out)
{
    *out = (pd_mirror_totals_t){0};
    for (const pd_mirror_t *m = srv->mirrors; m != NULL; m = m->next) {
        if (database != NULL && strcmp(m->database, database) != 0)
            continue;
        if (m->state != M_DEAD && (m->busy || m->head != NULL || m->in_txn))
            out->busy++;
        if (m->state == M_READY)
            out->open++;
        else if (m->state == M_CONNECTING)
            out->connecting++;
        else if (m->session != NULL)
            out->detached++;
        out->queued += m->queued;
    }
}

void pd_mirror_close_all(pd_server_t *srv)
{
    while (srv->mirrors != NULL) {
        pd_mirror_t *m = srv->mirrors;
        if (m->session != NULL) {
            m->session->mir.mirror = NULL;
            m->session = NULL;
        }
        mirror_die(m, "pgdual is stopping"); /* frees it: it has no session now */
    }
    if (srv->mirror_keys != NULL) {
        free(srv->mirror_keys->buckets);
        free(srv->mirror_keys);
        srv->mirror_keys = NULL;
    }
}
