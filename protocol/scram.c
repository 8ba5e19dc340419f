/*
 * scram.c — the server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks
 * it: stored secrets (parsing verifiers, deriving them from passwords) and the two server
 * steps of an exchange. Crypto is OpenSSL's; parsing follows PostgreSQL's auth-scram.c,
 * including which errors are protocol violations and which are a failed password.
 *
 * Client messages are parsed in place from pointer + length and never allocated.
 */
#include "protocol/scram.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <string.h>

#define VERIFIER_PREFIX "SCRAM-SHA-256$"
#define B64_KEY_LEN     44 /* base64 of a 32-byte key */
#define B64_MAX_IN      88 /* base64 of PD_SCRAM_SALT_MAX bytes: the longest we decode */
/* Longest client-final-message we take: "c=biws,r=<nonce>,p=<proof>" is under 400 bytes
 * with the longest nonce we accept, and extensions are not used by any client. */
#define CLIENT_FINAL_MAX 1024

/* ---------------------------------------------------------------------------------------
 * Base64. EVP_DecodeBlock tolerates whitespace and pads its output with zero bytes for
 * '=' padding, so the input is validated strictly here and the real length is computed
 * from the padding.
 */
static bool b64_char(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
           c == '/';
}

static bool b64_valid(const char *in, size_t len, size_t *pad)
{
    if (len == 0 || len % 4 != 0)
        return false;
    *pad = in[len - 1] == '=' ? (in[len - 2] == '=' ? 2 : 1) : 0;
    for (size_t i = 0; i < len - *pad; i++)
        if (!b64_char(in[i]))
            return false;
    return true;
}

/* Decodes len characters into out (cap bytes); returns the decoded length or -1. */
static long b64_decode(const char *in, size_t len, uint8_t *out, size_t cap)
{
    size_t pad;
    if (len > B64_MAX_IN || !b64_valid(in, len, &pad))
        return -1;
    uint8_t tmp[B64_MAX_IN / 4 * 3];
    int got = EVP_DecodeBlock(tmp, (const unsigned char *)in, (int)len);
    long real = got < 0 || (size_t)got < pad || (size_t)got - pad > cap ? -1 : got - (long)pad;
    if (real > 0)
        memcpy(out, tmp, (size_t)real);
    OPENSSL_cleanse(tmp, sizeof tmp); /* it may have held a key */
    return real;
}

/* Decodes exactly one key's worth of base64; anything else is malformed. */
static bool b64_decode_key(const char *in, size_t len, uint8_t key[PD_SCRAM_KEY_LEN])
{
    return len == B64_KEY_LEN && b64_decode(in, len, key, PD_SCRAM_KEY_LEN) == PD_SCRAM_KEY_LEN;
}

/* Encodes n bytes as NUL-terminated base64; out must hold 4 * ceil(n / 3) + 1 bytes. */
static void b64_encode(const uint8_t *in, size_t n, char *out)
{
    EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

/* ---------------------------------------------------------------------------------------
 * Secrets.
 */
static bool hmac_sha256(const uint8_t *key, size_t key_len, const void *data, size_t n,
                        uint8_t out[PD_SCRAM_KEY_LEN])
{
    unsigned int out_len = 0;
    return HMAC(EVP_sha256(), key, (int)key_len, data, n, out, &out_len) != NULL &&
           out_len == PD_SCRAM_KEY_LEN;
}

/* Parses a positive decimal int from [s, end) with no sign, spaces or overflow. */
static bool parse_iterations(const char *s, const char *end, int *out)
{
    long v = 0;
    if (s == end)
        return false;
    for (; s < end; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (*s - '0');
        if (v > INT32_MAX)
            return false;
    }
    *out = (int)v;
    return v > 0;
}

bool pd_scram_secret_parse(const char *verifier, pd_scram_secret_t *out)
{
    pd_scram_secret_t s;
    memset(&s, 0, sizeof s);
    if (strncmp(verifier, VERIFIER_PREFIX, strlen(VERIFIER_PREFIX)) != 0)
        return false;
    const char *iter = verifier + strlen(VERIFIER_PREFIX);
    const char *salt = strchr(iter, ':');
    const char *stored = salt ? strchr(salt, '$') : NULL;
    const char *server = stored ? strchr(stored, ':') : NULL;
    if (server == NULL || !parse_iterations(iter, salt, &s.iterations))
        return false;
    salt++, stored++, server++;
    long salt_len = b64_decode(salt, (size_t)(stored - 1 - salt), s.salt, sizeof s.salt);
    bool ok = salt_len > 0 && b64_decode_key(stored, (size_t)(server - 1 - stored), s.stored_key) &&
              b64_decode_key(server, strlen(server), s.server_key);
    if (ok) {
        s.salt_len = (size_t)salt_len;
        *out = s;
    }
    OPENSSL_cleanse(&s, sizeof s);
    return ok;
}

/*
 * PostgreSQL runs the password through SASLprep first, but leaves pure-ASCII passwords
 * untouched (pg_saslprep's fast path); this uses the password bytes as they are, which is
 * the same for ASCII and for UTF-8 that SASLprep would not change.
 */
bool pd_scram_secret_from_password(const char *password, const uint8_t *salt, size_t salt_len,
                                   int iterations, pd_scram_secret_t *out)
{
    if (iterations <= 0 || salt_len == 0 || salt_len > PD_SCRAM_SALT_MAX)
        return false;
    uint8_t salted[PD_SCRAM_KEY_LEN], client_key[PD_SCRAM_KEY_LEN];
    bool ok = PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, (int)salt_len, iterations,
                                EVP_sha256(), sizeof salted, salted) == 1 &&
              hmac_sha256(salted, sizeof salted, "Client Key", 10, client_key) &&
              hmac_sha256(salted, sizeof salted, "Server Key", 10, out->server_key) &&
              SHA256(client_key, sizeof client_key, out->stored_key) != NULL;
    OPENSSL_cleanse(salted, sizeof salted);
    OPENSSL_cleanse(client_key, sizeof client_key);
    if (!ok)
        return false;
    out->iterations = iterations;
    memcpy(out->salt, salt, salt_len);
    out->salt_len = salt_len;
    return true;
}

/* ---------------------------------------------------------------------------------------
 * Parsing client messages: "a=value" attributes separated by commas (RFC 5802 §5.1).
 */
typedef struct {
    const char *p;
    const char *end;
} cursor_t;

typedef struct {
    const char *s;
    size_t len;
} span_t;

static bool at(const cursor_t *c, char ch)
{
    return c->p < c->end && *c->p == ch;
}

static bool skip(cursor_t *c, char ch)
{
    if (!at(c, ch))
        return false;
    c->p++;
    return true;
}

static bool is_alpha(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

/* Reads "<name>=<value>" up to the next comma or the end; name 0 accepts any letter and
 * returns it in *got. The cursor is left on the comma. */
static bool read_attr(cursor_t *c, char name, char *got, span_t *val)
{
    if (c->end - c->p < 2 || (name ? c->p[0] != name : !is_alpha(c->p[0])) || c->p[1] != '=')
        return false;
    if (got != NULL)
        *got = c->p[0];
    val->s = c->p + 2;
    const char *comma = memchr(val->s, ',', (size_t)(c->end - val->s));
    c->p = comma ? comma : c->end;
    val->len = (size_t)(c->p - val->s);
    return true;
}

/* A nonce is printable ASCII other than ',' (RFC 5802 "printable"). */
static bool nonce_ok(const char *s, size_t len)
{
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++)
        if (s[i] < 0x21 || s[i] > 0x7e || s[i] == ',')
            return false;
    return true;
}

static pd_scram_rc_t protocol_error(pd_scram_t *st, const char **err, const char *msg)
{
    st->step = 2; /* an exchange that went wrong is over */
    *err = msg;
    return PD_SCRAM_PROTOCOL;
}

/* The message is text: PostgreSQL rejects embedded NULs as a length mismatch. */
static bool text_ok(const uint8_t *p, size_t n, size_t max)
{
    return n > 0 && n <= max && memchr(p, '\0', n) == NULL;
}

/*
 * gs2-header: "n,," or "y,," (we offer no channel binding, so a client that supports it
 * correctly says "y"); "p=..." and an authzid are refused as PostgreSQL refuses them.
 */
static const char *parse_gs2_header(cursor_t *c, char *flag)
{
    if (at(c, 'p'))
        return "malformed SCRAM message: channel binding is not supported";
    if (!at(c, 'n') && !at(c, 'y'))
        return "malformed SCRAM message: unexpected channel-binding flag";
    *flag = *c->p++;
    if (!skip(c, ','))
        return "malformed SCRAM message: comma expected after channel-binding flag";
    if (at(c, 'a'))
        return "client uses authorization identity, but it is not supported";
    if (!skip(c, ','))
        return "malformed SCRAM message: unexpected attribute in client-first-message";
    return NULL;
}

/* client-first-message-bare: "n=<user>,r=<nonce>[,ext...]". The user name is ignored:
 * PostgreSQL takes it from the startup packet, and libpq sends it empty. */
static const char *parse_client_first_bare(cursor_t *c, span_t *nonce)
{
    span_t user, ext;
    char name;
    if (at(c, 'm'))
        return "client requires an unsupported SCRAM extension";
    if (!read_attr(c, 'n', NULL, &user) || !skip(c, ',') || !read_attr(c, 'r', NULL, nonce))
        return "malformed SCRAM message: expected user name and nonce";
    if (!nonce_ok(nonce->s, nonce->len))
        return "malformed SCRAM message: non-printable characters in SCRAM nonce";
    while (skip(c, ','))
        if (!read_attr(c, 0, &name, &ext))
            return "malformed SCRAM message: malformed extension in client-first-message";
    if (c->p != c->end)
        return "malformed SCRAM message: garbage at end of client-first-message";
    return NULL;
}

/* Builds "r=<nonce>,s=<salt>,i=<iterations>" into st->server_first. */
static bool build_server_first(pd_scram_t *st)
{
    char salt[PD_SCRAM_SALT_MAX / 3 * 4 + 8];
    b64_encode(st->secret.salt, st->secret.salt_len, salt);
    int w = snprintf(st->server_first, sizeof st->server_first, "r=%s,s=%s,i=%d", st->nonce, salt,
                     st->secret.iterations);
    return w > 0 && (size_t)w < sizeof st->server_first;
}

static bool secret_ok(const pd_scram_secret_t *s)
{
    return s->iterations > 0 && s->salt_len > 0 && s->salt_len <= PD_SCRAM_SALT_MAX;
}

/* Parses a whole client-first-message, keeping its bare part and the nonces in st. */
static const char *parse_client_first(pd_scram_t *st, cursor_t *c, const char *server_nonce)
{
    span_t nonce = {NULL, 0};
    const char *bad = parse_gs2_header(c, &st->cbind_flag);
    if (bad != NULL)
        return bad;
    const char *bare = c->p;
    size_t bare_len = (size_t)(c->end - c->p);
    if (bare_len >= sizeof st->client_first_bare)
        return "malformed SCRAM message: client-first-message too long";
    bad = parse_client_first_bare(c, &nonce);
    if (bad != NULL)
        return bad;
    if (nonce.len + strlen(server_nonce) >= sizeof st->nonce)
        return "malformed SCRAM message: SCRAM nonce too long";
    memcpy(st->client_first_bare, bare, bare_len);
    st->client_first_bare[bare_len] = '\0';
    memcpy(st->nonce, nonce.s, nonce.len);
    strcpy(st->nonce + nonce.len, server_nonce);
    return NULL;
}

pd_scram_rc_t pd_scram_server_first(pd_scram_t *st, const pd_scram_secret_t *secret,
                                    const uint8_t *client_first, size_t n, const char *server_nonce,
                                    pd_buf_t *out, const char **err)
{
    if (st->step != 0)
        return protocol_error(st, err, "SCRAM exchange is not expecting a client-first-message");
    if (!text_ok(client_first, n, 3 + sizeof st->client_first_bare - 1))
        return protocol_error(st, err, "malformed SCRAM message: bad length");
    if (!secret_ok(secret) || !nonce_ok(server_nonce, strlen(server_nonce)))
        return protocol_error(st, err, "invalid SCRAM secret or server nonce");
    cursor_t c = {(const char *)client_first, (const char *)client_first + n};
    const char *bad = parse_client_first(st, &c, server_nonce);
    if (bad != NULL)
        return protocol_error(st, err, bad);
    st->secret = *secret;
    if (!build_server_first(st))
        return protocol_error(st, err, "SCRAM server-first-message too long");
    pd_buf_put(out, st->server_first, strlen(st->server_first));
    st->step = 1;
    return PD_SCRAM_CONTINUE;
}

/* ---------------------------------------------------------------------------------------
 * The final step.
 */
typedef struct {
    span_t without_proof; /* client-final-message-without-proof, part of the AuthMessage */
    uint8_t proof[PD_SCRAM_KEY_LEN];
} client_final_t;

/* Without channel binding, c= is the base64 of the gs2 header the client sent first. */
static bool cbind_ok(char flag, span_t cb)
{
    const char *want = flag == 'y' ? "eSws" : "biws"; /* "y,," / "n,," */
    return cb.len == 4 && memcmp(cb.s, want, 4) == 0;
}

/* "c=<cbind>,r=<nonce>[,ext...],p=<proof>", proof last. */
static const char *parse_client_final(const pd_scram_t *st, cursor_t *c, client_final_t *f)
{
    span_t cb, nonce, val = {NULL, 0};
    char name = 0;
    const char *begin = c->p, *proof_at = NULL;
    if (!read_attr(c, 'c', NULL, &cb) || !skip(c, ',') || !read_attr(c, 'r', NULL, &nonce))
        return "malformed SCRAM message: expected channel binding and nonce";
    if (!cbind_ok(st->cbind_flag, cb))
        return "unexpected SCRAM channel-binding attribute in client-final-message";
    while (name != 'p') {
        proof_at = c->p;
        if (!skip(c, ',') || !read_attr(c, 0, &name, &val))
            return "malformed SCRAM message: expected proof in client-final-message";
    }
    if (c->p != c->end)
        return "malformed SCRAM message: garbage at end of client-final-message";
    if (!b64_decode_key(val.s, val.len, f->proof))
        return "malformed SCRAM message: malformed proof in client-final-message";
    if (nonce.len != strlen(st->nonce) || memcmp(nonce.s, st->nonce, nonce.len) != 0)
        return "invalid SCRAM response: nonce does not match";
    f->without_proof.s = begin;
    f->without_proof.len = (size_t)(proof_at - begin);
    return NULL;
}

/* AuthMessage = client-first-bare "," server-first "," client-final-without-proof. */
typedef struct {
    char text[sizeof(((pd_scram_t *)0)->client_first_bare) +
              sizeof(((pd_scram_t *)0)->server_first) + CLIENT_FINAL_MAX + 2];
    size_t len;
} auth_message_t;

static void build_auth_message(const pd_scram_t *st, span_t without_proof, auth_message_t *m)
{
    size_t a = strlen(st->client_first_bare), b = strlen(st->server_first);
    memcpy(m->text, st->client_first_bare, a);
    m->text[a] = ',';
    memcpy(m->text + a + 1, st->server_first, b);
    m->text[a + 1 + b] = ',';
    memcpy(m->text + a + b + 2, without_proof.s, without_proof.len);
    m->len = a + b + 2 + without_proof.len;
}

/* Recovers ClientKey = proof XOR HMAC(StoredKey, AuthMessage) and checks that its hash is
 * StoredKey, comparing in constant time. */
static bool proof_ok(const pd_scram_t *st, const auth_message_t *m, const uint8_t *proof)
{
    uint8_t sig[PD_SCRAM_KEY_LEN], key[PD_SCRAM_KEY_LEN], hash[PD_SCRAM_KEY_LEN];
    bool ok = hmac_sha256(st->secret.stored_key, PD_SCRAM_KEY_LEN, m->text, m->len, sig);
    for (size_t i = 0; i < PD_SCRAM_KEY_LEN; i++)
        key[i] = proof[i] ^ sig[i];
    ok = ok && SHA256(key, sizeof key, hash) != NULL &&
         CRYPTO_memcmp(hash, st->secret.stored_key, PD_SCRAM_KEY_LEN) == 0;
    OPENSSL_cleanse(sig, sizeof sig);
    OPENSSL_cleanse(key, sizeof key);
    OPENSSL_cleanse(hash, sizeof hash);
    return ok;
}

/* Appends "v=<base64 HMAC(ServerKey, AuthMessage)>". */
static bool put_server_final(const pd_scram_t *st, const auth_message_t *m, pd_buf_t *out)
{
    uint8_t sig[PD_SCRAM_KEY_LEN];
    char text[2 + B64_KEY_LEN + 1] = "v=";
    if (!hmac_sha256(st->secret.server_key, PD_SCRAM_KEY_LEN, m->text, m->len, sig))
        return false;
    b64_encode(sig, sizeof sig, text + 2);
    pd_buf_put(out, text, strlen(text));
    OPENSSL_cleanse(sig, sizeof sig);
    return true;
}

pd_scram_rc_t pd_scram_server_final(pd_scram_t *st, const uint8_t *client_final, size_t n,
                                    pd_buf_t *out, const char **err)
{
    if (st->step != 1)
        return protocol_error(st, err, "SCRAM exchange is not expecting a client-final-message");
    if (!text_ok(client_final, n, CLIENT_FINAL_MAX))
        return protocol_error(st, err, "malformed SCRAM message: bad length");
    cursor_t c = {(const char *)client_final, (const char *)client_final + n};
    client_final_t f;
    const char *bad = parse_client_final(st, &c, &f);
    if (bad != NULL)
        return protocol_error(st, err, bad);
    auth_message_t m;
    build_auth_message(st, f.without_proof, &m);
    st->step = 2;
    if (!proof_ok(st, &m, f.proof)) {
        *err = "password authentication failed";
        return PD_SCRAM_FAIL;
    }
    if (!put_server_final(st, &m, out))
        return protocol_error(st, err, "SCRAM server signature could not be computed");
    return PD_SCRAM_SUCCESS;
}

void pd_scram_clear(pd_scram_t *st)
{
    OPENSSL_cleanse(st, sizeof *st);
}
