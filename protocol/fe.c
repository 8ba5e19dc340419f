/*
 * fe.c — frontend (client -> server) messages: decoders for the bodies the proxy looks
 * into, a structural check for every frontend message type, and the encoders the proxy
 * and the tests use to speak as a client.
 *
 * Decoders work on the body only (just past the length field) and point into it; they
 * never allocate. The rules follow what PostgreSQL's exec_*_message() functions accept
 * (src/backend/tcop/postgres.c).
 */
#include "protocol/wire.h"

#include <string.h>

static pd_decode_rc_t fail(const char **err, const char *msg)
{
    *err = msg;
    return PD_DECODE_ERROR;
}

/* Ends every decoder: the body must have been consumed exactly, as pq_getmsgend demands. */
static pd_decode_rc_t finish(const pd_reader_t *r, const char **err)
{
    return pd_reader_done(r) ? PD_DECODE_OK : fail(err, "invalid message format");
}

/*
 * Skips n values of the form (int32 length, -1 = NULL; that many bytes), as found in
 * Bind and FunctionCall. Returns where they start; *len receives their byte length.
 */
static const uint8_t *read_values(pd_reader_t *r, uint16_t n, size_t *len)
{
    const uint8_t *start = r->p;
    for (uint16_t i = 0; i < n && !r->err; i++) {
        int32_t vlen = pd_read_i32(r);
        if (vlen < -1)
            r->err = true;
        else if (vlen > 0)
            (void)pd_read_bytes(r, (size_t)vlen);
    }
    *len = r->err ? 0 : (size_t)(r->p - start);
    return r->err ? NULL : start;
}

/* PostgreSQL accepts zero format codes (all text), one (for all) or one per value. */
static bool format_count_ok(uint16_t nformats, uint16_t nvalues)
{
    return nformats <= 1 || nformats == nvalues;
}

pd_decode_rc_t pd_fe_query_decode(const uint8_t *body, size_t n, pd_fe_query_t *out,
                                  const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->sql = pd_read_str(&r);
    return finish(&r, err);
}

pd_decode_rc_t pd_fe_parse_decode(const uint8_t *body, size_t n, pd_fe_parse_t *out,
                                  const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->name = pd_read_str(&r);
    out->sql = pd_read_str(&r);
    out->nparams = pd_read_u16(&r);
    out->param_types = pd_read_bytes(&r, (size_t)out->nparams * 4);
    return finish(&r, err);
}

pd_decode_rc_t pd_fe_bind_decode(const uint8_t *body, size_t n, pd_fe_bind_t *out, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->portal = pd_read_str(&r);
    out->statement = pd_read_str(&r);
    out->nformats = pd_read_u16(&r);
    out->formats = pd_read_bytes(&r, (size_t)out->nformats * 2);
    out->nparams = pd_read_u16(&r);
    out->params = read_values(&r, out->nparams, &out->params_len);
    out->nresult_formats = pd_read_u16(&r);
    out->result_formats = pd_read_bytes(&r, (size_t)out->nresult_formats * 2);
    pd_decode_rc_t rc = finish(&r, err);
    if (rc == PD_DECODE_OK && !format_count_ok(out->nformats, out->nparams))
        return fail(err, "bind message has a parameter format count not matching its "
                         "parameters");
    return rc;
}

pd_decode_rc_t pd_fe_target_decode(const uint8_t *body, size_t n, pd_fe_target_t *out,
                                   const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->kind = pd_read_u8(&r);
    out->name = pd_read_str(&r);
    pd_decode_rc_t rc = finish(&r, err);
    if (rc == PD_DECODE_OK && out->kind != 'S' && out->kind != 'P')
        return fail(err, "invalid Describe or Close message subtype");
    return rc;
}

pd_decode_rc_t pd_fe_execute_decode(const uint8_t *body, size_t n, pd_fe_execute_t *out,
                                    const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->portal = pd_read_str(&r);
    out->max_rows = pd_read_u32(&r);
    return finish(&r, err);
}

pd_decode_rc_t pd_fe_sasl_initial_decode(const uint8_t *body, size_t n, pd_fe_sasl_initial_t *out,
                                         const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->mechanism = pd_read_str(&r);
    out->len = pd_read_i32(&r);
    out->data = NULL;
    if (out->len < -1)
        r.err = true;
    else if (out->len >= 0)
        out->data = pd_read_bytes(&r, (size_t)out->len);
    return finish(&r, err);
}

/* FunctionCall: oid, argument formats, arguments, result format. */
static pd_decode_rc_t check_function_call(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    (void)pd_read_u32(&r);
    uint16_t nformats = pd_read_u16(&r);
    (void)pd_read_bytes(&r, (size_t)nformats * 2);
    uint16_t nargs = pd_read_u16(&r);
    size_t args_len;
    (void)read_values(&r, nargs, &args_len);
    (void)pd_read_u16(&r);
    pd_decode_rc_t rc = finish(&r, err);
    if (rc == PD_DECODE_OK && !format_count_ok(nformats, nargs))
        return fail(err, "function call message has an argument format count not matching "
                         "its arguments");
    return rc;
}

static pd_decode_rc_t check_string_body(const uint8_t *body, size_t n, const char **err)
{
    pd_fe_query_t q;
    return pd_fe_query_decode(body, n, &q, err);
}

static pd_decode_rc_t check_empty_body(size_t n, const char **err)
{
    return n == 0 ? PD_DECODE_OK : fail(err, "invalid message format");
}

static pd_decode_rc_t check_body(uint8_t type, const uint8_t *body, size_t n, const char **err)
{
    pd_fe_parse_t parse;
    pd_fe_bind_t bind;
    pd_fe_target_t target;
    pd_fe_execute_t exec;
    switch ((pd_fe_type_t)type) {
    case PD_FE_BIND:
        return pd_fe_bind_decode(body, n, &bind, err);
    case PD_FE_CLOSE:
    case PD_FE_DESCRIBE:
        return pd_fe_target_decode(body, n, &target, err);
    case PD_FE_EXECUTE:
        return pd_fe_execute_decode(body, n, &exec, err);
    case PD_FE_FUNCTION_CALL:
        return check_function_call(body, n, err);
    case PD_FE_PARSE:
        return pd_fe_parse_decode(body, n, &parse, err);
    case PD_FE_QUERY:
    case PD_FE_COPY_FAIL:
        return check_string_body(body, n, err);
    case PD_FE_FLUSH:
    case PD_FE_SYNC:
    case PD_FE_TERMINATE:
    case PD_FE_COPY_DONE:
        return check_empty_body(n, err);
    case PD_FE_COPY_DATA:
        return PD_DECODE_OK;
    case PD_FE_PASSWORD:
        /* 'p' is a PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse
         * depending on the authentication exchange, and the last two are raw bytes:
         * without that context any body is well formed. */
        return PD_DECODE_OK;
    }
    return fail(err, "invalid frontend message type");
}

pd_decode_rc_t pd_fe_message_check(const uint8_t *msg, size_t len, const char **err)
{
    pd_msg_hdr_t hdr;
    pd_decode_rc_t rc = pd_fe_header(msg, len, PD_MSG_MAX_LEN, &hdr, err);
    if (rc == PD_DECODE_INCOMPLETE)
        return fail(err, "invalid message length");
    if (rc != PD_DECODE_OK)
        return rc;
    if ((size_t)hdr.len + 1 != len)
        return fail(err, "invalid message length");
    return check_body(hdr.type, msg + PD_MSG_HEADER_LEN, len - PD_MSG_HEADER_LEN, err);
}

/* ---------------------------------------------------------------------------------------
 * Encoders.
 */

static void put_typed_string(pd_buf_t *b, uint8_t type, const char *s)
{
    size_t start = pd_buf_begin_msg(b, type);
    pd_buf_put_str(b, s);
    pd_buf_end_msg(b, start);
}

static void put_empty(pd_buf_t *b, uint8_t type)
{
    size_t start = pd_buf_begin_msg(b, type);
    pd_buf_end_msg(b, start);
}

static void put_target(pd_buf_t *b, uint8_t type, uint8_t kind, const char *name)
{
    size_t start = pd_buf_begin_msg(b, type);
    pd_buf_put_u8(b, kind);
    pd_buf_put_str(b, name);
    pd_buf_end_msg(b, start);
}

void pd_fe_query(pd_buf_t *b, const char *sql)
{
    put_typed_string(b, PD_FE_QUERY, sql);
}

/* param_types may be NULL: every parameter's type is then left to the server (OID 0). */
void pd_fe_parse(pd_buf_t *b, const char *name, const char *sql, uint16_t nparams,
                 const uint32_t *param_types)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_PARSE);
    pd_buf_put_str(b, name);
    pd_buf_put_str(b, sql);
    pd_buf_put_u16(b, nparams);
    for (uint16_t i = 0; i < nparams; i++)
        pd_buf_put_u32(b, param_types ? param_types[i] : 0);
    pd_buf_end_msg(b, start);
}

/*
 * Puts one value: lengths[i] = -1 (or, without lengths, a NULL value) is SQL NULL;
 * without lengths the values are NUL-terminated strings.
 */
static void put_value(pd_buf_t *b, const char *value, const int32_t *lengths, uint16_t i)
{
    int32_t len = lengths ? lengths[i] : (value ? (int32_t)strlen(value) : -1);
    if (value == NULL || len < 0) {
        pd_buf_put_u32(b, UINT32_MAX); /* -1 */
        return;
    }
    pd_buf_put_u32(b, (uint32_t)len);
    pd_buf_put(b, value, (size_t)len);
}

/* formats (one per parameter) may be NULL for all text; so may result_formats. */
void pd_fe_bind(pd_buf_t *b, const char *portal, const char *statement, uint16_t nparams,
                const char *const *values, const int32_t *lengths, const int16_t *formats,
                uint16_t nresult_formats, const int16_t *result_formats)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_BIND);
    pd_buf_put_str(b, portal);
    pd_buf_put_str(b, statement);
    uint16_t nformats = formats ? nparams : 0;
    pd_buf_put_u16(b, nformats);
    for (uint16_t i = 0; i < nformats; i++)
        pd_buf_put_u16(b, (uint16_t)formats[i]);
    pd_buf_put_u16(b, nparams);
    for (uint16_t i = 0; i < nparams; i++)
        put_value(b, values ? values[i] : NULL, lengths, i);
    if (result_formats == NULL)
        nresult_formats = 0;
    pd_buf_put_u16(b, nresult_formats);
    for (uint16_t i = 0; i < nresult_formats; i++)
        pd_buf_put_u16(b, (uint16_t)result_formats[i]);
    pd_buf_end_msg(b, start);
}

void pd_fe_describe(pd_buf_t *b, uint8_t kind, const char *name)
{
    put_target(b, PD_FE_DESCRIBE, kind, name);
}

void pd_fe_close(pd_buf_t *b, uint8_t kind, const char *name)
{
    put_target(b, PD_FE_CLOSE, kind, name);
}

void pd_fe_execute(pd_buf_t *b, const char *portal, uint32_t max_rows)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_EXECUTE);
    pd_buf_put_str(b, portal);
    pd_buf_put_u32(b, max_rows);
    pd_buf_end_msg(b, start);
}

void pd_fe_sync(pd_buf_t *b)
{
    put_empty(b, PD_FE_SYNC);
}

void pd_fe_flush(pd_buf_t *b)
{
    put_empty(b, PD_FE_FLUSH);
}

void pd_fe_terminate(pd_buf_t *b)
{
    put_empty(b, PD_FE_TERMINATE);
}

void pd_fe_copy_data(pd_buf_t *b, const void *data, size_t n)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_COPY_DATA);
    pd_buf_put(b, data, n);
    pd_buf_end_msg(b, start);
}

void pd_fe_copy_done(pd_buf_t *b)
{
    put_empty(b, PD_FE_COPY_DONE);
}

void pd_fe_copy_fail(pd_buf_t *b, const char *message)
{
    put_typed_string(b, PD_FE_COPY_FAIL, message);
}

/* data == NULL sends length -1: "no initial response". */
void pd_fe_sasl_initial(pd_buf_t *b, const char *mechanism, const void *data, size_t n)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_PASSWORD);
    pd_buf_put_str(b, mechanism);
    if (data == NULL) {
        pd_buf_put_u32(b, UINT32_MAX);
    } else if (n > INT32_MAX) {
        b->failed = true;
    } else {
        pd_buf_put_u32(b, (uint32_t)n);
        pd_buf_put(b, data, n);
    }
    pd_buf_end_msg(b, start);
}

void pd_fe_sasl_response(pd_buf_t *b, const void *data, size_t n)
{
    size_t start = pd_buf_begin_msg(b, PD_FE_PASSWORD);
    pd_buf_put(b, data, n);
    pd_buf_end_msg(b, start);
}
