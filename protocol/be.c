/*
 * be.c — backend (server -> client) messages: decoders for the bodies the proxy looks
 * into, a structural check for every backend message type, and the encoders the proxy
 * uses when it answers a client itself (errors, authentication, its admin results).
 *
 * Decoders work on the body only (just past the length field), point into it and never
 * allocate. Layouts follow the "Message Formats" chapter of the PostgreSQL docs.
 */
#include "protocol/wire.h"

#include <string.h>

static pd_decode_rc_t fail(const char **err, const char *msg)
{
    *err = msg;
    return PD_DECODE_ERROR;
}

/* Ends every decoder: the body must have been consumed exactly. */
static pd_decode_rc_t finish(const pd_reader_t *r, const char **err)
{
    return pd_reader_done(r) ? PD_DECODE_OK : fail(err, "invalid message format");
}

/* Where a field of an ErrorResponse goes; NULL for the fields nobody asks for. */
static const char **error_slot(pd_be_error_t *e, const char **severity_s, uint8_t code)
{
    switch (code) {
    case 'S':
        return severity_s;
    case 'V':
        return &e->severity;
    case 'C':
        return &e->sqlstate;
    case 'M':
        return &e->message;
    case 'D':
        return &e->detail;
    case 'H':
        return &e->hint;
    default:
        return NULL;
    }
}

/*
 * ErrorResponse and NoticeResponse: (code byte, string) fields ended by a zero byte.
 * Fields we do not name are skipped; all of them must be terminated.
 */
pd_decode_rc_t pd_be_error_decode(const uint8_t *body, size_t n, pd_be_error_t *out,
                                  const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    memset(out, 0, sizeof *out);
    const char *severity_s = NULL;
    uint8_t code;
    while ((code = pd_read_u8(&r)) != 0) {
        const char *value = pd_read_str(&r);
        const char **slot = error_slot(out, &severity_s, code);
        if (slot != NULL)
            *slot = value;
    }
    /* 'V' (never localized) is preferred; servers before 9.6 send only 'S'. */
    if (out->severity == NULL)
        out->severity = severity_s;
    return finish(&r, err);
}

/* The mechanism list of AuthenticationSASL: names, each NUL-terminated, then a NUL. */
static bool sasl_list_ok(const uint8_t *p, size_t n)
{
    pd_reader_t r;
    pd_reader_init(&r, p, n);
    const char *name;
    unsigned count = 0;
    while ((name = pd_read_str(&r)) != NULL && name[0] != '\0')
        count++;
    return count > 0 && pd_reader_done(&r);
}

/* Whether the payload of an Authentication message fits its code. */
static bool auth_payload_ok(int32_t code, const uint8_t *p, size_t n)
{
    switch (code) {
    case PD_AUTH_OK:
    case 2: /* KerberosV5 */
    case PD_AUTH_CLEARTEXT:
    case 7: /* GSS */
    case 9: /* SSPI */
        return n == 0;
    case PD_AUTH_MD5:
        return n == 4; /* the salt */
    case PD_AUTH_SASL:
        return sasl_list_ok(p, n);
    case 8: /* GSSContinue */
    case PD_AUTH_SASL_CONTINUE:
    case PD_AUTH_SASL_FINAL:
        return true;
    default:
        return false;
    }
}

pd_decode_rc_t pd_be_auth_decode(const uint8_t *body, size_t n, pd_be_auth_t *out, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->code = pd_read_i32(&r);
    out->len = r.n;
    out->data = pd_read_bytes(&r, r.n);
    if (r.err)
        return fail(err, "invalid message format");
    if (!auth_payload_ok(out->code, out->data, out->len))
        return fail(err, "invalid authentication request");
    return PD_DECODE_OK;
}

pd_decode_rc_t pd_be_ready_decode(const uint8_t *body, size_t n, uint8_t *status, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    *status = pd_read_u8(&r);
    pd_decode_rc_t rc = finish(&r, err);
    if (rc == PD_DECODE_OK && *status != 'I' && *status != 'T' && *status != 'E')
        return fail(err, "invalid transaction status in ReadyForQuery");
    return rc;
}

/* Skips n values of the form (int32 length, -1 = NULL; that many bytes). */
static const uint8_t *read_values(pd_reader_t *r, uint32_t n, size_t *len)
{
    const uint8_t *start = r->p;
    for (uint32_t i = 0; i < n && !r->err; i++) {
        int32_t vlen = pd_read_i32(r);
        if (vlen < -1)
            r->err = true;
        else if (vlen > 0)
            (void)pd_read_bytes(r, (size_t)vlen);
    }
    *len = r->err ? 0 : (size_t)(r->p - start);
    return r->err ? NULL : start;
}

pd_decode_rc_t pd_be_data_row_decode(const uint8_t *body, size_t n, pd_be_data_row_t *out,
                                     const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->ncolumns = pd_read_u16(&r);
    out->columns = read_values(&r, out->ncolumns, &out->columns_len);
    return finish(&r, err);
}

/* Each field after its name: table oid, attnum, type oid, typlen, typmod, format. */
#define ROW_FIELD_FIXED_LEN (4 + 2 + 4 + 2 + 4 + 2)

pd_decode_rc_t pd_be_row_description_decode(const uint8_t *body, size_t n,
                                            pd_be_row_description_t *out, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    out->nfields = pd_read_u16(&r);
    out->fields = r.p;
    for (uint16_t i = 0; i < out->nfields && !r.err; i++) {
        (void)pd_read_str(&r);
        (void)pd_read_bytes(&r, ROW_FIELD_FIXED_LEN);
    }
    out->fields_len = r.err ? 0 : (size_t)(r.p - out->fields);
    return finish(&r, err);
}

pd_decode_rc_t pd_be_command_complete_decode(const uint8_t *body, size_t n, const char **tag,
                                             const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    *tag = pd_read_str(&r);
    return finish(&r, err);
}

pd_decode_rc_t pd_be_param_status_decode(const uint8_t *body, size_t n, const char **name,
                                         const char **value, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    *name = pd_read_str(&r);
    *value = pd_read_str(&r);
    return finish(&r, err);
}

pd_decode_rc_t pd_be_backend_key_decode(const uint8_t *body, size_t n, uint32_t *pid, uint32_t *key,
                                        const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    *pid = pd_read_u32(&r);
    *key = pd_read_u32(&r);
    return finish(&r, err);
}

/* CopyInResponse, CopyOutResponse, CopyBothResponse: format, column count, formats. */
static pd_decode_rc_t check_copy_response(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    (void)pd_read_u8(&r);
    uint16_t ncols = pd_read_u16(&r);
    (void)pd_read_bytes(&r, (size_t)ncols * 2);
    return finish(&r, err);
}

static pd_decode_rc_t check_function_result(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    size_t len;
    (void)read_values(&r, 1, &len);
    return finish(&r, err);
}

static pd_decode_rc_t check_negotiate_version(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    (void)pd_read_u32(&r);
    uint32_t noptions = pd_read_u32(&r);
    /* Each option takes at least one byte, so a count above what is left is malformed;
     * checking that first keeps a hostile count from spinning the loop. */
    if (noptions > r.n)
        return fail(err, "invalid message format");
    for (uint32_t i = 0; i < noptions && !r.err; i++)
        (void)pd_read_str(&r);
    return finish(&r, err);
}

static pd_decode_rc_t check_notification(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    (void)pd_read_u32(&r);
    (void)pd_read_str(&r);
    (void)pd_read_str(&r);
    return finish(&r, err);
}

static pd_decode_rc_t check_param_description(const uint8_t *body, size_t n, const char **err)
{
    pd_reader_t r;
    pd_reader_init(&r, body, n);
    uint16_t nparams = pd_read_u16(&r);
    (void)pd_read_bytes(&r, (size_t)nparams * 4);
    return finish(&r, err);
}

static pd_decode_rc_t check_empty_body(size_t n, const char **err)
{
    return n == 0 ? PD_DECODE_OK : fail(err, "invalid message format");
}

/* The types whose check is a decoder with out-parameters we then ignore. */
static pd_decode_rc_t check_decoded(uint8_t type, const uint8_t *body, size_t n, const char **err)
{
    pd_be_error_t error;
    pd_be_auth_t auth;
    pd_be_data_row_t row;
    pd_be_row_description_t desc;
    const char *s1, *s2;
    uint32_t u1, u2;
    uint8_t status;
    switch (type) {
    case PD_BE_AUTH:
        return pd_be_auth_decode(body, n, &auth, err);
    case PD_BE_BACKEND_KEY:
        return pd_be_backend_key_decode(body, n, &u1, &u2, err);
    case PD_BE_COMMAND_COMPLETE:
        return pd_be_command_complete_decode(body, n, &s1, err);
    case PD_BE_DATA_ROW:
        return pd_be_data_row_decode(body, n, &row, err);
    case PD_BE_ERROR:
    case PD_BE_NOTICE:
        return pd_be_error_decode(body, n, &error, err);
    case PD_BE_PARAMETER_STATUS:
        return pd_be_param_status_decode(body, n, &s1, &s2, err);
    case PD_BE_READY:
        return pd_be_ready_decode(body, n, &status, err);
    case PD_BE_ROW_DESCRIPTION:
        return pd_be_row_description_decode(body, n, &desc, err);
    default:
        return fail(err, "invalid backend message type");
    }
}

static pd_decode_rc_t check_body(uint8_t type, const uint8_t *body, size_t n, const char **err)
{
    switch ((pd_be_type_t)type) {
    case PD_BE_BIND_COMPLETE:
    case PD_BE_CLOSE_COMPLETE:
    case PD_BE_COPY_DONE:
    case PD_BE_EMPTY_QUERY:
    case PD_BE_NO_DATA:
    case PD_BE_PARSE_COMPLETE:
    case PD_BE_PORTAL_SUSPENDED:
        return check_empty_body(n, err);
    case PD_BE_COPY_DATA:
        return PD_DECODE_OK;
    case PD_BE_COPY_IN:
    case PD_BE_COPY_OUT:
    case PD_BE_COPY_BOTH:
        return check_copy_response(body, n, err);
    case PD_BE_FUNCTION_RESULT:
        return check_function_result(body, n, err);
    case PD_BE_NEGOTIATE_VERSION:
        return check_negotiate_version(body, n, err);
    case PD_BE_NOTIFICATION:
        return check_notification(body, n, err);
    case PD_BE_PARAMETER_DESCRIPTION:
        return check_param_description(body, n, err);
    default:
        return check_decoded(type, body, n, err);
    }
}

pd_decode_rc_t pd_be_message_check(const uint8_t *msg, size_t len, const char **err)
{
    pd_msg_hdr_t hdr;
    pd_decode_rc_t rc = pd_be_header(msg, len, PD_MSG_MAX_LEN, &hdr, err);
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

static void put_empty(pd_buf_t *b, uint8_t type)
{
    size_t start = pd_buf_begin_msg(b, type);
    pd_buf_end_msg(b, start);
}

static void put_field(pd_buf_t *b, uint8_t code, const char *value)
{
    if (value == NULL)
        return;
    pd_buf_put_u8(b, code);
    pd_buf_put_str(b, value);
}

static void put_error_fields(pd_buf_t *b, uint8_t type, const char *severity, const char *sqlstate,
                             const char *message, const char *detail, const char *hint)
{
    size_t start = pd_buf_begin_msg(b, type);
    put_field(b, 'S', severity);
    put_field(b, 'V', severity);
    put_field(b, 'C', sqlstate);
    put_field(b, 'M', message);
    put_field(b, 'D', detail);
    put_field(b, 'H', hint);
    pd_buf_put_u8(b, 0);
    pd_buf_end_msg(b, start);
}

void pd_be_error(pd_buf_t *b, const char *severity, const char *sqlstate, const char *message,
                 const char *detail, const char *hint)
{
    put_error_fields(b, PD_BE_ERROR, severity, sqlstate, message, detail, hint);
}

void pd_be_notice(pd_buf_t *b, const char *severity, const char *sqlstate, const char *message)
{
    put_error_fields(b, PD_BE_NOTICE, severity, sqlstate, message, NULL, NULL);
}

static void put_auth(pd_buf_t *b, uint32_t code, const void *data, size_t n)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_AUTH);
    pd_buf_put_u32(b, code);
    pd_buf_put(b, data, n);
    pd_buf_end_msg(b, start);
}

void pd_be_auth_ok(pd_buf_t *b)
{
    put_auth(b, PD_AUTH_OK, NULL, 0);
}

void pd_be_auth_sasl(pd_buf_t *b, const char *const *mechanisms, unsigned n)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_AUTH);
    pd_buf_put_u32(b, PD_AUTH_SASL);
    for (unsigned i = 0; i < n; i++)
        pd_buf_put_str(b, mechanisms[i]);
    pd_buf_put_u8(b, 0);
    pd_buf_end_msg(b, start);
}

void pd_be_auth_sasl_continue(pd_buf_t *b, const void *data, size_t n)
{
    put_auth(b, PD_AUTH_SASL_CONTINUE, data, n);
}

void pd_be_auth_sasl_final(pd_buf_t *b, const void *data, size_t n)
{
    put_auth(b, PD_AUTH_SASL_FINAL, data, n);
}

void pd_be_param_status(pd_buf_t *b, const char *name, const char *value)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_PARAMETER_STATUS);
    pd_buf_put_str(b, name);
    pd_buf_put_str(b, value);
    pd_buf_end_msg(b, start);
}

void pd_be_backend_key(pd_buf_t *b, uint32_t pid, uint32_t key)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_BACKEND_KEY);
    pd_buf_put_u32(b, pid);
    pd_buf_put_u32(b, key);
    pd_buf_end_msg(b, start);
}

void pd_be_ready(pd_buf_t *b, uint8_t status)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_READY);
    pd_buf_put_u8(b, status);
    pd_buf_end_msg(b, start);
}

void pd_be_negotiate_version(pd_buf_t *b, uint32_t newest_minor, unsigned noptions,
                             const char *const *unrecognized)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_NEGOTIATE_VERSION);
    pd_buf_put_u32(b, newest_minor);
    pd_buf_put_u32(b, noptions);
    for (unsigned i = 0; i < noptions; i++)
        pd_buf_put_str(b, unrecognized[i]);
    pd_buf_end_msg(b, start);
}

void pd_be_command_complete(pd_buf_t *b, const char *tag)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_COMMAND_COMPLETE);
    pd_buf_put_str(b, tag);
    pd_buf_end_msg(b, start);
}

/* Fields are described as text-format values of a varlena type not from any table, as
 * PostgreSQL describes the result of an expression: table 0, attnum 0, typlen -1,
 * typmod -1. type_oids may be NULL for all text (OID 25). */
void pd_be_row_description(pd_buf_t *b, uint16_t nfields, const char *const *names,
                           const uint32_t *type_oids)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_ROW_DESCRIPTION);
    pd_buf_put_u16(b, nfields);
    for (uint16_t i = 0; i < nfields; i++) {
        pd_buf_put_str(b, names[i]);
        pd_buf_put_u32(b, 0);
        pd_buf_put_u16(b, 0);
        pd_buf_put_u32(b, type_oids ? type_oids[i] : 25u);
        pd_buf_put_u16(b, UINT16_MAX); /* typlen -1 */
        pd_buf_put_u32(b, UINT32_MAX); /* typmod -1 */
        pd_buf_put_u16(b, 0);
    }
    pd_buf_end_msg(b, start);
}

/* lengths may be NULL: values are then NUL-terminated strings, a NULL pointer SQL NULL. */
void pd_be_data_row(pd_buf_t *b, uint16_t ncolumns, const char *const *values,
                    const int32_t *lengths)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_DATA_ROW);
    pd_buf_put_u16(b, ncolumns);
    for (uint16_t i = 0; i < ncolumns; i++) {
        int32_t len = lengths ? lengths[i] : (values[i] ? (int32_t)strlen(values[i]) : -1);
        if (values[i] == NULL || len < 0) {
            pd_buf_put_u32(b, UINT32_MAX); /* -1: NULL */
            continue;
        }
        pd_buf_put_u32(b, (uint32_t)len);
        pd_buf_put(b, values[i], (size_t)len);
    }
    pd_buf_end_msg(b, start);
}

void pd_be_empty_query(pd_buf_t *b)
{
    put_empty(b, PD_BE_EMPTY_QUERY);
}

void pd_be_parse_complete(pd_buf_t *b)
{
    put_empty(b, PD_BE_PARSE_COMPLETE);
}

void pd_be_bind_complete(pd_buf_t *b)
{
    put_empty(b, PD_BE_BIND_COMPLETE);
}

void pd_be_no_data(pd_buf_t *b)
{
    put_empty(b, PD_BE_NO_DATA);
}

void pd_be_copy_data(pd_buf_t *b, const void *data, size_t n)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_COPY_DATA);
    pd_buf_put(b, data, n);
    pd_buf_end_msg(b, start);
}

void pd_be_notification(pd_buf_t *b, uint32_t pid, const char *channel, const char *payload)
{
    size_t start = pd_buf_begin_msg(b, PD_BE_NOTIFICATION);
    pd_buf_put_u32(b, pid);
    pd_buf_put_str(b, channel);
    pd_buf_put_str(b, payload);
    pd_buf_end_msg(b, start);
}
