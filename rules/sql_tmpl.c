/*
 * sql_tmpl.c — literal templates, as text: a statement with its literal tokens replaced by
 * $1..$n, and a rewritten template cut at its $i tokens so that another statement's
 * literals can be put in. Tokens are always found with PostgreSQL's own lexer
 * (pg_query_scan), never by searching for quotes or dollar signs, so that quoting, comments,
 * string continuation, E'' escapes and dollar quoting are read exactly as the server reads
 * them. Whether a template may stand for a statement is decided in sql.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rules/sql_internal.h"

PgQuery__ScanResult *pd__scan(const char *sql, bool *lex_error)
{
    PgQueryScanResult sr = pg_query_scan(sql);
    *lex_error = sr.error != NULL;
    PgQuery__ScanResult *scan = NULL;
    if (sr.error == NULL)
        scan = pg_query__scan_result__unpack(NULL, sr.pbuf.len, (const uint8_t *)sr.pbuf.data);
    pg_query_free_scan_result(sr);
    return scan;
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

static int param_text(char *buf, size_t size, size_t number)
{
    return snprintf(buf, size, "$%zu", number);
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

/* Counts the literals; 0 when the statement cannot be templated at all. USCONST (U&'...')
   is reported by libpg_query with an empty span, so its bytes cannot be taken out. */
static size_t count_literals(const PgQuery__ScanResult *scan, size_t len)
{
    size_t n = 0, after = 0;
    for (size_t i = 0; i < scan->n_tokens; i++) {
        const PgQuery__ScanToken *tok = scan->tokens[i];
        if (tok->token == PG_QUERY__TOKEN__PARAM || tok->token == PG_QUERY__TOKEN__USCONST)
            return 0;
        if (!pd__is_literal_token(tok->token))
            continue;
        if (tok->start < 0 || (size_t)tok->start < after || tok->end <= tok->start ||
            (size_t)tok->end > len)
            return 0;
        after = (size_t)tok->end;
        n++;
    }
    return n;
}

static pd__lits_status_t collect(const char *sql, const PgQuery__ScanResult *scan, pd__lits_t *out)
{
    size_t len = strlen(sql);
    size_t n = count_literals(scan, len);
    if (n == 0)
        return PD__LITS_NONE;
    out->start = malloc(n * sizeof *out->start);
    out->end = malloc(n * sizeof *out->end);
    out->at = malloc(n * sizeof *out->at);
    out->kinds = malloc(n + 1);
    if (out->start == NULL || out->end == NULL || out->at == NULL || out->kinds == NULL)
        return PD__LITS_OOM;
    out->ntokens = scan->n_tokens;
    size_t copied = 0;
    for (size_t i = 0; i < scan->n_tokens; i++) {
        const PgQuery__ScanToken *tok = scan->tokens[i];
        if (!pd__is_literal_token(tok->token))
            continue;
        char param[32];
        int plen = param_text(param, sizeof param, out->n + 1);
        pd__text_add(&out->tmpl, sql + copied, (size_t)tok->start - copied);
        out->at[out->n] = out->tmpl.len;
        pd__text_add(&out->tmpl, param, (size_t)plen);
        out->start[out->n] = (size_t)tok->start;
        out->end[out->n] = (size_t)tok->end;
        out->kinds[out->n] = kind_letter(tok->token);
        out->n++;
        copied = (size_t)tok->end;
    }
    out->kinds[out->n] = '\0';
    pd__text_add(&out->tmpl, sql + copied, len - copied);
    return out->tmpl.oom ? PD__LITS_OOM : PD__LITS_OK;
}

pd__lits_status_t pd__lits_take(const char *sql, pd__lits_t *out)
{
    memset(out, 0, sizeof *out);
    bool lex_error = false;
    PgQuery__ScanResult *scan = pd__scan(sql, &lex_error);
    if (scan == NULL)
        return lex_error ? PD__LITS_NONE : PD__LITS_OOM;
    pd__lits_status_t st = collect(sql, scan, out);
    pg_query__scan_result__free_unpacked(scan, NULL);
    if (st != PD__LITS_OK)
        pd__lits_free(out);
    return st;
}

/* The lexer reads the text between two literals the same way in the statement and in the
   template as long as each $i is a token of its own exactly where the literal was: so that,
   and the same number of tokens, is what is checked. */
bool pd__lits_verify(const pd__lits_t *l)
{
    bool lex_error = false;
    PgQuery__ScanResult *scan = pd__scan(l->tmpl.buf, &lex_error);
    if (scan == NULL)
        return false;
    bool ok = scan->n_tokens == l->ntokens;
    size_t next = 0;
    for (size_t i = 0; ok && i < scan->n_tokens; i++) {
        const PgQuery__ScanToken *tok = scan->tokens[i];
        if (tok->token != PG_QUERY__TOKEN__PARAM) {
            ok = !pd__is_literal_token(tok->token);
            continue;
        }
        char param[32];
        int plen = param_text(param, sizeof param, next + 1);
        ok = next < l->n && (size_t)tok->start == l->at[next] &&
             (size_t)tok->end == l->at[next] + (size_t)plen;
        next++;
    }
    pg_query__scan_result__free_unpacked(scan, NULL);
    return ok && next == l->n;
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
static long slot_of(const char *out, const PgQuery__ScanToken *tok, size_t nlits)
{
    const char *digits = out + tok->start + 1;
    char *stop = NULL;
    unsigned long v = strtoul(digits, &stop, 10);
    if (stop != out + tok->end || stop == digits || v < 1 || v > nlits)
        return -1;
    return (long)v - 1;
}

static pd__split_status_t cut(const char *out, size_t nlits, const PgQuery__ScanResult *scan,
                              pd__split_t *s)
{
    size_t nparams = 0;
    for (size_t i = 0; i < scan->n_tokens; i++)
        nparams += scan->tokens[i]->token == PG_QUERY__TOKEN__PARAM;
    bool *seen = calloc(nlits + 1, sizeof *seen);
    s->cut = malloc((nparams + 1) * sizeof *s->cut);
    s->lit = malloc((nparams + 1) * sizeof *s->lit);
    if (seen == NULL || s->cut == NULL || s->lit == NULL) {
        free(seen);
        return PD__SPLIT_OOM;
    }
    pd__text_t t = {0};
    size_t copied = 0;
    pd__split_status_t st = PD__SPLIT_OK;
    for (size_t i = 0; st == PD__SPLIT_OK && i < scan->n_tokens; i++) {
        const PgQuery__ScanToken *tok = scan->tokens[i];
        if (tok->token != PG_QUERY__TOKEN__PARAM)
            continue;
        long slot = slot_of(out, tok, nlits);
        if (slot < 0) {
            st = PD__SPLIT_UNSAFE;
            break;
        }
        pd__text_add(&t, out + copied, (size_t)tok->start - copied);
        s->cut[s->nslots] = t.len;
        s->lit[s->nslots++] = (size_t)slot;
        seen[slot] = true;
        copied = (size_t)tok->end;
    }
    pd__text_add(&t, out + copied, strlen(out + copied));
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
    bool lex_error = false;
    PgQuery__ScanResult *scan = pd__scan(out, &lex_error);
    if (scan == NULL)
        return lex_error ? PD__SPLIT_UNSAFE : PD__SPLIT_OOM;
    pd__split_status_t st = cut(out, nlits, scan, s);
    pg_query__scan_result__free_unpacked(scan, NULL);
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
