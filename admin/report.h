/*
 * report.h — the cutover readiness report of one database (`pgdualctl report DB`): its
 * rules with their flags, counters and last verify, the flag and operator-event history
 * that concerns it, how far the mirrors trail, its divergence per rule and kind over
 * time, and a verdict made of named checks.
 *
 * pd_report_build reads the server; the other functions are pure (no server, no clock,
 * no files) so that tests, and the switchover guardrails, can call them with inputs of
 * their own. Nothing here carries a literal SQL value: statements come from the
 * divergence log, which holds them normalized, and verify results lose their keys.
 */
#ifndef PD_ADMIN_REPORT_H
#define PD_ADMIN_REPORT_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "proxy/mirror.h"
#include "proxy/server.h"

#define PD_REPORT_MAX_BUCKETS 60 /* points of the divergence-over-time series */
#define PD_REPORT_RECENT      10 /* newest divergence events listed */
#define PD_REPORT_MAX_QUEUED                                                                       \
    2000 /* statements the mirrors may trail by and be ready (switchover drains the rest while     \
            paused) */

/*
 * The report of database `db` now, or NULL when no database of that name is configured. The caller
 * owns the result: {database, generated_at, has_new, ready: {ok, checks: [{name, title, pass,
 * value}]},      see pd_report_checks rules: [{name, database, kind, writes, reads, table|tables,
 * columns?, error, last_verify (without keys) | null, counters: {passed, rewritten, ...},
 *             divergence_since_verify (null: no divergence log)}],
 *    mirrors: {open, connecting, detached, queued, scope: "server"},
 *    divergence: {logged, events, window_cut, undated, bucket_s, start, end, buckets,
 *                 series: [{rule, kind, total, counts: [...]}],
 *                 recent: [{time, rule, kind, statement}]},
 *    watch: {active: [the switchover --watch running, as pd_watch_list gives it],
 *            events: [switchovers with a watch, auto_rollback, auto_rollback_failed,
 *                     watch_passed, watch_ended: history entries, oldest first]},
 *    history: [flag changes of the database's rules and its operator events, oldest first]}
 */
json_t *pd_report_build(pd_server_t *srv, const char *db);

/* Milliseconds since the epoch of a UTC time as pgdual writes them ("2024-05-01T12:00:00Z",
 * optionally with a fraction of a second), or -1 when text is not one. */
int64_t pd_report_parse_time(const char *text);

/* "2024-05-01T12:00:00Z" for ms since the epoch (the fraction is dropped). */
void pd_report_format_time(int64_t ms, char *buf, size_t size);

/* The width in seconds of buckets that cover span_ms in at most max_buckets buckets
 * aligned to the width: the smallest of 1 s, 5 s, 10 s, 30 s, 1 min, ... 1 day, n days. */
int64_t pd_report_bucket_width(int64_t first_ms, int64_t last_ms, unsigned max_buckets);

/*
 * Divergence events (objects with time, rule, kind; others are ignored) counted per rule
 * and kind in time buckets from the first event to now_ms (or the last event, if later):
 * {events, undated (no readable time), bucket_s, start, end, buckets,
 *  series: [{rule, kind, total, counts: [one per bucket]}] sorted by rule and kind}.
 * Without events: bucket_s 0, buckets 0, start and end null, series [].
 */
json_t *pd_report_divergence(json_t *events, int64_t now_ms, unsigned max_buckets);

/* One rule's evidence, for the readiness checks. */
typedef struct {
    const char *name;
    pd_writes_t writes;
    bool verified;  /* it has a last verify result ... */
    bool verify_ok; /* ... which found no divergence left */
    const char *verify_time;
    /* Divergence events logged at or after the second of the last verify (all of them
       when it was never verified); -1 when unknown (no divergence log). */
    long long diverged_since;
} pd_report_rule_t;

typedef struct {
    const pd_report_rule_t *rules;
    unsigned nrules;
    pd_writes_t want; /* the writes flag every rule must be at (dual for switchover) */
    bool mirrored;    /* the database has tables rules: its mirrors matter */
    pd_mirror_totals_t mirrors;
    unsigned long long max_queued;
} pd_report_inputs_t;

/*
 * The verdict: {ok (every check passed), checks: [{name, title, pass, value}]}, checks
 * in this order:
 *   writes      every rule at writes=want (a database without rules fails)
 *   mirrors_connected   no mirror detached (passes when nothing is mirrored)
 *   mirrors_caught_up   at most max_queued statements queued for mirrors
 *   verify_ok   every rule's last verify found no divergence left
 *   no_divergence_since_verify   no divergence event since each rule's last verify
 * `value` says what was found, for people.
 */
json_t *pd_report_checks(const pd_report_inputs_t *in);

#endif /* PD_ADMIN_REPORT_H */
