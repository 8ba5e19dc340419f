/*
 * startup.c — the packets a client sends before the message stream begins:
 * StartupMessage, SSLRequest, GSSENCRequest and CancelRequest (decoding and encoding).
 *
 * The checks and their wording follow PostgreSQL's ProcessStartupPacket()
 * (src/backend/postmaster/postmaster.c), so that a client talking to pgdual sees the
 * same errors it would see from the server.
 */
#include "protocol/wire.h"

#include <string.h>

#define STARTUP_FIXED_LEN 8u  /* int32 length + int32 code */
#define CANCEL_LEN        16u /* + int32 pid + int32 key */

static uint32_t get_u32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static long startup_fail(const char **err, const char **sqlstate, const char *msg,
                         const char *state)
{
    *err = msg;
    *sqlstate = state;
    return -1;
}

static long bad_length(const char **err, const char **sqlstate)
{
    return startup_fail(err, sqlstate, "invalid length of startup packet", "08P01");
}

/*
 * Walks the name\0value\0...\0 list of a StartupMessage. The caller has checked that the
 * last byte is NUL, so every string found here is terminated inside the packet.
 */
static long decode_params(const uint8_t *buf, uint32_t len, pd_startup_t *out, const char **err,
                          const char **sqlstate)
{
    uint32_t off = STARTUP_FIXED_LEN;
    while (off < len && buf[off] != '\0') {
        const char *name = (const char *)buf + off;
        uint32_t voff = off + (uint32_t)strlen(name) + 1;
        if (voff >= len)
            break; /* a name without a value: reported as a bad layout below */
        const char *value = (const char *)buf + voff;
        if (out->nparams == PD_STARTUP_MAX_PARAMS)
            return startup_fail(err, sqlstate, "too many parameters in startup packet", "08P01");
        out->names[out->nparams] = name;
        out->values[out->nparams] = value;
        out->nparams++;
        /* A repeated "user" or "database" wins, as in PostgreSQL, where the last one
         * overwrites the earlier ones. */
        if (strcmp(name, "user") == 0)
            out->user = value;
        else if (strcmp(name, "database") == 0)
            out->database = value;
        off = voff + (uint32_t)strlen(value) + 1;
    }
    if (off != len - 1)
        return startup_fail(err, sqlstate,
                            "invalid startup packet layout: expected terminator as last byte",
                            "08P01");
    return (long)len;
}

static long decode_startup_message(const uint8_t *buf, uint32_t len, uint32_t code,
                                   pd_startup_t *out, const char **err, const char **sqlstate)
{
    /* Only the major version is ours to check; a newer minor version is answered with
     * NegotiateProtocolVersion by the caller, as PostgreSQL does. */
    if ((code >> 16) != (PD_PROTOCOL_V3 >> 16))
        return startup_fail(err, sqlstate, "unsupported frontend protocol", "0A000");
    out->kind = PD_STARTUP_MESSAGE;
    out->version = code;
    if (len <= STARTUP_FIXED_LEN || buf[len - 1] != '\0')
        return startup_fail(err, sqlstate,
                            "invalid startup packet layout: expected terminator as last byte",
                            "08P01");
    long rc = decode_params(buf, len, out, err, sqlstate);
    if (rc < 0)
        return rc;
    if (out->user == NULL || out->user[0] == '\0')
        return startup_fail(err, sqlstate, "no PostgreSQL user name specified in startup packet",
                            "28000");
    if (out->database == NULL || out->database[0] == '\0')
        out->database = out->user;
    return rc;
}

long pd_startup_decode(const uint8_t *buf, size_t n, pd_startup_t *out, const char **err,
                       const char **sqlstate)
{
    if (n < 4)
        return 0;
    /* The length is judged before waiting for the rest, so that a client cannot make us
     * hold more than PD_STARTUP_MAX_LEN bytes for it. */
    uint32_t len = get_u32(buf);
    if (len < STARTUP_FIXED_LEN || len > PD_STARTUP_MAX_LEN)
        return bad_length(err, sqlstate);
    if (n < len)
        return 0;
    memset(out, 0, sizeof *out);
    uint32_t code = get_u32(buf + 4);
    switch (code) {
    case PD_SSL_REQUEST_CODE:
    case PD_GSSENC_REQUEST_CODE:
        if (len != STARTUP_FIXED_LEN)
            return bad_length(err, sqlstate);
        out->kind = code == PD_SSL_REQUEST_CODE ? PD_STARTUP_SSL : PD_STARTUP_GSSENC;
        return (long)len;
    case PD_CANCEL_REQUEST_CODE:
        if (len != CANCEL_LEN)
            return bad_length(err, sqlstate);
        out->kind = PD_STARTUP_CANCEL;
        out->cancel_pid = get_u32(buf + 8);
        out->cancel_key = get_u32(buf + 12);
        return (long)len;
    default:
        return decode_startup_message(buf, len, code, out, err, sqlstate);
    }
}

void pd_fe_startup(pd_buf_t *b, unsigned nparams, const char *const *names,
                   const char *const *values)
{
    size_t start = pd_buf_begin_msg(b, 0);
    pd_buf_put_u32(b, PD_PROTOCOL_V3);
    for (unsigned i = 0; i < nparams; i++) {
        pd_buf_put_str(b, names[i]);
        pd_buf_put_str(b, values[i]);
    }
    pd_buf_put_u8(b, 0);
    pd_buf_end_msg(b, start);
}

static void put_request(pd_buf_t *b, uint32_t code)
{
    size_t start = pd_buf_begin_msg(b, 0);
    pd_buf_put_u32(b, code);
    pd_buf_end_msg(b, start);
}

void pd_fe_ssl_request(pd_buf_t *b)
{
    put_request(b, PD_SSL_REQUEST_CODE);
}

void pd_fe_gssenc_request(pd_buf_t *b)
{
    put_request(b, PD_GSSENC_REQUEST_CODE);
}

void pd_fe_cancel_request(pd_buf_t *b, uint32_t pid, uint32_t key)
{
    size_t start = pd_buf_begin_msg(b, 0);
    pd_buf_put_u32(b, PD_CANCEL_REQUEST_CODE);
    pd_buf_put_u32(b, pid);
    pd_buf_put_u32(b, key);
    pd_buf_end_msg(b, start);
}
