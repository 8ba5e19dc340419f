/*
 * watch.h — rollback triggers (issue 5): `switchover DB --watch DURATION
 * [--max-divergence N] [--max-error-rate R]` keeps watching the database after the flip,
 * and rolls it back on its own when, within the window, new (now authoritative) passes a
 * threshold:
 *
 *   --max-divergence N  more than N divergence events recorded by the database's rules
 *                       since the flip (shadow reads differing, mirror outcomes differing,
 *                       mirror writes unapplied, mirror errors caused by pgdual: what the
 *                       per-rule counters of `status` count);
 *   --max-error-rate R  once at least PD_WATCH_MIN_REQUESTS client requests were answered
 *                       since the flip: errors per request since the flip above the rate
 *                       before it plus R. A request is one ReadyForQuery relayed to a
 *                       client (a simple Query, or an extended-protocol batch up to Sync);
 *                       an error is an ErrorResponse relayed to a client (pd_traffic_t).
 *                       The rate before is measured from the previous change of the
 *                       database's authoritative side (or pgdual's start) to this flip; with
 *                       fewer than PD_WATCH_MIN_REQUESTS requests in it, it counts as 0.
 *
 * The rollback is the `rollback` command's (cutover.c): guardrails, pause, drain, sequences,
 * flip. When it cannot happen (refused, not drained in time) it is tried again, 1 s later
 * and then twice as long each time up to a minute, until it happens or an operator's
 * `rollback` or `switchover` of the database ends the watch; a pause is never kept.
 * History events (rules/state.h): auto_rollback (with the reason), auto_rollback_failed (the
 * first failed attempt), watch_passed (the window ended quietly), watch_ended (an operator
 * took over, the rules left writes=dual-new, or pgdual stopped). A watch lives in the pgdual
 * process that runs it: a restart ends it.
 */
#ifndef PD_ADMIN_WATCH_H
#define PD_ADMIN_WATCH_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proxy/server.h"

#define PD_WATCH_MIN_REQUESTS 100 /* requests after the flip before the error rate counts */
#define PD_WATCH_MAX_MS       (7 * 24 * 3600 * 1000ULL) /* the longest --watch: 7 days */
#define PD_WATCH_TICK_MS      200                       /* how often the thresholds are looked at */

typedef struct pd_watch pd_watch_t;

typedef struct {
    uint64_t window_ms;       /* 0: no watch */
    long long max_divergence; /* -1: not watched */
    double max_error_rate;    /* < 0: not watched */
} pd_watch_opts_t;

/* No watch, no thresholds. */
void pd_watch_opts_init(pd_watch_opts_t *o);

/*
 * One option of switchover: flag "--watch", "--max-divergence" or "--max-error-rate" with its
 * value. 1 taken, 0 not a watch option, -1 invalid value (msg says what is expected).
 * --watch takes 90s, 10m, 1h or plain seconds; --max-error-rate 0.05 or 5%.
 */
int pd_watch_option(const char *flag, const char *value, pd_watch_opts_t *o, char *msg,
                    size_t size);

/* Is flag one of the options above? */
bool pd_watch_is_option(const char *flag);

/* After the options: NULL when they go together, else why not (and *hint what to do). */
const char *pd_watch_opts_error(const pd_watch_opts_t *o, const char **hint);

/* The plan step a dry run shows for the watch (o->window_ms > 0), into buf. */
void pd_watch_plan(const pd_watch_opts_t *o, char *buf, size_t size);

/*
 * Every rule of the database has just flipped (switchover or rollback; cutover.c): the
 * traffic mark moves, so that the next watch's "rate before" is measured from here; when o
 * asks for a watch (a switchover's --watch) it starts, with timeout_ms as its rollback's
 * drain timeout and who as the operator who asked. Returns the switchover reply's "watch"
 * member (window, until, thresholds, the rate before), or NULL when no watch was asked for.
 */
json_t *pd_watch_flipped(pd_server_t *srv, const char *database, const pd_watch_opts_t *o,
                         uint64_t timeout_ms, const char *who);

/* An operator's switchover or rollback of the database starts: its watch, if any, ends
 * (recorded as watch_ended with why, by who). */
void pd_watch_end(pd_server_t *srv, const char *database, const char *who, const char *why);

/* The automatic rollback that cutover.c ran for w ended: error NULL when done, with the
 * measurements of the flip in fields (a reference is taken; may be NULL). */
void pd_watch_rollback_done(pd_watch_t *w, const char *error, json_t *fields);

/* The watches in progress (of one database, or all with NULL), for status and report:
 * [{database, state, started_by, started_at, until, remaining_s, max_divergence,
 *   max_error_rate, divergence, requests, errors, error_rate, rate_before, reason,
 *   attempts, last_failure}]. A new array. */
json_t *pd_watch_list(pd_server_t *srv, const char *database);

/* The history's watch events (of one database, or all with NULL), oldest first:
 * switchovers that started a watch, auto_rollback, auto_rollback_failed, watch_passed,
 * watch_ended. A new array. */
json_t *pd_watch_events(pd_server_t *srv, const char *database);

/* The newest auto_rollback event of each database (or of one) in the state's history:
 * [{database, time, threshold, observed, limit, reason}]. A new array. */
json_t *pd_watch_last_rollbacks(pd_server_t *srv, const char *database);

/* Server shutdown: every watch ends (recorded), timers closed; memory goes in their close
 * callbacks. pd_cutover_stop_all calls it once no rollback of a watch runs any more. */
void pd_watch_stop_all(pd_server_t *srv);

#endif /* PD_ADMIN_WATCH_H */
