/*
 * frame.c — message framing: the names of message types and the header decoders that
 * let a relay decide what to do with a message from its first five bytes.
 *
 * The valid types come from the X-macros in wire.h, so the list here cannot drift from
 * the enums.
 */
#include "protocol/wire.h"

const char *pd_fe_type_name(uint8_t type)
{
    switch (type) {
#define PD__FE_NAME(ch, id, name)                                                                  \
    case ch:                                                                                       \
        return name;
        PD_FE_MESSAGES(PD__FE_NAME)
#undef PD__FE_NAME
    default:
        return NULL;
    }
}

const char *pd_be_type_name(uint8_t type)
{
    switch (type) {
#define PD__BE_NAME(ch, id, name)                                                                  \
    case ch:                                                                                       \
        return name;
        PD_BE_MESSAGES(PD__BE_NAME)
#undef PD__BE_NAME
    default:
        return NULL;
    }
}

/*
 * The part both directions share. The length is checked as soon as the header is there,
 * before any of the body is buffered, so that a hostile length cannot make the caller
 * reserve a gigabyte. A max_len of 0 or above PD_MSG_MAX_LEN means PD_MSG_MAX_LEN.
 */
static pd_decode_rc_t header_decode(const uint8_t *buf, size_t n, uint32_t max_len,
                                    const char *type_name, const char *type_err, pd_msg_hdr_t *hdr,
                                    const char **err)
{
    if (n < PD_MSG_HEADER_LEN)
        return PD_DECODE_INCOMPLETE;
    if (type_name == NULL) {
        *err = type_err;
        return PD_DECODE_ERROR;
    }
    if (max_len == 0 || max_len > PD_MSG_MAX_LEN)
        max_len = PD_MSG_MAX_LEN;
    uint32_t len =
        ((uint32_t)buf[1] << 24) | ((uint32_t)buf[2] << 16) | ((uint32_t)buf[3] << 8) | buf[4];
    if (len < 4 || len > max_len) {
        *err = "invalid message length";
        return PD_DECODE_ERROR;
    }
    hdr->type = buf[0];
    hdr->len = len;
    return PD_DECODE_OK;
}

pd_decode_rc_t pd_fe_header(const uint8_t *buf, size_t n, uint32_t max_len, pd_msg_hdr_t *hdr,
                            const char **err)
{
    const char *name = n > 0 ? pd_fe_type_name(buf[0]) : NULL;
    return header_decode(buf, n, max_len, name, "invalid frontend message type", hdr, err);
}

pd_decode_rc_t pd_be_header(const uint8_t *buf, size_t n, uint32_t max_len, pd_msg_hdr_t *hdr,
                            const char **err)
{
    const char *name = n > 0 ? pd_be_type_name(buf[0]) : NULL;
    return header_decode(buf, n, max_len, name, "invalid backend message type", hdr, err);
}
