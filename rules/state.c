/*
 * state.c — the runtime state document and its atomic persistence.
 */
#include "rules/state.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define STATE_FORMAT 1

struct pd_state {
    pthread_mutex_t lock;
    char *path;  /* NULL: memory only */
    json_t *doc; /* {format, flags: {rule: {...}}, history: [...], checkpoints, verify} */
};

__attribute__((format(printf, 1, 2))) static char *xasprintf(const char *fmt, ...);

static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *out = NULL;
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    return n < 0 ? NULL : out;
}

static json_t *empty_doc(void)
{
    return json_pack("{s:i, s:{}, s:[], s:{}, s:{}}", "format", STATE_FORMAT, "flags", "history",
                     "checkpoints", "verify");
}

/* Makes sure every section exists with the right type (older or hand-edited files). */
static bool doc_valid(json_t *doc)
{
    static const char *const objects[] = {"flags", "checkpoints", "verify"};
    if (!json_is_object(doc))
        return false;
    for (size_t i = 0; i < 3; i++) {
        json_t *v = json_object_get(doc, objects[i]);
        if (v == NULL)
            json_object_set_new(doc, objects[i], json_object());
        else if (!json_is_object(v))
            return false;
    }
    json_t *h = json_object_get(doc, "history");
    if (h == NULL)
        json_object_set_new(doc, "history", json_array());
    else if (!json_is_array(h))
        return false;
    return true;
}

pd_state_t *pd_state_open(const char *path, char **err)
{
    *err = NULL;
    pd_state_t *st = calloc(1, sizeof *st);
    if (st == NULL)
        return NULL;
    pthread_mutex_init(&st->lock, NULL);
    if (path != NULL && (st->path = strdup(path)) == NULL) {
        pd_state_free(st);
        return NULL;
    }
    if (path != NULL && access(path, F_OK) == 0) {
        json_error_t jerr;
        st->doc = json_load_file(path, 0, &jerr);
        if (st->doc == NULL) {
            *err = xasprintf("could not read state file \"%s\": %s", path, jerr.text);
        } else if (!doc_valid(st->doc)) {
            *err = xasprintf("state file \"%s\" is not a pgdual state file (expected a "
                             "JSON object with flags, history, checkpoints)",
                             path);
        }
        if (*err != NULL) {
            pd_state_free(st);
            return NULL;
        }
    } else {
        st->doc = empty_doc();
    }
    return st;
}

void pd_state_free(pd_state_t *st)
{
    if (st == NULL)
        return;
    json_decref(st->doc);
    free(st->path);
    pthread_mutex_destroy(&st->lock);
    free(st);
}

/*
 * Writes the document to a temporary file beside the state file, syncs it and renames it
 * over the state file, then syncs the directory: a crash leaves the old or the new
 * document, never a torn one. Called with the lock held.
 */
static int persist(pd_state_t *st, char **err)
{
    if (st->path == NULL)
        return 0;
    char *tmp = xasprintf("%s%s", st->path, ".tmp");
    char *dircopy = strdup(st->path);
    int rc = -1;
    if (tmp == NULL || dircopy == NULL)
        goto out;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        *err = xasprintf("could not write state file \"%s\": %s", tmp, strerror(errno));
        goto out;
    }
    int dumped = json_dumpfd(st->doc, fd, JSON_INDENT(2) | JSON_SORT_KEYS);
    int synced = dumped == 0 ? fsync(fd) : -1;
    int saved = errno;
    close(fd);
    if (dumped != 0 || synced != 0 || rename(tmp, st->path) != 0) {
        *err = xasprintf("could not write state file \"%s\": %s", st->path,
                         strerror(dumped != 0   ? EIO
                                  : synced != 0 ? saved
                                                : errno));
        unlink(tmp);
        goto out;
    }
    int dfd = open(dirname(dircopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    rc = 0;
out:
    free(tmp);
    free(dircopy);
    return rc;
}

bool pd_state_flags(pd_state_t *st, const char *rule, pd_writes_t *writes, pd_reads_t *reads)
{
    pthread_mutex_lock(&st->lock);
    json_t *f = json_object_get(json_object_get(st->doc, "flags"), rule);
    const char *w = json_string_value(json_object_get(f, "writes"));
    const char *r = json_string_value(json_object_get(f, "reads"));
    bool ok = w != NULL && r != NULL && pd_writes_parse(w, writes) && pd_reads_parse(r, reads);
    pthread_mutex_unlock(&st->lock);
    return ok;
}

static void now_text(char *buf, size_t size)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

int pd_state_set_flags(pd_state_t *st, const char *rule, pd_writes_t writes,
                       const pd_reads_t *reads, const char *who, char **err)
{
    *err = NULL;
    char when[32], rtext[32];
    now_text(when, sizeof when);
    pd_reads_format(reads, rtext, sizeof rtext);
    json_t *entry = json_pack("{s:s, s:s, s:s, s:s}", "writes", pd_writes_name(writes), "reads",
                              rtext, "changed_at", when, "changed_by", who ? who : "unknown");
    json_t *event = json_pack("{s:s, s:s, s:s, s:s, s:s}", "time", when, "rule", rule, "writes",
                              pd_writes_name(writes), "reads", rtext, "by", who ? who : "unknown");
    if (entry == NULL || event == NULL) {
        json_decref(entry);
        json_decref(event);
        return -1;
    }
    pthread_mutex_lock(&st->lock);
    json_t *flags = json_object_get(st->doc, "flags");
    json_t *history = json_object_get(st->doc, "history");
    json_t *previous = json_incref(json_object_get(flags, rule));
    json_object_set_new(flags, rule, entry);
    json_array_append_new(history, event);
    int rc = persist(st, err);
    if (rc != 0) {
        /* Undo, so that what runs is what a restart would find. */
        if (previous != NULL)
            json_object_set(flags, rule, previous);
        else
            json_object_del(flags, rule);
        json_array_remove(history, json_array_size(history) - 1);
    } else {
        while (json_array_size(history) > PD_STATE_HISTORY_MAX)
            json_array_remove(history, 0);
    }
    json_decref(previous);
    pthread_mutex_unlock(&st->lock);
    return rc;
}

void pd_state_prune(pd_state_t *st, const char *const *keep, unsigned n)
{
    pthread_mutex_lock(&st->lock);
    json_t *flags = json_object_get(st->doc, "flags");
    const char *key;
    json_t *value;
    void *tmp;
    bool changed = false;
    json_object_foreach_safe(flags, tmp, key, value)
    {
        bool kept = false;
        for (unsigned i = 0; i < n && !kept; i++)
            kept = strcmp(keep[i], key) == 0;
        if (!kept) {
            json_object_del(flags, key);
            changed = true;
        }
    }
    char *err = NULL;
    if (changed && persist(st, &err) != 0)
        free(err); /* kept in memory; the next change retries the write */
    pthread_mutex_unlock(&st->lock);
}

static int set_in(pd_state_t *st, const char *section, const char *key, json_t *value, char **err)
{
    *err = NULL;
    pthread_mutex_lock(&st->lock);
    json_t *obj = json_object_get(st->doc, section);
    json_t *previous = json_incref(json_object_get(obj, key));
    if (value != NULL)
        json_object_set(obj, key, value);
    else
        json_object_del(obj, key);
    int rc = persist(st, err);
    if (rc != 0) {
        if (previous != NULL)
            json_object_set(obj, key, previous);
        else
            json_object_del(obj, key);
    }
    json_decref(previous);
    pthread_mutex_unlock(&st->lock);
    return rc;
}

static json_t *get_in(pd_state_t *st, const char *section, const char *key)
{
    pthread_mutex_lock(&st->lock);
    /* A deep copy: the caller may read it while another thread changes the document. */
    json_t *v = json_deep_copy(json_object_get(json_object_get(st->doc, section), key));
    pthread_mutex_unlock(&st->lock);
    return v;
}

int pd_state_set_checkpoint(pd_state_t *st, const char *key, json_t *value, char **err)
{
    return set_in(st, "checkpoints", key, value, err);
}

json_t *pd_state_checkpoint(pd_state_t *st, const char *key)
{
    return get_in(st, "checkpoints", key);
}

int pd_state_record_verify(pd_state_t *st, const char *rule, json_t *result, char **err)
{
    return set_in(st, "verify", rule, result, err);
}

json_t *pd_state_verify(pd_state_t *st, const char *rule)
{
    return get_in(st, "verify", rule);
}

int pd_state_record_event(pd_state_t *st, const char *event, const char *who, json_t *fields,
                          char **err)
{
    *err = NULL;
    char when[32];
    now_text(when, sizeof when);
    json_t *entry =
        json_pack("{s:s, s:s, s:s}", "time", when, "event", event, "by", who ? who : "unknown");
    if (entry == NULL || (fields != NULL && json_object_update(entry, fields) != 0)) {
        json_decref(entry);
        json_decref(fields);
        return -1;
    }
    json_decref(fields);
    pthread_mutex_lock(&st->lock);
    json_t *history = json_object_get(st->doc, "history");
    json_array_append_new(history, entry);
    while (json_array_size(history) > PD_STATE_HISTORY_MAX)
        json_array_remove(history, 0);
    int rc = persist(st, err);
    pthread_mutex_unlock(&st->lock);
    return rc;
}

json_t *pd_state_history(pd_state_t *st)
{
    pthread_mutex_lock(&st->lock);
    json_t *h = json_deep_copy(json_object_get(st->doc, "history"));
    pthread_mutex_unlock(&st->lock);
    return h;
}
