/*
 * compare.c — result summaries (SHA-256 per row, folded to 64 bits) and the divergence
 * log writer.
 */
#include "proxy/compare.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "proxy/log.h"
#include "rules/sql.h"

bool pd_result_sum_init(pd_result_sum_t *r, bool ordered)
{
    *r = (pd_result_sum_t){.ordered = ordered};
    r->row = EVP_MD_CTX_new();
    return r->row != NULL;
}

void pd_result_sum_free(pd_result_sum_t *r)
{
    EVP_MD_CTX_free(r->row);
    r->row = NULL;
}

void pd_result_row_begin(pd_result_sum_t *r)
{
    r->in_row = EVP_DigestInit_ex(r->row, EVP_sha256(), NULL) == 1;
}

void pd_result_row_feed(pd_result_sum_t *r, const void *p, size_t n)
{
    if (r->in_row && n > 0)
        EVP_DigestUpdate(r->row, p, n);
}

void pd_result_row_end(pd_result_sum_t *r)
{
    if (!r->in_row)
        return;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    EVP_DigestFinal_ex(r->row, md, &len);
    uint64_t h;
    memcpy(&h, md, sizeof h);
    /* A multiset hash must not depend on order: a sum does not; a chain does. */
    r->hash = r->ordered ? (r->hash * 0x100000001b3ull) ^ h : r->hash + h;
    r->rows++;
    r->in_row = false;
}

void pd_result_tag(pd_result_sum_t *r, const char *tag)
{
    snprintf(r->tag, sizeof r->tag, "%s", tag);
}

void pd_result_error(pd_result_sum_t *r, const char *sqlstate)
{
    snprintf(r->sqlstate, sizeof r->sqlstate, "%s", sqlstate ? sqlstate : "XX000");
}

bool pd_result_equal(const pd_result_sum_t *a, const pd_result_sum_t *b)
{
    return a->rows == b->rows && a->hash == b->hash && strcmp(a->tag, b->tag) == 0 &&
           strcmp(a->sqlstate, b->sqlstate) == 0;
}

struct pd_divergence_log {
    int fd; /* -1: count only */
    char *path;
};

pd_divergence_log_t *pd_divergence_open(const char *path, char **err)
{
    *err = NULL;
    pd_divergence_log_t *log = calloc(1, sizeof *log);
    if (log == NULL)
        return NULL;
    log->fd = -1;
    if (path == NULL)
        return log;
    log->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (log->fd < 0 || (log->path = strdup(path)) == NULL) {
        if (asprintf(err, "could not open divergence log \"%s\": %s", path, strerror(errno)) < 0)
            *err = NULL;
        if (log->fd >= 0)
            close(log->fd);
        free(log);
        return NULL;
    }
    return log;
}

void pd_divergence_close(pd_divergence_log_t *log)
{
    if (log == NULL)
        return;
    if (log->fd >= 0)
        close(log->fd);
    free(log->path);
    free(log);
}

static json_t *outcome_json(const pd_result_sum_t *r)
{
    char hash[17];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)r->hash);
    return json_pack("{s:I, s:s, s:s, s:s?}", "rows", (json_int_t)r->rows, "hash", hash, "tag",
                     r->tag, "sqlstate", r->sqlstate[0] ? r->sqlstate : NULL);
}

void pd_divergence_record(pd_divergence_log_t *log, const char *rule, const char *kind,
                          const char *sql, const pd_result_sum_t *old_side,
                          const pd_result_sum_t *new_side, json_t *key)
{
    if (log == NULL || log->fd < 0) {
        json_decref(key);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[40];
    size_t n = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + n, sizeof when - n, ".%03ldZ", ts.tv_nsec / 1000000);

    char *normalized = pd_sql_normalize(sql);
    json_t *ev = json_pack("{s:s, s:s, s:s, s:s?, s:o, s:o, s:o}", "time", when, "rule", rule,
                           "kind", kind, "statement", normalized, "old", outcome_json(old_side),
                           "new", outcome_json(new_side), "key", key ? key : json_null());
    free(normalized);
    char *line = ev ? json_dumps(ev, JSON_COMPACT) : NULL;
    json_decref(ev);
    if (line == NULL)
        return;
    size_t len = strlen(line);
    line[len] = '\n'; /* json_dumps leaves room: the NUL becomes the newline */
    /* One write per event with O_APPEND keeps lines whole even with several writers. */
    if (write(log->fd, line, len + 1) != (ssize_t)(len + 1))
        pd_log_warning(NULL, "could not write to the divergence log \"%s\": %s", log->path,
                       strerror(errno));
    free(line);
}

bool pd_divergence_scan(const char *path, long window, pd_divergence_fn fn, void *ctx)
{
    FILE *f = path ? fopen(path, "r") : NULL;
    if (f == NULL)
        return false;
    bool cut = false;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        cut = size > window;
        if (cut)
            fseek(f, size - window, SEEK_SET);
        else
            rewind(f);
        bool partial = cut; /* the first line read may be cut: skip it */
        char *line = NULL;
        size_t cap = 0;
        while (getline(&line, &cap, f) > 0) {
            if (partial) {
                partial = false;
                continue;
            }
            json_t *ev = json_loads(line, 0, NULL);
            if (json_is_object(ev))
                fn(ev, ctx);
            json_decref(ev);
        }
        free(line);
    }
    fclose(f);
    return cut;
}
