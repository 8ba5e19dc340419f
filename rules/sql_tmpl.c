/*
 * sql_tmpl.c — literal templates, as text: a statement with its literal tokens replaced by
 * $1..$n, and a rewritten template cut at its $i tokens so that another statement's
 * literals can be put in. Tokens are always found with PostgreSQL's own lexer
 * (pg_query_scan), never by searching for quotes or dollar signs, so that quoting, comments,
 * string continuation, E'' escapes and dollar quoting are read exactly as the server reads
 * them. Whether a template may stand for a statement is decided in sql.c.
 */
#include <stdlib.h>
#include <string.h>

#include "rules/sql_internal.h"

/* ---------------------------------------------------------------------------------------
 * Reading pg_query_scan's packed result. It is a protobuf message (pg_query.proto:
 * ScanResult { repeated ScanToken tokens }, ScanToken { start, end, token, ... }); the
 * field numbers are taken from libpg_query's protobuf-c descriptors, so that this reader
 * follows the schema the library was built with. Anything that does not read as that
 * schema (a truncated varint, a length past the end, a span outside the text) sets bad.
 */
enum { WIRE_VARINT = 0, WIRE_FIXED64 = 1, WIRE_LEN = 2, WIRE_FIXED32 = 5 };

static uint32_t field_number(const ProtobufCMessageDescriptor *d, const char *name)
{
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, name);
    return f != NULL ? f->id : 0;
}

static bool read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t r = 0;
    for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        r |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *v = r;
            return true;
        }
    }
    return false;
}

static bool skip_field(const uint8_t **p, const uint8_t *end, unsigned wire)
{
    uint64_t n = 0;
    if (wire == WIRE_VARINT)
        return read_varint(p, end, &n);
    if (wire == WIRE_FIXED64)
        n = 8;
    else if (wire == WIRE_FIXED32)
        n = 4;
    else if (wire != WIRE_LEN || !read_varint(p, end, &n))
        return false;
    if (n > (uint64_t)(end - *p))
        return false;
    *p += n;
    return true;
}

/* One ScanToken message. Fields left out are zero (proto3), as unpacking would give. */
static bool read_token(const pd__scan_t *s, const uint8_t *p, const uint8_t *end, pd__token_t *tok)
{
    int64_t start = 0, stop = 0, token = 0;
    while (p < end) {
        uint64_t key = 0, v = 0;
        if (!read_varint(&p, end, &key))
            return false;
        uint32_t num = (uint32_t)(key >> 3);
        unsigned wire = (unsigned)(key & 7);
        bool ours = num == s->f_start || num == s->f_end || num == s->f_token;
        if (!ours || wire != WIRE_VARINT) {
            if (!skip_field(&p, end, wire))
                return false;
            continue;
        }
        if (!read_varint(&p, end, &v))
            return false;
        /* int32 and enum values travel as the 64-bit two's complement of their value. */
        int64_t value = (int64_t)(int32_t)(uint32_t)v;
        if (num == s->f_start)
            start = value;
        else if (num == s->f_end)
            stop = value;
        else
            token = value;
    }
    if (start < 0 || stop < start || (uint64_t)stop > s->len)
        return false;
    tok->start = (size_t)start;
    tok->end = (size_t)stop;
    tok->token = (PgQuery__Token)token;
    return true;
}

bool pd__scan_open(pd__scan_t *s, const char *sql)
{
    memset(s, 0, sizeof *s);
    s->raw = pg_query_scan(sql);
    if (s->raw.error != NULL) {
        pg_query_free_scan_result(s->raw);
        return false;
    }
    s->len = strlen(sql);
    s->f_tokens = field_number(&pg_query__scan_result__descriptor, "tokens");
    s->f_start = field_number(&pg_query__scan_token__descriptor, "start");
    s->f_end = field_number(&pg_query__scan_token__descriptor, "end");
    s->f_token = field_number(&pg_query__scan_token__descriptor, "token");
    s->bad = s->f_tokens == 0 || s->f_start == 0 || s->f_end == 0 || s->f_token == 0;
    pd__scan_rewind(s);
    return true;
}

void pd__scan_rewind(pd__scan_t *s)
{
    s->at = (const uint8_t *)s->raw.pbuf.data;
    s->end = s->at != NULL && !s->bad ? s->at + s->raw.pbuf.len : s->at;
}

bool pd__scan_next(pd__scan_t *s, pd__token_t *tok)
{
    while (s->at < s->end) {
        uint64_t key = 0, len = 0;
        if (!read_varint(&s->at, s->end, &key))
            break;
        if ((uint32_t)(key >> 3) != s->f_tokens || (key & 7) != WIRE_LEN) {
            if (!skip_field(&s->at, s->end, (unsigned)(key & 7)))
                break;
            continue;
        }
        if (!read_varint(&s->at, s->end, &len) || len > (uint64_t)(s->end - s->at))
            break;
        const uint8_t *msg = s->at;
        s->at += len;
        if (!read_token(s, msg, s->at, tok))
            break;
        return true;
    }
    if (s->at < s->end)
        s->bad = true;
    s->at = s->end;
    return false;
}

void pd__scan_close(pd__scan_t *s)
{
    pg_query_free_scan_result(s->raw);
}

bool pd__is_literal_token(PgQuery__Token t)
{
    return t == PG_QUERY__TOKEN__SCONST || t == PG_QUERY__TOKEN__USCONST ||
           t == PG_QUERY__TOKEN__BCONST || t == PG_QUERY__TOKEN__XCONST ||
           t == PG_QUERY__TOKEN__ICONST || t == PG_QUERY__TOKEN__FCONST;
}

/* The kind goes into the template's cache key: the grammar accepts a $n in places where only
   some kinds of literal are valid (date '2020-01-01' but not date 1), so statements whose
   literals differ in kind must not share a template. */
static char kind_letter(PgQuery__Token t)
{
    switch (t) {
    case PG_QUERY__TOKEN__SCONST:
        return 'S';
    case PG_QUERY__TOKEN__BCONST:
        return 'B';
    case PG_QUERY__TOKEN__XCONST:
        return 'X';
    case PG_QUERY__TOKEN__ICONST:
        return 'I';
    default:
        return 'F';
    }
}

/* "$number" into buf (at least 22 bytes), not NUL-terminated; returns its length. By hand
   because snprintf was a measurable part of every template lookup. */
static int param_text(char *buf, size_t number)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + number % 10);
        number /= 10;
    } while (number > 0);
    buf[0] = '$';
    for (int i = 0; i < n; i++)
        buf[1 + i] = digits[n - 1 - i];
    return n + 1;
}

void pd__lits_free(pd__lits_t *l)
{
    free(l->start);
    free(l->end);
    free(l->at);
    free(l->kinds);
    free(l->tmpl.buf);
    memset(l, 0, sizeof *l);
}

/* Counts the tokens and the literals; no literals when the statement cannot be templated
   at all. USCONST (U&'...') is reported by libpg_query with an empty span, so its bytes
   cannot be taken out. */
static size_t count_literals(pd__scan_t *scan, size_t *ntokens)
{
    size_t n = 0;
    bool usable = true;
    pd__token_t tok;
    *ntokens = 0;
    while (pd__scan_next(scan, &tok)) {
        (*ntokens)++;
        if (tok.token == PG_QUERY__TOKEN__PARAM || tok.token == PG_QUERY__TOKEN__USCONST)
            usable = false;
        n += pd__is_literal_token(tok.token) && tok.end > tok.start;
    }
    pd__scan_rewind(scan);
    return usable && !scan->bad ? n : 0;
}

static pd__lits_status_t collect(const char *sql, pd__scan_t *scan, pd__lits_t *out)
{
    size_t n = count_literals(scan, &out->ntokens);
    if (n == 0)
        return PD__LITS_NONE;
    out->start = malloc(n * sizeof *out->start);
    out->end = malloc(n * sizeof *out->end);
    out->at = malloc(n * sizeof *out->at);
    out->kinds = malloc(n + 1);
    /* Room for the template at once: each $i is at most as long as its number plus one. */
    out->tmpl.cap = scan->len + n * 8 + 1;
    out->tmpl.buf = malloc(out->tmpl.cap);
    if (out->start == NULL || out->end == NULL || out->at == NULL || out->kinds == NULL ||
        out->tmpl.buf == NULL)
        return PD__LITS_OOM;
    out->tmpl.buf[0] = '\0';
    size_t copied = 0;
    pd__token_t tok;
    while (out->n < n && pd__scan_next(scan, &tok)) {
        if (!pd__is_literal_token(tok.token) || tok.end == tok.start)
            continue;
        if (tok.start < copied)
            return PD__LITS_NONE; /* tokens out of order: not what the lexer gives */
        char param[32];
        int plen = param_text(param, out->n + 1);
        pd__text_add(&out->tmpl, sql + copied, tok.start - copied);
        out->at[out->n] = out->tmpl.len;
        pd__text_add(&out->tmpl, param, (size_t)plen);
        out->start[out->n] = tok.start;
        out->end[out->n] = tok.end;
        out->kinds[out->n] = kind_letter(tok.token);
        out->n++;
        copied = tok.end;
    }
    if (out->n < n)
        return PD__LITS_NONE;
    out->kinds[out->n] = '\0';
    pd__text_add(&out->tmpl, sql + copied, scan->len - copied);
    return out->tmpl.oom ? PD__LITS_OOM : PD__LITS_OK;
}

pd__lits_status_t pd__lits_take(const char *sql, pd__lits_t *out)
{
    memset(out, 0, sizeof *out);
    pd__scan_t scan;
    if (!pd__scan_open(&scan, sql))
        return PD__LITS_NONE;
    pd__lits_status_t st = collect(sql, &scan, out);
    pd__scan_close(&scan);
    if (st != PD__LITS_OK)
        pd__lits_free(out);
    return st;
}

/* The lexer reads the text between two literals the same way in the statement and in the
   template as long as each $i is a token of its own exactly where the literal was: so that,
   and the same number of tokens, is what is checked. */
bool pd__lits_verify(const pd__lits_t *l)
{
    pd__scan_t scan;
    if (!pd__scan_open(&scan, l->tmpl.buf))
        return false;
    size_t next = 0, ntokens = 0;
    bool ok = true;
    pd__token_t tok;
    while (ok && pd__scan_next(&scan, &tok)) {
        ntokens++;
        if (tok.token != PG_QUERY__TOKEN__PARAM) {
            ok = !pd__is_literal_token(tok.token);
            continue;
        }
        char param[32];
        int plen = param_text(param, next + 1);
        ok = next < l->n && tok.start == l->at[next] && tok.end == l->at[next] + (size_t)plen;
        next++;
    }
    ok = ok && !scan.bad && ntokens == l->ntokens && next == l->n;
    pd__scan_close(&scan);
    return ok;
}

void pd__split_free(pd__split_t *s)
{
    free(s->text);
    free(s->cut);
    free(s->lit);
    memset(s, 0, sizeof *s);
}

/* The literal a parameter token stands for (0-based), or -1 when its number is not one of
   the template's. */
static long slot_of(const char *out, const pd__token_t *tok, size_t nlits)
{
    const char *digits = out + tok->start + 1;
    char *stop = NULL;
    unsigned long v = tok->end > tok->start + 1 ? strtoul(digits, &stop, 10) : 0;
    if (stop != out + tok->end || v < 1 || v > nlits)
        return -1;
    return (long)v - 1;
}

static pd__split_status_t cut(const char *out, size_t nlits, pd__scan_t *scan, pd__split_t *s)
{
    size_t nparams = 0;
    pd__token_t tok;
    while (pd__scan_next(scan, &tok))
        nparams += tok.token == PG_QUERY__TOKEN__PARAM;
    pd__scan_rewind(scan);
    bool *seen = calloc(nlits + 1, sizeof *seen);
    s->cut = malloc((nparams + 1) * sizeof *s->cut);
    s->lit = malloc((nparams + 1) * sizeof *s->lit);
    if (seen == NULL || s->cut == NULL || s->lit == NULL) {
        free(seen);
        return PD__SPLIT_OOM;
    }
    pd__text_t t = {0};
    size_t copied = 0;
    pd__split_status_t st = scan->bad ? PD__SPLIT_UNSAFE : PD__SPLIT_OK;
    while (st == PD__SPLIT_OK && pd__scan_next(scan, &tok)) {
        if (tok.token != PG_QUERY__TOKEN__PARAM)
            continue;
        long slot = slot_of(out, &tok, nlits);
        if (slot < 0 || s->nslots == nparams || tok.start < copied) {
            st = PD__SPLIT_UNSAFE;
            break;
        }
        pd__text_add(&t, out + copied, tok.start - copied);
        s->cut[s->nslots] = t.len;
        s->lit[s->nslots++] = (size_t)slot;
        seen[slot] = true;
        copied = tok.end;
    }
    pd__text_add(&t, out + copied, scan->len - copied);
    if (scan->bad)
        st = PD__SPLIT_UNSAFE;
    for (size_t i = 0; st == PD__SPLIT_OK && i < nlits; i++)
        if (!seen[i])
            st = PD__SPLIT_UNSAFE;
    free(seen);
    s->text = t.buf;
    s->len = t.len;
    return t.oom ? PD__SPLIT_OOM : st;
}

pd__split_status_t pd__split_make(const char *out, size_t nlits, pd__split_t *s)
{
    memset(s, 0, sizeof *s);
    pd__scan_t scan;
    if (!pd__scan_open(&scan, out))
        return PD__SPLIT_UNSAFE;
    pd__split_status_t st = cut(out, nlits, &scan, s);
    pd__scan_close(&scan);
    if (st != PD__SPLIT_OK)
        pd__split_free(s);
    return st;
}

char *pd__split_fill(const pd__split_t *s, const char *sql, const pd__lits_t *l)
{
    size_t total = s->len;
    for (size_t j = 0; j < s->nslots; j++)
        total += l->end[s->lit[j]] - l->start[s->lit[j]];
    char *buf = malloc(total + 1);
    if (buf == NULL)
        return NULL;
    size_t at = 0, from = 0;
    for (size_t j = 0; j < s->nslots; j++) {
        memcpy(buf + at, s->text + from, s->cut[j] - from);
        at += s->cut[j] - from;
        from = s->cut[j];
        size_t lit = s->lit[j], n = l->end[lit] - l->start[lit];
        memcpy(buf + at, sql + l->start[lit], n);
        at += n;
    }
    memcpy(buf + at, s->text + from, s->len - from);
    buf[total] = '\0';
    return buf;
}

/* ---------------------------------------------------------------------------------------
 * The fast path for plain statements.
 *
 * A statement of one shape with new literals each time (a client that inlines its values)
 * would be lexed by pg_query_scan at every execution only to find its template, the
 * dearest step left on that path. For "plain" text — ASCII, no comments, no backslash, no
 * dollar sign, no prefixed or adjacent strings, numbers that are plain decimal integers or
 * fractions — where PostgreSQL's lexer finds literals is evident, and this finds them
 * the same way; anything else returns PD__LITS_NONE and the caller asks the real lexer.
 * The result is only used to look a template up (its ntokens is not counted): a template
 * is made, and verified, from the real lexer's reading only. Tests and the SQL fuzz target
 * check that wherever this answers, it answers exactly as pd__lits_take does.
 */
static bool ident_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static bool is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* An integer literal that does not fit int32 is FCONST to PostgreSQL's lexer. */
static char integer_kind(const char *s, size_t n)
{
    while (n > 1 && *s == '0') {
        s++;
        n--;
    }
    if (n < 10)
        return 'I';
    if (n > 10)
        return 'F';
    return memcmp(s, "2147483647", 10) <= 0 ? 'I' : 'F';
}

typedef struct {
    size_t start, end;
    char kind;
} plain_lit_t;

/*
 * The index just after the quoted text that starts at sql[i] with its quote (' or "; the
 * quote doubled stands for itself), or 0 when the text ends first or the quoted part holds
 * what plain text may not: a non-ASCII byte, a backslash, and (unless controls_ok, as in a
 * string) a control character.
 */
static size_t quoted_end(const char *sql, size_t len, size_t i, bool controls_ok)
{
    char q = sql[i];
    for (i++; i < len; i++) {
        unsigned char c = (unsigned char)sql[i];
        if (c == (unsigned char)q) {
            if (i + 1 < len && sql[i + 1] == q) {
                i++;
                continue;
            }
            return i + 1;
        }
        if (c >= 0x80 || c == '\\' || (c < 0x20 && !controls_ok))
            return 0;
    }
    return 0;
}

/* The literals of plain text, into lits (at most max); -1 when the text is not plain. */
static long plain_literals(const char *sql, size_t len, plain_lit_t *lits, size_t max)
{
    size_t n = 0, i = 0;
    while (i < len) {
        unsigned char c = (unsigned char)sql[i];
        if (c >= 0x80 || c == '\\' || c == '$' || c == 0 || c == 0x7f ||
            (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\f'))
            return -1;
        if ((c == '-' && i + 1 < len && sql[i + 1] == '-') ||
            (c == '/' && i + 1 < len && sql[i + 1] == '*'))
            return -1;  /* comments */
        if (c == '"') { /* a quoted identifier: "" doubles a quote */
            if (i + 1 < len && sql[i + 1] == '"')
                return -1; /* "" (empty: an error) or a quote-led name: the lexer's call */
            if ((i = quoted_end(sql, len, i, false)) == 0)
                return -1;
            continue;
        }
        if (c == '\'') {
            if (i > 0 &&
                (ident_char((unsigned char)sql[i - 1]) || sql[i - 1] == '&' || sql[i - 1] == '\''))
                return -1; /* E'', B'', X'', N'', U&'' and the like */
            size_t start = i;
            if ((i = quoted_end(sql, len, i, true)) == 0)
                return -1;
            /* 'a' 'b' across a newline is one literal to the lexer: not plain. */
            size_t j = i;
            while (j < len && (sql[j] == ' ' || sql[j] == '\t' || sql[j] == '\n' ||
                               sql[j] == '\r' || sql[j] == '\f'))
                j++;
            if (j < len && sql[j] == '\'')
                return -1;
            if (i < len && (ident_char((unsigned char)sql[i]) || sql[i] == '"'))
                return -1;
            if (n == max)
                return -1;
            lits[n++] = (plain_lit_t){start, i, 'S'};
            continue;
        }
        if (ident_char(c) && !is_digit(c)) { /* an identifier or keyword */
            while (i < len && ident_char((unsigned char)sql[i]))
                i++;
            if (i < len && (sql[i] == '\'' || sql[i] == '"' || sql[i] == '&'))
                return -1;
            continue;
        }
        if (is_digit(c)) {
            size_t start = i;
            while (i < len && is_digit((unsigned char)sql[i]))
                i++;
            char kind = integer_kind(sql + start, i - start);
            if (i < len && sql[i] == '.') {
                if (i + 1 >= len || !is_digit((unsigned char)sql[i + 1]))
                    return -1; /* 1.. and 1. are the lexer's corner cases */
                for (i++; i < len && is_digit((unsigned char)sql[i]); i++) {
                }
                kind = 'F';
            }
            if (i < len && (ident_char((unsigned char)sql[i]) || sql[i] == '.' || sql[i] == '"' ||
                            sql[i] == '\''))
                return -1; /* exponents, 0x, 1_000, 123abc: left to the lexer */
            if (n == max)
                return -1;
            lits[n++] = (plain_lit_t){start, i, kind};
            continue;
        }
        if (c == '.' && i + 1 < len && is_digit((unsigned char)sql[i + 1]))
            return -1; /* .5 */
        if (strchr("~!@#^&|`?+-*/%<>=", c) != NULL) {
            /* Operators: long ones (the lexer has limits and splitting rules) and the
               rarely seen ones are left to it. */
            size_t start = i;
            while (i < len && sql[i] != '\0' && strchr("~!@#^&|`?+-*/%<>=", sql[i]) != NULL)
                i++;
            if (i - start > 3 || memchr(sql + start, '`', i - start) != NULL)
                return -1;
            for (size_t k = start; k + 1 < i; k++)
                if ((sql[k] == '-' && sql[k + 1] == '-') || (sql[k] == '/' && sql[k + 1] == '*'))
                    return -1; /* a comment starts inside the run */
            continue;
        }
        i++;
    }
    return (long)n;
}

pd__lits_status_t pd__lits_take_plain(const char *sql, pd__lits_t *out)
{
    memset(out, 0, sizeof *out);
    enum { MAX_PLAIN_LITS = 64 };
    plain_lit_t found[MAX_PLAIN_LITS];
    size_t len = strlen(sql);
    long n = plain_literals(sql, len, found, MAX_PLAIN_LITS);
    if (n <= 0)
        return PD__LITS_NONE;
    out->start = malloc((size_t)n * sizeof *out->start);
    out->end = malloc((size_t)n * sizeof *out->end);
    out->at = malloc((size_t)n * sizeof *out->at);
    out->kinds = malloc((size_t)n + 1);
    out->tmpl.cap = len + (size_t)n * 8 + 1;
    out->tmpl.buf = malloc(out->tmpl.cap);
    if (out->start == NULL || out->end == NULL || out->at == NULL || out->kinds == NULL ||
        out->tmpl.buf == NULL) {
        pd__lits_free(out);
        return PD__LITS_OOM;
    }
    out->tmpl.buf[0] = '\0';
    size_t copied = 0;
    for (long k = 0; k < n; k++) {
        char param[32];
        int plen = param_text(param, out->n + 1);
        pd__text_add(&out->tmpl, sql + copied, found[k].start - copied);
        out->at[out->n] = out->tmpl.len;
        pd__text_add(&out->tmpl, param, (size_t)plen);
        out->start[out->n] = found[k].start;
        out->end[out->n] = found[k].end;
        out->kinds[out->n] = found[k].kind;
        out->n++;
        copied = found[k].end;
    }
    out->kinds[out->n] = '\0';
    pd__text_add(&out->tmpl, sql + copied, len - copied);
    if (out->tmpl.oom) {
        pd__lits_free(out);
        return PD__LITS_OOM;
    }
    return PD__LITS_OK;
}
