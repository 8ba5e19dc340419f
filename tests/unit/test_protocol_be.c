/*
 * test_protocol_be.c — backend messages: every encoder's output decoded back or compared
 * byte for byte, every backend type accepted by pd_be_message_check when well formed, and
 * malformed bodies refused.
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

static pd_decode_rc_t check_body(uint8_t type, const void *body, size_t n)
{
    const char *err = NULL;
    uint8_t *m = make_msg(type, body, n);
    pd_decode_rc_t rc = pd_be_message_check(m, n + 5, &err);
    free(m);
    if (rc == PD_DECODE_ERROR)
        assert_non_null(err);
    return rc;
}

static void assert_one_message(const pd_buf_t *b, uint8_t type)
{
    pd_msg_hdr_t hdr;
    const char *err = NULL;
    assert_true(pd_buf_ok(b));
    assert_int_equal(pd_be_header(b->data, b->len, PD_MSG_MAX_LEN, &hdr, &err), PD_DECODE_OK);
    assert_int_equal(hdr.type, type);
    assert_int_equal(hdr.len + 1, b->len);
    assert_int_equal(pd_be_message_check(b->data, b->len, &err), PD_DECODE_OK);
}

/* No proper prefix of the body, and no body with a byte more, is well formed. */
static void assert_exact_body(uint8_t type, const uint8_t *body, size_t n)
{
    for (size_t k = 0; k < n; k++)
        assert_int_equal(check_body(type, body, k), PD_DECODE_ERROR);
    uint8_t *longer = malloc(n + 1);
    assert_non_null(longer);
    if (n > 0)
        memcpy(longer, body, n);
    longer[n] = 0;
    assert_int_equal(check_body(type, longer, n + 1), PD_DECODE_ERROR);
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

static void test_error(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_error(&b, "FATAL", "28P01", "password authentication failed for user \"x\"", "why",
                "what to do");
    assert_one_message(&b, 'E');
    static const char want[] = "SFATAL\0VFATAL\0C28P01\0M"
                               "password authentication failed for user \"x\"\0"
                               "Dwhy\0Hwhat to do\0";
    assert_int_equal(body_len(&b), sizeof want); /* sizeof counts the final NUL */
    assert_memory_equal(body_of(&b), want, sizeof want);
    pd_be_error_t e;
    const char *err = NULL;
    assert_int_equal(pd_be_error_decode(body_of(&b), body_len(&b), &e, &err), PD_DECODE_OK);
    assert_string_equal(e.severity, "FATAL");
    assert_string_equal(e.sqlstate, "28P01");
    assert_string_equal(e.message, "password authentication failed for user \"x\"");
    assert_string_equal(e.detail, "why");
    assert_string_equal(e.hint, "what to do");
    assert_exact_body('E', body_of(&b), body_len(&b));

    /* Without detail and hint, neither field is written. */
    pd_buf_reset(&b);
    pd_be_error(&b, "ERROR", "08P01", "bad", NULL, NULL);
    assert_one_message(&b, 'E');
    assert_int_equal(pd_be_error_decode(body_of(&b), body_len(&b), &e, &err), PD_DECODE_OK);
    assert_null(e.detail);
    assert_null(e.hint);
    assert_null(memchr(body_of(&b), 'D', body_len(&b)));
    pd_buf_free(&b);
}

static void test_error_fields(void **state)
{
    (void)state;
    pd_be_error_t e;
    const char *err = NULL;
    /* Localized 'S' and unlocalized 'V': V wins wherever it comes. Unknown fields skip. */
    static const char both[] = "SFEHLER\0Pposition\0C42601\0Mm\0VERROR\0";
    assert_int_equal(pd_be_error_decode((const uint8_t *)both, sizeof both, &e, &err),
                     PD_DECODE_OK);
    assert_string_equal(e.severity, "ERROR");
    static const char s_only[] = "SWARNING\0C01000\0Mm\0";
    assert_int_equal(pd_be_error_decode((const uint8_t *)s_only, sizeof s_only, &e, &err),
                     PD_DECODE_OK);
    assert_string_equal(e.severity, "WARNING");
    /* The field list must end with a zero byte, and a field value with a NUL. */
    assert_int_equal(pd_be_error_decode((const uint8_t *)s_only, sizeof s_only - 1, &e, &err),
                     PD_DECODE_ERROR);
    assert_int_equal(pd_be_error_decode((const uint8_t *)"Mabc", 4, &e, &err), PD_DECODE_ERROR);
    assert_int_equal(pd_be_error_decode((const uint8_t *)"", 0, &e, &err), PD_DECODE_ERROR);
    assert_int_equal(pd_be_error_decode((const uint8_t *)"", 1, &e, &err), PD_DECODE_OK);
}

static void test_notice(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_notice(&b, "NOTICE", "00000", "hello");
    assert_one_message(&b, 'N');
    pd_be_error_t e;
    const char *err = NULL;
    assert_int_equal(pd_be_error_decode(body_of(&b), body_len(&b), &e, &err), PD_DECODE_OK);
    assert_string_equal(e.severity, "NOTICE");
    assert_string_equal(e.sqlstate, "00000");
    assert_string_equal(e.message, "hello");
    assert_exact_body('N', body_of(&b), body_len(&b));
    pd_buf_free(&b);
}

static void test_auth_encoders(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_auth_t a;
    const char *err = NULL;

    pd_be_auth_ok(&b);
    static const uint8_t ok[] = {'R', 0, 0, 0, 8, 0, 0, 0, 0};
    assert_int_equal(b.len, sizeof ok);
    assert_memory_equal(b.data, ok, sizeof ok);
    assert_one_message(&b, 'R');
    assert_exact_body('R', body_of(&b), body_len(&b));

    pd_buf_reset(&b);
    const char *mechs[] = {"SCRAM-SHA-256"};
    pd_be_auth_sasl(&b, mechs, 1);
    assert_one_message(&b, 'R');
    assert_int_equal(pd_be_auth_decode(body_of(&b), body_len(&b), &a, &err), PD_DECODE_OK);
    assert_int_equal(a.code, PD_AUTH_SASL);
    assert_int_equal(a.len, sizeof "SCRAM-SHA-256" + 1);
    assert_memory_equal(a.data, "SCRAM-SHA-256\0", a.len);
    assert_exact_body('R', body_of(&b), body_len(&b));

    pd_buf_reset(&b);
    pd_be_auth_sasl_continue(&b, "r=abc,s=xyz,i=4096", 18);
    assert_one_message(&b, 'R');
    assert_int_equal(pd_be_auth_decode(body_of(&b), body_len(&b), &a, &err), PD_DECODE_OK);
    assert_int_equal(a.code, PD_AUTH_SASL_CONTINUE);
    assert_int_equal(a.len, 18);
    assert_memory_equal(a.data, "r=abc,s=xyz,i=4096", 18);

    pd_buf_reset(&b);
    pd_be_auth_sasl_final(&b, "v=sig", 5);
    assert_one_message(&b, 'R');
    assert_int_equal(pd_be_auth_decode(body_of(&b), body_len(&b), &a, &err), PD_DECODE_OK);
    assert_int_equal(a.code, PD_AUTH_SASL_FINAL);
    assert_int_equal(a.len, 5);
    pd_buf_free(&b);
}

/* Each authentication code's payload, as the server sends them. */
static void test_auth_payloads(void **state)
{
    (void)state;
    static const struct {
        uint8_t body[24];
        size_t n;
        pd_decode_rc_t rc;
    } cases[] = {
        {{0, 0, 0, 3}, 4, PD_DECODE_OK},                     /* cleartext */
        {{0, 0, 0, 3, 0}, 5, PD_DECODE_ERROR},               /* cleartext + junk */
        {{0, 0, 0, 5, 1, 2, 3, 4}, 8, PD_DECODE_OK},         /* MD5 with salt */
        {{0, 0, 0, 5, 1, 2, 3}, 7, PD_DECODE_ERROR},         /* short salt */
        {{0, 0, 0, 7}, 4, PD_DECODE_OK},                     /* GSS */
        {{0, 0, 0, 8, 9, 9}, 6, PD_DECODE_OK},               /* GSSContinue */
        {{0, 0, 0, 10, 'A', 0, 'B', 0, 0}, 9, PD_DECODE_OK}, /* two mechanisms */
        {{0, 0, 0, 10, 0}, 5, PD_DECODE_ERROR},              /* none offered */
        {{0, 0, 0, 10, 'A', 0}, 6, PD_DECODE_ERROR},         /* list unterminated */
        {{0, 0, 0, 10, 'A', 0, 0, 'x'}, 8, PD_DECODE_ERROR}, /* after the list */
        {{0, 0, 0, 11}, 4, PD_DECODE_OK},                    /* empty SASL data */
        {{0, 0, 0, 99}, 4, PD_DECODE_ERROR},                 /* unknown code */
        {{0xff, 0xff, 0xff, 0xff}, 4, PD_DECODE_ERROR},      /* negative code */
        {{0, 0, 0}, 3, PD_DECODE_ERROR},                     /* no code */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pd_be_auth_t a;
        const char *err = NULL;
        assert_int_equal(pd_be_auth_decode(cases[i].body, cases[i].n, &a, &err), cases[i].rc);
        assert_int_equal(check_body('R', cases[i].body, cases[i].n), cases[i].rc);
    }
}

static void test_param_status_and_key(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *err = NULL, *name, *value;
    pd_be_param_status(&b, "server_version", "15.4");
    assert_one_message(&b, 'S');
    assert_int_equal(pd_be_param_status_decode(body_of(&b), body_len(&b), &name, &value, &err),
                     PD_DECODE_OK);
    assert_string_equal(name, "server_version");
    assert_string_equal(value, "15.4");
    assert_exact_body('S', body_of(&b), body_len(&b));

    pd_buf_reset(&b);
    pd_be_backend_key(&b, 4242, 0xdeadbeefu);
    assert_one_message(&b, 'K');
    uint32_t pid, key;
    assert_int_equal(pd_be_backend_key_decode(body_of(&b), body_len(&b), &pid, &key, &err),
                     PD_DECODE_OK);
    assert_int_equal(pid, 4242);
    assert_int_equal(key, 0xdeadbeefu);
    assert_exact_body('K', body_of(&b), body_len(&b));
    pd_buf_free(&b);
}

static void test_ready(void **state)
{
    (void)state;
    static const uint8_t statuses[] = {'I', 'T', 'E'};
    for (size_t i = 0; i < 3; i++) {
        pd_buf_t b;
        pd_buf_init(&b);
        pd_be_ready(&b, statuses[i]);
        assert_one_message(&b, 'Z');
        uint8_t st = 0;
        const char *err = NULL;
        assert_int_equal(pd_be_ready_decode(body_of(&b), body_len(&b), &st, &err), PD_DECODE_OK);
        assert_int_equal(st, statuses[i]);
        assert_exact_body('Z', body_of(&b), body_len(&b));
        pd_buf_free(&b);
    }
    assert_int_equal(check_body('Z', "X", 1), PD_DECODE_ERROR);
}

static void test_negotiate_version(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *opts[] = {"_pq_.a", "_pq_.b"};
    pd_be_negotiate_version(&b, 0, 2, opts);
    assert_one_message(&b, 'v');
    static const char want[] = "\0\0\0\0\0\0\0\2_pq_.a\0_pq_.b";
    assert_int_equal(body_len(&b), sizeof want);
    assert_memory_equal(body_of(&b), want, sizeof want);
    assert_exact_body('v', body_of(&b), body_len(&b));
    /* A count far beyond the body is refused without walking it. */
    static const uint8_t huge[] = {0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 'a', 0};
    assert_int_equal(check_body('v', huge, sizeof huge), PD_DECODE_ERROR);
    pd_buf_free(&b);
}

static void test_command_complete(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_command_complete(&b, "INSERT 0 3");
    assert_one_message(&b, 'C');
    const char *tag, *err = NULL;
    assert_int_equal(pd_be_command_complete_decode(body_of(&b), body_len(&b), &tag, &err),
                     PD_DECODE_OK);
    assert_string_equal(tag, "INSERT 0 3");
    assert_exact_body('C', body_of(&b), body_len(&b));
    pd_buf_free(&b);
}

static void test_row_description(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *names[] = {"id", "name"};
    static const uint32_t oids[] = {23, 25};
    pd_be_row_description(&b, 2, names, oids);
    assert_one_message(&b, 'T');
    pd_be_row_description_t d;
    const char *err = NULL;
    assert_int_equal(pd_be_row_description_decode(body_of(&b), body_len(&b), &d, &err),
                     PD_DECODE_OK);
    assert_int_equal(d.nfields, 2);
    assert_int_equal(d.fields_len, (3 + 18) + (5 + 18));
    assert_string_equal((const char *)d.fields, "id");
    assert_int_equal(be32(d.fields + 3 + 6), 23); /* after name, table oid, attnum */
    assert_string_equal((const char *)d.fields + 21, "name");
    assert_int_equal(be32(d.fields + 21 + 5 + 6), 25);
    assert_int_equal(d.fields[21 + 5 + 16], 0); /* text format */
    assert_int_equal(d.fields[21 + 5 + 17], 0);
    assert_exact_body('T', body_of(&b), body_len(&b));

    /* A field name without its NUL. */
    static const uint8_t bad[] = {0, 1, 'i', 'd'};
    assert_int_equal(check_body('T', bad, sizeof bad), PD_DECODE_ERROR);
    /* No fields: what a statement without result columns never sends, but is legal. */
    assert_int_equal(check_body('T', "\0\0", 2), PD_DECODE_OK);
    pd_buf_free(&b);
}

static void test_data_row(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *values[] = {"1", NULL, "a\0b"};
    static const int32_t lengths[] = {1, -1, 3};
    pd_be_data_row(&b, 3, values, lengths);
    assert_one_message(&b, 'D');
    pd_be_data_row_t r;
    const char *err = NULL;
    assert_int_equal(pd_be_data_row_decode(body_of(&b), body_len(&b), &r, &err), PD_DECODE_OK);
    assert_int_equal(r.ncolumns, 3);
    static const uint8_t cols[] = {0,    0, 0, 1, '1', 0xff, 0xff, 0xff,
                                   0xff, 0, 0, 0, 3,   'a',  0,    'b'};
    assert_int_equal(r.columns_len, sizeof cols);
    assert_memory_equal(r.columns, cols, sizeof cols);
    assert_exact_body('D', body_of(&b), body_len(&b));

    /* Text values without lengths. */
    pd_buf_reset(&b);
    const char *text[] = {"abc", NULL};
    pd_be_data_row(&b, 2, text, NULL);
    assert_one_message(&b, 'D');
    assert_int_equal(pd_be_data_row_decode(body_of(&b), body_len(&b), &r, &err), PD_DECODE_OK);
    assert_int_equal(r.columns_len, 4 + 3 + 4);

    static const uint8_t neg[] = {0, 1, 0xff, 0xff, 0xff, 0xfe};
    assert_int_equal(check_body('D', neg, sizeof neg), PD_DECODE_ERROR);
    static const uint8_t over[] = {0, 1, 0, 0, 0, 5, 'a'};
    assert_int_equal(check_body('D', over, sizeof over), PD_DECODE_ERROR);
    static const uint8_t huge[] = {0, 1, 0x7f, 0xff, 0xff, 0xff, 'a'};
    assert_int_equal(check_body('D', huge, sizeof huge), PD_DECODE_ERROR);
    pd_buf_free(&b);
}

static void test_empty_messages(void **state)
{
    (void)state;
    static void (*const enc[])(pd_buf_t *) = {pd_be_empty_query, pd_be_parse_complete,
                                              pd_be_bind_complete, pd_be_no_data};
    static const uint8_t types[] = {'I', '1', '2', 'n'};
    for (size_t i = 0; i < 4; i++) {
        pd_buf_t b;
        pd_buf_init(&b);
        enc[i](&b);
        assert_int_equal(b.len, 5);
        assert_one_message(&b, types[i]);
        assert_exact_body(types[i], body_of(&b), 0);
        pd_buf_free(&b);
    }
    /* The ones without an encoder: CloseComplete, CopyDone, PortalSuspended. */
    static const uint8_t others[] = {'3', 'c', 's'};
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(check_body(others[i], NULL, 0), PD_DECODE_OK);
        assert_int_equal(check_body(others[i], "x", 1), PD_DECODE_ERROR);
    }
}

static void test_copy_and_notification(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_copy_data(&b, "row\n", 4);
    assert_one_message(&b, 'd');
    assert_memory_equal(body_of(&b), "row\n", 4);
    pd_buf_reset(&b);
    pd_be_notification(&b, 77, "chan", "payload");
    assert_one_message(&b, 'A');
    assert_int_equal(be32(body_of(&b)), 77);
    assert_string_equal((const char *)body_of(&b) + 4, "chan");
    assert_string_equal((const char *)body_of(&b) + 9, "payload");
    assert_exact_body('A', body_of(&b), body_len(&b));
    pd_buf_free(&b);
}

/* The types no encoder produces, built by hand from the protocol docs. */
static void test_hand_built_types(void **state)
{
    (void)state;
    /* CopyIn/Out/BothResponse: text overall, two columns. */
    static const uint8_t copy[] = {0, 0, 2, 0, 0, 0, 0};
    static const uint8_t copy_types[] = {'G', 'H', 'W'};
    for (size_t i = 0; i < 3; i++) {
        assert_int_equal(check_body(copy_types[i], copy, sizeof copy), PD_DECODE_OK);
        assert_exact_body(copy_types[i], copy, sizeof copy);
    }
    /* FunctionCallResponse: a 2-byte result, and a NULL one. */
    static const uint8_t fres[] = {0, 0, 0, 2, 'o', 'k'};
    assert_int_equal(check_body('V', fres, sizeof fres), PD_DECODE_OK);
    assert_exact_body('V', fres, sizeof fres);
    assert_int_equal(check_body('V', "\xff\xff\xff\xff", 4), PD_DECODE_OK);
    /* ParameterDescription: two parameter types. */
    static const uint8_t pdesc[] = {0, 2, 0, 0, 0, 23, 0, 0, 0, 25};
    assert_int_equal(check_body('t', pdesc, sizeof pdesc), PD_DECODE_OK);
    assert_exact_body('t', pdesc, sizeof pdesc);
    /* CopyData is opaque. */
    assert_int_equal(check_body('d', NULL, 0), PD_DECODE_OK);
}

static void test_message_check_framing(void **state)
{
    (void)state;
    const char *err = NULL;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_be_ready(&b, 'I');
    assert_int_equal(pd_be_message_check(b.data, b.len - 1, &err), PD_DECODE_ERROR);
    assert_string_equal(err, "invalid message length");
    assert_int_equal(pd_be_message_check(b.data, 2, &err), PD_DECODE_ERROR);
    b.data[0] = 'Q'; /* frontend-only */
    assert_int_equal(pd_be_message_check(b.data, b.len, &err), PD_DECODE_ERROR);
    assert_string_equal(err, "invalid backend message type");
    pd_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error),
        cmocka_unit_test(test_error_fields),
        cmocka_unit_test(test_notice),
        cmocka_unit_test(test_auth_encoders),
        cmocka_unit_test(test_auth_payloads),
        cmocka_unit_test(test_param_status_and_key),
        cmocka_unit_test(test_ready),
        cmocka_unit_test(test_negotiate_version),
        cmocka_unit_test(test_command_complete),
        cmocka_unit_test(test_row_description),
        cmocka_unit_test(test_data_row),
        cmocka_unit_test(test_empty_messages),
        cmocka_unit_test(test_copy_and_notification),
        cmocka_unit_test(test_hand_built_types),
        cmocka_unit_test(test_message_check_framing),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
