/*
 * notify.h — readiness and state reports to the service manager (systemd's sd_notify
 * protocol): "READY=1" once pgdual listens, "RELOADING=1" then "READY=1" around a reload,
 * "STOPPING=1" at shutdown, and a human-readable "STATUS=..." with each.
 *
 * Written by hand rather than with libsystemd: the protocol is one datagram of
 * newline-separated KEY=VALUE lines to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
 * or "@name" for the abstract namespace), about forty lines of code, while libsystemd
 * would add a runtime library and a build dependency for every user who never runs pgdual
 * under systemd. Without $NOTIFY_SOCKET every call does nothing.
 */
#ifndef PD_PROXY_NOTIFY_H
#define PD_PROXY_NOTIFY_H

typedef struct pd_notify pd_notify_t;

/*
 * Reads $NOTIFY_SOCKET and removes it from the environment, so that processes pgdual
 * starts (the demo's PostgreSQL servers) do not report to the service manager in its
 * name. NULL when the variable is unset, invalid or no socket could be made (then logged).
 */
pd_notify_t *pd_notify_open(void);

/*
 * Sends one report, e.g. pd_notify_send(n, "READY=1\nSTATUS=listening on %s", addr).
 * Best effort: a failure is logged at debug level and otherwise ignored, since the proxy
 * works the same whether or not the manager hears it. n may be NULL (nothing is sent).
 */
void pd_notify_send(pd_notify_t *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* "RELOADING=1" with the MONOTONIC_USEC= field that systemd's Type=notify-reload wants. */
void pd_notify_reloading(pd_notify_t *n);

void pd_notify_close(pd_notify_t *n);

#endif /* PD_PROXY_NOTIFY_H */
