/*
 * fuzz_startup.c — libFuzzer target for the first packet a client sends: the input is
 * given to pd_startup_decode as it arrives, and what it accepts must point inside the
 * packet, re-encode to the same bytes, and not be accepted from any shorter prefix.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol/wire.h"

static void check_str(const char *s, const uint8_t *pkt, size_t len)
{
    if (s == NULL || (const uint8_t *)s < pkt + 8 || (const uint8_t *)s >= pkt + len ||
        memchr(s, '\0', (size_t)(pkt + len - (const uint8_t *)s)) == NULL)
        abort();
}

/* A StartupMessage: its parameters are in the packet, and re-encoding (which always
 * writes version 3.0) gives the same bytes but for the version. */
static void check_startup_message(const pd_startup_t *s, const uint8_t *pkt, size_t len)
{
    if (s->user == NULL || s->user[0] == '\0' || s->database == NULL || (s->version >> 16) != 3 ||
        s->nparams > PD_STARTUP_MAX_PARAMS)
        abort();
    for (unsigned i = 0; i < s->nparams; i++) {
        check_str(s->names[i], pkt, len);
        check_str(s->values[i], pkt, len);
    }
    pd_buf_t b;
    pd_buf_init(&b);
    pd_fe_startup(&b, s->nparams, s->names, s->values);
    if (!pd_buf_ok(&b) || b.len != len || memcmp(b.data, pkt, 4) != 0 ||
        memcmp(b.data + 8, pkt + 8, len - 8) != 0)
        abort();
    pd_buf_free(&b);
}

static void check_accepted(const pd_startup_t *s, const uint8_t *pkt, size_t len)
{
    if (s->kind == PD_STARTUP_MESSAGE) {
        check_startup_message(s, pkt, len);
        return;
    }
    size_t want = s->kind == PD_STARTUP_CANCEL ? 16 : 8;
    if (len != want)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    pd_startup_t s;
    const char *err = NULL, *sqlstate = NULL;
    long rc = pd_startup_decode(data, size, &s, &err, &sqlstate);
    if (rc < -1 || rc > (long)size || (rc == -1 && (err == NULL || sqlstate == NULL)))
        abort();
    if (rc <= 0)
        return 0;
    check_accepted(&s, data, (size_t)rc);
    /* One byte short of the packet is "need more", never a different verdict. */
    pd_startup_t t;
    if (pd_startup_decode(data, (size_t)rc - 1, &t, &err, &sqlstate) != 0)
        abort();
    return 0;
}
