/*
 * session.h — one client connection and everything that serves it: the client-side
 * state machine (startup, TLS, auth, connecting, active, closing), its backend
 * connection, and the relay between them.
 *
 * The relay keeps protocol decisions apart from byte copying: per direction one buffer;
 * each message header is looked at, bodies the proxy does not need stream through from
 * that buffer straight to the other socket without being copied (a 100 MB DataRow goes
 * through a 64 kB buffer). When the destination cannot take more, the source is not read
 * until it drains (backpressure).
 */
#ifndef PD_PROXY_SESSION_H
#define PD_PROXY_SESSION_H

#include <stdint.h>
#include <uv.h>

#include "protocol/scram.h"
#include "protocol/wire.h"
#include "proxy/backend.h"
#include "proxy/compare.h"
#include "proxy/mirror.h"
#include "proxy/relay.h"
#include "proxy/server.h"
#include "proxy/transport.h"
#include "rules/sql.h"

/*
 * One direction of the relay. Invariant: 0 <= sent <= scan <= end <= cap.
 * [sent, scan) is decided and waiting to be written; [scan, end) is not parsed yet.
 * One "hole" may be pending: the input [hole_start, hole_end) is not sent, and `repl` is
 * sent in its place (a rewritten message; empty: dropped messages).
 */
typedef struct {
    uint8_t *buf; /* owned */
    size_t cap;
    size_t sent, scan, end;
    uint64_t skip; /* body bytes of the current message still to stream through */
    bool has_hole;
    size_t hole_start, hole_end;
    pd_buf_t repl;
    size_t repl_sent;
} pd_pipe_t;

/*
 * A statement the client prepared, on a database with rules: what the server holds under
 * its name, decided under which rules, so that a flag flip reaches statements prepared
 * before it (they are prepared again, transparently, at their next Bind). A session that
 * changes sides (switchover, reads=new) also knows what its other connection holds under
 * the name, so that going back costs no Parse and a name the client freed meanwhile is
 * freed there too (pd_session_t.stale).
 */
typedef struct pd_stmt {
    struct pd_stmt *next; /* hash chain */
    char *name;
    char *sql;  /* the client's text */
    char *sent; /* what the server has prepared under the name; NULL: nothing */
    uint16_t ntypes;
    uint32_t *types;    /* the parameter types the client declared */
    unsigned gen;       /* srv->rules_generation of the decision */
    bool lost;          /* the server may not hold `sent` under the name: prepare it again */
    uint64_t serial;    /* which record of the name this is (a DEALLOCATE's answer) */
    bool maybe_dropped; /* SQL pgdual does not read may have dropped it (statements_dropped) */
    char *other_sent;   /* what the session's other connection holds, when other_held */
    bool other_held;    /* ...known to hold other_sent (NULL: nothing) under the name */
    pd_sql_result_t *r; /* the decision (rewrite, refusal, shadow form), referenced */
} pd_stmt_t;

/* A `DEALLOCATE name` of the client's Query batch `seq`. */
typedef struct {
    char *name; /* owned */
    uint32_t seq;
} pd_dealloc_t;

/*
 * A Parse or Close on its way to the server, kept in the order the server answers them,
 * each batch's ended by a PD_PREP_END. What the session's records say of the client's
 * statement names is decided when the message is read (later messages depend on it); its
 * ParseComplete or CloseComplete confirms it, and the end of its batch without one (an
 * error before or at it) undoes it.
 */
enum {
    PD_PREP_END,
    PD_PREP_OTHER,  /* pgdual's own, of none of the client's statements */
    PD_PREP_CLIENT, /* the client's Parse: record `serial` made, `old` replaced */
    PD_PREP_OURS,   /* pgdual's Parse of the client's statement (prepared again) */
    PD_PREP_TAKEN,  /* the client's Parse of a name it holds (PostgreSQL refuses it) */
    PD_PREP_CLOSE,  /* the client's Close of a statement: `old` taken out */
};
typedef struct {
    uint8_t kind;    /* PD_PREP_* */
    uint8_t answer;  /* what confirms it: '1' ParseComplete, '3' CloseComplete */
    char *name;      /* the client's statement name, owned (NULL: none) */
    uint64_t serial; /* ...and which record of it */
    uint64_t made;   /* TAKEN: the serial of the record it makes should the server take it
                        after all, given in the order the client sent it */
    pd_stmt_t *old;  /* a record taken out of the table, owned: freed when confirmed, put
                        back when undone */
    char *sql;       /* TAKEN: the client's text and parameter types, owned */
    uint32_t *types;
    uint16_t ntypes;
} pd_prep_t;

/* A prepared read to replay for a shadow comparison: statement and the client's Bind. */
typedef struct {
    char *sql;          /* the client's text, for the divergence log */
    pd_sql_result_t *r; /* referenced; r->shadow_sql is the other form */
    uint16_t ntypes;
    uint32_t *types;
    uint8_t *bind; /* the client's Bind body */
    size_t bind_len;
} pd_prepared_t;

/* A response of the server to a message the proxy put in: the `idx`-th of its `type`
 * ('1' ParseComplete, '2' BindComplete, '3' CloseComplete) in batch `seq`, dropped. */
typedef struct {
    uint32_t seq;
    uint8_t type;
    uint32_t idx;
} pd_drop_t;

/*
 * What the server owes for one batch of client messages ending in Sync, Query or
 * FunctionCall (each answered by one ReadyForQuery). Kept only for sessions whose
 * database has rules: it tells which responses answer messages the proxy put in.
 */
typedef struct {
    uint32_t seq;
    uint32_t seen[3]; /* ParseComplete, BindComplete, CloseComplete seen so far */
    bool shadow;      /* the client's query; its result is summed for a shadow comparison */
    bool internal;    /* the proxy's own query (shadow read): nothing of it reaches the client */
    uint8_t wrap;     /* fleet wrap (pd_mirror_wraps): 'B' the proxy's BEGIN, 'W' the client's
                         batch inside, 'C' the proxy's COMMIT or ROLLBACK (its error and
                         ReadyForQuery reach the client), 0 none */
    uint64_t serial;  /* the session's stmt_serial when the batch was read: records with a
                         higher one are of batches after it (the client pipelined) */
} pd_batch_t;

struct pd_session {
    pd_server_t *srv;          /* not owned */
    pd_session_t *prev, *next; /* server's list */
    uint32_t id;               /* also the pid in our BackendKeyData */
    uint32_t cancel_key;
    pd_session_state_t state; /* changed only by session_set_state() */
    bool closed;              /* handles closed; memory freed by the timer's close cb */
    char tag[192];            /* log prefix "[S-17 app/alice@127.0.0.1:50312]" */
    char peer[64];

    pd_transport_t client;
    pd_backend_t backend;
    pd_transport_t server; /* the backend's socket once connected (fd and SSL are libpq's) */
    bool server_open;

    pd_pipe_t c2b, b2c;
    pd_buf_t out;       /* what the proxy itself says to the client */
    pd_buf_t notes;     /* notifications from the mirror's connection, for b2c's next boundary */
    bool notes_dropped; /* ...some were dropped (the client does not read): warned */
    size_t out_sent;
    uv_timer_t timer; /* startup deadline, then linger on close; its close cb frees us */

    /* Startup. Copies of the client's parameters, owned. */
    bool tls_done, gss_done;
    char *user, *database;
    unsigned nparams;
    char **names, **values;
    char *conninfo;         /* the database's old conninfo, copied: reload frees configs */
    pd_traffic_t *traffic;  /* not owned: the server's counters of the database, or NULL */
    pd_scram_t *scram;      /* owned during AUTH */
    bool auth_unknown_user; /* SCRAM against a mock secret, fails at the end */

    /* Rules: sessions on a database with rules look at Query and Parse whole. */
    bool rules_on;
    unsigned rules_generation; /* srv->rules_generation rules_on was computed for, + 1 */
    uint64_t route_key;        /* whose bucket decides reads new@N: sticky per session */
    pd_batch_t *batches;       /* FIFO ring of batches awaiting ReadyForQuery, owned */
    unsigned batch_cap, batch_head, batch_count;
    uint32_t batch_seq;  /* the batch being sent */
    uint32_t batch_msgs; /* client messages sent in it */
    uint32_t batch_exec; /* Execute messages in it */
    uint32_t sent[3];    /* Parse, Bind, Close sent in it (the client's and ours) */
    bool batch_refused;  /* a refusal was put in: the server skips to Sync */
    pd_drop_t *drops;    /* FIFO ring of responses to drop, owned */
    unsigned drop_cap, drop_head, drop_count;
    pd_prep_t *preps; /* Parses the server has yet to answer, in its order, owned */
    unsigned prep_head, nprep, prep_cap; /* [prep_head, nprep) are queued */
    unsigned prep_open; /* where the ops of the client's batch being read begin in preps */
    pd_stmt_t **stmts;  /* prepared statements by name (hash table), owned */
    unsigned stmt_buckets, stmt_count;
    /* The `DEALLOCATE name`s of the client's Query batches not yet answered, in order:
       each forgotten when the server says DEALLOCATE (command_drops). */
    pd_dealloc_t *deallocs;
    unsigned ndealloc, dealloc_next; /* [dealloc_next, ndealloc) are to come */
    bool dealloc_tried;              /* dealloc_here prepared statements for the Query waiting */
    uint64_t stmt_serial;            /* the last pd_stmt_t.serial given */
    char **stale;                    /* names the other connection holds that the client freed */
    unsigned nstale, stale_cap;
    unsigned other_serial; /* pd_mirror_serial of the connection left at the last swap */
    pd_buf_t to_server;    /* the proxy's own messages for the server (shadow queries) */
    size_t to_server_sent;
    bool hold_client; /* client input waits while the proxy's own query runs */
    bool gate_held;   /* client input waits at a transaction boundary: the database is
                         paused, or the session changes sides once its mirror is ready */
    bool auth_new;    /* the backend is the database's new side (tables rules at dual-new|new) */
    bool reading;     /* ...or it is new while old is authoritative: a batch of reads=new of
                         a tables rule at writes=dual (read_side, session.c) */
    int read_rule;    /* ...of this rule */
    bool want_new;    /* ... which the rules in force ask for (sides change when idle) */
    bool mirror_wait; /* b2c waits at a ReadyForQuery for the mirror (lockstep) */
    bool idle_wait;   /* client input waits until no batch is in flight (wrap_waits) */
    pd_sql_result_t *kept_plan; /* ...and the plan of its first statement, owned */
    unsigned kept_gen;          /* the rules generation it was made under */
    uint8_t batch_txn;          /* the batch's last BEGIN ('B') or COMMIT/ROLLBACK ('E') */
    bool batch_wrote;           /* ...and a write pd_mirror_wraps wants went on since */
    char *wrap_sql;     /* the client's Query in a fleet wrap, for the divergence log; owned */
    int wrap_rule;      /* ... and its rule */
    bool wrap_commit;   /* the wrap ends with COMMIT (not ROLLBACK) */
    bool wrap_open;     /* the batch being sent is wrapped (pgdual's BEGIN is ahead of it) */
    bool wrap_released; /* ... its writes went to the mirror; pgdual's COMMIT is unanswered */

    pd_prepared_t *cand; /* this batch binds a shadowed read: an owned copy */

    pd_session_mirror_t mir; /* tables rules in dual: the mirror's side (mirror.h) */

    /* Shadow read in progress (one at a time). */
    pd_sql_result_t *shadow;   /* owned reference */
    char *shadow_text;         /* the client's statement, for the divergence log */
    pd_prepared_t *shadow_ext; /* extended protocol: statement and Bind to replay, owned */
    pd_result_sum_t sum_old, sum_new;
    bool sums_ready;
    bool tap_row; /* b2c: the DataRow in progress is being summed */

    /*
     * Relay loops (proxy/relay.h). A pass-through session may run on a relay thread: then
     * only that thread touches it, except the fields below said to be read elsewhere.
     */
    pd_relay_t *home;    /* main loop only: the relay thread it is on or going to; NULL: main */
    pd_relay_t *counted; /* main loop only: whose `assigned` counts it, or NULL */
    pd_relay_t *at;      /* the loop running it now */
    pd_relay_t *dest;    /* ...moving (its handles closing): the loop it goes to */
    uv_loop_t *loop;     /* at's loop */
    pd_session_t *relay_prev, *relay_next; /* at's list of sessions, or an inbox */
    unsigned asks;     /* PD_ASK_* from the main loop, atomically (pd_session_ask) */
    bool recall;       /* back to the main loop at the next batch boundary (set on a relay
                          thread only, cleared when back) */
    uint8_t last_type; /* the client's last message passed on (0: none yet) */

    /* Also read by the main loop's admin commands, atomically (PD_GET). */
    uint8_t txn_status;  /* from the last ReadyForQuery: 'I', 'T' or 'E' */
    bool busy;           /* messages went to the server since its last ReadyForQuery */
    unsigned ready_owed; /* the client's Query, Sync and FunctionCall relayed whose
                            ReadyForQuery has not come back (with or without rules) */
    bool client_terminated;
    uint64_t started_ms;
    uint64_t bytes_c2b, bytes_b2c;
};

/* What the main loop asks of a session on a relay thread (pd_session_ask). */
enum {
    PD_ASK_CANCEL = 1,    /* a client's CancelRequest for it */
    PD_ASK_STOP = 2,      /* smart shutdown (pd_session_shutdown) */
    PD_ASK_STOP_FAST = 4, /* fast shutdown */
    PD_ASK_RECALL = 8,    /* a reload gave its database rules: back to the main loop */
};

/* Main loop: asks a session on a relay thread (home non-NULL) to act, then wakes it. */
void pd_session_ask(pd_session_t *s, unsigned asks);
/* Its loop: acts on what was asked. Called by relay.c. */
void pd_session_asked(pd_session_t *s);
/* A session queued to r (pd_relay_post) is r's now: adopted, or freed when it ended.
   Called by relay.c on r's loop. */
void pd_session_arrive(pd_session_t *s, pd_relay_t *r);
/* Main loop, after a reload: sessions on relay threads whose database now has rules come
   back to the main loop. */
void pd_sessions_recall(pd_server_t *srv);

/* Takes an accepted client socket (non-blocking) and starts its session. */
void pd_session_accept(pd_server_t *srv, int fd, const char *peer);

/* Ends a session: with a FATAL to the client when sqlstate is non-NULL and the stream is
 * at a message boundary; the backend is closed at once. */
void pd_session_terminate(pd_session_t *s, const char *sqlstate, const char *message,
                          const char *hint);

/*
 * Shutting down. Smart (SIGTERM): a session between transactions ends now with FATAL
 * 57P01, one in a transaction or a statement when that ends (at its ReadyForQuery). Fast
 * (SIGINT, or the grace period is over): it ends now with FATAL 57P01, a statement it
 * has running cancelled. Either way a session still starting gets 57P03.
 */
void pd_session_shutdown(pd_session_t *s, bool fast);

/* Is the session's backend the database's new side (new authoritative, or reading new)?
   Its mirror connection is then on old. */
static inline bool pd_session_on_new(const pd_session_t *s)
{
    return s->auth_new || s->reading;
}

/* A notification that came on the session's mirror connection (a LISTEN kept in step
   there: NOTIFY runs where the session's statements ran, which after a switchover is the
   other side): the client hears it at the next message boundary of what it is sent. */
void pd_session_notify(pd_session_t *s, uint32_t pid, const char *channel, const char *payload);
/* ...which it hears only while the mirror's side is the database's authoritative one (a
   write replayed on the other side fires its triggers there too); nor, for the same
   reason, does it hear its own connection's while that one is not. */
bool pd_session_hears_mirror(const pd_session_t *s);

/* What the session waited for happened (the mirror applied a batch under commit:
 * lockstep, a pause ended, the mirror is ready to change sides): the relay goes on, from
 * a timer, never inside the caller's stack. */
void pd_session_wake(pd_session_t *s);

/* Is the session between transactions with nothing in flight (or not yet serving)? */
bool pd_session_quiet(const pd_session_t *s);

/* Finds the session that issued BackendKeyData (pid, key), or NULL. */
pd_session_t *pd_session_find(pd_server_t *srv, uint32_t pid, uint32_t key);

#endif /* PD_PROXY_SESSION_H */
