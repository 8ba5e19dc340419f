/*
 * scram.h — the server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks
 * it: mechanism "SCRAM-SHA-256", no channel binding (gs2 header "n,," or "y,,").
 *
 * Pure: the server nonce is given by the caller (the proxy draws it from OpenSSL's
 * RAND_bytes), so the exchange is deterministic under test. Crypto primitives are
 * OpenSSL's (PBKDF2, HMAC-SHA-256, SHA-256, base64).
 */
#ifndef PD_PROTOCOL_SCRAM_H
#define PD_PROTOCOL_SCRAM_H

#include "wire.h"

#define PD_SCRAM_KEY_LEN      32
#define PD_SCRAM_SALT_MAX     64
#define PD_SCRAM_DEFAULT_ITER 4096
#define PD_SCRAM_MECHANISM    "SCRAM-SHA-256"

/* A stored secret: what PostgreSQL keeps in pg_authid.rolpassword. */
typedef struct {
    int iterations;
    uint8_t salt[PD_SCRAM_SALT_MAX];
    size_t salt_len;
    uint8_t stored_key[PD_SCRAM_KEY_LEN];
    uint8_t server_key[PD_SCRAM_KEY_LEN];
} pd_scram_secret_t;

/* Parses "SCRAM-SHA-256$<iter>:<salt b64>$<stored b64>:<server b64>"; false if malformed. */
bool pd_scram_secret_parse(const char *verifier, pd_scram_secret_t *out) PD_MUST_CHECK;

/* Derives the secret of a plain-text password with the given salt and iteration count. */
bool pd_scram_secret_from_password(const char *password, const uint8_t *salt, size_t salt_len,
                                   int iterations, pd_scram_secret_t *out) PD_MUST_CHECK;

/* Exchange state between the two server steps. Holds no secret material beyond the
 * copy of the stored secret; pd_scram_clear wipes it. */
typedef struct {
    pd_scram_secret_t secret;
    char client_first_bare[512];
    char server_first[512];
    char nonce[256]; /* client nonce + server nonce */
    char cbind_flag; /* 'n' or 'y': client-final's c= must repeat the client-first's */
    int step;        /* 0 = expecting client-first, 1 = expecting client-final, 2 = done */
} pd_scram_t;

typedef enum {
    PD_SCRAM_CONTINUE = 0,  /* *out holds the next server message to send */
    PD_SCRAM_SUCCESS = 1,   /* client proof verified; *out holds server-final-message */
    PD_SCRAM_FAIL = 2,      /* wrong password (proof did not verify) */
    PD_SCRAM_PROTOCOL = -1, /* malformed client message; *err says why */
} pd_scram_rc_t;

/*
 * Step 1: given the client-first-message (the SASLInitialResponse data), appends the
 * server-first-message to out. server_nonce is printable ASCII without ','.
 */
pd_scram_rc_t pd_scram_server_first(pd_scram_t *st, const pd_scram_secret_t *secret,
                                    const uint8_t *client_first, size_t n, const char *server_nonce,
                                    pd_buf_t *out, const char **err) PD_MUST_CHECK;

/*
 * Step 2: given the client-final-message (the SASLResponse data), verifies the proof
 * in constant time and appends the server-final-message ("v=...") to out on success.
 */
pd_scram_rc_t pd_scram_server_final(pd_scram_t *st, const uint8_t *client_final, size_t n,
                                    pd_buf_t *out, const char **err) PD_MUST_CHECK;

/* Wipes the state (keys included). */
void pd_scram_clear(pd_scram_t *st);

#endif /* PD_PROTOCOL_SCRAM_H */
