/*
 * backend.h — a connection to a PostgreSQL server, established with libpq's non-blocking
 * connect (PQconnectStartParams + PQconnectPoll) driven by the event loop, so that every
 * libpq auth method, TLS, .pgpass and multi-host work. Once connected, the session relays
 * raw protocol messages on libpq's socket (through libpq's SSL object when TLS is on).
 */
#ifndef PD_PROXY_BACKEND_H
#define PD_PROXY_BACKEND_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <uv.h>

typedef struct pd_backend pd_backend_t;

/* Called once: err is NULL on success, else a message (libpq's) and its SQLSTATE guess. */
typedef void (*pd_backend_cb)(pd_backend_t *b, void *owner, const char *err, const char *sqlstate);

/* What a client asked for in its startup packet, passed on to the backend. */
typedef struct {
    const char *user;     /* the client's user: used when the conninfo names none */
    const char *password; /* users-file plain-text password or NULL */
    unsigned nparams;     /* the client's other startup parameters */
    const char *const *names;
    const char *const *values;
} pd_backend_params_t;

struct pd_backend {
    PGconn *conn; /* owned; PQfinish'ed by pd_backend_close */
    uv_loop_t *loop;
    uv_poll_t *poll; /* connect phase only; owned, freed by its close callback */
    int poll_fd;
    bool connected;
    pd_backend_cb cb;
    void *owner;
};

/*
 * Starts connecting to `conninfo` with the client's parameters merged in: user and
 * password fill in what the conninfo leaves out; application_name and client_encoding
 * are the client's; every other parameter becomes `-c name=value` in `options`, after
 * the conninfo's own options. Returns 0, or -1 with cb not to be called and *err set.
 */
int pd_backend_connect(pd_backend_t *b, uv_loop_t *loop, const char *conninfo,
                       const pd_backend_params_t *params, pd_backend_cb cb, void *owner, char *err,
                       size_t errlen);

/* Stops polling and closes the connection (sending Terminate). Safe to call twice. */
void pd_backend_close(pd_backend_t *b);

/* The ParameterStatus names PostgreSQL 15 reports to clients (NULL-terminated). */
extern const char *const pd_backend_reported_params[];

#endif /* PD_PROXY_BACKEND_H */
