/*
 * mirror.h — the mirror side of a `tables` rule in dual (DESIGN.md §4): a second backend
 * connection per session, to the database's `new` side, opened when the session first has
 * something to keep in step, on which the session's mirrored statements are replayed.
 *
 * A statement is replayed after the authoritative side has answered it, batch by batch
 * at ReadyForQuery, so that only what the authoritative side applied is applied: writes
 * that failed there (or were rolled back with their implicit transaction) are not
 * replayed, and a COMMIT the authoritative side turned into ROLLBACK is a ROLLBACK on the
 * mirror too. Transaction control and settings are replayed. Several mirrored writes of
 * one autocommit batch (one implicit transaction) are wrapped in BEGIN/COMMIT.
 *
 * commit: async — the client hears the authoritative answer at once; the mirror trails.
 * commit: lockstep — the client hears the batch's ReadyForQuery once the mirror applied
 * it, and COMMIT goes to the mirror first. on_failure: fail turns a mirror failure into a
 * refused COMMIT (rolled back on the authoritative side) and refused writes.
 *
 * Row images: for a statement planned as PD_MIRROR_IMAGE the session strips the columns
 * appended to RETURNING from what the client sees (RowDescription, DataRow; a Describe
 * of a statement without RETURNING of its own is answered NoData) and keeps their values;
 * the mirror applies each row with the plan's image statement.
 *
 * Outcomes: each replayed statement's command tag is compared with the authoritative
 * one; a different tag (row count), an error on the mirror only, or a statement that
 * could not be replayed (mirror detached: unreachable, lost, or its queue past the bound)
 * is a divergence event (normalized statement only) and counted per rule. A mirror that
 * fails never delays or fails the client (on_failure: record).
 *
 * The mirror outlives its session: what the session left queued is still applied, then
 * the connection closes (rolling back a transaction the session left open).
 */
#ifndef PD_PROXY_MIRROR_H
#define PD_PROXY_MIRROR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rules/sql.h"

struct pg_conn;
typedef struct pd_session pd_session_t;
typedef struct pd_server pd_server_t;
typedef struct pd_mirror pd_mirror_t;
typedef struct pd_mirror_op pd_mirror_op_t;

/* What the session expects the authoritative side to answer, in order. */
typedef struct {
    uint32_t seq;       /* the batch */
    uint8_t kind;       /* 'Q' a Query (until ReadyForQuery), 'E' an Execute, 'D' a Describe */
    bool image;         /* the statement has row-image columns at the end of its rows */
    bool client_rows;   /* the client asked for rows of its own (RETURNING) */
    bool shadow;        /* its rows are summed for a shadow comparison (op->auth_sum) */
    unsigned strip;     /* how many columns are the proxy's */
    pd_mirror_op_t *op; /* the statement's replay, or NULL */
} pd_expect_t;

/* The session's side of mirroring; lives in pd_session_t. */
typedef struct {
    bool on;              /* the database has a tables rule mirroring writes */
    pd_mirror_t *mirror;  /* NULL until first needed; detached on session end */
    pd_expect_t *expects; /* ring, owned */
    unsigned exp_cap, exp_head, exp_count;
    pd_mirror_op_t *held, *held_tail; /* ops waiting for their batch's ReadyForQuery */
    struct pd_portal *portals;        /* bound portals: their plan and replay, owned */
    unsigned nportals;
    /* commit: lockstep */
    unsigned waiting;        /* ops released to the mirror that the session waits for */
    bool commit_wait;        /* the client's COMMIT waits for the mirror's */
    bool commit_done;        /* ... which is done: route the COMMIT now */
    bool skip_end;           /* the COMMIT that follows needs no replay */
    bool poisoned;           /* the mirror failed in this transaction (on_failure: fail) */
    pd_mirror_op_t *copy_op; /* COPY FROM STDIN in progress: its data is kept (held op) */
    int image_format;        /* result format of image columns in this batch's Bind */
} pd_session_mirror_t;

/* Does the database have a tables rule with writes dual or dual-new? */
bool pd_mirror_db_active(const pd_server_t *srv, const char *database);
/* ... or one at reads=aa (A/A: a second connection to the authoritative side)? */
bool pd_mirror_db_aa(const pd_server_t *srv, const char *database);

/* Session hooks (session.c calls them only when sm->on). Each returns false when out of
   memory (the session then ends). */
/* A Query routed with plan r; `sent` is the text sent to the authoritative side. */
bool pd_mirror_on_query(pd_session_t *s, const pd_sql_result_t *r, const char *sent,
                        const char *original, uint32_t seq);
/*
 * A whole Bind (body of n bytes) of a statement with plan r (NULL: not tracked) and the
 * parameter types it was prepared with. *rewritten is set to a Bind to send instead when
 * the result formats had to be extended for image columns (malloc'd message body).
 */
bool pd_mirror_on_bind(pd_session_t *s, const pd_sql_result_t *r, const char *stmt_sql,
                       const char *sent, const uint32_t *types, uint16_t ntypes,
                       const uint8_t *body, size_t n, uint8_t **rewritten, size_t *rewritten_len);
/* Whether a Bind of plan r needs to be seen whole (its parameters are replayed). */
bool pd_mirror_bind_needs_whole(const pd_sql_result_t *r);
bool pd_mirror_on_execute(pd_session_t *s, const uint8_t *body, size_t n, uint32_t seq);
/* Describe of a statement (plan r, may be NULL) or of a portal (by name). */
bool pd_mirror_on_describe(pd_session_t *s, uint8_t kind, const char *name,
                           const pd_sql_result_t *r, uint32_t seq);

/* Must the server message of this type be seen whole by pd_mirror_on_server? */
bool pd_mirror_wants(const pd_session_t *s, uint8_t type);
/*
 * A whole server message of batch `seq`. Returns 0 pass, 1 drop, 2 replace with *out
 * (a whole message, malloc'd, *out_len bytes), -1 out of memory.
 */
int pd_mirror_on_server(pd_session_t *s, uint32_t seq, uint8_t type, const uint8_t *body, size_t n,
                        uint8_t **out, size_t *out_len);
/*
 * ReadyForQuery of batch seq, with the transaction status before and after it, before it
 * reaches the client: the batch's statements go to the mirror. True when the client must
 * not hear it yet (commit: lockstep, the batch's statements are not applied on the mirror);
 * pd_session_wake is called when they are.
 */
bool pd_mirror_before_ready(pd_session_t *s, uint32_t seq, uint8_t status_before, uint8_t status);
/*
 * A COMMIT (plan r, text sql) about to go to the authoritative side: under lockstep the
 * mirror commits first, once what the client sent before is answered (and so replayed).
 * 0 go on, 1 hold the client's message until pd_session_wake (or, batches still in
 * flight, until they are answered: idle_wait), 2 refuse it (on_failure: fail and the
 * mirror failed), -1 out of memory.
 */
int pd_mirror_commit_first(pd_session_t *s, const pd_sql_result_t *r, const char *sql);
/*
 * Wrap: must an autocommit batch whose first statement has plan r (a Query, or the Parse
 * or Bind that starts an extended-protocol batch) run on the authoritative side inside a
 * transaction of pgdual's own, when the session is idle at transaction status 'I'?
 * The session sends BEGIN before the batch and, after its ReadyForQuery, COMMIT
 * (ROLLBACK when the batch failed); it passes ReadyForQuery 'I' to pd_mirror_before_ready
 * for the wrapped batch, which is an implicit transaction to the mirror. Two reasons:
 *  - row images with keys: an autocommit row is visible to other sessions the moment it
 *    commits, before pgdual has read its answer, so another session's image of the same
 *    row could join the row's queue (the order the mirror applies them in) first. Wrapped,
 *    the images join at the batch's ReadyForQuery, before the commit makes them visible;
 *  - commit: lockstep: the batch's row locks are held until the mirror has applied and
 *    committed it, so that writes of one row reach the mirror in the authoritative side's
 *    order also through several instances and for writes replayed verbatim.
 * It costs the batch one round trip to the authoritative side (the COMMIT).
 */
bool pd_mirror_wraps(const pd_session_t *s, const pd_sql_result_t *r);
/* pgdual's COMMIT of a wrapped batch (rule, the client's text) failed on the
   authoritative side with ErrorResponse body, or (body NULL) the session ended before it
   was answered: the mirror has the writes, which is recorded. */
void pd_mirror_wrap_failed(pd_session_t *s, int rule, const char *stmt, const uint8_t *body,
                           size_t n);
/* Must the wrapped batch of rule be rolled back rather than committed (commit: lockstep,
   on_failure: fail, and the mirror did not apply it)? The client hears pd_mirror_refusal. */
bool pd_mirror_refuses_wrap(pd_session_t *s, int rule);
/* Must a mirrored write be refused (on_failure: fail, the mirror failed)? */
bool pd_mirror_refuses(pd_session_t *s, const pd_sql_result_t *r);
/* The refusal for those two cases. */
pd_sql_result_t *pd_mirror_refusal(pd_session_t *s, int rule);
/* The refusal of a statement other than a reads=new read in a batch that runs on new
   (session.c, read_side). */
pd_sql_result_t *pd_mirror_read_refusal(pd_session_t *s, int rule);
/* The refusal of a write pd_mirror_wraps wants in a transaction (or of a COMMIT, plan
   PD_MIRROR_TXN, after one) that would commit in a batch before pgdual read its answer. */
pd_sql_result_t *pd_mirror_order_refusal(pd_session_t *s, int rule, const pd_sql_result_t *plan);
/* A whole CopyData, CopyDone or CopyFail from the client (kept for a mirrored COPY). */
void pd_mirror_on_copy(pd_session_t *s, uint8_t type, const uint8_t *body, size_t n);
/* Is the client's COPY data being kept (CopyData must then be seen whole)? */
#define pd_mirror_copying(s) ((s)->mir.copy_op != NULL)
/* The plan of a bound portal, or NULL. */
const pd_sql_result_t *pd_mirror_portal_plan(pd_session_t *s, const char *name);

/*
 * Changing sides (switchover, rollback), at a transaction boundary of the session.
 * pd_mirror_swap_ready: 0 when the mirror connection is open and caught up (nothing
 * queued, no transaction open), 1 not yet (it is being opened or drains; the session is
 * woken with pd_session_wake when it is), -1 when it cannot be opened.
 * pd_mirror_swap (only after 0, with the session's transport on *conn closed): the mirror
 * takes *conn (the session's idle backend) and *conn becomes the mirror's connection, for
 * the session to relay raw on.
 */
int pd_mirror_swap_ready(pd_session_t *s);
void pd_mirror_swap(pd_session_t *s, struct pg_conn **conn);
/* Names the session's mirror connection while it lives (a swap keeps it; a new
   connection gets a new one), 0 when there is none: what a swap makes the session's
   backend is the connection it left at the last swap only if this did not change. */
unsigned pd_mirror_serial(const pd_session_t *s);

/* The session ends: its mirror drains what is queued and closes on its own. */
void pd_mirror_session_end(pd_session_t *s);

/*
 * After a flag change, at a batch boundary: an A/A connection goes to the authoritative
 * side and a mirror to the other one, so when the database now wants the other kind the
 * session lets its connection go (as at session end) and opens the right one when next
 * needed. False inside a transaction: the caller tries again after it.
 */
bool pd_mirror_follow_flags(pd_session_t *s);

/* The mirrors of the server, for status (and the switchover guardrails): connections
   open, connecting, detached (dead while their session lives), statements queued. */
typedef struct {
    unsigned open, connecting, detached;
    unsigned long long queued;
    unsigned busy; /* mirrors with a statement in flight, queued, or a transaction open */
} pd_mirror_totals_t;
void pd_mirror_totals(const pd_server_t *srv, pd_mirror_totals_t *out);
/* The same for the mirrors of one database's sessions (those that ended included). */
void pd_mirror_db_totals(const pd_server_t *srv, const char *database, pd_mirror_totals_t *out);

/* Server shutdown: every mirror closes now, recording what it had not applied. */
void pd_mirror_close_all(pd_server_t *srv);

#endif /* PD_PROXY_MIRROR_H */
