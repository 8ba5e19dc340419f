/*
 * render.h — pgdual's numbers for people and machines: the Prometheus exposition served
 * by the metrics endpoint, and the per-rule counters shown by `status`.
 */
#ifndef PD_ADMIN_RENDER_H
#define PD_ADMIN_RENDER_H

#include <jansson.h>

#include "protocol/wire.h"
#include "proxy/server.h"

/* A pd_metrics_render_fn: ctx is the pd_server_t. */
void pd_render_metrics(void *ctx, pd_buf_t *out);

/* Per-rule counters and the rewrite cache, as JSON for `status`. */
json_t *pd_render_rule_stats(const pd_server_t *srv);

#endif /* PD_ADMIN_RENDER_H */
