/*
 * buf.c — the growable output buffer that encoders append to (pd_buf_*) and the
 * bounds-checked reader that decoders walk message bodies with (pd_read_*).
 *
 * Both are deliberately forgiving of their callers: a failed allocation or an underflow
 * is remembered in a flag and later calls become no-ops, so that an encoder or decoder can
 * be written as a straight sequence of puts/gets with a single check at the end.
 */
#include "protocol/wire.h"

#include <stdlib.h>
#include <string.h>

#define PD_BUF_MIN_CAP 256u

void pd_buf_init(pd_buf_t *b)
{
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->failed = false;
}

void pd_buf_free(pd_buf_t *b)
{
    free(b->data);
    pd_buf_init(b);
}

void pd_buf_reset(pd_buf_t *b)
{
    b->len = 0;
    b->failed = false;
}

bool pd_buf_ok(const pd_buf_t *b)
{
    return !b->failed;
}

/* Makes room for n more bytes, doubling so that appending a message is amortised O(1). */
static bool buf_reserve(pd_buf_t *b, size_t n)
{
    if (b->failed)
        return false;
    if (n > SIZE_MAX / 2 - b->len) {
        b->failed = true;
        return false;
    }
    size_t need = b->len + n;
    if (need <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : PD_BUF_MIN_CAP;
    while (cap < need)
        cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (p == NULL) {
        b->failed = true;
        return false;
    }
    b->data = p;
    b->cap = cap;
    return true;
}

void pd_buf_put(pd_buf_t *b, const void *p, size_t n)
{
    if (n == 0 || !buf_reserve(b, n))
        return;
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void pd_buf_put_u8(pd_buf_t *b, uint8_t v)
{
    pd_buf_put(b, &v, 1);
}

void pd_buf_put_u16(pd_buf_t *b, uint16_t v)
{
    uint8_t be[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    pd_buf_put(b, be, sizeof be);
}

void pd_buf_put_u32(pd_buf_t *b, uint32_t v)
{
    uint8_t be[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    pd_buf_put(b, be, sizeof be);
}

void pd_buf_put_str(pd_buf_t *b, const char *s)
{
    pd_buf_put(b, s, strlen(s) + 1);
}

size_t pd_buf_begin_msg(pd_buf_t *b, uint8_t type)
{
    if (type != 0)
        pd_buf_put_u8(b, type);
    size_t start = b->len;
    pd_buf_put_u32(b, 0); /* placeholder, filled in by pd_buf_end_msg */
    return start;
}

void pd_buf_end_msg(pd_buf_t *b, size_t start)
{
    if (b->failed || start > b->len || b->len - start < 4)
        return;
    size_t len = b->len - start;
    /* A message no peer would accept is an encoding failure, not something to truncate. */
    if (len > PD_MSG_MAX_LEN) {
        b->failed = true;
        return;
    }
    b->data[start] = (uint8_t)(len >> 24);
    b->data[start + 1] = (uint8_t)(len >> 16);
    b->data[start + 2] = (uint8_t)(len >> 8);
    b->data[start + 3] = (uint8_t)len;
}

void pd_reader_init(pd_reader_t *r, const uint8_t *body, size_t n)
{
    r->p = body;
    r->n = n;
    r->err = false;
}

/* Claims len bytes from the reader, or marks it failed; the single bounds check. */
static const uint8_t *reader_take(pd_reader_t *r, size_t len)
{
    if (r->err || len > r->n) {
        r->err = true;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += len;
    r->n -= len;
    return p;
}

uint8_t pd_read_u8(pd_reader_t *r)
{
    const uint8_t *p = reader_take(r, 1);
    return p ? p[0] : 0;
}

uint16_t pd_read_u16(pd_reader_t *r)
{
    const uint8_t *p = reader_take(r, 2);
    return p ? (uint16_t)((p[0] << 8) | p[1]) : 0;
}

uint32_t pd_read_u32(pd_reader_t *r)
{
    const uint8_t *p = reader_take(r, 4);
    if (p == NULL)
        return 0;
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

int32_t pd_read_i32(pd_reader_t *r)
{
    /* Conversion of an out-of-range value is implementation-defined in C11; gcc and clang
     * define it as two's complement, which is what the wire format means. */
    return (int32_t)pd_read_u32(r);
}

const char *pd_read_str(pd_reader_t *r)
{
    if (r->err || r->n == 0) {
        r->err = true;
        return NULL;
    }
    const uint8_t *nul = memchr(r->p, '\0', r->n);
    if (nul == NULL) {
        r->err = true;
        return NULL;
    }
    return (const char *)reader_take(r, (size_t)(nul - r->p) + 1);
}

const uint8_t *pd_read_bytes(pd_reader_t *r, size_t len)
{
    return reader_take(r, len);
}

bool pd_reader_done(const pd_reader_t *r)
{
    return !r->err && r->n == 0;
}
