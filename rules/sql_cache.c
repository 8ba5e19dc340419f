/*
 * sql_cache.c — the rewriter's bounded LRU cache: values keyed by byte strings (sql.c
 * keys results by database, statement text and the views of the database's rules, and
 * literal templates likewise), in a chained hash table threaded on a recency list. The
 * cache owns what it keeps and releases each value through the function it was put with.
 */
#include <stdlib.h>
#include <string.h>

#include "rules/sql_internal.h"

struct pd__entry {
    pd__entry_t *chain;       /* next in the bucket */
    pd__entry_t *prev, *next; /* recency list: prev is more recent */
    uint64_t hash;
    char *key;
    size_t len;
    void *value;
    pd__release_fn release;
};

bool pd__cache_init(pd__cache_t *c, size_t cap)
{
    memset(c, 0, sizeof *c);
    c->cap = cap;
    /* About one entry per bucket when full, a power of two for masking. */
    c->nbuckets = 16;
    while (c->nbuckets < cap && c->nbuckets < ((size_t)1 << 24))
        c->nbuckets <<= 1;
    c->buckets = calloc(c->nbuckets, sizeof *c->buckets);
    return c->buckets != NULL;
}

/* FNV-1a: simple and good enough for statement texts. */
uint64_t pd__cache_hash(const char *key, size_t len)
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void unlink_lru(pd__cache_t *c, pd__entry_t *e)
{
    if (e->prev != NULL)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next != NULL)
        e->next->prev = e->prev;
    else
        c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void push_front(pd__cache_t *c, pd__entry_t *e)
{
    e->prev = NULL;
    e->next = c->head;
    if (c->head != NULL)
        c->head->prev = e;
    c->head = e;
    if (c->tail == NULL)
        c->tail = e;
}

static void drop(pd__cache_t *c, pd__entry_t *e)
{
    pd__entry_t **slot = &c->buckets[e->hash & (c->nbuckets - 1)];
    while (*slot != e)
        slot = &(*slot)->chain;
    *slot = e->chain;
    unlink_lru(c, e);
    e->release(e->value);
    free(e->key);
    free(e);
    c->count--;
}

void *pd__cache_get(pd__cache_t *c, const char *key, size_t len, uint64_t hash)
{
    for (pd__entry_t *e = c->buckets[hash & (c->nbuckets - 1)]; e != NULL; e = e->chain) {
        if (e->hash != hash || e->len != len || memcmp(e->key, key, len) != 0)
            continue;
        unlink_lru(c, e);
        push_front(c, e);
        return e->value;
    }
    return NULL;
}

bool pd__cache_put(pd__cache_t *c, char *key, size_t len, uint64_t hash, void *value,
                   pd__release_fn release)
{
    pd__entry_t *e = calloc(1, sizeof *e);
    if (e == NULL) {
        free(key);
        release(value);
        return false;
    }
    e->hash = hash;
    e->key = key;
    e->len = len;
    e->value = value;
    e->release = release;
    pd__entry_t **bucket = &c->buckets[hash & (c->nbuckets - 1)];
    e->chain = *bucket;
    *bucket = e;
    push_front(c, e);
    c->count++;
    while (c->count > c->cap && c->tail != NULL) {
        drop(c, c->tail);
        c->evictions++;
    }
    return true;
}

void pd__cache_clear(pd__cache_t *c)
{
    while (c->head != NULL)
        drop(c, c->head);
}

void pd__cache_destroy(pd__cache_t *c)
{
    if (c->buckets != NULL)
        pd__cache_clear(c);
    free(c->buckets);
    c->buckets = NULL;
}
