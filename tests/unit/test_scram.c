/*
 * test_scram.c — server-side SCRAM-SHA-256: the RFC 7677 test vector end to end, stored
 * secrets (a verifier made by PostgreSQL 15 and one derived from a password), full
 * exchanges against a client written here from RFC 5802, and every refusal.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "protocol/scram.h"

/* RFC 7677 section 3. */
#define RFC_CLIENT_FIRST "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
#define RFC_SERVER_NONCE "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
#define RFC_NONCE        "rOprNGfwEbeRWgbNEkqO" RFC_SERVER_NONCE
#define RFC_SERVER_FIRST "r=" RFC_NONCE ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
#define RFC_PROOF        "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
#define RFC_CLIENT_FINAL "c=biws,r=" RFC_NONCE ",p=" RFC_PROOF
#define RFC_SERVER_FINAL "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
/* The same secret as PostgreSQL stores it (its own regression tests use this string). */
#define RFC_VERIFIER                                                                               \
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"    \
    "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
static const uint8_t rfc_salt[] = {0x5b, 0x6d, 0x99, 0x68, 0x9d, 0x12, 0x35, 0x8e,
                                   0xec, 0xa0, 0x4b, 0x14, 0x12, 0x36, 0xfa, 0x81};

/* Made by PostgreSQL 15.20: CREATE ROLE alice PASSWORD 'pencil' (random salt). */
#define PG_VERIFIER                                                                                \
    "SCRAM-SHA-256$4096:PrPyWXmzTkVJgKwqHfcB4Q==$Ia9V9yX6Ei50dhkznreB9V7oZcuaJ+S4piCbm5JRq8U=:"    \
    "1HdpVwp70+t0rSjkHarIlRDFp2nKYgekKpKwMsraipI="

/* ---- a client, written from RFC 5802 section 3 --------------------------------------- */

typedef struct {
    char final[512];     /* client-final-message */
    char server_sig[64]; /* the "v=..." the server must answer with */
} client_t;

static void hmac256(const uint8_t *key, size_t klen, const char *msg, size_t n, uint8_t *out)
{
    unsigned int len = 0;
    assert_non_null(HMAC(EVP_sha256(), key, (int)klen, (const unsigned char *)msg, n, out, &len));
    assert_int_equal(len, 32);
}

/* Reads s= and i= from a server-first-message. */
static void parse_server_first(const char *sf, uint8_t *salt, int *salt_len, int *iter)
{
    const char *s = strstr(sf, ",s="), *i = strstr(sf, ",i=");
    assert_non_null(s);
    assert_non_null(i);
    uint8_t tmp[96];
    int n = EVP_DecodeBlock(tmp, (const unsigned char *)s + 3, (int)(i - s - 3));
    assert_true(n > 0);
    n -= (i[-1] == '=') + (i[-2] == '=');
    memcpy(salt, tmp, (size_t)n);
    *salt_len = n;
    *iter = atoi(i + 3);
}

/* Builds the client-final-message for `password`, with `middle` (",r=...[,ext]") after
 * the channel binding. */
static void client_final(const char *password, const char *bare, const char *server_first,
                         const char *cbind, const char *middle, client_t *c)
{
    uint8_t salt[64], salted[32], client_key[32], stored[32], server_key[32], sig[32], proof[32];
    int salt_len, iter;
    parse_server_first(server_first, salt, &salt_len, &iter);
    assert_int_equal(PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, salt_len, iter,
                                       EVP_sha256(), 32, salted),
                     1);
    hmac256(salted, 32, "Client Key", 10, client_key);
    hmac256(salted, 32, "Server Key", 10, server_key);
    SHA256(client_key, 32, stored);
    char without_proof[256], auth[1024];
    snprintf(without_proof, sizeof without_proof, "c=%s%s", cbind, middle);
    snprintf(auth, sizeof auth, "%s,%s,%s", bare, server_first, without_proof);
    hmac256(stored, 32, auth, strlen(auth), sig);
    for (int k = 0; k < 32; k++)
        proof[k] = client_key[k] ^ sig[k];
    char b64[64];
    EVP_EncodeBlock((unsigned char *)b64, proof, 32);
    snprintf(c->final, sizeof c->final, "%s,p=%s", without_proof, b64);
    hmac256(server_key, 32, auth, strlen(auth), sig);
    strcpy(c->server_sig, "v=");
    EVP_EncodeBlock((unsigned char *)c->server_sig + 2, sig, 32);
}

/* ---- helpers ---------------------------------------------------------------------------- */

static pd_scram_rc_t first(pd_scram_t *st, const pd_scram_secret_t *sec, const char *msg,
                           const char *snonce, pd_buf_t *out, const char **err)
{
    return pd_scram_server_first(st, sec, (const uint8_t *)msg, strlen(msg), snonce, out, err);
}

static pd_scram_rc_t final(pd_scram_t *st, const char *msg, pd_buf_t *out, const char **err)
{
    return pd_scram_server_final(st, (const uint8_t *)msg, strlen(msg), out, err);
}

static void assert_buf_text(const pd_buf_t *b, const char *want)
{
    assert_true(pd_buf_ok(b));
    assert_int_equal(b->len, strlen(want));
    assert_memory_equal(b->data, want, b->len);
}

static pd_scram_secret_t rfc_secret(void)
{
    pd_scram_secret_t s;
    assert_true(pd_scram_secret_from_password("pencil", rfc_salt, sizeof rfc_salt, 4096, &s));
    return s;
}

/* Runs the first step of the RFC exchange, which must succeed. */
static void rfc_first(pd_scram_t *st, const pd_scram_secret_t *sec)
{
    pd_buf_t out;
    const char *err = NULL;
    memset(st, 0, sizeof *st);
    pd_buf_init(&out);
    assert_int_equal(first(st, sec, RFC_CLIENT_FIRST, RFC_SERVER_NONCE, &out, &err),
                     PD_SCRAM_CONTINUE);
    assert_buf_text(&out, RFC_SERVER_FIRST);
    pd_buf_free(&out);
}

/* ---- tests ---------------------------------------------------------------------------- */

static void test_rfc7677_exchange(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    pd_scram_t st;
    rfc_first(&st, &sec);
    assert_int_equal(st.step, 1);
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    assert_int_equal(final(&st, RFC_CLIENT_FINAL, &out, &err), PD_SCRAM_SUCCESS);
    assert_buf_text(&out, RFC_SERVER_FINAL);
    assert_int_equal(st.step, 2);
    pd_buf_free(&out);
    pd_scram_clear(&st);
}

static void test_verifier_matches_password(void **state)
{
    (void)state;
    pd_scram_secret_t parsed, derived = rfc_secret();
    assert_true(pd_scram_secret_parse(RFC_VERIFIER, &parsed));
    assert_int_equal(parsed.iterations, 4096);
    assert_int_equal(parsed.salt_len, sizeof rfc_salt);
    assert_memory_equal(parsed.salt, rfc_salt, sizeof rfc_salt);
    assert_memory_equal(parsed.stored_key, derived.stored_key, PD_SCRAM_KEY_LEN);
    assert_memory_equal(parsed.server_key, derived.server_key, PD_SCRAM_KEY_LEN);
    /* And the parsed verifier runs the RFC exchange just the same. */
    pd_scram_t st;
    rfc_first(&st, &parsed);
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    assert_int_equal(final(&st, RFC_CLIENT_FINAL, &out, &err), PD_SCRAM_SUCCESS);
    assert_buf_text(&out, RFC_SERVER_FINAL);
    pd_buf_free(&out);
}

/* A verifier PostgreSQL made itself, with a salt we did not choose. */
static void test_postgres_verifier(void **state)
{
    (void)state;
    pd_scram_secret_t pg, derived;
    assert_true(pd_scram_secret_parse(PG_VERIFIER, &pg));
    assert_int_equal(pg.iterations, 4096);
    assert_int_equal(pg.salt_len, 16);
    assert_true(pd_scram_secret_from_password("pencil", pg.salt, pg.salt_len, 4096, &derived));
    assert_memory_equal(pg.stored_key, derived.stored_key, PD_SCRAM_KEY_LEN);
    assert_memory_equal(pg.server_key, derived.server_key, PD_SCRAM_KEY_LEN);
    assert_true(pd_scram_secret_from_password("pencil!", pg.salt, pg.salt_len, 4096, &derived));
    assert_memory_not_equal(pg.stored_key, derived.stored_key, PD_SCRAM_KEY_LEN);
}

/* A full exchange as libpq runs it: empty user name in client-first, PG's verifier. */
static void test_full_exchange_libpq_style(void **state)
{
    (void)state;
    pd_scram_secret_t sec;
    assert_true(pd_scram_secret_parse(PG_VERIFIER, &sec));
    pd_scram_t st = {0};
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    const char *bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL";
    char first_msg[128];
    snprintf(first_msg, sizeof first_msg, "n,,%s", bare);
    assert_int_equal(first(&st, &sec, first_msg, "3rfcNHYJY1ZVvWVs7j", &out, &err),
                     PD_SCRAM_CONTINUE);
    char server_first[512];
    memcpy(server_first, out.data, out.len);
    server_first[out.len] = '\0';
    assert_string_equal(server_first, "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,"
                                      "s=PrPyWXmzTkVJgKwqHfcB4Q==,i=4096");
    client_t c;
    client_final("pencil", bare, server_first, "biws",
                 ",r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j", &c);
    pd_buf_reset(&out);
    assert_int_equal(final(&st, c.final, &out, &err), PD_SCRAM_SUCCESS);
    assert_buf_text(&out, c.server_sig);
    pd_buf_free(&out);
}

/* Runs an exchange with the "y" flag and an extension before the proof. */
static void test_y_flag_and_extension(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    pd_scram_t st = {0};
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    assert_int_equal(first(&st, &sec, "y,,n=someone,r=abc,x=ext", "XYZ", &out, &err),
                     PD_SCRAM_CONTINUE);
    assert_string_equal(st.client_first_bare, "n=someone,r=abc,x=ext");
    const char *server_first = "r=abcXYZ,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    assert_buf_text(&out, server_first);
    client_t c;
    client_final("pencil", "n=someone,r=abc,x=ext", server_first, "eSws", ",r=abcXYZ,x=more", &c);
    pd_buf_reset(&out);
    assert_int_equal(final(&st, c.final, &out, &err), PD_SCRAM_SUCCESS);
    assert_buf_text(&out, c.server_sig);
    pd_buf_free(&out);
}

static void test_wrong_password(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    pd_scram_t st;
    rfc_first(&st, &sec);
    client_t c;
    client_final("pencil2", "n=user,r=rOprNGfwEbeRWgbNEkqO", RFC_SERVER_FIRST, "biws",
                 ",r=" RFC_NONCE, &c);
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    assert_int_equal(final(&st, c.final, &out, &err), PD_SCRAM_FAIL);
    assert_int_equal(out.len, 0); /* no server signature for a failed proof */
    assert_int_equal(st.step, 2);

    /* One bit of the RFC proof flipped ('d' -> 'e' changes the first byte). */
    rfc_first(&st, &sec);
    assert_int_equal(
        final(&st, "c=biws,r=" RFC_NONCE ",p=eHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=", &out,
              &err),
        PD_SCRAM_FAIL);
    /* A proof for a different AuthMessage: same words, an extension the client did not
     * sign. */
    rfc_first(&st, &sec);
    assert_int_equal(final(&st, "c=biws,r=" RFC_NONCE ",x=1,p=" RFC_PROOF, &out, &err),
                     PD_SCRAM_FAIL);
    assert_int_equal(out.len, 0);
    pd_buf_free(&out);
}

static void test_nonce_mismatch(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    static const char *const finals[] = {
        "c=biws,r=rOprNGfwEbeRWgbNEkqO,p=" RFC_PROOF,                     /* client half only */
        "c=biws,r=" RFC_NONCE "x,p=" RFC_PROOF,                           /* one more char */
        "c=biws,r=sOprNGfwEbeRWgbNEkqO" RFC_SERVER_NONCE ",p=" RFC_PROOF, /* one changed */
    };
    for (size_t i = 0; i < sizeof finals / sizeof finals[0]; i++) {
        pd_scram_t st;
        rfc_first(&st, &sec);
        pd_buf_t out;
        pd_buf_init(&out);
        const char *err = NULL;
        assert_int_equal(final(&st, finals[i], &out, &err), PD_SCRAM_PROTOCOL);
        assert_non_null(strstr(err, "nonce"));
        assert_int_equal(out.len, 0);
        pd_buf_free(&out);
    }
}

static void test_malformed_client_first(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    static const char *const bad[] = {
        "",
        "n",
        "n,",
        "n,,",
        "x,,n=,r=abc",
        "p=tls-server-end-point,,n=,r=abc",
        "n,a=bob,n=,r=abc",
        "n,x,n=,r=abc",
        "n,,m=ext,n=,r=abc",
        "n,,r=abc",
        "n,,n=,r=",
        "n,,n=,r=a b",
        "n,,n=,r=abc,",
        "n,,n=,r=abc,1=x",
        "n,,n=,r=abc,xx",
        "n,,n=,s=abc",
        "n,,n=",
        " n,,n=,r=abc",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pd_scram_t st = {0};
        pd_buf_t out;
        pd_buf_init(&out);
        const char *err = NULL;
        assert_int_equal(first(&st, &sec, bad[i], "srv", &out, &err), PD_SCRAM_PROTOCOL);
        assert_non_null(err);
        assert_int_equal(out.len, 0);
        pd_buf_free(&out);
    }
    /* An embedded NUL, which PostgreSQL reports as a length mismatch. */
    pd_scram_t st = {0};
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    static const uint8_t nul[] = "n,,n=\0,r=abc";
    assert_int_equal(pd_scram_server_first(&st, &sec, nul, sizeof nul - 1, "srv", &out, &err),
                     PD_SCRAM_PROTOCOL);
    /* Too long to keep: refused rather than truncated. */
    char longmsg[700];
    memset(longmsg, 'a', sizeof longmsg - 1);
    memcpy(longmsg, "n,,n=,r=", 8);
    longmsg[sizeof longmsg - 1] = '\0';
    memset(&st, 0, sizeof st);
    assert_int_equal(first(&st, &sec, longmsg, "srv", &out, &err), PD_SCRAM_PROTOCOL);
    /* A server nonce with a comma would break the message: the caller's bug, refused. */
    memset(&st, 0, sizeof st);
    assert_int_equal(first(&st, &sec, "n,,n=,r=abc", "a,b", &out, &err), PD_SCRAM_PROTOCOL);
    assert_int_equal(out.len, 0);
    pd_buf_free(&out);
}

static void test_malformed_client_final(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    static const char *const bad[] = {
        "",
        "c=biws",
        "c=biws,r=" RFC_NONCE,
        "c=biws,r=" RFC_NONCE ",",
        "c=biws,r=" RFC_NONCE ",p=",
        "c=biws,r=" RFC_NONCE ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ",
        "c=biws,r=" RFC_NONCE ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=x",
        "c=biws,r=" RFC_NONCE ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7And===",
        "c=biws,r=" RFC_NONCE ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndV" /* 43 */,
        "c=biws,r=" RFC_NONCE ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7An VQ=",
        "c=biws,r=" RFC_NONCE ",p=" RFC_PROOF ",x=after",
        "c=biws,r=" RFC_NONCE ",p=" RFC_PROOF ",",
        "c=eSws,r=" RFC_NONCE ",p=" RFC_PROOF, /* "y,," after "n,," */
        "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=" RFC_NONCE ",p=" RFC_PROOF,
        "r=" RFC_NONCE ",c=biws,p=" RFC_PROOF,
        ("c=biws,p=" RFC_PROOF),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pd_scram_t st;
        rfc_first(&st, &sec);
        pd_buf_t out;
        pd_buf_init(&out);
        const char *err = NULL;
        assert_int_equal(final(&st, bad[i], &out, &err), PD_SCRAM_PROTOCOL);
        assert_non_null(err);
        assert_int_equal(out.len, 0);
        pd_buf_free(&out);
    }
}

/* The steps happen once each and in order. */
static void test_step_order(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    pd_buf_t out;
    pd_buf_init(&out);
    const char *err = NULL;
    pd_scram_t st = {0};
    assert_int_equal(final(&st, RFC_CLIENT_FINAL, &out, &err), PD_SCRAM_PROTOCOL);
    rfc_first(&st, &sec);
    assert_int_equal(first(&st, &sec, RFC_CLIENT_FIRST, RFC_SERVER_NONCE, &out, &err),
                     PD_SCRAM_PROTOCOL);
    rfc_first(&st, &sec);
    assert_int_equal(final(&st, RFC_CLIENT_FINAL, &out, &err), PD_SCRAM_SUCCESS);
    assert_int_equal(final(&st, RFC_CLIENT_FINAL, &out, &err), PD_SCRAM_PROTOCOL);
    pd_buf_free(&out);
}

static void test_verifier_parse_rejects(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "",
        "md5c4ca4238a0b923820dcc509a6f75849b",
        "pencil",
        ("SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$-1:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$99999999999:W22ZaJ0SNY7soEsUEjb6gQ==$"
         "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$4096:$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ=$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4q=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
        "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=",
        ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU"),
        ("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU= "),
        ("SCRAM-SHA-256$4096:W2 ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pd_scram_secret_t s;
        assert_false(pd_scram_secret_parse(bad[i], &s));
    }
}

static void test_secret_from_password_rejects(void **state)
{
    (void)state;
    pd_scram_secret_t s;
    uint8_t salt[PD_SCRAM_SALT_MAX + 1] = {0};
    assert_false(pd_scram_secret_from_password("x", salt, 0, 4096, &s));
    assert_false(pd_scram_secret_from_password("x", salt, sizeof salt, 4096, &s));
    assert_false(pd_scram_secret_from_password("x", salt, 16, 0, &s));
    assert_true(pd_scram_secret_from_password("x", salt, PD_SCRAM_SALT_MAX, 1, &s));
    assert_int_equal(s.salt_len, PD_SCRAM_SALT_MAX);
}

static void test_clear(void **state)
{
    (void)state;
    pd_scram_secret_t sec = rfc_secret();
    pd_scram_t st;
    rfc_first(&st, &sec);
    pd_scram_clear(&st);
    static const pd_scram_t zero;
    assert_memory_equal(&st, &zero, sizeof st);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rfc7677_exchange),
        cmocka_unit_test(test_verifier_matches_password),
        cmocka_unit_test(test_postgres_verifier),
        cmocka_unit_test(test_full_exchange_libpq_style),
        cmocka_unit_test(test_y_flag_and_extension),
        cmocka_unit_test(test_wrong_password),
        cmocka_unit_test(test_nonce_mismatch),
        cmocka_unit_test(test_malformed_client_first),
        cmocka_unit_test(test_malformed_client_final),
        cmocka_unit_test(test_step_order),
        cmocka_unit_test(test_verifier_parse_rejects),
        cmocka_unit_test(test_secret_from_password_rejects),
        cmocka_unit_test(test_clear),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
