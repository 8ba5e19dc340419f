/*
 * fuzz_be.c — libFuzzer target for the server direction: the input is a stream of
 * backend messages, walked header by header the way the relay walks it, and each whole
 * message is checked and run through every backend decoder. Round trips through the
 * encoders must reproduce the bytes exactly.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol/wire.h"

static void expect_same(pd_buf_t *b, const uint8_t *msg, size_t len)
{
    if (!pd_buf_ok(b) || b->len != len || memcmp(b->data, msg, len) != 0)
        abort();
    pd_buf_reset(b);
}

/* The messages whose encoders can say everything their decoders see. */
static void roundtrip(const uint8_t *msg, size_t len, pd_buf_t *b)
{
    const uint8_t *body = msg + PD_MSG_HEADER_LEN;
    size_t n = len - PD_MSG_HEADER_LEN;
    const char *err = NULL, *s1, *s2;
    uint32_t u1, u2;
    uint8_t status;
    if (msg[0] == 'C' && pd_be_command_complete_decode(body, n, &s1, &err) == PD_DECODE_OK) {
        pd_be_command_complete(b, s1);
        expect_same(b, msg, len);
    }
    if (msg[0] == 'S' && pd_be_param_status_decode(body, n, &s1, &s2, &err) == PD_DECODE_OK) {
        pd_be_param_status(b, s1, s2);
        expect_same(b, msg, len);
    }
    if (msg[0] == 'K' && pd_be_backend_key_decode(body, n, &u1, &u2, &err) == PD_DECODE_OK) {
        pd_be_backend_key(b, u1, u2);
        expect_same(b, msg, len);
    }
    if (msg[0] == 'Z' && pd_be_ready_decode(body, n, &status, &err) == PD_DECODE_OK) {
        pd_be_ready(b, status);
        expect_same(b, msg, len);
    }
}

/* Every decoder on every body, whatever its type: none may read out of bounds, and
 * what they point at must lie inside the body. */
static void decode_any(const uint8_t *body, size_t n)
{
    const char *err = NULL;
    const uint8_t *end = body + n;
    pd_be_error_t e;
    if (pd_be_error_decode(body, n, &e, &err) == PD_DECODE_OK && e.message != NULL &&
        ((const uint8_t *)e.message < body || (const uint8_t *)e.message >= end))
        abort();
    pd_be_auth_t a;
    if (pd_be_auth_decode(body, n, &a, &err) == PD_DECODE_OK && a.data + a.len != end)
        abort();
    pd_be_data_row_t r;
    if (pd_be_data_row_decode(body, n, &r, &err) == PD_DECODE_OK &&
        (r.columns + r.columns_len != end || r.ncolumns * 4u > r.columns_len))
        abort();
    pd_be_row_description_t d;
    if (pd_be_row_description_decode(body, n, &d, &err) == PD_DECODE_OK &&
        (d.fields + d.fields_len != end || d.nfields * 19u > d.fields_len))
        abort();
}

static void check_message(const uint8_t *msg, size_t len, pd_buf_t *b)
{
    const char *err = NULL;
    pd_decode_rc_t rc = pd_be_message_check(msg, len, &err);
    if (rc == PD_DECODE_INCOMPLETE || (rc == PD_DECODE_ERROR && err == NULL))
        abort();
    decode_any(msg + PD_MSG_HEADER_LEN, len - PD_MSG_HEADER_LEN);
    roundtrip(msg, len, b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pd_buf_t b;
    pd_buf_init(&b);
    size_t off = 0;
    while (off < size) {
        pd_msg_hdr_t hdr;
        const char *err = NULL;
        pd_decode_rc_t rc = pd_be_header(data + off, size - off, PD_MSG_MAX_LEN, &hdr, &err);
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
