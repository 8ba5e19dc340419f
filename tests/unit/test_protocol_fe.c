/*
 * test_protocol_fe.c — frontend messages: every encoder's output is checked byte for byte
 * or decoded back, every type passes pd_fe_message_check when well formed, and malformed
 * bodies (truncated, extended, bad counts) are refused.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "protocol/wire.h"

/* ---- helpers --------------------------------------------------------------------------- */

/* Builds a message from a type and a body; the caller frees. */
static uint8_t *make_msg(uint8_t type, const void *body, size_t n)
{
    uint8_t *m = malloc(n + 5);
    assert_non_null(m);
    m[0] = type;
    uint32_t len = (uint32_t)n + 4;
    m[1] = (uint8_t)(len >> 24);
    m[2] = (uint8_t)(len >> 16);
    m[3] = (uint8_t)(len >> 8);
    m[4] = (uint8_t)len;
    if (n > 0)
        memcpy(m + 5, body, n);
    return m;
}

static pd_decode_rc_t check_body(uint8_t type, const void *body, size_t n, const char **err)
{
    uint8_t *m = make_msg(type, body, n);
    pd_decode_rc_t rc = pd_fe_message_check(m, n + 5, err);
    free(m);
    return rc;
}

/* The buffer holds exactly one message of the given type: its header agrees with the
 * buffer and the whole passes the check. */
static void assert_one_message(const pd_buf_t *b, uint8_t type)
{
    pd_msg_hdr_t hdr;
    const char *err = NULL;
    assert_true(pd_buf_ok(b));
    assert_int_equal(pd_fe_header(b->data, b->len, PD_MSG_MAX_LEN, &hdr, &err), PD_DECODE_OK);
    assert_int_equal(hdr.type, type);
    assert_int_equal(hdr.len + 1, b->len);
    assert_int_equal(pd_fe_message_check(b->data, b->len, &err), PD_DECODE_OK);
}

/*
 * For types whose every byte is structure: no proper prefix of the body and no body
 * with one more byte is accepted.
 */
static void assert_exact_body(const pd_buf_t *b)
{
    const uint8_t *body = b->data + 5;
    size_t n = b->len - 5;
    const char *err = NULL;
    for (size_t k = 0; k < n; k++) {
        err = NULL;
        assert_int_equal(check_body(b->data[0], body, k, &err), PD_DECODE_ERROR);
        assert_non_null(err);
    }
    uint8_t *longer = malloc(n + 1);
    assert_non_null(longer);
    memcpy(longer, body, n);
    longer[n] = 'x';
    assert_int_equal(check_body(b->data[0], longer, n + 1, &err), PD_DECODE_ERROR);
    free(longer);
}

static const uint8_t *body_of(const pd_buf_t *b)
{
    return b->data + 5;
}

static size_t body_len(const pd_buf_t *b)
{
    return b->len - 5;
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_query(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_query(&b, "SELECT 1");
    static const uint8_t want[] = {'Q', 0, 0, 0, 13, 'S', 'E', 'L', 'E', 'C', 'T', ' ', '1', 0};
    assert_int_equal(b.len, sizeof want);
    assert_memory_equal(b.data, want, sizeof want);
    assert_one_message(&b, 'Q');
    pd_fe_query_t q;
    const char *err = NULL;
    assert_int_equal(pd_fe_query_decode(body_of(&b), body_len(&b), &q, &err), PD_DECODE_OK);
    assert_string_equal(q.sql, "SELECT 1");
    assert_ptr_equal(q.sql, (const char *)body_of(&b)); /* in place, not copied */
    assert_exact_body(&b);
    /* An embedded NUL ends the string early: the rest is garbage. */
    assert_int_equal(pd_fe_query_decode((const uint8_t *)"a\0b\0", 4, &q, &err), PD_DECODE_ERROR);
    pd_buf_free(&b);
}

static void test_parse(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    static const uint32_t types[] = {23, 25, 0};
    pd_fe_parse(&b, "s1", "SELECT $1, $2, $3", 3, types);
    assert_one_message(&b, 'P');
    pd_fe_parse_t p;
    const char *err = NULL;
    assert_int_equal(pd_fe_parse_decode(body_of(&b), body_len(&b), &p, &err), PD_DECODE_OK);
    assert_string_equal(p.name, "s1");
    assert_string_equal(p.sql, "SELECT $1, $2, $3");
    assert_int_equal(p.nparams, 3);
    assert_int_equal(be32(p.param_types), 23);
    assert_int_equal(be32(p.param_types + 4), 25);
    assert_int_equal(be32(p.param_types + 8), 0);
    assert_exact_body(&b);

    /* No types given: unnamed statement, every type left to the server. */
    pd_buf_reset(&b);
    pd_fe_parse(&b, "", "SELECT $1", 1, NULL);
    assert_one_message(&b, 'P');
    assert_int_equal(pd_fe_parse_decode(body_of(&b), body_len(&b), &p, &err), PD_DECODE_OK);
    assert_string_equal(p.name, "");
    assert_int_equal(p.nparams, 1);
    assert_int_equal(be32(p.param_types), 0);
    pd_buf_free(&b);
}

static void test_bind(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *values[] = {"42", NULL, "\x00\x01\x02"};
    static const int32_t lengths[] = {2, -1, 3};
    static const int16_t formats[] = {0, 0, 1};
    static const int16_t rformats[] = {1};
    pd_fe_bind(&b, "p1", "s1", 3, values, lengths, formats, 1, rformats);
    assert_one_message(&b, 'B');
    pd_fe_bind_t d;
    const char *err = NULL;
    assert_int_equal(pd_fe_bind_decode(body_of(&b), body_len(&b), &d, &err), PD_DECODE_OK);
    assert_string_equal(d.portal, "p1");
    assert_string_equal(d.statement, "s1");
    assert_int_equal(d.nformats, 3);
    assert_int_equal(d.formats[5], 1);
    assert_int_equal(d.nparams, 3);
    static const uint8_t params[] = {0,    0, 0, 2, '4', '2', 0xff, 0xff, 0xff,
                                     0xff, 0, 0, 0, 3,   0,   1,    2};
    assert_int_equal(d.params_len, sizeof params);
    assert_memory_equal(d.params, params, sizeof params);
    assert_int_equal(d.nresult_formats, 1);
    assert_int_equal(d.result_formats[1], 1);
    assert_exact_body(&b);

    /* Without lengths and formats: text values, NULL pointers as SQL NULL, no formats. */
    pd_buf_reset(&b);
    const char *text[] = {"a", NULL};
    pd_fe_bind(&b, "", "", 2, text, NULL, NULL, 0, NULL);
    assert_one_message(&b, 'B');
    assert_int_equal(pd_fe_bind_decode(body_of(&b), body_len(&b), &d, &err), PD_DECODE_OK);
    assert_int_equal(d.nformats, 0);
    assert_int_equal(d.nparams, 2);
    assert_int_equal(d.params_len, 4 + 1 + 4);
    assert_int_equal(d.nresult_formats, 0);
    pd_buf_free(&b);
}

static void test_bind_malformed(void **state)
{
    (void)state;
    const char *err = NULL;
    pd_fe_bind_t d;
    /* Two format codes for three parameters: PostgreSQL's protocol violation. */
    static const uint8_t counts[] = {0,    0,    0,    2,    0,    0,    0,    0,
                                     0,    3,    0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                     0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,    0};
    assert_int_equal(pd_fe_bind_decode(counts, sizeof counts, &d, &err), PD_DECODE_ERROR);
    assert_non_null(strstr(err, "format count"));
    /* One format code applies to all parameters. */
    static const uint8_t one[] = {0,    0,    0,    1,    0,    1,    0,    3,    0xff, 0xff, 0xff,
                                  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,    0};
    assert_int_equal(pd_fe_bind_decode(one, sizeof one, &d, &err), PD_DECODE_OK);
    /* A parameter length of -2. */
    static const uint8_t neg[] = {0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe, 0, 0};
    assert_int_equal(pd_fe_bind_decode(neg, sizeof neg, &d, &err), PD_DECODE_ERROR);
    /* A parameter claiming more bytes than the message has. */
    static const uint8_t over[] = {0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 'a', 0, 0};
    assert_int_equal(pd_fe_bind_decode(over, sizeof over, &d, &err), PD_DECODE_ERROR);
    /* A huge length must not wrap around the bounds check. */
    static const uint8_t huge[] = {0, 0, 0, 0, 0, 1, 0x7f, 0xff, 0xff, 0xff, 0, 0};
    assert_int_equal(pd_fe_bind_decode(huge, sizeof huge, &d, &err), PD_DECODE_ERROR);
}

static void test_describe_close(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_target_t t;
    const char *err = NULL;
    pd_fe_describe(&b, 'S', "stmt");
    assert_one_message(&b, 'D');
    assert_int_equal(pd_fe_target_decode(body_of(&b), body_len(&b), &t, &err), PD_DECODE_OK);
    assert_int_equal(t.kind, 'S');
    assert_string_equal(t.name, "stmt");
    assert_exact_body(&b);
    pd_buf_reset(&b);
    pd_fe_close(&b, 'P', "");
    assert_one_message(&b, 'C');
    assert_int_equal(pd_fe_target_decode(body_of(&b), body_len(&b), &t, &err), PD_DECODE_OK);
    assert_int_equal(t.kind, 'P');
    assert_string_equal(t.name, "");
    assert_exact_body(&b);
    pd_buf_reset(&b);
    pd_fe_describe(&b, 'X', "s");
    assert_int_equal(pd_fe_message_check(b.data, b.len, &err), PD_DECODE_ERROR);
    assert_int_equal(pd_fe_target_decode(body_of(&b), body_len(&b), &t, &err), PD_DECODE_ERROR);
    pd_buf_free(&b);
}

static void test_execute(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_execute(&b, "portal", 100);
    assert_one_message(&b, 'E');
    pd_fe_execute_t e;
    const char *err = NULL;
    assert_int_equal(pd_fe_execute_decode(body_of(&b), body_len(&b), &e, &err), PD_DECODE_OK);
    assert_string_equal(e.portal, "portal");
    assert_int_equal(e.max_rows, 100);
    assert_exact_body(&b);
    pd_buf_free(&b);
}

/* Sync, Flush, Terminate and CopyDone have no body, and none is allowed. */
static void test_empty_messages(void **state)
{
    (void)state;
    static void (*const enc[])(pd_buf_t *) = {pd_fe_sync, pd_fe_flush, pd_fe_terminate,
                                              pd_fe_copy_done};
    static const uint8_t types[] = {'S', 'H', 'X', 'c'};
    for (size_t i = 0; i < 4; i++) {
        pd_buf_t b;
        pd_buf_init(&b);
        enc[i](&b);
        assert_int_equal(b.len, 5);
        assert_one_message(&b, types[i]);
        assert_int_equal(be32(b.data + 1), 4);
        assert_exact_body(&b);
        pd_buf_free(&b);
    }
}

static void test_copy(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *err = NULL;
    pd_fe_copy_data(&b, "1\tx\n\0z", 6);
    assert_one_message(&b, 'd');
    assert_int_equal(body_len(&b), 6);
    assert_memory_equal(body_of(&b), "1\tx\n\0z", 6);
    /* CopyData is opaque: any body, even none, is well formed. */
    assert_int_equal(check_body('d', "", 0, &err), PD_DECODE_OK);
    pd_buf_reset(&b);
    pd_fe_copy_fail(&b, "client gave up");
    assert_one_message(&b, 'f');
    assert_string_equal((const char *)body_of(&b), "client gave up");
    assert_exact_body(&b);
    pd_buf_free(&b);
}

static void test_sasl(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_sasl_initial_t s;
    const char *err = NULL;
    const char *first = "n,,n=,r=abc";
    pd_fe_sasl_initial(&b, "SCRAM-SHA-256", first, strlen(first));
    assert_one_message(&b, 'p');
    assert_int_equal(pd_fe_sasl_initial_decode(body_of(&b), body_len(&b), &s, &err), PD_DECODE_OK);
    assert_string_equal(s.mechanism, "SCRAM-SHA-256");
    assert_int_equal(s.len, (int32_t)strlen(first));
    assert_memory_equal(s.data, first, strlen(first));
    /* Truncations of an SASLInitialResponse body are all malformed for its decoder. */
    for (size_t k = 0; k < body_len(&b); k++)
        assert_int_equal(pd_fe_sasl_initial_decode(body_of(&b), k, &s, &err), PD_DECODE_ERROR);

    pd_buf_reset(&b);
    pd_fe_sasl_initial(&b, "SCRAM-SHA-256", NULL, 0);
    assert_int_equal(pd_fe_sasl_initial_decode(body_of(&b), body_len(&b), &s, &err), PD_DECODE_OK);
    assert_int_equal(s.len, -1);
    assert_null(s.data);

    pd_buf_reset(&b);
    pd_fe_sasl_response(&b, "c=biws", 6);
    assert_one_message(&b, 'p');
    assert_int_equal(body_len(&b), 6);
    assert_memory_equal(body_of(&b), "c=biws", 6);

    static const uint8_t neg[] = {'M', 0, 0xff, 0xff, 0xff, 0xfe};
    assert_int_equal(pd_fe_sasl_initial_decode(neg, sizeof neg, &s, &err), PD_DECODE_ERROR);
    pd_buf_free(&b);
}

static void test_function_call(void **state)
{
    (void)state;
    const char *err = NULL;
    /* oid 1234, one format (binary), two args (4 bytes, NULL), result format text. */
    static const uint8_t ok[] = {0, 0, 4, 0xd2, 0, 1, 0,    1,    0,    2,    0, 0,
                                 0, 4, 1, 2,    3, 4, 0xff, 0xff, 0xff, 0xff, 0, 0};
    assert_int_equal(check_body('F', ok, sizeof ok, &err), PD_DECODE_OK);
    for (size_t k = 0; k < sizeof ok; k++)
        assert_int_equal(check_body('F', ok, k, &err), PD_DECODE_ERROR);
    /* Three format codes for two arguments. */
    static const uint8_t counts[] = {0, 0, 4,    0xd2, 0,    3,    0,    1,    0,    1,    0, 1,
                                     0, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0};
    assert_int_equal(check_body('F', counts, sizeof counts, &err), PD_DECODE_ERROR);
}

static void test_message_check_framing(void **state)
{
    (void)state;
    const char *err = NULL;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_query(&b, "SELECT 1");
    /* The whole message must be given: no less, no more. */
    assert_int_equal(pd_fe_message_check(b.data, b.len - 1, &err), PD_DECODE_ERROR);
    assert_string_equal(err, "invalid message length");
    pd_buf_put_u8(&b, 0);
    assert_int_equal(pd_fe_message_check(b.data, b.len, &err), PD_DECODE_ERROR);
    assert_int_equal(pd_fe_message_check(b.data, 3, &err), PD_DECODE_ERROR);
    /* A backend-only type. */
    err = NULL;
    assert_int_equal(check_body('Z', "I", 1, &err), PD_DECODE_ERROR);
    assert_string_equal(err, "invalid frontend message type");
    pd_buf_free(&b);
}

/* 'p' carries raw SASL bytes in SASLResponse, so any body is well formed for it. */
static void test_password_any_body(void **state)
{
    (void)state;
    const char *err = NULL;
    assert_int_equal(check_body('p', "\x01\x02", 2, &err), PD_DECODE_OK);
    assert_int_equal(check_body('p', "secret", 7, &err), PD_DECODE_OK);
}

/* A stream of messages from every encoder walks cleanly header by header. */
static void test_stream(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_parse(&b, "", "SELECT $1", 0, NULL);
    pd_fe_bind(&b, "", "", 0, NULL, NULL, NULL, 0, NULL);
    pd_fe_describe(&b, 'P', "");
    pd_fe_execute(&b, "", 0);
    pd_fe_sync(&b);
    pd_fe_query(&b, "COPY t FROM STDIN");
    pd_fe_copy_data(&b, "x\n", 2);
    pd_fe_copy_done(&b);
    pd_fe_terminate(&b);
    static const char order[] = "PBDESQdcX";
    size_t off = 0, count = 0;
    while (off < b.len) {
        pd_msg_hdr_t hdr;
        const char *err = NULL;
        assert_int_equal(pd_fe_header(b.data + off, b.len - off, 1 << 20, &hdr, &err),
                         PD_DECODE_OK);
        assert_int_equal(hdr.type, order[count]);
        assert_int_equal(pd_fe_message_check(b.data + off, hdr.len + 1, &err), PD_DECODE_OK);
        off += hdr.len + 1;
        count++;
    }
    assert_int_equal(off, b.len);
    assert_int_equal(count, strlen(order));
    pd_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_query),
        cmocka_unit_test(test_parse),
        cmocka_unit_test(test_bind),
        cmocka_unit_test(test_bind_malformed),
        cmocka_unit_test(test_describe_close),
        cmocka_unit_test(test_execute),
        cmocka_unit_test(test_empty_messages),
        cmocka_unit_test(test_copy),
        cmocka_unit_test(test_sasl),
        cmocka_unit_test(test_function_call),
        cmocka_unit_test(test_message_check_framing),
        cmocka_unit_test(test_password_any_body),
        cmocka_unit_test(test_stream),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
