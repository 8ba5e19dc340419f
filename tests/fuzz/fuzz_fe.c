/*
 * fuzz_fe.c — libFuzzer target for the client direction: the input is a stream of
 * frontend messages, walked header by header the way the relay walks it, and each whole
 * message is checked and run through every frontend decoder. Round trips through the
 * encoders must reproduce the bytes exactly.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol/wire.h"

/* A decoded field must be a terminated string inside the body. */
static void check_str(const char *s, const uint8_t *body, size_t n)
{
    if (s == NULL || (const uint8_t *)s < body || (const uint8_t *)s >= body + n ||
        memchr(s, '\0', (size_t)(body + n - (const uint8_t *)s)) == NULL)
        abort();
}

/* Re-encoding a decoded message must give back the original bytes. */
static void expect_same(pd_buf_t *b, const uint8_t *msg, size_t len)
{
    if (!pd_buf_ok(b) || b->len != len || memcmp(b->data, msg, len) != 0)
        abort();
    pd_buf_reset(b);
}

static void roundtrip_query_parse(const uint8_t *msg, size_t len, pd_buf_t *b)
{
    const uint8_t *body = msg + PD_MSG_HEADER_LEN;
    size_t n = len - PD_MSG_HEADER_LEN;
    const char *err = NULL;
    pd_fe_query_t q;
    if (msg[0] == 'Q' && pd_fe_query_decode(body, n, &q, &err) == PD_DECODE_OK) {
        check_str(q.sql, body, n);
        pd_fe_query(b, q.sql);
        expect_same(b, msg, len);
    }
    pd_fe_parse_t p;
    if (msg[0] == 'P' && pd_fe_parse_decode(body, n, &p, &err) == PD_DECODE_OK) {
        check_str(p.name, body, n);
        check_str(p.sql, body, n);
        uint32_t *types = malloc((size_t)p.nparams * 4 + 1);
        if (types == NULL)
            abort();
        for (uint16_t i = 0; i < p.nparams; i++) {
            const uint8_t *t = p.param_types + 4 * i;
            types[i] =
                ((uint32_t)t[0] << 24) | ((uint32_t)t[1] << 16) | ((uint32_t)t[2] << 8) | t[3];
        }
        pd_fe_parse(b, p.name, p.sql, p.nparams, types);
        free(types);
        expect_same(b, msg, len);
    }
}

static void roundtrip_execute_target(const uint8_t *msg, size_t len, pd_buf_t *b)
{
    const uint8_t *body = msg + PD_MSG_HEADER_LEN;
    size_t n = len - PD_MSG_HEADER_LEN;
    const char *err = NULL;
    pd_fe_execute_t e;
    if (msg[0] == 'E' && pd_fe_execute_decode(body, n, &e, &err) == PD_DECODE_OK) {
        pd_fe_execute(b, e.portal, e.max_rows);
        expect_same(b, msg, len);
    }
    pd_fe_target_t t;
    if ((msg[0] == 'D' || msg[0] == 'C') &&
        pd_fe_target_decode(body, n, &t, &err) == PD_DECODE_OK) {
        if (msg[0] == 'D')
            pd_fe_describe(b, t.kind, t.name);
        else
            pd_fe_close(b, t.kind, t.name);
        expect_same(b, msg, len);
    }
}

/* Every decoder on every body, whatever its type: none may read out of bounds. */
static void decode_any(const uint8_t *body, size_t n)
{
    const char *err = NULL;
    pd_fe_bind_t bind;
    if (pd_fe_bind_decode(body, n, &bind, &err) == PD_DECODE_OK &&
        (bind.params + bind.params_len > body + n || bind.nparams * 4u > bind.params_len))
        abort();
    pd_fe_sasl_initial_t sasl;
    if (pd_fe_sasl_initial_decode(body, n, &sasl, &err) == PD_DECODE_OK && sasl.len >= 0 &&
        sasl.data + sasl.len != body + n)
        abort();
}

static void check_message(const uint8_t *msg, size_t len, pd_buf_t *b)
{
    const char *err = NULL;
    pd_decode_rc_t rc = pd_fe_message_check(msg, len, &err);
    if (rc == PD_DECODE_INCOMPLETE || (rc == PD_DECODE_ERROR && err == NULL))
        abort();
    decode_any(msg + PD_MSG_HEADER_LEN, len - PD_MSG_HEADER_LEN);
    roundtrip_query_parse(msg, len, b);
    roundtrip_execute_target(msg, len, b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pd_buf_t b;
    pd_buf_init(&b);
    size_t off = 0;
    while (off < size) {
        pd_msg_hdr_t hdr;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_fe_header(data + off, size - off, PD_MSG_MAX_LEN, &hdr, &err);
        if (rc == PD_DECODE_ERROR && err == NULL)
            abort();
        if (rc != PD_DECODE_OK || (size_t)hdr.len + 1 > size - off)
            break;
        /* A copy of exactly the message's size, so that the sanitizer catches any read
         * past its end. */
        size_t len = (size_t)hdr.len + 1;
        uint8_t *msg = malloc(len);
        if (msg == NULL)
            break;
        memcpy(msg, data + off, len);
        check_message(msg, len, &b);
        free(msg);
        off += len;
    }
    pd_buf_free(&b);
    return 0;
}
