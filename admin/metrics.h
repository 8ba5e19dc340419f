/*
 * metrics.h — the Prometheus endpoint: a small HTTP/1.1 server on the event loop at
 * admin.metrics ("host:port") answering GET /metrics with the text exposition format
 * (version 0.0.4), GET /ready with 200 "ready" or 503 "not ready" (for load balancers'
 * and Kubernetes' readiness probes) and anything else with 404 (405 for methods other
 * than GET/HEAD). Both answers come from callbacks at each request, so they are current.
 */
#ifndef PD_ADMIN_METRICS_H
#define PD_ADMIN_METRICS_H

#include <stdbool.h>
#include <uv.h>

#include "protocol/wire.h" /* pd_buf_t */

typedef struct pd_metrics pd_metrics_t;

/* Appends the exposition text (e.g. "# TYPE pgdual_sessions gauge\npgdual_sessions 3\n"). */
typedef void (*pd_metrics_render_fn)(void *ctx, pd_buf_t *out);

/* True while new connections are welcome (GET /ready answers 200, else 503). */
typedef bool (*pd_metrics_ready_fn)(void *ctx);

/* Listens on "host:port"; ctx goes to both callbacks. NULL after logging a failure (what
   and what to do). */
pd_metrics_t *pd_metrics_start(uv_loop_t *loop, const char *address, pd_metrics_render_fn render,
                               pd_metrics_ready_fn ready, void *ctx);

/* Closes the listener and open connections; memory goes in close callbacks. */
void pd_metrics_stop(pd_metrics_t *m);

#endif /* PD_ADMIN_METRICS_H */
