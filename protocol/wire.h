/*
 * wire.h — the PostgreSQL v3 frontend/backend protocol as pure functions over buffers.
 *
 * This module owns framing, decoding and encoding of protocol messages, the startup
 * packets (StartupMessage, SSLRequest, GSSENCRequest, CancelRequest) and the server side
 * of SCRAM-SHA-256 (scram.h). It has no sockets and no globals: every function works on
 * a pointer and a length given by the caller, which is what the fuzzers call.
 *
 * Decoders never read past the length they are given and never allocate; decoded
 * strings and byte ranges point into the caller's buffer. Encoders append to a pd_buf_t.
 */
#ifndef PD_PROTOCOL_WIRE_H
#define PD_PROTOCOL_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define PD_MUST_CHECK __attribute__((warn_unused_result))
#else
#define PD_MUST_CHECK
#endif

/* Protocol constants. */
#define PD_PROTOCOL_V3         0x00030000u
#define PD_CANCEL_REQUEST_CODE 80877102u
#define PD_SSL_REQUEST_CODE    80877103u
#define PD_GSSENC_REQUEST_CODE 80877104u
#define PD_STARTUP_MAX_LEN     10000u /* PostgreSQL's MAX_STARTUP_PACKET_LENGTH */
#define PD_STARTUP_MAX_PARAMS  64u
#define PD_MSG_HEADER_LEN      5u          /* type byte + int32 length */
#define PD_MSG_MAX_LEN         0x3fffffffu /* 1 GB - 1, PostgreSQL's PQ_LARGE_MESSAGE_LIMIT */

/*
 * Message type bytes, one X-macro per direction so that the enum, the name and the
 * validity check cannot drift. FE = sent by the client, BE = sent by the server.
 */
#define PD_FE_MESSAGES(X)                                                                          \
    X('B', BIND, "Bind")                                                                           \
    X('C', CLOSE, "Close")                                                                         \
    X('D', DESCRIBE, "Describe")                                                                   \
    X('E', EXECUTE, "Execute")                                                                     \
    X('F', FUNCTION_CALL, "FunctionCall")                                                          \
    X('H', FLUSH, "Flush")                                                                         \
    X('P', PARSE, "Parse")                                                                         \
    X('Q', QUERY, "Query")                                                                         \
    X('S', SYNC, "Sync")                                                                           \
    X('X', TERMINATE, "Terminate")                                                                 \
    X('c', COPY_DONE, "CopyDone")                                                                  \
    X('d', COPY_DATA, "CopyData")                                                                  \
    X('f', COPY_FAIL, "CopyFail")                                                                  \
    X('p', PASSWORD, "PasswordMessage")

#define PD_BE_MESSAGES(X)                                                                          \
    X('R', AUTH, "Authentication")                                                                 \
    X('K', BACKEND_KEY, "BackendKeyData")                                                          \
    X('2', BIND_COMPLETE, "BindComplete")                                                          \
    X('3', CLOSE_COMPLETE, "CloseComplete")                                                        \
    X('C', COMMAND_COMPLETE, "CommandComplete")                                                    \
    X('d', COPY_DATA, "CopyData")                                                                  \
    X('c', COPY_DONE, "CopyDone")                                                                  \
    X('G', COPY_IN, "CopyInResponse")                                                              \
    X('H', COPY_OUT, "CopyOutResponse")                                                            \
    X('W', COPY_BOTH, "CopyBothResponse")                                                          \
    X('D', DATA_ROW, "DataRow")                                                                    \
    X('I', EMPTY_QUERY, "EmptyQueryResponse")                                                      \
    X('E', ERROR, "ErrorResponse")                                                                 \
    X('V', FUNCTION_RESULT, "FunctionCallResponse")                                                \
    X('v', NEGOTIATE_VERSION, "NegotiateProtocolVersion")                                          \
    X('n', NO_DATA, "NoData")                                                                      \
    X('N', NOTICE, "NoticeResponse")                                                               \
    X('A', NOTIFICATION, "NotificationResponse")                                                   \
    X('t', PARAMETER_DESCRIPTION, "ParameterDescription")                                          \
    X('S', PARAMETER_STATUS, "ParameterStatus")                                                    \
    X('1', PARSE_COMPLETE, "ParseComplete")                                                        \
    X('s', PORTAL_SUSPENDED, "PortalSuspended")                                                    \
    X('Z', READY, "ReadyForQuery")                                                                 \
    X('T', ROW_DESCRIPTION, "RowDescription")

#define PD__FE_ENUM(ch, id, name) PD_FE_##id = ch,
#define PD__BE_ENUM(ch, id, name) PD_BE_##id = ch,
typedef enum { PD_FE_MESSAGES(PD__FE_ENUM) } pd_fe_type_t;
typedef enum { PD_BE_MESSAGES(PD__BE_ENUM) } pd_be_type_t;
#undef PD__FE_ENUM
#undef PD__BE_ENUM

/* Authentication request codes carried by an 'R' message. */
#define PD_AUTH_OK            0
#define PD_AUTH_CLEARTEXT     3
#define PD_AUTH_MD5           5
#define PD_AUTH_SASL          10
#define PD_AUTH_SASL_CONTINUE 11
#define PD_AUTH_SASL_FINAL    12

/* Result of a decoder. */
typedef enum {
    PD_DECODE_OK = 0,         /* a whole item was decoded */
    PD_DECODE_INCOMPLETE = 1, /* more bytes are needed; nothing was consumed */
    PD_DECODE_ERROR = -1,     /* malformed; *err says why (a static string) */
} pd_decode_rc_t;

/* Name of a message type ("Query"), or NULL when the byte is not a type of that direction. */
const char *pd_fe_type_name(uint8_t type);
const char *pd_be_type_name(uint8_t type);

/* ---------------------------------------------------------------------------------------
 * Framing. A message is a type byte, an int32 length that counts itself and the body,
 * and the body. The header decoders look at the first five bytes only, so that a relay
 * can decide what to do with a message before its body has arrived.
 */
typedef struct {
    uint8_t type;
    uint32_t len; /* the length field: body length + 4 */
} pd_msg_hdr_t;

/*
 * Decodes the header at buf. OK when five bytes are there, the type is valid for the
 * direction and 4 <= len <= max_len (max_len at most PD_MSG_MAX_LEN); INCOMPLETE when
 * fewer than five bytes are there; ERROR otherwise, *err describing the fault in
 * PostgreSQL's words (e.g. "invalid frontend message type 120", "invalid message length").
 */
pd_decode_rc_t pd_fe_header(const uint8_t *buf, size_t n, uint32_t max_len, pd_msg_hdr_t *hdr,
                            const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_header(const uint8_t *buf, size_t n, uint32_t max_len, pd_msg_hdr_t *hdr,
                            const char **err) PD_MUST_CHECK;

/* ---------------------------------------------------------------------------------------
 * A growable output buffer. Encoders append whole messages; on allocation failure the
 * buffer is marked failed, further appends are no-ops, and pd_buf_ok() returns false.
 */
typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    bool failed;
} pd_buf_t;

void pd_buf_init(pd_buf_t *b);
void pd_buf_free(pd_buf_t *b);
void pd_buf_reset(pd_buf_t *b); /* len = 0, keeps memory */
bool pd_buf_ok(const pd_buf_t *b);
void pd_buf_put(pd_buf_t *b, const void *p, size_t n);
void pd_buf_put_u8(pd_buf_t *b, uint8_t v);
void pd_buf_put_u16(pd_buf_t *b, uint16_t v);    /* network order */
void pd_buf_put_u32(pd_buf_t *b, uint32_t v);    /* network order */
void pd_buf_put_str(pd_buf_t *b, const char *s); /* with its terminating NUL */
/* Starts a message of the given type (type 0: no type byte, for startup packets);
 * returns the offset to hand to pd_buf_end_msg, which fills in the length. */
size_t pd_buf_begin_msg(pd_buf_t *b, uint8_t type);
void pd_buf_end_msg(pd_buf_t *b, size_t start);

/* ---------------------------------------------------------------------------------------
 * A bounds-checked reader over one message body. Every get sets r->err on underflow (or
 * on a string without NUL) and then returns zero/NULL; callers check r->err once at the end.
 */
typedef struct {
    const uint8_t *p;
    size_t n;
    bool err;
} pd_reader_t;

void pd_reader_init(pd_reader_t *r, const uint8_t *body, size_t n);
uint8_t pd_read_u8(pd_reader_t *r);
uint16_t pd_read_u16(pd_reader_t *r);
uint32_t pd_read_u32(pd_reader_t *r);
int32_t pd_read_i32(pd_reader_t *r);
const char *pd_read_str(pd_reader_t *r);                  /* NUL-terminated, in place */
const uint8_t *pd_read_bytes(pd_reader_t *r, size_t len); /* in place */
bool pd_reader_done(const pd_reader_t *r);                /* no error and nothing left */

/* ---------------------------------------------------------------------------------------
 * Startup packets: the first packet(s) a client sends, with no type byte.
 */
typedef enum {
    PD_STARTUP_MESSAGE, /* protocol 3.x StartupMessage */
    PD_STARTUP_SSL,     /* SSLRequest */
    PD_STARTUP_GSSENC,  /* GSSENCRequest */
    PD_STARTUP_CANCEL,  /* CancelRequest */
} pd_startup_kind_t;

typedef struct {
    pd_startup_kind_t kind;
    uint32_t version;    /* StartupMessage: the requested protocol version */
    uint32_t cancel_pid; /* CancelRequest */
    uint32_t cancel_key; /* CancelRequest */
    unsigned nparams;    /* StartupMessage: parameters in order, pointing into the packet */
    const char *names[PD_STARTUP_MAX_PARAMS];
    const char *values[PD_STARTUP_MAX_PARAMS];
    const char *user;     /* shortcuts into names/values; NULL when absent */
    const char *database; /* defaults to user when absent, as PostgreSQL does */
} pd_startup_t;

/*
 * Decodes one startup packet from buf. Returns the number of bytes consumed (> 0), 0 when
 * more bytes are needed, or -1 with *err (a static string) and *sqlstate set:
 * a length below 8 or above PD_STARTUP_MAX_LEN is 08P01 "invalid length of startup
 * packet"; a major protocol version other than 3 is 0A000 "unsupported frontend
 * protocol"; a StartupMessage without "user", with an unterminated parameter list or with
 * more than PD_STARTUP_MAX_PARAMS parameters is 08P01.
 */
long pd_startup_decode(const uint8_t *buf, size_t n, pd_startup_t *out, const char **err,
                       const char **sqlstate) PD_MUST_CHECK;

/* Encodes a StartupMessage (protocol 3.0) with nparams name/value pairs. */
void pd_fe_startup(pd_buf_t *b, unsigned nparams, const char *const *names,
                   const char *const *values);
/* Encodes an SSLRequest, GSSENCRequest or CancelRequest. */
void pd_fe_ssl_request(pd_buf_t *b);
void pd_fe_gssenc_request(pd_buf_t *b);
void pd_fe_cancel_request(pd_buf_t *b, uint32_t pid, uint32_t key);

/* ---------------------------------------------------------------------------------------
 * Frontend (client -> server) message bodies. `body` points just past the length field
 * and `n` is len - 4. Decoders return OK or ERROR (with *err); strings point into body.
 */
typedef struct {
    const char *sql;
} pd_fe_query_t;

typedef struct {
    const char *name; /* "" = unnamed statement */
    const char *sql;
    uint16_t nparams;
    const uint8_t *param_types; /* nparams big-endian int32 OIDs, in place */
} pd_fe_parse_t;

typedef struct {
    const char *portal;
    const char *statement;
    uint16_t nformats;
    const uint8_t *formats; /* nformats big-endian int16 */
    uint16_t nparams;
    const uint8_t *params; /* nparams x (int32 len, -1 = NULL; bytes), in place */
    size_t params_len;     /* byte length of that region */
    uint16_t nresult_formats;
    const uint8_t *result_formats; /* big-endian int16 */
} pd_fe_bind_t;

typedef struct {
    uint8_t kind; /* 'S' statement or 'P' portal */
    const char *name;
} pd_fe_target_t; /* Describe and Close */

typedef struct {
    const char *portal;
    uint32_t max_rows;
} pd_fe_execute_t;

typedef struct {
    const char *mechanism;
    int32_t len; /* -1: no initial response */
    const uint8_t *data;
} pd_fe_sasl_initial_t;

pd_decode_rc_t pd_fe_query_decode(const uint8_t *body, size_t n, pd_fe_query_t *out,
                                  const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_fe_parse_decode(const uint8_t *body, size_t n, pd_fe_parse_t *out,
                                  const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_fe_bind_decode(const uint8_t *body, size_t n, pd_fe_bind_t *out,
                                 const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_fe_target_decode(const uint8_t *body, size_t n, pd_fe_target_t *out,
                                   const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_fe_execute_decode(const uint8_t *body, size_t n, pd_fe_execute_t *out,
                                    const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_fe_sasl_initial_decode(const uint8_t *body, size_t n, pd_fe_sasl_initial_t *out,
                                         const char **err) PD_MUST_CHECK;
/*
 * Walks one whole frontend message (header included, `len` = full length) of any type
 * and checks that its body is well formed for its type. Used by the fuzzer and by tests;
 * the relay checks only headers on the pass-through path.
 */
pd_decode_rc_t pd_fe_message_check(const uint8_t *msg, size_t len, const char **err) PD_MUST_CHECK;

/* Frontend encoders, used by tests and by the proxy when it speaks to a backend itself. */
void pd_fe_query(pd_buf_t *b, const char *sql);
void pd_fe_parse(pd_buf_t *b, const char *name, const char *sql, uint16_t nparams,
                 const uint32_t *param_types);
void pd_fe_bind(pd_buf_t *b, const char *portal, const char *statement, uint16_t nparams,
                const char *const *values, const int32_t *lengths, const int16_t *formats,
                uint16_t nresult_formats, const int16_t *result_formats);
void pd_fe_describe(pd_buf_t *b, uint8_t kind, const char *name);
void pd_fe_close(pd_buf_t *b, uint8_t kind, const char *name);
void pd_fe_execute(pd_buf_t *b, const char *portal, uint32_t max_rows);
void pd_fe_sync(pd_buf_t *b);
void pd_fe_flush(pd_buf_t *b);
void pd_fe_terminate(pd_buf_t *b);
void pd_fe_copy_data(pd_buf_t *b, const void *data, size_t n);
void pd_fe_copy_done(pd_buf_t *b);
void pd_fe_copy_fail(pd_buf_t *b, const char *message);
void pd_fe_sasl_initial(pd_buf_t *b, const char *mechanism, const void *data, size_t n);
void pd_fe_sasl_response(pd_buf_t *b, const void *data, size_t n);

/* ---------------------------------------------------------------------------------------
 * Backend (server -> client) message bodies.
 */
typedef struct {
    const char *severity; /* 'V' when present, else 'S' */
    const char *sqlstate; /* 'C' */
    const char *message;  /* 'M' */
    const char *detail;   /* 'D' or NULL */
    const char *hint;     /* 'H' or NULL */
} pd_be_error_t;          /* ErrorResponse and NoticeResponse */

typedef struct {
    int32_t code;
    const uint8_t *data; /* the rest of the message (SASL data, mechanism list, salt) */
    size_t len;
} pd_be_auth_t;

typedef struct {
    uint16_t ncolumns;
    const uint8_t *columns; /* ncolumns x (int32 len, -1 = NULL; bytes), in place */
    size_t columns_len;
} pd_be_data_row_t;

typedef struct {
    uint16_t nfields;
    const uint8_t *fields; /* nfields x (name\0, int32 table oid, int16 attnum, int32 type,
                              int16 typlen, int32 typmod, int16 format), in place */
    size_t fields_len;
} pd_be_row_description_t;

pd_decode_rc_t pd_be_error_decode(const uint8_t *body, size_t n, pd_be_error_t *out,
                                  const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_auth_decode(const uint8_t *body, size_t n, pd_be_auth_t *out,
                                 const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_ready_decode(const uint8_t *body, size_t n, uint8_t *status,
                                  const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_data_row_decode(const uint8_t *body, size_t n, pd_be_data_row_t *out,
                                     const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_row_description_decode(const uint8_t *body, size_t n,
                                            pd_be_row_description_t *out,
                                            const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_command_complete_decode(const uint8_t *body, size_t n, const char **tag,
                                             const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_param_status_decode(const uint8_t *body, size_t n, const char **name,
                                         const char **value, const char **err) PD_MUST_CHECK;
pd_decode_rc_t pd_be_backend_key_decode(const uint8_t *body, size_t n, uint32_t *pid, uint32_t *key,
                                        const char **err) PD_MUST_CHECK;
/* Like pd_fe_message_check, for one whole backend message of any type. */
pd_decode_rc_t pd_be_message_check(const uint8_t *msg, size_t len, const char **err) PD_MUST_CHECK;

/* Backend encoders: what the proxy says to clients itself. */
void pd_be_error(pd_buf_t *b, const char *severity, const char *sqlstate, const char *message,
                 const char *detail, const char *hint);
void pd_be_notice(pd_buf_t *b, const char *severity, const char *sqlstate, const char *message);
void pd_be_auth_ok(pd_buf_t *b);
void pd_be_auth_sasl(pd_buf_t *b, const char *const *mechanisms, unsigned n);
void pd_be_auth_sasl_continue(pd_buf_t *b, const void *data, size_t n);
void pd_be_auth_sasl_final(pd_buf_t *b, const void *data, size_t n);
void pd_be_param_status(pd_buf_t *b, const char *name, const char *value);
void pd_be_backend_key(pd_buf_t *b, uint32_t pid, uint32_t key);
void pd_be_ready(pd_buf_t *b, uint8_t status); /* 'I', 'T' or 'E' */
void pd_be_negotiate_version(pd_buf_t *b, uint32_t newest_minor, unsigned noptions,
                             const char *const *unrecognized);
void pd_be_command_complete(pd_buf_t *b, const char *tag);
void pd_be_row_description(pd_buf_t *b, uint16_t nfields, const char *const *names,
                           const uint32_t *type_oids); /* text format, no table info */
void pd_be_data_row(pd_buf_t *b, uint16_t ncolumns, const char *const *values,
                    const int32_t *lengths); /* lengths[i] = -1 for NULL */
void pd_be_empty_query(pd_buf_t *b);
void pd_be_parse_complete(pd_buf_t *b);
void pd_be_bind_complete(pd_buf_t *b);
void pd_be_no_data(pd_buf_t *b);
void pd_be_copy_data(pd_buf_t *b, const void *data, size_t n);
void pd_be_notification(pd_buf_t *b, uint32_t pid, const char *channel, const char *payload);

#endif /* PD_PROTOCOL_WIRE_H */
