/*
 * relay.c — relay threads: one libuv loop each, fed sessions through a locked inbox.
 *
 * The lock guards the inbox and two flags, nothing else, and is held for a few pointer
 * moves; a relay loop runs its sessions without it. A uv_async_t wakes the loop (libuv
 * coalesces wake-ups: the callback takes whatever has queued meanwhile).
 */
#include "proxy/relay.h"

#include <stdlib.h>

#include "proxy/log.h"
#include "proxy/server.h"
#include "proxy/session.h"

static void on_async(uv_async_t *a)
{
    pd_relay_t *r = a->data;
    uv_mutex_lock(&r->lock);
    pd_session_t *in = r->inbox;
    r->inbox = r->inbox_tail = NULL;
    bool nudged = r->nudged, stop = r->stop;
    r->nudged = false;
    uv_mutex_unlock(&r->lock);

    while (in != NULL) {
        pd_session_t *s = in;
        in = s->relay_next;
        s->relay_next = s->relay_prev = NULL;
        if (r->index > 0 && !s->closed) {
            s->relay_next = r->owned;
            if (r->owned != NULL)
                r->owned->relay_prev = s;
            r->owned = s;
        }
        pd_session_arrive(s, r);
    }
    if (nudged && r->index > 0) {
        pd_session_t *next;
        for (pd_session_t *s = r->owned; s != NULL; s = next) {
            next = s->relay_next; /* what it was asked may take it off the list */
            pd_session_asked(s);
        }
    }
    if (stop && !uv_is_closing((uv_handle_t *)r->async))
        uv_close((uv_handle_t *)r->async, NULL);
}

static void relay_run(void *arg)
{
    pd_relay_t *r = arg;
    uv_run(r->loop, UV_RUN_DEFAULT);
}

static int relay_init(pd_relay_t *r, pd_server_t *srv, unsigned index)
{
    *r = (pd_relay_t){.index = index, .loop = srv->loop};
    if (index > 0) {
        if (uv_loop_init(&r->own_loop) != 0)
            return -1;
        r->loop = &r->own_loop;
    }
    if (uv_mutex_init(&r->lock) != 0) {
        if (index > 0)
            uv_loop_close(&r->own_loop);
        return -1;
    }
    r->async = index > 0 ? &r->own_async : &srv->relay_async;
    uv_async_init(r->loop, r->async, on_async);
    r->async->data = r;
    if (index > 0 && uv_thread_create(&r->thread, relay_run, r) != 0) {
        uv_close((uv_handle_t *)r->async, NULL);
        uv_run(r->loop, UV_RUN_DEFAULT);
        uv_loop_close(&r->own_loop);
        uv_mutex_destroy(&r->lock);
        return -1;
    }
    r->started = true;
    return 0;
}

int pd_relay_start(pd_server_t *srv)
{
    unsigned n = 1 + srv->cfg->relay_threads;
    srv->relays = calloc(n, sizeof *srv->relays);
    if (srv->relays == NULL) {
        pd_log_error(NULL, "out of memory starting the relay threads");
        return -1;
    }
    for (unsigned i = 0; i < n; i++) {
        if (relay_init(&srv->relays[i], srv, i) != 0) {
            pd_log_error(NULL,
                         "could not start relay thread %u of %u; lower limits.relay_threads "
                         "or check the process's thread limit",
                         i, n - 1);
            return -1;
        }
        srv->nrelays = i + 1;
    }
    return 0;
}

void pd_relay_stop(pd_server_t *srv)
{
    /* The threads first: once joined, nothing can wake the main loop's handle. */
    for (unsigned i = srv->nrelays; i-- > 0;) {
        pd_relay_t *r = &srv->relays[i];
        if (!r->started)
            continue;
        r->started = false;
        if (i == 0) {
            uv_close((uv_handle_t *)r->async, NULL);
        } else {
            uv_mutex_lock(&r->lock);
            r->stop = true;
            uv_mutex_unlock(&r->lock);
            uv_async_send(r->async);
            uv_thread_join(&r->thread);
            uv_loop_close(&r->own_loop);
        }
        uv_mutex_destroy(&r->lock);
    }
}

pd_relay_t *pd_relay_pick(pd_server_t *srv)
{
    pd_relay_t *best = &srv->relays[0];
    for (unsigned i = srv->nrelays; i-- > 1;)
        if (srv->relays[i].assigned <= best->assigned)
            best = &srv->relays[i];
    return best;
}

void pd_relay_post(pd_relay_t *r, pd_session_t *s)
{
    s->relay_next = NULL;
    uv_mutex_lock(&r->lock);
    if (r->inbox_tail != NULL)
        r->inbox_tail->relay_next = s;
    else
        r->inbox = s;
    r->inbox_tail = s;
    uv_mutex_unlock(&r->lock);
    uv_async_send(r->async);
}

void pd_relay_nudge(pd_relay_t *r)
{
    uv_mutex_lock(&r->lock);
    r->nudged = true;
    uv_mutex_unlock(&r->lock);
    uv_async_send(r->async);
}

void pd_relay_leave(pd_relay_t *r, pd_session_t *s)
{
    if (s->relay_prev != NULL)
        s->relay_prev->relay_next = s->relay_next;
    else if (r->owned == s)
        r->owned = s->relay_next;
    if (s->relay_next != NULL)
        s->relay_next->relay_prev = s->relay_prev;
    s->relay_prev = s->relay_next = NULL;
}
