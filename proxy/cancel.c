/*
 * cancel.c — one uv_work_t per cancel request, owning its own PGcancel copy.
 */
#include "proxy/cancel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxy/log.h"

typedef struct {
    uv_work_t work;
    PGcancel *cancel;
    char tag[128];
    char err[256];
    int ok;
    void (*done)(void *arg);
    void *arg;
} cancel_job_t;

static void cancel_work(uv_work_t *w)
{
    cancel_job_t *job = w->data;
    job->ok = PQcancel(job->cancel, job->err, sizeof job->err);
}

static void cancel_done(uv_work_t *w, int status)
{
    cancel_job_t *job = w->data;
    if (status != 0)
        pd_log_warning(job->tag, "cancel request was not sent: %s", uv_strerror(status));
    else if (!job->ok)
        pd_log_warning(job->tag, "cancel request failed: %s", job->err);
    else
        pd_log_info(job->tag, "cancel request forwarded to the server");
    PQfreeCancel(job->cancel);
    if (job->done != NULL)
        job->done(job->arg);
    free(job);
}

int pd_cancel_dispatch(uv_loop_t *loop, PGconn *conn, const char *tag)
{
    return pd_cancel_dispatch_then(loop, conn, tag, NULL, NULL);
}

int pd_cancel_dispatch_then(uv_loop_t *loop, PGconn *conn, const char *tag, void (*done)(void *arg),
                            void *arg)
{
    cancel_job_t *job = calloc(1, sizeof *job);
    if (job == NULL)
        return -1;
    job->cancel = PQgetCancel(conn);
    if (job->cancel == NULL) {
        free(job);
        return -1;
    }
    snprintf(job->tag, sizeof job->tag, "%s", tag ? tag : "");
    job->done = done;
    job->arg = arg;
    job->work.data = job;
    if (uv_queue_work(loop, &job->work, cancel_work, cancel_done) != 0) {
        PQfreeCancel(job->cancel);
        free(job);
        return -1;
    }
    return 0;
}
