/*
 * fuzz_scram.c — libFuzzer target for the server side of SCRAM-SHA-256. The first input
 * byte picks what to feed: a stored verifier to parse, or a client-first-message and a
 * client-final-message (separated by the first '\n') against the RFC 7677 secret and
 * server nonce, so that the seed with the RFC's messages reaches the success path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocol/scram.h"

#define RFC_VERIFIER                                                                               \
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"    \
    "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
#define RFC_SERVER_NONCE "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"

static void fuzz_verifier(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (text == NULL)
        return;
    memcpy(text, data, size);
    text[size] = '\0';
    pd_scram_secret_t s;
    if (pd_scram_secret_parse(text, &s) &&
        (s.iterations <= 0 || s.salt_len == 0 || s.salt_len > PD_SCRAM_SALT_MAX))
        abort();
    free(text);
}

/* Each message in a buffer of its own size, so that the sanitizer sees overreads. */
static pd_scram_rc_t step(pd_scram_t *st, const pd_scram_secret_t *secret, const uint8_t *msg,
                          size_t n, pd_buf_t *out)
{
    uint8_t *copy = malloc(n ? n : 1);
    if (copy == NULL)
        abort();
    memcpy(copy, msg, n);
    const char *err = NULL;
    pd_scram_rc_t rc = secret
                           ? pd_scram_server_first(st, secret, copy, n, RFC_SERVER_NONCE, out, &err)
                           : pd_scram_server_final(st, copy, n, out, &err);
    free(copy);
    if (rc == PD_SCRAM_PROTOCOL && (err == NULL || out->len != 0))
        abort();
    return rc;
}

static void fuzz_exchange(const uint8_t *data, size_t size)
{
    pd_scram_secret_t secret;
    if (!pd_scram_secret_parse(RFC_VERIFIER, &secret))
        abort();
    const uint8_t *nl = memchr(data, '\n', size);
    size_t n1 = nl ? (size_t)(nl - data) : size;
    pd_scram_t st;
    memset(&st, 0, sizeof st);
    pd_buf_t out;
    pd_buf_init(&out);
    pd_scram_rc_t rc = step(&st, &secret, data, n1, &out);
    if (rc == PD_SCRAM_CONTINUE && nl != NULL) {
        if (st.step != 1 || out.len == 0 || out.len >= sizeof st.server_first)
            abort();
        pd_buf_reset(&out);
        rc = step(&st, NULL, nl + 1, size - n1 - 1, &out);
        if (rc == PD_SCRAM_SUCCESS && (out.len != 46 || memcmp(out.data, "v=", 2) != 0))
            abort();
        if (rc == PD_SCRAM_FAIL && out.len != 0)
            abort();
    } else if (rc != PD_SCRAM_CONTINUE && rc != PD_SCRAM_PROTOCOL) {
        abort();
    }
    pd_scram_clear(&st);
    pd_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] == 'v')
        fuzz_verifier(data + 1, size - 1);
    else
        fuzz_exchange(data + 1, size - 1);
    return 0;
}
