/*
 * test_protocol_startup.c — startup packets: each kind decoded and encoded, partial
 * packets, and every refusal with PostgreSQL's message and SQLSTATE.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "protocol/wire.h"

static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

/* Builds a packet of the given version with a raw parameter area. */
static size_t make_startup(uint8_t *out, uint32_t version, const void *params, size_t n)
{
    put32(out, (uint32_t)(8 + n));
    put32(out + 4, version);
    memcpy(out + 8, params, n);
    return 8 + n;
}

static void expect_fail(const uint8_t *buf, size_t n, const char *msg, const char *state)
{
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), -1);
    assert_string_equal(err, msg);
    assert_string_equal(sqlstate, state);
}

static void test_startup_roundtrip(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *names[] = {"user", "database", "application_name"};
    const char *values[] = {"alice", "app", "psql"};
    pd_fe_startup(&b, 3, names, values);
    assert_true(pd_buf_ok(&b));
    static const char want[] = "\0\0\0\x37\0\3\0\0user\0alice\0database\0app\0"
                               "application_name\0psql\0";
    assert_int_equal(b.len, sizeof want); /* the literal's NUL is the list terminator */
    assert_memory_equal(b.data, want, sizeof want);
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), (long)b.len);
    assert_int_equal(s.kind, PD_STARTUP_MESSAGE);
    assert_int_equal(s.version, PD_PROTOCOL_V3);
    assert_int_equal(s.nparams, 3);
    for (unsigned i = 0; i < 3; i++) {
        assert_string_equal(s.names[i], names[i]);
        assert_string_equal(s.values[i], values[i]);
    }
    assert_string_equal(s.user, "alice");
    assert_string_equal(s.database, "app");
    pd_buf_free(&b);
}

static void test_database_defaults_to_user(void **state)
{
    (void)state;
    uint8_t buf[64];
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    static const char p1[] = "user\0bob\0";
    size_t n = make_startup(buf, PD_PROTOCOL_V3, p1, sizeof p1);
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_string_equal(s.database, "bob");
    /* An empty database name also means the user's, as in PostgreSQL. */
    static const char p2[] = "database\0\0user\0bob\0";
    n = make_startup(buf, PD_PROTOCOL_V3, p2, sizeof p2);
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_string_equal(s.database, "bob");
    assert_int_equal(s.nparams, 2);
}

static void test_repeated_user_last_wins(void **state)
{
    (void)state;
    uint8_t buf[64];
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    static const char p[] = "user\0a\0user\0b\0";
    size_t n = make_startup(buf, PD_PROTOCOL_V3, p, sizeof p);
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_string_equal(s.user, "b");
}

static void test_newer_minor_accepted(void **state)
{
    (void)state;
    uint8_t buf[64];
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    static const char p[] = "user\0u\0_pq_.x\0y\0";
    size_t n = make_startup(buf, 0x00030002u, p, sizeof p);
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_int_equal(s.version, 0x00030002u);
    assert_int_equal(s.nparams, 2);
}

static void test_requests(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;

    pd_fe_ssl_request(&b);
    static const uint8_t ssl[] = {0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f};
    assert_int_equal(b.len, sizeof ssl);
    assert_memory_equal(b.data, ssl, sizeof ssl);
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), 8);
    assert_int_equal(s.kind, PD_STARTUP_SSL);

    pd_buf_reset(&b);
    pd_fe_gssenc_request(&b);
    static const uint8_t gss[] = {0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30};
    assert_memory_equal(b.data, gss, sizeof gss);
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), 8);
    assert_int_equal(s.kind, PD_STARTUP_GSSENC);

    pd_buf_reset(&b);
    pd_fe_cancel_request(&b, 1234, 0xcafef00du);
    static const uint8_t cancel[] = {0, 0, 0, 16,   0x04, 0xd2, 0x16, 0x2e,
                                     0, 0, 4, 0xd2, 0xca, 0xfe, 0xf0, 0x0d};
    assert_int_equal(b.len, sizeof cancel);
    assert_memory_equal(b.data, cancel, sizeof cancel);
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), 16);
    assert_int_equal(s.kind, PD_STARTUP_CANCEL);
    assert_int_equal(s.cancel_pid, 1234);
    assert_int_equal(s.cancel_key, 0xcafef00du);
    pd_buf_free(&b);
}

/* Only one packet is consumed: the client may send its next bytes right behind it. */
static void test_consumes_one_packet(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_ssl_request(&b);
    pd_fe_query(&b, "x");
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), 8);
    pd_buf_free(&b);
}

static void test_partial(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    const char *names[] = {"user"};
    const char *values[] = {"u"};
    pd_fe_startup(&b, 1, names, values);
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    for (size_t n = 0; n < b.len; n++)
        assert_int_equal(pd_startup_decode(b.data, n, &s, &err, &sqlstate), 0);
    assert_int_equal(pd_startup_decode(b.data, b.len, &s, &err, &sqlstate), (long)b.len);
    pd_buf_free(&b);
}

static void test_bad_lengths(void **state)
{
    (void)state;
    uint8_t buf[32] = {0};
    static const uint32_t lens[] = {0, 4, 7, PD_STARTUP_MAX_LEN + 1, 0xffffffffu};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        put32(buf, lens[i]);
        put32(buf + 4, PD_PROTOCOL_V3);
        /* Refused on the length alone: no need (nor any point) to wait for the rest. */
        expect_fail(buf, 4, "invalid length of startup packet", "08P01");
    }
    /* SSLRequest and GSSENCRequest are exactly 8 bytes, CancelRequest exactly 16. */
    put32(buf, 12);
    put32(buf + 4, PD_SSL_REQUEST_CODE);
    expect_fail(buf, 12, "invalid length of startup packet", "08P01");
    put32(buf + 4, PD_GSSENC_REQUEST_CODE);
    expect_fail(buf, 12, "invalid length of startup packet", "08P01");
    put32(buf + 4, PD_CANCEL_REQUEST_CODE);
    expect_fail(buf, 12, "invalid length of startup packet", "08P01");
    put32(buf, 20);
    expect_fail(buf, 20, "invalid length of startup packet", "08P01");
    put32(buf, 8);
    expect_fail(buf, 8, "invalid length of startup packet", "08P01");
}

/* The longest packet allowed is accepted, one byte more is not. */
static void test_max_length(void **state)
{
    (void)state;
    static uint8_t buf[PD_STARTUP_MAX_LEN + 1];
    size_t vlen = PD_STARTUP_MAX_LEN - 8 - sizeof "user" - 1 - 1;
    memcpy(buf + 8, "user", 5);
    memset(buf + 13, 'u', vlen);
    buf[13 + vlen] = 0;
    buf[14 + vlen] = 0;
    size_t n = 15 + vlen;
    assert_int_equal(n, PD_STARTUP_MAX_LEN);
    put32(buf, (uint32_t)n);
    put32(buf + 4, PD_PROTOCOL_V3);
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_int_equal(strlen(s.user), vlen);
    put32(buf, (uint32_t)n + 1);
    expect_fail(buf, n + 1, "invalid length of startup packet", "08P01");
}

static void test_bad_version(void **state)
{
    (void)state;
    uint8_t buf[64];
    static const char p[] = "user\0u\0";
    static const uint32_t versions[] = {0x00020000u, 0x00040000u, 0, 0x04d2162du, 0x04d21631u};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        size_t n = make_startup(buf, versions[i], p, sizeof p);
        expect_fail(buf, n, "unsupported frontend protocol", "0A000");
    }
}

static void test_missing_user(void **state)
{
    (void)state;
    uint8_t buf[64];
    static const char none[] = "database\0d\0";
    size_t n = make_startup(buf, PD_PROTOCOL_V3, none, sizeof none);
    expect_fail(buf, n, "no PostgreSQL user name specified in startup packet", "28000");
    static const char empty[] = "user\0\0";
    n = make_startup(buf, PD_PROTOCOL_V3, empty, sizeof empty);
    expect_fail(buf, n, "no PostgreSQL user name specified in startup packet", "28000");
    /* Only the terminator: no parameters at all. */
    n = make_startup(buf, PD_PROTOCOL_V3, "", 1);
    expect_fail(buf, n, "no PostgreSQL user name specified in startup packet", "28000");
}

static void test_bad_layout(void **state)
{
    (void)state;
    uint8_t buf[64];
    const char *msg = "invalid startup packet layout: expected terminator as last byte";
    /* The list's terminator is missing. */
    static const char unterminated[] = "user\0u\0";
    size_t n = make_startup(buf, PD_PROTOCOL_V3, unterminated, sizeof unterminated - 1);
    expect_fail(buf, n, msg, "08P01");
    /* The last byte is not NUL at all. */
    n = make_startup(buf, PD_PROTOCOL_V3, "user\0u\0x", 8);
    expect_fail(buf, n, msg, "08P01");
    /* A name without a value. */
    n = make_startup(buf, PD_PROTOCOL_V3, "user\0", 5);
    expect_fail(buf, n, msg, "08P01");
    /* Bytes after the terminator. */
    n = make_startup(buf, PD_PROTOCOL_V3, "user\0u\0\0x\0", 10);
    expect_fail(buf, n, msg, "08P01");
    /* No parameter area at all. */
    n = make_startup(buf, PD_PROTOCOL_V3, "", 0);
    expect_fail(buf, n, msg, "08P01");
}

static void test_too_many_params(void **state)
{
    (void)state;
    char area[2048];
    size_t len;
    uint8_t buf[2100];
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    /* PD_STARTUP_MAX_PARAMS parameters are fine, one more is refused. */
    memcpy(area, "user\0u\0", 7);
    len = 7;
    for (unsigned i = 1; i < PD_STARTUP_MAX_PARAMS; i++) {
        len += (size_t)sprintf(area + len, "p%u", i) + 1;
        area[len++] = 'v';
        area[len++] = 0;
    }
    area[len] = 0;
    size_t n = make_startup(buf, PD_PROTOCOL_V3, area, len + 1);
    assert_int_equal(pd_startup_decode(buf, n, &s, &err, &sqlstate), (long)n);
    assert_int_equal(s.nparams, PD_STARTUP_MAX_PARAMS);
    memcpy(area + len, "x\0y\0", 5);
    n = make_startup(buf, PD_PROTOCOL_V3, area, len + 5);
    expect_fail(buf, n, "too many parameters in startup packet", "08P01");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_startup_roundtrip),
        cmocka_unit_test(test_database_defaults_to_user),
        cmocka_unit_test(test_repeated_user_last_wins),
        cmocka_unit_test(test_newer_minor_accepted),
        cmocka_unit_test(test_requests),
        cmocka_unit_test(test_consumes_one_packet),
        cmocka_unit_test(test_partial),
        cmocka_unit_test(test_bad_lengths),
        cmocka_unit_test(test_max_length),
        cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_missing_user),
        cmocka_unit_test(test_bad_layout),
        cmocka_unit_test(test_too_many_params),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
