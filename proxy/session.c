/*
 * session.c — the client-side state machine and the relay.
 *
 * Every state change goes through session_set_state(), which keeps the server's counts
 * right. A session is ended by session_close(), which closes every handle at once and
 * frees the memory later, in the close callback of the session's timer: code further up
 * the current call stack may still look at the session (and sees s->closed).
 */
#include "proxy/session.h"

#include <ctype.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "proxy/cancel.h"
#include "proxy/log.h"
#include "proxy/route.h"

#define PIPE_SIZE    (64 * 1024)
#define AUTH_MSG_MAX 65535u /* PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH */
#define LINGER_MS    1000   /* how long a closing session drains the client's input */

static void on_client(pd_transport_t *t, void *owner, bool readable, bool writable);
static void on_server(pd_transport_t *t, void *owner, bool readable, bool writable);
static void relay_from_client(pd_session_t *s);
static void relay_from_server(pd_session_t *s);
static void update_interest(pd_session_t *s);
static void closing_step(pd_session_t *s, bool readable, bool writable);
static void session_close_timer(uv_timer_t *t);
static bool come_back(pd_session_t *s);
static bool recall_holds(const pd_session_t *s);

/* ---------------------------------------------------------------------------------------
 * State and lifetime
 */

#define PD__STATE_NAME(id, name) [PD_SESSION_##id] = name,
static const char *const state_names[] = {PD_SESSION_STATES(PD__STATE_NAME)};
#undef PD__STATE_NAME

const char *pd_session_state_name(pd_session_state_t st)
{
    return st < PD_SESSION_NSTATES ? state_names[st] : "?";
}

static void session_set_state(pd_session_t *s, pd_session_state_t st)
{
    if (s->state == st)
        return;
    PD_ADD(s->srv->state_counts[s->state], -1u);
    PD_ADD(s->srv->state_counts[st], 1u);
    pd_log_debug(s->tag, "state %s -> %s", state_names[s->state], state_names[st]);
    PD_SET(s->state, st);
}

static void prepared_free(pd_prepared_t *e)
{
    if (e == NULL)
        return;
    free(e->sql);
    pd_sql_result_release(e->r);
    free(e->types);
    free(e->bind);
    free(e);
}

static uint32_t *types_copy(const uint32_t *types, uint16_t n)
{
    uint32_t *c = malloc((n + 1u) * sizeof *c);
    if (c != NULL && n > 0)
        memcpy(c, types, n * sizeof *c);
    return c;
}

/* The parameter types a Parse declares, malloc'd; NULL when out of memory. */
static uint32_t *types_of(const pd_fe_parse_t *m)
{
    uint32_t types[m->nparams + 1];
    for (unsigned i = 0; i < m->nparams; i++) {
        const uint8_t *t = m->param_types + 4 * i;
        types[i] = (uint32_t)t[0] << 24 | (uint32_t)t[1] << 16 | (uint32_t)t[2] << 8 | t[3];
    }
    return types_copy(types, m->nparams);
}

/* A shadow candidate: the statement's decision and the client's Bind body, copied. */
static pd_prepared_t *prepared_from(const pd_stmt_t *e, const uint8_t *bind, size_t len)
{
    pd_prepared_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->sql = strdup(e->sql);
    c->types = types_copy(e->types, e->ntypes);
    c->bind = malloc(len + 1);
    c->r = e->r;
    e->r->refs++;
    if (c->sql == NULL || c->types == NULL || c->bind == NULL) {
        prepared_free(c);
        return NULL;
    }
    c->ntypes = e->ntypes;
    memcpy(c->bind, bind, len);
    c->bind_len = len;
    return c;
}

/* ---------------------------------------------------------------------------------------
 * Prepared statements by name (a small chained hash table: lookups happen per Bind)
 */

static void stmt_free(pd_stmt_t *e)
{
    free(e->name);
    free(e->sql);
    free(e->sent);
    free(e->other_sent);
    free(e->types);
    pd_sql_result_release(e->r);
    free(e);
}

static unsigned name_hash(const char *name)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h;
}

static pd_stmt_t **stmt_slot(pd_session_t *s, const char *name)
{
    if (s->stmt_buckets == 0)
        return NULL;
    pd_stmt_t **pp = &s->stmts[name_hash(name) % s->stmt_buckets];
    while (*pp != NULL && strcmp((*pp)->name, name) != 0)
        pp = &(*pp)->next;
    return pp;
}

static pd_stmt_t *stmt_find(pd_session_t *s, const char *name)
{
    pd_stmt_t **pp = stmt_slot(s, name);
    return pp != NULL ? *pp : NULL;
}

/*
 * The client freed e's name on this side: when the other connection holds a statement
 * under it, it is freed there too at the next swap (swap_sides), or the client could not
 * prepare the name again there. False when out of memory.
 */
static bool stmt_note_freed(pd_session_t *s, pd_stmt_t *e)
{
    if (!e->other_held || e->other_sent == NULL)
        return true;
    if (s->nstale == s->stale_cap) {
        unsigned cap = s->stale_cap ? s->stale_cap * 2 : 8;
        char **bigger = realloc(s->stale, cap * sizeof *bigger);
        if (bigger == NULL)
            return false;
        s->stale = bigger;
        s->stale_cap = cap;
    }
    if ((s->stale[s->nstale] = strdup(e->name)) == NULL)
        return false;
    s->nstale++;
    e->other_held = false;
    return true;
}

static void stale_clear(pd_session_t *s)
{
    for (unsigned i = 0; i < s->nstale; i++)
        free(s->stale[i]);
    s->nstale = 0;
}

/* Takes a statement out of the table: the caller's now (NULL: none of the name). */
static pd_stmt_t *stmt_detach(pd_session_t *s, const char *name)
{
    pd_stmt_t **pp = stmt_slot(s, name);
    if (pp == NULL || *pp == NULL)
        return NULL;
    pd_stmt_t *e = *pp;
    *pp = e->next;
    e->next = NULL;
    s->stmt_count--;
    return e;
}

/* Forgets a statement; `freed`: the client freed it (Close), not replaced it. */
static bool stmt_forget(pd_session_t *s, const char *name, bool freed)
{
    pd_stmt_t *e = stmt_find(s, name);
    if (e == NULL)
        return true;
    if (freed && !stmt_note_freed(s, e))
        return false;
    stmt_free(stmt_detach(s, name));
    return true;
}

/* Forgets the records up to serial `upto`: those of later batches stay. */
static void stmt_forget_upto(pd_session_t *s, uint64_t upto)
{
    for (unsigned i = 0; i < s->stmt_buckets; i++) {
        for (pd_stmt_t **pp = &s->stmts[i]; *pp != NULL;) {
            pd_stmt_t *e = *pp;
            if (e->serial > upto) {
                pp = &e->next;
                continue;
            }
            *pp = e->next;
            stmt_free(e);
            s->stmt_count--;
        }
    }
}

static void stmt_forget_all(pd_session_t *s)
{
    stmt_forget_upto(s, UINT64_MAX);
}

static bool stmt_grow(pd_session_t *s)
{
    if (s->stmt_count < s->stmt_buckets)
        return true;
    unsigned n = s->stmt_buckets ? s->stmt_buckets * 4 : 16;
    pd_stmt_t **t = calloc(n, sizeof *t);
    if (t == NULL)
        return false;
    for (unsigned i = 0; i < s->stmt_buckets; i++) {
        while (s->stmts[i] != NULL) {
            pd_stmt_t *e = s->stmts[i];
            s->stmts[i] = e->next;
            e->next = t[name_hash(e->name) % n];
            t[name_hash(e->name) % n] = e;
        }
    }
    free(s->stmts);
    s->stmts = t;
    s->stmt_buckets = n;
    return true;
}

/* Puts a record into the table, where its name is not. False when out of memory. */
static bool stmt_insert(pd_session_t *s, pd_stmt_t *e)
{
    if (!stmt_grow(s))
        return false;
    pd_stmt_t **pp = &s->stmts[name_hash(e->name) % s->stmt_buckets];
    e->next = *pp;
    *pp = e;
    s->stmt_count++;
    return true;
}

/* Records a statement the client prepares; one of the same name is taken out, into
 *replaced (the caller's). NULL when out of memory. */
static pd_stmt_t *stmt_put(pd_session_t *s, const pd_fe_parse_t *m, pd_stmt_t **replaced)
{
    *replaced = stmt_detach(s, m->name);
    pd_stmt_t *e = calloc(1, sizeof *e);
    if (e == NULL || (e->name = strdup(m->name)) == NULL || (e->sql = strdup(m->sql)) == NULL ||
        (e->types = types_of(m)) == NULL) {
        if (e != NULL)
            stmt_free(e);
        return NULL;
    }
    e->ntypes = m->nparams;
    e->serial = ++s->stmt_serial;
    if (!stmt_insert(s, e)) {
        stmt_free(e);
        return NULL;
    }
    return e;
}

/* ---------------------------------------------------------------------------------------
 * Parses on their way (pd_prep_t): what the server holds is known from its answers
 */

static void prep_free(pd_prep_t *op)
{
    free(op->name);
    free(op->sql);
    free(op->types);
    if (op->old != NULL)
        stmt_free(op->old);
}

/*
 * Queues an op (taking what it owns): one of a batch of pgdual's own (internal), which
 * goes out ahead of what is not yet sent of the client's batch being read, before that
 * batch's ops; the client's batch's at the end. False when out of memory.
 */
static bool prep_put(pd_session_t *s, pd_prep_t op, bool internal)
{
    if (s->nprep == s->prep_cap && s->prep_head > 0) { /* room at the front: compact */
        memmove(s->preps, s->preps + s->prep_head, (s->nprep - s->prep_head) * sizeof *s->preps);
        s->nprep -= s->prep_head;
        s->prep_open -= s->prep_head;
        s->prep_head = 0;
    }
    if (s->nprep == s->prep_cap) {
        unsigned cap = s->prep_cap ? s->prep_cap * 2 : 8;
        pd_prep_t *bigger = realloc(s->preps, cap * sizeof *bigger);
        if (bigger == NULL) {
            prep_free(&op);
            return false;
        }
        s->preps = bigger;
        s->prep_cap = cap;
    }
    unsigned at = internal ? s->prep_open : s->nprep;
    memmove(s->preps + at + 1, s->preps + at, (s->nprep - at) * sizeof *s->preps);
    s->preps[at] = op;
    s->nprep++;
    if (internal)
        s->prep_open++;
    else if (op.kind == PD_PREP_END)
        s->prep_open = s->nprep;
    return true;
}

/* An op of the kind given, of the client's statement e (NULL: none), confirmed by
   `answer`; it takes `old`. */
static bool prep_op(pd_session_t *s, uint8_t kind, uint8_t answer, const pd_stmt_t *e,
                    pd_stmt_t *old, bool internal)
{
    pd_prep_t op = {.kind = kind, .answer = answer, .old = old};
    if (e != NULL && (op.serial = e->serial, op.name = strdup(e->name)) == NULL) {
        prep_free(&op);
        return false;
    }
    return prep_put(s, op, internal);
}

static bool prep_parse(pd_session_t *s, uint8_t kind, const pd_stmt_t *e, bool internal)
{
    return prep_op(s, kind, '1', e, NULL, internal);
}

/* A Close of pgdual's own. */
static bool prep_close(pd_session_t *s, bool internal)
{
    return prep_op(s, PD_PREP_OTHER, '3', NULL, NULL, internal);
}

/* A record an op took out goes back, unless the client has used the name since. */
static void prep_put_back(pd_session_t *s, pd_prep_t *op)
{
    if (op->old != NULL && stmt_find(s, op->old->name) == NULL && stmt_insert(s, op->old))
        op->old = NULL;
}

/* What the other connection holds under a name moves to the record `to` from `from`,
   which replaces it or is replaced by it. */
static void other_moves(pd_stmt_t *to, pd_stmt_t *from)
{
    free(to->other_sent);
    to->other_sent = from->other_sent;
    to->other_held = from->other_held;
    from->other_sent = NULL;
    from->other_held = false;
}

/* The record an op is about, if the client has not replaced or freed it since. */
static pd_stmt_t *prep_stmt(pd_session_t *s, const pd_prep_t *op)
{
    pd_stmt_t *e = op->name != NULL ? stmt_find(s, op->name) : NULL;
    return e != NULL && e->serial == op->serial ? e : NULL;
}

/* The first op, which the server answers next. */
static void prep_pop(pd_session_t *s)
{
    prep_free(&s->preps[s->prep_head++]);
    if (s->prep_open < s->prep_head)
        s->prep_open = s->prep_head;
    if (s->prep_head == s->nprep)
        s->prep_head = s->prep_open = s->nprep = 0;
}

/* The first op from index `from` on that takes a record of `name` out of the table: a
   Close of it, or a Parse that replaces it (NULL: none). */
static pd_prep_t *prep_taker(pd_session_t *s, unsigned from, const char *name)
{
    for (unsigned i = from; i < s->nprep; i++) {
        pd_prep_t *op = &s->preps[i];
        if ((op->kind == PD_PREP_CLIENT || op->kind == PD_PREP_CLOSE) &&
            strcmp(op->name, name) == 0)
            return op;
    }
    return NULL;
}

static bool stmt_decide(pd_session_t *s, pd_stmt_t *e);

/* An empty record of `name`, in the table, for prep_done to fill. NULL when out of
   memory. */
static pd_stmt_t *stmt_revive(pd_session_t *s, const char *name, uint64_t serial)
{
    pd_stmt_t *e = calloc(1, sizeof *e);
    if (e == NULL || (e->name = strdup(name)) == NULL || !stmt_insert(s, e)) {
        if (e != NULL)
            stmt_free(e);
        return NULL;
    }
    e->serial = serial;
    return e;
}

/* A ParseComplete or CloseComplete (answer): the first such message of the batch being
   answered was done. */
static void prep_done(pd_session_t *s, uint8_t answer)
{
    unsigned i = s->prep_head;
    while (i < s->nprep && s->preps[i].kind != PD_PREP_END && s->preps[i].answer != answer)
        i++;
    if (i == s->nprep || s->preps[i].kind == PD_PREP_END)
        return; /* none pgdual knows of */
    pd_prep_t taken = s->preps[i];
    pd_prep_t *op = &taken;
    memmove(s->preps + s->prep_head + 1, s->preps + s->prep_head,
            (i - s->prep_head) * sizeof *s->preps);
    s->prep_head++;
    if (s->prep_open <= i)
        s->prep_open++;
    if (s->prep_head == s->nprep)
        s->prep_head = s->prep_open = s->nprep = 0;
    pd_stmt_t *e = prep_stmt(s, op);
    if (e == NULL && op->kind == PD_PREP_TAKEN) {
        /* What it met was taken out since by a later batch's Close or Parse (the client
           pipelined), which is told; or dropped before it (DISCARD ALL): made again. */
        pd_prep_t *next = prep_taker(s, s->prep_head, op->name);
        if (next != NULL && next->old != NULL && next->old->serial == op->serial)
            e = next->old;
        else if (stmt_find(s, op->name) == NULL)
            e = stmt_revive(s, op->name, op->made);
    }
    if (e != NULL && op->kind == PD_PREP_TAKEN) {
        /* The server did not hold the name after all (SQL pgdual does not read dropped
           it, or a DEALLOCATE or DISCARD sent before the Parse): it holds the client's
           text now, to be prepared as decided at its next use, and the other side's is
           out of date. */
        free(e->sql);
        free(e->types);
        e->sql = op->sql;
        e->types = op->types;
        e->ntypes = op->ntypes;
        op->sql = NULL;
        op->types = NULL;
        e->lost = true;
        e->maybe_dropped = false;
        stmt_note_freed(s, e); /* it has the text it replaced: freed there at the next swap */
        if (e->r == NULL && !stmt_decide(s, e))
            stmt_forget(s, op->name, false); /* out of memory: the server still refuses */
    }
    prep_free(op); /* a record replaced or closed is gone for good */
}

/*
 * A Parse or Close being undone whose name an op of a later batch, still unanswered, took
 * on (the client pipelined): that op took the record this Parse made, which PostgreSQL
 * never had, or found the name free where the server still holds what this Close
 * closed. It is handed what the server does hold, to free when confirmed or to put back
 * when undone in turn.
 */
static void prep_hand_on(pd_session_t *s, unsigned from, pd_prep_t *op)
{
    pd_prep_t *next = prep_taker(s, from, op->name);
    if (next == NULL)
        return;
    if (op->kind == PD_PREP_CLIENT) {
        if (next->old == NULL || next->old->serial != op->serial)
            return;
        if (op->old != NULL)
            other_moves(op->old, next->old);
        stmt_free(next->old);
        next->old = op->old;
        op->old = NULL;
    } else if (next->kind == PD_PREP_CLIENT && next->old == NULL) {
        next->old = op->old;
        op->old = NULL;
    }
}

/* A batch's ReadyForQuery: its Parses not answered failed or were skipped. */
static void prep_end(pd_session_t *s)
{
    unsigned end = s->prep_head;
    while (end < s->nprep && s->preps[end].kind != PD_PREP_END)
        end++;
    if (end == s->nprep)
        return; /* a batch pgdual did not follow */
    /* Undone last first: a name parsed twice in the batch gets its first record back. */
    for (unsigned i = end; i-- > s->prep_head;) {
        pd_prep_t *op = &s->preps[i];
        pd_stmt_t *e = prep_stmt(s, op);
        if (e != NULL && op->kind == PD_PREP_OURS) {
            e->lost = true; /* held or not: prepared again at its next use */
        } else if (e != NULL && op->kind == PD_PREP_CLIENT) {
            /* PostgreSQL did not create it. What the other connection holds under the
               name is the replaced record's again, or is freed there. */
            if (op->old != NULL)
                other_moves(op->old, e);
            stmt_forget(s, op->name, true);
        }
        if ((op->kind == PD_PREP_CLIENT && e == NULL) || op->kind == PD_PREP_CLOSE)
            prep_hand_on(s, end + 1, op);
        if (op->kind == PD_PREP_CLIENT || op->kind == PD_PREP_CLOSE)
            prep_put_back(s, op); /* what it replaced or closed is still there */
    }
    while (s->prep_head <= end && s->nprep > 0) {
        bool last = s->preps[s->prep_head].kind == PD_PREP_END;
        prep_pop(s);
        if (last)
            break;
    }
}

static void deallocs_clear(pd_session_t *s)
{
    for (unsigned i = s->dealloc_next; i < s->ndealloc; i++)
        free(s->deallocs[i].name);
    s->ndealloc = s->dealloc_next = 0;
}

/* Batch seq was answered: what of it was not answered did not run. */
static void deallocs_done(pd_session_t *s, uint32_t seq)
{
    while (s->dealloc_next < s->ndealloc && (int32_t)(s->deallocs[s->dealloc_next].seq - seq) <= 0)
        free(s->deallocs[s->dealloc_next++].name);
    if (s->dealloc_next == s->ndealloc)
        s->ndealloc = s->dealloc_next = 0;
}

/*
 * DEALLOCATE and DISCARD drop prepared statements by SQL; what they dropped is known from
 * their command tags (command_drops), since a Query may fail before them. Here the names
 * of its `DEALLOCATE name`s (query_deallocates; taken) are noted in order, behind those of
 * Queries sent before it and not yet answered. False when out of memory.
 */
static bool statements_dropped(pd_session_t *s, char **names)
{
    size_t n = 0;
    while (names != NULL && names[n] != NULL)
        n++;
    if (n == 0) {
        pd_sql_names_free(names);
        return true;
    }
    unsigned left = s->ndealloc - s->dealloc_next;
    if (left > 0 && s->dealloc_next > 0)
        memmove(s->deallocs, s->deallocs + s->dealloc_next, left * sizeof *s->deallocs);
    s->ndealloc = left;
    s->dealloc_next = 0;
    pd_dealloc_t *list = realloc(s->deallocs, (left + n) * sizeof *list);
    if (list == NULL) {
        pd_sql_names_free(names);
        return false;
    }
    s->deallocs = list;
    for (size_t i = 0; i < n; i++) {
        s->deallocs[s->ndealloc++] = (pd_dealloc_t){.name = names[i], .seq = s->batch_seq};
        names[i] = NULL;
    }
    pd_sql_names_free(names);
    return true;
}

/* Every statement up to serial `upto` may be gone on this side (SQL pgdual did not read):
   what the other connection holds is freed there at the next swap. False when out of
   memory. */
static bool all_maybe_dropped(pd_session_t *s, uint64_t upto)
{
    for (unsigned i = 0; i < s->stmt_buckets; i++)
        for (pd_stmt_t *e = s->stmts[i]; e != NULL; e = e->next) {
            if (e->serial > upto)
                continue;
            if (!stmt_note_freed(s, e))
                return false;
            e->maybe_dropped = true;
        }
    return true;
}

/*
 * A command tag of the client's batch b: DEALLOCATE ALL and DISCARD ALL dropped every
 * statement (forgotten, and freed on the other side at the next swap); DEALLOCATE the
 * next name statements_dropped noted for the batch, or, when it noted none, any. On this
 * side the server knows what it holds: a Bind of a dropped name fails there as PostgreSQL
 * says. Records of batches read after b (a pipelining client's Parses) are not touched:
 * they came after the drop. False when out of memory.
 */
static bool command_drops(pd_session_t *s, const pd_batch_t *b, const uint8_t *body, size_t n)
{
    if (n == 0 || body[n - 1] != '\0')
        return true;
    const char *tag = (const char *)body;
    uint64_t upto = b != NULL ? b->serial : UINT64_MAX;
    if (strcmp(tag, "DEALLOCATE ALL") == 0 || strcmp(tag, "DISCARD ALL") == 0) {
        if (!all_maybe_dropped(s, upto))
            return false;
        stmt_forget_upto(s, upto);
        return true;
    }
    if (strcmp(tag, "DEALLOCATE") != 0)
        return true;
    pd_dealloc_t *d = s->dealloc_next < s->ndealloc ? &s->deallocs[s->dealloc_next] : NULL;
    if (b == NULL || d == NULL || d->seq != b->seq)
        return all_maybe_dropped(s, upto);
    s->dealloc_next++;
    const pd_stmt_t *e = stmt_find(s, d->name);
    bool ok = e == NULL || e->serial > upto || stmt_forget(s, d->name, true);
    free(d->name);
    return ok;
}

static void session_free(pd_session_t *s)
{
    free(s->c2b.buf);
    free(s->b2c.buf);
    pd_buf_free(&s->c2b.repl);
    pd_buf_free(&s->b2c.repl);
    pd_buf_free(&s->out);
    deallocs_clear(s);
    free(s->deallocs);
    while (s->prep_head < s->nprep)
        prep_pop(s);
    free(s->preps);
    pd_buf_free(&s->notes);
    pd_buf_free(&s->to_server);
    free(s->batches);
    free(s->wrap_sql);
    pd_sql_result_release(s->kept_plan);
    pd_sql_result_release(s->shadow);
    free(s->shadow_text);
    prepared_free(s->shadow_ext);
    prepared_free(s->cand);
    stmt_forget_all(s);
    free(s->stmts);
    stale_clear(s);
    free(s->stale);
    free(s->drops);
    if (s->sums_ready) {
        pd_result_sum_free(&s->sum_old);
        pd_result_sum_free(&s->sum_new);
    }
    for (unsigned i = 0; i < s->nparams; i++) {
        free(s->names[i]);
        free(s->values[i]);
    }
    free(s->names);
    free(s->values);
    free(s->user);
    free(s->database);
    free(s->conninfo);
    if (s->scram != NULL) {
        pd_scram_clear(s->scram);
        free(s->scram);
    }
    free(s);
}

static void free_session(uv_handle_t *h)
{
    session_free(h->data);
}

/* Running on a relay thread (proxy/relay.h)? */
static bool on_thread(const pd_session_t *s)
{
    return s->at != NULL && s->at->index > 0;
}

/* Main loop: the session no longer counts as a pass-through session of its loop. */
static void uncount(pd_session_t *s)
{
    if (s->counted != NULL)
        s->counted->assigned--;
    s->counted = NULL;
}

/* Main loop: an ended session leaves the mirror, the server's list and its loop's count. */
static void session_gone(pd_session_t *s)
{
    /* The mirror was given a wrapped batch that the authoritative side now rolls back. */
    if (s->wrap_released)
        pd_mirror_wrap_failed(s, s->wrap_rule, s->wrap_sql, NULL, 0);
    pd_mirror_session_end(s);
    pd_server_session_removed(s->srv, s);
    uncount(s);
}

/* Its handles are closed: to the loop it goes to (pd_session_arrive there). */
static void session_moved(uv_handle_t *h)
{
    pd_session_t *s = h->data;
    if (on_thread(s))
        pd_relay_leave(s->at, s);
    pd_relay_post(s->dest, s);
}

/* Moves the session to another loop: its sockets stop being polled here at once. */
static void session_move(pd_session_t *s, pd_relay_t *to)
{
    s->dest = to;
    pd_transport_detach(&s->client);
    if (s->server_open)
        pd_transport_detach(&s->server);
    uv_timer_stop(&s->timer);
    uv_close((uv_handle_t *)&s->timer, session_moved);
}

static void session_close(pd_session_t *s)
{
    if (s->closed)
        return;
    s->closed = true;
    uint64_t ms = uv_now(s->loop) - s->started_ms;
    pd_log_info(s->tag, "disconnected: session time %llu.%03llu s, %llu bytes in, %llu bytes out",
                (unsigned long long)(ms / 1000), (unsigned long long)(ms % 1000),
                (unsigned long long)s->bytes_c2b, (unsigned long long)s->bytes_b2c);
    pd_transport_close(&s->client);
    if (s->server_open)
        pd_transport_close(&s->server);
    s->server_open = false;
    pd_backend_close(&s->backend);
    if (on_thread(s)) {
        /* The main loop takes it out of the server's list and frees it (session_gone). */
        s->dest = &s->srv->relays[0];
        uv_close((uv_handle_t *)&s->timer, session_moved);
        return;
    }
    session_gone(s);
    uv_close((uv_handle_t *)&s->timer, free_session);
}

pd_session_t *pd_session_find(pd_server_t *srv, uint32_t pid, uint32_t key)
{
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next)
        if (s->id == pid && s->cancel_key == key && (s->home != NULL || !s->closed))
            return s;
    return NULL;
}

/* ---------------------------------------------------------------------------------------
 * Output: the relay's pipes and the proxy's own messages
 */

static bool pipe_pending(const pd_pipe_t *p)
{
    return p->scan > p->sent || p->has_hole;
}

static int write_all(pd_transport_t *dst, const uint8_t *buf, size_t *done, size_t len)
{
    while (*done < len) {
        ssize_t n = pd_transport_write(dst, buf + *done, len - *done);
        if (n == PD_IO_AGAIN)
            return 0;
        if (n < 0)
            return -1;
        *done += (size_t)n;
    }
    return 1;
}

/*
 * Writes what is decided: [sent, hole_start), the replacement, then [hole_end, scan), in
 * one system call. 1 all written, 0 would block, -1 broken. Once all is written, the
 * unparsed tail moves to the front of the buffer, and a buffer grown for one large
 * message shrinks back.
 */
static int pipe_flush(pd_pipe_t *p, pd_transport_t *dst)
{
    while (p->has_hole || p->sent < p->scan) {
        struct iovec iov[3];
        int n = 0;
        size_t head_end = p->has_hole ? p->hole_start : p->scan;
        if (p->sent < head_end)
            iov[n++] = (struct iovec){p->buf + p->sent, head_end - p->sent};
        if (p->has_hole) {
            if (p->repl_sent < p->repl.len)
                iov[n++] = (struct iovec){p->repl.data + p->repl_sent, p->repl.len - p->repl_sent};
            if (p->hole_end < p->scan)
                iov[n++] = (struct iovec){p->buf + p->hole_end, p->scan - p->hole_end};
        }
        ssize_t w = n > 0 ? pd_transport_writev(dst, iov, n) : 0;
        if (w == PD_IO_AGAIN)
            return 0;
        if (w < 0)
            return -1;
        size_t left = (size_t)w;
        /* Account what went out, piece by piece. */
        size_t take = head_end - p->sent < left ? head_end - p->sent : left;
        p->sent += take;
        left -= take;
        if (p->has_hole && p->sent == p->hole_start) {
            size_t rtake = p->repl.len - p->repl_sent < left ? p->repl.len - p->repl_sent : left;
            p->repl_sent += rtake;
            left -= rtake;
            if (p->repl_sent == p->repl.len) {
                p->has_hole = false;
                pd_buf_reset(&p->repl);
                p->repl_sent = 0;
                p->sent = p->hole_end;
                p->sent += left; /* the bytes after the hole went out in the same call */
                left = 0;
            }
        }
        if (n > 0 && w == 0)
            return 0;
    }
    if (p->scan == p->end) {
        p->sent = p->scan = p->end = 0;
    } else if (p->scan > 0) {
        memmove(p->buf, p->buf + p->scan, p->end - p->scan);
        p->end -= p->scan;
        p->sent = p->scan = 0;
    }
    if (p->cap > PIPE_SIZE && p->end <= PIPE_SIZE) {
        uint8_t *small = realloc(p->buf, PIPE_SIZE);
        if (small != NULL) {
            p->buf = small;
            p->cap = PIPE_SIZE;
        }
    }
    return 1;
}
/*
 * Puts `bytes` in place of the message [scan, msg_end) and moves scan past it. A
 * replacement right after the pending one joins it; otherwise it must wait until the
 * pending one is written (returns false: stop scanning and flush).
 */
static bool pipe_replace(pd_pipe_t *p, size_t msg_end, const void *bytes, size_t n)
{
    if (p->has_hole && p->hole_end != p->scan)
        return false;
    if (!p->has_hole) {
        p->has_hole = true;
        p->hole_start = p->scan;
    }
    if (n > 0)
        pd_buf_put(&p->repl, bytes, n);
    p->hole_end = msg_end;
    p->scan = msg_end;
    return true;
}

/*
 * Makes room to read more when the buffer is full: moves unsent bytes to the front, or
 * grows the buffer for a message that must be seen whole, up to `limit` bytes.
 */
static bool pipe_make_room(pd_pipe_t *p, size_t limit)
{
    if (p->end < p->cap)
        return true;
    if (pipe_pending(p))
        return false;
    if (p->scan > 0) {
        memmove(p->buf, p->buf + p->scan, p->end - p->scan);
        p->end -= p->scan;
        p->sent = p->scan = 0;
        return true;
    }
    if (p->cap >= limit)
        return false;
    size_t cap = p->cap * 2 < limit ? p->cap * 2 : limit;
    uint8_t *bigger = realloc(p->buf, cap);
    if (bigger == NULL)
        return false;
    p->buf = bigger;
    p->cap = cap;
    return true;
}

static bool out_pending(const pd_session_t *s)
{
    return s->out_sent < s->out.len;
}

/* Writes the proxy's own messages: 1 all written, 0 would block, -1 broken. */
static int out_flush(pd_session_t *s)
{
    while (s->out_sent < s->out.len) {
        ssize_t n =
            pd_transport_write(&s->client, s->out.data + s->out_sent, s->out.len - s->out_sent);
        if (n == PD_IO_AGAIN)
            return 0;
        if (n < 0)
            return -1;
        s->out_sent += (size_t)n;
    }
    pd_buf_reset(&s->out);
    s->out_sent = 0;
    return 1;
}

/*
 * Everything owed to the client. The proxy's own messages go first while the session is
 * starting (they precede anything the server says) and last when it is closing (the
 * FATAL follows the last whole message relayed).
 */
static int client_flush(pd_session_t *s)
{
    int r;
    if (s->state != PD_SESSION_CLOSING && (r = out_flush(s)) <= 0)
        return r;
    r = pipe_flush(&s->b2c, &s->client);
    if (r <= 0)
        return r;
    return out_flush(s);
}

/* ---------------------------------------------------------------------------------------
 * Ending a session
 */

void pd_session_terminate(pd_session_t *s, const char *sqlstate, const char *message,
                          const char *hint)
{
    if (s->closed || s->state == PD_SESSION_CLOSING)
        return;
    if (s->server_open)
        pd_transport_close(&s->server);
    s->server_open = false;
    pd_backend_close(&s->backend);

    /* An error can only be told between two messages; in the middle of one, the client
     * would read it as part of that message, so then the connection just closes. So
     * it does in the middle of a TLS handshake. */
    if (sqlstate == NULL || s->b2c.skip > 0 || s->state == PD_SESSION_TLS) {
        session_close(s);
        return;
    }
    s->b2c.end = s->b2c.scan; /* drop a partly received message */
    if (message != NULL)
        pd_log_info(s->tag, "closing: %s (SQLSTATE %s)", message, sqlstate);
    pd_be_error(&s->out, "FATAL", sqlstate, message, NULL, hint);
    session_set_state(s, PD_SESSION_CLOSING);
    uv_timer_start(&s->timer, session_close_timer, LINGER_MS, 0);
    closing_step(s, false, true);
}

static void session_close_timer(uv_timer_t *t)
{
    pd_session_t *s = t->data;
    if (s->state != PD_SESSION_CLOSING) {
        pd_session_terminate(s, "08P01", "timeout expired during startup",
                             "The client did not finish connecting within "
                             "limits.startup_timeout_ms.");
        return;
    }
    pd_log_debug(s->tag, "closing: linger time over");
    session_close(s);
}

/*
 * CLOSING: write what is owed (whole relayed messages, then the FATAL), then shut down
 * our side and read until the client closes or the linger time is over. Closing with
 * unread input would make the kernel send a reset, which can destroy the error message
 * before the client has read it.
 */
static void closing_step(pd_session_t *s, bool readable, bool writable)
{
    if (writable && (pipe_pending(&s->b2c) || out_pending(s))) {
        int r = client_flush(s);
        if (r < 0) {
            session_close(s);
            return;
        }
        if (r == 0) {
            update_interest(s);
            return;
        }
        shutdown(s->client.fd, SHUT_WR);
    }
    if (readable) {
        uint8_t sink[4096];
        for (;;) {
            ssize_t n = pd_transport_read(&s->client, sink, sizeof sink);
            if (n == PD_IO_AGAIN)
                break;
            if (n <= 0) {
                session_close(s);
                return;
            }
        }
    }
    update_interest(s);
}

/*
 * A session ending with a statement in flight: the statement would go on until the server
 * next writes to the closed connection, holding locks and a CPU meanwhile, and in
 * autocommit even commit; so it is cancelled first, as the client could no longer do.
 */
static bool cancel_running(pd_session_t *s, const char *why)
{
    if ((!s->busy && s->ready_owed == 0) || s->backend.conn == NULL || !s->backend.connected)
        return false;
    pd_log_info(s->tag, "%s during a query; cancelling it", why);
    if (pd_cancel_dispatch(s->loop, s->backend.conn, s->tag) != 0)
        pd_log_warning(s->tag, "could not start cancelling the query");
    return true;
}

/* The client went away without Terminate. */
static void client_gone(pd_session_t *s)
{
    if (!cancel_running(s, "client closed the connection"))
        pd_log_debug(s->tag, "client closed the connection");
    session_close(s);
}

/* A protocol violation by the client: PostgreSQL's 08P01, then close. */
static void client_violation(pd_session_t *s, const char *message)
{
    pd_session_terminate(s, "08P01", message, NULL);
}

static void server_lost(pd_session_t *s, const char *why)
{
    pd_log_warning(s->tag, "lost the connection to the server: %s", why ? why : "closed");
    pd_session_terminate(s, "08006", "pgdual lost its connection to the database server",
                         "The server closed the connection or the network failed. "
                         "Reconnect to continue; the open transaction, if any, was rolled "
                         "back.");
}

/* ---------------------------------------------------------------------------------------
 * Interest: what each socket is polled for follows from the pipes and the state.
 */

static void update_interest(pd_session_t *s)
{
    if (s->closed)
        return;
    switch (s->state) {
    case PD_SESSION_STARTUP:
    case PD_SESSION_AUTH:
        pd_transport_want(&s->client, true, out_pending(s));
        break;
    case PD_SESSION_TLS:
        break; /* the handshake sets its own interest */
    case PD_SESSION_CONNECTING:
        /* Not reading: what the client sends now waits for the backend. */
        pd_transport_want(&s->client, false, out_pending(s));
        break;
    case PD_SESSION_ACTIVE:
        pd_transport_want(&s->client,
                          !pipe_pending(&s->c2b) && !s->client_terminated && !s->hold_client &&
                              !s->gate_held && !recall_holds(s),
                          pipe_pending(&s->b2c) || out_pending(s));
        pd_transport_want(&s->server, !pipe_pending(&s->b2c) && !s->mirror_wait,
                          pipe_pending(&s->c2b) || s->to_server.len > 0);
        break;
    case PD_SESSION_CLOSING: {
        bool owed = pipe_pending(&s->b2c) || out_pending(s);
        pd_transport_want(&s->client, !owed, owed);
        break;
    }
    default:
        break;
    }
}

/* ---------------------------------------------------------------------------------------
 * ACTIVE: the relay
 */

/* ---------------------------------------------------------------------------------------
 * Batches: what the server owes, in order (sessions with rules only)
 */

static bool batch_push(pd_session_t *s, pd_batch_t b)
{
    if (s->batch_count == s->batch_cap) {
        unsigned cap = s->batch_cap ? s->batch_cap * 2 : 16;
        if (cap > 1u << 20)
            return false; /* a client pipelining a million batches is not served */
        pd_batch_t *ring = malloc(cap * sizeof *ring);
        if (ring == NULL)
            return false;
        for (unsigned i = 0; i < s->batch_count; i++)
            ring[i] = s->batches[(s->batch_head + i) % s->batch_cap];
        free(s->batches);
        s->batches = ring;
        s->batch_cap = cap;
        s->batch_head = 0;
    }
    s->batches[(s->batch_head + s->batch_count) % s->batch_cap] = b;
    s->batch_count++;
    return prep_put(s, (pd_prep_t){.kind = PD_PREP_END}, b.internal);
}

static pd_batch_t *batch_front(pd_session_t *s)
{
    return s->batch_count > 0 ? &s->batches[s->batch_head] : NULL;
}

static void batch_pop(pd_session_t *s)
{
    if (s->batch_count == 0)
        return;
    s->batch_head = (s->batch_head + 1) % s->batch_cap;
    s->batch_count--;
}

/* Ends the batch being sent (at Sync, Query or FunctionCall). */
static bool batch_close(pd_session_t *s, bool shadow)
{
    pd_batch_t b = {.seq = s->batch_seq++,
                    .shadow = shadow,
                    .wrap = s->wrap_open ? 'W' : 0,
                    .serial = s->stmt_serial};
    if (s->wrap_open) {
        /* What the client sends next waits until pgdual's COMMIT is answered. */
        s->wrap_open = false;
        s->hold_client = true;
    }
    s->batch_msgs = s->batch_exec = 0;
    s->batch_txn = 0;
    s->batch_wrote = false;
    s->sent[0] = s->sent[1] = s->sent[2] = 0;
    s->batch_refused = false;
    prepared_free(s->cand);
    s->cand = NULL;
    return batch_push(s, b);
}

/* ---------------------------------------------------------------------------------------
 * Responses to drop: those that answer messages the proxy put into a client's batch
 */

static int kind_index(uint8_t type)
{
    return type == PD_BE_PARSE_COMPLETE ? 0 : type == PD_BE_BIND_COMPLETE ? 1 : 2;
}

/* The message the proxy is about to send in the current batch will be answered by the
 * next response of its kind: that one is dropped. */
static bool drop_expect(pd_session_t *s, uint8_t response_type)
{
    if (s->drop_count == s->drop_cap) {
        unsigned cap = s->drop_cap ? s->drop_cap * 2 : 16;
        if (cap > 1u << 20)
            return false;
        pd_drop_t *ring = malloc(cap * sizeof *ring);
        if (ring == NULL)
            return false;
        for (unsigned i = 0; i < s->drop_count; i++)
            ring[i] = s->drops[(s->drop_head + i) % s->drop_cap];
        free(s->drops);
        s->drops = ring;
        s->drop_cap = cap;
        s->drop_head = 0;
    }
    int k = kind_index(response_type);
    s->drops[(s->drop_head + s->drop_count) % s->drop_cap] =
        (pd_drop_t){.seq = s->batch_seq, .type = response_type, .idx = s->sent[k]++};
    s->drop_count++;
    return true;
}

/* Whether a ParseComplete/BindComplete/CloseComplete of batch b answers the proxy. */
static bool drop_match(pd_session_t *s, pd_batch_t *b, uint8_t type)
{
    uint32_t idx = b->seen[kind_index(type)]++;
    if (s->drop_count == 0)
        return false;
    pd_drop_t *d = &s->drops[s->drop_head];
    if (d->seq != b->seq || d->type != type || d->idx != idx)
        return false;
    s->drop_head = (s->drop_head + 1) % s->drop_cap;
    s->drop_count--;
    return true;
}

/* At ReadyForQuery: marks of the batch not met (the server skipped after an error). */
static void drop_forget_batch(pd_session_t *s, uint32_t seq)
{
    while (s->drop_count > 0 && s->drops[s->drop_head].seq == seq) {
        s->drop_head = (s->drop_head + 1) % s->drop_cap;
        s->drop_count--;
    }
}

/*
 * Whether this session tracks statements (its database has rules), recomputed when the
 * rules or flags changed; switched only between batches, so that the bookkeeping of
 * responses never starts or stops in the middle of one.
 */
static void refresh_rules(pd_session_t *s)
{
    if (on_thread(s))
        return; /* pass-through; a reload that gives its database rules recalls it */
    unsigned gen = s->srv->rules_generation + 1;
    if (s->rules_generation == gen || s->busy || s->batch_count > 0)
        return;
    /* Reading new (read_side), the mirror connection is old's: the next batch goes back
       first, and the rest is decided then. But a switchover made meanwhile makes new
       authoritative before the next message (gate_closed); a write would otherwise go
       back to old and run there under the old flags, new's sequences left behind. */
    if (s->reading) {
        s->want_new = s->rules_on && pd_server_new_authoritative(s->srv, s->database);
        return;
    }
    if (!pd_mirror_follow_flags(s))
        return;
    s->rules_on = pd_route_db_has_rules(s->srv->cfg, s->database);
    s->mir.on = s->rules_on &&
                (pd_mirror_db_active(s->srv, s->database) || pd_mirror_db_aa(s->srv, s->database));
    s->want_new = s->rules_on && pd_server_new_authoritative(s->srv, s->database);
    s->rules_generation = gen;
}
/* A shadow read is taken for a sampled share of statements that have one. */
static bool sample_shadow(pd_session_t *s, const pd_sql_result_t *r)
{
    if (r->shadow_sql == NULL || r->rule < 0)
        return false;
    pd_rule_stats_t *st = &s->srv->stats[r->rule];
    /* Only one shadow at a time, outside explicit transactions (the shadow query must
     * not take part in the client's transaction), and not behind pipelined batches. */
    if (s->shadow != NULL || s->txn_status != 'I' || s->batch_count > 0) {
        st->shadow_skipped++;
        return false;
    }
    double sample = s->srv->cfg->shadow_sample;
    return sample >= 1.0 || (double)random() / ((double)RAND_MAX + 1.0) < sample;
}

static bool start_shadow(pd_session_t *s, pd_sql_result_t *r, const char *sql)
{
    if (!s->sums_ready) {
        if (!pd_result_sum_init(&s->sum_old, false) || !pd_result_sum_init(&s->sum_new, false))
            return false;
        s->sums_ready = true;
    }
    pd_result_sum_t *sums[2] = {&s->sum_old, &s->sum_new};
    for (int i = 0; i < 2; i++) {
        EVP_MD_CTX *keep = sums[i]->row;
        *sums[i] = (pd_result_sum_t){.ordered = r->ordered, .row = keep};
    }
    free(s->shadow_text);
    s->shadow_text = strdup(sql);
    s->shadow = r;
    r->refs++;
    return s->shadow_text != NULL;
}

/* At Sync: a batch that executes one shadowed prepared statement once is compared. */
static bool shadow_extended(pd_session_t *s)
{
    pd_prepared_t *c = s->cand;
    if (c == NULL || s->batch_exec != 1 || s->batch_refused || s->wrap_open ||
        !sample_shadow(s, c->r))
        return false;
    if (!start_shadow(s, c->r, c->sql))
        return false;
    s->shadow_ext = c; /* Bind and types to replay, after the client's batch */
    s->cand = NULL;
    return true;
}
/* The message that carries a refusal to PostgreSQL, which then reports it itself. */
static void refusal_query(pd_buf_t *msg, const pd_sql_result_t *r, bool rollback_first)
{
    pd_buf_t sql;
    pd_buf_init(&sql);
    /* A refused COMMIT ends the transaction, as a COMMIT that fails in PostgreSQL does
       (clients take the transaction to be over): ROLLBACK, then the error. */
    if (rollback_first)
        pd_buf_put(&sql, "ROLLBACK; ", 10);
    pd_route_refusal_sql(&sql, r->sqlstate, r->message, r->hint);
    if (pd_buf_ok(&sql))
        pd_fe_query(msg, (const char *)sql.data);
    pd_buf_free(&sql);
}

/*
 * In an extended-protocol batch a refusal goes to the server as Close, Parse, Bind and
 * Execute of the raising statement under a name of pgdual's (the client's unnamed
 * statement and portal are left alone). PostgreSQL reports the error and skips the rest
 * of the batch up to Sync, as for an error of its own; the responses to our Close, Parse
 * and Bind are dropped.
 */
static bool refusal_extended(pd_session_t *s, pd_buf_t *msg, const pd_sql_result_t *r)
{
    static const char name[] = "pgdual_refusal";
    pd_buf_t sql;
    pd_buf_init(&sql);
    pd_route_refusal_sql(&sql, r->sqlstate, r->message, r->hint);
    bool ok = pd_buf_ok(&sql);
    if (ok) {
        pd_fe_close(msg, 'S', name);
        pd_fe_parse(msg, name, (const char *)sql.data, 0, NULL);
        pd_fe_bind(msg, name, name, 0, NULL, NULL, NULL, 0, NULL);
        pd_fe_execute(msg, name, 0);
        ok = prep_close(s, false) && prep_parse(s, PD_PREP_OTHER, NULL, false) &&
             drop_expect(s, PD_BE_CLOSE_COMPLETE) && drop_expect(s, PD_BE_PARSE_COMPLETE) &&
             drop_expect(s, PD_BE_BIND_COMPLETE);
        s->batch_refused = true;
    }
    pd_buf_free(&sql);
    return ok;
}
/*
 * A statement of pgdual's own (answers dropped), by the extended protocol under a name of
 * its own: a Query would drop the client's unnamed statement, which it may Bind in its
 * next batch.
 */
static bool own_statement(pd_session_t *s, const char *sql)
{
    static const char name[] = "pgdual_own";
    pd_buf_t *out = &s->to_server;
    /* The portal of one that failed may be left until the transaction ends. */
    pd_fe_close(out, 'P', name);
    pd_fe_close(out, 'S', name);
    pd_fe_parse(out, name, sql, 0, NULL);
    pd_fe_bind(out, name, name, 0, NULL, NULL, NULL, 0, NULL);
    pd_fe_execute(out, name, 0);
    pd_fe_close(out, 'P', name); /* BEGIN's would last the transaction */
    return prep_close(s, true) && prep_close(s, true) && prep_parse(s, PD_PREP_OTHER, NULL, true) &&
           prep_close(s, true);
}

/*
 * Wrap (pd_mirror_wraps, mirror.h): the client's autocommit batch runs on the
 * authoritative side inside pgdual's own BEGIN ... COMMIT, so that its row images join
 * their rows' queues before the commit makes the rows visible to other sessions and, under
 * lockstep, its row locks are held until the mirror has applied and committed it (lockstep
 * holds the batch's ReadyForQuery until then). BEGIN goes ahead of the batch, as the
 * proxy's own batch whose answers are dropped; the client's input waits until pgdual's
 * COMMIT (or ROLLBACK, when the batch failed) is answered, and the client hears that
 * ReadyForQuery, 'I', and the COMMIT's error if it failed.
 *
 * The decision is taken at the batch's first message (a Query; a Parse or a Bind of an
 * extended-protocol batch, by its statement), which must be the first of the client's
 * still unsent: BEGIN goes out before it. The batch is the client's up to its Sync (or
 * Query); only then is the client held (batch_close).
 */
static bool maybe_wrap(pd_session_t *s, const pd_pipe_t *p, const pd_sql_result_t *r,
                       const char *sql)
{
    if (!s->mir.on || s->wrap_open || s->batch_count > 0 || s->batch_msgs > 0 || pipe_pending(p) ||
        s->to_server.len > 0 || s->shadow != NULL || s->txn_status != 'I' || !pd_mirror_wraps(s, r))
        return true;
    free(s->wrap_sql);
    s->wrap_sql = strdup(sql);
    s->wrap_rule = r->mirror_rule;
    bool ok = own_statement(s, "BEGIN");
    pd_fe_sync(&s->to_server);
    pd_batch_t b = {.seq = s->batch_seq, .internal = true, .wrap = 'B'};
    if (!ok || s->wrap_sql == NULL || !pd_buf_ok(&s->to_server) || !batch_push(s, b)) {
        pd_buf_reset(&s->to_server);
        return false;
    }
    s->wrap_open = true;
    return true;
}

/*
 * A batch that may be wrapped starts while earlier ones are still unanswered (a pipelining
 * client, or the proxy's own shadow read): whether it runs in a transaction is known
 * only from their last ReadyForQuery. True when it waits for that (the client's input is
 * held until the session is idle; nothing of the message has been acted on yet).
 */
static bool wrap_waits(pd_session_t *s, const pd_sql_result_t *r)
{
    if (!s->mir.on || s->wrap_open || s->batch_msgs > 0 || s->batch_count == 0 ||
        !pd_mirror_wraps(s, r))
        return false;
    s->hold_client = s->idle_wait = true;
    return true;
}

static int read_side(pd_session_t *s, const pd_sql_result_t *r);

/* ReadyForQuery (status) ending a part of a wrap: true when it is dropped. */
static bool wrap_ready(pd_session_t *s, uint8_t wrap, uint8_t status)
{
    if (wrap == 'B')
        return true; /* the client's batch follows */
    if (wrap == 'W') {
        /* The batch's images are queued; under lockstep the mirror applied and committed
           it. Under lockstep with on_failure: fail a batch the mirror did not apply is
           rolled back, and the client hears the refusal as the COMMIT's error. */
        s->wrap_commit = status != 'E';
        pd_sql_result_t *refused = NULL;
        if (s->wrap_commit && pd_mirror_refuses_wrap(s, s->wrap_rule)) {
            if ((refused = pd_mirror_refusal(s, s->wrap_rule)) == NULL) {
                pd_session_terminate(s, "53200", "out of memory", NULL);
                return true;
            }
            s->wrap_commit = false;
        }
        /* A refused batch is rolled back, then the refusal is raised. */
        bool ok = own_statement(s, s->wrap_commit ? "COMMIT" : "ROLLBACK");
        if (refused != NULL) {
            pd_buf_t sql;
            pd_buf_init(&sql);
            pd_route_refusal_sql(&sql, refused->sqlstate, refused->message, refused->hint);
            ok = ok && pd_buf_ok(&sql) && own_statement(s, (const char *)sql.data);
            pd_buf_free(&sql);
        }
        pd_fe_sync(&s->to_server);
        pd_sql_result_release(refused);
        pd_batch_t b = {.seq = s->batch_seq, .internal = true, .wrap = 'C'};
        if (!ok || !pd_buf_ok(&s->to_server) || !batch_push(s, b)) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return true;
        }
        s->busy = true;
        return true;
    }
    /* 'C': the transaction is over; the client hears this ReadyForQuery and goes on. */
    s->wrap_released = false;
    free(s->wrap_sql);
    s->wrap_sql = NULL;
    s->hold_client = false;
    return false;
}

/* The plan of the statement at the scan point: the one kept when it waited (wrap_waits),
   unless the rules changed since, else routed now. NULL when out of memory. */
static pd_sql_result_t *route_sql(pd_session_t *s, const char *sql)
{
    pd_sql_result_t *r = s->kept_plan;
    s->kept_plan = NULL;
    if (r != NULL && s->kept_gen == s->srv->rules_generation)
        return r;
    pd_sql_result_release(r);
    return pd_route_statement(s->srv, s->database, s->route_key, sql);
}

static void keep_plan(pd_session_t *s, pd_sql_result_t *r)
{
    pd_sql_result_release(s->kept_plan);
    s->kept_plan = r;
    s->kept_gen = s->srv->rules_generation;
}

/* The first statement of a batch, plan r: 0 the batch goes on, 1 it waits (wrap_waits,
   read_side), -1 the session ended. */
static int batch_side(pd_session_t *s, const pd_sql_result_t *r)
{
    return wrap_waits(s, r) ? 1 : read_side(s, r);
}

/*
 * `DEALLOCATE name` of statements this side may not hold (the session prepared them while
 * on its other side): they are prepared here first, in a batch of pgdual's own whose
 * answers are dropped, so that the DEALLOCATE finds them as on PostgreSQL. That is decided
 * once the client's earlier batches are answered (a pipelined DEALLOCATE ALL drops them
 * first) and written (pgdual's batch goes out ahead of what is not). 0 go on, 1 wait for
 * that batch, 2 wait for the earlier ones, -1 out of memory.
 */
static int dealloc_here(pd_session_t *s, char *const *names)
{
    /* Once per Query: what failed to be prepared is not tried again (the DEALLOCATE
       then fails as on a server without it); in a failed transaction every Parse does. */
    if (names == NULL || s->dealloc_tried || s->txn_status == 'E')
        return 0;
    bool ok = true, any = false;
    for (size_t i = 0; ok && names != NULL && names[i] != NULL; i++) {
        pd_stmt_t *e = stmt_find(s, names[i]);
        if (e == NULL || !e->lost)
            continue;
        if (!any && s->batch_count > 0) {
            s->hold_client = s->idle_wait = true; /* they may drop it (DEALLOCATE ALL) */
            return 2;
        }
        if (!any && pipe_pending(&s->c2b))
            return 2;
        ok = stmt_decide(s, e); /* what this side is to hold: e->sent */
        if (!ok || e->sent == NULL)
            continue; /* refused: PostgreSQL never held it */
        e->lost = false;
        pd_fe_close(&s->to_server, 'S', e->name);
        pd_fe_parse(&s->to_server, e->name, e->sent, e->ntypes, e->types);
        ok = prep_close(s, true) && prep_parse(s, PD_PREP_OURS, e, true);
        any = true;
    }
    if (!ok)
        return -1;
    if (!any)
        return 0;
    pd_fe_sync(&s->to_server);
    pd_batch_t b = {.seq = s->batch_seq, .internal = true, .wrap = 'B'};
    if (!pd_buf_ok(&s->to_server) || !batch_push(s, b))
        return -1;
    s->hold_client = s->idle_wait = true;
    return 1;
}

/* The names a Query's `DEALLOCATE name`s drop, as PostgreSQL's parser reads them (NULL:
   none, or no statement of the client's to drop). */
static char **query_deallocates(const pd_session_t *s, const char *sql)
{
    if (s->stmt_count == 0 || strcasestr(sql, "DEALLOCATE") == NULL)
        return NULL;
    return pd_sql_deallocated_names(sql);
}

typedef enum { ROUTE_OK, ROUTE_WAIT, ROUTE_CLOSED } route_rc_t;

/* A whole Query at [scan, scan + total). */
static route_rc_t route_query(pd_session_t *s, pd_pipe_t *p, size_t total)
{
    const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
    pd_fe_query_t q;
    const char *err = NULL;
    if (pd_fe_query_decode(body, total - PD_MSG_HEADER_LEN, &q, &err) != PD_DECODE_OK) {
        client_violation(s, err ? err : "invalid Query message");
        return ROUTE_CLOSED;
    }
    if (p->has_hole && p->hole_end != p->scan)
        return ROUTE_WAIT; /* a rewrite would need a second hole: flush first */
    pd_sql_result_t *r = route_sql(s, q.sql);
    if (r == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    int side = batch_side(s, r);
    if (side > 0)
        keep_plan(s, r); /* taken up again when the batch goes on */
    else if (side < 0)
        pd_sql_result_release(r);
    if (side != 0)
        return side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
    char **names = query_deallocates(s, q.sql);
    int here = dealloc_here(s, names);
    s->dealloc_tried = here == 1;
    if (here > 0) {
        pd_sql_names_free(names);
        keep_plan(s, r);
        return ROUTE_WAIT;
    }
    if (here < 0) {
        pd_sql_names_free(names);
        pd_sql_result_release(r);
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    bool end_txn = false;
    if (s->mir.on) {
        int first = pd_mirror_commit_first(s, r, q.sql);
        end_txn = first == 2;
        if (first == 1) {
            pd_sql_names_free(names);
            pd_sql_result_release(r);
            s->hold_client = true; /* the mirror commits first; then this COMMIT */
            return ROUTE_WAIT;
        }
        if (first == 2 || pd_mirror_refuses(s, r)) {
            int rule = r->mirror_rule >= 0 ? r->mirror_rule : r->rule;
            pd_sql_result_release(r);
            r = pd_mirror_refusal(s, rule);
        }
        if (r == NULL || first < 0) {
            pd_sql_names_free(names);
            pd_sql_result_release(r);
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return ROUTE_CLOSED;
        }
    }
    /* A Query drops the unnamed statement (PostgreSQL's exec_simple_query). */
    bool noted = statements_dropped(s, names);
    if (!noted || (s->stmt_count > 0 && !stmt_forget(s, "", true))) {
        pd_sql_result_release(r);
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    if (s->mir.on && !pd_mirror_on_query(s, r, r->action == PD_SQL_REWRITE ? r->sql : q.sql, q.sql,
                                         s->batch_seq)) {
        pd_sql_result_release(r);
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    if (!maybe_wrap(s, p, r, q.sql)) {
        pd_sql_result_release(r);
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    bool shadow = !s->wrap_open && r->action == PD_SQL_PASS && sample_shadow(s, r);
    if (shadow && !start_shadow(s, r, q.sql))
        shadow = false;
    size_t msg_end = p->scan + total;
    bool ok = true;
    if (r->action == PD_SQL_PASS) {
        p->scan = msg_end;
    } else {
        pd_buf_t msg;
        pd_buf_init(&msg);
        if (r->action == PD_SQL_REWRITE)
            pd_fe_query(&msg, r->sql);
        else
            refusal_query(&msg, r, end_txn);
        ok = pd_buf_ok(&msg) && pipe_replace(p, msg_end, msg.data, msg.len);
        pd_buf_free(&msg);
    }
    pd_sql_result_release(r);
    if (!ok || !batch_close(s, shadow)) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    s->busy = true;
    return ROUTE_OK;
}

/* What the server is to prepare for a decision: the text, or NULL for a refusal. */
static const char *decided_text(const pd_sql_result_t *r, const char *original)
{
    return r->action == PD_SQL_PASS ? original : r->action == PD_SQL_REWRITE ? r->sql : NULL;
}

/* Parse of `e` as decided (nothing for a refusal), put in by the proxy: answered by a
 * dropped response. */
static bool parse_as_decided(pd_session_t *s, pd_buf_t *msg, const pd_stmt_t *e)
{
    if (e->sent == NULL)
        return true;
    pd_fe_parse(msg, e->name, e->sent, e->ntypes, e->types);
    return prep_parse(s, PD_PREP_OURS, e, false) && drop_expect(s, PD_BE_PARSE_COMPLETE);
}

/* The client's Parse of `name` at the scan point, sent as r decides: as it is, rewritten,
 * or replaced by the refusal (whose own messages are queued here, ahead of the caller's
 * op for the Parse). False when out of memory. */
static bool parse_as(pd_session_t *s, pd_pipe_t *p, size_t total, const char *name,
                     const pd_sql_result_t *r, uint16_t ntypes, const uint32_t *types)
{
    if (r->action == PD_SQL_PASS) {
        p->scan += total;
        s->sent[0]++;
        return true;
    }
    pd_buf_t msg;
    pd_buf_init(&msg);
    bool ok = true;
    if (r->action == PD_SQL_REWRITE) {
        pd_fe_parse(&msg, name, r->sql, ntypes, types);
        s->sent[0]++;
    } else {
        ok = refusal_extended(s, &msg, r);
    }
    ok = ok && pd_buf_ok(&msg) && pipe_replace(p, p->scan + total, msg.data, msg.len);
    pd_buf_free(&msg);
    return ok;
}

/* Decides statement e under the rules in force; false when out of memory. */
static bool stmt_decide(pd_session_t *s, pd_stmt_t *e)
{
    pd_sql_result_t *r = route_sql(s, e->sql);
    if (r == NULL)
        return false;
    const char *text = decided_text(r, e->sql);
    char *sent = text ? strdup(text) : NULL;
    if (text != NULL && sent == NULL) {
        pd_sql_result_release(r);
        return false;
    }
    pd_sql_result_release(e->r);
    e->r = r;
    free(e->sent);
    e->sent = sent;
    e->gen = s->srv->rules_generation;
    return true;
}

static bool bind_prefix(pd_session_t *s, pd_stmt_t *e, pd_buf_t *prefix);

/* bind_prefix's messages for statement e, ahead of the message at the scan point. False
   (the session ended) when out of memory. */
static bool prefix_ahead(pd_session_t *s, pd_pipe_t *p, pd_stmt_t *e)
{
    pd_buf_t prefix;
    pd_buf_init(&prefix);
    bool ok = bind_prefix(s, e, &prefix) && pd_buf_ok(&prefix) &&
              (prefix.len == 0 || pipe_replace(p, p->scan, prefix.data, prefix.len));
    pd_buf_free(&prefix);
    if (!ok)
        pd_session_terminate(s, "53200", "out of memory", NULL);
    return ok;
}

/*
 * A Parse of a name the client holds: PostgreSQL refuses it (42P05) and keeps the
 * statement. The record stays; a side that may not hold the statement (the session
 * prepared it on the other) is given it first, as for a Bind, so that the server there
 * refuses the client's Parse itself.
 */
static route_rc_t parse_taken(pd_session_t *s, pd_pipe_t *p, pd_stmt_t *e, const pd_fe_parse_t *m,
                              size_t total)
{
    pd_sql_result_release(s->kept_plan); /* the plan of the refused text, not e's */
    s->kept_plan = NULL;
    if (!prefix_ahead(s, p, e))
        return ROUTE_CLOSED;
    /* Should the server take it after all, the record follows (prep_done). */
    pd_prep_t op = {.kind = PD_PREP_TAKEN,
                    .answer = '1',
                    .serial = e->serial,
                    .made = ++s->stmt_serial,
                    .name = strdup(e->name),
                    .sql = strdup(m->sql),
                    .types = types_of(m),
                    .ntypes = m->nparams};
    /* ...as decided, then: a statement DEALLOCATE ALL dropped first (pipelined) is
       prepared, not refused, and must write what the rules write. */
    pd_sql_result_t *r = route_sql(s, m->sql);
    bool ok = op.name != NULL && op.sql != NULL && op.types != NULL && r != NULL &&
              parse_as(s, p, total, op.name, r, op.ntypes, op.types);
    pd_sql_result_release(r);
    if (!ok)
        prep_free(&op);
    if (!ok || !prep_put(s, op, false)) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    s->busy = true;
    s->batch_msgs++;
    return ROUTE_OK;
}

/* A whole Parse at [scan, scan + total): remembered, decided, sent as decided. */
static route_rc_t route_parse(pd_session_t *s, pd_pipe_t *p, size_t total)
{
    const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
    pd_fe_parse_t m;
    const char *err = NULL;
    if (pd_fe_parse_decode(body, total - PD_MSG_HEADER_LEN, &m, &err) != PD_DECODE_OK) {
        client_violation(s, err ? err : "invalid Parse message");
        return ROUTE_CLOSED;
    }
    if (p->has_hole && p->hole_end != p->scan)
        return ROUTE_WAIT;
    if (s->mir.on && s->batch_msgs == 0) {
        pd_sql_result_t *r = route_sql(s, m.sql);
        if (r == NULL) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return ROUTE_CLOSED;
        }
        int side = batch_side(s, r);
        keep_plan(s, r); /* for stmt_decide, now or when the batch goes on */
        if (side != 0)
            return side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
    }
    pd_stmt_t *dup = m.name[0] != '\0' ? stmt_find(s, m.name) : NULL;
    if (dup != NULL && !dup->maybe_dropped)
        return parse_taken(s, p, dup, &m, total);
    pd_stmt_t *replaced = NULL;
    pd_stmt_t *e = stmt_put(s, &m, &replaced);
    if (e != NULL && replaced != NULL)
        other_moves(e, replaced);
    if (e == NULL || !stmt_decide(s, e) || !maybe_wrap(s, p, e->r, e->sql)) {
        if (replaced != NULL)
            stmt_free(replaced);
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    bool ok = parse_as(s, p, total, e->name, e->r, e->ntypes, e->types);
    /* Confirmed by its ParseComplete; a refused one is answered by an error, and what it
       replaced stays (prep_end). */
    ok = ok && prep_op(s, PD_PREP_CLIENT, '1', e, replaced, false);
    if (!ok) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    s->busy = true;
    s->batch_msgs++;
    return ROUTE_OK;
}
/*
 * A Bind of a statement decided under older rules: the statement is prepared again as
 * they now decide (Close and Parse put in ahead of the Bind, their responses dropped), so
 * that a flag flip reaches statements prepared before it. A refused one gets the refusal.
 */
static bool bind_prefix(pd_session_t *s, pd_stmt_t *e, pd_buf_t *prefix)
{
    if (e->gen != s->srv->rules_generation || e->lost) {
        char *before = e->sent ? strdup(e->sent) : NULL;
        bool had = e->sent != NULL;
        if ((had && before == NULL) || !stmt_decide(s, e)) {
            free(before);
            return false;
        }
        bool same = had == (e->sent != NULL) && (!had || strcmp(before, e->sent) == 0);
        free(before);
        if (!same || e->lost) {
            /* In a failed transaction the server refuses the Parse (25P02, as PostgreSQL
               refuses the client's Bind) unless the statement ends the transaction: it is
               still not held for what follows before the answer. */
            e->lost = s->txn_status == 'E' && e->r->txn != PD_TXN_END && e->r->txn != PD_TXN_INNER;
            pd_fe_close(prefix, 'S', e->name);
            if (!prep_close(s, false))
                return false;
            if (!drop_expect(s, PD_BE_CLOSE_COMPLETE) || !parse_as_decided(s, prefix, e))
                return false;
        }
    }
    if (e->r->action == PD_SQL_REFUSE && !s->batch_refused)
        return refusal_extended(s, prefix, e->r);
    return true;
}

/*
 * A Bind or Describe of an unnamed statement the client does not hold, which PostgreSQL
 * answers with 26000: the connection's may be one the mirror left there (libpq's
 * PQsendQueryParams uses it) before the session took the connection over, so it is
 * closed ahead, its answer dropped. False (the session ended) when out of memory.
 */
static bool unnamed_closed(pd_session_t *s, pd_pipe_t *p)
{
    pd_buf_t m;
    pd_buf_init(&m);
    pd_fe_close(&m, 'S', "");
    bool ok = prep_close(s, false) && drop_expect(s, PD_BE_CLOSE_COMPLETE) && pd_buf_ok(&m) &&
              pipe_replace(p, p->scan, m.data, m.len);
    pd_buf_free(&m);
    if (!ok)
        pd_session_terminate(s, "53200", "out of memory", NULL);
    return ok;
}

/*
 * A whole Describe: one that starts a batch runs where its statement's plan says
 * (read_side; a portal's, on old); a statement the server may not hold as now decided
 * (the session changed sides, or the rules changed) is prepared again ahead of it, as for
 * a Bind.
 */
static route_rc_t route_describe(pd_session_t *s, pd_pipe_t *p, const uint8_t *body, size_t n)
{
    pd_fe_target_t t;
    const char *err = NULL;
    if (pd_fe_target_decode(body, n, &t, &err) != PD_DECODE_OK)
        return ROUTE_OK; /* the server reports it */
    pd_stmt_t *e = t.kind == 'S' ? stmt_find(s, t.name) : NULL;
    if (s->mir.on && s->batch_msgs == 0) {
        int side = read_side(s, e != NULL ? e->r : NULL);
        if (side != 0)
            return side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
    }
    if (e == NULL && !(t.kind == 'S' && t.name[0] == '\0' && s->mir.on))
        return ROUTE_OK;
    if (e != NULL && !e->lost && e->gen == s->srv->rules_generation)
        return ROUTE_OK;
    if (p->has_hole && p->hole_end != p->scan)
        return ROUTE_WAIT;
    bool ok = e == NULL ? unnamed_closed(s, p) : prefix_ahead(s, p, e);
    return ok ? ROUTE_OK : ROUTE_CLOSED;
}

/* The statement name of a Bind, when its start is at hand; NULL otherwise. */
static const char *bind_statement(const uint8_t *body, size_t n)
{
    const uint8_t *nul = memchr(body, 0, n);
    if (nul == NULL)
        return NULL;
    size_t rest = n - (size_t)(nul + 1 - body);
    return memchr(nul + 1, 0, rest) ? (const char *)nul + 1 : NULL;
}

/* The mirror's view of a Bind (e NULL: a statement the proxy does not track). */
static bool mirror_bind(pd_session_t *s, const pd_stmt_t *e, const uint8_t *body, size_t n,
                        uint8_t **rewritten, size_t *len)
{
    uint8_t *dummy = NULL;
    size_t dummy_len = 0;
    bool ok = pd_mirror_on_bind(s, e ? e->r : NULL, e ? e->sql : NULL, e ? e->sent : NULL,
                                e ? e->types : NULL, e ? e->ntypes : 0, body, n,
                                rewritten ? rewritten : &dummy, len ? len : &dummy_len);
    free(dummy);
    return ok;
}

/*
 * Bind and Close on a database with rules. Bind needs only its start (the names) to be
 * at hand, unless it may become a shadow candidate; its body streams through as usual.
 */
static route_rc_t route_bind_close(pd_session_t *s, pd_pipe_t *p, uint8_t type, size_t total)
{
    size_t avail = p->end - p->scan;
    const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
    size_t here = (avail < total ? avail : total) - PD_MSG_HEADER_LEN;
    const char *err = NULL;
    if (type == PD_FE_CLOSE) {
        pd_fe_target_t t;
        if (total > avail)
            return ROUTE_WAIT;
        if (pd_fe_target_decode(body, total - PD_MSG_HEADER_LEN, &t, &err) != PD_DECODE_OK) {
            client_violation(s, err ? err : "invalid Close message");
            return ROUTE_CLOSED;
        }
        if (s->mir.on && s->batch_msgs == 0) {
            int side = read_side(s, NULL); /* a batch that starts so runs on old */
            if (side != 0)
                return side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
        }
        /* The record is out of the table for what follows, and back should the
           server skip the Close (prep_end). */
        pd_stmt_t *e = t.kind == 'S' ? stmt_find(s, t.name) : NULL;
        bool ok = e == NULL || stmt_note_freed(s, e);
        if (!ok || (e != NULL ? !prep_op(s, PD_PREP_CLOSE, '3', e, stmt_detach(s, t.name), false)
                              : !prep_close(s, false))) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return ROUTE_CLOSED;
        }
        s->sent[2]++;
        return ROUTE_OK;
    }
    const char *name = bind_statement(body, here);
    if (name == NULL)
        return total > avail ? ROUTE_WAIT : ROUTE_OK; /* malformed: the server says so */
    pd_stmt_t *e = stmt_find(s, name);
    if (e == NULL) {
        if (name[0] == '\0' && s->mir.on) { /* see unnamed_closed */
            if (p->has_hole && p->hole_end != p->scan)
                return ROUTE_WAIT;
            if (!unnamed_closed(s, p))
                return ROUTE_CLOSED;
        }
        if (s->mir.on && !mirror_bind(s, NULL, body, here, NULL, NULL))
            return ROUTE_CLOSED;
        s->sent[1]++;
        return ROUTE_OK;
    }
    if (p->has_hole && p->hole_end != p->scan)
        return ROUTE_WAIT;
    if (s->mir.on && total > avail && pd_mirror_bind_needs_whole(e->r))
        return ROUTE_WAIT; /* its parameters are replayed: the relay loop makes room */
    int side = batch_side(s, e->r);
    if (side != 0)
        return side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
    bool first_bind = s->sent[1] == 0;
    pd_buf_t prefix;
    pd_buf_init(&prefix);
    uint8_t *bind = NULL;
    size_t bind_len = 0;
    bool ok = bind_prefix(s, e, &prefix) && maybe_wrap(s, p, e->r, e->sql) &&
              (!s->mir.on || mirror_bind(s, e, body, total - PD_MSG_HEADER_LEN, &bind, &bind_len));
    if (ok && bind != NULL) {
        /* The Bind itself changes too: it and what goes ahead of it, in one replacement. */
        pd_buf_put(&prefix, bind, bind_len);
        ok = pd_buf_ok(&prefix) && pipe_replace(p, p->scan + total, prefix.data, prefix.len);
        free(bind);
        pd_buf_free(&prefix);
        if (!ok) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return ROUTE_CLOSED;
        }
        s->sent[1]++;
        return ROUTE_OK;
    }
    ok = ok && pd_buf_ok(&prefix) &&
         (prefix.len == 0 || pipe_replace(p, p->scan, prefix.data, prefix.len));
    pd_buf_free(&prefix);
    if (!ok) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return ROUTE_CLOSED;
    }
    s->sent[1]++;
    /* The first Bind of a batch, to a read with a shadow form, whole at hand (so not
     * huge): the batch may be compared. */
    if (e->r->shadow_sql != NULL && first_bind && s->cand == NULL && total <= avail &&
        total <= PIPE_SIZE)
        s->cand = prepared_from(e, body, total - PD_MSG_HEADER_LEN); /* NULL: no shadow */
    return ROUTE_OK;
}
/*
 * Execute of plan further into an extended-protocol batch than its first statement (which
 * maybe_wrap decided on): a write pd_mirror_wraps wants in a transaction may not commit
 * before pgdual has read its answer, which it reads only at the batch's end. It goes on
 * inside the client's explicit transaction, or in a wrapped batch; in a batch that would
 * commit it as an implicit transaction it is refused, and so is a COMMIT in the same batch
 * after it. 0 go on, 1 wait until no batch before this one is in flight (then the
 * transaction status this batch started at is known), 2 refuse.
 */
static int batch_order(pd_session_t *s, const pd_sql_result_t *plan)
{
    if (plan == NULL)
        return 0;
    if (plan->mirror == PD_MIRROR_TXN) {
        if (plan->txn == PD_TXN_END && plan->txn_commit && s->batch_wrote)
            return 2;
        if (plan->txn != PD_TXN_INNER)
            s->batch_txn = plan->txn == PD_TXN_BEGIN ? 'B' : 'E';
        if (plan->txn == PD_TXN_END)
            s->batch_wrote = false; /* rolled back */
        return 0;
    }
    if (plan->action == PD_SQL_REFUSE || !pd_mirror_wraps(s, plan))
        return 0;
    if (!s->wrap_open && s->batch_txn == 0 && s->batch_count > 0) {
        s->hold_client = s->idle_wait = true;
        return 1;
    }
    bool explicit = s->batch_txn == 'B' || (s->batch_txn == 0 && s->txn_status != 'I');
    if (!s->wrap_open && !explicit)
        return 2;
    s->batch_wrote = true;
    return 0;
}

/* The mirror's view of an Execute or a Describe (whole at hand). */
static route_rc_t mirror_execute(pd_session_t *s, pd_pipe_t *p, const uint8_t *body, size_t n)
{
    if (memchr(body, 0, n) == NULL)
        return ROUTE_OK; /* malformed: the server says so */
    const pd_sql_result_t *plan = pd_mirror_portal_plan(s, (const char *)body);
    int order = s->batch_refused ? 0
                : s->reading     ? (plan != NULL && !plan->read_new ? 3 : 0)
                                 : batch_order(s, plan);
    if (order == 1)
        return ROUTE_WAIT;
    int first = order >= 2
                    ? 0
                    : pd_mirror_commit_first(
                          s, plan, plan != NULL && plan->mirror == PD_MIRROR_TXN ? "COMMIT" : "");
    if (first == 1) {
        s->hold_client = true; /* the mirror commits first; then this Execute */
        return ROUTE_WAIT;
    }
    if (first < 0)
        return ROUTE_CLOSED;
    if ((order >= 2 || first == 2 || pd_mirror_refuses(s, plan)) && !s->batch_refused) {
        if (p->has_hole && p->hole_end != p->scan)
            return ROUTE_WAIT;
        int rule = plan->mirror_rule >= 0 ? plan->mirror_rule : plan->rule;
        pd_sql_result_t *r = order == 3   ? pd_mirror_read_refusal(s, s->read_rule)
                             : order == 2 ? pd_mirror_order_refusal(s, rule, plan)
                                          : pd_mirror_refusal(s, rule);
        pd_buf_t prefix;
        pd_buf_init(&prefix);
        bool ok = r != NULL && refusal_extended(s, &prefix, r) && pd_buf_ok(&prefix) &&
                  pipe_replace(p, p->scan, prefix.data, prefix.len);
        pd_buf_free(&prefix);
        pd_sql_result_release(r);
        if (!ok)
            return ROUTE_CLOSED;
    }
    return pd_mirror_on_execute(s, body, n, s->batch_seq) ? ROUTE_OK : ROUTE_CLOSED;
}

static bool mirror_execute_describe(pd_session_t *s, uint8_t type, const uint8_t *body, size_t n)
{
    pd_fe_target_t t;
    const char *err = NULL;
    if (pd_fe_target_decode(body, n, &t, &err) != PD_DECODE_OK)
        return true; /* the server reports it; it answers nothing we would strip */
    const pd_stmt_t *e = t.kind == 'S' ? stmt_find(s, t.name) : NULL;
    return pd_mirror_on_describe(s, t.kind, t.name, e != NULL ? e->r : NULL, s->batch_seq);
}

/* Decides every whole header in [scan, end). Returns 0, or -1 when the session ended. */
/* Between transactions, nothing of the client's sent and unanswered, nothing of ours. */
static bool at_boundary(const pd_session_t *s)
{
    const pd_pipe_t *c = &s->c2b;
    return s->batch_count == 0 && s->txn_status == 'I' && !pipe_pending(c) && c->skip == 0 &&
           s->batch_msgs == 0 && s->to_server.len == 0 && s->shadow == NULL && !s->hold_client &&
           !s->mirror_wait;
}

bool pd_session_quiet(const pd_session_t *s)
{
    if (s->home != NULL)
        return false; /* pass-through on a relay thread; recalled if its database has rules */
    if (s->closed || s->state != PD_SESSION_ACTIVE)
        return true; /* not serving: its first statement meets the gate */
    return !s->rules_on || s->gate_held || at_boundary(s);
}

static bool server_attach(pd_session_t *s);

/*
 * After a swap: statements the client freed while the connection now its backend held
 * them are freed there first, in a batch of pgdual's own ahead of the client's (answers
 * dropped; the client's input waits until it is answered). 1 when one was sent, 0 when
 * there was nothing to free, -1 when out of memory (the session ended).
 */
static int close_stale(pd_session_t *s)
{
    if (s->nstale == 0)
        return 0;
    bool ok = true;
    for (unsigned i = 0; i < s->nstale; i++) {
        pd_fe_close(&s->to_server, 'S', s->stale[i]);
        ok = ok && prep_close(s, true);
    }
    pd_fe_sync(&s->to_server);
    stale_clear(s);
    pd_batch_t b = {.seq = s->batch_seq, .internal = true, .wrap = 'B'};
    if (!ok || !pd_buf_ok(&s->to_server) || !batch_push(s, b)) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return -1;
    }
    s->hold_client = s->idle_wait = true;
    return 1;
}

/*
 * At a transaction boundary the session's backend and its mirror connection change
 * places (their settings were kept in step on both). What each connection holds under
 * the client's statement names is known: a statement is prepared again at its next Bind
 * only where it is not held as now decided (or on a connection opened since). 0 done,
 * 1 wait (the mirror is being opened or applies what it has queued; the session is woken
 * when it is ready), 2 done, and pgdual's own batch goes first (close_stale: the caller
 * waits for it as for any batch), -1 failed (the session ended; `why` names what the
 * other side was wanted for).
 */
static int swap_sides(pd_session_t *s, const char *why)
{
    int rc = pd_mirror_swap_ready(s);
    if (rc < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "pgdual could not connect to the database's other side to %s",
                 why);
        pd_session_terminate(s, "08006", msg,
                             "Reconnect; check that both servers of the database are up.");
        return -1;
    }
    if (rc > 0)
        return 1;
    /* The connection the session takes is the one it left last time, unless that one
       was lost and the mirror opened another. */
    bool known = s->other_serial != 0 && s->other_serial == pd_mirror_serial(s);
    pd_transport_close(&s->server);
    s->server_open = false;
    pd_mirror_swap(s, &s->backend.conn);
    s->other_serial = pd_mirror_serial(s);
    if (!known)
        stale_clear(s);
    for (unsigned i = 0; i < s->stmt_buckets; i++)
        for (pd_stmt_t *e = s->stmts[i]; e != NULL; e = e->next) {
            char *here = e->sent;
            bool held = !e->lost;
            const char *want = decided_text(e->r, e->sql);
            e->sent = e->other_sent;
            e->lost =
                !known || !e->other_held ||
                (want == NULL ? e->sent != NULL : e->sent == NULL || strcmp(want, e->sent) != 0);
            e->other_sent = here;
            e->other_held = held;
            if (e->name[0] == '\0')
                e->lost = true; /* the mirror's libpq may have used it there */
        }
    if (!server_attach(s)) {
        server_lost(s, "could not watch the server socket");
        return -1;
    }
    rc = close_stale(s);
    return rc > 0 ? 2 : rc;
}

/* Switchover or rollback moved the database's authoritative side: the session follows. */
static int change_sides(pd_session_t *s)
{
    int rc = swap_sides(s, "follow the switchover");
    if (rc == 1 || rc < 0)
        return rc;
    s->auth_new = !s->auth_new;
    pd_log_info(s->tag, "now on the %s side (backend pid %d)", s->auth_new ? "new" : "old",
                PQbackendPID(s->backend.conn));
    return rc;
}

/*
 * reads=new (or new@N) of a tables rule while old is authoritative (writes=dual): a batch
 * that starts with a read the rule serves from new (r->read_new, outside a transaction)
 * runs on new, any other on old; the session swaps sides at the boundary before such a
 * batch, once the mirror has applied what the session wrote (so the read sees the
 * session's own writes). 0 go on, 1 wait (the plan is the caller's to keep), -1 the
 * session ended.
 */
static int read_side(pd_session_t *s, const pd_sql_result_t *r)
{
    if (!s->mir.on || s->auth_new || s->batch_msgs > 0 || s->wrap_open)
        return 0;
    bool want = r != NULL && r->read_new && r->action != PD_SQL_REFUSE && s->txn_status == 'I';
    if (want == s->reading)
        return 0;
    if (s->batch_count > 0 || s->to_server.len > 0) {
        s->hold_client = s->idle_wait = true; /* the side is chosen between batches */
        return 1;
    }
    int rc = swap_sides(s, "serve reads=new");
    if (rc == 1)
        s->gate_held = true; /* woken when the mirror has caught up */
    if (rc == 1 || rc < 0)
        return rc;
    s->reading = want;
    s->read_rule = want ? r->mirror_rule : -1;
    return rc == 2 ? 1 : 0; /* 2: pgdual's batch first; the message waits for it */
}

/*
 * Before a message that would start something new, at a transaction boundary: a paused
 * database holds it; a session on the side the rules no longer make authoritative
 * changes sides first. True when the message must wait (s->gate_held).
 */
static bool gate_closed(pd_session_t *s)
{
    if (s->srv->npauses == 0 && s->auth_new == s->want_new)
        return false;
    if (!at_boundary(s))
        return false; /* in a transaction (or a batch): it finishes first */
    if (pd_server_paused(s->srv, s->database)) {
        s->gate_held = true;
        return true;
    }
    if (s->reading && s->want_new) {
        /* Switchover while reading new: the backend is on new already. */
        s->reading = false;
        s->auth_new = true;
        return false;
    }
    if (s->auth_new != s->want_new) {
        int rc = change_sides(s);
        s->gate_held = rc == 1; /* 2: pgdual's batch goes first (hold_client) */
        return rc != 0;
    }
    return false;
}

/* A client message is on its way to the server: each Query, Sync and FunctionCall is
   answered by one ReadyForQuery. Counted once, when the scan moves past the message. */
/* COPY's data, end and failure: part of the COPY statement of the Query or batch before
   them, not messages of a batch of their own. */
static bool copy_message(uint8_t type)
{
    return type == PD_FE_COPY_DATA || type == PD_FE_COPY_DONE || type == PD_FE_COPY_FAIL;
}

static void count_ready_owed(pd_session_t *s, uint8_t type)
{
    if (type == PD_FE_QUERY || type == PD_FE_SYNC || type == PD_FE_FUNCTION_CALL)
        s->ready_owed++;
    if (!copy_message(type))
        s->last_type = type;
}

/* Nothing of the client's on its way to or in the server: every batch it sent is ended
   (by Query, Sync or FunctionCall) and answered. */
static bool batches_answered(const pd_session_t *s)
{
    uint8_t t = s->last_type;
    return s->ready_owed == 0 &&
           (t == 0 || t == PD_FE_QUERY || t == PD_FE_SYNC || t == PD_FE_FUNCTION_CALL);
}

/* Recalled to the main loop and at a batch boundary: the client's next batch waits (not
   read further) until the session is there, where the rules apply to it. */
static bool recall_holds(const pd_session_t *s)
{
    return s->recall && batches_answered(s);
}

static int scan_client(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    refresh_rules(s);
    while (p->scan < p->end && !s->hold_client && !s->gate_held) {
        size_t avail = p->end - p->scan;
        if (p->skip > 0) {
            size_t take = p->skip < avail ? (size_t)p->skip : avail;
            p->scan += take;
            p->skip -= take;
            continue;
        }
        if (recall_holds(s))
            break;
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc =
            pd_fe_header(p->buf + p->scan, avail, PD_GET(s->srv->max_message), &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc == PD_DECODE_ERROR) {
            client_violation(s, err);
            return -1;
        }
        uint64_t total = (uint64_t)h.len + 1;
        if (h.type == PD_FE_TERMINATE) {
            if (h.len != 4) {
                client_violation(s, "invalid message length");
                return -1;
            }
            /* Pass Terminate on, and nothing after it. */
            s->client_terminated = true;
            p->scan += PD_MSG_HEADER_LEN;
            p->end = p->scan;
            break;
        }
        if (s->rules_on && gate_closed(s))
            break;
        s->busy = true;
        if (s->rules_on) {
            route_rc_t r = ROUTE_OK;
            size_t at = p->scan;
            if (h.type == PD_FE_QUERY || h.type == PD_FE_PARSE) {
                if (total > avail)
                    break; /* looked at whole: the relay loop makes room */
                r = h.type == PD_FE_QUERY ? route_query(s, p, (size_t)total)
                                          : route_parse(s, p, (size_t)total);
            } else if (h.type == PD_FE_BIND || h.type == PD_FE_CLOSE) {
                r = route_bind_close(s, p, h.type, (size_t)total);
            } else if ((h.type == PD_FE_COPY_DATA || h.type == PD_FE_COPY_DONE ||
                        h.type == PD_FE_COPY_FAIL) &&
                       pd_mirror_copying(s)) {
                if (total > avail)
                    break; /* kept for the mirror: looked at whole */
                pd_mirror_on_copy(s, h.type, p->buf + p->scan + PD_MSG_HEADER_LEN,
                                  (size_t)total - PD_MSG_HEADER_LEN);
            } else if (h.type == PD_FE_EXECUTE || h.type == PD_FE_DESCRIBE) {
                if ((s->mir.on || h.type == PD_FE_DESCRIBE) && total > avail)
                    break; /* small: looked at whole */
                const uint8_t *mbody = p->buf + p->scan + PD_MSG_HEADER_LEN;
                size_t mlen = (size_t)total - PD_MSG_HEADER_LEN;
                if (h.type == PD_FE_DESCRIBE)
                    r = route_describe(s, p, mbody, mlen);
                if (r == ROUTE_OK && s->mir.on && h.type == PD_FE_EXECUTE)
                    r = mirror_execute(s, p, mbody, mlen);
                else if (r == ROUTE_OK && s->mir.on &&
                         !mirror_execute_describe(s, h.type, mbody, mlen))
                    r = ROUTE_CLOSED;
                if (h.type == PD_FE_EXECUTE && r == ROUTE_OK)
                    s->batch_exec++;
            } else if (h.type == PD_FE_SYNC || h.type == PD_FE_FUNCTION_CALL) {
                /* A function call runs on old (read_side). */
                int side = h.type == PD_FE_FUNCTION_CALL ? read_side(s, NULL) : 0;
                if (side != 0) {
                    r = side > 0 ? ROUTE_WAIT : ROUTE_CLOSED;
                } else {
                    bool shadow = h.type == PD_FE_SYNC && shadow_extended(s);
                    if (!batch_close(s, shadow))
                        r = ROUTE_CLOSED;
                }
            }
            if (r == ROUTE_CLOSED) {
                if (!s->closed && s->state != PD_SESSION_CLOSING)
                    pd_session_terminate(s, "53200", "out of memory", NULL);
                return -1;
            }
            if (r == ROUTE_WAIT)
                break;
            if (p->scan != at) {
                if (h.type == PD_FE_BIND)
                    s->batch_msgs++; /* a Bind replaced whole (see route_bind_close) */
                count_ready_owed(s, h.type);
                continue; /* taken whole: decided and moved past */
            }
            if (h.type != PD_FE_SYNC && h.type != PD_FE_QUERY && h.type != PD_FE_FUNCTION_CALL &&
                !copy_message(h.type))
                s->batch_msgs++;
        }
        /* The message streams through (a Bind after what was put in ahead of it). */
        count_ready_owed(s, h.type);
        if (total <= avail) {
            p->scan += (size_t)total;
        } else {
            p->skip = total - avail;
            p->scan = p->end;
        }
    }
    return 0;
}
/* ---------------------------------------------------------------------------------------
 * Shadow reads: the proxy's own query after the client's, compared, never relayed
 */

static void drop_shadow(pd_session_t *s)
{
    pd_sql_result_release(s->shadow);
    s->shadow = NULL;
    prepared_free(s->shadow_ext);
    s->shadow_ext = NULL;
}

/*
 * The other form of a prepared read, replayed with the client's own parameters under a
 * name of the proxy's (so the client's unnamed statement and portal are left alone):
 * Close, Parse, Bind, Execute, Close, Sync — one ReadyForQuery, nothing relayed.
 */
static void shadow_extended_messages(pd_buf_t *out, const pd_prepared_t *e, const char *sql)
{
    static const char name[] = "pgdual_shadow";
    pd_fe_close(out, 'S', name);
    pd_fe_parse(out, name, sql, e->ntypes, e->types);
    /* The client's Bind body after its portal and statement names: formats, values,
     * result formats, as they were. */
    size_t skip = strnlen((const char *)e->bind, e->bind_len) + 1;
    skip += strnlen((const char *)e->bind + skip, e->bind_len - skip) + 1;
    size_t start = pd_buf_begin_msg(out, PD_FE_BIND);
    pd_buf_put_str(out, name);
    pd_buf_put_str(out, name);
    pd_buf_put(out, e->bind + skip, e->bind_len - skip);
    pd_buf_end_msg(out, start);
    pd_fe_execute(out, name, 0);
    pd_fe_close(out, 'S', name);
    pd_fe_sync(out);
}

static void finish_shadow(pd_session_t *s)
{
    pd_sql_result_t *r = s->shadow;
    pd_rule_stats_t *st = &s->srv->stats[r->rule];
    st->shadow_compared++;
    if (!pd_result_equal(&s->sum_old, &s->sum_new)) {
        st->shadow_mismatched++;
        st->divergence_at = (int64_t)time(NULL);
        pd_log_info(s->tag, "shadow read differs for rule \"%s\"",
                    s->srv->cfg->rules[r->rule].name);
        pd_divergence_record(s->srv->divergence, s->srv->cfg->rules[r->rule].name, "shadow_read",
                             s->shadow_text, &s->sum_old, &s->sum_new, NULL);
    }
    drop_shadow(s);
}

/* The client's shadowed query is answered: run the other form now, if still safe. */
static void begin_shadow_query(pd_session_t *s)
{
    pd_pipe_t *c = &s->c2b;
    bool quiet = s->batch_count == 0 && s->txn_status == 'I' && s->sum_old.sqlstate[0] == 0 &&
                 !pipe_pending(c) && c->skip == 0 && s->batch_msgs == 0 && s->to_server.len == 0;
    if (!quiet) {
        s->srv->stats[s->shadow->rule].shadow_skipped++;
        drop_shadow(s);
        return;
    }
    bool ok = true;
    if (s->shadow_ext != NULL) {
        shadow_extended_messages(&s->to_server, s->shadow_ext, s->shadow->shadow_sql);
        ok = prep_close(s, true) && prep_parse(s, PD_PREP_OTHER, NULL, true) && prep_close(s, true);
    } else {
        pd_fe_query(&s->to_server, s->shadow->shadow_sql);
    }
    pd_batch_t b = {.internal = true};
    if (!ok || !pd_buf_ok(&s->to_server) || !batch_push(s, b)) {
        pd_buf_reset(&s->to_server);
        drop_shadow(s);
        return;
    }
    s->hold_client = true;
}

/* Feeds a result summary from a backend message seen whole. */
static void sum_message(pd_result_sum_t *sum, uint8_t type, const uint8_t *body, size_t n)
{
    const char *err = NULL;
    if (type == PD_BE_COMMAND_COMPLETE) {
        const char *tag = NULL;
        if (pd_be_command_complete_decode(body, n, &tag, &err) == PD_DECODE_OK)
            pd_result_tag(sum, tag);
    } else if (type == PD_BE_ERROR) {
        pd_be_error_t e;
        if (pd_be_error_decode(body, n, &e, &err) == PD_DECODE_OK)
            pd_result_error(sum, e.sqlstate);
    }
}

/* ---------------------------------------------------------------------------------------
 * The server's side of the relay
 */

/*
 * A session whose LISTENs are kept in step on both sides (mirroring rules) hears the
 * notifications of the database's authoritative side only, on whichever connection they
 * come: a write replayed on the other side fires its triggers there too.
 */
static bool side_notifies(const pd_session_t *s, bool on_new)
{
    return on_new == pd_server_new_authoritative(s->srv, s->database);
}

bool pd_session_hears_mirror(const pd_session_t *s)
{
    return !s->closed && s->state == PD_SESSION_ACTIVE && side_notifies(s, !pd_session_on_new(s));
}

static bool must_see_whole(const pd_session_t *s, uint8_t type)
{
    if (type == PD_BE_READY || (type == PD_BE_COMMAND_COMPLETE && s->stmt_count > 0))
        return true;
    if (!s->rules_on)
        return false;
    if (type == PD_BE_NOTIFICATION && s->mir.on)
        return true;
    if (type == PD_BE_PARSE_COMPLETE || type == PD_BE_BIND_COMPLETE || type == PD_BE_CLOSE_COMPLETE)
        return true;
    if (s->mir.on && pd_mirror_wants(s, type))
        return true;
    if (type == PD_BE_ERROR && s->batch_count > 0 && s->batches[s->batch_head].wrap == 'C')
        return true;
    return s->shadow != NULL && (type == PD_BE_COMMAND_COMPLETE || type == PD_BE_ERROR);
}

/* The summary the current message belongs to, if a shadow comparison is running. */
static pd_result_sum_t *current_sum(pd_session_t *s)
{
    pd_batch_t *b = batch_front(s);
    if (s->shadow == NULL || b == NULL)
        return NULL;
    if (b->internal)
        return &s->sum_new;
    return b->shadow ? &s->sum_old : NULL;
}

/* Whether a whole message at [scan, scan+total) is dropped, and what it updates. */
static bool server_message(pd_session_t *s, uint8_t type, const uint8_t *body, size_t n)
{
    if (type == PD_BE_NOTIFICATION)
        return s->mir.on && !side_notifies(s, pd_session_on_new(s));
    pd_batch_t *b = batch_front(s);
    bool internal = b != NULL && b->internal;
    if (type == PD_BE_PARSE_COMPLETE || type == PD_BE_CLOSE_COMPLETE)
        prep_done(s, type);
    else if (type == PD_BE_READY)
        prep_end(s);
    pd_result_sum_t *sum = current_sum(s);
    if (sum != NULL)
        sum_message(sum, type, body, n);
    if (!internal && s->traffic != NULL && type == PD_BE_READY)
        PD_ADD(s->traffic->requests, 1);
    if (!internal && s->traffic != NULL && type == PD_BE_ERROR)
        PD_ADD(s->traffic->errors, 1);
    if (type == PD_BE_COMMAND_COMPLETE && !internal && s->stmt_count > 0 &&
        !command_drops(s, b, body, n)) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return true;
    }
    if (type == PD_BE_READY && !internal && b != NULL)
        deallocs_done(s, b->seq);
    if (type == PD_BE_READY) {
        PD_SET(s->txn_status, body[0]);
        if (!internal && s->ready_owed > 0)
            s->ready_owed--;
        /* Idle again unless the client has already sent more (pipelining). */
        s->busy = pipe_pending(&s->c2b) || s->c2b.end > s->c2b.scan || s->batch_count > 1;
        bool shadow_done = b != NULL && b->shadow && s->shadow != NULL;
        uint8_t wrap = b != NULL ? b->wrap : 0;
        /* pgdual's BEGIN and COMMIT share the seq of a client's batch: not theirs. */
        if (b != NULL && !(internal && wrap != 0))
            drop_forget_batch(s, b->seq);
        batch_pop(s);
        if (s->idle_wait && s->batch_count == 0) {
            s->idle_wait = false; /* a batch that may be wrapped goes on (wrap_waits) */
            s->hold_client = false;
        }
        if (wrap != 0)
            return wrap_ready(s, wrap, body[0]);
        if (internal) {
            finish_shadow(s);
            s->hold_client = false;
            return true;
        }
        if (shadow_done)
            begin_shadow_query(s);
        return false;
    }
    if (b != NULL && b->wrap == 'C' && type == PD_BE_ERROR) {
        /* pgdual's COMMIT failed: the client hears why its write did not commit. */
        if (s->traffic != NULL)
            PD_ADD(s->traffic->errors, 1);
        if (s->wrap_commit)
            pd_mirror_wrap_failed(s, s->wrap_rule, s->wrap_sql, body, n);
        return false;
    }
    if (b != NULL && !internal &&
        (type == PD_BE_PARSE_COMPLETE || type == PD_BE_BIND_COMPLETE ||
         type == PD_BE_CLOSE_COMPLETE) &&
        drop_match(s, b, type))
        return true;
    /* Of the proxy's own query nothing reaches the client but what is not about it. */
    return internal && type != PD_BE_NOTIFICATION && type != PD_BE_PARAMETER_STATUS;
}

/* Notifications a client is not reading are dropped past this much (waiting here and
   put into b2c), with a warning. */
#define PD_NOTES_MAX (4u << 20)

void pd_session_notify(pd_session_t *s, uint32_t pid, const char *channel, const char *payload)
{
    if (s->closed || s->state != PD_SESSION_ACTIVE)
        return;
    if (s->notes.len + s->b2c.repl.len > PD_NOTES_MAX) {
        if (!s->notes_dropped)
            pd_log_warning(s->tag, "notifications dropped: the client does not read them");
        s->notes_dropped = true; /* warned once until they flow again */
        return;
    }
    pd_be_notification(&s->notes, pid, channel, payload);
    pd_session_wake(s);
}

/* Puts pending notifications into b2c at its scan point, when that is a message boundary
   a replacement can join. */
static void splice_notes(pd_session_t *s)
{
    pd_pipe_t *p = &s->b2c;
    if (!pd_buf_ok(&s->notes)) {
        pd_log_warning(s->tag, "notifications dropped: out of memory");
        pd_buf_reset(&s->notes);
        return;
    }
    if (s->notes.len == 0 || p->skip > 0)
        return;
    if (pipe_replace(p, p->scan, s->notes.data, s->notes.len)) {
        pd_buf_reset(&s->notes);
        s->notes_dropped = false;
    }
}

static int scan_server(pd_session_t *s)
{
    pd_pipe_t *p = &s->b2c;
    while (p->scan < p->end) {
        size_t avail = p->end - p->scan;
        if (p->skip > 0) {
            size_t take = p->skip < avail ? (size_t)p->skip : avail;
            if (s->tap_row)
                pd_result_row_feed(current_sum(s), p->buf + p->scan, take);
            p->scan += take;
            p->skip -= take;
            if (p->skip == 0 && s->tap_row) {
                pd_result_row_end(current_sum(s));
                s->tap_row = false;
            }
            continue;
        }
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_be_header(p->buf + p->scan, avail, PD_MSG_MAX_LEN, &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc != PD_DECODE_OK) {
            pd_log_error(s->tag, "protocol violation by the server: %s", err);
            pd_session_terminate(s, "08P01",
                                 "pgdual received an invalid message from the "
                                 "database server",
                                 NULL);
            return -1;
        }
        uint64_t total = (uint64_t)h.len + 1;
        if (h.type == PD_BE_READY && h.len != 5) {
            server_lost(s, "invalid ReadyForQuery");
            return -1;
        }
        if (must_see_whole(s, h.type)) {
            if (total > avail)
                break; /* the relay loop makes room */
            /* A message the handlers may drop or replace cannot join a replacement
               further back: that one is written first (the handlers run once). */
            if (p->has_hole && p->hole_end != p->scan)
                break;
            const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
            pd_batch_t *b = batch_front(s);
            uint32_t seq = b != NULL ? b->seq : 0;
            bool mirrored = s->mir.on && b != NULL && !b->internal;
            /* commit: lockstep: the client hears ReadyForQuery once the mirror applied the
               batch (what came before it goes on). */
            /* A wrapped batch is an implicit transaction to the mirror: whether it
               failed is in its statements' outcomes. */
            bool wrapped = b != NULL && b->wrap == 'W';
            if (mirrored && h.type == PD_BE_READY && wrapped && body[0] != 'E')
                s->wrap_released = true;
            if (mirrored && h.type == PD_BE_READY &&
                (s->mirror_wait || pd_mirror_before_ready(s, seq, wrapped ? 'I' : s->txn_status,
                                                          wrapped ? 'I' : body[0]))) {
                s->mirror_wait = true;
                break;
            }
            if (server_message(s, h.type, body, h.len - 4)) {
                if (s->closed || s->state != PD_SESSION_ACTIVE)
                    return -1;
                pipe_replace(p, p->scan + (size_t)total, NULL, 0);
                continue;
            }
            uint8_t *repl = NULL;
            size_t repl_len = 0;
            int act = mirrored && h.type != PD_BE_READY && h.type != PD_BE_NOTIFICATION
                          ? pd_mirror_on_server(s, seq, h.type, body, h.len - 4, &repl, &repl_len)
                          : 0;
            if (act < 0) {
                pd_session_terminate(s, "53200", "out of memory", NULL);
                return -1;
            }
            if (act > 0)
                pipe_replace(p, p->scan + (size_t)total, repl, repl_len);
            else
                p->scan += (size_t)total;
            free(repl);
            continue;
        }
        pd_batch_t *b = batch_front(s);
        bool drop = b != NULL && b->internal && h.type != PD_BE_NOTIFICATION &&
                    h.type != PD_BE_PARAMETER_STATUS;
        pd_result_sum_t *sum = h.type == PD_BE_DATA_ROW ? current_sum(s) : NULL;
        if (drop && total > avail)
            break; /* dropped messages are taken whole (they are the proxy's own) */
        if (h.type == PD_BE_ERROR && !drop && s->traffic != NULL)
            PD_ADD(s->traffic->errors, 1);
        if (sum != NULL) {
            pd_result_row_begin(sum);
            size_t here = total <= avail ? (size_t)total : avail;
            pd_result_row_feed(sum, p->buf + p->scan + PD_MSG_HEADER_LEN, here - PD_MSG_HEADER_LEN);
            if (total <= avail)
                pd_result_row_end(sum);
            else
                s->tap_row = true;
        }
        if (drop) {
            if (!pipe_replace(p, p->scan + (size_t)total, NULL, 0))
                break;
        } else if (total <= avail) {
            p->scan += (size_t)total;
        } else {
            p->skip = total - avail;
            p->scan = p->end;
        }
    }
    return 0;
}

/* Writes the proxy's own messages to the server: 1 done, 0 would block, -1 broken. */
static int to_server_flush(pd_session_t *s)
{
    int r = write_all(&s->server, s->to_server.data, &s->to_server_sent, s->to_server.len);
    if (r > 0) {
        pd_buf_reset(&s->to_server);
        s->to_server_sent = 0;
    }
    return r;
}

/* The client's messages to the server: the proxy's own go first (they were decided
 * before anything the client sent since). */
static int server_flush(pd_session_t *s)
{
    int r = to_server_flush(s);
    if (r <= 0)
        return r;
    return pipe_flush(&s->c2b, &s->server);
}

/*
 * Scans and writes until nothing more can be decided or written: a scan stops at a
 * second rewrite until the first is written. 0, or -1 when the session ended.
 */
static int pump_client(pd_session_t *s)
{
    for (;;) {
        if (scan_client(s) < 0)
            return -1;
        if (!pipe_pending(&s->c2b) && s->to_server.len == 0)
            return 0;
        int f = server_flush(s);
        if (f < 0) {
            server_lost(s, s->server.error);
            return -1;
        }
        if (f == 0)
            return 0;
    }
}

/*
 * Shutting down (SIGTERM): a session ends at its first transaction boundary, so that a
 * transaction in progress may finish but nothing new starts. The ReadyForQuery that
 * brought it there goes out before the FATAL. Messages relayed without their Sync yet
 * (busy) or answers still owed (ready_owed: pass-through does not count batches) mean
 * the server has work of the client's in hand. True when the session ended.
 */
static bool end_if_draining(pd_session_t *s)
{
    if (!PD_GET(s->srv->stopping) || s->state != PD_SESSION_ACTIVE || s->busy ||
        s->ready_owed > 0 || !at_boundary(s))
        return false;
    pd_session_terminate(s, "57P01", "terminating connection due to administrator command", NULL);
    return true;
}

static void session_shutdown(pd_session_t *s, bool fast)
{
    if (s->closed || s->state == PD_SESSION_CLOSING)
        return;
    /* Not yet serving: refused as a new connection would be. */
    if (s->state != PD_SESSION_ACTIVE) {
        pd_session_terminate(s, "57P03", "the database system is shutting down", NULL);
        return;
    }
    if (!fast) {
        end_if_draining(s);
        return;
    }
    /* As PostgreSQL's fast shutdown aborts what runs: a statement left running would
       otherwise go on, and even commit, after its client was told it was ended. */
    cancel_running(s, "shutting down");
    pd_session_terminate(s, "57P01", "terminating connection due to administrator command", NULL);
}

void pd_session_shutdown(pd_session_t *s, bool fast)
{
    if (s->home != NULL)
        pd_session_ask(s, fast ? PD_ASK_STOP_FAST : PD_ASK_STOP);
    else
        session_shutdown(s, fast);
}

static int pump_server(pd_session_t *s)
{
    for (;;) {
        if (scan_server(s) < 0 || end_if_draining(s))
            return -1;
        splice_notes(s);
        /* A shadow query decided while scanning goes out at once. */
        if (s->to_server.len > 0 && to_server_flush(s) < 0) {
            server_lost(s, s->server.error);
            return -1;
        }
        if (!pipe_pending(&s->b2c))
            return 0;
        int f = pipe_flush(&s->b2c, &s->client);
        if (f < 0) {
            client_gone(s);
            return -1;
        }
        if (f == 0)
            return 0;
    }
}

/*
 * Reads what the client sent, decides per message and writes it to the server at once.
 * One read per readiness callback (level-triggered polling calls again while data is
 * waiting), except with TLS, whose decrypted bytes the socket does not announce.
 */
static void relay_from_client(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    size_t limit = (size_t)PD_GET(s->srv->max_message) + 1;
    while (!s->closed && s->state == PD_SESSION_ACTIVE && !pipe_pending(p) &&
           !s->client_terminated && !s->hold_client && !s->gate_held && !recall_holds(s)) {
        if (!pipe_make_room(p, limit < PIPE_SIZE ? PIPE_SIZE : limit)) {
            client_violation(s, "invalid message length");
            return;
        }
        ssize_t n = pd_transport_read(&s->client, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            client_gone(s);
            return;
        }
        p->end += (size_t)n;
        PD_SET(s->bytes_c2b, s->bytes_c2b + (uint64_t)n);
        if (pump_client(s) < 0)
            return;
        if (s->client_terminated && !pipe_pending(p)) {
            pd_log_debug(s->tag, "client sent Terminate");
            session_close(s);
            return;
        }
        if (!pd_transport_pending(&s->client))
            return;
    }
}

static void relay_from_server(pd_session_t *s)
{
    pd_pipe_t *p = &s->b2c;
    while (!s->closed && s->state == PD_SESSION_ACTIVE && !pipe_pending(p) && !s->mirror_wait) {
        if (!pipe_make_room(p, (size_t)PD_MSG_MAX_LEN + 1)) {
            server_lost(s, "message does not fit the buffer");
            return;
        }
        ssize_t n = pd_transport_read(&s->server, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            server_lost(s, n == 0 ? "server closed the connection" : s->server.error);
            return;
        }
        p->end += (size_t)n;
        PD_SET(s->bytes_b2c, s->bytes_b2c + (uint64_t)n);
        bool held = s->hold_client;
        if (pump_server(s) < 0)
            return;
        /* The proxy's own query ended: what the client sent meanwhile goes on now. */
        if (held && !s->hold_client && pump_client(s) < 0)
            return;
        if (!pd_transport_pending(&s->server))
            return;
    }
}

static void on_server(pd_transport_t *t, void *owner, bool readable, bool writable)
{
    pd_session_t *s = owner;
    (void)t;
    if (s->closed || s->state != PD_SESSION_ACTIVE)
        return;
    if (writable && (pipe_pending(&s->c2b) || s->to_server.len > 0)) {
        int r = server_flush(s);
        if (r < 0) {
            server_lost(s, s->server.error);
            return;
        }
        if (r > 0 && s->client_terminated) {
            session_close(s);
            return;
        }
        /* A scan that stopped at a second rewrite goes on now that the first is out. */
        if (r > 0 && s->c2b.scan < s->c2b.end && pump_client(s) < 0)
            return;
        /* Bytes TLS decrypted while we were blocked are not announced by the socket. */
        if (r > 0 && pd_transport_pending(&s->client))
            relay_from_client(s);
    }
    if (readable && !s->closed)
        relay_from_server(s);
    if (!come_back(s))
        update_interest(s);
}

/* ---------------------------------------------------------------------------------------
 * commit: lockstep — resuming once the mirror applied what the session waited for. From
 * a timer, not from inside the mirror's callback, so that the relay never runs with the
 * mirror's call stack below it.
 */

static void on_wake(uv_timer_t *t)
{
    pd_session_t *s = t->data;
    if (s->closed || s->state != PD_SESSION_ACTIVE)
        return;
    splice_notes(s);
    if (s->gate_held) {
        s->gate_held = false; /* the gate is tried again at the next message */
        if (pump_client(s) < 0)
            return;
    }
    if (s->mirror_wait) {
        s->mirror_wait = false;
        bool held = s->hold_client;
        if (pump_server(s) < 0)
            return;
        if (held && !s->hold_client && pump_client(s) < 0)
            return;
        if (s->mirror_wait) { /* the next batch waits too */
            update_interest(s);
            return;
        }
    }
    if (s->mir.commit_wait && s->mir.waiting == 0) {
        s->mir.commit_wait = false;
        s->mir.commit_done = true;
        s->hold_client = false;
        if (pump_client(s) < 0)
            return;
    }
    update_interest(s);
}

void pd_session_wake(pd_session_t *s)
{
    if (s->home != NULL || s->closed || s->state != PD_SESSION_ACTIVE)
        return;
    uv_timer_start(&s->timer, on_wake, 0, 0);
}

/* ---------------------------------------------------------------------------------------
 * Relay threads (proxy/relay.h): pass-through sessions spread over several loops
 */

/* A session of a database without rules, just connected, goes to the loop with the fewest
   such sessions. True when it left the main loop. */
static bool hand_over(pd_session_t *s)
{
    pd_server_t *srv = s->srv;
    if (srv->nrelays == 0 || s->closed || s->state != PD_SESSION_ACTIVE ||
        pd_route_db_has_rules(srv->cfg, s->database))
        return false;
    pd_relay_t *r = pd_relay_pick(srv);
    r->assigned++;
    s->counted = r;
    if (r->index == 0)
        return false;
    s->home = r;
    pd_log_debug(s->tag, "relayed by thread %u", r->index);
    session_move(s, r);
    return true;
}

/* Recalled, and nothing in flight: back to the main loop, where the rules apply from the
   next batch on. True when it left. */
static bool come_back(pd_session_t *s)
{
    if (!s->recall || s->closed || s->state != PD_SESSION_ACTIVE || !batches_answered(s) ||
        pipe_pending(&s->c2b) || s->c2b.skip > 0 || pipe_pending(&s->b2c) || s->b2c.skip > 0 ||
        s->b2c.scan < s->b2c.end || out_pending(s))
        return false;
    pd_log_debug(s->tag, "back to the main loop: its database has rules now");
    s->busy = false; /* nothing sent since the last ReadyForQuery */
    session_move(s, &s->srv->relays[0]);
    return true;
}

void pd_session_ask(pd_session_t *s, unsigned asks)
{
    __atomic_fetch_or(&s->asks, asks, __ATOMIC_ACQ_REL);
    pd_relay_nudge(s->home);
}

void pd_session_asked(pd_session_t *s)
{
    if (s->closed || s->dest != NULL)
        return; /* moving: its new loop looks at the asks when it arrives */
    unsigned asks = __atomic_exchange_n(&s->asks, 0, __ATOMIC_ACQ_REL);
    if ((asks & PD_ASK_RECALL) && on_thread(s))
        s->recall = true;
    if ((asks & PD_ASK_CANCEL) && s->state == PD_SESSION_ACTIVE && s->backend.conn != NULL &&
        pd_cancel_dispatch(s->loop, s->backend.conn, s->tag) != 0)
        pd_log_warning(s->tag, "could not start forwarding a cancel request");
    if (asks & (PD_ASK_STOP | PD_ASK_STOP_FAST)) {
        session_shutdown(s, (asks & PD_ASK_STOP_FAST) != 0);
        if (s->closed || s->state != PD_SESSION_ACTIVE)
            return;
    }
    if (!come_back(s))
        update_interest(s);
}

/* On its new loop: what arrived while it moved is relayed now (TLS may hold decrypted
   bytes that the socket will not announce). */
static void session_resume(pd_session_t *s)
{
    if (pump_client(s) < 0 || pump_server(s) < 0)
        return;
    if (s->client_terminated && !pipe_pending(&s->c2b)) {
        session_close(s);
        return;
    }
    if (pd_transport_pending(&s->client))
        relay_from_client(s);
    if (!s->closed && s->server_open && pd_transport_pending(&s->server))
        relay_from_server(s);
    if (!s->closed && !come_back(s))
        update_interest(s);
}

void pd_session_arrive(pd_session_t *s, pd_relay_t *r)
{
    if (s->closed) {
        /* Ended on a relay thread: r is the main loop. */
        session_gone(s);
        session_free(s);
        return;
    }
    s->at = r;
    s->loop = r->loop;
    s->dest = NULL;
    if (r->index == 0) {
        /* Recalled: rules_on is decided again before the next message. */
        s->home = NULL;
        uncount(s);
        s->recall = false;
        s->rules_generation = 0;
    }
    uv_timer_init(s->loop, &s->timer);
    s->timer.data = s;
    if (pd_transport_attach(&s->client, s->loop) != 0 ||
        (s->server_open && pd_transport_attach(&s->server, s->loop) != 0)) {
        pd_log_error(s->tag, "could not watch the session's sockets on its new loop");
        cancel_running(s, "moving between loops failed");
        session_close(s);
        return;
    }
    pd_session_asked(s);
    if (!s->closed && s->state == PD_SESSION_ACTIVE && s->dest == NULL)
        session_resume(s);
}

void pd_sessions_recall(pd_server_t *srv)
{
    for (pd_session_t *s = srv->sessions; s != NULL; s = s->next)
        if (s->home != NULL && s->database != NULL && pd_route_db_has_rules(srv->cfg, s->database))
            pd_session_ask(s, PD_ASK_RECALL);
}

/* ---------------------------------------------------------------------------------------
 * CONNECTING: the backend
 */

/* Relays raw on the backend's socket (through libpq's SSL object when TLS is on). */
static bool server_attach(pd_session_t *s)
{
    PGconn *conn = s->backend.conn;
    if (pd_transport_open(&s->server, s->srv->loop, PQsocket(conn), false, on_server, s) != 0)
        return false;
    s->server_open = true;
    if (PQsslInUse(conn)) {
        SSL *ssl = PQsslStruct(conn, "OpenSSL");
        SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        pd_transport_set_ssl(&s->server, ssl, false);
    }
    return true;
}

static void on_backend_connected(pd_backend_t *b, void *owner, const char *err,
                                 const char *sqlstate)
{
    pd_session_t *s = owner;
    if (s->closed)
        return;
    if (err != NULL) {
        char msg[768];
        snprintf(msg, sizeof msg, "pgdual could not connect to database \"%s\": %s", s->database,
                 err);
        pd_session_terminate(s, sqlstate, msg,
                             "Check this database's entry under `databases` in the pgdual "
                             "config and that its server is up.");
        return;
    }
    if (!server_attach(s)) {
        server_lost(s, "could not watch the server socket");
        return;
    }

    /* The client hears what PostgreSQL would say after authentication, with our own
     * BackendKeyData so that its CancelRequest comes to us. */
    for (const char *const *name = pd_backend_reported_params; *name != NULL; name++) {
        const char *value = PQparameterStatus(b->conn, *name);
        if (value != NULL)
            pd_be_param_status(&s->out, *name, value);
    }
    pd_be_backend_key(&s->out, s->id, s->cancel_key);
    pd_be_ready(&s->out, 'I');
    PD_SET(s->txn_status, 'I');
    uv_timer_stop(&s->timer);
    session_set_state(s, PD_SESSION_ACTIVE);
    pd_log_info(s->tag, "connected to the server (backend pid %d)", PQbackendPID(b->conn));

    if (out_flush(s) < 0) {
        session_close(s);
        return;
    }
    /* Messages the client pipelined behind its startup packet wait in c2b. */
    if (s->c2b.end > 0) {
        if (scan_client(s) < 0)
            return;
        if (pipe_flush(&s->c2b, &s->server) < 0) {
            server_lost(s, s->server.error);
            return;
        }
    }
    if (!hand_over(s))
        update_interest(s);
}

static void begin_connect(pd_session_t *s)
{
    const pd_auth_entry_t *entry = pd_server_auth_entry(s->srv, s->user);
    const char *password = NULL;
    if (entry != NULL && !entry->user->is_scram)
        password = entry->user->secret;

    pd_backend_params_t params = {
        .user = s->user,
        .password = password,
        .nparams = s->nparams,
        .names = (const char *const *)s->names,
        .values = (const char *const *)s->values,
    };
    session_set_state(s, PD_SESSION_CONNECTING);
    char err[512];
    if (pd_backend_connect(&s->backend, s->srv->loop, s->conninfo, &params, on_backend_connected, s,
                           err, sizeof err) != 0) {
        char msg[768];
        snprintf(msg, sizeof msg, "pgdual could not connect to database \"%s\": %s", s->database,
                 err);
        pd_session_terminate(s, "08006", msg,
                             "Check this database's entry under `databases` in the pgdual "
                             "config.");
        return;
    }
    update_interest(s);
}

/* ---------------------------------------------------------------------------------------
 * AUTH: SCRAM-SHA-256 with the client
 */

static void auth_failed(pd_session_t *s)
{
    char msg[256];
    snprintf(msg, sizeof msg, "password authentication failed for user \"%s\"", s->user);
    pd_session_terminate(s, "28P01", msg, NULL);
}

/* Authenticated: the database must exist (told only now, as PostgreSQL does). */
static void auth_done(pd_session_t *s)
{
    if (s->conninfo == NULL) {
        char msg[256];
        snprintf(msg, sizeof msg, "database \"%s\" does not exist", s->database);
        pd_session_terminate(s, "3D000", msg,
                             "pgdual serves the databases listed under `databases` in its "
                             "config.");
        return;
    }
    begin_connect(s);
}

static void begin_scram(pd_session_t *s)
{
    s->scram = calloc(1, sizeof *s->scram);
    if (s->scram == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return;
    }
    static const char *const mechanisms[] = {PD_SCRAM_MECHANISM};
    pd_be_auth_sasl(&s->out, mechanisms, 1);
    session_set_state(s, PD_SESSION_AUTH);
}

static void mock_secret(const pd_server_t *srv, const char *user, pd_scram_secret_t *secret)
{
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx != NULL && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
        EVP_DigestUpdate(ctx, srv->mock_key, sizeof srv->mock_key) == 1 &&
        EVP_DigestUpdate(ctx, user, strlen(user)) == 1)
        EVP_DigestFinal_ex(ctx, md, &len);
    EVP_MD_CTX_free(ctx);
    *secret = (pd_scram_secret_t){.iterations = PD_SCRAM_DEFAULT_ITER, .salt_len = 16};
    memcpy(secret->salt, md, 16);
    RAND_bytes(secret->stored_key, sizeof secret->stored_key);
    RAND_bytes(secret->server_key, sizeof secret->server_key);
}

/* A printable random nonce for server-first-message. */
static bool make_nonce(char *out, size_t size)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    uint8_t raw[24];
    if (size < sizeof raw + 1 || RAND_bytes(raw, sizeof raw) != 1)
        return false;
    for (size_t i = 0; i < sizeof raw; i++)
        out[i] = alphabet[raw[i] & 63];
    out[sizeof raw] = '\0';
    return true;
}

/* One SASL message from the client. Returns 0, or -1 when the session ended. */
static int auth_message(pd_session_t *s, const uint8_t *body, size_t n)
{
    const char *err = NULL;
    pd_buf_t reply;
    pd_buf_init(&reply);
    pd_scram_rc_t rc;

    if (s->scram->step == 0) {
        pd_fe_sasl_initial_t init;
        if (pd_fe_sasl_initial_decode(body, n, &init, &err) != PD_DECODE_OK || init.len < 0) {
            client_violation(s, err ? err : "malformed SASL initial response");
            return -1;
        }
        if (strcmp(init.mechanism, PD_SCRAM_MECHANISM) != 0) {
            pd_session_terminate(s, "28000",
                                 "client selected an invalid SASL authentication mechanism", NULL);
            return -1;
        }
        pd_scram_secret_t secret;
        const pd_auth_entry_t *entry = pd_server_auth_entry(s->srv, s->user);
        if (entry != NULL) {
            secret = entry->secret;
        } else {
            /* Unknown user: go through the motions with a stand-in secret that looks like
             * a real one (normal iteration count, a salt that is the same at every try
             * for this name), so that the reply does not tell which user names exist. */
            s->auth_unknown_user = true;
            mock_secret(s->srv, s->user, &secret);
        }
        char nonce[32];
        if (!make_nonce(nonce, sizeof nonce)) {
            pd_session_terminate(s, "XX000", "could not generate random nonce", NULL);
            return -1;
        }
        rc = pd_scram_server_first(s->scram, &secret, init.data, (size_t)init.len, nonce, &reply,
                                   &err);
        if (rc == PD_SCRAM_CONTINUE)
            pd_be_auth_sasl_continue(&s->out, reply.data, reply.len);
    } else {
        rc = pd_scram_server_final(s->scram, body, n, &reply, &err);
        if (rc == PD_SCRAM_SUCCESS && !s->auth_unknown_user) {
            pd_be_auth_sasl_final(&s->out, reply.data, reply.len);
            pd_be_auth_ok(&s->out);
        }
    }
    pd_buf_free(&reply);

    if (rc == PD_SCRAM_PROTOCOL) {
        client_violation(s, err ? err : "malformed SCRAM message");
        return -1;
    }
    if (rc == PD_SCRAM_FAIL || (rc == PD_SCRAM_SUCCESS && s->auth_unknown_user)) {
        auth_failed(s);
        return -1;
    }
    if (rc == PD_SCRAM_SUCCESS) {
        pd_scram_clear(s->scram);
        free(s->scram);
        s->scram = NULL;
        pd_log_info(s->tag, "authenticated with SCRAM-SHA-256");
        auth_done(s);
        return s->closed || s->state == PD_SESSION_CLOSING ? -1 : 0;
    }
    return 0;
}

/* Consumes whole SASL messages in c2b. */
static void process_auth(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (s->state == PD_SESSION_AUTH && p->scan < p->end) {
        size_t avail = p->end - p->scan;
        pd_msg_hdr_t h;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_fe_header(p->buf + p->scan, avail, AUTH_MSG_MAX + 4, &h, &err);
        if (rc == PD_DECODE_INCOMPLETE)
            break;
        if (rc == PD_DECODE_ERROR) {
            client_violation(s, err);
            return;
        }
        if (h.type != PD_FE_PASSWORD) {
            char msg[96];
            snprintf(msg, sizeof msg, "expected SASL response, got message type %d", h.type);
            client_violation(s, msg);
            return;
        }
        if (avail < (size_t)h.len + 1)
            break;
        const uint8_t *body = p->buf + p->scan + PD_MSG_HEADER_LEN;
        p->scan += (size_t)h.len + 1;
        if (auth_message(s, body, h.len - 4) < 0)
            return;
    }
    /* Keep whatever follows (a pipelining client) for the relay. */
    memmove(p->buf, p->buf + p->scan, p->end - p->scan);
    p->end -= p->scan;
    p->scan = 0;
}

/* ---------------------------------------------------------------------------------------
 * STARTUP: SSLRequest, GSSENCRequest, CancelRequest, StartupMessage
 */

static char *dup_or_null(const char *v)
{
    return v ? strdup(v) : NULL;
}

static bool is_false(const char *v)
{
    return strcmp(v, "false") == 0 || strcmp(v, "off") == 0 || strcmp(v, "no") == 0 ||
           strcmp(v, "0") == 0;
}

/* Copies the parameters to pass on; answers NegotiateProtocolVersion when the client
 * asked for a newer minor version or for protocol options. Returns false on a refusal. */
static bool take_params(pd_session_t *s, const pd_startup_t *st)
{
    const char *unrecognized[PD_STARTUP_MAX_PARAMS];
    unsigned nunrec = 0;
    s->names = calloc(st->nparams + 1, sizeof *s->names);
    s->values = calloc(st->nparams + 1, sizeof *s->values);
    s->user = dup_or_null(st->user);
    s->database = dup_or_null(st->database);
    if (s->names == NULL || s->values == NULL || s->user == NULL || s->database == NULL) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return false;
    }
    for (unsigned i = 0; i < st->nparams; i++) {
        const char *name = st->names[i], *value = st->values[i];
        if (strcmp(name, "user") == 0 || strcmp(name, "database") == 0)
            continue;
        if (strncmp(name, "_pq_.", 5) == 0) {
            unrecognized[nunrec++] = name;
            continue;
        }
        if (strcmp(name, "replication") == 0) {
            if (is_false(value))
                continue;
            pd_session_terminate(s, "0A000", "pgdual does not proxy replication connections",
                                 "Connect to the database server directly for replication.");
            return false;
        }
        s->names[s->nparams] = strdup(name);
        s->values[s->nparams] = strdup(value);
        s->nparams++;
        if (s->names[s->nparams - 1] == NULL || s->values[s->nparams - 1] == NULL) {
            pd_session_terminate(s, "53200", "out of memory", NULL);
            return false;
        }
    }
    if ((st->version & 0xffff) > 0 || nunrec > 0)
        pd_be_negotiate_version(&s->out, 0, nunrec, unrecognized);
    return true;
}

static void startup_message(pd_session_t *s, const pd_startup_t *st)
{
    if (!take_params(s, st))
        return;
    snprintf(s->tag, sizeof s->tag, "[S-%u %s/%s@%s]", s->id, s->database, s->user, s->peer);
    const pd_config_t *cfg = s->srv->cfg;
    const pd_database_cfg_t *db = pd_config_database(cfg, s->database);
    /* Sessions talk to the authoritative side (new once switched over). */
    s->auth_new = db != NULL && db->new != NULL &&pd_server_new_authoritative(s->srv, s->database);
    s->want_new = s->auth_new;
    if (db != NULL && ((s->conninfo = strdup(s->auth_new ? db->new : db->old)) == NULL ||
                       (s->traffic = pd_server_traffic(s->srv, s->database)) == NULL)) {
        pd_session_terminate(s, "53200", "out of memory", NULL);
        return;
    }
    pd_log_info(s->tag, "connection received%s", s->tls_done ? " (TLS)" : "");

    if (cfg->tls_mode == PD_TLS_REQUIRE && !s->tls_done) {
        pd_session_terminate(s, "28000", "pgdual accepts only TLS connections",
                             "Connect with sslmode=require.");
        return;
    }
    if (s->srv->stopping) {
        pd_session_terminate(s, "57P03", "the database system is shutting down", NULL);
        return;
    }
    if (s->srv->nsessions > cfg->max_clients) {
        pd_session_terminate(s, "53300", "sorry, too many clients already",
                             "Raise limits.max_clients in the pgdual config, or use fewer "
                             "connections.");
        return;
    }
    if (cfg->auth_mode == PD_AUTH_SCRAM) {
        begin_scram(s);
        return;
    }
    if (s->conninfo != NULL)
        pd_be_auth_ok(&s->out);
    auth_done(s);
}

static void cancel_request(pd_session_t *s, const pd_startup_t *st)
{
    pd_session_t *target = pd_session_find(s->srv, st->cancel_pid, st->cancel_key);
    if (target != NULL && target->home != NULL) {
        pd_session_ask(target, PD_ASK_CANCEL); /* its relay thread checks it is running */
    } else if (target == NULL || target->state != PD_SESSION_ACTIVE ||
               target->backend.conn == NULL) {
        pd_log_info(s->tag, "cancel request for unknown or idle session ignored");
    } else if (pd_cancel_dispatch(s->srv->loop, target->backend.conn, target->tag) != 0) {
        pd_log_warning(target->tag, "could not start forwarding a cancel request");
    }
    /* PostgreSQL answers a CancelRequest by closing the connection. */
    session_close(s);
}

static void begin_tls(pd_session_t *s)
{
    SSL *ssl = SSL_new(s->srv->ssl_ctx);
    if (ssl == NULL || SSL_set_fd(ssl, s->client.fd) != 1) {
        SSL_free(ssl);
        pd_log_error(s->tag, "could not start TLS");
        session_close(s);
        return;
    }
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    pd_transport_set_ssl(&s->client, ssl, true);
}

static void tls_step(pd_session_t *s)
{
    if (out_pending(s)) {
        /* The 'S' answer goes out in plain text before the handshake. */
        int r = out_flush(s);
        if (r < 0) {
            session_close(s);
            return;
        }
        if (r == 0) {
            pd_transport_want(&s->client, false, true);
            return;
        }
    }
    if (s->client.ssl == NULL) {
        begin_tls(s);
        if (s->closed)
            return;
    }
    int rc = pd_transport_accept_tls(&s->client);
    if (rc < 0) {
        pd_log_info(s->tag, "TLS handshake failed");
        session_close(s);
        return;
    }
    if (rc == 1) {
        s->tls_done = true;
        session_set_state(s, PD_SESSION_STARTUP);
        update_interest(s);
    }
}

static void process_startup(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    while (s->state == PD_SESSION_STARTUP && p->scan < p->end) {
        pd_startup_t st;
        const char *err = NULL, *sqlstate = NULL;
        long used = pd_startup_decode(p->buf + p->scan, p->end - p->scan, &st, &err, &sqlstate);
        if (used == 0)
            break;
        if (used < 0) {
            pd_session_terminate(s, sqlstate ? sqlstate : "08P01", err, NULL);
            return;
        }
        p->scan += (size_t)used;
        switch (st.kind) {
        case PD_STARTUP_SSL: {
            bool yes = s->srv->ssl_ctx != NULL && s->srv->cfg->tls_mode != PD_TLS_DISABLE;
            if (s->tls_done) {
                client_violation(s, "SSLRequest after TLS was established");
                return;
            }
            if (yes && p->scan != p->end) {
                /* The client must wait for our answer; bytes behind the request were
                 * sent in the clear and must not be taken as if they were encrypted. */
                client_violation(s, "received unencrypted data after SSL request");
                return;
            }
            pd_buf_put_u8(&s->out, yes ? 'S' : 'N');
            if (yes) {
                session_set_state(s, PD_SESSION_TLS);
                tls_step(s);
                return;
            }
            break;
        }
        case PD_STARTUP_GSSENC:
            if (s->gss_done || s->tls_done) {
                client_violation(s, "unexpected GSSENCRequest");
                return;
            }
            s->gss_done = true;
            pd_buf_put_u8(&s->out, 'N');
            break;
        case PD_STARTUP_CANCEL:
            cancel_request(s, &st);
            return;
        case PD_STARTUP_MESSAGE:
            startup_message(s, &st);
            break;
        }
    }
    if (s->closed)
        return;
    memmove(p->buf, p->buf + p->scan, p->end - p->scan);
    p->end -= p->scan;
    p->scan = 0;
    if (out_flush(s) < 0)
        session_close(s);
}

/* STARTUP and AUTH read the client the same way and differ in what they decode. */
static void startup_read(pd_session_t *s)
{
    pd_pipe_t *p = &s->c2b;
    do {
        if (p->end == p->cap) {
            client_violation(s, "invalid length of startup packet");
            return;
        }
        ssize_t n = pd_transport_read(&s->client, p->buf + p->end, p->cap - p->end);
        if (n == PD_IO_AGAIN)
            return;
        if (n <= 0) {
            /* A client that goes away mid-startup, as PostgreSQL's log would say. */
            pd_log_info(s->tag, p->end > 0 ? "incomplete startup packet"
                                           : "client closed the connection during startup");
            session_close(s);
            return;
        }
        p->end += (size_t)n;
        if (s->state == PD_SESSION_STARTUP)
            process_startup(s);
        else
            process_auth(s);
        if (!s->closed && s->state == PD_SESSION_AUTH && out_flush(s) < 0)
            session_close(s);
    } while (!s->closed && (s->state == PD_SESSION_STARTUP || s->state == PD_SESSION_AUTH) &&
             pd_transport_pending(&s->client));
}

static void on_client(pd_transport_t *t, void *owner, bool readable, bool writable)
{
    pd_session_t *s = owner;
    (void)t;
    if (s->closed)
        return;
    switch (s->state) {
    case PD_SESSION_STARTUP:
    case PD_SESSION_AUTH:
    case PD_SESSION_CONNECTING:
        if (writable && out_flush(s) < 0) {
            session_close(s);
            return;
        }
        if (readable && s->state != PD_SESSION_CONNECTING)
            startup_read(s);
        break;
    case PD_SESSION_TLS:
        tls_step(s);
        return;
    case PD_SESSION_ACTIVE:
        if (writable) {
            int r = client_flush(s);
            if (r < 0) {
                client_gone(s);
                return;
            }
            if (r > 0 && s->b2c.scan < s->b2c.end && pump_server(s) < 0)
                return;
            if (r > 0 && s->server_open && pd_transport_pending(&s->server))
                relay_from_server(s);
        }
        if (readable && !s->closed)
            relay_from_client(s);
        if (come_back(s))
            return;
        break;
    case PD_SESSION_CLOSING:
        closing_step(s, readable, writable);
        return;
    default:
        break;
    }
    update_interest(s);
}

void pd_session_accept(pd_server_t *srv, int fd, const char *peer)
{
    pd_session_t *s = calloc(1, sizeof *s);
    if (s != NULL) {
        s->c2b.buf = malloc(PIPE_SIZE);
        s->b2c.buf = malloc(PIPE_SIZE);
    }
    if (s == NULL || s->c2b.buf == NULL || s->b2c.buf == NULL ||
        pd_transport_open(&s->client, srv->loop, fd, true, on_client, s) != 0) {
        pd_log_error(NULL, "out of memory accepting a connection from %s", peer);
        if (s != NULL) {
            free(s->c2b.buf);
            free(s->b2c.buf);
        }
        free(s);
        close(fd);
        return;
    }
    s->srv = srv;
    s->at = srv->relays;
    s->loop = srv->loop;
    s->c2b.cap = s->b2c.cap = PIPE_SIZE;
    s->id = ++srv->next_session_id;
    if (RAND_bytes((uint8_t *)&s->cancel_key, sizeof s->cancel_key) != 1)
        s->cancel_key = (uint32_t)random();
    s->route_key = (uint64_t)s->cancel_key << 32 | s->id;
    s->started_ms = uv_now(srv->loop);
    snprintf(s->peer, sizeof s->peer, "%s", peer);
    snprintf(s->tag, sizeof s->tag, "[S-%u @%s]", s->id, peer);
    pd_buf_init(&s->out);
    pd_buf_init(&s->notes);
    uv_timer_init(srv->loop, &s->timer);
    s->timer.data = s;
    s->state = PD_SESSION_STARTUP;
    pd_server_session_added(srv, s);
    uv_timer_start(&s->timer, session_close_timer, srv->cfg->startup_timeout_ms, 0);
    update_interest(s);
}
