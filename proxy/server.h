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

typedef struct pd_session pd_session_t;
typedef struct pd_admin pd_admin_t;

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

/* A users-file entry ready for SCRAM: plain-text passwords are derived once at load. */
typedef struct {
    const pd_user_t *user; /* owned by pd_server_t.users */
    pd_scram_secret_t secret;
} pd_auth_entry_t;

typedef struct pd_server {
    uv_loop_t *loop;
    pd_config_t *cfg;     /* owned; replaced whole on reload */
    pd_users_t *users;    /* owned; NULL unless auth mode scram */
    pd_auth_entry_t *auth; /* owned; one per user */
    SSL_CTX *ssl_ctx;     /* owned; NULL unless TLS is configured */

    int listen_fd;
    uv_poll_t *listen_poll; /* owned; freed by its close callback */
    uv_signal_t sig_int, sig_term, sig_hup;
    uv_timer_t drain_timer;

    pd_session_t *sessions; /* doubly linked list of live sessions, owned */
    unsigned nsessions;
    unsigned state_counts[PD_SESSION_NSTATES];
    uint32_t next_session_id;
    uint64_t total_sessions;

    pd_admin_t *admin; /* owned; NULL without admin.socket */
    uint64_t started_ms;

    bool stopping; /* SIGTERM: no new sessions; exit when the last one ends */
    int exit_code;
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
 * Reloads the config file (users file and TLS material too) and swaps it in whole; on any
 * error keeps running with the previous one and appends the errors to errs. Returns 0/-1.
 */
int pd_server_reload(pd_server_t *srv, pd_config_errors_t *errs);

/* Looks up the auth entry of a user, or NULL. */
const pd_auth_entry_t *pd_server_auth_entry(const pd_server_t *srv, const char *user);

/* Session bookkeeping, called only by session.c. */
void pd_server_session_added(pd_server_t *srv, pd_session_t *s);
void pd_server_session_removed(pd_server_t *srv, pd_session_t *s);

#endif /* PD_PROXY_SERVER_H */
