/*
 * relay.h — the event loops that relay sessions: the main loop (relays[0]), which runs
 * everything else too, and limits.relay_threads more, each on a thread of its own.
 *
 * Only pass-through sessions leave the main loop: a session of a database without rules,
 * once connected, is handed to the loop with the fewest sessions. Such a session touches
 * nothing shared on the hot path (its buffers, its two sockets and its timer are its
 * own), so a relay loop never takes a lock while relaying. What the rest of pgdual asks
 * of it (cancel, shut down, come back because a reload gave its database rules) is set
 * as bits in the session (pd_session_ask) and the loop is woken to act on them at a point
 * where it may. A session moves between loops whole: its handles are closed on one loop,
 * the session is queued to the other and adopted there (pd_session_arrive). It is freed
 * only on the main loop, which owns the list of all sessions.
 */
#ifndef PD_PROXY_RELAY_H
#define PD_PROXY_RELAY_H

#include <stdbool.h>
#include <uv.h>

typedef struct pd_server pd_server_t;
typedef struct pd_session pd_session_t;

typedef struct pd_relay {
    unsigned index; /* 0: the main loop */
    uv_loop_t *loop;
    uv_loop_t own_loop; /* relay threads' */
    uv_thread_t thread;
    bool started;
    uv_async_t *async; /* own_async, or the server's for the main loop (it outlives us) */
    uv_async_t own_async;
    uv_mutex_t lock;
    /* Guarded by lock: sessions on their way here, and what the loop is woken for. */
    pd_session_t *inbox, *inbox_tail;
    bool nudged; /* a session of this loop has asks (pd_session_ask) */
    bool stop;
    /* The loop's own: the sessions it runs (relay threads; linked by relay_prev/next). */
    pd_session_t *owned;
    /* The main loop's: sessions handed to this loop and not yet back or freed. */
    unsigned assigned;
} pd_relay_t;

/* Starts srv->cfg->relay_threads threads (srv->relays, srv->nrelays counting the main
   loop's). -1 after logging when one could not be started. */
int pd_relay_start(pd_server_t *srv);

/* Stops and joins the threads; they must run no sessions any more. Safe to call twice. */
void pd_relay_stop(pd_server_t *srv);

/* The loop a pass-through session should run on: the one with the fewest sessions, a
   relay thread's before the main loop's on a tie. Main loop only. */
pd_relay_t *pd_relay_pick(pd_server_t *srv);

/* Queues s (all its handles closed) to r's loop, which adopts it. Any thread. */
void pd_relay_post(pd_relay_t *r, pd_session_t *s);

/* Wakes r's loop to look at its sessions' asks. Any thread. */
void pd_relay_nudge(pd_relay_t *r);

/* A relay thread's session ended or left: out of its loop's list. That loop only. */
void pd_relay_leave(pd_relay_t *r, pd_session_t *s);

#endif /* PD_PROXY_RELAY_H */
