/*
 * test_protocol_frame.c — message framing (pd_fe_header, pd_be_header, type names) and the
 * buffer and reader primitives every codec is built on.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "protocol/wire.h"

typedef struct {
    uint8_t type;
    const char *name;
} type_entry_t;

#define ENTRY(ch, id, name) {ch, name},
static const type_entry_t fe_types[] = {PD_FE_MESSAGES(ENTRY)};
static const type_entry_t be_types[] = {PD_BE_MESSAGES(ENTRY)};
#undef ENTRY

#define NFE (sizeof fe_types / sizeof fe_types[0])
#define NBE (sizeof be_types / sizeof be_types[0])

static void put_header(uint8_t *h, uint8_t type, uint32_t len)
{
    h[0] = type;
    h[1] = (uint8_t)(len >> 24);
    h[2] = (uint8_t)(len >> 16);
    h[3] = (uint8_t)(len >> 8);
    h[4] = (uint8_t)len;
}

static bool in_table(const type_entry_t *t, size_t n, uint8_t type)
{
    for (size_t i = 0; i < n; i++)
        if (t[i].type == type)
            return true;
    return false;
}

static void test_type_names(void **state)
{
    (void)state;
    assert_int_equal(NFE, 14);
    assert_int_equal(NBE, 24);
    for (size_t i = 0; i < NFE; i++)
        assert_string_equal(pd_fe_type_name(fe_types[i].type), fe_types[i].name);
    for (size_t i = 0; i < NBE; i++)
        assert_string_equal(pd_be_type_name(be_types[i].type), be_types[i].name);
    assert_string_equal(pd_fe_type_name('Q'), "Query");
    assert_string_equal(pd_be_type_name('Z'), "ReadyForQuery");
    /* The same byte means different things in each direction. */
    assert_string_equal(pd_fe_type_name('D'), "Describe");
    assert_string_equal(pd_be_type_name('D'), "DataRow");
    assert_null(pd_be_type_name('Q'));
    assert_null(pd_fe_type_name('Z'));
    assert_null(pd_fe_type_name(0));
}

/* Every byte value: accepted exactly when it is a type of that direction. */
static void test_every_type_byte(void **state)
{
    (void)state;
    unsigned fe_ok = 0, be_ok = 0;
    for (unsigned t = 0; t < 256; t++) {
        uint8_t h[5];
        pd_msg_hdr_t hdr = {0, 0};
        const char *err = NULL;
        put_header(h, (uint8_t)t, 4);
        pd_decode_rc_t rc = pd_fe_header(h, sizeof h, PD_MSG_MAX_LEN, &hdr, &err);
        if (in_table(fe_types, NFE, (uint8_t)t)) {
            assert_int_equal(rc, PD_DECODE_OK);
            assert_int_equal(hdr.type, t);
            assert_int_equal(hdr.len, 4);
            fe_ok++;
        } else {
            assert_int_equal(rc, PD_DECODE_ERROR);
            assert_string_equal(err, "invalid frontend message type");
        }
        err = NULL;
        rc = pd_be_header(h, sizeof h, PD_MSG_MAX_LEN, &hdr, &err);
        if (in_table(be_types, NBE, (uint8_t)t)) {
            assert_int_equal(rc, PD_DECODE_OK);
            assert_int_equal(hdr.type, t);
            be_ok++;
        } else {
            assert_int_equal(rc, PD_DECODE_ERROR);
            assert_string_equal(err, "invalid backend message type");
        }
    }
    assert_int_equal(fe_ok, NFE);
    assert_int_equal(be_ok, NBE);
}

static void test_length_bounds(void **state)
{
    (void)state;
    uint8_t h[5];
    pd_msg_hdr_t hdr;
    const char *err = NULL;
    static const uint32_t bad[] = {0, 1, 3, 101, 0x7fffffffu, 0xffffffffu};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        put_header(h, 'Q', bad[i]);
        err = NULL;
        assert_int_equal(pd_fe_header(h, 5, 100, &hdr, &err), PD_DECODE_ERROR);
        assert_string_equal(err, "invalid message length");
        put_header(h, 'D', bad[i]);
        err = NULL;
        assert_int_equal(pd_be_header(h, 5, 100, &hdr, &err), PD_DECODE_ERROR);
        assert_string_equal(err, "invalid message length");
    }
    put_header(h, 'Q', 100); /* exactly max_len is fine */
    assert_int_equal(pd_fe_header(h, 5, 100, &hdr, &err), PD_DECODE_OK);
    assert_int_equal(hdr.len, 100);
    /* max_len is capped at PD_MSG_MAX_LEN even when the caller asks for more. */
    put_header(h, 'Q', PD_MSG_MAX_LEN);
    assert_int_equal(pd_fe_header(h, 5, UINT32_MAX, &hdr, &err), PD_DECODE_OK);
    put_header(h, 'Q', PD_MSG_MAX_LEN + 1);
    assert_int_equal(pd_fe_header(h, 5, UINT32_MAX, &hdr, &err), PD_DECODE_ERROR);
    put_header(h, 'd', PD_MSG_MAX_LEN + 1);
    assert_int_equal(pd_be_header(h, 5, 0, &hdr, &err), PD_DECODE_ERROR);
}

/* The header is judged on five bytes: the body need not be there, and an oversize
 * length is refused before any of it arrives. */
static void test_incomplete_and_early(void **state)
{
    (void)state;
    uint8_t h[5];
    pd_msg_hdr_t hdr = {0, 0};
    const char *err = NULL;
    put_header(h, 'Q', 1000);
    for (size_t n = 0; n < 5; n++) {
        assert_int_equal(pd_fe_header(h, n, PD_MSG_MAX_LEN, &hdr, &err), PD_DECODE_INCOMPLETE);
        assert_int_equal(pd_be_header(h, n, PD_MSG_MAX_LEN, &hdr, &err), PD_DECODE_INCOMPLETE);
    }
    assert_int_equal(hdr.len, 0);
    assert_int_equal(pd_fe_header(h, 5, PD_MSG_MAX_LEN, &hdr, &err), PD_DECODE_OK);
    assert_int_equal(hdr.len, 1000);
    put_header(h, 'Q', 2000);
    assert_int_equal(pd_fe_header(h, 5, 1000, &hdr, &err), PD_DECODE_ERROR);
}

static void test_buf_encoding(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    pd_buf_put_u8(&b, 0xab);
    pd_buf_put_u16(&b, 0x1234);
    pd_buf_put_u32(&b, 0x89abcdefu);
    pd_buf_put_str(&b, "hi");
    pd_buf_put(&b, "xy", 2);
    static const uint8_t want[] = {0xab, 0x12, 0x34, 0x89, 0xab, 0xcd, 0xef, 'h', 'i', 0, 'x', 'y'};
    assert_true(pd_buf_ok(&b));
    assert_int_equal(b.len, sizeof want);
    assert_memory_equal(b.data, want, sizeof want);
    pd_buf_reset(&b);
    assert_int_equal(b.len, 0);

    size_t start = pd_buf_begin_msg(&b, 'Q');
    pd_buf_put_str(&b, "abc");
    pd_buf_end_msg(&b, start);
    static const uint8_t msg[] = {'Q', 0, 0, 0, 8, 'a', 'b', 'c', 0};
    assert_int_equal(b.len, sizeof msg);
    assert_memory_equal(b.data, msg, sizeof msg);

    /* Type 0: a startup packet, whose length is the first thing in it. */
    pd_buf_reset(&b);
    start = pd_buf_begin_msg(&b, 0);
    pd_buf_put_u32(&b, 7);
    pd_buf_end_msg(&b, start);
    static const uint8_t pkt[] = {0, 0, 0, 8, 0, 0, 0, 7};
    assert_int_equal(b.len, sizeof pkt);
    assert_memory_equal(b.data, pkt, sizeof pkt);
    pd_buf_free(&b);
    assert_null(b.data);
    assert_int_equal(b.len, 0);
}

/* Growth keeps earlier bytes when the buffer is reallocated many times. */
static void test_buf_growth(void **state)
{
    (void)state;
    pd_buf_t b;
    pd_buf_init(&b);
    for (uint32_t i = 0; i < 10000; i++)
        pd_buf_put_u32(&b, i);
    assert_true(pd_buf_ok(&b));
    assert_int_equal(b.len, 40000);
    pd_reader_t r;
    pd_reader_init(&r, b.data, b.len);
    for (uint32_t i = 0; i < 10000; i++)
        assert_int_equal(pd_read_u32(&r), i);
    assert_true(pd_reader_done(&r));
    pd_buf_free(&b);
}

static void test_reader(void **state)
{
    (void)state;
    static const uint8_t data[] = {1, 0, 2, 0xff, 0xff, 0xff, 0xfe, 'a', 'b', 0, 'z'};
    pd_reader_t r;
    pd_reader_init(&r, data, sizeof data);
    assert_int_equal(pd_read_u8(&r), 1);
    assert_int_equal(pd_read_u16(&r), 2);
    assert_int_equal(pd_read_i32(&r), -2);
    assert_string_equal(pd_read_str(&r), "ab");
    assert_false(pd_reader_done(&r)); /* 'z' is left */
    assert_ptr_equal(pd_read_bytes(&r, 1), data + 10);
    assert_true(pd_reader_done(&r));
    /* Underflow: zero, and the error sticks even for reads that would fit. */
    assert_int_equal(pd_read_u8(&r), 0);
    assert_true(r.err);
    pd_reader_init(&r, data, 3);
    assert_int_equal(pd_read_u32(&r), 0);
    assert_true(r.err);
    assert_int_equal(pd_read_u8(&r), 0);
    assert_false(pd_reader_done(&r));
    /* A string without its NUL inside the range is an error, not a read past it. */
    pd_reader_init(&r, data + 7, 2);
    assert_null(pd_read_str(&r));
    assert_true(r.err);
    pd_reader_init(&r, data, 2);
    assert_null(pd_read_bytes(&r, 3));
    assert_true(r.err);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_names),    cmocka_unit_test(test_every_type_byte),
        cmocka_unit_test(test_length_bounds), cmocka_unit_test(test_incomplete_and_early),
        cmocka_unit_test(test_buf_encoding),  cmocka_unit_test(test_buf_growth),
        cmocka_unit_test(test_reader),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
