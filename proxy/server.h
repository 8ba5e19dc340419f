/*
 * server.h — pd_server_t owns the event loop's long-lived things: the config snapshot,
 * the listening socket, the TLS context, the users table, the signal handlers and the
 * list of sessions with their counts per state.
 */
#ifndef PD_PROXY_SERVER_H
#define PD_PROXY_SERVER_H

#include <openssl/ssl.h>
#include <stdint.h>
#include <uv.h>

#include "protocol/scram.h"
#include "rules/config.h"

#define PD_VERSION "0.1.0"

/* How often the catalog check of a rule whose database could not be reached is retried. */
#define PD_CATALOG_RECHECK_MS 5000

typedef struct pd_session pd_session_t;
typedef struct pd_admin pd_admin_t;
typedef struct pd_jobs pd_jobs_t;
typedef struct pd_metrics pd_metrics_t;
typedef struct pd_notify pd_notify_t;
typedef struct pd_state pd_state_t;
typedef struct pd_sql pd_sql_t;
#include "rules/sql.h"
typedef struct pd_rule_facts pd_rule_facts_t;
#include "rules/flags.h" /* pd_rule_flags_t: the flags in force for one rule */

/* The session states; the X-macro gives the enum and the names used by logs and status. */
#define PD_SESSION_STATES(X)                                                                       \
    X(STARTUP, "startup")       /* reading the startup packet(s) */                                \
    X(TLS, "tls")               /* TLS handshake in progress */                                    \
    X(AUTH, "auth")             /* SCRAM exchange with the client */                               \
    X(CONNECTING, "connecting") /* libpq connecting to the backend */                              \
    X(ACTIVE, "active")         /* relaying messages */                                            \
    X(CLOSING, "closing")       /* flushing a last message, then closing */

#define PD__STATE_ENUM(id, name) PD_SESSION_##id,
typedef enum { PD_SESSION_STATES(PD__STATE_ENUM) PD_SESSION_NSTATES } pd_session_state_t;
#undef PD__STATE_ENUM

const char *pd_session_state_name(pd_session_state_t s);

/* Counters per rule, for status and metrics. */
typedef struct {
    uint64_t passed, rewritten, refused; /* statements concerning the rule */
    uint64_t shadow_compared, shadow_mismatched, shadow_skipped;
    uint64_t aa_compared, aa_mismatched; /* reads=aa: old against old (the noise floor) */
    /* tables rules: statements replayed on the mirror; outcomes that differed (or failed
       there); statements never applied (mirror detached); errors the proxy caused there */
    uint64_t mirrored, mirror_diverged, mirror_unapplied, mirror_proxy_errors;
    int64_t divergence_at; /* unix time of the last divergence event (0: none) */
} pd_rule_stats_t;

/*
 * Client traffic of one database, for switchover --watch (admin/watch.c): requests
 * answered (each ReadyForQuery relayed to a client: one simple Query, or one extended
 * protocol batch up to its Sync) and ErrorResponses relayed to clients (PostgreSQL's and
 * pgdual's refusals alike, which reach clients through the server too; not the proxy's
 * own shadow queries). Plain increments on the loop. Kept by database name for the
 * server's life: a reload keeps them, and a session's pointer stays valid.
 * mark_*: the counts when the database's authoritative side last changed (0: start).
 */
typedef struct pd_traffic {
    struct pd_traffic *next;
    uint64_t requests, errors;
    uint64_t mark_requests, mark_errors;
    char database[];
} pd_traffic_t;

/* A users-file entry ready for SCRAM: plain-text passwords are derived once at load. */
typedef struct {
    const pd_user_t *user; /* owned by pd_server_t.users */
    pd_scram_secret_t secret;
} pd_auth_entry_t;

/* Fields written on one loop and read on another (relay threads, proxy/relay.h). */
#define PD_GET(field)    __atomic_load_n(&(field), __ATOMIC_RELAXED)
#define PD_SET(field, v) __atomic_store_n(&(field), (v), __ATOMIC_RELAXED)
#define PD_ADD(field, n) __atomic_add_fetch(&(field), (n), __ATOMIC_RELAXED)

struct pd_relay;

typedef struct pd_server {
    uv_loop_t *loop;
    pd_config_t *cfg;      /* owned; replaced whole on reload */
    uint32_t max_message;  /* cfg->max_message_size, PD_GET by relay threads */
    pd_users_t *users;     /* owned; NULL unless auth mode scram */
    pd_auth_entry_t *auth; /* owned; one per user */
    SSL_CTX *ssl_ctx;      /* owned; NULL unless TLS is configured */
    uint8_t mock_key[32];  /* random: salts of stand-in secrets for unknown users */

    int listen_fd;
    uv_poll_t *listen_poll; /* owned; freed by its close callback */
    uv_signal_t sig_int, sig_term, sig_hup;
    uv_timer_t drain_timer;   /* SIGTERM: limits.shutdown_grace_ms */
    uv_timer_t mirror_timer;  /* stopping: polls the mirrors still applying their queue */
    uv_timer_t shadow_timer;  /* while shadow reads run on mirrors: their time budget */
    uv_timer_t recheck_timer; /* catalog checks of rules whose database was unreachable */
    bool rechecking;          /* such a check is on a worker thread */
    /* The keys (static names) whose change the last reload could not apply, NULL-ended. */
    const char *restart_needed[6];

    pd_session_t *sessions; /* doubly linked list of live sessions, owned */
    unsigned nsessions;
    unsigned state_counts[PD_SESSION_NSTATES]; /* PD_ADD/PD_GET: relay threads change them */
    struct pd_relay *relays; /* owned; [0] the main loop, then the relay threads */
    unsigned nrelays;
    uv_async_t relay_async; /* the main loop's (proxy/relay.c) */
    uint32_t next_session_id;
    uint64_t total_sessions;

    pd_admin_t *admin;      /* owned; NULL without admin.socket */
    pd_metrics_t *metrics;  /* owned; NULL without admin.metrics */
    pd_state_t *state;      /* owned: flags, history, checkpoints, verify results */
    pd_jobs_t *jobs;        /* owned: backfill and verify jobs */
    pd_rule_flags_t *flags; /* owned; one per cfg->rules[i] */
    pd_rule_stats_t *stats; /* owned; one per cfg->rules[i] */
    char **stats_names;     /* owned; the rule names stats were made for (reload) */
    unsigned stats_count;
    pd_rule_facts_t *facts;               /* owned; catalog facts, one per cfg->rules[i] */
    struct pd_divergence_log *divergence; /* owned */
    pd_sql_t *sql;                        /* owned; the rewriter for cfg's rules */
    struct pd_mirror *mirrors;            /* owned; every mirror connection (mirror.c) */
    struct pd_mirror_keys *mirror_keys;   /* owned; rows with images queued (mirror.c) */
    struct pd_seqsync *seqsync;           /* owned; sequences kept in step (seqsync.c) */
    struct pd_fleet *fleet;               /* owned; NULL unless `state: postgres` (fleet.c) */
    bool reloading;
    unsigned config_generation;
    unsigned rules_generation;    /* bumped on every flag change and reload */
    pd_sql_result_t *pass_result; /* owned; handed out for databases whose rules are idle */
    uint64_t started_ms;

    struct pd_pause *pauses;     /* owned; paused databases (pgdualctl pause, switchover) */
    struct pd_cutover *cutovers; /* owned; pauses and switchovers in progress (cutover.c) */
    struct pd_record *records;   /* owned; events on their way to a shared state (cutover.c) */
    struct pd_watch *watches;    /* owned; switchover --watch in progress (admin/watch.c) */
    pd_traffic_t *traffic;       /* owned; client traffic per database */
    unsigned npauses;

    bool stopping;  /* SIGTERM/SIGINT: no new sessions; exit when the last one ends (PD_SET:
                       relay threads read it) */
    bool stop_fast; /* SIGINT or the grace period over: mirrors are not waited for */
    int exit_code;
    pd_notify_t *notify; /* owned by main; NULL unless run under a service manager */
} pd_server_t;

/*
 * Takes ownership of cfg, loads the users file and TLS material, opens the listener and
 * installs signal handlers. Returns 0, or -1 after logging what failed and what to do.
 */
int pd_server_init(pd_server_t *srv, uv_loop_t *loop, pd_config_t *cfg);

/* Runs the loop until the server stops; returns the process exit code. */
int pd_server_run(pd_server_t *srv);

/* Releases everything; the loop must have no more active handles of the server. */
void pd_server_free(pd_server_t *srv);

/*
 * Reloads the config file: parses it at once (errors appended to errs, return -1), then
 * loads the users file, TLS material and catalog facts on a worker thread and swaps all
 * in whole on the loop; cb (may be NULL) hears the outcome (error NULL on success). On
 * any error pgdual keeps running with the previous configuration.
 */
typedef void (*pd_server_reload_cb)(pd_server_t *srv, const char *error, void *ctx);
int pd_server_reload(pd_server_t *srv, pd_config_errors_t *errs, pd_server_reload_cb cb, void *ctx);

/* NULL when this version can serve these flags for the rule, else why not. */
const char *pd_server_check_flags(const pd_server_t *srv, unsigned rule, pd_writes_t writes,
                                  const pd_reads_t *reads);

/* Sets a rule's flags: persisted in the state first, then in force for the next
 * statement of every session. -1 with *err (malloc'd) when the state could not be saved. */
int pd_server_set_flags(pd_server_t *srv, unsigned rule, pd_writes_t writes,
                        const pd_reads_t *reads, const char *who, char **err);
/* The second half of pd_server_set_flags, for a caller that saved them in the state itself
 * (off the event loop): they come into force, logged. */
void pd_server_flags_saved(pd_server_t *srv, unsigned rule, pd_writes_t writes,
                           const pd_reads_t *reads, const char *who);

/* The state changed under us (another instance of the fleet): the flags it holds for this
 * instance's rules come into force, all of them at once, unless this version refuses them
 * (logged; the flags in force stay). */
void pd_server_apply_state(pd_server_t *srv);

/* Is new the authoritative side of the database (its tables rules at dual-new or new)?
   Sessions then talk to new, and old is the mirror. */
bool pd_server_new_authoritative(const pd_server_t *srv, const char *database);

/*
 * Pausing a database: sessions of it (with rules) hold their next message at a
 * transaction boundary until it is resumed; transactions in flight go on. pause returns
 * -1 when the database is paused already; resume wakes the held sessions (no-op when
 * not paused). since_ms: when the pause began (0 when not paused).
 */
int pd_server_pause(pd_server_t *srv, const char *database);
void pd_server_resume(pd_server_t *srv, const char *database);
bool pd_server_paused(const pd_server_t *srv, const char *database);
uint64_t pd_server_paused_since(const pd_server_t *srv, const char *database);

/* The traffic counters of a database, added at first use; NULL when out of memory. */
pd_traffic_t *pd_server_traffic(pd_server_t *srv, const char *database);

/* Looks up the auth entry of a user, or NULL. */
const pd_auth_entry_t *pd_server_auth_entry(const pd_server_t *srv, const char *user);

/* Session bookkeeping, called only by session.c. */
void pd_server_session_added(pd_server_t *srv, pd_session_t *s);
void pd_server_session_removed(pd_server_t *srv, pd_session_t *s);

#endif /* PD_PROXY_SERVER_H */
