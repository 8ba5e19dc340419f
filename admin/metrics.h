/*
 * metrics.h — the Prometheus endpoint: a small HTTP/1.1 server on the event loop at
 * admin.metrics ("host:port") answering GET /metrics with the text exposition format
 * (version 0.0.4) and anything else with 404 (405 for methods other than GET/HEAD).
 * The body is rendered by a callback at each request, so the numbers are current.
 */
#ifndef PD_ADMIN_METRICS_H
#define PD_ADMIN_METRICS_H

#include <uv.h>

#include "protocol/wire.h" /* pd_buf_t */

typedef struct pd_metrics pd_metrics_t;

/* Appends the exposition text (e.g. "# TYPE pgdual_sessions gauge\npgdual_sessions 3\n"). */
typedef void (*pd_metrics_render_fn)(void *ctx, pd_buf_t *out);

/* Listens on "host:port". NULL after logging a failure (what and what to do). */
pd_metrics_t *pd_metrics_start(uv_loop_t *loop, const char *address, pd_metrics_render_fn render,
                               void *ctx);

/* Closes the listener and open connections; memory goes in close callbacks. */
void pd_metrics_stop(pd_metrics_t *m);

#endif /* PD_ADMIN_METRICS_H */
