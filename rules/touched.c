/*
 * touched.c — the sets of touched.h: per (rule, table) a balanced tree of keys (libc's
 * tsearch) for "already there?" and an array of the same keys in the order they came,
 * which is what a verify takes. Everything is under one mutex.
 *
 * A key is one allocation: its values' pointers followed by the values' text.
 */
#include "rules/touched.h"

#include <pthread.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned n;
    char *v[]; /* n values (NULL: SQL NULL); the text follows in the same block */
} tkey_t;

typedef struct {
    char *rule, *table;
    pd_touched_status_t status;
    unsigned nkey; /* values per key; 0 until the first key of a fresh set */
    void *tree;    /* tsearch root over tkey_t *, the same keys as `keys` */
    tkey_t **keys; /* in the order they were added */
    size_t count, cap;
} ttable_t;

struct pd_touched {
    pthread_mutex_t lock;
    size_t max;
    void *tables; /* tsearch root over ttable_t *, by (rule, table) */
};

struct pd_touched_set {
    pd_touched_status_t status;
    unsigned nkey;
    tkey_t **keys; /* owned, with the keys */
    size_t count;
};

/* ---------------------------------------------------------------------------------------
 * Keys
 */

int pd_touched_key_cmp(unsigned n, const char *const *a, const char *const *b)
{
    for (unsigned i = 0; i < n; i++) {
        if (a[i] == NULL || b[i] == NULL) {
            if (a[i] != b[i])
                return a[i] == NULL ? -1 : 1;
            continue;
        }
        int c = strcmp(a[i], b[i]);
        if (c != 0)
            return c;
    }
    return 0;
}

static int key_cmp(const void *pa, const void *pb)
{
    const tkey_t *a = pa, *b = pb;
    if (a->n != b->n)
        return a->n < b->n ? -1 : 1;
    return pd_touched_key_cmp(a->n, (const char *const *)a->v, (const char *const *)b->v);
}

/* A copy of the values as one block; NULL when out of memory or longer than allowed
 * (*too_long then says which). */
static tkey_t *key_new(unsigned n, const char *const *values, bool *too_long)
{
    size_t bytes = 0;
    for (unsigned i = 0; i < n; i++)
        bytes += values[i] ? strlen(values[i]) + 1 : 0;
    *too_long = bytes > PD_TOUCHED_KEY_BYTES_MAX;
    if (*too_long)
        return NULL;
    tkey_t *k = malloc(sizeof *k + n * sizeof k->v[0] + bytes);
    if (k == NULL)
        return NULL;
    k->n = n;
    char *text = (char *)&k->v[n];
    for (unsigned i = 0; i < n; i++) {
        if (values[i] == NULL) {
            k->v[i] = NULL;
            continue;
        }
        size_t len = strlen(values[i]) + 1;
        k->v[i] = memcpy(text, values[i], len);
        text += len;
    }
    return k;
}

static void keys_free(tkey_t **keys, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(keys[i]);
    free(keys);
}

/* ---------------------------------------------------------------------------------------
 * Tables
 */

static int table_cmp(const void *pa, const void *pb)
{
    const ttable_t *a = pa, *b = pb;
    int c = strcmp(a->rule, b->rule);
    return c != 0 ? c : strcmp(a->table, b->table);
}

static void tree_forget(void *node)
{
    (void)node; /* the keys belong to the array */
}

/* Drops the keys and sets the status (keys, unknown or overflowed). */
static void table_reset(ttable_t *t, pd_touched_status_t status)
{
    tdestroy(t->tree, tree_forget);
    keys_free(t->keys, t->count);
    t->tree = NULL;
    t->keys = NULL;
    t->count = t->cap = 0;
    t->nkey = 0;
    t->status = status;
}

static void table_free(void *p)
{
    ttable_t *t = p;
    table_reset(t, PD_TOUCHED_UNKNOWN);
    free(t->rule);
    free(t->table);
    free(t);
}

/* The table's entry, made (unknown: nothing is known of it yet) when missing. NULL when
 * out of memory. Called with the lock held. */
static ttable_t *table_get(pd_touched_t *t, const char *rule, const char *table)
{
    ttable_t probe = {.rule = (char *)rule, .table = (char *)table};
    void *found = tfind(&probe, &t->tables, table_cmp);
    if (found != NULL)
        return *(ttable_t **)found;
    ttable_t *e = calloc(1, sizeof *e);
    if (e == NULL || (e->rule = strdup(rule)) == NULL || (e->table = strdup(table)) == NULL) {
        if (e != NULL)
            free(e->rule);
        free(e);
        return NULL;
    }
    e->status = PD_TOUCHED_UNKNOWN;
    if (tsearch(e, &t->tables, table_cmp) == NULL) {
        table_free(e);
        return NULL;
    }
    return e;
}

/* Puts a key into a known set, taking it (it is freed when not kept). Called with the
 * lock held. */
static void table_insert(pd_touched_t *t, ttable_t *e, tkey_t *k)
{
    if (e->status != PD_TOUCHED_KEYS || tfind(k, &e->tree, key_cmp) != NULL) {
        free(k); /* the table is checked in full anyway, or the key is there already */
        return;
    }
    pd_touched_status_t failed = PD_TOUCHED_KEYS;
    if (k->n == 0 || (e->count > 0 && k->n != e->nkey))
        failed = PD_TOUCHED_UNKNOWN; /* no key, or callers that disagree on it */
    else if (e->count >= t->max)
        failed = PD_TOUCHED_OVERFLOW;
    if (failed == PD_TOUCHED_KEYS && e->count == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 64;
        cap = cap < t->max ? cap : t->max;
        tkey_t **keys = realloc(e->keys, cap * sizeof *keys);
        if (keys != NULL) {
            e->keys = keys;
            e->cap = cap;
        } else {
            failed = PD_TOUCHED_UNKNOWN;
        }
    }
    if (failed == PD_TOUCHED_KEYS && tsearch(k, &e->tree, key_cmp) == NULL)
        failed = PD_TOUCHED_UNKNOWN;
    if (failed != PD_TOUCHED_KEYS) {
        free(k);
        table_reset(e, failed);
        return;
    }
    e->keys[e->count++] = k;
    e->nkey = k->n;
}

/* ---------------------------------------------------------------------------------------
 * The API
 */

pd_touched_t *pd_touched_new(size_t max_keys)
{
    pd_touched_t *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    t->max = max_keys ? max_keys : PD_TOUCHED_DEFAULT_MAX;
    return t;
}

void pd_touched_free(pd_touched_t *t)
{
    if (t == NULL)
        return;
    tdestroy(t->tables, table_free);
    pthread_mutex_destroy(&t->lock);
    free(t);
}

void pd_touched_set_max(pd_touched_t *t, size_t max_keys)
{
    pthread_mutex_lock(&t->lock);
    t->max = max_keys ? max_keys : PD_TOUCHED_DEFAULT_MAX;
    pthread_mutex_unlock(&t->lock);
}

int pd_touched_add(pd_touched_t *t, const char *rule, const char *table, unsigned nkey,
                   const char *const *key)
{
    int rc = 0;
    pthread_mutex_lock(&t->lock);
    ttable_t *e = table_get(t, rule, table);
    if (e != NULL && e->status == PD_TOUCHED_KEYS) {
        bool too_long;
        tkey_t *k = key_new(nkey, key, &too_long);
        if (k != NULL) {
            table_insert(t, e, k);
        } else {
            rc = too_long ? 0 : -1;
            table_reset(e, PD_TOUCHED_UNKNOWN);
        }
    }
    pthread_mutex_unlock(&t->lock);
    /* No entry (out of memory) leaves the table unknown, which is what it was. */
    return e == NULL ? -1 : rc;
}

void pd_touched_mark_unknown(pd_touched_t *t, const char *rule, const char *table)
{
    pthread_mutex_lock(&t->lock);
    ttable_t *e = table_get(t, rule, table);
    if (e != NULL)
        table_reset(e, PD_TOUCHED_UNKNOWN);
    pthread_mutex_unlock(&t->lock);
}

pd_touched_status_t pd_touched_peek(pd_touched_t *t, const char *rule, const char *table,
                                    size_t *count)
{
    ttable_t probe = {.rule = (char *)rule, .table = (char *)table};
    pthread_mutex_lock(&t->lock);
    void *found = tfind(&probe, &t->tables, table_cmp);
    ttable_t *e = found ? *(ttable_t **)found : NULL;
    pd_touched_status_t st = e ? e->status : PD_TOUCHED_UNKNOWN;
    if (count != NULL)
        *count = e ? e->count : 0;
    pthread_mutex_unlock(&t->lock);
    return st;
}

pd_touched_set_t *pd_touched_take(pd_touched_t *t, const char *rule, const char *table)
{
    pd_touched_set_t *set = calloc(1, sizeof *set);
    if (set == NULL)
        return NULL;
    pthread_mutex_lock(&t->lock);
    ttable_t *e = table_get(t, rule, table);
    if (e == NULL) {
        pthread_mutex_unlock(&t->lock);
        free(set);
        return NULL;
    }
    *set = (pd_touched_set_t){
        .status = e->status, .nkey = e->nkey, .keys = e->keys, .count = e->count};
    e->keys = NULL; /* now the set's */
    e->count = 0;
    table_reset(e, PD_TOUCHED_KEYS);
    pthread_mutex_unlock(&t->lock);
    return set;
}

void pd_touched_restore(pd_touched_t *t, const char *rule, const char *table, pd_touched_set_t *set)
{
    if (set == NULL)
        return;
    pthread_mutex_lock(&t->lock);
    ttable_t *e = table_get(t, rule, table);
    if (e == NULL) {
        /* Out of memory: no entry is an unknown table, which is as safe as it gets. */
    } else if (set->status != PD_TOUCHED_KEYS) {
        if (e->status != PD_TOUCHED_UNKNOWN)
            table_reset(e, set->status);
    } else {
        for (size_t i = 0; i < set->count; i++) {
            table_insert(t, e, set->keys[i]);
            set->keys[i] = NULL; /* kept or freed by table_insert */
        }
    }
    pthread_mutex_unlock(&t->lock);
    pd_touched_set_free(set);
}

pd_touched_status_t pd_touched_set_status(const pd_touched_set_t *set)
{
    return set->status;
}

size_t pd_touched_set_count(const pd_touched_set_t *set)
{
    return set->count;
}

unsigned pd_touched_set_nkey(const pd_touched_set_t *set)
{
    return set->nkey;
}

const char *const *pd_touched_set_key(const pd_touched_set_t *set, size_t i)
{
    return i < set->count ? (const char *const *)set->keys[i]->v : NULL;
}

void pd_touched_set_free(pd_touched_set_t *set)
{
    if (set == NULL)
        return;
    keys_free(set->keys, set->count);
    free(set);
}

const char *pd_touched_status_name(pd_touched_status_t status)
{
    static const char *const names[] = {[PD_TOUCHED_KEYS] = "keys",
                                        [PD_TOUCHED_UNKNOWN] = "unknown",
                                        [PD_TOUCHED_OVERFLOW] = "overflowed"};
    return status <= PD_TOUCHED_OVERFLOW ? names[status] : "?";
}
